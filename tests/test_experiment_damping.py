"""Damping sweeps in the experiment: one baseline and one score pass per curvature for every damping value, a
method per value, and resumes that add damping values without retraining a baseline."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_experiment import _tiny_config, _write_short_data

import prefprune.score as score_mod
import prefprune.train as train_mod
from prefprune._io import sha256_file
from prefprune.cli import main
from prefprune.experiment import arm_step_name, run_experiment
from prefprune.experiment.seedrun import load_trainable as _load_trainable
from prefprune.experiment.setup import build_seed_model
from prefprune.experiment.steps import load_state
from prefprune.prune import ScoreTable, select_pairs

SCORE = {"max_iter": 5, "batch_size": 8}


@pytest.fixture
def calls(monkeypatch):
    """Every training call (its training ids) and every scoring call (its arguments)."""
    seen = {"train": [], "score": []}
    real_train, real_score = train_mod.train_reward_model, score_mod.score_pairs

    def train(model, tokenizer, data, **kw):
        seen["train"].append(list(data.ids))
        return real_train(model, tokenizer, data, **kw)

    def score(model, tok, train, val, **kw):
        seen["score"].append({"train": train, "val": val, "config": kw["config"]})
        return real_score(model, tok, train, val, **kw)

    monkeypatch.setattr(train_mod, "train_reward_model", train)
    monkeypatch.setattr(score_mod, "score_pairs", score)
    seen["real_score"] = real_score
    return seen


@pytest.fixture
def no_plots(monkeypatch):
    """Skip the PNG plots (most of a resumed run's time here); report.md is still written."""
    import prefprune.experiment.report as report_mod

    monkeypatch.setattr(report_mod, "write_plots", lambda results, folder: [])


def _cfg(tmp_path, damping, **kw):
    return _tiny_config(tmp_path, score={**SCORE, "damping": damping}, **kw)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _arm(out, method, mode="harmful"):
    return json.loads((out / arm_step_name(0, method, mode, 0.2)).read_text())


def test_damping_list_gives_a_method_per_value_from_one_baseline_and_one_score_pass(tmp_path, calls):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, [1.0, 0.1])
    res = run_experiment(cfg)
    out = tmp_path / "run"
    sweep = ["influence_ggn@1", "influence_ggn@0.1"]
    assert cfg.arm_methods() == [*sweep, "grad_dot", "train_loss", "random"]
    assert cfg.helpful_arm_methods() == sweep
    # 1 baseline + 5 harmful arms + 2 helpful arms; one score pass gives both damping columns.
    assert len(calls["train"]) == 8 and len(calls["score"]) == 1
    assert calls["score"][0]["config"].damping == [1.0, 0.1]
    arms = {(a["method"], a["mode"]) for a in res["summary"]["arms"]}
    assert {(m, mode) for m in sweep for mode in ("harmful", "helpful")} <= arms
    for entry in res["summary"]["arms"]:
        assert entry["n_seeds"] == 1 and entry["delta_interval"] is not None, entry["method"]

    # Each damping column equals a score run at that λ alone, from the same baseline and data.
    step = ScoreTable.from_json(json.loads((out / "seed0" / "scores_ggn.json").read_text()))
    args = calls["score"][0]
    model, tok = build_seed_model(cfg, 0)
    _load_trainable(model, load_state(out / "seed0" / "baseline_state.pt"))
    for lam, method in zip([1.0, 0.1], sweep, strict=True):
        alone = calls["real_score"](
            model, tok, args["train"], args["val"], config=dataclasses.replace(args["config"], damping=lam)
        )
        col = step.column(f"influence@{lam!r}")
        assert alone.ids == step.ids
        err = _rel_err(col, alone.columns["influence"])
        assert err <= 1e-6, (lam, err)
        for mode in ("harmful", "helpful"):
            want = select_pairs(step.ids, col, method=method, fraction=0.2, mode=mode)
            assert _arm(out, method, mode)["removed_ids"] == list(want.ids), (method, mode)
    # The sweep matters here: the two values remove different pairs in at least one arm.
    assert any(set(_arm(out, sweep[0], m)["removed_ids"]) != set(_arm(out, sweep[1], m)["removed_ids"])
               for m in ("harmful", "helpful"))

    detected = {d["method"] for d in res["summary"]["noise_detection"]}
    assert set(sweep) <= detected
    report = (out / "report.md").read_text()
    for m in sweep:
        assert f"| {m} | " in report, m
    row = next(line for line in report.splitlines() if line.startswith("| seed0/ggn | "))
    assert row.endswith("| 1, 0.1 |"), row
    assert set(sweep) <= set(res["histograms"]) and (out / "score_histograms.png").stat().st_size > 0


def test_resume_with_more_damping_values_trains_no_baseline(tmp_path, calls, no_plots):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_experiment(_cfg(tmp_path, 1.0))
    assert len(calls["train"]) == 6 and len(calls["score"]) == 1
    kept = ["seed0/baseline.json", "seed0/baseline_state.pt", "seed0/init_state.pt", "seed0/scores_ggn.json"]
    kept += [arm_step_name(0, m, "harmful", 0.2) for m in ("influence_ggn", "grad_dot")]
    before = {k: (out / k).read_bytes() for k in kept}
    old = _arm(out, "influence_ggn")
    train_ids = calls["train"][0]  # the baseline's training pairs

    calls["train"].clear()
    calls["score"].clear()
    res = run_experiment(_cfg(tmp_path, [1.0, 0.1]))
    # Only the new value is scored, from the saved baseline; only its arms are trained (an arm that removes
    # exactly the pairs a finished step of its name or alias removed is that same training: reused).
    assert [c["config"].damping for c in calls["score"]] == [0.1]
    sweep01 = {mode: _arm(out, "influence_ggn@0.1", mode) for mode in ("harmful", "helpful")}
    old_removed = {m: _arm(out, "influence_ggn", m)["removed_ids"] for m in sweep01}
    fresh = [m for m, r in sweep01.items() if set(r["removed_ids"]) != set(old_removed[m])]
    assert fresh and len(calls["train"]) == len(fresh)
    for mode in set(sweep01) - set(fresh):
        assert sweep01[mode]["reused_from"] == arm_step_name(0, "influence_ggn", mode, 0.2)
    for k, data in before.items():
        assert (out / k).read_bytes() == data, k
    new = json.loads((out / "seed0" / "scores_ggn__1.json").read_text())
    assert new["dampings"] == [0.1]
    assert new["baseline_sha256"] == sha256_file(out / "seed0" / "baseline_state.pt")
    reused = _arm(out, "influence_ggn@1")
    assert reused["reused_from"] == arm_step_name(0, "influence_ggn", "harmful", 0.2)
    assert reused["removed_ids"] == old["removed_ids"] and reused["test"] == old["test"]
    col01 = ScoreTable.from_json(new).column("influence")
    for trained, mode in zip(calls["train"], fresh, strict=True):
        removed = _arm(out, "influence_ggn@0.1", mode)["removed_ids"]
        ids = ScoreTable.from_json(new).ids
        want = select_pairs(ids, col01, method="influence_ggn@0.1", fraction=0.2, mode=mode)
        assert removed == list(want.ids), mode
        assert sorted(trained + removed) == sorted(train_ids), mode
    methods = {a["method"] for a in res["summary"]["arms"]}
    assert {"influence_ggn@1", "influence_ggn@0.1", "grad_dot", "random"} <= methods
    assert "influence_ggn" not in methods
    assert {"seed0/ggn", "seed0/ggn__1"} == set(res["scores"]["metadata"])

    # The values in another order, or the single value again: nothing to do.
    for damping in ([0.1, 1.0], 1.0):
        calls["train"].clear()
        calls["score"].clear()
        run_experiment(_cfg(tmp_path, damping))
        assert calls["train"] == [] and calls["score"] == [], damping

    # A new value is scored alone: no step is read for a value it was not computed with.
    calls["score"].clear()
    run_experiment(_cfg(tmp_path, [1.0, 0.01]))
    assert [c["config"].damping for c in calls["score"]] == [0.01] and len(calls["train"]) == 2
    assert json.loads((out / "seed0" / "scores_ggn__2.json").read_text())["dampings"] == [0.01]

    # A score step made from another baseline (its digest differs) is stale: rescored, never reused.
    path = out / "seed0" / "scores_ggn.json"
    rec = json.loads(path.read_text())
    rec["baseline_sha256"] = "0" * 64
    path.write_text(json.dumps(rec))
    calls["train"].clear()
    calls["score"].clear()
    run_experiment(_cfg(tmp_path, [1.0, 0.1]))
    assert [c["config"].damping for c in calls["score"]] == [1.0] and calls["train"] == []
    assert json.loads(path.read_text())["baseline_sha256"] == sha256_file(out / "seed0" / "baseline_state.pt")


def test_resume_refuses_changes_of_the_baselines_by_name(tmp_path, calls, no_plots):
    torch.set_num_threads(1)
    run_experiment(_cfg(tmp_path, 1.0, methods=["influence", "random"], helpful_methods=[]))
    calls["train"].clear()
    kw = {"methods": ["influence", "random"], "helpful_methods": []}
    for change, match in [
        ({"train": {"epochs": 1, "batch_size": 8, "lr": 2e-3}}, r"config \(train\.lr: 0\.001 -> 0\.002\)"),
        ({"score": {**SCORE, "damping": [1.0, 0.1], "tol": 1e-3}}, r"different config \(score\.tol: "),
        ({"seeds": [1]}, r"different config \(seeds: \[0\] -> \[1\]\)"),
        ({"max_length": 72}, r"different config \(max_length: 64 -> 72\)"),
        ({"label_noise": 0.1}, r"different config \(data\.label_noise: 0\.2 -> 0\.1\)"),
    ]:
        cfg = _tiny_config(tmp_path, **{**kw, "score": {**SCORE, "damping": [1.0, 0.1]}, **change})
        with pytest.raises(ValueError, match=match):
            run_experiment(cfg)
    assert calls["train"] == []
    # Adding methods and fractions (with new damping values) is a compatible resume: only the new arms run.
    run_experiment(
        _cfg(tmp_path, [1.0, 0.1], methods=["influence", "random", "grad_dot"], fractions=[0.2, 0.1],
             helpful_methods=[])
    )
    out = tmp_path / "run"
    same = {*_arm(out, "influence_ggn@0.1")["removed_ids"]} == {*_arm(out, "influence_ggn")["removed_ids"]}
    # @1, @0.1, random at 0.1 and grad_dot at 0.2 and 0.1; @0.1 at 0.2 unless it removes what @1 removed.
    assert len(calls["train"]) == 5 + (not same)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["score"]["damping"] == [1.0, 0.1] and cfg["fractions"] == [0.2, 0.1]


def test_bad_damping_lists_fail_before_training(tmp_path, monkeypatch, capsys):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "train_reward_model", no_training)
    for kw, match in [
        ({"damping": [1.0, 0.5, 1.0]}, r"score\.damping: duplicate damping values \[1\.0\]"),
        ({"damping": [1.0, 0.0], "curvatures": ["ggn", "exact"]}, r"score\.damping: damping must be > 0 with "
         r"curvature='exact'"),
        ({"damping": [1e-7, 1.0000001e-7]}, r"give the same method names \['@1e-07'\]"),
        ({"damping": [1.0, 0.1], "methods": ["influence_ggn@0.5"]}, r"'influence_ggn@0\.5' names a damping"),
        ({"damping": 1.0, "methods": ["influence_ggn@1"]}, r"the method is named 'influence_ggn'"),
    ]:
        damping = kw.pop("damping")
        with pytest.raises(ValueError, match=match):
            _cfg(tmp_path, damping, **kw)
    data = _write_short_data(tmp_path / "pairs.jsonl")
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(f"data: {{source: {data}}}\nmodel: tiny:gpt_neox\nmax_length: 64\nprogress: false\n")
    out = tmp_path / "o"
    argv = ["experiment", "--config", str(yaml), "--output", str(out), "--curvatures", "exact"]
    assert main([*argv, "--score.damping", "1", "0.1", "1"]) == 2
    assert "duplicate damping values [1.0]" in capsys.readouterr().err
    assert main([*argv, "--score.damping", "0.1", "0"]) == 2
    assert "damping must be > 0 with curvature='exact'" in capsys.readouterr().err
    assert not out.exists()
