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

from dataclasses import dataclass

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
    stride_x,
    stride_dy,
    stride_pin,
    stride_pout,
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
    k_in = d_in), pout_ptr: (k_out, d_out) fp32 (likewise), all with unit inner stride (the launcher makes
    them so; stride_* are the row strides); offsets_ptr: (N+1,) int64;
    out_ptr: (split, N, k_out*k_in) fp32 (stride_out_s = 0 when split = 1).
    Alignment reaches the compiler through Triton's argument specialisation: a pointer argument whose
    address is a multiple of 16 bytes and an integer argument that is a multiple of 16 are compiled as such
    (`JIT_DIVISIBLE_ARGS` lists the ones the loads depend on), which is what lets it issue 128-bit loads.
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
                    x_ptr + rows[:, None] * stride_x + cols[None, :],
                    mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                p = tl.load(
                    pin_ptr + cols[:, None] + rki[None, :] * stride_pin,
                    mask=mask_d[:, None] & mask_ki[None, :],
                    other=0.0,
                )
                xt = tl.dot(x, p, xt, input_precision=PRECISION)
        else:
            xt = tl.load(
                x_ptr + rows[:, None] * stride_x + rki[None, :],
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
                    pout_ptr + rko[:, None] * stride_pout + cols[None, :],
                    mask=mask_ko[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dy = tl.load(
                    dy_ptr + rows[None, :] * stride_dy + cols[:, None],
                    mask=mask_d[:, None] & mask_t[None, :],
                    other=0.0,
                ).to(tl.float32)
                yt = tl.dot(p, dy, yt, input_precision=PRECISION)
        else:
            yt = tl.load(
                dy_ptr + rows[None, :] * stride_dy + rko[:, None],
                mask=mask_ko[:, None] & mask_t[None, :],
                other=0.0,
            ).to(tl.float32)
        acc = tl.dot(yt, xt, acc, input_precision=PRECISION)

    out = out_ptr + s * stride_out_s + seg * stride_out_n + rko[:, None] * k_in + rki[None, :]
    tl.store(out, acc, mask=mask_ko[:, None] & mask_ki[None, :])


def project_launch_config(
    k_out: int, k_in: int, dtype: torch.dtype, *, has_pin: bool, has_pout: bool, interpret: bool
) -> dict:
    """Constexprs (except HAS_PIN, HAS_POUT) and num_warps of _segment_project_kernel.

    8 warps, BLOCK_D = 32 (16 for fp32 with both sides projected, below); BLOCK_T = 64 for 16-bit inputs,
    32 for fp32 (16 under the interpreter): larger token blocks re-read the projection matrices (from L2)
    less often per token. Register use is checked for sm_90 by tests/test_kernels_aot.py (no spills for
    every dtype, projected side and block size).

    fp32 with P_in and P_out both given is the kernel's largest register set: the 64×64 accumulator, both
    projected token blocks (32×64 and 64×32 fp32) and, per BLOCK_D step, the tf32x3 high/low splits of the
    X, dY and both projection-matrix slices. With BLOCK_D = 32 the unaligned variant (per-element
    addresses and masks of 4-byte `cp.async`) used all 255 registers under Triton 3.7.1 (the pinned
    version) and 3.9.0, and spilled 56 bytes under 3.7.1. BLOCK_D = 16 halves the per-step slices: 199
    registers unaligned and 148 aligned under 3.7.1 (191 and 148 under 3.9.0), no spills. It costs twice
    as many (half as long) steps over d_in and d_out for that case only; the other cases keep BLOCK_D = 32.
    """
    return {
        "PRECISION": dot_precision(dtype),
        # fp32 tf32x3 dots hold three operand splits: 32-token blocks keep them in registers.
        "BLOCK_T": 16 if interpret else (32 if dtype == torch.float32 else 64),
        "BLOCK_KO": pow2_clamp(k_out, 16, 64),
        "BLOCK_KI": pow2_clamp(k_in, 16, 64),
        "BLOCK_D": 16 if dtype == torch.float32 and has_pin and has_pout else 32,
        "num_warps": 8,
    }


_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Arguments whose divisibility by 16 (bytes for pointers, value for integers) Triton's JIT specialises on
# and the 128-bit loads depend on; `aligned_for_jit` says whether a launch gets all of them.
JIT_DIVISIBLE_ARGS = ("x_ptr", "dy_ptr", "pin_ptr", "pout_ptr", "offsets_ptr", "out_ptr", "d_in", "d_out",
                      "k_in", "k_out", "stride_x", "stride_dy", "stride_pin", "stride_pout", "stride_out_n")


def aot_variants() -> list[dict]:
    """Every kernel variant `plan_project` can launch on a GPU, for ahead-of-time compile checks
    (tests/test_kernels_aot.py): dtype × projected sides × alignment, at the largest output tile (64×64:
    the most registers; an identity side of 16 or 32 needs fewer). Aligned variants carry the JIT's
    divisibility specialisation of `JIT_DIVISIBLE_ARGS`."""
    out = []
    for dtype, name in _TL_NAMES.items():
        sig = {"x_ptr": f"*{name}", "dy_ptr": f"*{name}", "pin_ptr": "*fp32", "pout_ptr": "*fp32",
               "offsets_ptr": "*i64", "out_ptr": "*fp32"}
        for arg in ("N", "d_in", "d_out", "k_in", "k_out", "n_tiles", "n_tiles_in", "split", "stride_x",
                    "stride_dy", "stride_pin", "stride_pout", "stride_out_s", "stride_out_n"):
            sig[arg] = "i32"
        for has_pin in (True, False):
            for has_pout in (True, False):
                for aligned in (True, False):
                    cfg = project_launch_config(
                        64, 64, dtype, has_pin=has_pin, has_pout=has_pout, interpret=False
                    )
                    warps = cfg.pop("num_warps")
                    label = f"project {name} P_in={int(has_pin)} P_out={int(has_pout)} al={int(aligned)}"
                    out.append(dict(name=label, kernel=_segment_project_kernel, signature=sig,
                                    constexprs=dict(HAS_PIN=has_pin, HAS_POUT=has_pout, **cfg),
                                    num_warps=warps, divisible=JIT_DIVISIBLE_ARGS if aligned else (),
                                    aligned=aligned))
    return out


def aligned_for_jit(args: tuple) -> bool:
    """Whether every `JIT_DIVISIBLE_ARGS` value of a launch is divisible by 16 (the fast, 128-bit variant)."""
    names = _segment_project_kernel.arg_names
    vals = dict(zip(names, args, strict=False))
    return all(
        (v.data_ptr() if isinstance(v, Tensor) else int(v)) % 16 == 0
        for k, v in vals.items()
        if k in JIT_DIVISIBLE_ARGS
    )


def _unit_inner(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@dataclass
class ProjectPlan:
    """One prepared projection launch; `run()` launches the kernel and sums the token splits only."""

    args: tuple
    constexprs: dict
    grid: int
    split: int

    def run(self) -> Tensor:
        out = self.args[5]
        _segment_project_kernel[(self.grid,)](*self.args, **self.constexprs)
        return out.sum(0) if self.split > 1 else out


def plan_project(
    X: Tensor,
    dY: Tensor,
    offsets: Tensor,
    P_in: Tensor | None,
    P_out: Tensor | None,
    *,
    split: int | None = None,
) -> ProjectPlan | Tensor:
    """Prepare `segment_project_triton` (same arguments); an empty problem returns its (zero) result."""
    device = X.device
    n_seg, total = offsets.numel() - 1, X.shape[0]
    d_in, d_out = X.shape[1], dY.shape[1]
    k_in = d_in if P_in is None else P_in.shape[0]
    k_out = d_out if P_out is None else P_out.shape[0]
    if n_seg == 0 or total == 0 or k_in == 0 or k_out == 0:
        return torch.zeros((n_seg, k_out * k_in), dtype=torch.float32, device=device)
    X, dY = _unit_inner(X), _unit_inner(dY)
    pin = None if P_in is None else _unit_inner(P_in.to(torch.float32))
    pout = None if P_out is None else _unit_inner(P_out.to(torch.float32))
    interp = interpreting()
    cfg = project_launch_config(
        k_out, k_in, X.dtype, has_pin=pin is not None, has_pout=pout is not None, interpret=interp
    )
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
    args = (
        X, dY, pin_arg, pout_arg, offsets, out,
        n_seg, d_in, d_out, k_in, k_out, n_tiles, n_tiles_in, split,
        X.stride(0), dY.stride(0),
        pin.stride(0) if pin is not None else 0,
        pout.stride(0) if pout is not None else 0,
        stride_out_s, stride_out_n,
    )  # fmt: skip
    constexprs = dict(HAS_PIN=pin is not None, HAS_POUT=pout is not None, **cfg)
    return ProjectPlan(args, constexprs, n_seg * split * n_tiles, split)


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
        X: (T, d_in), dY: (T, d_out), one dtype (fp32/fp16/bf16), any strides (a tensor whose last stride
            is not 1 is copied first).
        offsets: (N+1,) int64, validated.
        P_in: (k_in, d_in) or None (identity); P_out: (k_out, d_out) or None (identity).
        split: token splits per segment (None: enough programs to fill the GPU; 1 under the interpreter).
    """
    plan = plan_project(X, dY, offsets, P_in, P_out, split=split)
    return plan if isinstance(plan, Tensor) else plan.run()
