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

import torch
from torch import Tensor

from prefprune.ops import reference
from prefprune.ops.dispatch import FastPath, Selection, requested_impl, select

__all__ = [
    "HAS_TRITON",
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
