"""Kronecker random projections of per-layer weight gradients (LoGra-style) and their inverse map on queries.

`KroneckerProjector` holds one (P_in, P_out) pair per layer, drawn from one seed; the segmented projection op
(`prefprune.ops.segment.segment_project`) applies them to a batch's captured (X, Δ) without forming the
gradients, and `lift_query` maps a projected-space query back to weight space so the fused dot scores it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prefprune.ops.segment import segment_project

__all__ = ["KroneckerProjector", "ProjectedGradientStore", "lift_query", "projection_matrix"]


def projection_matrix(
    k: int,
    d: int,
    *,
    seed: int,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """A (k, d) random projection with E[PᵀP] = I, identical on every device and rank for a seed.

    Args:
        k: output dimension (rows). d: input dimension (columns).
        seed: the generator's seed (a CPU torch.Generator, so the values never depend on the device).
        kind: "gaussian" (N(0, 1/k) entries) or "rademacher" (±1/√k).
        dtype, device: where the matrix goes after it is drawn (always drawn in float32 on the CPU).
    """
    if int(k) < 1 or int(d) < 1:
        raise ValueError(f"projection_matrix needs k >= 1 and d >= 1, got k={k}, d={d}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "gaussian":
        P = torch.randn((k, d), generator=gen, dtype=torch.float32)
    elif kind == "rademacher":
        P = torch.randint(0, 2, (k, d), generator=gen, dtype=torch.int64).to(torch.float32).mul_(2).sub_(1)
    else:
        raise ValueError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")
    return P.div_(float(k) ** 0.5).to(dtype=dtype, device=device)


def lift_query(Q: Tensor, P_in: Tensor | None, P_out: Tensor | None) -> Tensor:
    """Map projected-space queries to weight space: Q̃_j = P_outᵀ Q_j P_in, so ⟨G, Q̃_j⟩ = ⟨P_out G P_inᵀ, Q_j⟩.

    With the lifted queries the fused dot (`segment_grad_dot*`) scores projected-space queries (e.g. a
    CG solution of the projected_ggn system) without storing Φ.

    Args:
        Q: (m, k_out, k_in) or (m, k_out*k_in) in projected space.
        P_in: (k_in, d_in) or None; P_out: (k_out, d_out) or None (identity sides).

    Returns:
        (m, d_out, d_in) in Q's dtype promoted with the projections'.
    """
    k_in = None if P_in is None else P_in.shape[0]
    k_out = None if P_out is None else P_out.shape[0]
    if Q.dim() == 2:
        if k_in is None or k_out is None:
            raise ValueError(
                "lift_query with a flat (m, k) Q needs both projections to know (k_out, k_in); "
                f"got Q of shape {tuple(Q.shape)} with an identity side"
            )
        if Q.shape[1] != k_out * k_in:
            raise ValueError(f"Q must have k_out*k_in = {k_out * k_in} columns, got shape {tuple(Q.shape)}")
        Q = Q.reshape(Q.shape[0], k_out, k_in)
    if (
        Q.dim() != 3
        or (k_out is not None and Q.shape[1] != k_out)
        or (k_in is not None and Q.shape[2] != k_in)
    ):
        raise ValueError(f"Q must be (m, k_out, k_in) = (m, {k_out}, {k_in}), got {tuple(Q.shape)}")
    out = Q if P_out is None else torch.matmul(P_out.T.to(Q.dtype), Q)
    return out if P_in is None else torch.matmul(out, P_in.to(Q.dtype))


def _layer_seed(seed: int, layer: int, side: int) -> int:
    # Distinct, reproducible seeds per (layer, side) from one user seed; stays in the generator's range.
    return (int(seed) * 1_000_003 + 2 * layer + side) % (2**63 - 1)


class KroneckerProjector:
    """Per-layer Kronecker projections (P_in, P_out) from one seed; projects a batch to one (N, dim) block.

    Layer l's block is P_out,l G_il P_in,lᵀ flattened (k_out_l·k_in_l columns); a side whose requested k is
    None or >= its dimension is left unprojected (identity: exact and cheaper). The matrices depend only on
    (seed, layer index, shapes, kind), so rows projected on different machines or ranks are comparable.

    Args:
        shapes: per layer (d_out, d_in), as the nn.Linear weight.
        k_out, k_in: projected sizes of the output and input sides (None: identity).
        seed: base seed; kind: "gaussian" or "rademacher"; device: where the projections live.

    Example (projected_ggn): rows = proj.project(Xs, dYs, offsets) for every batch, stored in a
    ProjectedGradientStore, then prefprune.cg.FactoredOperator(G=store.tensor(), w=..., damping=λ).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        *,
        k_out: int | None,
        k_in: int | None,
        seed: int,
        kind: str = "gaussian",
        device: str | torch.device = "cpu",
    ) -> None:
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        if not self.shapes:
            raise ValueError("KroneckerProjector needs at least one layer shape, got none")
        for name, k in (("k_out", k_out), ("k_in", k_in)):
            if k is not None and int(k) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {k}")
        self.seed, self.kind = int(seed), kind
        self.P_in: list[Tensor | None] = []
        self.P_out: list[Tensor | None] = []
        self.dims: list[int] = []
        for layer, (d_out, d_in) in enumerate(self.shapes):
            pin = (
                projection_matrix(k_in, d_in, seed=_layer_seed(seed, layer, 0), kind=kind, device=device)
                if k_in is not None and k_in < d_in
                else None
            )
            pout = (
                projection_matrix(k_out, d_out, seed=_layer_seed(seed, layer, 1), kind=kind, device=device)
                if k_out is not None and k_out < d_out
                else None
            )
            self.P_in.append(pin)
            self.P_out.append(pout)
            self.dims.append(
                (d_out if pout is None else pout.shape[0]) * (d_in if pin is None else pin.shape[0])
            )
        bounds = np.cumsum([0, *self.dims]).tolist()
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @property
    def dim(self) -> int:
        """Total projected dimension Σ_l k_out_l·k_in_l."""
        return int(sum(self.dims))

    def to(self, device: str | torch.device) -> KroneckerProjector:
        """Move the projection matrices to `device` (in place); returns self."""
        self.P_in = [None if p is None else p.to(device) for p in self.P_in]
        self.P_out = [None if p is None else p.to(device) for p in self.P_out]
        return self

    def _check_layers(self, n: int, what: str) -> None:
        if n != len(self.shapes):
            raise ValueError(f"{what}: expected {len(self.shapes)} layers (the projector's), got {n}")

    def project(
        self, Xs: Sequence[Tensor], dYs: Sequence[Tensor], offsets: Tensor, *, impl: str | None = None
    ) -> Tensor:
        """(N, dim) float32: per layer `segment_project`, concatenated along columns in layer order."""
        self._check_layers(len(Xs), "Xs")
        self._check_layers(len(dYs), "dYs")
        blocks = []
        for layer, (X, dY) in enumerate(zip(Xs, dYs, strict=True)):
            if (dY.shape[-1], X.shape[-1]) != self.shapes[layer]:
                raise ValueError(
                    f"layer {layer}: (d_out, d_in) = {(dY.shape[-1], X.shape[-1])} does not match "
                    f"the projector's {self.shapes[layer]}"
                )
            pin, pout = self.P_in[layer], self.P_out[layer]
            blocks.append(
                segment_project(
                    X,
                    dY,
                    offsets,
                    None if pin is None else pin.to(X.device),
                    None if pout is None else pout.to(X.device),
                    impl=impl,
                )
            )
        return torch.cat(blocks, dim=1)

    def project_query(self, Qs: Sequence[Tensor]) -> Tensor:
        """Weight-space per-layer queries (m, d_out_l, d_in_l) → (m, dim): P_out Q P_inᵀ, flattened."""
        self._check_layers(len(Qs), "Qs")
        rows = []
        for layer, Q in enumerate(Qs):
            if Q.dim() != 3 or tuple(Q.shape[1:]) != self.shapes[layer]:
                raise ValueError(
                    f"Qs[{layer}] must be (m, {self.shapes[layer][0]}, {self.shapes[layer][1]}), "
                    f"got {tuple(Q.shape)}"
                )
            pin, pout = self.P_in[layer], self.P_out[layer]
            q = Q if pout is None else torch.matmul(pout.to(Q), Q)
            q = q if pin is None else torch.matmul(q, pin.to(Q).T)
            rows.append(q.reshape(Q.shape[0], -1))
        return torch.cat(rows, dim=1)

    def lift(self, Qp: Tensor) -> list[Tensor]:
        """Projected-space queries (m, dim) → per-layer weight-space queries for segment_grad_dot_grouped."""
        if Qp.dim() != 2 or Qp.shape[1] != self.dim:
            raise ValueError(f"Qp must be (m, {self.dim}), got {tuple(Qp.shape)}")
        out = []
        for layer, sl in enumerate(self.slices):
            d_out, d_in = self.shapes[layer]
            pin, pout = self.P_in[layer], self.P_out[layer]
            k_out = d_out if pout is None else pout.shape[0]
            k_in = d_in if pin is None else pin.shape[0]
            q = Qp[:, sl].reshape(Qp.shape[0], k_out, k_in)
            out.append(
                lift_query(
                    q,
                    None if pin is None else pin.to(Qp.device),
                    None if pout is None else pout.to(Qp.device),
                )
            )
        return out


class ProjectedGradientStore:
    """Rows of projected per-pair gradients (n, dim) float32, in memory or in a memory-mapped .npy file.

    Args:
        n_rows, dim: the matrix's shape (rows = pairs in scoring order).
        path: None keeps it in RAM; a path creates (or, with resume=True, reopens) a .npy memmap there.
        resume: reopen an existing file of the same shape instead of overwriting it.
    """

    def __init__(
        self, n_rows: int, dim: int, *, path: str | os.PathLike | None = None, resume: bool = False
    ) -> None:
        if n_rows < 0 or dim < 1:
            raise ValueError(f"ProjectedGradientStore needs n_rows >= 0 and dim >= 1, got {n_rows}, {dim}")
        self.path = None if path is None else Path(path)
        if self.path is None:
            self.array = np.zeros((n_rows, dim), dtype=np.float32)
        elif resume and self.path.exists():
            self.array = np.load(self.path, mmap_mode="r+")
            if self.array.shape != (n_rows, dim) or self.array.dtype != np.float32:
                raise ValueError(
                    f"{self.path}: holds {self.array.dtype} {self.array.shape}, "
                    f"expected float32 {(n_rows, dim)}"
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=np.float32, shape=(n_rows, dim)
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    def write(self, start: int, rows: Tensor) -> None:
        """Store rows (b, dim) at rows start..start+b."""
        if rows.dim() != 2 or rows.shape[1] != self.array.shape[1]:
            raise ValueError(f"rows must be (b, {self.array.shape[1]}), got {tuple(rows.shape)}")
        if start < 0 or start + rows.shape[0] > self.array.shape[0]:
            raise ValueError(
                f"rows {start}..{start + rows.shape[0]} fall outside the store's {self.array.shape[0]}"
            )
        self.array[start : start + rows.shape[0]] = rows.detach().to("cpu", torch.float32).numpy()

    def flush(self) -> None:
        """Write a memory-mapped store's pages to disk (no-op in RAM)."""
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def tensor(self) -> Tensor:
        """The rows as a CPU float32 tensor sharing memory with the store (no copy)."""
        return torch.from_numpy(np.asarray(self.array))
