"""Peak memory and time of scoring pass 2 against a training step on the same batches (issue 10).

Each measurement runs in its own process, so that peaks do not mix:

- ``base``: imports, the random-init reward model, the encoded pairs; no step (the batch-independent base);
- ``train``: that, plus training steps (forward + backward + AdamW) over every batch;
- ``pass2``: that, plus `prefprune.influence.scores.stream_scores` (pass 2 of scoring: one forward +
  backward per
  batch, every score column) over the same batches.

CPU: the peak is the process's max RSS (``ru_maxrss``) minus the ``base`` process's; CUDA:
``torch.cuda.max_memory_allocated`` after the setup is subtracted the same way. One round over every
batch counts for the peak. Time: a fourth process builds both and alternates them, ``--repeats``
rounds each after one warm-up, and reports the medians (interleaving spreads the load of other jobs
over both alike). The training step runs in the same precision (autocast) as pass 2.

Run (prints one table and, with ``--json``, writes the rows)::

    python bench/capture_memory.py                           # Pythia-shaped: hidden 1024, 6 layers
    python bench/capture_memory.py --hidden 256 --layers 4 --pairs 16 --targets all   # the issue's probe
    python bench/capture_memory.py --precision bf16

Model: a random-init GPT-NeoX (no hub), LoRA r 16 on ``--targets`` (``qkv``: query_key_value; ``attn``:
query_key_value,dense; ``all``: every linear layer), float32 parameters; pairs of ``--tokens`` byte
tokens per sequence (the tiny byte-level tokenizer), ``--batch`` pairs per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

TARGETS = {
    "qkv": ["query_key_value"],
    "attn": ["query_key_value", "dense"],
    "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--pairs", type=int, default=8, help="pairs in total (batches = pairs / batch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens per sequence (about)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", choices=sorted(TARGETS), default="attn")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of each (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--mode", choices=["base", "train", "pass2", "time"], default=None, help=argparse.SUPPRESS)
    return p


def _setup(args: argparse.Namespace):
    # torch and prefprune are imported in the functions the measured child runs: the parent only
    # launches the children and reads their numbers.
    import torch

    from prefprune.data import PairBatches, PreferencePair, encode_pairs
    from prefprune.model import LoRASettings, build_reward_model
    from prefprune.testing import tiny_config, tiny_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = tiny_config(
        "gpt_neox", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=max(2048, 2 * args.tokens),
    )
    tok = tiny_tokenizer(model_max_length=4 * args.tokens)
    model, _ = build_reward_model(
        cfg, tokenizer=tok, seed=0, lora=LoRASettings(r=args.rank, alpha=2.0 * args.rank,
                                                      target_modules=TARGETS[args.targets]),
    )
    model.to(args.device)
    rng = random.Random(0)
    text = lambda k: "".join(rng.choice("etaoin shrdlu") for _ in range(k))
    prompt_len = args.tokens * 3 // 4
    pairs = []
    for i in range(args.pairs):
        resp = args.tokens - prompt_len - 2 - rng.randrange(0, 8)
        pairs.append(PreferencePair(f"p{i}", text(prompt_len), text(resp), text(resp + rng.randrange(-4, 5))))
    enc = encode_pairs(pairs, tok, max_length=4 * args.tokens)
    batches = PairBatches(enc, batch_size=args.batch, pad_token_id=tok.pad_token_id, device=args.device)
    return model, batches


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rounds(args: argparse.Namespace, model, batches) -> dict:
    """name -> one round over every batch: ``train`` (forward + backward + AdamW) and ``pass2``."""
    import torch
    import torch.nn.functional as F

    from prefprune.influence.capture import pair_margins
    from prefprune.influence.layout import ParameterLayout
    from prefprune.influence.scores import stream_scores
    from prefprune.model import trainable_linears
    from prefprune.precision import autocast_context

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    device = torch.device(args.device)
    sites = trainable_linears(model)
    params = [p for s in sites for p in s.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(s.numel for s in sites), generator=gen).to(device)
    g_val = torch.randn(q.numel(), generator=gen).to(device)

    def train() -> None:
        model.train()
        for batch in batches:
            with autocast_context(device, dtype):  # the training step in the same precision
                margins = pair_margins(model, batch)
            F.softplus(-margins.float()).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def pass2() -> None:
        model.eval()
        stream_scores(model, ParameterLayout(sites), batches, q, g_val, impl=None, progress=False,
                      precision=dtype)

    return {"train": train, "pass2": pass2}


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _child(args: argparse.Namespace) -> dict:
    import torch

    model, batches = _setup(args)
    cuda = args.device.startswith("cuda")
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.mode == "time":
        # Both in one process, rounds interleaved, so that load from other jobs hits both alike.
        rounds = _rounds(args, model, batches)
        for fn in rounds.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in rounds}
        for _ in range(args.repeats):
            for name, fn in rounds.items():
                times[name].append(_timed(fn, args.device))
        return {"mode": "time", **{name: statistics.median(ts) for name, ts in times.items()},
                "all": times}
    if args.mode != "base":
        _rounds(args, model, batches)[args.mode]()  # one round: its peak is the one that counts
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = (torch.cuda.max_memory_allocated() - base_alloc) if cuda else rss_kib * 1024
    return {"mode": args.mode, "peak_bytes": peak, "batches": len(batches)}


def _run_child(args: argparse.Namespace, mode: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--mode", mode]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode is not None:
        print(json.dumps(_child(args)))
        return 0
    import torch

    rows = {m: _run_child(args, m) for m in ("base", "train", "pass2", "time")}
    cuda = args.device.startswith("cuda")
    base = 0 if cuda else rows["base"]["peak_bytes"]
    train_mb = (rows["train"]["peak_bytes"] - base) / 2**20
    pass2_mb = (rows["pass2"]["peak_bytes"] - base) / 2**20
    from _gpu_common import device_name  # beside this script; imports torch

    machine = device_name(args.device)
    print(f"# {machine}, torch {torch.__version__}; hidden {args.hidden}, {args.layers} layers, "
          f"LoRA r {args.rank} on {','.join(TARGETS[args.targets])}, {args.pairs} pairs x {args.tokens} "
          f"tokens, batch {args.batch}, precision {args.precision}")
    print(f"base peak {'(cuda: setup subtracted)' if cuda else f'{base / 2**20:.1f} MiB'}")
    times = rows["time"]
    print(f"train step : peak +{train_mb:8.1f} MiB   {times['train']:.3f} s / round (median)")
    print(f"pass 2     : peak +{pass2_mb:8.1f} MiB   {times['pass2']:.3f} s / round (median)")
    ratio_mem = pass2_mb / train_mb if train_mb > 0 else float("nan")
    ratio_time = times["pass2"] / times["train"]
    print(f"pass2 / train: memory {ratio_mem:.3f}x, time {ratio_time:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "mode"}, "machine": machine,
                       "torch": torch.__version__, "rows": rows, "memory_ratio": ratio_mem,
                       "time_ratio": ratio_time}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
