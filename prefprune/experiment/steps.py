"""The resumable step store: each finished step of an experiment is one JSON file, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefprune._io import atomic_write, atomic_write_text, jsonable

__all__ = ["StepStore", "arm_step_name", "load_state", "read_json", "save_state", "write_json"]


def write_json(path: Path, obj: Any) -> None:
    """`obj` (made JSON-plain) as indented JSON at `path`, atomically; creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(obj), indent=1))


def read_json(path: Path) -> Any | None:
    """The JSON value at `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_state(state: Mapping[str, Tensor], path: Path) -> None:
    """Trainable weights (detached, on CPU) as a torch file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save({k: v.detach().cpu() for k, v in state.items()}, fh))


def load_state(path: Path) -> dict[str, Tensor]:
    """Weights written by `save_state`; tensors only (``weights_only=True``: no pickled code runs, on every
    supported torch, not only where it is the default)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file missing from the experiment folder") from None
    except Exception as e:  # torch raises pickle, zip and runtime errors for a damaged file
        raise ValueError(f"{path}: cannot load the saved weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state


class StepStore:
    """Finished steps as JSON files under the output folder: `get` is None until `put` has finished."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, rel: str) -> dict | None:
        return read_json(self.root / rel)

    def put(self, rel: str, obj: Mapping[str, Any]) -> dict:
        write_json(self.root / rel, obj)
        return dict(obj)


def arm_step_name(seed: int, method: str, mode: str, fraction: float) -> str:
    """Relative path of one prune-and-retrain step's file."""
    return f"seed{seed}/arms/{method}__{mode}__{fraction:g}.json"
