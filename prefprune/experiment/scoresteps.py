"""The score steps of an experiment: finding the ones that fit the current settings, merging their columns
per curvature, and the seeds' ensemble columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefprune._io import jsonable
from prefprune.experiment.config import ExperimentConfig, damping_tags
from prefprune.experiment.steps import StepStore
from prefprune.fingerprint import settings_fingerprint
from prefprune.influence.plan import damping_column_names
from prefprune.prune import ScoreTable
from prefprune.score import ScoreConfig

__all__ = [
    "SHARED_COLUMNS",
    "ScoreSteps",
    "ensemble_table",
    "find_score_steps",
    "merge_tables",
    "needs_influence",
    "score_fingerprint",
    "score_result_table",
    "score_step_name",
    "step_dampings",
    "with_ensemble_columns",
]

SHARED_COLUMNS = ("grad_dot", "grad_cos", "train_loss", "margin")
#: Columns whose noise-detection quality is always reported when scores exist.


def _is_influence(name: str) -> bool:
    return name == "influence" or name.startswith("influence@")


def merge_tables(tables: Mapping[str, ScoreTable], ids: Sequence[str]) -> ScoreTable:
    """One table in `ids` order: per pass (curvature), its ``influence`` column as influence_<curvature> and
    each ``influence@<tag>`` column as influence_<curvature>@<tag> (`find_score_steps` names them by the
    method tags); the shared columns from the first pass."""
    cols: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    first = True
    for curv, tab in tables.items():
        pos = {i: k for k, i in enumerate(tab.ids)}
        order = np.asarray([pos[i] for i in ids])
        names = [c for c in tab.columns if _is_influence(c)]
        if not names:
            tab.column("influence")  # the error names the available columns
        for name in names:
            cols[f"influence_{curv}{name[len('influence'):]}"] = tab.columns[name][order]
        if first:
            for c in SHARED_COLUMNS:
                if c in tab.columns:
                    cols[c] = tab.columns[c][order]
            first = False
        meta[curv] = tab.metadata
    return ScoreTable(ids=list(ids), columns=cols, metadata=meta, source="merged scores")


def ensemble_table(
    merged: Mapping[int, ScoreTable | None], curvatures: Sequence[str]
) -> dict[str, np.ndarray]:
    """ensemble_<curvature>[@<λ>] = the mean over seeds of each seed's baseline influence_<curvature>[@<λ>]
    (the same training pairs for every seed, in the order of the first seed's table)."""
    tables = [t for t in merged.values() if t is not None]
    if len(tables) < 2:
        return {}
    ids = tables[0].ids
    out = {}
    for name in tables[0].columns:
        rest = name[len("influence_") :] if name.startswith("influence_") else None
        if rest is None or rest.partition("@")[0] not in curvatures:
            continue
        if all(name in t.columns for t in tables):
            stacked = [t.column(name)[[{i: k for k, i in enumerate(t.ids)}[j] for j in ids]] for t in tables]
            out[f"ensemble_{rest}"] = np.mean(stacked, axis=0)
    return out


def with_ensemble_columns(
    merged: Mapping[int, ScoreTable | None], curvatures: Sequence[str]
) -> dict[int, ScoreTable | None]:
    """Each seed's merged table with the seeds' ensemble columns added."""
    ens = ensemble_table(merged, curvatures)
    out: dict[int, ScoreTable | None] = {}
    for seed, tab in merged.items():
        if tab is None:
            out[seed] = None
            continue
        pos = {i: k for k, i in enumerate(next(t for t in merged.values() if t is not None).ids)}
        order = np.asarray([pos[i] for i in tab.ids])
        cols = {**tab.columns, **{k: v[order] for k, v in ens.items()}}
        out[seed] = ScoreTable(ids=tab.ids, columns=cols, metadata=tab.metadata, source=tab.source)
    return out


def score_result_table(result: Any, *, source: str) -> ScoreTable:
    """A prefprune.score.ScoreResult (ids + columns + metadata) as a ScoreTable."""
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in result.columns.items()}
    return ScoreTable(
        ids=[str(i) for i in result.ids], columns=columns, metadata=jsonable(result.metadata), source=source
    )


def score_step_name(seed: int, curvature: str, k: int = 0) -> str:
    """Relative path of a seed's k-th score step of one curvature: ``scores_<c>.json`` first, then
    ``scores_<c>__<k>.json`` for damping values added on a later resume."""
    return f"seed{seed}/scores_{curvature}.json" if k == 0 else f"seed{seed}/scores_{curvature}__{k}.json"


def score_fingerprint(config: ScoreConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The score settings that must match for a score step to be reused: all but the damping values (a
    step says which it holds) and the progress bars."""
    return settings_fingerprint(config, ignore=("damping", "progress"))


def step_dampings(rec: Mapping[str, Any]) -> dict[float, str]:
    """Damping value (the factor for relative damping) → influence column name of a score step."""
    meta = rec.get("metadata") or {}
    cfg = meta.get("config") or {}
    # damping None: the default rule (factors of the mean eigenvalue, `ScoreConfig.relative_damping`).
    relative = bool(cfg.get("damping_relative", False)) or ("damping" in cfg and cfg["damping"] is None)
    cols = meta.get("damping_columns")
    if cols:
        return {float(c["damping_factor"] if relative else c["damping"]): c["column"] for c in cols}
    damping = cfg.get("damping")
    if damping is None:
        return {}
    values = [float(v) for v in (damping if isinstance(damping, list) else [damping])]
    return dict(zip(values, damping_column_names(values, relative=relative), strict=True))


@dataclass
class ScoreSteps:
    """The score steps of one seed and curvature that fit the current settings, and what they lack.

    Attributes:
        used: (relative path, record) of every step that contributes a column, first step first.
        table: the combined table (None without a usable step): the shared columns of the first step and
            one influence column per damping value, named ``influence`` + the method tag (`damping_tags`).
        missing: damping values no usable step holds (a score pass for them alone fills the gap).
        next_name: where that pass's step goes (the first step's name when it is absent or stale).
        stale: steps present but computed with other settings or from another baseline (never used).
    """

    used: list[tuple[str, dict]] = field(default_factory=list)
    table: ScoreTable | None = None
    missing: list[float] = field(default_factory=list)
    next_name: str = ""
    stale: list[str] = field(default_factory=list)


def find_score_steps(
    steps: StepStore,
    seed: int,
    curvature: str,
    config: ScoreConfig,
    *,
    baseline_digest: str | None,
    need_dampings: bool = True,
) -> ScoreSteps:
    """Gather the seed's score steps of `curvature` that can serve `config`.

    A step is usable when its recorded settings equal `config`'s apart from the damping values
    (`score_fingerprint`) and, when it recorded one, its baseline's SHA-256 equals `baseline_digest`; each
    damping value of `config` is taken from the first usable step that holds it, so a stale step is never
    read for a value it was not computed with.

    Args:
        need_dampings: False for a gradient-scores-only pass (its influence column is not a method): the
            first usable step serves whatever its damping.
    """
    want = score_fingerprint(config)
    values = config.dampings()
    tags = damping_tags(values, relative=config.relative_damping) if need_dampings else [""]
    found = ScoreSteps()
    k = 0
    while True:
        rel = score_step_name(seed, curvature, k)
        rec = steps.get(rel)
        if rec is None:
            break
        meta = rec.get("metadata") or {}
        digest = rec.get("baseline_sha256")
        if score_fingerprint(meta.get("config") or {}) != want or (
            digest is not None and baseline_digest is not None and digest != baseline_digest
        ):
            found.stale.append(rel)
        else:
            found.used.append((rel, rec))
        k += 1
    primary = score_step_name(seed, curvature, 0)
    usable = {rel for rel, _ in found.used}
    # A stale first step is replaced; values added to a good one go to the first free name after it.
    found.next_name = score_step_name(seed, curvature, k) if primary in usable else primary
    cols: dict[str, np.ndarray] = {}
    first: ScoreTable | None = None
    contributing = []
    for rel, rec in found.used:
        tab = ScoreTable.from_json(rec, source=str(steps.root / rel))
        order = None
        if first is None:
            first = tab
            contributing.append((rel, rec))
            cols.update({c: tab.columns[c] for c in SHARED_COLUMNS if c in tab.columns})
            if not need_dampings:
                cols["influence"] = tab.column("influence")
                break
        else:
            pos = {i: j for j, i in enumerate(tab.ids)}
            order = np.asarray([pos[i] for i in first.ids])
        avail = step_dampings(rec)
        took = False
        for v, tag in zip(values, tags, strict=True):
            name = "influence" + tag
            if name not in cols and v in avail:
                col = tab.column(avail[v])
                cols[name] = col if order is None else col[order]
                took = True
        if took and (rel, rec) not in contributing:
            contributing.append((rel, rec))
    found.used = contributing
    if need_dampings:
        found.missing = [v for v, t in zip(values, tags, strict=True) if "influence" + t not in cols]
    elif first is None:
        found.missing = values
    if first is not None and not found.missing:
        meta = first.metadata
        found.table = ScoreTable(ids=first.ids, columns=cols, metadata=meta, source=first.source)
    return found



def needs_influence(cfg: ExperimentConfig) -> bool:
    """Whether a method prunes by influence (else one gradient-scores pass serves every method)."""
    methods = cfg.arm_methods() + cfg.helpful_arm_methods()
    return any(m.startswith(("influence_", "ensemble_")) for m in methods)
