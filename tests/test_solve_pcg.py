"""Gauss–Newton-preconditioned CG on the exact Hessian (solver "pcg") against CG and float64 brute force.

References: the explicit exact Hessian (`exact_hessian`, float64, `torch.autograd.functional.hessian`) solved
with `torch.linalg.solve`, and the single-pair oracle's per-pair gradients for the influence column.
Eager attention computes softmax in float32 even for float64 models, which bounds exact-HVP agreement at
~1e-7 (DESIGN §2): dampings stay a little above −λ_min(H) so that conditioning keeps the solve to ≤ 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _scoring_helpers import PAD, make_pairs, rel_err, tiny_model, tokenizer
from test_solve import _hessian as solve_hessian
from test_solve import _setup as solve_setup

from prefprune.data import PairBatches
from prefprune.influence import NonPositiveCurvatureError
from prefprune.influence.curvature import make_curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.plan import plan_solve
from prefprune.influence.solvers import solve
from prefprune.score import ScoreConfig, score_pairs

_CACHE: dict = {}
_SIDE = {"gpt_neox": "left", "llama": "left", "bert": "right"}  # BERT pools the first position


def _setup(family: str):
    """Tiny float64 model, 6 training pairs, the validation gradients (p, 3), per-pair training gradients
    (6, p) and the explicit exact Hessian: test_solve's (the brute-force Hessian is the costly part, so one
    pytest run builds it once per family for both files)."""
    if family not in _CACHE:
        model, enc, val = solve_setup(family)
        Gv, _ = oracle_pair_gradients(model, val, pad_token_id=PAD)
        G, _ = oracle_pair_gradients(model, enc, pad_token_id=PAD)
        _CACHE[family] = (model, enc, Gv.T.contiguous(), G, solve_hessian(family))
    return _CACHE[family]


def _plan(p, n, dampings, **kw):
    return plan_solve(curvature="exact", n_params=p, n_curvature=n, dampings=dampings, itemsize=8, **kw)


def _run(family, B, dampings, *, solver, impl, tol=1e-11, max_iter=400):
    model, enc, _, _, H = _setup(family)
    batches = PairBatches(enc, batch_size=4, pad_token_id=PAD, padding_side=_SIDE[family])
    # Whole-batch products, as when these tolerances were set: eager attention's float32 softmax bounds every
    # product at ~7e-8 of the brute force whatever the chunk (test_hvp_chunks), and at λ_min(H + λI) = 0.3
    # a chunk's other rounding moves gpt_neox's influence column by up to 1.5e-6 (6.9e-7 whole).
    curvature = make_curvature("exact", model, ParameterLayout.of(model), batches, impl=impl,
                               hvp_batch_size=batches.batch_size)
    plan = _plan(H.shape[0], len(enc), dampings, solver=solver)
    sol = solve(curvature, B, dampings, plan=plan, impl=impl, tol=tol, max_iter=max_iter)
    return sol.Q, sol.record


def _inv(H, lam, X):
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), X)


@pytest.mark.parametrize("family", ["gpt_neox", pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("bert", marks=pytest.mark.slow)])
def test_pcg_influence_equals_cg_and_brute_force(family):
    """Every (damping, validation query) column; reference and native PCG take the same iterations."""
    _, enc, B, G, H = _setup(family)
    lo = float(torch.linalg.eigvalsh(H)[0])
    dampings = [max(0.0, -lo) + x for x in (0.3, 1.0, 3.0)]
    Qn, rec = _run(family, B, dampings, solver="pcg", impl="native")
    Qr, rec_r = _run(family, B, dampings, solver="pcg", impl="reference")
    Qc, rec_c = _run(family, B, dampings, solver="cg", impl="native")
    assert rec.plan["method"] == "pcg" and rec.impl == "native" and rec_r.impl == "reference"
    assert rec.preconditioner == "gauss_newton_woodbury" and rec_c.preconditioner is None
    assert [c["iterations"] for c in rec.columns] == [c["iterations"] for c in rec_r.columns]
    # One Gauss–Newton pass, then one batched HVP pass per iteration for every damping value together.
    assert rec.curvature_passes == 1 + max(c["iterations"] for c in rec.columns)
    assert [c["passes"] for c in rec.columns] == [1 + c["iterations"] for c in rec.columns]
    assert [c["passes"] for c in rec_c.columns] == [c["iterations"] for c in rec_c.columns]
    for i, lam in enumerate(dampings):
        assert rec.columns[i]["status"] == "converged", (family, lam, rec.columns[i])
        ref = _inv(H, lam, B)
        for name, Q in (("pcg native", Qn), ("pcg reference", Qr), ("cg", Qc)):
            e = rel_err(Q[i], ref)
            assert e <= 1e-6, f"{family} {name} damping {lam:.4g}: query rel err {e:.3g}"
        infl, infl_ref = G @ Qn[i].mean(1), G @ ref.mean(1)  # influence of every training pair
        assert rel_err(infl, infl_ref) <= 1e-6, (family, lam, rel_err(infl, infl_ref))
        assert rel_err(Qn[i], Qc[i]) <= 1e-6, (family, lam, rel_err(Qn[i], Qc[i]))
        assert rel_err(Qn[i], Qr[i]) <= 1e-9, (family, lam, rel_err(Qn[i], Qr[i]))


@pytest.mark.parametrize("impl", ["reference", "native"])
def test_pcg_reports_an_indefinite_exact_hessian_at_small_damping(impl):
    """pᵀ(H + λI)p ≤ 0 is tested on the exact operator whatever the preconditioner: λ below −λ_min(H) stops
    with nonpositive_curvature while the other damping values in the same call converge."""
    _, _, B, _, H = _setup("gpt_neox")
    lo = float(torch.linalg.eigvalsh(H)[0])
    assert lo < -0.1, f"expected an indefinite Hessian, smallest eigenvalue {lo}"
    dampings = [1e-3, -lo + 0.3]
    Q, rec = _run("gpt_neox", B[:, :1], dampings, solver="pcg", impl=impl)
    bad, good = rec.columns
    assert bad["status"] == "nonpositive_curvature", bad
    assert bad["nonpositive_value"] <= 0 and bad["nonpositive_iteration"] >= 1 and bad["passes"] >= 2
    assert good["status"] == "converged", good
    e = rel_err(Q[1], _inv(H, dampings[1], B[:, :1]))
    assert e <= 1e-6, f"converged column next to the indefinite one: rel err {e:.3g}"


def test_auto_picks_pcg_for_exact_within_budget_and_cg_over_it():
    p, n = 200_000, 64
    within = _plan(p, n, [1.0, 0.1, 0.01], memory_budget_mb=2048)
    assert within.method == "pcg" and within.form == "gram", within
    assert "fit" in within.reason and within.bytes_needed == 2 * n * p * 8 + 3 * n * n * 8
    assert _plan(p, n, [1.0], memory_budget_mb=100).method == "cg"
    over = _plan(p, n, [1.0, 0.1], memory_budget_mb=100)
    assert over.method == "multishift" and "exceed" in over.reason and over.bytes_needed == 0
    assert _plan(50, 400, [1.0]).form == "primal"  # more pairs than parameters: the d×d factors
    with pytest.raises(ValueError, match=r"solver='pcg' needs 195\.4 MiB .* memory_budget_mb=100"):
        _plan(p, n, [1.0], memory_budget_mb=100, solver="pcg")
    with pytest.raises(ValueError, match=r"curvature='ggn' that inverse is the solution"):
        plan_solve(curvature="ggn", n_params=p, n_curvature=n, dampings=[1.0], solver="pcg")


@pytest.mark.slow
def test_pcg_primal_factors_match_brute_force():
    """More curvature pairs than dimensions would pick the d×d form: its W = diag(√s) E preconditions too."""
    import dataclasses

    model, enc, B, _, H = _setup("llama")
    batches = PairBatches(enc, batch_size=4, pad_token_id=PAD, padding_side="left")
    curvature = make_curvature("exact", model, ParameterLayout.of(model), batches, impl="reference")
    lam = -float(torch.linalg.eigvalsh(H)[0]) + 1.0
    plan = dataclasses.replace(_plan(H.shape[0], len(enc), [lam], solver="pcg"), form="primal")
    sol = solve(curvature, B, [lam], plan=plan, impl="reference", tol=1e-11, max_iter=400)
    assert sol.record.columns[0]["status"] == "converged"
    assert rel_err(sol.Q[0], _inv(H, lam, B)) <= 1e-6


@pytest.mark.slow
def test_score_pairs_records_the_preconditioner_iterations_and_passes(tmp_path):
    """The sidecar of an exact run by auto (pcg): preconditioner, iterations and passes per damping value."""
    import json

    model = tiny_model("gpt_neox")
    train, val = make_pairs(6, seed=1), make_pairs(3, seed=9, prefix="v")
    H = _setup("gpt_neox")[4]
    lo = float(torch.linalg.eigvalsh(H)[0])
    dampings = [1e-3, -lo + 0.5, -lo + 2.0]
    cfg = {"curvature": "exact", "damping": dampings, "tol": 1e-11, "max_iter": 400, "progress": False,
           "on_nonpositive": "nan", "batch_size": 4}
    res = score_pairs(model, tokenizer(), train, val, config=ScoreConfig(**cfg))
    res.save(tmp_path / "s.csv")
    side = json.loads((tmp_path / "s.csv.json").read_text())
    assert side["solve"]["method"] == "pcg" and side["solve"]["preconditioner"] == "gauss_newton_woodbury"
    assert side["preconditioner"] == "gauss_newton_woodbury" and side["solve_plan"]["method"] == "pcg"
    cols = side["damping_columns"]
    assert cols[0]["status"] == "nonpositive_curvature"
    assert np.isnan(res.columns[f"influence@{dampings[0]!r}"]).all()
    assert all(c["passes"] == 1 + c["iterations"] for c in cols), cols
    assert side["curvature_passes"] == 1 + max(c["iterations"] for c in cols)
    cg = score_pairs(model, tokenizer(), train, val, config=ScoreConfig(**cfg, solver="cg"))
    assert cg.metadata["preconditioner"] is None and cg.metadata["solve"]["method"] == "cg"
    for lam in dampings[1:]:
        name = f"influence@{lam!r}"
        assert rel_err(res.columns[name], cg.columns[name]) <= 1e-6, (name, rel_err(res.columns[name],
                                                                                     cg.columns[name]))
    with pytest.raises(NonPositiveCurvatureError, match=r"non-positive curvature for damping 0\.001 "):
        score_pairs(model, tokenizer(), train, val, config=ScoreConfig(**{**cfg, "on_nonpositive": "raise"}))


def test_pcg_relative_damping_takes_its_scale_from_the_preconditioner_factors():
    """Relative damping needs trace(H_GN)/p: pcg reads it off its Gauss–Newton factors (no trace pass)."""
    model, enc, B, _, H = _setup("gpt_neox")
    Gm, m = oracle_pair_gradients(model, enc, pad_token_id=PAD, of="margin")
    w = torch.sigmoid(m) * torch.sigmoid(-m)
    scale = float((w * Gm.square().sum(1)).sum()) / len(enc) / H.shape[0]
    lo = float(torch.linalg.eigvalsh(H)[0])
    factor = (-lo + 0.5) / scale
    batches = PairBatches(enc, batch_size=4, pad_token_id=PAD, padding_side="left")
    curvature = make_curvature("exact", model, ParameterLayout.of(model), batches, impl="native")
    plan = _plan(H.shape[0], len(enc), [factor], relative=True, solver="pcg")
    sol = solve(curvature, B[:, :1], [factor], plan=plan, relative=True, impl="native", tol=1e-11,
                max_iter=400)
    rec = sol.record
    assert abs(rec.damping_scale - scale) <= 1e-9 * scale, (rec.damping_scale, scale)
    assert rec.curvature_passes == 1 + rec.columns[0]["iterations"]  # no extra trace pass
    assert rel_err(sol.Q[0], _inv(H, factor * scale, B[:, :1])) <= 1e-6


def test_exact_over_a_whole_large_training_set_warns_of_its_cost(monkeypatch, caplog):
    """exact with no hessian_samples on a large training set: a warning names the setting that bounds its
    cost (each CG iteration is a Hessian–vector pass over every training pair); none with a subsample."""
    import logging

    from prefprune.influence import scorer

    monkeypatch.setattr(scorer, "EXACT_WHOLE_SET_WARNING", 6, raising=False)  # 6 pairs: a large set
    model = tiny_model("gpt_neox")
    train, val = make_pairs(6, seed=1), make_pairs(2, seed=9, prefix="v")

    def run(**kw):
        caplog.clear()
        cfg = ScoreConfig(curvature="exact", damping=10.0, batch_size=4, progress=False, **kw)
        with caplog.at_level(logging.WARNING, logger="prefprune.influence.scorer"):
            score_pairs(model, tokenizer(), train, val, config=cfg)
        return [r.getMessage() for r in caplog.records if "Hessian–vector pass over all" in r.getMessage()]

    warned = run()
    assert len(warned) == 1 and "every one of the 6 training pairs" in warned[0], warned
    assert "--hessian-samples / score.hessian_samples" in warned[0]
    assert run(hessian_samples=4) == []
