"""Streaming influence and gradient-similarity scores of every training pair, written to a score file.

Two passes (DESIGN §3): (1) the validation gradient ∇L_V and the curvature solve
q = (H + λI)⁻¹ ∇L_V; (2) one forward+backward per training batch whose captured (X, Δ) give, per
pair and without forming its gradient, the dots with both queries (q, ∇L_V) and the gradient norm
from one fused call. Columns (positive = helpful for all but train_loss, DESIGN §2):

- ``influence`` = qᵀ∇ℓ_i,
- ``grad_dot`` = ∇L_Vᵀ∇ℓ_i, ``grad_cos`` = its cosine (0 for a zero gradient),
- ``train_loss`` = softplus(−m_i), ``margin`` = m_i, ``truncated`` = 1 when the prompt was cut.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune import distributed, shards
from prefprune._io import package_versions
from prefprune.curvature import CURVATURES, Curvature, SolveInfo, mean_gradient
from prefprune.data import PairBatches, encode_pairs, length_order, load_preferences, pairs_digest
from prefprune.data.config import absolute_source
from prefprune.grads import stream_pair_dots
from prefprune.model import load_reward_model, trainable_linears
from prefprune.ops.dispatch import Impl, requested_impl
from prefprune.ops.segment import select_segment_impl
from prefprune.precision import PRECISIONS, Precision, check_precision, precision_name, resolve_precision
from prefprune.scorefile import COLUMNS, OUTPUT_EXTENSIONS, check_output_path, write_scores
from prefprune.solve import SOLVERS, CurvatureSolve, Solver, check_dampings
from prefprune.solve_stage import extra_columns, plan_for_config, solve_stage

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "OUTPUT_EXTENSIONS",
    "ScoreConfig",
    "ScoreResult",
    "check_output_path",
    "score_model",
    "score_pairs",
    "stream_scores",
    "write_scores",
]

# Sequence classifiers of these families pool the first position, so left padding would feed a pad
# token to the head: their rewards are only defined with right padding.
_FIRST_TOKEN_POOLING = (
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet", "roberta",
    "xlm-roberta",
)


@dataclass
class ScoreConfig:
    """Settings of a scoring run (all recorded in the sidecar)."""

    curvature: Curvature = field(
        default="ggn",
        metadata={"help": "Hessian used by influence: exact (double-backward HVPs, the paper's method), ggn "
                          "(Gauss–Newton, PSD, no double backward), projected_ggn (Gauss–Newton in a "
                          "random Kronecker projection space, solved natively) or identity "
                          "(influence = grad_dot)."},
    )
    damping: float | list[float] = field(
        default=1.0,
        metadata={"help": "λ added to the Hessian, or a list of values (a sweep: one influence column per "
                          "value, influence@<λ>, from one run; `influence` is the first value's). Not a "
                          "detail: on a tiny LoRA model λ=1 tracked leave-one-out retraining far better than "
                          "0.1 or 0.01 (DESIGN §2). Must be > 0 for exact; no duplicates."},
    )
    damping_relative: bool = field(
        default=False,
        metadata={"help": "Read the damping values as factors of the curvature's mean eigenvalue trace(H)/p "
                          "(Kronfluence's convention; the Gauss–Newton trace, also for exact); the sidecar "
                          "records both the factor and the absolute λ."},
    )
    solver: Solver = field(
        default="auto",
        metadata={"help": "auto: direct for ggn/projected_ggn when the factors fit memory_budget_mb (one "
                          "pass over the curvature sample, one eigendecomposition of the n_h×n_h Gram), else "
                          "CG; exact by CG, or multi-shift CG for a damping list. direct, cg or multishift "
                          "force one."},
    )
    memory_budget_mb: float = field(
        default=2048.0,
        metadata={"help": "Memory (MiB) the direct solve's factors may take: the curvature sample's gradient "
                          "rows and the Gram (ggn: n_h·p rows; projected_ggn: projected rows)."},
    )
    self_influence: bool = field(
        default=False,
        metadata={"help": "Add the self_influence column ∇ℓ_iᵀ(H + λI)⁻¹∇ℓ_i (high = suspect, the "
                          "standard mislabel detector): exact in weight space for ggn direct and for exact "
                          "when the p×p Hessian fits the budget, else in the projected space; one extra pass "
                          "over the training pairs."},
    )
    per_query: bool = field(
        default=False,
        metadata={"help": "Also write the n_train × n_val influence matrix (every validation pair its own "
                          "query, one multi-RHS solve per tile) to <output>.per_query.safetensors with the "
                          "row and column ids."},
    )
    per_query_tile: int = field(
        default=64,
        metadata={"help": "Validation queries solved and scored per pass over the training pairs (memory "
                          "≈ p × tile × damping values)."},
    )
    tol: float = field(default=1e-6, metadata={"help": "CG stops when ||r|| <= tol·||∇L_V||."})
    max_iter: int = field(default=100, metadata={"help": "CG iteration cap (operator products)."})
    hessian_samples: int | None = field(
        default=None,
        metadata={"help": "Curvature set size: a seeded uniform subsample of the training pairs "
                          "(None: every training pair)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the hessian_samples subsample and of the projections."}
    )
    projection_k: int = field(
        default=16,
        metadata={"help": "projected_ggn: per-layer projection size of each side (k_out = k_in = k; a side "
                          "at most k wide is kept exact). The projected space has Σ_layers k_out·k_in dims."},
    )
    batch_size: int = field(default=16, metadata={"help": "Pairs per forward/backward batch."})
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch pairs of similar length together (less padding); rows keep the input "
                          "order."},
    )
    max_length: int = field(default=512, metadata={"help": "Longest sequence in tokens."})
    truncation: Literal["prompt", "error"] = field(
        default="prompt",
        metadata={"help": "Training pairs longer than max_length: 'prompt' (cut the prompt) or 'error'. "
                          "Validation pairs are never cut: a too-long one is an error."},
    )
    padding_side: Literal["right", "left"] | None = field(
        default=None, metadata={"help": "'right' or 'left' padding of the scoring batches; None: right "
                                        "(whatever the tokenizer's side; rewards do not depend on it)."}
    )
    on_nonpositive: Literal["raise", "nan"] = field(
        default="raise",
        metadata={"help": "When CG meets non-positive curvature: 'raise' an error, or 'nan' (influence "
                          "column NaN, status recorded in the sidecar)."},
    )
    impl: Impl | None = field(
        default=None,
        metadata={"help": "auto|triton|native|reference for the fused ops and CG (None: PREFPRUNE_IMPL)."},
    )
    precision: Precision | None = field(
        default=None,
        metadata={"help": "Precision of pass 2's forward and captured (X, Δ): fp32, bf16 or fp16; every "
                          "reduction accumulates in fp32. None: the model's dtype on CUDA, fp32 on CPU "
                          "(float64 models stay float64). Pass 1 and the solve run in the model's dtype."},
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted run from OUTPUT.shards/ (any rank killed at any moment): "
                          "finished batches and the saved solve are reused when the model weights, data and "
                          "settings are unchanged (the number of ranks may differ); a changed input is "
                          "refused and named. Without it, an existing OUTPUT.shards/ is an error."},
    )

    def validate(self) -> None:
        """Raise ValueError on an invalid setting (before any heavy work)."""
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        self.dampings()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not (isinstance(self.memory_budget_mb, int | float) and math.isfinite(self.memory_budget_mb)
                and self.memory_budget_mb > 0):
            raise ValueError(f"memory_budget_mb must be a finite number > 0, got {self.memory_budget_mb!r}")
        if int(self.per_query_tile) != self.per_query_tile or self.per_query_tile < 1:
            raise ValueError(f"per_query_tile must be an integer >= 1, got {self.per_query_tile!r}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be finite and >= 0, got {self.tol!r}")
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.hessian_samples is not None and (
            int(self.hessian_samples) != self.hessian_samples or self.hessian_samples < 1
        ):
            raise ValueError(f"hessian_samples must be None or an integer >= 1, got {self.hessian_samples!r}")
        if int(self.projection_k) != self.projection_k or self.projection_k < 1:
            raise ValueError(f"projection_k must be an integer >= 1, got {self.projection_k!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if int(self.max_length) != self.max_length or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if self.truncation not in ("prompt", "error"):
            raise ValueError(f"truncation must be 'prompt' or 'error', got {self.truncation!r}")
        if self.padding_side not in (None, "right", "left"):
            raise ValueError(f"padding_side must be None, 'right' or 'left', got {self.padding_side!r}")
        if self.on_nonpositive not in ("raise", "nan"):
            raise ValueError(f"on_nonpositive must be 'raise' or 'nan', got {self.on_nonpositive!r}")
        if self.impl is not None:
            requested_impl(self.impl)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {self.precision!r}")

    def dampings(self) -> list[float]:
        """The damping values as a list (one value or the sweep), checked: numbers, finite, >= 0, distinct."""
        values = self.damping if isinstance(self.damping, list | tuple) else [self.damping]
        return check_dampings(values, curvature=self.curvature, relative=self.damping_relative)


@dataclass
class ScoreResult:
    """Scores of every training pair, in training-set order.

    Attributes:
        ids: (n,) pair ids.
        columns: name → (n,) float64 array: `COLUMNS`, then influence@<λ> per damping value of a sweep
            and self_influence (self_influence@<λ>) when asked for.
        solve: how the influence query of the first damping value was solved.
        metadata: settings, versions, timings, implementations (the sidecar's content).
        per_query: with per_query: {"matrix": (n_train, n_val, L), "row_ids", "col_ids", "column_names",
            "dampings"} (written to `<output>.per_query.safetensors`).
    """

    ids: list[str]
    columns: dict[str, np.ndarray]
    solve: SolveInfo
    metadata: dict[str, Any]
    per_query: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write the score file (format by extension), its `<path>.json` sidecar and any per-query matrix
        as one unit (`prefprune.scorefile.write_scores`)."""
        write_scores(self, path)


# ---------------------------------------------------------------------------------------------
# Checks that run before any heavy work
# ---------------------------------------------------------------------------------------------


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


def _segment_impl_name(
    impl: str | None, device: torch.device, dtype: torch.dtype, op: str = "segment_grad_dot_grouped"
) -> str:
    """Name of the implementation the dispatcher picks for `op` on activations of this device/dtype."""
    probe = torch.zeros(1, 1, dtype=dtype, device=device)
    return select_segment_impl(op, [probe, probe], impl=impl).name


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    train: Sequence,
    val: Sequence,
    *,
    config: ScoreConfig | None = None,
    work_dir: str | os.PathLike | None = None,
) -> ScoreResult:
    """Score every training pair against the validation set.

    Under an initialised process group (e.g. `torchrun`), every rank calls this with the same inputs:
    each passes over a contiguous, length-balanced shard of every set, the validation gradient and the
    curvature products (or Gram rows) are combined over ranks so every rank solves the same system, and
    every rank returns the merged result (`prefprune.distributed`).

    Args:
        model: a LoRA reward model (trainable parameters = LoRA and head `nn.Linear`s).
        tokenizer: its tokenizer (with a pad token).
        train: training `PreferencePair`s (a `PreferenceDataset` or any sequence).
        val: validation pairs (must fit `max_length` uncut).
        config: settings (default `ScoreConfig()`).
        work_dir: folder of resumable score shards and the saved solve (`prefprune.shards`); with
            ``config.resume`` an interrupted run continues from it.

    Returns:
        `ScoreResult`, rows in training order.

    Raises:
        ValueError: empty training or validation set, duplicate training ids, a validation pair
            longer than max_length, a model without trainable parameters, invalid settings.
        prefprune.curvature.NonPositiveCurvatureError: CG met non-positive curvature (on_nonpositive="raise").
    """
    config = config or ScoreConfig()
    config.validate()
    t_start = time.perf_counter()
    many = distributed.is_distributed()
    if (config.self_influence or config.per_query) and (many or config.resume):
        raise ValueError("self_influence and per_query run in one process and are not resumable yet; "
                         "score them without torchrun and without resume")
    if len(val) == 0:
        raise ValueError("the validation set is empty; influence needs a validation gradient")
    if len(train) == 0:
        raise ValueError("the training set is empty; nothing to score")
    sites = trainable_linears(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
    # Our own batches: right padding unless asked otherwise (rewards do not depend on the side, and eager
    # attention turns fully masked left-padding rows into NaN: float64 exact HVPs on Llama-family models).
    padding_side = config.padding_side or "right"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if padding_side == "left" and model_type in _FIRST_TOKEN_POOLING:
        raise ValueError(
            f"padding_side='left' with a {model_type!r} model: its classifier reads the first position, "
            "which would be padding; use padding_side='right'"
        )
    n_h = config.hessian_samples
    if n_h is not None and n_h > len(train) and config.curvature != "identity":
        raise ValueError(
            f"hessian_samples={config.hessian_samples} exceeds the {len(train)} training pairs"
        )
    n_curv = 0 if config.curvature == "identity" else (n_h or len(train))
    plan = plan_for_config(config, sites, n_curvature=n_curv, dtype=sites[0].module.weight.dtype)

    t0 = time.perf_counter()
    val_enc = _encode_validation(val, tokenizer, config.max_length)
    train_enc = encode_pairs(train, tokenizer, max_length=config.max_length, truncation=config.truncation)
    _check_ids([e.id for e in train_enc], "training set")
    t_encode = time.perf_counter() - t0

    first = next(iter(model.parameters()))
    device, dtype = first.device, sites[0].module.weight.dtype
    precision = resolve_precision(config.precision, device, dtype)
    check_precision(precision, device)  # before the first batch: a clear error, not a crash mid-run
    seg_impl = _segment_impl_name(config.impl, device, precision)
    work = None
    if many or work_dir is not None:
        settings = {**asdict(config), "padding_side": padding_side, "dtype": str(dtype), "resume": None,
                    "progress": None, "precision": precision_name(precision)}
        digests = shards.run_digests(model, train_enc, val_enc, settings)
        # Before anything is written: ranks started with other inputs stop here, all of them.
        distributed.agree({**digests, "work folder": str(work_dir)})
        if work_dir is not None and not (config.self_influence or config.per_query):
            work = shards.WorkFolder.open(work_dir, digests, settings, resume=config.resume)

    def batches(enc: Sequence, what: str | None = None) -> PairBatches:
        if config.group_by_length:
            enc = [enc[i] for i in length_order(enc)]
        whole = PairBatches(enc, batch_size=config.batch_size, pad_token_id=pad_id, padding_side=padding_side,
                            device=device)
        return distributed.ShardedBatches(whole, what=what) if many and what else whole

    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        saved = None if work is None else work.load_solve()
        if saved is None:
            g_val, val_margins = mean_gradient(model, sites, batches(val_enc, "validation set"),
                                               desc="pass 1: validation gradient", progress=config.progress)
        t_pass1 = time.perf_counter() - t0

        if config.curvature == "identity":
            curv_enc = None
        elif config.hessian_samples is None or config.hessian_samples == len(train_enc):
            curv_enc = train_enc
        else:
            gen = torch.Generator().manual_seed(int(config.seed))
            pick = torch.randperm(len(train_enc), generator=gen)[: config.hessian_samples].sort().values
            curv_enc = [train_enc[int(i)] for i in pick]
        curv_batches = None if curv_enc is None else batches(curv_enc, "curvature set")
        if saved is None:
            q, info, sweep, factors = solve_stage(model, sites, g_val, curv_batches, config=config, plan=plan,
                                                  keep_factors=config.self_influence or config.per_query)
            if work is not None:
                work.save_solve({"q": q, "g_val": g_val, "val_margins": val_margins},
                                {"info": info.to_dict(), "sweep": asdict(sweep)})
        else:
            q, g_val, val_margins = (saved[0][k].to(device) for k in ("q", "g_val", "val_margins"))
            info, sweep, factors = SolveInfo(**saved[1]["info"]), CurvatureSolve(**saved[1]["sweep"]), {}
            logger.info("reusing the saved solve of %s (inputs unchanged)", work.path)

        t0 = time.perf_counter()
        order = length_order(train_enc) if config.group_by_length else list(range(len(train_enc)))
        train_batches = PairBatches([train_enc[i] for i in order], batch_size=config.batch_size,
                                    pad_token_id=pad_id, padding_side=padding_side, device=device)

        def score_batches(b: PairBatches, show: bool = False) -> dict[str, np.ndarray]:
            return stream_scores(model, sites, b, q, g_val, impl=config.impl, progress=show,
                                 precision=precision)

        if many or work is not None:  # this rank's shard, batch by batch into resumable chunks; merged
            sorted_cols = shards.sharded_pass(train_batches, order, [e.id for e in train_enc], score_batches,
                                              work=work, progress=config.progress)
        else:
            sorted_cols = score_batches(train_batches, config.progress)
        cols = {}
        for name, values in sorted_cols.items():  # back to the training-set order
            cols[name] = np.empty_like(values)
            cols[name][order] = values
        t_pass2 = time.perf_counter() - t0
        extra = extra_columns(model, sites, train_batches, order, val_enc=val_enc,
                              val_batches=batches(val_enc), curv_batches=curv_batches, config=config,
                              plan=plan, sweep=sweep, factors=factors, cols=cols,
                              row_ids=[e.id for e in train_enc])
    finally:
        model.train(was_training)
    cols["truncated"] = np.asarray([float(e.truncated) for e in train_enc], dtype=np.float64)

    val_m = val_margins.double()
    metadata = {
        "format": "prefprune.scores/1",
        "columns": [c for c in COLUMNS if c in cols] + [c for c in cols if c not in COLUMNS],
        "sign_convention": "influence, influence@<λ>, grad_dot, grad_cos, margin: positive = helpful; "
        "train_loss, self_influence: high = suspect",
        "config": asdict(config),
        "solve": info.to_dict(),
        **extra["metadata"],
        "n_train": len(train_enc),
        "n_train_truncated": int(sum(e.truncated for e in train_enc)),
        "n_val": len(val_enc),
        "n_params": int(g_val.numel()),
        "padding_side": padding_side,
        "validation": {
            "loss": float(F.softplus(-val_m).mean()),
            "accuracy": float((val_m > 0).double().mean()),
            "grad_norm": float(g_val.double().norm()),
            "query_norm": float(q.double().norm()),
        },
        "timings_s": {
            "encode": t_encode,
            "pass1_validation_gradient": t_pass1,
            "solve": info.seconds,
            "pass2_scores": t_pass2,
            **extra["timings"],
            "total": time.perf_counter() - t_start,
        },
        "impl": {
            "segment_grad_dot": seg_impl,
            "cg": info.impl,
            **({"segment_project": _segment_impl_name(config.impl, device, dtype, "segment_project")}
               if config.curvature == "projected_ggn" else {}),
        },
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "precision": precision_name(precision),
        "distributed": {"world_size": distributed.world_size(),
                        "backend": dist.get_backend() if many else None},
        "resume": None if work is None else {
            "solve_reused": saved is not None, "chunks_reused": work.chunks_reused,
            "chunks_computed": work.chunks_written},
        "versions": package_versions(),
        "model": getattr(model, "prefprune_info", None),
    }
    return ScoreResult(ids=[e.id for e in train_enc], columns=cols, solve=info, metadata=metadata,
                       per_query=extra["per_query"])


def stream_scores(
    model: nn.Module,
    sites: Sequence,
    batches: PairBatches,
    q: Tensor,
    g_val: Tensor,
    *,
    impl: str | None,
    progress: bool,
    precision: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Pass 2: per-pair influence, grad_dot, grad_cos, train_loss and margin, batch by batch.

    One forward + backward of Σ_i ℓ_i per batch; each layer's (X, Δ) is reduced against both queries
    by one fused call as soon as its Δ exists (`prefprune.grads.stream_pair_dots`), so neither a
    per-pair gradient nor a second layer's capture is ever held.

    Args:
        sites: `trainable_linears(model)`.
        batches: the training pairs.
        q: (p,) influence query (H + λI)⁻¹ ∇L_V, or (p, L) one per damping value (then influence is
            (n, L)); g_val: (p,) ∇L_V.
        precision: dtype of the forward and the capture (None: the model's); accumulation is fp32.

    Returns:
        name → (n,) float64 arrays: influence, grad_dot, grad_cos, train_loss, margin.
    """
    qs = list(q.reshape(q.shape[0], -1).unbind(1))  # one influence query per damping value
    dots, sqnorm, margin = stream_pair_dots(model, sites, batches, [*qs, g_val], dtype=precision, impl=impl,
                                            progress=progress)
    n_q = len(qs)
    influence = dots[:, 0] if q.dim() == 1 else dots[:, :n_q]
    return {"influence": influence.numpy(), **similarity_columns(dots[:, n_q], sqnorm, g_val),
            **margin_columns(margin)}


def similarity_columns(grad_dot: Tensor, sqnorm: Tensor, g_val: Tensor) -> dict[str, np.ndarray]:
    """grad_dot and grad_cos (0 for a zero gradient) from the dots with ∇L_V and the squared norms."""
    denom = sqnorm.clamp(min=0).sqrt() * float(g_val.double().norm())
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    grad_cos = torch.where(denom > 0, grad_dot / safe, torch.zeros_like(denom))
    return {"grad_dot": grad_dot.numpy(), "grad_cos": grad_cos.numpy()}


def margin_columns(margin: Tensor) -> dict[str, np.ndarray]:
    """train_loss = softplus(−m) and margin."""
    return {"train_loss": F.softplus(-margin).numpy(), "margin": margin.numpy()}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def score_model(
    model_dir: str | os.PathLike,
    train: str | os.PathLike | Sequence,
    val: str | os.PathLike | Sequence,
    output: str | os.PathLike,
    *,
    config: ScoreConfig | None = None,
    schema: str = "auto",
    train_split: str = "train",
    val_split: str = "train",
    max_pairs: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Load a saved reward model and the data, score, and write `output` plus its sidecar.

    Args:
        model_dir: folder written by `prefprune.model.save_reward_model` / `prefprune train`.
        train: training data source (file, folder, hub id) or pairs.
        val: validation data source or pairs.
        output: score file (.parquet, .jsonl or .csv); the sidecar is `<output>.json`.
        config: scoring settings.
        schema: data schema for `load_preferences` ("auto" detects it).
        train_split, val_split: dataset splits to read from each source.
        max_pairs: read at most this many training pairs.
        device: where to run (default CPU).
        overwrite: replace an existing `output` that is not a prefprune score file (an earlier score
            file with its sidecar is always replaced).

    Returns:
        The `ScoreResult` that was written.
    """
    config = config or ScoreConfig()
    config.validate()
    inputs = {k: v for k, v in {"--train": train, "--val": val, "--model": model_dir}.items()
              if isinstance(v, str | os.PathLike)}
    out = check_output_path(output, overwrite=overwrite, inputs=inputs)
    if not Path(model_dir).is_dir():
        raise ValueError(f"model folder {str(model_dir)!r} does not exist")
    train_src = str(train) if isinstance(train, str | os.PathLike) else "<pairs>"
    val_src = str(val) if isinstance(val, str | os.PathLike) else "<pairs>"
    # Under torchrun this joins the process group (gloo on CPU, NCCL with cuda:LOCAL_RANK per rank). One
    # run per output: from here until the file is committed, rank 0 holds the lock of OUTPUT.shards/, so
    # a second run into the same output stops at once (naming this one's pid) instead of mixing chunks.
    with distributed.launched_group(device) as device, shards.locked_work_dir(out) as work:
        if isinstance(train, str | os.PathLike):
            train = load_preferences(train, schema=schema, split=train_split, max_pairs=max_pairs)
        if isinstance(val, str | os.PathLike):
            val = load_preferences(val, schema=schema, split=val_split)
        if len(val) == 0:
            raise ValueError(f"the validation set {val_src!r} is empty")
        model, tokenizer = load_reward_model(model_dir, device=device)
        if tokenizer is None:
            raise ValueError(f"model folder {str(model_dir)!r} has no tokenizer")
        result = score_pairs(model, tokenizer, train, val, config=config, work_dir=work)
        result.metadata["sources"] = {
            "model": absolute_source(model_dir), "train": absolute_source(train_src),
            "val": absolute_source(val_src),
            "schema": schema, "train_split": train_split, "val_split": val_split, "max_pairs": max_pairs,
            "train_digest": pairs_digest(train), "val_digest": pairs_digest(val),
        }
        failure = None
        if distributed.rank() == 0:  # every rank holds the merged rows; one writes them
            try:
                write_scores(result, out, overwrite=overwrite, inputs=inputs)
            except Exception as err:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                failure = err
        told = distributed.broadcast_object(None if failure is None else f"{type(failure).__name__}: "
                                                                          f"{failure}")
        if failure is not None:
            raise failure
        if told is not None:
            raise RuntimeError(f"rank 0 could not write {str(out)!r}: {told}")
        shutil.rmtree(work, ignore_errors=True)  # the merged file is written: the shards are done
    return result


def config_fields_help() -> dict[str, str]:
    """Field name → help text of `ScoreConfig` (for the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in fields(ScoreConfig)}
