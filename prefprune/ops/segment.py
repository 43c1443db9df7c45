"""Per-segment weight gradients of nn.Linear layers from packed (X, dY, offsets): projection and fused dots.

Public entry points check their inputs (for every implementation), then dispatch per
`prefprune.ops.dispatch.select` between the Triton kernels (one module per op in `prefprune.kernels`:
`grad_dot`, `project`; imported lazily) and the pure-PyTorch references in `prefprune.ops.reference`.

Packed layout: X (T_total×d_in) layer inputs and dY (T_total×d_out) output gradients of all tokens of N
segments back to back; offsets (N+1,) int64 with offsets[0] = 0, non-decreasing, offsets[N] = T_total.
The weight gradient of segment i is G_i = dY_iᵀ X_i (d_out×d_in, nn.Linear weight layout).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prefprune.ops import reference
from prefprune.ops.dispatch import FastPath, Selection, requested_impl, select

__all__ = [
    "HAS_TRITON",
    "KroneckerProjector",
    "ProjectedGradientStore",
    "lift_query",
    "projection_matrix",
    "check_offsets",
    "segment_grad_dot",
    "segment_grad_dot_grouped",
    "segment_project",
    "select_segment_impl",
]

logger = logging.getLogger(__name__)

# Checked without importing Triton: importing it is slow and must not happen at `import prefprune`.
HAS_TRITON = importlib.util.find_spec("triton") is not None

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_reasons(tensors: Sequence[Tensor], *, explicit: bool = False) -> list[str]:
    """Why the Triton kernels cannot run on these (already validated) inputs; empty = they can.

    CPU tensors go through the Triton interpreter only when Triton was asked for explicitly
    (PREFPRUNE_IMPL=triton / impl="triton") and TRITON_INTERPRET=1: under `auto` the CPU uses the
    reference, which is much faster than the interpreter.
    """
    reasons = []
    if not HAS_TRITON:
        reasons.append("Triton is not installed (pip install 'prefprune[triton]')")
    interp = _interpreter_on()
    for dev in sorted({str(t.device) for t in tensors}):
        kind = torch.device(dev).type
        if kind == "cpu" and not interp:
            reasons.append(
                f"tensors are on {dev}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
            )
        elif kind == "cpu" and not explicit:
            reasons.append(f"tensors are on {dev}; auto uses the reference on CPU (interpreter: impl=triton)")
        elif kind not in ("cpu", "cuda"):
            reasons.append(f"tensors are on {dev}; the Triton kernels run on CUDA devices only")
    dtypes = {t.dtype for t in tensors}
    for dt in sorted(dtypes - set(_KERNEL_DTYPES), key=str):
        reasons.append(f"dtype {dt} is not supported (float32, float16, bfloat16)")
    if interp and torch.bfloat16 in dtypes and any(t.device.type == "cpu" for t in tensors):
        reasons.append(
            "bfloat16 under the Triton interpreter: tl.dot on bf16 returns garbage there "
            "(Triton issue #11584); bf16 runs on a GPU"
        )
    return reasons


# The Triton module (in prefprune.kernels) that holds each op's launcher.
_KERNEL_MODULES = {
    "segment_project": "project",
    "segment_grad_dot": "grad_dot",
    "segment_grad_dot_grouped": "grad_dot",
}


def _load_kernel(op: str):
    def load():
        import importlib  # lazy: the kernels need Triton and read TRITON_INTERPRET at import

        return getattr(importlib.import_module(f"prefprune.kernels.{_KERNEL_MODULES[op]}"), f"{op}_triton")

    return load


def select_segment_impl(op: str, tensors: Sequence[Tensor], *, impl: str | None = None) -> Selection:
    """Choose the implementation of one of the segment ops for these inputs (see prefprune.ops.dispatch).

    Args:
        op: "segment_project", "segment_grad_dot" or "segment_grad_dot_grouped".
        tensors: the inputs whose device/dtype decide (X, dY of every layer).
        impl: None (PREFPRUNE_IMPL, default auto), "auto", "triton", "native" or "reference".
    """
    refs = {
        "segment_project": reference.segment_project_reference,
        "segment_grad_dot": reference.segment_grad_dot_reference,
        "segment_grad_dot_grouped": reference.segment_grad_dot_grouped_reference,
    }
    if op not in refs:
        raise ValueError(f"unknown segment op {op!r}; expected one of {sorted(refs)}")
    explicit = requested_impl(impl) == "triton"
    reasons = lambda: _triton_reasons(tensors, explicit=explicit)
    fast = [FastPath("triton", reasons, _load_kernel(op))]
    return select(op, fast, refs[op], impl=impl)


# ---------------------------------------------------------------------------------------------
# Input checks (every implementation goes through them)
# ---------------------------------------------------------------------------------------------


def _check_offsets(offsets: Tensor, total: int, device: torch.device, *, values: bool = True) -> Tensor:
    """Check the offsets' type, shape, dtype and device; with `values`, also their entries (one host sync).

    `values=False` is for callers that validated the entries once per batch (`check_offsets`), so that
    a loop over layers does not sync with the device once per layer.
    """
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D with N+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets must be int64 (or int32), got {offsets.dtype}")
    if offsets.device != device:
        raise ValueError(f"offsets are on {offsets.device} but X is on {device}")
    offsets = offsets.to(torch.int64).contiguous()
    if not values:
        return offsets
    # One host sync for all three conditions; the detailed message is only built on failure.
    first, last = offsets[0], offsets[-1]
    steps = offsets[1:] - offsets[:-1]
    bad = (first != 0) | (last != total) | (steps < 0).any()
    if bool(bad):
        if int(first) != 0:
            raise ValueError(f"offsets must start at 0, got offsets[0] = {int(first)}")
        if int(last) != total:
            raise ValueError(
                f"offsets must end at T_total = X.shape[0] = {total}, got offsets[-1] = {int(last)}"
            )
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(
            f"offsets must be non-decreasing, got offsets[{i}] = {int(offsets[i])} > "
            f"offsets[{i + 1}] = {int(offsets[i + 1])}"
        )
    return offsets


def check_offsets(offsets: Tensor, total: int) -> Tensor:
    """Validate segment offsets once (start 0, end `total`, non-decreasing); returns them as int64.

    Callers that run several ops on the same offsets (every layer of a batch) check them here once and
    pass ``offsets_checked=True`` to the ops, which then skip the entries' check (and its host sync).

    Raises:
        ValueError: a bad entry, named with its index and value.
    """
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    return _check_offsets(offsets, total, offsets.device)


def _check_pair(X: Tensor, dY: Tensor, where: str = "") -> None:
    for name, t in (("X", X), ("dY", dY)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}{where} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}{where} must be 2-D (T_total, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}{where} must be floating point, got {t.dtype}")
    if X.shape[0] != dY.shape[0]:
        raise ValueError(
            f"X{where} and dY{where} must have the same number of rows (tokens), "
            f"got {X.shape[0]} and {dY.shape[0]}"
        )
    if X.device != dY.device:
        raise ValueError(f"X{where} is on {X.device} but dY{where} is on {dY.device}")
    if X.dtype != dY.dtype:
        raise ValueError(f"X{where} is {X.dtype} but dY{where} is {dY.dtype}; cast them to one dtype")


def _check_query(Q: Tensor | None, d_out: int, d_in: int, device: torch.device, where: str = "") -> None:
    if Q is None:
        return
    if not isinstance(Q, Tensor):
        raise TypeError(f"Q{where} must be a torch.Tensor or None, got {type(Q).__name__}")
    if Q.dim() != 3 or Q.shape[1:] != (d_out, d_in):
        raise ValueError(
            f"Q{where} must have shape (m, d_out, d_in) = (m, {d_out}, {d_in}), got {tuple(Q.shape)}"
        )
    if not Q.is_floating_point():
        raise ValueError(f"Q{where} must be floating point, got {Q.dtype}")
    if Q.device != device:
        raise ValueError(f"Q{where} is on {Q.device} but X is on {device}")


def _check_projection(P: Tensor | None, d: int, name: str, device: torch.device) -> None:
    if P is None:
        return
    if not isinstance(P, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(P).__name__}")
    if P.dim() != 2 or P.shape[1] != d:
        raise ValueError(f"{name} must have shape (k, {d}), got {tuple(P.shape)}")
    if not P.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {P.dtype}")
    if P.device != device:
        raise ValueError(f"{name} is on {P.device} but X is on {device}")


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def segment_project(
    X: Tensor,
    dY: Tensor,
    offsets: Tensor,
    P_in: Tensor | None,
    P_out: Tensor | None,
    *,
    impl: str | None = None,
    offsets_checked: bool = False,
) -> Tensor:
    """Kronecker-projected per-segment weight gradients Φ_i = P_out (dY_iᵀ X_i) P_inᵀ.

    Args:
        X: (T_total, d_in) packed layer inputs (fp32, fp16 or bf16; any strides).
        dY: (T_total, d_out) packed output gradients, same dtype and device as X.
        offsets: (N+1,) int64 segment boundaries (0, ..., T_total), non-decreasing; empty segments allowed.
        P_in: (k_in, d_in) projection of the input side, or None (identity: k_in = d_in).
        P_out: (k_out, d_out) projection of the output side, or None (identity: k_out = d_out).
        impl: implementation override (default: PREFPRUNE_IMPL, else auto).
        offsets_checked: the caller validated the offsets' entries (`check_offsets`); skip that check and
            its host sync (type, shape, dtype and device are still checked).

    Returns:
        (N, k_out*k_in) float32 (float64 for float64 inputs, reference only), row i = Φ_i flattened
        row-major; with both projections None it is the raw gradient in nn.Linear (d_out, d_in) layout.
    """
    _check_pair(X, dY)
    offsets = _check_offsets(offsets, X.shape[0], X.device, values=not offsets_checked)
    _check_projection(P_in, X.shape[1], "P_in", X.device)
    _check_projection(P_out, dY.shape[1], "P_out", X.device)
    sel = select_segment_impl("segment_project", [X, dY], impl=impl)
    return sel.fn(X, dY, offsets, P_in, P_out)


def segment_grad_dot(
    X: Tensor,
    dY: Tensor,
    offsets: Tensor,
    Q: Tensor | None,
    *,
    impl: str | None = None,
    offsets_checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-segment ⟨dY_iᵀ X_i, Q_j⟩ for m queries and ‖dY_iᵀ X_i‖², without forming the gradients.

    Args:
        X: (T_total, d_in), dY: (T_total, d_out), offsets: (N+1,) as in `segment_project`.
        Q: (m, d_out, d_in) queries in nn.Linear weight layout (any float dtype; read as fp32), or None.
        impl: implementation override.
        offsets_checked: as in `segment_project`.

    Returns:
        S (N, m) and sqnorm (N,), float32 (float64 for float64 inputs, reference only).
    """
    _check_pair(X, dY)
    offsets = _check_offsets(offsets, X.shape[0], X.device, values=not offsets_checked)
    _check_query(Q, dY.shape[1], X.shape[1], X.device)
    sel = select_segment_impl("segment_grad_dot", [X, dY], impl=impl)
    return sel.fn(X, dY, offsets, Q)


def segment_grad_dot_grouped(
    Xs: Sequence[Tensor],
    dYs: Sequence[Tensor],
    offsets: Tensor,
    Qs: Sequence[Tensor] | None,
    *,
    impl: str | None = None,
    offsets_checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """`segment_grad_dot` summed over several layers that share the segments, in one launch (per dtype).

    This is the scorer's hot path: pass every trainable nn.Linear of the model (LoRA A: d_out = r;
    LoRA B: d_in = r; a score head with a bias can append a ones-column to its X).

    Args:
        Xs: per layer (T_total, d_in_l); dYs: per layer (T_total, d_out_l), same T_total and device for all.
        offsets: (N+1,) shared segment boundaries.
        Qs: per layer (m, d_out_l, d_in_l) with one m for all layers, or None (norms only).
        impl: implementation override.
        offsets_checked: as in `segment_project`.

    Returns:
        S (N, m) = Σ_l ⟨G_il, Q_jl⟩ and sqnorm (N,) = Σ_l ‖G_il‖²: dots and squared norm of the
        concatenated per-segment gradient of all layers.
    """
    Xs, dYs = list(Xs), list(dYs)
    if not Xs:
        raise ValueError("Xs must hold at least one layer, got an empty list")
    if len(Xs) != len(dYs):
        raise ValueError(f"Xs and dYs must have one entry per layer, got {len(Xs)} and {len(dYs)}")
    if Qs is not None:
        Qs = list(Qs)
        if len(Qs) != len(Xs):
            raise ValueError(f"Qs must have one entry per layer ({len(Xs)}), got {len(Qs)}")
    _check_pair(Xs[0], dYs[0], where="[0]")
    total, device = Xs[0].shape[0], Xs[0].device
    for i, (X, dY) in enumerate(zip(Xs, dYs, strict=True)):
        _check_pair(X, dY, where=f"[{i}]")
        if X.shape[0] != total:
            raise ValueError(
                f"all layers must have the same T_total: Xs[0] has {total} rows, Xs[{i}] has {X.shape[0]}"
            )
        if X.device != device:
            raise ValueError(f"all layers must be on one device: Xs[0] is on {device}, Xs[{i}] on {X.device}")
        if Qs is not None:
            _check_query(Qs[i], dY.shape[1], X.shape[1], device, where=f"[{i}]")
            if Qs[i] is None:
                raise ValueError(f"Qs[{i}] is None; pass Qs=None for norms only, or a query for every layer")
            if Qs[i].shape[0] != Qs[0].shape[0]:
                raise ValueError(
                    f"every layer needs the same number of queries m: Qs[0] has {Qs[0].shape[0]}, "
                    f"Qs[{i}] has {Qs[i].shape[0]}"
                )
    offsets = _check_offsets(offsets, total, device, values=not offsets_checked)
    sel = select_segment_impl("segment_grad_dot_grouped", Xs + dYs, impl=impl)
    return sel.fn(Xs, dYs, offsets, Qs)


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------


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
