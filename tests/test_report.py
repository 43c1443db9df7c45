"""report.md tables and plots from a hand-made results dict (numbers checked in the rendered text)."""

from __future__ import annotations

import json

from prefprune.experiment.report import (
    accuracy_table,
    detection_table,
    distinguishable,
    interval_table,
    render_markdown,
    write_report,
)


def _results() -> dict:
    arms = []
    for method, mode, frac, acc, d in [
        ("influence_ggn", "harmful", 0.1, 0.80, 0.05),
        ("influence_ggn", "harmful", 0.2, 0.82, 0.07),
        ("random", "harmful", 0.1, 0.74, -0.01),
        ("influence_ggn", "helpful", 0.1, 0.60, -0.15),
    ]:
        arms.append(
            {
                "method": method,
                "mode": mode,
                "fraction": frac,
                "n_seeds": 2,
                "accuracy_mean": acc,
                "accuracy_std": 0.01,
                "delta_mean": d,
                "delta_std": 0.02,
                "n_removed": 10,
                "flipped_share_of_removed": 0.9 if method != "random" else 0.2,
            }
        )
    return {
        "config": {
            "output": "runs/x",
            "split_seed": 0,
            "model": "tiny:gpt_neox",
            "lora": {"r": 2},
            "lora_layers": None,
            "max_length": 64,
            "train": {},
            "score": {},
            "curvatures": ["ggn"],
            "seeds": [0, 1],
        },
        "data": {
            "source": "synthetic",
            "schema": "tldr",
            "n_pairs": 100,
            "n_train": 60,
            "n_validation": 10,
            "n_test": 30,
            "n_flipped": 20,
            "n_flipped_train": 12,
            "n_flipped_validation": 2,
            "n_flipped_test": 6,
        },
        "baseline": {"accuracy_mean": 0.75, "accuracy_std": 0.02, "n_seeds": 2, "per_seed": {}},
        "summary": {
            "arms": arms,
            "noise_detection": [
                {
                    "method": "influence_ggn",
                    "auc_mean": 0.91,
                    "auc_std": 0.01,
                    "precision_at_k_mean": 0.75,
                    "precision_at_k_std": 0.05,
                    "k": 12,
                    "n_seeds": 2,
                },
                {
                    "method": "random",
                    "auc_mean": 0.5,
                    "auc_std": 0.03,
                    "precision_at_k_mean": 0.2,
                    "precision_at_k_std": 0.1,
                    "k": 12,
                    "n_seeds": 2,
                },
            ],
        },
        "scores": {
            "metadata": {
                "seed0/ggn": {
                    "solve": {"method": "cg", "status": "converged", "iterations": 4, "residual": 1e-5}
                }
            },
            "seconds": {"seed0/ggn": 1.5},
        },
        "histograms": {"influence_ggn": {"flipped": [-1.0, -0.5, -0.7], "clean": [0.1, 0.3, 0.2, 0.5]}},
        "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 1},
        "timings": {"sum_of_step_seconds": 30.0, "this_invocation_seconds": 42.0},
    }


def test_tables_show_means_stds_and_deltas():
    res = _results()
    table = accuracy_table(res)
    lines = table.splitlines()
    assert lines[0] == "| method | remove 10% | remove 20% |"
    assert "| *unpruned baseline* | 75.0 ± 2.0 | 75.0 ± 2.0 |" in lines
    assert "| influence_ggn | 80.0 ± 1.0 (Δ +5.0 ± 2.0) | 82.0 ± 1.0 (Δ +7.0 ± 2.0) |" in lines
    assert "| random | 74.0 ± 1.0 (Δ -1.0 ± 2.0) | — |" in lines
    helpful = accuracy_table(res, mode="helpful")
    assert "| influence_ggn | 60.0 ± 1.0 (Δ -15.0 ± 2.0) |" in helpful
    det = detection_table(res)
    assert "| influence_ggn | 0.910 ± 0.010 | 75.0 ± 5.0 | 90.0 | 90.0 |" in det
    assert "| random (chance) | 0.500 ± 0.030 | 20.0 ± 10.0 | 20.0 | — |" in det


def test_write_report_from_results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    report = write_report(path)
    text = report.read_text()
    assert report == tmp_path / "report.md"
    for png in ("accuracy_vs_fraction.png", "score_histograms.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert f"]({png})" in text
    assert "## Helpful arm" in text and "## Noise detection" in text
    assert "| seed0/ggn | CG | converged | 4 | 1e-05 |" in text
    assert "12 flipped training pairs" in text


def test_report_without_noise_or_helpful_arm():
    res = _results()
    res["data"].update(n_flipped=0, n_flipped_train=0)
    res["summary"]["arms"] = [a for a in res["summary"]["arms"] if a["mode"] == "harmful"]
    res["summary"]["noise_detection"] = []
    text = render_markdown(res)
    assert "Noise detection" not in text and "Helpful arm" not in text and "Planted label noise" not in text


def _iv(value, low, high):
    return {
        "value": value,
        "low": low,
        "high": high,
        "level": 0.95,
        "n_boot": 2000,
        "excludes_zero": low > 0 or high < 0,
    }


def test_interval_table_and_plain_verdicts():
    res = _results()
    assert distinguishable(res).startswith("No intervals")  # results without per-pair margins
    arms = res["summary"]["arms"]
    for a in arms:
        a["delta_interval"] = _iv(a["delta_mean"], a["delta_mean"] - 0.01, a["delta_mean"] + 0.01)
        if a["method"] != "random":
            a["delta_vs_random_interval"] = _iv(0.004, -0.01, 0.02)
    table = interval_table(res, mode="harmful").splitlines()
    assert table[0] == "| method | removed | Δ vs unpruned [95% CI] | Δ vs random [95% CI] |"
    assert "| influence_ggn | 10% | +5.0 [+4.0, +6.0] * | +0.4 [-1.0, +2.0] |" in table
    assert "| random | 10% | -1.0 [-2.0, +0.0] | — |" in table
    text = distinguishable(res)
    assert (
        "- influence_ggn (removing the 10% it ranks most harmful) is better than the unpruned baseline: "
        "Δ +5.0 [+4.0, +6.0] points. *Provisional: 2 seed(s).*" in text
    )
    assert "than random pruning" not in text  # every vs-random interval contains 0
    for a in arms:
        a["delta_interval"] = _iv(0.0, -0.01, 0.01)
        a.pop("delta_vs_random_interval", None)
    assert distinguishable(res).startswith("No difference is distinguishable from zero")


def test_helpful_arm_flags_say_a_loss_confirms_the_ranking_and_a_gain_is_unexpected():
    """Pins issue 23: the helpful arm's expected "worse than random" was listed among the flags as if it were
    a failure (the same "is worse than" sentence as a harmful-arm loss); a gain there, the surprising
    outcome, was not marked."""
    res = _results()
    for a in res["summary"]["arms"]:
        a["n_seeds"] = 3
        a["delta_interval"] = _iv(a["delta_mean"], -0.01, 0.01)
        if a["mode"] == "helpful":
            a["delta_vs_random_interval"] = _iv(-0.14, -0.2, -0.08)
    text = distinguishable(res)
    assert "Helpful arm (removing the most helpful pairs; expected: worse):" in text, text
    assert (
        "- As expected, influence_ggn (removing the 10% it ranks most helpful) is worse than random pruning: "
        "Δ -14.0 [-20.0, -8.0] points. This confirms the ranking" in text
    ), text
    assert "it is not a failure" in text and "Provisional" not in text  # 3 seeds: not provisional
    helpful = next(a for a in res["summary"]["arms"] if a["mode"] == "helpful")
    helpful["delta_vs_random_interval"] = _iv(0.05, 0.01, 0.09)
    text = distinguishable(res)
    assert "**Unexpected direction**: influence_ggn (removing the 10% it ranks most helpful) is better" in (
        text
    )
    assert "As expected" not in text


def test_one_seed_shows_no_zero_std_and_warns():
    """Pins issue 23: with one seed the std column read "± 0.0" and nothing warned that the intervals hold
    no seed-to-seed variance; now the std is n/a (1 seed), report.md carries the warning and the flags say
    they are provisional."""
    res = _results()
    res["config"]["seeds"] = [0]
    res["baseline"].update(accuracy_std=None, n_seeds=1)
    for a in res["summary"]["arms"]:
        a.update(n_seeds=1, accuracy_std=None, delta_std=None)
        a["delta_interval"] = {**_iv(a["delta_mean"], 0.01, 0.09), "n_seeds": 1}
    for d in res["summary"]["noise_detection"]:
        d.update(n_seeds=1, auc_std=None, precision_at_k_std=None)
    text = render_markdown(res)
    assert "± 0.0" not in text and "std over seeds: n/a (1 seed)" in text, text
    from prefprune.experiment.certainty import interval_note

    res["intervals"] = interval_note(1)
    text = render_markdown(res)
    assert "> **Warning:** 1 seed: the intervals hold test-pair sampling only" in text
    assert "*Provisional: 1 seed(s).*" in text
    assert "| influence_ggn | 80.0 (Δ +5.0) | 82.0 (Δ +7.0) |" in accuracy_table(res)


def test_direct_solve_shows_as_direct_without_cg_numbers():
    """Pins issue 23: a direct (eigendecomposition) solve read "CG iterations 0, residual 0" in the scoring
    table."""
    res = _results()
    res["scores"]["metadata"]["seed0/ggn"]["solve"] = {
        "method": "direct", "status": "converged", "iterations": 0, "residual": 0.0
    }
    text = render_markdown(res)
    assert "| seed0/ggn | direct (eigendecomposition) | converged | — | — | 1.5 |" in text, text
