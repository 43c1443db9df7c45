"""Command-line interface: ``prefprune <command> [options]``; each command parses its settings, calls the API.

Every command is a dataclass whose fields are its settings (most of them the stages' own config
dataclasses: `DataConfig`, `ModelConfig`, `TrainConfig`, `ScoreConfig`, `PruneConfig`,
`ExperimentConfig`), turned into flags by tyro, with a ``run()`` method that calls the Python API and
prints. Sections annotated ``tyro.conf.arg(name="")`` show their flags without a prefix (``--lr``, not
``--train.lr``); nested settings keep their dotted prefix (``--lora.r``). To add a command, write the
dataclass and add it to `COMMANDS`.

``prefprune experiment --config FILE`` reads a YAML file (keys = the flags without dashes, sections as
nested mappings); the flags given on the command line override it.

Errors end the process with one line on stderr (``prefprune <command>: error: ...``) and exit code 2;
``--debug`` shows the full traceback instead. Invalid flags are reported by tyro (exit code 2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import tyro

from prefprune import __version__
from prefprune._io import output_lock
from prefprune.cli_common import _FROM_MODEL, Flat, General, _opt
from prefprune.cli_protocol import DemoCommand, ExperimentCommand, ValidateCommand, _check_validate_flags
from prefprune.data import pairs_digest
from prefprune.data.config import DataConfig, absolute_source, load_data
from prefprune.ensemble import member_path, score_ensemble
from prefprune.experiment import DEMO_CONFIG, ExperimentConfig, load_config
from prefprune.influence.scale import scale_summary
from prefprune.model import ModelConfig, build_model, carry_settings, load_reward_model, save_reward_model
from prefprune.model.config import Dtype
from prefprune.prune import PruneConfig, prune_with_config
from prefprune.score import ScoreConfig, score_model
from prefprune.train import (
    TooLong,
    TrainConfig,
    evaluate,
    resolve_device,
    split_for_eval,
    train_reward_model,
    write_metrics,
)

__all__ = ["COMMANDS", "main", "parse_command"]

logger = logging.getLogger("prefprune.cli")

def _required_data() -> DataConfig:
    return DataConfig(source=tyro.MISSING)


# ----------------------------------------------------------------------------------------------------
# train, eval


@dataclass
class TrainCommand:
    """Train a LoRA reward model (Bradley-Terry loss) and save it as a peft folder with metrics.json.

    Without options: the offline MiniLM backbone on synthetic TL;DR-style pairs with clean labels, 20% held
    out for evaluation.
    """

    data: Annotated[DataConfig, Flat] = _opt("training data", default_factory=DataConfig)
    eval_fraction: float = _opt(
        "fraction of --data held out for evaluation (split by pair id and --seed); not with --eval-data",
        default=0.2,
    )
    eval_data: str | None = _opt(
        "separate evaluation data (read with the --schema/--split/--skip-bad options); then all of --data "
        "is trained on",
        default=None,
    )
    model: Annotated[ModelConfig, Flat] = _opt("the reward model", default_factory=ModelConfig)
    train: Annotated[TrainConfig, Flat] = _opt("training settings", default_factory=TrainConfig)
    output: str = _opt(
        "where the reward model (adapter, tokenizer, prefprune.json) and metrics.json are written",
        default="runs/train",
    )
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        with output_lock(self.output, what="prefprune train"):  # one writer per model folder
            return self._run()

    def _run(self) -> int:
        start = time.perf_counter()
        data = load_data(self.data)
        given = load_data(self.data, source=self.eval_data) if self.eval_data is not None else None
        train, held = split_for_eval(data, self.eval_fraction, seed=self.train.seed, held_out=given)
        n_held = len(held) if held is not None else 0
        logger.info(
            "data: %s (%s), %d training pairs, %d held out",
            data.source or self.data.source,
            data.schema,
            len(train),
            n_held,
        )
        model, tokenizer = build_model(self.model, seed=self.train.seed)
        metrics = train_reward_model(model, tokenizer, train, config=self.train, eval_data=held,
                                     checkpoint_dir=self.output)
        # Absolute paths and the pairs' digests: validate reads the same files from anywhere, or says why not.
        data_config = dataclasses.replace(self.data, source=absolute_source(self.data.source))
        eval_source = absolute_source(self.eval_data) if self.eval_data is not None else None
        provenance = {
            "data": {
                "source": data_config.source,
                "digest": pairs_digest(data),
                "eval_digest": pairs_digest(given) if given is not None else None,
                "schema": data.schema,
                "stats": data.stats,
                "n_train": len(train),
                "n_eval": n_held,
                "n_eval_in_training_data": held.stats.get("dropped_in_training_data", 0) if held else 0,
                "eval_data": eval_source,
                "eval_fraction": None if self.eval_data else self.eval_fraction,
                "split_seed": self.train.seed,
                "synthetic": self.data.is_synthetic
                and {"n": len(data), "label_noise": self.data.label_noise, "seed": self.data.data_seed},
            },
            "model": {
                "base": self.model.model,
                "dtype": self.model.dtype,
                "lora": model.prefprune_info.get("lora"),
            },
            "command": sys.argv[1:] if sys.argv else None,
        }
        out = Path(self.output)
        extra = {
            "train_config": dataclasses.asdict(self.train),
            "data_config": dataclasses.asdict(data_config),
            "model_config": dataclasses.asdict(self.model),
            **provenance,
        }
        save_reward_model(model, tokenizer, out, extra=extra)
        metrics = {**metrics, **provenance, "total_wall_time_s": time.perf_counter() - start}
        write_metrics(out, metrics)
        ev = metrics["eval"]
        summary = f"trained on {metrics['n_train']} pairs in {metrics['wall_time_s']:.0f} s"
        if ev:
            summary += f"; held-out accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}, mean margin "
            summary += f"{ev['mean_margin']:.3f} (n={ev['n']}"
            dropped = held.stats.get("dropped_in_training_data", 0) if held is not None else 0
            summary += f"; {dropped} pairs of --eval-data also in --data left out)" if dropped else ")"
        print(f"{summary}; saved to {out}")
        return 0


@dataclass
class EvalCommand:
    """Pairwise accuracy (margin > 0), mean margin and Bradley-Terry loss of a saved reward model; prints
    the metrics as JSON."""

    model: str = _opt("reward model folder (from prefprune train)")
    data: Annotated[DataConfig, Flat] = _opt("evaluation data", default_factory=_required_data)
    batch_size: int = _opt("pairs per forward pass", default=32)
    max_length: int | None = _opt("max tokens per sequence" + _FROM_MODEL + "512", default=None)
    truncation: Literal["prompt", "error"] | None = _opt(
        "pairs longer than --max-length: 'prompt' (cut the prompt) or 'error'" + _FROM_MODEL + "prompt",
        default=None)
    too_long: TooLong = _opt("pairs whose response alone exceeds --max-length", default="skip")
    dtype: Dtype | None = _opt("parameter dtype of the loaded model; default: the one it was saved with",
                               default=None)
    device: str | None = _opt("cuda | cpu | cuda:N; default cuda if available", default=None)
    bf16: bool = _opt("bf16 autocast (CUDA only)", default=False)
    output: str | None = _opt("also write the metrics to this JSON file", default=None)
    margins: bool = _opt("include every pair's margin in --output", default=False)
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        device = resolve_device(self.device)
        given = {"max_length": self.max_length, "truncation": self.truncation, "dtype": self.dtype}
        settings = carry_settings(self.model, given, {"max_length": 512, "truncation": "prompt",
                                                      "dtype": "float32"})
        value = {name: entry["value"] for name, entry in settings.items()}
        model, tokenizer = load_reward_model(self.model, device=device, dtype=getattr(torch, value["dtype"]))
        if tokenizer is None:
            raise ValueError(f"{self.model}: no tokenizer saved with the model or its base")
        max_length = value["max_length"]
        data = load_data(self.data)
        result = evaluate(
            model,
            tokenizer,
            data,
            batch_size=self.batch_size,
            max_length=max_length,
            truncation=value["truncation"],
            too_long=self.too_long,
            device=device,
            bf16=self.bf16,
            return_margins=self.margins,
        )
        result = {
            "model": str(self.model),
            "data": self.data.source,
            "schema": data.schema,
            "max_length": max_length,
            "model_settings": settings,
            **result,
        }
        if self.output:
            write_metrics(self.output, result)
        hidden = ("margins", "skipped_ids", "model_settings")
        print(json.dumps({k: v for k, v in result.items() if k not in hidden}, indent=2))
        return 0


# ----------------------------------------------------------------------------------------------------
# score, prune


@dataclass
class ScoreFlags(ScoreConfig):
    """`ScoreConfig` as score's flags: the settings a model folder records default to the folder's
    (`prefprune.model.carry_settings`); a flag given explicitly wins."""

    max_length: int | None = _opt("longest sequence in tokens" + _FROM_MODEL + "512", default=None)
    truncation: Literal["prompt", "error"] | None = _opt(
        "training pairs longer than max_length: 'prompt' (cut the prompt) or 'error' (validation pairs are "
        "never cut)" + _FROM_MODEL + "prompt", default=None)
    padding_side: Literal["right", "left"] | None = _opt(
        "padding side of the scoring batches" + _FROM_MODEL + "right", default=None)

    def resolved(self) -> tuple[ScoreConfig, list[str]]:
        """The `ScoreConfig` (unset settings at its defaults) and the names to take from the model."""
        carry = [n for n in _CARRIED_FLAGS if getattr(self, n) is None]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScoreConfig)}
        defaults = ScoreConfig()
        return ScoreConfig(**{**values, **{n: getattr(defaults, n) for n in carry}}), carry


_CARRIED_FLAGS = ("max_length", "truncation", "padding_side")


@dataclass
class ScoreCommand:
    """Score every training pair: influence, gradient similarity, loss, margin.

    Two streaming passes over a saved reward model: the validation gradient and the curvature solve
    q = (H + damping*I)^-1 grad L_val, then one forward+backward per training batch giving influence
    (q . grad loss_i), grad_dot, grad_cos, train_loss and margin per pair. Positive influence/grad_dot/
    grad_cos = helpful. Writes OUTPUT (.parquet, .jsonl or .csv) and OUTPUT.json (settings, solve status,
    timings, versions).
    """

    model: list[str] = _opt(
        "reward model folder(s) from prefprune train; several folders (seeds, checkpoints) write the mean "
        "of their scores to --output and each member's scores beside it (OUTPUT stem + .memberK)"
    )
    train: str = _opt("training pairs to score (a file or hub dataset id)")
    val: str = _opt("validation pairs (never truncated)")
    output: str = _opt(
        "score file: .parquet, .jsonl or .csv (its folder must exist); written as one unit with its sidecar "
        "OUTPUT.json (and OUTPUT.per_query.safetensors with --per-query); an earlier score file's unit there "
        "is replaced whole, any other existing file only with --overwrite; never an input"
    )
    overwrite: bool = _opt(
        "replace existing files at OUTPUT, OUTPUT.json or OUTPUT.per_query.safetensors that are not a "
        "prefprune score file's", default=False)
    schema: Literal["auto", "tldr", "prompt_chosen_rejected", "hh"] = _opt(
        "record layout of both sources; auto = detect from the first record", default="auto"
    )
    train_split: str = _opt("split of --train (hub datasets, split-keyed JSON)", default="train")
    val_split: str = _opt("split of --val", default="train")
    max_pairs: int | None = _opt("score at most the first N pairs", default=None)
    skip_bad: bool = _opt(
        "skip unreadable records of --train and --val (counted and logged) instead of failing", default=False)
    score: Annotated[ScoreFlags, Flat] = _opt("scoring settings", default_factory=ScoreFlags)
    dtype: Dtype | None = _opt("parameter dtype of the loaded model; default: the one it was saved with",
                               default=None)
    device: str | None = _opt("cuda | cpu | cuda:N; default cuda if available", default=None)
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        config, carry = self.score.resolved()
        kw = dict(
            config=config,
            schema=self.schema,
            train_split=self.train_split,
            val_split=self.val_split,
            max_pairs=self.max_pairs,
            device=str(resolve_device(self.device)),
            skip_bad=self.skip_bad,
            carry=carry,
            dtype=self.dtype,
        )
        if len(self.model) > 1:
            ens, members = score_ensemble(self.model, self.train, self.val, self.output, **kw)
            print(
                f"scored {len(ens)} pairs with {len(members)} models; wrote the mean of their scores to "
                f"{self.output} and each model's to {member_path(self.output, 0).name} ..."
            )
            return 0
        result = score_model(self.model[0], self.train, self.val, self.output, **kw)
        s = result.solve
        if s.method == "none":
            solve = "no solve"
        elif s.method == "direct":
            solve = "direct solve (eigendecomposition)"  # no iterations to report
        else:
            solve = f"{s.method.upper()} {s.status} after {s.iterations} iterations"
        total = result.metadata["timings_s"]["total"]
        print(
            f"scored {len(result)} pairs ({s.curvature}, damping {s.damping:g}, {solve}) in {total:.1f} s; "
            f"wrote {self.output} and {self.output}.json"
            + (f" and {self.output}.per_query.safetensors" if result.per_query is not None else "")
        )
        for line in scale_summary(result.curvature_scale):  # λ against the curvature's own scale
            print(line)
        return 0


@dataclass
class PruneCommand:
    """Drop the most harmful (or helpful) pairs by a score column; write the pruned data.

    Remove the lowest --fraction of a score column (influence, grad_dot, grad_cos, margin; for train_loss
    the highest), or a seeded random draw, and write the pruned dataset in the input's schema plus the
    removed ids (one per line, most suspect first). --select helpful picks the other end; --keep keeps
    only the selected pairs instead of removing them.
    """

    prune: Annotated[PruneConfig, Flat] = _opt("pruning settings")
    data: Annotated[DataConfig, Flat] = _opt("the data to prune", default_factory=_required_data)
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        self.prune.validate()
        data = load_data(self.data)
        summary = prune_with_config(data, self.prune)
        print(
            f"{summary['n_input']} -> {summary['n_output']} pairs ({summary['n_removed']} dropped by "
            f"{self.prune.by}, {self.prune.select}); wrote {summary['output']} and {summary['removed_ids']}"
        )
        return 0


# ----------------------------------------------------------------------------------------------------
# experiment, demo


# ----------------------------------------------------------------------------------------------------
# Entry point

COMMANDS: dict[str, type] = {
    "train": TrainCommand,
    "eval": EvalCommand,
    "score": ScoreCommand,
    "prune": PruneCommand,
    "experiment": ExperimentCommand,
    "demo": DemoCommand,
    "validate": ValidateCommand,
}


def _config_path(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in `argv` (its YAML file is the flags' default), else None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _defaults(name: str, argv: Sequence[str]) -> Any:
    """The default instance of command `name`: the YAML file of --config or the demo's settings."""
    if name == "experiment":
        path = _config_path(argv)
        cfg = load_config(path) if path is not None else ExperimentConfig()
        return ExperimentCommand(config=path, experiment=cfg)
    if name == "demo":
        if _config_path(argv) is not None:
            raise ValueError(
                "prefprune demo has its own settings; use prefprune experiment --config FILE for a file"
            )
        return DemoCommand(experiment=load_config(None, {**DEMO_CONFIG, "output": "runs/demo"}))
    return None


def parse_command(argv: Sequence[str]) -> Any:
    """The command instance `argv` describes (its settings parsed and checked), without running it."""
    name = argv[0] if argv else None
    if name == "validate":
        _check_validate_flags(argv[1:])
    options = []
    for cmd, cls in COMMANDS.items():
        default = _defaults(cmd, argv[1:]) if cmd == name else None
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        marker = (
            tyro.conf.subcommand(cmd, description=doc, default=default)
            if default is not None
            else tyro.conf.subcommand(cmd, description=doc)
        )
        options.append(Annotated[cls, marker])
    return tyro.cli(
        Union[tuple(options)],  # noqa: UP007 (a union built at run time)
        args=list(argv),
        prog="prefprune",
        description="Find harmful and helpful pairs in preference datasets with influence "
        "functions, prune them and retrain a LoRA reward model. Run 'prefprune COMMAND --help' "
        "for a command's options.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 on bad input or a failed run, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"prefprune {__version__}")
        return 0
    name = argv[0] if argv and argv[0] in COMMANDS else "CLI"
    debug = "--debug" in argv
    try:
        cmd = parse_command(argv)
        # Our own messages at the chosen level; other libraries' only from WARNING up.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("prefprune").setLevel(getattr(logging, cmd.general.log_level))
        return int(cmd.run() or 0)
    except KeyboardInterrupt:
        print(f"prefprune {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI boundary: one readable line, the traceback only on request
        if debug:
            raise
        print(f"prefprune {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, OSError, FloatingPointError, ImportError, LookupError)):
        return text
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
