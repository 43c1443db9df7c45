"""prefprune validate: leave-one-out and LDS against an independent float64 brute force; bad input; CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _pairs import easy_pairs

import prefprune.train as train_mod
from prefprune.bootstrap import spearman
from prefprune.data import PreferenceDataset, collate_pairs, plant_label_noise
from prefprune.influence.capture import pair_margins
from prefprune.model import ModelConfig, build_model
from prefprune.score import ScoreConfig, score_pairs
from prefprune.train import TrainConfig, encode_for_training, evaluate, train_reward_model
from prefprune.validate import ValidateConfig, ValidationSetup, run_validation

MODEL = ModelConfig(model="tiny:gpt_neox", dtype="float64", lora={"r": 1})


def _data(n_train: int, n_val: int) -> tuple[PreferenceDataset, PreferenceDataset]:
    # Flipped labels keep the task from being separable, so full-batch training has an optimum to reach.
    data = plant_label_noise(easy_pairs(n_train + n_val, seed=3), 0.25, seed=1)
    return data.select(data.ids[:n_train]), data.select(data.ids[n_train:])


def tiny_setup(n_train: int = 6, n_val: int = 10, epochs: int = 20) -> ValidationSetup:
    """A tiny float64 model trained full-batch with a decaying learning rate (close to its optimum)."""
    train, val = _data(n_train, n_val)
    tc = TrainConfig(
        epochs=epochs,
        batch_size=n_train,
        lr=0.05,
        warmup_ratio=0.0,
        max_grad_norm=None,
        max_length=64,
        progress=False,
        device="cpu",
        group_by_length=False,
    )
    sc = ScoreConfig(max_length=64, tol=1e-12, max_iter=400, batch_size=32)
    return ValidationSetup(
        train,
        val,
        build=lambda: build_model(MODEL, seed=0),
        train_config=tc,
        score_config=sc,
        source={"test": "tiny"},
    )


def _batch(pairs, tok):
    enc, skipped = encode_for_training(pairs, tok, max_length=64)
    assert not skipped
    return collate_pairs(enc, pad_token_id=tok.pad_token_id)


def brute_force_loo(setup: ValidationSetup, dampings) -> dict:
    """Gauss-Newton influence from the dense float64 matrix (torch.linalg.solve) and true leave-one-out
    retraining, written without any of validate's code."""
    model, tok = setup.build()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def retrain(data):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])
        train_reward_model(model, tok, data, config=setup.train_config)
        return evaluate(model, tok, setup.val, max_length=64)["loss"]

    l_full = retrain(setup.train)
    influence = _dense_ggn_influence(model, _batch(setup.train, tok), _batch(setup.val, tok), dampings)
    ids = list(setup.train.ids)
    actual = np.asarray([retrain(setup.train.exclude([i])) - l_full for i in ids])
    n = len(ids)
    pearson = {lam: float(np.corrcoef(influence[lam] / n, actual)[0, 1]) for lam in dampings}
    return {"ids": ids, "influence": influence, "actual": actual, "l_full": l_full, "pearson": pearson}


def _dense_ggn_influence(model, tb, vb, dampings) -> dict:
    ps = [p for p in model.parameters() if p.requires_grad]

    def flat(gs):
        return torch.cat([g.reshape(-1) for g in gs])

    m = pair_margins(model, tb)
    jac = torch.stack([flat(torch.autograd.grad(m[i], ps, retain_graph=True)) for i in range(m.numel())])
    w = (torch.sigmoid(m) * torch.sigmoid(-m)).detach()
    ggn = (jac.T * w) @ jac / m.numel()  # mean_i σ(m_i)σ(−m_i) ∇m_i ∇m_iᵀ (DESIGN §2)
    per_pair = -torch.sigmoid(-m).detach()[:, None] * jac  # ∇ℓ_i = −σ(−m_i) ∇m_i
    g_val = flat(torch.autograd.grad(torch.nn.functional.softplus(-pair_margins(model, vb)).mean(), ps))
    eye = torch.eye(ggn.shape[0], dtype=ggn.dtype)
    return {lam: (per_pair @ torch.linalg.solve(ggn + lam * eye, g_val)).numpy() for lam in dampings}


@pytest.mark.slow
def test_leave_one_out_matches_an_independent_float64_brute_force(tmp_path):
    torch.set_num_threads(1)
    setup = tiny_setup()
    dampings = [1.0, 0.1, 0.01]
    vc = ValidateConfig(
        output=str(tmp_path / "v"),
        subsets=5,
        loo=len(setup.train),
        dampings=dampings,
        curvature="ggn",
        progress=False,
        bootstrap_samples=200,
    )
    res = run_validation(vc, setup=setup)
    ref = brute_force_loo(setup, dampings)
    assert res["reference"]["val_loss"] == pytest.approx(ref["l_full"], abs=1e-12)
    loo = {r["id"]: r["val_loss"] - res["reference"]["val_loss"] for r in res["loo"]}
    assert sorted(loo) == sorted(ref["ids"])
    np.testing.assert_allclose([loo[i] for i in ref["ids"]], ref["actual"], atol=1e-10)
    order = [r["id"] for r in res["loo"]]
    for lam in dampings:
        name = f"influence@{lam:g}"
        got = res["columns"][name]["loo"]["pearson"]
        assert abs(got - ref["pearson"][lam]) <= 0.05, (lam, got, ref["pearson"][lam])
        # validate's CG influence equals the dense solve.
        pred = np.asarray(res["columns"][name]["loo"]["predicted"]) * len(order)
        want = np.asarray([ref["influence"][lam][ref["ids"].index(i)] for i in order])
        np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-9 * np.abs(want).max())
    # The LDS: Spearman of Σ(left-out scores)/n against the measured subset changes.
    sub = res["subsets"]
    pos = {i: k for k, i in enumerate(ref["ids"])}
    for lam in dampings:
        pred = [ref["influence"][lam][[pos[i] for i in s["left_out"]]].sum() / len(pos) for s in sub]
        meas = [s["val_loss"] - ref["l_full"] for s in sub]
        lds = res["columns"][f"influence@{lam:g}"]["lds"]
        assert lds["value"] == pytest.approx(spearman(pred, meas), abs=1e-9)
        assert lds["low"] <= lds["value"] <= lds["high"]
    assert res["recommended"]["damping"] in dampings


def test_bad_input_fails_before_any_retraining(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "train_reward_model", no_training)
    setup = tiny_setup()
    for kw, match in [
        ({"fraction": 1.0}, r"fraction \(α\) must be in the open interval \(0, 1\), got 1.0"),
        ({"fraction": 0.0}, r"got 0.0"),
        ({"subsets": 4}, r"subsets \(S\) must be at least 5 for a rank correlation, got 4"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_validation(ValidateConfig(output=str(tmp_path / "v"), **kw), setup=setup)
    small = ValidationSetup(
        setup.train,
        setup.val.select(setup.val.ids[:9]),
        setup.build,
        setup.train_config,
        setup.score_config,
        {},
    )
    with pytest.raises(ValueError, match="the validation set has 9 pairs; validate needs at least 10"):
        run_validation(ValidateConfig(output=str(tmp_path / "v")), setup=small)
    with pytest.raises(ValueError, match="give exactly one of --model"):
        run_validation(ValidateConfig(output=str(tmp_path / "v")))
    # A model folder without training metadata (and no config): a clear error, no retraining.
    folder = tmp_path / "bare"
    folder.mkdir()
    with pytest.raises(ValueError, match="no training metadata"):
        run_validation(ValidateConfig(model=str(folder), output=str(tmp_path / "v")))
    assert not (tmp_path / "v" / "reference.json").exists()


def test_validate_cli_from_a_trained_folder_resumes(tmp_path, capsys):
    from prefprune.cli import main

    torch.set_num_threads(1)
    data = tmp_path / "pairs.jsonl"
    easy_pairs(40, seed=0, prefix="p-").save(data)
    fast = ["--max-length", "64", "--batch-size", "8", "--no-progress", "--log-level", "WARNING"]
    assert (
        main(
            [
                "train",
                "--model",
                "tiny:gpt_neox",
                "--lora.r",
                "1",
                "--data",
                str(data),
                "--eval-fraction",
                "0.3",
                "--epochs",
                "2",
                "--lr",
                "1e-2",
                "--output",
                str(tmp_path / "rm"),
            ]
            + fast
        )
        == 0
    )
    capsys.readouterr()
    args = [
        "validate",
        "--model",
        str(tmp_path / "rm"),
        "--subsets",
        "5",
        "--dampings",
        "1.0",
        "--output",
        str(tmp_path / "v"),
        "--no-progress",
        "--log-level",
        "WARNING",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| influence@1 |" in out and "Recommended damping: 1" in out
    res = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert len(res["subsets"]) == 5 and res["n_train"] == 28 and res["n_validation"] == 12
    assert all(len(s["left_out"]) == 14 for s in res["subsets"])
    assert (tmp_path / "v" / "validate_scatter.png").stat().st_size > 1000
    # Resume: the step files are reused, the numbers are the same, and nothing is retrained.
    (tmp_path / "v" / "validate.json").unlink()
    calls = []
    real = train_mod.train_reward_model
    train_mod.train_reward_model = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert main(args) == 0
    finally:
        train_mod.train_reward_model = real
    again = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert again["columns"] == res["columns"] and calls == []
    assert main(["validate", "--model", str(tmp_path / "rm"), "--fraction", "1.5"]) == 2
    assert "fraction (α) must be in the open interval (0, 1), got 1.5" in capsys.readouterr().err


def test_validate_ensemble_is_the_mean_over_independently_trained_seeds(tmp_path):
    """`ensemble=[s]`: a seed-s model trained on the whole set from its own initial weights and scored like
    the reference; ensemble:<column> is the mean of the two, pinned against a model trained here."""
    torch.set_num_threads(1)
    base = tiny_setup(n_train=8, n_val=10, epochs=4)

    def for_seed(seed):
        return ValidationSetup(
            base.train, base.val, build=lambda: build_model(MODEL, seed=seed),
            train_config=dataclasses.replace(base.train_config, seed=seed), score_config=base.score_config,
            source={"test": "tiny", "seed": seed}, reseed=for_seed,
        )

    vc = ValidateConfig(output=str(tmp_path / "v"), subsets=5, dampings=[1.0, 0.1], curvature="ggn",
                        ensemble=[7], progress=False, bootstrap_samples=100)
    res = run_validation(vc, setup=for_seed(0))
    # The member, trained and scored here without validate's code path.
    model, tok = build_model(MODEL, seed=7)
    train_reward_model(model, tok, base.train, config=dataclasses.replace(base.train_config, seed=7))
    sc = dataclasses.replace(base.score_config, curvature="ggn", damping=[1.0, 0.1], seed=7)
    member = score_pairs(model, tok, base.train, base.val, config=sc)
    ref = json.loads((tmp_path / "v" / "scores" / "damping_1_0.1.json").read_text())
    ids = [str(i) for i in ref["ids"]]
    m_pos = {str(i): k for k, i in enumerate(member.ids)}
    n = len(ids)
    names = [("grad_dot", "grad_dot"), ("influence@1.0", "influence@1"), ("influence@0.1", "influence@0.1")]
    for col, name in names:
        other = np.asarray(member.columns[col])[[m_pos[i] for i in ids]]
        mean = (np.asarray(ref["columns"][col]) + other) / 2
        got = np.asarray(res["columns"][f"ensemble:{name}"]["subset_predicted"])
        want = [mean[[ids.index(i) for i in s["left_out"]]].sum() / n for s in res["subsets"]]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert {"ensemble:grad_cos", "influence@1", "grad_cos"} <= set(res["columns"])
    with pytest.raises(ValueError, match="ensemble seeds must differ"):
        run_validation(dataclasses.replace(vc, ensemble=[0]), setup=for_seed(0))
