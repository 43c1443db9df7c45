"""The experiment's shared setup, used by the protocol and by `prefprune.validate` alike: the tokenizer, the
pairs that fit `max_length`, the model of a seed and the prefix cache of a configuration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoTokenizer

from prefprune import train as train_mod
from prefprune.data import encode_pairs
from prefprune.data.encode import too_long_message
from prefprune.experiment.config import ExperimentConfig
from prefprune.model import build_model, resolve_backbone
from prefprune.prefix_cache import PrefixCache, adapt_top_layers
from prefprune.testing import tiny_config, tiny_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "build_seed_model",
    "fit_training",
    "fit_validation",
    "fitting_pairs",
    "load_tokenizer",
    "prefix_cache",
    "too_long_test_pairs",
]


def build_seed_model(cfg: ExperimentConfig, seed: int) -> tuple[nn.Module, Any]:
    """The reward model of one seed (its LoRA/head initialisation), adapted to the top `lora_layers`."""
    model, tokenizer = build_model(cfg.model, seed=seed)
    if cfg.lora_layers is not None:
        adapt_top_layers(model, cfg.lora_layers)
    return model, tokenizer


def _num_layers(cfg: ExperimentConfig) -> int:
    """Number of transformer layers of the configured base model (read from its config only)."""
    family = cfg.model.tiny_family
    if family is not None:
        return int(tiny_config(family).num_hidden_layers)
    return int(AutoConfig.from_pretrained(resolve_backbone(cfg.model.model)).num_hidden_layers)


def load_tokenizer(cfg: ExperimentConfig) -> Any:
    """The tokenizer of the configured model, without loading the model."""
    if cfg.model.tiny_family is not None:
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_backbone(cfg.model.model))


def fitting_pairs(pairs: Sequence, tokenizer: Any, max_length: int, *,
                  truncation: str = "error") -> tuple[list[str], list[str]]:
    """Ids of the pairs that fit `max_length` (with `truncation`), and of those that do not."""
    _, too_long = train_mod.encode_for_training(
        pairs, tokenizer, max_length=max_length, truncation=truncation, too_long="skip"
    )
    left_out = set(too_long)
    return [p.id for p in pairs if p.id not in left_out], too_long


def prefix_cache(cfg: ExperimentConfig) -> PrefixCache | None:
    """The cache of the frozen layers below the top `lora_layers` (None when nothing is cached)."""
    if cfg.lora_layers is None or not cfg.cache_prefix:
        return None
    n_layers = _num_layers(cfg)
    if cfg.lora_layers > n_layers:
        raise ValueError(f"lora_layers={cfg.lora_layers} but {cfg.model.model!r} has {n_layers} layers")
    return PrefixCache(n_layers - cfg.lora_layers) if cfg.lora_layers < n_layers else None


def fit_training(train: Any, tokenizer: Any, max_length: int) -> tuple[Any, list[str]]:
    """The training pairs that fit `max_length` (prompts may be cut) and the ids of those that do not.

    A pair whose response alone exceeds max_length can be neither trained on nor scored: it leaves the
    experiment (counted) rather than each stage treating it its own way."""
    fit_ids, too_long = fitting_pairs(train, tokenizer, max_length, truncation="prompt")
    if not fit_ids:
        raise ValueError(too_long_message("training pairs", train, tokenizer, max_length))
    if too_long:
        logger.warning(
            "left out %d of %d training pairs whose responses exceed max_length=%d (e.g. %s)",
            len(too_long), len(train), max_length, too_long[:3],
        )
        train = train.select(fit_ids)
    return train, too_long


def fit_validation(val: Any, tokenizer: Any, max_length: int) -> tuple[Any, list[str]]:
    """The validation pairs that fit `max_length` uncut (validation pairs are never cut) and the ids of
    those that do not; ValueError naming the length needed when none fits."""
    ok, too_long = fitting_pairs(val, tokenizer, max_length)
    if not too_long:
        return val, []
    logger.warning(
        "scoring uses %d of %d validation pairs: %d do not fit max_length=%d uncut",
        len(ok), len(val), len(too_long), max_length,
    )
    if not ok:
        whole = encode_pairs(val, tokenizer, max_length=1 << 30)
        longest = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in whole)
        raise ValueError(f"no validation pair fits max_length={max_length} uncut (validation pairs are never "
                         f"cut); raise max_length (--max-length) to {longest} for all to fit")
    return val.select(ok), too_long


def too_long_test_pairs(test: Any, tokenizer: Any, max_length: int) -> list[str]:
    """Ids of the test pairs that evaluation skips (their responses exceed max_length; prompts may be cut)."""
    return fitting_pairs(test, tokenizer, max_length, truncation="prompt")[1]
