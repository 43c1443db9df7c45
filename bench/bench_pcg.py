"""`exact` influence by plain CG and by Gauss–Newton-preconditioned CG (pcg) against the floor (issue 22).

Every measurement runs in its own process, so that max RSS (``ru_maxrss``) is that run's peak alone:

- ``train`` (not measured): the pretrained MiniLM with LoRA on query/value of every layer, trained with the
  Bradley–Terry loss on the training pairs and saved, so that every measured process loads the same model;
- ``floor``: load it, then one forward + backward of the mean loss over the training pairs (DESIGN §3's
  lower bound on scoring time);
- ``cg@λ`` / ``pcg@λ``: load it, then the whole `exact` scoring run (`prefprune.score.score_pairs`: pass 1,
  the solve, pass 2) with ``solver`` fixed, one damping value per process;
- ``identity`` / ``ggn`` (with ``--baselines``): the whole scoring run with that curvature (ggn: the direct
  solve at the first damping value).

Seconds are the measured phase's process CPU time (one torch thread: ``torch.set_num_threads(1)``; pin the
whole run with ``taskset -c 1`` so CPU time and wall time agree); the model load is not counted in any of
them. Passes: passes over the curvature sample (pcg: 1 Gauss–Newton pass + one batched HVP pass per
iteration). Memory: the max RSS of the process against the floor process's. With ``--repeats N`` every run
is made N times, interleaved (floor, runs, floor, runs, ...), and the table gives the medians.

Run::

    HF_HUB_OFFLINE=1 taskset -c 1 python bench/bench_pcg.py --train-pairs 64 --val-pairs 16 --max-length 128
    HF_HUB_OFFLINE=1 taskset -c 1 python bench/bench_pcg.py --train-pairs 16 --val-pairs 8 --max-length 64
    # peak memory of identity, ggn and exact against the floor (issue 22), three interleaved rounds:
    HF_HUB_OFFLINE=1 python bench/bench_pcg.py --baselines --dampings 1 --max-iter 3 --repeats 3

Data: the first pairs of ``--data`` (HH-RLHF harmless-base test split by default): ``--train-pairs`` for
training and scoring, the next ``--val-pairs`` for validation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
DAMPINGS = (1.0, 0.1, 0.01)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--train-pairs", type=int, default=64)
    p.add_argument("--val-pairs", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="training epochs before scoring")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--dampings", type=float, nargs="+", default=list(DAMPINGS))
    p.add_argument("--solvers", nargs="+", default=["cg", "pcg"], choices=["cg", "pcg"])
    p.add_argument("--baselines", action="store_true", help="also run identity and ggn (issue 22's memory)")
    p.add_argument("--hessian-samples", type=int, default=None,
                   help="score.hessian_samples: the curvature set's size (default: every training pair)")
    p.add_argument("--hvp-batch-size", type=int, default=None,
                   help="exact: pairs per double-backward chunk (default: the library's, batch_size // 4)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every run, interleaved; medians shown")
    p.add_argument("--model-dir", default=None,
                   help="a trained model folder to reuse (skips training), or where to train one if missing")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    return p


def _data(args, tok):
    """The first pairs of the file that fit max_length whole (no prompt cut: validation pairs must fit, and
    the same rule for training keeps every run on the same tokens)."""
    from prefprune.data import encode_pairs
    from prefprune.data.loading import load_preferences

    need = args.train_pairs + args.val_pairs
    fit = []
    for pair in load_preferences(args.data, max_pairs=40 * need, skip_bad=True):
        try:
            ok = not encode_pairs([pair], tok, max_length=args.max_length, truncation="error")[0].truncated
        except ValueError:
            ok = False
        if ok:
            fit.append(pair)
        if len(fit) == need:
            break
    if len(fit) < need:
        raise ValueError(f"only {len(fit)} pairs of {args.data} fit max_length={args.max_length}, "
                         f"need {need}")
    return fit[: args.train_pairs], fit[args.train_pairs :]


def _train(args) -> None:
    import torch

    from prefprune.model import LoRASettings, ModelConfig, build_model, save_reward_model
    from prefprune.train import TrainConfig, train_reward_model

    torch.set_num_threads(1)
    lora = LoRASettings(r=args.rank, alpha=2.0 * args.rank, target_modules=["query", "value"])
    model, tok = build_model(ModelConfig(model="minilm", lora=lora), seed=0)
    train, _ = _data(args, tok)
    metrics = train_reward_model(model, tok, train, config=TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, lr=2e-3, progress=False,
        seed=0))
    save_reward_model(model, tok, args.model_dir)
    print(json.dumps({"train_loss": metrics["train_loss"], "train_accuracy": metrics["train_accuracy"]}))


def _load(args):
    import torch

    from prefprune.model import load_reward_model

    torch.set_num_threads(1)
    model, tok = load_reward_model(args.model_dir)
    model.eval()
    return model, tok


def _floor(args) -> dict:
    """One forward + backward of the mean training loss over the training pairs, batch by batch."""
    import torch
    import torch.nn.functional as F

    from prefprune.data import PairBatches, encode_pairs, length_order
    from prefprune.influence.capture import pair_margins

    model, tok = _load(args)
    train, _ = _data(args, tok)
    enc = encode_pairs(train, tok, max_length=args.max_length)
    enc = [enc[i] for i in length_order(enc)]
    batches = PairBatches(enc, batch_size=args.batch_size, pad_token_id=tok.pad_token_id,
                          padding_side="right")
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.process_time()
    for batch in batches:
        loss = F.softplus(-pair_margins(model, batch)).sum() / len(enc)
        torch.autograd.grad(loss, params)
    return {"seconds": time.process_time() - t0}


def _score(args, curvature: str, solver: str, damping: float) -> dict:
    from prefprune.score import ScoreConfig, score_pairs

    model, tok = _load(args)
    train, val = _data(args, tok)
    chunk = {} if args.hvp_batch_size is None else {"hvp_batch_size": args.hvp_batch_size}
    hessian = {} if curvature == "identity" else {"hessian_samples": args.hessian_samples}
    cfg = ScoreConfig(curvature=curvature, damping=damping, solver=solver, tol=args.tol,
                      max_iter=args.max_iter, batch_size=args.batch_size, max_length=args.max_length,
                      progress=False, on_nonpositive="nan", **hessian, **chunk)
    t0 = time.process_time()
    res = score_pairs(model, tok, train, val, config=cfg)
    seconds = time.process_time() - t0
    info = res.metadata["solve"]
    return {"seconds": seconds, "iterations": info["iterations"], "passes": info["curvature_passes"],
            "status": info["status"], "residual": info["residual"], "method": info["method"],
            "preconditioner": info["preconditioner"], "solve_seconds": info["seconds"],
            "hvp_batch_size": info.get("hvp_batch_size"), "n_curvature": info["n_curvature"],
            "timings": res.metadata["timings_s"]}


def _child(args) -> None:
    mode = args.mode
    if mode == "train":
        _train(args)
        return
    if mode == "floor":
        out = _floor(args)
    elif mode in ("identity", "ggn"):
        out = _score(args, mode, "auto", args.dampings[0])
    else:
        solver, damping = mode.split("@")
        out = _score(args, "exact", solver, float(damping))
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _run_child(argv: list[str], mode: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {"stdout": proc.stdout[-2000:]}


def main() -> None:
    args = _parser().parse_args()
    if args.mode is not None:
        _child(args)
        return
    scratch = tempfile.mkdtemp(prefix="bench_pcg_")  # the trained model, unless --model-dir names a folder
    try:
        _bench(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bench(args, scratch: str) -> None:
    base = list(sys.argv[1:])
    if args.model_dir is None or not os.path.exists(args.model_dir):  # train (into --model-dir when named)
        if args.model_dir is None:
            args.model_dir = os.path.join(scratch, "model")
            base += ["--model-dir", args.model_dir]
        t0 = time.perf_counter()
        print("training:", _run_child(base, "train") or "", f"({time.perf_counter() - t0:.0f} s)", flush=True)
    import torch

    modes = ["floor", *(["identity", "ggn"] if args.baselines else []),
             *(f"{solver}@{lam!r}" for lam in args.dampings for solver in args.solvers)]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved rounds: load from other jobs hits every run alike
        for mode in modes:
            runs[mode].append(_run_child(base, mode))
    rows = [{"run": m.replace("@", "@λ=") if "@" in m else m, **_median(runs[m])} for m in modes]
    floor = rows[0]
    for row in rows:
        print(f"{row['run']}: {row['seconds']:.1f} s ({row['seconds'] / floor['seconds']:.2f}x floor), "
              f"{row.get('iterations', '')} it, max RSS {row['max_rss_mb']:.0f} MB "
              f"({row['max_rss_mb'] / floor['max_rss_mb']:.2f}x; rounds {row['max_rss_rounds']})", flush=True)
    print(f"\nMiniLM + LoRA r {args.rank} (query, value), {args.train_pairs} train / {args.val_pairs} val "
          f"pairs, max length {args.max_length}, tol {args.tol:g}, max_iter {args.max_iter}; torch "
          f"{torch.__version__}, 1 thread; CPU: {_cpu_name()}")
    print("| run | curvature pairs | iterations | passes | status | hvp chunk | CPU s | solve s | × floor "
          "| max RSS MB | × floor's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        solve_s = f"{r['solve_seconds']:.1f}" if "solve_seconds" in r else ""
        print(f"| {r['run']} | {r.get('n_curvature') or ''} | {r.get('iterations', '')} | "
              f"{r.get('passes', '')} | {r.get('status', '')} | {r.get('hvp_batch_size') or ''} | "
              f"{r['seconds']:.1f} | {solve_s} | "
              f"{r['seconds'] / floor['seconds']:.2f} | {r['max_rss_mb']:.0f} | "
              f"{r['max_rss_mb'] / floor['max_rss_mb']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _median(results: list[dict]) -> dict:
    """The first round's fields with seconds and max RSS replaced by their medians over the rounds."""
    out = dict(results[0])
    for key in ("seconds", "max_rss_mb"):
        out[key] = statistics.median(r[key] for r in results)
    out["max_rss_rounds"] = [round(r["max_rss_mb"]) for r in results]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
