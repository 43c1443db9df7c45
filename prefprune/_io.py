"""Files that appear whole or not at all, the JSON form of result values, and the version stamp."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

_STAMPED = ("prefprune", "torch", "transformers", "peft", "datasets", "numpy")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(fh)` into a temporary sibling, then rename it into place.

    A crash part-way leaves no file under the final name (the temporary one is removed), so a reader
    never sees a half-written score file, step record or report. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write` of a bytes payload."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def package_versions(names: Iterable[str] = _STAMPED) -> dict[str, str]:
    """Python and package versions for result sidecars ("not installed" for a missing package)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def jsonable(obj: Any, *, finite: bool = False) -> Any:
    """`obj` as plain JSON values: dicts (keys as str), lists, str, int, float, bool, None.

    Tuples and sets become lists (sets sorted when their items allow it, so the output is stable),
    numpy and torch scalars become Python numbers, arrays and tensors nested lists, paths strings,
    dtypes and devices their names, dataclasses dicts of their fields.

    Args:
        obj: the value.
        finite: turn NaN and ±inf into None (strict JSON, e.g. for `json.dumps(..., allow_nan=False)`);
            by default they stay floats.

    Raises:
        TypeError: a value of another type (named in the message).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, finite=finite) for k, v in obj.items()}
    if isinstance(obj, set | frozenset):
        try:
            obj = sorted(obj)
        except TypeError:
            obj = list(obj)
    if isinstance(obj, list | tuple):
        return [jsonable(v, finite=finite) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return jsonable(obj.tolist(), finite=finite)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else obj
    if isinstance(obj, Path | torch.dtype | torch.device):
        return str(obj).replace("torch.", "") if isinstance(obj, torch.dtype) else str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__} ({obj!r:.80})")
