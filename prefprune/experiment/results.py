"""Gather an experiment's step files into one results dict: accuracies, deltas, noise detection, timings."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefprune._io import package_versions, sha256_file
from prefprune.bootstrap import paired_delta
from prefprune.experiment.certainty import arm_flags, interval_note
from prefprune.experiment.config import ExperimentConfig
from prefprune.experiment.profile import removed_profile
from prefprune.experiment.scoresteps import (
    ensemble_table,
    find_score_steps,
    merge_tables,
    needs_influence,
)
from prefprune.experiment.steps import StepStore, arm_step_name
from prefprune.metrics import detection_auc, mean_std, precision_at_k
from prefprune.prune import MODES, ScoreTable, higher_is_suspect

__all__ = ["collect_results"]  # the score-step helpers are in experiment.scoresteps

#: Columns whose noise-detection quality is always reported when scores exist.
DETECTION_COLUMNS = ("grad_dot", "grad_cos", "train_loss")
_ARM_KEYS = ("seed", "method", "mode", "fraction", "n_train", "n_removed", "n_flipped_removed", "seconds")


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


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds; the std is None for one seed (a sample std needs two values, and 0.0
    would read as certainty)."""
    m, s = mean_std(values)
    return m, (s if len(values) > 1 else None)


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
        acc_m, acc_s = _mean_std([r["accuracy"] for r in rows])
        d_m, d_s = _mean_std([r["delta"] for r in rows])
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
            entry["clean_accuracy_mean"], entry["clean_accuracy_std"] = _mean_std(
                [r["clean_accuracy"] for r in rows]
            )
            entry["clean_delta_mean"], entry["clean_delta_std"] = _mean_std([r["clean_delta"] for r in rows])
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
        am, as_ = _mean_std([d["auc"] for d in rows])
        pm, ps = _mean_std([d["precision_at_k"] for d in rows])
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


#: Settings that differ by design between steps (or only show progress): not part of "as run".
_PER_STEP = ("seed", "progress", "resume")


def _as_run(configs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings the steps ran with (the first one's), and the keys in which the steps differ."""
    first = {k: v for k, v in configs[0].items() if k not in _PER_STEP}
    differ = sorted({k for c in configs[1:] for k in first if c.get(k) != first[k]})
    return {"settings": first, "differs_between_steps": differ}


def settings_as_run(
    cfg: ExperimentConfig, per_seed: Mapping[int, Mapping[str, Any]], score_meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The effective settings read from the step files: training (each baseline's TrainConfig with the device
    it ran on and bf16 as applied: only on CUDA), scoring per curvature (each score step's ScoreConfig) and
    evaluation (what `SeedRun` passes)."""
    out: dict[str, Any] = {"source": "step files"}
    train = []
    for b in per_seed.values():
        stats = b["train_stats"]
        conf = dict(stats.get("config") or {})
        device = str(stats.get("device", conf.get("device")))
        conf.update(device=device, bf16=bool(conf.get("bf16")) and device.startswith("cuda"))
        train.append(conf)
    if train:
        out["train"] = _as_run(train)
    by_curvature: dict[str, list[dict]] = {}
    for meta in score_meta.values():
        conf = (meta or {}).get("config") or {}
        if conf:
            by_curvature.setdefault(str(conf.get("curvature")), []).append(conf)
    out["score"] = {c: _as_run(confs) for c, confs in by_curvature.items()}
    out["evaluation"] = {"max_length": cfg.max_length, "batch_size": cfg.eval_batch_size}
    return out


def _baseline_summary(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    bm, bs = _mean_std([b["accuracy"] for b in per_seed.values()])
    summary = {"accuracy_mean": bm, "accuracy_std": bs, "n_seeds": len(per_seed)}
    if per_seed and "clean" in next(iter(per_seed.values()))["test"]:
        cm, cs = _mean_std([b["test"]["clean"]["accuracy"] for b in per_seed.values()])
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
        #: (seed, method, mode, fraction) -> the ids that retrain removed
        self.removed: dict[tuple, list[str]] = {}

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
            if "removed_ids" in rec:
                self.removed[(seed, method, mode, fraction)] = rec["removed_ids"]
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
        "settings_as_run": settings_as_run(cfg, c.per_seed_baseline, c.score_meta),
        "intervals": interval_note(len(c.per_seed_baseline)),
        "summary": {
            "arms": summary_arms,
            "flags": arm_flags(summary_arms),
            "noise_detection": _summarise_detection(c.detection),
        },
        "noise_detection": c.detection,
        "removed_profile": removed_profile(train, test, c.removed, set(dataset.flipped_ids) or None),
        "scores": {"metadata": c.score_meta, "seconds": c.score_seconds},
        "histograms": c.histograms,
        "timings": {"sum_of_step_seconds": c.seconds, "sum_of_step_cpu_seconds": c.cpu_seconds},
        "modes": list(MODES),
    }
