"""Planted label noise: swap chosen and rejected of a seeded share of pairs and record which."""

from __future__ import annotations

import dataclasses

import numpy as np

from prefprune.data.loading import PreferenceDataset

__all__ = ["plant_label_noise"]


def plant_label_noise(dataset: PreferenceDataset, fraction: float, *, seed: int) -> PreferenceDataset:
    """Swap chosen and rejected of a seeded `fraction` of the pairs and mark them `meta["flipped"]`.

    Measures how well scores find wrong labels in real data (whose own noise is unknown).

    Returns:
        A new PreferenceDataset; `flipped_ids` lists the swapped pairs.
    """
    if dataset.flipped_ids:
        raise ValueError(f"{dataset.source!r} already has planted noise ({len(dataset.flipped_ids)} pairs)")
    n = len(dataset)
    k = int(round(fraction * n))
    flip = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    pairs = [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, meta={**p.meta, "flipped": True})
        if i in flip
        else p
        for i, p in enumerate(dataset.pairs)
    ]
    return PreferenceDataset(pairs, schema=dataset.schema, source=dataset.source, stats=dataset.stats)
