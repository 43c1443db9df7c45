"""The curvature's scale in every score run (issue 23): trace(H)/p against float64 brute force, λ relative to
it, Spearman(influence, grad_dot), the no-effect warning, relative damping, and the score CLI's summary."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from _scoring_helpers import PAD, exact_hessian, make_pairs, rel_err, tiny_model, tokenizer
from scipy import stats

from prefprune.data import PreferenceDataset, encode_pairs
from prefprune.influence import scale
from prefprune.influence.curvature import ExactHessian
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.scale import curvature_warnings, exact_hessian_trace
from prefprune.prune import read_score_table
from prefprune.score import ScoreConfig, score_pairs

TRAIN = make_pairs(7, seed=1)
VAL = make_pairs(3, seed=2, prefix="v")


def _cfg(**kw):
    return ScoreConfig(**{"impl": "reference", "progress": False, "tol": 1e-12, "max_iter": 500, **kw})


def _gauss_newton(model):
    """The (p, p) Gauss–Newton matrix over TRAIN, built explicitly in float64 from the oracle's rows."""
    tr = encode_pairs(TRAIN, tokenizer(), max_length=512)
    Gm, m = oracle_pair_gradients(model, tr, pad_token_id=PAD, of="margin")
    w = torch.sigmoid(m) * torch.sigmoid(-m)
    return Gm.T @ (w[:, None] * Gm) / len(tr)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_ggn_mean_eigenvalue_is_the_trace_of_the_built_matrix(tmp_path, solver):
    """Pins: ScoreResult and the sidecar carry trace(H)/p (and the direct solve's top eigenvalue) equal to the
    explicitly built Gauss–Newton matrix's, from the eigendecomposition and from a trace pass (CG)."""
    model = tiny_model("gpt2")
    H = _gauss_newton(model)
    mean, top = float(torch.trace(H)) / H.shape[0], float(torch.linalg.eigvalsh(H).max())
    res = score_pairs(model, tokenizer(), TRAIN, VAL,
                      config=_cfg(curvature="ggn", damping=0.5, solver=solver))
    block = res.curvature_scale
    assert abs(block["mean_eigenvalue"] - mean) <= 1e-10 * mean, (block["mean_eigenvalue"], mean)
    assert block["mean_eigenvalue_estimate"]["method"] == ("eigendecomposition" if solver == "direct"
                                                           else "trace_pass")
    if solver == "direct":
        assert abs(block["top_eigenvalue"] - top) <= 1e-10 * top, (block["top_eigenvalue"], top)
    else:
        assert block["top_eigenvalue"] is None
    (d,) = block["dampings"]
    assert abs(d["relative_to_mean_eigenvalue"] - 0.5 / mean) <= 1e-10 * 0.5 / mean
    res.save(tmp_path / "s.csv")
    side = json.loads((tmp_path / "s.csv.json").read_text())
    assert side["curvature_scale"]["mean_eigenvalue"] == pytest.approx(mean, rel=1e-10)


@pytest.fixture(scope="module")
def llama_exact():
    """A tiny llama reward model (p = 72) and its exact (p, p) Hessian over TRAIN, brute force in float64."""
    model = tiny_model("llama", hidden=8, r=1)
    return model, exact_hessian(model, encode_pairs(TRAIN, tokenizer(), max_length=512))


def test_exact_mean_eigenvalue_is_the_trace_of_the_built_hessian(llama_exact, monkeypatch):
    """Pins: for curvature=exact with trace_probes > 0 the recorded scale is the exact Hessian's trace/p —
    exact from unit columns when p is within EXACT_TRACE_MAX_DIM, else the seeded Hutchinson estimate within
    4 of its recorded standard errors — not the Gauss–Newton part's that relative damping multiplies
    (recorded beside it)."""
    model, H = llama_exact
    p = H.shape[0]
    mean = float(torch.trace(H)) / p
    cfg = _cfg(curvature="exact", damping=100.0, on_nonpositive="nan", seed=5,
               trace_probes=scale.HUTCHINSON_PROBES)
    hutchinson = score_pairs(model, tokenizer(), TRAIN, VAL, config=cfg).curvature_scale
    how = hutchinson["mean_eigenvalue_estimate"]
    assert how["method"] == "hutchinson" and how["probes"] == scale.HUTCHINSON_PROBES and how["seed"] == 5
    err = abs(hutchinson["mean_eigenvalue"] - mean)
    assert err <= 4 * how["trace_stderr"] / p, (hutchinson["mean_eigenvalue"], mean, how)

    monkeypatch.setattr(scale, "EXACT_TRACE_MAX_DIM", p)
    block = score_pairs(model, tokenizer(), TRAIN, VAL, config=cfg).curvature_scale
    assert block["mean_eigenvalue_estimate"]["method"] == "exact_columns"
    # Eager attention's float32 softmax bounds exact-HVP agreement at ~1e-7 (DESIGN §2).
    assert abs(block["mean_eigenvalue"] - mean) <= 1e-6 * abs(mean), (block["mean_eigenvalue"], mean)
    gn = float(torch.trace(_gauss_newton(model))) / p
    assert block["damping_scale"] == pytest.approx(gn, rel=1e-9)  # pcg's Gauss–Newton scale


class _Matrix(ExactHessian):
    """An exact-Hessian curvature whose products are H @ V with the brute-force H (the estimator's maths
    without hundreds of double-backward columns)."""

    def __init__(self, model, H):
        super().__init__(model, ParameterLayout.of(model), None)
        self.H = H

    def matvec(self, V):
        return self.H @ V


def test_hutchinson_estimate_is_seeded_and_agrees_with_the_exact_trace(llama_exact):
    """Pins: above the unit-column size the exact trace is a seeded Hutchinson estimate: the same seed gives
    the same value, another seed another, and it agrees with the tiny model's exact Hessian trace within 4 of
    its own recorded standard errors (and within 30 % with 512 probes)."""
    model, H = llama_exact
    trace = float(torch.trace(H))
    curvature = _Matrix(model, H)
    a, how = exact_hessian_trace(curvature, seed=3, probes=512, max_dim=0)
    b, _ = exact_hessian_trace(curvature, seed=3, probes=512, max_dim=0)
    c, _ = exact_hessian_trace(curvature, seed=4, probes=512, max_dim=0)
    assert how == {"method": "hutchinson", "probes": 512, "seed": 3, "distribution": "rademacher",
                   "trace_stderr": how["trace_stderr"]}
    assert a == b and a != c
    assert abs(a - trace) <= 4 * how["trace_stderr"], (a, trace, how["trace_stderr"])
    assert abs(a - trace) <= 0.3 * abs(trace), (a, trace)
    exact, how_exact = exact_hessian_trace(curvature, max_dim=H.shape[0])
    assert how_exact["method"] == "exact_columns" and exact == pytest.approx(trace, rel=1e-12)


def test_warning_fires_far_above_the_scale_and_not_near_it(caplog):
    """Pins: at λ ≫ trace(H)/p the run logs a WARNING naming --damping / score.damping and the relative value
    and records it in the sidecar block; at λ ≈ trace(H)/p (factor 1) it stays silent."""
    model = tiny_model("gpt2")
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        res = score_pairs(model, tokenizer(), TRAIN, VAL,
                          config=_cfg(curvature="ggn", damping=[1.0, 1e5], damping_relative=True))
    block = res.curvature_scale
    near, far = block["dampings"]
    assert near["relative_to_mean_eigenvalue"] == pytest.approx(1.0)
    assert near["spearman_with_grad_dot"] < 0.999, near
    assert len(block["warnings"]) == 1 and "influence@r100000.0" in block["warnings"][0]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == block["warnings"], said
    assert "--damping / score.damping" in said[0] and "1e+05 ×" in said[0], said[0]
    assert curvature_warnings(block) == block["warnings"]  # what validate and the report call

    mean = block["mean_eigenvalue"]
    absolute = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(curvature="ggn", damping=1e4 * mean))
    assert absolute.curvature_scale["warnings"] and "λ is 1e+04 ×" in absolute.curvature_scale["warnings"][0]
    assert curvature_warnings(None) == [] and curvature_warnings({"curvature": "identity"}) == []


@pytest.mark.parametrize(("curvature", "solver", "factor", "family"),
                         [("ggn", "direct", 0.3, "bert"), ("ggn", "cg", 0.3, "bert"),
                          ("projected_ggn", "cg", 0.3, "bert"), ("projected_ggn", "direct", 0.3, "bert"),
                          ("exact", "pcg", 1e4, "gpt2")])
def test_relative_damping_equals_the_absolute_run_at_factor_times_the_scale(curvature, solver, factor,
                                                                            family):
    """Pins: damping relative to the mean eigenvalue is the absolute run at factor × the recorded scale for
    every solver (projected CG took weight-space trace / projected dimension before; exact: the Gauss–Newton
    part's scale, positive where the exact Hessian's trace may not be)."""
    model = tiny_model(family)
    # exact: pcg's few iterations at this λ; both runs take the same steps, so a loose tol is enough.
    kw = dict(curvature=curvature, solver=solver, projection_k=2,
              **({"tol": 1e-8, "max_iter": 50} if curvature == "exact" else {}))
    rel = score_pairs(model, tokenizer(), TRAIN, VAL,
                      config=_cfg(damping=factor, damping_relative=True, **kw))
    scale = rel.curvature_scale["damping_scale"]
    assert rel.curvature_scale["damping_rule"] == "mean_eigenvalue"
    if curvature != "exact":
        assert scale == pytest.approx(rel.curvature_scale["mean_eigenvalue"], rel=1e-9)
    ab = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(damping=factor * scale, **kw))
    assert rel.solve.damping == pytest.approx(factor * scale, rel=1e-12)
    assert rel_err(rel.columns["influence"], ab.columns["influence"]) <= 1e-8


def test_spearman_is_scipys_on_the_saved_columns(tmp_path):
    """Pins: the recorded Spearman(influence column, grad_dot) is scipy's on the columns of the saved file."""
    model = tiny_model("llama")
    res = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(curvature="ggn", damping=[0.01, 1.0]))
    res.save(tmp_path / "s.parquet")
    table = read_score_table(tmp_path / "s.parquet")
    rho = table.metadata["curvature_scale"]["spearman_with_grad_dot"]
    assert set(rho) == {"influence", "influence@0.01", "influence@1.0"}
    for name, value in rho.items():
        ref = stats.spearmanr(table.column(name), table.column("grad_dot"))[0]
        assert value == pytest.approx(ref, abs=1e-12), (name, value, ref)
    dampings = table.metadata["curvature_scale"]["dampings"]
    per_damping = {d["column"]: d["spearman_with_grad_dot"] for d in dampings}
    assert per_damping == {k: rho[k] for k in per_damping}


def test_cli_score_prints_lambda_relative_to_the_scale(tmp_path, capsys, caplog):
    """Pins: the score command's summary states trace(H)/p and λ relative to it, and the warning's setting."""
    from prefprune.cli import main
    from prefprune.model import save_reward_model

    model, tok = tiny_model("llama", dtype=torch.float32), tokenizer()
    save_reward_model(model, tok, tmp_path / "rm")
    PreferenceDataset(TRAIN, schema="prompt_chosen_rejected").save(tmp_path / "train.jsonl")
    PreferenceDataset(VAL, schema="prompt_chosen_rejected").save(tmp_path / "val.jsonl")
    args = ["score", "--model", str(tmp_path / "rm"), "--train", str(tmp_path / "train.jsonl"),
            "--val", str(tmp_path / "val.jsonl"), "--no-progress", "--impl", "reference", "--device", "cpu",
            "--curvature", "ggn", "--damping", "1e6", "--output", str(tmp_path / "s.csv")]
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        assert main(args) == 0
    captured = capsys.readouterr()
    side = json.loads((tmp_path / "s.csv.json").read_text())["curvature_scale"]
    rel = side["dampings"][0]["relative_to_mean_eigenvalue"]
    assert f"trace(H)/p = {side['mean_eigenvalue']:.3g}" in captured.out, captured.out
    assert f"damping 1e+06 = {rel:.3g} × trace(H)/p" in captured.out, captured.out
    assert "Spearman with grad_dot" in captured.out
    assert "--damping / score.damping" in caplog.text, caplog.text
    assert np.isfinite(rel) and rel > 1e3


def test_projected_cg_scale_is_the_projected_mean_eigenvalue():
    """Pins: relative damping with projected_ggn solved by CG multiplies the projected curvature's mean
    eigenvalue, as the direct solve does (it took the weight-space trace over the projected dimension)."""
    model = tiny_model("bert")
    kw = dict(curvature="projected_ggn", projection_k=2, damping=0.3, damping_relative=True)
    direct = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(solver="direct", **kw)).solve
    cg = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(solver="cg", **kw)).solve
    assert cg.damping_scale == pytest.approx(direct.damping_scale, rel=1e-9), (cg, direct)


def _far_block():
    """A sidecar's curvature_scale block of a real run at λ = 1e6 × trace(H)/p."""
    model = tiny_model("gpt2")
    res = score_pairs(model, tokenizer(), TRAIN, VAL, config=_cfg(curvature="ggn", damping=[1e6],
                                                                  damping_relative=True))
    return res.metadata["curvature_scale"]


def test_validate_summary_and_experiment_report_carry_the_warning():
    """Pins: validate's printed summary and the experiment report's scoring section say when the curvature
    has no effect at λ (the same `curvature_warnings` text the score run logged)."""
    from prefprune.experiment.report import _solves_section
    from prefprune.validate import validation_summary

    block = _far_block()
    (message,) = block["warnings"]
    summary = validation_summary({"settings": {"interval_level": 0.95, "fraction": 0.5}, "columns": {},
                                  "subsets": [], "curvature_scale": block})
    assert f"WARNING: {message}" in summary, summary
    report = "\n".join(_solves_section({
        "scores": {"metadata": {"seed0/ggn": {"solve": {}, "curvature_scale": block}}, "seconds": {}},
    }))
    assert f"WARNING (seed0/ggn): {message}" in report, report


def test_without_spearman_the_top_eigenvalue_decides_not_the_mean():
    """Pins: with no Spearman value the rule reads λ against the top eigenvalue when known (a low-rank
    curvature's mean is far below its top: the demo's λ = 0.01 was 7.6e3 × the mean yet 0.2 × the top and
    still moved the ranking), and against the mean only when nothing else is known."""
    def block(rel, rel_top):
        return {"curvature": "ggn", "mean_eigenvalue": 1e-6, "damping_rule": "absolute",
                "top_eigenvalue": None if rel_top is None else 0.05,
                "dampings": [{"column": "influence", "damping": 0.01, "damping_factor": None,
                              "relative_to_mean_eigenvalue": rel, "relative_to_top_eigenvalue": rel_top,
                              "spearman_with_grad_dot": None}]}

    assert curvature_warnings(block(7.6e3, 0.2)) == []
    assert len(curvature_warnings(block(7.6e3, 200.0))) == 1
    assert len(curvature_warnings(block(7.6e3, None))) == 1
    assert curvature_warnings(block(10.0, None)) == []


def test_report_names_the_default_damping():
    """Pins: a scoring run at the default damping (damping unset) shows its factor of trace(H)/p in the
    experiment report's damping cell, not 'n/a'."""
    from prefprune.experiment.report import _damping_cell

    res = score_pairs(tiny_model("gpt2"), tokenizer(), TRAIN, VAL, config=_cfg(curvature="ggn"))
    assert res.metadata["config"]["damping"] is None
    assert _damping_cell(res.metadata) == "0.1 × trace(H)/p (default)"


def test_exact_by_default_records_the_gauss_newton_part_without_a_product_pass(llama_exact, monkeypatch):
    """Pins (issue 22's cost): by default (trace_probes=0) an exact run records its Gauss–Newton part's
    trace/p — the brute-force Gauss–Newton trace, what relative damping multiplies — and never runs the
    exact-trace estimator (16 Hessian–vector products per chunk, about 16 CG iterations' cost, on every
    exact run before); a bad trace_probes is refused by name."""
    model, H = llama_exact
    p = H.shape[0]

    def no_products(*a, **k):
        raise AssertionError("the exact-trace estimator ran with trace_probes=0")

    monkeypatch.setattr(scale, "exact_hessian_trace", no_products)
    for solver in ("pcg", "cg"):
        cfg = _cfg(curvature="exact", damping=100.0, on_nonpositive="nan", solver=solver)
        block = score_pairs(model, tokenizer(), TRAIN, VAL, config=cfg).curvature_scale
        assert block["mean_eigenvalue_estimate"]["method"] == "gauss_newton_part", block
        gn = float(torch.trace(_gauss_newton(model))) / p
        assert block["mean_eigenvalue"] == pytest.approx(gn, rel=1e-6), (solver, block["mean_eigenvalue"], gn)
    with pytest.raises(ValueError, match="trace_probes"):
        _cfg(curvature="exact", trace_probes=-1).validate()
