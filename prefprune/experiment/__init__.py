"""Pruning experiments end to end: split, train, score, prune, retrain, test — over seeds, resumable.

The package is split by job: `config` (the settings, the demo's, YAML loading), `protocol` (the seed
protocol, `run_experiment`), `seedrun` (one seed's model and its retrains), `steps` (the resumable store of
finished steps), `scoresteps` (the score steps that fit the settings, merged per curvature), `announce` (the
retrain plan and its time estimate), `results` (gathering the steps into results.json: accuracies, deltas,
noise detection) with `certainty` (interval method, few-seeds warning, flags), `counts` (counts as used)
and `profile` (what each method removes), and `report` (report.md) with `plots`.
"""

from prefprune.experiment.config import BASE_METHODS, DEMO_CONFIG, ExperimentConfig, demo_config, load_config
from prefprune.experiment.protocol import run_experiment
from prefprune.experiment.results import collect_results
from prefprune.experiment.steps import arm_step_name

__all__ = [
    "BASE_METHODS",
    "DEMO_CONFIG",
    "ExperimentConfig",
    "arm_step_name",
    "collect_results",
    "demo_config",
    "load_config",
    "run_experiment",
]
