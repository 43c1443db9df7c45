"""The commands that run the protocol over retrains: ``experiment``, ``demo`` (its embedded settings) and
``validate``; registered in `prefprune.cli.COMMANDS`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from prefprune._io import output_lock
from prefprune.cli_common import Flat, General, _opt
from prefprune.experiment import ExperimentConfig, run_experiment
from prefprune.experiment.report import (
    accuracy_table,
    detection_table,
    distinguishable,
    interval_table,
    spread_note,
)
from prefprune.validate import ValidateConfig, run_validation, validation_summary


def _print_summary(results: dict, folder: Path) -> None:
    warning = (results.get("intervals") or {}).get("warning")
    if warning:
        print(f"\nWarning: {warning}")
    print(f"\n{spread_note(results)} Δ = difference to the unpruned baseline:\n")
    print(accuracy_table(results, mode="harmful"))
    intervals = interval_table(results, mode="harmful")
    if intervals:
        print("\nΔ accuracy in points with its paired bootstrap interval (* = excludes 0):\n")
        print(intervals)
    helpful = accuracy_table(results, mode="helpful")
    if helpful:
        print("\nHelpful arm (the most helpful pairs removed):\n")
        print(helpful)
        if interval_table(results, mode="helpful"):
            print("\n" + interval_table(results, mode="helpful"))
    print("\n" + distinguishable(results))
    det = detection_table(results)
    if det:
        print("\nNoise detection (planted flipped labels):\n")
        print(det)
    t = results["timings"]
    print(
        f"\nWall time of this invocation: {t['this_invocation_seconds'] / 60:.1f} min. "
        f"Report: {folder / 'report.md'}"
    )


@dataclass
class _ProtocolCommand:
    """Shared by ``experiment`` and ``demo``: the protocol's settings, run and summarised."""

    experiment: Annotated[ExperimentConfig, Flat] = _opt(
        "experiment settings", default_factory=ExperimentConfig
    )
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        results = run_experiment(self.experiment)
        _print_summary(results, Path(self.experiment.output))
        return 0


@dataclass
class ExperimentCommand(_ProtocolCommand):
    """The pruning protocol: train, score, prune, retrain, test, over seeds (resumable).

    Split the data into train/validation/test, train a baseline reward model per seed, score every training
    pair against the validation split (influence per curvature, grad_dot, grad_cos, train_loss), prune each
    method's most harmful fraction (and the helpful arm's most helpful), retrain from the same
    initialisation and measure test accuracy. Writes results.json, report.md and plots to --output;
    rerunning with the same folder skips finished steps. Settings come from --config (YAML, keys = the
    flags without dashes, sections nested) and the flags, which override it.
    """

    config: str | None = _opt(
        "YAML config file (keys = the flags without dashes; sections nested)", default=None
    )


@dataclass
class DemoCommand(_ProtocolCommand):
    """The whole protocol offline on CPU: MiniLM + synthetic TL;DR-style data with 20% label noise.

    Run the pruning experiment with the embedded demo settings (configs/demo.yaml: MiniLM backbone, 600
    synthetic pairs with 20% flipped labels, 3 seeds, influence vs grad_dot, grad_cos, train_loss and random
    pruning) offline on CPU in about 15 minutes on 2 cores, then print the report table. Any experiment flag
    overrides a demo setting; rerunning with the same --output resumes.
    """


@dataclass
class ValidateCommand:
    """Check influence against real retraining on your model: LDS over random subsets, leave-one-out.

    Retrains the reward model (same initial weights, same settings, from its folder's training metadata or
    an experiment config) on S seeded random subsets keeping a fraction α of the training pairs, and
    optionally without m single pairs; reports the linear datamodeling score (Spearman of predicted and
    measured change of validation loss, with a bootstrap interval) and the leave-one-out correlation of
    every score column (influence at each damping, grad_dot, grad_cos, extra score files), recommends a
    damping, and writes validate.json and a scatter plot. Resumable: each retrain is a step file.
    """

    validate: Annotated[ValidateConfig, Flat] = _opt("validation settings", default_factory=ValidateConfig)
    general: Annotated[General, Flat] = _opt("general options", default_factory=General)

    def run(self) -> int:
        with output_lock(self.validate.output, what="prefprune validate"):
            results = run_validation(self.validate)
        print(validation_summary(results))
        prune = results.get("prune_check")
        arms = "" if prune is None else f", {len(prune['columns'])} + {prune['draws']} random pruning-check"
        print(
            f"\n{results['n_train']} training pairs, {len(results['subsets'])} subsets, "
            f"{len(results['loo'])} leave-one-out{arms} retrains in {results['wall_time_s'] / 60:.1f} min; "
            f"wrote {Path(self.validate.output) / 'validate.json'}"
        )
        return 0


#: validate's flags that have one home elsewhere: the flag given → what to use instead.
_VALIDATE_REFUSED = {
    "--score.damping": "give the damping values to compare with --dampings (e.g. --dampings 1 0.1 0.01)",
    "--score.curvature": "give the curvature with --curvature",
}


def _check_validate_flags(argv: Sequence[str]) -> None:
    """Refuse validate's duplicate damping/curvature flags, and score flags with --config (whose settings
    come from the YAML's score section): the value would be ignored, so say so instead."""
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    for flag in flags:
        if flag.replace("_", "-") in _VALIDATE_REFUSED:
            raise ValueError(f"{flag} is not a validate setting: {_VALIDATE_REFUSED[flag.replace('_', '-')]}")
    if "--config" in flags:
        given = [f for f in flags if f.startswith("--score.")]
        if given:
            raise ValueError(f"{', '.join(given)} with --config: the scoring settings come from the config's "
                             "score section; set them in the YAML (or validate a model folder with --model)")
