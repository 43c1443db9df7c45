"""One streaming capture: every trainable linear's (X, Δ) of a pair batch handed to a reducer, layer by layer.

For a linear layer with inputs X (T×d_in) and output gradients Δ (T×d_out) of one pair's tokens, the pair's
weight gradient is Δᵀ X (DESIGN §3). `StreamingCapture` hands each layer's (X, Δ) to a reducer the moment
that layer's Δ exists and frees them before the next layer, so the capture stays one layer deep (DESIGN §3,
STYLE 14; Kronfluence's trackers work the same way). What is made of (X, Δ) — dots with queries and
squared norms, per-pair gradient rows, projected rows — is the reducer's job (`prefprune.influence.reducers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefprune.model import LinearSite, reward_forward
from prefprune.ops.segment import check_offsets

__all__ = ["BatchLayout", "Reducer", "StreamingCapture", "iter_layouts", "pair_margins"]


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

