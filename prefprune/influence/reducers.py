"""What the streaming capture makes of each layer's (X, Δ): per-pair dots and squared norms, or gradient rows.

Both reducers add a layer's share to per-batch buffers the moment its Δ exists (`StreamingCapture`), so a
batch never holds two layers' (X, Δ):

- `stream_pair_dots`: ∇f(m_i)ᵀ q_j for m flat queries and ‖∇f(m_i)‖², by one fused call per layer
  (`prefprune.ops.segment.segment_grad_dot`): pass 2 of scoring, per-query dots, the Gauss–Newton trace.
- `pair_gradient_rows`: each pair's gradient row Δ_iᵀ X_i per layer, or its Kronecker projection
  P_out Δ_iᵀ X_i P_inᵀ (`segment_project`): the Gauss–Newton factors and self-influence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune.data import PairBatches
from prefprune.influence.capture import StreamingCapture, iter_layouts
from prefprune.influence.layout import ParameterLayout
from prefprune.ops.projection import KroneckerProjector
from prefprune.ops.reference import pair_sequence_grad_dot_reference
from prefprune.ops.segment import segment_grad_dot, segment_project, select_segment_impl
from prefprune.precision import autocast_context

__all__ = ["check_finite_capture", "pair_gradient_rows", "stream_pair_dots"]


def stream_pair_dots(
    model: nn.Module,
    layout: ParameterLayout,
    batches: PairBatches,
    queries: Sequence[Tensor],
    *,
    objective: Callable[[Tensor], Tensor] = lambda m: F.softplus(-m),
    dtype: torch.dtype | None = None,
    impl: str | None = None,
    progress: bool = False,
    desc: str = "pass 2: training scores",
) -> tuple[Tensor, Tensor, Tensor]:
    """Dots of every pair's gradient ∇f(m_i) with m flat queries, its squared norm, and its margin.

    One forward + backward per batch through a `StreamingCapture`: each layer's part of every dot and
    of the norm comes from one fused call as soon as its Δ exists, and the per-batch sums stay on the
    device; the only device-to-host copy is the final one (no sync per batch or per layer).

    Args:
        layout: the model's `ParameterLayout`.
        batches: the pairs (their `device` is where the model runs; they are collated on the host).
        queries: flat (p,) vectors (any number, e.g. the influence query and ∇L_V).
        objective: f of the margins (default the loss softplus(−m)).
        dtype: capture precision (None: as computed); a 16-bit dtype also runs the forward under
            autocast (`prefprune.precision.autocast_context`).
        impl: segment-op implementation request.

    Returns:
        (n, m) dots, (n,) squared norms and (n,) margins, float64 on the CPU, rows in batch order.
    """
    device = batches.device
    sites = layout.sites
    Qs = layout.split(torch.stack(list(queries), dim=1)) if queries else None
    m = len(queries)
    wide = layout.wide
    dots, sqs, margins, flags = [], [], [], []
    autocast = None if dtype is None else autocast_context(device, dtype)
    # Where the reference runs (CPU, or impl="reference"), each layer is reduced on its unpacked
    # per-sequence tensors by batched matmuls: no gather of the kept rows, no loop over pairs.
    probe = torch.empty(0, dtype=dtype or layout.dtype, device=device)
    packed = select_segment_impl("segment_grad_dot", [probe], impl=impl).name != "reference"
    with StreamingCapture(sites, dtype=dtype, packed=packed) as cap:
        for batch, lay in tqdm(iter_layouts(batches.on("cpu"), device), total=len(batches), desc=desc,
                               disable=not progress, leave=False):
            S = torch.zeros(lay.n_pairs, m, dtype=wide, device=device)
            sq = torch.zeros(lay.n_pairs, dtype=wide, device=device)
            # Per pair and layer: was that layer's gradient norm non-finite? Kept on the device, read with
            # the final copy (no extra sync), so a NaN never becomes a score silently.
            bad = torch.zeros(lay.n_pairs, len(sites), dtype=torch.bool, device=device)

            def reduce(k: int, X: Tensor, dY: Tensor, offsets: Tensor | None, S=S, sq=sq, bad=bad) -> None:
                Q = None if Qs is None else Qs[k]
                if offsets is None:
                    s, q2 = pair_sequence_grad_dot_reference(X, dY, Q)
                else:
                    s, q2 = segment_grad_dot(X, dY, offsets, Q, impl=impl, offsets_checked=True)
                S.add_(s.to(wide))
                sq.add_(q2.to(wide))
                bad[:, k] = ~torch.isfinite(q2)

            margins.append(cap.run(model, batch, lay, objective, reduce, autocast=autocast).to(wide))
            dots.append(S)
            sqs.append(sq)
            flags.append(bad)
    cat = lambda xs, shape: torch.cat(xs).double().cpu() if xs else torch.zeros(shape, dtype=torch.float64)
    out = cat(dots, (0, m)), cat(sqs, (0,)), cat(margins, (0,))
    if flags:
        check_finite_capture(torch.cat(flags).cpu(), out[2], layout, batches, desc=desc)
    return out


def check_finite_capture(bad: Tensor, margins: Tensor, layout: ParameterLayout, batches: PairBatches,
                         *, desc: str) -> None:
    """Raise FloatingPointError naming the first pair (id) and layer whose captured gradient or margin
    is not finite. `bad` (n, layers) flags per pair and layer, rows in batch order."""
    bad_margin = ~torch.isfinite(margins)
    if not (bool(bad.any()) or bool(bad_margin.any())):
        return
    rows = torch.nonzero(bad.any(1) | bad_margin).flatten()
    r = int(rows[0])
    pid = batches.encoded[r].id if r < len(batches.encoded) else f"row {r}"
    if bool(bad[r].any()):
        where = f"layer {layout.sites[int(torch.nonzero(bad[r]).flatten()[0])].name!r} first"
        where += f", reward margin {float(margins[r])}" if bool(bad_margin[r]) else ""
    else:
        where = f"its reward margin is {float(margins[r])}"
    raise FloatingPointError(
        f"{desc}: non-finite gradient for pair {pid!r} ({where}; {len(rows)} of {bad.shape[0]} pairs "
        "affected); no scores are written. Eager attention in float64 with padding_side='left' gives NaN on "
        "fully padded rows: use padding_side='right' (or sdpa attention)"
    )



def _drop_zero_rows(X: Tensor, dY: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rows whose Δ is not exactly zero, with their segment offsets.

    A decoder's score head has Δ at the pooled token only, and the last block's layers at the tokens
    before it carry none: such rows add exact zeros to a pair's gradient, and dropping them shortens the
    per-segment sums that `segment_project` pads to the longest segment.
    """
    keep = (dY != 0).any(-1)
    n = offsets.numel() - 1
    segment = torch.repeat_interleave(torch.arange(n, device=offsets.device), offsets[1:] - offsets[:-1])
    counts = torch.zeros(n, dtype=torch.int64, device=offsets.device).index_add_(0, segment, keep.long())
    kept = torch.zeros(n + 1, dtype=torch.int64, device=offsets.device)
    kept[1:] = counts.cumsum(0)
    return X[keep], dY[keep], kept


def pair_gradient_rows(
    model: nn.Module,
    layout: ParameterLayout,
    batches: PairBatches,
    *,
    objective: Callable[[Tensor], Tensor],
    projector: KroneckerProjector | None = None,
    impl: str | None = None,
    out: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per-pair gradient rows of Σ_i f(m_i), one batch at a time, from one forward+backward per batch.

    Each layer's block of the rows, Δ_iᵀ X_i (or P_out Δ_iᵀ X_i P_inᵀ), is written by the segmented
    projection op as soon as that layer's Δ exists; a layer that did not run leaves its block zero.

    Args:
        batches: the pairs (collated on the host, run on their `device`).
        objective: elementwise f of the margins, e.g. ``lambda m: m`` for ∇m_i.
        projector: a `KroneckerProjector` over the layout's sites (`ParameterLayout.projector`), or None
            (rows in the flat layout).
        out: an (n, d) tensor for every pair of `batches` (in `layout.wide`, on the batches' device) that
            the rows are written into, batch after batch; the yielded blocks are its views. A caller that
            keeps every row then holds no per-batch copies and no concatenation of them.

    Yields:
        (B,) margins and (B, d) rows (float32; float64 for float64 models), d = p or projector.dim.
    """
    width = layout.numel if projector is None else projector.dim
    slices = layout.slices if projector is None else projector.slices
    n = len(batches.encoded)  # this rank's pairs
    if out is not None and (tuple(out.shape) != (n, width) or out.dtype != layout.wide):
        raise ValueError(f"out must be ({n}, {width}) {layout.wide} for the rows of these batches, got "
                         f"{tuple(out.shape)} {out.dtype}")
    at = 0
    with StreamingCapture(layout.sites) as cap:
        for batch, lay in iter_layouts(batches.on("cpu"), batches.device):
            if out is None:
                block = torch.zeros(lay.n_pairs, width, dtype=layout.wide, device=batches.device)
            else:
                block = out[at : at + lay.n_pairs].zero_()
                at += lay.n_pairs

            def reduce(k: int, X: Tensor, dY: Tensor, offsets: Tensor, block=block) -> None:
                X, dY, offsets = _drop_zero_rows(X, dY, offsets)
                pin = None if projector is None else projector.P_in[k]
                pout = None if projector is None else projector.P_out[k]
                block[:, slices[k]] = segment_project(X, dY, offsets, pin, pout, impl=impl).to(layout.wide)

            margins = cap.run(model, batch, lay, objective, reduce)
            yield margins, block
