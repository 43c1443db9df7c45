"""Did the inputs change? One set of digests for every resumable stage.

Training checkpoints (`prefprune.checkpoint`), score work folders (`prefprune.shards`) and experiment score
steps (`prefprune.experiment.results`) each keep what their inputs were and refuse to resume when it changed.
They describe those inputs with the helpers here: weights and encoded pairs by SHA-256, settings as plain
JSON values (minus the settings that change nothing a resume reuses).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prefprune._io import jsonable

__all__ = ["encoded_digest", "json_digest", "model_digest", "settings_fingerprint", "tensors_digest"]

_HASH_BLOCK = 1 << 24  # bytes of a tensor hashed at a time (bounds the host copy of a large weight)


def tensors_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of named tensors, in the given order."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        step = max(1, _HASH_BLOCK // max(1, t.element_size()))
        for a in range(0, flat.numel(), step):
            h.update(flat[a : a + step].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """Digest of every weight of `model` (trainable and frozen) and buffer, by name."""
    state = model.state_dict()
    return tensors_digest((k, state[k]) for k in sorted(state))


def encoded_digest(encoded: Sequence) -> str:
    """Digest of encoded pairs in their order: ids, token ids and the truncation flag."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.id, e.chosen_ids, e.rejected_ids, bool(e.truncated)]).encode())
        h.update(b"\n")
    return h.hexdigest()


def settings_fingerprint(settings: Any, *, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """A settings dataclass or mapping as plain JSON values by name, without the `ignore`d settings."""
    values = jsonable(settings)
    if not isinstance(values, Mapping):
        raise TypeError(f"settings must be a dataclass or a mapping, got {type(settings).__name__}")
    skip = set(ignore)
    return {k: v for k, v in sorted(values.items()) if k not in skip}


def json_digest(value: Any) -> str:
    """sha256 of `value` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(jsonable(value), sort_keys=True).encode()).hexdigest()
