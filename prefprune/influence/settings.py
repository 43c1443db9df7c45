"""The settings of a scoring run (`ScoreConfig`) and what it returns (`ScoreResult`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from prefprune.influence.curvature import CURVATURES, CurvatureName, hvp_chunk_size
from prefprune.influence.plan import SOLVERS, Solver, check_dampings
from prefprune.influence.query import SolveInfo
from prefprune.ops.dispatch import Impl, requested_impl
from prefprune.precision import PRECISIONS, Precision
from prefprune.scorefile import write_scores

__all__ = ["DEFAULT_DAMPING_FACTOR", "ScoreConfig", "ScoreResult"]

#: The damping when none is given: this factor × trace(H)/p (see ScoreConfig.damping's help).
DEFAULT_DAMPING_FACTOR = 0.1


@dataclass
class ScoreConfig:
    """Settings of a scoring run (all recorded in the sidecar)."""

    curvature: CurvatureName = field(
        default="ggn",
        metadata={"help": "Hessian used by influence: exact (double-backward HVPs, the paper's method), ggn "
                          "(Gauss–Newton, PSD, no double backward), projected_ggn (Gauss–Newton in a "
                          "random Kronecker projection space, solved natively) or identity "
                          "(influence = grad_dot)."},
    )
    damping: float | list[float] | None = field(
        default=None,
        metadata={"help": "λ added to the Hessian, or a list of values (a sweep: one influence column per "
                          "value, influence@<λ>, from one run; `influence` is the first value's). Absolute "
                          "unless --damping-relative. None (the default): DEFAULT_DAMPING_FACTOR = "
                          f"{DEFAULT_DAMPING_FACTOR:g} × the curvature's mean eigenvalue trace(H)/p "
                          "(Kronfluence's heuristic). Why: trace(H)/p was 1.3e-6 to 1.6e-2 on the models "
                          "measured, and the old absolute λ = 1 turned influence into grad_dot on every "
                          "MiniLM one (Spearman >= 0.9996), while 0.1 × trace(H)/p tracked leave-one-out "
                          "best at an optimum (docs/validation.md's damping table). No value suits every "
                          "model: choose it with `prefprune validate`. Must be > 0 for exact; no "
                          "duplicates."},
    )
    damping_relative: bool = field(
        default=False,
        metadata={"help": "Read the given damping values as factors of the curvature's mean eigenvalue "
                          "trace(H)/p (Kronfluence's convention; the Gauss–Newton trace, also for exact; "
                          "always so for the default damping); the sidecar records the factor, the absolute "
                          "λ and the curvature_scale block."},
    )
    solver: Solver = field(
        default="auto",
        metadata={"help": "auto: direct for ggn/projected_ggn when the factors fit memory_budget_mb (one "
                          "pass over the curvature sample, one eigendecomposition of the n_h×n_h Gram), else "
                          "CG; exact by pcg (CG preconditioned by the Gauss–Newton inverse from those "
                          "same factors, every damping value a column of one batched HVP pass) when they "
                          "fit, else CG, or multi-shift CG for a damping list. direct, pcg, cg or "
                          "multishift force one."},
    )
    memory_budget_mb: float = field(
        default=2048.0,
        metadata={"help": "Memory (MiB) the direct solve's factors (or pcg's preconditioner) may take: the "
                          "curvature sample's gradient rows and the Gram (ggn, exact: n_h·p rows; "
                          "projected_ggn: projected rows)."},
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
    hvp_batch_size: int | None = field(
        default=None,
        metadata={"help": "exact: pairs per double-backward chunk of a Hessian–vector product (each batch "
                          "is split into chunks and H·v summed over them: the same product in less memory, "
                          "since one pair's product holds about 3–4× a forward+backward's activations). "
                          "None: batch_size // 4 (at least 1), which keeps the product's peak near one "
                          "forward+backward of a batch. The chunk used is recorded in the sidecar "
                          "(solve.hvp_batch_size)."},
    )
    trace_probes: int = field(
        default=0,
        metadata={"help": "exact: Rademacher probes of a Hutchinson estimate of the exact Hessian's own "
                          "trace(H)/p, recorded in the sidecar's curvature_scale with its standard error "
                          "(one more pass of that many Hessian–vector products: about as many CG iterations' "
                          "cost). 0: record the Gauss–Newton part's trace/p instead (what relative damping "
                          "multiplies; free with pcg's factors, else one first-order pass)."},
    )
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
        hvp_chunk_size(self.batch_size, self.hvp_batch_size)  # raises on a bad hvp_batch_size
        if isinstance(self.trace_probes, bool) or int(self.trace_probes) != self.trace_probes \
                or self.trace_probes < 0:
            raise ValueError(f"trace_probes must be an integer >= 0, got {self.trace_probes!r}")
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

    @property
    def relative_damping(self) -> bool:
        """Whether `dampings()` are factors of trace(H)/p: asked for, or the default damping (None)."""
        return bool(self.damping_relative) or self.damping is None

    def dampings(self) -> list[float]:
        """The damping values as a list (one value or the sweep; None: [DEFAULT_DAMPING_FACTOR], a factor),
        checked: numbers, finite, >= 0, distinct."""
        if self.damping is None:
            values = [DEFAULT_DAMPING_FACTOR]
        else:
            values = self.damping if isinstance(self.damping, list | tuple) else [self.damping]
        return check_dampings(values, curvature=self.curvature, relative=self.relative_damping)


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

    @property
    def curvature_scale(self) -> dict[str, Any] | None:
        """The run's ``curvature_scale`` block (`prefprune.influence.scale.curvature_scale`): trace(H)/p, the
        top eigenvalue where the direct solve has it, each damping value relative to them, Spearman of every
        influence column with grad_dot and the warnings; None for results made without one."""
        return self.metadata.get("curvature_scale")

    def save(self, path: str | os.PathLike) -> None:
        """Write the score file (format by extension), its `<path>.json` sidecar and any per-query matrix
        as one unit (`prefprune.scorefile.write_scores`)."""
        write_scores(self, path)
