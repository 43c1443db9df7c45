"""Where `prefprune.validate` gets its setup from: a model folder's recorded training, or an experiment."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prefprune import train as train_mod
from prefprune._config import from_mapping
from prefprune.data import pairs_digest
from prefprune.data.config import SYNTHETIC, DataConfig, load_data
from prefprune.data.noise import restore_labels
from prefprune.experiment.config import load_config
from prefprune.experiment.setup import build_seed_model, fit_pairs, prefix_cache
from prefprune.model import ModelConfig, build_model, training_metadata
from prefprune.score import ScoreConfig
from prefprune.train import TrainConfig, split_for_eval

logger = logging.getLogger(__name__)

__all__ = [
    "ValidationSetup", "check_disjoint", "fit_max_length", "setup_from_experiment", "setup_from_folder"
]


@dataclass
class ValidationSetup:
    """What a retrain needs: the data, a model at its initial weights, the training and scoring settings.

    Attributes:
        train, val: training and validation pairs (PreferenceDatasets).
        build: returns (model, tokenizer) at the initial weights, on its device (called once).
        train_config: the settings every retrain uses (the reference's included).
        score_config: scoring settings; curvature, damping and progress are set per score pass.
        source: where the setup came from (recorded in validate.json).
        reseed: the same setup for another training seed (its own initial weights and data order), for
            ensembles; None if the source cannot give one.
        test: test pairs of the pruning check (None: none given).
    """

    train: Any
    val: Any
    build: Callable[[], tuple[nn.Module, Any]]
    train_config: TrainConfig
    score_config: ScoreConfig
    source: dict[str, Any]
    reseed: Callable[[int], ValidationSetup] | None = None
    test: Any = None


def fit_max_length(setup: ValidationSetup, tokenizer: Any) -> ValidationSetup:
    """The setup with `prefprune experiment`'s rule applied before any retrain: training pairs whose
    responses alone exceed max_length and validation pairs that do not fit uncut are left out with a
    warning (scoring cannot use them), and none fitting is an error; test pairs follow evaluation's rule
    (the prompt cut, too-long responses left out) once, instead of a warning per retrain."""
    max_length = setup.score_config.max_length
    train = fit_pairs(setup.train, tokenizer, max_length, "training pairs", cut_prompt=True)[0]
    val = fit_pairs(setup.val, tokenizer, max_length, "validation pairs", cut_prompt=False)[0]
    test = None if setup.test is None else fit_pairs(setup.test, tokenizer, max_length, "test pairs",
                                                      cut_prompt=True)[0]
    return dataclasses.replace(setup, train=train, val=val, test=test)


def check_disjoint(setup: ValidationSetup) -> None:
    """Raise ValueError when the training, validation and test pairs share pair ids."""
    parts = {"training": setup.train, "validation": setup.val, "test": setup.test}
    names = [k for k, v in parts.items() if v is not None]
    for a, b in ((a, b) for i, a in enumerate(names) for b in names[i + 1:]):
        both = sorted(set(parts[a].ids) & set(parts[b].ids))
        if both:
            raise ValueError(
                f"{len(both)} {b} pairs ({parts[b].source or b}) are also {a} pairs "
                f"({parts[a].source or a}), e.g. {both[:3]}: give {b} pairs the model is not trained on"
                + (" (--val; the folder's held-out split is used without it)" if b == "validation" else "")
            )


def _recorded_data(model: str, data_cfg: DataConfig, source: str, digest: str | None, what: str) -> Any:
    """The data a model folder records, checked against the digest `prefprune train` recorded with it."""
    if source != SYNTHETIC and not Path(source).is_absolute() and Path(source).exists():
        logger.warning("%s: the %s %r is recorded relative to the folder prefprune train ran in (an older "
                       "prefprune); reading %s", model, what, source, Path(source).resolve())
    data = load_data(data_cfg, source=source)
    have = pairs_digest(data) if digest is not None else None
    if have is not None and have != digest:
        raise ValueError(
            f"{model}: the {what} {source!r} is not the data this model was trained on (pairs digest "
            f"{have[:12]}…; prefprune.json records {digest[:12]}…): the file changed since "
            "training; restore it, or train again on the changed data"
        )
    return data


def setup_from_folder(model: str, *, val_source: str | None, device: str | None, score: ScoreConfig,
                      train_source: str | None = None, test_source: str | None = None) -> ValidationSetup:
    """The setup a model folder written by ``prefprune train`` records (its data, split and settings).

    Args:
        model: the folder; val_source: validation data (default: the folder's held-out pairs);
        device: where retrains run; score: scoring settings (curvature, damping, progress: set per pass);
        train_source: training pairs, all of them retrained on and scored (default: the pairs the folder
            records, its held-out split removed); test_source: test pairs of the pruning check.
        Every file is read with the folder's data settings (schema, split, skip_bad).
    """
    meta = training_metadata(model)
    missing = [k for k in ("train_config", "data_config", "model_config") if k not in meta]
    if missing:
        raise ValueError(
            f"{model}: no training metadata ({', '.join(missing)} missing from prefprune.json; folders "
            "written by prefprune train record them); give --config with the training settings instead"
        )
    train_cfg = from_mapping(TrainConfig, meta["train_config"], section="train_config")
    data_cfg = from_mapping(DataConfig, meta["data_config"], section="data_config")
    model_cfg = from_mapping(ModelConfig, meta["model_config"], section="model_config")
    info = meta.get("data", {})
    # The files prefprune train read, checked against the digests it recorded (a changed file is refused).
    data = _recorded_data(model, data_cfg, data_cfg.source, info.get("digest"), "training data")
    held = (_recorded_data(model, data_cfg, info["eval_data"], info.get("eval_digest"), "evaluation data")
            if info.get("eval_data") else None)
    train, held = split_for_eval(data, info.get("eval_fraction") or 0.0, seed=train_cfg.seed, held_out=held)
    if train_source is not None:
        train = load_data(data_cfg, source=train_source)
    val = load_data(data_cfg, source=val_source) if val_source is not None else held
    if val is None:
        raise ValueError(f"{model} was trained without held-out pairs: give --val")
    test = load_data(data_cfg, source=test_source) if test_source is not None else None
    train_cfg = dataclasses.replace(train_cfg, progress=False, device=device)

    def for_seed(seed: int) -> ValidationSetup:
        def build() -> tuple[nn.Module, Any]:
            net, tok = build_model(model_cfg, seed=seed)
            return net.to(train_mod.resolve_device(device)), tok

        score_cfg = dataclasses.replace(score, max_length=train_cfg.max_length, seed=seed)
        return ValidationSetup(train, val, build, dataclasses.replace(train_cfg, seed=seed), score_cfg,
                               {"model": model, "seed": seed}, for_seed, test)

    return for_seed(train_cfg.seed)


def setup_from_experiment(config: str, *, val_source: str | None, test_source: str | None = None
                          ) -> ValidationSetup:
    """The setup of an experiment config's first seed: its split, labels, model build and prefix cache
    (`fit_max_length` applies its max_length rule once the tokenizer is loaded).

    Args:
        config: the experiment's YAML; val_source, test_source: validation and test pairs (default: the
            experiment's validation and test splits).
    """
    # The experiment's shared setup: the same split, clean labels, model build and prefix cache as its seeds.
    cfg = load_config(config)
    dataset = load_data(cfg.data, plant_noise=True)
    if cfg.clean_eval:  # as the experiment: planted noise undone in the validation and test splits
        _, val0, test0 = dataset.split(cfg.split, seed=cfg.split_seed)
        dataset = restore_labels(dataset, set(val0.ids) | set(test0.ids))
    train, val, test = dataset.split(cfg.split, seed=cfg.split_seed)
    if test_source is not None:
        test = load_data(cfg.data, source=test_source)
    if val_source is not None:
        val = load_data(cfg.data, source=val_source)
    elif cfg.trusted_validation:
        val = val.exclude(dataset.flipped_ids & set(val.ids))
    cache = prefix_cache(cfg)

    def for_seed(seed: int) -> ValidationSetup:
        def build() -> tuple[nn.Module, Any]:
            model, tok = build_seed_model(cfg, seed)
            model.to(train_mod.resolve_device(None if cfg.device == "auto" else cfg.device))
            if cache is not None:
                cache.install(model)
            return model, tok

        train_cfg = dataclasses.replace(cfg.train_config(seed), progress=False)
        score_cfg = dataclasses.replace(cfg.score, max_length=cfg.max_length, seed=seed)
        return ValidationSetup(train, val, build, train_cfg, score_cfg, {"config": config, "seed": seed},
                               for_seed, test)

    return for_seed(cfg.seeds[0])
