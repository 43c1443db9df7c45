"""Pass 2 of scoring against a training step on a Pythia-shaped reward model, fp32 and bf16 (issue 10).

Run: `pytest bench/bench_capture.py --benchmark-only -s` (a few minutes on a 2-core CPU). The same
workload as `bench/capture_memory.py` (which a user runs as a plain script, and which measures peak
memory in separate processes): a random-init GPT-NeoX, hidden 1024, 6 layers, LoRA r 16 on
query_key_value and dense, 8 pairs × 512 tokens per batch. Groups: `capture_<precision>` with
`pass2` (`prefprune.influence.scores.stream_scores`) and `train_step` (forward + backward + AdamW on the same
batch, in the same precision through autocast). `test_memory` runs `capture_memory.py` and records
both peaks and their ratio in its `extra_info`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import capture_memory as cm
import pytest
import torch
import torch.nn.functional as F
from _gpu_common import device_name

from prefprune.influence.capture import pair_margins
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.scores import stream_scores
from prefprune.model import trainable_linears
from prefprune.precision import autocast_context

ARGS = ["--hidden", "1024", "--layers", "6", "--heads", "8", "--pairs", "8", "--tokens", "512",
        "--batch", "8", "--targets", "attn"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = 3
_MEDIANS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def setup():
    args = cm._parser().parse_args(ARGS)
    model, batches = cm._setup(args)
    sites = trainable_linears(model)
    p = sum(s.numel for s in sites)
    gen = torch.Generator().manual_seed(1)
    return model, batches, sites, torch.randn(p, generator=gen), torch.randn(p, generator=gen), args


def _record(benchmark, prec: str, case: str, args: argparse.Namespace) -> None:
    _MEDIANS.setdefault(prec, {})[case] = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=device_name("cpu"), torch=torch.__version__, case=case, precision=prec,
        hidden=args.hidden, layers=args.layers, pairs=args.pairs, tokens=args.tokens, lora_r=args.rank,
        targets=cm.TARGETS[args.targets],
    )
    med = _MEDIANS[prec]
    if {"pass2", "train_step"} <= med.keys():
        ratio = med["pass2"] / med["train_step"]
        benchmark.extra_info["pass2_over_train_step"] = ratio
        print(f"\n[bench_capture] {prec}: pass2 {med['pass2']:.3f} s, train step {med['train_step']:.3f} s, "
              f"ratio {ratio:.3f} (target <= 1.1)")


@pytest.mark.parametrize("prec", sorted(DTYPES))
def test_train_step(benchmark, setup, prec):
    benchmark.group = f"capture_{prec}"
    model, batches, sites, _, _, args = setup
    params = [p for s in sites for p in s.parameters()]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        for batch in batches:
            with autocast_context(torch.device("cpu"), DTYPES[prec]):
                margins = pair_margins(model, batch)
            F.softplus(-margins).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    try:
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        model.eval()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    _record(benchmark, prec, "train_step", args)


@pytest.mark.parametrize("prec", sorted(DTYPES))
def test_pass2(benchmark, setup, prec):
    benchmark.group = f"capture_{prec}"
    model, batches, sites, q, g_val, args = setup
    model.eval()
    out = benchmark.pedantic(
        lambda: stream_scores(model, ParameterLayout(sites), batches, q, g_val, impl=None, progress=False,
                              precision=DTYPES[prec]),
        rounds=ROUNDS, iterations=1, warmup_rounds=1,
    )
    assert out["influence"].shape == (args.pairs,)
    _record(benchmark, prec, "pass2", args)


@pytest.mark.parametrize("targets", ["attn", "all"])
def test_memory(benchmark, targets, tmp_path):
    """Peak memory of pass 2 and of a training step, each in its own process (max RSS on CPU)."""
    out = tmp_path / "mem.json"
    script = os.path.join(os.path.dirname(__file__), "capture_memory.py")
    argv = [sys.executable, script, *[a if a != "attn" else targets for a in ARGS], "--repeats", "1",
            "--json", str(out)]
    benchmark.pedantic(lambda: subprocess.run(argv, check=True, capture_output=True), rounds=1, iterations=1)
    rec = json.loads(out.read_text())
    benchmark.extra_info.update(memory_ratio=rec["memory_ratio"], time_ratio=rec["time_ratio"],
                                rows=rec["rows"], machine=rec["machine"])
    print(f"\n[bench_capture] {targets}: pass2 / train-step peak memory {rec['memory_ratio']:.3f} "
          f"(target <= 1.2)")
