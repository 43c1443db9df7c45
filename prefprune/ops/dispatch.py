"""Choose an implementation per op: `PREFPRUNE_IMPL=auto|triton|native|reference`.

Each op's dispatcher lists its fast paths with a function that returns the reasons a path
cannot serve the given inputs (empty list = usable). `auto` takes the first usable path and
falls back to the reference quietly (debug log); an explicit request that cannot be met raises
with the reasons. `PREFPRUNE_IMPL` is one setting for every op, so an explicit request names the
fast path of the ops that have one: an op that offers no such path at all (the segment ops have no
native path, CG has no Triton path) runs its reference, and the declined reasons say so.
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

#: Implementation requests (`PREFPRUNE_IMPL` and every `impl` setting).
Impl = Literal["auto", "triton", "native", "reference"]
IMPLS: tuple[str, ...] = typing.get_args(Impl)


def requested_impl(impl: str | None = None) -> str:
    """The implementation asked for: the argument, else `PREFPRUNE_IMPL`, else `auto`."""
    value = (impl if impl is not None else os.environ.get("PREFPRUNE_IMPL", "auto")).strip().lower()
    if value not in IMPLS:
        raise ValueError(f"PREFPRUNE_IMPL / impl must be one of {IMPLS}, got {value!r}")
    return value


@dataclass(frozen=True)
class FastPath:
    """A candidate implementation: `reasons()` lists why it cannot run (empty = it can)."""

    name: str
    reasons: Callable[[], list[str]]
    load: Callable[[], Callable]


@dataclass
class Selection:
    """The chosen implementation and, for every declined fast path, why."""

    name: str
    fn: Callable
    declined: dict[str, list[str]] = field(default_factory=dict)


class ImplUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run these inputs."""


def select(
    op: str, fast_paths: Sequence[FastPath], reference: Callable, *, impl: str | None = None
) -> Selection:
    """Pick the implementation of `op` per `impl`/`PREFPRUNE_IMPL` (see module docstring)."""
    want = requested_impl(impl)
    if want == "reference":
        return Selection("reference", reference)
    declined: dict[str, list[str]] = {}
    if want != "auto" and all(path.name != want for path in fast_paths):
        declined[want] = [f"{op} has no {want} implementation"]
        logger.debug("%s: using reference; %s", op, declined[want][0])
        return Selection("reference", reference, declined)
    for path in fast_paths:
        if want not in ("auto", path.name):
            continue
        reasons = path.reasons()
        if not reasons:
            return Selection(path.name, path.load(), declined)
        declined[path.name] = reasons
    if want != "auto":
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in declined.items())
        raise ImplUnavailableError(f"{op}: PREFPRUNE_IMPL={want} cannot be used ({detail})")
    if declined:
        logger.debug("%s: using reference; declined %s", op, declined)
    return Selection("reference", reference, declined)
