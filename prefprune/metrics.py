"""Noise-detection metrics: how well a score ranks planted label noise first (AUC, precision@k).

Every function takes a *suspicion* ordering: `higher_is_suspect=False` for influence, grad_dot and
grad_cos (low = harmful), `True` for train_loss (high loss = suspect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["detection_auc", "mean_std", "precision_at_k", "suspicion_order"]


def _as_arrays(
    scores: Sequence[float] | np.ndarray, is_noisy: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_noisy, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and is_noisy ({y.shape[0]}) must have the same length")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(
            f"scores must be finite; {bad.size} are not (first at index {int(bad[0])}: {s[bad[0]]})"
        )
    return s, y


def suspicion_order(
    scores: Sequence[float] | np.ndarray, *, higher_is_suspect: bool, ids: Sequence[str] | None = None
) -> np.ndarray:
    """Indices from most to least suspect; ties broken by id (then index) so the order is deterministic.

    Args:
        scores: (n,) scores.
        higher_is_suspect: True when a high score marks a suspect pair (train_loss).
        ids: optional (n,) ids for the tie-break (pruning uses the same rule).

    Returns:
        (n,) int64 permutation.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    key = -s if higher_is_suspect else s
    tie = np.arange(s.shape[0]) if ids is None else np.asarray([str(i) for i in ids])
    # np.lexsort sorts by the last key first.
    return np.lexsort((tie, key)).astype(np.int64)


def detection_auc(
    scores: Sequence[float] | np.ndarray, is_noisy: Sequence[bool] | np.ndarray, *, higher_is_suspect: bool
) -> float:
    """Area under the ROC curve of "score flags a noisy pair", by the Mann–Whitney rank statistic.

    AUC = P(suspicion(noisy) > suspicion(clean)) + ½ P(equal), computed from average ranks in
    O(n log n). 1.0: every noisy pair is more suspect than every clean one; 0.5: chance.

    Args:
        scores: (n,) scores.
        is_noisy: (n,) bools, True for planted noise (flipped labels).
        higher_is_suspect: True when a high score marks a suspect pair.

    Returns:
        The AUC, or NaN when one of the two classes is empty.
    """
    s, y = _as_arrays(scores, is_noisy)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    susp = s if higher_is_suspect else -s
    order = np.argsort(susp, kind="mergesort")
    sorted_vals = susp[order]
    ranks = np.empty(s.shape[0], dtype=np.float64)
    # Average rank (1-based) over each run of ties, so ties count one half.
    boundaries = np.flatnonzero(np.diff(sorted_vals)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.shape[0]]))
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_at_k(
    scores: Sequence[float] | np.ndarray,
    is_noisy: Sequence[bool] | np.ndarray,
    *,
    k: int,
    higher_is_suspect: bool,
    ids: Sequence[str] | None = None,
) -> float:
    """Share of noisy pairs among the k most suspect (ties broken as in `suspicion_order`).

    Args:
        scores: (n,) scores.
        is_noisy: (n,) bools.
        k: how many of the most suspect pairs to inspect, 1 <= k <= n.
        higher_is_suspect: True when a high score marks a suspect pair.
        ids: optional (n,) ids for the tie-break.

    Returns:
        A value in [0, 1].
    """
    s, y = _as_arrays(scores, is_noisy)
    if not 1 <= k <= s.shape[0]:
        raise ValueError(f"k must be in [1, {s.shape[0]}], got {k}")
    top = suspicion_order(s, higher_is_suspect=higher_is_suspect, ids=ids)[:k]
    return float(y[top].mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value, NaN for none)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
