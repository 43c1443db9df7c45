"""Pure-PyTorch reference of every op: the test oracle, the CPU fallback, the benchmark baseline.

Fast paths (Triton in `prefprune.kernels`, native in `prefprune._C`) keep these signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Conjugate gradient
# ---------------------------------------------------------------------------------------------

CG_CONVERGED = 0
CG_MAX_ITER = 1
CG_NONPOSITIVE_CURVATURE = 2
#: A non-finite right-hand side or operator product (set by `prefprune.cg.solve` for every implementation).
CG_NONFINITE = 3
CG_STATUS_NAMES = {
    CG_CONVERGED: "converged",
    CG_MAX_ITER: "max_iter",
    CG_NONPOSITIVE_CURVATURE: "nonpositive_curvature",
    CG_NONFINITE: "nonfinite",
}


@dataclass
class CGResult:
    """Solution of A X = B for m right-hand sides, with a status per column.

    Attributes:
        x: (k, m) solution (for a column stopped on non-positive curvature: the last iterate).
        status: (m,) int64, one of CG_CONVERGED, CG_MAX_ITER, CG_NONPOSITIVE_CURVATURE, CG_NONFINITE.
        iterations: (m,) int64, the number of A-products that column used.
        residual: (m,) relative residual ||r|| / ||b|| at the end (0 for a zero column of B).
        curvature: (m,) the value pᵀAp that stopped a column on non-positive curvature, NaN otherwise.
        history: (iters + 1, m) relative residual after each iteration (row 0: before any),
            frozen columns repeat their last value; None unless requested.
        impl: the implementation that ran ("reference" or "native"), set by `prefprune.cg.solve` from
            its dispatch, so a record never re-derives it.
    """

    x: Tensor
    status: Tensor
    iterations: Tensor
    residual: Tensor
    curvature: Tensor
    history: Tensor | None = None
    impl: str = "reference"

    def status_names(self) -> list[str]:
        return [CG_STATUS_NAMES[int(s)] for s in self.status]


def factored_operator(G: Tensor, w: Tensor, damping: float) -> Callable[[Tensor], Tensor]:
    """X ↦ (Gᵀ diag(w) G / n + λI) X for G (n×k), w (n,), X (k×m)."""
    n = G.shape[0]
    return lambda X: G.T @ (w.unsqueeze(1) * (G @ X)) / n + damping * X


def cg_reference(
    apply_A: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    diag: Tensor | None = None,
    precond: Callable[[Tensor], Tensor] | None = None,
    record_history: bool = False,
) -> CGResult:
    """Preconditioned conjugate gradient on m columns at once, each with its own α, β and stop.

    Args:
        apply_A: maps a (k, m) block P to A P; A must be symmetric.
        B: (k, m) right-hand sides (a (k,) vector is treated as one column).
        tol: stop a column when ||r|| <= tol * ||b|| (the residual of A, not of the preconditioned system).
        max_iter: at most this many A-products per column.
        diag: (k,) diagonal of A for the Jacobi preconditioner M = diag⁻¹ (None: none).
        precond: maps a (k, m) residual block R to M R, M symmetric positive definite; column j may use
            its own M_j (e.g. (H_GN + λ_j I)⁻¹, see `prefprune.ops.woodbury`). Called once before the first
            iteration and once after every iteration, on the whole block (stopped columns too). Excludes diag.
        record_history: keep the relative residual of every iteration.

    Iteration (per column; frozen columns keep their values):
        r = b, z = M r, p = z
        repeat: q = A p; if pᵀq <= 0 stop (non-positive curvature); α = rᵀz / pᵀq;
                x += α p; r -= α q; if ||r|| <= tol ||b|| stop (converged);
                z = M r; β = rᵀz_new / rᵀz_old; p = z + β p
    The curvature test is on A itself (q = A p), whatever M is: a preconditioner changes the directions p,
    never what counts as non-positive curvature of A.
    """
    if B.dim() == 1:
        B = B.unsqueeze(1)
    if B.dim() != 2:
        raise ValueError(f"B must be (k, m), got shape {tuple(B.shape)}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if diag is not None and (diag.shape != (B.shape[0],)):
        raise ValueError(f"diag must have shape ({B.shape[0]},), got {tuple(diag.shape)}")
    if diag is not None and precond is not None:
        raise ValueError(
            f"give one preconditioner, diag (a Jacobi diagonal, here of shape {tuple(diag.shape)}) or "
            f"precond (an operator, here {precond!r}), not both"
        )
    k, m = B.shape
    dev, dt = B.device, B.dtype
    inv_diag = None if diag is None else (1.0 / diag.to(dt)).unsqueeze(1)

    def apply_M(r: Tensor) -> Tensor:
        if precond is None:
            return r if inv_diag is None else inv_diag * r
        z = precond(r)
        if not isinstance(z, Tensor):
            raise TypeError(f"the preconditioner must return a Tensor, got {type(z).__name__}")
        if z.shape != r.shape or z.dtype != r.dtype or z.device != r.device:
            raise ValueError(
                f"the preconditioner returned shape {tuple(z.shape)}, dtype {z.dtype} on {z.device} for a "
                f"{tuple(r.shape)} block of dtype {r.dtype} on {r.device}"
            )
        return z

    x = torch.zeros_like(B)
    r = B.clone()
    b_norm = torch.linalg.vector_norm(B, dim=0)
    safe_b = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    z = apply_M(r)
    p = z.clone()
    rz = (r * z).sum(0)
    status = torch.full((m,), CG_MAX_ITER, dtype=torch.int64, device=dev)
    iterations = torch.zeros(m, dtype=torch.int64, device=dev)
    curvature = torch.full((m,), float("nan"), dtype=dt, device=dev)
    rel = torch.linalg.vector_norm(r, dim=0) / safe_b
    active = b_norm > 0
    status[~active] = CG_CONVERGED
    rel = torch.where(active, rel, torch.zeros_like(rel))
    history = [rel.clone()] if record_history else None

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = apply_A(p)
        pq = (p * q).sum(0)
        bad = active & (pq <= 0)
        if bool(bad.any()):
            status[bad] = CG_NONPOSITIVE_CURVATURE
            curvature[bad] = pq[bad]
            iterations[bad] += 1
            active = active & ~bad
        alpha = torch.where(active, rz / torch.where(active, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x = x + alpha * p
        r = r - alpha * q
        iterations[active] += 1
        rel = torch.where(active, torch.linalg.vector_norm(r, dim=0) / safe_b, rel)
        done = active & (rel <= tol)
        status[done] = CG_CONVERGED
        active = active & ~done
        z = apply_M(r)
        rz_new = (r * z).sum(0)
        safe_rz = torch.where(active, rz, torch.ones_like(rz))
        beta = torch.where(active, rz_new / safe_rz, torch.zeros_like(rz))
        p = torch.where(active, z + beta * p, p)
        rz = torch.where(active, rz_new, rz)
        if history is not None:
            history.append(rel.clone())

    return CGResult(
        x=x,
        status=status,
        iterations=iterations,
        residual=rel,
        curvature=curvature,
        history=torch.stack(history) if history is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Segmented per-example gradients (packed X, dY, offsets): projection and fused dot products
# ---------------------------------------------------------------------------------------------

# Elements of scratch a chunk of padded segments may use (fp32: 4 bytes each): bounds the reference's memory
# whatever T_total and N are, while keeping the number of Python-level chunks small.
SEGMENT_CHUNK_ELEMENTS = 1 << 25
# Up to this many segments, averaging at least this many rows each, the reference reduces segment by
# segment instead of padding them into a batched matmul (the padded copy costs more than it saves then).
_LOOP_SEGMENTS = 64
_LOOP_MIN_ROWS_PER_SEGMENT = 32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit inputs (accumulate in fp32), fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segment_chunks(bounds: list[int], per_row: int, per_segment: int) -> list[tuple[int, int, int]]:
    """Split segments into consecutive chunks (s0, s1, L) whose padded scratch fits SEGMENT_CHUNK_ELEMENTS.

    A chunk of n segments padded to its longest length L needs n*L*per_row + n*per_segment elements.
    """
    chunks = []
    n_seg = len(bounds) - 1
    s0 = 0
    while s0 < n_seg:
        s1, longest = s0 + 1, bounds[s0 + 1] - bounds[s0]
        while s1 < n_seg:
            cand = max(longest, bounds[s1 + 1] - bounds[s1])
            if (s1 + 1 - s0) * (cand * per_row + per_segment) > SEGMENT_CHUNK_ELEMENTS:
                break
            s1, longest = s1 + 1, cand
        chunks.append((s0, s1, longest))
        s0 = s1
    return chunks


def _pad_segments(rows: Tensor, offsets_chunk: Tensor, longest: int) -> Tensor:
    """Scatter packed rows (t, d) of n consecutive segments into a zero-padded (n, longest, d) block."""
    n = offsets_chunk.numel() - 1
    lengths = offsets_chunk[1:] - offsets_chunk[:-1]
    seg = torch.repeat_interleave(torch.arange(n, device=rows.device), lengths, output_size=rows.shape[0])
    pos = torch.arange(rows.shape[0], device=rows.device) - (offsets_chunk[:-1] - offsets_chunk[0])[seg]
    out = rows.new_zeros((n, longest, rows.shape[1]))
    out[seg, pos] = rows
    return out


def _segment_outer_sums(
    A: Tensor,
    B: Tensor,
    offsets: Tensor,
    *,
    map_a: Callable[[Tensor], Tensor],
    map_b: Callable[[Tensor], Tensor],
    k_a: int,
    k_b: int,
    consume: Callable[[int, int, Tensor], None],
) -> None:
    """For chunks of segments, form M_i = map_a(A_seg)ᵀ map_b(B_seg) (n, k_a, k_b) and hand it to consume.

    The per-token maps (casts, projections) run inside the chunk so that no full-size upcast copy of A or B
    is ever held; segments are zero-padded to the chunk's longest one and reduced with one batched matmul.
    """
    bounds = offsets.tolist()
    n_seg = len(bounds) - 1
    if n_seg <= _LOOP_SEGMENTS and A.shape[0] >= _LOOP_MIN_ROWS_PER_SEGMENT * max(n_seg, 1):
        # Few long segments (a scoring batch: 8-32 pairs of hundreds of tokens): one matmul on each
        # segment's rows, with no padded copy of the layer and no scratch beyond one (k_a, k_b) block.
        for s in range(n_seg):
            t0, t1 = bounds[s], bounds[s + 1]
            consume(s, s + 1, (map_a(A[t0:t1]).T @ map_b(B[t0:t1])).unsqueeze(0))
        return
    for s0, s1, longest in _segment_chunks(bounds, per_row=k_a + k_b + A.shape[1] + B.shape[1],
                                           per_segment=k_a * k_b):
        t0, t1 = bounds[s0], bounds[s1]
        a, b = map_a(A[t0:t1]), map_b(B[t0:t1])
        if s1 - s0 == 1:
            M = (a.T @ b).unsqueeze(0)
        else:
            oc = offsets[s0 : s1 + 1]
            M = torch.bmm(_pad_segments(a, oc, longest).transpose(1, 2), _pad_segments(b, oc, longest))
        consume(s0, s1, M)


def segment_project_reference(
    X: Tensor, dY: Tensor, offsets: Tensor, P_in: Tensor | None, P_out: Tensor | None
) -> Tensor:
    """Projected per-segment weight gradients Φ_i = P_out (dY_iᵀ X_i) P_inᵀ, flattened row-major.

    Args:
        X: (T, d_in) layer inputs of all segments, packed.
        dY: (T, d_out) gradients of the layer outputs, packed like X.
        offsets: (N+1,) int64, segment i is rows offsets[i]:offsets[i+1].
        P_in: (k_in, d_in) or None (identity, k_in = d_in).
        P_out: (k_out, d_out) or None (identity, k_out = d_out).

    Returns:
        (N, k_out*k_in) in fp32 (fp64 for fp64 inputs); with both projections None, row i is the
        per-segment gradient dY_iᵀ X_i in nn.Linear weight layout (d_out, d_in) flattened.

    Tokens are projected first (X P_inᵀ, dY P_outᵀ: two GEMMs on T rows), then the per-segment outer-product
    sums are one padded batched matmul per chunk of segments.
    """
    ct = _compute_dtype(X.dtype)
    k_in = X.shape[1] if P_in is None else P_in.shape[0]
    k_out = dY.shape[1] if P_out is None else P_out.shape[0]
    pin = None if P_in is None else P_in.to(ct)
    pout = None if P_out is None else P_out.to(ct)
    out = torch.zeros((offsets.numel() - 1, k_out * k_in), dtype=ct, device=X.device)

    def consume(s0: int, s1: int, M: Tensor) -> None:
        out[s0:s1] = M.reshape(s1 - s0, -1)

    _segment_outer_sums(
        dY, X, offsets,
        map_a=lambda a: a.to(ct) if pout is None else a.to(ct) @ pout.T,
        map_b=lambda b: b.to(ct) if pin is None else b.to(ct) @ pin.T,
        k_a=k_out, k_b=k_in, consume=consume,
    )
    return out


def segment_grad_dot_reference(
    X: Tensor, dY: Tensor, offsets: Tensor, Q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Dots of per-segment gradients with m queries and their squared norms.

    Args:
        X: (T, d_in), dY: (T, d_out), offsets: (N+1,) int64 as in segment_project_reference.
        Q: (m, d_out, d_in) queries in nn.Linear weight layout, or None (m = 0).

    Returns:
        S (N, m) with S[i, j] = ⟨dY_iᵀ X_i, Q_j⟩ and sqnorm (N,) = ‖dY_iᵀ X_i‖²_F, fp32 (fp64 for fp64
        inputs). This reference materialises G_i = dY_iᵀ X_i for a chunk of segments at a time.
    """
    ct = _compute_dtype(X.dtype)
    n_seg = offsets.numel() - 1
    m = 0 if Q is None else Q.shape[0]
    d_out, d_in = dY.shape[1], X.shape[1]
    q = None if Q is None else Q.to(ct).reshape(m, d_out * d_in)
    S = torch.zeros((n_seg, m), dtype=ct, device=X.device)
    sq = torch.zeros((n_seg,), dtype=ct, device=X.device)

    def consume(s0: int, s1: int, G: Tensor) -> None:
        flat = G.reshape(s1 - s0, -1)
        sq[s0:s1] = flat.pow(2).sum(1)
        if q is not None:
            S[s0:s1] = flat @ q.T

    _segment_outer_sums(dY, X, offsets, map_a=lambda a: a.to(ct), map_b=lambda b: b.to(ct),
                        k_a=d_out, k_b=d_in, consume=consume)
    return S, sq


def segment_grad_dot_grouped_reference(
    Xs: list[Tensor], dYs: list[Tensor], offsets: Tensor, Qs: list[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """segment_grad_dot_reference summed over layers that share the segments (offsets).

    Args:
        Xs, dYs: per layer (T, d_in_l), (T, d_out_l). offsets: (N+1,) shared.
        Qs: per layer (m, d_out_l, d_in_l) with the same m for every layer, or None (norms only).

    Returns:
        S (N, m) = Σ_l ⟨G_il, Q_jl⟩ and sqnorm (N,) = Σ_l ‖G_il‖², i.e. the dots and squared norm of the
        concatenated gradient over all layers.
    """
    S_total, sq_total = None, None
    for i, (X, dY) in enumerate(zip(Xs, dYs, strict=True)):
        S, sq = segment_grad_dot_reference(X, dY, offsets, None if Qs is None else Qs[i])
        S_total = S if S_total is None else S_total + S
        sq_total = sq if sq_total is None else sq_total + sq
    return S_total, sq_total


def pair_sequence_grad_dot_reference(X: Tensor, dY: Tensor, Q: Tensor | None) -> tuple[Tensor, Tensor]:
    """`segment_grad_dot_reference` on a layer's unpacked per-sequence tensors, padding rows included.

    Args:
        X: (2N, L, d_in) inputs and dY: (2N, L, d_out) output gradients of one pair batch, sequence n
            the chosen and N + n the rejected sequence of pair n (L = 1 for sequence-level layers).
        Q: (m, d_out, d_in) queries in nn.Linear weight layout, or None (m = 0).

    Returns:
        S (N, m) and sqnorm (N,) of G_n = dY_nᵀ X_n + dY_{N+n}ᵀ X_{N+n}, fp32 (fp64 for fp64 inputs).

    A padding row adds x·0: its output gradient is exactly zero wherever nothing reads it, and where
    something does it belongs to the gradient. So no gather of the kept rows is needed: each chunk of
    pairs is two batched matmuls over the padded sequences (the FLOPs of a training step's weight
    gradient), then one GEMM with the queries. bf16 inputs are multiplied in bf16 with fp32 accumulation
    (as a bf16 training step forms its weight gradients: tensor cores / AMX), each sequence's G rounded
    to bf16 once and summed and reduced in fp32; other dtypes are multiplied in fp32 (fp64 for fp64).
    """
    ct = _compute_dtype(X.dtype)
    bf16 = X.dtype == dY.dtype == torch.bfloat16
    two_n, _, d_in = X.shape
    n, d_out = two_n // 2, dY.shape[2]
    m = 0 if Q is None else Q.shape[0]
    q = None if Q is None else Q.to(ct).reshape(m, d_out * d_in)
    S = torch.zeros((n, m), dtype=ct, device=X.device)
    sq = torch.zeros((n,), dtype=ct, device=X.device)
    cast = 0 if bf16 or (X.dtype == ct and dY.dtype == ct) else 2 * X.shape[1] * (d_in + d_out)
    step = max(1, SEGMENT_CHUNK_ELEMENTS // (3 * d_out * d_in + cast))
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        if bf16:
            G = torch.bmm(dY[s0:s1].transpose(1, 2), X[s0:s1]).to(ct)
            G += torch.bmm(dY[n + s0 : n + s1].transpose(1, 2), X[n + s0 : n + s1])
        else:
            G = torch.bmm(dY[s0:s1].to(ct).transpose(1, 2), X[s0:s1].to(ct))
            G.baddbmm_(dY[n + s0 : n + s1].to(ct).transpose(1, 2), X[n + s0 : n + s1].to(ct))
        flat = G.reshape(s1 - s0, -1)
        sq[s0:s1] = torch.linalg.vector_norm(flat, dim=1).square()
        if q is not None:
            torch.mm(flat, q.T, out=S[s0:s1])
    return S, sq
