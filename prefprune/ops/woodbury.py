"""The Gauss–Newton inverse (H_GN + λI)⁻¹ as a CG preconditioner, and several damping values as one CG call.

Preconditioned CG on the exact Hessian (issue 22): H = H_GN + (a residual term), so with
M_λ = (H_GN + λI)⁻¹ the preconditioned operator M_λ(H + λI) = I + M_λ(H − H_GN) is close to the identity
wherever the residual is small against λ, and CG needs a handful of iterations where plain CG needs many.

Why the damping values are columns of one call, not a multi-shift solve: multi-shift CG relies on the
Krylov space of H + λI being the same for every λ (K_j(H + λI, b) = K_j(H, b)), so one Hessian-vector
product per iteration serves all shifts. Preconditioning breaks that: M_λ(H + λI) is not a shift of one
fixed operator (not even with one M for every λ, since M(H + λI) = MH + λM), so every damping value has
its own Krylov space, iterates and stopping point. `damped_systems` therefore stacks the L damping values
as L·r columns of one (k, L·r) problem whose operator adds each column's own shift λ_j and whose
preconditioner applies each column's own (H_GN + λ_j I)⁻¹: one batched HVP pass over the curvature
sample per iteration serves all of them, each column stops on its own, and one eigendecomposition of
the n×n Gram serves every λ_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DampedSystems", "GaussNewtonWoodbury", "damped_systems"]

# Columns of U cast to float64 at a time while forming the Gram (bounds the float64 scratch of fp32 rows).
GRAM_CHUNK_COLS = 1 << 16


def gram_eigh(columns: Callable[[slice], Tensor], n: int, d: int, *, like: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the Gram K = U Uᵀ of (n, d) scaled rows U, built and decomposed in float64 a
    block of columns at a time (`columns(slice)` gives U[:, slice] in float64, so U itself is never held in
    float64). Returns the eigenvalues s (n,), clamped at 0 (K is PSD: negatives are rounding), and
    W = Vᵀ U (n, d) in `like`'s dtype and device, so that U = V W and UᵀU = Wᵀ W."""
    K = torch.zeros(n, n, dtype=torch.float64, device=like.device)
    for c0 in range(0, d, GRAM_CHUNK_COLS):
        u = columns(slice(c0, c0 + GRAM_CHUNK_COLS))
        K += u @ u.T
    s, V = torch.linalg.eigh(K)
    W = torch.empty(n, d, dtype=like.dtype, device=like.device)
    for c0 in range(0, d, GRAM_CHUNK_COLS):
        W[:, c0 : c0 + GRAM_CHUNK_COLS] = (V.T @ columns(slice(c0, c0 + GRAM_CHUNK_COLS))).to(like.dtype)
    return s.clamp(min=0.0), W


def _check_shifts(shifts: Tensor, what: str) -> None:
    bad = ~torch.isfinite(shifts) | (shifts <= 0)
    if bool(bad.any()):
        raise ValueError(
            f"{what} must be finite and > 0 (H_GN + λI is only positive definite for λ > 0), got "
            f"{shifts[bad].tolist()}"
        )


class GaussNewtonWoodbury:
    """M_λ = (H_GN + λI)⁻¹ for any λ > 0, applied to (p, m) blocks with a shift per column.

    H_GN = Jᵀ diag(w) J / n for n Gauss–Newton rows J (n, p) (∇m_i of the curvature sample) and weights
    w_i = σ(m_i)σ(−m_i). With U = diag(√(w/n)) J, K = U Uᵀ = V diag(s) Vᵀ (n×n) and W = Vᵀ U (rows
    orthogonal, ‖W_i‖² = s_i, H_GN = Wᵀ W), the Woodbury identity gives

        (H_GN + λI)⁻¹ R = (R − Wᵀ diag(1/(s + λ)) W R) / λ,

    two (n, p)-by-(p, m) GEMMs per application for every λ from the one eigendecomposition of K.
    The "gram" factors of `prefprune.gram.GaussNewtonEigen` (evals, basis) are exactly (s, W); a primal
    eigendecomposition H_GN = Eᵀ diag(s) E gives them as (s, diag(√s) E).

    Attributes:
        evals: (r,) float64 eigenvalues s ≥ 0 of H_GN's nonzero part.
        basis: (r, p) W, rows orthogonal with ‖W_i‖² = s_i.
    """

    def __init__(self, evals: Tensor, basis: Tensor):
        if basis.dim() != 2:
            raise ValueError(f"basis must be (r, p), got shape {tuple(basis.shape)}")
        if tuple(evals.shape) != (basis.shape[0],):
            raise ValueError(f"evals must have shape ({basis.shape[0]},) to match basis "
                             f"{tuple(basis.shape)}, got {tuple(evals.shape)}")
        evals = evals.to(torch.float64)
        if evals.numel() and not (bool(torch.isfinite(evals).all()) and float(evals.min()) >= 0):
            raise ValueError(f"evals must be finite and >= 0 (H_GN is positive semidefinite), got min "
                             f"{float(evals.min())}, max {float(evals.max())}")
        self.evals = evals
        self.basis = basis
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_rows(cls, rows: Tensor, weights: Tensor) -> GaussNewtonWoodbury:
        """From Gauss–Newton rows J (n, p) and weights w (n,) ≥ 0: H_GN = Jᵀ diag(w) J / n.

        The Gram K is formed and decomposed in float64; W is stored in the rows' dtype.
        """
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ValueError(f"rows must be a non-empty (n, p) tensor, got shape {tuple(rows.shape)}")
        n, p = rows.shape
        if tuple(weights.shape) != (n,):
            raise ValueError(f"weights must have shape ({n},) to match rows {tuple(rows.shape)}, "
                             f"got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"Gauss–Newton weights must be finite and >= 0, got min {float(weights.min())}, "
                             f"max {float(weights.max())}")
        scale = (weights.to(torch.float64) / n).sqrt().unsqueeze(1)
        s, W = gram_eigh(lambda cols: rows[:, cols].to(torch.float64) * scale, n, p, like=rows)
        return cls(s, W)

    @property
    def dim(self) -> int:
        """p, the length of the vectors M acts on."""
        return int(self.basis.shape[1])

    def _factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (self.basis.to(dtype=dtype, device=device),
                               self.evals.to(dtype=dtype, device=device))
        return self._cast[key]

    def _apply(self, R: Tensor, shifts: Tensor) -> Tensor:
        W, s = self._factors(R.dtype, R.device)
        C = (W @ R) / (s.unsqueeze(1) + shifts.unsqueeze(0))
        return (R - W.T @ C) / shifts.unsqueeze(0)

    def apply(self, R: Tensor, shifts: Tensor | Sequence[float] | float) -> Tensor:
        """(H_GN + λ_j I)⁻¹ R[:, j] for every column j.

        Args:
            R: (p, m) block (any strides), float32 or float64.
            shifts: λ > 0 for every column, (m,), or one value for all.

        Returns:
            (p, m) in R's dtype.
        """
        if R.dim() != 2 or R.shape[0] != self.dim:
            raise ValueError(f"R must be ({self.dim}, m), got shape {tuple(R.shape)}")
        lam = torch.as_tensor(shifts, dtype=R.dtype, device=R.device)
        if lam.dim() == 0:
            lam = lam.expand(R.shape[1])
        if tuple(lam.shape) != (R.shape[1],):
            raise ValueError(f"shifts must be one value or ({R.shape[1]},) for R {tuple(R.shape)}, "
                             f"got shape {tuple(lam.shape)}")
        _check_shifts(lam, "shifts")
        return self._apply(R, lam)


@dataclass(frozen=True)
class DampedSystems:
    """L damped systems (H + λ_l I) X_l = B (l = 1..L) as one CG problem of L·r columns.

    Column c = l·r + i is right-hand side i of damping value l (damping-major). Pass
    ``apply_A, B, precond=precond`` to `prefprune.ops.reference.cg_reference` or
    ``prefprune._C.cg_callable(apply_A, B, None, ..., precond=precond)``.

    Attributes:
        B: (k, L·r) the right-hand sides, repeated once per damping value.
        shifts: (L·r,) λ of every column, B's dtype and device.
        apply_A: P (k, L·r) ↦ H P + P diag(shifts): one batched H product for all columns.
        precond: R ↦ column c ↦ (H_GN + shifts_c I)⁻¹ R[:, c], or None (no preconditioner).
        dampings: the L values, in order.
    """

    B: Tensor
    shifts: Tensor
    apply_A: Callable[[Tensor], Tensor]
    precond: Callable[[Tensor], Tensor] | None
    dampings: tuple[float, ...]

    def split(self, values: Tensor) -> Tensor:
        """A solution (k, L·r) as (L, k, r), or per-column values (L·r,) (iterations, status) as (L, r)."""
        L = len(self.dampings)
        if values.dim() == 1:
            return values.reshape(L, -1)
        k = values.shape[0]
        return values.reshape(k, L, -1).permute(1, 0, 2)


def damped_systems(
    apply_H: Callable[[Tensor], Tensor],
    B: Tensor,
    dampings: Sequence[float],
    *,
    preconditioner: GaussNewtonWoodbury | None = None,
) -> DampedSystems:
    """Build the operator and the preconditioner that solve every damping value in one CG call.

    Args:
        apply_H: maps a (k, c) block P to H P for any c (e.g. batched autograd Hessian-vector products
            over the curvature sample); H symmetric, possibly indefinite.
        B: (k, r) right-hand sides (a (k,) vector is one column).
        dampings: L values λ_l > 0.
        preconditioner: the Gauss–Newton factors of the same curvature sample, or None (plain CG).

    Returns:
        A `DampedSystems` of L·r columns (see the module docstring for why not multi-shift).
    """
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if B.dim() != 2:
        raise ValueError(f"B must be (k, r), got shape {tuple(B.shape)}")
    values = tuple(float(x) for x in dampings)
    if not values:
        raise ValueError("dampings must hold at least one value, got none")
    bad = [x for x in values if not (math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"dampings must be finite and > 0 (H_GN + λI is only positive definite for λ > 0), "
                         f"got {bad} in {list(values)}")
    if preconditioner is not None and preconditioner.dim != B.shape[0]:
        raise ValueError(f"the preconditioner acts on vectors of length {preconditioner.dim} but B "
                         f"{tuple(B.shape)} has {B.shape[0]} rows")
    r = B.shape[1]
    shifts = torch.tensor(values, dtype=B.dtype, device=B.device).repeat_interleave(r)
    stacked = B.repeat(1, len(values))
    column_shift = shifts.unsqueeze(0)

    def apply_A(P: Tensor) -> Tensor:
        return apply_H(P) + P * column_shift

    precond = None
    if preconditioner is not None:
        pre = preconditioner

        def precond(R: Tensor) -> Tensor:
            return pre._apply(R, shifts)

    return DampedSystems(B=stacked, shifts=shifts, apply_A=apply_A, precond=precond, dampings=values)
