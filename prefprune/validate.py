"""Does influence mean anything for *this* model? Retrain on subsets and single leave-outs, compare.

`run_validation` (``prefprune validate``) rebuilds the reward model's initial weights and training run
from its settings (the model folder's ``prefprune.json`` written by ``prefprune train``, or an experiment
config: its data split, model, lora_layers/prefix cache, training and scoring settings, first seed), then

1. retrains once on the whole training set (the *reference*; its validation loss is L_full, and it is the
   model that is scored);
2. scores every training pair with it: influence at each damping value (one score pass each), grad_dot,
   grad_cos, and the columns of any extra score files (e.g. an ensemble);
3. retrains on S seeded random subsets keeping a fraction α of the pairs, from the same initial weights
   with the same settings, and measures each subset's change of validation loss L_V(subset) − L_full;
4. optionally leaves out m single pairs (leave-one-out) the same way.

The prediction for a subset is the first-order change of DESIGN §2: removing pair i changes L_V by
+score_i / n, so a subset predicts Σ_{i left out} score_i / n (positive scores = helpful pairs whose
removal raises the loss). The **linear datamodeling score** (LDS) of a column is the Spearman correlation
of predicted and measured changes over the S subsets, with a bootstrap interval over subsets; for
leave-one-out, Pearson and Spearman of score_i / n against the measured change. The damping whose
influence column has the best LDS is recommended.

Every retrain is one step file under the output folder (`prefprune.experiment.steps.StepStore`): a rerun
resumes. The count of retrains is logged before the first one, and their estimated time once the
reference retrain has been timed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prefprune import score as score_mod
from prefprune import train as train_mod
from prefprune._io import atomic_write, jsonable
from prefprune.bootstrap import correlation_interval, pearson, spearman
from prefprune.data import pairs_digest
from prefprune.ensemble import average_tables
from prefprune.experiment.results import score_result_table
from prefprune.experiment.steps import StepStore, read_json, write_json
from prefprune.influence.curvature import CurvatureName
from prefprune.influence.plan import damping_column_names
from prefprune.influence.scale import curvature_warnings
from prefprune.prune import ScoreTable, check_ids_match, check_same_data, read_score_table
from prefprune.score import ScoreConfig
from prefprune.validation_setup import ValidationSetup, setup_from_experiment, setup_from_folder

logger = logging.getLogger(__name__)

__all__ = ["ValidateConfig", "ValidationSetup", "run_validation", "validation_summary"]

#: Score columns whose sign convention is "positive = helpful" (a prediction of the loss change).
PREDICTIVE = ("grad_dot", "grad_cos")
RESULTS_FILE = "validate.json"
INPUTS_FILE = "inputs.json"  # digests of the data and settings every step file of the folder depends on
SCATTER_PLOT = "validate_scatter.png"
MIN_VALIDATION_PAIRS = 10
MIN_SUBSETS = 5


@dataclass
class ValidateConfig:
    """Settings of `prefprune validate` (from a model folder or an experiment config)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "reward model folder from prefprune train (its prefprune.json holds the training "
            "data, model and training settings); or give --config"
        },
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "experiment YAML instead of a model folder: its split, model and training settings "
            "(first seed) define the model to validate"
        },
    )
    val: str | None = field(
        default=None,
        metadata={
            "help": "validation pairs (read with the training data's settings); default: the model's "
            "held-out split (model folder) or the experiment's validation split"
        },
    )
    output: str = field(
        default="runs/validate",
        metadata={"help": "folder for validate.json, the scatter plot, the per-retrain step files and "
                          "inputs.json (the digests of the data and settings those steps belong to: a rerun "
                          "with other inputs is refused)"},
    )
    subsets: int = field(default=20, metadata={"help": "S: random subsets retrained for the LDS (>= 5)"})
    fraction: float = field(
        default=0.5, metadata={"help": "α: share of the training pairs each subset keeps"}
    )
    loo: int = field(default=0, metadata={"help": "m: single pairs left out and retrained (0 = no LOO)"})
    dampings: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.01],
        metadata={"help": "damping values λ of the influence columns (one score pass and solve for all)"},
    )
    curvature: CurvatureName = field(default="ggn", metadata={"help": "Hessian of the influence columns"})
    scores: list[str] = field(
        default_factory=list,
        metadata={
            "help": "extra score files (prefprune score output, e.g. an ensemble) whose columns are "
            "validated too; ids must match the training pairs"
        },
    )
    ensemble: list[int] = field(
        default_factory=list,
        metadata={
            "help": "training seeds of extra models: each is trained on the whole training set from its own "
            "initial weights and scored like the reference; the mean of every column over the reference and "
            "them is validated as ensemble:<column>"
        },
    )
    score: ScoreConfig = field(
        default_factory=ScoreConfig,
        metadata={"help": "scoring settings (curvature, damping, seed and max_length are set by validate)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the subset and leave-one-out draws"})
    bootstrap_samples: int = field(default=2000, metadata={"help": "resamples behind each interval"})
    interval_level: float = field(default=0.95, metadata={"help": "coverage of the intervals"})
    device: str | None = field(
        default=None, metadata={"help": "cuda | cpu | cuda:N; default cuda if available"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar over the retrains"})

    def validate(self, *, need_source: bool = True) -> None:
        """Raise ValueError on a bad setting (before any data is read or model trained)."""
        if need_source and (self.model is None) == (self.config is None):
            raise ValueError(
                "give exactly one of --model FOLDER (trained by prefprune train) or --config FILE"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction (α) must be in the open interval (0, 1), got {self.fraction!r}")
        if self.subsets < MIN_SUBSETS:
            raise ValueError(
                f"subsets (S) must be at least {MIN_SUBSETS} for a rank correlation, got {self.subsets}"
            )
        if self.loo < 0:
            raise ValueError(f"loo must be >= 0, got {self.loo}")
        if not self.dampings:
            raise ValueError("dampings is empty: give at least one damping value")
        for d in self.dampings:
            dataclasses.replace(self.score, curvature=self.curvature, damping=d).validate()
        if self.bootstrap_samples < 100:
            raise ValueError(f"bootstrap_samples must be at least 100, got {self.bootstrap_samples}")
        if not 0 < self.interval_level < 1:
            raise ValueError(f"interval_level must be in (0, 1), got {self.interval_level}")


# ---------------------------------------------------------------------------------------------------
# What the folder's retrains belong to


def _check_inputs(out: Path, setup: ValidationSetup) -> None:
    """Record what the retrains of `out` depend on; refuse a folder holding retrains of other inputs."""
    settings = {k: v for k, v in dataclasses.asdict(setup.train_config).items()
                if k not in ("progress", "device", "eval_batch_size")}
    inputs = {"training data": pairs_digest(setup.train), "validation data": pairs_digest(setup.val),
              "training settings": jsonable(settings)}
    path = out / INPUTS_FILE
    old = read_json(path)
    if old is not None:
        changed = [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)]
        if changed:
            raise ValueError(
                f"{out} holds the retrains of a validation with other inputs ({', '.join(changed)} changed "
                f"since {path} was written); choose another --output, or remove {out} to start over"
            )
    else:
        write_json(path, inputs)


# ---------------------------------------------------------------------------------------------------
# Retrains and scores


class _Retrainer:
    """One model at the initial weights; each retrain restores them, trains on a subset, measures L_V."""

    def __init__(self, setup: ValidationSetup):
        self.setup = setup
        self.model, self.tokenizer = setup.build()
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in self.init.items():
                params[n].copy_(v)

    def val_loss(self) -> float:
        cfg = self.setup.train_config
        res = train_mod.evaluate(
            self.model,
            self.tokenizer,
            self.setup.val,
            max_length=cfg.max_length,
            batch_size=cfg.eval_batch_size,
        )
        return float(res["loss"])

    def retrain(self, data) -> tuple[float, float]:
        """(validation loss after training on `data` from the initial weights, seconds)."""
        self.restore()
        t0 = time.perf_counter()
        train_mod.train_reward_model(self.model, self.tokenizer, data, config=self.setup.train_config)
        return self.val_loss(), time.perf_counter() - t0


def _draws(vc: ValidateConfig, ids: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """The left-out ids of each subset, and the leave-one-out ids; seeded, fixed before any retrain."""
    rng = np.random.default_rng(vc.seed)
    n = len(ids)
    keep = int(math.floor(vc.fraction * n + 0.5))
    if not 1 <= keep < n:
        raise ValueError(f"fraction {vc.fraction} of {n} training pairs keeps {keep}; need 1..{n - 1}")
    left_out = [sorted(ids[i] for i in rng.permutation(n)[keep:]) for _ in range(vc.subsets)]
    loo = [ids[i] for i in rng.choice(n, size=min(vc.loo, n), replace=False)] if vc.loo else []
    return left_out, loo


def _scores_step(vc: ValidateConfig, prefix: str = "") -> str:
    return f"scores/{prefix}damping_" + "_".join(f"{d:g}" for d in vc.dampings) + ".json"


def _score_tables(vc: ValidateConfig, setup: ValidationSetup, rt: _Retrainer, steps: StepStore) -> ScoreTable:
    """The reference model's scores (every damping value from one pass and one solve), one step; with an
    ensemble, also each member's (trained and scored only when its step is missing) and their mean as
    ``ensemble:<column>`` columns."""
    table = _scored(vc, setup, rt, steps, _scores_step(vc))
    if not vc.ensemble:
        return table
    members = [table]
    for seed in vc.ensemble:
        rel = _scores_step(vc, f"ensemble_seed{seed}_")
        other = setup.reseed(seed)
        member = None
        if steps.get(rel) is None:
            member = _Retrainer(other)
            member.retrain(setup.train)
        members.append(_scored(vc, other, member, steps, rel))
    mean = average_tables(members, sources=[f"seed {s}" for s in [setup.train_config.seed, *vc.ensemble]])
    ens = {f"ensemble:{c}": v for c, v in mean.columns.items()}  # mean.ids are in table's row order
    return ScoreTable(ids=table.ids, columns={**table.columns, **ens}, metadata=table.metadata,
                      source=table.source)


def _scored(
    vc: ValidateConfig, setup: ValidationSetup, rt: _Retrainer | None, steps: StepStore, rel: str
) -> ScoreTable:
    """Step `rel`: every damping's influence (one pass, one solve), grad_dot and grad_cos of rt's model."""
    rec = steps.get(rel)
    if rec is None:
        # A damping at which H + λI is not positive definite (exact curvature) is a finding to report
        # (its column is NaN), not a reason to stop the other columns.
        damping = vc.dampings[0] if len(vc.dampings) == 1 else list(vc.dampings)
        cfg = dataclasses.replace(
            setup.score_config, curvature=vc.curvature, damping=damping, progress=False, on_nonpositive="nan"
        )
        res = score_mod.score_pairs(rt.model, rt.tokenizer, setup.train, setup.val, config=cfg)
        rec = steps.put(rel, score_result_table(res, source="validate scores").to_json())
    return ScoreTable.from_json(rec, source=str(steps.root / rel))


def _columns(vc: ValidateConfig, table: ScoreTable, ids: Sequence[str], *, train: Any = None
             ) -> dict[str, np.ndarray]:
    """Every validated column, aligned with `ids`: influence@λ, grad_dot, grad_cos (and their ensemble:
    means), then the extra files' columns."""
    cols: dict[str, np.ndarray] = {}
    pos = {i: k for k, i in enumerate(table.ids)}
    order = np.asarray([pos[i] for i in ids])
    # A relative sweep's columns are influence@r<factor> (validate's own names keep the factor).
    names = damping_column_names(vc.dampings, relative=bool(table.metadata.get("config", {}).get(
        "damping_relative")))
    for prefix in ("", "ensemble:") if vc.ensemble else ("",):
        for d, name in zip(vc.dampings, names, strict=True):
            cols[f"{prefix}influence@{d:g}"] = table.column(prefix + name)[order]
        for c in PREDICTIVE:
            if prefix + c in table.columns:
                cols[prefix + c] = table.columns[prefix + c][order]
    for path in vc.scores:
        tab = read_score_table(path)
        if train is not None:  # the ids and, where its sidecar records them, the texts and labels
            check_same_data(train, tab)
        else:
            check_ids_match(list(ids), tab)
        pos = {i: k for k, i in enumerate(tab.ids)}
        order = np.asarray([pos[i] for i in ids])
        for c, values in tab.columns.items():
            if c.startswith("influence") or c in PREDICTIVE:
                cols[f"{Path(path).name}:{c}"] = values[order]
    return cols


# ---------------------------------------------------------------------------------------------------
# Metrics and outputs


def _metrics(
    vc: ValidateConfig,
    cols: dict[str, np.ndarray],
    ids: Sequence[str],
    l_full: float,
    subsets: list[dict],
    loo: list[dict],
) -> dict[str, Any]:
    n, pos = len(ids), {i: k for k, i in enumerate(ids)}
    actual = np.asarray([s["val_loss"] - l_full for s in subsets])
    interval = functools.partial(
        correlation_interval, n_boot=vc.bootstrap_samples, level=vc.interval_level, seed=vc.seed
    )
    out: dict[str, Any] = {}
    for name, values in cols.items():
        if not np.all(np.isfinite(values)):
            out[name] = {"note": "non-finite scores (H + λI not positive definite for this damping)"}
            continue
        pred = np.asarray([values[[pos[i] for i in s["left_out"]]].sum() / n for s in subsets])
        entry: dict[str, Any] = {
            "lds": interval(pred, actual, method="spearman").to_dict(),
            "subset_predicted": pred.tolist(),
        }
        if len(loo) >= 3:
            lp = np.asarray([values[pos[r["id"]]] / n for r in loo])
            la = np.asarray([r["val_loss"] - l_full for r in loo])
            entry["loo"] = {
                "pearson": pearson(lp, la),
                "spearman": spearman(lp, la),
                "pearson_interval": interval(lp, la, method="pearson").to_dict(),
                "predicted": lp.tolist(),
            }
        out[name] = entry
    return out


def _recommend(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The damping whose influence column has the highest LDS (and the best LOO Pearson when measured)."""
    infl = {
        k: v
        for k, v in metrics.items()
        if k.startswith("influence@") and "lds" in v and math.isfinite(v["lds"]["value"])
    }
    if not infl:
        return None
    best = max(infl, key=lambda k: infl[k]["lds"]["value"])
    rec = {"damping": float(best.split("@", 1)[1]), "by": "lds", "lds": infl[best]["lds"]}
    with_loo = {k: v for k, v in infl.items() if "loo" in v and math.isfinite(v["loo"]["pearson"])}
    if with_loo:
        best_loo = max(with_loo, key=lambda k: with_loo[k]["loo"]["pearson"])
        rec["damping_by_loo"] = float(best_loo.split("@", 1)[1])
    return rec


def _scatter(results: dict[str, Any], folder: Path) -> str | None:
    try:
        import matplotlib  # optional dependency (prefprune[plots]): imported only to plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no scatter plot (pip install 'prefprune[plots]')")
        return None
    names = [k for k, v in results["columns"].items() if "lds" in v]
    actual = [s["val_loss"] - results["reference"]["val_loss"] for s in results["subsets"]]
    loo_actual = [r["val_loss"] - results["reference"]["val_loss"] for r in results["loo"]]
    rows = 2 if results["loo"] and len(results["loo"]) >= 3 else 1
    fig, axes = plt.subplots(rows, len(names), figsize=(3.6 * len(names), 3.3 * rows), squeeze=False)
    for j, name in enumerate(names):
        m = results["columns"][name]
        ax = axes[0][j]
        ax.scatter(m["subset_predicted"], actual, s=14)
        ax.set_title(
            f"{name}\nLDS {m['lds']['value']:.2f} [{m['lds']['low']:.2f}, {m['lds']['high']:.2f}]", fontsize=8
        )
        ax.set_xlabel("predicted Δ val loss", fontsize=7)
        ax.set_ylabel("measured Δ (subsets)", fontsize=7)
        if rows == 2:
            ax = axes[1][j]
            ax.scatter(m["loo"]["predicted"], loo_actual, s=14, color="C1")
            ax.set_title(f"leave-one-out: Pearson {m['loo']['pearson']:.2f}", fontsize=8)
            ax.set_xlabel("predicted Δ val loss", fontsize=7)
            ax.set_ylabel("measured Δ (LOO)", fontsize=7)
    fig.tight_layout()
    atomic_write(folder / SCATTER_PLOT, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return SCATTER_PLOT


def _retrain_all(
    rt: _Retrainer,
    setup: ValidationSetup,
    steps: StepStore,
    jobs: list[tuple[str, list[str]]],
    progress: bool,
) -> list[dict]:
    """Run (or read back) each (step name, left-out ids) retrain; one step file each."""
    ids = set(setup.train.ids)
    out = []
    bar = tqdm(jobs, desc="validate retrains", disable=not progress)
    for rel, left_out in bar:
        rec = steps.get(rel)
        if rec is None:
            loss, secs = rt.retrain(setup.train.exclude(left_out))
            rec = steps.put(
                rel,
                {
                    "left_out": left_out,
                    "val_loss": loss,
                    "seconds": secs,
                    "n_train": len(ids) - len(left_out),
                },
            )
        out.append(rec)
    return out


def run_validation(vc: ValidateConfig, *, setup: ValidationSetup | None = None) -> dict[str, Any]:
    """Run (or resume) the validation described in the module docstring; write validate.json and a plot.

    Args:
        vc: the settings.
        setup: a prepared model and data (Python callers); default: built from `vc.model` or `vc.config`.

    Returns:
        The results dict (also written to `<output>/validate.json`).
    """
    vc.validate(need_source=setup is None)
    if setup is None:
        setup = (setup_from_folder(vc.model, val_source=vc.val, device=vc.device, score=vc.score)
                 if vc.model is not None else setup_from_experiment(vc.config, val_source=vc.val))
    if len(setup.val) < MIN_VALIDATION_PAIRS:
        raise ValueError(
            f"the validation set has {len(setup.val)} pairs; validate needs at least {MIN_VALIDATION_PAIRS}"
        )
    if vc.ensemble:
        seeds = [setup.train_config.seed, *vc.ensemble]
        if setup.reseed is None:
            raise ValueError("ensemble: this setup cannot build models for other seeds (no reseed given)")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"ensemble seeds must differ from each other and from the reference's: {seeds}")
    ids = list(setup.train.ids)
    left_outs, loo_ids = _draws(vc, ids)
    out = Path(vc.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_inputs(out, setup)
    steps = StepStore(out)
    n_retrains = 1 + len(left_outs) + len(loo_ids) + len(vc.ensemble)
    logger.info(
        "validate: %d retrains (1 reference + %d subsets at α=%g + %d leave-one-out + %d ensemble members) "
        "on %d pairs, plus %d score passes (each: all %d damping values)",
        n_retrains,
        len(left_outs),
        vc.fraction,
        len(loo_ids),
        len(vc.ensemble),
        len(ids),
        1 + len(vc.ensemble),
        len(vc.dampings),
    )
    t0 = time.perf_counter()
    rt = _Retrainer(setup)
    ref = steps.get("reference.json")
    scored = steps.get(_scores_step(vc)) is not None
    if ref is None or not scored:
        # The reference model is the one scored (rebuilt when resuming: training is deterministic on CPU).
        loss, secs = rt.retrain(setup.train)
        ref = ref or steps.put("reference.json", {"val_loss": loss, "seconds": secs, "n_train": len(ids)})
    logger.info(
        "validate: reference retrain %.1f s; the %d others take about %.1f min",
        ref["seconds"],
        n_retrains - 1,
        (n_retrains - 1) * ref["seconds"] * (1 + vc.fraction) / 2 / 60,
    )
    table = _score_tables(vc, setup, rt, steps)
    cols = _columns(vc, table, ids, train=setup.train)
    jobs = [(f"subsets/{k:03d}.json", lo) for k, lo in enumerate(left_outs)]
    jobs += [(f"loo/{k:03d}.json", [i]) for k, i in enumerate(loo_ids)]
    done = _retrain_all(rt, setup, steps, jobs, vc.progress)
    subsets, loo = done[: len(left_outs)], [{"id": r["left_out"][0], **r} for r in done[len(left_outs) :]]
    metrics = _metrics(vc, cols, ids, ref["val_loss"], subsets, loo)
    results = {
        "settings": dataclasses.asdict(vc),
        "source": setup.source,
        "n_train": len(ids),
        "n_validation": len(setup.val),
        "reference": ref,
        "columns": metrics,
        "recommended": _recommend(metrics),
        "curvature_scale": table.metadata.get("curvature_scale"),  # trace(H)/p, λ relative to it, warnings
        "subsets": subsets,
        "loo": loo,
        "wall_time_s": time.perf_counter() - t0,
        "retrain_seconds_total": ref["seconds"] + sum(r["seconds"] for r in done),
    }
    plot = _scatter(results, out)
    results["plot"] = plot
    write_json(out / RESULTS_FILE, results)
    return results


def validation_summary(results: dict[str, Any]) -> str:
    """A markdown table of every column's LDS (and LOO correlation) with intervals, and the recommendation."""
    level = 100 * results["settings"]["interval_level"]
    lines = [
        f"| score | LDS (Spearman) [{level:g}% CI] | LOO Pearson [{level:g}% CI] | LOO Spearman |",
        "|---|---|---|---|",
    ]
    for name, m in results["columns"].items():
        if "lds" not in m:
            lines.append(f"| {name} | n/a: {m['note']} | — | — |")
            continue
        lds = m["lds"]
        loo = m.get("loo")
        loo_p = (
            "—"
            if loo is None
            else (
                f"{loo['pearson']:.3f} [{loo['pearson_interval']['low']:.3f}, "
                f"{loo['pearson_interval']['high']:.3f}]"
            )
        )
        loo_s = "—" if loo is None else f"{loo['spearman']:.3f}"
        lines.append(
            f"| {name} | {lds['value']:.3f} [{lds['low']:.3f}, {lds['high']:.3f}] | {loo_p} | {loo_s} |"
        )
    rec = results.get("recommended")
    if rec:
        lines.append("")
        lines.append(
            f"Recommended damping: {rec['damping']:g} (highest LDS"
            + (
                f"; best leave-one-out Pearson at {rec['damping_by_loo']:g}"
                if "damping_by_loo" in rec
                else ""
            )
            + ")."
        )
    lines += [f"WARNING: {w}" for w in curvature_warnings(results.get("curvature_scale"))]
    return "\n".join(lines)
