"""Planted label noise: random flips or a biased annotator, on a seeded share of pairs, recorded per pair.

Both kinds swap chosen and rejected and mark the pair ``meta["flipped"]`` (so noise detection knows the
truth). Random flips hit pairs regardless of content; reward models shrug them off. The biased annotator
(`plant_length_bias`) is what real preference data suffers from: on its share of pairs it prefers the
longer response whatever its quality, so its errors all point the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prefprune.data.loading import PreferenceDataset

__all__ = ["plant_label_noise", "plant_length_bias", "restore_labels"]


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


def _length(text: str) -> int:
    return len(text.split())


def plant_length_bias(dataset: PreferenceDataset, fraction: float, *, seed: int) -> PreferenceDataset:
    """A biased annotator: on a seeded `fraction` of the pairs, the longer response (in words) is chosen.

    Pairs of that share whose chosen response is already the longer one (or as long) keep their label;
    the others are swapped and marked ``meta["flipped"]`` (and ``meta["noise"] = "prefer_longer"``).

    Returns:
        A new PreferenceDataset; `flipped_ids` lists the pairs whose label the bias changed.
    """
    if dataset.flipped_ids:
        raise ValueError(f"{dataset.source!r} already has planted noise ({len(dataset.flipped_ids)} pairs)")
    n = len(dataset)
    judged = set(np.random.default_rng(seed).choice(n, size=int(round(fraction * n)), replace=False).tolist())
    pairs = [
        dataclasses.replace(
            p,
            chosen=p.rejected,
            rejected=p.chosen,
            meta={**p.meta, "flipped": True, "noise": "prefer_longer"},
        )
        if i in judged and _length(p.rejected) > _length(p.chosen)
        else p
        for i, p in enumerate(dataset.pairs)
    ]
    return PreferenceDataset(pairs, schema=dataset.schema, source=dataset.source, stats=dataset.stats)


def restore_labels(dataset: PreferenceDataset, ids: set[str] | frozenset[str]) -> PreferenceDataset:
    """The dataset with the planted noise of the pairs in `ids` undone (their true labels back)."""
    pairs = [
        dataclasses.replace(
            p,
            chosen=p.rejected,
            rejected=p.chosen,
            meta={k: v for k, v in p.meta.items() if k not in ("flipped", "noise")},
        )
        if p.id in ids and p.meta.get("flipped")
        else p
        for p in dataset.pairs
    ]
    return PreferenceDataset(pairs, schema=dataset.schema, source=dataset.source, stats=dataset.stats)
