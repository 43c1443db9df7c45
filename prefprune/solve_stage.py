"""Scoring's solve stage: the influence queries of every damping value, per-query influence, self-influence.

- **Queries**: `plan_for_config` checks the damping list, the solver and the memory budget before any pass;
  `solve_stage` solves (H + λ_l I) q_l = ∇L_V for every damping value (`prefprune.solve`), turns
  non-positive curvature into an error or NaN columns, and returns the `SolveInfo` of the first value
  (the ``influence`` column) with the record of every value.

- **Per-query**: every validation pair j is its own query b_j = ∇ℓ_j. The queries are solved as one
  multi-right-hand-side system per tile of `tile` validation pairs (`prefprune.solve.solve_curvature`:
  direct, native multi-RHS CG or multi-shift CG), and each tile's q_j go through one streaming pass over
  the training pairs whose fused dots give ∇ℓ_iᵀ q_j for every (pair, query, damping value) at once, so
  memory is O(p · tile · L) whatever n_val is. The matrix goes to its own safetensors file with the row
  and column ids. Its mean over the columns is the `influence` column (the query is linear).
- **Self-influence** (the mislabel detector; high = suspect): exact in weight space when the curvature's
  eigendecomposition is available there (`ggn` direct; `exact` when the explicit p×p Hessian fits the
  memory budget), otherwise in the projected space of `projection_k` (projected Gauss–Newton rows of the
  curvature sample). One extra pass over the training pairs computes each pair's gradient row in that
  space, reduced at once to gᵀ(H + λI)⁻¹g.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune.grads import LinearSite, stream_pair_dots
from prefprune.gram import GaussNewtonEigen, pair_gradient_rows
from prefprune.model import eager_attention
from prefprune.scorefile import per_query_path
from prefprune.solve import SolvePlan, exact_hvp_batched, ggn_trace, plan_solve, solve_curvature

logger = logging.getLogger(__name__)

__all__ = [
    "pair_query_dots",
    "plan_for_config",
    "solve_stage",
    "per_query_influence",
    "per_query_path",
    "self_influence",
    "self_influence_factors",
    "self_norms",
    "extra_columns",
]


def _loss(m: Tensor) -> Tensor:
    return F.softplus(-m)


def _refuse_nonfinite(rec, curvature: str | None) -> None:
    """A solve that met NaN or inf (status "nonfinite" from `prefprune.cg.solve`) must not become scores."""
    nonfinite = [rec.dampings[i] for i, c in enumerate(rec.columns) if c["status"] == "nonfinite"]
    if nonfinite:
        raise FloatingPointError(
            f"the curvature solve met a non-finite value (curvature={curvature!r}, damping {nonfinite}): the "
            "validation gradient or a curvature product holds NaN or inf; no scores are written from it "
            "(check the model's dtype, attention implementation and padding)"
        )


def _refuse_meaningless_damping(Q: Tensor, g_val: Tensor, rec, config, *, scale) -> None:
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
        if not overflow and not torch.isfinite(q).all():
            continue  # a non-positive-curvature or non-finite column, refused or NaN-ed by its own rule
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


def plan_for_config(
    config, sites: Sequence[LinearSite], *, n_curvature: int, dtype: torch.dtype
) -> SolvePlan:
    """The `SolvePlan` of a `prefprune.score.ScoreConfig`; ValueError on bad settings, before any pass."""
    p = sum(s.numel for s in sites)
    k = int(config.projection_k)
    dim = sum(min(k, s.d_out) * min(k, s.d_in) for s in sites)  # KroneckerProjector keeps sides <= k exact
    return plan_solve(
        curvature=config.curvature,
        n_params=p,
        n_curvature=n_curvature,
        dampings=config.dampings(),
        relative=config.damping_relative,
        solver=config.solver,
        memory_budget_mb=float(config.memory_budget_mb),
        itemsize=8 if dtype == torch.float64 else 4,
        projection_dim=dim,
    )


def solve_stage(
    model: nn.Module,
    sites: Sequence[LinearSite],
    g_val: Tensor,
    curvature_batches,
    *,
    config,
    plan: SolvePlan,
    keep_factors: bool = False,
):
    """Influence queries q_l = (H + λ_l I)⁻¹ ∇L_V of every damping value of `config`.

    Returns:
        Q (p, L) (a column stopped on non-positive curvature is NaN when on_nonpositive="nan"), the
        `prefprune.curvature.SolveInfo` of the first damping value, the `CurvatureSolve` record of all,
        and the kept factors.

    Raises:
        prefprune.curvature.NonPositiveCurvatureError: a damping value met non-positive curvature and
            on_nonpositive="raise".
    """
    from prefprune.curvature import NonPositiveCurvatureError, SolveInfo

    dampings = config.dampings()
    Q, rec, factors = solve_curvature(
        model,
        sites,
        g_val.unsqueeze(1),
        curvature_batches,
        plan=plan,
        dampings=dampings,
        relative=config.damping_relative,
        tol=config.tol,
        max_iter=config.max_iter,
        impl=config.impl,
        progress=config.progress,
        projection_k=config.projection_k,
        projection_seed=config.seed,
        keep_factors=keep_factors,
    )
    Q = Q[:, :, 0].T.contiguous()  # (p, L)

    def scale() -> float:  # trace/p: known for relative damping and the direct solve, else one more pass
        if rec.damping_scale is not None:
            return rec.damping_scale
        return ggn_trace(model, sites, curvature_batches, impl=config.impl) / max(1, g_val.numel())

    _refuse_meaningless_damping(Q, g_val, rec, config, scale=scale)
    _refuse_nonfinite(rec, config.curvature)
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
        Q[:, bad] = math.nan
    for i, c in enumerate(rec.columns):
        if c["status"] == "max_iter":
            logger.warning(
                "CG stopped at the iteration cap %d with relative residual %.3g > tol %.3g "
                "(curvature=%r, damping=%r)",
                config.max_iter,
                c["residual"],
                config.tol,
                config.curvature,
                rec.dampings[i],
            )
    first = rec.columns[0]
    info = SolveInfo(
        curvature=config.curvature,
        damping=float(rec.dampings[0]),
        status=first["status"],
        iterations=int(first["iterations"]),
        residual=float(first["residual"]),
        nonpositive_value=first["nonpositive_value"],
        nonpositive_iteration=first["nonpositive_iteration"],
        n_curvature=plan.n_curvature,
        tol=float(config.tol),
        max_iter=int(config.max_iter),
        impl=rec.impl,
        seconds=rec.seconds,
        projection_dim=rec.projection_dim,
        method=plan.method,
        curvature_passes=rec.curvature_passes,
        damping_factor=None if rec.damping_factors is None else rec.damping_factors[0],
        damping_scale=rec.damping_scale,
    )
    return Q, info, rec, factors


def pair_query_dots(
    model: nn.Module, sites: Sequence[LinearSite], batches, Q: Tensor, *, impl: str | None = None
) -> Tensor:
    """∇ℓ_iᵀ Q for every pair of `batches`: one forward+backward per batch, each layer reduced as soon as
    its Δ exists (`prefprune.grads.stream_pair_dots`).

    Args:
        Q: (p, m) query vectors in the flat layout.

    Returns:
        (n, m) float64 on the CPU, in batch order.
    """
    return stream_pair_dots(model, sites, batches, list(Q.T), impl=impl, desc="per-query dots")[0]


def per_query_influence(
    model: nn.Module,
    sites: Sequence[LinearSite],
    train_batches,
    val_batches,
    curvature_batches,
    *,
    plan: SolvePlan,
    dampings: Sequence[float],
    relative: bool,
    tile: int,
    tol: float,
    max_iter: int,
    impl: str | None = None,
    projection_k: int = 16,
    projection_seed: int = 0,
    factors: dict | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Influence of every training pair on every validation pair, for every damping value.

    Args:
        train_batches, val_batches: the pairs (rows in batch order: callers scatter back).
        tile: validation pairs solved and scored together (bounds memory at p × tile × L).
        factors: the direct solve's kept factors (no further pass over the curvature sample).

    Returns:
        (n_train, n_val, L) float64 and the solve record (as a dict) of every tile.
    """
    if int(tile) < 1:
        raise ValueError(f"per-query tile must be >= 1, got {tile!r}")
    rows = [r for _, r in pair_gradient_rows(model, sites, val_batches, objective=_loss, impl=impl)]
    Gv = torch.cat(rows)  # (n_val, p) per-pair validation gradients
    del rows
    n_val, L = Gv.shape[0], len(dampings)
    out = np.empty((train_batches.n_pairs, n_val, L), dtype=np.float64)
    records = []
    for j0 in range(0, n_val, int(tile)):
        B = Gv[j0 : j0 + int(tile)].T.to(sites[0].module.weight.dtype).contiguous()  # (p, t)
        Q, rec, _ = solve_curvature(
            model,
            sites,
            B,
            curvature_batches,
            plan=plan,
            dampings=dampings,
            relative=relative,
            tol=tol,
            max_iter=max_iter,
            impl=impl,
            projection_k=projection_k,
            projection_seed=projection_seed,
            factors=factors,
        )
        _refuse_nonfinite(rec, getattr(plan, "curvature", None))
        bad = [i for i, c in enumerate(rec.columns) if c["status"] == "nonpositive_curvature"]
        for i in bad:
            Q[i] = math.nan
        t = B.shape[1]
        # Damping-major columns: (l, j) at l·t + j.
        S = pair_query_dots(
            model, sites, train_batches, Q.permute(1, 0, 2).reshape(Q.shape[1], L * t), impl=impl
        )
        out[:, j0 : j0 + t, :] = S.reshape(-1, L, t).permute(0, 2, 1).numpy()
        records.append({"queries": [j0, j0 + t], **rec.to_dict()})
    return out, records


def self_influence_factors(
    model: nn.Module,
    sites: Sequence[LinearSite],
    curvature_batches,
    *,
    curvature: str,
    direct_factors: dict,
    memory_budget_mb: float,
    projection_k: int,
    projection_seed: int,
    impl: str | None = None,
) -> tuple[GaussNewtonEigen, object | None, dict]:
    """The eigendecomposition self-influence uses, its projector (None in weight space) and a record.

    Weight space when exact: the direct Gauss–Newton factors, or (``exact``) the explicit Hessian built
    from p batched HVP columns in one pass when 3·p²·8 bytes fit the budget. Otherwise the projected
    Gauss–Newton rows of the curvature sample (one pass).
    """
    from prefprune.ops.segment import KroneckerProjector

    p = sum(s.numel for s in sites)
    if direct_factors.get("eigen") is not None:
        eig, proj = direct_factors["eigen"], direct_factors.get("projector")
        space = "projected" if proj is not None else "weights"
        return eig, proj, {"space": space, "curvature": curvature, "passes": 0}
    if curvature == "exact" and 3 * p * p * 8 <= memory_budget_mb * (1 << 20):
        from prefprune.solve import _right_padded

        hvp = exact_hvp_batched(model, sites, _right_padded(curvature_batches))
        eye = torch.eye(p, dtype=sites[0].module.weight.dtype, device=sites[0].module.weight.device)
        with eager_attention(model):
            H = hvp(eye)
        return (
            GaussNewtonEigen.from_matrix(H.double()),
            None,
            {"space": "weights", "curvature": "exact", "passes": 1},
        )
    proj = KroneckerProjector(
        [(s.d_out, s.d_in) for s in sites],
        k_out=int(projection_k),
        k_in=int(projection_k),
        seed=int(projection_seed),
        device=sites[0].module.weight.device,
    )
    rows, weights = [], []
    for margins, r in pair_gradient_rows(
        model, sites, curvature_batches, objective=lambda m: m, projector=proj, impl=impl
    ):
        rows.append(r)
        weights.append(torch.sigmoid(margins) * torch.sigmoid(-margins))
    eig = GaussNewtonEigen.from_rows(torch.cat(rows), torch.cat(weights).to(rows[0].dtype))
    return (
        eig,
        proj,
        {"space": "projected", "curvature": "projected_ggn", "projection_dim": proj.dim, "passes": 1},
    )


def self_influence(
    model: nn.Module,
    sites: Sequence[LinearSite],
    train_batches,
    eigen: GaussNewtonEigen,
    projector,
    dampings: Sequence[float],
    *,
    impl: str | None = None,
) -> np.ndarray:
    """(n, L) gᵀ(H + λ_l I)⁻¹g of every training pair's loss gradient (projected when `projector` is set).

    A damping value whose H + λI is not positive definite gives a NaN column (see `GaussNewtonEigen`).
    """
    out = []
    for _, rows in pair_gradient_rows(
        model, sites, train_batches, objective=_loss, projector=projector, impl=impl
    ):
        out.append(eigen.quadratic(rows, dampings).cpu())
    return torch.cat(out).numpy()


def extra_columns(
    model: nn.Module,
    sites: Sequence[LinearSite],
    train_batches,
    order: Sequence[int],
    *,
    val_enc: Sequence,
    val_batches,
    curv_batches,
    config,
    plan: SolvePlan,
    sweep,
    factors: dict,
    cols: dict[str, np.ndarray],
    row_ids: Sequence[str],
) -> dict:
    """Split pass 2's (n, L) influence into one column per damping value and add the optional scores.

    `cols` (training-set order) is updated in place: ``influence`` becomes the first damping value's
    column and ``influence@<λ>`` columns follow for a sweep; ``self_influence`` columns when asked for.

    Args:
        train_batches: the training pairs in pass-2 order; order[k] = training index of its k-th pair.
        val_enc, val_batches: the validation pairs (input order) and their batches.

    Returns:
        {"metadata": sidecar entries, "timings": seconds per extra step, "per_query": dict or None}.
    """
    meta: dict = {
        "solve_plan": sweep.plan,
        "damping_scale": sweep.damping_scale,
        "damping_columns": [
            {
                "column": name,
                "damping": lam,
                "damping_factor": None if sweep.damping_factors is None else sweep.damping_factors[i],
                **sweep.columns[i],
            }
            for i, (name, lam) in enumerate(zip(sweep.column_names, sweep.dampings, strict=True))
        ],
    }
    timings: dict = {}
    infl = cols["influence"]
    if infl.ndim == 2:
        cols["influence"] = infl[:, 0].copy()
        for i, name in enumerate(sweep.column_names):
            cols[name] = infl[:, i].copy()
    order = np.asarray(order)
    if config.self_influence:
        t0 = time.perf_counter()
        eig, proj, how = (
            self_influence_factors(
                model,
                sites,
                curv_batches,
                curvature=config.curvature,
                direct_factors=factors,
                memory_budget_mb=config.memory_budget_mb,
                projection_k=config.projection_k,
                projection_seed=config.seed,
                impl=config.impl,
            )
            if config.curvature != "identity"
            else (None, None, {"space": "weights", "curvature": "identity"})
        )
        if eig is None:  # identity curvature: ∇ℓᵀ∇ℓ
            vals = np.stack(
                [self_norms(model, sites, train_batches, impl=config.impl)] * len(sweep.dampings), 1
            )
        else:
            vals = self_influence(model, sites, train_batches, eig, proj, sweep.dampings, impl=config.impl)
        names = [f"self_{c}" for c in sweep.column_names]  # self_influence, self_influence@<λ>
        for i, name in enumerate(names):
            col = np.empty(len(order), dtype=np.float64)
            col[order] = vals[:, i]
            cols[name] = col
        meta["self_influence"] = {**how, "columns": names}
        timings["self_influence"] = time.perf_counter() - t0
    per_query = None
    if config.per_query:
        t0 = time.perf_counter()
        M, records = per_query_influence(
            model,
            sites,
            train_batches,
            val_batches,
            curv_batches,
            plan=plan,
            dampings=config.dampings(),
            relative=config.damping_relative,
            tile=config.per_query_tile,
            tol=config.tol,
            max_iter=config.max_iter,
            impl=config.impl,
            projection_k=config.projection_k,
            projection_seed=config.seed,
            factors=factors,
        )
        rows = np.empty_like(M)
        rows[order] = M  # back to training order
        pos = {id(e): j for j, e in enumerate(val_batches.encoded)}
        rows = rows[:, [pos[id(e)] for e in val_enc], :]  # columns in validation input order
        per_query = {
            "matrix": rows,
            "row_ids": list(row_ids),
            "col_ids": [e.id for e in val_enc],
            "column_names": list(sweep.column_names),
            "dampings": list(sweep.dampings),
        }
        meta["per_query"] = {
            "tiles": records,
            "tile": int(config.per_query_tile),
            "shape": list(rows.shape[:2]),
            "tensors": list(sweep.column_names),
        }
        timings["per_query"] = time.perf_counter() - t0
    return {"metadata": meta, "timings": timings, "per_query": per_query}


def self_norms(
    model: nn.Module, sites: Sequence[LinearSite], batches, *, impl: str | None = None
) -> np.ndarray:
    """‖∇ℓ_i‖² of every pair (self-influence with the identity curvature)."""
    return stream_pair_dots(model, sites, batches, [], impl=impl, desc="squared gradient norms")[1].numpy()
