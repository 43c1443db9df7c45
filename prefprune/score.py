"""Scoring, the stage: every training pair's influence and gradient-similarity scores, to a score file.

`score_pairs` scores pairs in memory with a model (`prefprune.influence.InfluenceScorer`: pass 1 → solve →
pass 2); `score_model` loads a saved model and the data, scores, and writes the score file and its sidecar.
Columns (positive = helpful for all but train_loss, DESIGN §2; `prefprune.influence.scores`):

- ``influence`` = qᵀ∇ℓ_i with q = (H + λI)⁻¹∇L_V,
- ``grad_dot`` = ∇L_Vᵀ∇ℓ_i, ``grad_cos`` = its cosine (0 for a zero gradient),
- ``train_loss`` = softplus(−m_i), ``margin`` = m_i, ``truncated`` = 1 when the prompt was cut.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefprune import distributed, shards
from prefprune.data import load_preferences, pairs_digest
from prefprune.data.config import absolute_source
from prefprune.influence.scorer import InfluenceScorer
from prefprune.influence.settings import ScoreConfig, ScoreResult
from prefprune.model import carry_settings, load_reward_model
from prefprune.scorefile import COLUMNS, OUTPUT_EXTENSIONS, check_output_path, write_scores

__all__ = [
    "COLUMNS",
    "OUTPUT_EXTENSIONS",
    "ScoreConfig",
    "ScoreResult",
    "check_output_path",
    "score_model",
    "score_pairs",
    "write_scores",
]


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    train: Sequence,
    val: Sequence,
    *,
    config: ScoreConfig | None = None,
    work_dir: str | os.PathLike | None = None,
) -> ScoreResult:
    """Score every training pair against the validation set.

    Under an initialised process group (e.g. `torchrun`), every rank calls this with the same inputs:
    each passes over a contiguous, length-balanced shard of every set, the validation gradient and the
    curvature products (or Gram rows) are combined over ranks so every rank solves the same system, and
    every rank returns the merged result (`prefprune.distributed`).

    Args:
        model: a LoRA reward model (trainable parameters = LoRA and head `nn.Linear`s).
        tokenizer: its tokenizer (with a pad token).
        train: training `PreferencePair`s (a `PreferenceDataset` or any sequence).
        val: validation pairs (must fit `max_length` uncut).
        config: settings (default `ScoreConfig()`).
        work_dir: folder of resumable score shards and the saved solve (`prefprune.shards`); with
            ``config.resume`` an interrupted run continues from it.

    Returns:
        `ScoreResult`, rows in training order.

    Raises:
        ValueError: empty training or validation set, duplicate training ids, a validation pair
            longer than max_length, a model without trainable parameters, invalid settings.
        prefprune.influence.NonPositiveCurvatureError: CG met non-positive curvature
            (on_nonpositive="raise").
    """
    return InfluenceScorer(model, tokenizer, config).score(train, val, work_dir=work_dir)


def score_model(
    model_dir: str | os.PathLike,
    train: str | os.PathLike | Sequence,
    val: str | os.PathLike | Sequence,
    output: str | os.PathLike,
    *,
    config: ScoreConfig | None = None,
    schema: str = "auto",
    train_split: str = "train",
    val_split: str = "train",
    max_pairs: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    carry: Collection[str] = (),
    dtype: str | None = None,
) -> ScoreResult:
    """Load a saved reward model and the data, score, and write `output`, its sidecar and any per-query
    matrix as one unit (`prefprune.scorefile.write_scores`).

    Args:
        model_dir: folder written by `prefprune.model.save_reward_model` / `prefprune train`.
        train: training data source (file, folder, hub id) or pairs.
        val: validation data source or pairs.
        output: score file (.parquet, .jsonl or .csv); the sidecar is `<output>.json`.
        config: scoring settings.
        schema: data schema for `load_preferences` ("auto" detects it).
        train_split, val_split: dataset splits to read from each source.
        max_pairs: read at most this many training pairs.
        device: where to run (default CPU).
        overwrite: replace an existing `output` that is not a prefprune score file (an earlier score
            file with its sidecar is always replaced).
        skip_bad: skip unreadable records of `train` and `val` (counted, logged) instead of failing.
        carry: the settings of `config` (``max_length``, ``truncation``, ``padding_side``) to take from
            the model folder where it records them (`prefprune.model.carry_settings`); the others are
            used as given. The sidecar's ``model_settings`` says where each came from.
        dtype: the model's parameter dtype; default the one it was saved with.

    Returns:
        The `ScoreResult` that was written.
    """
    config = config or ScoreConfig()
    config.validate()
    inputs = {k: v for k, v in {"--train": train, "--val": val, "--model": model_dir}.items()
              if isinstance(v, str | os.PathLike)}
    out = check_output_path(output, overwrite=overwrite, inputs=inputs)
    if not Path(model_dir).is_dir():
        raise ValueError(f"model folder {str(model_dir)!r} does not exist")
    train_src = str(train) if isinstance(train, str | os.PathLike) else "<pairs>"
    val_src = str(val) if isinstance(val, str | os.PathLike) else "<pairs>"
    # Under torchrun this joins the process group (gloo on CPU, NCCL with cuda:LOCAL_RANK per rank). One
    # run per output: from here until the file is committed, rank 0 holds the lock of OUTPUT.shards/, so
    # a second run into the same output stops at once (naming this one's pid) instead of mixing chunks.
    with distributed.launched_group(device) as device, shards.locked_work_dir(out) as work:
        if isinstance(train, str | os.PathLike):
            train = load_preferences(train, schema=schema, split=train_split, max_pairs=max_pairs,
                                     skip_bad=skip_bad)
        if isinstance(val, str | os.PathLike):
            val = load_preferences(val, schema=schema, split=val_split, skip_bad=skip_bad)
        if len(val) == 0:
            raise ValueError(f"the validation set {val_src!r} is empty")
        config, settings = _model_settings(model_dir, config, carry, dtype)
        model_dtype = getattr(torch, settings["dtype"]["value"])
        model, tokenizer = load_reward_model(model_dir, device=device, dtype=model_dtype)
        if tokenizer is None:
            raise ValueError(f"model folder {str(model_dir)!r} has no tokenizer")
        result = score_pairs(model, tokenizer, train, val, config=config, work_dir=work)
        result.metadata["model_settings"] = settings
        result.metadata["sources"] = {
            "model": absolute_source(model_dir), "train": absolute_source(train_src),
            "val": absolute_source(val_src),
            "schema": schema, "train_split": train_split, "val_split": val_split, "max_pairs": max_pairs,
            "train_digest": pairs_digest(train), "val_digest": pairs_digest(val),
        }
        failure = None
        if distributed.rank() == 0:  # every rank holds the merged rows; one writes them
            try:
                write_scores(result, out, overwrite=overwrite, inputs=inputs)
            except Exception as err:  # noqa: BLE001 -- re-raised below, after telling the other ranks
                failure = err
        told = distributed.broadcast_object(None if failure is None else f"{type(failure).__name__}: "
                                                                          f"{failure}")
        if failure is not None:
            raise failure
        if told is not None:
            raise RuntimeError(f"rank 0 could not write {str(out)!r}: {told}")
        shutil.rmtree(work, ignore_errors=True)  # the merged file is written: the shards are done
    return result


def _model_settings(
    model_dir: str | os.PathLike, config: ScoreConfig, carry: Collection[str], dtype: str | None
) -> tuple[ScoreConfig, dict[str, dict[str, Any]]]:
    """`config` with the `carry` settings taken from the model folder, and where every carried-kind
    setting (and the dtype) came from."""
    unknown = set(carry) - {"max_length", "truncation", "padding_side"}
    if unknown:
        raise ValueError(f"carry: unknown settings {sorted(unknown)}; expected max_length, truncation, "
                         "padding_side")
    names = ("max_length", "truncation", "padding_side")
    given = {n: None if n in carry else getattr(config, n) for n in names}
    settings = carry_settings(model_dir, {**given, "dtype": dtype},
                              {**{n: getattr(config, n) for n in names}, "dtype": "float32"})
    config = replace(config, **{n: settings[n]["value"] for n in carry})
    config.validate()
    return config, settings


def config_fields_help() -> dict[str, str]:
    """Field name → help text of `ScoreConfig` (for the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in fields(ScoreConfig)}
