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
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TL_DTYPES, dot_precision, interpreting, pow2_clamp

# ---------------------------------------------------------------------------------------------
# Fused per-segment gradient dots and squared norms (grouped over layers)
# ---------------------------------------------------------------------------------------------

# Per-layer row of the int64 table read by the kernel: addresses of A, B, Q; da, db; row strides of A and B;
# the query strides (per query, per row of Q as stored).
_META_COLS = 9


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
    TRANS_Q: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program = one segment × one (BLOCK_A×BLOCK_B) tile of one layer's (oriented) gradient.

    For layer l oriented as A (T×da, the small side), B (T×db) with G' = Aᵀ B (da×db) and query Q' (m, da, db)
    (either G' = G, Q' = Q, or both transposed: TRANS_Q), the program computes

        tile = Σ_{t in segment} A[t, a0:a0+BA]ᵀ B[t, b0:b0+BB]        (fp32, on chip)
        dots[tile_id, seg, j] = ⟨tile, Q'_j[a0:, b0:]⟩,  sq[tile_id, seg] = ‖tile‖²

    A, B and Q have unit inner strides (the launcher makes them so), so their tiles are contiguous along
    the feature side. With ALIGNED the launcher has checked that every address is 16-byte aligned and every
    row stride and feature size is a multiple of VEC elements (16 bytes of DTYPE; Q: 4 fp32): the hints let
    the compiler issue 128-bit loads.

    meta_ptr: (L, 9) int64 per layer: addresses of A, B, Q, then da, db, row strides of A and B, Q's
    per-query and per-row strides. tiles_ptr: (n_tiles, 3) int64 (layer, a0, b0). offsets_ptr: (N+1,) int64.
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
    row = meta_ptr + layer * 9
    a_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    da = tl.load(row + 3)
    db = tl.load(row + 4)
    s_a = tl.load(row + 5)
    s_b = tl.load(row + 6)
    if ALIGNED:
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        da = tl.multiple_of(da, VEC)
        db = tl.multiple_of(db, VEC)
        s_a = tl.multiple_of(s_a, VEC)
        s_b = tl.multiple_of(s_b, VEC)
        a0 = tl.multiple_of(a0, BLOCK_A)
        b0 = tl.multiple_of(b0, BLOCK_B)

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
        # A is loaded transposed (BLOCK_A × BLOCK_T, contiguous along a) so the token sum is a matrix product.
        a = tl.load(
            a_ptr + rows[None, :] * s_a + ra[:, None],
            mask=mask_a[:, None] & mask_t[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows[:, None] * s_b + rb[None, :],
            mask=mask_t[:, None] & mask_b[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out = tile * N + seg
    tl.store(sq_ptr + out, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if HAS_Q:
        q_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        s_q_m = tl.load(row + 7)
        s_q_r = tl.load(row + 8)
        if ALIGNED:
            q_ptr = tl.multiple_of(q_ptr, 16)
            s_q_m = tl.multiple_of(s_q_m, 4)
            s_q_r = tl.multiple_of(s_q_r, 4)
        if TRANS_Q:  # Q stored (m, db, da): Q'[a, b] at b * s_q_r + a
            q_off = rb[None, :] * s_q_r + ra[:, None]
        else:  # Q stored (m, da, db)
            q_off = ra[:, None] * s_q_r + rb[None, :]
        mask_q = mask_a[:, None] & mask_b[None, :]
        for j in range(0, m):
            q = tl.load(q_ptr + j * s_q_m + q_off, mask=mask_q, other=0.0)
            tl.store(dots_ptr + out * m + j, tl.sum(tl.sum(acc * q, axis=1), axis=0))


def dot_launch_config(small: int, dtype: torch.dtype, *, interpret: bool) -> dict:
    """Constexprs (except HAS_Q, TRANS_Q, ALIGNED) and num_warps for layers whose small side is <= `small`.

    Chosen per bucket of layers (see `dot_buckets`): BLOCK_A covers the small side (r ≤ 64 in one tile row),
    so a model's r = 16 LoRA layers get 16-row tiles even when another layer (a pooler, 384 wide) needs 64.
    Register use is checked for sm_90 by tests/test_kernels_aot.py (no spills for every bucket and dtype).

    num_warps: 8, except 4 for fp32 16×128 tiles. 16-bit 16×128 tiles ran on 4 warps until the pin to
    Triton 3.7.1 (its ptxas is CUDA 12.8): there, with the query transposed and aligned, the masks of the
    Q tile's 128-bit loads stay live across the loop over queries, each thread on 4 warps carries twice as
    many of them, and ptxas moved two out of the predicate registers (7 on sm_90) and spilled them to
    local memory (8 bytes, at only 64 registers; Triton 3.9.0 with CUDA 13.4's ptxas did not). On 8 warps
    each thread loads half the Q tile and holds half the accumulator: 48-56 registers aligned (128-156
    unaligned), no spills under 3.7.1 or 3.9.0. fp32 16×128 tiles (32-token blocks) are spill-free on
    4 warps under both (95-128 registers) and keep them.
    """
    block_a = pow2_clamp(small, 16, 64)
    block_b = 128 if block_a <= 32 else 64
    small_fp32_tile = dtype == torch.float32 and block_a * block_b < 64 * 64
    return {
        "VEC": 16 // _ELEMENT_SIZE[dtype],
        "PRECISION": dot_precision(dtype),
        # fp32 tf32x3 dots hold three operand splits: 32-token blocks keep them in registers.
        "BLOCK_T": 16 if interpret else (32 if dtype == torch.float32 else 64),
        "BLOCK_A": block_a,
        "BLOCK_B": block_b,
        "num_warps": 4 if small_fp32_tile else 8,
    }


_ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# The small sides the launcher can see map to these BLOCK_A values (pow2_clamp(small, 16, 64)).
SMALL_SIDE_BUCKETS = (16, 32, 64)


def aot_variants() -> list[dict]:
    """Every kernel variant `plan_grad_dot` can launch on a GPU, for ahead-of-time compile checks
    (tests/test_kernels_aot.py): dtype × small-side bucket × query mode (none, as stored, transposed) ×
    alignment. The pointer arguments carry the JIT's 16-byte specialisation (torch allocations are aligned);
    the layers' own alignment is the ALIGNED constexpr."""
    sig = {"meta_ptr": "*i64", "tiles_ptr": "*i64", "offsets_ptr": "*i64", "dots_ptr": "*fp32",
           "sq_ptr": "*fp32", "N": "i32", "m": "i32", "n_tiles": "i32"}
    out = []
    for dtype, tl_dtype in TL_DTYPES.items():
        for small in SMALL_SIDE_BUCKETS:
            for has_q, trans_q in ((False, False), (True, False), (True, True)):
                for aligned in (True, False):
                    cfg = dot_launch_config(small, dtype, interpret=False)
                    warps = cfg.pop("num_warps")
                    consts = dict(DTYPE=tl_dtype, HAS_Q=has_q, TRANS_Q=trans_q, ALIGNED=aligned, **cfg)
                    q = f"{int(has_q)}{'T' * trans_q}"
                    name = f"grad_dot {str(dtype)[6:]} A{cfg['BLOCK_A']} q={q} al={int(aligned)}"
                    ptrs = tuple(k for k in sig if k.endswith("_ptr"))
                    out.append(dict(name=name, kernel=_segment_grad_dot_kernel, signature=sig,
                                    constexprs=consts, num_warps=warps, divisible=ptrs, aligned=aligned))
    return out


def _unit_inner(t: Tensor) -> Tensor:
    """t with stride 1 along its last dimension (a copy only when it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class _Layer:
    a: Tensor  # (T, da): the small side
    b: Tensor  # (T, db)
    q: Tensor | None  # (m, d_out, d_in) fp32, unit inner stride
    trans_q: bool  # G' = Gᵀ: Q'[a, b] = Q[b, a]

    @property
    def dims(self) -> tuple[int, int]:
        return self.a.shape[1], self.b.shape[1]

    def aligned(self) -> bool:
        """Every address 16-byte aligned, every row stride and feature size a multiple of 16 bytes."""
        vec = 16 // self.a.element_size()
        ok = all(t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0 for t in (self.a, self.b))
        ok = ok and self.a.shape[1] % vec == 0 and self.b.shape[1] % vec == 0
        if self.q is not None:
            q_strides = self.q.stride(0) % 4 == 0 and self.q.stride(1) % 4 == 0
            ok = ok and self.q.data_ptr() % 16 == 0 and q_strides
        return ok

    def meta(self) -> list[int]:
        q_addr, s_qm, s_qr = (0, 0, 0) if self.q is None else (self.q.data_ptr(), *self.q.stride()[:2])
        da, db = self.dims
        return [self.a.data_ptr(), self.b.data_ptr(), q_addr, da, db, self.a.stride(0), self.b.stride(0),
                s_qm, s_qr]


def _orient(X: Tensor, dY: Tensor, Q: Tensor | None) -> _Layer:
    X, dY = _unit_inner(X), _unit_inner(dY)
    q = None if Q is None else _unit_inner(Q.to(torch.float32))  # no copy when already fp32 and unit-stride
    if dY.shape[1] <= X.shape[1]:  # G' = G = dYᵀ X
        return _Layer(dY, X, q, False)
    return _Layer(X, dY, q, True)  # G' = Gᵀ = Xᵀ dY


def dot_buckets(layers: list[tuple[torch.dtype, int, bool, bool]]) -> dict[tuple, list[int]]:
    """Group layers (dtype, small side, TRANS_Q, ALIGNED) into launches: one per (dtype, BLOCK_A, TRANS_Q,
    ALIGNED), in first-seen order; values are the layer indices."""
    out: dict[tuple, list[int]] = {}
    for i, (dtype, small, trans_q, aligned) in enumerate(layers):
        out.setdefault((dtype, pow2_clamp(small, 16, 64), trans_q, aligned), []).append(i)
    return out


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


@dataclass
class GradDotPlan:
    """Everything one grouped fused dot launches, prepared (tables on the device, buffers allocated).

    `run()` only launches the kernels (one per bucket) and reduces their per-tile partial sums: timing it
    measures the kernels without the launcher's host work (table building, the host-to-device copy).
    """

    n_seg: int
    m: int
    device: torch.device
    launches: list[tuple[tuple, dict, int]] = field(default_factory=list)  # (args, constexprs, grid)
    keep: list = field(default_factory=list)  # tensors the tables point into (kept alive)

    def run(self) -> tuple[Tensor, Tensor]:
        S = torch.zeros((self.n_seg, self.m), dtype=torch.float32, device=self.device)
        sq = torch.zeros((self.n_seg,), dtype=torch.float32, device=self.device)
        for args, constexprs, grid in self.launches:
            dots, sqp = args[3], args[4]
            _segment_grad_dot_kernel[(grid,)](*args, **constexprs)
            S += dots[:, :, : self.m].sum(0)
            sq += sqp.sum(0)
        return S, sq


def plan_grad_dot(
    Xs: list[Tensor], dYs: list[Tensor], offsets: Tensor, Qs: list[Tensor] | None
) -> GradDotPlan:
    """Prepare `segment_grad_dot_grouped_triton` (same arguments): buckets, tables, buffers."""
    device = Xs[0].device
    n_seg = offsets.numel() - 1
    m = 0 if Qs is None else Qs[0].shape[0]
    plan = GradDotPlan(n_seg=n_seg, m=m, device=device)
    if n_seg == 0 or Xs[0].shape[0] == 0:
        return plan
    qs = [None] * len(Xs) if Qs is None else list(Qs)
    layers = [_orient(X, dY, Q) for X, dY, Q in zip(Xs, dYs, qs, strict=True)]
    plan.keep.extend(layers)
    # Without queries the orientation changes nothing in the kernel: those layers share launches.
    keys = [(lay.a.dtype, lay.dims[0], lay.trans_q and Qs is not None, lay.aligned()) for lay in layers]
    interp = interpreting()
    for (dtype, block_a, trans_q, aligned), idx in dot_buckets(keys).items():
        cfg = dot_launch_config(block_a, dtype, interpret=interp)
        group = [layers[i] for i in idx]
        dims = tuple(lay.dims for lay in group)
        tiles_t = _tile_table(dims, cfg["BLOCK_A"], cfg["BLOCK_B"], str(device))
        n_tiles = tiles_t.shape[0]
        if n_tiles == 0:  # every layer of the bucket has a zero-sized side: its gradients are empty
            continue
        # The addresses change with every batch (one small copy); the tile list only with the shapes (cached).
        meta_t = torch.tensor([v for lay in group for v in lay.meta()], dtype=torch.int64).to(device)
        dots = torch.empty((n_tiles, n_seg, max(m, 1)), dtype=torch.float32, device=device)
        sqp = torch.empty((n_tiles, n_seg), dtype=torch.float32, device=device)
        args = (meta_t, tiles_t, offsets, dots, sqp, n_seg, m, n_tiles)
        constexprs = dict(
            DTYPE=TL_DTYPES[dtype], HAS_Q=Qs is not None and m > 0, TRANS_Q=trans_q, ALIGNED=aligned, **cfg
        )
        plan.launches.append((args, constexprs, n_tiles * n_seg))
    return plan


def segment_grad_dot_grouped_triton(
    Xs: list[Tensor], dYs: list[Tensor], offsets: Tensor, Qs: list[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """Σ over layers of per-segment ⟨dY_iᵀ X_i, Q_j⟩ and ‖dY_iᵀ X_i‖², one launch per layer bucket.

    Args:
        Xs: per layer (T, d_in_l); dYs: per layer (T, d_out_l), same dtype as the layer's X, any strides
            (a tensor whose last stride is not 1 is copied first).
        offsets: (N+1,) int64 on the same device, already validated (see prefprune.ops.segment).
        Qs: per layer (m, d_out_l, d_in_l), or None for norms only.

    Returns:
        S (N, m) fp32 and sqnorm (N,) fp32.
    """
    return plan_grad_dot(Xs, dYs, offsets, Qs).run()


def segment_grad_dot_triton(
    X: Tensor, dY: Tensor, offsets: Tensor, Q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Single-layer form of segment_grad_dot_grouped_triton; Q (m, d_out, d_in) or None."""
    return segment_grad_dot_grouped_triton([X], [dY], offsets, None if Q is None else [Q])
