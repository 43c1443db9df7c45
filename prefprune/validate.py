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
influence column has the best LDS is recommended, saying whether the runner-up's interval overlaps its own.
LDS and leave-one-out predict changes of validation loss; they do not say that pruning a column's lowest
pairs gains test accuracy.

With ``prune_check`` = k, also the check a pruning user needs (`prefprune.validation_prune`): each column's
lowest k removed against k removed at random, test accuracy after retraining, with paired bootstrap
intervals; the recommendation then rests on it instead of the LDS.

Every retrain is one step file under the output folder (`prefprune.experiment.steps.StepStore`): a rerun
resumes. The inputs (sizes, max_length fit, disjoint splits, test pairs) are checked before the first
retrain; the count of retrains is logged before it, and their estimated time once the reference retrain
has been timed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prefprune import score as score_mod
from prefprune import train as train_mod
from prefprune._io import jsonable
from prefprune.data import pairs_digest
from prefprune.ensemble import average_tables
from prefprune.experiment.scoresteps import score_fingerprint, score_result_table
from prefprune.experiment.steps import StepStore, read_json, write_json
from prefprune.influence.plan import damping_column_names
from prefprune.prune import (
    ScoreTable,
    check_ids_match,
    check_same_data,
    n_to_select,
    read_score_table,
)
from prefprune.score import ScoreConfig
from prefprune.validation_config import ValidateConfig
from prefprune.validation_prune import FULL_STEP, PRUNE_DIR, prune_jobs, prune_metrics
from prefprune.validation_report import MEASURES, lds_metrics, recommend, validation_summary, write_scatter
from prefprune.validation_setup import (
    ValidationSetup,
    check_disjoint,
    fit_max_length,
    setup_from_experiment,
    setup_from_folder,
)

logger = logging.getLogger(__name__)

__all__ = ["ValidateConfig", "ValidationSetup", "run_validation", "validation_summary"]

#: Score columns whose sign convention is "positive = helpful" (a prediction of the loss change).
PREDICTIVE = ("grad_dot", "grad_cos")
RESULTS_FILE = "validate.json"
INPUTS_FILE = "inputs.json"  # digests of the data and settings every step file of the folder depends on
MIN_VALIDATION_PAIRS = 10


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

    def _evaluate(self, data, **kw: Any) -> dict[str, Any]:
        cfg = self.setup.train_config
        return train_mod.evaluate(self.model, self.tokenizer, data, max_length=cfg.max_length,
                                  batch_size=cfg.eval_batch_size, **kw)

    def retrain(self, data, *, test: bool = False) -> dict[str, Any]:
        """Train on `data` from the initial weights: the validation loss, the seconds it took and, with
        `test`, the margin of every test pair that fits max_length (the pruning check's measurement)."""
        self.restore()
        t0 = time.perf_counter()
        train_mod.train_reward_model(self.model, self.tokenizer, data, config=self.setup.train_config)
        rec = {"val_loss": float(self._evaluate(self.setup.val)["loss"]), "seconds": time.perf_counter() - t0}
        if test:
            res = self._evaluate(self.setup.test, return_margins=True)
            rec.update(test_accuracy=float(res["accuracy"]), test_margins=res["margins"],
                       test_digest=pairs_digest(self.setup.test))
        return rec


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
        # The member's own weights and seed, on the very pairs the reference was checked to use.
        other = dataclasses.replace(setup.reseed(seed), train=setup.train, val=setup.val, test=setup.test)
        member = None
        if _score_step(steps, rel, _score_config(vc, other)) is None:
            member = _Retrainer(other)
            member.retrain(setup.train)
        members.append(_scored(vc, other, member, steps, rel))
    mean = average_tables(members, sources=[f"seed {s}" for s in [setup.train_config.seed, *vc.ensemble]])
    ens = {f"ensemble:{c}": v for c, v in mean.columns.items()}  # mean.ids are in table's row order
    return ScoreTable(ids=table.ids, columns={**table.columns, **ens}, metadata=table.metadata,
                      source=table.source)


def _score_config(vc: ValidateConfig, setup: ValidationSetup) -> ScoreConfig:
    """The settings every score pass of `setup` runs with (recorded in validate.json as run)."""
    # A damping at which H + λI is not positive definite (exact curvature) is a finding to report (its
    # column is NaN), not a reason to stop the other columns.
    damping = vc.dampings[0] if len(vc.dampings) == 1 else list(vc.dampings)
    return dataclasses.replace(
        setup.score_config, curvature=vc.curvature, damping=damping, progress=False, on_nonpositive="nan"
    )


def _score_step(steps: StepStore, rel: str, cfg: ScoreConfig) -> dict | None:
    """Step `rel` when it was scored with `cfg`'s settings (a changed setting scores again), else None."""
    rec = steps.get(rel)
    ran = ((rec or {}).get("metadata") or {}).get("config")
    if rec is None or ran is None or score_fingerprint(ran) != score_fingerprint(cfg):
        return None
    return rec


def _scored(
    vc: ValidateConfig, setup: ValidationSetup, rt: _Retrainer | None, steps: StepStore, rel: str
) -> ScoreTable:
    """Step `rel`: every damping's influence (one pass, one solve), grad_dot and grad_cos of rt's model."""
    cfg = _score_config(vc, setup)
    rec = _score_step(steps, rel, cfg)
    if rec is None:
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
    relative = bool((table.metadata.get("config") or {}).get("damping_relative"))  # as the pass ran
    names = damping_column_names(vc.dampings, relative=relative)
    for prefix in ("", "ensemble:") if vc.ensemble else ("",):
        for d, name in zip(vc.dampings, names, strict=True):
            cols[f"{prefix}influence@{'r' if relative else ''}{d:g}"] = table.column(prefix + name)[order]
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


def _retrain_all(
    rt: _Retrainer,
    setup: ValidationSetup,
    steps: StepStore,
    jobs: list[tuple[str, list[str]]],
    progress: bool,
) -> dict[str, dict]:
    """Run (or read back) each (step name, left-out ids) retrain; one step file each. A step is reused when
    it left out the same pairs (and, for the pruning check's, was tested on the same test pairs); columns
    that remove the same pairs share one retrain (training is deterministic for a given set)."""
    n = len(setup.train)
    test_digest = pairs_digest(setup.test) if setup.test is not None else None
    out: dict[str, dict] = {}
    done: dict[tuple[bool, tuple[str, ...]], dict] = {}
    for rel, left_out in tqdm(jobs, desc="validate retrains", disable=not progress):
        rec = steps.get(rel)
        test = rel.startswith(PRUNE_DIR)
        if rec is None or rec["left_out"] != left_out or (test and rec.get("test_digest") != test_digest):
            same = done.get((test, tuple(left_out)))
            rec = (rt.retrain(setup.train.exclude(left_out), test=test) if same is None
                   else {**same, "seconds": 0.0, "same_pairs_as": same.get("step")})
            rec = steps.put(rel, {**rec, "left_out": left_out, "n_train": n - len(left_out), "step": rel})
        done.setdefault((test, tuple(left_out)), rec)
        out[rel] = rec
    return out


def _prepare(vc: ValidateConfig, setup: ValidationSetup | None) -> tuple[ValidationSetup, _Retrainer]:
    """The setup and its model at the initial weights, every input checked before any retrain."""
    vc.validate(need_source=setup is None)
    if setup is None:
        setup = (setup_from_folder(vc.model, val_source=vc.val, device=vc.device, score=vc.score,
                                   train_source=vc.train, test_source=vc.test)
                 if vc.model is not None else
                 setup_from_experiment(vc.config, val_source=vc.val, test_source=vc.test))
    if vc.prune_check is not None and setup.test is None:
        raise ValueError("the pruning check (--prune-check) needs test pairs: give --test FILE, or use "
                         "--config (its test split is used)")
    rt = _Retrainer(setup)  # builds the model at its initial weights; no training yet
    setup = fit_max_length(setup, rt.tokenizer)
    rt.setup = setup
    check_disjoint(setup)
    if len(setup.val) < MIN_VALIDATION_PAIRS:
        raise ValueError(
            f"the validation set has {len(setup.val)} pairs; validate needs at least {MIN_VALIDATION_PAIRS}"
        )
    if vc.prune_check is not None:
        n_to_select(len(setup.train), vc.prune_check)
    if vc.ensemble:
        seeds = [setup.train_config.seed, *vc.ensemble]
        if setup.reseed is None:
            raise ValueError("ensemble: this setup cannot build models for other seeds (no reseed given)")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"ensemble seeds must differ from each other and from the reference's: {seeds}")
    return setup, rt


def _reference(vc: ValidateConfig, setup: ValidationSetup, rt: _Retrainer, steps: StepStore) -> dict:
    """The reference retrain's record; retrains when its step or the score step is missing (the reference
    model is the one scored: rebuilt when resuming, training is deterministic on CPU)."""
    ref = steps.get("reference.json")
    if ref is None or _score_step(steps, _scores_step(vc), _score_config(vc, setup)) is None:
        test = vc.prune_check is not None and steps.get(FULL_STEP) is None
        rec = rt.retrain(setup.train, test=test)
        ref = ref or steps.put("reference.json", {"val_loss": rec["val_loss"], "seconds": rec["seconds"],
                                                  "n_train": len(setup.train)})
        if test:  # the unpruned arm of the pruning check is this same retrain
            steps.put(FULL_STEP, {"left_out": [], **rec, "n_train": len(setup.train)})
    return ref


def _log_plan(vc: ValidateConfig, n: int, n_retrains: int, n_prune: int) -> None:
    logger.info(
        "validate: %d retrains (1 reference + %d subsets at α=%g + %d leave-one-out + %d ensemble members + "
        "up to %d for the pruning check) on %d pairs, plus %d score passes (each: all %d damping values)",
        n_retrains, vc.subsets, vc.fraction, min(vc.loo, n), len(vc.ensemble), n_prune, n,
        1 + len(vc.ensemble), len(vc.dampings),
    )


def run_validation(vc: ValidateConfig, *, setup: ValidationSetup | None = None) -> dict[str, Any]:
    """Run (or resume) the validation described in the module docstring; write validate.json and a plot.

    Args:
        vc: the settings.
        setup: a prepared model and data (Python callers); default: built from `vc.model` or `vc.config`.

    Returns:
        The results dict (also written to `<output>/validate.json`).
    """
    setup, rt = _prepare(vc, setup)
    ids = list(setup.train.ids)
    left_outs, loo_ids = _draws(vc, ids)
    out = Path(vc.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_inputs(out, setup)
    steps = StepStore(out)
    # At most: one arm per column (the ensemble doubles them; an extra file has at least one) and per draw.
    n_cols = (len(vc.dampings) + len(PREDICTIVE)) * (2 if vc.ensemble else 1) + len(vc.scores)
    n_prune = 0 if vc.prune_check is None else n_cols + vc.prune_draws
    n_retrains = 1 + len(left_outs) + len(loo_ids) + len(vc.ensemble) + n_prune
    _log_plan(vc, len(ids), n_retrains, n_prune)
    t0 = time.perf_counter()
    ref = _reference(vc, setup, rt, steps)
    logger.info("validate: reference retrain %.1f s; the %d others take about %.1f min", ref["seconds"],
                n_retrains - 1, (n_retrains - 1) * ref["seconds"] * (1 + vc.fraction) / 2 / 60)
    table = _score_tables(vc, setup, rt, steps)
    cols = _columns(vc, table, ids, train=setup.train)
    jobs = [(f"subsets/{k:03d}.json", lo) for k, lo in enumerate(left_outs)]
    jobs += [(f"loo/{k:03d}.json", [i]) for k, i in enumerate(loo_ids)]
    if vc.prune_check is not None:
        jobs += prune_jobs(cols, ids, fraction=vc.prune_check, draws=vc.prune_draws, seed=vc.seed)
    done = _retrain_all(rt, setup, steps, jobs, vc.progress)
    subsets = [done[rel] for rel, _ in jobs if rel.startswith("subsets/")]
    loo = [{"id": done[rel]["left_out"][0], **done[rel]} for rel, _ in jobs if rel.startswith("loo/")]
    metrics = lds_metrics(cols, ids, ref["val_loss"], subsets, loo, n_boot=vc.bootstrap_samples,
                          level=vc.interval_level, seed=vc.seed)
    prune = None if vc.prune_check is None else prune_metrics(
        list(cols), done, fraction=vc.prune_check, draws=vc.prune_draws, n_boot=vc.bootstrap_samples,
        level=vc.interval_level)
    rec = recommend(metrics, prune)
    results = {
        "settings": _settings_as_run(vc, setup, table),
        "measures": MEASURES,
        "source": setup.source,
        "n_train": len(ids),
        "n_validation": len(setup.val),
        "n_test": None if setup.test is None else len(setup.test),
        "reference": ref,
        "columns": metrics,
        "prune_check": prune,
        "recommendation": rec,
        "recommended": rec["recommended"],
        "curvature_scale": table.metadata.get("curvature_scale"),  # trace(H)/p, λ relative to it, warnings
        "subsets": subsets,
        "loo": loo,
        "wall_time_s": time.perf_counter() - t0,
        "retrain_seconds_total": ref["seconds"] + sum(r["seconds"] for r in done.values()),
    }
    results["plot"] = write_scatter(results, out)
    write_json(out / RESULTS_FILE, results)
    return results


def _settings_as_run(vc: ValidateConfig, setup: ValidationSetup, table: ScoreTable) -> dict[str, Any]:
    """validate's settings with the scoring and training settings the retrains and score pass ran with."""
    settings = dataclasses.asdict(vc)
    settings["score"] = table.metadata.get("config") or jsonable(_score_config(vc, setup))
    settings["train"] = jsonable(dataclasses.replace(setup.train_config, progress=False))
    return settings
