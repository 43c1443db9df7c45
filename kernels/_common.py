"""Helpers shared by the Triton kernels' launchers (dtype map, interpreter switch, SM count, block sizes)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs its interpreter (TRITON_INTERPRET=1): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# tl.dot precision of fp32 inputs: "tf32x3" splits each operand into a tf32 high part and a tf32 low part and
# sums three tensor-core products (hi·hi + hi·lo + lo·hi), close to IEEE fp32 (tests/test_kernels_precision.py
# measures it against IEEE fp32 and float64 on CPU); plain "tf32" would round operands to 10-bit mantissas.
FP32_PRECISION = "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for inputs of `dtype`.

    fp32 inputs run on tensor cores in tf32x3 (about fp32 accuracy, never plain tf32); 16-bit operands are
    exact in the tensor-core dot (fp16/bf16 products, fp32 accumulation).
    """
    return FP32_PRECISION if dtype == torch.float32 else "tf32"
