"""Gather an experiment's step files into one results dict: accuracies, deltas, noise detection, timings."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefprune._io import jsonable, package_versions, sha256_file
from prefprune.bootstrap import paired_delta
from prefprune.experiment.config import ExperimentConfig, damping_tags
from prefprune.experiment.steps import StepStore, arm_step_name
from prefprune.fingerprint import settings_fingerprint
from prefprune.influence.plan import damping_column_names
from prefprune.metrics import detection_auc, mean_std, precision_at_k
from prefprune.prune import MODES, ScoreTable, higher_is_suspect
from prefprune.score import ScoreConfig

__all__ = [
    "ScoreSteps",
    "collect_results",
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

#: Score columns carried over from the first score pass.
SHARED_COLUMNS = ("grad_dot", "grad_cos", "train_loss", "margin")
#: Columns whose noise-detection quality is always reported when scores exist.
DETECTION_COLUMNS = ("grad_dot", "grad_cos", "train_loss")
_ARM_KEYS = ("seed", "method", "mode", "fraction", "n_train", "n_removed", "n_flipped_removed", "seconds")


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


def machine() -> dict[str, Any]:
    """Where the experiment ran (platform, CPU count, torch threads, CUDA device)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def needs_influence(cfg: ExperimentConfig) -> bool:
    """Whether a method prunes by influence (else one gradient-scores pass serves every method)."""
    methods = cfg.arm_methods() + cfg.helpful_arm_methods()
    return any(m.startswith(("influence_", "ensemble_")) for m in methods)


def arm_keys(cfg: ExperimentConfig) -> list[tuple[str, str, float]]:
    """(method, mode, fraction) of every prune-and-retrain arm, harmful arm first."""
    keys = [(m, "harmful", f) for m in cfg.arm_methods() for f in cfg.fractions]
    keys += [(m, "helpful", f) for m in cfg.helpful_arm_methods() for f in cfg.helpful_arm_fractions()]
    return keys


def _detection_rows(
    cfg: ExperimentConfig, seed: int, merged: ScoreTable, flipped: set[str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Noise-detection AUC and precision@k of every reported column (and of a random score) for one seed,
    and the flipped / clean value histograms of the columns."""
    noisy = np.asarray([i in flipped for i in merged.ids])
    rows: list[dict[str, Any]] = []
    hist: dict[str, dict[str, list[float]]] = {}
    for col in merged.columns:
        if (
            col not in DETECTION_COLUMNS
            and col not in cfg.methods
            and not col.startswith(("influence_", "ensemble_"))
        ):
            continue
        vals = merged.column(col)
        high = higher_is_suspect(col)
        if not np.all(np.isfinite(vals)):
            rows.append(
                {
                    "seed": seed,
                    "method": col,
                    "auc": None,
                    "precision_at_k": None,
                    "k": len(flipped),
                    "note": "non-finite scores",
                }
            )
            continue
        rows.append(
            {
                "seed": seed,
                "method": col,
                "k": len(flipped),
                "auc": detection_auc(vals, noisy, higher_is_suspect=high),
                "precision_at_k": precision_at_k(
                    vals, noisy, k=len(flipped), higher_is_suspect=high, ids=merged.ids
                ),
            }
        )
        hist[col] = {"flipped": vals[noisy].tolist(), "clean": vals[~noisy].tolist()}
    rand = np.random.default_rng(seed).uniform(size=len(merged.ids))
    rows.append(
        {
            "seed": seed,
            "method": "random",
            "k": len(flipped),
            "auc": detection_auc(rand, noisy, higher_is_suspect=True),
            "precision_at_k": precision_at_k(rand, noisy, k=len(flipped), higher_is_suspect=True),
        }
    )
    return rows, hist


def _arm_row(rec: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """One retrain's results row: its accuracy and the difference to its seed's baseline."""
    row = {k: rec[k] for k in _ARM_KEYS}
    row["accuracy"] = rec["test"]["accuracy"]
    row["delta"] = rec["test"]["accuracy"] - base["test"]["accuracy"]
    if "clean" in rec["test"]:
        row["clean_accuracy"] = rec["test"]["clean"]["accuracy"]
        row["clean_delta"] = rec["test"]["clean"]["accuracy"] - base["test"]["clean"]["accuracy"]
    row["test"] = rec["test"]
    row["train_stats"] = rec["train_stats"]
    return row


def _summarise_arms(keys: Sequence[tuple[str, str, float]], arms: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for method, mode, fraction in keys:
        rows = [r for r in arms if (r["method"], r["mode"], r["fraction"]) == (method, mode, fraction)]
        if not rows:
            continue
        acc_m, acc_s = mean_std([r["accuracy"] for r in rows])
        d_m, d_s = mean_std([r["delta"] for r in rows])
        entry = {
            "method": method,
            "mode": mode,
            "fraction": fraction,
            "n_seeds": len(rows),
            "accuracy_mean": acc_m,
            "accuracy_std": acc_s,
            "delta_mean": d_m,
            "delta_std": d_s,
            "n_removed": rows[0]["n_removed"],
            "flipped_share_of_removed": float(
                np.mean([r["n_flipped_removed"] / r["n_removed"] for r in rows])
            ),
        }
        if "clean_accuracy" in rows[0]:
            entry["clean_accuracy_mean"], entry["clean_accuracy_std"] = mean_std(
                [r["clean_accuracy"] for r in rows]
            )
            entry["clean_delta_mean"], entry["clean_delta_std"] = mean_std([r["clean_delta"] for r in rows])
        out.append(entry)
    return out


def _correct(margins: Sequence[Mapping[str, float]], ids: Sequence[str]) -> np.ndarray:
    """(seeds, pairs) 1.0 where the pair's margin is positive (ranked correctly)."""
    return np.asarray([[1.0 if m[i] > 0 else 0.0 for i in ids] for m in margins])


def _interval(
    cfg: ExperimentConfig, margins: Mapping[tuple, Mapping[str, float]], arm: tuple, ref: tuple
) -> dict[str, Any] | None:
    """The paired bootstrap interval of accuracy(arm) - accuracy(ref) over the seeds that have both
    (keys without their seed: ``(method, mode, fraction)`` or ``("baseline",)``); None without margins."""
    seeds = [s for s in cfg.seeds if (s, *arm) in margins and (s, *ref) in margins]
    if not seeds:
        return None
    ids = sorted(set.intersection(*(set(margins[(s, *k)]) for s in seeds for k in (arm, ref))))
    if not ids:
        return None
    a = _correct([margins[(s, *arm)] for s in seeds], ids)
    b = _correct([margins[(s, *ref)] for s in seeds], ids)
    iv = paired_delta(a, b, n_boot=cfg.bootstrap_samples, level=cfg.interval_level, seed=0)
    return {**iv.to_dict(), "n_seeds": len(seeds), "n_test_pairs": len(ids)}


def add_intervals(cfg: ExperimentConfig, summary_arms: list[dict], margins: Mapping[tuple, Mapping]) -> None:
    """Add to each summary arm its Δ interval vs the unpruned baseline and vs random at the same fraction."""
    for entry in summary_arms:
        arm = (entry["method"], entry["mode"], entry["fraction"])
        entry["delta_interval"] = _interval(cfg, margins, arm, ("baseline",))
        if entry["method"] != "random":
            entry["delta_vs_random_interval"] = _interval(
                cfg, margins, arm, ("random", "harmful", entry["fraction"])
            )


def _summarise_detection(detection: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in dict.fromkeys(d["method"] for d in detection):
        rows = [d for d in detection if d["method"] == method and d["auc"] is not None]
        if not rows:
            continue
        am, as_ = mean_std([d["auc"] for d in rows])
        pm, ps = mean_std([d["precision_at_k"] for d in rows])
        out.append(
            {
                "method": method,
                "auc_mean": am,
                "auc_std": as_,
                "precision_at_k_mean": pm,
                "precision_at_k_std": ps,
                "k": rows[0]["k"],
                "n_seeds": len(rows),
            }
        )
    return out


def _baseline_summary(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    bm, bs = mean_std([b["accuracy"] for b in per_seed.values()])
    summary = {"accuracy_mean": bm, "accuracy_std": bs, "n_seeds": len(per_seed)}
    if per_seed and "clean" in next(iter(per_seed.values()))["test"]:
        cm, cs = mean_std([b["test"]["clean"]["accuracy"] for b in per_seed.values()])
        summary.update(clean_accuracy_mean=cm, clean_accuracy_std=cs)
    return summary


class _Collector:
    """Reads the step files of one experiment seed by seed and accumulates the results' parts."""

    def __init__(self, cfg: ExperimentConfig, out: Path, train_ids: Sequence[str], flipped: set[str]):
        self.cfg, self.steps, self.train_ids, self.flipped = cfg, StepStore(out), train_ids, flipped
        self.per_seed_baseline: dict[int, dict[str, Any]] = {}
        self.arms: list[dict[str, Any]] = []
        self.detection: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.histograms: dict[str, dict[str, list[float]]] = {}
        self.score_meta: dict[str, Any] = {}
        self.score_seconds: dict[str, float] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        #: (seed, "baseline") or (seed, method, mode, fraction) -> {test pair id: margin}
        self.margins: dict[tuple, dict[str, float]] = {}
        self.merged: dict[int, ScoreTable] = {}

    def _count(self, rec: Mapping[str, Any]) -> None:
        self.seconds += rec["seconds"]
        self.cpu_seconds += rec.get("cpu_seconds", 0.0)

    def seed(self, seed: int, curvatures: Sequence[str]) -> None:
        base = self.steps.get(f"seed{seed}/baseline.json")
        if base is None:
            return
        self._count(base)
        self.per_seed_baseline[seed] = {
            "accuracy": base["test"]["accuracy"],
            "test": base["test"],
            "train_stats": base["train_stats"],
            "seconds": base["seconds"],
        }
        if "test_margins" in base:
            self.margins[(seed, "baseline")] = base["test_margins"]
        self._scores(seed, curvatures)
        for method, mode, fraction in arm_keys(self.cfg):
            rec = self.steps.get(arm_step_name(seed, method, mode, fraction))
            if rec is None:
                continue
            if "skipped" in rec:
                self.skipped.append(rec)
                continue
            self._count(rec)
            self.arms.append(_arm_row(rec, base))
            if "test_margins" in rec:
                self.margins[(seed, method, mode, fraction)] = rec["test_margins"]

    def _scores(self, seed: int, curvatures: Sequence[str]) -> None:
        tables = {}
        digest = sha256_file(self.steps.root / f"seed{seed}" / "baseline_state.pt")
        for curv in curvatures:
            found = find_score_steps(
                self.steps,
                seed,
                curv,
                self.cfg.score_config(seed, curv),
                baseline_digest=digest,
                need_dampings=needs_influence(self.cfg),
            )
            if found.table is None:
                continue
            tables[curv] = found.table
            for rel, rec in found.used:
                key = rel.removesuffix(".json").replace("/scores_", "/", 1)  # seed0/ggn, seed0/ggn__1
                self.score_meta[key] = rec.get("metadata", {})
                self.score_seconds[key] = rec["seconds"]
                self._count(rec)
        if not tables:
            return
        merged = merge_tables(tables, self.train_ids)
        self.merged[seed] = merged
        first = seed == self.cfg.seeds[0]
        if self.flipped:
            rows, hist = _detection_rows(self.cfg, seed, merged, self.flipped)
            self.detection.extend(rows)
            if first:
                self.histograms.update(hist)
        elif first:
            for col in merged.columns:
                self.histograms[col] = {"all": merged.column(col).tolist()}


def collect_results(
    cfg: ExperimentConfig,
    out: Path,
    *,
    dataset,
    splits,
    flipped_train: Sequence[str],
    curvatures: Sequence[str],
) -> dict[str, Any]:
    """Gather the step files of `out` into one results dict (every number, every setting)."""
    train, val, test = splits
    c = _Collector(cfg, out, train.ids, set(flipped_train))
    for seed in cfg.seeds:
        c.seed(seed, curvatures)
    ens = (
        ensemble_table(c.merged, curvatures)
        if any(m.startswith("ensemble_") for m, _, _ in arm_keys(cfg))
        else {}
    )
    if ens and c.flipped:
        # One ensemble over all seeds: its detection quality is one row (its seed field says so).
        ens_table = ScoreTable(ids=list(c.train_ids), columns=ens, source="ensemble of the seeds' baselines")
        rows, hist = _detection_rows(cfg, 0, ens_table, c.flipped)
        c.detection.extend({**r, "seed": "ensemble"} for r in rows if r["method"] != "random")
        c.histograms.update(hist)
    summary_arms = _summarise_arms(arm_keys(cfg), c.arms)
    add_intervals(cfg, summary_arms, c.margins)
    return {
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "machine": machine(),
        "data": {
            "source": dataset.source,
            "schema": dataset.schema,
            "n_pairs": len(dataset),
            "n_train": len(train),
            "n_validation": len(val),
            "n_test": len(test),
            "n_flipped": len(dataset.flipped_ids),
            "n_flipped_train": len(c.flipped),
            "n_flipped_validation": len(dataset.flipped_ids & set(val.ids)),
            "n_flipped_test": len(dataset.flipped_ids & set(test.ids)),
            "split_note": "one split (split_seed) shared by all seeds; validation used only for scoring, "
            "test only for accuracy",
        },
        "baseline": {"per_seed": c.per_seed_baseline, **_baseline_summary(c.per_seed_baseline)},
        "arms": c.arms,
        "skipped_arms": c.skipped,
        "summary": {
            "arms": summary_arms,
            "noise_detection": _summarise_detection(c.detection),
        },
        "noise_detection": c.detection,
        "scores": {"metadata": c.score_meta, "seconds": c.score_seconds},
        "histograms": c.histograms,
        "timings": {"sum_of_step_seconds": c.seconds, "sum_of_step_cpu_seconds": c.cpu_seconds},
        "modes": list(MODES),
    }
