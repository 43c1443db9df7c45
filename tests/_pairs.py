"""Small, easily learnable preference pairs shared by the training and CLI tests."""

from __future__ import annotations

import random

from prefprune.data import PreferenceDataset, PreferencePair

WORDS = ["cat", "dog", "sun", "tree", "car", "rain", "book", "milk"]


def easy_pairs(n: int, *, seed: int = 0, prefix: str = "e") -> PreferenceDataset:
    """An easy task: the chosen answer repeats the prompt's first word, the rejected one another word."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        other = rng.choice([w for w in WORDS if w not in words])
        pairs.append(
            PreferencePair(
                id=f"{prefix}{i}",
                prompt=f"Q: {' '.join(words)}? A:",
                chosen=f" {words[0]} good",
                rejected=f" {other} bad",
            )
        )
    return PreferenceDataset(pairs, schema="prompt_chosen_rejected", source="easy")
