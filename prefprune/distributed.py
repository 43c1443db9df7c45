"""torch.distributed for scoring: ranks, contiguous length-balanced shards, sums over ranks, input agreement.

Scoring runs under `torchrun` (or any initialised default process group: gloo on CPU, NCCL on GPUs). Each
rank takes a contiguous, length-balanced range of the batches of every set it passes over; the sums a
pass accumulates (the validation gradient, curvature products, Gauss–Newton rows) are combined over
ranks at one point per pass (`sum_over_ranks`, `cat_over_ranks`), so every rank solves the same system.
Without a process group, and for plain `PairBatches`, every helper here is the identity: single-process
code paths stay as they are.

Collectives must be called by every rank in the same order; the helpers below are only used where every
rank reaches the same call (one per pass or per operator product).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from prefprune.data.batching import PairBatches

logger = logging.getLogger(__name__)

__all__ = [
    "DisagreementError",
    "ShardedBatches",
    "agree",
    "all_gather_objects",
    "balanced_ranges",
    "barrier",
    "broadcast_object",
    "cat_over_ranks",
    "is_distributed",
    "launched_group",
    "rank",
    "sum_over_ranks",
    "world_size",
]


class DisagreementError(ValueError):
    """Ranks were started with different inputs (settings, data or model weights)."""


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


@contextlib.contextmanager
def launched_group(
    device: str | torch.device | None, *, timeout_s: float | None = None
) -> Iterator[str | None]:
    """The device this rank should run on, with the process group a launcher asked for initialised.

    Under `torchrun` (``WORLD_SIZE`` > 1 in the environment) and without an initialised group, this
    initialises the default group from the environment (NCCL when `device` is CUDA, else gloo) and
    destroys it on exit; a CUDA device without an index becomes ``cuda:LOCAL_RANK``. A group the caller
    initialised is used as it is and left alone. Without either, `device` is returned unchanged.

    Args:
        device: the requested device ("cuda", "cuda:1", "cpu" or None).
        timeout_s: collective timeout for a group initialised here (default: torch's).
    """
    owned = False
    want = torch.device(device) if device is not None else None
    if not (dist.is_available() and dist.is_initialized()) and _env_world_size() > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if want is not None and want.type == "cuda" else "gloo"
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=backend, **kwargs)
        owned = True
    if want is not None and want.type == "cuda" and dist.is_available() and dist.is_initialized():
        if want.index is None:
            want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    try:
        yield None if want is None else str(want)
    finally:
        if owned:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (`obj` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(values: Mapping[str, Any], *, what: str = "inputs") -> None:
    """Check that every rank holds the same `values` (e.g. fingerprints of model, data and settings).

    Raises:
        DisagreementError: on every rank, naming each entry that differs and the ranks that differ from
            rank 0.
    """
    if not is_distributed():
        return
    every = all_gather_objects(dict(values))
    ref = every[0]
    problems = []
    for key in sorted(set().union(*every)):
        odd = [r for r, v in enumerate(every) if v.get(key) != ref.get(key)]
        if odd:
            problems.append(f"{key} differs on rank(s) {odd} from rank 0 ({_short(ref.get(key))} vs "
                            f"{_short(every[odd[0]].get(key))})")
    if problems:
        raise DisagreementError(
            f"the {len(every)} ranks were started with different {what}: " + "; ".join(problems)
            + "; start every rank with the same model, data and settings"
        )


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def balanced_ranges(costs: Sequence[float], parts: int) -> list[range]:
    """Split items 0..n-1 into `parts` contiguous ranges of about equal total cost.

    Boundary j is the first item whose prefix sum reaches j/parts of the total, so each range ends as
    close to its share as the items allow; ranges may be empty when there are fewer items than parts.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts!r}")
    n = len(costs)
    total = float(sum(costs))
    bounds, acc, i = [0], 0.0, 0
    for j in range(1, parts):
        target = total * j / parts
        while i < n and acc + float(costs[i]) / 2 <= target:  # an item goes where its middle falls
            acc += float(costs[i])
            i += 1
        bounds.append(i)
    bounds.append(n)
    return [range(bounds[j], bounds[j + 1]) for j in range(parts)]


def batch_costs(batches: PairBatches) -> list[int]:
    """Padded token count of each batch of `batches` (what a forward+backward costs, roughly)."""
    enc, bs = batches.encoded, batches.batch_size
    out = []
    for a in range(0, len(enc), bs):
        chunk = enc[a : a + bs]
        out.append(2 * len(chunk) * max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in chunk))
    return out


class ShardedBatches(PairBatches):
    """This rank's contiguous range of the batches of a `PairBatches`, batched exactly as the whole.

    Iterating yields only the local batches; ``n_pairs`` stays the size of the whole set, so a pass
    that divides its local sum by ``n_pairs`` and then calls `sum_over_ranks` gets the global mean.

    Args:
        whole: the batches of the entire set (the same on every rank).
        what: the set's name for error messages ("validation set").

    Raises:
        ValueError: fewer batches than ranks (a rank would have nothing to contribute).
    """

    def __init__(self, whole: PairBatches, *, what: str = "pairs"):
        world, me = world_size(), rank()
        n_batches = len(whole)
        if n_batches < world:
            raise ValueError(
                f"{what}: {whole.n_pairs} pairs make {n_batches} batches of {whole.batch_size}, fewer than "
                f"the {world} ranks; lower batch_size or start fewer ranks"
            )
        self.batch_range = balanced_ranges(batch_costs(whole), world)[me]
        a = self.batch_range.start * whole.batch_size
        b = min(whole.n_pairs, self.batch_range.stop * whole.batch_size)
        super().__init__(whole.encoded[a:b], batch_size=whole.batch_size, pad_token_id=whole.pad_token_id,
                         padding_side=whole.padding_side, device=whole.device)
        self.whole = whole
        self.what = what

    @property
    def n_pairs(self) -> int:
        return self.whole.n_pairs

    @property
    def n_local(self) -> int:
        return len(self.encoded)

    def with_padding(self, padding_side: str) -> ShardedBatches:
        return ShardedBatches(self.whole.with_padding(padding_side), what=self.what)


def sum_over_ranks(batches: Any, t: Tensor) -> Tensor:
    """The sum of `t` over ranks when `batches` is sharded (`t` itself otherwise)."""
    if not isinstance(batches, ShardedBatches) or not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def cat_over_ranks(batches: Any, t: Tensor) -> Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order (= set order) when `batches` is sharded."""
    if not isinstance(batches, ShardedBatches) or not is_distributed():
        return t
    dev = _comm_device()
    sizes = all_gather_objects(int(t.shape[0]))
    buf = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device)
