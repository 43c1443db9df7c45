"""Building LoRA reward models: resolve the backbone, wrap it with peft adapters, check the sites.

A reward model is ``AutoModelForSequenceClassification(num_labels=1)`` with a frozen base, LoRA adapters
and a trainable head (``modules_to_save``); see `prefprune.model` for why the layout is what it is.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from prefprune.model.config import (
    ALL_LINEAR,
    BACKBONE_PACKAGES,
    CONV1D_FAMILIES,
    FIRST_TOKEN_FAMILIES,
    POOLER_FAMILIES,
    LoRASettings,
    ModelConfig,
    default_target_modules,
)
from prefprune.model.forward import trainable_linears
from prefprune.testing import tiny_config, tiny_tokenizer

__all__ = ["build_model", "build_reward_model", "config_summary", "resolve_backbone"]

logger = logging.getLogger(__name__)


def resolve_backbone(name: str | os.PathLike) -> str:
    """Resolve a backbone alias (``"minilm"``) to a local folder; other names are returned unchanged.

    The package is located with ``importlib.util.find_spec`` without importing it (importing it pulls
    in sentence-transformers, which is slow and unneeded).

    Raises:
        ModuleNotFoundError: The alias names a backbone whose package is not installed.
    """
    key = str(name)
    if key not in BACKBONE_PACKAGES:
        return key
    package, sub, extra = BACKBONE_PACKAGES[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"backbone {key!r} needs the package {package.replace('_', '-')}: pip install '{extra}'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"backbone {key!r}: no config.json in {folder} (broken install of {package})")
    return str(folder)


def _head_name(model: nn.Module) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise ValueError(
        f"{type(model).__name__} has no nn.Linear 'score' or 'classifier' head; prefprune needs a sequence "
        "classifier whose head is a single linear layer"
    )


def config_summary(config: Any) -> dict[str, Any]:
    """The fields that identify a base architecture (compared when an adapter is loaded)."""
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def _fix_pad_token(config: Any, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS when missing) and tell the config which id it is.

    Decoder classifiers read the logit of the rightmost token that is not ``pad_token_id`` (this works
    for either padding side), so the config must know the pad id and the pad id must exist. Encoder
    classifiers read position 0 ([CLS]), so their tokenizer is switched to right padding.
    """
    if tokenizer is not None and config.model_type in FIRST_TOKEN_FAMILIES:
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


def _all_linear_targets(model: nn.Module, head: str) -> list[str]:
    """Names (last components) of every Linear/Conv1D module of the base outside the head and pooler."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear | Conv1D) and not (name == head or name.startswith(head + "."))
        and "pooler" not in name
    }
    if not names:
        raise ValueError(f"target_modules=['{ALL_LINEAR}']: {type(model).__name__} has no linear layer")
    return sorted(names)


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
        if list(targets) == [ALL_LINEAR]:
            targets = _all_linear_targets(model, head)
        modules_to_save = [head]
        train_pooler = lora.train_pooler if lora.train_pooler is not None else model_type in POOLER_FAMILIES
        if train_pooler and model_type in POOLER_FAMILIES:
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
            fan_in_fan_out=model_type in CONV1D_FAMILIES,
            bias="none",
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as err:
            raise ValueError(
                f"cannot add LoRA to {model_type!r} with target_modules={targets}: {err}"
            ) from err
    trainable_linears(model)  # fail now, not in the influence code, if a parameter is not Linear
    model.prefprune_info = {
        "base": base_ref,
        "base_config": config_summary(config),
        "lora": {**asdict(lora), "target_modules": list(targets)},
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
    }
    model.train()
    return model, tokenizer


def build_model(cfg: ModelConfig, *, seed: int) -> tuple[nn.Module, Any]:
    """Build the reward model a `ModelConfig` describes (``tiny:FAMILY`` included) and its tokenizer.

    Args:
        cfg: base, dtype and LoRA settings.
        seed: seeds the random initialisation (see `build_reward_model`).

    Returns:
        ``(model, tokenizer)`` as from `build_reward_model`; a tiny model gets `tiny_tokenizer()`.
    """
    dtype = getattr(torch, cfg.dtype)
    family = cfg.tiny_family
    if family is not None:
        return build_reward_model(tiny_config(family), tokenizer=tiny_tokenizer(), lora=cfg.lora, dtype=dtype,
                                  seed=seed)
    return build_reward_model(cfg.model, lora=cfg.lora, dtype=dtype, seed=seed)


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' load report and peft's deprecation noise for loads whose gaps are expected.

    Loading a backbone into a sequence classifier always reports the head as "newly initialised";
    here that is the point (the head is trained, or comes from the adapter), so the report only
    misleads. Verbosity is restored afterwards.
    """
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
