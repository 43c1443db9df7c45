"""End-to-end scoring: every column against a float64 brute force, files, determinism, bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from _scoring_helpers import brute_force_scores, make_pairs, rel_err, tiny_model, tokenizer

from prefprune.data import PreferenceDataset, PreferencePair
from prefprune.influence import NonPositiveCurvatureError
from prefprune.prune import read_score_table
from prefprune.score import COLUMNS, ScoreConfig, score_model, score_pairs, write_scores

TRAIN = make_pairs(7, seed=1)
VAL = make_pairs(3, seed=2, prefix="v")
SCORED = ("influence", "grad_dot", "grad_cos", "train_loss", "margin")


def _float32_copy(model64, family):
    m32 = tiny_model(family, dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    return m32


# (family, padding side, dtype, curvature, batch size, hessian_samples)
CASES = [
    ("gpt_neox", "left", torch.float64, "exact", 3, None),
    ("llama", "right", torch.float64, "ggn", 4, None),
    ("bert", "right", torch.float64, "exact", 3, None),
    ("gpt2", "left", torch.float64, "ggn", 2, None),
    ("llama", "left", torch.float64, "ggn", 1, 4),  # batch of one, seeded curvature subsample
    ("gpt_neox", "right", torch.float32, "ggn", 3, None),
    ("llama", "left", torch.float32, "exact", 4, None),
    ("bert", "right", torch.float32, "ggn", 5, None),
]


@pytest.mark.parametrize("family,side,dtype,curvature,batch_size,hessian_samples", CASES)
def test_scores_match_float64_brute_force(family, side, dtype, curvature, batch_size, hessian_samples):
    model64 = tiny_model(family)
    tok = tokenizer()
    idx = None
    if hessian_samples is not None:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(TRAIN), generator=gen)[:hessian_samples].sort().values.tolist()
    damping = 0.5
    ref, H, _ = brute_force_scores(model64, tok, TRAIN, VAL, curvature=curvature, damping=damping,
                                   hessian_idx=idx)
    if curvature == "exact":
        lo = float(torch.linalg.eigvalsh(H)[0])
        if lo + damping <= 0:  # make the damped Hessian positive definite (indefinite case tested separately)
            damping = -lo + 0.5
            ref, _, _ = brute_force_scores(model64, tok, TRAIN, VAL, curvature=curvature, damping=damping,
                                           hessian_idx=idx)
    model = model64 if dtype == torch.float64 else _float32_copy(model64, family)
    cfg = ScoreConfig(curvature=curvature, damping=damping, batch_size=batch_size, padding_side=side,
                      hessian_samples=hessian_samples, tol=1e-12 if dtype == torch.float64 else 1e-6,
                      max_iter=500, impl="reference", progress=False)
    res = score_pairs(model, tok, TRAIN, VAL, config=cfg)
    assert res.ids == [p.id for p in TRAIN]
    assert res.solve.status == "converged", res.solve
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    errs = {c: rel_err(res.columns[c], ref[c]) for c in SCORED}
    assert all(e <= tol for e in errs.values()), f"{family}/{side}/{dtype}/{curvature}: rel errors {errs}"
    assert res.metadata["solve"]["n_curvature"] == (hessian_samples or len(TRAIN))


def test_identity_curvature_gives_grad_dot_and_triton_interpreter_agrees():
    model = _float32_copy(tiny_model("gpt_neox"), "gpt_neox")
    tok = tokenizer()
    ref = score_pairs(model, tok, TRAIN, VAL, config=ScoreConfig(curvature="identity", impl="reference",
                                                                  progress=False))
    np.testing.assert_array_equal(ref.columns["influence"], ref.columns["grad_dot"])
    tri = score_pairs(model, tok, TRAIN, VAL, config=ScoreConfig(curvature="identity", impl="triton",
                                                                  progress=False))
    assert tri.metadata["impl"]["segment_grad_dot"] == "triton"
    for c in SCORED:
        assert rel_err(tri.columns[c], ref.columns[c]) <= 1e-5, c


def test_nonpositive_curvature_raises_or_is_recorded(tmp_path):
    model, tok = tiny_model("gpt_neox"), tokenizer()
    cfg = ScoreConfig(curvature="exact", damping=1e-4, tol=1e-12, max_iter=500, impl="reference",
                      progress=False)
    with pytest.raises(NonPositiveCurvatureError, match="non-positive curvature"):
        score_pairs(model, tok, TRAIN, VAL, config=cfg)
    cfg.on_nonpositive = "nan"
    res = score_pairs(model, tok, TRAIN, VAL, config=cfg)
    assert np.isnan(res.columns["influence"]).all() and np.isfinite(res.columns["grad_dot"]).all()
    out = tmp_path / "s.jsonl"
    res.save(out)
    side = json.loads((tmp_path / "s.jsonl.json").read_text())
    assert side["solve"]["status"] == "nonpositive_curvature" and side["solve"]["nonpositive_value"] <= 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["influence"] is None


@pytest.mark.parametrize("ext", [".parquet", ".jsonl", ".csv"])
def test_files_are_deterministic_and_readable(tmp_path, ext):
    tok = tokenizer()
    digests = []
    for run in range(2):
        model = tiny_model("llama")  # rebuilt: same inputs, not the same object
        cfg = ScoreConfig(curvature="ggn", impl="reference", progress=False)
        res = score_pairs(model, tok, TRAIN, VAL, config=cfg)
        path = tmp_path / f"run{run}{ext}"
        write_scores(res, path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    table = read_score_table(tmp_path / f"run0{ext}")
    assert table.ids == [p.id for p in TRAIN]
    for c in COLUMNS:
        np.testing.assert_allclose(table.column(c), res.columns[c], rtol=0, atol=0)
    side = json.loads((tmp_path / f"run0{ext}.json").read_text())
    for key in ("config", "solve", "timings_s", "versions", "impl"):
        assert key in side
    assert {"torch", "transformers", "peft", "prefprune"} <= set(side["versions"])
    # The default damping (issue 23): unset, i.e. 0.1 × trace(H)/p.
    assert side["config"]["damping"] is None and side["solve"]["damping_factor"] == 0.1
    assert side["solve"]["status"] == "converged"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_length_grouping_keeps_row_order_and_values():
    model, tok = tiny_model("gpt2"), tokenizer()
    cfgs = [ScoreConfig(curvature="ggn", batch_size=3, group_by_length=g, impl="reference", tol=1e-12,
                        progress=False) for g in (True, False)]
    a, b = (score_pairs(model, tok, TRAIN, VAL, config=c) for c in cfgs)
    assert a.ids == b.ids == [p.id for p in TRAIN]
    for c in SCORED:
        assert rel_err(a.columns[c], b.columns[c]) <= 1e-10, c


def test_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    res = score_pairs(tiny_model("gpt2"), tokenizer(), TRAIN, VAL,
                      config=ScoreConfig(curvature="identity", impl="reference", progress=False))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_scores(res, tmp_path / "scores.parquet")
    assert list(tmp_path.iterdir()) == []


def test_score_model_folder_round_trip(tmp_path):
    from prefprune.model import save_reward_model

    model, tok = tiny_model("gpt_neox", dtype=torch.float32), tokenizer()
    save_reward_model(model, tok, tmp_path / "rm")
    PreferenceDataset(TRAIN, schema="prompt_chosen_rejected").save(tmp_path / "train.jsonl")
    PreferenceDataset(VAL, schema="prompt_chosen_rejected").save(tmp_path / "val.jsonl")
    cfg = ScoreConfig(curvature="ggn", impl="reference", progress=False)
    out = tmp_path / "scores.csv"
    res = score_model(tmp_path / "rm", tmp_path / "train.jsonl", tmp_path / "val.jsonl", out, config=cfg)
    direct = score_pairs(model, tok, TRAIN, VAL, config=cfg)
    for c in SCORED:
        assert rel_err(res.columns[c], direct.columns[c]) <= 1e-5, c
    side = json.loads((tmp_path / "scores.csv.json").read_text())
    assert side["sources"]["train"].endswith("train.jsonl") and side["n_train"] == len(TRAIN)
    assert read_score_table(out).ids == [p.id for p in TRAIN]


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any heavy work
# ---------------------------------------------------------------------------------------------


def test_bad_config_values():
    for kwargs, msg in [
        ({"curvature": "kfac"}, "curvature must be one of"),
        ({"curvature": "exact", "damping": 0.0}, "damping must be > 0 with curvature='exact'"),
        ({"damping": -1.0}, "damping must be finite and >= 0, got -1.0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"hessian_samples": 0}, "hessian_samples must be None or an integer >= 1, got 0"),
        ({"padding_side": "middle"}, "padding_side"),
        ({"on_nonpositive": "ignore"}, "on_nonpositive"),
        ({"impl": "cuda"}, "must be one of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ScoreConfig(**kwargs).validate()


def test_bad_inputs_to_score_pairs():
    model, tok = tiny_model("gpt_neox"), tokenizer()
    cfg = ScoreConfig(progress=False)
    with pytest.raises(ValueError, match="validation set is empty"):
        score_pairs(model, tok, TRAIN, [], config=cfg)
    long_val = [PreferencePair(id="too-long", prompt="x" * 40, chosen="y", rejected="z")]
    with pytest.raises(ValueError, match="too-long"):
        score_pairs(model, tok, TRAIN, long_val, config=ScoreConfig(max_length=20, progress=False))
    with pytest.raises(ValueError, match="duplicate pair id 'p0'"):
        score_pairs(model, tok, TRAIN + TRAIN[:1], VAL, config=cfg)
    with pytest.raises(ValueError, match="hessian_samples=99 exceeds the 7 training pairs"):
        score_pairs(model, tok, TRAIN, VAL, config=ScoreConfig(hessian_samples=99, progress=False))
    with pytest.raises(ValueError, match="padding_side='left' with a 'bert' model"):
        score_pairs(tiny_model("bert"), tok, TRAIN, VAL,
                    config=ScoreConfig(padding_side="left", progress=False))
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        score_pairs(frozen, tok, TRAIN, VAL, config=cfg)


def test_bad_output_paths(tmp_path):
    with pytest.raises(ValueError, match="folder .*missing.* does not exist"):
        score_model(tmp_path / "rm", "train.jsonl", "val.jsonl", tmp_path / "missing" / "s.parquet")
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx'"):
        score_model(tmp_path / "rm", "train.jsonl", "val.jsonl", tmp_path / "s.xlsx")
    with pytest.raises(ValueError, match="model folder .* does not exist"):
        score_model(tmp_path / "rm", "train.jsonl", "val.jsonl", tmp_path / "s.csv")
    with pytest.raises(ValueError, match="damping must be > 0"):
        score_model(tmp_path / "rm", "train.jsonl", "val.jsonl", tmp_path / "s.csv",
                    config=ScoreConfig(curvature="exact", damping=0))


def test_cli_score(tmp_path, capsys):
    from prefprune.cli import main
    from prefprune.model import save_reward_model

    model, tok = tiny_model("llama", dtype=torch.float32), tokenizer()
    save_reward_model(model, tok, tmp_path / "rm")
    PreferenceDataset(TRAIN, schema="prompt_chosen_rejected").save(tmp_path / "train.jsonl")
    PreferenceDataset(VAL, schema="prompt_chosen_rejected").save(tmp_path / "val.jsonl")
    out = tmp_path / "scores.parquet"
    common = ["score", "--model", str(tmp_path / "rm"), "--train", str(tmp_path / "train.jsonl"),
              "--val", str(tmp_path / "val.jsonl"), "--no-progress", "--impl", "reference", "--device", "cpu"]
    assert main([*common, "--curvature", "exact", "--damping", "3", "--output", str(out)]) == 0
    assert "scored 7 pairs (exact, damping 3" in capsys.readouterr().out
    side = json.loads((tmp_path / "scores.parquet.json").read_text())
    assert side["config"]["curvature"] == "exact" and side["config"]["damping"] == 3.0
    direct = score_pairs(model, tok, TRAIN, VAL, config=ScoreConfig(curvature="exact", damping=3.0,
                                                                     impl="reference", progress=False))
    table = read_score_table(out)
    for c in SCORED:
        assert rel_err(table.column(c), direct.columns[c]) <= 1e-4, c

    # A direct solve has no iterations to report (it read "CG iterations 0" before).
    direct_out = str(tmp_path / "d.csv")
    assert main([*common, "--curvature", "ggn", "--solver", "direct", "--output", direct_out]) == 0
    said = capsys.readouterr().out
    assert "direct solve (eigendecomposition)" in said and "after 0 iterations" not in said, said

    assert main([*common, "--output", str(tmp_path / "nope" / "s.csv")]) == 2
    assert "folder" in capsys.readouterr().err
    assert main([*common, "--curvature", "exact", "--damping", "0", "--output", str(tmp_path / "s.csv")]) == 2
    assert "damping must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_projected_ggn_without_projection_is_exact_ggn():
    model64, tok = tiny_model("llama"), tokenizer()
    ref, _, _ = brute_force_scores(model64, tok, TRAIN, VAL, curvature="ggn", damping=0.5)
    # k larger than every layer side: the projector keeps every side exact, so this is the GGN solve
    # through the stored-rows / native factored-CG path.
    cfg = ScoreConfig(curvature="projected_ggn", projection_k=1000, damping=0.5, tol=1e-12, max_iter=500,
                      impl="reference", progress=False)
    res = score_pairs(model64, tok, TRAIN, VAL, config=cfg)
    assert res.solve.status == "converged" and res.solve.projection_dim == res.metadata["n_params"]
    e = rel_err(res.columns["influence"], ref["influence"])
    assert e <= 1e-6, f"projected_ggn (no projection) vs brute-force GGN: rel err {e:.3g}"


def test_projected_ggn_correlates_with_ggn_increasingly_with_k():
    model, tok = tiny_model("gpt_neox", dtype=torch.float32, hidden=32, r=4), tokenizer()
    train, val = make_pairs(40, seed=1), make_pairs(5, seed=2, prefix="v")
    common = dict(damping=0.1, tol=1e-8, max_iter=300, impl="reference", progress=False)
    base = score_pairs(model, tok, train, val, config=ScoreConfig(curvature="ggn", **common))
    corr = []
    for k in (2, 8, 32):
        res = score_pairs(model, tok, train, val,
                          config=ScoreConfig(curvature="projected_ggn", projection_k=k, **common))
        assert res.solve.status == "converged"
        corr.append(float(np.corrcoef(res.columns["influence"], base.columns["influence"])[0, 1]))
    assert corr[0] < corr[1] < corr[2] and corr[2] > 0.9, f"correlation with ggn influence by k: {corr}"


@pytest.mark.parametrize("curvature", ["exact", "ggn"])
def test_native_cg_in_the_scorer_matches_the_reference(curvature):
    from prefprune import _ext

    if _ext.native() is None:
        pytest.skip(_ext.native_error())
    model, tok = tiny_model("gpt_neox"), tokenizer()
    cols = {}
    for impl in ("reference", "native"):
        # solver="cg": this test is about the CG loop; ggn's default (auto) would take the direct solve.
        cfg = ScoreConfig(curvature=curvature, damping=5.0, batch_size=3, tol=1e-12, max_iter=500, impl=impl,
                          solver="cg", progress=False)
        res = score_pairs(model, tok, TRAIN, VAL, config=cfg)
        assert res.metadata["impl"]["cg"] == impl and res.solve.status == "converged", res.metadata
        cols[impl] = res.columns
    errs = {c: rel_err(cols["native"][c], cols["reference"][c]) for c in SCORED}
    assert all(e <= 1e-10 for e in errs.values()), f"native vs reference CG in the scorer: {errs}"
