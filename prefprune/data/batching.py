"""Batches of encoded pairs for the scoring passes: a re-iterable collated view and a length order."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from prefprune.data.encode import collate_pairs

__all__ = ["PairBatches", "length_order"]


class PairBatches:
    """A re-iterable sequence of collated pair batches (collated on the fly, moved to `device`).

    Args:
        encoded: `EncodedPair`s in scoring order.
        batch_size: pairs per batch.
        pad_token_id: padding id.
        padding_side: "right" or "left".
        device: where batches go.
    """

    def __init__(
        self,
        encoded: Sequence,
        *,
        batch_size: int,
        pad_token_id: int,
        padding_side: str = "right",
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.encoded = list(encoded)
        self.batch_size = int(batch_size)
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.device = torch.device(device)

    def on(self, device: torch.device | str) -> PairBatches:
        """The same batches on `device` (``"cpu"``: collate on the host and move them yourself)."""
        return PairBatches(self.encoded, batch_size=self.batch_size, pad_token_id=self.pad_token_id,
                           padding_side=self.padding_side, device=device)

    @property
    def n_pairs(self) -> int:
        return len(self.encoded)

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def with_padding(self, padding_side: str) -> PairBatches:
        """The same batches padded on `padding_side` (a sharded view stays sharded)."""
        return PairBatches(self.encoded, batch_size=self.batch_size, pad_token_id=self.pad_token_id,
                           padding_side=padding_side, device=self.device)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for start in range(0, len(self.encoded), self.batch_size):
            chunk = self.encoded[start : start + self.batch_size]
            batch = collate_pairs(chunk, pad_token_id=self.pad_token_id, padding_side=self.padding_side)
            yield {k: v.to(self.device) for k, v in batch.items()}


def length_order(encoded: Sequence) -> list[int]:
    """Indices of `encoded` sorted by pair length (longest sequence of the pair), ties by position.

    Batching pairs of similar length wastes little compute on padding; callers scatter per-pair
    results back to the original order.
    """
    return sorted(range(len(encoded)), key=lambda i: (max(len(encoded[i].chosen_ids),
                                                          len(encoded[i].rejected_ids)), i))
