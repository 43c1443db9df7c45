"""The curvature solve that scales: many queries, a damping sweep, direct Gauss–Newton or (multi-shift) CG.

`plan_solve` chooses, before any pass over the data, how Q_l = (H + λ_l I)⁻¹ B is obtained for a block B
of m query vectors and L damping values, and checks the damping list and the memory budget:

- ``direct`` (``ggn``, ``projected_ggn``): the curvature sample's margin-gradient rows (projected for
  ``projected_ggn``) from **one** pass, one eigendecomposition of the n_h×n_h Gram (Woodbury) or of the
  d×d matrix when d < n_h (`prefprune.gram`); every damping value and query from the same factors.
- ``multishift`` (``exact``, or ``ggn`` when its rows do not fit the budget, with several damping
  values): one Krylov space for all shifts, one pass per iteration with batched HVPs
  (`prefprune.multishift`).
- ``cg``: the native multi-RHS CG (`prefprune.cg.solve`), one column per (query, damping value).
- ``none`` (``identity``): Q = B.

Relative damping (Kronfluence's convention) sets λ_l = factor_l × trace(H)/d, the mean eigenvalue; the
scale comes from the eigendecomposition (direct) or from one extra pass summing w_i‖∇m_i‖²/n (the
Gauss–Newton trace, also the scale of ``exact``). `CurvatureSolve` records the plan, every damping value
in both forms, the passes over the curvature sample and the status of each damping column.
"""

from __future__ import annotations

import logging
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune import cg
from prefprune.distributed import cat_over_ranks, sum_over_ranks
from prefprune.grads import (
    LinearSite,
    SegmentCapture,
    capture_pairs,
    flatten_site_matrices,
    pair_dots,
    split_flat,
)
from prefprune.gram import GaussNewtonEigen, pair_gradient_rows
from prefprune.model import eager_attention
from prefprune.multishift import multishift_cg
from prefprune.ops.reference import CG_STATUS_NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "SOLVERS",
    "CurvatureSolve",
    "SolvePlan",
    "Solver",
    "check_dampings",
    "damping_column_names",
    "exact_hvp_batched",
    "ggn_trace",
    "plan_solve",
    "solve_curvature",
]

#: How the curvature system is solved; "auto" picks per curvature and memory budget.
Solver = Literal["auto", "direct", "cg", "multishift"]
SOLVERS: tuple[str, ...] = typing.get_args(Solver)

_MIB = 1 << 20


def damping_column_names(
    dampings: Sequence[float], *, relative: bool, prefix: str = "influence"
) -> list[str]:
    """Column name per damping value: ``prefix`` alone for one value, else ``prefix@<value>`` (``@r<factor>``
    for relative damping).

    The value is written as Python's shortest round-trip repr, so distinct values give distinct names.
    """
    if len(dampings) == 1:
        return [prefix]
    tag = "@r" if relative else "@"
    return [f"{prefix}{tag}{float(x)!r}" for x in dampings]


@dataclass(frozen=True)
class SolvePlan:
    """How the solve will run (chosen before any pass).

    Attributes:
        curvature: "exact", "ggn", "projected_ggn" or "identity".
        method: "direct", "cg", "multishift" or "none".
        form: direct only: "gram" (n_h×n_h Woodbury) or "primal" (d×d).
        space: "weights" (dimension p) or "projected" (dimension = the projection's).
        dim: dimension d of the solved system.
        n_curvature: pairs in the curvature sample.
        bytes_needed: memory the direct factors take (0 for the iterative methods).
        budget_bytes: the memory budget.
        reason: why this method.
    """

    curvature: str
    method: str
    form: str | None
    space: str
    dim: int
    n_curvature: int
    bytes_needed: int
    budget_bytes: int
    reason: str


def _direct_bytes(n: int, d: int, itemsize: int) -> dict[str, int]:
    # gram: rows U and W (same dtype) + the float64 Gram, its eigenvectors and eigh's workspace;
    # primal: the float64 d×d matrix, its eigenvectors and workspace.
    return {"gram": 2 * n * d * itemsize + 3 * n * n * 8, "primal": 3 * d * d * 8}


def check_dampings(dampings: Sequence[float], *, curvature: str, relative: bool) -> list[float]:
    """The damping values as floats, checked: numbers, finite, >= 0 (> 0 for exact), distinct, not empty."""
    what = "damping factor" if relative else "damping"
    if isinstance(dampings, int | float):
        dampings = [dampings]
    vals = []
    for x in dampings:
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number or a list of numbers, got {x!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {x!r}")
        if curvature == "exact" and v <= 0:
            raise ValueError(
                f"{what} must be > 0 with curvature='exact' (an exact Hessian can be singular or "
                f"indefinite), got {x!r} in {list(dampings)!r}"
            )
        vals.append(v)
    if not vals:
        raise ValueError(f"the {what} list is empty; give at least one value")
    seen: set[float] = set()
    dup = [v for v in vals if v in seen or seen.add(v)]
    if dup:
        raise ValueError(
            f"duplicate {what} values {sorted(set(dup))} in {list(dampings)!r}; each value gives one column"
        )
    return vals


def plan_solve(
    *,
    curvature: str,
    n_params: int,
    n_curvature: int,
    dampings: Sequence[float],
    relative: bool = False,
    solver: str = "auto",
    memory_budget_mb: float = 2048.0,
    itemsize: int = 4,
    projection_dim: int | None = None,
) -> SolvePlan:
    """Choose the solve method and check the settings (raises ValueError before any pass).

    Args:
        n_params: p, trainable parameters.
        n_curvature: n_h, pairs in the curvature sample.
        dampings: damping values (absolute, or factors of the mean eigenvalue when `relative`).
        solver: "auto", "direct", "cg" or "multishift".
        memory_budget_mb: memory the direct factors may take (MiB).
        itemsize: bytes per element of the gradient rows (4 for fp32/fp16/bf16 models, 8 for fp64).
        projection_dim: projected_ggn: dimension of the projected space.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (math.isfinite(memory_budget_mb) and memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be finite and > 0, got {memory_budget_mb!r}")
    vals = check_dampings(dampings, curvature=curvature, relative=relative)
    budget = int(memory_budget_mb * _MIB)
    if curvature == "identity":
        return SolvePlan(curvature, "none", None, "weights", n_params, 0, 0, budget, "identity: q = b")
    if n_curvature < 1:
        raise ValueError(f"curvature={curvature!r} needs a non-empty curvature set")
    space = "projected" if curvature == "projected_ggn" else "weights"
    d = int(projection_dim) if curvature == "projected_ggn" else int(n_params)
    iterative = "multishift" if len(vals) > 1 else "cg"
    if curvature == "exact":
        if solver == "direct":
            raise ValueError("solver='direct' needs a Gauss–Newton curvature (ggn, projected_ggn); "
                             "exact uses 'cg' or 'multishift'")
        method = iterative if solver == "auto" else solver
        why = ("several damping values: one Krylov space for all shifts" if method == "multishift"
               else "exact Hessian: double-backward HVPs by CG")
        return SolvePlan(curvature, method, None, space, d, n_curvature, 0, budget, why)
    need = _direct_bytes(n_curvature, d, itemsize)
    form = "gram" if n_curvature <= d else "primal"
    if need[form] > budget and need["gram" if form == "primal" else "primal"] <= budget:
        form = "gram" if form == "primal" else "primal"
    fits = need[form] <= budget
    if form == "gram" and 0.0 in vals and fits:
        raise ValueError(
            f"damping 0 with a direct {curvature} solve: the Gauss–Newton matrix of {n_curvature} pairs has "
            f"rank <= {n_curvature} < {d} dimensions, so H is singular; use a damping > 0"
        )
    mib = need[form] / _MIB
    if solver == "auto":
        if fits:
            return SolvePlan(curvature, "direct", form, space, d, n_curvature, need[form], budget,
                             f"{form} factors ({mib:.1f} MiB) fit the {memory_budget_mb:g} MiB budget")
        if curvature == "projected_ggn":
            raise ValueError(
                f"memory_budget_mb={memory_budget_mb:g} is too small even for the projected Gram: "
                f"{n_curvature} rows of {d} projected dimensions need {need['gram'] / _MIB:.1f} MiB (gram) "
                f"or "
                f"{need['primal'] / _MIB:.1f} MiB (primal); raise memory_budget_mb, lower projection_k or "
                "hessian_samples"
            )
        return SolvePlan(curvature, iterative, None, space, d, n_curvature, 0, budget,
                         f"the direct factors ({mib:.1f} MiB) exceed the {memory_budget_mb:g} MiB budget; "
                         "Gauss–Newton products by CG, one pass per iteration")
    if solver == "direct":
        if not fits:
            raise ValueError(
                f"solver='direct' needs {mib:.1f} MiB for the {form} factors of {n_curvature} rows x {d} "
                f"dimensions, over memory_budget_mb={memory_budget_mb:g}; raise it or use solver='auto'"
            )
        return SolvePlan(curvature, "direct", form, space, d, n_curvature, need[form], budget, "requested")
    return SolvePlan(curvature, solver, None, space, d, n_curvature, 0, budget, "requested")


@dataclass
class CurvatureSolve:
    """The record of one solve (it goes into the sidecar).

    Attributes:
        plan: the `SolvePlan` as a dict.
        dampings: absolute λ per column.
        damping_factors: the factors given when damping is relative (None otherwise).
        damping_scale: trace(H)/d used by relative damping (None when not computed).
        column_names: influence column per damping value.
        columns: per damping value: status (worst over the queries), iterations, residual,
            nonpositive_value, nonpositive_iteration.
        curvature_passes: forward+backward passes over the curvature sample.
        n_queries: right-hand sides solved per damping value.
        impl: the iterative solver's implementation ("native", "reference", "multishift", "eigh", "none").
        seconds: wall time.
        projection_dim: projected_ggn: dimension of the projected space.
    """

    plan: dict
    dampings: list[float]
    damping_factors: list[float] | None
    damping_scale: float | None
    column_names: list[str]
    columns: list[dict]
    curvature_passes: int
    n_queries: int
    impl: str
    seconds: float
    projection_dim: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _params(sites: Sequence[LinearSite]) -> list[nn.Parameter]:
    return [p for s in sites for p in s.parameters()]


def _flat_grads(sites: Sequence[LinearSite], grads: Sequence[Tensor | None], lead: tuple = ()) -> Tensor:
    params = _params(sites)
    grads = [torch.zeros(lead + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g
             for p, g in zip(params, grads, strict=True)]
    mats, k = [], 0
    for s in sites:
        n_p = len(s.parameters())
        if lead:
            w = grads[k]
            mats.append(torch.cat([w, grads[k + 1].unsqueeze(-1)], dim=-1) if s.has_bias else w)
        else:
            mats.append(s.augmented(grads[k : k + n_p]))
        k += n_p
    return flatten_site_matrices(mats)


def exact_hvp_batched(model: nn.Module, sites: Sequence[LinearSite], batches) -> Callable[[Tensor], Tensor]:
    """V ↦ H V for the exact Hessian of the mean loss, all columns of V in one double backward per batch.

    The vectors go through one vmapped backward of the gradient (`is_grads_batched`), so m columns cost
    one forward, one graph-building backward and one batched double backward per batch. Call it inside
    `eager_attention(model)` with right-padded batches (see `prefprune.curvature.exact_hvp`).

    Returns:
        A function mapping (p, m) to (p, m).
    """
    params = _params(sites)
    n = batches.n_pairs

    def apply(V: Tensor) -> Tensor:
        m = V.shape[1]
        out = torch.zeros_like(V)
        Vt = V.T.contiguous()
        for batch in batches:
            with torch.enable_grad():
                from prefprune.grads import pair_margins

                loss = F.softplus(-pair_margins(model, batch)).sum() / n
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                gflat = _flat_grads(sites, grads)
                hv = torch.autograd.grad(gflat, params, grad_outputs=Vt, is_grads_batched=True,
                                         allow_unused=True)
            out += _flat_grads(sites, hv, lead=(m,))
        return sum_over_ranks(batches, out)

    return apply


def ggn_trace(model: nn.Module, sites: Sequence[LinearSite], batches, *, impl: str | None = None) -> float:
    """trace(H_GN) = mean_i σ(m_i)σ(−m_i)‖∇m_i‖² over `batches`, from one pass of fused squared norms."""
    total = 0.0
    with SegmentCapture(sites) as cap:
        for batch in batches:
            margins, packed = capture_pairs(model, cap, batch, lambda m: m)
            _, sq = pair_dots(packed, None, impl=impl)
            w = torch.sigmoid(margins) * torch.sigmoid(-margins)
            total += float((w.double() * sq.double()).sum())
    return float(sum_over_ranks(batches, torch.tensor(total, dtype=torch.float64))) / batches.n_pairs


def _right_padded(batches):
    return batches.with_padding("right")


def _projector(sites, k: int, seed: int, device):
    from prefprune.ops.segment import KroneckerProjector

    return KroneckerProjector([(s.d_out, s.d_in) for s in sites], k_out=k, k_in=k, seed=seed, device=device)


def _column_record(status: list[str], iterations: list[int], residual: list[float],
                   curvature: list[float]) -> dict:
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


def solve_curvature(
    model: nn.Module,
    sites: Sequence[LinearSite],
    B: Tensor,
    curvature_batches,
    *,
    plan: SolvePlan,
    dampings: Sequence[float],
    relative: bool = False,
    tol: float = 1e-6,
    max_iter: int = 100,
    impl: str | None = None,
    progress: bool = False,
    projection_k: int = 16,
    projection_seed: int = 0,
    keep_factors: bool = False,
    factors: dict | None = None,
) -> tuple[Tensor, CurvatureSolve, dict]:
    """Solve (H + λ_l I) Q_l = B for every damping value by the planned method.

    Args:
        B: (p, m) right-hand sides in the flat layout (e.g. ∇L_V, or one validation gradient per column).
        curvature_batches: the curvature sample (unused for identity).
        plan: from `plan_solve` with the same curvature, sizes and damping list.
        dampings: absolute values, or factors of trace(H)/d when `relative`.
        keep_factors: return the eigendecomposition / projector (for self-influence, more queries).
        factors: a direct solve's kept factors from an earlier call on the same curvature sample: reused
            instead of another pass.

    Returns:
        Q (L, p, m) in B's dtype (NaN-free; a column stopped on non-positive curvature holds its last
        iterate, see the record), the `CurvatureSolve` record, and the factors
        ({"eigen": GaussNewtonEigen, "projector": ...} when kept and direct, else {}).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    vals = check_dampings(dampings, curvature=plan.curvature, relative=relative)
    names = damping_column_names(vals, relative=relative)
    p, m = B.shape
    L = len(vals)
    if plan.method == "none":
        cols = [_column_record(["not_solved"], [0], [0.0], [math.nan]) for _ in vals]
        rec = CurvatureSolve(asdict(plan), vals, vals if relative else None, None, names, cols, 0, m, "none",
                             time.perf_counter() - t0)
        return B.unsqueeze(0).expand(L, p, m).clone(), rec, {}

    kept: dict = {}
    passes = 0
    scale = None
    if plan.method == "direct" and factors and factors.get("eigen") is not None:
        eigen, projector = factors["eigen"], factors.get("projector")
    elif plan.method == "direct":
        projector = None
        if plan.space == "projected":
            projector = _projector(sites, int(projection_k), int(projection_seed), B.device)
        rows, weights = [], []
        for margins, r in pair_gradient_rows(model, sites, curvature_batches, objective=lambda x: x,
                                             projector=projector, impl=impl):
            rows.append(r)
            weights.append(torch.sigmoid(margins) * torch.sigmoid(-margins))
        passes = 1
        # Every rank holds the rows of its shard of the curvature sample: gather them in sample order.
        weights = cat_over_ranks(curvature_batches, torch.cat(weights)).to(rows[0].dtype)
        eigen = GaussNewtonEigen.from_rows(cat_over_ranks(curvature_batches, torch.cat(rows)), weights,
                                           form=plan.form or "auto")
        del rows
    if plan.method == "direct":
        scale = eigen.mean_eigenvalue
        lam = [v * scale for v in vals] if relative else vals
        if projector is not None:
            Bp = projector.project_query(split_flat(B, sites)).T  # (dim, m)
            Qp = eigen.solve(Bp, lam)  # (L, dim, m)
            Q = torch.stack([flatten_site_matrices(projector.lift(Qp[i].T.to(B.dtype))) for i in range(L)])
        else:
            Q = eigen.solve(B, lam).to(B.dtype)
        cols = [_column_record(["converged"] * m, [0] * m, [0.0] * m, [math.nan] * m) for _ in vals]
        impl_name = "eigh"
        if keep_factors:
            kept = {"eigen": eigen, "projector": projector}
    else:
        if relative:
            scale = ggn_trace(model, sites, curvature_batches, impl=impl) / plan.dim
            passes += 1
        lam = [v * scale for v in vals] if relative else vals
        Q, cols, impl_name, used = _iterative(model, sites, B, curvature_batches, plan=plan, lam=lam, tol=tol,
                                               max_iter=max_iter, impl=impl, progress=progress, tqdm=tqdm,
                                               projection_k=projection_k, projection_seed=projection_seed)
        passes += used
    rec = CurvatureSolve(
        plan=asdict(plan), dampings=[float(x) for x in lam], damping_factors=vals if relative else None,
        damping_scale=scale, column_names=names, columns=cols, curvature_passes=passes, n_queries=m,
        impl=impl_name, seconds=time.perf_counter() - t0,
        projection_dim=plan.dim if plan.space == "projected" else None,
    )
    return Q, rec, kept


def _iterative(model, sites, B, batches, *, plan, lam, tol, max_iter, impl, progress, tqdm, projection_k,
               projection_seed):
    """CG / multi-shift CG; returns (Q (L, p, m), per-damping records, impl name, curvature passes)."""
    from prefprune.curvature import ggn_product

    p, m = B.shape
    L = len(lam)
    if plan.curvature == "projected_ggn":  # rows once, then a native factored CG per damping value
        projector = _projector(sites, int(projection_k), int(projection_seed), B.device)
        rows, weights = [], []
        for margins, r in pair_gradient_rows(model, sites, batches, objective=lambda x: x,
                                             projector=projector, impl=impl):
            rows.append(r)
            weights.append(torch.sigmoid(margins) * torch.sigmoid(-margins))
        G = cat_over_ranks(batches, torch.cat(rows))
        w = cat_over_ranks(batches, torch.cat(weights)).to(rows[0].dtype)
        Bp = projector.project_query(split_flat(B, sites)).to(G.dtype).T
        Qs, cols, name = [], [], "reference"
        for lv in lam:
            op = cg.FactoredOperator(G=G, w=w, damping=float(lv))
            res = cg.solve(op, Bp, tol=tol, max_iter=max_iter, impl=impl)
            name = res.impl
            Qs.append(flatten_site_matrices(projector.lift(res.x.T.to(B.dtype))))
            cols.append(_record_from(res.status_names(), res.iterations, res.residual, res.curvature))
        return torch.stack(Qs), cols, name, 1
    if plan.curvature == "exact":
        right = _right_padded(batches)
        product, ctx = exact_hvp_batched(model, sites, right), eager_attention(model)
    else:
        import contextlib

        product, ctx = ggn_product(model, sites, batches, impl=impl), contextlib.nullcontext()
    bar = tqdm(total=max_iter, desc=f"{plan.method} ({plan.curvature})", disable=not progress, leave=False)
    calls = [0]
    try:
        with ctx:
            if plan.method == "multishift":
                def apply_H(V: Tensor) -> Tensor:
                    bar.update(1)
                    calls[0] += 1
                    return product(V)

                res = multishift_cg(apply_H, B, lam, tol=tol, max_iter=max_iter)
                cols = [_record_from(res.status_names()[i], res.iterations[i], res.residual[i],
                                     res.curvature[i]) for i in range(L)]
                return res.x, cols, "multishift", calls[0]
            lam_t = torch.tensor(lam, dtype=B.dtype, device=B.device).repeat_interleave(m)  # column (l, j)

            def operator(V: Tensor) -> Tensor:
                bar.update(1)
                calls[0] += 1
                return product(V) + V * lam_t

            Bb = B.repeat(1, L)  # (p, L·m): damping-major blocks of the m queries
            res = cg.solve(operator, Bb, tol=tol, max_iter=max_iter, impl=impl)
            name = res.impl
    finally:
        bar.close()
    X = res.x.reshape(p, L, m).permute(1, 0, 2)
    st = res.status_names()
    cols = [_record_from(st[i * m:(i + 1) * m], res.iterations[i * m:(i + 1) * m],
                         res.residual[i * m:(i + 1) * m], res.curvature[i * m:(i + 1) * m]) for i in range(L)]
    return X, cols, name, calls[0]


def _record_from(status, iterations, residual, curvature) -> dict:
    names = [s if isinstance(s, str) else CG_STATUS_NAMES[int(s)] for s in status]
    return _column_record(names, [int(i) for i in iterations], [float(r) for r in residual],
                          [float(c) for c in curvature])
