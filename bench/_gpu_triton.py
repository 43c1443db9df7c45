"""GPU check of the Triton segment kernels: correctness per kernel and dtype, timings and roofline.

`checks("cuda")` returns one dict per (op, shape, dtype) with
- the kernel's error (`_gpu_common.rel_err`) against a float64 computation on the same inputs (16-bit
  inputs are exact, so only the kernel's own arithmetic can differ);
- a tolerance an fp32-accumulating kernel must meet: 4× the error of PyTorch in IEEE fp32 on the same
  upcast inputs (TF32 off), plus 4 fp32 roundings. The exception is the projection of 16-bit inputs, whose
  dots run in tf32 by design: 2× the error of a float64 computation with the projection matrices and the
  projected rows cut to tf32;
- three CUDA-event times (`bench_ms`: `triton.testing.do_bench`, median, L2 flushed before every run):
  the kernel alone (`plan_*(...).run()`: launches and the final tile/split reduction, without the
  launcher's table building and host-to-device copy), the public op (`prefprune.ops.segment.*`, checks and
  launcher included) and the PyTorch reference;
- GB/s and TFLOP/s from counted bytes and flops at the kernel time, the roofline bound, `roofline_frac`
  (roofline / kernel time) and `meets_target` (public op ≥ 3× the reference for the fused dot, ≥ 2× for the
  projection, and roofline_frac ≥ 0.5).
It is time-boxed (`budget_s`): rows that do not fit are returned with `skipped` set.
`checks("cpu", small=True)` runs the same logic on tiny shapes through the Triton interpreter
(TRITON_INTERPRET=1 before importing Triton), so the check itself is tested without a GPU.

Ceilings: see `_gpu_common` (datasheet rates). The fused dot runs 16-bit inputs on bf16/fp16 tensor cores
and fp32 inputs in tf32x3 (3 tf32 products: counted as 3× the flops at the tf32 rate); the projection runs
its dots in tf32 for 16-bit inputs and tf32x3 for fp32 inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _gpu_common import bench_ms, result_row, skipped_row
from _gpu_common import format_table as format_table  # re-exported for the tests
from _gpu_common import rel_err as _rel

from prefprune.ops import projection as pj
from prefprune.ops import reference
from prefprune.ops import segment as sg

# Error floor of every tolerance: 4 fp32 roundings, the precision every kernel accumulates in.
_FLOOR = 4 * 2.0**-24


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


def _fp32_grads(X, dY, offsets):
    """Per-segment gradients by PyTorch in IEEE fp32 on the upcast (same rounded) inputs: the yardstick of
    an fp32-accumulating kernel (TF32 matmuls off)."""
    out = []
    with _no_tf32():
        reference._segment_outer_sums(
            dY.float(), X.float(), offsets, map_a=lambda a: a, map_b=lambda b: b, k_a=dY.shape[1],
            k_b=X.shape[1], consume=lambda s0, s1, G: out.append(G),
        )
    return torch.cat(out) if out else X.new_zeros((0, dY.shape[1], X.shape[1]), dtype=torch.float32)


class _no_tf32:
    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _fp32_dot(X, dY, offsets, Q):
    G = _fp32_grads(X, dY, offsets).reshape(offsets.numel() - 1, -1)
    with _no_tf32():
        return G @ Q.float().reshape(Q.shape[0], -1).T, (G * G).sum(1)


def _tf32_truncated(t: torch.Tensor) -> torch.Tensor:
    """fp32 values with the low 13 mantissa bits cleared (tf32 by truncation: the larger of its two
    rounding errors), as float64."""
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32).double()


def _tf32_project(X, dY, offsets, P_in, P_out):
    """Float64 projection with the projection matrices and the projected rows cut to tf32, as the kernel's
    tf32 dots of 16-bit inputs see them (X, dY are exact in tf32): the error budget of those dots."""
    x, dy = X.double(), dY.double()
    if P_in is not None:
        x = _tf32_truncated(x @ _tf32_truncated(P_in).T)
    if P_out is not None:
        dy = _tf32_truncated(dy @ _tf32_truncated(P_out).T)
    out = []
    for s0, s1 in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        out.append((dy[s0:s1].T @ x[s0:s1]).reshape(-1))
    return torch.stack(out)


def _tol_fp32(err32: float) -> float:
    # An fp32-accumulating kernel on the same inputs: within a few times PyTorch's IEEE-fp32 error (the
    # order of accumulation differs), floored at a few fp32 roundings.
    return 4.0 * err32 + _FLOOR


def _row(op, label, dtype, err, tol, times, nbytes, flops, device, precision, target):
    ms_kernel, ms_op, ms_ref = times
    row = result_row(op, label, dtype, "triton", err, tol, ms_fast=ms_kernel, ms_ref=ms_ref, nbytes=nbytes,
                     flops=flops, device=device, precision=precision, speedup_target=target, ms_op=ms_op)
    # issue 5 targets: fused dot >= 3x and projection >= 2x the reference (the public op, checks and all,
    # against the reference), the kernel within 2x of the roofline
    row["speedup_op"] = ms_ref / ms_op if (ms_ref and ms_op) else None
    frac = row["roofline_frac"]
    speedup = row["speedup_op"]
    met = None if (speedup is None or frac is None) else bool(speedup >= target and frac >= 0.5)
    row["meets_target"] = met
    return row


def _skipped(op, label, dtype, why):
    return skipped_row(op, label, dtype, "triton", why)


def _times(device, kernel, op, ref, *, timed):
    if not timed:
        return None, None, None
    return bench_ms(kernel, device), bench_ms(op, device), bench_ms(ref, device)


def _check_dot(shape, dtype, device, *, timed):
    from prefprune.kernels.grad_dot import plan_grad_dot, segment_grad_dot_triton

    X, dY, offsets, Q = make_inputs(shape, dtype, device)
    S, sq = segment_grad_dot_triton(X, dY, offsets, Q)
    S64, sq64 = reference.segment_grad_dot_reference(X.double(), dY.double(), offsets, Q.double())
    S32, sq32 = _fp32_dot(X, dY, offsets, Q)
    err = max(_rel(S, S64), _rel(sq, sq64))
    tol = _tol_fp32(max(_rel(S32, S64), _rel(sq32, sq64)))
    plan = plan_grad_dot([X], [dY], offsets, [Q])
    times = _times(
        device,
        plan.run,
        lambda: sg.segment_grad_dot(X, dY, offsets, Q, impl="triton"),
        lambda: reference.segment_grad_dot_reference(X, dY, offsets, Q),
        timed=timed,
    )
    nbytes, flops = count_dot(X, dY, offsets, Q)
    prec = "tf32" if dtype == torch.float32 else "bf16"  # tf32x3 runs on the tf32 units (3 products)
    if dtype == torch.float32:
        flops *= 3
    return _row("segment_grad_dot", shape.label(), dtype, err, tol, times, nbytes, flops, device, prec, 3.0)


def _check_project(shape, dtype, device, *, timed):
    from prefprune.kernels.project import plan_project, segment_project_triton

    X, dY, offsets, _ = make_inputs(shape, dtype, device)
    P_in = None if shape.k_in is None else pj.projection_matrix(shape.k_in, shape.d_in, seed=1, device=device)
    P_out = (
        None if shape.k_out is None else pj.projection_matrix(shape.k_out, shape.d_out, seed=2, device=device)
    )
    out = segment_project_triton(X, dY, offsets, P_in, P_out)
    p64 = [None if p is None else p.double() for p in (P_in, P_out)]
    out64 = reference.segment_project_reference(X.double(), dY.double(), offsets, *p64)
    err = _rel(out, out64)
    if dtype == torch.float32:  # tf32x3 dots: fp32-class
        with _no_tf32():
            p32 = [None if p is None else p.float() for p in (P_in, P_out)]
            out32 = reference.segment_project_reference(X, dY, offsets, *p32)
        tol = _tol_fp32(_rel(out32, out64))
    else:  # tf32 dots on exact 16-bit inputs: twice the budget of tf32 projection matrices and rows
        tol = 2.0 * _rel(_tf32_project(X, dY, offsets, P_in, P_out), out64) + _FLOOR
    plan = plan_project(X, dY, offsets, P_in, P_out)
    times = _times(
        device,
        plan.run,
        lambda: sg.segment_project(X, dY, offsets, P_in, P_out, impl="triton"),
        lambda: reference.segment_project_reference(X, dY, offsets, P_in, P_out),
        timed=timed,
    )
    nbytes, flops = count_project(X, dY, offsets, P_in, P_out)
    if dtype == torch.float32:
        flops *= 3
    return _row("segment_project", shape.label(), dtype, err, tol, times, nbytes, flops, device, "tf32", 2.0)


def _check_group(group, dtype, device, *, timed):
    from prefprune.kernels.grad_dot import plan_grad_dot, segment_grad_dot_grouped_triton

    Xs, dYs, offsets, Qs = group_inputs(group, dtype, device)
    S, sq = segment_grad_dot_grouped_triton(Xs, dYs, offsets, Qs)
    S64 = sq64 = S32 = sq32 = 0
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        a, b = reference.segment_grad_dot_reference(X.double(), dY.double(), offsets, Q.double())
        c, d = _fp32_dot(X, dY, offsets, Q)
        S64, sq64, S32, sq32 = S64 + a, sq64 + b, S32 + c.double(), sq32 + d.double()
    err = max(_rel(S, S64), _rel(sq, sq64))
    tol = _tol_fp32(max(_rel(S32, S64), _rel(sq32, sq64)))
    plan = plan_grad_dot(Xs, dYs, offsets, Qs)
    times = _times(
        device,
        plan.run,
        lambda: sg.segment_grad_dot_grouped(Xs, dYs, offsets, Qs, impl="triton"),
        lambda: reference.segment_grad_dot_grouped_reference(Xs, dYs, offsets, Qs),
        timed=timed,
    )
    nbytes = flops = 0
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        b, f = count_dot(X, dY, offsets, Q)
        nbytes, flops = nbytes + b, flops + f
    if dtype == torch.float32:
        flops *= 3
    name, h, r, layers, n_seg, t_seg = group
    label = (
        f"{name}: {layers}x(A ({r},{h}) + B ({3 * h},{r})) + head (1,{h + 1}), N={n_seg} T_seg={t_seg} m=2 "
        f"[{len(plan.launches)} launches]"
    )
    prec = "tf32" if dtype == torch.float32 else "bf16"
    return _row("segment_grad_dot_grouped", label, dtype, err, tol, times, nbytes, flops, device, prec, 3.0)


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
