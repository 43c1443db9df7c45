"""The test oracle of the captures: per-pair gradients by one backward per pair (never the capture code)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune.data import collate_pairs
from prefprune.influence.capture import pair_margins
from prefprune.influence.layout import ParameterLayout

__all__ = ["oracle_pair_gradients"]


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
    layout = ParameterLayout.of(model)
    dev = layout.device
    rows, margins = [], []
    for pair in encoded:
        batch = {k: v.to(dev) for k, v in collate_pairs([pair], pad_token_id=pad_token_id).items()}
        with torch.enable_grad():
            m = pair_margins(model, batch)[0]
            target = F.softplus(-m) if of == "loss" else m
            grads = torch.autograd.grad(target, layout.params, allow_unused=True)
        rows.append(layout.flatten_grads(grads))
        margins.append(m.detach())
    if not rows:
        return torch.zeros(0, layout.numel, dtype=layout.dtype, device=dev), torch.zeros(0, device=dev)
    return torch.stack(rows), torch.stack(margins)
