"""The data settings of every command (`DataConfig`) and the one function that turns them into a dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from prefprune._config import cli_arg
from prefprune.data.loading import PreferenceDataset
from prefprune.data.noise import plant_label_noise, plant_length_bias
from prefprune.data.synthetic import load_or_generate

__all__ = ["SYNTHETIC", "DataConfig", "SchemaChoice", "absolute_source", "load_data"]

#: The `source` that generates TL;DR-style pairs instead of reading a file or hub dataset.
SYNTHETIC = "synthetic"
#: Record layouts a setting may name; "auto" detects the layout from the first record.
SchemaChoice = Literal["auto", "tldr", "prompt_chosen_rejected", "hh"]


@dataclass
class DataConfig:
    """Where the preference pairs come from and how they are read (flags and YAML keys = field names)."""

    source: Annotated[str, cli_arg(aliases=("--data",))] = field(
        default=SYNTHETIC,
        metadata={
            "help": "preference data: a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a hub dataset id, or "
            "'synthetic' (generated TL;DR-style pairs with a learnable rule)"
        },
    )
    schema: SchemaChoice = field(
        default="auto",
        metadata={
            "help": "record layout: tldr (openai/summarize_from_feedback comparisons), "
            "prompt_chosen_rejected, hh ({chosen, rejected} dialogues); auto = detect from the first record"
        },
    )
    split: str = field(
        default="train", metadata={"help": "dataset split (hub datasets and split-keyed JSON)"}
    )
    config_name: Annotated[str | None, cli_arg(aliases=("--data-config",))] = field(
        default=None, metadata={"help": "hub dataset config, e.g. comparisons"}
    )
    skip_bad: bool = field(
        default=False, metadata={"help": "skip unreadable records (counted and logged) instead of failing"}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "use at most the first N pairs"})
    synthetic_pairs: int = field(
        default=1000, metadata={"help": "number of synthetic pairs (source synthetic)"}
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "fraction of pairs with chosen and rejected swapped (planted noise, ids recorded as "
            "flipped_ids); the synthetic generator plants it itself"
        },
    )
    noise: Literal["flip", "prefer_longer"] = field(
        default="flip",
        metadata={
            "help": "kind of planted noise: flip = swap the labels of random pairs; prefer_longer = a biased "
            "annotator that labels the longer response chosen on a label_noise share of the pairs"
        },
    )
    data_seed: int = field(
        default=0, metadata={"help": "seed of the synthetic generator and of planted label noise"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise!r}")
        if self.synthetic_pairs < 10:
            raise ValueError(f"synthetic_pairs must be at least 10, got {self.synthetic_pairs!r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs must be a positive number (or None), got {self.max_pairs!r}")

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC


def absolute_source(source: str | os.PathLike) -> str:
    """A local file or folder as an absolute path (a later stage reads it from any folder); the synthetic
    generator, a hub id or ``<pairs>`` unchanged."""
    if str(source) == SYNTHETIC or not Path(source).expanduser().exists():
        return str(source)
    return str(Path(source).expanduser().resolve())


def load_data(cfg: DataConfig, *, source: str | None = None, plant_noise: bool = False) -> PreferenceDataset:
    """The dataset `cfg` names (or `source`, read with `cfg`'s other settings).

    Synthetic data carries its own planted noise (`label_noise`, of kind `noise`); with `plant_noise`,
    noise is also planted into loaded data (the experiment does, to measure noise detection on real pairs).
    """
    src = cfg.source if source is None else source
    biased = cfg.noise == "prefer_longer"
    data = load_or_generate(
        src,
        synthetic_pairs=cfg.synthetic_pairs,
        label_noise=0.0 if biased else cfg.label_noise,
        seed=cfg.data_seed,
        schema=cfg.schema,
        split=cfg.split,
        name=cfg.config_name,
        skip_bad=cfg.skip_bad,
        max_pairs=cfg.max_pairs,
    )
    if biased and cfg.label_noise and (plant_noise or src == SYNTHETIC):
        return plant_length_bias(data, cfg.label_noise, seed=cfg.data_seed)
    if plant_noise and cfg.label_noise and src != SYNTHETIC:
        data = plant_label_noise(data, cfg.label_noise, seed=cfg.data_seed)
    return data
