"""Segment ops (projection, fused dots): Triton kernels (interpreted on CPU) and references vs float64."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from prefprune.ops import projection as pj
from prefprune.ops import reference
from prefprune.ops import segment as sg
from prefprune.ops.dispatch import ImplUnavailableError

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not sg.HAS_TRITON, reason="Triton is not installed")
BF16_SKIP = pytest.mark.skipif(
    INTERPRETED,
    reason="tl.dot on bfloat16 returns garbage under the Triton interpreter (Triton issue #11584, "
    "DESIGN.md §4); bf16 is checked on a GPU",
)
# Floor of every tolerance: 16 fp32 ulps, the precision all implementations accumulate in (below it the
# "2x a same-precision PyTorch run" rule would compare rounding noise).
FLOOR = 16 * 2.0**-24

LENS = [3, 0, 1, 70, 33, 0, 17]  # empty, one-token and multi-block (BLOCK_T = 16 interpreted) segments


def _case(lens, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int64, device=DEVICE)
    T = int(offsets[-1])
    X = torch.randn(T, d_in, generator=gen).to(dtype=dtype, device=DEVICE)
    dY = torch.randn(T, d_out, generator=gen).to(dtype=dtype, device=DEVICE)
    return X, dY, offsets


def _grads64(X, dY, offsets):
    """Per-segment G_i = dY_iᵀ X_i in float64, one explicit matmul per segment (the ground truth)."""
    b = offsets.tolist()
    X, dY = X.double().cpu(), dY.double().cpu()
    return [dY[b[i] : b[i + 1]].T @ X[b[i] : b[i + 1]] for i in range(len(b) - 1)]


def _grads_same_precision(X, dY, offsets):
    """The same per-segment gradients computed by PyTorch in the inputs' own dtype (error yardstick)."""
    b = offsets.tolist()
    return [dY[b[i] : b[i + 1]].T @ X[b[i] : b[i + 1]] for i in range(len(b) - 1)]


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _tol(err_torch, dtype):
    # STYLE.md 7: the fast path may be at most ~2x as wrong as a same-precision PyTorch computation.
    return 2.0 * max(err_torch, FLOOR)


def _dtype_impl_params():
    params = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for impl in ("triton", "reference"):
            marks = []
            if impl == "triton":
                bf16 = [BF16_SKIP, pytest.mark.cuda] if dt == torch.bfloat16 else []
                marks = [needs_triton, *bf16]
            params.append(pytest.param(dt, impl, marks=marks, id=f"{str(dt)[6:]}-{impl}"))
    return params


DTYPE_IMPL = _dtype_impl_params()


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "impl"), DTYPE_IMPL)
@pytest.mark.parametrize(("k_in", "k_out"), [(127, 5), (None, 5), (127, None), (None, None)])
def test_project_matches_float64(dtype, impl, k_in, k_out):
    d_in, d_out = 97, 13
    X, dY, offsets = _case(LENS, d_in, d_out, dtype)
    P_in = None if k_in is None else pj.projection_matrix(k_in, d_in, seed=1, device=DEVICE)
    P_out = None if k_out is None else pj.projection_matrix(k_out, d_out, seed=2, device=DEVICE)
    out = sg.segment_project(X, dY, offsets, P_in, P_out, impl=impl)
    assert out.shape == (len(LENS), (k_out or d_out) * (k_in or d_in)) and out.dtype == torch.float32

    pin64 = torch.eye(d_in, dtype=torch.float64) if P_in is None else P_in.double().cpu()
    pout64 = torch.eye(d_out, dtype=torch.float64) if P_out is None else P_out.double().cpu()
    truth = torch.stack([(pout64 @ G @ pin64.T).reshape(-1) for G in _grads64(X, dY, offsets)])
    pin_lp = torch.eye(d_in, dtype=dtype, device=DEVICE) if P_in is None else P_in.to(dtype)
    pout_lp = torch.eye(d_out, dtype=dtype, device=DEVICE) if P_out is None else P_out.to(dtype)
    same = torch.stack([(pout_lp @ G @ pin_lp.T).reshape(-1) for G in _grads_same_precision(X, dY, offsets)])
    err, err_torch = _rel(out, truth), _rel(same, truth)
    assert err <= _tol(err_torch, dtype), (
        f"{impl} {dtype}: rel err {err:.3g} vs same-precision torch {err_torch:.3g}"
    )
    # empty segments project to exact zeros
    assert torch.all(out[1] == 0) and torch.all(out[5] == 0)


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_project_token_split_matches(split):
    from prefprune.kernels.project import segment_project_triton

    X, dY, offsets = _case(LENS, 40, 6, torch.float32, seed=3)
    P_in = pj.projection_matrix(20, 40, seed=4, kind="rademacher", device=DEVICE)
    out = segment_project_triton(X, dY, offsets, P_in, None, split=split)
    ref = reference.segment_project_reference(X, dY, offsets, P_in, None)
    assert _rel(out, ref) < 1e-5, f"split={split}: rel err {_rel(out, ref):.3g}"


# ---------------------------------------------------------------------------------------------
# Fused dots
# ---------------------------------------------------------------------------------------------


def _dots64(grads, Q):
    q = Q.double().cpu().reshape(Q.shape[0], -1)
    flat = torch.stack([G.reshape(-1) for G in grads])
    return flat @ q.T, (flat * flat).sum(1)


@pytest.mark.parametrize(("dtype", "impl"), DTYPE_IMPL)
@pytest.mark.parametrize(("d_in", "d_out"), [(97, 13), (13, 97)])
def test_grad_dot_matches_float64(dtype, impl, d_in, d_out):
    X, dY, offsets = _case(LENS, d_in, d_out, dtype, seed=5)
    Q = torch.randn(3, d_out, d_in, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    S, sq = sg.segment_grad_dot(X, dY, offsets, Q, impl=impl)
    assert S.shape == (len(LENS), 3) and sq.shape == (len(LENS),)
    S64, sq64 = _dots64(_grads64(X, dY, offsets), Q)
    same = _grads_same_precision(X, dY, offsets)
    flat = torch.stack([G.reshape(-1) for G in same])
    S_t = flat @ Q.to(dtype).reshape(3, -1).T
    sq_t = torch.stack([g @ g for g in flat])
    for name, got, want, yard in (("S", S, S64, S_t), ("sqnorm", sq, sq64, sq_t)):
        err, err_torch = _rel(got, want), _rel(yard, want)
        assert err <= _tol(err_torch, dtype), f"{impl} {dtype} {name}: {err:.3g} vs torch {err_torch:.3g}"
    assert torch.all(S[1] == 0) and sq[5] == 0


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_grad_dot_without_queries(impl):
    X, dY, offsets = _case([4, 9], 10, 3, torch.float32)
    S, sq = sg.segment_grad_dot(X, dY, offsets, None, impl=impl)
    _, sq64 = _dots64(_grads64(X, dY, offsets), torch.zeros(1, 3, 10))
    assert S.shape == (2, 0)
    assert _rel(sq, sq64) < 1e-5


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_sums_layers(impl, dtype):
    """LoRA-like layers (A: r×h, B: h×r, head 1×(h+1)) in one call, incl. one layer of another dtype."""
    lens = [5, 0, 1, 37, 12]
    h, r = 33, 4
    shapes = [(r, h), (h, r), (1, h + 1), (r, h)]
    Xs, dYs, Qs = [], [], []
    offsets = None
    for i, (d_out, d_in) in enumerate(shapes):
        layer_dtype = torch.float32 if i == 3 else dtype
        X, dY, offsets = _case(lens, d_in, d_out, layer_dtype, seed=10 + i)
        Xs.append(X)
        dYs.append(dY)
        Qs.append(torch.randn(2, d_out, d_in, generator=torch.Generator().manual_seed(20 + i)).to(DEVICE))
    S, sq = sg.segment_grad_dot_grouped(Xs, dYs, offsets, Qs, impl=impl)
    S64 = torch.zeros(len(lens), 2, dtype=torch.float64)
    sq64 = torch.zeros(len(lens), dtype=torch.float64)
    S_t, sq_t = torch.zeros_like(S64), torch.zeros_like(sq64)
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        a, b = _dots64(_grads64(X, dY, offsets), Q)
        S64 += a
        sq64 += b
        flat = torch.stack([G.reshape(-1) for G in _grads_same_precision(X, dY, offsets)])
        S_t += (flat @ Q.to(X.dtype).reshape(2, -1).T).double().cpu()
        sq_t += torch.stack([g @ g for g in flat]).double().cpu()
    for name, got, want, yard in (("S", S, S64, S_t), ("sqnorm", sq, sq64, sq_t)):
        err, err_torch = _rel(got, want), _rel(yard, want)
        assert err <= _tol(err_torch, dtype), f"{impl} {name}: {err:.3g} vs torch {err_torch:.3g}"
    # the grouped result is the sum of single-layer calls
    parts = [sg.segment_grad_dot(X, dY, offsets, Q, impl=impl) for X, dY, Q in zip(Xs, dYs, Qs, strict=True)]
    assert _rel(S, sum(p[0] for p in parts)) < 1e-5 and _rel(sq, sum(p[1] for p in parts)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Segment counts, strides
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_one_and_thousand_segments(impl):
    gen = torch.Generator().manual_seed(7)
    for lens in ([29], torch.randint(0, 5, (1000,), generator=gen).tolist()):
        X, dY, offsets = _case(lens, 6, 3, torch.float32, seed=8)
        Q = torch.randn(2, 3, 6, generator=gen).to(DEVICE)
        P_in = pj.projection_matrix(4, 6, seed=9, device=DEVICE)
        S, sq = sg.segment_grad_dot(X, dY, offsets, Q, impl=impl)
        phi = sg.segment_project(X, dY, offsets, P_in, None, impl=impl)
        grads = _grads64(X, dY, offsets)
        S64, sq64 = _dots64(grads, Q)
        phi64 = torch.stack([(G @ P_in.double().cpu().T).reshape(-1) for G in grads])
        n = len(lens)
        assert S.shape == (n, 2) and phi.shape == (n, 12)
        for name, got, want in (("S", S, S64), ("sqnorm", sq, sq64), ("phi", phi, phi64)):
            assert _rel(got, want) < 1e-5, f"{impl} N={n} {name}: rel err {_rel(got, want):.3g}"


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_non_contiguous_inputs(impl):
    gen = torch.Generator().manual_seed(11)
    lens = [7, 0, 1, 25]
    T = sum(lens)
    offsets = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int64, device=DEVICE)
    X = torch.randn(19, T, generator=gen).to(DEVICE).T  # column-major (T, 19)
    dY = torch.randn(T, 10, generator=gen).to(DEVICE)[:, ::2]  # column stride 2 (T, 5)
    Q = torch.randn(2, 19, 5, generator=gen).to(DEVICE).transpose(1, 2)  # (2, 5, 19), non-contiguous
    P_out = torch.randn(5, 3, generator=gen).to(DEVICE).T  # (3, 5) transposed view
    assert not (X.is_contiguous() or dY.is_contiguous() or Q.is_contiguous() or P_out.is_contiguous())
    grads = _grads64(X, dY, offsets)
    S64, sq64 = _dots64(grads, Q)
    phi64 = torch.stack([(P_out.double().cpu() @ G).reshape(-1) for G in grads])
    S, sq = sg.segment_grad_dot(X, dY, offsets, Q, impl=impl)
    phi = sg.segment_project(X, dY, offsets, None, P_out, impl=impl)
    Sg, sqg = sg.segment_grad_dot_grouped([X], [dY], offsets, [Q], impl=impl)
    for name, got, want in (
        ("S", S, S64),
        ("sq", sq, sq64),
        ("phi", phi, phi64),
        ("Sg", Sg, S64),
        ("sqg", sqg, sq64),
    ):
        assert _rel(got, want) < 1e-5, f"{impl} {name}: rel err {_rel(got, want):.3g}"


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_no_segments_and_no_tokens(impl):
    X, dY, _ = _case([], 5, 3, torch.float32)
    S, sq = sg.segment_grad_dot(
        X, dY, torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.ones(2, 3, 5), impl=impl
    )
    assert S.shape == (0, 2) and sq.shape == (0,)
    X, dY, offsets = _case([0, 0, 0], 5, 3, torch.float32)
    phi = sg.segment_project(X, dY, offsets, None, None, impl=impl)
    assert phi.shape == (3, 15) and torch.all(phi == 0)


def test_reference_chunking_matches(monkeypatch):
    """The reference's chunked, padded path equals the one-chunk result (tiny chunk budget)."""
    X, dY, offsets = _case(LENS, 11, 4, torch.float32, seed=12)
    Q = torch.randn(2, 4, 11)
    P_in = pj.projection_matrix(6, 11, seed=0)
    full = (
        reference.segment_grad_dot_reference(X, dY, offsets, Q),
        reference.segment_project_reference(X, dY, offsets, P_in, None),
    )
    monkeypatch.setattr(reference, "SEGMENT_CHUNK_ELEMENTS", 300)
    small = (
        reference.segment_grad_dot_reference(X, dY, offsets, Q),
        reference.segment_project_reference(X, dY, offsets, P_in, None),
    )
    assert torch.allclose(full[0][0], small[0][0], atol=1e-5) and torch.allclose(
        full[0][1], small[0][1], atol=1e-4
    )
    assert torch.allclose(full[1], small[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Projection matrices, projector, store
# ---------------------------------------------------------------------------------------------


def test_projection_matrix_deterministic_and_scaled():
    a = pj.projection_matrix(127, 97, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = pj.projection_matrix(127, 97, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, pj.projection_matrix(127, 97, seed=4))
    assert torch.equal(pj.projection_matrix(127, 97, seed=3, dtype=torch.float64), a.double())
    r = pj.projection_matrix(64, 50, seed=1, kind="rademacher")
    assert torch.equal(r.abs(), torch.full_like(r, 64**-0.5))
    big = pj.projection_matrix(4000, 3, seed=0)
    gram = big.T @ big  # E[PᵀP] = I; off-diagonal ~ N(0, 1/k)
    assert torch.allclose(gram, torch.eye(3), atol=0.1), gram


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare devices")
def test_projection_matrix_device_independent():
    for kind in ("gaussian", "rademacher"):
        cpu = pj.projection_matrix(33, 17, seed=5, kind=kind)
        gpu = pj.projection_matrix(33, 17, seed=5, kind=kind, device="cuda")
        assert torch.equal(cpu, gpu.cpu())


def test_projection_matrix_bad_input():
    with pytest.raises(ValueError, match="'sparse'"):
        pj.projection_matrix(4, 4, seed=0, kind="sparse")
    with pytest.raises(ValueError, match="k=0"):
        pj.projection_matrix(0, 4, seed=0)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "reference"])
def test_kronecker_projector_and_lift(impl, tmp_path):
    lens = [4, 0, 9, 2]
    shapes = [(3, 20), (20, 3), (1, 21)]  # LoRA A, LoRA B, head (+bias column)
    proj = pj.KroneckerProjector(shapes, k_out=8, k_in=8, seed=17, device=DEVICE)
    # sides with k >= d stay identity: A keeps d_out=3, B keeps d_in=3, the head keeps d_out=1
    assert proj.dims == [3 * 8, 8 * 3, 1 * 8] and proj.dim == 56
    Xs, dYs = [], []
    offsets = None
    for i, (d_out, d_in) in enumerate(shapes):
        X, dY, offsets = _case(lens, d_in, d_out, torch.float32, seed=30 + i)
        Xs.append(X)
        dYs.append(dY)
    rows = proj.project(Xs, dYs, offsets, impl=impl)
    want = []
    for i, (X, dY) in enumerate(zip(Xs, dYs, strict=True)):
        pin, pout = proj.P_in[i], proj.P_out[i]
        pin = torch.eye(X.shape[1]) if pin is None else pin.cpu()
        pout = torch.eye(dY.shape[1]) if pout is None else pout.cpu()
        want.append(
            torch.stack([(pout.double() @ G @ pin.double().T).reshape(-1) for G in _grads64(X, dY, offsets)])
        )
    want = torch.cat(want, 1)
    assert rows.shape == (4, 56) and _rel(rows, want) < 1e-5
    # projected-space query scored without storing Φ: fused dot with lifted queries == Φ @ q
    Qp = torch.randn(2, 56, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    S, _ = sg.segment_grad_dot_grouped(Xs, dYs, offsets, proj.lift(Qp), impl=impl)
    assert _rel(S, rows.double() @ Qp.double().T) < 1e-5
    # weight-space queries map into projected space consistently with the rows: ⟨Φ, P Q Pᵀ⟩ (float64)
    Qw = [torch.randn(2, o, i, dtype=torch.float64) for o, i in shapes]
    qp = proj.project_query(Qw)
    manual = []
    for i, Q in enumerate(Qw):
        pin = torch.eye(shapes[i][1]) if proj.P_in[i] is None else proj.P_in[i].cpu()
        pout = torch.eye(shapes[i][0]) if proj.P_out[i] is None else proj.P_out[i].cpu()
        manual.append((pout.double() @ Q @ pin.double().T).reshape(2, -1))
    assert torch.allclose(qp, torch.cat(manual, 1))
    # store rows in a memmap and read them back through a resumed store
    store = pj.ProjectedGradientStore(6, proj.dim, path=tmp_path / "g.npy")
    store.write(2, rows)
    store.flush()
    again = pj.ProjectedGradientStore(6, proj.dim, path=tmp_path / "g.npy", resume=True)
    assert torch.equal(again.tensor()[2:6], rows.cpu()) and torch.all(again.tensor()[:2] == 0)
    with pytest.raises(ValueError, match="outside"):
        again.write(5, rows)
    with pytest.raises(ValueError, match=r"expected float32 \(7, 56\)"):
        pj.ProjectedGradientStore(7, proj.dim, path=tmp_path / "g.npy", resume=True)
    with pytest.raises(ValueError, match="expected 3 layers"):
        proj.project(Xs[:2], dYs[:2], offsets)


def test_lift_query_bad_shape():
    P_in = pj.projection_matrix(4, 10, seed=0)
    with pytest.raises(ValueError, match=r"\(m, None, 4\)"):
        pj.lift_query(torch.zeros(2, 3, 5), P_in, None)


# ---------------------------------------------------------------------------------------------
# Bad input and dispatch
# ---------------------------------------------------------------------------------------------

BAD_OFFSETS = [
    ([1, 3, 5], "start at 0, got offsets\\[0\\] = 1"),
    ([0, 3, 4], "end at T_total = X.shape\\[0\\] = 5, got offsets\\[-1\\] = 4"),
    ([0, 3, 2, 5], "non-decreasing, got offsets\\[1\\] = 3 > offsets\\[2\\] = 2"),
]


@pytest.mark.parametrize("impl", ["triton", "reference", None])
@pytest.mark.parametrize(("values", "message"), BAD_OFFSETS)
def test_bad_offsets(impl, values, message):
    X, dY, _ = _case([5], 4, 2, torch.float32)
    off = torch.tensor(values, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        sg.segment_grad_dot(X, dY, off, None, impl=impl)
    with pytest.raises(ValueError, match=message):
        sg.segment_project(X, dY, off, None, None, impl=impl)
    with pytest.raises(ValueError, match=message):
        sg.segment_grad_dot_grouped([X], [dY], off, None, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bad_shapes(impl):
    X, dY, off = _case([2, 3], 4, 2, torch.float32)
    with pytest.raises(ValueError, match="same number of rows.*got 5 and 4"):
        sg.segment_grad_dot(X, dY[:4], off, None, impl=impl)
    with pytest.raises(ValueError, match=r"\(m, 2, 4\), got \(3, 4, 2\)"):
        sg.segment_grad_dot(X, dY, off, torch.zeros(3, 4, 2), impl=impl)
    with pytest.raises(ValueError, match=r"P_in must have shape \(k, 4\), got \(3, 5\)"):
        sg.segment_project(X, dY, off, torch.zeros(3, 5), None, impl=impl)
    with pytest.raises(ValueError, match=r"P_out must have shape \(k, 2\), got \(3, 4\)"):
        sg.segment_project(X, dY, off, None, torch.zeros(3, 4), impl=impl)
    with pytest.raises(ValueError, match="int64"):
        sg.segment_project(X, dY, off.float(), None, None, impl=impl)
    with pytest.raises(ValueError, match=r"1-D.*got shape \(1, 3\)"):
        sg.segment_project(X, dY, off[None], None, None, impl=impl)
    with pytest.raises(ValueError, match="torch.float32 but dY is torch.float16"):
        sg.segment_grad_dot(X, dY.half(), off, None, impl=impl)
    X2, dY2, _ = _case([2, 4], 4, 2, torch.float32)
    with pytest.raises(ValueError, match="Xs\\[0\\] has 5 rows, Xs\\[1\\] has 6"):
        sg.segment_grad_dot_grouped([X, X2], [dY, dY2], off, None, impl=impl)
    with pytest.raises(ValueError, match="Qs\\[0\\] has 1, Qs\\[1\\] has 2"):
        sg.segment_grad_dot_grouped(
            [X, X], [dY, dY], off, [torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)], impl=impl
        )
    with pytest.raises(ValueError, match=r"Qs must have one entry per layer \(2\), got 1"):
        sg.segment_grad_dot_grouped([X, X], [dY, dY], off, [torch.zeros(1, 2, 4)], impl=impl)
    with pytest.raises(ValueError, match="at least one layer"):
        sg.segment_grad_dot_grouped([], [], off, None, impl=impl)


def test_dispatch_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PREFPRUNE_IMPL", raising=False)
    X, dY, off = _case([2, 3], 4, 2, torch.float32)
    X, dY, off = X.cpu(), dY.cpu(), off.cpu()
    sel = sg.select_segment_impl("segment_grad_dot", [X, dY])
    assert sel.name == "reference"
    assert any("cpu" in r for r in sel.declined["triton"]), sel.declined
    S, sq = sg.segment_grad_dot(X, dY, off, torch.ones(1, 2, 4))  # auto runs, on the reference
    assert _rel(sq, _dots64(_grads64(X, dY, off), torch.ones(1, 2, 4))[1]) < 1e-6
    with pytest.raises(ImplUnavailableError, match="tensors are on cpu"):
        sg.segment_grad_dot(X, dY, off, None, impl="triton")
    monkeypatch.setenv("PREFPRUNE_IMPL", "triton")
    with pytest.raises(ImplUnavailableError, match="tensors are on cpu"):
        sg.segment_project(X, dY, off, None, None)


def test_dispatch_reasons(monkeypatch):
    monkeypatch.delenv("PREFPRUNE_IMPL", raising=False)
    X64 = torch.zeros(3, 4, dtype=torch.float64)
    sel = sg.select_segment_impl("segment_project", [X64])
    assert sel.name == "reference" and any(
        "torch.float64 is not supported" in r for r in sel.declined["triton"]
    )
    if INTERPRETED:
        sel = sg.select_segment_impl("segment_project", [X64.bfloat16()])
        assert sel.name == "reference" and any("11584" in r for r in sel.declined["triton"])
        assert sg.select_segment_impl("segment_project", [X64.float()]).name == "reference"
        assert sg.select_segment_impl("segment_project", [X64.float()], impl="triton").name == "triton"
    monkeypatch.setattr(sg, "HAS_TRITON", False)
    sel = sg.select_segment_impl("segment_grad_dot", [X64.float()])
    assert sel.name == "reference" and any("Triton is not installed" in r for r in sel.declined["triton"])
    with pytest.raises(ImplUnavailableError, match="Triton is not installed"):
        sg.select_segment_impl("segment_grad_dot", [X64.float()], impl="triton")
    with pytest.raises(ValueError, match="unknown segment op 'nope'"):
        sg.select_segment_impl("nope", [X64])
