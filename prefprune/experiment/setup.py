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
    "fit_pairs",
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
        pairs, tokenizer, max_length=max_length, truncation=truncation, too_long="collect"
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


def fit_pairs(pairs: Any, tokenizer: Any, max_length: int, what: str, *,
              cut_prompt: bool) -> tuple[Any, list[str]]:
    """The pairs that fit `max_length` and the ids of those that do not, left out with one warning;
    ValueError naming the length needed when none fits. The one max_length rule of `experiment` and
    `validate`: training and test pairs may have their prompt cut (`cut_prompt`), validation pairs are
    never cut. A pair that does not fit can be neither trained on, scored nor evaluated, so it leaves the
    run (counted) rather than each stage treating it its own way."""
    truncation = "prompt" if cut_prompt else "error"
    fit_ids, too_long = fitting_pairs(pairs, tokenizer, max_length, truncation=truncation)
    where = f"{pairs.source}: " if getattr(pairs, "source", None) else ""
    if not fit_ids and cut_prompt:
        raise ValueError(where + too_long_message(what, pairs, tokenizer, max_length))
    if not fit_ids:
        whole = encode_pairs(pairs, tokenizer, max_length=1 << 30)
        longest = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in whole)
        raise ValueError(f"{where}no {what[:-1]} fits max_length={max_length} uncut ({what} are never cut); "
                         f"raise max_length (--max-length) to {longest} for all to fit")
    if too_long:
        logger.warning("left out %d of %d %s that do not fit max_length=%d%s (e.g. %s)", len(too_long),
                       len(pairs), what, max_length, " even with the prompt cut" if cut_prompt
                       else " uncut (never cut)", too_long[:3])
        pairs = pairs.select(fit_ids)
    return pairs, too_long


def fit_training(train: Any, tokenizer: Any, max_length: int) -> tuple[Any, list[str]]:
    """`fit_pairs` for training pairs (prompts may be cut)."""
    return fit_pairs(train, tokenizer, max_length, "training pairs", cut_prompt=True)


def fit_validation(val: Any, tokenizer: Any, max_length: int) -> tuple[Any, list[str]]:
    """`fit_pairs` for validation pairs (never cut)."""
    return fit_pairs(val, tokenizer, max_length, "validation pairs", cut_prompt=False)


def too_long_test_pairs(test: Any, tokenizer: Any, max_length: int) -> list[str]:
    """Ids of the test pairs that evaluation skips (their responses exceed max_length; prompts may be cut)."""
    return fitting_pairs(test, tokenizer, max_length, truncation="prompt")[1]
