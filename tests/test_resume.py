"""Killed runs resume: scoring from its chunks and saved solve (one process or one rank of two killed),
corrupt or truncated chunks recomputed, changed inputs refused; training from its checkpoint, bitwise.

The reference of every check is an uninterrupted run on the same inputs in this process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from _dist_worker import free_port, logs, make_inputs, score_config, spawn, status, train_setup, wait_all

from prefprune.influence import scorer as scorer_module
from prefprune.score import ScoreConfig, score_model
from prefprune.scorefile import read_score_table
from prefprune.shards import ResumeMismatchError, work_dir_for
from prefprune.train import train_reward_model

SCORED = ("influence", "grad_dot", "grad_cos", "train_loss", "margin", "truncated")
N_BATCHES = 5  # 13 training pairs in batches of 3
RNG = random.Random(20261201)  # the kill points: random, but the same on every run of the suite


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    paths = make_inputs(folder)
    ref = folder / "ref.parquet"
    cfg = ScoreConfig(**score_config("ggn", "float64"))
    score_model(paths["float64"], paths["train"], paths["val"], ref, config=cfg)
    return folder, paths, read_score_table(ref)


def _same_rows(out, ref) -> None:
    got = read_score_table(out)
    assert got.ids == ref.ids and len(set(got.ids)) == len(got.ids), "each pair exactly once, in order"
    for c in SCORED:
        np.testing.assert_allclose(got.columns[c], ref.columns[c], rtol=1e-9, atol=1e-12, err_msg=c)


def _job(paths, out, **extra) -> dict:
    return {"kind": "score", "model": paths["float64"], "train": paths["train"], "val": paths["val"],
            "output": str(out), "config": score_config("ggn", "float64"), "status": str(out) + ".status",
            **extra}


def _chunks(out) -> list[str]:
    return sorted(p.name for p in (work_dir_for(out) / "chunks").glob("*.safetensors"))


@pytest.mark.slow
def test_sigkill_one_process_then_resume_on_two_ranks_with_torchrun(inputs):
    """SIGKILL a single-process run at a random batch; `torchrun -m prefprune score --resume` on 2 ranks."""
    folder, paths, ref = inputs
    out = folder / "killed1.parquet"
    k = RNG.randrange(1, N_BATCHES)
    codes = wait_all(spawn({"jobs": [_job(paths, out, kill_rank=0, kill_after=k)]}, folder, 1, tag="kill1"))
    assert codes == [-9], logs(folder, "kill1")
    assert not out.exists() and len(_chunks(out)) == k and (work_dir_for(out) / "solve.safetensors").exists()

    cfg = score_config("ggn", "float64")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "prefprune", "score", "--model", paths["float64"],
           "--train", paths["train"], "--val", paths["val"], "--output", str(out), "--curvature", "ggn",
           "--damping", "1.0",
           "--batch-size", str(cfg["batch_size"]), "--impl", "reference", "--tol", str(cfg["tol"]),
           "--max-iter", str(cfg["max_iter"]), "--no-progress", "--resume", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _same_rows(out, ref)
    side = json.loads((folder / "killed1.parquet.json").read_text())
    # Re-sharded (1 -> 2 ranks): the solve was reused, not redone; the finished chunks were reused.
    assert side["resume"]["solve_reused"] is True and side["distributed"]["world_size"] == 2
    assert not work_dir_for(out).exists()


@pytest.mark.slow
def test_one_rank_of_two_killed_then_resume(inputs):
    folder, paths, ref = inputs
    out = folder / "killed2.parquet"
    k = RNG.randrange(1, 3)  # rank 1 holds 2-3 of the 5 batches
    spec = {"jobs": [_job(paths, out, kill_rank=1, kill_after=k)], "timeout_s": 20}
    procs = spawn(spec, folder, 2, tag="kill2")
    assert procs[1].wait(timeout=600) == -9, logs(folder, "kill2")
    procs[0].kill()  # what torchrun does to the other ranks when one dies
    procs[0].wait(timeout=60)
    assert not out.exists() and len(_chunks(out)) >= k

    resumed = _job(paths, out, config={**score_config("ggn", "float64"), "resume": True})
    assert wait_all(spawn({"jobs": [resumed]}, folder, 2, tag="resume2")) == [0, 0], logs(folder, "resume2")
    assert status(resumed["status"], 0) == {"ok": True}, status(resumed["status"], 0)
    _same_rows(out, ref)
    side = json.loads((folder / "killed2.parquet.json").read_text())
    assert side["resume"]["solve_reused"] is True


def _crash_after(monkeypatch, calls: int) -> None:
    real, seen = scorer_module.stream_scores, [0]

    def crashing(*args, **kwargs):
        if seen[0] >= calls:
            raise KeyboardInterrupt("simulated crash")
        seen[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer_module, "stream_scores", crashing)


def test_corrupt_truncated_and_torn_chunks_are_recomputed(inputs, monkeypatch, caplog):
    folder, paths, ref = inputs
    out = folder / "corrupt.parquet"
    cfg = score_config("ggn", "float64")
    with monkeypatch.context() as m:
        _crash_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            score_model(paths["float64"], paths["train"], paths["val"], out, config=ScoreConfig(**cfg))
    names = _chunks(out)
    assert len(names) == 4
    chunk_dir = work_dir_for(out) / "chunks"
    flipped = bytearray((chunk_dir / names[1]).read_bytes())
    flipped[-3] ^= 0xFF
    (chunk_dir / names[1]).write_bytes(bytes(flipped))  # same size, wrong checksum
    data = (chunk_dir / names[2]).read_bytes()
    (chunk_dir / names[2]).write_bytes(data[: len(data) // 2])  # truncated
    with open(work_dir_for(out) / "manifest-rank0.jsonl", "ab") as fh:
        fh.write(b'{"batch": 4, "file": "b0000004.safet')  # a torn last line
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        res = score_model(paths["float64"], paths["train"], paths["val"], out,
                          config=ScoreConfig(**cfg, resume=True))
    text = caplog.text
    assert "checksum mismatch" in text and "truncated" in text and "torn" in text, text
    assert res.metadata["resume"] == {"solve_reused": True, "chunks_reused": 2, "chunks_computed": 3}
    _same_rows(out, ref)


def test_resume_refuses_changed_inputs_and_needs_the_flag(inputs, monkeypatch):
    folder, paths, _ = inputs
    out = folder / "changed.parquet"
    cfg = score_config("ggn", "float64")
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            score_model(paths["float64"], paths["train"], paths["val"], out, config=ScoreConfig(**cfg))
    with pytest.raises(ResumeMismatchError, match=r"settings changed .*damping: 1\.0 -> 0\.5"):
        score_model(paths["float64"], paths["train"], paths["val"], out,
                    config=ScoreConfig(**{**cfg, "damping": 0.5}, resume=True))
    with pytest.raises(ResumeMismatchError, match="model weights"):
        score_model(paths["float32"], paths["train"], paths["val"], out,
                    config=ScoreConfig(**cfg, resume=True))
    with pytest.raises(ResumeMismatchError, match="training data changed"):
        score_model(paths["float64"], paths["val"], paths["val"], out, config=ScoreConfig(**cfg, resume=True))
    with pytest.raises(ResumeMismatchError, match="pass --resume"):
        score_model(paths["float64"], paths["train"], paths["val"], out, config=ScoreConfig(**cfg))
    assert not out.exists() and len(_chunks(out)) == 2  # refused runs write nothing


@pytest.fixture
def one_thread():
    """The child trains with one thread; so must this process, for bitwise equal float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_training_killed_and_resumed_ends_with_identical_weights(tmp_path, one_thread):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    model, tok, data, held, cfg = train_setup(full_dir)
    full = train_reward_model(model, tok, data, config=cfg, eval_data=held, output_dir=full_dir)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    k = RNG.randrange(3, full["steps"] - 1)  # a step that is not the last; checkpoints every 2 steps
    job = {"kind": "train", "output": str(cut_dir), "kill_after": k, "status": str(tmp_path / "train.status")}
    assert wait_all(spawn({"jobs": [job]}, tmp_path, 1, tag="train")) == [-9], logs(tmp_path, "train")
    assert (cut_dir / "checkpoint.pt").exists() and not (cut_dir / "metrics.json").exists()

    model2, tok2, data2, held2, cfg2 = train_setup(cut_dir, resume=True)
    got = train_reward_model(model2, tok2, data2, config=cfg2, eval_data=held2, output_dir=cut_dir)
    for n, p in model2.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), want[n]), (n, k)
    assert got["history"] == full["history"] and got["eval_history"] == full["eval_history"]
    assert got["train_loss"] == full["train_loss"]

    _, _, _, _, bad = train_setup(cut_dir, resume=True, lr=5e-3)
    with pytest.raises(ValueError, match=r"settings \(lr: 0\.01 -> 0\.005\)"):
        train_reward_model(model2, tok2, data2, config=bad, eval_data=held2, output_dir=cut_dir)
