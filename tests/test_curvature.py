"""Curvature products and the solve against explicit float64 Hessians and torch.linalg.solve."""

from __future__ import annotations

import pytest
import torch
from _scoring_helpers import PAD, exact_hessian, make_pairs, rel_err, tiny_model, tokenizer

from prefprune.data import PairBatches, encode_pairs
from prefprune.influence import InfluenceQuery, NonPositiveCurvatureError, ScoreConfig
from prefprune.influence.curvature import ExactHessian, GaussNewton, gauss_newton_weights, make_curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.plan import check_dampings, plan_for_config
from prefprune.influence.query import mean_gradient

_CACHE: dict = {}


def _setup(family: str):
    """Model, encoded training pairs and the brute-force exact Hessian (built once per family)."""
    if family not in _CACHE:
        model = tiny_model(family)
        enc = encode_pairs(make_pairs(6, seed=1), tokenizer(), max_length=512)
        _CACHE[family] = (model, enc, exact_hessian(model, enc))
    return _CACHE[family]


def _ggn(model, enc):
    Gm, m = oracle_pair_gradients(model, enc, pad_token_id=PAD, of="margin")
    w = gauss_newton_weights(m)
    return Gm.T @ (w[:, None] * Gm) / len(enc)


def _batches(enc, side="right", bs=4):
    return PairBatches(enc, batch_size=bs, pad_token_id=PAD, padding_side=side)


def _query(model, b, batches, **settings):
    """The live path from a right-hand side: curvature → plan → solve → `InfluenceQuery`."""
    config = ScoreConfig(solver="cg", progress=False, **settings)
    layout = ParameterLayout.of(model)
    plan = plan_for_config(config, layout, n_curvature=0 if batches is None else batches.n_pairs)
    curvature = make_curvature(config.curvature, model, layout, batches)
    return InfluenceQuery.solve(curvature, b, torch.zeros(1), plan=plan, config=config)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_neox", "bert"])
def test_mean_gradient_matches_oracle(family):
    model, enc, _ = _setup(family)
    G, m = oracle_pair_gradients(model, enc, pad_token_id=PAD)
    g, margins = mean_gradient(model, ParameterLayout.of(model), _batches(enc, bs=4))
    assert rel_err(g, G.mean(0)) <= 1e-10
    assert rel_err(margins, m) <= 1e-10


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "bert"])
def test_exact_hvp_matches_explicit_hessian(family):
    model, enc, H = _setup(family)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curvature = ExactHessian(model, ParameterLayout.of(model), _batches(enc, bs=4))
    with curvature.context():
        HV = curvature.matvec(V)
    # Decoder eager attention computes its softmax in float32 even for float64 models (transformers),
    # which bounds the agreement of two float64 Hessians built from different batchings at ~1e-7.
    e = rel_err(HV, H @ V)
    assert e <= 1e-6, f"{family}: H v rel err {e:.3g}"
    assert model.get_base_model().config._attn_implementation == "sdpa", "attention not restored"


@pytest.mark.parametrize("family,side", [("gpt_neox", "left"), ("llama", "right"), ("bert", "right")])
def test_ggn_product_matches_oracle_gauss_newton(family, side):
    model, enc, _ = _setup(family)
    Hg = _ggn(model, enc)
    V = torch.randn(Hg.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = GaussNewton(model, ParameterLayout.of(model), _batches(enc, side, bs=5), impl="reference").matvec(V)
    e = rel_err(out, Hg @ V)
    assert e <= 1e-10, f"{family}/{side}: GGN v rel err {e:.3g}"
    assert torch.linalg.eigvalsh(Hg).min() >= -1e-12 * torch.linalg.eigvalsh(Hg).max()


def test_exact_indefinite_reports_nonpositive_curvature_then_converges_with_damping():
    model, enc, H = _setup("gpt_neox")
    evals = torch.linalg.eigvalsh(H)
    assert evals[0] < -0.1 and evals[-1] > 0.1, f"expected an indefinite Hessian, got {evals[[0, -1]]}"
    val = encode_pairs(make_pairs(3, seed=9), tokenizer(), max_length=512)
    b, _ = mean_gradient(model, ParameterLayout.of(model), _batches(val))
    common = {"curvature": "exact", "tol": 1e-12, "max_iter": 1000}
    with pytest.raises(NonPositiveCurvatureError, match=r"non-positive curvature .* at iteration \d+"):
        _query(model, b, _batches(enc, "left"), damping=1e-3, **common)
    query = _query(model, b, _batches(enc), damping=1e-3, on_nonpositive="nan", **common)
    info, q_nan = query.info, query.Q[:, 0]
    assert info.status == "nonpositive_curvature" and info.nonpositive_value <= 0
    assert info.nonpositive_iteration >= 1 and torch.isnan(q_nan).all()
    assert model.get_base_model().config._attn_implementation == "sdpa"

    damping = float(-evals[0]) + 0.5
    query = _query(model, b, _batches(enc, "left"), damping=damping, **common)
    info, q = query.info, query.Q[:, 0]
    assert info.status == "converged", info
    ref = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), b)
    e = rel_err(q, ref)
    assert e <= 1e-6, f"exact solve vs linalg.solve: rel err {e:.3g}"


def test_ggn_solve_matches_linalg_solve_float32():
    model, enc, _ = _setup("llama")
    Hg = _ggn(model, enc)
    m32 = tiny_model("llama", dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    b = torch.randn(Hg.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    query = _query(m32, b.float(), _batches(enc, "left", bs=2), curvature="ggn", damping=0.05, tol=1e-6,
                   max_iter=300)
    info, q = query.info, query.Q[:, 0]
    assert info.status == "converged" and q.dtype == torch.float32
    ref = torch.linalg.solve(Hg + 0.05 * torch.eye(Hg.shape[0], dtype=Hg.dtype), b)
    assert rel_err(q, ref) <= 1e-3


def test_identity_and_argument_checks():
    model, enc, _ = _setup("gpt_neox")
    b = torch.randn(ParameterLayout.of(model).numel, dtype=torch.float64)
    query = _query(model, b, None, curvature="identity", damping=0.0)
    assert torch.equal(query.Q[:, 0], b) and query.info.status == "not_solved"
    with pytest.raises(ValueError, match=r"damping must be > 0 with curvature='exact'.*got 0.0"):
        check_dampings([0.0], curvature="exact", relative=False)
    with pytest.raises(ValueError, match="damping must be finite and >= 0, got -1.0"):
        check_dampings([-1.0], curvature="ggn", relative=False)
    with pytest.raises(ValueError, match="curvature must be one of"):
        make_curvature("kfac", model, ParameterLayout.of(model), _batches(enc))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PairBatches(enc, batch_size=0, pad_token_id=PAD)
