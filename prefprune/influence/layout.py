"""The trainable parameters as one flat vector: flatten, split, gradients and projections, in one place.

Every trainable parameter is the weight (and maybe bias) of an `nn.Linear`; a layer's gradient is one
augmented (d_out × d_in') matrix [∇W | ∇b] (a bias is a ones column of X, DESIGN §3). The flat layout
used by every vector of the engine: layers in `model.named_modules()` order, each layer's augmented
matrix flattened row-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prefprune.model import LinearSite, trainable_linears
from prefprune.ops.projection import KroneckerProjector

__all__ = ["ParameterLayout", "flatten_site_matrices"]


def flatten_site_matrices(mats: Sequence[Tensor]) -> Tensor:
    """Concatenate per-layer matrices (d_out, d_in') → (p,), or (m, d_out, d_in') → (p, m)."""
    if mats[0].dim() == 2:
        return torch.cat([m.reshape(-1) for m in mats])
    return torch.cat([m.reshape(m.shape[0], -1) for m in mats], dim=1).T


class ParameterLayout:
    """The flat layout of a model's trainable linear layers (the `sites`).

    Attributes:
        sites: `trainable_linears(model)`.
        params: their parameters in flat order (per site: weight, then a trainable bias).
        slices: per site, its rows of the flat vector.
    """

    def __init__(self, sites: Sequence[LinearSite]):
        self.sites = list(sites)
        self.params: list[nn.Parameter] = [p for s in self.sites for p in s.parameters()]
        bounds = np.cumsum([0, *(s.numel for s in self.sites)]).tolist()
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        return cls(trainable_linears(model))

    @property
    def numel(self) -> int:
        """p, the length of the flat vector."""
        return self.slices[-1].stop

    @property
    def dtype(self) -> torch.dtype:
        return self.sites[0].module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.sites[0].module.weight.device

    @property
    def wide(self) -> torch.dtype:
        """The accumulation dtype of per-pair reductions: float64 for float64 models, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def split(self, vec: Tensor) -> list[Tensor]:
        """Inverse of `flatten_site_matrices`: (p,) → [(d_out, d_in')], (p, m) → [(m, d_out, d_in')]."""
        if vec.shape[0] != self.numel:
            raise ValueError(
                f"flat vector has {vec.shape[0]} rows, the model has {self.numel} trainable parameters"
            )
        out = []
        for s, sl in zip(self.sites, self.slices, strict=True):
            chunk = vec[sl]
            out.append(chunk.reshape(s.d_out, s.d_in) if vec.dim() == 1
                       else chunk.T.reshape(vec.shape[1], s.d_out, s.d_in))
        return out

    def flatten_grads(self, grads: Sequence[Tensor | None], *, batched: int | None = None) -> Tensor:
        """Autograd's gradients of `params` (None = unused: zero) in the flat layout.

        Args:
            grads: one per parameter, or with `batched` = m one (m, *shape) per parameter (the output of a
                vmapped backward, `is_grads_batched`).

        Returns:
            (p,), or (p, m) when batched.
        """
        lead = () if batched is None else (int(batched),)
        grads = [torch.zeros(lead + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g
                 for p, g in zip(self.params, grads, strict=True)]
        mats, k = [], 0
        for s in self.sites:
            w = grads[k]
            # A bias gradient is the ones column appended to the weight's (d_out, d_in) block.
            mats.append(torch.cat([w, grads[k + 1].unsqueeze(-1)], dim=-1) if s.has_bias else w)
            k += len(s.parameters())
        return flatten_site_matrices(mats)

    def values(self) -> Tensor:
        """The trainable parameters themselves, flat (p,)."""
        return self.flatten_grads([p.detach() for p in self.params])

    def projector(self, k: int, seed: int, device: torch.device | str | None = None) -> KroneckerProjector:
        """The Kronecker projection of every site, k_out = k_in = k (a side at most k wide stays exact)."""
        return KroneckerProjector([(s.d_out, s.d_in) for s in self.sites], k_out=int(k), k_in=int(k),
                                  seed=int(seed), device=self.device if device is None else device)

    def projection_dim(self, k: int) -> int:
        """Σ_sites min(k, d_out)·min(k, d_in): the dimension of `projector(k, ...)`'s space, undrawn."""
        return sum(min(int(k), s.d_out) * min(int(k), s.d_in) for s in self.sites)
