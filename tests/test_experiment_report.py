"""What a tiny experiment's results.json and report.md say about what ran (issue 23): counts as used, the
settings as run, the one-seed warning, and the profile of the removed pairs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_experiment import _tiny_config, _write_short_data

from prefprune.data.config import load_data
from prefprune.experiment import arm_step_name, run_experiment


def _data_with_drops(tmp_path) -> str:
    """The short pairs with rejected responses of 1 to 3 words (so lengths differ), plus 2 exact repeats,
    1 pair with chosen == rejected and 1 bad record (empty response)."""
    path = tmp_path / "pairs.jsonl"
    _write_short_data(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        words = r["rejected"].split()
        if len(words) == 2:  # not the over-long ones
            r["rejected"] = " " + " ".join(words[:1] * (1 + i % 3))
    extra = [
        {**rows[1], "id": "dup1"},
        {**rows[2], "id": "dup2"},
        {"id": "same", "prompt": "Say x:", "chosen": " x", "rejected": " x"},
        {"id": "bad", "prompt": "Say y:", "chosen": " y", "rejected": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return str(path)


@pytest.fixture(scope="module")
def one_seed_run(tmp_path_factory):
    """One seed, gradient scores only, planted noise: ~5 s on 2 CPU cores."""
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("exp")
    data = _data_with_drops(tmp_path)
    cfg = _tiny_config(
        tmp_path,
        data={"source": data, "label_noise": 0.2, "data_seed": 3, "skip_bad": True},
        methods=["grad_dot", "train_loss", "random"],
        helpful_methods=["grad_dot"],
    )
    return cfg, run_experiment(cfg), tmp_path / "run"


def test_counts_are_the_counts_used(one_seed_run):
    """Pins issue 23: the header's counts mixed before- and after-filter numbers ("validation 114 / test 381"
    when 111 / 379 were scored / evaluated) and loading drops (duplicates, identical, bad) appeared nowhere.
    Each "used" count must equal what the steps record they trained on, scored against and evaluated."""
    cfg, res, out = one_seed_run
    report = (out / "report.md").read_text()
    assert "64 records read → 60 pairs (dropped on loading: skipped bad 1, dropped identical 1, dropped " \
        "duplicate 2)" in report
    counts = res["data"]["counts"]
    assert counts["loaded"] == {
        "records": 64, "skipped_bad": 1, "dropped_identical": 1, "dropped_duplicate": 2, "pairs": 60
    }
    assert sum(counts[s]["in_split"] for s in ("train", "validation", "test")) == 60
    base = json.loads((out / "seed0" / "baseline.json").read_text())
    scores = json.loads((out / "seed0" / "scores_identity.json").read_text())
    assert counts["train"]["used"] == base["n_train"] == base["train_stats"]["n_train"]
    assert counts["train"]["too_long"] == len(res["data"]["train_left_out_too_long"]) > 0
    assert counts["validation"]["used"] == scores["n_validation"]
    assert counts["test"]["used"] == base["test"]["n"]
    for split in ("train", "validation", "test"):
        c = counts[split]
        assert c["used"] == c["in_split"] - c.get("too_long", 0) - c.get("untrusted", 0), split
    t = counts["test"]
    left = f"{t['too_long']} too long for max_length" if t["too_long"] else "0"
    assert f"| test | {t['in_split']} | {left} | {t['used']} (evaluated) |" in report


def test_report_prints_the_settings_as_run(one_seed_run):
    """Pins issue 23: the report printed the config's dataclass defaults ('max_length': 512, bf16: True on a
    CPU run at 64) instead of what the steps ran with."""
    cfg, res, out = one_seed_run
    report = (out / "report.md").read_text()
    assert "'max_length': 512" not in report and "bf16 True" not in report
    train = res["settings_as_run"]["train"]["settings"]
    assert train["max_length"] == cfg.max_length == 64 and train["device"] == "cpu" and train["bf16"] is False
    assert train["epochs"] == 1 and train["batch_size"] == 8
    score = res["settings_as_run"]["score"]["identity"]["settings"]
    assert score["max_length"] == 64 and score["max_iter"] == 5
    assert "Training as run, from the step files: epochs 1, batch_size 8" in report
    assert "max_length 64" in report and "bf16 False, device cpu" in report


def test_one_seed_run_warns_and_shows_no_zero_std(one_seed_run):
    """Pins issue 23: a one-seed run showed "± 0.0" stds and flagged differences without a warning."""
    _, res, out = one_seed_run
    report = (out / "report.md").read_text()
    assert "± 0.0 " not in report and "± 0.0)" not in report and "n/a (1 seed)" in report
    assert "> **Warning:** 1 seed" in report
    assert res["intervals"]["n_seeds"] == 1 and not res["intervals"]["seed_variance"]
    assert "no seed-to-seed variance" in res["intervals"]["warning"]
    assert all(a["accuracy_std"] is None and a["delta_std"] is None for a in res["summary"]["arms"])
    assert all(f["provisional"] for f in res["summary"]["flags"])


def test_removed_pair_profile_matches_the_step_files(one_seed_run):
    """Pins issue 23: nothing showed what the pruned pairs have in common (a length preference, planted
    flips) or how much two methods' removed sets overlap; the profile is recomputed here from the step
    files and the data."""
    cfg, res, out = one_seed_run
    report = (out / "report.md").read_text()
    assert "## What each method removes" in report and "| *training set (base rate)* |" in report
    prof = res["removed_profile"]
    data = load_data(cfg.data, plant_noise=True)
    by_id = {p.id: p for p in data}
    flipped = data.flipped_ids
    removed = {}
    for arm in prof["arms"]:
        rec = json.loads((out / arm_step_name(0, arm["method"], arm["mode"], arm["fraction"])).read_text())
        ids = rec["removed_ids"]
        removed[arm["method"], arm["mode"]] = set(ids)
        shorter = sum(len(by_id[i].chosen) < len(by_id[i].rejected) for i in ids) / len(ids)
        assert arm["chosen_shorter"] == pytest.approx(shorter), arm
        assert arm["flipped"] == pytest.approx(sum(i in flipped for i in ids) / len(ids)), arm
        assert arm["n_removed"] == len(ids) == rec["n_removed"]
    a, b = removed["grad_dot", "harmful"], removed["random", "harmful"]
    want = len(a & b) / len(a | b)
    got = next(o for o in prof["overlap"] if set(o["methods"]) == {"grad_dot", "random"})
    assert got["jaccard"] == pytest.approx(want) and got["mode"] == "harmful"
    base = prof["base_rate"]
    assert base["n"] == res["data"]["counts"]["train"]["used"] and 0 < base["flipped"] < 1
    assert f"| harmful | 20% | grad_dot vs random | {want:.2f} |" in report
    assert 0 < base["chosen_shorter"] < 1  # the data has both length orders


def test_profile_shares_ties_and_no_noise():
    """The profile's shares on hand-made pairs: a tie counts half for the "longer wins" rule; without planted
    noise the flipped share is None (not 0)."""
    from prefprune.data import PreferencePair
    from prefprune.experiment.profile import removed_profile

    pairs = [
        PreferencePair(id="a", prompt="p", chosen="xx", rejected="xxxx"),  # chosen shorter
        PreferencePair(id="b", prompt="p", chosen="xxxx", rejected="xx"),  # chosen longer
        PreferencePair(id="c", prompt="p", chosen="xy", rejected="yx"),  # tie
    ]
    prof = removed_profile(pairs, pairs, {(0, "m", "harmful", 0.5): ["a", "c"]}, None)
    arm = prof["arms"][0]
    assert arm["chosen_shorter"] == 0.5 and arm["longer_wins_agreement"] == 0.25 and arm["flipped"] is None
    assert prof["base_rate"]["longer_wins_agreement"] == pytest.approx(0.5)
    assert prof["longer_wins_test_accuracy"] == pytest.approx(0.5) and prof["overlap"] == []


def test_report_header_paragraphs_render_apart_and_lora_shows_set_values(one_seed_run):
    """The header's sentences (data, model, settings, seeds, machine) are separate Markdown paragraphs
    (before: adjacent lines, rendered as one run-on paragraph), and the model line lists the LoRA settings
    that were given, not `None` for each left at its default."""
    _, _, out = one_seed_run
    header = (out / "report.md").read_text().split("\n## ", 1)[0].splitlines()
    for above, line in itertools.pairwise(header):
        if above and line:
            assert above.startswith("|") and line.startswith("|"), (above, line)
    model = next(line for line in header if line.startswith("Model:"))
    assert "None" not in model, model
