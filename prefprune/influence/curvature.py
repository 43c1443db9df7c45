"""The curvature H of the mean training loss over the curvature sample, behind one interface.

H is the Hessian of L(θ) = mean_i softplus(−m_i) over the curvature sample (DESIGN §2), acting on vectors of
its own space (the flat layout, or a projection of it). Every implementation answers the same questions:

- ``matvec(V)``: H V for a (d, m) block, one pass over the sample;
- ``rows()``: the Gauss–Newton factor Φ (n, d) and weights w (H = Φᵀ diag(w) Φ / n), one pass — what the
  direct (Woodbury) and the factored native CG solves need;
- ``trace()``: trace of the Gauss–Newton matrix in weight space (the scale of relative damping).

Implementations: `ExactHessian` (double-backward HVPs), `GaussNewton` (σ(m)σ(−m) ∇m ∇mᵀ, PSD),
`ProjectedGaussNewton` (the same in a Kronecker random-projection space, LoGra-style) and `Identity`
(no solve: influence = grad_dot). `make_curvature` builds one by name. Adding a curvature is one class here
plus its entry in `CURVATURE_TYPES`.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefprune.data import PairBatches
from prefprune.distributed import batch_costs, cat_over_ranks, sum_over_ranks
from prefprune.influence.capture import pair_margins
from prefprune.influence.layout import ParameterLayout, flatten_site_matrices
from prefprune.influence.reducers import pair_gradient_rows, stream_pair_dots
from prefprune.model import eager_attention
from prefprune.ops.projection import KroneckerProjector

__all__ = [
    "CURVATURES",
    "CURVATURE_TYPES",
    "Curvature",
    "CurvatureName",
    "ExactHessian",
    "GaussNewton",
    "Identity",
    "ProjectedGaussNewton",
    "gauss_newton_weights",
    "hvp_chunk_size",
    "make_curvature",
    "split_pair_batch",
]

#: The Hessians influence can use (DESIGN.md §2); the one list every setting and check derives from.
CurvatureName = Literal["exact", "ggn", "projected_ggn", "identity"]
CURVATURES: tuple[str, ...] = typing.get_args(CurvatureName)


#: The default double-backward chunk is batch_size // this (see `hvp_chunk_size`).
_HVP_CHUNK_DIVISOR = 4
#: Columns per vmapped second backward when `ExactHessian.matrix` builds a small explicit Hessian.
_MATRIX_COLUMN_BLOCK = 64


def gauss_newton_weights(margins: Tensor) -> Tensor:
    """w_i = σ(m_i)σ(−m_i), the second derivative of softplus(−m) at the margin (always > 0)."""
    return torch.sigmoid(margins) * torch.sigmoid(-margins)


class Curvature(ABC):
    """H over a curvature sample, in a space of dimension `dim`.

    Args:
        model: the reward model; layout: its `ParameterLayout`.
        batches: the curvature sample (sharded under torchrun: products and rows cover every rank's pairs).
        impl: segment-op implementation request.

    Attributes:
        passes: forward+backward passes over the curvature sample made so far.
    """

    name: ClassVar[str]
    #: "weights" (dimension p) or "projected".
    space: ClassVar[str] = "weights"
    #: Solved on its stored factor rows (a native factored CG) rather than by products.
    factored: ClassVar[bool] = False
    #: The Kronecker projection of a projected space (None in weight space).
    projector: KroneckerProjector | None = None

    def __init__(self, model: nn.Module, layout: ParameterLayout, batches: PairBatches | None, *,
                 impl: str | None = None):
        self.model, self.layout, self.batches, self.impl = model, layout, batches, impl
        self.passes = 0

    @property
    def dim(self) -> int:
        return self.layout.numel

    def to_space(self, B: Tensor) -> Tensor:
        """(p, m) flat vectors → (dim, m) in this curvature's space."""
        return B

    def from_space(self, Q: Tensor, dtype: torch.dtype) -> Tensor:
        """(dim, m) in this space → (p, m) flat vectors in `dtype` (what pass 2 scores with)."""
        return Q.to(dtype)

    def context(self) -> contextlib.AbstractContextManager:
        """What `matvec` must run inside."""
        return contextlib.nullcontext()

    def settings(self) -> dict:
        """Settings of this curvature's products that the solve record keeps (none by default)."""
        return {}

    @abstractmethod
    def matvec(self, V: Tensor) -> Tensor:
        """H V for V (dim, m): one pass over the sample."""

    def rows(self) -> tuple[Tensor, Tensor]:
        """The Gauss–Newton factor (n, dim) and weights (n,), gathered over ranks in sample order."""
        raise TypeError(f"curvature {self.name!r} has no Gauss–Newton factor rows")

    def trace(self) -> float:
        """trace(H_GN) = mean_i σ(m_i)σ(−m_i)‖∇m_i‖² in weight space, from one pass of squared norms.

        It is the scale of relative damping for every iterative solve (the exact Hessian's included).
        """
        batches = self.batches
        _, sq, margins = stream_pair_dots(self.model, self.layout, batches, [], objective=lambda m: m,
                                          impl=self.impl, desc="curvature trace")
        self.passes += 1
        total = float((gauss_newton_weights(margins) * sq).sum())
        return float(sum_over_ranks(batches, torch.tensor(total, dtype=torch.float64))) / batches.n_pairs


class Identity(Curvature):
    """H = I and no solve at all: the query is the right-hand side, so influence equals grad_dot."""

    name = "identity"

    def matvec(self, V: Tensor) -> Tensor:
        return V


def hvp_chunk_size(batch_size: int, hvp_batch_size: int | None) -> int:
    """Pairs per double-backward chunk of an exact Hessian product: `hvp_batch_size`, or by default a
    quarter of the batch (at least 1).

    Why a quarter: one pair's product holds its forward activations (under eager attention), the first
    backward's graph kept for the second, and the second backward's intermediates, about 3.3× what a
    forward + backward of the same pair holds (MiniLM, docs/benchmarks.md); a quarter of the batch keeps the
    product's peak near one forward + backward of the whole batch (the floor).
    """
    if hvp_batch_size is not None:
        if int(hvp_batch_size) != hvp_batch_size or hvp_batch_size < 1:
            raise ValueError(f"hvp_batch_size must be None or an integer >= 1, got {hvp_batch_size!r}")
        return int(hvp_batch_size)
    return max(1, int(batch_size) // _HVP_CHUNK_DIVISOR)


def split_pair_batch(batch: dict[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    """Chunks of at most `size` pairs of a collated right-padded pair batch (rows 0..B-1 chosen, B..2B-1
    rejected; see `pair_margins`), each cut to its own longest sequence (only padding columns go)."""
    n = batch["input_ids"].shape[0] // 2
    for a in range(0, n, size):
        b = min(n, a + size)
        rows = torch.cat([torch.arange(a, b), torch.arange(n + a, n + b)])
        length = max(1, int(batch["attention_mask"][rows].sum(1).max()))
        yield {k: v[rows, :length] for k, v in batch.items()}


class ExactHessian(Curvature):
    """The Hessian of the mean loss by double backward, accumulated over chunks of pairs.

    Fused attention kernels (sdpa, flash) have no double backward, so products run under eager attention
    (`context`), and on right-padded batches: eager attention turns a fully masked query row (a left-padding
    position) into NaN, which 0·NaN then spreads; rewards do not depend on the padding side.

    Memory: a product's peak is one chunk's graph (forward, the first backward kept for the second, one
    column's second backward), not a batch's: each batch is split into chunks of `hvp_batch_size` pairs
    (`hvp_chunk_size`), H·V is summed over the chunks (the loss is a sum over pairs, so the sum is the
    same), and the columns of V take one second backward each through the chunk's retained graph, so the
    peak does not grow with the number of columns (damping values, probes).

    Args:
        hvp_batch_size: pairs per double-backward chunk (None: a quarter of the batch, `hvp_chunk_size`).
    """

    name = "exact"

    def __init__(self, model: nn.Module, layout: ParameterLayout, batches: PairBatches | None, *,
                 impl: str | None = None, hvp_batch_size: int | None = None):
        super().__init__(model, layout, batches, impl=impl)
        self.hvp_batch_size = hvp_chunk_size(batches.batch_size if batches is not None else 1, hvp_batch_size)

    def context(self) -> contextlib.AbstractContextManager:
        return eager_attention(self.model)

    def settings(self) -> dict:
        return {"hvp_batch_size": self.hvp_batch_size}

    def matvec(self, V: Tensor, *, column_block: int = 1) -> Tensor:
        """H V: per chunk of pairs, one forward, one graph-building backward and one second backward per
        `column_block` columns of V (a vmapped one when > 1: faster for many columns, its memory grows with
        the block)."""
        batches = self.batches.with_padding("right")
        out = torch.zeros_like(V)
        device = batches.device
        for batch in batches.on("cpu"):
            for chunk in split_pair_batch(batch, self.hvp_batch_size):
                chunk = {k: v.to(device) for k, v in chunk.items()}
                out += self._chunk_product(chunk, V, batches.n_pairs, column_block)
        self.passes += 1
        return sum_over_ranks(batches, out)

    def _chunk_product(self, chunk: dict[str, Tensor], V: Tensor, n: int, column_block: int) -> Tensor:
        """One chunk's share of H V; its graph is freed when this returns, before the next chunk's forward."""
        params, layout = self.layout.params, self.layout
        with torch.enable_grad():
            loss = F.softplus(-pair_margins(self.model, chunk)).sum() / n
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            gflat = layout.flatten_grads(grads)
        del loss, grads
        out = torch.empty_like(V)
        m = V.shape[1]
        for j in range(0, m, column_block):
            k = min(column_block, m - j)
            last = j + k == m
            if k == 1:
                hv = torch.autograd.grad(gflat, params, grad_outputs=V[:, j], retain_graph=not last,
                                         allow_unused=True)
                out[:, j] = layout.flatten_grads(hv)
            else:
                hv = torch.autograd.grad(gflat, params, grad_outputs=V[:, j : j + k].T.contiguous(),
                                         is_grads_batched=True, retain_graph=not last, allow_unused=True)
                out[:, j : j + k] = layout.flatten_grads(hv, batched=k)
        return out

    def gauss_newton_rows(self) -> tuple[Tensor, Tensor]:
        """The rows and weights of H's Gauss–Newton part over the same sample (H = H_GN + the residual
        term), from one pass counted in `passes`: the factors of the preconditioner (H_GN + λI)⁻¹."""
        gauss_newton = GaussNewton(self.model, self.layout, self.batches, impl=self.impl)
        rows, weights = gauss_newton.rows()
        self.passes += gauss_newton.passes
        return rows, weights

    def matrix(self) -> Tensor:
        """The explicit (p, p) Hessian from p product columns in one pass (self-influence, when it fits).

        Only small p gets here (p×p must fit the budget): its columns take vmapped second backwards in
        blocks of `_MATRIX_COLUMN_BLOCK`, which cost little memory at that size and save p separate ones.
        """
        eye = torch.eye(self.dim, dtype=self.layout.dtype, device=self.layout.device)
        with self.context():
            return self.matvec(eye, column_block=_MATRIX_COLUMN_BLOCK)


class GaussNewton(Curvature):
    """H_GN = mean_i w_i ∇m_i ∇m_iᵀ, w_i = σ(m_i)σ(−m_i): PSD by construction, no double backward.

    A product needs each pair's whole dot ∇m_iᵀ V before it can weigh any layer, so it is taken on the
    batch's gradient rows (one layer deep in the capture, B×p per batch): H V = Σ_b Φ_bᵀ(w_b ⊙ Φ_b V)/n.
    """

    name = "ggn"

    def _row_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for margins, rows in pair_gradient_rows(self.model, self.layout, self.batches, objective=lambda m: m,
                                                projector=self.projector, impl=self.impl):
            yield gauss_newton_weights(margins).to(rows.dtype), rows
        self.passes += 1

    def matvec(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        n = self.batches.n_pairs
        for w, rows in self._row_batches():
            R = rows.to(V.dtype)
            out += R.T @ (w.to(V.dtype).unsqueeze(1) * (R @ V)) / n
        return sum_over_ranks(self.batches, out)

    def rows(self) -> tuple[Tensor, Tensor]:
        """The rows are written into one (n, dim) tensor as the pass makes them (no per-batch copies to
        concatenate: the factors' memory once, not twice).

        Memory: the pass holds a batch's forward + backward and the rows written so far, so it runs the
        batch with the most tokens first, and (on the CPU) the rows live in an anonymous mapping of their own
        (`_untouched_empty`) whose pages count only once written: the largest batch runs beside one batch's
        rows, not beside the sample's (before: the longest batch came last, beside 3/4 of the rows, 43 MB
        for MiniLM's 64-pair sample at batch 16, docs/benchmarks.md). Every batch holds the same pairs,
        padded the same, as in batch order, and its rows land in the same places: the rows are the same.
        """
        batches = self.batches
        n, bs = len(batches.encoded), batches.batch_size
        rows = _untouched_empty((n, self.dim), self.layout.wide, batches.device)
        weights = torch.empty(n, dtype=self.layout.wide, device=batches.device)
        for a, b in _largest_batches_first(batches):
            one = PairBatches(batches.encoded[a:b], batch_size=bs, pad_token_id=batches.pad_token_id,
                              padding_side=batches.padding_side, device=batches.device)
            for margins, _ in pair_gradient_rows(self.model, self.layout, one, objective=lambda m: m,
                                                 projector=self.projector, impl=self.impl, out=rows[a:b]):
                weights[a:b] = gauss_newton_weights(margins).to(rows.dtype)
        self.passes += 1
        # Every rank holds the rows of its shard of the curvature sample: gather them in sample order.
        w = cat_over_ranks(self.batches, weights)
        return cat_over_ranks(self.batches, rows), w


def _largest_batches_first(batches: PairBatches) -> list[tuple[int, int]]:
    """The [start, stop) pair ranges of `batches`' batches, most padded tokens first (ties in batch order)."""
    n, bs = len(batches.encoded), batches.batch_size
    spans = [(a, min(n, a + bs)) for a in range(0, n, bs)]
    tokens = batch_costs(batches)
    return [spans[i] for i in sorted(range(len(spans)), key=lambda i: -tokens[i])]


def _untouched_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised tensor; on the CPU in an anonymous memory mapping of its own, not the allocator's
    heap: a page counts in the process's memory only once written, and the mapping goes back to the system
    when the tensor is freed (a heap block of the same size would reuse pages that are already resident and
    stay with the process)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class ProjectedGaussNewton(GaussNewton):
    """The Gauss–Newton matrix in a Kronecker random-projection space (LoGra-style).

    Rows Φ_i = P_out ∇m_i P_inᵀ per layer (k_out×k_in numbers, stored for the sample); the system
    (Φᵀ diag(w) Φ / n + λI) q_p = P ∇L_V is solved on the factor, and the query lifted back, q = Pᵀ q_p, so
    pass 2 scores ∇ℓ_iᵀ q = (P∇ℓ_i)ᵀ q_p with the same fused dot.

    Args:
        projection_k: k_out = k_in per layer (a side at most k wide stays exact); projection_seed: its seed.
    """

    name = "projected_ggn"
    space = "projected"
    factored = True

    def __init__(self, model: nn.Module, layout: ParameterLayout, batches: PairBatches | None, *,
                 impl: str | None = None, projection_k: int = 16, projection_seed: int = 0):
        super().__init__(model, layout, batches, impl=impl)
        self.projector = layout.projector(projection_k, projection_seed)

    @property
    def dim(self) -> int:
        return self.projector.dim

    def to_space(self, B: Tensor) -> Tensor:
        return self.projector.project_query(self.layout.split(B)).T

    def from_space(self, Q: Tensor, dtype: torch.dtype) -> Tensor:
        return flatten_site_matrices(self.projector.lift(Q.T.to(dtype)))


CURVATURE_TYPES: dict[str, type[Curvature]] = {
    c.name: c for c in (ExactHessian, GaussNewton, ProjectedGaussNewton, Identity)
}


def make_curvature(name: str, model: nn.Module, layout: ParameterLayout, batches: PairBatches | None, *,
                   impl: str | None = None, projection_k: int = 16, projection_seed: int = 0,
                   hvp_batch_size: int | None = None) -> Curvature:
    """The curvature called `name` over `batches` (None for identity); `hvp_batch_size`: exact's
    double-backward chunk (`hvp_chunk_size`)."""
    if name not in CURVATURE_TYPES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {name!r}")
    if name == "projected_ggn":
        return ProjectedGaussNewton(model, layout, batches, impl=impl, projection_k=projection_k,
                                    projection_seed=projection_seed)
    if name == "exact":
        return ExactHessian(model, layout, batches, impl=impl, hvp_batch_size=hvp_batch_size)
    return CURVATURE_TYPES[name](model, layout, batches, impl=impl)
