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
the same folder skips them. `results.json`, `report.md` and PNG plots are rebuilt at the end.

With a list of `score.damping` values, one score pass per curvature gives every value's influence
column, and each value is its own method (``influence_<curvature>@<λ>``). A resume may change the damping
values and add methods, fractions and curvatures (`experiment.resume.check_resume`): the baselines are
kept, a score step is reused for exactly the values it was computed with (its settings and its baseline's
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

import contextlib
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune import score as score_mod
from prefprune import train as train_mod
from prefprune._io import output_lock, sha256_file
from prefprune.data import encode_pairs
from prefprune.data.config import load_data
from prefprune.data.encode import too_long_message
from prefprune.data.noise import restore_labels
from prefprune.experiment.config import (
    ExperimentConfig,
    damping_tag,
)
from prefprune.experiment.report import write_report
from prefprune.experiment.results import (
    collect_results,
    find_score_steps,
    merge_tables,
    needs_influence,
    score_result_table,
    with_ensemble_columns,
)
from prefprune.experiment.resume import check_resume
from prefprune.experiment.setup import build_seed_model, fitting_pairs, load_tokenizer, prefix_cache
from prefprune.experiment.steps import StepStore, arm_step_name, load_state, save_state, write_json
from prefprune.prefix_cache import InstalledCache, PrefixCache
from prefprune.prune import ScoreTable, check_ids_match, n_to_select, select_pairs

logger = logging.getLogger(__name__)

__all__ = ["run_experiment"]


class _Timer:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self) -> _Timer:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"saved state has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _evaluate(
    model, tokenizer, data, cfg: ExperimentConfig, *, clean_ids: set[str] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """(test metrics, margin of every test pair); with `clean_ids`, the metrics also hold accuracy/loss on
    those pairs (from the same margins). The margins let the report bootstrap over test pairs."""
    out = dict(
        train_mod.evaluate(
            model,
            tokenizer,
            data,
            batch_size=cfg.eval_batch_size,
            max_length=cfg.max_length,
            return_margins=True,
        )
    )
    margins = out.pop("margins")
    if clean_ids is not None:
        m = torch.tensor([v for k, v in margins.items() if k in clean_ids], dtype=torch.float64)
        out["clean"] = {
            "accuracy": float((m > 0).double().mean()),
            "mean_margin": float(m.mean()),
            "loss": float(F.softplus(-m).mean()),
            "n": int(m.numel()),
        }
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}, margins


class _SeedRun:
    """The model of one seed, built lazily (a fully finished seed never loads it), and its retrains."""

    def __init__(
        self, cfg: ExperimentConfig, seed: int, out: Path, cache: PrefixCache | None, test, clean_ids
    ):
        self.cfg, self.seed, self.out, self.cache = cfg, seed, out, cache
        self.test, self.clean_ids = test, clean_ids
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.installed: InstalledCache | None = None
        self.init_state: dict[str, Tensor] | None = None

    def ensure_model(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            model, tok = build_seed_model(self.cfg, self.seed)
            model.to(train_mod.resolve_device(None if self.cfg.device == "auto" else self.cfg.device))
            if self.cache is not None:
                self.installed = self.cache.install(model)
            self.model, self.tokenizer = model, tok
            init_path = self.out / f"seed{self.seed}" / "init_state.pt"
            if init_path.is_file():
                # The initialisation this seed's finished steps started from (builds are seeded, so this
                # is the same values; loading it guards against library changes between invocations).
                _load_trainable(model, load_state(init_path))
            else:
                save_state(_trainable_state(model), init_path)
            self.init_state = _trainable_state(model)
        return self.model, self.tokenizer

    def train_and_test(
        self, data, tag: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], _Timer]:
        """Restore the seed's initial weights, train on `data`, evaluate on the test split.

        Returns:
            (training stats, test metrics, test margins by pair id, timer).
        """
        model, tok = self.ensure_model()
        _load_trainable(model, self.init_state)
        config, ckpt = self.cfg.train_config(self.seed), None
        if config.checkpoint_every is not None or config.resume:
            # One checkpoint folder per training of the step; a rerun of the experiment resumes it (the
            # checkpoint refuses other data or settings) and a finished step removes it.
            ckpt = self.out / f"seed{self.seed}" / "checkpoints" / re.sub(r"[^\w.@-]+", "_", tag)
            config = dataclasses.replace(config, resume=True)
        with _Timer() as tm:
            stats = train_mod.train_reward_model(model, tok, data, config=config, checkpoint_dir=ckpt)
            result, margins = _evaluate(model, tok, self.test, self.cfg, clean_ids=self.clean_ids)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last one out removes checkpoints/ too
                ckpt.parent.rmdir()
        logger.info("seed %d %s: test accuracy %.4f (%.1fs)", self.seed, tag, result["accuracy"], tm.seconds)
        stats = {k: v for k, v in stats.items() if k != "history"} | {
            "final_step": (stats.get("history") or [{}])[-1]
        }
        return stats, result, margins, tm

    def close(self) -> None:
        if self.installed is not None:
            self.installed.remove()
        self.model = None


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
    val_checked: bool = False
    arms: list[tuple[str, str, float]] = field(default_factory=list)


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
    # Training pairs whose response alone exceeds max_length can be neither trained on nor scored: leave
    # them out of the experiment (counted in results.json) rather than let each stage treat them its own way.
    tokenizer = load_tokenizer(cfg)
    fit_ids, too_long_ids = fitting_pairs(train, tokenizer, cfg.max_length, truncation="prompt")
    if not fit_ids:
        raise ValueError(too_long_message("training pairs", train, tokenizer, cfg.max_length))
    if too_long_ids:
        logger.warning(
            "left out %d of %d training pairs whose responses exceed max_length=%d (e.g. %s)",
            len(too_long_ids),
            len(train),
            cfg.max_length,
            too_long_ids[:3],
        )
        train = train.select(fit_ids)
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
        curvatures=_score_curvatures(cfg),
        cache=prefix_cache(cfg),
        val_scoring=val_scoring,
    )
    plan.arms = [(m, "harmful", f) for m in cfg.arm_methods() for f in cfg.fractions]
    plan.arms += [(m, "helpful", f) for m in cfg.helpful_arm_methods() for f in cfg.helpful_arm_fractions()]
    return plan


def _baseline(plan: _Plan, run: _SeedRun) -> None:
    seed = run.seed
    rel = f"seed{seed}/baseline.json"
    state_path = plan.out / f"seed{seed}" / "baseline_state.pt"
    if plan.steps.get(rel) is not None and state_path.is_file():
        return
    stats, result, margins, tm = run.train_and_test(plan.train, "baseline")
    save_state(_trainable_state(run.model), state_path)
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


def _check_validation_fits(plan: _Plan, tokenizer: Any) -> None:
    """Drop (with a warning) validation pairs that do not fit max_length uncut; once per experiment."""
    if plan.val_checked:
        return
    cfg = plan.cfg
    ok, too_long = fitting_pairs(plan.val_scoring, tokenizer, cfg.max_length)
    if too_long:
        logger.warning(
            "scoring uses %d of %d validation pairs: %d do not fit max_length=%d uncut",
            len(ok),
            len(plan.val_scoring),
            len(too_long),
            cfg.max_length,
        )
        if not ok:
            whole = encode_pairs(plan.val_scoring, tokenizer, max_length=1 << 30)
            longest = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in whole)
            raise ValueError(f"no validation pair fits max_length={cfg.max_length} uncut (validation pairs "
                             f"are never cut); raise max_length (--max-length) to {longest} for all to fit")
        plan.val_scoring = plan.val_scoring.select(ok)
    plan.val_checked = True


def _scores(plan: _Plan, run: _SeedRun) -> ScoreTable | None:
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
            _check_validation_fits(plan, tok)
            _load_trainable(model, load_state(state_path))
            with _Timer() as tm:
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


def _arms(plan: _Plan, run: _SeedRun, merged: ScoreTable | None) -> None:
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
    ensemble = any(m.startswith("ensemble_") for m, _, _ in plan.arms)
    merged: dict[int, ScoreTable | None] = {}
    for seed in cfg.seeds:
        run = _SeedRun(cfg, seed, plan.out, plan.cache, plan.test, plan.clean_ids)
        _baseline(plan, run)
        merged[seed] = _scores(plan, run)
        if not ensemble:  # without ensemble arms a seed is finished here (its model is built once)
            _arms(plan, run, merged[seed])
        run.close()
    if ensemble:
        # The ensemble of the seeds' baselines needs every seed's scores before any seed prunes by it.
        tables = with_ensemble_columns(merged, plan.curvatures)
        for seed in cfg.seeds:
            run = _SeedRun(cfg, seed, plan.out, plan.cache, plan.test, plan.clean_ids)
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
