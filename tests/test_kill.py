"""Kill tests (issue 15): `prune` and the score writer SIGKILLed at random moments over an existing output.

A forked child runs the real code path (`prune_file`; `write_scores` with its lock, recovery and
commit) with the file-system calls it makes (`os.open`, `os.write`, `os.fsync`, `os.replace`,
`os.unlink`) counted; at the k-th call it writes half of what it was asked to (for a write) and
SIGKILLs itself. k is drawn at random over every call the uninterrupted run makes. Afterwards the
reader must see the previous output and its sidecar intact, or the new pair complete and consistent.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from prefprune.data import PreferenceDataset, PreferencePair, load_preferences
from prefprune.prune import prune_file
from prefprune.scorefile import read_score_table, write_scores

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]

N_KILLS = 24
_CALLS = ("open", "write", "fsync", "replace", "unlink")


def _run_killed_at(k: int | None, fn) -> int:
    """Run `fn` in a forked child that SIGKILLs itself at file-system call number k (None: count only).

    Returns the number of calls the child made (when it was not killed) or -1 (killed).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        count = [0]
        real = {name: getattr(os, name) for name in _CALLS}

        def wrap(name):
            def call(*args, **kwargs):
                count[0] += 1
                if k is not None and count[0] == k:
                    if name == "write":
                        fd, data = args[0], args[1]
                        real["write"](fd, bytes(data[: len(data) // 2]))
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*args, **kwargs)

            return call

        try:
            for name in _CALLS:
                setattr(os, name, wrap(name))
            fn()
            n = count[0]
            for name in _CALLS:
                setattr(os, name, real[name])
            os.write(w, str(n).encode())
            os._exit(0)
        except BaseException:  # noqa: BLE001 -- a child must never return into pytest
            os._exit(3)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 64)
    os.close(r)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    assert os.WEXITSTATUS(status) == 0, "the child failed without being killed"
    return int(out)


def _kill_points(n_calls: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(int(k) for k in rng.choice(np.arange(1, n_calls + 1), size=min(N_KILLS, n_calls),
                                             replace=False))


class _Result:
    def __init__(self, n: int, seed: int, damping: float):
        rng = np.random.default_rng(seed)
        m = rng.normal(size=n)
        self.ids = [f"pair-{i:05d}" for i in range(n)]
        self.columns = {"influence": rng.normal(size=n), "grad_dot": rng.normal(size=n),
                        "grad_cos": rng.uniform(-1, 1, n), "train_loss": np.logaddexp(0, -m), "margin": m}
        self.metadata = {"format": "prefprune.scores/1", "config": {"damping": damping}}


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".commit"))


@pytest.mark.parametrize("ext", [".jsonl"])
def test_score_writer_killed_at_random_moments(tmp_path, ext):
    old, new = _Result(1500, 1, 0.5), _Result(1500, 2, 1.0)

    def fresh(folder):
        folder.mkdir()
        path = folder / f"scores{ext}"
        write_scores(old, path)
        return path

    dry = fresh(tmp_path / "dry")
    n_calls = _run_killed_at(None, lambda: write_scores(new, dry))
    assert n_calls >= N_KILLS, n_calls
    print("score writer: file-system calls of one run:", n_calls)
    seen = {"old": 0, "new": 0}
    for k in _kill_points(n_calls, seed=len(ext)):
        path = fresh(tmp_path / f"k{k}")
        assert _run_killed_at(k, lambda path=path: write_scores(new, path)) == -1
        table = read_score_table(path)  # finishes a commit that passed its commit point
        which = "old" if table.metadata["config"]["damping"] == 0.5 else "new"
        ref = old if which == "old" else new
        assert table.ids == ref.ids, k
        for c, v in ref.columns.items():
            np.testing.assert_array_equal(table.column(c), v, err_msg=f"kill at call {k}: column {c}")
        seen[which] += 1
        write_scores(new, path)  # the next writer cleans what the killed one left
        assert _temps(path.parent) == [], k
    assert seen["old"] and seen["new"], seen  # the kill points straddled the commit point


def test_prune_killed_at_random_moments(tmp_path):
    pairs = [PreferencePair(f"q{i:04d}", f"Question {i}?", f" good {i}", f" bad {i}") for i in range(500)]
    data = tmp_path / "data.jsonl"
    PreferenceDataset(pairs, schema="prompt_chosen_rejected", source="k").save(data)
    ids = load_preferences(data).ids
    scores = tmp_path / "scores.jsonl"
    rng = np.random.default_rng(0)
    scores.write_text("".join(json.dumps({"id": i, "influence": float(v)}) + "\n"
                              for i, v in zip(ids, rng.normal(size=len(ids)), strict=True)))

    def run(folder, fraction):
        return prune_file(data, scores, folder / "pruned.jsonl", method="influence", fraction=fraction)

    def state(folder):
        kept = load_preferences(folder / "pruned.jsonl").ids
        removed = (folder / "pruned.jsonl.removed.txt").read_text().split("\n")[:-1]
        return kept, removed

    ref = {}
    for name, fraction in (("old", 0.3), ("new", 0.1)):
        (tmp_path / name).mkdir()
        run(tmp_path / name, fraction)
        ref[name] = state(tmp_path / name)
    dry = tmp_path / "dry"
    dry.mkdir()
    run(dry, 0.3)
    n_calls = _run_killed_at(None, lambda: run(dry, 0.1))
    assert n_calls >= N_KILLS, n_calls
    print("prune: file-system calls of one run:", n_calls)
    seen = {"old": 0, "new": 0}
    for k in _kill_points(n_calls, seed=7):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        run(folder, 0.3)
        assert _run_killed_at(k, lambda folder=folder: run(folder, 0.1)) == -1
        kept, removed = state(folder)  # the loader finishes a commit that passed its commit point
        which = "old" if (kept, removed) == ref["old"] else "new"
        assert (kept, removed) == ref[which], f"kill at call {k}: a mix of two runs"
        assert sorted(kept + removed) == sorted(ids)
        seen[which] += 1
        run(folder, 0.1)
        assert _temps(folder) == [], k
    assert seen["old"] and seen["new"], seen
