"""Benchmarks of the CG solver: native (`prefprune._C`) against the Python reference loop.

Run: `pytest bench/bench_cg.py --benchmark-only` (or `make bench`). Every solve does the same
work in both implementations: tol=0 and a fixed iteration count, so no column stops early.
Systems are factored, A = Gᵀ diag(w) G / n + λI with G (n, k), float32, on the CPU (or the
first CUDA device when one is visible). GFLOP/s counts the two products with G (4·n·k·m per
iteration) and the vector updates (~12·k·m per iteration).
"""

from __future__ import annotations

import pytest
import torch
from _gpu_common import device_name

from prefprune import _ext
from prefprune.cg import FactoredOperator, solve

pytestmark = pytest.mark.skipif(
    _ext.native() is None, reason=f"native extension missing: {_ext.native_error()}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
ITERS = 10
# (k, n): k unknowns, n rows of G.
SIZES = [(256, 512), (1024, 1024), (4096, 2048), (16384, 4096)]
MULTI_M = 32


def _system(k: int, n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, k, generator=g).to(DEVICE, DTYPE)
    w = (0.1 + torch.rand(n, generator=g)).to(DEVICE, DTYPE)
    B = torch.randn(k, m, generator=g).to(DEVICE, DTYPE)
    return FactoredOperator(G, w, 0.1), B


def _flops(k: int, n: int, m: int) -> int:
    return ITERS * (4 * n * k * m + 2 * n * m + 12 * k * m)


def _run(benchmark, fn, *, k, n, m, impl, label):
    def timed():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    flops = _flops(k, n, m)
    # Enough rounds for a stable median on small systems, few on the ~second-long large ones.
    rounds = max(3, min(30, int(2e9 / max(flops, 1))))
    res = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        device=device_name(DEVICE),
        torch=torch.__version__,
        impl=impl,
        case=label,
        k=k,
        n=n,
        m=m,
        iters=ITERS,
        dtype=str(DTYPE),
        gflops=flops / benchmark.stats.stats.median / 1e9,
    )
    return res


def _solve(op, B, impl):
    return solve(op, B, tol=0.0, max_iter=ITERS, impl=impl)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("k,n", SIZES, ids=[f"k{k}-n{n}" for k, n in SIZES])
def test_cg_single_rhs(benchmark, k, n, impl):
    benchmark.group = f"cg m=1 k={k} n={n}"
    op, B = _system(k, n, 1)
    res = _run(benchmark, lambda: _solve(op, B, impl), k=k, n=n, m=1, impl=impl, label="single")
    assert res.iterations.tolist() == [ITERS]


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("k,n", SIZES, ids=[f"k{k}-n{n}" for k, n in SIZES])
def test_cg_multi_rhs(benchmark, k, n, impl):
    benchmark.group = f"cg m={MULTI_M} k={k} n={n}"
    op, B = _system(k, n, MULTI_M)
    res = _run(benchmark, lambda: _solve(op, B, impl), k=k, n=n, m=MULTI_M, impl=impl, label="multi")
    assert res.iterations.tolist() == [ITERS] * MULTI_M


BATCH_SIZES = [(256, 512), (1024, 1024), (4096, 2048)]


@pytest.mark.parametrize("mode", ["one-solve", "separate-solves"])
@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("k,n", BATCH_SIZES, ids=[f"k{k}-n{n}" for k, n in BATCH_SIZES])
def test_cg_columns_vs_separate(benchmark, k, n, impl, mode):
    """m=32 columns in one solve against 32 single-column solves of the same columns."""
    benchmark.group = f"cg {MULTI_M} columns: one solve vs {MULTI_M} solves, k={k} n={n}"
    op, B = _system(k, n, MULTI_M)
    if mode == "one-solve":
        fn = lambda: _solve(op, B, impl)  # noqa: E731
    else:
        cols = [B[:, j : j + 1].contiguous() for j in range(MULTI_M)]
        fn = lambda: [_solve(op, b, impl) for b in cols]  # noqa: E731
    _run(benchmark, fn, k=k, n=n, m=MULTI_M, impl=impl, label=mode)
