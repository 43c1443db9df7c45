"""Growing a finished experiment's seed list reuses the finished seeds' steps (issue 23), and the run
announces its retrains before the first one and their estimated time after it."""

from __future__ import annotations

import logging

import pytest
import torch
from test_experiment import _tiny_config

import prefprune.train as train_mod
from prefprune.experiment import run_experiment


@pytest.fixture
def trained(monkeypatch):
    """The training ids of every retrain of the run."""
    seen = []
    real = train_mod.train_reward_model

    def train(model, tokenizer, data, **kw):
        seen.append(list(data.ids))
        return real(model, tokenizer, data, **kw)

    monkeypatch.setattr(train_mod, "train_reward_model", train)
    return seen


def _cfg(tmp_path, seeds, **kw):
    return _tiny_config(tmp_path, seeds=seeds, methods=["random"], helpful_methods=[], label_noise=0.0, **kw)


def _said(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "prefprune.experiment.announce")


def test_a_run_announces_its_retrains_and_their_time(tmp_path, trained, caplog):
    """Pins issue 23: an experiment never said how many retrains it would run or how long they would take."""
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="prefprune.experiment.announce")
    run_experiment(_cfg(tmp_path, [0]))
    said = _said(caplog)
    assert "experiment: 2 retrains (1 seed(s) x (1 baseline + 1 pruned)); 0 already done, 2 to run" in said
    assert "the 1 left take about" in said and len(trained) == 2


def test_adding_seeds_reuses_the_finished_ones(tmp_path, trained, caplog):
    """Pins issue 23: adding seeds to a finished experiment was refused (so the user recomputed the finished
    seed in a new folder); now only the new seed runs, and the announcement counts the finished steps."""
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="prefprune.experiment.announce")
    run_experiment(_cfg(tmp_path, [0]))
    first = list(trained)
    assert len(first) == 2
    trained.clear()
    caplog.clear()
    res = run_experiment(_cfg(tmp_path, [0, 1]))
    # Only seed 1 runs: its baseline and its random arm (seed 0's steps are reused, never recomputed).
    assert len(trained) == 2 and trained[0] == first[0]
    assert "experiment: 4 retrains (2 seed(s) x (1 baseline + 1 pruned)); 2 already done, 2 to run" in (
        _said(caplog)
    )
    assert res["baseline"]["n_seeds"] == 2 and res["intervals"]["n_seeds"] == 2
    assert {a["seed"] for a in res["arms"]} == {0, 1}


def test_other_changes_with_added_seeds_are_still_refused(tmp_path, trained):
    """Seeds may grow; any other changed setting is refused with its key named (and nothing retrains)."""
    torch.set_num_threads(1)
    run_experiment(_cfg(tmp_path, [0]))
    trained.clear()
    with pytest.raises(ValueError, match=r"different config \(train.lr: 0.001 -> 0.01\)"):
        run_experiment(_cfg(tmp_path, [0, 1], train={"epochs": 1, "batch_size": 8, "lr": 1e-2}))
    with pytest.raises(ValueError, match=r"different config \(seeds: \[0\] -> \[1\]\)"):
        run_experiment(_cfg(tmp_path, [1]))  # dropping a finished seed is not growing the list
    assert trained == []
