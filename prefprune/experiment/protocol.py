"""The pruning protocol: split, train, score, prune, retrain, test — over seeds, resumable.

1. Load the data and split it once into disjoint train / validation / test parts (`split_seed`; the
   split is the same for every seed, so all arms of all seeds are measured on one test set and seed
   spread reflects initialisation and data order only). Validation pairs are used **only** for
   scoring, test pairs **only** for the final accuracy.
2. For each seed: build the reward model (the seed fixes the LoRA/head initialisation and the data
   order), keep a copy of its initial trainable weights, train on the full training split: the
   *baseline*. Score every training pair with that baseline model against the validation split:
   one score pass per curvature (`influence_<curvature>`); grad_dot, grad_cos and train_loss come from
   the first pass.
3. For each method and fraction: drop the most harmful `fraction` of the training split (lowest
   influence / grad_dot / grad_cos, highest train_loss, or a seeded random draw), restore the *same*
   initial weights, retrain with the same hyperparameters and seed, and measure test accuracy. The
   *helpful arm* drops the other end instead.
4. With planted label noise (`dataset.flipped_ids`), each score's noise-detection AUC and
   precision@k (k = number of flipped training pairs).

Every finished step is one small JSON file under the output folder (`steps.StepStore`); a rerun with
the same folder skips them. Before the first retrain the run logs how many retrains there are and how many
are done, and once one is timed, the estimated time of the rest (`announce.RetrainPlan`). `results.json`,
`report.md` and PNG plots are rebuilt at the end.

With a list of `score.damping` values, one score pass per curvature gives every value's influence
column, and each value is its own method (``influence_<curvature>@<λ>``). A resume may change the damping
values and add methods, fractions, curvatures and seeds (`experiment.resume.check_resume`): the baselines
are kept, a score step is reused for exactly the values it was computed with (its settings and its baseline's
SHA-256 are checked; values no step holds get one score pass of their own), and a retrain step is reused
when it removed exactly the pairs that the current scores select (so a step is never reused for other
scores).

`lora_layers` adapts only the top N transformer layers. The layers below are then frozen and carry no
trainable adapter, so their outputs do not change during training: with `cache_prefix` they are
computed once per distinct input sequence and reused (`PrefixCache`), and training, scoring and
evaluation run only the top layers. Dropout in the cached part (embeddings and frozen layers) is
switched off, because a memoised computation must be deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefprune import score as score_mod
from prefprune._io import output_lock, sha256_file
from prefprune.data.config import load_data
from prefprune.data.noise import restore_labels
from prefprune.experiment.announce import RetrainPlan
from prefprune.experiment.config import ExperimentConfig, damping_tag
from prefprune.experiment.counts import data_counts
from prefprune.experiment.report import write_report
from prefprune.experiment.results import collect_results
from prefprune.experiment.resume import check_resume
from prefprune.experiment.scoresteps import (
    find_score_steps,
    merge_tables,
    needs_influence,
    score_result_table,
    with_ensemble_columns,
)
from prefprune.experiment.seedrun import SeedRun, Timer, load_trainable, trainable_state
from prefprune.experiment.setup import (
    fit_training,
    fit_validation,
    load_tokenizer,
    prefix_cache,
    too_long_test_pairs,
)
from prefprune.experiment.steps import StepStore, arm_step_name, load_state, save_state, write_json
from prefprune.prefix_cache import PrefixCache
from prefprune.prune import ScoreTable, check_ids_match, n_to_select, select_pairs

logger = logging.getLogger(__name__)

__all__ = ["run_experiment"]


@dataclass
class _Plan:
    """What the seeds share: the splits, the noise bookkeeping, the score passes, the cache."""

    cfg: ExperimentConfig
    out: Path
    steps: StepStore
    dataset: Any
    train: Any
    val: Any
    test: Any
    too_long_ids: list[str]
    flipped_train: list[str]
    clean_ids: set[str] | None
    curvatures: list[str]
    cache: PrefixCache | None
    val_scoring: Any
    counts: dict[str, Any]
    arms: list[tuple[str, str, float]] = field(default_factory=list)
    retrains: RetrainPlan | None = None


def _split(cfg: ExperimentConfig, dataset, steps: StepStore):
    train, val, test = dataset.split(cfg.split, seed=cfg.split_seed)
    parts = {"train": train.ids, "validation": val.ids, "test": test.ids}
    for a in parts:
        for b in parts:
            if a < b and set(parts[a]) & set(parts[b]):
                raise AssertionError(f"split parts {a} and {b} overlap")
    for name, ids in parts.items():
        if len(ids) < 2:
            raise ValueError(
                f"the {name} split has {len(ids)} pairs; use more data or larger split fractions"
            )
    prev = steps.get("splits.json")
    if prev is None:
        steps.put("splits.json", parts)
    elif prev != parts:
        raise ValueError(
            "the data or its split changed since this output folder was started; use a new folder"
        )
    return train, val, test


def _score_curvatures(cfg: ExperimentConfig) -> list[str]:
    """The score passes the methods need: one per curvature (every damping value in it), or one cheap pass
    for gradient scores only."""
    score_methods = [m for m in dict.fromkeys(cfg.arm_methods() + cfg.helpful_arm_methods()) if m != "random"]
    if not score_methods:
        return []
    if needs_influence(cfg):
        return list(cfg.curvatures)
    return ["identity"]  # grad_dot / grad_cos / train_loss only: no curvature solve needed


def _prepare(cfg: ExperimentConfig) -> _Plan:
    """Everything checked and decided before the first training: data, split, fit, settings, resume."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    steps = StepStore(out)
    dataset = load_data(cfg.data, plant_noise=True)
    if cfg.clean_eval:
        # The split depends on the ids and split_seed only, so restoring labels does not move any pair.
        _, val0, test0 = dataset.split(cfg.split, seed=cfg.split_seed)
        dataset = restore_labels(dataset, set(val0.ids) | set(test0.ids))
    train, val, test = _split(cfg, dataset, steps)
    tokenizer = load_tokenizer(cfg)
    train, too_long_ids = fit_training(train, tokenizer, cfg.max_length)
    for f in cfg.fractions + cfg.helpful_arm_fractions():
        n_to_select(len(train), f)
    for c in cfg.curvatures:
        cfg.score_config(0, c)
    cfg.train_config(0)
    check_resume(out, cfg)
    flipped = dataset.flipped_ids
    val_scoring = val
    if cfg.trusted_validation:
        if not flipped:
            raise ValueError(
                "trusted_validation needs planted label noise (label_noise > 0) to know the clean pairs"
            )
        # A clean validation set: the assumption of noisy-label methods that rely on trusted data.
        val_scoring = val.exclude(flipped & set(val.ids))
    curvatures = _score_curvatures(cfg)
    val_left_out = {"untrusted": len(val) - len(val_scoring)} if cfg.trusted_validation else {}
    if curvatures:
        val_scoring, val_too_long = fit_validation(val_scoring, tokenizer, cfg.max_length)
        val_left_out["too_long"] = len(val_too_long)
    else:
        val_left_out["not_scored"] = len(val_scoring)  # no method needs scores
    counts = data_counts(
        dataset.stats,
        {"train": len(train) + len(too_long_ids), "validation": len(val), "test": len(test)},
        {"train": {"too_long": len(too_long_ids)}, "validation": val_left_out,
         "test": {"too_long": len(too_long_test_pairs(test, tokenizer, cfg.max_length))}},
    )
    plan = _Plan(
        cfg=cfg,
        out=out,
        steps=steps,
        dataset=dataset,
        train=train,
        val=val,
        test=test,
        too_long_ids=too_long_ids,
        flipped_train=sorted(flipped & set(train.ids)),
        clean_ids=set(test.ids) - flipped if flipped & set(test.ids) else None,
        curvatures=curvatures,
        cache=prefix_cache(cfg),
        val_scoring=val_scoring,
        counts=counts,
    )
    plan.arms = [(m, "harmful", f) for m in cfg.arm_methods() for f in cfg.fractions]
    plan.arms += [(m, "helpful", f) for m in cfg.helpful_arm_methods() for f in cfg.helpful_arm_fractions()]
    return plan


def _retrain_plan(plan: _Plan) -> RetrainPlan:
    """The retrains of every seed (baseline, then each arm) with the training pairs of each; those with a step
    file are done (an arm is redone when the current scores select other pairs: found only as it runs)."""
    n, pending, done = len(plan.train), [], 0
    for seed in plan.cfg.seeds:
        jobs = [(f"seed{seed}/baseline.json", n)]
        jobs += [(arm_step_name(seed, m, mode, f), n - n_to_select(n, f)) for m, mode, f in plan.arms]
        for rel, size in jobs:
            if (plan.out / rel).is_file():
                done += 1
            else:
                pending.append(size)
    return RetrainPlan("experiment", pending, done)


def _baseline(plan: _Plan, run: SeedRun) -> None:
    seed = run.seed
    rel = f"seed{seed}/baseline.json"
    state_path = plan.out / f"seed{seed}" / "baseline_state.pt"
    if plan.steps.get(rel) is not None and state_path.is_file():
        return
    stats, result, margins, tm = run.train_and_test(plan.train, "baseline")
    plan.retrains.timed(tm.seconds, len(plan.train))
    save_state(trainable_state(run.model), state_path)
    plan.steps.put(
        rel,
        {
            "seed": seed,
            "n_train": len(plan.train),
            "test": result,
            "test_margins": margins,
            "train_stats": stats,
            "seconds": tm.seconds,
            "cpu_seconds": tm.cpu_seconds,
        },
    )


def _scores(plan: _Plan, run: SeedRun) -> ScoreTable | None:
    """The seed's merged score table (one pass per curvature, each a step), or None without scores.

    A pass gives every damping value's column; on a resume, values that no usable step holds are scored in
    a pass of their own (the baseline is loaded, never retrained)."""
    seed, tables = run.seed, {}
    state_path = plan.out / f"seed{seed}" / "baseline_state.pt"
    digest = sha256_file(state_path)
    need = needs_influence(plan.cfg)
    for curv in plan.curvatures:
        want = plan.cfg.score_config(seed, curv)
        found = find_score_steps(plan.steps, seed, curv, want, baseline_digest=digest, need_dampings=need)
        if found.missing:
            if found.stale:
                logger.info("seed %d: not reusing %s (other score settings or baseline)", seed, found.stale)
            missing = found.missing
            config = want
            if need:  # only the values no step holds yet
                config = dataclasses.replace(want, damping=missing if len(missing) > 1 else missing[0])
            model, tok = run.ensure_model()
            load_trainable(model, load_state(state_path))
            with Timer() as tm:
                res = score_mod.score_pairs(model, tok, plan.train, plan.val_scoring, config=config)
            table = score_result_table(res, source=f"seed {seed} scores ({curv})")
            check_ids_match(plan.train.ids, table)
            plan.steps.put(
                found.next_name,
                {
                    "curvature": curv,
                    "dampings": config.dampings(),
                    "baseline_sha256": digest,
                    "seconds": tm.seconds,
                    "cpu_seconds": tm.cpu_seconds,
                    "n_validation": len(plan.val_scoring),
                    **table.to_json(),
                },
            )
            logger.info(
                "seed %d: scored %d pairs, %s curvature, damping %s (%.1fs)",
                seed,
                len(plan.train),
                curv,
                config.damping,
                tm.seconds,
            )
            found = find_score_steps(plan.steps, seed, curv, want, baseline_digest=digest, need_dampings=need)
            if found.table is None:
                raise RuntimeError(f"seed {seed}: {curv} score steps still lack damping {found.missing}")
        tables[curv] = found.table
    return merge_tables(tables, plan.train.ids) if tables else None


def _arm_aliases(cfg: ExperimentConfig, method: str) -> list[str]:
    """Other names the same pruning had in a run with one damping value more or less: influence_ggn@1 was
    influence_ggn when 1 was the only value, and the other way round."""
    base, at, _ = method.partition("@")
    if at:
        return [base]
    values = cfg.dampings()
    if method.startswith(("influence_", "ensemble_")) and len(values) == 1:
        return [method + damping_tag(values[0], relative=cfg.score.relative_damping)]
    return []


def _finished_arm(plan: _Plan, seed: int, method: str, mode: str, fraction: float, removed) -> bool:
    """Whether the arm has a step that removed exactly `removed` (None: a skipped arm); a step found under an
    alias (`_arm_aliases`) is copied to the arm's own name."""
    rel = arm_step_name(seed, method, mode, fraction)
    for name in [method, *_arm_aliases(plan.cfg, method)]:
        where = arm_step_name(seed, name, mode, fraction)
        rec = plan.steps.get(where)
        if rec is None:
            continue
        if removed is None:
            same = "skipped" in rec
        elif "skipped" in rec:
            same = False
        elif "removed_ids" not in rec:
            same = name == method  # an old step without its removed ids: trusted under its own name only
        else:
            same = set(rec["removed_ids"]) == set(removed)
        if same:
            if where != rel:
                plan.steps.put(rel, {**rec, "method": method, "reused_from": where})
            return True
        if name == method:
            logger.warning("seed %d: %s was pruned by other scores than the current ones: redone", seed, rel)
    return False


def _arms(plan: _Plan, run: SeedRun, merged: ScoreTable | None) -> None:
    """Every prune-and-retrain arm of the seed that has no finished step for the pairs it removes now."""
    seed, flipped = run.seed, set(plan.flipped_train)
    for method, mode, fraction in plan.arms:
        rel = arm_step_name(seed, method, mode, fraction)
        reason = None
        if method == "random":
            sel = select_pairs(plan.train.ids, None, method="random", fraction=fraction, mode=mode, seed=seed)
        elif not np.all(np.isfinite(merged.column(method))):
            # e.g. influence_exact after CG met non-positive curvature with score.on_nonpositive: nan.
            reason = f"non-finite {method} scores ({merged.metadata})"[:500]
        else:
            sel = select_pairs(merged.ids, merged.column(method), method=method, fraction=fraction, mode=mode)
        if _finished_arm(plan, seed, method, mode, fraction, None if reason else sel.ids):
            continue
        if reason is not None:
            logger.warning("seed %d: skipping %s %s %g: %s", seed, method, mode, fraction, reason)
            plan.steps.put(
                rel, {"seed": seed, "method": method, "mode": mode, "fraction": fraction, "skipped": reason}
            )
            continue
        pruned = plan.train.exclude(sel.ids)
        stats, result, margins, tm = run.train_and_test(pruned, f"{method} {mode} {fraction:g}")
        plan.retrains.timed(tm.seconds, len(pruned))
        plan.steps.put(
            rel,
            {
                "seed": seed,
                "method": method,
                "mode": mode,
                "fraction": fraction,
                "n_train": len(pruned),
                "n_removed": len(sel.ids),
                "n_flipped_removed": len(set(sel.ids) & flipped),
                "removed_ids": list(sel.ids),
                "test": result,
                "test_margins": margins,
                "train_stats": stats,
                "seconds": tm.seconds,
                "cpu_seconds": tm.cpu_seconds,
            },
        )


def _finish(plan: _Plan, t_start: float) -> dict[str, Any]:
    cache = plan.cache
    results = collect_results(
        plan.cfg,
        plan.out,
        dataset=plan.dataset,
        splits=(plan.train, plan.val, plan.test),
        flipped_train=plan.flipped_train,
        curvatures=plan.curvatures,
    )
    results["timings"]["this_invocation_seconds"] = time.perf_counter() - t_start
    results["data"]["train_left_out_too_long"] = plan.too_long_ids
    results["data"]["n_validation_used_for_scoring"] = len(plan.val_scoring)
    results["data"]["counts"] = plan.counts
    if cache is not None:
        results["prefix_cache"] = {
            "sequences": len(cache),
            "megabytes": cache.nbytes / 2**20,
            "hits": cache.hits,
            "misses": cache.misses,
            "cached_layers": cache.n_prefix,
        }
    write_json(plan.out / "results.json", results)
    write_report(results, plan.out)
    return results


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the protocol described in the module docstring; write results, report, plots.

    Args:
        cfg: the experiment settings (validated again here).

    Returns:
        The results dict that is also written to `<output>/results.json`.
    """
    cfg.validate()
    # One writer per experiment folder: two runs with different settings would mix their step files.
    with output_lock(cfg.output, what="prefprune experiment"):
        return _run_experiment(cfg)


def _run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    plan = _prepare(cfg)
    plan.retrains = _retrain_plan(plan)
    plan.retrains.announce(f"{len(cfg.seeds)} seed(s) x (1 baseline + {len(plan.arms)} pruned)")
    ensemble = any(m.startswith("ensemble_") for m, _, _ in plan.arms)
    merged: dict[int, ScoreTable | None] = {}
    for seed in cfg.seeds:
        run = SeedRun(cfg, seed, plan.out, plan.cache, plan.test, plan.clean_ids)
        _baseline(plan, run)
        merged[seed] = _scores(plan, run)
        if not ensemble:  # without ensemble arms a seed is finished here (its model is built once)
            _arms(plan, run, merged[seed])
        run.close()
    if ensemble:
        # The ensemble of the seeds' baselines needs every seed's scores before any seed prunes by it.
        tables = with_ensemble_columns(merged, plan.curvatures)
        for seed in cfg.seeds:
            run = SeedRun(cfg, seed, plan.out, plan.cache, plan.test, plan.clean_ids)
            _arms(plan, run, tables[seed])
            run.close()
    if plan.cache is not None:
        c = plan.cache
        logger.info(
            "prefix cache: %d sequences, %.1f MB, %d hits, %d misses",
            len(c),
            c.nbytes / 2**20,
            c.hits,
            c.misses,
        )
    return _finish(plan, t_start)
