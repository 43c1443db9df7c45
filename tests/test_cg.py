"""Native CG (prefprune._C via prefprune.cg.solve) against torch.linalg.solve and cg_reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from prefprune import _ext, cg
from prefprune.cg import FactoredOperator, solve
from prefprune.ops import dispatch
from prefprune.ops.reference import (
    CG_CONVERGED,
    CG_MAX_ITER,
    CG_NONPOSITIVE_CURVATURE,
    cg_reference,
)

C = _ext.native()
needs_native = pytest.mark.skipif(C is None, reason=f"native extension missing: {_ext.native_error()}")


@functools.cache
def _system64(k: int, cond: float, seed: int):
    """A = Q diag(eigs) Qᵀ (eigs log-spaced on [1, cond]) as a factored operator, in float64.

    G = diag(sqrt(n (eig − λ) / w)) Qᵀ with n = k, so that Gᵀ diag(w) G / n + λI = A exactly and
    the condition number is known by construction.
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    eigs = (
        torch.logspace(0.0, math.log10(cond), k, dtype=torch.float64)
        if k > 1
        else torch.ones(1, dtype=torch.float64)
    )
    lam = 0.5
    w = 0.5 + 1.5 * torch.rand(k, generator=g, dtype=torch.float64)
    G = torch.sqrt(k * (eigs - lam) / w).unsqueeze(1) * Q.T
    A = (Q * eigs) @ Q.T
    return G, w, lam, A


def _system(k, cond, dtype, seed=0):
    G, w, lam, A = _system64(k, cond, seed)
    return FactoredOperator(G.to(dtype), w.to(dtype), lam), A


def _rhs(k, m, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, m, generator=g, dtype=torch.float64).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-300))


def _assert_same_run(got, ref, *, rtol=1e-10, what=""):
    """Same iterates: x to rtol relative; residual, history (relative to ||b|| already) to rtol absolute."""
    assert torch.equal(got.status, ref.status), (
        f"{what} status {got.status.tolist()} != {ref.status.tolist()}"
    )
    assert torch.equal(got.iterations, ref.iterations), (
        f"{what} iterations {got.iterations.tolist()} != {ref.iterations.tolist()}"
    )
    assert got.x.shape == ref.x.shape and got.x.dtype == ref.x.dtype
    err = _rel(got.x, ref.x)
    assert err <= rtol, f"{what} x differs from the reference by {err:.3e} relative"
    dres = float((got.residual - ref.residual).abs().max()) if got.residual.numel() else 0.0
    assert dres <= rtol, f"{what} residual differs by {dres:.3e}"
    torch.testing.assert_close(got.curvature, ref.curvature, rtol=rtol, atol=0, equal_nan=True)
    if ref.history is None:
        assert got.history is None
    else:
        assert got.history is not None and got.history.shape == ref.history.shape, (
            f"{what} history shape {None if got.history is None else tuple(got.history.shape)} "
            f"!= {tuple(ref.history.shape)}"
        )
        dh = float((got.history - ref.history).abs().max()) if ref.history.numel() else 0.0
        assert dh <= rtol, f"{what} history differs by {dh:.3e}"


# --------------------------------------------------------------------------- against linalg.solve

CASES = [(1, 1), (2, 3), (97, 64), (1025, 3)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("k,m", CASES, ids=[f"k{k}-m{m}" for k, m in CASES])
def test_factored_matches_linalg_solve(k, m, dtype):
    cond = 100.0
    op, A = _system(k, cond, dtype)
    B = _rhs(k, m, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = solve(op, B, tol=tol, max_iter=400, impl="native")
    X = torch.linalg.solve(A, B.double())
    assert res.status_names() == ["converged"] * m, (
        f"status {res.status.tolist()} iters {res.iterations.tolist()}"
    )
    err = _rel(res.x, X)
    # ||e|| / ||x|| <= cond * ||r|| / ||b||; the margin covers the recurrence's drift.
    assert err <= 10 * cond * tol, f"k={k} m={m} {dtype}: relative error {err:.3e} > {10 * cond * tol:.1e}"
    true_res = float(
        torch.linalg.vector_norm(B.double() - A @ res.x.double()) / torch.linalg.vector_norm(B.double())
    )
    assert true_res <= 10 * tol, f"true relative residual {true_res:.3e}"
    if dtype == torch.float32:
        ref = solve(op, B, tol=tol, max_iter=400, impl="reference")
        ref_err = _rel(ref.x, X)
        assert err <= 2 * ref_err + 1e-6, f"native f32 error {err:.3e} vs reference f32 error {ref_err:.3e}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_callable_matches_linalg_solve(dtype):
    k, m, cond = 97, 3, 50.0
    _, A64 = _system(k, cond, torch.float64)
    A = A64.to(dtype)
    B = _rhs(k, m, dtype)
    seen = []

    def apply(P):
        seen.append((tuple(P.shape), P.dtype, P.is_contiguous()))
        return A @ P

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = solve(apply, B, tol=tol, max_iter=300, impl="native")
    assert set(seen) == {((k, m), dtype, True)}, f"callable saw {set(seen)}"
    assert len(seen) == int(res.iterations.max()), (
        f"{len(seen)} calls for iterations {res.iterations.tolist()}"
    )
    err = _rel(res.x, torch.linalg.solve(A64, B.double()))
    assert err <= 10 * cond * tol, f"relative error {err:.3e}"


# --------------------------------------------------------------------------- against cg_reference


ITER_CASES = [(1, 1, 1.0), (97, 64, 10.0), (1025, 2, 100.0)]


@needs_native
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "aten"])
@pytest.mark.parametrize("jacobi", [False, True], ids=["plain", "jacobi"])
@pytest.mark.parametrize("k,m,cond", ITER_CASES, ids=[f"k{k}-m{m}" for k, m, _ in ITER_CASES])
def test_native_iterates_match_reference(k, m, cond, jacobi, fused):
    """Float64 iterates agree to 1e-10.

    The systems converge in far fewer iterations than k: once CG runs ~k iterations on a spread
    spectrum (k=97, cond=100 takes 74), finite-precision CG amplifies any change of rounding
    (even the reference against itself with a transposed product) to ~1e-5 in the residuals.
    """
    op, _ = _system(k, cond, torch.float64)
    B = _rhs(k, m, torch.float64)
    B[:, 0] = 0.0  # a zero column among nonzero ones
    diag = op.diagonal() if jacobi else None
    # tol well above float64 round-off, so both stop at the same iteration for the same reason.
    kw = dict(tol=1e-8, max_iter=300, diag=diag, record_history=True)
    ref = cg_reference(op, B, **kw)
    out = C.cg_factored(op.G, op.w, op.damping, B, diag, 1e-8, 300, True, fused=fused)
    _assert_same_run(cg.CGResult(*out), ref, what=f"factored k={k} m={m}")
    out = C.cg_callable(op, B, diag, 1e-8, 300, True, fused=fused)
    _assert_same_run(cg.CGResult(*out), ref, what=f"callable k={k} m={m}")
    if k == 1025:
        assert ref.history.shape[0] > 65, "history should outgrow the native's first buffer (64 rows)"


@needs_native
def test_solve_native_equals_reference_through_dispatch():
    op, _ = _system(97, 10.0, torch.float64)
    B = _rhs(97, 5, torch.float64)
    a = solve(op, B, tol=1e-9, max_iter=200, record_history=True, impl="native")
    b = solve(op, B, tol=1e-9, max_iter=200, record_history=True, impl="reference")
    _assert_same_run(a, b)
    v = solve(op, B[:, 2], tol=1e-9, impl="native")  # a (k,) right-hand side is one column
    assert v.x.shape == (97, 1)
    torch.testing.assert_close(v.x[:, 0], a.x[:, 2], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- edge cases


@needs_native
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_zero_rhs(impl):
    op, _ = _system(97, 10.0, torch.float64)
    B = torch.zeros(97, 3, dtype=torch.float64)
    res = solve(op, B, tol=1e-8, max_iter=50, record_history=True, impl=impl)
    assert torch.equal(res.x, torch.zeros_like(B))
    assert res.status.tolist() == [CG_CONVERGED] * 3 and res.iterations.tolist() == [0] * 3
    assert res.residual.tolist() == [0.0] * 3 and res.history.shape == (1, 3)
    assert torch.isnan(res.curvature).all()


@needs_native
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_indefinite_reports_nonpositive_curvature(impl):
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    B = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    res = solve(lambda X: A @ X, B, tol=1e-12, max_iter=10, impl=impl)
    # Column 0 lives in the positive eigenspace: converges in 2 steps. Column 1: p0ᵀAp0 = 1 − 1 = 0.
    assert res.status.tolist() == [CG_CONVERGED, CG_NONPOSITIVE_CURVATURE], res.status.tolist()
    assert res.iterations.tolist() == [2, 1], res.iterations.tolist()
    assert float(res.curvature[1]) == 0.0 and math.isnan(float(res.curvature[0]))
    torch.testing.assert_close(res.x[:, 0], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(res.x[:, 1], torch.zeros(3, dtype=torch.float64)), (
        "stopped column keeps its last iterate"
    )


@needs_native
def test_indefinite_later_iteration_matches_reference():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    eigs = torch.linspace(-0.5, 10.0, 40, dtype=torch.float64)
    A = (Q * eigs) @ Q.T
    B = torch.randn(40, 4, generator=g, dtype=torch.float64)
    ref = cg_reference(lambda X: A @ X, B, tol=1e-10, max_iter=100, record_history=True)
    got = solve(lambda X: A @ X, B, tol=1e-10, max_iter=100, record_history=True, impl="native")
    assert (ref.status == CG_NONPOSITIVE_CURVATURE).any(), f"test system must trip the check: {ref.status}"
    assert (ref.curvature[ref.status == CG_NONPOSITIVE_CURVATURE] <= 0).all()
    _assert_same_run(got, ref)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_max_iter_one_and_zero(dtype):
    op, A = _system(97, 100.0, dtype)
    B = _rhs(97, 3, dtype)
    res = solve(op, B, tol=1e-12, max_iter=1, record_history=True, impl="native")
    assert res.status.tolist() == [CG_MAX_ITER] * 3 and res.iterations.tolist() == [1] * 3
    # One step from zero: x = (bᵀb / bᵀAb) b.
    B64 = B.double()
    expect = (B64 * B64).sum(0) / (B64 * (A @ B64)).sum(0) * B64
    torch.testing.assert_close(res.x.double(), expect, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert res.history.shape == (2, 3)
    r1 = torch.linalg.vector_norm(B64 - A @ res.x.double(), dim=0) / torch.linalg.vector_norm(B64, dim=0)
    torch.testing.assert_close(
        res.residual.double(), r1, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0
    )
    res0 = solve(op, B, max_iter=0, record_history=True, impl="native")
    assert torch.equal(res0.x, torch.zeros_like(B)) and res0.status.tolist() == [CG_MAX_ITER] * 3
    assert res0.iterations.tolist() == [0] * 3 and res0.history.shape == (1, 3)


@needs_native
def test_non_contiguous_inputs():
    k, m = 97, 4
    op, _ = _system(k, 10.0, torch.float64)
    B = _rhs(k, 2 * m, torch.float64)
    base = solve(op, B[:, ::2].contiguous(), tol=1e-9, max_iter=200, diag=op.diagonal(), impl="native")
    G_t = op.G.T.contiguous().T  # transposed storage
    G_s = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
    G_s[::2, ::2] = op.G  # no unit stride at all
    w_s = torch.stack([op.w, op.w], 1).reshape(-1)[::2]
    d_s = torch.stack([op.diagonal(), op.diagonal()], 1).reshape(-1)[::2]
    for G in (G_t, G_s[::2, ::2]):
        assert not G.is_contiguous()
        other = FactoredOperator(G, w_s, op.damping)
        res = solve(other, B[:, ::2], tol=1e-9, max_iter=200, diag=d_s, impl="native")
        assert torch.equal(res.status, base.status) and torch.equal(res.iterations, base.iterations)
        assert _rel(res.x, base.x) <= 1e-12, f"strides {G.stride()}: {_rel(res.x, base.x):.3e}"
        assert res.x.is_contiguous()
    # A (k, 1) column is laid out exactly like the native's internal (1, k) block: B must survive.
    b = _rhs(k, 1, torch.float64)
    keep = b.clone()
    solve(op, b, tol=1e-9, impl="native")
    assert torch.equal(b, keep), "solve modified its right-hand side"


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_jacobi_on_badly_scaled_system(impl):
    k = 60
    g = torch.Generator().manual_seed(5)
    M = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    Cw = torch.eye(k, dtype=torch.float64) + 0.3 * (M @ M.T)  # well conditioned core
    s = torch.logspace(-3, 3, k, dtype=torch.float64)  # diagonal scales over six decades
    A = s.sqrt().unsqueeze(1) * Cw * s.sqrt().unsqueeze(0)
    B = torch.randn(k, 2, generator=g, dtype=torch.float64)
    plain = solve(lambda X: A @ X, B, tol=1e-8, max_iter=200, impl=impl)
    jac = solve(lambda X: A @ X, B, tol=1e-8, max_iter=200, diag=torch.diagonal(A).clone(), impl=impl)
    assert jac.status.tolist() == [CG_CONVERGED] * 2, jac.status.tolist()
    assert int(jac.iterations.max()) * 3 <= int(plain.iterations.min()), (
        f"Jacobi {jac.iterations.tolist()} vs plain {plain.iterations.tolist()} iterations"
    )
    err = _rel(jac.x, torch.linalg.solve(A, B))
    assert err <= 1e-6, f"relative error {err:.3e}"


@needs_native
def test_callable_with_autograd_hvp_and_errors():
    k, m = 30, 2
    _, A = _system(k, 20.0, torch.float64)
    theta = torch.randn(k, dtype=torch.float64, requires_grad=True)

    def hvp(P):  # autograd Hessian-vector products of ½θᵀAθ + Σθ⁴/4 at θ, one column at a time
        assert torch.is_grad_enabled()
        loss = 0.5 * theta @ (A @ theta) + 0.25 * (theta**4).sum()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return torch.stack(
            [torch.autograd.grad(grad, theta, P[:, j], retain_graph=True)[0] for j in range(P.shape[1])], 1
        )

    H = A + torch.diag(3 * theta.detach() ** 2)
    B = _rhs(k, m, torch.float64)
    res = solve(hvp, B, tol=1e-10, max_iter=200, impl="native")
    assert not res.x.requires_grad
    assert _rel(res.x, torch.linalg.solve(H, B)) <= 1e-8

    with pytest.raises(RuntimeError, match=r"returned shape \[30, 1\] for a \[30, 2\] block"):
        solve(lambda P: P[:, :1], B, impl="native")
    with pytest.raises(RuntimeError, match="returned dtype Float; expected Double"):
        solve(lambda P: P.float(), B, impl="native")
    with pytest.raises(RuntimeError, match="must return a Tensor, got list"):
        solve(lambda P: [P], B, impl="native")

    def boom(P):
        raise ValueError("operator exploded at 42")

    with pytest.raises(ValueError, match="operator exploded at 42"):
        solve(boom, B, impl="native")


# --------------------------------------------------------------------------- dispatch


def test_dispatch_env(monkeypatch):
    op, _ = _system(20, 10.0, torch.float64)
    B = _rhs(20, 2, torch.float64)
    calls = []
    real_native, real_ref = cg._native, cg._reference
    monkeypatch.setattr(cg, "_native", lambda *a, **kw: calls.append("native") or real_native(*a, **kw))
    monkeypatch.setattr(cg, "_reference", lambda *a, **kw: calls.append("reference") or real_ref(*a, **kw))
    monkeypatch.setenv("PREFPRUNE_IMPL", "reference")
    solve(op, B)
    monkeypatch.setenv("PREFPRUNE_IMPL", "auto")
    solve(op, B)
    expect_auto = "native" if C is not None else "reference"
    assert calls == ["reference", expect_auto], calls
    if C is not None:
        monkeypatch.setenv("PREFPRUNE_IMPL", "native")
        solve(op, B)
        assert calls[-1] == "native"


def test_explicit_native_unavailable_raises(monkeypatch):
    op, _ = _system(20, 10.0, torch.float64)
    B = _rhs(20, 2, torch.float64)
    monkeypatch.setattr(_ext, "native", lambda: None)
    monkeypatch.setattr(
        _ext, "native_error", lambda: "prefprune._C is not available (No module named x); build it"
    )
    with pytest.raises(
        dispatch.ImplUnavailableError, match=r"cg: PREFPRUNE_IMPL=native .*prefprune._C not built"
    ):
        solve(op, B, impl="native")
    monkeypatch.setenv("PREFPRUNE_IMPL", "native")
    with pytest.raises(dispatch.ImplUnavailableError, match="prefprune._C not built"):
        solve(op, B)
    monkeypatch.setenv("PREFPRUNE_IMPL", "auto")
    res = solve(op, B, tol=1e-10)  # quietly the reference
    assert res.status.tolist() == [CG_CONVERGED] * 2


@needs_native
def test_native_declines_unsupported_dtype():
    A = torch.eye(4, dtype=torch.float16) * 2
    B = torch.ones(4, 1, dtype=torch.float16)
    reasons = cg.native_reasons(lambda X: A @ X, B)
    assert reasons == ["dtype torch.float16 not supported (float32, float64)"], reasons
    with pytest.raises(dispatch.ImplUnavailableError, match="dtype torch.float16 not supported"):
        solve(lambda X: A @ X, B, impl="native")


# --------------------------------------------------------------------------- argument checks


@needs_native
def test_torch_check_messages_quote_actual_values():
    G = torch.randn(5, 7, dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    B = torch.randn(7, 2, dtype=torch.float64)
    f64 = torch.float64

    def fac(G=G, w=w, lam=0.1, B=B, diag=None, tol=1e-6, max_iter=10):
        return lambda: C.cg_factored(G, w, lam, B, diag, tol, max_iter, False)

    def call(B=B, diag=None):
        return lambda: C.cg_callable(lambda X: X, B, diag, 1e-6, 10, False)

    cases = [
        (fac(B=B.unsqueeze(0)), r"B must be 2-D \(k, m\), got shape \[1, 7, 2\]"),
        (fac(B=B[:6]), r"G \[5, 7\] has 7 columns but B \[6, 2\] has 6 rows"),
        (fac(w=w[:4]), r"w must have shape \[5\] to match G \[5, 7\], got \[4\]"),
        (fac(G=G.float()), r"got G Float, w Double, B Double"),
        (fac(B=B.long()), r"B must be float32 or float64, got Long"),
        (fac(diag=torch.ones(6, dtype=f64)), r"diag must have shape \[7\] to match B \[7, 2\], got \[6\]"),
        (fac(diag=torch.ones(7)), r"diag dtype Float differs from B dtype Double"),
        (fac(tol=float("nan")), r"tol must be finite and >= 0, got nan"),
        (fac(max_iter=-3), r"max_iter must be >= 0, got -3"),
        (fac(lam=float("inf")), r"damping must be finite, got inf"),
        (fac(G=G.to("meta")), r"one device, got G on meta, w on cpu, B on cpu"),
        (call(diag=torch.ones(7, dtype=f64, device="meta")), r"diag is on meta but B is on cpu"),
        (call(B=B.int()), r"cg_callable: B must be float32 or float64, got Int"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_python_argument_errors():
    G = torch.randn(5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"w must have shape \(5,\), got \(4,\)"):
        FactoredOperator(G, torch.ones(4, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="damping must be finite, got nan"):
        FactoredOperator(G, torch.ones(5, dtype=torch.float64), float("nan"))
    op = FactoredOperator(G, torch.ones(5, dtype=torch.float64), 0.1)
    B = torch.randn(7, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="tol must be finite and >= 0, got -1.0"):
        solve(op, B, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 0, got -1"):
        solve(op, B, max_iter=-1)
    with pytest.raises(ValueError, match="operator is 7x7 but B has 6 rows"):
        solve(op, B[:6])
    with pytest.raises(ValueError, match=r"diag must have shape \(7,\), got \(3,\)"):
        solve(op, B, diag=torch.ones(3))
