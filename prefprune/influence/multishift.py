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


class _ShiftedRecurrences:
    """The per-shift D-Lanczos state (L shifts × m columns) and its update from one Lanczos step."""

    def __init__(self, B: Tensor, shifts: Sequence[float]):
        k, m = B.shape
        dev, dt = B.device, B.dtype
        self.sig = torch.tensor([float(s) for s in shifts], dtype=dt, device=dev).view(-1, 1)  # (L, 1)
        L = self.sig.shape[0]
        beta0 = torch.linalg.vector_norm(B, dim=0)  # (m,)
        self.safe0 = torch.where(beta0 > 0, beta0, torch.ones_like(beta0))
        self.x = torch.zeros(L, k, m, dtype=dt, device=dev)
        self.p = torch.zeros(L, k, m, dtype=dt, device=dev)
        self.eta = torch.ones(L, m, dtype=dt, device=dev)
        self.zeta = beta0.expand(L, m).clone()
        self.rnorm = beta0.expand(L, m).clone()  # ‖r_{j−1}‖ of each shifted CG
        self.status = torch.full((L, m), CG_MAX_ITER, dtype=torch.int64, device=dev)
        self.iterations = torch.zeros(L, m, dtype=torch.int64, device=dev)
        self.curvature = torch.full((L, m), float("nan"), dtype=dt, device=dev)
        self.active = (beta0 > 0).expand(L, m).clone()
        self.status[~self.active] = CG_CONVERGED
        self.residual = torch.zeros(L, m, dtype=dt, device=dev)

    def step(self, j: int, v: Tensor, alpha: Tensor, beta: Tensor, beta_next: Tensor, exhausted: Tensor,
             tol: float) -> None:
        """Advance every active (shift, column) by Lanczos step j (vector v; α_j, β_j, β_{j+1})."""
        active = self.active
        a = alpha + self.sig  # (L, m) diagonal of T_j + σI
        if j == 0:
            eta_new = a
            zeta_new = self.zeta
        else:
            lam = beta / self.eta
            eta_new = a - lam * beta
            zeta_new = -lam * self.zeta
        bad = active & (eta_new <= 0)
        if bool(bad.any()):
            self.status[bad] = CG_NONPOSITIVE_CURVATURE
            self.curvature[bad] = (eta_new * self.rnorm.square())[bad]
            self.iterations[bad] += 1
            active = active & ~bad
        live = active.unsqueeze(1)
        safe_eta = torch.where(active, eta_new, torch.ones_like(eta_new)).unsqueeze(1)
        p_new = (v.unsqueeze(0) - beta.view(1, 1, -1) * self.p) / safe_eta
        self.p = torch.where(live, p_new, self.p)
        self.x = torch.where(live, self.x + zeta_new.unsqueeze(1) * p_new, self.x)
        r_new = beta_next * (zeta_new / torch.where(active, eta_new, torch.ones_like(eta_new))).abs()
        self.iterations[active] += 1
        self.residual = torch.where(active, r_new / self.safe0, self.residual)
        self.rnorm = torch.where(active, r_new, self.rnorm)
        self.eta = torch.where(active, eta_new, self.eta)
        self.zeta = torch.where(active, zeta_new, self.zeta)
        done = active & ((self.residual <= tol) | exhausted.unsqueeze(0))
        self.status[done] = CG_CONVERGED
        self.active = active & ~done


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
    state = _ShiftedRecurrences(B, shifts)
    v = B / state.safe0
    v_prev = torch.zeros_like(B)
    beta = torch.zeros(B.shape[1], dtype=B.dtype, device=B.device)
    products = 0
    for j in range(int(max_iter)):
        cols = state.active.any(0)
        if not bool(cols.any()):
            break
        idx = torch.nonzero(cols).flatten()
        w = torch.zeros_like(B)
        w[:, idx] = apply_H(v[:, idx].contiguous()).to(B.dtype)
        products += 1
        w = w - beta * v_prev
        alpha = (v * w).sum(0)
        w = w - alpha * v
        beta_next = torch.linalg.vector_norm(w, dim=0)
        # An exhausted Krylov space (β = 0 up to rounding) makes every shifted iterate exact.
        exhausted = beta_next <= torch.finfo(B.dtype).eps * state.safe0
        state.step(j, v, alpha, beta, beta_next, exhausted, tol)
        safe_beta = torch.where(beta_next > 0, beta_next, torch.ones_like(beta_next))
        v_prev, v = v, torch.where(exhausted, torch.zeros_like(w), w / safe_beta)
        beta = beta_next
    return MultiShiftResult(x=state.x, status=state.status, iterations=state.iterations,
                            residual=state.residual, curvature=state.curvature, products=products)
