"""A child process for the distributed and resume tests: ``python tests/_dist_worker.py SPEC.json``.

The spec lists jobs run one after the other in this process (so one torch import serves many checks):
``score`` jobs call `prefprune.score.score_model` under a gloo process group the worker initialised itself
(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the environment; none for a single process), ``train`` jobs
call `train_reward_model`. A job may SIGKILL this process after a given number of scored batches (or
optimiser steps) to simulate a crash. Each job writes ``<status>.rank<r>.json`` with ``ok`` or ``error``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _pairs import easy_pairs

from prefprune.model import build_reward_model
from prefprune.testing import tiny_config, tiny_tokenizer


def train_setup(out: str | os.PathLike, **overrides):
    """The training run of the resume test: a tiny GPT-NeoX with dropout (so RNG states matter)."""
    from prefprune.train import TrainConfig

    model, tok = build_reward_model(tiny_config("gpt_neox", hidden_dropout=0.1, attention_dropout=0.1),
                                    tokenizer=tiny_tokenizer(), seed=3, dtype=torch.float32)
    cfg = dict(epochs=3, batch_size=4, grad_accum=2, lr=1e-2, max_length=48, progress=False, warmup_ratio=0.2,
               checkpoint_every=2, schedule="cosine", eval_batch_size=8)
    cfg.update(overrides)
    return model, tok, easy_pairs(23, seed=4), easy_pairs(8, seed=5, prefix="h"), TrainConfig(**cfg)


def _kill_after(module, name: str, calls: int) -> None:
    """Replace module.name by a wrapper that SIGKILLs this process on call number `calls` + 1."""
    real, seen = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        if seen[0] >= calls:
            os.kill(os.getpid(), signal.SIGKILL)
        seen[0] += 1
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def run_score(job: dict, rank: int) -> None:
    from prefprune.influence import scorer
    from prefprune.score import ScoreConfig, score_model

    if job.get("kill_rank") == rank:
        _kill_after(scorer, "stream_scores", int(job["kill_after"]))
    real = scorer.stream_scores
    if job.get("fail_rank") == rank:  # pass 2 fails on this rank only (as a NaN gradient would)
        def fail(*args, **kwargs):
            raise FloatingPointError("injected: non-finite gradient for pair 'x'")

        scorer.stream_scores = fail
    cfg = ScoreConfig(**{**job["config"], **job.get("config_rank", {}).get(str(rank), {})})
    try:
        score_model(job["model"], job["train"], job["val"], job["output"], config=cfg)
    finally:
        scorer.stream_scores = real


def run_train(job: dict, rank: int) -> None:
    from prefprune import train

    model, tok, data, held, cfg = train_setup(job["output"], **job.get("config", {}))
    if job.get("kill_after") is not None:
        # The scheduler asks lr_factor(k) (once per parameter group) right after optimiser step k: dying
        # there loses step k's progress since the last checkpoint.
        real, k = train.lr_factor, int(job["kill_after"])

        def dying(step, **kwargs):
            if step >= k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(step, **kwargs)

        train.lr_factor = dying
    train.train_reward_model(model, tok, data, config=cfg, eval_data=held, output_dir=job["output"])


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(spec.get("timeout_s", 60))))
    rank = dist.get_rank() if world > 1 else 0
    for job in spec["jobs"]:
        status: dict = {"ok": True}
        try:
            (run_score if job["kind"] == "score" else run_train)(job, rank)
        except Exception as err:  # noqa: BLE001 -- the test reads the message
            status = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        Path(f"{job['status']}.rank{rank}.json").write_text(json.dumps(status))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# Used by the tests (not by the child): inputs on disk, spawning ranks, reading results
# ---------------------------------------------------------------------------------------------

WORKER = Path(__file__).resolve()
CURVATURES = ("exact", "ggn", "identity")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def score_config(curvature: str, dtype: str) -> dict:
    """Settings of the distributed checks: 5 training batches, 3 validation batches (enough for 3 ranks)."""
    return dict(curvature=curvature, damping=5.0 if curvature == "exact" else 1.0, batch_size=3,
                impl="reference", progress=False, tol=1e-10 if dtype == "float64" else 1e-6, max_iter=200)


def make_inputs(folder: Path) -> dict:
    """A float64 and a float32 tiny reward model folder, 13 training and 7 validation pairs as JSON lines."""
    from _scoring_helpers import make_pairs, tiny_model, tokenizer

    from prefprune.data import PreferenceDataset
    from prefprune.model import save_reward_model

    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl")}
    PreferenceDataset(make_pairs(13, seed=11, prefix="t"), schema="prompt_chosen_rejected").save(out["train"])
    PreferenceDataset(make_pairs(7, seed=12, prefix="v"), schema="prompt_chosen_rejected").save(out["val"])
    for name, dtype in DTYPES.items():
        save_reward_model(tiny_model("gpt_neox", dtype=dtype, seed=5), tokenizer(), folder / f"rm-{name}")
        out[name] = str(folder / f"rm-{name}")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(spec: dict, folder: Path, world: int, *, tag: str = "run"):
    """Start `world` worker processes on `spec` (gloo ranks when world > 1); returns the Popen objects."""
    import subprocess

    spec_path = folder / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        path = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=path)
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        log = open(folder / f"{tag}.rank{r}.log", "wb")  # noqa: SIM115 -- closed with the process
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, timeout: float = 600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def logs(folder: Path, tag: str) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                     for p in sorted(folder.glob(f"{tag}.rank*.log")))


def status(path: str, rank: int) -> dict:
    return json.loads(Path(f"{path}.rank{rank}.json").read_text())
