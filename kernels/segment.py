"""Triton kernels for packed per-segment weight gradients: Kronecker projection and fused query dots.

Inputs are packed: X (T×d_in) layer inputs, dY (T×d_out) output gradients, offsets (N+1,) int64 marking
N segments (no padding). A segment's weight gradient is G_i = dY_iᵀ X_i (d_out×d_in, nn.Linear layout).
Neither kernel writes G_i to memory. Import this module only when Triton is installed; the public entry
points with input checks and dispatch are in `prefprune.ops.segment`.

Why this design (GPU speed):
- The fused dot builds tiles of G_i on chip with tensor-core `tl.dot` over token blocks and contracts each
  tile with the m query tiles and with itself (squared norm) before it leaves registers. For the layers that
  carry the trainable parameters here (LoRA A: r×hidden, LoRA B: hidden×r, score head 1×hidden), forming
  G costs 2·T·d_out·d_in flops, i.e. 2·r·hidden per token, while the two alternatives are worse:
  Σ_t dY_tᵀ Q_j X_t costs m times more, and the Gram form Σ_{s,t}(dY_s·dY_t)(X_s·X_t) costs
  2·T_seg·(d_in+d_out) per token (T_seg = 256..2048 ≫ r). With r ≤ 64 the kernel reads X and dY about
  once and does ~2r flops per loaded element, far under the H200 ridge (~200 flop/byte in bf16), so it is
  bound by HBM bandwidth, which is the floor for any method that must read every activation.
- Each layer is oriented so that its small dimension (r, or 1 for the head) is the tile's row side
  (G or Gᵀ, with the query strides swapped to match): one tile row covers all of it, so the large side is
  streamed exactly once per segment.
- One launch covers a whole group of layers (all LoRA layers of a model, which share offsets): a table
  of per-layer addresses and strides plus a flat tile list; per-tile partial results are reduced in a
  fixed order afterwards (deterministic, no atomics).
- The projection first projects token rows (X P_inᵀ, dY P_outᵀ) on chip in fp32 and accumulates the
  per-segment outer products of the projected rows, so the only traffic is reading X, dY once per output
  tile and writing N·k_out·k_in results. Its output is linear in the tokens, so long segments are split
  across programs (SPLIT partial sums) to fill the GPU when N is small.

Precision: fp32 accumulation always. 16-bit inputs use native tensor-core dots in the fused dot kernel (the
inputs are exact, only the fp32 accumulation rounds); the projection runs its dots on fp32 values in tf32
(16-bit inputs are exact in tf32; the projection matrix and projected rows round to 10-bit mantissas,
below the inputs' own precision). fp32 inputs use IEEE fp32 dots everywhere.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Programs per SM the projection tries to launch before it splits segments along tokens.
_PROGRAMS_PER_SM = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ---------------------------------------------------------------------------------------------
# Fused per-segment gradient dots and squared norms (grouped over layers)
# ---------------------------------------------------------------------------------------------

# Per-layer row of the int64 table read by the kernel: addresses of A, B, Q; da, db; strides of A, B, Q.
_META_COLS = 12


@triton.jit
def _segment_grad_dot_kernel(
    meta_ptr,
    tiles_ptr,
    offsets_ptr,
    dots_ptr,
    sq_ptr,
    N,
    m,
    n_tiles,
    DTYPE: tl.constexpr,
    HAS_Q: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program = one segment × one (BLOCK_A×BLOCK_B) tile of one layer's (oriented) gradient.

    For layer l oriented as A (T×da, the small side), B (T×db) with G' = Aᵀ B (da×db) and query Q' (m, da, db)
    (either G' = G, Q' = Q, or both transposed through strides), the program computes

        tile = Σ_{t in segment} A[t, a0:a0+BA]ᵀ B[t, b0:b0+BB]        (fp32, on chip)
        dots[tile_id, seg, j] = ⟨tile, Q'_j[a0:, b0:]⟩,  sq[tile_id, seg] = ‖tile‖²

    meta_ptr: (L, 12) int64 per layer: addresses of A, B, Q, then da, db, strides of A (t, d), B (t, d),
    Q (m, a, b). tiles_ptr: (n_tiles, 3) int64 (layer, a0, b0). offsets_ptr: (N+1,) int64.
    dots_ptr: (n_tiles, N, m) fp32, sq_ptr: (n_tiles, N) fp32, partial results summed by the launcher.
    Grid: (n_tiles * N,), tile-fastest so that programs running together share the segment's small side
    and read disjoint column blocks of its large side.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % n_tiles
    seg = pid // n_tiles

    layer = tl.load(tiles_ptr + tile * 3)
    a0 = tl.load(tiles_ptr + tile * 3 + 1)
    b0 = tl.load(tiles_ptr + tile * 3 + 2)
    row = meta_ptr + layer * 12
    a_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    da = tl.load(row + 3)
    db = tl.load(row + 4)
    s_a_t = tl.load(row + 5)
    s_a_d = tl.load(row + 6)
    s_b_t = tl.load(row + 7)
    s_b_d = tl.load(row + 8)

    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)

    ra = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
    rb = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
    rt = tl.arange(0, BLOCK_T).to(tl.int64)
    mask_a = ra < da
    mask_b = rb < db

    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + rt
        mask_t = rows < end
        # A is loaded transposed (BLOCK_A × BLOCK_T) so the token sum is a plain matrix product.
        a = tl.load(
            a_ptr + rows[None, :] * s_a_t + ra[:, None] * s_a_d,
            mask=mask_a[:, None] & mask_t[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows[:, None] * s_b_t + rb[None, :] * s_b_d,
            mask=mask_t[:, None] & mask_b[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out = tile * N + seg
    tl.store(sq_ptr + out, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if HAS_Q:
        q_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        s_q_m = tl.load(row + 9)
        s_q_a = tl.load(row + 10)
        s_q_b = tl.load(row + 11)
        q_off = ra[:, None] * s_q_a + rb[None, :] * s_q_b
        mask_q = mask_a[:, None] & mask_b[None, :]
        for j in range(0, m):
            q = tl.load(q_ptr + j * s_q_m + q_off, mask=mask_q, other=0.0)
            tl.store(dots_ptr + out * m + j, tl.sum(tl.sum(acc * q, axis=1), axis=0))


def dot_launch_config(small: int, dtype: torch.dtype, *, interpret: bool) -> dict:
    """Constexprs and num_warps of _segment_grad_dot_kernel for layers whose small side is <= `small`.

    BLOCK_A covers the small side (r ≤ 64 in one tile row); register use checked with ptxas -v for sm_90a
    (no spills; 64×64 tiles need 8 warps to stay under 255 registers).
    """
    block_a = _pow2_clamp(small, 16, 64)
    block_b = 128 if block_a <= 32 else 64
    return {
        "PRECISION": _dot_precision(dtype),
        "BLOCK_T": 16 if interpret else 64,
        "BLOCK_A": block_a,
        "BLOCK_B": block_b,
        "num_warps": 8 if block_a * block_b >= 64 * 64 else 4,
    }


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32; 16-bit operands are exact in the tensor-core dot.
    return "ieee" if dtype == torch.float32 else "tf32"


def segment_grad_dot_grouped_triton(
    Xs: list[Tensor], dYs: list[Tensor], offsets: Tensor, Qs: list[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """Σ over layers of per-segment ⟨dY_iᵀ X_i, Q_j⟩ and ‖dY_iᵀ X_i‖², one launch per input dtype.

    Args:
        Xs: per layer (T, d_in_l); dYs: per layer (T, d_out_l), same dtype as the layer's X, any strides.
        offsets: (N+1,) int64 on the same device, already validated (see prefprune.ops.segment).
        Qs: per layer (m, d_out_l, d_in_l), or None for norms only.

    Returns:
        S (N, m) fp32 and sqnorm (N,) fp32.
    """
    device = Xs[0].device
    n_seg = offsets.numel() - 1
    m = 0 if Qs is None else Qs[0].shape[0]
    S = torch.zeros((n_seg, m), dtype=torch.float32, device=device)
    sq = torch.zeros((n_seg,), dtype=torch.float32, device=device)
    if n_seg == 0 or Xs[0].shape[0] == 0:
        return S, sq
    groups: dict[torch.dtype, list[int]] = {}
    for i, X in enumerate(Xs):
        groups.setdefault(X.dtype, []).append(i)
    for dtype, idx in groups.items():
        gS, gsq = _grad_dot_launch(
            [Xs[i] for i in idx],
            [dYs[i] for i in idx],
            offsets,
            None if Qs is None else [Qs[i] for i in idx],
            dtype=dtype,
            n_seg=n_seg,
            m=m,
        )
        S += gS
        sq += gsq
    return S, sq


def segment_grad_dot_triton(
    X: Tensor, dY: Tensor, offsets: Tensor, Q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Single-layer form of segment_grad_dot_grouped_triton; Q (m, d_out, d_in) or None."""
    return segment_grad_dot_grouped_triton([X], [dY], offsets, None if Q is None else [Q])


@functools.lru_cache(maxsize=64)
def _tile_table(dims: tuple[tuple[int, int], ...], block_a: int, block_b: int, device: str) -> Tensor:
    """(n_tiles, 3) int64 rows (layer, a0, b0) covering every layer's oriented (da, db) gradient."""
    rows = [
        (layer, a0, b0)
        for layer, (da, db) in enumerate(dims)
        for a0 in range(0, da, block_a)
        for b0 in range(0, db, block_b)
    ]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)


def _grad_dot_launch(
    Xs: list[Tensor],
    dYs: list[Tensor],
    offsets: Tensor,
    Qs: list[Tensor] | None,
    *,
    dtype: torch.dtype,
    n_seg: int,
    m: int,
) -> tuple[Tensor, Tensor]:
    device = Xs[0].device
    qs = None if Qs is None else [Q.to(torch.float32) for Q in Qs]  # no copy when already fp32
    small = max(min(X.shape[1], dY.shape[1]) for X, dY in zip(Xs, dYs, strict=True))
    cfg = dot_launch_config(small, dtype, interpret=_interpreting())
    block_a, block_b = cfg["BLOCK_A"], cfg["BLOCK_B"]
    meta, dims = [], []
    for layer, (X, dY) in enumerate(zip(Xs, dYs, strict=True)):
        Q = None if qs is None else qs[layer]
        d_in, d_out = X.shape[1], dY.shape[1]
        sq_m, sq_o, sq_i = (0, 0, 0) if Q is None else Q.stride()
        q_addr = 0 if Q is None else Q.data_ptr()
        if d_out <= d_in:  # G' = G = dYᵀ X
            a, b, q_strides = dY, X, (sq_m, sq_o, sq_i)
        else:  # G' = Gᵀ = Xᵀ dY, queries read transposed through their strides
            a, b, q_strides = X, dY, (sq_m, sq_i, sq_o)
        meta.extend(
            [a.data_ptr(), b.data_ptr(), q_addr, a.shape[1], b.shape[1], *a.stride(), *b.stride(), *q_strides]
        )
        dims.append((a.shape[1], b.shape[1]))
    # The addresses change with every batch (one small copy); the tile list only with the shapes (cached).
    meta_t = torch.tensor(meta, dtype=torch.int64).to(device)
    tiles_t = _tile_table(tuple(dims), block_a, block_b, str(device))
    n_tiles = tiles_t.shape[0]
    if n_tiles == 0:  # every layer has a zero-sized side: all gradients are empty
        return torch.zeros((n_seg, m), dtype=torch.float32, device=device), torch.zeros(n_seg, device=device)
    dots = torch.empty((n_tiles, n_seg, max(m, 1)), dtype=torch.float32, device=device)
    sqp = torch.empty((n_tiles, n_seg), dtype=torch.float32, device=device)
    _segment_grad_dot_kernel[(n_tiles * n_seg,)](
        meta_t,
        tiles_t,
        offsets,
        dots,
        sqp,
        n_seg,
        m,
        n_tiles,
        DTYPE=_TL_DTYPES[dtype],
        HAS_Q=Qs is not None and m > 0,
        **cfg,
    )
    return dots[:, :, :m].sum(0), sqp.sum(0)


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
        "PRECISION": _dot_precision(dtype),
        "BLOCK_T": 16 if interpret or dtype == torch.float32 else 64,
        "BLOCK_KO": _pow2_clamp(k_out, 16, 64),
        "BLOCK_KI": _pow2_clamp(k_in, 16, 64),
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
    interp = _interpreting()
    cfg = project_launch_config(k_out, k_in, X.dtype, interpret=interp)
    block_t, block_ko, block_ki = cfg["BLOCK_T"], cfg["BLOCK_KO"], cfg["BLOCK_KI"]
    n_tiles_in = triton.cdiv(k_in, block_ki)
    n_tiles = triton.cdiv(k_out, block_ko) * n_tiles_in
    if split is None:
        if interp or device.type != "cuda":
            split = 1
        else:
            want = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
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
