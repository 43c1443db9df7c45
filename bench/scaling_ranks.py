"""Scaling of sharded scoring on CPU: N gloo ranks with one thread each vs one rank with one thread.

    python bench/scaling_ranks.py [--ranks 2] [--pairs 192] [--hidden 64] [--curvature ggn] [--json out.json]

Every rank builds the same seeded tiny GPT-NeoX LoRA reward model and the same random pairs, then times
`score_pairs` (pass 1, solve, pass 2, merge) after a barrier; the time of a run is its slowest rank's.
The single-rank run is the same script with ``--ranks 1``, run first in the same invocation. Ideal
ratio = the number of ranks; the solve is replicated on every rank, so it does not shrink.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def _pairs(n: int, seed: int, prefix: str):
    from prefprune.data import PreferencePair

    rng = random.Random(seed)

    def text(k: int) -> str:
        words = ["cat", "dog", "sun", "tree", "car", "rain", "book", "milk"]
        return " ".join(rng.choice(words) for _ in range(k))

    return [PreferencePair(id=f"{prefix}{i}", prompt=text(rng.randrange(8, 40)),
                           chosen=text(rng.randrange(3, 12)), rejected=text(rng.randrange(3, 12)))
            for i in range(n)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from prefprune.model import LoRASettings, build_reward_model
    from prefprune.score import ScoreConfig, score_pairs
    from prefprune.testing import tiny_config, tiny_tokenizer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = tiny_config("gpt_neox", hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    model, tok = build_reward_model(cfg, tokenizer=tiny_tokenizer(), lora=LoRASettings(r=8, alpha=8.0),
                                    seed=0, dtype=torch.float32)
    train, val = _pairs(args.pairs, 1, "t"), _pairs(max(16, args.pairs // 4), 2, "v")
    config = ScoreConfig(curvature=args.curvature, batch_size=8, progress=False, impl="reference")
    score_pairs(model, tok, train[:16], val[:16], config=config)  # warm-up
    if world > 1:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    res = score_pairs(model, tok, train, val, config=config)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if world > 1:
        out = [None] * world
        dist.all_gather_object(out, (seconds, cpu))
        dist.destroy_process_group()
    else:
        out = [(seconds, cpu)]
    if int(os.environ.get("RANK", "0")) == 0:
        # CPU seconds per rank tell a shared machine's contention from the sharding's own overhead.
        Path(args.result).write_text(json.dumps({"seconds": max(w for w, _ in out), "per_rank": out,
                                                 "n": len(res), "timings": res.metadata["timings_s"]}))


def run(ranks: int, args) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = Path(args.json or "scaling_ranks.json").with_suffix(f".w{ranks}.tmp")
    procs = []
    for r in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        if ranks > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--worker", "--result", str(result), "--pairs", str(args.pairs),
               "--hidden", str(args.hidden), "--curvature", args.curvature]
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a rank of the {ranks}-rank run failed")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--curvature", default="ggn")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    one = run(1, args)
    many = run(args.ranks, args)
    report = {"ranks": args.ranks, "pairs": args.pairs, "hidden": args.hidden, "curvature": args.curvature,
              "one_rank_s": one["seconds"], "many_ranks_s": many["seconds"],
              "speedup": one["seconds"] / many["seconds"],
              "one_rank_wall_cpu_s": one["per_rank"][0], "one_rank_timings": one["timings"],
              "many_ranks_wall_cpu_s": many["per_rank"],
              "many_ranks_timings_rank0": many["timings"], "torch": torch.__version__, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
