"""Triton kernel of the segmented Kronecker projection of per-segment weight gradients, and its launcher.

Inputs are packed as in `grad_dot`: X (T×d_in), dY (T×d_out), offsets (N+1,) int64. The output is
Φ_i = P_out (dY_iᵀ X_i) P_inᵀ per segment, flattened. Import only when Triton is installed; the public
entry point is `prefprune.ops.segment.segment_project`, the reference
`prefprune.ops.reference.segment_project_reference`.

Why this design (GPU speed): the kernel first projects token rows (X P_inᵀ, dY P_outᵀ) on chip in fp32
and accumulates the per-segment outer products of the projected rows, so the only traffic is reading X, dY
once per output tile and writing N·k_out·k_in results. Its output is linear in the tokens, so long segments
are split across programs (SPLIT partial sums) to fill the GPU when N is small.

Precision: fp32 accumulation always. 16-bit inputs run the dots on fp32 values in tf32 (16-bit inputs are
exact in tf32; the projection matrix and projected rows round to 10-bit mantissas, below the inputs' own
precision). fp32 inputs use IEEE fp32 dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import dot_precision, interpreting, pow2_clamp, sm_count

# Programs per SM the projection tries to launch before it splits segments along tokens.
_PROGRAMS_PER_SM = 4


# ---------------------------------------------------------------------------------------------
# Segmented Kronecker projection
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_project_kernel(
    x_ptr,
    dy_ptr,
    pin_ptr,
    pout_ptr,
    offsets_ptr,
    out_ptr,
    N,
    d_in,
    d_out,
    k_in,
    k_out,
    n_tiles,
    n_tiles_in,
    split,
    stride_x_t,
    stride_x_d,
    stride_dy_t,
    stride_dy_d,
    stride_pin_k,
    stride_pin_d,
    stride_pout_k,
    stride_pout_d,
    stride_out_s,
    stride_out_n,
    HAS_PIN: tl.constexpr,
    HAS_POUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KO: tl.constexpr,
    BLOCK_KI: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Φ_i[ko, ki] = Σ_{t in segment i} (P_out dY_t)[ko] (P_in X_t)[ki], for one output tile and token split.

    x_ptr: (T, d_in), dy_ptr: (T, d_out), pin_ptr: (k_in, d_in) fp32 (unused without HAS_PIN, then
    k_in = d_in), pout_ptr: (k_out, d_out) fp32 (likewise), offsets_ptr: (N+1,) int64,
    out_ptr: (split, N, k_out*k_in) fp32 (stride_out_s = 0 when split = 1).
    Program pid = (seg * split + s) * n_tiles + tile; split s takes token blocks s, s+split, ... of the
    segment; tile = (ko block, ki block) of the k_out×k_in output.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % n_tiles
    rest = pid // n_tiles
    s = rest % split
    seg = rest // split
    rko = (tile // n_tiles_in) * BLOCK_KO + tl.arange(0, BLOCK_KO).to(tl.int64)
    rki = (tile % n_tiles_in) * BLOCK_KI + tl.arange(0, BLOCK_KI).to(tl.int64)
    rt = tl.arange(0, BLOCK_T).to(tl.int64)
    rd = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_ko = rko < k_out
    mask_ki = rki < k_in

    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros((BLOCK_KO, BLOCK_KI), dtype=tl.float32)
    for t0 in range(start + s * BLOCK_T, end, split * BLOCK_T):
        rows = t0 + rt
        mask_t = rows < end
        if HAS_PIN:
            xt = tl.zeros((BLOCK_T, BLOCK_KI), dtype=tl.float32)
            for d0 in range(0, d_in, BLOCK_D):
                cols = d0 + rd
                mask_d = cols < d_in
                x = tl.load(
                    x_ptr + rows[:, None] * stride_x_t + cols[None, :] * stride_x_d,
                    mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                p = tl.load(
                    pin_ptr + cols[:, None] * stride_pin_d + rki[None, :] * stride_pin_k,
                    mask=mask_d[:, None] & mask_ki[None, :],
                    other=0.0,
                )
                xt = tl.dot(x, p, xt, input_precision=PRECISION)
        else:
            xt = tl.load(
                x_ptr + rows[:, None] * stride_x_t + rki[None, :] * stride_x_d,
                mask=mask_t[:, None] & mask_ki[None, :],
                other=0.0,
            ).to(tl.float32)
        if HAS_POUT:
            # Projected dY rows are built transposed (BLOCK_KO × BLOCK_T) for the outer-product sum below.
            yt = tl.zeros((BLOCK_KO, BLOCK_T), dtype=tl.float32)
            for d0 in range(0, d_out, BLOCK_D):
                cols = d0 + rd
                mask_d = cols < d_out
                p = tl.load(
                    pout_ptr + rko[:, None] * stride_pout_k + cols[None, :] * stride_pout_d,
                    mask=mask_ko[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dy = tl.load(
                    dy_ptr + rows[None, :] * stride_dy_t + cols[:, None] * stride_dy_d,
                    mask=mask_d[:, None] & mask_t[None, :],
                    other=0.0,
                ).to(tl.float32)
                yt = tl.dot(p, dy, yt, input_precision=PRECISION)
        else:
            yt = tl.load(
                dy_ptr + rows[None, :] * stride_dy_t + rko[:, None] * stride_dy_d,
                mask=mask_ko[:, None] & mask_t[None, :],
                other=0.0,
            ).to(tl.float32)
        acc = tl.dot(yt, xt, acc, input_precision=PRECISION)

    out = out_ptr + s * stride_out_s + seg * stride_out_n + rko[:, None] * k_in + rki[None, :]
    tl.store(out, acc, mask=mask_ko[:, None] & mask_ki[None, :])


def project_launch_config(k_out: int, k_in: int, dtype: torch.dtype, *, interpret: bool) -> dict:
    """Constexprs (except HAS_PIN/HAS_POUT) and num_warps of _segment_project_kernel.

    Register budget checked with ptxas -v for sm_90a (8 warps, BLOCK_D=32; 4 warps or BLOCK_D=64 spill):
    16-bit inputs compile without spills at BLOCK_T=64 for every HAS_PIN/HAS_POUT combination; the IEEE-fp32
    dots of fp32 inputs need BLOCK_T=16 (a 72-byte spill remains with both sides projected). Larger token
    blocks re-read the projection matrices (from L2) less often per token.
    """
    return {
        "PRECISION": dot_precision(dtype),
        "BLOCK_T": 16 if interpret or dtype == torch.float32 else 64,
        "BLOCK_KO": pow2_clamp(k_out, 16, 64),
        "BLOCK_KI": pow2_clamp(k_in, 16, 64),
        "BLOCK_D": 32,
        "num_warps": 8,
    }


def segment_project_triton(
    X: Tensor,
    dY: Tensor,
    offsets: Tensor,
    P_in: Tensor | None,
    P_out: Tensor | None,
    *,
    split: int | None = None,
) -> Tensor:
    """Φ (N, k_out*k_in) fp32 with Φ_i = P_out (dY_iᵀ X_i) P_inᵀ flattened row-major.

    Args:
        X: (T, d_in), dY: (T, d_out), one dtype (fp32/fp16/bf16), any strides.
        offsets: (N+1,) int64, validated.
        P_in: (k_in, d_in) or None (identity); P_out: (k_out, d_out) or None (identity).
        split: token splits per segment (None: enough programs to fill the GPU; 1 under the interpreter).
    """
    device = X.device
    n_seg, total = offsets.numel() - 1, X.shape[0]
    d_in, d_out = X.shape[1], dY.shape[1]
    k_in = d_in if P_in is None else P_in.shape[0]
    k_out = d_out if P_out is None else P_out.shape[0]
    if n_seg == 0 or total == 0 or k_in == 0 or k_out == 0:
        return torch.zeros((n_seg, k_out * k_in), dtype=torch.float32, device=device)
    pin = None if P_in is None else P_in.to(torch.float32)
    pout = None if P_out is None else P_out.to(torch.float32)
    interp = interpreting()
    cfg = project_launch_config(k_out, k_in, X.dtype, interpret=interp)
    block_t, block_ko, block_ki = cfg["BLOCK_T"], cfg["BLOCK_KO"], cfg["BLOCK_KI"]
    n_tiles_in = triton.cdiv(k_in, block_ki)
    n_tiles = triton.cdiv(k_out, block_ko) * n_tiles_in
    if split is None:
        if interp or device.type != "cuda":
            split = 1
        else:
            want = _PROGRAMS_PER_SM * sm_count(device.index if device.index is not None else 0)
            avg_blocks = triton.cdiv(triton.cdiv(total, n_seg), block_t)
            split = max(1, min(triton.cdiv(want, n_seg * n_tiles), avg_blocks))
    split = max(1, int(split))
    kk = k_out * k_in
    out = torch.empty((split, n_seg, kk) if split > 1 else (n_seg, kk), dtype=torch.float32, device=device)
    stride_out_s = out.stride(0) if split > 1 else 0
    stride_out_n = out.stride(1) if split > 1 else out.stride(0)
    # A dummy (never dereferenced) pointer stands in for an identity side.
    pin_arg = pin if pin is not None else out
    pout_arg = pout if pout is not None else out
    _segment_project_kernel[(n_seg * split * n_tiles,)](
        X,
        dY,
        pin_arg,
        pout_arg,
        offsets,
        out,
        n_seg,
        d_in,
        d_out,
        k_in,
        k_out,
        n_tiles,
        n_tiles_in,
        split,
        X.stride(0),
        X.stride(1),
        dY.stride(0),
        dY.stride(1),
        pin.stride(0) if pin is not None else 0,
        pin.stride(1) if pin is not None else 0,
        pout.stride(0) if pout is not None else 0,
        pout.stride(1) if pout is not None else 0,
        stride_out_s,
        stride_out_n,
        HAS_PIN=pin is not None,
        HAS_POUT=pout is not None,
        **cfg,
    )
    return out.sum(0) if split > 1 else out
