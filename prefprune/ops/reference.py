"""Pure-PyTorch reference of every op: the test oracle, the CPU fallback, the benchmark baseline.

Fast paths (Triton in `prefprune.kernels`, native in `prefprune._C`) keep these signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Conjugate gradient
# ---------------------------------------------------------------------------------------------

CG_CONVERGED = 0
CG_MAX_ITER = 1
CG_NONPOSITIVE_CURVATURE = 2
CG_STATUS_NAMES = {CG_CONVERGED: "converged", CG_MAX_ITER: "max_iter", CG_NONPOSITIVE_CURVATURE: "nonpositive_curvature"}


@dataclass
class CGResult:
    """Solution of A X = B for m right-hand sides, with a status per column.

    Attributes:
        x: (k, m) solution (for a column stopped on non-positive curvature: the last iterate).
        status: (m,) int64, one of CG_CONVERGED, CG_MAX_ITER, CG_NONPOSITIVE_CURVATURE.
        iterations: (m,) int64, the number of A-products that column used.
        residual: (m,) relative residual ||r|| / ||b|| at the end (0 for a zero column of B).
        curvature: (m,) the value pᵀAp that stopped a column on non-positive curvature, NaN otherwise.
        history: (iters + 1, m) relative residual after each iteration (row 0: before any),
            frozen columns repeat their last value; None unless requested.
    """

    x: Tensor
    status: Tensor
    iterations: Tensor
    residual: Tensor
    curvature: Tensor
    history: Tensor | None = None

    def status_names(self) -> list[str]:
        return [CG_STATUS_NAMES[int(s)] for s in self.status]


def factored_operator(G: Tensor, w: Tensor, damping: float) -> Callable[[Tensor], Tensor]:
    """X ↦ (Gᵀ diag(w) G / n + λI) X for G (n×k), w (n,), X (k×m)."""
    n = G.shape[0]
    return lambda X: G.T @ (w.unsqueeze(1) * (G @ X)) / n + damping * X


def cg_reference(
    apply_A: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    diag: Tensor | None = None,
    record_history: bool = False,
) -> CGResult:
    """Preconditioned conjugate gradient on m columns at once, each with its own α, β and stop.

    Args:
        apply_A: maps a (k, m) block P to A P; A must be symmetric.
        B: (k, m) right-hand sides (a (k,) vector is treated as one column).
        tol: stop a column when ||r|| <= tol * ||b||.
        max_iter: at most this many A-products per column.
        diag: (k,) diagonal of A for the Jacobi preconditioner (None: no preconditioner).
        record_history: keep the relative residual of every iteration.

    Iteration (per column; frozen columns keep their values):
        r = b, z = M⁻¹r, p = z
        repeat: q = A p; if pᵀq <= 0 stop (non-positive curvature); α = rᵀz / pᵀq;
                x += α p; r -= α q; if ||r|| <= tol ||b|| stop (converged);
                z = M⁻¹ r; β = rᵀz_new / rᵀz_old; p = z + β p
    """
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if B.dim() != 2:
        raise ValueError(f"B must be (k, m), got shape {tuple(B.shape)}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if diag is not None and (diag.shape != (B.shape[0],)):
        raise ValueError(f"diag must have shape ({B.shape[0]},), got {tuple(diag.shape)}")
    k, m = B.shape
    dev, dt = B.device, B.dtype
    inv_diag = None if diag is None else (1.0 / diag.to(dt)).unsqueeze(1)

    def precond(r: Tensor) -> Tensor:
        return r if inv_diag is None else inv_diag * r

    x = torch.zeros_like(B)
    r = B.clone()
    b_norm = torch.linalg.vector_norm(B, dim=0)
    safe_b = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(0)
    status = torch.full((m,), CG_MAX_ITER, dtype=torch.int64, device=dev)
    iterations = torch.zeros(m, dtype=torch.int64, device=dev)
    curvature = torch.full((m,), float("nan"), dtype=dt, device=dev)
    rel = torch.linalg.vector_norm(r, dim=0) / safe_b
    active = b_norm > 0
    status[~active] = CG_CONVERGED
    rel = torch.where(active, rel, torch.zeros_like(rel))
    history = [rel.clone()] if record_history else None

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = apply_A(p)
        pq = (p * q).sum(0)
        bad = active & (pq <= 0)
        if bool(bad.any()):
            status[bad] = CG_NONPOSITIVE_CURVATURE
            curvature[bad] = pq[bad]
            iterations[bad] += 1
            active = active & ~bad
        alpha = torch.where(active, rz / torch.where(active, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x = x + alpha * p
        r = r - alpha * q
        iterations[active] += 1
        rel = torch.where(active, torch.linalg.vector_norm(r, dim=0) / safe_b, rel)
        done = active & (rel <= tol)
        status[done] = CG_CONVERGED
        active = active & ~done
        z = precond(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = torch.where(active, z + beta * p, p)
        rz = torch.where(active, rz_new, rz)
        if history is not None:
            history.append(rel.clone())

    return CGResult(
        x=x,
        status=status,
        iterations=iterations,
        residual=rel,
        curvature=curvature,
        history=torch.stack(history) if history is not None else None,
    )
