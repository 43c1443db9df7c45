"""Multi-shift conjugate gradient: (H + σ_l I) X = B for every shift σ_l from one Krylov space.

The Krylov space of H + σI does not depend on σ, so one Lanczos process on H (one product with H per
iteration, shared by every shift) yields the CG iterate of every shifted system at once. Per shift this
is D-Lanczos (Saad, *Iterative Methods for Sparse Linear Systems*, §6.7): the LU pivots η_j of the
shifted tridiagonal T_j + σI update the iterate with a short recurrence, the residual norm is
β_{j+1}|ζ_j/η_j|, and η_j = 1/α_j^CG, so CG's pᵀ(H + σI)p = η_j‖r_{j−1}‖² ≤ 0 is seen per shift exactly
as the ordinary CG loop sees it. Each shift keeps two vectors per column (iterate and direction).

Damping sweeps of `exact` (double-backward HVPs) and of `ggn` by CG use it: L damping values cost the
passes of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prefprune.ops.reference import CG_CONVERGED, CG_MAX_ITER, CG_NONPOSITIVE_CURVATURE, CG_STATUS_NAMES

__all__ = ["MultiShiftResult", "multishift_cg"]


@dataclass
class MultiShiftResult:
    """Solutions of (H + σ_l I) X = B for L shifts and m right-hand sides.

    Attributes:
        x: (L, k, m) solutions (for a shift stopped on non-positive curvature: its last iterate).
        status: (L, m) int64 `prefprune.ops.reference` CG codes.
        iterations: (L, m) int64, iterations each (shift, column) used.
        residual: (L, m) relative residual ‖b − (H + σI)x‖/‖b‖ as the recurrence tracks it.
        curvature: (L, m) pᵀ(H + σI)p that stopped a shift on non-positive curvature, NaN otherwise.
        products: calls of the H operator (each on the block of still-active columns).
    """

    x: Tensor
    status: Tensor
    iterations: Tensor
    residual: Tensor
    curvature: Tensor
    products: int

    def status_names(self) -> list[list[str]]:
        """Per shift, per column."""
        return [[CG_STATUS_NAMES[int(s)] for s in row] for row in self.status]


def multishift_cg(
    apply_H: Callable[[Tensor], Tensor],
    B: Tensor,
    shifts: Sequence[float],
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> MultiShiftResult:
    """Solve (H + σ_l I) X_l = B for every shift σ_l, H symmetric, one H-product per iteration.

    Args:
        apply_H: maps a (k, c) block to H times it (c = the columns still active).
        B: (k, m) right-hand sides.
        shifts: L values σ_l (damping values).
        tol: a (shift, column) stops when its residual ≤ tol·‖b‖.
        max_iter: at most this many H-products.

    Returns:
        `MultiShiftResult`.
    """
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if B.dim() != 2:
        raise ValueError(f"B must be (k, m), got shape {tuple(B.shape)}")
    if len(shifts) == 0:
        raise ValueError("shifts must hold at least one value")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    k, m = B.shape
    dev, dt = B.device, B.dtype
    sig = torch.tensor([float(s) for s in shifts], dtype=dt, device=dev).view(-1, 1)  # (L, 1)
    L = sig.shape[0]
    beta0 = torch.linalg.vector_norm(B, dim=0)  # (m,)
    safe0 = torch.where(beta0 > 0, beta0, torch.ones_like(beta0))
    v = B / safe0
    v_prev = torch.zeros_like(B)
    beta = torch.zeros(m, dtype=dt, device=dev)
    x = torch.zeros(L, k, m, dtype=dt, device=dev)
    p = torch.zeros(L, k, m, dtype=dt, device=dev)
    eta = torch.ones(L, m, dtype=dt, device=dev)
    zeta = beta0.expand(L, m).clone()
    rnorm = beta0.expand(L, m).clone()  # ‖r_{j−1}‖ of each shifted CG
    status = torch.full((L, m), CG_MAX_ITER, dtype=torch.int64, device=dev)
    iterations = torch.zeros(L, m, dtype=torch.int64, device=dev)
    curvature = torch.full((L, m), float("nan"), dtype=dt, device=dev)
    active = (beta0 > 0).expand(L, m).clone()
    status[~active] = CG_CONVERGED
    residual = torch.zeros(L, m, dtype=dt, device=dev)
    products = 0

    for j in range(int(max_iter)):
        cols = active.any(0)
        if not bool(cols.any()):
            break
        idx = torch.nonzero(cols).flatten()
        w = torch.zeros_like(B)
        w[:, idx] = apply_H(v[:, idx].contiguous()).to(dt)
        products += 1
        w = w - beta * v_prev
        alpha = (v * w).sum(0)
        w = w - alpha * v
        beta_next = torch.linalg.vector_norm(w, dim=0)

        a = alpha + sig  # (L, m) diagonal of T_j + σI
        if j == 0:
            eta_new = a
            zeta_new = zeta
        else:
            lam = beta / eta
            eta_new = a - lam * beta
            zeta_new = -lam * zeta
        bad = active & (eta_new <= 0)
        if bool(bad.any()):
            status[bad] = CG_NONPOSITIVE_CURVATURE
            curvature[bad] = (eta_new * rnorm.square())[bad]
            iterations[bad] += 1
            active = active & ~bad
        live = active.unsqueeze(1)
        safe_eta = torch.where(active, eta_new, torch.ones_like(eta_new)).unsqueeze(1)
        p_new = (v.unsqueeze(0) - beta.view(1, 1, m) * p) / safe_eta
        p = torch.where(live, p_new, p)
        x = torch.where(live, x + zeta_new.unsqueeze(1) * p_new, x)
        r_new = beta_next * (zeta_new / torch.where(active, eta_new, torch.ones_like(eta_new))).abs()
        iterations[active] += 1
        residual = torch.where(active, r_new / safe0, residual)
        rnorm = torch.where(active, r_new, rnorm)
        eta = torch.where(active, eta_new, eta)
        zeta = torch.where(active, zeta_new, zeta)
        # An exhausted Krylov space (β = 0 up to rounding) makes every shifted iterate exact.
        exhausted = beta_next <= torch.finfo(dt).eps * safe0
        done = active & ((residual <= tol) | exhausted.unsqueeze(0))
        status[done] = CG_CONVERGED
        active = active & ~done
        safe_beta = torch.where(beta_next > 0, beta_next, torch.ones_like(beta_next))
        v_prev, v = v, torch.where(exhausted, torch.zeros_like(w), w / safe_beta)
        beta = beta_next
    return MultiShiftResult(x=x, status=status, iterations=iterations, residual=residual,
                            curvature=curvature, products=products)
