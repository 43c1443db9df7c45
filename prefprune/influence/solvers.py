"""Solvers behind one call: solve(curvature, B, dampings) → (H + λ_l I)⁻¹ B for every damping value.

The methods (chosen beforehand by `prefprune.influence.plan.plan_solve`):

- ``direct``: one eigendecomposition of the Gauss–Newton factor rows (`GaussNewtonEigen`: Woodbury on the
  n_h×n_h Gram, or the d×d matrix), every damping value and query from the same factors;
- ``cg``: the multi-RHS conjugate gradient of `prefprune.cg.solve` (native when built), one column per
  (query, damping value), on the curvature's products — or on its stored rows (a factored operator, solved
  entirely natively) for a factored curvature (`projected_ggn`);
- ``multishift``: one Krylov space for every damping value, one product per iteration;
- ``pcg`` (exact): one pass for the Gauss–Newton rows of the curvature sample and their eigendecomposition
  (the direct solve's `GaussNewtonEigen`), whose inverse (H_GN + λI)⁻¹ (`GaussNewtonWoodbury`) preconditions
  CG on the exact Hessian; every (damping value, query) is a column of one CG call, so one batched HVP pass
  per iteration serves them all (`prefprune.ops.woodbury.damped_systems` says why not multi-shift);
- ``none`` (identity): Q = B.

Relative damping (Kronfluence's convention) sets λ_l = factor_l × trace(H)/d, the mean eigenvalue: from the
eigendecomposition (direct), the Gauss–Newton factors (pcg), the stored rows in the space the system is
solved in (projected CG) or the curvature's trace (one extra pass); the record says which, and the direct
solve also records the top eigenvalue (`prefprune.influence.scale` reads both). Every `Solution` records the
implementation that ran ("eigh", "native", "reference", "multishift" or "none"), read from the call that
ran it, and every damping column the passes over the curvature sample it needed. Adding a solver is one
function here, registered in `METHODS`, plus its test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prefprune import cg
from prefprune.influence.curvature import Curvature
from prefprune.influence.eigen import GaussNewtonEigen
from prefprune.influence.multishift import multishift_cg
from prefprune.influence.plan import CurvatureSolve, SolvePlan, check_dampings, damping_column_names
from prefprune.ops.reference import CG_STATUS_NAMES
from prefprune.ops.woodbury import GaussNewtonWoodbury, damped_systems

__all__ = ["METHODS", "DirectFactors", "Solution", "solve"]


@dataclass
class DirectFactors:
    """The inverse a direct solve leaves behind: reused for more queries and for self-influence.

    Attributes:
        eigen: the eigendecomposition of H (in the curvature's space).
        curvature: the curvature it belongs to (its `to_space`/`from_space` map queries).
    """

    eigen: GaussNewtonEigen
    curvature: Curvature


@dataclass
class Solution:
    """Q (L, p, m) = (H + λ_l I)⁻¹ B in B's dtype (a column stopped on non-positive curvature holds its
    last iterate: see the record), the record, and the direct factors (None for the iterative methods)."""

    Q: Tensor
    record: CurvatureSolve
    factors: DirectFactors | None = None


@dataclass
class _Outcome:
    """A solver's answer. A damping column needed ``setup_passes + passes_per_iteration * iterations``
    passes over the curvature sample."""

    Q: Tensor
    columns: list[dict]
    impl: str
    scale: float | None = None
    factors: DirectFactors | None = None
    setup_passes: int = 0
    passes_per_iteration: int = 0
    preconditioner: str | None = None
    top: float | None = None
    scale_source: str | None = None


def _column_record(status: Sequence, iterations: Sequence, residual: Sequence, curvature: Sequence) -> dict:
    """One damping column's record over its m queries: the worst status, the largest iteration count and
    residual, and where non-positive curvature stopped it."""
    status = [s if isinstance(s, str) else CG_STATUS_NAMES[int(s)] for s in status]
    iterations, residual = [int(i) for i in iterations], [float(r) for r in residual]
    curvature = [float(c) for c in curvature]
    worst = ("nonfinite" if "nonfinite" in status
             else "nonpositive_curvature" if "nonpositive_curvature" in status
             else "max_iter" if "max_iter" in status else status[0])
    bad = [i for i, s in enumerate(status) if s == "nonpositive_curvature"]
    return {
        "status": worst,
        "iterations": max(iterations),
        "residual": max(residual),
        "nonpositive_value": min(curvature[i] for i in bad) if bad else None,
        "nonpositive_iteration": min(iterations[i] for i in bad) if bad else None,
        "nonpositive_queries": len(bad),
    }


def _exact_columns(L: int, m: int, status: str = "converged") -> list[dict]:
    return [_column_record([status] * m, [0] * m, [0.0] * m, [math.nan] * m) for _ in range(L)]


def _solve_none(curvature, B, lam, **_) -> _Outcome:
    return _Outcome(B.unsqueeze(0).expand(len(lam), *B.shape).clone(), _exact_columns(len(lam), B.shape[1],
                                                                                      "not_solved"), "none")


def _solve_direct(curvature, B, vals, *, plan, relative, factors, **_) -> _Outcome:
    fresh = factors is None
    if fresh:
        rows, weights = curvature.rows()
        eigen = GaussNewtonEigen.from_rows(rows, weights, form=plan.form or "auto")
        factors = DirectFactors(eigen, curvature)
        del rows
    eigen, space = factors.eigen, factors.curvature
    scale = eigen.mean_eigenvalue
    lam = [v * scale for v in vals] if relative else vals
    Qs = eigen.solve(space.to_space(B), lam)  # (L, d, m) float64
    Q = torch.stack([space.from_space(Qs[i], B.dtype) for i in range(len(lam))])
    top = float(eigen.evals.max()) if eigen.evals.numel() else 0.0
    return _Outcome(Q, _exact_columns(len(lam), B.shape[1]), "eigh", scale, factors,
                    setup_passes=int(fresh), top=top, scale_source="eigendecomposition")


def _counted(curvature: Curvature, plan: SolvePlan, max_iter: int, progress: bool):
    bar = tqdm(total=max_iter, desc=f"{plan.method} ({plan.curvature})", disable=not progress, leave=False)

    def product(V: Tensor) -> Tensor:
        bar.update(1)
        return curvature.matvec(V)

    return product, bar


def _solve_factored_cg(curvature, B, vals, *, relative, tol, max_iter, impl) -> _Outcome:
    """CG on the stored rows, one native factored solve per damping value (rows from one pass). The scale
    trace(H)/d comes from the same rows, in the space the system is solved in (the projected one)."""
    G, w = curvature.rows()
    scale = float((w.double() * G.double().square().sum(1)).sum()) / max(1, G.shape[0]) / curvature.dim
    lam = [v * scale for v in vals] if relative else vals
    Bp = curvature.to_space(B).to(G.dtype)
    Qs, cols, name = [], [], "reference"
    for lv in lam:
        res = cg.solve(cg.FactoredOperator(G=G, w=w, damping=float(lv)), Bp, tol=tol, max_iter=max_iter,
                       impl=impl)
        name = res.impl
        Qs.append(curvature.from_space(res.x, B.dtype))
        cols.append(_column_record(res.status_names(), res.iterations, res.residual, res.curvature))
    return _Outcome(torch.stack(Qs), cols, name, scale, setup_passes=1, scale_source="factor_rows")


def _solve_cg(curvature, B, lam, *, plan, relative, tol, max_iter, impl, progress, **_) -> _Outcome:
    if curvature.factored:
        return _solve_factored_cg(curvature, B, lam, relative=relative, tol=tol, max_iter=max_iter, impl=impl)
    p, m = B.shape
    L = len(lam)
    lam_t = torch.tensor(lam, dtype=B.dtype, device=B.device).repeat_interleave(m)  # column (l, j)
    product, bar = _counted(curvature, plan, max_iter, progress)
    try:
        with curvature.context():
            # (p, L·m): damping-major blocks of the m queries, one CG column each.
            res = cg.solve(lambda V: product(V) + V * lam_t, B.repeat(1, L), tol=tol, max_iter=max_iter,
                           impl=impl)
    finally:
        bar.close()
    st = res.status_names()
    block = [slice(i * m, (i + 1) * m) for i in range(L)]
    cols = [_column_record(st[b], res.iterations[b], res.residual[b], res.curvature[b]) for b in block]
    return _Outcome(res.x.reshape(p, L, m).permute(1, 0, 2), cols, res.impl, passes_per_iteration=1)


def _woodbury(eigen: GaussNewtonEigen) -> GaussNewtonWoodbury:
    """The preconditioner from the direct solve's factors (no second decomposition): the gram form's
    (s, W) as they are; a primal H_GN = Eᵀ diag(s) E as W = diag(√s) E (so H_GN = Wᵀ W either way)."""
    if eigen.form == "gram":
        return GaussNewtonWoodbury(eigen.evals, eigen.basis)
    return GaussNewtonWoodbury(eigen.evals, eigen.evals.sqrt().unsqueeze(1) * eigen.basis)


def _solve_pcg(curvature, B, vals, *, plan, relative, tol, max_iter, impl, progress, **_) -> _Outcome:
    """Exact Hessian by CG preconditioned with (H_GN + λ_l I)⁻¹, every (damping, query) one column."""
    rows, weights = curvature.gauss_newton_rows()  # one pass, counted in curvature.passes
    eigen = GaussNewtonEigen.from_rows(rows, weights, form=plan.form or "auto")
    del rows
    scale = eigen.mean_eigenvalue  # relative damping's trace(H_GN)/d, free from the factors
    lam = [v * scale for v in vals] if relative else vals
    product, bar = _counted(curvature, plan, max_iter, progress)
    systems = damped_systems(product, B, lam, preconditioner=_woodbury(eigen))
    try:
        with curvature.context():
            res = cg.solve(systems.apply_A, systems.B, precond=systems.precond, tol=tol, max_iter=max_iter,
                           impl=impl)
    finally:
        bar.close()
    blocks = systems.split(torch.arange(len(lam) * B.shape[1]))  # (L, m) column indices
    st = res.status_names()
    cols = [_column_record([st[c] for c in block.tolist()], res.iterations[block], res.residual[block],
                           res.curvature[block]) for block in blocks]
    return _Outcome(systems.split(res.x), cols, res.impl, scale, setup_passes=1, passes_per_iteration=1,
                    preconditioner="gauss_newton_woodbury", scale_source="gauss_newton_factors")


def _solve_multishift(curvature, B, lam, *, plan, relative, tol, max_iter, impl, progress, **_) -> _Outcome:
    if curvature.factored:  # the rows are stored: a native factored CG per value beats more passes
        return _solve_factored_cg(curvature, B, lam, relative=relative, tol=tol, max_iter=max_iter, impl=impl)
    product, bar = _counted(curvature, plan, max_iter, progress)
    try:
        with curvature.context():
            res = multishift_cg(product, B, lam, tol=tol, max_iter=max_iter)
    finally:
        bar.close()
    names = res.status_names()
    cols = [_column_record(names[i], res.iterations[i], res.residual[i], res.curvature[i])
            for i in range(len(lam))]
    return _Outcome(res.x, cols, "multishift", passes_per_iteration=1)


#: method name (`SolvePlan.method`) → its solver.
METHODS: dict[str, Callable[..., _Outcome]] = {
    "none": _solve_none,
    "direct": _solve_direct,
    "cg": _solve_cg,
    "multishift": _solve_multishift,
    "pcg": _solve_pcg,
}


def solve(
    curvature: Curvature,
    B: Tensor,
    dampings: Sequence[float],
    *,
    plan: SolvePlan,
    relative: bool = False,
    tol: float = 1e-6,
    max_iter: int = 100,
    impl: str | None = None,
    progress: bool = False,
    factors: DirectFactors | None = None,
) -> Solution:
    """Solve (H + λ_l I) Q_l = B for every damping value by the planned method.

    Args:
        curvature: H over the curvature sample (`prefprune.influence.curvature.make_curvature`).
        B: (p, m) right-hand sides in the flat layout (∇L_V, or one validation gradient per column).
        dampings: absolute values, or factors of trace(H)/d when `relative`.
        plan: from `plan_solve` with the same curvature, sizes and damping list.
        factors: a direct solve's factors from an earlier call on the same curvature sample: reused
            instead of another pass.

    Returns:
        The `Solution` (its record says which implementation ran and how many passes it took).
    """
    t0 = time.perf_counter()
    vals = check_dampings(dampings, curvature=plan.curvature, relative=relative)
    passes0 = curvature.passes
    scale, source = None, None
    lam = vals
    trace_passes = 0
    if relative and plan.method in ("cg", "multishift") and not curvature.factored:
        scale, source = curvature.trace() / plan.dim, "trace_pass"
        trace_passes = 1
        lam = [v * scale for v in vals]
    out = METHODS[plan.method](curvature, B, lam, plan=plan, relative=relative, factors=factors, tol=tol,
                               max_iter=max_iter, impl=impl, progress=progress)
    if out.scale is not None:  # the scale came from the factors (direct, pcg) or the stored rows
        scale, source = out.scale, out.scale_source
        lam = [v * scale for v in vals] if relative else vals
    for col in out.columns:
        col["passes"] = trace_passes + out.setup_passes + out.passes_per_iteration * col["iterations"]
    record = CurvatureSolve(
        plan=asdict(plan), dampings=[float(x) for x in lam], damping_factors=vals if relative else None,
        damping_scale=scale, column_names=damping_column_names(vals, relative=relative),
        columns=out.columns, curvature_passes=curvature.passes - passes0, n_queries=B.shape[1],
        impl=out.impl, seconds=time.perf_counter() - t0,
        projection_dim=plan.dim if plan.space == "projected" else None, preconditioner=out.preconditioner,
        top_eigenvalue=out.top, scale_source=source, extra=curvature.settings(),
    )
    return Solution(out.Q, record, out.factors)
