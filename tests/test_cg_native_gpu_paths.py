"""The GPU-facing parts of the native CG, checked on CPU: the CUDA launch arithmetic (cg_launch.h, the same
function the CUDA launcher calls), the loop's sparse convergence checks (history identical to checking every
iteration), and the dispatcher op torch.ops.prefprune.cg_factored (schema, Meta kernel, torch.compile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefprune import _ext
from prefprune.cg import FactoredOperator
from prefprune.ops.reference import cg_reference

C = _ext.native()
pytestmark = pytest.mark.skipif(C is None, reason=f"native extension missing: {_ext.native_error()}")

H200_SMS = 132


def _covered_once(k: int, threads: int, blocks: int) -> bool:
    """Whether the kernels' grid-stride loop (i = b·threads + t, step blocks·threads) hits 0..k-1 once."""
    hits = np.zeros(k, dtype=np.int64)
    stride = blocks * threads
    for b in range(blocks):
        for t in range(threads):
            hits[b * threads + t :: stride] += 1
    return bool((hits == 1).all())


def test_launch_config_one_long_column_fills_the_gpu():
    """An influence solve: m = 1, k = 2·10⁶ must run on every SM, not on one block."""
    threads, per_col, grid_y = C.cg_launch_config(1, 2_000_000, H200_SMS)
    assert threads % 32 == 0 and 32 <= threads <= 1024
    assert grid_y == 1
    assert per_col * grid_y >= H200_SMS  # at least one block per SM (the old kernel: 1 block)
    assert per_col <= 1024  # the partial-sum buffer's bound
    # Every thread still gets a useful amount of work per sweep.
    assert 2_000_000 / (per_col * threads) >= 4
    assert _covered_once(2_000_000, threads, per_col)


def test_launch_config_many_short_columns():
    """m = 64 columns of k = 4,096: every column spread over a few blocks, the grid covering all columns."""
    threads, per_col, grid_y = C.cg_launch_config(64, 4096, H200_SMS)
    assert grid_y == 64
    assert per_col * grid_y >= H200_SMS
    assert 4096 / (per_col * threads) >= 4  # no block mostly idle
    assert _covered_once(4096, threads, per_col)


def test_launch_config_edges():
    assert C.cg_launch_config(1, 1, H200_SMS)[:2] == (32, 1)  # one warp, one block
    assert C.cg_launch_config(3, 0, H200_SMS)[2] == 3
    assert C.cg_launch_config(100_000, 10, H200_SMS)[2] == 65535  # grid y bound; columns are looped over
    for m, k in ((1, 10**9), (7, 12345), (4096, 2_000_000)):
        threads, per_col, grid_y = C.cg_launch_config(m, k, H200_SMS)
        assert 1 <= per_col <= 1024 and 1 <= grid_y <= 65535 and threads % 32 == 0


def _system(k=40, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(60, k, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(60, generator=g, dtype=torch.float64)
    B = torch.randn(k, m, generator=g, dtype=torch.float64)
    B[:, 1] = 0.0  # a column that never runs
    return G, w, 0.3, B


@pytest.mark.parametrize("every", [0, 3, 7])
def test_sparse_convergence_checks_change_nothing(every):
    """Checking for running columns only every few iterations (as on CUDA) or never: same x, status,
    iterations and history as the reference, which checks every iteration."""
    G, w, lam, B = _system()
    ref = cg_reference(FactoredOperator(G, w, lam), B, tol=1e-9, max_iter=200, record_history=True)
    for fused in (True, False):
        x, status, iters, res, _, hist = C.cg_factored(G, w, lam, B, None, 1e-9, 200, True, fused=fused,
                                                        check_every=every)
        assert torch.equal(status, ref.status) and torch.equal(iters, ref.iterations)
        assert hist.shape == ref.history.shape
        torch.testing.assert_close(x, ref.x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hist, ref.history, rtol=1e-10, atol=1e-12)


def test_dispatcher_op_matches_the_pybind_solver():
    G, w, lam, B = _system(seed=1)
    got = torch.ops.prefprune.cg_factored(G, w, lam, B, None, 1e-9, 200)
    want = C.cg_factored(G, w, lam, B, None, 1e-9, 200, False)
    assert len(got) == 5
    for a, b in zip(got, want[:5], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_dispatcher_op_passes_opcheck():
    G, w, lam, B = _system(seed=2)
    diag = (w.unsqueeze(1) * G.square()).sum(0) / G.shape[0] + lam
    f32 = (G.float(), w.float(), lam, B.float(), diag.float(), 1e-5, 50)
    for args in ((G, w, lam, B, None, 1e-8, 50), f32):
        # Schema, fake (Meta) kernel and dispatch consistency; no autograd formula is claimed.
        torch.library.opcheck(torch.ops.prefprune.cg_factored.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_meta_kernel_gives_shapes_without_solving():
    G = torch.empty(60, 13, device="meta", dtype=torch.float32)
    w = torch.empty(60, device="meta", dtype=torch.float32)
    B = torch.empty(13, 5, device="meta", dtype=torch.float32)
    x, status, iters, res, curv = torch.ops.prefprune.cg_factored(G, w, 0.1, B, None, 1e-6, 100)
    assert x.shape == (13, 5) and x.dtype == torch.float32 and x.device.type == "meta"
    assert status.shape == iters.shape == res.shape == curv.shape == (5,)
    assert status.dtype == iters.dtype == torch.int64


def test_composes_with_torch_compile():
    G, w, lam, B = _system(seed=3)

    def influence(G, w, B):
        x = torch.ops.prefprune.cg_factored(G, w, lam, B, None, 1e-9, 200, check_every=0)[0]
        return (x * B).sum(0)  # a downstream op in the same graph

    compiled = torch.compile(influence, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(G, w, B), influence(G, w, B), rtol=0, atol=0)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not getattr(C, "WITH_CUDA", False), reason="needs a CUDA build and a GPU"
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("k,m", [(300_000, 1), (4096, 64)], ids=["m1-k300000", "m64-k4096"])
def test_cuda_multiblock_update_matches_reference(k, m):
    """The multi-block CUDA update (many blocks per column, two-phase sums) iterates like cg_reference."""
    g = torch.Generator().manual_seed(7)
    d = (1.0 + 9.0 * torch.rand(k, 1, generator=g, dtype=torch.float64)).cuda()
    B = torch.randn(k, m, generator=g, dtype=torch.float64).cuda()
    B[:, 0] *= 1e-3  # columns of different scale stop at different iterations

    def op(X):
        return d * X

    ref = cg_reference(op, B, tol=1e-10, max_iter=300, record_history=True)
    x, status, iters, _, _, hist = C.cg_callable(op, B, None, 1e-10, 300, True)
    assert torch.equal(status.cpu(), ref.status.cpu()) and torch.equal(iters.cpu(), ref.iterations.cpu())
    torch.testing.assert_close(x, ref.x, rtol=1e-9, atol=1e-13)
    assert hist.shape == ref.history.shape
    torch.testing.assert_close(hist, ref.history, rtol=1e-8, atol=1e-15)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_captures_the_dispatcher_op():
    """check_every=0: no host sync inside the op, so a whole solve is captured and replayed as a graph."""
    g = torch.Generator().manual_seed(8)
    G = torch.randn(512, 1024, generator=g).cuda()
    w = (0.5 + torch.rand(512, generator=g)).cuda()
    B = torch.randn(1024, 4, generator=g).cuda()

    def run():
        return torch.ops.prefprune.cg_factored(G, w, 0.1, B, None, 0.0, 20, check_every=0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture (cuBLAS handles, allocator)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    eager = run()
    for a, b in zip(captured, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert captured[2].tolist() == [20] * 4
