"""The settings of `prefprune validate` (`ValidateConfig`): what to retrain, score and check, and how."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from prefprune.influence.curvature import CurvatureName
from prefprune.prune import check_fraction
from prefprune.score import ScoreConfig

__all__ = ["MIN_SUBSETS", "ValidateConfig"]

MIN_SUBSETS = 5


@dataclass
class ValidateConfig:
    """Settings of `prefprune validate` (from a model folder or an experiment config)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "reward model folder from prefprune train (its prefprune.json holds the training "
            "data, model and training settings); or give --config"
        },
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "experiment YAML instead of a model folder: its split, model and training settings "
            "(first seed) define the model to validate"
        },
    )
    train: str | None = field(
        default=None,
        metadata={
            "help": "training pairs (as in prefprune score --train): all of them are retrained on and "
            "scored, read with the model folder's data settings; default: the pairs the folder records, "
            "its held-out split removed. --model only (with --config the training pairs are its split)"
        },
    )
    val: str | None = field(
        default=None,
        metadata={
            "help": "validation pairs (read with the training data's settings); default: the model's "
            "held-out split (model folder) or the experiment's validation split"
        },
    )
    test: str | None = field(
        default=None,
        metadata={
            "help": "test pairs of --prune-check (read with the training data's settings); default: the "
            "experiment's test split with --config; a model folder has none"
        },
    )
    output: str = field(
        default="runs/validate",
        metadata={"help": "folder for validate.json, the scatter plot, the per-retrain step files and "
                          "inputs.json (the digests of the data and settings those steps belong to: a rerun "
                          "with other inputs is refused)"},
    )
    subsets: int = field(default=20, metadata={"help": "S: random subsets retrained for the LDS (>= 5)"})
    fraction: float = field(
        default=0.5, metadata={"help": "α: share of the training pairs each subset keeps"}
    )
    loo: int = field(default=0, metadata={"help": "m: single pairs left out and retrained (0 = no LOO)"})
    dampings: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.01],
        metadata={"help": "damping values λ of the influence columns (one score pass and solve for all); the "
                          "only damping setting of validate (--score.damping is refused)"},
    )
    curvature: CurvatureName = field(default="ggn", metadata={"help": "Hessian of the influence columns"})
    scores: list[str] = field(
        default_factory=list,
        metadata={
            "help": "extra score files (prefprune score output, e.g. an ensemble) whose columns are "
            "validated too; ids must match the training pairs"
        },
    )
    ensemble: list[int] = field(
        default_factory=list,
        metadata={
            "help": "training seeds of extra models: each is trained on the whole training set from its own "
            "initial weights and scored like the reference; the mean of every column over the reference and "
            "them is validated as ensemble:<column>"
        },
    )
    prune_check: float | None = field(
        default=None,
        metadata={
            "help": "k: also retrain without each column's lowest k (e.g. 0.1: a tenth of the pairs) and "
            "without k at random (--prune-draws draws), and report the test-accuracy change against random "
            "with paired bootstrap intervals; the recommendation then rests on it. Needs test pairs (--test, "
            "or --config's test split). Off by default: it costs one retrain per column plus the draws and "
            "needs test pairs"
        },
    )
    prune_draws: int = field(
        default=3,
        metadata={"help": "random draws of the pruning check (its reference arm; >= 1, 3+ advised)"},
    )
    score: ScoreConfig = field(
        default_factory=ScoreConfig,
        metadata={"help": "scoring settings of --model (--config uses its score section); curvature, "
                          "damping, seed and max_length are set by validate (--curvature, --dampings)"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the subset, leave-one-out and pruning-check random draws"}
    )
    bootstrap_samples: int = field(default=2000, metadata={"help": "resamples behind each interval"})
    interval_level: float = field(default=0.95, metadata={"help": "coverage of the intervals"})
    device: str | None = field(
        default=None, metadata={"help": "cuda | cpu | cuda:N; default cuda if available"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar over the retrains"})

    def validate(self, *, need_source: bool = True) -> None:
        """Raise ValueError on a bad setting (before any data is read or model trained)."""
        if need_source and (self.model is None) == (self.config is None):
            raise ValueError(
                "give exactly one of --model FOLDER (trained by prefprune train) or --config FILE"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction (α) must be in the open interval (0, 1), got {self.fraction!r}")
        if self.subsets < MIN_SUBSETS:
            raise ValueError(
                f"subsets (S) must be at least {MIN_SUBSETS} for a rank correlation, got {self.subsets}"
            )
        if self.loo < 0:
            raise ValueError(f"loo must be >= 0, got {self.loo}")
        if not self.dampings:
            raise ValueError("dampings is empty: give at least one damping value")
        if self.train is not None and self.config is not None:
            raise ValueError("--train replaces a model folder's training pairs; with --config the training "
                             "pairs are its split (set data.source in the YAML)")
        if self.prune_check is not None:
            check_fraction(self.prune_check, what="prune_check (k)")
        if self.prune_draws < 1:
            raise ValueError(f"prune_draws must be at least 1, got {self.prune_draws}")
        for d in self.dampings:
            dataclasses.replace(self.score, curvature=self.curvature, damping=d).validate()
        if self.bootstrap_samples < 100:
            raise ValueError(f"bootstrap_samples must be at least 100, got {self.bootstrap_samples}")
        if not 0 < self.interval_level < 1:
            raise ValueError(f"interval_level must be in (0, 1), got {self.interval_level}")
