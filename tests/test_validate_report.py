"""prefprune validate (issue 23): what its numbers predict, overlapping intervals, the pruning check, one
damping flag, --train/--val, the experiment's max_length rule before any retrain, and the settings as run."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _pairs import easy_pairs
from test_validate import MODEL, tiny_setup

import prefprune.train as train_mod
from prefprune.cli import main
from prefprune.data import PreferencePair
from prefprune.data.config import DataConfig, load_data
from prefprune.model import build_model
from prefprune.train import evaluate, train_reward_model
from prefprune.validate import ValidateConfig, run_validation
from prefprune.validation_prune import prune_metrics
from prefprune.validation_report import recommend, validation_summary

DAMPINGS = [1.0, 0.1, 0.01]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A small validation with the pruning check (6 training pairs, k = 2, 3 random draws, 12 test pairs)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("val") / "v"
    setup = dataclasses.replace(tiny_setup(), test=easy_pairs(12, seed=9, prefix="t"))
    vc = ValidateConfig(output=str(out), subsets=5, dampings=DAMPINGS, progress=False, bootstrap_samples=200,
                        prune_check=0.34, prune_draws=3)
    return vc, setup, run_validation(vc, setup=setup)


def test_summary_and_json_say_what_the_numbers_predict(tmp_path):
    """Issue 23 item 1: validate.json and the printed summary name what LDS and leave-one-out predict, and
    that a good LDS does not imply a pruning gain (before: a bare table and "highest LDS")."""
    torch.set_num_threads(1)
    vc = ValidateConfig(output=str(tmp_path / "v"), subsets=5, dampings=[1.0, 0.1], progress=False,
                        bootstrap_samples=100)
    res = run_validation(vc, setup=tiny_setup(epochs=5))
    saved = json.loads(Path(vc.output, "validate.json").read_text())
    assert "random subsets" in saved["measures"]["lds"] and "validation loss" in saved["measures"]["lds"]
    assert "single pairs" in saved["measures"]["loo"]
    assert "does not imply a pruning gain" in saved["measures"]["caveat"]
    text = validation_summary(res)
    assert "rank agreement" in text and "random subsets keeping 50% of the training pairs" in text
    assert "LOO Pearson: the same for single-pair removals" in text
    assert "A good LDS does not imply a pruning gain" in text


def test_recommendation_says_when_the_runner_up_interval_overlaps():
    """Issue 23 item 2: with the issue's PandaLM numbers the recommendation says that 0.01 is not
    distinguishable from 0.1 (overlapping intervals) and which check it rests on; disjoint ones say so."""
    def lds(v, lo, hi):
        return {"lds": {"value": v, "low": lo, "high": hi}, "subset_predicted": []}

    metrics = {"influence@1": lds(0.37, -0.1, 0.7), "influence@0.1": lds(0.50, 0.04, 0.83),
               "influence@0.01": lds(0.71, 0.38, 0.87), "grad_dot": lds(0.37, -0.1, 0.7)}
    rec = recommend(metrics, None)
    best = rec["recommended"]
    assert (best["damping"], best["by"], best["runner_up"]["damping"]) == (0.01, "lds", 0.1)
    assert best["distinguishable_from_runner_up"] is False
    results = {"settings": {"interval_level": 0.95, "fraction": 0.5}, "subsets": [{}] * 20,
               "columns": metrics, "recommendation": rec}
    text = validation_summary(results)
    assert ("Recommended damping: 0.01 (LDS 0.710 [0.380, 0.870]) is not distinguishable from 0.1 "
            "(0.500 [0.040, 0.830]): their 95% intervals overlap.") in text, text
    assert "It rests on the LDS" in text and "--prune-check" in text
    metrics["influence@0.1"] = lds(0.20, 0.01, 0.30)
    metrics["influence@1"] = lds(0.10, -0.2, 0.3)
    best = recommend(metrics, None)["recommended"]
    assert best["runner_up"]["damping"] == 0.1 and best["distinguishable_from_runner_up"] is True
    rec = recommend(metrics, None)
    assert "is distinguishable from 0.1" in validation_summary({**results, "recommendation": rec})
    assert "does not lie above 0" not in validation_summary({**results, "recommendation": rec})
    weak = {k: lds(0.2, -0.3, 0.6) for k in ("influence@1", "influence@0.1")}
    text = validation_summary({**results, "columns": weak, "recommendation": recommend(weak, None)})
    assert "Its interval does not lie above 0: its scores are not shown to track retraining here." in text


def test_prune_metrics_pairs_each_column_with_every_random_draw():
    """Issue 23 item 3: Δ vs random is the column's accuracy minus the mean over random draws, with a paired
    bootstrap interval over draws and test pairs; one draw is flagged (its interval lacks draw variance)."""
    ids = [f"t{i}" for i in range(40)]
    rng = np.random.default_rng(0)

    def rec(p):
        return {"left_out": ["a", "b"], "test_margins": {i: float(rng.random() < p) - 0.5 for i in ids}}

    records = {"prune/full.json": rec(0.7), "prune/lowest_grad_dot.json": rec(0.9)}
    records.update({f"prune/random_{d:02d}.json": rec(0.6) for d in range(3)})
    got = prune_metrics(["grad_dot"], records, fraction=0.1, draws=3, n_boot=500, level=0.9)

    def acc(r):
        return np.mean([r["test_margins"][i] > 0 for i in ids])

    rand = np.mean([acc(records[f"prune/random_{d:02d}.json"]) for d in range(3)])
    col = got["columns"]["grad_dot"]
    assert col["delta_vs_random"]["value"] == pytest.approx(acc(records["prune/lowest_grad_dot.json"]) - rand)
    assert col["delta_vs_random"]["low"] <= col["delta_vs_random"]["value"] <= col["delta_vs_random"]["high"]
    assert got["n_test"] == 40 and got["n_removed"] == 2 and "not training seeds" in got["note"]
    one = prune_metrics(["grad_dot"], records, fraction=0.1, draws=1, n_boot=500, level=0.9)
    assert "Only 1 random draw(s)" in one["note"]


def test_prune_check_removes_each_columns_lowest_pairs_and_the_recommendation_rests_on_it(checked,
                                                                                         monkeypatch):
    """Issue 23 item 3: each column's lowest k pairs (from the scores validate wrote) are removed, the arm is
    retrained from the reference's initial weights (pinned by a retrain written here), the recommendation
    rests on the check, and a rerun retrains nothing."""
    vc, setup, res = checked
    scores = json.loads(Path(vc.output, "scores", "damping_1_0.1_0.01.json").read_text())
    ids = [str(i) for i in scores["ids"]]
    lowest = sorted(ids[i] for i in np.argsort(scores["columns"]["grad_dot"])[:2])
    step = json.loads(Path(vc.output, "prune", "lowest_grad_dot.json").read_text())
    assert step["left_out"] == lowest
    model, tok = build_model(MODEL, seed=0)
    train_reward_model(model, tok, setup.train.exclude(lowest), config=setup.train_config)
    margins = evaluate(model, tok, setup.test, max_length=64, return_margins=True)["margins"]
    np.testing.assert_allclose([step["test_margins"][i] for i in margins], list(margins.values()), atol=1e-9)
    pc = res["prune_check"]
    assert set(pc["columns"]) == {"influence@1", "influence@0.1", "influence@0.01", "grad_dot", "grad_cos"}
    assert pc["draws"] == 3 and pc["n_test"] == 12 and pc["n_removed"] == 2
    assert res["recommended"]["by"] == "pruning check" and res["recommendation"]["by_lds"]["by"] == "lds"
    text = validation_summary(res)
    assert "Pruning check: each column's lowest 34% (2 pairs)" in text and "| lowest grad_dot |" in text
    assert "It rests on the pruning check" in text
    calls = []
    monkeypatch.setattr(train_mod, "train_reward_model", lambda *a, **k: calls.append(1))
    again = run_validation(vc, setup=setup)
    assert calls == [] and again["prune_check"] == pc


def test_prune_check_without_test_pairs_says_it_needs_them(tmp_path, monkeypatch):
    """Issue 23 item 3: no test pairs → a clear error before any retrain."""
    monkeypatch.setattr(train_mod, "train_reward_model", lambda *a, **k: pytest.fail("training started"))
    vc = ValidateConfig(output=str(tmp_path / "v"), subsets=5, prune_check=0.1, progress=False)
    with pytest.raises(ValueError, match=r"pruning check \(--prune-check\) needs test pairs: give --test"):
        run_validation(vc, setup=tiny_setup())


# ---------------------------------------------------------------------------------------------------
# The CLI: a trained folder, --train/--val, one damping flag


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny reward model trained by the CLI on train.jsonl, with val.jsonl and test.jsonl beside it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    data = easy_pairs(60, seed=0, prefix="p-")
    for name, part in (("train", data.ids[:30]), ("val", data.ids[30:45]), ("test", data.ids[45:])):
        data.select(part).save(root / f"{name}.jsonl")
    argv = ["train", "--model", "tiny:gpt_neox", "--lora.r", "1", "--data", str(root / "train.jsonl"),
            "--eval-fraction", "0.2", "--epochs", "2", "--lr", "1e-2", "--output", str(root / "rm"),
            "--max-length", "64", "--batch-size", "8", "--no-progress", "--log-level", "WARNING"]
    assert main(argv) == 0
    return root


QUIET = ["--subsets", "5", "--no-progress", "--log-level", "WARNING", "--bootstrap-samples", "200"]


def test_validate_cli_takes_train_and_val_like_score(folder, capsys):
    """Issue 23 item 5: docs/guide.md's `validate --model runs/rm --train T --val V` runs (before:
    "Unrecognized or misplaced options: --train"); all of --train is retrained on, --val is validated on."""
    capsys.readouterr()
    out = folder / "v-train"
    argv = ["validate", "--model", str(folder / "rm"), "--train", str(folder / "train.jsonl"), "--val",
            str(folder / "val.jsonl"), "--dampings", "1.0", "--output", str(out), *QUIET]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "validate.json").read_text())
    assert (res["n_train"], res["n_validation"]) == (30, 15)
    assert "Recommended damping: 1" in capsys.readouterr().out
    # The folder's held-out pairs are part of train.jsonl: validating on them with --train is refused.
    assert main(["validate", "--model", str(folder / "rm"), "--train", str(folder / "train.jsonl"),
                 "--output", str(folder / "v2"), *QUIET]) == 2
    assert "validation pairs" in capsys.readouterr().err


def test_validate_has_one_damping_flag(folder, capsys):
    """Issue 23 item 4: --score.damping (and --score.curvature) are refused with the flag to use instead
    (before: accepted and ignored, --dampings decided)."""
    base = ["validate", "--model", str(folder / "rm"), "--output", str(folder / "v3"), *QUIET]
    assert main([*base, "--score.damping", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--score.damping is not a validate setting: give the damping values to compare with --dampings" \
        in err
    assert main([*base, "--score.curvature=exact"]) == 2
    assert "give the curvature with --curvature" in capsys.readouterr().err
    assert main(["validate", "--config", "x.yaml", "--score.tol", "1e-3"]) == 2
    assert "the scoring settings come from the config's score section" in capsys.readouterr().err


def test_validate_cli_prune_check_with_test_pairs(folder, capsys):
    """Issue 23 item 3 from the CLI: --prune-check K --test FILE prints the check's table and rests the
    recommendation on it; without --test a model folder has no test pairs and says so."""
    out = folder / "v-prune"
    base = ["validate", "--model", str(folder / "rm"), "--val", str(folder / "val.jsonl"), "--dampings", "1",
            "0.01", "--output", str(out), "--prune-check", "0.2", "--prune-draws", "2", *QUIET]
    assert main(base) == 2
    assert "needs test pairs: give --test FILE" in capsys.readouterr().err
    assert main([*base, "--test", str(folder / "test.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "Pruning check: each column's lowest 20% (5 pairs) removed vs 2 random draws" in text, text
    assert "Only 2 random draw(s)" in text and "It rests on the pruning check" in text
    res = json.loads((out / "validate.json").read_text())
    assert res["n_test"] == 15 and res["recommended"]["by"] == "pruning check"


# ---------------------------------------------------------------------------------------------------
# --config: the experiment's max_length rule before any retrain, the settings as run


def _config(tmp_path, *, long_val: int) -> tuple[str, int]:
    """A tiny experiment YAML whose first `long_val` validation pairs are too long for max_length 64."""
    data = easy_pairs(48, seed=1, prefix="c-")
    cfg = {"data": {"source": str(tmp_path / "pairs.jsonl")}, "split": [0.5, 0.3, 0.2], "split_seed": 0,
           "model": "tiny:gpt_neox", "lora": {"r": 1}, "max_length": 64, "seeds": [0],
           "train": {"epochs": 1, "batch_size": 8, "lr": 0.01}, "eval_batch_size": 16, "progress": False,
           "score": {"hessian_samples": 5, "tol": 1e-4, "max_iter": 20, "batch_size": 8}}
    data.save(tmp_path / "pairs.jsonl")
    _, val, _ = load_data(DataConfig(source=str(tmp_path / "pairs.jsonl"))).split(cfg["split"], seed=0)
    long = set(val.ids[:long_val])
    pairs = [PreferencePair(id=p.id, prompt=p.prompt, chosen=p.chosen + " very" * 40 if p.id in long
                            else p.chosen, rejected=p.rejected) for p in data]
    type(data)(pairs, schema=data.schema, source="c").save(tmp_path / "pairs.jsonl")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), len(val)


def test_validate_config_drops_a_too_long_validation_pair_like_experiment_and_records_settings_as_run(
        tmp_path, capsys, caplog):
    """Issue 23 items 6 and 7: a validation pair too long for the config's max_length is left out with a
    warning before any retrain (before: a reference retrain, then an error in scoring), and validate.json
    records the score settings that ran (the config's hessian_samples/tol/max_iter/max_length; before: the
    defaults None/1e-6/100/512)."""
    torch.set_num_threads(1)
    config, n_val = _config(tmp_path, long_val=1)
    argv = ["validate", "--config", config, "--output", str(tmp_path / "v"), "--dampings", "1", "0.1", *QUIET]
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        assert main(argv) == 0, capsys.readouterr().err
    want = f"left out 1 of {n_val} validation pairs that do not fit max_length=64 uncut"
    assert any(want in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    res = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert res["n_validation"] == n_val - 1
    sc = res["settings"]["score"]
    assert (sc["hessian_samples"], sc["tol"], sc["max_iter"], sc["max_length"]) == (5, 1e-4, 20, 64)
    assert sc["damping"] == [1.0, 0.1] and sc["curvature"] == "ggn"
    sidecar = json.loads((tmp_path / "v" / "scores" / "damping_1_0.1.json").read_text())["metadata"]["config"]
    assert sc == sidecar and res["settings"]["train"]["max_length"] == 64


def test_validate_config_with_no_fitting_validation_pair_fails_before_any_retrain(tmp_path, monkeypatch):
    """Issue 23 item 6: inputs are checked before the first retrain."""
    monkeypatch.setattr(train_mod, "train_reward_model", lambda *a, **k: pytest.fail("training started"))
    config, _ = _config(tmp_path, long_val=48)
    vc = ValidateConfig(config=config, output=str(tmp_path / "v"), subsets=5, progress=False)
    with pytest.raises(ValueError, match=r"no validation pair fits max_length=64 uncut .* raise max_length"):
        run_validation(vc)


def test_validate_config_with_clean_eval_validates_on_the_true_labels(tmp_path):
    """`clean_eval: true` undoes the planted noise of the validation and test splits in the experiment;
    validate's setup from the same config does the same (before: it used the noisy validation labels)."""
    from prefprune.validation_setup import setup_from_experiment

    config, _ = _config(tmp_path, long_val=0)
    cfg = yaml.safe_load(open(config))
    cfg["data"].update(label_noise=0.4, data_seed=1)
    cfg["clean_eval"] = True
    Path(config).write_text(yaml.safe_dump(cfg))
    setup = setup_from_experiment(config, val_source=None)
    clean = {p.id: p.chosen for p in load_data(DataConfig(source=cfg["data"]["source"]))}
    noisy = load_data(DataConfig(**cfg["data"]), plant_noise=True)
    assert noisy.flipped_ids & set(setup.val.ids)  # noise was planted there
    assert all(p.chosen == clean[p.id] for p in setup.val)
    assert all(p.chosen == clean[p.id] for p in setup.test)
    assert any(p.chosen != clean[p.id] for p in setup.train)  # the training split keeps its noise


def test_a_changed_score_setting_scores_again_and_keeps_the_retrains(tmp_path, monkeypatch):
    """A rerun with another score setting (here max_iter) scores the reference again instead of reusing the
    score step silently, so validate.json records the settings that produced its scores; the subset retrains
    are reused (only the reference, which is the scored model, is retrained)."""
    torch.set_num_threads(1)
    setup = tiny_setup(epochs=5)
    vc = ValidateConfig(output=str(tmp_path / "v"), subsets=5, dampings=[1.0], progress=False,
                        bootstrap_samples=100, curvature="ggn")
    run_validation(vc, setup=setup)
    calls = []
    real = train_mod.train_reward_model
    monkeypatch.setattr(train_mod, "train_reward_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = dataclasses.replace(setup, score_config=dataclasses.replace(setup.score_config, solver="cg",
                                                                        max_iter=7))
    res = run_validation(vc, setup=other)
    assert (res["settings"]["score"]["max_iter"], res["settings"]["score"]["solver"]) == (7, "cg")
    assert len(calls) == 1


def test_columns_that_remove_the_same_pairs_share_one_retrain(tmp_path, monkeypatch):
    """The pruning check retrains once per distinct set of removed pairs: influence at λ = 1 and 0.999 pick
    the same lowest pairs, and the second arm reuses the first's retrain (its step says which)."""
    torch.set_num_threads(1)
    calls = []
    real = train_mod.train_reward_model
    monkeypatch.setattr(train_mod, "train_reward_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    setup = dataclasses.replace(tiny_setup(epochs=5), test=easy_pairs(12, seed=9, prefix="t"))
    vc = ValidateConfig(output=str(tmp_path / "v"), subsets=5, dampings=[1.0, 0.999], progress=False,
                        bootstrap_samples=100, prune_check=0.34, prune_draws=2)
    run_validation(vc, setup=setup)
    steps = [json.loads(p.read_text()) for p in sorted((tmp_path / "v" / "prune").glob("*.json"))]
    distinct = {tuple(s["left_out"]) for s in steps}
    assert len(distinct) < len(steps)  # at least two arms removed the same pairs
    assert len(calls) == 1 + 5 + len(distinct) - 1  # reference (= the unpruned arm), subsets, distinct arms
    shared = [s for s in steps if "same_pairs_as" in s]
    assert shared and all(s["seconds"] == 0.0 for s in shared)


def test_fit_max_length_leaves_out_too_long_test_pairs_once(caplog):
    """Test pairs whose responses alone exceed max_length are left out once, with one warning, before any
    retrain (every retrain of the pruning check then evaluates the same pairs)."""
    from prefprune.testing import tiny_tokenizer
    from prefprune.validation_setup import fit_max_length

    test = easy_pairs(6, seed=9, prefix="t")
    long = PreferencePair(id="t-long", prompt="Q: a? A:", chosen=" yes" * 40, rejected=" no")
    setup = dataclasses.replace(tiny_setup(), test=type(test)([*test, long], schema=test.schema, source="t"))
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        fitted = fit_max_length(setup, tiny_tokenizer())
    assert fitted.test.ids == test.ids and len(fitted.val) == len(setup.val)
    assert ["left out 1 of 7 test pairs" in r.getMessage() for r in caplog.records].count(True) == 1
    # ... and that one warning is the only one naming the pair (before: encoding logged it a second time)
    assert len([r for r in caplog.records if "t-long" in r.getMessage()]) == 1, caplog.text
