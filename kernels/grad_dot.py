"""Triton kernel of the fused per-segment gradient dots and squared norms (grouped layers), and its launcher.

Inputs are packed: X (T×d_in) layer inputs, dY (T×d_out) output gradients, offsets (N+1,) int64 marking
N segments (no padding). A segment's weight gradient is G_i = dY_iᵀ X_i (d_out×d_in, nn.Linear layout),
never written to memory. Import this module only when Triton is installed; the public entry point with
input checks and dispatch is `prefprune.ops.segment.segment_grad_dot_grouped`, the reference
`prefprune.ops.reference.segment_grad_dot_grouped_reference`.

Why this design (GPU speed):
- The kernel builds tiles of G_i on chip with tensor-core `tl.dot` over token blocks and contracts each
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

Precision: fp32 accumulation always. 16-bit inputs use native tensor-core dots (the inputs are exact, only
the fp32 accumulation rounds); fp32 inputs use IEEE fp32 dots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, dot_precision, interpreting, pow2_clamp

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
    block_a = pow2_clamp(small, 16, 64)
    block_b = 128 if block_a <= 32 else 64
    return {
        "PRECISION": dot_precision(dtype),
        "BLOCK_T": 16 if interpret else 64,
        "BLOCK_A": block_a,
        "BLOCK_B": block_b,
        "num_warps": 8 if block_a * block_b >= 64 * 64 else 4,
    }


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
    cfg = dot_launch_config(small, dtype, interpret=interpreting())
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
        DTYPE=TL_DTYPES[dtype],
        HAS_Q=Qs is not None and m > 0,
        **cfg,
    )
    return dots[:, :, :m].sum(0), sqp.sum(0)
