"""Scoring precision: which dtype the forward and the capture run in, and whether the device can run it.

Low precision applies to the forward (autocast) and to the captured (X, Δ); every reduction accumulates
in fp32 (the segment ops do) and the curvature solve runs on fp32 (fp64 for fp64 models) vectors.
"""

from __future__ import annotations

import contextlib
import typing
from typing import Literal

import torch

__all__ = [
    "PRECISIONS",
    "Precision",
    "autocast_context",
    "check_precision",
    "precision_name",
    "resolve_precision",
]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def precision_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"fp64"`` for a dtype."""
    return _NAMES[dtype]


def resolve_precision(precision: str | None, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype scoring runs in.

    Args:
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or None (the default: the model's dtype on CUDA; on
            CPU fp32 for a 16-bit model, whose CPU matmuls are slow and inexact, else the model's dtype,
            so float64 models stay exact).
        device: where the model runs.
        model_dtype: the trainable layers' parameter dtype.

    Raises:
        ValueError: an unknown precision, or one wider than the model's parameters (a 16-bit model cannot be
            scored in fp32 without a float32 copy: load it with dtype=float32).
    """
    if precision is None:
        if device.type != "cuda" and model_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return model_dtype
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    dtype = _DTYPES[precision]
    if dtype.itemsize > model_dtype.itemsize:
        raise ValueError(
            f"precision={precision!r} is wider than the model's {precision_name(model_dtype)} parameters; "
            f"load the model in float32 (load_reward_model(..., dtype=torch.float32)) or choose precision="
            f"{precision_name(model_dtype)!r}"
        )
    return dtype


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` for 16-bit precisions (peft keeps LoRA adapters fp32 on 16-bit bases)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def check_precision(dtype: torch.dtype, device: torch.device) -> None:
    """Fail now, before the first batch, if `device` cannot run a forward and backward in `dtype`.

    Runs one small linear layer forward and backward under the same autocast scoring uses (a probe,
    not a guess from the device name): CPUs without fp16 kernels and GPUs without bf16 fail here.

    Raises:
        ValueError: naming the precision setting and the device.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return
    name = precision_name(dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(
        including_emulation=False
    ):
        raise ValueError(
            f"precision={name!r} is not supported on {device} ({where}): bfloat16 needs compute capability "
            "8.0 or newer; use precision='fp16' or 'fp32'"
        )
    try:
        lin = torch.nn.Linear(8, 8, device=device)
        x = torch.randn(4, 8, device=device)
        with torch.enable_grad(), autocast_context(device, dtype):
            y = lin(x)
        if y.dtype != dtype:
            raise RuntimeError(f"autocast produced {y.dtype}, not {dtype}")
        y.float().sum().backward()
    except RuntimeError as err:
        raise ValueError(f"precision={name!r} is not supported on {device} ({where}): {err}") from None
