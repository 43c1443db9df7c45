"""Lazy access to the native extension `prefprune._C` and the reason it is missing."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

_BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` against the torch you run with "
    "(unset PREFPRUNE_SKIP_EXT)"
)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        return importlib.import_module("prefprune._C"), None
    except ImportError as exc:
        return None, f"prefprune._C is not available ({exc}); {_BUILD_HINT}"


def native() -> ModuleType | None:
    """The loaded extension module, or None when it was not built."""
    return _load()[0]


def native_error() -> str | None:
    """Why the extension could not be loaded (None when it loaded)."""
    return _load()[1]


def require_native() -> ModuleType:
    """The extension module; raises ImportError with build instructions when missing."""
    mod, err = _load()
    if mod is None:
        raise ImportError(err)
    return mod
