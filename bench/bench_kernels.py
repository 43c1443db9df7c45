"""pytest-benchmark of the segment ops: Triton kernels against the PyTorch reference, per op and shape.

Run: `pytest bench/bench_kernels.py --benchmark-only` (on a GPU node for the Triton rows; without CUDA only
the reference rows run, on small CPU shapes, so the file stays exercised). Each row records counted bytes and
flops, GB/s and TFLOP/s at the median time, the roofline time on H100/H200 (see bench/_gpu_triton.py for the
ceilings), the device name and the versions in `extra_info`.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpu_triton as gt  # noqa: E402  (sibling helper module; bench/ is not a package)
from _gpu_common import roofline_ms  # noqa: E402

from prefprune.ops import projection as pj  # noqa: E402
from prefprune.ops import reference  # noqa: E402
from prefprune.ops import segment as sg  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

if CUDA:
    SHAPES = gt.GPU_SHAPES
    GROUP = gt.GPU_GROUP
else:  # small shapes: only the reference rows run on CPU
    SHAPES = [
        gt.Shape("cpu-A-r16", 256, 16, 8, 64, k_in=32),
        gt.Shape("cpu-B-r16", 16, 768, 8, 64, k_out=32),
    ]
    GROUP = ("cpu-all-r16", 256, 16, 2, 8, 64)

IMPLS = [
    pytest.param(
        "triton", marks=pytest.mark.skipif(not (CUDA and sg.HAS_TRITON), reason="needs CUDA and Triton")
    ),
    "reference",
]


def _versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if sg.HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    info["device"] = torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine()
    if CUDA:
        info["cuda"] = torch.version.cuda
    return info


def _fn(impl: str, op: str):
    if impl == "reference":
        return {
            "project": reference.segment_project_reference,
            "dot": reference.segment_grad_dot_reference,
            "grouped": reference.segment_grad_dot_grouped_reference,
        }[op]
    from prefprune.kernels import grad_dot, project

    return {
        "project": project.segment_project_triton,
        "dot": grad_dot.segment_grad_dot_triton,
        "grouped": grad_dot.segment_grad_dot_grouped_triton,
    }[op]


def _run(benchmark, fn, args, nbytes: int, flops: int, precision: str) -> None:
    def timed():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out

    timed()  # warm-up: Triton JIT compile, cuBLAS heuristics
    benchmark.pedantic(timed, rounds=20 if CUDA else 5, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    roof, bound = roofline_ms(DEVICE, nbytes, flops, precision)
    benchmark.extra_info.update(
        _versions(),
        bytes=nbytes,
        flops=flops,
        gbps=nbytes / median / 1e9,
        tflops=flops / median / 1e12,
        roofline_ms=roof,
        bound=bound,
        roofline_frac=None if roof is None else roof / (median * 1e3),
        dtype=str(DTYPE),
    )


@pytest.mark.benchmark(group="segment_grad_dot")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_segment_grad_dot(benchmark, impl, shape):
    X, dY, offsets, Q = gt.make_inputs(shape, DTYPE, DEVICE)
    nbytes, flops = gt.count_dot(X, dY, offsets, Q)
    precision = "fp32" if DTYPE == torch.float32 else "bf16"
    _run(benchmark, _fn(impl, "dot"), (X, dY, offsets, Q), nbytes, flops, precision)


@pytest.mark.benchmark(group="segment_project")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_segment_project(benchmark, impl, shape):
    X, dY, offsets, _ = gt.make_inputs(shape, DTYPE, DEVICE)
    P_in = None if shape.k_in is None else pj.projection_matrix(shape.k_in, shape.d_in, seed=1, device=DEVICE)
    P_out = (
        None if shape.k_out is None else pj.projection_matrix(shape.k_out, shape.d_out, seed=2, device=DEVICE)
    )
    nbytes, flops = gt.count_project(X, dY, offsets, P_in, P_out)
    precision = "fp32" if DTYPE == torch.float32 else "tf32"
    _run(benchmark, _fn(impl, "project"), (X, dY, offsets, P_in, P_out), nbytes, flops, precision)


@pytest.mark.benchmark(group="segment_grad_dot_grouped")
@pytest.mark.parametrize("impl", IMPLS)
def test_segment_grad_dot_grouped(benchmark, impl):
    Xs, dYs, offsets, Qs = gt.group_inputs(GROUP, DTYPE, DEVICE)
    nbytes = flops = 0
    for X, dY, Q in zip(Xs, dYs, Qs, strict=True):
        b, f = gt.count_dot(X, dY, offsets, Q)
        nbytes, flops = nbytes + b, flops + f
    precision = "fp32" if DTYPE == torch.float32 else "bf16"
    benchmark.extra_info["shape"] = GROUP[0]
    _run(benchmark, _fn(impl, "grouped"), (Xs, dYs, offsets, Qs), nbytes, flops, precision)
