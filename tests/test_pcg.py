"""Preconditioned CG with an operator (the Gauss–Newton inverse): cg_reference, the native cg_callable and
prefprune.ops.woodbury, against torch.linalg.solve in float64."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from prefprune import _ext
from prefprune.ops.reference import (
    CG_CONVERGED,
    CG_NONPOSITIVE_CURVATURE,
    CGResult,
    cg_reference,
)
from prefprune.ops.woodbury import GaussNewtonWoodbury, damped_systems

C = _ext.native()
needs_native = pytest.mark.skipif(C is None, reason=f"native extension missing: {_ext.native_error()}")

P = 97  # parameters (odd on purpose)
N_H = 40  # Gauss–Newton rows of the curvature sample (rank of H_GN < P, as in a real model)
DAMPINGS = (1.0, 0.1, 0.01)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def _gauss_newton(p: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows J (n, p), weights w = σ(m)σ(−m) and H_GN = Jᵀ diag(w) J / n (eigenvalues log-spaced, 1e-3..1e2).

    J = diag(√(n e / w)) Qᵀ with orthonormal columns Q (p, n) makes the spectrum of H_GN known by construction
    (ill-conditioned, as a trained model's curvature is), so plain CG needs many iterations. With n > p the
    rows are plain Gaussian (full-rank H_GN).
    """
    g = _gen(seed)
    rank = min(n, p)
    Q, _ = torch.linalg.qr(torch.randn(p, rank, generator=g, dtype=torch.float64))
    e = torch.logspace(-3.0, 2.0, rank, dtype=torch.float64)
    margins = 3.0 * torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.sigmoid(margins) * torch.sigmoid(-margins)
    if n > p:
        J = torch.randn(n, p, generator=g, dtype=torch.float64)
    else:
        J = torch.sqrt(n * e / w).unsqueeze(1) * Q.T
    H = J.T @ (w.unsqueeze(1) * J) / n
    return J, w, H


def _residual(p: int, norm: float, seed: int) -> torch.Tensor:
    """A symmetric (p, p) matrix of spectral norm `norm`: the exact Hessian's non-Gauss–Newton term."""
    X = torch.randn(p, p, generator=_gen(seed), dtype=torch.float64)
    S = 0.5 * (X + X.T)
    return S * (norm / float(torch.linalg.matrix_norm(S, ord=2)))


def _rhs(p: int, r: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(p, r, generator=_gen(seed), dtype=torch.float64)


def _native(fn, B, *, tol, max_iter, precond=None, diag=None, record_history=False, fused=True) -> CGResult:
    out = C.cg_callable(fn, B, diag, tol, max_iter, record_history, fused=fused, precond=precond)
    return CGResult(*out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _assert_same_run(got: CGResult, ref: CGResult, *, tol: float = 1e-12, what: str = "") -> None:
    assert torch.equal(got.status, ref.status), (
        f"{what} status {got.status.tolist()} != {ref.status.tolist()}"
    )
    assert torch.equal(got.iterations, ref.iterations), (
        f"{what} iterations {got.iterations.tolist()} != {ref.iterations.tolist()}"
    )
    err = _rel(got.x, ref.x)
    assert err <= tol, f"{what} x differs from the reference by {err:.3e} relative"
    dres = float((got.residual - ref.residual).abs().max())
    assert dres <= tol, f"{what} residual differs by {dres:.3e}"
    torch.testing.assert_close(got.curvature, ref.curvature, rtol=tol, atol=0, equal_nan=True)
    if ref.history is not None:
        assert got.history is not None and got.history.shape == ref.history.shape, (
            f"{what} history shape {None if got.history is None else tuple(got.history.shape)} "
            f"!= {tuple(ref.history.shape)}"
        )
        dh = float((got.history - ref.history).abs().max())
        assert dh <= tol, f"{what} history differs by {dh:.3e}"


def _hessian(residual_norm: float, seed: int = 3):
    J, w, H_gn = _gauss_newton(P, N_H)
    H = H_gn + _residual(P, residual_norm, seed)
    return J, w, H_gn, H


# ---------------------------------------------------------------------------------------------
# The Woodbury operator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,n", [(P, N_H), (33, 150)], ids=["rows<p", "rows>p"])
def test_woodbury_matches_explicit_inverse(p, n):
    J, w, H_gn = _gauss_newton(p, n, seed=1)
    M = GaussNewtonWoodbury.from_rows(J, w)
    shifts = torch.tensor([1.0, 0.1, 0.01, 0.003, 2.5], dtype=torch.float64)
    wide = _rhs(p, 2 * shifts.numel(), seed=11)
    R = wide[:, ::2]  # non-contiguous
    assert not R.is_contiguous()
    got = M.apply(R, shifts)
    for j, lam in enumerate(shifts.tolist()):
        want = torch.linalg.solve(H_gn + lam * torch.eye(p, dtype=torch.float64), R[:, j])
        err = _rel(got[:, j], want)
        assert err <= 1e-11, f"column {j} (λ = {lam}): Woodbury differs from solve by {err:.3e}"
    one = M.apply(R[:, 2:3], 0.01)  # a batch of one column, one shift for all
    assert torch.equal(one, M.apply(R[:, 2:3], [0.01]))
    err = _rel(one[:, 0], got[:, 2])
    assert err <= 1e-14, f"one column vs the same column in a block: {err:.3e}"


def test_woodbury_from_primal_eigendecomposition():
    """The docstring's claim: H_GN = Eᵀ diag(s) E gives the factors (s, diag(√s) E)."""
    J, w, H_gn = _gauss_newton(P, N_H, seed=2)
    s, V = torch.linalg.eigh(H_gn)
    s = s.clamp(min=0.0)
    primal = GaussNewtonWoodbury(s, s.sqrt().unsqueeze(1) * V.T)
    gram = GaussNewtonWoodbury.from_rows(J, w)
    R = _rhs(P, 3, seed=5)
    for lam in DAMPINGS:
        err = _rel(primal.apply(R, lam), gram.apply(R, lam))
        assert err <= 1e-10, f"λ = {lam}: primal and gram factors differ by {err:.3e}"


def test_woodbury_float32_rows():
    J, w, H_gn = _gauss_newton(P, N_H, seed=4)
    M32 = GaussNewtonWoodbury.from_rows(J.float(), w.float())
    assert M32.basis.dtype == torch.float32 and M32.evals.dtype == torch.float64
    R = _rhs(P, 2, seed=6)
    got = M32.apply(R.float(), 0.1)
    assert got.dtype == torch.float32
    want = torch.linalg.solve(H_gn + 0.1 * torch.eye(P, dtype=torch.float64), R)
    err = _rel(got.double(), want)
    assert err <= 1e-4, f"float32 Woodbury differs from the float64 solve by {err:.3e}"


# ---------------------------------------------------------------------------------------------
# PCG: accuracy, reference = native, iterations
# ---------------------------------------------------------------------------------------------


def _systems(H, J, w, B, *, preconditioned=True, dampings=DAMPINGS):
    pre = GaussNewtonWoodbury.from_rows(J, w) if preconditioned else None
    return damped_systems(lambda X: H @ X, B, dampings, preconditioner=pre)


def _solves(H, B, dampings):
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    return torch.stack([torch.linalg.solve(H + lam * eye, B) for lam in dampings])


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
def test_pcg_matches_solve(impl):
    J, w, _, H = _hessian(1e-3)
    B = _rhs(P, 2)
    sys_ = _systems(H, J, w, B)
    if impl == "reference":
        res = cg_reference(sys_.apply_A, sys_.B, tol=1e-14, max_iter=500, precond=sys_.precond)
    else:
        res = _native(sys_.apply_A, sys_.B, tol=1e-14, max_iter=500, precond=sys_.precond)
    assert res.status.tolist() == [CG_CONVERGED] * 6, f"status {res.status.tolist()}"
    X = sys_.split(res.x)
    want = _solves(H, B, DAMPINGS)
    for lam, got_l, want_l in zip(DAMPINGS, X, want, strict=True):
        err = _rel(got_l, want_l)
        assert err <= 1e-10, f"{impl} PCG at λ = {lam} differs from torch.linalg.solve by {err:.3e}"


@needs_native
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
def test_reference_equals_native(fused):
    J, w, _, H = _hessian(1e-3)
    B = _rhs(P, 3)
    B[:, 1] = 0.0  # a zero right-hand side: converged with 0 iterations in both
    sys_ = _systems(H, J, w, B)
    calls = {"reference": 0, "native": 0}

    def counted(name):
        def precond(R):
            calls[name] += 1
            return sys_.precond(R)

        return precond

    ref = cg_reference(sys_.apply_A, sys_.B, tol=1e-12, max_iter=300, precond=counted("reference"),
                       record_history=True)
    got = _native(sys_.apply_A, sys_.B, tol=1e-12, max_iter=300, precond=counted("native"),
                  record_history=True, fused=fused)
    _assert_same_run(got, ref, what=f"native ({'fused' if fused else 'aten'})")
    assert ref.status.tolist() == [CG_CONVERGED] * 9, f"status {ref.status.tolist()}"
    assert sys_.split(ref.iterations)[:, 1].tolist() == [0, 0, 0]
    assert calls["native"] == calls["reference"] == int(ref.iterations.max()) + 1, calls


@needs_native
def test_reference_equals_native_one_column_noncontiguous():
    J, w, _, H = _hessian(1e-3)
    wide = _rhs(P, 4)
    b = wide[:, 2:3]
    pre = GaussNewtonWoodbury.from_rows(J, w)
    H_T = H.T.contiguous().T  # the same matrix through a transposed view
    ref = cg_reference(lambda X: H_T @ X + 0.1 * X, b, tol=1e-12, max_iter=200,
                       precond=lambda R: pre.apply(R, 0.1))
    got = _native(lambda X: H_T @ X + 0.1 * X, b, tol=1e-12, max_iter=200,
                  precond=lambda R: pre.apply(R, 0.1))
    _assert_same_run(got, ref, what="one column")
    assert int(ref.status[0]) == CG_CONVERGED


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
def test_exact_preconditioner_one_iteration(impl):
    """H = H_GN exactly: M = (H + λI)⁻¹, so every column converges after one A-product."""
    J, w, H_gn = _gauss_newton(P, N_H)
    B = _rhs(P, 2)
    sys_ = _systems(H_gn, J, w, B)
    run = cg_reference if impl == "reference" else _native
    res = run(sys_.apply_A, sys_.B, tol=1e-10, max_iter=50, precond=sys_.precond)
    assert res.status.tolist() == [CG_CONVERGED] * 6, f"status {res.status.tolist()}"
    assert res.iterations.tolist() == [1] * 6, f"iterations {res.iterations.tolist()}"
    err = _rel(res.x, torch.cat(list(_solves(H_gn, B, DAMPINGS)), dim=1))
    assert err <= 1e-10, f"{impl}: one-step solution differs from solve by {err:.3e}"

    # The same with M an explicit inverse matrix of an SPD A that has no low-rank structure.
    X = torch.randn(P, P, generator=_gen(21), dtype=torch.float64)
    A = X @ X.T / P + 0.5 * torch.eye(P, dtype=torch.float64)
    A_inv = torch.linalg.inv(A)
    res = run(lambda V: A @ V, B, tol=1e-10, max_iter=50, precond=lambda R: A_inv @ R)
    assert res.iterations.tolist() == [1, 1] and res.status.tolist() == [CG_CONVERGED] * 2, (
        f"explicit inverse: iterations {res.iterations.tolist()}, status {res.status.tolist()}"
    )


def _iterations(H, J, w, B, *, preconditioned, run=cg_reference):
    sys_ = _systems(H, J, w, B, preconditioned=preconditioned)
    res = run(sys_.apply_A, sys_.B, tol=1e-10, max_iter=2000, precond=sys_.precond)
    assert res.status.tolist() == [CG_CONVERGED] * res.status.numel(), (
        f"{'PCG' if preconditioned else 'CG'} status {res.status.tolist()}"
    )
    return sys_.split(res.iterations).max(dim=1).values.tolist()


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
def test_gauss_newton_preconditioner_cuts_iterations(impl):
    """H = H_GN + a residual of norm 1e-3: per damping value PCG needs a fraction of plain CG's iterations."""
    J, w, _, H = _hessian(1e-3)
    B = _rhs(P, 2)
    run = cg_reference if impl == "reference" else _native
    plain = _iterations(H, J, w, B, preconditioned=False, run=run)
    pcg = _iterations(H, J, w, B, preconditioned=True, run=run)
    for lam, n_cg, n_pcg in zip(DAMPINGS, plain, pcg, strict=True):
        assert n_pcg * 4 <= n_cg, f"λ = {lam}: PCG took {n_pcg} iterations, plain CG {n_cg} (want ≥ 4× fewer)"
        assert n_pcg <= 12, f"λ = {lam}: PCG took {n_pcg} iterations (plain CG {n_cg})"


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
def test_indefinite_reports_nonpositive_curvature(impl):
    """H + λI indefinite at small λ: PCG stops with the curvature pᵀ(H + λI)p ≤ 0 of A itself, not of M."""
    J, w, _, H = _hessian(1e-3)
    v = torch.randn(P, generator=_gen(9), dtype=torch.float64)
    v /= torch.linalg.vector_norm(v)
    H = H - 0.1 * torch.outer(v, v)  # smallest eigenvalue ≈ -0.1: H + λI indefinite for λ < 0.1
    lo = float(torch.linalg.eigvalsh(H)[0])
    assert -0.11 < lo < -0.05, lo
    B = _rhs(P, 2)
    sys_ = _systems(H, J, w, B, dampings=(1.0, 0.01))
    seen: list[torch.Tensor] = []

    def apply_A(X):
        Q = sys_.apply_A(X)
        seen.append((X * Q).sum(0))
        return Q

    run = cg_reference if impl == "reference" else _native
    res = run(apply_A, sys_.B, tol=1e-12, max_iter=500, precond=sys_.precond)
    assert res.status.tolist() == [CG_CONVERGED] * 2 + [CG_NONPOSITIVE_CURVATURE] * 2, (
        f"{impl} status {res.status.tolist()} (λ = 1 is positive definite, λ = 0.01 is not)"
    )
    assert math.isnan(float(res.curvature[0])) and math.isnan(float(res.curvature[1]))
    for c in (2, 3):
        it = int(res.iterations[c])
        assert it >= 1
        recorded = float(seen[it - 1][c])
        assert recorded <= 0, f"column {c}: pᵀAp at the stop was {recorded}"
        assert float(res.curvature[c]) == pytest.approx(recorded, rel=1e-12, abs=0), (
            f"column {c}: reported curvature {float(res.curvature[c])} is not pᵀAp = {recorded} "
            f"of iteration {it}"
        )


@needs_native
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
def test_indefinite_reference_equals_native(fused):
    J, w, _, H = _hessian(1e-3)
    v = torch.randn(P, generator=_gen(9), dtype=torch.float64)
    H = H - 0.1 * torch.outer(v, v) / float(v @ v)
    sys_ = _systems(H, J, w, _rhs(P, 2), dampings=(1.0, 0.01))
    ref = cg_reference(sys_.apply_A, sys_.B, tol=1e-12, max_iter=500, precond=sys_.precond,
                       record_history=True)
    got = _native(sys_.apply_A, sys_.B, tol=1e-12, max_iter=500, precond=sys_.precond, record_history=True,
                  fused=fused)
    _assert_same_run(got, ref, what="indefinite")


needs_cuda = pytest.mark.skipif(
    C is None or not getattr(C, "WITH_CUDA", False) or not torch.cuda.is_available(),
    reason="needs a CUDA build and a GPU",
)


@pytest.mark.cuda
@needs_cuda
def test_cuda_pcg_equals_reference():
    """On CUDA the preconditioned iteration runs as ATen ops around M r; with host checks every few
    iterations (stopped columns idle) it still iterates like the reference."""
    J, w, _, H = _hessian(1e-3)
    J, w, H = J.cuda(), w.cuda(), H.cuda()
    B = _rhs(P, 3).cuda()
    sys_ = _systems(H, J, w, B)
    ref = cg_reference(sys_.apply_A, sys_.B, tol=1e-12, max_iter=300, precond=sys_.precond,
                       record_history=True)
    got = _native(sys_.apply_A, sys_.B, tol=1e-12, max_iter=300, precond=sys_.precond, record_history=True)
    _assert_same_run(got, ref, tol=1e-10, what="CUDA")


@needs_native
def test_precond_sees_caller_grad_mode():
    """Like the operator, the preconditioner runs with the caller's grad mode (the loop runs without)."""
    modes: list[bool] = []
    A = torch.eye(5, dtype=torch.float64) * 2.0

    def precond(R):
        modes.append(torch.is_grad_enabled())
        return 0.5 * R

    with torch.enable_grad():
        _native(lambda X: A @ X, _rhs(5, 1), tol=1e-12, max_iter=5, precond=precond)
    with torch.no_grad():
        _native(lambda X: A @ X, _rhs(5, 1), tol=1e-12, max_iter=5, precond=precond)
    assert modes == [True, True, False, False], modes


# ---------------------------------------------------------------------------------------------
# Bad arguments: errors carry the values
# ---------------------------------------------------------------------------------------------


def test_reference_bad_arguments():
    A = torch.eye(P, dtype=torch.float64)
    B = _rhs(P, 2)
    diag = torch.ones(P, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"give one preconditioner, diag .* shape \(97,\)"):
        cg_reference(lambda X: A @ X, B, diag=diag, precond=lambda R: R)
    msg = r"returned shape \(97, 1\), dtype torch.float64 on cpu for a \(97, 2\)"
    with pytest.raises(ValueError, match=msg):
        cg_reference(lambda X: A @ X, B, precond=lambda R: R[:, :1])
    with pytest.raises(TypeError, match="must return a Tensor, got list"):
        cg_reference(lambda X: A @ X, B, precond=lambda R: [R])


@needs_native
def test_native_bad_arguments():
    A = torch.eye(P, dtype=torch.float64)
    B = _rhs(P, 2)
    diag = torch.ones(P, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"give one preconditioner, diag .* shape \[97\]"):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, diag=diag, precond=lambda R: R)
    msg = r"the preconditioner returned shape \[97, 1\] for a \[97, 2\] block"
    with pytest.raises(RuntimeError, match=msg):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, precond=lambda R: R[:, :1])
    with pytest.raises(RuntimeError, match="the preconditioner returned dtype Float; expected Double"):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, precond=lambda R: R.float())
    with pytest.raises(RuntimeError, match="the preconditioner must return a Tensor, got list"):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, precond=lambda R: [R])

    def exploding(R):
        raise ValueError(f"preconditioner exploded on a block of shape {tuple(R.shape)}")

    with pytest.raises(ValueError, match=r"exploded on a block of shape \(97, 2\)"):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, precond=exploding)
    with pytest.raises(TypeError):
        _native(lambda X: A @ X, B, tol=1e-6, max_iter=5, precond=3)


def test_woodbury_bad_arguments():
    J, w, _ = _gauss_newton(P, N_H)
    msg = r"weights must have shape \(40,\) to match rows \(40, 97\), got \(39,\)"
    with pytest.raises(ValueError, match=msg):
        GaussNewtonWoodbury.from_rows(J, w[:-1])
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got min -1.0"):
        GaussNewtonWoodbury.from_rows(J, torch.cat([w[:-1], torch.tensor([-1.0], dtype=torch.float64)]))
    with pytest.raises(ValueError, match=r"rows must be a non-empty \(n, p\) tensor, got shape \(0, 97\)"):
        GaussNewtonWoodbury.from_rows(J[:0], w[:0])
    with pytest.raises(ValueError, match=r"evals must be finite and >= 0 .* got min -0.5"):
        GaussNewtonWoodbury(torch.tensor([-0.5, 1.0], dtype=torch.float64), J[:2])
    M = GaussNewtonWoodbury.from_rows(J, w)
    R = _rhs(P, 3)
    with pytest.raises(ValueError, match=r"shifts must be finite and > 0 .* got \[0.0, -1.0\]"):
        M.apply(R, [0.1, 0.0, -1.0])
    msg = r"shifts must be one value or \(3,\) for R \(97, 3\), got shape \(2,\)"
    with pytest.raises(ValueError, match=msg):
        M.apply(R, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"R must be \(97, m\), got shape \(96, 3\)"):
        M.apply(R[:-1], 0.1)
    msg = r"dampings must be finite and > 0 .* got \[0.0, nan\] in \[1.0, 0.0, nan\]"
    with pytest.raises(ValueError, match=msg):
        damped_systems(lambda X: X, R, [1.0, 0.0, float("nan")], preconditioner=M)
    with pytest.raises(ValueError, match="dampings must hold at least one value"):
        damped_systems(lambda X: X, R, [], preconditioner=M)
    with pytest.raises(ValueError, match=r"acts on vectors of length 97 but B \(96, 3\) has 96 rows"):
        damped_systems(lambda X: X, R[:-1], [1.0], preconditioner=M)


def test_damped_systems_layout():
    """Columns are damping-major; split() gives back (L, k, r) and (L, r)."""
    B = _rhs(6, 2)
    sys_ = damped_systems(lambda X: 3.0 * X, B, [1.0, 0.5, 0.25])
    assert sys_.B.shape == (6, 6) and sys_.precond is None
    assert sys_.shifts.tolist() == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    torch.testing.assert_close(sys_.apply_A(sys_.B), sys_.B * (3.0 + sys_.shifts), rtol=1e-15, atol=0)
    parts = sys_.split(sys_.B)
    assert parts.shape == (3, 6, 2) and all(torch.equal(parts[i], B) for i in range(3))
    assert sys_.split(torch.arange(6)).tolist() == [[0, 1], [2, 3], [4, 5]]
