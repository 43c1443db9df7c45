"""The settings of a pruning experiment (`ExperimentConfig`), the demo's settings, and their YAML reader."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from prefprune._config import cli_arg, flattened_fields, from_mapping, read_yaml
from prefprune._io import jsonable
from prefprune.data.config import DataConfig
from prefprune.influence.curvature import CURVATURES, CurvatureName
from prefprune.model.config import ModelConfig
from prefprune.prune import check_fraction
from prefprune.score import ScoreConfig
from prefprune.train import TrainConfig

__all__ = [
    "BASE_METHODS",
    "DEMO_CONFIG",
    "ExperimentConfig",
    "damping_tag",
    "damping_tags",
    "demo_config",
    "expand_methods",
    "load_config",
]

#: Methods a config may name; "influence" expands to one method per requested curvature (and damping value).
BASE_METHODS = ("influence", "ensemble", "grad_dot", "grad_cos", "train_loss", "margin", "random")
#: Keys of the experiment config that may differ when a run is resumed (they change no result).
RESUME_FREE = ("output", "num_threads", "progress", "device", "bootstrap_samples", "interval_level")
#: Keys that may change on resume because they change neither the baselines nor a finished step: new damping
#: values only add score columns (and a score pass for the values no score step holds yet).
RESUME_CHANGEABLE = ("score.damping",)
#: List keys that may grow on resume (the old entries kept): new arms, score passes or seeds; the finished
#: seeds' baselines and steps are reused (ensemble arms, which average over the seeds, are redone).
RESUME_GROWS = ("methods", "fractions", "helpful_methods", "helpful_fractions", "curvatures", "seeds")
#: Fields of the train / score sections that the experiment sets itself (from the top-level fields).
MANAGED = {
    "train": {"seed": "seeds", "max_length": "max_length", "device": "device", "progress": "progress"},
    "score": {"seed": "seeds", "max_length": "max_length", "curvature": "curvatures", "progress": "progress"},
}

#: `prefprune demo`: the protocol offline on 2 CPU cores in <= 15 minutes. configs/demo.yaml holds the same
#: settings with the reason for each (a test keeps the two equal).
DEMO_CONFIG: dict[str, Any] = {
    "data": {"source": "synthetic", "synthetic_pairs": 600, "label_noise": 0.2, "data_seed": 0},
    "split": [0.4, 0.1, 0.5],
    "split_seed": 0,
    "model": "minilm",
    "lora": {"r": 8, "alpha": 16.0},
    "lora_layers": 1,
    "cache_prefix": True,
    "max_length": 144,
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.001},
    "score": {"damping": 1.0, "hessian_samples": 100, "tol": 1.0e-4, "max_iter": 20, "batch_size": 32},
    "eval_batch_size": 64,
    "seeds": [0, 1, 2],
    "curvatures": ["ggn"],
    "methods": ["influence", "grad_dot", "grad_cos", "train_loss", "random"],
    "fractions": [0.05, 0.1, 0.2],
    "helpful_methods": ["influence", "grad_dot", "grad_cos"],
    "helpful_fractions": None,
}


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ExperimentConfig:
    """Settings of one pruning experiment (YAML keys = flags without dashes; sections nest with a dot)."""

    output: str = _help(
        "output folder (results.json, report.md, plots, per-step files)", default="runs/experiment"
    )
    data: DataConfig = _help("the preference data", default_factory=DataConfig)
    trusted_validation: bool = _help(
        "score against the validation pairs without planted noise only (a trusted, clean validation set); "
        "default: the validation split as it is, noise included",
        default=False,
    )
    clean_eval: bool = _help(
        "undo the planted noise of the validation and test pairs (noise in the training split only: clean "
        "validation and test labels, as a biased-annotator study needs)",
        default=False,
    )
    split: list[float] = _help(
        "train / validation / test fractions of the data (disjoint)", default_factory=lambda: [0.7, 0.1, 0.2]
    )
    split_seed: int = _help("seed of the split; the split is the same for every training seed", default=0)
    model: Annotated[ModelConfig, cli_arg(name="")] = _help(
        "the reward model", default_factory=ModelConfig
    )
    lora_layers: int | None = _help(
        "adapt only the top N transformer layers (None: all layers)", default=None
    )
    cache_prefix: bool = _help(
        "with lora_layers: compute the frozen lower layers once per sequence and reuse them", default=True
    )
    max_length: int = _help("maximum tokens per sequence (training, scoring and evaluation)", default=512)
    train: TrainConfig = _help(
        "training settings (seed, max_length, device and progress come from the experiment's fields)",
        default_factory=TrainConfig,
    )
    score: ScoreConfig = _help(
        "scoring settings (curvature, seed, max_length and progress come from the experiment's fields)",
        default_factory=ScoreConfig,
    )
    eval_batch_size: int = _help("batch size (pairs) for test-set evaluation", default=32)
    seeds: list[int] = _help(
        "training seeds (each: its own baseline, scores and retrains)", default_factory=lambda: [0, 1, 2]
    )
    curvatures: list[CurvatureName] = _help("curvatures for influence scores",
                                            default_factory=lambda: ["ggn"])
    methods: list[str] = _help(
        "pruning methods: influence (one per curvature and score.damping value: influence_<curvature>, or "
        "influence_<curvature>@<λ> for a damping list), ensemble, grad_dot, grad_cos, train_loss, margin, "
        "random",
        default_factory=lambda: ["influence", "grad_dot", "grad_cos", "train_loss", "random"],
    )
    fractions: list[float] = _help(
        "shares of the training split to prune", default_factory=lambda: [0.05, 0.1, 0.2]
    )
    helpful_methods: list[str] = _help(
        "methods of the helpful arm (remove the TOP fraction); [] to skip",
        default_factory=lambda: ["influence", "grad_dot", "grad_cos"],
    )
    helpful_fractions: list[float] | None = _help(
        "fractions of the helpful arm (None: same as fractions)", default=None
    )
    bootstrap_samples: int = _help(
        "resamples of the paired bootstrap (over seeds and test pairs) behind every reported interval",
        default=2000,
    )
    interval_level: float = _help("coverage of the reported intervals", default=0.95)
    device: str = _help("device: auto, cpu or cuda[:N]", default="auto")
    num_threads: int | None = _help("torch CPU threads (None: torch's default)", default=None)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        # Python callers may give a section as a mapping of its fields (checked like a YAML section).
        sections = (
            ("data", DataConfig),
            ("model", ModelConfig),
            ("train", TrainConfig),
            ("score", ScoreConfig),
        )
        for name, cls in sections:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, from_mapping(cls, value, section=name))
            elif not isinstance(value, cls):
                raise ValueError(f"{name} must be a mapping of {cls.__name__} settings, got {value!r}")

    # ------------------------------------------------------------------------------------------
    def arm_methods(self) -> list[str]:
        """The harmful-arm methods, 'influence' expanded per curvature and damping value, in config order."""
        return expand_methods(self.methods, self.curvatures, self.damping_tags())

    def helpful_arm_methods(self) -> list[str]:
        methods = expand_methods(self.helpful_methods, self.curvatures, self.damping_tags())
        return [m for m in methods if m != "random"]

    def dampings(self) -> list[float]:
        """score.damping as a list, checked for every curvature (duplicates, > 0 for exact); ValueError."""
        values: list[float] = []
        for c in self.curvatures or ["identity"]:
            try:
                values = dataclasses.replace(self.score, curvature=c).dampings()
            except ValueError as exc:
                raise ValueError(f"score.damping: {exc}") from None
        return values

    def damping_tags(self) -> list[str]:
        """The method-name suffix of each damping value ('' for one value: influence_<curvature>)."""
        return damping_tags(self.dampings(), relative=self.score.relative_damping)

    def helpful_arm_fractions(self) -> list[float]:
        return list(self.fractions if self.helpful_fractions is None else self.helpful_fractions)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values, in the shape of a YAML config (flattened sections lifted)."""
        out = jsonable(self)
        flat = flattened_fields(type(self))
        lifted = {key: out[owner][key] for key, owner in flat.items()}
        return {k: v for k, v in out.items() if k not in set(flat.values())} | lifted

    def train_config(self, seed: int) -> TrainConfig:
        """The TrainConfig of one seed's trainings."""
        device = None if self.device == "auto" else self.device
        return dataclasses.replace(
            self.train, seed=seed, max_length=self.max_length, device=device, progress=self.progress
        )

    def score_config(self, seed: int, curvature: str) -> ScoreConfig:
        """The validated ScoreConfig of one seed's score pass with `curvature`."""
        config = dataclasses.replace(
            self.score, curvature=curvature, seed=seed, max_length=self.max_length, progress=self.progress
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Check the settings together; raise ValueError naming the field and the offending value."""
        self.__post_init__()
        for name in ("fractions",):
            for v in getattr(self, name):
                check_fraction(v, what=f"{name} entry")
        if not self.fractions:
            raise ValueError("fractions is empty: give at least one fraction in (0, 1)")
        for v in self.helpful_arm_fractions():
            check_fraction(v, what="helpful_fractions entry")
        if len(self.split) != 3 or any(not (x > 0) for x in self.split) or sum(self.split) > 1 + 1e-9:
            raise ValueError(
                f"split must be three positive fractions (train, validation, test) summing to at most "
                f"1, got {self.split!r}"
            )
        self._validate_protocol()
        if self.data.max_pairs is not None and self.data.max_pairs < 10:
            raise ValueError(f"max_pairs must be at least 10 (or None), got {self.data.max_pairs!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length!r}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(
                f"lora_layers must be a positive number of layers (or None), got {self.lora_layers!r}"
            )
        if self.bootstrap_samples < 100:
            raise ValueError(f"bootstrap_samples must be at least 100, got {self.bootstrap_samples!r}")
        if not 0 < self.interval_level < 1:
            raise ValueError(f"interval_level must be in (0, 1), got {self.interval_level!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size!r}")
        self._validate_managed()

    def _validate_protocol(self) -> None:
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        for c in self.curvatures:
            if c not in CURVATURES:
                raise ValueError(f"unknown curvature {c!r} in curvatures; expected one of {CURVATURES}")
        if not self.curvatures and any(
            m.startswith("influence") for m in self.methods + self.helpful_methods
        ):
            raise ValueError("methods name influence but curvatures is empty")
        self.damping_tags()  # the damping list checked before the methods are expanded by it
        arms = self.arm_methods() + self.helpful_arm_methods()
        if any(m.startswith("ensemble_") for m in arms) and len(self.seeds) < 2:
            raise ValueError(
                f"method ensemble averages the seeds' baselines: give at least two seeds, got {self.seeds}"
            )
        if not self.methods:
            raise ValueError("methods is empty: give at least one method")

    def _validate_managed(self) -> None:
        for section, fields_ in MANAGED.items():
            value, default = getattr(self, section), type(getattr(self, section))()
            for name, top in fields_.items():
                if getattr(value, name) != getattr(default, name):
                    raise ValueError(
                        f"{section}.{name} is set by the experiment (use the top-level {top} field), got "
                        f"{getattr(value, name)!r}"
                    )


def damping_tag(value: float, *, relative: bool = False) -> str:
    """The method-name suffix of one damping value of a list: ``@<λ:g>`` (``@r<factor:g>`` if relative)."""
    return f"@{'r' if relative else ''}{float(value):g}"


def damping_tags(dampings: Sequence[float], *, relative: bool = False) -> list[str]:
    """Method-name suffix per damping value: none for a single value (``influence_ggn``), else ``@<λ:g>``
    (``@r<factor:g>`` for relative damping), e.g. ``influence_ggn@0.1``; ValueError when two values print
    alike."""
    if len(dampings) <= 1:
        return [""]
    tags = [damping_tag(v, relative=relative) for v in dampings]
    if len(set(tags)) != len(tags):
        same = sorted({t for t in tags if tags.count(t) > 1})
        raise ValueError(
            f"score.damping: values {list(dampings)!r} give the same method names {same} (6 significant "
            "digits); use values that differ within 6 digits"
        )
    return tags


def expand_methods(
    methods: Sequence[str], curvatures: Sequence[str], tags: Sequence[str] = ("",)
) -> list[str]:
    """Method names with "influence" / "ensemble" expanded to <method>_<curvature><tag> per curvature and
    damping tag (`damping_tags`); ValueError on unknown names.

    ``influence_<curvature>`` names every damping value of that curvature; ``influence_<curvature>@<λ>`` one.
    """
    out: list[str] = []
    for m in methods:
        base, at, tag = m.partition("@")
        if base in ("influence", "ensemble") and not at:
            # ensemble_<curvature>: the mean over the seeds' baselines of their influence_<curvature>.
            names = [f"{base}_{c}{t}" for c in curvatures for t in tags]
        elif base.startswith(("influence_", "ensemble_")):
            c = base.split("_", 1)[1]
            if c not in curvatures:
                raise ValueError(
                    f"method {m!r} needs curvature {c!r} in curvatures (have {list(curvatures)})"
                )
            if not at:
                names = [f"{base}{t}" for t in tags]
            elif f"@{tag}" in tags:
                names = [m]
            elif list(tags) == [""]:
                raise ValueError(f"method {m!r}: with one score.damping value the method is named {base!r}")
            else:
                raise ValueError(
                    f"method {m!r} names a damping value not in score.damping (the methods are "
                    f"{[base + t for t in tags]})"
                )
        elif m in BASE_METHODS:
            names = [m]
        else:
            raise ValueError(
                f"unknown method {m!r}; expected one of {BASE_METHODS}, influence_<curvature> or "
                "influence_<curvature>@<damping>"
            )
        out.extend(n for n in names if n not in out)
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Read a YAML config (unknown keys are errors naming the file and line), apply overrides, validate.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: key → value on top of the file; a section's entry may be given with a dotted key
            (``"train.lr"``) or the section as a mapping (merged into the file's).

    Returns:
        A validated ExperimentConfig.
    """
    values, lines = read_yaml(path) if path is not None else ({}, {})
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if sub:
            values[section] = {**dict(values.get(section) or {}), sub: value}
        elif isinstance(value, Mapping) and isinstance(values.get(key), Mapping):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    where = str(path) if path is not None else ""
    cfg = from_mapping(ExperimentConfig, values, where=where, lines=lines)
    try:
        cfg.validate()
    except ValueError as exc:
        if path is not None:
            raise ValueError(f"{path}: {exc}") from None
        raise
    return cfg


def demo_config(output: str = "runs/demo", **overrides: Any) -> ExperimentConfig:
    """The demo's ExperimentConfig (DEMO_CONFIG) writing to `output`, with optional overrides."""
    return load_config(None, {**DEMO_CONFIG, "output": output, **overrides})
