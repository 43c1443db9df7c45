"""The experiment protocol on a tiny model: bookkeeping, resumption, the prefix cache, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prefprune.score as score_mod
import prefprune.train as train_mod
from prefprune.bootstrap import paired_delta
from prefprune.cli import main, parse_command
from prefprune.data import PreferenceDataset, PreferencePair, collate_pairs, encode_pairs
from prefprune.data.config import load_data
from prefprune.experiment import (
    ExperimentConfig,
    arm_step_name,
    load_config,
    run_experiment,
)
from prefprune.influence.capture import pair_margins
from prefprune.model import build_reward_model
from prefprune.prefix_cache import PrefixCache, adapt_top_layers
from prefprune.prune import ScoreTable, select_pairs
from prefprune.testing import tiny_config, tiny_tokenizer
from prefprune.train import TrainConfig


def _short_pairs(n: int = 8) -> PreferenceDataset:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        prompt = "Q" * (3 + 5 * i) + f" {i}?"  # lengths grow with i, so batches pad differently
        pairs.append(
            PreferencePair(
                id=f"s{i}",
                prompt=prompt,
                chosen=" yes" * int(rng.integers(1, 6)),
                rejected=" no" * int(rng.integers(1, 9)),
            )
        )
    return PreferenceDataset(pairs, schema="prompt_chosen_rejected")


@pytest.mark.parametrize("family", ["bert", "gpt_neox"])
def test_prefix_cache_equals_uncached_forward_and_gradients(family):
    torch.manual_seed(0)
    model, _ = build_reward_model(tiny_config(family, num_hidden_layers=3), seed=1, dtype=torch.float64)
    frozen = adapt_top_layers(model, 1)
    assert frozen and all(not name.startswith("layer2.") for name in frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(f".{i}." in n and "lora" in n for n in trainable for i in (0, 1))
    with torch.no_grad():  # a non-trivial trained state of the top layer and head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    tok = tiny_tokenizer()
    enc = encode_pairs(_short_pairs(), tok, max_length=128)
    # Two batches that share pairs 2, 3 with different padding lengths around them.
    b1 = collate_pairs(enc[:4], pad_token_id=0)
    b2 = collate_pairs(enc[2:8], pad_token_id=0)
    assert b1["input_ids"].shape[1] != b2["input_ids"].shape[1]

    def run(batch):
        model.zero_grad(set_to_none=True)
        m = pair_margins(model, batch)
        (m.pow(2).sum() + m.sum()).backward()
        return m.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref1, g1 = run(b1)
    ref2, g2 = run(b2)
    cache = PrefixCache(2)
    handle = cache.install(model)
    calls = []
    for layer in handle.prefix:
        layer.register_forward_hook(lambda *a: calls.append(1))
    got1, _ = run(b1)  # fills the cache for pairs 0-3
    n_calls = len(calls)
    assert n_calls == 2 and cache.misses == 8
    got2, h2 = run(b2)  # pairs 4-7 are new: one more prefix pass for the whole batch
    got2b, h2b = run(b2)  # all hits: the prefix layers do not run
    assert len(calls) == n_calls + 2 and cache.hits == 12
    for ref, got in ((ref1, got1), (ref2, got2), (ref2, got2b)):
        err = (ref - got).abs().max().item()
        assert err < 1e-12, err
    for name in g2:
        err = (g2[name] - h2b[name]).abs().max().item()
        assert err < 1e-12, (name, err)
    # Pairs 2 and 3 sit in both batches: same margins whatever the padding.
    assert (got1[2:4] - got2b[0:2]).abs().max().item() < 1e-12
    handle.remove()
    again, _ = run(b1)
    assert (again - ref1).abs().max().item() == 0.0


def test_adapt_top_layers_rejects_trained_adapters():
    model, _ = build_reward_model(tiny_config("gpt_neox"), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    with pytest.raises(ValueError, match="nonzero LoRA B"):
        adapt_top_layers(model, 1)
    with pytest.raises(ValueError, match=r"lora_layers must be in \[1, 2\]"):
        adapt_top_layers(model, 3)


LONG_IDS_EVERY = 15  # every 15th pair has a response longer than max_length=64 (byte tokens)


def _write_short_data(path, n: int = 60) -> str:
    """Short pairs (a tiny byte-level model sees ~40 tokens): the chosen answer repeats the prompt's word."""
    rng = np.random.default_rng(5)
    words = ["apple", "river", "cloud", "stone", "maple", "tiger", "piano", "ocean"]
    rows = []
    for i in range(n):
        w, other = rng.choice(words, size=2, replace=False)
        rejected = f" {other} {other}" if i % LONG_IDS_EVERY else " " + " ".join([str(other)] * 20)
        rows.append({"id": f"q{i}", "prompt": f"Say {w} ({i}):", "chosen": f" {w} {w}", "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tiny_config(tmp_path, **kw) -> ExperimentConfig:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        _write_short_data(data)
    base = dict(
        output=str(tmp_path / "run"),
        data={"source": str(data), "label_noise": kw.pop("label_noise", 0.2), "data_seed": 3},
        split=[0.6, 0.15, 0.25],
        model={"model": kw.pop("model", "tiny:gpt_neox"), "lora": {"r": 2}},
        max_length=64,
        seeds=[0],
        fractions=[0.2],
        curvatures=["ggn"],
        methods=["influence", "grad_dot", "train_loss", "random"],
        helpful_methods=["influence"],
        train={"epochs": 1, "batch_size": 8, "lr": 1e-3},
        score={"max_iter": 5, "batch_size": 8},
        eval_batch_size=16,
        progress=False,
    )
    base.update(kw)
    cfg = ExperimentConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture
def counted(monkeypatch):
    """Count (and record the training ids of) every training and scoring call."""
    calls = {"train": [], "score": 0}
    real_train, real_score = train_mod.train_reward_model, score_mod.score_pairs

    def train(model, tokenizer, data, **kw):
        calls["train"].append(list(data.ids))
        return real_train(model, tokenizer, data, **kw)

    def score(*a, **kw):
        calls["score"] += 1
        return real_score(*a, **kw)

    monkeypatch.setattr(train_mod, "train_reward_model", train)
    monkeypatch.setattr(score_mod, "score_pairs", score)
    return calls


@pytest.mark.slow
def test_tiny_experiment_end_to_end_bookkeeping_and_resume(tmp_path, counted):
    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path)
    results = run_experiment(cfg)
    out = tmp_path / "run"

    splits = json.loads((out / "splits.json").read_text())
    train_ids, val_ids, test_ids = splits["train"], splits["validation"], splits["test"]
    assert len(train_ids) == 36 and len(val_ids) == 9 and len(test_ids) == 15
    assert not (set(train_ids) & set(val_ids)) and not (set(train_ids) & set(test_ids))
    assert not (set(val_ids) & set(test_ids))
    # Pairs whose response cannot fit max_length are left out of training (and recorded), not crashed on.
    long_ids = {f"q{i}" for i in range(0, 60, LONG_IDS_EVERY)}
    left_out = set(results["data"]["train_left_out_too_long"])
    assert left_out == long_ids & set(train_ids) and left_out
    train_ids = [i for i in train_ids if i not in left_out]

    # 1 baseline + 4 methods x 1 fraction + 1 helpful arm; one score pass.
    assert len(counted["train"]) == 6 and counted["score"] == 1
    assert counted["train"][0] == train_ids
    scores = json.loads((out / "seed0" / "scores_ggn.json").read_text())
    table = ScoreTable.from_json(scores)
    assert set(table.ids) == set(train_ids)
    trained_sets = counted["train"][1:]
    arms = [
        ("influence_ggn", "harmful"),
        ("grad_dot", "harmful"),
        ("train_loss", "harmful"),
        ("random", "harmful"),
        ("influence_ggn", "helpful"),
    ]
    col_of = {"influence_ggn": "influence"}
    for (method, mode), trained in zip(arms, trained_sets, strict=True):
        rec = json.loads((out / arm_step_name(0, method, mode, 0.2)).read_text())
        col = col_of.get(method, method)
        expected = select_pairs(
            train_ids if method == "random" else table.ids,
            None if method == "random" else table.column(col),
            method="random" if method == "random" else col,
            fraction=0.2,
            mode=mode,
            seed=0,
        )
        assert rec["removed_ids"] == list(expected.ids), method
        assert len(rec["removed_ids"]) == round(0.2 * len(train_ids))
        # The model was retrained on exactly the training split minus the removed ids.
        assert trained == [i for i in train_ids if i not in set(rec["removed_ids"])], method
        assert rec["n_train"] == len(train_ids) - len(rec["removed_ids"])
    # train_loss removes the highest-loss pairs, influence (harmful) the lowest influence.
    loss = dict(zip(table.ids, table.column("train_loss"), strict=True))
    rec = json.loads((out / arm_step_name(0, "train_loss", "harmful", 0.2)).read_text())
    assert min(loss[i] for i in rec["removed_ids"]) >= max(
        v for i, v in loss.items() if i not in rec["removed_ids"]
    )

    for name in ("results.json", "report.md", "accuracy_vs_fraction.png", "score_histograms.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["n_flipped"] == 12 and res["data"]["n_flipped_train"] > 0
    methods_detected = {d["method"] for d in res["summary"]["noise_detection"]}
    assert {"influence_ggn", "grad_dot", "grad_cos", "train_loss", "random"} <= methods_detected
    for d in res["noise_detection"]:
        assert 0.0 <= d["auc"] <= 1.0 and 0.0 <= d["precision_at_k"] <= 1.0
    assert {(a["method"], a["mode"]) for a in res["summary"]["arms"]} == set(arms)
    assert res["versions"]["torch"] == torch.__version__.split("+")[0] or res["versions"]["torch"]
    report = (out / "report.md").read_text()
    assert "influence_ggn" in report and "Noise detection" in report and "Helpful arm" in report
    # Every arm has its paired bootstrap interval, recomputable from the step files' test margins.
    assert "distinguishable from zero" in report.lower() and "Δ vs random" in report
    base_m = json.loads((out / "seed0" / "baseline.json").read_text())["test_margins"]
    for entry in res["summary"]["arms"]:
        iv = entry["delta_interval"]
        step = arm_step_name(0, entry["method"], entry["mode"], entry["fraction"])
        rec = json.loads((out / step).read_text())
        ids = sorted(rec["test_margins"])
        a = np.asarray([[float(rec["test_margins"][i] > 0) for i in ids]])
        b = np.asarray([[float(base_m[i] > 0) for i in ids]])
        want = paired_delta(a, b, n_boot=2000, level=0.95, seed=0)
        assert (iv["value"], iv["low"], iv["high"]) == (want.value, want.low, want.high), entry["method"]
        assert iv["value"] == pytest.approx(entry["delta_mean"], abs=1e-12)

    # Resume: nothing is redone.
    counted["train"].clear()
    run_experiment(_tiny_config(tmp_path))
    assert counted["train"] == [] and counted["score"] == 1
    # A lost step is redone alone, from the same initialisation: same result as before (CPU: deterministic).
    lost = out / arm_step_name(0, "grad_dot", "harmful", 0.2)
    before = json.loads(lost.read_text())
    lost.unlink()
    run_experiment(_tiny_config(tmp_path))
    assert len(counted["train"]) == 1 and counted["score"] == 1
    after = json.loads(lost.read_text())
    assert after["removed_ids"] == before["removed_ids"]
    assert after["test"]["accuracy"] == before["test"]["accuracy"]
    assert after["test"]["loss"] == pytest.approx(before["test"]["loss"], abs=1e-9)

    # Resuming with a setting that changes results is refused.
    with pytest.raises(ValueError, match="different config.*fractions"):
        run_experiment(_tiny_config(tmp_path, fractions=[0.1]))


def test_prefix_cache_in_the_protocol(tmp_path, counted):
    torch.set_num_threads(1)
    cfg = _tiny_config(
        tmp_path,
        model="tiny:bert",
        lora_layers=1,
        methods=["grad_cos", "random"],
        helpful_methods=[],
        label_noise=0.0,
        curvatures=["identity"],
    )
    res = run_experiment(cfg)
    assert res["prefix_cache"]["cached_layers"] == 1 and res["prefix_cache"]["hits"] > 0
    assert counted["score"] == 1 and len(counted["train"]) == 3
    assert not res["noise_detection"]  # no planted noise, no detection table
    assert (tmp_path / "run" / "report.md").is_file()


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "train_reward_model", no_training)
    for kw, match in [
        ({"fractions": [0.1, 1.0]}, r"fractions entry must be in the open interval \(0, 1\), got 1.0"),
        ({"fractions": [0.0]}, r"got 0.0"),
        ({"helpful_fractions": [-0.2]}, r"helpful_fractions entry .* got -0.2"),
        ({"methods": ["influence", "loss_of_faith"]}, r"unknown method 'loss_of_faith'"),
        ({"helpful_methods": ["bogus"]}, r"unknown method 'bogus'"),
        ({"curvatures": ["kfac"]}, r"unknown curvature 'kfac'"),
        ({"methods": ["influence_exact"]}, r"needs curvature 'exact'"),
        ({"train": {"learning_rate": 1.0}}, r"unknown key train.learning_rate"),
        ({"score": {"seed": 3}}, r"score.seed is set by the experiment"),
        ({"split": [0.8, 0.3, 0.1]}, r"split must be three positive fractions"),
        ({"label_noise": 1.0}, r"label_noise must be in \[0, 1\), got 1.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            _tiny_config(tmp_path, **kw)
    # A fraction that selects nothing from this training split is caught before training.
    with pytest.raises(ValueError, match="selects 0 pairs"):
        run_experiment(_tiny_config(tmp_path, fractions=[0.001]))
    assert not (tmp_path / "run" / "seed0").exists()


def test_yaml_and_flags(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("model: tiny:gpt_neox\nseeds: [1, 2]\nfractions: [0.1]\ntrain:\n  epochs: 2\n")
    cmd = parse_command(
        [
            "experiment",
            "--config",
            str(good),
            "--fractions",
            "0.05",
            "0.2",
            "--train.lr",
            "0.002",
            "--lora-layers",
            "1",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    cfg = cmd.experiment
    assert cfg.seeds == [1, 2] and cfg.fractions == [0.05, 0.2] and cfg.lora_layers == 1
    assert cfg.train == TrainConfig(epochs=2, lr=0.002) and cfg.output == str(tmp_path / "o")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny:gpt_neox\nfractoins: [0.1]\n")
    with pytest.raises(ValueError, match=r"bad.yaml, line 2: unknown config key 'fractoins'"):
        load_config(bad)
    bad.write_text("seeds: three\n")
    with pytest.raises(ValueError, match=r"bad.yaml: seeds must be a list, got 'three'"):
        load_config(bad)
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        load_config(None, {"nope": 1})
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    help_text = capsys.readouterr().out
    assert (
        "--helpful-fractions" in help_text
        and "--score.damping" in help_text
        and "--train.epochs" in help_text
    )


@pytest.mark.parametrize("fraction", [0.2])
def test_score_file_ids_must_match(tmp_path, fraction):
    from prefprune.prune import check_ids_match

    table = ScoreTable(ids=["a", "b"], columns={"influence": [0.0, 1.0]}, source="scores.parquet")
    with pytest.raises(ValueError, match=r"scores.parquet does not match the dataset"):
        check_ids_match(["a", "c"], table)


def test_demo_yaml_matches_embedded_demo_config():
    from pathlib import Path

    from prefprune.experiment import DEMO_CONFIG, demo_config

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    from_yaml = load_config(path).to_dict()
    embedded = demo_config(output=from_yaml["output"]).to_dict()
    assert from_yaml == embedded
    assert set(DEMO_CONFIG) <= set(embedded)


@pytest.mark.parametrize(
    "name",
    ["tldr-pythia-410m.yaml", "tldr-pythia-1b.yaml", "hh-harmless-minilm.yaml", "biased-annotator.yaml"],
)
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    if name.startswith("tldr"):
        assert "exact" in cfg.curvatures and cfg.model.model.startswith("EleutherAI/pythia")
    elif name.startswith("biased"):
        assert cfg.data.noise == "prefer_longer" and cfg.clean_eval and len(cfg.seeds) >= 5
    else:
        assert cfg.data.skip_bad and cfg.model.model == "minilm"


def test_experiment_cli_prints_the_table(tmp_path, capsys):
    data = _write_short_data(tmp_path / "pairs.jsonl")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"data: {{source: {data}}}\nmodel: tiny:gpt_neox\nmax_length: 64\nseeds: [0]\nfractions: [0.2]\n"
        "methods: [random]\nhelpful_methods: []\nlora: {r: 2}\ntrain: {epochs: 1, batch_size: 8}\n"
        "progress: false\n"
    )
    out = tmp_path / "o"
    assert main(["experiment", "--config", str(cfg), "--output", str(out), "--seeds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| random | " in printed and "*unpruned baseline*" in printed
    # One seed: the printed summary warns and shows no "± 0.0" std (issue 23).
    assert "Warning: 1 seed" in printed and "± 0.0" not in printed and "n/a (1 seed)" in printed
    assert json.loads((out / "results.json").read_text())["config"]["seeds"] == [3]
    assert main(["experiment", "--config", str(cfg), "--output", str(out), "--fractions", "0", "5"]) == 2
    assert "fractions entry must be in the open interval (0, 1), got 0" in capsys.readouterr().err


def test_trusted_validation_scores_against_clean_pairs_only(tmp_path, monkeypatch):
    seen = []
    real = score_mod.score_pairs

    def score(model, tok, train, val, **kw):
        seen.append(list(val.ids))
        return real(model, tok, train, val, **kw)

    monkeypatch.setattr(score_mod, "score_pairs", score)
    cfg = _tiny_config(tmp_path, methods=["grad_dot"], helpful_methods=[], trusted_validation=True)
    res = run_experiment(cfg)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    flipped = _flipped_ids(tmp_path)
    assert seen and set(seen[0]) == set(splits["validation"]) - flipped
    assert res["data"]["n_flipped_validation"] > 0 and len(seen[0]) < len(splits["validation"])
    with pytest.raises(ValueError, match="trusted_validation needs planted label noise"):
        run_experiment(
            _tiny_config(tmp_path, output=str(tmp_path / "b"), label_noise=0.0, trusted_validation=True)
        )


def _flipped_ids(tmp_path) -> set[str]:
    return load_data(_tiny_config(tmp_path).data, plant_noise=True).flipped_ids
