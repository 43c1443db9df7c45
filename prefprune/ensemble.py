"""Ensembles of scores: the mean of every score column over several models (seeds, checkpoints).

Averaging attributions over independently trained models is the largest single lever on their quality
in TRAK's and dattri's benchmarks: each model's influence carries the noise of its own training run
(initialisation, data order, where along a non-convex valley it stopped), and the mean keeps what they
share. `average_tables` is the rule; `score_ensemble` scores one training set with several reward-model
folders (`prefprune score --model A B C`), keeps each member's score file, and writes the mean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefprune.score import score_model
from prefprune.scorefile import check_output_path, write_scores

__all__ = ["EnsembleResult", "average_tables", "member_path", "score_ensemble"]

#: Columns that are not attributions and are not averaged (per-model facts).
NOT_AVERAGED = ("truncated",)


@dataclass
class EnsembleResult:
    """Mean scores over members, in the first member's row order (what `write_scores` writes)."""

    ids: list[str]
    columns: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def average_tables(tables: Sequence[Any], *, sources: Sequence[str] = ()) -> EnsembleResult:
    """The column-wise mean of several score results or tables over the same training pairs.

    Args:
        tables: objects with `ids` and `columns` (ScoreResult or ScoreTable), one per model.
        sources: a name per member, recorded in the metadata.

    Raises:
        ValueError: fewer than two members, different ids, or a column missing from a member.
    """
    if len(tables) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(tables)}")
    ids = [str(i) for i in tables[0].ids]
    pos = {i: k for k, i in enumerate(ids)}
    names = [c for c in tables[0].columns if c not in NOT_AVERAGED]
    sums = {c: np.zeros(len(ids)) for c in names}
    for k, tab in enumerate(tables):
        other = [str(i) for i in tab.ids]
        if set(other) != set(pos) or len(other) != len(ids):
            raise ValueError(
                f"ensemble member {k} scores other pairs than member 0 ({len(other)} vs {len(ids)} ids)"
            )
        order = np.asarray([pos[i] for i in other])
        for c in names:
            if c not in tab.columns:
                raise ValueError(f"ensemble member {k} has no column {c!r} (have {sorted(tab.columns)})")
            sums[c][order] += np.asarray(tab.columns[c], dtype=np.float64)
    meta = {"ensemble": {"members": len(tables), "sources": list(sources), "rule": "mean of each column"}}
    return EnsembleResult(ids, {c: v / len(tables) for c, v in sums.items()}, meta)


def member_path(output: str | os.PathLike, k: int) -> Path:
    """Where member k's own score file goes: ``scores.parquet`` → ``scores.member0.parquet``."""
    p = Path(output)
    return p.with_name(f"{p.stem}.member{k}{p.suffix}")


def score_ensemble(model_dirs: Sequence[str], train: Any, val: Any, output: str | os.PathLike, **kw: Any):
    """Score with every model folder (`prefprune.score.score_model`, each to its `member_path`) and write
    the mean of their columns to `output`. Keyword arguments go to `score_model`.

    Returns:
        (EnsembleResult, list of the members' ScoreResults).
    """
    inputs = {k: v for k, v in {"--train": train, "--val": val}.items() if isinstance(v, str | os.PathLike)}
    overwrite = kw.get("overwrite", False)
    check_output_path(output, overwrite=overwrite, inputs=inputs)  # before any member is scored
    members = [score_model(m, train, val, member_path(output, k), **kw) for k, m in enumerate(model_dirs)]
    result = average_tables(members, sources=[str(m) for m in model_dirs])
    first = members[0].metadata
    result.metadata.update(
        {
            "settings": first.get("settings"),
            "sources": {**(first.get("sources") or {}), "model": [str(m) for m in model_dirs]},
            "members": [str(member_path(output, k)) for k in range(len(members))],
        }
    )
    write_scores(result, output, overwrite=overwrite, inputs=inputs)
    return result, members
