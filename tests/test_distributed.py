"""Scoring on 2 and 3 gloo ranks equals a single-process run; ranks with different inputs are refused.

The ranks are spawned processes (one torch import each serves every check of the spawn); the reference
is `score_model` in this process, on the same model folders and data files.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from _dist_worker import CURVATURES, DTYPES, logs, make_inputs, score_config, spawn, status, wait_all

from prefprune import distributed
from prefprune._io import output_lock
from prefprune.data import PairBatches
from prefprune.score import ScoreConfig, score_model
from prefprune.scorefile import read_score_table
from prefprune.shards import work_dir_for

SCORED = ("influence", "grad_dot", "grad_cos", "train_loss", "margin")
# Norm-wise relative error allowed against the single-process run (the bound for float32). The
# ranks sum the same per-batch terms in another order; exact's CG, stopped at tol 1e-10, can then take
# another last step, so two float64 runs differ by up to ~κ·tol there.
TOL = {"float64": 1e-9, "float32": 1e-6}
TOL_EXACT64 = 1e-8


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Model folders, data files and single-process reference score files for every (dtype, curvature)."""
    folder = tmp_path_factory.mktemp("dist")
    paths = make_inputs(folder)
    refs = {}
    for dt in DTYPES:
        for curv in CURVATURES:
            out = folder / f"ref-{dt}-{curv}.parquet"
            cfg = ScoreConfig(**score_config(curv, dt))
            score_model(paths[dt], paths["train"], paths["val"], out, config=cfg)
            refs[dt, curv] = read_score_table(out)
    return folder, paths, refs


def test_balanced_ranges_are_contiguous_and_balanced():
    gen = torch.Generator().manual_seed(0)
    for n, parts in [(1, 1), (7, 3), (97, 4), (5, 5), (3, 5), (1000, 8)]:
        costs = (torch.rand(n, generator=gen) * 100 + 1).tolist()
        ranges = distributed.balanced_ranges(costs, parts)
        assert len(ranges) == parts and ranges[0].start == 0 and ranges[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))
        loads = [sum(costs[i] for i in r) for r in ranges]
        # Each boundary sits within one item of its share: no shard exceeds its share by 2 items.
        assert max(loads) <= sum(costs) / parts + 2 * max(costs) + 1e-9, (n, parts, loads)
    with pytest.raises(ValueError, match="parts"):
        distributed.balanced_ranges([1.0], 0)


def test_helpers_are_the_identity_without_a_process_group():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    t = torch.arange(6.0).reshape(3, 2)
    b = PairBatches([], batch_size=2, pad_token_id=0)
    assert distributed.sum_over_ranks(b, t) is t and distributed.cat_over_ranks(b, t) is t
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.agree({"x": "1"})  # no group: nothing to disagree with


def _jobs(folder, paths, world):
    jobs = []
    for dt in DTYPES:
        for curv in CURVATURES:
            out = folder / f"w{world}-{dt}-{curv}.parquet"
            jobs.append({"kind": "score", "model": paths[dt], "train": paths["train"], "val": paths["val"],
                         "output": str(out), "config": score_config(curv, dt),
                         "status": str(out) + ".status"})
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_single_process(inputs, world):
    folder, paths, refs = inputs
    jobs = _jobs(folder, paths, world)
    scored = list(jobs)
    held = contextlib.nullcontext()
    if world == 2:  # and ranks started with different settings: refused on every rank, nothing written
        bad = folder / "mismatch.parquet"
        jobs.append({"kind": "score", "model": paths["float64"], "train": paths["train"], "val": paths["val"],
                     "output": str(bad), "config": score_config("ggn", "float64"),
                     "config_rank": {"1": {"damping": 0.5}}, "status": str(bad) + ".status"})
        # and first, a run into an output whose lock another process (this one) holds: refused on both ranks
        # with the holder's pid, none waits for the other, and the ranks go on in step to the jobs after it
        locked = folder / "locked.parquet"
        jobs.insert(0, {**jobs[-1], "output": str(locked), "config_rank": {},
                        "status": str(locked) + ".status"})
        held = output_lock(work_dir_for(locked), what="prefprune score", is_folder=True)
        # and a pass 2 that fails on rank 1 only: both ranks stop with the error (none hangs in the gather)
        failing = folder / "failing.parquet"
        jobs.append({**jobs[0], "output": str(failing), "fail_rank": 1,
                     "status": str(failing) + ".status"})
    with held:
        if world == 2:
            (work_dir_for(locked) / "chunks").mkdir()
            (work_dir_for(locked) / "chunks" / "b0000000.safetensors").write_bytes(b"the holder's chunk")
        procs = spawn({"jobs": jobs}, folder, world, tag=f"w{world}")
        codes = wait_all(procs, timeout=300)
    assert codes == [0] * world, logs(folder, f"w{world}")
    errors = {}
    for job in scored:
        for r in range(world):
            assert status(job["status"], r) == {"ok": True}, (job["output"], r, status(job["status"], r))
        got = read_score_table(job["output"])
        dt, curv = job["output"].rsplit("/", 1)[1].removesuffix(".parquet").split("-")[1:]
        ref = refs[dt, curv]
        assert got.ids == ref.ids, "row order must be the training-set order"
        for c in SCORED:
            errors[dt, curv, c] = rel_err(got.columns[c], ref.columns[c])
            tol = TOL_EXACT64 if (dt, curv) == ("float64", "exact") else TOL[dt]
            assert errors[dt, curv, c] <= tol, (world, dt, curv, c, errors[dt, curv, c])
        assert not (folder / (job["output"].rsplit("/", 1)[1] + ".shards")).exists()
    if world == 2:
        for r in range(2):
            st = status(str(bad) + ".status", r)
            assert not st["ok"] and "DisagreementError" in st["error"], st
            assert "settings differs on rank(s) [1]" in st["error"], st
        assert not bad.exists() and not (folder / "mismatch.parquet.shards").exists()
        fails = [status(str(failing) + ".status", r) for r in range(2)]
        assert fails[1]["error"].startswith("FloatingPointError: injected"), fails
        assert fails[0]["error"].startswith("RuntimeError: pass 2 failed on rank 1: FloatingPointError"), \
            fails
        assert not failing.exists()
        refusals = [status(str(locked) + ".status", r) for r in range(2)]
        for st in refusals:
            assert not st["ok"] and st["error"].startswith("OutputLocked: "), refusals
            assert f"locked.parquet.shards: output is locked by pid {os.getpid()} " in st["error"], refusals
        assert refusals[0] == refusals[1], refusals
        assert not locked.exists()
        chunk = work_dir_for(locked) / "chunks" / "b0000000.safetensors"
        assert [p.name for p in work_dir_for(locked).rglob("*")] == ["chunks", chunk.name]
        assert chunk.read_bytes() == b"the holder's chunk"
    print(f"world {world}: worst relative error", {k: f"{v:.1e}" for k, v in errors.items() if v > 0})
