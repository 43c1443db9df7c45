"""Choose pairs to drop from a score table and write the pruned dataset plus the removed ids.

Sign conventions (DESIGN.md §2): influence, grad_dot, grad_cos and margin are positive for helpful
pairs, so the *harmful* end is the lowest scores; train_loss is high for suspect pairs, so its
harmful end is the highest loss. `mode="helpful"` selects the other end (the "helpful arm" of the
experiment removes it to show that a good detector of helpful pairs hurts accuracy most).
`method="random"` needs no scores: a seeded uniform choice.
"""

from __future__ import annotations

import logging
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prefprune._io import atomic_write_bytes, commit_files, output_lock, refuse_overlap
from prefprune.data import PreferenceDataset, load_preferences, pairs_digest
from prefprune.metrics import suspicion_order
from prefprune.scorefile import ScoreTable, read_score_table, unit_paths

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "Mode",
    "PruneConfig",
    "ScoreTable",
    "Selection",
    "check_fraction",
    "check_ids_match",
    "check_same_data",
    "higher_is_suspect",
    "n_to_select",
    "prune_dataset",
    "prune_file",
    "prune_with_config",
    "read_score_table",
    "select_pairs",
    "write_ids",
]

#: Which end of a score column a rule selects.
Mode = Literal["harmful", "helpful"]
MODES: tuple[str, ...] = typing.get_args(Mode)
#: Columns whose harmful end is the lowest value (positive = helpful).
LOW_IS_SUSPECT = ("influence", "grad_dot", "grad_cos", "margin")
#: Columns whose harmful end is the highest value.
HIGH_IS_SUSPECT = ("train_loss",)


def higher_is_suspect(column: str) -> bool:
    """Whether a high value of `column` marks a suspect (harmful) pair.

    `influence` and any `influence_<curvature>` or `influence@<damping>` column count as influence;
    `self_influence` (and `self_influence@<damping>`) marks suspects by its high end.
    """
    if column in HIGH_IS_SUSPECT or column == "self_influence" or column.startswith("self_influence@"):
        return True
    if column in LOW_IS_SUSPECT or column.startswith(("influence_", "influence@", "ensemble_")):
        return False
    raise ValueError(
        f"unknown score column {column!r}: expected one of {LOW_IS_SUSPECT + HIGH_IS_SUSPECT}, "
        "self_influence, an influence_<curvature> or influence@<damping> column, or the method 'random'"
    )


def check_fraction(fraction: float, *, what: str = "fraction") -> float:
    """Return `fraction` as a float if 0 < fraction < 1, else raise ValueError quoting it."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1), got {fraction!r}") from None
    if not (0.0 < f < 1.0) or math.isnan(f):
        raise ValueError(f"{what} must be in the open interval (0, 1), got {fraction!r}")
    return f


def n_to_select(n: int, fraction: float) -> int:
    """round(fraction · n), rounding halves up; raises when that selects no pair or every pair."""
    check_fraction(fraction)
    k = int(math.floor(fraction * n + 0.5))
    if k < 1 or k >= n:
        raise ValueError(
            f"fraction {fraction} of {n} pairs selects {k} pairs; need at least 1 and fewer than {n}"
        )
    return k


def check_same_data(dataset: PreferenceDataset, table: ScoreTable) -> None:
    """Raise ValueError unless `dataset` holds the very pairs `table` was scored on.

    The ids must match (`check_ids_match`), and when the score file's sidecar records the digest of its
    training pairs (`prefprune.data.pairs_digest`), so must the texts and labels: a file with the same ids
    and swapped labels is other data, and its scores say nothing about it.
    """
    check_ids_match(list(dataset.ids), table)
    sources = table.metadata.get("sources") if isinstance(table.metadata, Mapping) else None
    want = sources.get("train_digest") if isinstance(sources, Mapping) else None
    if want is None:
        return
    have = pairs_digest(dataset)
    if have != want:
        raise ValueError(
            f"the data {dataset.source!r} is not the data the score file {table.source} was computed on: the "
            f"ids match but the texts or labels differ (pairs digest {have[:12]}…; the sidecar records "
            f"{want[:12]}… for {sources.get('train')!r}); prune the data that was scored, or score this data"
        )


def check_ids_match(dataset_ids: Sequence[str], table: ScoreTable) -> None:
    """Raise ValueError unless the score table covers exactly the dataset's pairs (order free)."""
    want, have = set(dataset_ids), set(table.ids)
    if want == have:
        return
    missing = sorted(want - have)
    extra = sorted(have - want)
    parts = []
    if missing:
        parts.append(f"{len(missing)} dataset ids have no score (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} scored ids are not in the dataset (e.g. {extra[:3]})")
    raise ValueError(
        f"score file {table.source} does not match the dataset ({len(want)} pairs vs "
        f"{len(have)} scores): " + "; ".join(parts)
    )


@dataclass(frozen=True)
class Selection:
    """The pairs a pruning rule picked.

    Attributes:
        method: score column, or "random".
        fraction: requested share of the dataset.
        mode: "harmful" (the suspect end) or "helpful" (the other end).
        seed: the seed of a random selection (None otherwise).
        ids: the selected ids, most extreme first (random: in draw order).
        n_total: number of pairs the selection was made from.
    """

    method: str
    fraction: float
    mode: str
    seed: int | None
    ids: tuple[str, ...]
    n_total: int


def select_pairs(
    ids: Sequence[str],
    scores: Sequence[float] | np.ndarray | None,
    *,
    method: str,
    fraction: float,
    mode: str = "harmful",
    seed: int = 0,
) -> Selection:
    """Pick round(fraction · n) pairs: the harmful (or helpful) end of `scores`, or a random draw.

    Args:
        ids: (n,) pair ids.
        scores: (n,) values of column `method` aligned with `ids` (None for "random").
        method: the column name (sets the direction, see `higher_is_suspect`) or "random".
        fraction: share to select, in (0, 1).
        mode: "harmful" or "helpful".
        seed: seed of the random draw (method "random" only).

    Returns:
        The Selection; ties in the score are broken by id so results do not depend on row order.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = [str(i) for i in ids]
    k = n_to_select(len(ids), fraction)
    if method == "random":
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(ids), size=k, replace=False)
        return Selection(method, float(fraction), mode, int(seed), tuple(ids[i] for i in picked), len(ids))
    if scores is None:
        raise ValueError(f"method {method!r} needs scores")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != len(ids):
        raise ValueError(f"{s.shape[0]} scores for {len(ids)} ids")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(
            f"column {method!r} has {bad.size} non-finite scores (e.g. id {ids[bad[0]]!r}: "
            f"{s[bad[0]]}); fix the score run before pruning"
        )
    suspect_high = higher_is_suspect(method)
    order = suspicion_order(
        s, higher_is_suspect=suspect_high if mode == "harmful" else not suspect_high, ids=ids
    )
    return Selection(method, float(fraction), mode, None, tuple(ids[i] for i in order[:k]), len(ids))


def prune_dataset(
    dataset,
    table: ScoreTable | None,
    *,
    method: str,
    fraction: float,
    mode: str = "harmful",
    keep: bool = False,
    seed: int = 0,
):
    """Drop (or, with `keep=True`, keep only) the pairs `select_pairs` picks.

    Args:
        dataset: a `prefprune.data.PreferenceDataset`.
        table: its score table (ids must match the dataset exactly); None for "random".
        method, fraction, mode, seed: see `select_pairs`.
        keep: keep the selected pairs instead of removing them (e.g. mode="helpful", keep=True keeps
            the most helpful fraction).

    Returns:
        (pruned dataset, Selection). With keep=False the pruned set is `dataset.exclude(selection.ids)`.
    """
    ids = list(dataset.ids)
    if method == "random":
        scores = None
    else:
        higher_is_suspect(method)  # unknown method names fail here, before any id bookkeeping
        if table is None:
            raise ValueError(f"method {method!r} needs a score table")
        check_ids_match(ids, table)
        by_id = dict(zip(table.ids, table.column(method), strict=True))
        scores = np.asarray([by_id[i] for i in ids], dtype=np.float64)
    sel = select_pairs(ids, scores, method=method, fraction=fraction, mode=mode, seed=seed)
    out = dataset.select(list(sel.ids)) if keep else dataset.exclude(list(sel.ids))
    return out, sel


def _ids_bytes(ids: Sequence[str], path: Path) -> bytes:
    for i in ids:
        if "\n" in i or "\r" in i:
            raise ValueError(f"{path}: id {i!r} holds a line break; an id file has one id per line")
    return "".join(f"{i}\n" for i in ids).encode("utf-8", "surrogateescape")


def write_ids(ids: Sequence[str], path: str | os.PathLike) -> None:
    """Write one id per line (atomically: a temporary file, then rename); ids with line breaks are refused."""
    p = Path(path)
    data = _ids_bytes([str(i) for i in ids], p)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)


def prune_file(
    data: str | os.PathLike,
    scores: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    method: str,
    fraction: float,
    mode: str = "harmful",
    keep: bool = False,
    seed: int = 0,
    schema: str = "auto",
    split: str = "train",
    name: str | None = None,
    removed_ids: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load a dataset and its scores, prune, write the result in the input's schema and the ids.

    Args:
        data: a PreferenceDataset, or a path / hub name for `prefprune.data.load_preferences`.
        scores: score file (None only for method "random").
        output: where to write the pruned dataset; the format follows the extension.
        removed_ids: where to write the selected ids (default: `<output>.removed.txt`; with
            keep=True the file still lists the *dropped* pairs).
        method, fraction, mode, keep, seed: see `prune_dataset`.
        schema, split, name: passed to `load_preferences`.

    Returns:
        A summary dict (counts, paths, settings).
    """
    check_fraction(fraction)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method != "random":
        higher_is_suspect(method)
    out = Path(output)
    ids_path = Path(removed_ids) if removed_ids is not None else out.with_name(out.name + ".removed.txt")
    src = data if isinstance(data, str | os.PathLike) else getattr(data, "source", None)
    # Neither output may land on an input or on any file of the score file's unit (its sidecar above all:
    # the next prune would fail), nor on the other output.
    inputs = {"the input data": src, **(unit_paths(scores) if scores is not None else {})}
    refuse_overlap({"--output": out, "--removed-ids": ids_path}, inputs)
    table = None
    if method != "random":
        if scores is None:
            raise ValueError(f"method {method!r} needs --scores")
        table = read_score_table(scores)
        table.column(method)
    if isinstance(data, (str, os.PathLike)):
        dataset = load_preferences(data, schema=schema, split=split, name=name)
    else:
        dataset = data
        data = dataset.source or "<dataset>"
    if table is not None:
        check_same_data(dataset, table)
    pruned, sel = prune_dataset(
        dataset, table, method=method, fraction=fraction, mode=mode, keep=keep, seed=seed
    )
    kept = set(pruned.ids)
    dropped = [i for i in dataset.ids if i not in kept]
    if not keep:
        # Most suspect first, the order a person reviewing the removals wants.
        dropped = list(sel.ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload, ids_payload = pruned.to_bytes(out), _ids_bytes(dropped, ids_path)
    with output_lock(out, what="prefprune prune"):
        if ids_path.parent.resolve() == out.parent.resolve():
            # The pruned data and its removed-ids file are one unit: both new or both previous.
            commit_files([(out, payload), (ids_path, ids_payload)])
        else:
            ids_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(ids_path, ids_payload)
            atomic_write_bytes(out, payload)
    summary = {
        "data": str(data),
        "scores": None if scores is None else str(scores),
        "output": str(out),
        "removed_ids": str(ids_path),
        "method": method,
        "fraction": sel.fraction,
        "mode": mode,
        "keep": keep,
        "seed": sel.seed,
        "n_input": len(dataset),
        "n_output": len(pruned),
        "n_removed": len(dropped),
        "n_flipped_removed": len(set(dropped) & set(dataset.flipped_ids)),
    }
    logger.info(
        "pruned %s: %d -> %d pairs (%s, %s, %.3g)", data, len(dataset), len(pruned), method, mode, fraction
    )
    return summary


@dataclass
class PruneConfig:
    """Settings of `prefprune prune`: which pairs to select by which score, and where the result goes."""

    fraction: float = field(metadata={"help": "share of pairs to select, in (0, 1)"})
    output: str = field(
        metadata={"help": "pruned dataset; format by extension (.jsonl, .jsonl.gz, .json, .parquet, .csv)"}
    )
    scores: str | None = field(
        default=None,
        metadata={
            "help": "score file from prefprune score (.parquet/.jsonl/.csv with an id column); ids must "
            "match the data exactly; not needed for --by random"
        },
    )
    by: str = field(
        default="influence",
        metadata={
            "help": "score column: influence, influence_<damping or curvature>, grad_dot, grad_cos, "
            "train_loss, margin, or random"
        },
    )
    select: Mode = field(
        default="harmful",
        metadata={"help": "harmful: lowest scores (highest train_loss); helpful: the other end"},
    )
    keep: bool = field(
        default=False, metadata={"help": "keep only the selected pairs instead of removing them"}
    )
    seed: int = field(default=0, metadata={"help": "seed of --by random"})
    removed_ids: str | None = field(
        default=None, metadata={"help": "where to list the dropped ids (default: OUTPUT.removed.txt)"}
    )

    def validate(self) -> None:
        """Raise ValueError naming the setting before any data is read."""
        check_fraction(self.fraction, what="--fraction")
        if self.by != "random":
            higher_is_suspect(self.by)
            if self.scores is None:
                raise ValueError(f"--by {self.by} needs --scores")


def prune_with_config(dataset: PreferenceDataset, cfg: PruneConfig) -> dict[str, Any]:
    """`prune_file` of a loaded dataset with the settings of `cfg`; returns its summary."""
    cfg.validate()
    return prune_file(
        dataset,
        cfg.scores,
        cfg.output,
        method=cfg.by,
        fraction=cfg.fraction,
        mode=cfg.select,
        keep=cfg.keep,
        seed=cfg.seed,
        removed_ids=cfg.removed_ids,
    )
