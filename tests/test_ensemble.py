"""Ensembles: the mean of score columns over models, `prefprune score --model A B`, the experiment method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pairs import easy_pairs

from prefprune.ensemble import average_tables, member_path
from prefprune.experiment import arm_step_name, run_experiment
from prefprune.prune import ScoreTable, read_score_table, select_pairs


def test_average_tables_is_the_columnwise_mean_in_the_first_members_order():
    a = ScoreTable(ids=["x", "y", "z"], columns={"influence": [1.0, 2.0, 3.0], "truncated": [0, 0, 1]})
    b = ScoreTable(ids=["z", "x", "y"], columns={"influence": [30.0, 10.0, 20.0], "truncated": [1, 0, 0]})
    ens = average_tables([a, b], sources=["a", "b"])
    assert ens.ids == ["x", "y", "z"] and "truncated" not in ens.columns
    np.testing.assert_array_equal(ens.columns["influence"], [5.5, 11.0, 16.5])
    with pytest.raises(ValueError, match="at least two members"):
        average_tables([a])
    with pytest.raises(ValueError, match="other pairs"):
        average_tables([a, ScoreTable(ids=["x", "y"], columns={"influence": [0.0, 0.0]})])


def test_score_cli_with_several_models_writes_their_mean(tmp_path, capsys):
    from prefprune.cli import main

    torch.set_num_threads(1)
    data = tmp_path / "pairs.jsonl"
    easy_pairs(24, seed=0, prefix="p-").save(data)
    fast = ["--max-length", "64", "--batch-size", "8", "--no-progress", "--log-level", "WARNING"]
    folders = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        args = [
            "train",
            "--model",
            "tiny:gpt_neox",
            "--data",
            str(data),
            "--eval-fraction",
            "0",
            "--epochs",
            "1",
        ]
        assert main(args + ["--seed", str(seed), "--output", str(out)] + fast) == 0
        folders.append(str(out))
    scores = tmp_path / "ens.jsonl"
    args = ["score", "--model", *folders, "--train", str(data), "--val", str(data), "--output", str(scores)]
    assert main(args + ["--max-length", "64", "--no-progress", "--max-iter", "5"]) == 0
    assert "with 2 models" in capsys.readouterr().out
    ens = read_score_table(scores)
    members = [read_score_table(member_path(scores, k)) for k in (0, 1)]
    for col in ("influence", "grad_dot", "grad_cos", "train_loss"):
        want = (members[0].column(col) + members[1].column(col)) / 2
        np.testing.assert_allclose(ens.column(col), want, rtol=1e-12, atol=1e-15)
    assert not np.allclose(members[0].column("influence"), members[1].column("influence"))


def test_experiment_ensemble_method_prunes_by_the_mean_of_the_seeds_scores(tmp_path):
    from test_experiment import _tiny_config

    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path, seeds=[0, 1], methods=["ensemble", "influence"], helpful_methods=[])
    res = run_experiment(cfg)
    out = tmp_path / "run"
    tables = [
        ScoreTable.from_json(json.loads((out / f"seed{s}" / "scores_ggn.json").read_text())) for s in (0, 1)
    ]
    ids = tables[0].ids
    pos1 = {i: k for k, i in enumerate(tables[1].ids)}
    mean = (tables[0].column("influence") + tables[1].column("influence")[[pos1[i] for i in ids]]) / 2
    want = select_pairs(ids, mean, method="ensemble_ggn", fraction=0.2, mode="harmful")
    for seed in (0, 1):
        rec = json.loads((out / arm_step_name(seed, "ensemble_ggn", "harmful", 0.2)).read_text())
        assert rec["removed_ids"] == list(want.ids), seed
    assert {"ensemble_ggn", "influence_ggn"} <= {a["method"] for a in res["summary"]["arms"]}
    assert "ensemble_ggn" in {d["method"] for d in res["summary"]["noise_detection"]}
    with pytest.raises(ValueError, match="at least two seeds"):
        _tiny_config(tmp_path, seeds=[0], methods=["ensemble"], helpful_methods=[])
