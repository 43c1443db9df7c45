"""Validation gradient and the curvature solve q = (H + λI)⁻¹ ∇L_V (exact, Gauss–Newton or identity).

H is the Hessian of the mean training loss L(θ) = mean_i softplus(−m_i) over the curvature set
(DESIGN §2), applied to vectors in the flat layout of `prefprune.grads`:

- ``exact``: Hessian–vector products by double backward. Fused attention kernels (sdpa, flash)
  have no double backward, so the model runs with eager attention while the solve runs.
- ``ggn``: Gauss–Newton products H_GN V = mean_i w_i ∇m_i (∇m_iᵀ V), w_i = σ(m_i)σ(−m_i), from one
  ordinary forward+backward of Σ m_i per batch: ∇m_iᵀ V are fused segment dots of the captured
  (X, Δ), and the sum Σ_i c_i ∇m_i is Σ_t c_{i(t)} Δ_tᵀ X_t per layer. PSD by construction.
- ``projected_ggn``: the Gauss–Newton matrix in a Kronecker random-projection space (LoGra-style):
  rows Φ_i = P_out ∇m_i P_inᵀ per layer (k_out×k_in numbers, stored for the curvature set), the
  system (Φᵀ diag(w) Φ / n + λI) q_p = P ∇L_V solved natively on the factor, and the query lifted
  back, q = Pᵀ q_p, so pass 2 scores ∇ℓ_iᵀ q = (P∇ℓ_i)ᵀ q_p with the same fused dot.
- ``identity``: q = ∇L_V (influence reduces to grad_dot).

The solve is `prefprune.cg.solve` on a callable operator; its status per column is turned into a
`SolveInfo`, and non-positive curvature raises `NonPositiveCurvatureError` unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune import cg
from prefprune.data.batching import PairBatches
from prefprune.distributed import cat_over_ranks, sum_over_ranks
from prefprune.grads import (
    LinearSite,
    SegmentCapture,
    StreamingCapture,
    capture_pairs,
    flatten_site_matrices,
    iter_layouts,
    pair_dots,
    pair_margins,
    split_flat,
)
from prefprune.model import eager_attention
from prefprune.ops import dispatch
from prefprune.ops.segment import KroneckerProjector, segment_project

logger = logging.getLogger(__name__)

__all__ = [
    "CURVATURES",
    "Curvature",
    "NonPositiveCurvatureError",
    "SolveInfo",
    "exact_hvp",
    "ggn_product",
    "mean_gradient",
    "projected_ggn_rows",
    "solve_query",
]

#: The Hessians influence can use (DESIGN.md §2); the one list every setting and check derives from.
Curvature = Literal["exact", "ggn", "projected_ggn", "identity"]
CURVATURES: tuple[str, ...] = typing.get_args(Curvature)


class NonPositiveCurvatureError(RuntimeError):
    """CG met pᵀ(H + λI)p <= 0: the damped Hessian is not positive definite along p."""


def _params(sites: Sequence[LinearSite]) -> list[nn.Parameter]:
    return [p for s in sites for p in s.parameters()]


def _flat_grads(sites: Sequence[LinearSite], grads: Sequence[Tensor | None]) -> Tensor:
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(_params(sites), grads, strict=True)]
    mats, k = [], 0
    for s in sites:
        n_p = len(s.parameters())
        mats.append(s.augmented(grads[k : k + n_p]))
        k += n_p
    return flatten_site_matrices(mats)


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
    model: nn.Module, sites: Sequence[LinearSite], batches: PairBatches, *, desc: str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """∇ mean_i softplus(−m_i) over all pairs of `batches` (e.g. ∇L_V), in the flat layout.

    Returns:
        (p,) mean gradient and (n,) margins.
    """
    if batches.n_pairs == 0:
        raise ValueError("cannot take the mean gradient of an empty set of pairs")
    params = _params(sites)
    total: Tensor | None = None
    margins, flags = [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        with torch.enable_grad():
            m = pair_margins(model, batch)
            grads = torch.autograd.grad(F.softplus(-m).sum(), params, allow_unused=True)
        # Per parameter: a non-finite gradient in this batch? Read once at the end (no sync per batch).
        none = torch.zeros((), dtype=torch.bool, device=m.device)
        flags.append(torch.stack([none if g is None else ~torch.isfinite(g).all() for g in grads]))
        flat = _flat_grads(sites, grads)
        total = flat if total is None else total + flat
        margins.append(m.detach())
    # A sharded set (one shard per rank): the sum and the margins over every rank's pairs.
    mean = sum_over_ranks(batches, total) / batches.n_pairs
    all_margins = cat_over_ranks(batches, torch.cat(margins))
    # After the collectives, so that every rank stops (a NaN of one rank's pairs reaches every sum).
    names = [s.name for s in sites for _ in s.parameters()]
    _check_finite_batches(torch.stack(flags).cpu(), names, batches, desc or "gradient pass")
    if not bool(torch.isfinite(mean).all()):
        raise FloatingPointError(f"{desc or 'gradient pass'}: non-finite mean gradient (from another rank's "
                                 "pairs); no scores are written")
    return mean, all_margins


def exact_hvp(
    model: nn.Module, sites: Sequence[LinearSite], batches: PairBatches
) -> Callable[[Tensor], Tensor]:
    """V ↦ H V for the Hessian of the mean loss over `batches`, by double backward.

    Call the result inside `eager_attention(model)`, with right-padded batches (eager attention
    produces NaN for fully masked left-padding rows).

    Returns:
        A function mapping (p, m) to (p, m).
    """
    params = _params(sites)
    n = batches.n_pairs

    def apply(V: Tensor) -> Tensor:
        Vs = split_flat(V, sites)  # per site (m, d_out, d_in')
        out = torch.zeros_like(V)
        for batch in batches:
            with torch.enable_grad():
                loss = F.softplus(-pair_margins(model, batch)).sum() / n
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                gflat = _flat_grads(sites, grads)
                for j in range(V.shape[1]):
                    v = flatten_site_matrices([q[j] for q in Vs])
                    hv = torch.autograd.grad(
                        gflat @ v, params, retain_graph=j + 1 < V.shape[1], allow_unused=True
                    )
                    out[:, j] += _flat_grads(sites, hv)
        return sum_over_ranks(batches, out)

    return apply


def ggn_product(
    model: nn.Module, sites: Sequence[LinearSite], batches: PairBatches, *, impl: str | None = None
) -> Callable[[Tensor], Tensor]:
    """V ↦ H_GN V = mean_i σ(m_i)σ(−m_i) ∇m_i ∇m_iᵀ V over `batches`, without double backward.

    Returns:
        A function mapping (p, m) to (p, m).
    """
    n = batches.n_pairs

    def apply(V: Tensor) -> Tensor:
        Qs = split_flat(V, sites)
        acc = [torch.zeros_like(q) for q in Qs]
        with SegmentCapture(sites) as cap:
            for batch in batches:
                margins, packed = capture_pairs(model, cap, batch, lambda m: m)
                jv, _ = pair_dots(packed, Qs, impl=impl)  # (N, m) = ∇m_iᵀ V
                w = torch.sigmoid(margins) * torch.sigmoid(-margins)
                c = (w.unsqueeze(1) * jv.to(V.dtype) / n).to(V.dtype)
                for k, layer in enumerate(packed):
                    if layer.X.shape[0] == 0:
                        continue
                    ct = c[layer.segment_ids()]  # (T, m)
                    # Σ_t c_{i(t),j} Δ_tᵀ X_t for every column j at once.
                    acc[k] += torch.einsum("tj,to,ti->joi", ct, layer.dY.to(V.dtype), layer.X.to(V.dtype))
        return sum_over_ranks(batches, flatten_site_matrices(acc))

    return apply


def _projector(sites: Sequence[LinearSite], k: int, seed: int, device: torch.device):
    return KroneckerProjector([(s.d_out, s.d_in) for s in sites], k_out=k, k_in=k, seed=seed, device=device)


def projected_ggn_rows(
    model: nn.Module, sites: Sequence[LinearSite], batches: PairBatches, projector, *, impl: str | None = None
) -> tuple[Tensor, Tensor]:
    """Projected margin gradients Φ_i = P ∇m_i of every pair and the Gauss–Newton weights.

    Args:
        projector: a `prefprune.ops.segment.KroneckerProjector` over the sites' (d_out, d_in') shapes.

    Returns:
        (n, dim) rows (fp32; fp64 for fp64 models) and (n,) weights σ(m_i)σ(−m_i).
    """
    rows, weights = [], []
    wide = torch.float64 if sites[0].module.weight.dtype == torch.float64 else torch.float32
    with StreamingCapture(sites) as cap:
        for batch, layout in iter_layouts(batches.on("cpu"), batches.device):
            block = torch.zeros(layout.n_pairs, projector.dim, dtype=wide, device=batches.device)

            def reduce(k: int, X: Tensor, dY: Tensor, offsets: Tensor, block=block) -> None:
                # Each layer's projected block is written as soon as its Δ exists (one layer held at a time).
                block[:, projector.slices[k]] = segment_project(
                    X, dY, offsets, projector.P_in[k], projector.P_out[k], impl=impl, offsets_checked=True
                ).to(wide)

            margins = cap.run(model, batch, layout, lambda m: m, reduce)
            rows.append(block)
            weights.append(torch.sigmoid(margins) * torch.sigmoid(-margins))
    weights = cat_over_ranks(batches, torch.cat(weights))
    return cat_over_ranks(batches, torch.cat(rows)), weights.to(rows[0].dtype)


@dataclass
class SolveInfo:
    """How the query q = (H + λI)⁻¹ ∇L_V was obtained.

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
        impl: CG implementation used ("reference" or "native"; "none" for identity).
        seconds: wall time of the solve.
        projection_dim: size of the projected space (projected_ggn only).
        method: "cg", "direct", "multishift" or "none" (see `prefprune.solve.plan_solve`).
        curvature_passes: forward+backward passes over the curvature sample (direct ggn: 1).
        damping_factor: the factor given with relative damping (None for absolute damping).
        damping_scale: trace(H)/d that relative damping multiplies (None when not computed).
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

    def to_dict(self) -> dict:
        return asdict(self)


def _cg_impl_name(operator: Callable, B: Tensor, impl: str | None) -> str:
    want = dispatch.requested_impl(impl)
    if want in ("auto", "native") and not cg.native_reasons(operator, B):
        return "native"
    return "reference"


def solve_query(
    model: nn.Module,
    sites: Sequence[LinearSite],
    b: Tensor,
    curvature_batches: PairBatches | None,
    *,
    curvature: str,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    on_nonpositive: str = "raise",
    impl: str | None = None,
    progress: bool = False,
    projection_k: int = 16,
    projection_seed: int = 0,
) -> tuple[Tensor, SolveInfo]:
    """Solve (H + λI) q = b for one right-hand side.

    Args:
        b: (p,) right-hand side, e.g. ∇L_V.
        curvature_batches: the curvature set (unused for "identity").
        curvature: "exact", "ggn", "projected_ggn" or "identity".
        damping: λ (> 0 for exact, >= 0 otherwise).
        tol, max_iter: CG stopping rule (relative residual, iteration cap).
        on_nonpositive: "raise" (NonPositiveCurvatureError) or "nan" (q filled with NaN, status kept).
        impl: CG / segment-op implementation request (see `prefprune.cg.solve`).
        projection_k: projected_ggn: k_in = k_out per layer (a side at most this wide stays exact).
        projection_seed: projected_ggn: seed of the projection matrices.

    Returns:
        (p,) q (for projected_ggn the lifted Pᵀ q_p) and the `SolveInfo`.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if on_nonpositive not in ("raise", "nan"):
        raise ValueError(f"on_nonpositive must be 'raise' or 'nan', got {on_nonpositive!r}")
    if not math.isfinite(damping) or damping < 0 or (curvature == "exact" and damping <= 0):
        need = "> 0 with curvature=exact" if curvature == "exact" else ">= 0"
        raise ValueError(f"damping must be {need}, got {damping!r}")
    t0 = time.perf_counter()
    n_curv = 0 if curvature_batches is None else curvature_batches.n_pairs
    if curvature == "identity":
        return b.clone(), SolveInfo(
            curvature, float(damping), "not_solved", 0, 0.0, None, None, n_curv, tol, max_iter, "none",
            time.perf_counter() - t0,
        )
    if curvature_batches is None or n_curv == 0:
        raise ValueError(f"curvature={curvature!r} needs a non-empty curvature set")

    projected = None
    if curvature == "projected_ggn":
        if int(projection_k) < 1:
            raise ValueError(f"projection_k must be >= 1, got {projection_k!r}")
        projector = _projector(sites, int(projection_k), int(projection_seed), b.device)
        rows, w = projected_ggn_rows(model, sites, curvature_batches, projector, impl=impl)
        op = cg.FactoredOperator(G=rows, w=w, damping=float(damping))
        B = projector.project_query([x.unsqueeze(0) for x in split_flat(b, sites)]).to(rows.dtype).T
        projected = (projector, op, B)
    elif curvature == "exact":
        # Eager attention turns a fully masked query row (a left-padding position) into NaN, which
        # 0·NaN then spreads to real tokens; with right padding no row is fully masked, and rewards
        # do not depend on the padding side (see `pair_margins`).
        right = curvature_batches.with_padding("right")
        product, ctx = exact_hvp(model, sites, right), eager_attention(model)
    else:
        product, ctx = ggn_product(model, sites, curvature_batches, impl=impl), contextlib.nullcontext()

    if projected is not None:
        projector, op, B = projected
        cg_impl = _cg_impl_name(op, B, impl)
        res = cg.solve(op, B, tol=tol, max_iter=max_iter, impl=impl)
        # Lift q_p back to weight space: ∇ℓ_iᵀ (Pᵀ q_p) = (P ∇ℓ_i)ᵀ q_p, scored by the same fused dot.
        q = flatten_site_matrices([x[0] for x in projector.lift(res.x.T.to(b.dtype))])
    else:
        bar = tqdm(total=max_iter, desc=f"CG ({curvature})", disable=not progress, leave=False)

        def operator(V: Tensor) -> Tensor:
            bar.update(1)
            return product(V) + damping * V

        B = b.unsqueeze(1)
        cg_impl = _cg_impl_name(operator, B, impl)
        try:
            with ctx:
                res = cg.solve(operator, B, tol=tol, max_iter=max_iter, impl=impl)
        finally:
            bar.close()
        q = res.x[:, 0]
    status = res.status_names()[0]
    iters = int(res.iterations[0])
    info = SolveInfo(
        curvature=curvature,
        damping=float(damping),
        status=status,
        iterations=iters,
        residual=float(res.residual[0]),
        nonpositive_value=float(res.curvature[0]) if status == "nonpositive_curvature" else None,
        nonpositive_iteration=iters if status == "nonpositive_curvature" else None,
        n_curvature=n_curv,
        tol=float(tol),
        max_iter=int(max_iter),
        impl=cg_impl,
        seconds=time.perf_counter() - t0,
        projection_dim=None if projected is None else int(projected[1].k),
        # One pass per operator product by CG; the projected rows are taken in one pass.
        curvature_passes=1 if projected is not None else iters,
    )
    if status == "nonfinite":
        raise FloatingPointError(
            f"the curvature solve met a non-finite value (curvature={curvature!r}, damping={damping!r}, "
            f"after {iters} iterations): the validation gradient or a curvature product holds NaN or inf; "
            "no scores are written from it (check the model's dtype, attention implementation and padding)"
        )
    if status == "nonpositive_curvature":
        msg = (
            f"CG met non-positive curvature pᵀ(H + λI)p = {info.nonpositive_value:.6g} at iteration {iters} "
            f"(curvature={curvature!r}, damping={damping!r}): the damped Hessian is not positive definite, "
            "so its inverse is not what influence needs; increase damping or use curvature='ggn'"
        )
        if on_nonpositive == "raise":
            raise NonPositiveCurvatureError(msg)
        logger.warning("%s; the influence column is NaN", msg)
        q = torch.full_like(q, float("nan"))
    elif status == "max_iter":
        logger.warning(
            "CG stopped at the iteration cap %d with relative residual %.3g > tol %.3g "
            "(curvature=%r, damping=%r)",
            max_iter, info.residual, tol, curvature, damping,
        )
    return q, info
