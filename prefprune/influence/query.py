"""The influence query: the validation gradient and its solved queries, the one object from the solve onward.

`InfluenceQuery.solve` takes pass 1's validation gradient ∇L_V, solves q_l = (H + λ_l I)⁻¹ ∇L_V for every
damping value (`prefprune.influence.solvers.solve`), turns a damping that means nothing in the working
precision and a non-finite solve into errors and non-positive curvature into an error or NaN columns, and
keeps the direct inverse when self-influence or per-query influence will need it. Scoring, resume
(`save`/`load` through the work folder) and the sidecar (`info`, `record`) read the same object.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune.data import PairBatches
from prefprune.distributed import cat_over_ranks, sum_over_ranks
from prefprune.influence.capture import pair_margins
from prefprune.influence.curvature import Curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.plan import CurvatureSolve, SolvePlan
from prefprune.influence.solvers import DirectFactors, solve

logger = logging.getLogger(__name__)

__all__ = [
    "InfluenceQuery",
    "NonPositiveCurvatureError",
    "SolveInfo",
    "mean_gradient",
    "refuse_meaningless_damping",
    "refuse_nonfinite",
]


class NonPositiveCurvatureError(RuntimeError):
    """CG met pᵀ(H + λI)p <= 0: the damped Hessian is not positive definite along p."""


def _check_finite_batches(flags: Tensor, names: list[str], batches: PairBatches, desc: str) -> None:
    """FloatingPointError naming the first batch's pairs and the layer whose gradient was not finite."""
    if not bool(flags.any()):
        return
    b, j = (int(v) for v in torch.nonzero(flags)[0])
    ids = [e.id for e in batches.encoded[b * batches.batch_size : (b + 1) * batches.batch_size]]
    raise FloatingPointError(
        f"{desc}: non-finite gradient in layer {names[j]!r} for the batch of pairs {ids[:8]}"
        f"{' ...' if len(ids) > 8 else ''}; no scores are written. Eager attention in float64 with "
        "padding_side='left' gives NaN on fully padded rows: use padding_side='right' (or sdpa attention)"
    )


def mean_gradient(
    model: nn.Module, layout: ParameterLayout, batches: PairBatches, *, desc: str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """∇ mean_i softplus(−m_i) over all pairs of `batches` (e.g. ∇L_V), in the flat layout.

    Returns:
        (p,) mean gradient and (n,) margins.
    """
    if batches.n_pairs == 0:
        raise ValueError("cannot take the mean gradient of an empty set of pairs")
    total: Tensor | None = None
    margins, flags = [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        with torch.enable_grad():
            m = pair_margins(model, batch)
            grads = torch.autograd.grad(F.softplus(-m).sum(), layout.params, allow_unused=True)
        # Per parameter: a non-finite gradient in this batch? Read once at the end (no sync per batch).
        none = torch.zeros((), dtype=torch.bool, device=m.device)
        flags.append(torch.stack([none if g is None else ~torch.isfinite(g).all() for g in grads]))
        flat = layout.flatten_grads(grads)
        total = flat if total is None else total + flat
        margins.append(m.detach())
    # A sharded set (one shard per rank): the sum and the margins over every rank's pairs.
    mean = sum_over_ranks(batches, total) / batches.n_pairs
    all_margins = cat_over_ranks(batches, torch.cat(margins))
    # After the collectives, so that every rank stops (a NaN of one rank's pairs reaches every sum).
    names = [s.name for s in layout.sites for _ in s.parameters()]
    _check_finite_batches(torch.stack(flags).cpu(), names, batches, desc or "gradient pass")
    if not bool(torch.isfinite(mean).all()):
        raise FloatingPointError(f"{desc or 'gradient pass'}: non-finite mean gradient (from another rank's "
                                 "pairs); no scores are written")
    return mean, all_margins


@dataclass
class SolveInfo:
    """How the query q = (H + λI)⁻¹ ∇L_V of the first damping value (the ``influence`` column) was obtained.

    Attributes:
        curvature: "exact", "ggn", "projected_ggn" or "identity".
        damping: λ (in the projected space for projected_ggn).
        status: "converged", "max_iter", "nonpositive_curvature" or "not_solved" (identity).
        iterations: operator products used.
        residual: final relative residual ||b − A q|| / ||b|| as CG tracked it.
        nonpositive_value: pᵀAp that stopped CG on non-positive curvature (None otherwise).
        nonpositive_iteration: the iteration at which that happened (None otherwise).
        n_curvature: pairs in the curvature set.
        tol: CG tolerance.
        max_iter: CG iteration cap.
        impl: the implementation that ran ("native", "reference", "multishift", "eigh"; "none" for identity).
        seconds: wall time of the solve.
        projection_dim: size of the projected space (projected_ggn only).
        method: "cg", "pcg", "direct", "multishift" or "none" (see `prefprune.influence.plan.plan_solve`).
        curvature_passes: forward+backward passes over the curvature sample (direct ggn: 1).
        damping_factor: the factor given with relative damping (None for absolute damping).
        damping_scale: trace(H)/d that relative damping multiplies (None when not computed).
        preconditioner: "gauss_newton_woodbury" (method pcg) or None.
        hvp_batch_size: exact: the pairs per double-backward chunk its products used (None otherwise).
    """

    curvature: str
    damping: float
    status: str
    iterations: int
    residual: float
    nonpositive_value: float | None
    nonpositive_iteration: int | None
    n_curvature: int
    tol: float
    max_iter: int
    impl: str
    seconds: float
    projection_dim: int | None = None
    method: str = "cg"
    curvature_passes: int = 0
    damping_factor: float | None = None
    damping_scale: float | None = None
    preconditioner: str | None = None
    hvp_batch_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, rec: CurvatureSolve, plan: SolvePlan, *, tol: float, max_iter: int) -> SolveInfo:
        """The first damping value's summary of a solve record."""
        first = rec.columns[0]
        return cls(
            curvature=plan.curvature, damping=float(rec.dampings[0]), status=first["status"],
            iterations=int(first["iterations"]), residual=float(first["residual"]),
            nonpositive_value=first["nonpositive_value"],
            nonpositive_iteration=first["nonpositive_iteration"],
            n_curvature=plan.n_curvature, tol=float(tol), max_iter=int(max_iter), impl=rec.impl,
            seconds=rec.seconds, projection_dim=rec.projection_dim, method=plan.method,
            curvature_passes=rec.curvature_passes,
            damping_factor=None if rec.damping_factors is None else rec.damping_factors[0],
            damping_scale=rec.damping_scale, preconditioner=rec.preconditioner,
            hvp_batch_size=rec.extra.get("hvp_batch_size"),
        )


def refuse_nonfinite(rec: CurvatureSolve, curvature: str | None) -> None:
    """A solve that met NaN or inf (status "nonfinite" from `prefprune.cg.solve`) must not become scores."""
    nonfinite = [rec.dampings[i] for i, c in enumerate(rec.columns) if c["status"] == "nonfinite"]
    if nonfinite:
        raise FloatingPointError(
            f"the curvature solve met a non-finite value (curvature={curvature!r}, damping {nonfinite}): the "
            "validation gradient or a curvature product holds NaN or inf; no scores are written from it "
            "(check the model's dtype, attention implementation and padding)"
        )


def refuse_meaningless_damping(Q: Tensor, g_val: Tensor, rec: CurvatureSolve, config, *, scale) -> None:
    """A damping so large that the solve means nothing in the working precision is an error: the query
    underflows (every influence would be 0), or H is lost below the rounding of λ (the query is ∇L_V/λ to
    the last bit: influence = grad_dot/λ, whatever the curvature). `scale()` gives the curvature's scale
    (trace/p) for the message; it may cost a pass, so it is only asked for here, on the way to the error."""
    if rec.plan.get("method") == "none":
        return
    g = g_val.detach().double().reshape(-1)
    g_norm = float(g.norm())
    if not g_norm > 0:
        return
    info = torch.finfo(Q.dtype)
    for i, lam in enumerate(rec.dampings):
        q = Q[:, i].detach().double()
        overflow = not lam <= info.max  # λ itself is inf in the working precision
        stopped = rec.columns[i]["status"] in ("nonpositive_curvature", "nonfinite")
        if not overflow and (stopped or not torch.isfinite(q).all()):
            # Refused or NaN-ed by its own rule; a column CG stopped at its first iteration holds x = 0,
            # which is no underflow.
            continue
        underflow = overflow or float(q.abs().max()) < info.tiny
        lost = not underflow and float((lam * q - g).norm()) <= 8 * info.eps * g_norm
        if not (underflow or lost):
            continue
        s = float(scale())
        dtype = str(Q.dtype).replace("torch.", "")
        if overflow:
            why = f"λ overflows {dtype} (largest {info.max:.3g})"
        elif underflow:
            why = (f"the query (H + λI)⁻¹∇L_V underflows in {dtype} (largest entry "
                   f"{float(q.abs().max()):.3g}; ‖∇L_V‖ = {g_norm:.3g}): every influence would read 0")
        else:
            why = (f"H is lost below the rounding of λ in {dtype} (eps {info.eps:.2g}): the query is ∇L_V/λ "
                   "to the last bit, so influence would be grad_dot/λ whatever the curvature")
        factor = f" (factor {rec.damping_factors[i]:g} of the scale)" if rec.damping_factors else ""
        raise ValueError(
            f"damping {lam:g}{factor} is meaningless against the curvature's scale trace/p = {s:.3g} "
            f"(curvature={config.curvature!r}; λ is {lam / s if s > 0 else math.inf:.3g} times it): {why}. "
            f"Use a damping below {s / info.eps:.3g} (relative damping: a factor below {1 / info.eps:.3g}; "
            "validate recommends one), or --curvature identity for plain gradient similarity"
        )


def _nonpositive_columns(rec: CurvatureSolve, config) -> list[int]:
    """The damping columns stopped on non-positive curvature: raised, or logged (their queries become NaN)."""
    bad = [i for i, c in enumerate(rec.columns) if c["status"] == "nonpositive_curvature"]
    if bad:
        where = ", ".join(
            f"damping {rec.dampings[i]:.6g} (pᵀ(H + λI)p = {rec.columns[i]['nonpositive_value']:.6g} "
            f"at iteration {rec.columns[i]['nonpositive_iteration']})"
            for i in bad
        )
        msg = (
            f"CG met non-positive curvature for {where} (curvature={config.curvature!r}): the damped "
            "Hessian is not positive definite, so its inverse is not what influence needs; increase "
            "damping or use curvature='ggn'"
        )
        if config.on_nonpositive == "raise":
            raise NonPositiveCurvatureError(msg)
        logger.warning("%s; those influence columns are NaN", msg)
    for i, c in enumerate(rec.columns):
        if c["status"] == "max_iter":
            logger.warning(
                "CG stopped at the iteration cap %d with relative residual %.3g > tol %.3g "
                "(curvature=%r, damping=%r)",
                config.max_iter, c["residual"], config.tol, config.curvature, rec.dampings[i],
            )
    return bad


@dataclass
class InfluenceQuery:
    """∇L_V and the influence queries q_l = (H + λ_l I)⁻¹ ∇L_V of every damping value.

    Attributes:
        g_val: (p,) validation gradient ∇L_V.
        val_margins: (n_val,) validation margins.
        Q: (p, L) one query per damping value (NaN for a column stopped on non-positive curvature when
            on_nonpositive="nan").
        record: the solve record of every damping value (`CurvatureSolve`).
        info: the first damping value's summary (`SolveInfo`).
        inverse: the direct solve's factors, kept when self-influence or per-query influence use them
            (None otherwise, and after `load`).
    """

    g_val: Tensor
    val_margins: Tensor
    Q: Tensor
    record: CurvatureSolve
    info: SolveInfo
    inverse: DirectFactors | None = None

    @classmethod
    def solve(cls, curvature: Curvature, g_val: Tensor, val_margins: Tensor, *, plan: SolvePlan, config,
              keep_inverse: bool = False) -> InfluenceQuery:
        """Solve for every damping value of `config` (a `prefprune.score.ScoreConfig`).

        Raises:
            NonPositiveCurvatureError: a damping value met non-positive curvature and
                on_nonpositive="raise".
            FloatingPointError: the solve met NaN or inf.
        """
        sol = solve(curvature, g_val.unsqueeze(1), config.dampings(), plan=plan,
                    relative=config.relative_damping, tol=config.tol, max_iter=config.max_iter,
                    impl=config.impl, progress=config.progress)
        Q = sol.Q[:, :, 0].T.contiguous()  # (p, L)

        def scale() -> float:  # trace/p: known for relative damping and the direct solve, else one more pass
            if sol.record.damping_scale is not None:
                return sol.record.damping_scale
            return curvature.trace() / max(1, g_val.numel())

        refuse_meaningless_damping(Q, g_val, sol.record, config, scale=scale)
        refuse_nonfinite(sol.record, config.curvature)
        bad = _nonpositive_columns(sol.record, config)
        Q[:, bad] = math.nan
        info = SolveInfo.of(sol.record, plan, tol=config.tol, max_iter=config.max_iter)
        return cls(g_val, val_margins, Q, sol.record, info, sol.factors if keep_inverse else None)

    def save(self, work) -> None:
        """Keep the query in the run's work folder (`prefprune.shards.WorkFolder`) for resume."""
        work.save_solve({"q": self.Q, "g_val": self.g_val, "val_margins": self.val_margins},
                        {"info": self.info.to_dict(), "sweep": asdict(self.record)})

    @classmethod
    def load(cls, work, device: torch.device) -> InfluenceQuery | None:
        """The query a previous attempt of this run saved (None when there is none)."""
        saved = work.load_solve()
        if saved is None:
            return None
        tensors, meta = saved
        q, g_val, val_margins = (tensors[k].to(device) for k in ("q", "g_val", "val_margins"))
        return cls(g_val, val_margins, q, CurvatureSolve(**meta["sweep"]), SolveInfo(**meta["info"]))
