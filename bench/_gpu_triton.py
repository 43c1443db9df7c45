"""GPU check of the Triton segment kernels: correctness per kernel and dtype, timings and roofline.

`checks("cuda")` returns one dict per (op, shape, dtype) with the Triton kernel's error against a float64
ground truth, the tolerance (2× the error of the same computation done by PyTorch in the inputs' own
precision, STYLE.md point 7, floored at 16 fp32 ulps, the accumulation precision), the kernel's and the
reference's median times, the speedup, GB/s and TFLOP/s from counted bytes and flops, and the roofline bound
on this device. It is time-boxed (`budget_s`): rows that do not fit are returned with `skipped` set.
`checks("cpu", small=True)` runs the same logic on tiny shapes through the Triton interpreter
(TRITON_INTERPRET=1 before importing Triton), so the check itself can be tested without a GPU.

Ceilings for the roofline (vendor datasheet, H200 SXM): HBM 4.8 TB/s; dense bf16/fp16 tensor core
989 TFLOP/s; tf32 tensor core 494 TFLOP/s; fp32 without tensor cores 67 TFLOP/s (H100 SXM: same rates,
3.35 TB/s). The fused dot runs 16-bit inputs on bf16/fp16 tensor cores and fp32 inputs in IEEE fp32; the
projection runs its dots in tf32 for 16-bit inputs and IEEE fp32 for fp32 inputs.
roofline_ms = max(bytes / bandwidth, flops / matrix rate); roofline_frac = roofline_ms / ms_fast (1: at the
bound).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _gpu_common import format_table, result_row, skipped_row
from _gpu_common import rel_err as _rel
from _gpu_common import time_ms as _time_ms

from prefprune.ops import reference
from prefprune.ops import segment as sg

# Error floor of every tolerance: 16 fp32 ulps, the precision every kernel accumulates in (below it, "2x the
# PyTorch error" compares rounding noise).
_FLOOR = 16 * 2.0**-24


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a Linear layer (d_out, d_in) over N segments of T_seg tokens each."""

    name: str
    d_in: int
    d_out: int
    n_seg: int
    t_seg: int
    k_in: int | None = None  # projection sizes (None: identity side)
    k_out: int | None = None
    m: int = 2  # queries (influence q and validation gradient g_V)

    def label(self) -> str:
        k = f" k=({self.k_out},{self.k_in})" if (self.k_in or self.k_out) else ""
        dims = f"d_out={self.d_out} d_in={self.d_in} N={self.n_seg} T_seg={self.t_seg} m={self.m}"
        return f"{self.name}: {dims}{k}"


# Realistic Pythia LoRA layers (query_key_value: hidden → 3·hidden): A = (r, hidden), B = (3·hidden, r).
GPU_SHAPES = [
    Shape("410m-A-r16", 1024, 16, 64, 512, k_in=64),
    Shape("410m-B-r16", 16, 3072, 64, 512, k_out=64),
    Shape("410m-A-r16-short", 1024, 16, 256, 128, k_in=64),
    Shape("1b-A-r8", 2048, 8, 32, 1024, k_in=64),
    Shape("1b-B-r8", 8, 6144, 32, 1024, k_out=64),
]
# The whole trainable set of Pythia-410m with LoRA r=16 on 24 query_key_value layers plus the score head.
GPU_GROUP = ("410m-all-r16", 1024, 16, 24, 32, 512)  # name, hidden, r, layers, N, T_seg
SMALL_SHAPES = [
    Shape("tiny-A", 40, 4, 6, 20, k_in=16),
    Shape("tiny-B", 4, 24, 6, 20, k_out=16),
]
SMALL_GROUP = ("tiny-all", 24, 4, 2, 5, 20)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, *, seed: int = 0, offsets=None):
    """Packed X (T, d_in), dY (T, d_out), offsets (N+1,) with lengths varying ±50% around t_seg, queries Q.

    Given `offsets`, reuses those segments (layers of one model share them) and draws only the data.
    """
    gen = torch.Generator().manual_seed(seed)
    if offsets is None:
        lens = torch.randint(shape.t_seg // 2, shape.t_seg * 3 // 2 + 1, (shape.n_seg,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
    T = int(offsets[-1])
    X = torch.randn(T, shape.d_in, generator=gen).to(device=device, dtype=dtype)
    dY = torch.randn(T, shape.d_out, generator=gen).to(device=device, dtype=dtype)
    Q = torch.randn(shape.m, shape.d_out, shape.d_in, generator=gen).to(device)
    return X, dY, offsets, Q


def group_inputs(group: tuple, dtype: torch.dtype, device: str, *, seed: int = 0):
    """Per-layer (Xs, dYs, Qs) of a LoRA model: A (r, h), B (3h, r) per layer and a head (1, h+1)."""
    _, h, r, layers, n_seg, t_seg = group
    shapes = [s for _ in range(layers) for s in ((r, h), (3 * h, r))] + [(1, h + 1)]
    Xs, dYs, Qs, offsets = [], [], [], None
    for i, (d_out, d_in) in enumerate(shapes):
        sh = Shape("g", d_in, d_out, n_seg, t_seg)
        X, dY, offsets, Q = make_inputs(sh, dtype, device, seed=seed + i, offsets=offsets)
        Xs.append(X)
        dYs.append(dY)
        Qs.append(Q)
    return Xs, dYs, offsets, Qs


def count_dot(X, dY, offsets, Q) -> tuple[int, int]:
    """(bytes, flops) of one fused dot: read X, dY, Q and offsets once, write N·(m+1) fp32; form every G tile
    (2·T·d_out·d_in) and contract it with m queries and itself (2·N·(m+1)·d_out·d_in)."""
    n, m = offsets.numel() - 1, Q.shape[0]
    nbytes = X.numel() * X.element_size() + dY.numel() * dY.element_size() + Q.numel() * 4
    nbytes += offsets.numel() * 8 + n * (m + 1) * 4
    flops = 2 * X.shape[0] * X.shape[1] * dY.shape[1] + 2 * n * (m + 1) * X.shape[1] * dY.shape[1]
    return nbytes, flops


def count_project(X, dY, offsets, P_in, P_out) -> tuple[int, int]:
    """(bytes, flops) of one projection: read X, dY, projections, write N·k_out·k_in fp32; project every token
    row (2·T·d·k per projected side) and sum the projected outer products (2·T·k_out·k_in)."""
    T, n = X.shape[0], offsets.numel() - 1
    k_in = X.shape[1] if P_in is None else P_in.shape[0]
    k_out = dY.shape[1] if P_out is None else P_out.shape[0]
    nbytes = X.numel() * X.element_size() + dY.numel() * dY.element_size() + offsets.numel() * 8
    nbytes += sum(p.numel() * 4 for p in (P_in, P_out) if p is not None) + n * k_out * k_in * 4
    flops = 2 * T * k_out * k_in
    flops += 0 if P_in is None else 2 * T * X.shape[1] * k_in
    flops += 0 if P_out is None else 2 * T * dY.shape[1] * k_out
    return nbytes, flops


time_ms = functools.partial(_time_ms, budget_ms=200.0, max_reps=50)


def _same_precision_grads(X, dY, offsets):
    """Per-segment gradients by PyTorch in the inputs' dtype (padded bmm per chunk): the error yardstick."""
    out = []
    reference._segment_outer_sums(
        dY,
        X,
        offsets,
        map_a=lambda a: a,
        map_b=lambda b: b,
        k_a=dY.shape[1],
        k_b=X.shape[1],
        consume=lambda s0, s1, G: out.append(G),
    )
    return torch.cat(out) if out else X.new_zeros((0, dY.shape[1], X.shape[1]))


def _same_precision_dot(X, dY, offsets, Q):
    G = _same_precision_grads(X, dY, offsets).reshape(offsets.numel() - 1, -1)
    return G @ Q.to(X.dtype).reshape(Q.shape[0], -1).T, (G * G).sum(1)


def _same_precision_project(X, dY, offsets, P_in, P_out):
    G = _same_precision_grads(X, dY, offsets)
    if P_out is not None:
        G = P_out.to(X.dtype) @ G
    if P_in is not None:
        G = G @ P_in.to(X.dtype).T
    return G.reshape(G.shape[0], -1)


def _row(op, label, dtype, err, tol, ms_fast, ms_ref, nbytes, flops, device, precision, target):
    row = result_row(op, label, dtype, "triton", err, tol, ms_fast=ms_fast, ms_ref=ms_ref, nbytes=nbytes,
                     flops=flops, device=device, precision=precision, speedup_target=target)
    speedup, roof = row["speedup"], row["roofline_ms"]
    # issue 5 targets: fused dot >= 3x and projection >= 2x the reference, each within 2x of the roofline
    met = None if not (speedup and roof) else bool(speedup >= target and roof / ms_fast >= 0.5)
    row["meets_target"] = met
    return row


def _skipped(op, label, dtype, why):
    return skipped_row(op, label, dtype, "triton", why)


def _check_dot(shape, dtype, device, *, timed):
    from prefprune.kernels.grad_dot import segment_grad_dot_triton

    X, dY, offsets, Q = make_inputs(shape, dtype, device)
    S, sq = segment_grad_dot_triton(X, dY, offsets, Q)
    S64, sq64 = reference.segment_grad_dot_reference(X.double(), dY.double(), offsets, Q.double())
    St, sqt = _same_precision_dot(X, dY, offsets, Q)
    err = max(_rel(S, S64), _rel(sq, sq64))
    tol = 2.0 * max(_rel(St, S64), _rel(sqt, sq64), _FLOOR)
    ms_fast = ms_ref = None
    if timed:
        ms_fast = time_ms(lambda: segment_grad_dot_triton(X, dY, offsets, Q), device)
        ms_ref = time_ms(lambda: reference.segment_grad_dot_reference(X, dY, offsets, Q), device)
    nbytes, flops = count_dot(X, dY, offsets, Q)
    prec = "fp32" if dtype == torch.float32 else "bf16"
    return _row(
        "segment_grad_dot", shape.label(), dtype, err, tol, ms_fast, ms_ref, nbytes, flops, device, prec, 3.0
    )


def _check_project(shape, dtype, device, *, timed):
    from prefprune.kernels.project import segment_project_triton

    X, dY, offsets, _ = make_inputs(shape, dtype, device)
    P_in = None if shape.k_in is None else sg.projection_matrix(shape.k_in, shape.d_in, seed=1, device=device)
    P_out = (
        None if shape.k_out is None else sg.projection_matrix(shape.k_out, shape.d_out, seed=2, device=device)
    )
    out = segment_project_triton(X, dY, offsets, P_in, P_out)
    p64 = [None if p is None else p.double() for p in (P_in, P_out)]
    out64 = reference.segment_project_reference(X.double(), dY.double(), offsets, *p64)
    err = _rel(out, out64)
    tol = 2.0 * max(_rel(_same_precision_project(X, dY, offsets, P_in, P_out), out64), _FLOOR)
    ms_fast = ms_ref = None
    if timed:
        ms_fast = time_ms(lambda: segment_project_triton(X, dY, offsets, P_in, P_out), device)
        ms_ref = time_ms(lambda: reference.segment_project_reference(X, dY, offsets, P_in, P_out), device)
    nbytes, flops = count_project(X, dY, offsets, P_in, P_out)
    prec = "fp32" if dtype == torch.float32 else "tf32"
    return _row(
        "segment_project", shape.label(), dtype, err, tol, ms_fast, ms_ref, nbytes, flops, device, prec, 2.0
    )


def _check_group(group, dtype, device, *, timed):
    from prefprune.kernels.grad_dot import segment_grad_dot_grouped_triton

    Xs, dYs, offsets, Qs = group_inputs(group, dtype, device)
    S, sq = segment_grad_dot_grouped_triton(Xs, dYs, offsets, Qs)
    S64 = sq64 = St = sqt = 0
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        a, b = reference.segment_grad_dot_reference(X.double(), dY.double(), offsets, Q.double())
        c, d = _same_precision_dot(X, dY, offsets, Q)
        S64, sq64, St, sqt = S64 + a, sq64 + b, St + c.double(), sqt + d.double()
    err = max(_rel(S, S64), _rel(sq, sq64))
    tol = 2.0 * max(_rel(St, S64), _rel(sqt, sq64), _FLOOR)
    ms_fast = ms_ref = None
    if timed:
        ms_fast = time_ms(lambda: segment_grad_dot_grouped_triton(Xs, dYs, offsets, Qs), device)
        ms_ref = time_ms(lambda: reference.segment_grad_dot_grouped_reference(Xs, dYs, offsets, Qs), device)
    nbytes = flops = 0
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        b, f = count_dot(X, dY, offsets, Q)
        nbytes, flops = nbytes + b, flops + f
    name, h, r, layers, n_seg, t_seg = group
    label = (
        f"{name}: {layers}x(A ({r},{h}) + B ({3 * h},{r})) + head (1,{h + 1}), N={n_seg} T_seg={t_seg} m=2"
    )
    prec = "fp32" if dtype == torch.float32 else "bf16"
    return _row(
        "segment_grad_dot_grouped", label, dtype, err, tol, ms_fast, ms_ref, nbytes, flops, device, prec, 3.0
    )


def checks(device: str, *, small: bool = False, budget_s: float = 180.0, timed: bool = True) -> list[dict]:
    """Correctness and timing rows for every Triton segment kernel and dtype on `device`.

    Args:
        device: "cuda", "cuda:1", ... (or "cpu" with TRITON_INTERPRET=1 and small=True).
        small: tiny shapes (for the interpreter); bf16 is skipped under the interpreter (Triton issue #11584).
        budget_s: time box; checks that would start after it are returned as skipped rows.
        timed: also time the kernel and the reference (False: correctness only).

    Returns:
        One dict per check: op, shape, dtype, impl, max_rel_err, tol, ok, ms_fast, ms_ref, speedup, gbps,
        tflops, bytes, flops, roofline_ms, bound, roofline_frac, speedup_target, meets_target (or skipped).
    """
    torch.manual_seed(0)
    shapes, group = (SMALL_SHAPES, SMALL_GROUP) if small else (GPU_SHAPES, GPU_GROUP)
    interp = not device.startswith("cuda")
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    plan: list[tuple[str, Callable[[], dict], str, torch.dtype]] = []
    # 1) every kernel × dtype on the first two shapes; 2) the remaining shapes in bf16 (all timed).
    for dtype in dtypes:
        for sh in shapes[:2]:
            plan.append(
                (
                    "segment_grad_dot",
                    lambda sh=sh, dt=dtype: _check_dot(sh, dt, device, timed=timed),
                    sh.label(),
                    dtype,
                )
            )
            plan.append(
                (
                    "segment_project",
                    lambda sh=sh, dt=dtype: _check_project(sh, dt, device, timed=timed),
                    sh.label(),
                    dtype,
                )
            )
        plan.append(
            (
                "segment_grad_dot_grouped",
                lambda dt=dtype: _check_group(group, dt, device, timed=timed),
                group[0],
                dtype,
            )
        )
    for sh in shapes[2:]:
        plan.append(
            (
                "segment_grad_dot",
                lambda sh=sh: _check_dot(sh, torch.bfloat16, device, timed=timed),
                sh.label(),
                torch.bfloat16,
            )
        )
        plan.append(
            (
                "segment_project",
                lambda sh=sh: _check_project(sh, torch.bfloat16, device, timed=timed),
                sh.label(),
                torch.bfloat16,
            )
        )
    rows = []
    start = time.perf_counter()
    for op, run, label, dtype in plan:
        if interp and dtype == torch.bfloat16:
            rows.append(
                _skipped(op, label, dtype, "bf16 tl.dot is wrong under the Triton interpreter (#11584)")
            )
        elif time.perf_counter() - start > budget_s:
            rows.append(_skipped(op, label, dtype, f"time box of {budget_s:.0f} s reached"))
        else:
            rows.append(run())
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import os

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: rerun with TRITON_INTERPRET=1 for the small interpreted check")
    print(format_table(checks(dev, small=dev == "cpu")))
