"""The pairs an experiment uses: what loading dropped, and per split the pairs in it, those left out (too long
for max_length, untrusted validation pairs) and those used (the fitting itself: `experiment.setup`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LOAD_DROPS", "data_counts"]

#: Loading counts (`PreferenceDataset.stats`) of records that never became pairs, in report order.
LOAD_DROPS = ("skipped_bad", "dropped_identical", "dropped_duplicate")


def data_counts(
    stats: Mapping[str, int], parts: Mapping[str, int], left_out: Mapping[str, Mapping[str, int]]
) -> dict[str, Any]:
    """Counts as used: ``loaded`` (records read, each loading drop, pairs kept) and per split ``in_split``,
    each reason for leaving pairs out, and ``used`` (= in_split minus everything left out).

    Args:
        stats: the dataset's loading counts (`PreferenceDataset.stats`; no ``records`` for synthetic data).
        parts: pairs per split (train, validation, test) as split.
        left_out: per split, reason -> pairs left out (e.g. ``{"train": {"too_long": 3}}``).
    """
    loaded = {k: int(stats[k]) for k in ("records", *LOAD_DROPS) if k in stats}
    loaded["pairs"] = int(stats.get("pairs", sum(parts.values())))
    out: dict[str, Any] = {"loaded": loaded}
    for name, n in parts.items():
        reasons = {k: int(v) for k, v in (left_out.get(name) or {}).items()}
        out[name] = {"in_split": int(n), **reasons, "used": int(n) - sum(reasons.values())}
    return out
