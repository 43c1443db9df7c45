"""Files that appear whole or not at all, and the version stamp written beside every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

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
