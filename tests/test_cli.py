"""The ``prefprune`` command line: help, train/eval on tiny models, and one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import torch
from _pairs import easy_pairs

from prefprune.cli import COMMANDS, main
from prefprune.data import load_preferences
from prefprune.model import load_reward_model
from prefprune.testing import tiny_config, tiny_tokenizer
from prefprune.train import evaluate

FAST = ["--max-length", "64", "--batch-size", "8", "--lr", "1e-2", "--no-progress", "--log-level", "WARNING"]


def _write_pairs(path, n, seed=0):
    easy_pairs(n, seed=seed, prefix=f"p{seed}-").save(path)
    return path


def _flags(cls, prefix=""):
    """(flag, help) of every setting of a command dataclass: flattened sections without a prefix."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        flat = typing.get_origin(hint) is typing.Annotated and any(
            getattr(m, "name", None) == "" for m in hint.__metadata__
        )
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if dataclasses.is_dataclass(inner):
            yield from _flags(inner, prefix if flat else f"{prefix}{f.name}.")
        else:
            yield f"--{prefix}{f.name.replace('_', '-')}", f.metadata.get("help", "")


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out
    for name, cls in COMMANDS.items():
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        shown = capsys.readouterr().out
        for flag, helptext in _flags(cls):
            assert helptext and helptext.strip(), f"{name} {flag} has no help"
            assert flag in shown, (name, flag)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--data",
        "--schema",
        "--model",
        "--lora.r",
        "--lr",
        "--grad-accum",
        "--eval-fraction",
        "--output",
    ):
        assert opt in out, opt


def test_train_then_eval_on_a_tiny_model(tmp_path, capsys):
    data = _write_pairs(tmp_path / "pairs.jsonl", 48)
    out = tmp_path / "rm"
    rc = main(
        ["train", "--model", "tiny:llama", "--data", str(data), "--eval-fraction", "0.25", "--epochs", "3"]
        + FAST
        + ["--output", str(out)]
    )
    assert rc == 0
    summary = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["n_train"] == 36 and metrics["data"]["n_eval"] == 12
    assert metrics["n_train"] == 36 and metrics["steps"] == 3 * 5
    assert f"held-out accuracy {metrics['eval']['accuracy']:.4f}" in summary
    assert metrics["eval"]["accuracy"] >= 0.9, metrics["eval"]

    # The held-out part is the split the Python API gives for the same seed.
    held = load_preferences(data).split([0.75, 0.25], seed=0)[1]
    assert metrics["eval"]["n"] == len(held) == 12

    rc = main(
        ["eval", "--model", str(out), "--data", str(data), "--output", str(tmp_path / "ev.json"), "--margins"]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    model, tok = load_reward_model(out)
    ref = evaluate(model, tok, load_preferences(data), max_length=64)
    assert printed["accuracy"] == ref["accuracy"] and printed["n"] == 48
    assert printed["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert printed["max_length"] == 64  # taken from the training run
    assert len(json.loads((tmp_path / "ev.json").read_text())["margins"]) == 48


def test_train_from_a_saved_base_folder_with_separate_eval_data(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForSequenceClassification.from_config(tiny_config("gpt_neox")).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    train = _write_pairs(tmp_path / "train.jsonl", 24)
    held = _write_pairs(tmp_path / "held.jsonl", 8, seed=1)
    out = tmp_path / "rm"
    rc = main(
        [
            "train",
            "--model",
            str(base),
            "--data",
            str(train),
            "--eval-data",
            str(held),
            "--lora.r",
            "4",
            "--output",
            str(out),
        ]
        + FAST
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["eval"]["n"]) == (24, 8)
    assert metrics["model"]["lora"]["r"] == 4
    meta = json.loads((out / "prefprune.json").read_text())
    assert meta["base"] == str(base.resolve()) and not (out / "base").exists()


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.jsonl"), "--model", "tiny:bert"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f"prefprune train: error: no such preference file: '{tmp_path / 'missing.jsonl'}'"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n')
    assert main(["eval", "--model", str(tmp_path), "--data", str(bad)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err

    data = _write_pairs(tmp_path / "ok.jsonl", 8)
    out = tmp_path / "rm"
    assert (
        main(
            ["train", "--model", "tiny:gpt2", "--data", str(data), "--epochs", "1", "--output", str(out)]
            + FAST
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl: line 2" in err and "Traceback" not in err, err

    assert main(["train", "--model", "tiny:mamba", "--data", str(data)]) == 2
    assert "unknown tiny model family 'mamba'" in capsys.readouterr().err
    assert main(["train", "--batch-size", "0", "--data", str(data), "--model", "tiny:bert"]) == 2
    assert "batch_size must be a positive integer, got 0" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError):
        main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--debug"])
    with pytest.raises(SystemExit) as exc:
        main(["train", "--no-such-option"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_entry_point_runs_as_a_program(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefprune.cli",
            "eval",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            "synthetic",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"prefprune eval: error: reward model folder not found: {tmp_path / 'nope'}"
