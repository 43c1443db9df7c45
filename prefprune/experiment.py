"""Pruning experiments end to end: split, train, score, prune, retrain, test — over seeds, resumable.

The protocol (`run_experiment`):

1. Load the data and split it once into disjoint train / validation / test parts (`split_seed`; the
   split is the same for every seed, so all arms of all seeds are measured on one test set and seed
   spread reflects initialisation and data order only). Validation pairs are used **only** for
   scoring, test pairs **only** for the final accuracy.
2. For each seed: build the reward model (the seed fixes the LoRA/head initialisation and the data
   order), keep a copy of its initial trainable weights, train on the full training split: the
   *baseline*. Score every training pair with that baseline model against the validation split:
   one score pass per curvature (`influence_<curvature>`); grad_dot, grad_cos and train_loss come from
   the first pass.
3. For each method and fraction: drop the most harmful `fraction` of the training split (lowest
   influence / grad_dot / grad_cos, highest train_loss, or a seeded random draw), restore the *same*
   initial weights, retrain with the same hyperparameters and seed, and measure test accuracy. The
   *helpful arm* drops the other end instead.
4. With planted label noise (`dataset.flipped_ids`), each score's noise-detection AUC and
   precision@k (k = number of flipped training pairs).

Every finished step is one small JSON file under the output folder, written atomically; a rerun
with the same folder skips them. `results.json`, `report.md` and PNG plots are rebuilt at the end.

Model specs: a hub id or local folder, ``"minilm"`` (the offline default backbone), or
``"tiny:<family>"`` (a tiny randomly initialised model from `prefprune.model.tiny_config` with
`tiny_tokenizer`, for tests; family gpt_neox, llama, bert or gpt2).

`lora_layers` adapts only the top N transformer layers. The layers below are then frozen and carry no
trainable adapter, so their outputs do not change during training: with `cache_prefix` they are
computed once per distinct input sequence and reused (`PrefixCache`), and training, scoring and
evaluation run only the top layers. Dropout in the cached part (embeddings and frozen layers) is
switched off, because a memoised computation must be deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefprune._io import atomic_write, atomic_write_text, package_versions
from prefprune.metrics import detection_auc, mean_std, precision_at_k
from prefprune.prefix_cache import InstalledCache, PrefixCache, adapt_top_layers
from prefprune.prune import MODES, ScoreTable, check_fraction, higher_is_suspect, n_to_select, select_pairs

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_METHODS",
    "CURVATURES",
    "DEMO_CONFIG",
    "demo_config",
    "ExperimentConfig",
    "add_config_arguments",
    "config_from_args",
    "load_config",
    "run_experiment",
]

#: Methods a config may name; "influence" expands to one method per requested curvature.
BASE_METHODS = ("influence", "grad_dot", "grad_cos", "train_loss", "margin", "random")
#: Curvatures the scorer offers (DESIGN.md §2).
CURVATURES = ("exact", "ggn", "projected_ggn", "identity")
#: Score columns carried over from the first score pass.
_SHARED_COLUMNS = ("grad_dot", "grad_cos", "train_loss", "margin")
#: Columns whose noise-detection quality is always reported when scores exist.
_DETECTION_COLUMNS = ("grad_dot", "grad_cos", "train_loss")
#: Keys of the experiment config that may differ when a run is resumed (they change no result).
_RESUME_FREE = ("output", "num_threads", "progress", "device")
#: The keys that `max_length` / `seed` are set from in the train and score sections.
_MANAGED_SECTION_KEYS = ("seed", "max_length")


#: `prefprune demo`: the protocol offline on 2 CPU cores in <= 15 minutes. configs/demo.yaml holds the same
#: settings with the reason for each (a test keeps the two equal).
DEMO_CONFIG: dict[str, Any] = {
    "data": "synthetic",
    "synthetic_pairs": 600,
    "label_noise": 0.2,
    "data_seed": 0,
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


def demo_config(output: str = "runs/demo", **overrides: Any) -> ExperimentConfig:
    """The demo's ExperimentConfig (DEMO_CONFIG) writing to `output`, with optional overrides."""
    return load_config(None, {**DEMO_CONFIG, "output": output, **overrides})


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ExperimentConfig:
    """Settings of one pruning experiment (YAML keys = field names; every field is also a CLI flag)."""

    output: str = _help(
        "output folder (results.json, report.md, plots, per-step files)", default="runs/experiment"
    )
    # -- data
    data: str = _help("preference data: a file path, a hub dataset id, or 'synthetic'", default="synthetic")
    data_schema: str = _help("schema of the data: auto, tldr, prompt_chosen_rejected or hh", default="auto")
    data_split: str = _help("split to load from a hub dataset or a multi-split file", default="train")
    data_name: str | None = _help("hub dataset config name (e.g. 'comparisons')", default=None)
    skip_bad: bool = _help("skip unreadable records (counted and logged) instead of failing", default=False)
    max_pairs: int | None = _help(
        "use at most this many pairs of the loaded data (the first ones)", default=None
    )
    synthetic_pairs: int = _help("number of pairs when data is 'synthetic'", default=1000)
    label_noise: float = _help(
        "share of pairs whose labels are flipped (planted noise, recorded as "
        "flipped_ids; for 'synthetic' the generator plants it)",
        default=0.0,
    )
    data_seed: int = _help("seed of the synthetic data generator and of planted label noise", default=0)
    trusted_validation: bool = _help(
        "score against the validation pairs without planted noise only (a trusted, clean validation set); "
        "default: the validation split as it is, noise included",
        default=False,
    )
    split: list[float] = _help(
        "train / validation / test fractions of the data (disjoint)", default_factory=lambda: [0.7, 0.1, 0.2]
    )
    split_seed: int = _help("seed of the split; the split is the same for every training seed", default=0)
    # -- model
    model: str = _help(
        "base model: hub id, folder, 'minilm' (offline default) or 'tiny:<family>' (tests)", default="minilm"
    )
    dtype: str = _help("parameter dtype of the base model: float32, bfloat16 or float16", default="float32")
    lora: dict[str, Any] = _help(
        "LoRA settings (prefprune.model.LoRASettings fields: r, alpha, dropout, "
        "target_modules, train_pooler)",
        default_factory=dict,
    )
    lora_layers: int | None = _help(
        "adapt only the top N transformer layers (None: all layers)", default=None
    )
    cache_prefix: bool = _help(
        "with lora_layers: compute the frozen lower layers once per sequence and reuse them", default=True
    )
    max_length: int = _help("maximum tokens per sequence (training, scoring and evaluation)", default=512)
    # -- training, scoring
    train: dict[str, Any] = _help(
        "training settings (prefprune.train.TrainConfig fields except seed and max_length)",
        default_factory=dict,
    )
    score: dict[str, Any] = _help(
        "scoring settings (prefprune.score.ScoreConfig fields except curvature, seed and max_length)",
        default_factory=dict,
    )
    eval_batch_size: int = _help("batch size (pairs) for test-set evaluation", default=32)
    # -- protocol
    seeds: list[int] = _help(
        "training seeds (each: its own baseline, scores and retrains)", default_factory=lambda: [0, 1, 2]
    )
    curvatures: list[str] = _help(
        "curvatures for influence scores: exact, ggn, identity, projected_ggn",
        default_factory=lambda: ["ggn"],
    )
    methods: list[str] = _help(
        "pruning methods: influence (one per curvature), influence_<curvature>, "
        "grad_dot, grad_cos, train_loss, margin, random",
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
    # -- runtime
    device: str = _help("device: auto, cpu or cuda[:N]", default="auto")
    num_threads: int | None = _help("torch CPU threads (None: torch's default)", default=None)
    progress: bool = _help("show progress bars", default=True)

    # ------------------------------------------------------------------------------------------
    def arm_methods(self) -> list[str]:
        """The harmful-arm methods with 'influence' expanded per curvature, in config order."""
        return _expand_methods(self.methods, self.curvatures)

    def helpful_arm_methods(self) -> list[str]:
        return [m for m in _expand_methods(self.helpful_methods, self.curvatures) if m != "random"]

    def helpful_arm_fractions(self) -> list[float]:
        return list(self.fractions if self.helpful_fractions is None else self.helpful_fractions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field; raise ValueError naming the field and the offending value."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), _hints()[f.name], f.name))
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
        self.arm_methods()
        self.helpful_arm_methods()
        if not self.methods:
            raise ValueError("methods is empty: give at least one method")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise!r}")
        if self.synthetic_pairs < 10:
            raise ValueError(f"synthetic_pairs must be at least 10, got {self.synthetic_pairs!r}")
        if self.max_pairs is not None and self.max_pairs < 10:
            raise ValueError(f"max_pairs must be at least 10 (or None), got {self.max_pairs!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length!r}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(
                f"lora_layers must be a positive number of layers (or None), got {self.lora_layers!r}"
            )
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.model.startswith("tiny:"):
            family = self.model.split(":", 1)[1]
            if family not in ("gpt_neox", "llama", "bert", "gpt2"):
                raise ValueError(f"model {self.model!r}: tiny family must be gpt_neox, llama, bert or gpt2")
        _check_section(self.lora, "lora", _lora_fields())
        _check_section(self.train, "train", _train_fields(), managed=_MANAGED_SECTION_KEYS)
        _check_section(self.score, "score", _score_fields(), managed=_MANAGED_SECTION_KEYS + ("curvature",))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(ExperimentConfig)


def _expand_methods(methods: Sequence[str], curvatures: Sequence[str]) -> list[str]:
    out: list[str] = []
    for m in methods:
        if m == "influence":
            names = [f"influence_{c}" for c in curvatures]
        elif m.startswith("influence_"):
            c = m[len("influence_") :]
            if c not in curvatures:
                raise ValueError(
                    f"method {m!r} needs curvature {c!r} in curvatures (have {list(curvatures)})"
                )
            names = [m]
        elif m in BASE_METHODS:
            names = [m]
        else:
            raise ValueError(f"unknown method {m!r}; expected one of {BASE_METHODS} or influence_<curvature>")
        out.extend(n for n in names if n not in out)
    return out


def _dataclass_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _lora_fields() -> dict[str, dataclasses.Field]:
    from prefprune.model import LoRASettings

    return _dataclass_fields(LoRASettings)


def _train_fields() -> dict[str, dataclasses.Field]:
    from prefprune.train import TrainConfig

    return _dataclass_fields(TrainConfig)


def _score_fields() -> dict[str, dataclasses.Field]:
    from prefprune.score import ScoreConfig

    return _dataclass_fields(ScoreConfig)


def _check_section(
    values: Mapping[str, Any],
    section: str,
    fields: Mapping[str, dataclasses.Field],
    *,
    managed: Sequence[str] = (),
) -> None:
    if not isinstance(values, Mapping):
        raise ValueError(f"{section} must be a mapping of settings, got {values!r}")
    for key in values:
        if key in managed:
            raise ValueError(
                f"{section}.{key} is set by the experiment (use the top-level "
                f"{'seeds' if key == 'seed' else key}{'' if key != 'curvature' else 's'} field)"
            )
        if key not in fields:
            raise ValueError(
                f"unknown key {section}.{key}; known: {sorted(k for k in fields if k not in managed)}"
            )


# ----------------------------------------------------------------------------------------------
# Config loading: YAML and command line
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` against type hint `tp` (int, float, bool, str, list[...], dict, X | None)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        return value
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            and not (isinstance(value, float) and value.is_integer())
        ):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Read a YAML config (unknown keys are errors naming the file and key), apply overrides, validate.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: field → value (e.g. from the command line); dotted keys set one entry of a section
            (``"train.lr"``).

    Returns:
        A validated ExperimentConfig.
    """
    import yaml

    values: dict[str, Any] = {}
    known = _dataclass_fields(ExperimentConfig)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: invalid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"{p}: the config must be a mapping of keys to values, got {type(loaded).__name__}"
            )
        for key, value in loaded.items():
            if key not in known:
                line = _yaml_line(p, str(key))
                raise ValueError(
                    f"{p}{f', line {line}' if line else ''}: unknown config key {key!r}; known keys: "
                    f"{', '.join(sorted(known))}"
                )
            values[key] = value
    for key, value in (overrides or {}).items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("train", "score", "lora"):
                raise ValueError(f"unknown config key {key!r}")
            values[section] = {**dict(values.get(section) or {}), sub: value}
        elif key not in known:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        else:
            values[key] = value
    cfg = ExperimentConfig(**values)
    try:
        cfg.validate()
    except ValueError as exc:
        if path is not None:
            raise ValueError(f"{path}: {exc}") from None
        raise
    return cfg


def _yaml_line(path: Path, key: str) -> int | None:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith(f"{key}:") or line.startswith(f"'{key}':") or line.startswith(f'"{key}":'):
            return i
    return None


def _parse_cli_value(text: str, tp: Any, where: str) -> Any:
    """Parse a flag value as YAML; for list fields also accept comma-separated values."""
    import yaml

    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_list = origin is list or any(typing.get_origin(a) is list for a in args)
    if is_list and not text.strip().startswith("["):
        items = [t for t in text.split(",") if t.strip()]
        return [yaml.safe_load(t) for t in items]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"--{where}: cannot parse {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per ExperimentConfig field (plus --train.X / --score.X / --lora.X).

    Flags default to "not given", so a YAML value is only overridden by a flag actually passed.
    """
    parser.add_argument("--config", help="YAML config file (keys = the flags below without dashes)")
    hints = _hints()
    for f in dataclasses.fields(ExperimentConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        if f.name in ("train", "score", "lora"):
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg:{f.name}",
            default=argparse.SUPPRESS,
            metavar=_type_name(tp).upper().replace(" ", ""),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )
    for section, fields_fn in (("train", _train_fields), ("score", _score_fields), ("lora", _lora_fields)):
        try:
            sec_fields = fields_fn()
        except ImportError:
            continue
        managed = _MANAGED_SECTION_KEYS + (("curvature",) if section == "score" else ())
        group = parser.add_argument_group(
            f"{section} settings",
            hints[section] and dict(_dataclass_fields(ExperimentConfig))[section].metadata["help"],
        )
        for name, sf in sec_fields.items():
            if name in managed:
                continue
            d = (
                sf.default
                if sf.default is not dataclasses.MISSING
                else (sf.default_factory() if sf.default_factory is not dataclasses.MISSING else None)
            )
            group.add_argument(
                f"--{section}.{name}",
                dest=f"cfg:{section}.{name}",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"{sf.metadata.get('help', '')} (default: {d!r})",
            )


def config_from_args(
    args: argparse.Namespace, *, defaults: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """The ExperimentConfig from a parsed namespace of `add_config_arguments`.

    Precedence: the flags given, then the YAML file of --config, then `defaults`, then the field defaults.
    """
    hints = _hints()
    overrides: dict[str, Any] = dict(defaults or {})
    for dest, raw in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        key = dest[4:]
        if "." in key:
            section, sub = key.split(".", 1)
            sec_cls = {"train": _train_fields, "score": _score_fields, "lora": _lora_fields}[section]
            sec_hint = _section_hints(section).get(sub, Any)
            del sec_cls
            overrides[key] = _parse_cli_value(raw, sec_hint, key)
        else:
            overrides[key] = _parse_cli_value(raw, hints[key], key)
    path = getattr(args, "config", None)
    if defaults and path is not None:
        raise ValueError("a config file cannot be combined with built-in defaults (e.g. the demo's settings)")
    return load_config(path, overrides)


def _section_hints(section: str) -> dict[str, Any]:
    if section == "train":
        from prefprune.train import TrainConfig as cls
    elif section == "score":
        from prefprune.score import ScoreConfig as cls
    else:
        from prefprune.model import LoRASettings as cls
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 — a hint we cannot resolve only loses flag-type parsing
        return {}


# ----------------------------------------------------------------------------------------------
# Step files
# ----------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class _Steps:
    """Finished steps as JSON files under the output folder."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, rel: str) -> dict | None:
        return _read_json(self.root / rel)

    def put(self, rel: str, obj: Mapping[str, Any]) -> dict:
        _write_json_atomic(self.root / rel, obj)
        return dict(obj)


def _frac_tag(f: float) -> str:
    return f"{f:g}"


def arm_step_name(seed: int, method: str, mode: str, fraction: float) -> str:
    """Relative path of one prune-and-retrain step's file."""
    return f"seed{seed}/arms/{method}__{mode}__{_frac_tag(fraction)}.json"


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _load_data(cfg: ExperimentConfig):
    from prefprune.data import load_or_generate

    data = load_or_generate(
        cfg.data,
        synthetic_pairs=cfg.synthetic_pairs,
        label_noise=cfg.label_noise,
        seed=cfg.data_seed,
        schema=cfg.data_schema,
        split=cfg.data_split,
        name=cfg.data_name,
        max_pairs=cfg.max_pairs,
        skip_bad=cfg.skip_bad,
    )
    if cfg.label_noise and cfg.data != "synthetic":
        data = plant_label_noise(data, cfg.label_noise, seed=cfg.data_seed)
    return data


def plant_label_noise(dataset, fraction: float, *, seed: int):
    """Swap chosen and rejected of a seeded `fraction` of the pairs and mark them `meta["flipped"]`.

    Measures how well scores find wrong labels in real data (whose own noise is unknown).

    Returns:
        A new PreferenceDataset; `flipped_ids` lists the swapped pairs.
    """
    from prefprune.data import PreferenceDataset

    if dataset.flipped_ids:
        raise ValueError(f"{dataset.source!r} already has planted noise ({len(dataset.flipped_ids)} pairs)")
    n = len(dataset)
    k = int(round(fraction * n))
    flip = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    pairs = [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, meta={**p.meta, "flipped": True})
        if i in flip
        else p
        for i, p in enumerate(dataset.pairs)
    ]
    return PreferenceDataset(pairs, schema=dataset.schema, source=dataset.source, stats=dataset.stats)


def _build_model(cfg: ExperimentConfig, seed: int):
    from prefprune.model import LoRASettings, build_reward_model
    from prefprune.testing import tiny_config, tiny_tokenizer

    lora = LoRASettings(**cfg.lora)
    dtype = _DTYPES[cfg.dtype]
    if cfg.model.startswith("tiny:"):
        model, _ = build_reward_model(
            tiny_config(cfg.model.split(":", 1)[1]), lora=lora, dtype=dtype, seed=seed
        )
        tokenizer = tiny_tokenizer()
    else:
        model, tokenizer = build_reward_model(cfg.model, lora=lora, dtype=dtype, seed=seed)
    if cfg.lora_layers is not None:
        adapt_top_layers(model, cfg.lora_layers)
    return model, tokenizer


def _num_layers(cfg: ExperimentConfig) -> int:
    """Number of transformer layers of the configured base model (read from its config only)."""
    if cfg.model.startswith("tiny:"):
        from prefprune.testing import tiny_config

        return int(tiny_config(cfg.model.split(":", 1)[1]).num_hidden_layers)
    from transformers import AutoConfig

    from prefprune.model import resolve_backbone

    return int(AutoConfig.from_pretrained(resolve_backbone(cfg.model)).num_hidden_layers)


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"saved state has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _train_config(cfg: ExperimentConfig, seed: int):
    from prefprune.train import TrainConfig

    runtime = {"device": None if cfg.device == "auto" else cfg.device, "progress": cfg.progress}
    return TrainConfig(**{**runtime, **cfg.train, "seed": seed, "max_length": cfg.max_length})


def _score_config(cfg: ExperimentConfig, seed: int, curvature: str):
    from prefprune.score import ScoreConfig

    kwargs = {
        "progress": cfg.progress,
        **cfg.score,
        "curvature": curvature,
        "seed": seed,
        "max_length": cfg.max_length,
    }
    config = ScoreConfig(**kwargs)
    config.validate()
    return config


def _score_result_table(result: Any, *, source: str) -> ScoreTable:
    """A prefprune.score.ScoreResult (ids + columns + metadata) as a ScoreTable."""
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in result.columns.items()}
    return ScoreTable(
        ids=[str(i) for i in result.ids], columns=columns, metadata=_jsonable(result.metadata), source=source
    )


def _evaluate(
    model, tokenizer, data, cfg: ExperimentConfig, *, clean_ids: set[str] | None = None
) -> dict[str, Any]:
    """Test metrics; with `clean_ids`, also accuracy/loss on those pairs (from the same margins)."""
    import torch.nn.functional as F

    from prefprune import train as train_mod

    out = dict(
        train_mod.evaluate(
            model,
            tokenizer,
            data,
            batch_size=cfg.eval_batch_size,
            max_length=cfg.max_length,
            return_margins=clean_ids is not None,
        )
    )
    margins = out.pop("margins", None)
    if margins is not None:
        m = torch.tensor([v for k, v in margins.items() if k in clean_ids], dtype=torch.float64)
        out["clean"] = {
            "accuracy": float((m > 0).double().mean()),
            "mean_margin": float(m.mean()),
            "loss": float(F.softplus(-m).mean()),
            "n": int(m.numel()),
        }
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


class _Timer:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self) -> _Timer:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def _check_resume(out: Path, cfg: ExperimentConfig) -> None:
    prev = _read_json(out / "config.json")
    now = json.loads(json.dumps(cfg.to_dict(), default=_json_default))
    if prev is None:
        _write_json_atomic(out / "config.json", now)
        return
    diff = sorted(k for k in set(prev) | set(now) if k not in _RESUME_FREE and prev.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {prev.get(k)!r} -> {now.get(k)!r}" for k in diff[:5])
        raise ValueError(
            f"{out} holds an experiment with a different config ({shown}); use a new output folder "
            "or restore the old settings to resume"
        )


def _split(cfg: ExperimentConfig, dataset, steps: _Steps):
    train, val, test = dataset.split(cfg.split, seed=cfg.split_seed)
    parts = {"train": train.ids, "validation": val.ids, "test": test.ids}
    for a in parts:
        for b in parts:
            if a < b and set(parts[a]) & set(parts[b]):
                raise AssertionError(f"split parts {a} and {b} overlap")
    for name, ids in parts.items():
        if len(ids) < 2:
            raise ValueError(
                f"the {name} split has {len(ids)} pairs; use more data or larger split fractions"
            )
    prev = steps.get("splits.json")
    if prev is None:
        steps.put("splits.json", parts)
    elif prev != parts:
        raise ValueError(
            "the data or its split changed since this output folder was started; use a new folder"
        )
    return train, val, test


def _validate_before_training(cfg: ExperimentConfig, n_train: int) -> None:
    for f in cfg.fractions + cfg.helpful_arm_fractions():
        n_to_select(n_train, f)
    from prefprune.score import ScoreConfig  # noqa: F401  (fail early when scoring is unavailable)

    for c in cfg.curvatures:
        _score_config(cfg, 0, c)
    _train_config(cfg, 0)


class _SeedRun:
    """The model of one seed, built lazily (a fully finished seed never loads it), and its retrains."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        seed: int,
        out: Path,
        cache: PrefixCache | None,
        test,
        clean_ids: set[str] | None,
    ):
        self.cfg, self.seed, self.out, self.cache = cfg, seed, out, cache
        self.test, self.clean_ids = test, clean_ids
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.installed: InstalledCache | None = None
        self.init_state: dict[str, Tensor] | None = None
        self.build_seconds = 0.0

    def ensure_model(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            with _Timer() as tm:
                model, tok = _build_model(self.cfg, self.seed)
                from prefprune.train import resolve_device

                model.to(resolve_device(None if self.cfg.device == "auto" else self.cfg.device))
                if self.cache is not None:
                    self.installed = self.cache.install(model)
                self.model, self.tokenizer = model, tok
                init_path = self.out / f"seed{self.seed}" / "init_state.pt"
                if init_path.is_file():
                    # The initialisation this seed's finished steps started from (builds are seeded, so this
                    # is the same values; loading it guards against library changes between invocations).
                    _load_trainable(model, torch.load(init_path, map_location="cpu"))
                else:
                    _save_state_atomic(_trainable_state(model), init_path)
                self.init_state = _trainable_state(model)
            self.build_seconds += tm.seconds
        return self.model, self.tokenizer

    def train_and_test(self, data, tag: str) -> tuple[dict[str, Any], dict[str, Any], _Timer]:
        """Restore the seed's initial weights, train on `data`, evaluate on the test split."""
        from prefprune import train as train_mod

        model, tok = self.ensure_model()
        _load_trainable(model, self.init_state)
        with _Timer() as tm:
            stats = train_mod.train_reward_model(model, tok, data, config=_train_config(self.cfg, self.seed))
            result = _evaluate(model, tok, self.test, self.cfg, clean_ids=self.clean_ids)
        logger.info("seed %d %s: test accuracy %.4f (%.1fs)", self.seed, tag, result["accuracy"], tm.seconds)
        stats = {k: v for k, v in stats.items() if k != "history"} | {
            "final_step": (stats.get("history") or [{}])[-1]
        }
        return _jsonable(stats), result, tm

    def close(self) -> None:
        if self.installed is not None:
            self.installed.remove()
        self.model = None


def _fits(pairs, tokenizer, max_length: int, *, truncation: str = "error") -> tuple[list[str], list[str]]:
    """Ids of the pairs that fit `max_length` (with `truncation`), and of those that do not."""
    from prefprune.train import encode_for_training

    _, too_long = encode_for_training(
        pairs, tokenizer, max_length=max_length, truncation=truncation, too_long="skip"
    )
    left_out = set(too_long)
    return [p.id for p in pairs if p.id not in left_out], too_long


def _load_tokenizer(cfg: ExperimentConfig):
    """The tokenizer of the configured model, without loading the model."""
    if cfg.model.startswith("tiny:"):
        from prefprune.testing import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    from prefprune.model import resolve_backbone

    return AutoTokenizer.from_pretrained(resolve_backbone(cfg.model))


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) the protocol described in the module docstring; write results, report, plots.

    Args:
        cfg: the experiment settings (validated again here).

    Returns:
        The results dict that is also written to `<output>/results.json`.
    """
    from prefprune import score as score_mod
    from prefprune.prune import check_ids_match

    cfg.validate()
    t_start = time.perf_counter()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(out)

    dataset = _load_data(cfg)
    train, val, test = _split(cfg, dataset, steps)
    # Training pairs whose response alone exceeds max_length can be neither trained on nor scored: leave
    # them out of the experiment (counted in results.json) rather than let each stage treat them its own way.
    fit_ids, too_long_ids = _fits(train, _load_tokenizer(cfg), cfg.max_length, truncation="prompt")
    if too_long_ids:
        logger.warning(
            "left out %d of %d training pairs whose responses exceed max_length=%d (e.g. %s)",
            len(too_long_ids),
            len(train),
            cfg.max_length,
            too_long_ids[:3],
        )
        train = train.select(fit_ids)
    _validate_before_training(cfg, len(train))
    _check_resume(out, cfg)

    flipped = dataset.flipped_ids
    flipped_train = sorted(flipped & set(train.ids))
    clean_ids = set(test.ids) - flipped if flipped & set(test.ids) else None
    arm_methods = cfg.arm_methods()
    helpful_methods = cfg.helpful_arm_methods()
    score_methods = [m for m in dict.fromkeys(arm_methods + helpful_methods) if m != "random"]
    if not score_methods:
        curvatures: list[str] = []
    elif any(m.startswith("influence_") for m in score_methods):
        curvatures = list(cfg.curvatures)
    else:
        # grad_dot / grad_cos / train_loss only: one pass, no curvature solve needed.
        curvatures = ["identity"]
    cache = None
    if cfg.lora_layers is not None and cfg.cache_prefix:
        n_layers = _num_layers(cfg)
        if cfg.lora_layers > n_layers:
            raise ValueError(f"lora_layers={cfg.lora_layers} but {cfg.model!r} has {n_layers} layers")
        if cfg.lora_layers < n_layers:
            cache = PrefixCache(n_layers - cfg.lora_layers)
    val_scoring = val
    val_checked = False
    if cfg.trusted_validation:
        if not flipped:
            raise ValueError(
                "trusted_validation needs planted label noise (label_noise > 0) to know the clean pairs"
            )
        # A clean validation set: the assumption of noisy-label methods that rely on trusted data.
        val_scoring = val.exclude(flipped & set(val.ids))
    for seed in cfg.seeds:
        run = _SeedRun(cfg, seed, out, cache, test, clean_ids)

        base_rel = f"seed{seed}/baseline.json"
        base_state_path = out / f"seed{seed}" / "baseline_state.pt"
        if steps.get(base_rel) is None or not base_state_path.is_file():
            stats, result, tm = run.train_and_test(train, "baseline")
            _save_state_atomic(_trainable_state(run.model), base_state_path)
            steps.put(
                base_rel,
                {
                    "seed": seed,
                    "n_train": len(train),
                    "test": result,
                    "train_stats": stats,
                    "seconds": tm.seconds,
                    "cpu_seconds": tm.cpu_seconds,
                },
            )

        tables: dict[str, ScoreTable] = {}
        for curv in curvatures:
            rel = f"seed{seed}/scores_{curv}.json"
            rec = steps.get(rel)
            if rec is None:
                model, tok = run.ensure_model()
                if not val_checked:
                    ok, too_long = _fits(val_scoring, tok, cfg.max_length)
                    if too_long:
                        logger.warning(
                            "scoring uses %d of %d validation pairs: %d do not fit max_length=%d uncut",
                            len(ok),
                            len(val_scoring),
                            len(too_long),
                            cfg.max_length,
                        )
                        if not ok:
                            raise ValueError(f"no validation pair fits max_length={cfg.max_length}")
                        val_scoring = val_scoring.select(ok)
                    val_checked = True
                _load_trainable(model, torch.load(base_state_path, map_location="cpu"))
                with _Timer() as tm:
                    res = score_mod.score_pairs(
                        model, tok, train, val_scoring, config=_score_config(cfg, seed, curv)
                    )
                table = _score_result_table(res, source=f"seed {seed} scores ({curv})")
                check_ids_match(train.ids, table)
                rec = steps.put(
                    rel,
                    {
                        "curvature": curv,
                        "seconds": tm.seconds,
                        "cpu_seconds": tm.cpu_seconds,
                        "n_validation": len(val_scoring),
                        **table.to_json(),
                    },
                )
                logger.info(
                    "seed %d: scored %d pairs, %s curvature (%.1fs)", seed, len(train), curv, tm.seconds
                )
            tables[curv] = ScoreTable.from_json(rec, source=str(out / rel))
        merged = _merge_tables(tables, train.ids) if tables else None

        arms = [(m, "harmful", f) for m in arm_methods for f in cfg.fractions]
        arms += [(m, "helpful", f) for m in helpful_methods for f in cfg.helpful_arm_fractions()]
        for method, mode, fraction in arms:
            rel = arm_step_name(seed, method, mode, fraction)
            if steps.get(rel) is not None:
                continue
            if method == "random":
                sel = select_pairs(train.ids, None, method="random", fraction=fraction, mode=mode, seed=seed)
            elif not np.all(np.isfinite(merged.column(method))):
                # e.g. influence_exact after CG met non-positive curvature with score.on_nonpositive: nan.
                reason = f"non-finite {method} scores ({merged.metadata})"[:500]
                logger.warning("seed %d: skipping %s %s %g: %s", seed, method, mode, fraction, reason)
                steps.put(
                    rel,
                    {"seed": seed, "method": method, "mode": mode, "fraction": fraction, "skipped": reason},
                )
                continue
            else:
                sel = select_pairs(
                    merged.ids, merged.column(method), method=method, fraction=fraction, mode=mode
                )
            pruned = train.exclude(sel.ids)
            stats, result, tm = run.train_and_test(pruned, f"{method} {mode} {fraction:g}")
            steps.put(
                rel,
                {
                    "seed": seed,
                    "method": method,
                    "mode": mode,
                    "fraction": fraction,
                    "n_train": len(pruned),
                    "n_removed": len(sel.ids),
                    "n_flipped_removed": len(set(sel.ids) & set(flipped_train)),
                    "removed_ids": list(sel.ids),
                    "test": result,
                    "train_stats": stats,
                    "seconds": tm.seconds,
                    "cpu_seconds": tm.cpu_seconds,
                },
            )
        run.close()
        if cache is not None:
            logger.info(
                "prefix cache: %d sequences, %.1f MB, %d hits, %d misses",
                len(cache),
                cache.nbytes / 2**20,
                cache.hits,
                cache.misses,
            )

    results = collect_results(
        cfg,
        out,
        dataset=dataset,
        splits=(train, val, test),
        flipped_train=flipped_train,
        curvatures=curvatures,
    )
    results["timings"]["this_invocation_seconds"] = time.perf_counter() - t_start
    results["data"]["train_left_out_too_long"] = too_long_ids
    results["data"]["n_validation_used_for_scoring"] = len(val_scoring)
    if cache is not None:
        results["prefix_cache"] = {
            "sequences": len(cache),
            "megabytes": cache.nbytes / 2**20,
            "hits": cache.hits,
            "misses": cache.misses,
            "cached_layers": cache.n_prefix,
        }
    _write_json_atomic(out / "results.json", results)
    from prefprune.report import write_report

    write_report(results, out)
    return results


def _save_state_atomic(state: Mapping[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save({k: v.detach().cpu() for k, v in state.items()}, fh))


def _jsonable(obj: Any) -> Any:
    return json.loads(
        json.dumps(obj, default=lambda o: _json_default(o) if not isinstance(o, (set, tuple)) else list(o))
    )


def _merge_tables(tables: Mapping[str, ScoreTable], ids: Sequence[str]) -> ScoreTable:
    """One table: influence_<curvature> per pass, the shared columns from the first pass, in `ids` order."""
    cols: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    first = True
    for curv, tab in tables.items():
        pos = {i: k for k, i in enumerate(tab.ids)}
        order = np.asarray([pos[i] for i in ids])
        cols[f"influence_{curv}"] = tab.column("influence")[order]
        if first:
            for c in _SHARED_COLUMNS:
                if c in tab.columns:
                    cols[c] = tab.columns[c][order]
            first = False
        meta[curv] = tab.metadata
    return ScoreTable(ids=list(ids), columns=cols, metadata=meta, source="merged scores")


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def collect_results(
    cfg: ExperimentConfig,
    out: Path,
    *,
    dataset,
    splits,
    flipped_train: Sequence[str],
    curvatures: Sequence[str],
) -> dict[str, Any]:
    """Gather the step files of `out` into one results dict (every number, every setting)."""
    train, val, test = splits
    steps = _Steps(out)
    flipped = set(flipped_train)
    per_seed_baseline = {}
    arms: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    score_meta: dict[str, Any] = {}
    score_seconds: dict[str, float] = {}
    step_seconds = 0.0
    step_cpu = 0.0
    skipped: list[dict[str, Any]] = []
    arm_keys = [(m, "harmful", f) for m in cfg.arm_methods() for f in cfg.fractions]
    arm_keys += [(m, "helpful", f) for m in cfg.helpful_arm_methods() for f in cfg.helpful_arm_fractions()]
    histograms: dict[str, dict[str, list[float]]] = {}
    for seed in cfg.seeds:
        base = steps.get(f"seed{seed}/baseline.json")
        if base is None:
            continue
        step_seconds += base["seconds"]
        step_cpu += base.get("cpu_seconds", 0.0)
        per_seed_baseline[seed] = {
            "accuracy": base["test"]["accuracy"],
            "test": base["test"],
            "train_stats": base["train_stats"],
            "seconds": base["seconds"],
        }
        tables = {}
        for curv in curvatures:
            rec = steps.get(f"seed{seed}/scores_{curv}.json")
            if rec is not None:
                tables[curv] = ScoreTable.from_json(rec)
                score_meta[f"seed{seed}/{curv}"] = rec.get("metadata", {})
                score_seconds[f"seed{seed}/{curv}"] = rec["seconds"]
                step_seconds += rec["seconds"]
                step_cpu += rec.get("cpu_seconds", 0.0)
        merged = _merge_tables(tables, train.ids) if tables else None
        if merged is not None and flipped:
            noisy = np.asarray([i in flipped for i in merged.ids])
            for col in merged.columns:
                if (
                    col not in _DETECTION_COLUMNS
                    and col not in cfg.methods
                    and not col.startswith("influence_")
                ):
                    continue
                vals = merged.column(col)
                high = higher_is_suspect(col)
                if not np.all(np.isfinite(vals)):
                    detection.append(
                        {
                            "seed": seed,
                            "method": col,
                            "auc": None,
                            "precision_at_k": None,
                            "k": len(flipped),
                            "note": "non-finite scores",
                        }
                    )
                    continue
                detection.append(
                    {
                        "seed": seed,
                        "method": col,
                        "k": len(flipped),
                        "auc": detection_auc(vals, noisy, higher_is_suspect=high),
                        "precision_at_k": precision_at_k(
                            vals, noisy, k=len(flipped), higher_is_suspect=high, ids=merged.ids
                        ),
                    }
                )
                if seed == cfg.seeds[0]:
                    histograms[col] = {"flipped": vals[noisy].tolist(), "clean": vals[~noisy].tolist()}
            rng = np.random.default_rng(seed)
            rand = rng.uniform(size=len(merged.ids))
            detection.append(
                {
                    "seed": seed,
                    "method": "random",
                    "k": len(flipped),
                    "auc": detection_auc(rand, noisy, higher_is_suspect=True),
                    "precision_at_k": precision_at_k(rand, noisy, k=len(flipped), higher_is_suspect=True),
                }
            )
        elif merged is not None and seed == cfg.seeds[0]:
            for col in merged.columns:
                histograms[col] = {"all": merged.column(col).tolist()}
        for method, mode, fraction in arm_keys:
            rec = steps.get(arm_step_name(seed, method, mode, fraction))
            if rec is None:
                continue
            if "skipped" in rec:
                skipped.append(rec)
                continue
            step_seconds += rec["seconds"]
            step_cpu += rec.get("cpu_seconds", 0.0)
            row = {
                k: rec[k]
                for k in (
                    "seed",
                    "method",
                    "mode",
                    "fraction",
                    "n_train",
                    "n_removed",
                    "n_flipped_removed",
                    "seconds",
                )
            }
            row["accuracy"] = rec["test"]["accuracy"]
            row["delta"] = rec["test"]["accuracy"] - base["test"]["accuracy"]
            if "clean" in rec["test"]:
                row["clean_accuracy"] = rec["test"]["clean"]["accuracy"]
                row["clean_delta"] = rec["test"]["clean"]["accuracy"] - base["test"]["clean"]["accuracy"]
            row["test"] = rec["test"]
            row["train_stats"] = rec["train_stats"]
            arms.append(row)

    summary_arms = []
    for method, mode, fraction in arm_keys:
        rows = [r for r in arms if (r["method"], r["mode"], r["fraction"]) == (method, mode, fraction)]
        if not rows:
            continue
        acc_m, acc_s = mean_std([r["accuracy"] for r in rows])
        d_m, d_s = mean_std([r["delta"] for r in rows])
        entry = {
            "method": method,
            "mode": mode,
            "fraction": fraction,
            "n_seeds": len(rows),
            "accuracy_mean": acc_m,
            "accuracy_std": acc_s,
            "delta_mean": d_m,
            "delta_std": d_s,
            "n_removed": rows[0]["n_removed"],
            "flipped_share_of_removed": float(
                np.mean([r["n_flipped_removed"] / r["n_removed"] for r in rows])
            ),
        }
        if "clean_accuracy" in rows[0]:
            entry["clean_accuracy_mean"], entry["clean_accuracy_std"] = mean_std(
                [r["clean_accuracy"] for r in rows]
            )
            entry["clean_delta_mean"], entry["clean_delta_std"] = mean_std([r["clean_delta"] for r in rows])
        summary_arms.append(entry)
    base_vals = [b["accuracy"] for b in per_seed_baseline.values()]
    bm, bs = mean_std(base_vals)
    baseline_summary = {"accuracy_mean": bm, "accuracy_std": bs, "n_seeds": len(base_vals)}
    if per_seed_baseline and "clean" in next(iter(per_seed_baseline.values()))["test"]:
        cm, cs = mean_std([b["test"]["clean"]["accuracy"] for b in per_seed_baseline.values()])
        baseline_summary.update(clean_accuracy_mean=cm, clean_accuracy_std=cs)
    det_summary = []
    for method in dict.fromkeys(d["method"] for d in detection):
        rows = [d for d in detection if d["method"] == method and d["auc"] is not None]
        if not rows:
            continue
        am, as_ = mean_std([d["auc"] for d in rows])
        pm, ps = mean_std([d["precision_at_k"] for d in rows])
        det_summary.append(
            {
                "method": method,
                "auc_mean": am,
                "auc_std": as_,
                "precision_at_k_mean": pm,
                "precision_at_k_std": ps,
                "k": rows[0]["k"],
                "n_seeds": len(rows),
            }
        )
    return {
        "config": json.loads(json.dumps(cfg.to_dict(), default=_json_default)),
        "versions": package_versions(),
        "machine": _machine(),
        "data": {
            "source": dataset.source,
            "schema": dataset.schema,
            "n_pairs": len(dataset),
            "n_train": len(train),
            "n_validation": len(val),
            "n_test": len(test),
            "n_flipped": len(dataset.flipped_ids),
            "n_flipped_train": len(flipped),
            "n_flipped_validation": len(dataset.flipped_ids & set(val.ids)),
            "n_flipped_test": len(dataset.flipped_ids & set(test.ids)),
            "split_note": "one split (split_seed) shared by all seeds; validation used only for scoring, "
            "test only for accuracy",
        },
        "baseline": {"per_seed": per_seed_baseline, **baseline_summary},
        "arms": arms,
        "skipped_arms": skipped,
        "summary": {"arms": summary_arms, "noise_detection": det_summary},
        "noise_detection": detection,
        "scores": {"metadata": score_meta, "seconds": score_seconds},
        "histograms": histograms,
        "timings": {"sum_of_step_seconds": step_seconds, "sum_of_step_cpu_seconds": step_cpu},
        "modes": list(MODES),
    }
