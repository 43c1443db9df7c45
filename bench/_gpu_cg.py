"""GPU check of the native CG solver (`prefprune._C`): correctness against references, then timings.

`checks("cuda")` returns one dict per check, in the row format of `bench/_gpu_triton.py` (op, shape,
dtype, impl, max_rel_err, tol, ok, ms_fast, ms_ref, speedup, gbps, tflops, ...):

- solution rows: the native solve against a float64 `torch.linalg.solve` of a factored system with a
  known condition number (and, for float32, at most 2x the error of the float32 reference CG);
- iterate rows: native against `cg_reference` in float64 on the same device, same status and
  iteration counts and x to 1e-10 relative (well-conditioned systems that converge in far fewer
  than k iterations: beyond that, finite-precision CG amplifies any rounding difference);
- edge rows: non-positive curvature, zero column, the composite-ATen (unfused) path;
- timing rows: fixed work (tol=0, fixed iteration count) for native and reference, GB/s and
  TFLOP/s from counted bytes (two reads of G per iteration plus the vector updates) and flops.

`checks("cpu", small=True)` runs the same logic on tiny systems, so this file is tested without a GPU.
Every section is time-boxed (`budget_s`); rows that do not fit are returned with `skipped` set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from _gpu_common import bench_ms, result_row, skipped_row
from _gpu_common import rel_err as _rel

from prefprune import _ext
from prefprune.cg import FactoredOperator, solve
from prefprune.ops.reference import CG_CONVERGED, CG_NONPOSITIVE_CURVATURE, cg_reference


def make_system(k: int, n: int, cond: float, dtype: torch.dtype, device: str, *, seed: int = 0):
    """Factored SPD system with eigenvalues log-spaced on [1, cond]: A = Gᵀ diag(w) G / n + λI.

    Returns (FactoredOperator in `dtype`, dense A in float64). n >= k; G = U diag(s) Qᵀ with U's
    columns orthonormal and weights folded in so that A = Q diag(eigs) Qᵀ exactly.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64).to(device))
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64).to(device))
    eigs = torch.logspace(0.0, math.log10(cond), k, dtype=torch.float64, device=device)
    lam = 0.5
    w = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).to(device)
    # Gᵀ diag(w) G / n = Q diag(eig − λ) Qᵀ when G = diag(w)^(-1/2) U diag(sqrt(n (eig − λ))) Qᵀ.
    G = (U / w.sqrt().unsqueeze(1)) @ (torch.sqrt(n * (eigs - lam)).unsqueeze(1) * Q.T)
    A = (Q * eigs) @ Q.T
    return FactoredOperator(G.to(dtype), w.to(dtype), lam), A


def _counts(k: int, n: int, m: int, iters: int, esize: int) -> tuple[int, int]:
    flops = iters * (4 * n * k * m + 2 * n * m + 12 * k * m)
    nbytes = iters * (2 * n * k * esize + 10 * k * m * esize)
    return nbytes, flops


def _row(op, shape, dtype, err, tol, *, note=None, **kw) -> dict:
    # fp64 CG runs on the fp64 tensor cores' rate, fp32 on the plain fp32 rate (both 67 TFLOP/s on H100/H200).
    precision = "fp64" if dtype == torch.float64 else "fp32"
    return result_row(op, shape, dtype, "native", err, tol, precision=precision, note=note, **kw)


def _skipped(op, shape, dtype, why) -> dict:
    return skipped_row(op, shape, dtype, "native", why)


def check_solution(k, n, m, cond, dtype, device, *, callable_op=False) -> dict:
    """Native solve against float64 linalg.solve (and, in float32, against the float32 reference CG)."""
    op, A = make_system(k, n, cond, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    B = torch.randn(k, m, generator=g, dtype=torch.float64).to(device)
    tol_cg = 1e-10 if dtype == torch.float64 else 1e-5
    A_d = A.to(dtype)
    operator = (lambda X: A_d @ X) if callable_op else op
    res = solve(operator, B.to(dtype), tol=tol_cg, max_iter=1000, impl="native")
    X = torch.linalg.solve(A, B)
    err = _rel(res.x, X)
    tol = 10 * cond * tol_cg
    note = f"iters {int(res.iterations.min())}-{int(res.iterations.max())}"
    if dtype == torch.float32:
        ref = solve(operator, B.to(dtype), tol=tol_cg, max_iter=1000, impl="reference")
        # STYLE.md 7: in low precision, at most 2x the error of the same-precision PyTorch run.
        tol = 2 * _rel(ref.x, X) + 1e-6
    ok = bool((res.status == CG_CONVERGED).all()) and err <= tol
    name = "cg_callable vs linalg.solve" if callable_op else "cg_factored vs linalg.solve"
    return _row(name, f"k={k} n={n} m={m} cond={cond:g}", dtype, err, tol, ok=ok, device=device, note=note)


def check_iterates(k, n, m, cond, device, *, jacobi=False, callable_op=False, fused=True) -> dict:
    """Float64 native iterates against cg_reference on the same device (x, status, iterations, history)."""
    op, A = make_system(k, n, cond, torch.float64, device, seed=2)
    g = torch.Generator(device="cpu").manual_seed(3)
    B = torch.randn(k, m, generator=g, dtype=torch.float64).to(device)
    B[:, 0] = 0.0  # a zero column among nonzero ones
    diag = op.diagonal() if jacobi else None
    operator = (lambda X: A @ X) if callable_op else op
    ref = cg_reference(operator, B, tol=1e-8, max_iter=500, diag=diag, record_history=True)
    mod = _ext.require_native()
    if callable_op:
        out = mod.cg_callable(operator, B, diag, 1e-8, 500, True, fused=fused)
    else:
        out = mod.cg_factored(op.G, op.w, op.damping, B, diag, 1e-8, 500, True, fused=fused)
    x, status, iters, residual, _, hist = out
    same = (
        torch.equal(status, ref.status)
        and torch.equal(iters, ref.iterations)
        and hist.shape == ref.history.shape
    )
    err = max(_rel(x, ref.x), float((hist - ref.history).abs().max()) if same else math.inf)
    name = (
        ("cg_callable" if callable_op else "cg_factored")
        + (" (aten)" if not fused else "")
        + " vs cg_reference"
    )
    label = f"k={k} n={n} m={m} cond={cond:g}" + (" jacobi" if jacobi else "")
    note = (
        f"iters {int(iters.max())}"
        if same
        else f"status/iterations differ: {iters.tolist()[:8]} vs {ref.iterations.tolist()[:8]}"
    )
    return _row(name, label, torch.float64, err, 1e-10, ok=same and err <= 1e-10, device=device, note=note)


def check_curvature(device: str) -> dict:
    """Indefinite A = diag(1, 2, −1): column 0 converges in 2 steps, column 1 meets pᵀAp = 0 at step 1.

    Checked with both operators: a callable, and the factored form G = I, w = 3·(1, 2, −1), n = 3.
    """
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64, device=device))
    B = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    expect = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64, device=device)
    factored = FactoredOperator(torch.eye(3, dtype=torch.float64, device=device), 3 * torch.diagonal(A), 0.0)
    errs, ok = [], True
    for op in (lambda X: A @ X, factored):
        res = solve(op, B, tol=1e-12, max_iter=10, impl="native")
        ok &= res.status.tolist() == [CG_CONVERGED, CG_NONPOSITIVE_CURVATURE]
        ok &= res.iterations.tolist() == [2, 1] and float(res.curvature[1]) <= 0.0
        ok &= bool((res.x[:, 1] == 0).all())
        errs.append(_rel(res.x[:, 0], expect))
    return _row(
        "cg nonpositive curvature",
        "3x3 indefinite, m=2",
        torch.float64,
        max(errs),
        1e-12,
        ok=ok,
        device=device,
    )


def check_timing(k, n, m, dtype, device, *, iters) -> dict:
    op, _ = make_system_fast(k, n, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(4)
    B = torch.randn(k, m, generator=g, dtype=torch.float64).to(device, dtype)
    ms_fast = bench_ms(lambda: solve(op, B, tol=0.0, max_iter=iters, impl="native"), device)
    ms_ref = bench_ms(lambda: solve(op, B, tol=0.0, max_iter=iters, impl="reference"), device)
    nbytes, flops = _counts(k, n, m, iters, torch.finfo(dtype).bits // 8)
    return _row(
        "cg_factored timing",
        f"k={k} n={n} m={m} iters={iters}",
        dtype,
        None,
        None,
        ok=True,
        ms_fast=ms_fast,
        ms_ref=ms_ref,
        nbytes=nbytes,
        flops=flops,
        device=device,
    )


def check_callable_large_k(k: int, dtype: torch.dtype, device: str, *, iters: int, timed: bool) -> dict:
    """The scorer's case: one right-hand side (m = 1), k in the millions, A given as a callable.

    A = diag(d) with d in [1, 100] (applied elementwise, so the CG vector updates dominate, as they do
    next to a cheap operator): the solution is b / d exactly. Correctness: a converged solve against it;
    timing: a fixed number of iterations (tol = 0), native against the reference loop. Bytes per iteration:
    the operator reads p and d and writes q (3k); the fused update reads p, q (1), x, p, r, q and writes
    x, r (2), reads r, p and writes p (3): 11k more.
    """
    g = torch.Generator(device="cpu").manual_seed(6)
    d = (1.0 + 99.0 * torch.rand(k, 1, generator=g, dtype=torch.float64)).to(device, dtype)
    b = torch.randn(k, 1, generator=g, dtype=torch.float64).to(device, dtype)
    operator = lambda X: d * X  # noqa: E731
    tol_cg = 1e-10 if dtype == torch.float64 else 1e-5
    res = solve(operator, b, tol=tol_cg, max_iter=2000, impl="native")
    err = _rel(res.x, b.double() / d.double())
    tol = 200 * tol_cg  # cond(A) <= 100: ||x - x*|| / ||x*|| <= cond · ||r|| / ||b||
    ok = bool((res.status == CG_CONVERGED).all()) and err <= tol
    ms_fast = ms_ref = nbytes = flops = None
    if timed:
        ms_fast = bench_ms(lambda: solve(operator, b, tol=0.0, max_iter=iters, impl="native"), device)
        ms_ref = bench_ms(lambda: solve(operator, b, tol=0.0, max_iter=iters, impl="reference"), device)
        esize = torch.finfo(dtype).bits // 8
        nbytes, flops = iters * 14 * k * esize, iters * 14 * k
    return _row("cg_callable m=1 large k", f"k={k} m=1 diag cond=100 iters={iters}", dtype, err, tol, ok=ok,
                ms_fast=ms_fast, ms_ref=ms_ref, nbytes=nbytes, flops=flops, device=device,
                note=f"converged in {int(res.iterations.max())} iterations")


def make_system_fast(k: int, n: int, dtype: torch.dtype, device: str, *, seed: int = 5):
    """Random SPD factored system for timing only (no spectrum control, no QR of a k×k matrix)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    G = torch.randn(n, k, generator=g).to(device, dtype)
    w = (0.1 + torch.rand(n, generator=g)).to(device, dtype)
    return FactoredOperator(G, w, 0.1), None


def checks(device: str, *, small: bool = False, budget_s: float = 120.0, timed: bool = True) -> list[dict]:
    """Correctness and timing rows of the native CG solver on `device` (see the module docstring).

    Args:
        device: "cuda", "cuda:1", ... or "cpu" (with small=True for a quick run).
        small: tiny systems (the CPU half of bench/gpu_check.py).
        budget_s: time box; checks that would start after it are returned as skipped rows.
        timed: also run the timing rows.
    """
    large_k = 5000 if small else 2_000_000
    if small:
        sol = [(1, 1, 1, 1.0), (97, 150, 3, 100.0)]
        its = [(97, 150, 4, 10.0)]
        timing = [(256, 512, 1, 20), (256, 512, 32, 20)]
    else:
        sol = [(1, 1, 1, 1.0), (1025, 2048, 3, 100.0), (4096, 8192, 32, 100.0)]
        its = [(1025, 2048, 64, 10.0), (4096, 8192, 8, 10.0)]
        timing = [
            (256, 512, 1, 50),
            (4096, 8192, 1, 50),
            (4096, 8192, 32, 50),
            (16384, 4096, 1, 50),
            (16384, 4096, 32, 50),
        ]
    plan: list[tuple[str, str, torch.dtype, Callable[[], dict]]] = []
    for dtype in (torch.float64, torch.float32):
        for k, n, m, cond in sol:
            plan.append(
                (
                    "cg_factored vs linalg.solve",
                    f"k={k} m={m}",
                    dtype,
                    lambda a=(k, n, m, cond, dtype): check_solution(*a, device),
                )
            )
        k, n, m, cond = sol[-1]
        plan.append(
            (
                "cg_callable vs linalg.solve",
                f"k={k} m={m}",
                dtype,
                lambda a=(k, n, m, cond, dtype): check_solution(*a, device, callable_op=True),
            )
        )
    for k, n, m, cond in its:
        for kw in (dict(), dict(jacobi=True), dict(callable_op=True), dict(fused=False)):
            plan.append(
                (
                    "cg vs cg_reference",
                    f"k={k} m={m} {kw}",
                    torch.float64,
                    lambda a=(k, n, m, cond), kw=kw: check_iterates(*a, device, **kw),
                )
            )
    plan.append(("cg nonpositive curvature", "3x3", torch.float64, lambda: check_curvature(device)))
    for dtype in (torch.float32, torch.float64):
        plan.append(
            (
                "cg_callable m=1 large k",
                f"k={large_k} m=1",
                dtype,
                lambda dt=dtype: check_callable_large_k(large_k, dt, device, iters=50, timed=timed),
            )
        )
    if timed:
        for dtype in (torch.float32, torch.float64):
            for k, n, m, iters in timing:
                plan.append(
                    (
                        "cg_factored timing",
                        f"k={k} n={n} m={m}",
                        dtype,
                        lambda a=(k, n, m, dtype), it=iters: check_timing(*a, device, iters=it),
                    )
                )
    rows = []
    start = time.perf_counter()
    for op, label, dtype, run in plan:
        if time.perf_counter() - start > budget_s:
            rows.append(_skipped(op, label, dtype, f"time box of {budget_s:.0f} s reached"))
            continue
        rows.append(run())
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows
