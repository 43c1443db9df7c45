"""score_pairs with damping sweeps, relative damping, per-query and self-influence vs float64 brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _scoring_helpers import (
    PAD,
    brute_force_scores,
    exact_hessian,
    make_pairs,
    rel_err,
    tiny_model,
    tokenizer,
)

from prefprune.data import encode_pairs
from prefprune.influence import NonPositiveCurvatureError
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.per_query import per_query_path
from prefprune.prune import read_score_table
from prefprune.score import ScoreConfig, score_pairs

TRAIN = make_pairs(7, seed=1)
VAL = make_pairs(3, seed=2, prefix="v")


def _cfg(**kw):
    return ScoreConfig(**{"impl": "reference", "progress": False, "tol": 1e-12, "max_iter": 500, **kw})


def _brute(model, curvature):
    """Per-pair training/validation gradients and the curvature matrix, float64, from the oracle."""
    tok = tokenizer()
    tr = encode_pairs(TRAIN, tok, max_length=512)
    va = encode_pairs(VAL, tok, max_length=512)
    G, _ = oracle_pair_gradients(model, tr, pad_token_id=PAD)
    Gv, _ = oracle_pair_gradients(model, va, pad_token_id=PAD)
    if curvature == "exact":
        H = exact_hessian(model, tr)
    else:
        Gm, m = oracle_pair_gradients(model, tr, pad_token_id=PAD, of="margin")
        w = torch.sigmoid(m) * torch.sigmoid(-m)
        H = Gm.T @ (w[:, None] * Gm) / len(tr)
    return G, Gv, H


def _inv_apply(H, lam, X):
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), X)


def test_ggn_sweep_per_query_and_self_influence_in_one_run(tmp_path):
    model = tiny_model("llama")
    G, Gv, H = _brute(model, "ggn")
    dampings = [0.01, 0.3, 1.0, 3.0, 10.0]
    res = score_pairs(model, tokenizer(), TRAIN, VAL,
                      config=_cfg(curvature="ggn", damping=dampings, per_query=True, self_influence=True,
                                  per_query_tile=2))
    side = res.metadata
    assert side["solve"]["method"] == "direct" and side["solve"]["curvature_passes"] == 1
    names = [f"influence@{d!r}" for d in dampings]
    assert [c["column"] for c in side["damping_columns"]] == names
    for lam, name in zip(dampings, names, strict=True):
        ref = G @ _inv_apply(H, lam, Gv.mean(0))
        assert rel_err(res.columns[name], ref) <= 1e-6, (name, rel_err(res.columns[name], ref))
        self_ref = (G * _inv_apply(H, lam, G.T).T).sum(1)
        e = rel_err(res.columns[f"self_{name}"], self_ref)
        assert e <= 1e-6, (f"self_{name}", e)
    np.testing.assert_array_equal(res.columns["influence"], res.columns[names[0]])
    assert side["self_influence"]["space"] == "weights"

    out = tmp_path / "s.parquet"
    res.save(out)
    table = read_score_table(out)
    for name in names:
        np.testing.assert_array_equal(table.column(name), res.columns[name])
    from safetensors import safe_open
    from safetensors.numpy import load_file

    mats = load_file(per_query_path(out))
    with safe_open(per_query_path(out), framework="np") as fh:
        meta = fh.metadata()
    assert json.loads(meta["row_ids"]) == [p.id for p in TRAIN]
    assert json.loads(meta["col_ids"]) == [p.id for p in VAL]
    assert json.loads(meta["dampings"]) == dampings
    for lam, name in zip(dampings, names, strict=True):
        M = mats[name]
        assert M.shape == (len(TRAIN), len(VAL))
        ref = G @ _inv_apply(H, lam, Gv.T)
        for j in range(len(VAL)):
            assert rel_err(M[:, j], ref[:, j]) <= 1e-6, (name, j, rel_err(M[:, j], ref[:, j]))
        # The mean query is the mean of the per-pair queries: the influence column is the row mean.
        assert rel_err(M.mean(1), res.columns[name]) <= 1e-10
    assert len(side["per_query"]["tiles"]) == 2  # 3 queries in tiles of 2


@pytest.mark.slow
def test_exact_sweep_flags_the_indefinite_column_and_matches_the_others():
    model = tiny_model("gpt_neox")
    G, Gv, H = _brute(model, "exact")
    lo = float(torch.linalg.eigvalsh(H)[0])
    assert lo < -0.1, lo
    dampings = [1e-3, -lo + 0.5, -lo + 2.0]
    with pytest.raises(NonPositiveCurvatureError, match=r"non-positive curvature for damping 0\.001 "):
        score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(curvature="exact", damping=dampings,
                                                                 solver="multishift"))
    res = score_pairs(model, tokenizer(), TRAIN, VAL,
                      config=_cfg(curvature="exact", damping=dampings, on_nonpositive="nan",
                                  self_influence=True, solver="multishift"))
    cols = res.metadata["damping_columns"]
    assert res.metadata["solve"]["method"] == "multishift"
    assert cols[0]["status"] == "nonpositive_curvature" and cols[0]["nonpositive_value"] <= 0
    assert np.isnan(res.columns[f"influence@{dampings[0]!r}"]).all()
    assert np.isnan(res.columns[f"self_influence@{dampings[0]!r}"]).all()
    assert res.metadata["self_influence"] == {"space": "weights", "curvature": "exact", "passes": 1,
                                              "columns": [f"self_influence@{d!r}" for d in dampings]}
    for lam, c in zip(dampings[1:], cols[1:], strict=True):
        assert c["status"] == "converged", c
        name = f"influence@{lam!r}"
        # Eager attention's float32 softmax bounds exact-HVP agreement at ~1e-7 (DESIGN §2).
        assert rel_err(res.columns[name], G @ _inv_apply(H, lam, Gv.mean(0))) <= 1e-6, name
        self_ref = (G * _inv_apply(H, lam, G.T).T).sum(1)
        assert rel_err(res.columns[f"self_{name}"], self_ref) <= 1e-6, name
    # One HVP block per iteration serves all three shifts.
    assert res.metadata["solve"]["curvature_passes"] == max(c["iterations"] for c in cols)


def test_relative_damping_is_recorded_beside_the_absolute_value():
    model = tiny_model("gpt2")
    G, Gv, H = _brute(model, "ggn")
    scale = float(torch.trace(H)) / H.shape[0]
    res = score_pairs(model, tokenizer(), TRAIN, VAL,
                      config=_cfg(curvature="ggn", damping=0.1, damping_relative=True))
    s = res.metadata["solve"]
    assert abs(s["damping_scale"] - scale) <= 1e-10 * scale and s["damping_factor"] == 0.1
    assert abs(s["damping"] - 0.1 * scale) <= 1e-12 * scale
    assert rel_err(res.columns["influence"], G @ _inv_apply(H, 0.1 * scale, Gv.mean(0))) <= 1e-6


def test_cg_and_direct_ggn_agree_and_count_passes():
    model = tiny_model("bert")
    ref, _, _ = brute_force_scores(model, tokenizer(), TRAIN, VAL, curvature="ggn", damping=0.5)
    out = {}
    for solver in ("direct", "cg"):
        cfg = _cfg(curvature="ggn", damping=0.5, solver=solver)
        res = score_pairs(model, tokenizer(), TRAIN, VAL, config=cfg)
        assert rel_err(res.columns["influence"], ref["influence"]) <= 1e-6, solver
        out[solver] = res.metadata["solve"]
    assert out["direct"]["curvature_passes"] == 1
    assert out["cg"]["curvature_passes"] == out["cg"]["iterations"] > 1


def test_bad_solve_settings_fail_before_any_pass(monkeypatch):
    import prefprune.influence.scorer as scorer_mod

    def no_pass(*a, **k):
        raise AssertionError("a pass ran before the settings were checked")

    monkeypatch.setattr(scorer_mod, "mean_gradient", no_pass)
    model, tok = tiny_model("gpt_neox"), tokenizer()
    with pytest.raises(ValueError, match=r"damping must be > 0 with curvature='exact'.*0\.0"):
        score_pairs(model, tok, TRAIN, VAL, config=_cfg(curvature="exact", damping=[1.0, 0.0]))
    with pytest.raises(ValueError, match=r"duplicate damping values \[1\.0\]"):
        score_pairs(model, tok, TRAIN, VAL, config=_cfg(curvature="ggn", damping=[1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="too small even for the projected Gram"):
        score_pairs(model, tok, TRAIN, VAL, config=_cfg(curvature="projected_ggn", memory_budget_mb=1e-4))
    with pytest.raises(ValueError, match="damping 0 with a direct ggn solve"):
        score_pairs(model, tok, TRAIN, VAL, config=_cfg(curvature="ggn", damping=0.0))
