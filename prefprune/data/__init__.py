"""Preference data: pairs and datasets, loading in three schemas, tokenization, collation, synthetic data."""

from prefprune.data.batching import PairBatches, length_order
from prefprune.data.config import DataConfig, load_data
from prefprune.data.encode import EncodedPair, collate_pairs, encode_pairs, special_tokens_layout
from prefprune.data.loading import (
    SCHEMAS,
    PreferenceDataset,
    PreferencePair,
    load_preferences,
    pairs_digest,
    tldr_prompt,
)
from prefprune.data.noise import plant_label_noise
from prefprune.data.synthetic import load_or_generate, make_synthetic

__all__ = [
    "SCHEMAS",
    "DataConfig",
    "EncodedPair",
    "PairBatches",
    "PreferenceDataset",
    "PreferencePair",
    "collate_pairs",
    "encode_pairs",
    "load_data",
    "load_or_generate",
    "length_order",
    "load_preferences",
    "make_synthetic",
    "pairs_digest",
    "plant_label_noise",
    "special_tokens_layout",
    "tldr_prompt",
]
