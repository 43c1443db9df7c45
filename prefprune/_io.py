"""Files that appear whole or not at all, output-folder locks, checksums, the JSON form of results.

Every file the toolkit writes goes through `atomic_write_bytes` (a temporary sibling, fsync, rename,
fsync of the folder; the temporary is removed on failure), so a crash or a full disk leaves the
previous file or the new one, never half of one. Files that belong together (a score file and its
sidecar) go through `commit_files`: a small journal written after both temporaries are complete is
the commit point, and `recover_commit` rolls an interrupted commit forward (SQLite's and git's way).
`output_lock` keeps two processes out of one output folder.

What a commit promises, as a SQLite transaction or a git commit does: the files of one output are one
unit (a score file, its sidecar and its per-query matrix; a pruned file and its removed ids), all of it
new or all of it previous after a crash at any moment, with no file of the previous unit left beside the
new one; and nothing is written but the files the user named or their documented companions, never over
an input of the same command (`refuse_overlap`) nor over an unrelated file without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "OutputLocked",
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit_files",
    "jsonable",
    "output_lock",
    "package_versions",
    "recover_commit",
    "refuse_overlap",
    "remove_stale_temps",
    "same_file",
    "sha256_bytes",
    "sha256_file",
]

_STAMPED = ("prefprune", "torch", "transformers", "peft", "datasets", "numpy")
_CHUNK = 1 << 16  # bytes per os.write: a kill or a full disk can land between any two
_TMP_TAG = ".tmp-"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data` (the content hash score sidecars carry)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str | None:
    """Hex SHA-256 of a file's bytes, read in blocks; None when it does not exist."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, not only the file's blocks (POSIX: fsync the folder).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a new, fsynced temporary sibling of `path`; nothing is left behind on failure."""
    tmp = _temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view[:_CHUNK])
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _folder_of(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {str(parent)!r} does not exist")
    return parent


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all.

    The bytes go to a temporary sibling (same folder, so the rename cannot cross file systems),
    which is fsynced and renamed over `path`; the folder is fsynced after the rename. A crash or an
    error part-way (a full disk) leaves the previous file untouched and no temporary behind (a
    SIGKILL can leave a hidden ``.NAME.tmp-PID-...`` file, which the next writer under
    `output_lock` removes). The folder must exist.
    """
    path = Path(path)
    folder = _folder_of(path)
    tmp = _write_temp(path, bytes(data))
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """`atomic_write_bytes` of what `write(fh)` writes into a binary buffer."""
    buf = io.BytesIO()
    write(buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text (a lone surrogate is an error naming the file)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{path}: cannot write character {text[e.start]!r} at position {e.start} as UTF-8 "
            "(a lone surrogate: undecodable input bytes that reached the output)"
        ) from None
    return atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# Several files as one unit
# ---------------------------------------------------------------------------------------------


def _journal_of(primary: Path) -> Path:
    return primary.with_name(f".{primary.name}.commit")


def commit_files(files: Sequence[tuple[str | os.PathLike, bytes]],
                 remove: Sequence[str | os.PathLike] = ()) -> None:
    """Replace several files of one folder as one unit: after a crash at any moment (and
    `recover_commit`), either every file is the previous version or every file is the new one.

    Protocol: complete fsynced temporaries of every file, then a journal naming them (written
    atomically: the commit point), then the renames and the removals, then the journal is removed. A
    crash before the journal leaves the previous files (the temporaries are garbage); after it,
    `recover_commit` finishes the renames and removals. The journal is keyed by the first file (the
    primary).

    Args:
        files: (path, bytes) of every file of the new unit; the first is the primary.
        remove: files of the previous unit that the new one has not (a per-query matrix the new run did
            not compute): removed after the commit point, so that no previous file outlives its unit.
    """
    paths = [Path(p) for p, _ in files]
    if not paths:
        return
    folder = _folder_of(paths[0])
    gone = [Path(p) for p in remove]
    if any(p.parent.resolve() != folder.resolve() for p in paths + gone):
        named = [str(p) for p in paths + gone]
        raise ValueError(f"commit_files: all files must share one folder, got {named}")
    recover_commit(paths[0])
    temps: list[Path] = []
    journal = _journal_of(paths[0])
    try:
        for p, data in zip(paths, (d for _, d in files), strict=True):
            temps.append(_write_temp(p, bytes(data)))
        _fsync_dir(folder)
        record = {
            "format": "prefprune.commit/1",
            "pid": os.getpid(),
            "files": [
                {"path": p.name, "temp": t.name, "sha256": sha256_bytes(d)}
                for p, t, d in zip(paths, temps, (d for _, d in files), strict=True)
            ],
            "remove": [p.name for p in gone],
        }
        atomic_write_bytes(journal, json.dumps(record).encode())
    except BaseException:
        for t in temps:
            with contextlib.suppress(OSError):
                os.unlink(t)
        raise
    recover_commit(paths[0])


def recover_commit(primary: str | os.PathLike) -> bool:
    """Finish a `commit_files` of `primary` that a crash interrupted after its commit point.

    Returns True when there was one to finish. Readers call this before reading, so they see the
    previous unit or the new one, never a mix.
    """
    primary = Path(primary)
    journal = _journal_of(primary)
    try:
        raw = journal.read_bytes()
    except FileNotFoundError:
        return False
    try:
        record = json.loads(raw)
        entries = [(e["path"], e["temp"]) for e in record["files"]]
        removed = [str(name) for name in record.get("remove", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"{journal}: unreadable commit journal of {primary.name} (it is written atomically, so "
            "something else wrote it); remove it after checking the files beside it"
        ) from None
    folder = primary.parent
    for name, temp in entries:
        with contextlib.suppress(FileNotFoundError):  # already renamed (or by a concurrent reader)
            os.replace(folder / temp, folder / name)
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    _fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    _fsync_dir(folder)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in `folder` (call it holding `output_lock`)."""
    removed = []
    for tmp in Path(folder).glob(f".*{_TMP_TAG}*"):
        try:
            pid = int(tmp.name.rsplit(_TMP_TAG, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                if tmp.is_dir():  # an `atomic_folder` that never finished
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, last: Sequence[str] = ()) -> Iterator[Path]:
    """Write the files of a folder under a temporary sibling, then move each one into place.

    Every file appears whole (a rename each), files already in `path` that the block did not write
    stay, and the names in `last` (e.g. the metadata that marks the folder complete) move in after
    all others. On an error the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        files = sorted((f for f in tmp.rglob("*") if not f.is_dir()),
                       key=lambda f: (f.relative_to(tmp).as_posix() in last, str(f)))
        for f in files:
            with open(f, "rb+") as fh:  # libraries write without fsync; the rename must not outrun the data
                os.fsync(fh.fileno())
        for f in files:
            dst = path / f.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Output-folder locks
# ---------------------------------------------------------------------------------------------

class OutputLocked(RuntimeError):
    """Another process holds the lock of an output folder."""


_HELD: dict[str, list] = {}  # locked folder → [fd, depth]: re-entry in one process is not a conflict


def _owner_path(folder: Path) -> Path:
    # Beside the locked folder, so that the folder's own listing stays exactly what the command wrote.
    return folder.with_name(f".{folder.name}.lock.owner")


def _holder(folder: Path) -> str:
    try:
        info = json.loads(_owner_path(folder).read_text(encoding="utf-8"))
        return f"pid {info.get('pid')} on {info.get('host')} ({info.get('what')}, since {info.get('since')})"
    except (OSError, ValueError, AttributeError):
        return "another process (its pid is not recorded)"


def _same_inode(fd: int, folder: Path) -> bool:
    try:
        now = os.stat(folder)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, what: str = "prefprune", wait: float | None = None,
                is_folder: bool | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder, or on the folder of an output file.

    The lock is the OS's ``flock`` on the folder itself (no lock file is left anywhere), so it goes away
    with its process, even on SIGKILL. A second process gets `OutputLocked` with the holder's pid,
    host, command and start time (recorded in a hidden ``.NAME.lock.owner`` beside the folder while
    the lock is held); the same process may re-enter. A folder target is created when missing.
    Temporaries left by killed writers are removed once the lock is held.

    Args:
        target: the output folder, or a file path with an extension (then its folder is locked).
        what: what is writing (recorded for the message another process gets).
        wait: seconds to wait for the lock (default: none for a folder, 30 s for a file's folder,
            whose lock is only held while that file is committed).
        is_folder: whether `target` is a folder (None: an existing folder or a name without an extension;
            say True for a folder whose name has a dot, such as ``OUTPUT.shards``).
    """
    import fcntl

    target = Path(target)
    own_folder = is_folder if is_folder is not None else not (target.suffix and not target.is_dir())
    created = False
    if not own_folder:
        folder = _folder_of(target).resolve()
        wait = 30.0 if wait is None else wait
    else:
        created = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        folder = target.resolve()
        wait = 0.0 if wait is None else wait
    key = str(folder)
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield target
        finally:
            held[1] -= 1
        return
    fd = os.open(folder, os.O_RDONLY)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise OutputLocked(
                    f"{target}: output is locked by {_holder(folder)}; wait for it to finish or choose "
                    f"another output (locked folder {folder})"
                ) from None
            time.sleep(0.05)
            continue
        if _same_inode(fd, folder):
            break
        # The holder removed the folder (a finished score run's shards) before letting go: this lock is on
        # a deleted folder that a third process could not see, so lock the one now at the path instead.
        os.close(fd)
        if not own_folder:
            raise FileNotFoundError(f"{target}: folder {str(folder)!r} was removed while waiting for its "
                                    "lock")
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    _HELD[key] = [fd, 1]
    owner = _owner_path(folder)
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only: a read-only parent is fine
            atomic_write_bytes(owner, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
            }).encode())
        remove_stale_temps(folder)
        try:
            yield target
        except BaseException:
            if own_folder and created:  # a run that failed leaves no empty folder it made behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            owner.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Outputs kept apart from inputs
# ---------------------------------------------------------------------------------------------


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same absolute path (symbolic links followed), or, when both
    exist, the same inode (hard links, bind mounts)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overlap(outputs: Mapping[str, str | os.PathLike],
                   inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Raise ValueError when a file a command would write is one it reads, or another file it writes.

    Args:
        outputs: what each written file is (``"--output"``, ``"the sidecar of --output"``) → its path;
            every file of the command's commit unit, so that no part of one output lands on an input.
        inputs: what each read file is (``"--data"``, ``"the sidecar of --scores"``) → its path (None and
            ``""`` entries are skipped): every file of the inputs' commit units, since writing over an
            input's sidecar breaks the input as surely as writing over the input itself.
    """
    named = [(k, Path(v)) for k, v in inputs.items() if v is not None and str(v)]
    outs = [(k, Path(v)) for k, v in outputs.items()]
    for i, (what, target) in enumerate(outs):
        for other, src in named + outs[:i]:
            if same_file(target, src):
                kind = "an input" if (other, src) in named else "another output"
                raise ValueError(
                    f"{what} {str(target)!r} is {other} {str(src)!r} ({kind} of this command); choose "
                    "another path: writing there would destroy it"
                )


# ---------------------------------------------------------------------------------------------
# JSON values and version stamps
# ---------------------------------------------------------------------------------------------


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
    # torch only when loaded: a process that never imported it holds no tensors (keeps this module light)
    torch = sys.modules.get("torch")
    if isinstance(obj, np.ndarray) or (torch is not None and isinstance(obj, torch.Tensor)):
        return jsonable(obj.tolist(), finite=finite)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else obj
    if isinstance(obj, Path):
        return str(obj)
    if torch is not None and isinstance(obj, torch.dtype | torch.device):
        return str(obj).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__} ({obj!r:.80})")
