"""fp32 inputs on tensor cores: the kernels' tf32x3 dots against IEEE fp32, on CPU-side ground truth.

On a GPU the kernels run fp32 inputs through `tl.dot(..., input_precision="tf32x3")`: each operand is split
into a tf32 high part and a tf32 remainder and three tensor-core products are summed (hi·lo + lo·hi, then
hi·hi), each product exact in fp32 and accumulated in fp32. The interpreter ignores the precision (it runs
IEEE fp32), so the algorithm is emulated here bit for bit on the operands (round to nearest, ties away, to
10 mantissa bits, as `cvt.rna.tf32.f32`) and measured against a float64 truth, side by side with IEEE fp32
and plain tf32 on the same inputs. The GPU check (bench/gpu_check.py) measures the real kernels.
"""

from __future__ import annotations

import torch

from prefprune.ops import reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 (10-bit mantissa), nearest with ties away from zero, as cvt.rna.tf32.f32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_hi, b_hi = to_tf32(a), to_tf32(b)
    a_lo, b_lo = to_tf32(a - a_hi), to_tf32(b - b_hi)
    return (a_hi @ b_lo + a_lo @ b_hi) + a_hi @ b_hi


def mm_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return to_tf32(a) @ to_tf32(b)


def _segment_grads(X, dY, offsets, mm):
    bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    return torch.stack([mm(dY[s:e].T.contiguous(), X[s:e]) for s, e in bounds])


def test_tf32_rounding_is_round_to_nearest_ties_away():
    x = torch.tensor([1.0 + 2.0**-11, 1.0 + 2.0**-11 + 2.0**-20, -(1.0 + 2.0**-11), 1.0 + 2.0**-12, 3.0])
    got = to_tf32(x)
    assert got.tolist() == [1.0 + 2.0**-10, 1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1.0, 3.0]


def test_tf32x3_is_as_accurate_as_ieee_fp32_for_segment_gradients():
    gen = torch.Generator().manual_seed(0)
    errs = {"ieee": [], "tf32x3": [], "tf32": []}
    for d_in, d_out, t in ((256, 16, 700), (16, 384, 700), (1025, 1, 300)):
        X = torch.randn(t, d_in, generator=gen)
        dY = torch.randn(t, d_out, generator=gen) * torch.logspace(-3, 0, d_out)  # mixed magnitudes
        offsets = torch.tensor([0, t // 3, t // 3, t], dtype=torch.int64)
        truth = _segment_grads(X.double(), dY.double(), offsets, torch.matmul)
        errs["ieee"].append(_rel(_segment_grads(X, dY, offsets, torch.matmul), truth))
        errs["tf32x3"].append(_rel(_segment_grads(X, dY, offsets, mm_tf32x3), truth))
        errs["tf32"].append(_rel(_segment_grads(X, dY, offsets, mm_tf32), truth))
    for ieee, x3, plain in zip(errs["ieee"], errs["tf32x3"], errs["tf32"], strict=True):
        # tf32x3 drops only the lo·lo term (~2^-22 relative per product): within a few fp32 roundings.
        assert x3 <= 4 * ieee + 2.0**-22, errs
        assert x3 < 1e-6, errs
        # ... while plain tf32 would be ~100x worse: the test can tell the two apart.
        assert plain > 30 * x3, errs


def test_fp32_kernels_meet_the_ieee_fp32_error():
    """The kernels' own fp32 path against float64 and IEEE-fp32 torch on the same inputs: on CPU interpreted
    (IEEE fp32 dots), on a GPU the real tf32x3 tensor-core dots."""
    from prefprune.ops.segment import segment_grad_dot_grouped, segment_project

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(90, 40, generator=gen).to(device)
    dY = torch.randn(90, 24, generator=gen).to(device)
    Q = torch.randn(2, 24, 40, generator=gen).to(device)
    P_in = (torch.randn(16, 40, generator=gen) / 4).to(device)
    offsets = torch.tensor([0, 10, 10, 55, 90], device=device)
    S, sq = segment_grad_dot_grouped([X], [dY], offsets, [Q], impl="triton")
    S64, sq64 = reference.segment_grad_dot_reference(X.double(), dY.double(), offsets, Q.double())
    S32, sq32 = reference.segment_grad_dot_reference(X, dY, offsets, Q)
    assert _rel(S, S64) <= 4 * _rel(S32, S64) + 2.0**-22
    assert _rel(sq, sq64) <= 4 * _rel(sq32, sq64) + 2.0**-22
    phi = segment_project(X, dY, offsets, P_in, None, impl="triton")
    phi64 = reference.segment_project_reference(X.double(), dY.double(), offsets, P_in.double(), None)
    phi32 = reference.segment_project_reference(X, dY, offsets, P_in, None)
    assert _rel(phi, phi64) <= 4 * _rel(phi32, phi64) + 2.0**-22
