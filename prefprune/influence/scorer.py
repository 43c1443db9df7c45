"""The influence scorer: pass 1 → solve → pass 2 (→ self-influence, per-query) of one reward model.

Two passes (DESIGN §3): (1) the validation gradient ∇L_V and the curvature solve q = (H + λI)⁻¹ ∇L_V
(an `InfluenceQuery`); (2) one forward+backward per training batch whose captured (X, Δ) give, per pair and
without forming its gradient, the dots with both queries (q, ∇L_V) and the gradient norm from one fused
call (`prefprune.influence.scores`). Under torchrun every rank passes over its shard and the sums are
combined; with a work folder, pass 2 writes resumable chunks and the query is saved (`prefprune.shards`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from prefprune import distributed, shards
from prefprune._io import package_versions
from prefprune.data import PairBatches, encode_pairs, length_order
from prefprune.influence.curvature import make_curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.per_query import per_query_columns
from prefprune.influence.plan import plan_for_config
from prefprune.influence.query import InfluenceQuery, mean_gradient
from prefprune.influence.scale import curvature_scale
from prefprune.influence.scores import damping_columns, self_influence_columns, stream_scores
from prefprune.influence.settings import ScoreConfig, ScoreResult
from prefprune.ops.segment import select_segment_impl
from prefprune.precision import check_precision, precision_name, resolve_precision
from prefprune.scorefile import COLUMNS

logger = logging.getLogger(__name__)

#: `exact` over a whole training set of at least this many pairs is warned about (its cost:
#: docs/benchmarks.md).
EXACT_WHOLE_SET_WARNING = 1000

__all__ = ["InfluenceScorer"]

# Sequence classifiers of these families pool the first position, so left padding would feed a pad
# token to the head: their rewards are only defined with right padding.
_FIRST_TOKEN_POOLING = (
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet", "roberta",
    "xlm-roberta",
)


def _check_ids(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{what}: duplicate pair id {i!r}; score rows are keyed by id")
        seen.add(i)


def _encode_validation(val: Sequence, tokenizer: Any, max_length: int) -> list:
    """The validation pairs encoded uncut; a pair that does not fit is named by file and line."""
    enc = encode_pairs(val, tokenizer, max_length=max_length, truncation="prompt")
    cut = [i for i, e in enumerate(enc) if e.truncated]
    if cut:
        p = val[cut[0]]
        unit, num = p.meta.get("unit", "line"), p.meta.get("line")
        where = f"{getattr(val, 'source', '') or 'validation set'}" + (f", {unit} {num}" if num else "")
        raise ValueError(
            f"{where}: validation pair {p.id!r} is longer than max_length={max_length} tokens "
            f"({len(cut)} of {len(enc)} validation pairs are); validation pairs are never cut (a cut pair "
            "changes the validation loss): raise --max-length or remove them"
        )
    return enc


def _segment_impl_name(impl: str | None, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """Name of the implementation the dispatcher picks for `op` on activations of this device/dtype."""
    probe = torch.zeros(1, 1, dtype=dtype, device=device)
    return select_segment_impl(op, [probe, probe], impl=impl).name


class InfluenceScorer:
    """Scores training pairs against a validation set with one reward model and one `ScoreConfig`.

    Args:
        model: a LoRA reward model (trainable parameters = LoRA and head `nn.Linear`s).
        tokenizer: its tokenizer (with a pad token).
        config: settings (default `ScoreConfig()`), validated here.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: ScoreConfig | None = None):
        self.config = config = config or ScoreConfig()
        config.validate()
        self.model, self.tokenizer = model, tokenizer
        self.many = distributed.is_distributed()
        if (config.self_influence or config.per_query) and (self.many or config.resume):
            raise ValueError("self_influence and per_query run in one process and are not resumable yet; "
                             "score them without torchrun and without resume")

    def _check_model(self) -> None:
        """The layout, pad token and padding side (needs the model; after the sets are known non-empty)."""
        self.layout = ParameterLayout.of(self.model)
        self.pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
        # Our own batches: right padding unless asked otherwise (rewards do not depend on the side, and eager
        # attention turns fully masked left-padding rows into NaN: float64 exact HVPs on Llama-family models).
        side = self.config.padding_side or "right"
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if side == "left" and model_type in _FIRST_TOKEN_POOLING:
            raise ValueError(
                f"padding_side='left' with a {model_type!r} model: its classifier reads the first position, "
                "which would be padding; use padding_side='right'"
            )
        self.padding_side = side
        self.device, self.dtype = self.layout.device, self.layout.dtype

    def _prepare(self, train: Sequence, val: Sequence) -> None:
        """Checks and encoding before any heavy work: every bad input fails here."""
        config = self.config
        if len(val) == 0:
            raise ValueError("the validation set is empty; influence needs a validation gradient")
        if len(train) == 0:
            raise ValueError("the training set is empty; nothing to score")
        self._check_model()
        n_h = config.hessian_samples
        if n_h is not None and n_h > len(train) and config.curvature != "identity":
            raise ValueError(
                f"hessian_samples={config.hessian_samples} exceeds the {len(train)} training pairs"
            )
        n_curv = 0 if config.curvature == "identity" else (n_h or len(train))
        self.plan = plan_for_config(config, self.layout, n_curvature=n_curv)
        if config.curvature == "exact" and n_curv == len(train) >= EXACT_WHOLE_SET_WARNING:
            logger.warning(
                "curvature='exact' over every one of the %d training pairs: each CG iteration is a "
                "Hessian–vector pass over all of them (2–2.5 forward + backward passes), and CG takes "
                "10–15 at λ = 1 on MiniLM, about 20× one pass over the training set (docs/benchmarks.md); "
                "set --hessian-samples / score.hessian_samples (the experiment configs use 100)", n_curv)
        t0 = time.perf_counter()
        self.val_enc = _encode_validation(val, self.tokenizer, config.max_length)
        self.train_enc = encode_pairs(train, self.tokenizer, max_length=config.max_length,
                                      truncation=config.truncation)
        _check_ids([e.id for e in self.train_enc], "training set")
        self.t_encode = time.perf_counter() - t0
        self.precision = resolve_precision(config.precision, self.device, self.dtype)
        check_precision(self.precision, self.device)  # before the first batch: a clear error, not a crash
        self.seg_impl = _segment_impl_name(config.impl, self.device, self.precision, "segment_grad_dot")

    def _work_folder(self, work_dir) -> shards.WorkFolder | None:
        config = self.config
        if not (self.many or work_dir is not None):
            return None
        settings = {**asdict(config), "padding_side": self.padding_side, "dtype": str(self.dtype),
                    "resume": None, "progress": None, "precision": precision_name(self.precision)}
        digests = shards.run_digests(self.model, self.train_enc, self.val_enc, settings)
        # Before anything is written: ranks started with other inputs stop here, all of them.
        distributed.agree({**digests, "work folder": str(work_dir)})
        if work_dir is not None and not (config.self_influence or config.per_query):
            return shards.WorkFolder.open(work_dir, digests, settings, resume=config.resume)
        return None

    def _batches(self, enc: Sequence, what: str | None = None) -> PairBatches:
        if self.config.group_by_length:
            enc = [enc[i] for i in length_order(enc)]
        whole = PairBatches(enc, batch_size=self.config.batch_size, pad_token_id=self.pad_id,
                            padding_side=self.padding_side, device=self.device)
        return distributed.ShardedBatches(whole, what=what) if self.many and what else whole

    def _curvature_batches(self) -> PairBatches | None:
        """The curvature sample: every training pair, or a seeded subsample of `hessian_samples`."""
        config, enc = self.config, self.train_enc
        if config.curvature == "identity":
            return None
        if config.hessian_samples is not None and config.hessian_samples != len(enc):
            gen = torch.Generator().manual_seed(int(config.seed))
            pick = torch.randperm(len(enc), generator=gen)[: config.hessian_samples].sort().values
            enc = [enc[int(i)] for i in pick]
        return self._batches(enc, "curvature set")

    def _query(self, work, curvature) -> tuple[InfluenceQuery, bool, float]:
        """Pass 1 and the solve, or the query a previous attempt saved. Returns it, whether it was reused,
        and pass 1's seconds."""
        config = self.config
        t0 = time.perf_counter()
        query = None if work is None else InfluenceQuery.load(work, self.device)
        if query is not None:
            logger.info("reusing the saved solve of %s (inputs unchanged)", work.path)
            return query, True, time.perf_counter() - t0
        val_batches = self._batches(self.val_enc, "validation set")
        g_val, val_margins = mean_gradient(self.model, self.layout, val_batches,
                                           desc="pass 1: validation gradient", progress=config.progress)
        t_pass1 = time.perf_counter() - t0
        query = InfluenceQuery.solve(curvature, g_val, val_margins, plan=self.plan, config=config,
                                     keep_inverse=config.self_influence or config.per_query)
        if work is not None:
            query.save(work)
        return query, False, t_pass1

    def _pass2(self, query: InfluenceQuery, work) -> tuple[dict[str, np.ndarray], list[int], PairBatches]:
        """Pass 2's columns in training-set order, the pass-2 order and its batches."""
        config, enc = self.config, self.train_enc
        order = length_order(enc) if config.group_by_length else list(range(len(enc)))
        train_batches = PairBatches([enc[i] for i in order], batch_size=config.batch_size,
                                    pad_token_id=self.pad_id, padding_side=self.padding_side,
                                    device=self.device)

        def score_batches(b: PairBatches, show: bool = False) -> dict[str, np.ndarray]:
            return stream_scores(self.model, self.layout, b, query.Q, query.g_val, impl=config.impl,
                                 progress=show, precision=self.precision)

        if self.many or work is not None:  # this rank's shard, batch by batch into resumable chunks; merged
            sorted_cols = shards.sharded_pass(train_batches, order, [e.id for e in enc], score_batches,
                                              work=work, progress=config.progress)
        else:
            sorted_cols = score_batches(train_batches, config.progress)
        cols = {}
        for name, values in sorted_cols.items():  # back to the training-set order
            cols[name] = np.empty_like(values)
            cols[name][order] = values
        return cols, order, train_batches

    def score(self, train: Sequence, val: Sequence, *, work_dir=None) -> ScoreResult:
        """Score every pair of `train` against `val` (see `prefprune.score.score_pairs`)."""
        config, t_start = self.config, time.perf_counter()
        self._prepare(train, val)
        work = self._work_folder(work_dir)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            curvature = make_curvature(config.curvature, model, self.layout, self._curvature_batches(),
                                       impl=config.impl, projection_k=config.projection_k,
                                       projection_seed=config.seed, hvp_batch_size=config.hvp_batch_size)
            query, reused, t_pass1 = self._query(work, curvature)
            t0 = time.perf_counter()
            cols, order, train_batches = self._pass2(query, work)
            timings = {"encode": self.t_encode, "pass1_validation_gradient": t_pass1,
                       "solve": query.info.seconds, "pass2_scores": time.perf_counter() - t0}
            extra, per_query = self._extra_columns(curvature, query, train_batches, order, cols, timings)
            extra["curvature_scale"], timings["curvature_scale"] = self._scale(curvature, query, cols)
        finally:
            model.train(was_training)
        cols["truncated"] = np.asarray([float(e.truncated) for e in self.train_enc], dtype=np.float64)
        timings["total"] = time.perf_counter() - t_start
        metadata = self._metadata(query, cols, extra, timings, work, reused)
        return ScoreResult(ids=[e.id for e in self.train_enc], columns=cols, solve=query.info,
                           metadata=metadata, per_query=per_query)

    def _scale(self, curvature, query, cols) -> tuple[dict, float]:
        """The `curvature_scale` block (trace(H)/p, λ relative to it, Spearman with grad_dot); its warnings
        are logged here. Returns it and its seconds (an exact Hessian's trace may take one more pass)."""
        t0 = time.perf_counter()
        block = curvature_scale(curvature, query.record, cols, relative=self.config.relative_damping,
                                seed=self.config.seed, probes=self.config.trace_probes)
        for message in block["warnings"]:
            logger.warning("%s", message)
        return block, time.perf_counter() - t0

    def _extra_columns(self, curvature, query, train_batches, order, cols,
                       timings) -> tuple[dict, dict | None]:
        """One influence column per damping value, then self-influence and per-query when asked for."""
        config = self.config
        meta = damping_columns(cols, query.record)
        if config.self_influence:
            meta["self_influence"], timings["self_influence"] = self_influence_columns(
                curvature, query, train_batches, order, cols, config=config)
        per_query = None
        if config.per_query:
            per_query, meta["per_query"], timings["per_query"] = per_query_columns(
                curvature, query, train_batches, order, val_enc=self.val_enc,
                val_batches=self._batches(self.val_enc), row_ids=[e.id for e in self.train_enc],
                plan=self.plan, config=config)
        return meta, per_query

    def _metadata(self, query: InfluenceQuery, cols, extra: dict, timings: dict, work, reused: bool) -> dict:
        """The sidecar's content: settings, the solve, sizes, validation summary, timings, implementations."""
        config, info, val_m = self.config, query.info, query.val_margins.double()
        return {
            "format": "prefprune.scores/1",
            "columns": [c for c in COLUMNS if c in cols] + [c for c in cols if c not in COLUMNS],
            "sign_convention": "influence, influence@<λ>, grad_dot, grad_cos, margin: positive = helpful; "
            "train_loss, self_influence: high = suspect",
            "config": asdict(config),
            "solve": info.to_dict(),
            **extra,
            "n_train": len(self.train_enc),
            "n_train_truncated": int(sum(e.truncated for e in self.train_enc)),
            "n_val": len(self.val_enc),
            "n_params": int(query.g_val.numel()),
            "padding_side": self.padding_side,
            "validation": {
                "loss": float(F.softplus(-val_m).mean()),
                "accuracy": float((val_m > 0).double().mean()),
                "grad_norm": float(query.g_val.double().norm()),
                "query_norm": float(query.Q.double().norm()),
            },
            "timings_s": timings,
            "impl": {
                "segment_grad_dot": self.seg_impl,
                "cg": info.impl,
                **({"segment_project": _segment_impl_name(config.impl, self.device, self.dtype,
                                                          "segment_project")}
                   if config.curvature == "projected_ggn" else {}),
            },
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": precision_name(self.precision),
            "distributed": {"world_size": distributed.world_size(),
                            "backend": dist.get_backend() if self.many else None},
            "resume": None if work is None else {
                "solve_reused": reused, "chunks_reused": work.chunks_reused,
                "chunks_computed": work.chunks_written},
            "versions": package_versions(),
            "model": getattr(self.model, "prefprune_info", None),
        }
