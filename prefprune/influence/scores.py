"""The score columns from an influence query: pass 2's columns, one column per damping value, self-influence.

Columns (positive = helpful for all but train_loss and self_influence, DESIGN §2):

- ``influence`` = qᵀ∇ℓ_i (``influence@<λ>`` per damping value of a sweep),
- ``grad_dot`` = ∇L_Vᵀ∇ℓ_i, ``grad_cos`` = its cosine (0 for a zero gradient),
- ``train_loss`` = softplus(−m_i), ``margin`` = m_i,
- ``self_influence`` = ∇ℓ_iᵀ(H + λI)⁻¹∇ℓ_i (high = suspect, the mislabel detector): exact in weight space
  when the curvature's eigendecomposition is available there (``ggn`` direct; ``exact`` when the explicit
  p×p Hessian fits the memory budget), otherwise in the projected space of `projection_k`. One extra pass
  over the training pairs computes each pair's gradient row in that space, reduced at once to gᵀ(H + λI)⁻¹g.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune.data import PairBatches
from prefprune.influence.curvature import ExactHessian, ProjectedGaussNewton
from prefprune.influence.eigen import GaussNewtonEigen
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.plan import CurvatureSolve
from prefprune.influence.query import InfluenceQuery
from prefprune.influence.reducers import pair_gradient_rows, stream_pair_dots
from prefprune.influence.solvers import DirectFactors

__all__ = [
    "damping_columns",
    "margin_columns",
    "self_influence",
    "self_influence_columns",
    "self_influence_inverse",
    "self_norms",
    "similarity_columns",
    "stream_scores",
]


def stream_scores(
    model: nn.Module,
    layout: ParameterLayout,
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
    by one fused call as soon as its Δ exists (`stream_pair_dots`), so neither a per-pair gradient nor a
    second layer's capture is ever held.

    Args:
        batches: the training pairs.
        q: (p,) influence query (H + λI)⁻¹ ∇L_V, or (p, L) one per damping value (then influence is
            (n, L)); g_val: (p,) ∇L_V.
        precision: dtype of the forward and the capture (None: the model's); accumulation is fp32.

    Returns:
        name → (n,) float64 arrays: influence, grad_dot, grad_cos, train_loss, margin.
    """
    qs = list(q.reshape(q.shape[0], -1).unbind(1))  # one influence query per damping value
    dots, sqnorm, margin = stream_pair_dots(model, layout, batches, [*qs, g_val], dtype=precision, impl=impl,
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


def damping_columns(cols: dict[str, np.ndarray], record: CurvatureSolve) -> dict:
    """Split pass 2's (n, L) influence into ``influence`` (the first damping value) and ``influence@<λ>``.

    `cols` is updated in place. Returns the sidecar's entries of the damping values.
    """
    infl = cols["influence"]
    if infl.ndim == 2:
        cols["influence"] = infl[:, 0].copy()
        for i, name in enumerate(record.column_names):
            cols[name] = infl[:, i].copy()
    return {
        "solve_plan": record.plan,
        "damping_scale": record.damping_scale,
        "preconditioner": record.preconditioner,
        "curvature_passes": record.curvature_passes,
        "damping_columns": [
            {
                "column": name,
                "damping": lam,
                "damping_factor": None if record.damping_factors is None else record.damping_factors[i],
                **record.columns[i],
            }
            for i, (name, lam) in enumerate(zip(record.column_names, record.dampings, strict=True))
        ],
    }


def self_influence_inverse(
    curvature, query: InfluenceQuery, *, memory_budget_mb: float, projection_k: int, projection_seed: int
) -> tuple[DirectFactors, dict]:
    """The eigendecomposition self-influence uses (with the curvature whose space it lives in) and a record.

    Weight space when exact: the direct Gauss–Newton factors, or (``exact``) the explicit Hessian built
    from p batched HVP columns in one pass when 3·p²·8 bytes fit the budget. Otherwise the projected
    Gauss–Newton rows of the curvature sample (one pass).
    """
    if query.inverse is not None:
        space = query.inverse.curvature.space
        return query.inverse, {"space": space, "curvature": curvature.name, "passes": 0}
    p = curvature.layout.numel
    if isinstance(curvature, ExactHessian) and 3 * p * p * 8 <= memory_budget_mb * (1 << 20):
        eigen = GaussNewtonEigen.from_matrix(curvature.matrix().double())
        return DirectFactors(eigen, curvature), {"space": "weights", "curvature": "exact", "passes": 1}
    projected = ProjectedGaussNewton(curvature.model, curvature.layout, curvature.batches,
                                     impl=curvature.impl, projection_k=projection_k,
                                     projection_seed=projection_seed)
    eigen = GaussNewtonEigen.from_rows(*projected.rows())
    how = {"space": "projected", "curvature": "projected_ggn", "projection_dim": projected.dim, "passes": 1}
    return DirectFactors(eigen, projected), how


def self_influence(
    model: nn.Module,
    layout: ParameterLayout,
    train_batches: PairBatches,
    inverse: DirectFactors,
    dampings: Sequence[float],
    *,
    impl: str | None = None,
) -> np.ndarray:
    """(n, L) gᵀ(H + λ_l I)⁻¹g of every training pair's loss gradient (in the inverse's space).

    A damping value whose H + λI is not positive definite gives a NaN column (see `GaussNewtonEigen`).
    """
    out = []
    for _, rows in pair_gradient_rows(model, layout, train_batches, objective=lambda m: F.softplus(-m),
                                      projector=inverse.curvature.projector, impl=impl):
        out.append(inverse.eigen.quadratic(rows, dampings).cpu())
    return torch.cat(out).numpy()


def self_norms(model: nn.Module, layout: ParameterLayout, batches: PairBatches, *,
               impl: str | None = None) -> np.ndarray:
    """‖∇ℓ_i‖² of every pair (self-influence with the identity curvature)."""
    return stream_pair_dots(model, layout, batches, [], impl=impl, desc="squared gradient norms")[1].numpy()


def self_influence_columns(
    curvature, query: InfluenceQuery, train_batches: PairBatches, order: Sequence[int], cols: dict, *, config
) -> tuple[dict, float]:
    """Add ``self_influence`` (``self_influence@<λ>``) to `cols` (training-set order; `order[k]` = training
    index of the k-th pair of `train_batches`). Returns the sidecar record and the seconds it took."""
    t0 = time.perf_counter()
    model, layout, record = curvature.model, curvature.layout, query.record
    if config.curvature == "identity":  # ∇ℓᵀ∇ℓ
        how = {"space": "weights", "curvature": "identity"}
        norms = self_norms(model, layout, train_batches, impl=config.impl)
        vals = np.stack([norms] * len(record.dampings), 1)
    else:
        inverse, how = self_influence_inverse(curvature, query, memory_budget_mb=config.memory_budget_mb,
                                              projection_k=config.projection_k, projection_seed=config.seed)
        vals = self_influence(model, layout, train_batches, inverse, record.dampings, impl=config.impl)
    names = [f"self_{c}" for c in record.column_names]  # self_influence, self_influence@<λ>
    order = np.asarray(order)
    for i, name in enumerate(names):
        col = np.empty(len(order), dtype=np.float64)
        col[order] = vals[:, i]
        cols[name] = col
    return {**how, "columns": names}, time.perf_counter() - t0
