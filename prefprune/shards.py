"""Resumable scoring: fingerprints of the inputs, the saved solve, per-batch score chunks with manifests.

A scoring run that writes OUTPUT keeps its work in ``OUTPUT.shards/`` until the merged file is written, and
holds that folder's lock the whole time (`locked_work_dir`: one run per output):

- ``fingerprint.json``: digests of the model weights, the encoded training and validation pairs and the
  settings that change scores (world size is not one of them, so a re-sharded run resumes too);
- ``solve.safetensors``: the query q, ∇L_V, the solve record and the validation loss, so a resumed run
  does not solve again unless an input changed;
- ``chunks/b<k>.safetensors``: the score rows of training batch k (batches are formed over the whole
  length-ordered set, so batch k is the same pairs whatever the number of ranks), and one line per
  finished chunk in the writing rank's ``manifest-rank<r>.jsonl``: ids, row count, byte count, sha256.

A chunk is reused only when its manifest line, size, checksum, row count, ids and positions all match
what the batch must hold; anything else (a torn manifest line, a truncated or corrupt file, a chunk of
another run or another solve) is logged and recomputed, never merged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefprune import distributed
from prefprune._io import (
    OutputLocked,
    atomic_write_bytes,
    atomic_write_text,
    jsonable,
    output_lock,
    sha256_bytes,
)
from prefprune.data.batching import PairBatches
from prefprune.fingerprint import encoded_digest, json_digest, model_digest, tensors_digest

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "ResumeMismatchError",
    "WorkFolder",
    "locked_work_dir",
    "run_digests",
    "sharded_pass",
    "work_dir_for",
]

FORMAT = "prefprune.score-shards/1"


class ResumeMismatchError(ValueError):
    """The work folder was written by a run with other inputs than this one."""


def work_dir_for(output: str | os.PathLike) -> Path:
    """The work folder of a score file: ``<output>.shards``."""
    return Path(str(output) + ".shards")


_LOCK_ERRORS: dict[str, type[Exception]] = {
    "OutputLocked": OutputLocked, "ResumeMismatchError": ResumeMismatchError,
    "PermissionError": PermissionError, "FileNotFoundError": FileNotFoundError,
}


@contextlib.contextmanager
def locked_work_dir(output: str | os.PathLike, *, what: str = "prefprune score") -> Iterator[Path]:
    """Hold the lock of `output`'s work folder for a whole scoring run; every rank must enter it.

    Rank 0 takes `prefprune._io.output_lock` on ``<output>.shards`` (created when missing) before any
    rank touches the folder and keeps it until the block ends, the final file's commit included. The
    other ranks wait for rank 0's outcome, so a run whose output is taken stops on every rank with the
    same `OutputLocked` naming the holder's pid, and none hangs. On a normal exit every rank passes a
    barrier before rank 0 lets go (no rank still removes the folder when the next run takes it). A run
    that fails removes the folder it created when it saved no solve and no chunk there (a bad setting
    leaves nothing that would refuse the corrected run); one with work stays, for ``--resume``.

    Yields:
        The work folder.
    """
    path = work_dir_for(output)
    fresh = not path.exists()  # a folder an earlier run left is that run's, whatever becomes of this one
    with contextlib.ExitStack() as held:
        failure: BaseException | None = None
        if distributed.rank() == 0:
            try:
                if path.exists() and not path.is_dir():
                    raise ResumeMismatchError(f"{str(path)!r} exists and is not a folder")
                held.enter_context(output_lock(path, what=what, wait=0.0, is_folder=True))
            except (OutputLocked, ResumeMismatchError, OSError) as err:
                failure = err
        verdict = distributed.broadcast_object(None if failure is None else (type(failure).__name__,
                                                                             str(failure)))
        if failure is not None:
            raise failure
        if verdict is not None:
            raise _LOCK_ERRORS.get(verdict[0], OSError)(verdict[1])
        try:
            yield path
        except BaseException:
            if distributed.rank() == 0:
                if fresh:
                    _discard_if_no_work(path)
                else:
                    with contextlib.suppress(OSError):
                        path.rmdir()  # only when empty
            raise
        distributed.barrier()


def _discard_if_no_work(path: Path) -> None:
    """Remove the work folder of a failed run that saved nothing worth resuming (no solve, no chunk): a run
    stopped by a bad setting leaves nothing that would refuse the next run with corrected settings."""
    if not path.is_dir():
        return
    if (path / "solve.safetensors").exists() or any((path / "chunks").glob("*")):
        return
    if any(f.name not in ("fingerprint.json", "chunks") and not f.name.startswith(".")
           and not f.name.startswith("manifest-rank") for f in path.iterdir()):
        return  # something this code did not write: leave it
    shutil.rmtree(path, ignore_errors=True)


def _describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class WorkFolder:
    """The work folder of one scoring run on this rank (see the module docstring).

    Create it with `WorkFolder.open` on every rank at the same point: rank 0 decides whether the folder
    may be used (fresh, or a resume with unchanged inputs) and every rank gets the same verdict.

    Attributes:
        path: the folder.
        digests: input name → digest ("model weights", "training data", "validation data", "settings").
        settings: the settings behind the "settings" digest (to name a changed one).
        run_id: one digest of all of them.
    """

    def __init__(self, path: Path, digests: Mapping[str, str], settings: Mapping[str, Any]):
        self.path = Path(path)
        self.digests = dict(digests)
        self.settings = dict(settings)
        self.run_id = json_digest(self.digests)
        self.solve_id: str | None = None
        self.chunks_reused = 0
        self.chunks_written = 0
        self._candidates: dict[int, list[dict]] | None = None

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, digests: Mapping[str, str], settings: Mapping[str, Any], *,
             resume: bool) -> WorkFolder:
        """Create or reopen the folder; every rank must call this.

        Raises:
            ResumeMismatchError: resume=True and an input changed since the folder was written (names it),
                or resume=False and the folder holds an earlier run's work (on every rank).
        """
        work = cls(Path(path), digests, settings)
        verdict = None
        if distributed.rank() == 0:
            try:
                work._check_or_create(resume)
            except (ResumeMismatchError, OSError) as err:
                verdict = f"{type(err).__name__}: {err}"
        verdict = distributed.broadcast_object(verdict)
        if verdict is not None:
            kind, _, msg = verdict.partition(": ")
            raise (ResumeMismatchError if kind == "ResumeMismatchError" else OSError)(msg)
        # Ranks on another node see their own copy of the path; chunks there are checked like any other.
        (work.path / "chunks").mkdir(parents=True, exist_ok=True)
        return work

    def _check_or_create(self, resume: bool) -> None:
        record = self.path / "fingerprint.json"
        if self.path.exists() and not self.path.is_dir():
            raise ResumeMismatchError(f"{str(self.path)!r} exists and is not a folder")
        if self.path.is_dir() and record.exists():
            if not resume:
                raise ResumeMismatchError(
                    f"{str(self.path)!r} holds the score shards of an earlier, unfinished run; pass --resume "
                    f"(ScoreConfig.resume=True) to continue it, or remove that folder (rm -r "
                    f"{shlex.quote(str(self.path))}) to start over"
                )
            try:
                old = json.loads(record.read_text())
                old_digests, old_settings = old["digests"], old["settings"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ResumeMismatchError(f"cannot resume: {str(record)!r} is unreadable ({err})") from None
            changed = [k for k in sorted(set(old_digests) | set(self.digests))
                       if old_digests.get(k) != self.digests.get(k)]
            if changed:
                detail = ""
                if "settings" in changed:
                    detail = " (settings: " + "; ".join(_describe_change(old_settings, self.settings)) + ")"
                raise ResumeMismatchError(
                    f"cannot resume from {str(self.path)!r}: {', '.join(changed)} changed since the run that "
                    f"wrote it{detail}; rerun with the original inputs, or remove that folder (rm -r "
                    f"{shlex.quote(str(self.path))}) to start over"
                )
            logger.info("resuming from %s", self.path)
            return
        if resume:
            logger.info("--resume: no earlier work in %s, starting from the beginning", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("manifest-rank*.jsonl"):  # a folder left without its record
            stale.unlink()
        atomic_write_text(record, json.dumps({"format": FORMAT, "digests": self.digests,
                                              "settings": jsonable(self.settings)}, indent=2, sort_keys=True))

    # -- the solve -------------------------------------------------------------------------------

    def save_solve(self, tensors: Mapping[str, Tensor], record: Mapping[str, Any]) -> None:
        """Rank 0 saves the solve result (`tensors`, a JSON-able `record`) under this run's id."""
        self.solve_id = tensors_digest(sorted(tensors.items()))
        if distributed.rank() != 0:
            return
        meta = {"format": FORMAT, "run_id": self.run_id, "solve_id": self.solve_id,
                "record": json.dumps(jsonable(record, finite=True), sort_keys=True)}
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
        atomic_write_bytes(self.path / "solve.safetensors", data)

    def load_solve(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The saved solve of this run (read on rank 0, sent to every rank), or None."""
        found = None
        if distributed.rank() == 0:
            found = self._read_solve()
        found = distributed.broadcast_object(found)
        if found is not None:
            self.solve_id = tensors_digest(sorted(found[0].items()))
        return found

    def _read_solve(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        path = self.path / "solve.safetensors"
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = st_load(path.read_bytes())
        except Exception as err:  # noqa: BLE001 -- any unreadable file means "solve again", with the reason
            logger.warning("%s is unreadable (%s); solving again", path, err)
            return None
        intact = meta.get("solve_id") == tensors_digest(sorted(tensors.items()))
        if meta.get("run_id") != self.run_id or not intact:
            logger.warning("%s belongs to another run or is damaged; solving again", path)
            return None
        return tensors, json.loads(meta["record"])

    # -- chunks ----------------------------------------------------------------------------------

    def _manifest_entries(self) -> dict[int, list[dict]]:
        if self._candidates is None:
            out: dict[int, list[dict]] = {}
            for mf in sorted(self.path.glob("manifest-rank*.jsonl")):
                for n, line in enumerate(mf.read_bytes().splitlines(), start=1):
                    try:
                        entry = json.loads(line)
                        batch = int(entry["batch"])
                    except (ValueError, KeyError, TypeError):
                        logger.warning("%s line %d is torn or invalid; ignored", mf, n)
                        continue
                    if entry.get("run_id") == self.run_id and entry.get("solve_id") == self.solve_id:
                        out.setdefault(batch, []).append(entry)
            self._candidates = out
        return self._candidates

    def read_chunk(
        self, batch: int, positions: Sequence[int], ids: Sequence[str]
    ) -> dict[str, np.ndarray] | None:
        """The saved score columns of training batch `batch` if a complete, intact chunk holds them."""
        reasons = []
        for entry in reversed(self._manifest_entries().get(batch, [])):
            why = self._check_entry(entry, positions, ids)
            if isinstance(why, dict):
                self.chunks_reused += 1
                return why
            reasons.append(why)
        if reasons:
            logger.warning("chunk of batch %d not reused (%s); recomputing it", batch, "; ".join(reasons))
        return None

    def _check_entry(self, entry: dict, positions: Sequence[int], ids: Sequence[str]) -> dict | str:
        path = self.path / "chunks" / str(entry.get("file", ""))
        if entry.get("rows") != len(positions) or entry.get("ids") != list(ids):
            return f"{path.name}: its manifest lists other pairs"
        try:
            data = path.read_bytes()
        except OSError as err:
            return f"{path.name}: {err.strerror or err}"
        if len(data) != entry.get("bytes"):
            return f"{path.name}: {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated)"
        if sha256_bytes(data) != entry.get("sha256"):
            return f"{path.name}: checksum mismatch (corrupt)"
        try:
            tensors = st_load(data)
        except Exception as err:  # noqa: BLE001 -- a file that passed its checksum but does not parse
            return f"{path.name}: unreadable ({err})"
        pos = tensors.pop("positions", None)
        if pos is None or pos.tolist() != list(positions):
            return f"{path.name}: other positions"
        if any(v.ndim == 0 or v.shape[0] != len(positions) for v in tensors.values()):
            return f"{path.name}: a column of the wrong length"
        return {k: v.numpy() for k, v in tensors.items()}

    def write_chunk(self, batch: int, positions: Sequence[int], ids: Sequence[str],
                    columns: Mapping[str, np.ndarray]) -> None:
        """Save the score rows of training batch `batch`, then record them in this rank's manifest."""
        tensors = {"positions": torch.as_tensor(list(positions), dtype=torch.int64)}
        for k, v in columns.items():
            tensors[k] = torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64))
        data = st_save(tensors)
        name = f"b{batch:07d}.safetensors"
        atomic_write_bytes(self.path / "chunks" / name, data)
        entry = {"batch": batch, "file": name, "rows": len(positions), "bytes": len(data),
                 "sha256": sha256_bytes(data), "ids": list(ids), "run_id": self.run_id,
                 "solve_id": self.solve_id}
        line = (json.dumps(entry) + "\n").encode()
        # One write of the whole line with O_APPEND: a crash leaves at most a torn last line, skipped on read.
        manifest = self.path / f"manifest-rank{distributed.rank()}.jsonl"
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.chunks_written += 1

    def remove(self) -> None:
        """Delete the folder (after the merged file is written)."""
        shutil.rmtree(self.path, ignore_errors=True)


def run_digests(model: nn.Module, train_enc: Sequence, val_enc: Sequence,
                settings: Mapping[str, Any]) -> dict[str, str]:
    """The digests a work folder and the ranks must agree on."""
    return {
        "model weights": model_digest(model),
        "training data": encoded_digest(train_enc),
        "validation data": encoded_digest(val_enc),
        "settings": json_digest(settings),
    }


def sharded_pass(
    batches: PairBatches,
    order: Sequence[int],
    ids: Sequence[str],
    score_batch: Callable[[PairBatches], Mapping[str, np.ndarray]],
    *,
    work: WorkFolder | None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Pass 2 over this rank's contiguous, length-balanced range of `batches`, with chunks; merged rows.

    Batch k of `batches` holds the training pairs order[k·b : (k+1)·b]; it is taken from an intact chunk of
    `work` when there is one, else scored by `score_batch` and saved as a chunk. Every rank then receives
    every rank's rows, so the result is the same everywhere.

    Args:
        batches: all training pairs in pass-2 order (the same on every rank).
        order: order[j] = training-set index of the j-th pair of `batches`.
        ids: training-set ids.
        score_batch: scores one batch: `PairBatches` → name → (rows, ...) arrays.

    Returns:
        name → arrays over all pairs in pass-2 order (what `score_batch(batches)` returns).
    """
    if work is None and not distributed.is_distributed():
        return dict(score_batch(batches))
    ranges = distributed.balanced_ranges(distributed.batch_costs(batches), distributed.world_size())
    mine = ranges[distributed.rank()]
    done: dict[int, Mapping[str, np.ndarray]] = {}
    error: Exception | None = None
    try:
        _score_range(batches, order, ids, score_batch, mine, done, work=work, progress=progress)
    except Exception as e:  # e.g. a non-finite gradient: every rank must learn of it, or the others hang
        if not distributed.is_distributed():
            raise
        error = e
    failure = None if error is None else f"rank {distributed.rank()}: {type(error).__name__}: {error}"
    parts = distributed.all_gather_objects({"done": done, "failure": failure})
    if error is not None:
        raise error
    failed = [p["failure"] for p in parts if p["failure"] is not None]
    if failed:
        raise RuntimeError(f"pass 2 failed on {failed[0]}; no scores are written")
    merged: dict[int, Mapping[str, np.ndarray]] = {}
    for part in parts:
        merged.update(part["done"])
    missing = sorted(set(range(len(batches))) - set(merged))
    if missing:
        raise RuntimeError(f"pass 2: no rank scored batches {missing[:10]}; the shards do not cover the set")
    names = list(merged[0])
    return {name: np.concatenate([merged[k][name] for k in range(len(batches))]) for name in names}


def _score_range(
    batches: PairBatches,
    order: Sequence[int],
    ids: Sequence[str],
    score_batch: Callable[[PairBatches], Mapping[str, np.ndarray]],
    mine: Sequence[int],
    done: dict[int, Mapping[str, np.ndarray]],
    *,
    work: WorkFolder | None,
    progress: bool,
) -> None:
    """Score (or read back from intact chunks) this rank's batches `mine` into `done`."""
    bs, n = batches.batch_size, batches.n_pairs
    for k in tqdm(mine, desc="pass 2: training scores", disable=not progress, leave=False):
        a, b = k * bs, min(n, (k + 1) * bs)
        pos = [int(i) for i in order[a:b]]
        pair_ids = [ids[i] for i in pos]
        cols = None if work is None else work.read_chunk(k, pos, pair_ids)
        if cols is None:
            one = PairBatches(batches.encoded[a:b], batch_size=bs, pad_token_id=batches.pad_token_id,
                              padding_side=batches.padding_side, device=batches.device)
            cols = {name: np.asarray(v) for name, v in score_batch(one).items()}
            if work is not None:
                work.write_chunk(k, pos, pair_ids, cols)
        done[k] = cols
