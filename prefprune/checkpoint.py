"""Resumable training: one checkpoint file with the trainable weights, optimiser, scheduler, RNG states and
the position in the run, refused on resume when the data, the settings or the frozen base changed.

The file is written with `torch.save` under a temporary name and renamed, and read back with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only: no pickled code).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefprune._io import atomic_write
from prefprune.fingerprint import encoded_digest, settings_fingerprint, tensors_digest

__all__ = [
    "CHECKPOINT_FILE", "load_checkpoint", "restore_checkpoint", "save_checkpoint", "training_fingerprint",
]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "prefprune.train-checkpoint/1"
# Settings that change neither the trained weights nor the order of work.
_NOT_FINGERPRINTED = ("progress", "resume", "checkpoint_every", "device", "eval_batch_size")


def training_fingerprint(model: nn.Module, config: Mapping[str, Any], encoded: Sequence) -> dict[str, Any]:
    """What must be unchanged for a checkpoint to apply: settings, training pairs and the frozen weights."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    return {
        "settings": settings_fingerprint(config, ignore=_NOT_FINGERPRINTED),
        "training data": encoded_digest(encoded),
        "frozen base weights": tensors_digest(frozen),
        "trainable parameters": [n for n, p in model.named_parameters() if p.requires_grad],
    }


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: Mapping[str, Any],
    position: Mapping[str, Any],
) -> Path:
    """Write the checkpoint (atomically).

    Args:
        position: where the run stands: step, epoch, window (next step window in the epoch), the data-order
            generator state at the start of the epoch, the epoch's running sums and the history so far.
    """
    state = {
        "format": FORMAT,
        "fingerprint": dict(fingerprint),
        "model": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "position": dict(position),
    }
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at `path` (None when there is none).

    Raises:
        ValueError: the file is unreadable, or written by a run with other settings, data or base weights
            (each changed input named, settings with their old and new values).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old = state["fingerprint"]
    except Exception as err:  # noqa: BLE001 -- any unreadable file is one clear error for the user
        raise ValueError(f"cannot resume: checkpoint {str(path)!r} is unreadable ({err})") from None
    changed = []
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) == fingerprint.get(key):
            continue
        if key == "settings":
            a, b = old.get(key, {}), fingerprint.get(key, {})
            diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
            changed.append("settings (" + "; ".join(diffs) + ")")
        else:
            changed.append(key)
    if changed:
        raise ValueError(
            f"cannot resume from {str(path)!r}: {', '.join(changed)} changed since it was written; rerun "
            "with the original inputs, or remove the checkpoint to start over"
        )
    return state


def restore_checkpoint(state: Mapping[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> None:
    """Load the weights, optimiser and scheduler states of `state` (RNG states are the caller's)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
