"""exact with a residual sample (`score.residual_samples`): H̃ = H_GN(curvature set) + R(subsample) against
float64 brute force.

Reference: H̃ = G_n + (H_S − G_S) from explicit float64 matrices — the exact Hessian of the subsample's mean
loss (`torch.autograd.functional.hessian`) minus its Gauss–Newton part, plus the Gauss–Newton matrix of the
whole curvature set from the single-pair oracle's margin gradients — solved with `torch.linalg.solve`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _scoring_helpers import PAD, exact_hessian, make_pairs, rel_err, tiny_model, tokenizer
from test_solve import _ggn
from test_solve_pcg import _SIDE, _inv, _plan, _setup

from prefprune.data import PairBatches, encode_pairs
from prefprune.influence.curvature import make_curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.solvers import solve
from prefprune.score import ScoreConfig, score_pairs

_SUBSET = [0, 2, 5]  # the residual sample: 3 of the 6 curvature pairs


def _h_tilde(model, enc, subset):
    sub = [enc[i] for i in subset]
    return _ggn(model, enc)[0] + exact_hessian(model, sub) - _ggn(model, sub)[0]


def _solve(family, B, dampings, *, impl, subset=_SUBSET, solver="pcg"):
    model, enc, _, _, _ = _setup(family)
    batches = PairBatches(enc, batch_size=4, pad_token_id=PAD, padding_side=_SIDE[family])
    residual = PairBatches([enc[i] for i in subset], batch_size=4, pad_token_id=PAD,
                           padding_side=_SIDE[family])
    curvature = make_curvature("exact", model, ParameterLayout.of(model), batches, impl=impl,
                               hvp_batch_size=4, residual_batches=residual)
    plan = _plan(B.shape[0], len(enc), dampings, solver=solver)
    sol = solve(curvature, B, dampings, plan=plan, impl=impl, tol=1e-11, max_iter=400)
    return sol.Q, sol.record, curvature


@pytest.mark.parametrize("family", ["gpt_neox", pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("bert", marks=pytest.mark.slow)])
def test_residual_sample_pcg_equals_brute_force(family):
    """Every (damping, query) column of native and reference pcg equals (H̃ + λI)⁻¹ B to 1e-6; the
    influence of every training pair too; one rows pass, then one product pass over the subsample per
    iteration; the record says how many pairs the second-order term had."""
    model, enc, B, G, H = _setup(family)
    Ht = _h_tilde(model, enc, _SUBSET)
    lo = float(torch.linalg.eigvalsh(Ht)[0])
    dampings = [max(0.0, -lo) + x for x in (0.3, 1.0)]
    Qn, rec, curv = _solve(family, B, dampings, impl="native")
    Qr, rec_r, _ = _solve(family, B, dampings, impl="reference")
    assert rec.extra["residual_samples"] == len(_SUBSET) and rec.plan["method"] == "pcg"
    assert rec.curvature_passes == 1 + max(c["iterations"] for c in rec.columns)
    assert [c["iterations"] for c in rec.columns] == [c["iterations"] for c in rec_r.columns]
    for i, lam in enumerate(dampings):
        assert rec.columns[i]["status"] == "converged", (family, lam, rec.columns[i])
        ref = _inv(Ht, lam, B)
        for name, Q in (("native", Qn), ("reference", Qr)):
            e = rel_err(Q[i], ref)
            assert e <= 1e-6, f"{family} {name} damping {lam:.4g}: rel err {e:.3g} against (H̃ + λI)⁻¹B"
        assert rel_err(G @ Qn[i].mean(1), G @ ref.mean(1)) <= 1e-6
        # and it is not the whole curvature set's exact Hessian (the subsample changed the operator)
        assert rel_err(ref, _inv(H, lam, B)) > 1e-4
    # the kept Gauss–Newton factors serve later calls without another rows pass
    passes = curv.passes
    with curv.context():
        curv.matvec(B[:, :1])
    assert curv.passes == passes + 1


def test_whole_curvature_set_as_residual_sample_is_the_exact_hessian():
    """The split H_GN + R over every pair is H itself: the same influence as plain pcg (to 1e-6 of the
    brute force), so the residual term is the exact Hessian's non-Gauss–Newton part, nothing else."""
    _, _, B, _, H = _setup("gpt_neox")
    lo = float(torch.linalg.eigvalsh(H)[0])
    lam = max(0.0, -lo) + 0.5
    Q, rec, _ = _solve("gpt_neox", B, [lam], impl="native", subset=list(range(6)))
    assert rec.columns[0]["status"] == "converged"
    assert rel_err(Q[0], _inv(H, lam, B)) <= 1e-6


@pytest.mark.parametrize("impl", ["reference", "native"])
def test_residual_sample_still_reports_an_indefinite_operator(impl):
    """pᵀ(H̃ + λI)p ≤ 0 stops a column below −λ_min(H̃) while a larger damping value converges."""
    model, enc, B, _, _ = _setup("gpt_neox")
    Ht = _h_tilde(model, enc, _SUBSET)
    lo = float(torch.linalg.eigvalsh(Ht)[0])
    assert lo < -0.05, f"expected an indefinite H̃, smallest eigenvalue {lo}"
    dampings = [1e-3, -lo + 0.3]
    Q, rec, _ = _solve("gpt_neox", B[:, :1], dampings, impl=impl)
    bad, good = rec.columns
    assert bad["status"] == "nonpositive_curvature" and bad["nonpositive_value"] <= 0, bad
    assert good["status"] == "converged", good
    assert rel_err(Q[1], _inv(Ht, dampings[1], B[:, :1])) <= 1e-6


def _score(model, train, val, **kw):
    cfg = ScoreConfig(curvature="exact", damping=kw.pop("damping", 10.0), batch_size=4, tol=1e-11,
                      max_iter=400, progress=False, group_by_length=False, **kw)
    return score_pairs(model, tokenizer(), train, val, config=cfg)


def test_score_pairs_residual_samples_picks_a_seeded_subsample_and_records_it():
    """The scorer's subsample is `randperm(n, seed + 1)[:m]` of the curvature set; its influence equals the
    brute force on that subsample; residual_samples = n is the exact Hessian (bitwise the same scores as
    unset); the sidecar records the pairs used."""
    model = tiny_model("gpt_neox")
    train, val = make_pairs(6, seed=1), make_pairs(3, seed=9, prefix="v")
    full = _score(model, train, val)
    same = _score(model, train, val, residual_samples=6)
    np.testing.assert_array_equal(full.columns["influence"], same.columns["influence"])
    assert full.metadata["solve"]["residual_samples"] == 6
    sub = _score(model, train, val, residual_samples=3, seed=4)
    assert sub.metadata["solve"]["residual_samples"] == 3
    assert sub.metadata["config"]["residual_samples"] == 3
    pick = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:3].sort().values.tolist()
    enc = encode_pairs(train, tokenizer(), max_length=512)
    Gv, _ = oracle_pair_gradients(model, encode_pairs(val, tokenizer(), max_length=512), pad_token_id=PAD)
    G, _ = oracle_pair_gradients(model, enc, pad_token_id=PAD)
    ref = G @ _inv(_h_tilde(model, enc, pick), 10.0, Gv.mean(0))  # ∇ℓ_iᵀ(H̃ + λI)⁻¹∇L_V
    got = torch.as_tensor(sub.columns["influence"])
    assert rel_err(got, ref) <= 1e-6, rel_err(got, ref)
    assert rel_err(got, torch.as_tensor(full.columns["influence"])) > 1e-5


@pytest.mark.parametrize(("kw", "match"), [
    ({"residual_samples": 0}, r"residual_samples must be None or an integer >= 1, got 0"),
    ({"residual_samples": 2.5}, r"residual_samples must be None or an integer >= 1"),
    ({"residual_samples": 3, "curvature": "ggn"}, r"residual_samples .* curvature='ggn'"),
    ({"residual_samples": 3, "solver": "cg"}, r"residual_samples .* solver='pcg' or 'auto', got solver='cg'"),
])
def test_bad_residual_samples_is_refused_by_name(kw, match):
    cfg = ScoreConfig(**{"curvature": "exact", **kw})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_residual_samples_over_the_curvature_set_or_without_pcg_is_refused():
    model = tiny_model("gpt_neox")
    train, val = make_pairs(6, seed=1), make_pairs(3, seed=9, prefix="v")
    with pytest.raises(ValueError, match=r"residual_samples=5 exceeds the 4 pairs of the curvature set"):
        _score(model, train, val, residual_samples=5, hessian_samples=4)
    with pytest.raises(ValueError, match=r"residual_samples needs the pcg solve's Gauss–Newton factors"):
        _score(model, train, val, residual_samples=3, memory_budget_mb=1e-6)
