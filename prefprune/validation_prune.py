"""The pruning check of `prefprune validate`: does removing a column's lowest k% beat removing k% at random?

For each validated score column (every column is "positive = helpful", so its lowest values are the
suspect pairs) the training set without the column's lowest k% is retrained from the reference's initial
weights with its settings, and so is the training set without k% drawn at random (several seeded draws).
Each retrain's test margins give its accuracy; the change against random is a paired bootstrap interval
(`prefprune.bootstrap.paired_delta`) whose rows are the random draws (each paired with the column's one
retrain) and whose columns are the test pairs. Every retrain is one step file (`PRUNE_DIR/…`), reused
when it removed exactly the pairs the current scores select.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prefprune.bootstrap import paired_delta
from prefprune.metrics import suspicion_order
from prefprune.prune import n_to_select, select_pairs

__all__ = ["FULL_STEP", "MIN_DRAWS", "prune_jobs", "prune_metrics"]

PRUNE_DIR = "prune"
FULL_STEP = f"{PRUNE_DIR}/full.json"  # the unpruned model's test margins (the reference retrain's)
#: Below this many random draws the interval has hardly any draw-to-draw variance: the summary says so.
MIN_DRAWS = 3


def _column_step(name: str) -> str:
    return f"{PRUNE_DIR}/lowest_{re.sub(r'[^A-Za-z0-9@.+_-]', '_', name)}.json"


def _random_step(draw: int) -> str:
    return f"{PRUNE_DIR}/random_{draw:02d}.json"


def prune_jobs(
    cols: Mapping[str, np.ndarray], ids: Sequence[str], *, fraction: float, draws: int, seed: int
) -> list[tuple[str, list[str]]]:
    """(step name, left-out ids) of every retrain of the check: the unpruned set, each column's lowest
    `fraction` (ties broken by id, as `prefprune prune` does) and `draws` seeded random draws."""
    k = n_to_select(len(ids), fraction)
    jobs: list[tuple[str, list[str]]] = [(FULL_STEP, [])]
    for name, values in cols.items():
        if np.all(np.isfinite(values)):
            order = suspicion_order(values, higher_is_suspect=False, ids=ids)
            jobs.append((_column_step(name), sorted(ids[i] for i in order[:k])))
    for d in range(draws):
        sel = select_pairs(ids, None, method="random", fraction=fraction, seed=seed + d)
        jobs.append((_random_step(d), sorted(sel.ids)))
    return jobs


def _correct(records: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> np.ndarray:
    """(retrains, test pairs): 1.0 where the retrained model ranks the pair correctly (margin > 0)."""
    return np.asarray([[1.0 if r["test_margins"][i] > 0 else 0.0 for i in ids] for r in records])


def prune_metrics(
    cols: Sequence[str],
    records: Mapping[str, Mapping[str, Any]],
    *,
    fraction: float,
    draws: int,
    n_boot: int,
    level: float,
) -> dict[str, Any]:
    """Test accuracy of every retrain of the check and each column's change against random and unpruned.

    Args:
        cols: the validated columns (those with non-finite scores have no retrain and are left out).
        records: step name → retrain record with ``test_margins`` (id → margin) and ``left_out``.
        fraction, draws: the check's settings; n_boot, level: the bootstrap's.
    """
    full = records[FULL_STEP]
    randoms = [records[_random_step(d)] for d in range(draws)]
    steps = {c: _column_step(c) for c in cols if _column_step(c) in records}
    every = [full, *randoms, *(records[s] for s in steps.values())]
    ids = sorted(set.intersection(*(set(r["test_margins"]) for r in every)))
    if not ids:
        raise ValueError("the pruning check's retrains share no evaluated test pair (all too long?)")
    rand, unpruned = _correct(randoms, ids), _correct([full], ids)
    delta = {"n_boot": n_boot, "level": level, "seed": 0}
    columns = {}
    for name, rel in steps.items():
        col = _correct([records[rel]], ids)
        columns[name] = {
            "accuracy": float(col.mean()),
            "delta_vs_random": paired_delta(np.repeat(col, draws, axis=0), rand, **delta).to_dict(),
            "delta_vs_unpruned": paired_delta(col, unpruned, **delta).to_dict(),
        }
    note = ("One training seed (the reference's initial weights): the intervals resample the random draws "
            "and the test pairs, not training seeds.")
    if draws < MIN_DRAWS:
        note += f" Only {draws} random draw(s): the interval misses most of random pruning's own spread."
    return {
        "fraction": fraction,
        "n_removed": len(records[_random_step(0)]["left_out"]),
        "n_test": len(ids),
        "draws": draws,
        "unpruned_accuracy": float(unpruned.mean()),
        "random": {
            "accuracy": float(rand.mean()),
            "accuracy_per_draw": rand.mean(axis=1).tolist(),
            "delta_vs_unpruned": paired_delta(rand, np.repeat(unpruned, draws, axis=0), **delta).to_dict(),
        },
        "columns": columns,
        "note": note,
    }
