"""Settings carried from a saved model folder (issue 23): score and eval take the max length, truncation,
padding side and dtype the model was trained and saved with unless a flag gives them, log where each came
from, and record that in their output."""

from __future__ import annotations

import json
import logging

import pytest
from _pairs import easy_pairs

from prefprune.cli import main
from prefprune.model import carry_settings, recorded_settings

QUIET = ["--no-progress", "--log-level", "INFO"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained at max_length 48, truncation 'error', float64; its tokenizer saved with left
    padding; and data that fits."""
    tmp = tmp_path_factory.mktemp("carry")
    data = tmp / "pairs.jsonl"
    easy_pairs(24, seed=0).save(data)
    out = tmp / "rm"
    rc = main(["train", "--model", "tiny:gpt_neox", "--data", str(data), "--eval-fraction", "0", "--epochs",
               "1", "--max-length", "48", "--truncation", "error", "--dtype", "float64", "--batch-size", "8",
               "--output", str(out), *QUIET])
    assert rc == 0
    tok_config = out / "tokenizer_config.json"
    cfg = json.loads(tok_config.read_text())
    tok_config.write_text(json.dumps({**cfg, "padding_side": "left"}))
    return out, data


def _score(out, data, path, *flags):
    assert main(["score", "--model", str(out), "--train", str(data), "--val", str(data), "--output",
                 str(path), "--curvature", "identity", *flags, *QUIET]) == 0
    return json.loads(path.with_name(path.name + ".json").read_text())


def test_score_takes_the_models_settings_and_records_where_from(trained, tmp_path, caplog):
    """Pins: score used max_length 512 (and right padding, truncation 'prompt') whatever the model was
    trained with; now the folder's values are used, logged and recorded in the sidecar."""
    out, data = trained
    with caplog.at_level(logging.INFO, logger="prefprune"):
        side = _score(out, data, tmp_path / "s.jsonl")
    cfg = side["config"]
    assert (cfg["max_length"], cfg["truncation"], cfg["padding_side"]) == (48, "error", "left"), cfg
    settings = side["model_settings"]
    assert settings["max_length"] == {"value": 48, "from": "prefprune.json extra.train_config.max_length"}
    assert settings["padding_side"]["from"] == "tokenizer_config.json padding_side", settings
    assert settings["dtype"] == {"value": "float64", "from": "prefprune.json dtype"}, settings
    logged = [r.getMessage() for r in caplog.records if "settings for model" in r.getMessage()]
    assert len(logged) == 1 and "max_length=48 (prefprune.json" in logged[0], logged


def test_explicit_flags_win_over_the_model_folder(trained, tmp_path):
    """Pins: a flag given on the command line is used as given (and recorded as such)."""
    out, data = trained
    side = _score(out, data, tmp_path / "s.jsonl", "--max-length", "40", "--padding-side", "right",
                  "--dtype", "float32")
    cfg, settings = side["config"], side["model_settings"]
    assert (cfg["max_length"], cfg["padding_side"], cfg["truncation"]) == (40, "right", "error"), cfg
    assert settings["max_length"]["from"] == settings["dtype"]["from"] == "given", settings
    assert settings["dtype"]["value"] == "float32"


def test_eval_takes_truncation_and_dtype_from_the_model(trained, tmp_path, capsys):
    """Pins: eval took the max length from the folder but not its truncation or dtype, and did not say
    where any setting came from."""
    out, data = trained
    path = tmp_path / "ev.json"
    assert main(["eval", "--model", str(out), "--data", str(data), "--output", str(path)]) == 0
    settings = json.loads(path.read_text())["model_settings"]
    assert {k: v["value"] for k, v in settings.items()} == {
        "max_length": 48, "truncation": "error", "dtype": "float64"}, settings


def test_a_folder_without_records_falls_back_to_the_defaults(tmp_path):
    """Pins the helper validate calls: nothing recorded → the defaults, said to be defaults."""
    assert recorded_settings(tmp_path) == {}
    got = carry_settings(tmp_path, {"max_length": None, "truncation": "prompt"}, {"max_length": 512})
    assert got == {"max_length": {"value": 512, "from": "default"},
                   "truncation": {"value": "prompt", "from": "given"}}
