"""Direct Gauss–Newton solves from one eigendecomposition: the n_h×n_h Gram (Woodbury) or the d×d matrix.

A Gauss–Newton curvature over a sample of n pairs, H = Φᵀ diag(w) Φ / n with rows Φ_i = ∇m_i (or their
projections P∇m_i) and w_i = σ(m_i)σ(−m_i), has rank ≤ n. With U = diag(√(w/n)) Φ (n×d):

- ``gram`` form (n ≤ d): K = U Uᵀ = V diag(s) Vᵀ; W = Vᵀ U has orthogonal rows with ‖W_j‖² = s_j and
  H = Wᵀ W, so (H + λI)⁻¹ B = (B − Wᵀ diag(1/(s + λ)) W B) / λ (Woodbury). One eigendecomposition of
  an n×n matrix; every further damping value costs O(n·m) in the Gram space plus its share of one
  lift GEMM Wᵀ Z for all values at once.
- ``primal`` form (d < n, or an explicit matrix such as a small exact Hessian): H = E diag(s) Eᵀ,
  (H + λI)⁻¹ B = E diag(1/(s + λ)) Eᵀ B. λ = 0 is allowed when H is positive definite.

Self-influence gᵀ(H + λI)⁻¹g follows from the same factors without another solve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prefprune.ops.woodbury import GRAM_CHUNK_COLS, gram_eigh

__all__ = ["GaussNewtonEigen"]


@dataclass
class GaussNewtonEigen:
    """An eigendecomposition of a symmetric curvature matrix H (d×d) in the form that fits.

    Attributes:
        form: "gram" (H = Wᵀ W with r ≤ d orthogonal rows W, eigenvalues s_j = ‖W_j‖²; every direction
            orthogonal to the rows has eigenvalue 0) or "primal" (H = Eᵀ diag(s) E, E (d, d) with
            orthonormal rows).
        dim: d.
        evals: (r,) float64 eigenvalues, ascending.
        basis: gram: W (r, d); primal: E (d, d) (rows are eigenvectors).
        n_rows: rows Φ the matrix was built from (0 for an explicit matrix).
    """

    form: str
    dim: int
    evals: Tensor
    basis: Tensor
    n_rows: int = 0

    # -----------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_rows(cls, rows: Tensor, weights: Tensor, *, form: str = "auto") -> GaussNewtonEigen:
        """H = rowsᵀ diag(weights) rows / n from (n, d) rows and (n,) non-negative weights.

        Args:
            form: "gram", "primal" or "auto" (gram when n ≤ d).
        """
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ValueError(f"rows must be a non-empty (n, d) tensor, got shape {tuple(rows.shape)}")
        n, d = rows.shape
        if tuple(weights.shape) != (n,):
            raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
        if bool((weights < 0).any()):
            raise ValueError("Gauss–Newton weights must be >= 0")
        if form == "auto":
            form = "gram" if n <= d else "primal"
        if form not in ("gram", "primal"):
            raise ValueError(f"form must be 'gram', 'primal' or 'auto', got {form!r}")
        scale = (weights.double() / n).sqrt().to(rows.dtype).unsqueeze(1)
        U = rows * scale
        if form == "primal":
            H = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
            for c0 in range(0, n, GRAM_CHUNK_COLS):
                u = U[c0 : c0 + GRAM_CHUNK_COLS].double()
                H += u.T @ u
            return cls._from_symmetric(H, n_rows=n, psd=True)
        # W = Vᵀ U in float64 chunks, stored in the rows' dtype (the memory the plan budgeted).
        s, W = gram_eigh(lambda cols: U[:, cols].double(), n, d, like=U)
        return cls("gram", d, s, W, n)

    @classmethod
    def from_matrix(cls, H: Tensor, *, psd: bool = False) -> GaussNewtonEigen:
        """An explicit symmetric (d, d) matrix (e.g. a small exact Hessian; it may be indefinite)."""
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
        return cls._from_symmetric(H.double(), n_rows=0, psd=psd)

    @classmethod
    def _from_symmetric(cls, H: Tensor, *, n_rows: int, psd: bool) -> GaussNewtonEigen:
        H = 0.5 * (H + H.T)
        s, E = torch.linalg.eigh(H)
        return cls("primal", int(H.shape[0]), s.clamp(min=0.0) if psd else s, E.T.contiguous(), n_rows)

    # -----------------------------------------------------------------------------------------
    # Queries
    # -----------------------------------------------------------------------------------------

    @property
    def trace(self) -> float:
        """trace(H) = Σ eigenvalues."""
        return float(self.evals.sum())

    @property
    def mean_eigenvalue(self) -> float:
        """trace(H) / d: the curvature's scale for relative damping (Kronfluence's convention)."""
        return self.trace / self.dim

    @property
    def min_eigenvalue(self) -> float:
        """The smallest eigenvalue of H (0 for a gram form with fewer rows than dimensions)."""
        lo = float(self.evals[0]) if self.evals.numel() else 0.0
        return min(lo, 0.0) if self.form == "gram" and self.evals.numel() < self.dim else lo

    def singular_for(self, damping: float) -> bool:
        """True when H + λI is not positive definite (its inverse is not what influence needs)."""
        top = float(self.evals.abs().max()) if self.evals.numel() else 0.0
        # An eigenvalue of H + λI within rounding of zero counts as singular: its inverse would be noise.
        floor = 64 * torch.finfo(torch.float64).eps * max(top, abs(damping), 1e-300)
        return self.min_eigenvalue + damping <= floor

    def solve(self, B: Tensor, dampings: Sequence[float]) -> Tensor:
        """(H + λ_l I)⁻¹ B for every damping value.

        Args:
            B: (d, m) right-hand sides.
            dampings: L values λ_l; each must leave H + λ_l I positive definite (see `singular_for`).

        Returns:
            (L, d, m) float64.
        """
        if B.dim() != 2 or B.shape[0] != self.dim:
            raise ValueError(f"B must be ({self.dim}, m), got shape {tuple(B.shape)}")
        lam = torch.tensor([float(x) for x in dampings], dtype=torch.float64, device=B.device)
        bad = [float(x) for x in lam if self.singular_for(float(x))]
        if bad:
            raise ValueError(
                f"H + λI is singular or indefinite for damping {bad} (smallest eigenvalue of H "
                f"{self.min_eigenvalue:.6g}, form {self.form!r}); use a larger damping"
            )
        B64 = B.double()
        m, L = B.shape[1], lam.numel()
        basis = self.basis.double() if self.basis.dtype != torch.float64 else self.basis
        C = basis @ B64  # (r, m)
        denom = self.evals.unsqueeze(1).unsqueeze(0) + lam.view(L, 1, 1)  # (L, r, 1)
        Z = (C.unsqueeze(0) / denom).permute(1, 0, 2).reshape(C.shape[0], L * m)  # (r, L·m)
        lifted = (basis.T @ Z).reshape(self.dim, L, m).permute(1, 0, 2)  # (L, d, m)
        if self.form == "primal":
            return lifted
        return (B64.unsqueeze(0) - lifted) / lam.view(L, 1, 1)

    def quadratic(self, G: Tensor, dampings: Sequence[float]) -> Tensor:
        """gᵀ (H + λ_l I)⁻¹ g for every row g of G (self-influence), every damping value.

        Args:
            G: (N, d) rows.

        Returns:
            (N, L) float64; NaN in a column whose H + λI is not positive definite.
        """
        if G.dim() != 2 or G.shape[1] != self.dim:
            raise ValueError(f"G must be (N, {self.dim}), got shape {tuple(G.shape)}")
        G64 = G.double()
        basis = self.basis.double() if self.basis.dtype != torch.float64 else self.basis
        S2 = (G64 @ basis.T).square()  # (N, r)
        out = torch.empty(G.shape[0], len(dampings), dtype=torch.float64, device=G.device)
        sq = G64.square().sum(1)
        for col, lam in enumerate(float(x) for x in dampings):
            if self.singular_for(lam):
                out[:, col] = math.nan
            elif self.form == "primal":
                out[:, col] = (S2 / (self.evals + lam)).sum(1)
            else:
                # (‖g‖² − Σ_j (W_j·g)²/(s_j + λ)) / λ; (W_j·g)² = s_j·(e_j·g)², so the bracket is ≥ 0.
                out[:, col] = (sq - (S2 / (self.evals + lam)).sum(1)) / lam
        return out
