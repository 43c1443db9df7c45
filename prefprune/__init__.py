"""prefprune: influence-function pruning of preference datasets for reward models.

The stages, each callable from Python (the CLI is a thin layer over them)::

    from prefprune import ScoreConfig, load_preferences, load_reward_model, score_pairs

    model, tokenizer = load_reward_model("runs/model")
    result = score_pairs(model, tokenizer, load_preferences("train.jsonl"), load_preferences("val.jsonl"),
                         config=ScoreConfig(curvature="ggn", damping=0.1))

Names are imported on first use, so ``import prefprune`` stays cheap and needs neither a GPU, Triton, the
built extension nor the CLI's libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ExperimentConfig": "prefprune.experiment",
    "InfluenceScorer": "prefprune.influence",
    "PruneConfig": "prefprune.prune",
    "ScoreConfig": "prefprune.score",
    "ScoreResult": "prefprune.score",
    "TrainConfig": "prefprune.train",
    "ValidateConfig": "prefprune.validate",
    "build_reward_model": "prefprune.model",
    "load_preferences": "prefprune.data",
    "load_reward_model": "prefprune.model",
    "prune_file": "prefprune.prune",
    "read_score_table": "prefprune.scorefile",
    "run_experiment": "prefprune.experiment",
    "run_validation": "prefprune.validate",
    "save_reward_model": "prefprune.model",
    "score_model": "prefprune.score",
    "score_pairs": "prefprune.score",
    "train_reward_model": "prefprune.train",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefprune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
