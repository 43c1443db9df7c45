"""Per-pair gradients of a LoRA reward model from linear-layer captures, and the single-pair-loop oracle.

Every trainable parameter is the weight (and maybe bias) of an `nn.Linear`. For such a layer with
inputs X (T×d_in) and output-gradients Δ (T×d_out) of one pair's tokens, the pair's weight gradient
is Δᵀ X (DESIGN §3); a bias is handled by appending a column of ones to X, so each layer's gradient
is one augmented (d_out × d_in') matrix [∇W | ∇b].

Flat parameter layout (used by every vector in this package): layers in `model.named_modules()`
order, each layer's augmented matrix flattened row-major. `flatten_site_matrices` and
`split_flat` convert between the two views.

Two captures: `StreamingCapture` (scoring's pass 2 and the projected curvature rows) hands each layer's
packed (X, Δ) to a reducer the moment that layer's Δ exists and frees them before the next layer, so the
capture stays one layer deep (DESIGN §3; Kronfluence's trackers work the same way). `SegmentCapture`
holds every layer of one batch: the Gauss–Newton product needs every layer's dot of a pair before it can
weigh any layer's gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune.data import PairBatches, collate_pairs
from prefprune.model import LinearSite, reward_forward, trainable_linears
from prefprune.ops.reference import pair_sequence_grad_dot_reference
from prefprune.ops.segment import (
    check_offsets,
    segment_grad_dot,
    segment_grad_dot_grouped,
    select_segment_impl,
)
from prefprune.precision import autocast_context

__all__ = [
    "BatchLayout",
    "PackedLayer",
    "Reducer",
    "SegmentCapture",
    "StreamingCapture",
    "capture_pairs",
    "flatten_site_matrices",
    "num_params",
    "oracle_pair_gradients",
    "pair_dots",
    "pair_margins",
    "iter_layouts",
    "split_flat",
    "stream_pair_dots",
]


def num_params(sites: Sequence[LinearSite]) -> int:
    """Length p of the flat parameter vector."""
    return sum(s.numel for s in sites)


def flatten_site_matrices(mats: Sequence[Tensor]) -> Tensor:
    """Concatenate per-layer matrices into the flat layout.

    Args:
        mats: per layer (d_out, d_in') or (m, d_out, d_in').

    Returns:
        (p,) or (p, m).
    """
    if mats[0].dim() == 2:
        return torch.cat([m.reshape(-1) for m in mats])
    return torch.cat([m.reshape(m.shape[0], -1) for m in mats], dim=1).T


def split_flat(vec: Tensor, sites: Sequence[LinearSite]) -> list[Tensor]:
    """Inverse of `flatten_site_matrices`: (p,) → [(d_out, d_in')], (p, m) → [(m, d_out, d_in')]."""
    p = num_params(sites)
    if vec.shape[0] != p:
        raise ValueError(f"flat vector has {vec.shape[0]} rows, the model has {p} trainable parameters")
    out, start = [], 0
    for s in sites:
        chunk = vec[start : start + s.numel]
        start += s.numel
        if vec.dim() == 1:
            out.append(chunk.reshape(s.d_out, s.d_in))
        else:
            out.append(chunk.T.reshape(vec.shape[1], s.d_out, s.d_in))
    return out


# ---------------------------------------------------------------------------------------------
# Forward pass of a pair batch
# ---------------------------------------------------------------------------------------------


def pair_margins(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Margins m_i = r(chosen_i) − r(rejected_i) of a collated pair batch.

    Rewards come from `prefprune.model.reward_forward`, the same forward as training, so a pair's
    reward does not depend on how much padding sits on its left.

    Args:
        batch: {"input_ids": (2B, L), "attention_mask": (2B, L)}, rows 0..B-1 chosen, B..2B-1 rejected.

    Returns:
        (B,) margins.
    """
    rewards = reward_forward(model, batch)
    n = rewards.shape[0] // 2
    return rewards[:n] - rewards[n:]


# ---------------------------------------------------------------------------------------------
# Capture of (X, Δ) per trainable linear, packed per pair
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedLayer:
    """One layer's tokens, grouped by pair (chosen tokens, then rejected tokens).

    Attributes:
        X: (T, d_in') layer inputs (with a ones column for a trainable bias).
        dY: (T, d_out) gradients of the objective w.r.t. the layer outputs.
        offsets: (N+1,) int64; pair i owns rows offsets[i]:offsets[i+1].
    """

    X: Tensor
    dY: Tensor
    offsets: Tensor

    def segment_ids(self) -> Tensor:
        """(T,) pair index of every row."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


class SegmentCapture:
    """Context manager recording every trainable linear's input and output during a forward.

    Only one forward may run between `reset()` calls; `output_grads` then returns Δ for each layer
    from one backward of a scalar objective, and `pack` groups rows per pair, dropping padding.
    """

    def __init__(self, sites: Sequence[LinearSite]):
        self.sites = list(sites)
        self._handles: list = []
        self._inputs: list[Tensor | None] = [None] * len(self.sites)
        self._outputs: list[Tensor | None] = [None] * len(self.sites)

    def __enter__(self) -> SegmentCapture:
        for k, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_hook(self._make_hook(k)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def _make_hook(self, k: int) -> Callable:
        def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._outputs[k] is not None:
                raise RuntimeError(
                    f"linear layer {self.sites[k].name!r} ran twice in one forward; "
                    "weight sharing is unsupported"
                )
            self._inputs[k] = inputs[0].detach()
            self._outputs[k] = output

        return hook

    def reset(self) -> None:
        """Forget the last forward's tensors."""
        self._inputs = [None] * len(self.sites)
        self._outputs = [None] * len(self.sites)

    def output_grads(self, objective: Tensor) -> list[Tensor | None]:
        """Δ of every layer from one backward of `objective` (None for a layer that did not run).

        Gradients are taken w.r.t. the layer outputs only, so parameter `.grad` fields are untouched
        and no weight-gradient products are computed.
        """
        idx = [k for k, o in enumerate(self._outputs) if o is not None and o.requires_grad]
        if not idx:
            raise RuntimeError("no trainable linear layer ran with gradients enabled in the last forward")
        grads = torch.autograd.grad(objective, [self._outputs[k] for k in idx], allow_unused=True)
        out: list[Tensor | None] = [None] * len(self.sites)
        for k, g in zip(idx, grads, strict=True):
            out[k] = torch.zeros_like(self._outputs[k]) if g is None else g
        return out

    def pack(self, dys: Sequence[Tensor | None], attention_mask: Tensor) -> list[PackedLayer]:
        """Group each layer's rows per pair, chosen tokens then rejected tokens, without padding.

        Token-level layers (input (2B, L, d)) keep the rows where `attention_mask` is 1 and Δ is
        not identically zero (a decoder score head's Δ is nonzero only at the pooled token; dropping
        exact-zero rows changes no dot product or norm). Sequence-level layers (input (2B, d), e.g.
        BERT's classifier on the pooled output) keep one row per sequence.

        Args:
            dys: output of `output_grads`.
            attention_mask: (2B, L) of the batch.

        Returns:
            One `PackedLayer` per site.
        """
        two_b, length = attention_mask.shape
        n = two_b // 2
        packed = []
        for site, x, dy in zip(self.sites, self._inputs, dys, strict=True):
            dev = attention_mask.device
            if x is None or dy is None:
                X = torch.zeros(0, site.d_in, dtype=site.module.weight.dtype, device=dev)
                dY = torch.zeros(0, site.d_out, dtype=site.module.weight.dtype, device=dev)
                packed.append(PackedLayer(X, dY, torch.zeros(n + 1, dtype=torch.int64, device=dev)))
                continue
            lead = tuple(x.shape[:-1])
            if lead == (two_b, length) or lead == (two_b * length,):
                x = x.reshape(2, n, length, -1).transpose(0, 1).reshape(n, 2 * length, -1)
                dy = dy.reshape(2, n, length, -1).transpose(0, 1).reshape(n, 2 * length, -1)
                keep = attention_mask.reshape(2, n, length).transpose(0, 1).reshape(n, 2 * length).bool()
                keep = keep & (dy != 0).any(-1)
                counts = keep.sum(1)
                x, dy = x[keep], dy[keep]
            elif lead == (two_b,):
                x = x.reshape(2, n, -1).transpose(0, 1).reshape(two_b, -1)
                dy = dy.reshape(2, n, -1).transpose(0, 1).reshape(two_b, -1)
                counts = torch.full((n,), 2, dtype=torch.int64, device=dev)
            else:
                raise ValueError(
                    f"layer {site.name!r} saw inputs of shape {tuple(x.shape)}; expected (2B, L, d) or "
                    f"(2B, d) with 2B={two_b}, L={length}"
                )
            if site.has_bias:
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            offsets = torch.zeros(n + 1, dtype=torch.int64, device=dev)
            offsets[1:] = counts.cumsum(0)
            packed.append(PackedLayer(x.contiguous(), dy.contiguous(), offsets))
        return packed


def capture_pairs(
    model: nn.Module,
    capture: SegmentCapture,
    batch: dict[str, Tensor],
    objective: Callable[[Tensor], Tensor],
) -> tuple[Tensor, list[PackedLayer]]:
    """One forward + backward of Σ_i f(m_i) over a pair batch, packed per pair.

    Because a transformer couples no two sequences, Δ restricted to pair i's rows is exactly the
    output-gradient of f(m_i) alone, so each packed segment holds the exact ∇f(m_i) (DESIGN §3).

    Args:
        capture: an entered `SegmentCapture` for `model`.
        batch: collated pairs (see `pair_margins`).
        objective: elementwise f applied to the (B,) margins, e.g. softplus(−m) for the loss.

    Returns:
        (B,) margins (detached) and one `PackedLayer` per site.
    """
    capture.reset()
    with torch.enable_grad():
        margins = pair_margins(model, batch)
        dys = capture.output_grads(objective(margins).sum())
    packed = capture.pack(dys, batch["attention_mask"])
    capture.reset()
    return margins.detach(), packed


# ---------------------------------------------------------------------------------------------
# Streaming capture: each layer reduced as soon as its Δ exists
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLayout:
    """Which rows of a collated pair batch belong to which pair, computed once per batch on the host.

    Rows are grouped per pair, chosen tokens then rejected tokens, padding dropped; the same layout
    serves every layer of the batch, so its offsets are validated once, not once per layer.

    Attributes:
        length: L, the padded sequence length.
        token_index: (T,) int64 row of each kept token in the flattened (2B·L) layer input.
        token_offsets: (N+1,) int64 segment boundaries of the token rows.
        seq_index: (2N,) int64 rows (chosen_i, rejected_i) of sequence-level layers (input (2B, d)).
        seq_offsets: (N+1,) int64, 0, 2, 4, ….
    """

    length: int
    token_index: Tensor
    token_offsets: Tensor
    seq_index: Tensor
    seq_offsets: Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.seq_offsets.numel()) - 1

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> BatchLayout:
        """The layout of a batch from its (2B, L) attention mask (rows 0..B-1 chosen, B..2B-1 rejected).

        Call it on the host copy of the mask: building and checking the layout then costs no device sync.
        """
        mask = attention_mask.bool()
        two_b, length = mask.shape
        if two_b % 2:
            raise ValueError(f"a pair batch has an even number of rows (chosen, rejected), got {two_b}")
        n = two_b // 2
        per_pair = mask.reshape(2, n, length).transpose(0, 1).reshape(n, 2 * length)
        pair, col = per_pair.nonzero(as_tuple=True)  # row-major: pair order, chosen before rejected
        row = pair + (col // length) * n
        token_index = row * length + col % length
        offsets = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = per_pair.sum(1).cumsum(0)
        offsets = check_offsets(offsets, int(token_index.numel()))
        seq_index = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).reshape(-1).to(mask.device)
        seq_offsets = torch.arange(0, 2 * n + 1, 2, dtype=torch.int64, device=mask.device)
        return cls(length, token_index, offsets, seq_index, seq_offsets)

    def to(self, device: torch.device | str) -> BatchLayout:
        """The layout on `device` (asynchronous copies: no host sync)."""
        move = lambda t: t.to(device, non_blocking=True)
        return BatchLayout(self.length, move(self.token_index), move(self.token_offsets),
                           move(self.seq_index), move(self.seq_offsets))


Reducer = Callable[[int, Tensor, Tensor, Tensor | None], None]
"""``reduce(k, X, dY, offsets)``: site k's packed (T, d_in') inputs and (T, d_out) output gradients of one
batch, segment i = pair i's rows offsets[i]:offsets[i+1] (already validated: pass ``offsets_checked=True``
to the segment ops); or, for a capture with ``packed=False``, its unpacked (2B, L', d_in') and
(2B, L', d_out) per-sequence tensors with padding rows (L' = 1 for sequence-level layers) and
``offsets=None`` (see `prefprune.ops.reference.pair_sequence_grad_dot_reference`). The tensors are freed
when it returns; it must not keep them."""


class _Tap(torch.autograd.Function):
    """Identity on a layer output that ties it to the capture's anchor, so one backward to the anchor
    reaches every captured layer without asking autograd for any weight gradient."""

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class StreamingCapture:
    """Context manager streaming every trainable linear's (X, Δ) of a batch to a reducer, layer by layer.

    The forward hook of each site keeps the layer's input and registers a tensor hook on its output (as
    Kronfluence's trackers do); when backward reaches that output the hook gathers the layer's rows per
    pair (`BatchLayout`), hands (X, Δ) to the reducer and drops them, so at most one layer's packed
    (X, Δ) is alive at a time and no pass-wide list of layers exists. Inside the block the sites'
    parameters do not require gradients (restored on exit): backward runs to a scalar anchor only, so
    autograd neither computes weight gradients nor keeps its own copy of the layer inputs.

    Args:
        sites: `trainable_linears(model)`.
        dtype: dtype the inputs and output gradients are handed over in (None: as computed). Under
            autocast the layer outputs (and so Δ) are already in the low precision; the inputs are cast
            in the forward hook.
        packed: hand the reducer each layer's kept rows gathered per pair (True), or its per-sequence
            tensors as they are, padding included (False: no gather; see `Reducer`).
    """

    def __init__(self, sites: Sequence[LinearSite], *, dtype: torch.dtype | None = None, packed: bool = True):
        self.sites = list(sites)
        self.dtype = dtype
        self.packed = packed
        # Read before __enter__ switches requires_grad off (LinearSite.has_bias looks at it).
        self._bias = [s.has_bias for s in self.sites]
        self._handles: list = []
        self._inputs: list[Tensor | None] = [None] * len(self.sites)
        self._ran = [False] * len(self.sites)
        self._anchor: Tensor | None = None
        self._layout: BatchLayout | None = None
        self._reduce: Reducer | None = None
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> StreamingCapture:
        for site in self.sites:
            for p in site.parameters():
                self._saved_flags.append((p, p.requires_grad))
        for p, _ in self._saved_flags:
            p.requires_grad_(False)
        for k, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_hook(self._make_hook(k)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._saved_flags.clear()
        self._reset()

    def held_inputs(self) -> int:
        """How many layers' inputs the capture holds now (those whose Δ has not arrived yet)."""
        return sum(x is not None for x in self._inputs)

    def _reset(self) -> None:
        self._inputs = [None] * len(self.sites)
        self._ran = [False] * len(self.sites)
        self._anchor = self._layout = self._reduce = None

    def _make_hook(self, k: int) -> Callable:
        def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if self._anchor is None:  # a forward outside `run` (e.g. no_grad evaluation): not captured
                return None
            if self._ran[k]:
                raise RuntimeError(
                    f"linear layer {self.sites[k].name!r} ran twice in one forward; "
                    "weight sharing is unsupported"
                )
            self._ran[k] = True
            x = inputs[0].detach()
            self._inputs[k] = x if self.dtype is None else x.to(self.dtype)
            out = _Tap.apply(output, self._anchor)
            out.register_hook(lambda grad: self._on_grad(k, grad))
            return out

        return hook

    def _rows(self, k: int, t: Tensor, what: str) -> tuple[Tensor, Tensor | None]:
        """A layer tensor's rows: gathered per pair ((T, d), offsets) or unpacked ((2B, L', d), None)."""
        layout = self._layout
        two_b, length = 2 * layout.n_pairs, layout.length
        lead = tuple(t.shape[:-1])
        if lead in ((two_b, length), (two_b * length,)):
            if not self.packed:
                return t.reshape(two_b, length, -1), None
            return t.reshape(two_b * length, -1).index_select(0, layout.token_index), layout.token_offsets
        if lead == (two_b,):
            if not self.packed:
                return t.unsqueeze(1), None
            return t.index_select(0, layout.seq_index), layout.seq_offsets
        raise ValueError(
            f"layer {self.sites[k].name!r}: {what} of shape {tuple(t.shape)}; expected (2B, L, d) or (2B, d) "
            f"with 2B={two_b}, L={length}"
        )

    def _on_grad(self, k: int, grad: Tensor) -> None:
        x, self._inputs[k] = self._inputs[k], None
        if x is None:
            raise RuntimeError(
                f"layer {self.sites[k].name!r}: an output gradient arrived twice in one backward"
            )
        X, offsets = self._rows(k, x, "input")
        del x
        if self._bias[k]:
            X = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
        dY, _ = self._rows(k, grad if self.dtype is None else grad.to(self.dtype), "output gradient")
        self._reduce(k, X, dY, offsets)

    def run(
        self,
        model: nn.Module,
        batch: Mapping[str, Tensor],
        layout: BatchLayout,
        objective: Callable[[Tensor], Tensor],
        reduce: Reducer,
        *,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> Tensor:
        """One forward + backward of Σ_i f(m_i) over a pair batch, every layer streamed to `reduce`.

        Because a transformer couples no two sequences, Δ restricted to pair i's rows is exactly the
        output gradient of f(m_i) alone, so each segment holds the exact ∇f(m_i) (DESIGN §3).

        Args:
            batch: collated pairs (see `pair_margins`), on the model's device.
            layout: `BatchLayout.from_mask` of the batch's mask, on the same device.
            objective: elementwise f applied to the (B,) margins, e.g. softplus(−m) for the loss.
            reduce: called once per site that received a gradient, in backward order.
            autocast: context the forward runs in (low-precision scoring), or None.

        Returns:
            (B,) margins, detached.
        """
        if not self._handles:
            raise RuntimeError("StreamingCapture.run needs the capture entered (use it as a context manager)")
        self._reset()
        dev = batch["input_ids"].device
        self._anchor = torch.zeros((), device=dev, requires_grad=True)
        self._layout, self._reduce = layout, reduce
        try:
            with torch.enable_grad():
                with autocast if autocast is not None else contextlib.nullcontext():
                    margins = pair_margins(model, batch)
                if not margins.requires_grad:
                    raise RuntimeError("no trainable linear layer ran with gradients enabled in the forward")
                torch.autograd.grad(objective(margins).sum(), [self._anchor], allow_unused=True)
        finally:
            self._reset()
        return margins.detach()


def iter_layouts(
    batches: Iterable[Mapping[str, Tensor]], device: torch.device
) -> Iterator[tuple[dict[str, Tensor], BatchLayout]]:
    """(batch, layout) on `device` for host-collated batches; the layout is built on the host (no sync)."""
    for batch in batches:
        layout = BatchLayout.from_mask(batch["attention_mask"]).to(device)
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}, layout


def stream_pair_dots(
    model: nn.Module,
    sites: Sequence[LinearSite],
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
        sites: `trainable_linears(model)`.
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
    Qs = split_flat(torch.stack(list(queries), dim=1), sites) if queries else None
    m = len(queries)
    wide = torch.float64 if sites[0].module.weight.dtype == torch.float64 else torch.float32
    dots, sqs, margins, flags = [], [], [], []
    autocast = None if dtype is None else autocast_context(device, dtype)
    # Where the reference runs (CPU, or impl="reference"), each layer is reduced on its unpacked
    # per-sequence tensors by batched matmuls: no gather of the kept rows, no loop over pairs.
    probe = torch.empty(0, dtype=dtype or sites[0].module.weight.dtype, device=device)
    packed = select_segment_impl("segment_grad_dot", [probe], impl=impl).name != "reference"
    with StreamingCapture(sites, dtype=dtype, packed=packed) as cap:
        for batch, layout in tqdm(iter_layouts(batches.on("cpu"), device), total=len(batches), desc=desc,
                                  disable=not progress, leave=False):
            S = torch.zeros(layout.n_pairs, m, dtype=wide, device=device)
            sq = torch.zeros(layout.n_pairs, dtype=wide, device=device)
            # Per pair and layer: was that layer's gradient norm non-finite? Kept on the device, read with
            # the final copy (no extra sync), so a NaN never becomes a score silently.
            bad = torch.zeros(layout.n_pairs, len(sites), dtype=torch.bool, device=device)

            def reduce(k: int, X: Tensor, dY: Tensor, offsets: Tensor | None, S=S, sq=sq, bad=bad) -> None:
                Q = None if Qs is None else Qs[k]
                if offsets is None:
                    s, q2 = pair_sequence_grad_dot_reference(X, dY, Q)
                else:
                    s, q2 = segment_grad_dot(X, dY, offsets, Q, impl=impl, offsets_checked=True)
                S.add_(s.to(wide))
                sq.add_(q2.to(wide))
                bad[:, k] = ~torch.isfinite(q2)

            margins.append(cap.run(model, batch, layout, objective, reduce, autocast=autocast).to(wide))
            dots.append(S)
            sqs.append(sq)
            flags.append(bad)
    cat = lambda xs, shape: torch.cat(xs).double().cpu() if xs else torch.zeros(shape, dtype=torch.float64)
    out = cat(dots, (0, m)), cat(sqs, (0,)), cat(margins, (0,))
    if flags:
        check_finite_capture(torch.cat(flags).cpu(), out[2], sites, batches, desc=desc)
    return out


def check_finite_capture(bad: Tensor, margins: Tensor, sites: Sequence[LinearSite], batches: PairBatches,
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
        where = f"layer {sites[int(torch.nonzero(bad[r]).flatten()[0])].name!r} first"
        where += f", reward margin {float(margins[r])}" if bool(bad_margin[r]) else ""
    else:
        where = f"its reward margin is {float(margins[r])}"
    raise FloatingPointError(
        f"{desc}: non-finite gradient for pair {pid!r} ({where}; {len(rows)} of {bad.shape[0]} pairs "
        "affected); no scores are written. Eager attention in float64 with padding_side='left' gives NaN on "
        "fully padded rows: use padding_side='right' (or sdpa attention)"
    )


# ---------------------------------------------------------------------------------------------
# Oracle: a loop of single-pair backward passes
# ---------------------------------------------------------------------------------------------


def oracle_pair_gradients(
    model: nn.Module,
    encoded: Sequence,
    *,
    pad_token_id: int,
    of: str = "loss",
) -> tuple[Tensor, Tensor]:
    """Per-pair gradients by one backward per pair over the trainable parameters (the test oracle).

    Args:
        encoded: `EncodedPair`s.
        pad_token_id: padding id used to collate chosen and rejected of one pair.
        of: "loss" for ∇ℓ_i = ∇softplus(−m_i), "margin" for ∇m_i.

    Returns:
        (N, p) gradients in the flat layout, and (N,) margins.
    """
    if of not in ("loss", "margin"):
        raise ValueError(f"of must be 'loss' or 'margin', got {of!r}")
    sites = trainable_linears(model)
    params = [p for s in sites for p in s.parameters()]
    dev = params[0].device
    rows, margins = [], []
    for pair in encoded:
        batch = {k: v.to(dev) for k, v in collate_pairs([pair], pad_token_id=pad_token_id).items()}
        with torch.enable_grad():
            m = pair_margins(model, batch)[0]
            target = F.softplus(-m) if of == "loss" else m
            grads = torch.autograd.grad(target, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        mats, k = [], 0
        for s in sites:
            n_p = len(s.parameters())
            mats.append(s.augmented(grads[k : k + n_p]))
            k += n_p
        rows.append(flatten_site_matrices(mats))
        margins.append(m.detach())
    if not rows:
        p = num_params(sites)
        return torch.zeros(0, p, dtype=params[0].dtype, device=dev), torch.zeros(0, device=dev)
    return torch.stack(rows), torch.stack(margins)


# ---------------------------------------------------------------------------------------------
# Per-pair dots and norms from packed layers
# ---------------------------------------------------------------------------------------------


def pair_dots(
    packed: Sequence[PackedLayer], queries: Sequence[Tensor] | None, *, impl: str | None = None
) -> tuple[Tensor, Tensor]:
    """Dots of every pair's full gradient with m queries, and its squared norm, summed over layers.

    Layers that share the same segment offsets go through one grouped fused call; the rest one
    call each. Per-pair gradients are never formed outside the fused op.

    Args:
        packed: one `PackedLayer` per site (see `SegmentCapture.pack`).
        queries: per site (m, d_out, d_in') in the flat layout's per-layer view, or None (norms only).
        impl: segment-op implementation request (`PREFPRUNE_IMPL` when None).

    Returns:
        S (N, m) with S[i, j] = ∇_iᵀ q_j, and sqnorm (N,) = ‖∇_i‖², accumulated in fp32 (fp64 for fp64).
    """
    groups: list[list[int]] = []
    for k, layer in enumerate(packed):
        if layer.X.shape[0] == 0:
            continue
        for g in groups:
            ref = packed[g[0]].offsets
            if ref.shape == layer.offsets.shape and torch.equal(ref, layer.offsets):
                g.append(k)
                break
        else:
            groups.append([k])
    n = packed[0].offsets.numel() - 1
    wide = torch.float64 if packed[0].X.dtype == torch.float64 else torch.float32
    m = 0 if queries is None else int(queries[0].shape[0])
    dev = packed[0].offsets.device
    S = torch.zeros(n, m, dtype=wide, device=dev)
    sq = torch.zeros(n, dtype=wide, device=dev)
    for g in groups:
        Xs = [packed[k].X for k in g]
        dYs = [packed[k].dY for k in g]
        Qs = None if queries is None else [queries[k] for k in g]
        s_g, sq_g = segment_grad_dot_grouped(Xs, dYs, packed[g[0]].offsets, Qs, impl=impl)
        S += s_g.to(wide)
        sq += sq_g.to(wide)
    return S, sq
