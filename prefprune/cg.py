"""Conjugate-gradient solves of (H + λI) Q = B for many right-hand sides, native when built.

`solve` dispatches between the native loop in `prefprune._C` (C++ over ATen, with fused CUDA
update kernels in CUDA builds) and the pure-PyTorch `cg_reference`; both follow the same
algorithm and return the same `CGResult`. A factored solve without history goes through the dispatcher
op `torch.ops.prefprune.cg_factored` (registered by `prefprune._C`; a Meta kernel gives its output
shapes, so it composes with torch.compile; `check_every=0` keeps host syncs out for CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from prefprune import _ext
from prefprune.ops import dispatch
from prefprune.ops.reference import (
    CG_CONVERGED,
    CG_MAX_ITER,
    CG_NONFINITE,
    CG_NONPOSITIVE_CURVATURE,
    CG_STATUS_NAMES,
    CGResult,
    cg_reference,
    factored_operator,
)

__all__ = [
    "CG_CONVERGED",
    "CG_MAX_ITER",
    "CG_NONFINITE",
    "CG_NONPOSITIVE_CURVATURE",
    "CG_STATUS_NAMES",
    "CGResult",
    "FactoredOperator",
    "native_reasons",
    "solve",
]

_NATIVE_DTYPES = (torch.float32, torch.float64)
_NATIVE_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class FactoredOperator:
    """A = Gᵀ diag(w) G / n + λI, applied without forming A.

    Attributes:
        G: (n, k) factor, e.g. per-example gradients (projected) as rows.
        w: (n,) weight per row, e.g. σ(m)σ(−m) for the Gauss–Newton matrix.
        damping: λ, added to the diagonal.
    """

    G: Tensor
    w: Tensor
    damping: float

    def __post_init__(self) -> None:
        if not isinstance(self.G, Tensor) or self.G.dim() != 2:
            shape = tuple(self.G.shape) if isinstance(self.G, Tensor) else type(self.G).__name__
            raise ValueError(f"FactoredOperator.G must be a 2-D (n, k) tensor, got {shape}")
        if not isinstance(self.w, Tensor) or tuple(self.w.shape) != (self.G.shape[0],):
            shape = tuple(self.w.shape) if isinstance(self.w, Tensor) else type(self.w).__name__
            raise ValueError(f"FactoredOperator.w must have shape ({self.G.shape[0]},), got {shape}")
        if self.G.shape[0] == 0:
            raise ValueError("FactoredOperator.G must have at least one row, got shape (0, k)")
        if not math.isfinite(float(self.damping)):
            raise ValueError(f"FactoredOperator.damping must be finite, got {self.damping!r}")

    @property
    def k(self) -> int:
        """Dimension of the system (columns of G)."""
        return int(self.G.shape[1])

    def __call__(self, X: Tensor) -> Tensor:
        """A X for X (k, m)."""
        return factored_operator(self.G, self.w, float(self.damping))(X)

    def diagonal(self) -> Tensor:
        """(k,) diagonal of A, Σ_i w_i G_ij² / n + λ: the Jacobi preconditioner's input."""
        return (self.w.unsqueeze(1) * self.G.square()).sum(0) / self.G.shape[0] + float(self.damping)


def native_reasons(operator: FactoredOperator | Callable[[Tensor], Tensor], B: Tensor, *,
                   precond: Callable[[Tensor], Tensor] | None = None) -> list[str]:
    """Why the native solver cannot run these inputs (empty list: it can)."""
    reasons: list[str] = []
    mod = _ext.native()
    if mod is None:
        reasons.append(f"prefprune._C not built: {_ext.native_error()}")
    elif not hasattr(mod, "cg_factored"):
        reasons.append("prefprune._C was built without the CG solver; rebuild it")
    if B.dtype not in _NATIVE_DTYPES:
        reasons.append(f"dtype {B.dtype} not supported (float32, float64)")
    if B.device.type not in _NATIVE_DEVICES:
        reasons.append(f"device {B.device} not supported (cpu, cuda)")
    if isinstance(operator, FactoredOperator) and operator.G.dtype != B.dtype:
        reasons.append(f"G dtype {operator.G.dtype} differs from B dtype {B.dtype}")
    if isinstance(operator, FactoredOperator) and precond is not None:
        reasons.append("the native factored solve takes a Jacobi diagonal, not a preconditioner operator")
    return reasons


def _reference(operator, B, *, tol, max_iter, diag, precond, record_history) -> CGResult:
    return cg_reference(operator, B, tol=tol, max_iter=max_iter, diag=diag, precond=precond,
                        record_history=record_history)


def _native(operator, B, *, tol, max_iter, diag, precond, record_history) -> CGResult:
    mod = _ext.require_native()
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if diag is not None:
        # The reference casts the diagonal to B's dtype; the native checks equal dtypes.
        diag = diag.to(B.dtype)
    if isinstance(operator, FactoredOperator):
        G, w, lam = operator.G, operator.w, float(operator.damping)
        op = getattr(getattr(torch.ops, "prefprune", None), "cg_factored", None)
        if op is not None and not record_history:
            # The dispatcher op (same C++ solve): composes with torch.compile through its Meta kernel.
            x, status, iterations, residual, curvature = op(G, w, lam, B, diag, float(tol), int(max_iter))
            return CGResult(x=x, status=status, iterations=iterations, residual=residual, curvature=curvature,
                            history=None)
        out = mod.cg_factored(G, w, lam, B, diag, float(tol), int(max_iter), bool(record_history))
    else:
        out = mod.cg_callable(operator, B, diag, float(tol), int(max_iter), bool(record_history),
                              precond=precond)
    x, status, iterations, residual, curvature, history = out
    return CGResult(
        x=x, status=status, iterations=iterations, residual=residual, curvature=curvature, history=history
    )


def _check_args(B: Tensor, tol: float, max_iter: int, diag: Tensor | None, precond) -> None:
    if not isinstance(B, Tensor) or B.dim() not in (1, 2):
        shape = tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__
        raise ValueError(f"B must be a (k,) or (k, m) tensor, got {shape}")
    if not math.isfinite(float(tol)) or tol < 0:
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    if diag is not None and tuple(diag.shape) != (B.shape[0],):
        raise ValueError(f"diag must have shape ({B.shape[0]},), got {tuple(diag.shape)}")
    if precond is not None and not callable(precond):
        raise ValueError(f"precond must be a callable mapping a (k, m) block R to M R, or None, got "
                         f"{type(precond).__name__}")
    if diag is not None and precond is not None:
        raise ValueError(f"give one preconditioner, diag (a Jacobi diagonal, here of shape "
                         f"{tuple(diag.shape)}) or precond (an operator, here {precond!r}), not both")


def solve(
    operator: FactoredOperator | Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    diag: Tensor | None = None,
    precond: Callable[[Tensor], Tensor] | None = None,
    record_history: bool = False,
    impl: str | None = None,
) -> CGResult:
    """Solve A X = B by (preconditioned) conjugate gradient, every column on its own.

    Args:
        operator: a `FactoredOperator` (solved entirely natively) or a callable mapping a (k, m)
            block P to A P (e.g. autograd Hessian-vector products); A must be symmetric.
        B: (k, m) right-hand sides; a (k,) vector is one column (the result is then (k, 1)).
        tol: a column stops when ||r|| <= tol * ||b||.
        max_iter: at most this many A-products per column.
        diag: (k,) diagonal of A for the Jacobi preconditioner (None: none).
        precond: a preconditioner operator instead: maps a (k, m) residual block R to M R, M symmetric
            positive definite, column j may have its own M_j (e.g. `prefprune.ops.woodbury.damped_systems`).
            Non-positive curvature is still tested on pᵀAp of the unpreconditioned A. Excludes diag; the
            native path takes it with a callable operator (a `FactoredOperator` with one runs the reference).
        record_history: keep the relative residual after every iteration.
        impl: "auto", "native" or "reference" (default: `PREFPRUNE_IMPL`, else auto).

    Returns:
        CGResult with x (k, m), per-column status / iterations / residual / curvature and the
        history ((iters + 1, m)) when requested. A column whose right-hand side, solution, residual or
        stopping curvature is not finite gets status CG_NONFINITE ("nonfinite") and x = NaN, whichever
        implementation ran. ``impl`` names the implementation the dispatcher ran.

    Raises:
        ValueError: malformed arguments.
        prefprune.ops.dispatch.ImplUnavailableError: impl="native" requested but not usable.
    """
    _check_args(B, tol, max_iter, diag, precond)
    if isinstance(operator, FactoredOperator) and operator.k != B.shape[0]:
        raise ValueError(f"operator is {operator.k}x{operator.k} but B has {B.shape[0]} rows")
    if not isinstance(operator, FactoredOperator) and not callable(operator):
        raise ValueError(f"operator must be a FactoredOperator or a callable, got {type(operator).__name__}")
    native_path = dispatch.FastPath("native", lambda: native_reasons(operator, B, precond=precond),
                                     lambda: _native)
    sel = dispatch.select("cg", [native_path], _reference, impl=impl)
    # A NaN/inf right-hand side would stop CG at once as "converged" (its norm test is never true or
    # the native loop reads it as zero): such columns are solved as zero and marked, not trusted.
    finite_rhs = torch.isfinite(B if B.dim() == 2 else B.unsqueeze(1)).all(0)
    all_finite = bool(finite_rhs.all())
    B_in = B if all_finite else torch.where(finite_rhs if B.dim() == 2 else finite_rhs[0], B, 0)
    res = sel.fn(
        operator, B_in, tol=float(tol), max_iter=int(max_iter), diag=diag, precond=precond,
        record_history=record_history,
    )
    return dataclasses.replace(_mark_nonfinite(res, finite_rhs), impl=sel.name)


def _mark_nonfinite(res: CGResult, finite_rhs: Tensor) -> CGResult:
    """Status CG_NONFINITE (and x = NaN) for columns with a non-finite right-hand side, solution,
    residual or stopping curvature: a NaN from the operator's products must not pass as a solve."""
    x = res.x if res.x.dim() == 2 else res.x.unsqueeze(1)
    bad = ~finite_rhs.to(x.device) | ~torch.isfinite(x).all(0) | ~torch.isfinite(res.residual.to(x.device))
    bad |= (res.status.to(x.device) == CG_NONPOSITIVE_CURVATURE) & ~torch.isfinite(res.curvature.to(x.device))
    if not bool(bad.any()):
        return res
    status = res.status.clone()
    status[bad.to(status.device)] = CG_NONFINITE
    x = x.clone()
    x[:, bad] = math.nan
    residual = res.residual.clone()
    residual[bad.to(residual.device)] = math.nan
    return CGResult(x=x if res.x.dim() == 2 else x[:, 0], status=status, iterations=res.iterations,
                    residual=residual, curvature=res.curvature, history=res.history)
