"""Direct Gauss–Newton solves, damping sweeps, multi-shift CG and batched HVPs against float64 brute force.

References: the explicit exact Hessian (`exact_hessian`) or Gauss–Newton matrix built from the single-pair
oracle's margin gradients, solved with `torch.linalg.solve`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _scoring_helpers import PAD, exact_hessian, make_pairs, rel_err, tiny_model, tokenizer

from prefprune.data import PairBatches, encode_pairs
from prefprune.influence.curvature import ExactHessian, make_curvature
from prefprune.influence.eigen import GaussNewtonEigen
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.multishift import multishift_cg
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.plan import damping_column_names, plan_solve
from prefprune.influence.reducers import pair_gradient_rows
from prefprune.influence.solvers import solve
from prefprune.model import eager_attention, trainable_linears
from prefprune.ops.projection import KroneckerProjector
from prefprune.ops.reference import cg_reference

_CACHE: dict = {}


def _setup(family: str, n: int = 6):
    key = (family, n)
    if key not in _CACHE:
        model = tiny_model(family)
        enc = encode_pairs(make_pairs(n, seed=1), tokenizer(), max_length=512)
        val = encode_pairs(make_pairs(3, seed=9, prefix="v"), tokenizer(), max_length=512)
        _CACHE[key] = (model, enc, val)
    return _CACHE[key]


def _hessian(family: str):
    if ("H", family) not in _CACHE:
        model, enc, _ = _setup(family)
        _CACHE[("H", family)] = exact_hessian(model, enc)
    return _CACHE[("H", family)]


def _batches(enc, side="right", bs=4):
    return PairBatches(enc, batch_size=bs, pad_token_id=PAD, padding_side=side)


def _ggn(model, enc):
    Gm, m = oracle_pair_gradients(model, enc, pad_token_id=PAD, of="margin")
    w = torch.sigmoid(m) * torch.sigmoid(-m)
    return Gm.T @ (w[:, None] * Gm) / len(enc), Gm, w


def _val_grads(model, val):
    G, _ = oracle_pair_gradients(model, val, pad_token_id=PAD)
    return G.T.contiguous()  # (p, n_val): one query per validation pair


def _plan(curvature, p, n, dampings, **kw):
    return plan_solve(curvature=curvature, n_params=p, n_curvature=n, dampings=dampings, itemsize=8, **kw)


def _eye(H):
    return torch.eye(H.shape[0], dtype=H.dtype)


def _solve(model, B, batches, *, plan, dampings, impl=None, projection_k=16, projection_seed=0,
                    **kw):
    """The live path: the planned curvature over `batches`, solved by `prefprune.influence.solvers.solve`."""
    curvature = make_curvature(plan.curvature, model, ParameterLayout.of(model), batches, impl=impl,
                               projection_k=projection_k, projection_seed=projection_seed)
    sol = solve(curvature, B, dampings, plan=plan, impl=impl, **kw)
    return sol.Q, sol.record, sol.factors


def _hvp_per_column(model, batches, V):
    """Test oracle: H V by one double backward per column of V (no batched autograd)."""
    layout = ParameterLayout.of(model)
    out = torch.zeros_like(V)
    for batch in batches:
        with torch.enable_grad():
            from prefprune.influence.capture import pair_margins

            loss = torch.nn.functional.softplus(-pair_margins(model, batch)).sum() / batches.n_pairs
            gflat = layout.flatten_grads(torch.autograd.grad(loss, layout.params, create_graph=True))
            for j in range(V.shape[1]):
                hv = torch.autograd.grad(gflat @ V[:, j], layout.params, retain_graph=True, allow_unused=True)
                out[:, j] += layout.flatten_grads(hv)
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,n,form", [("gpt_neox", 6, "gram"), ("llama", 6, "gram"), ("bert", 5, "gram"),
                                           ("gpt2", 9, "primal")])
def test_direct_ggn_every_damping_and_query_matches_linalg_solve(family, n, form):
    """One pass, one eigendecomposition: every (damping, validation-pair query) column to ≤ 1e-6."""
    model, enc, val = _setup(family, n)
    H, _, _ = _ggn(model, enc)
    B = _val_grads(model, val)
    dampings = [1e-3, 0.1, 1.0, 3.0, 10.0]
    plan = _plan("ggn", H.shape[0], len(enc), dampings)
    assert plan.method == "direct" and plan.form == "gram", plan  # n_h < p on these tiny models
    plan = dataclasses.replace(plan, form=form)  # the d×d form (auto picks it when p < n_h)
    side = "right" if family == "bert" else "left"  # BERT pools the first position: right padding only
    Q, rec, _ = _solve(model, B, _batches(enc, side, bs=3), plan=plan, dampings=dampings,
                                impl="reference")
    assert rec.curvature_passes == 1 and rec.impl == "eigh"
    assert rec.column_names == [f"influence@{d!r}" for d in dampings]
    for i, lam in enumerate(dampings):
        ref = torch.linalg.solve(H + lam * _eye(H), B)
        for j in range(B.shape[1]):
            e = rel_err(Q[i, :, j], ref[:, j])
            assert e <= 1e-6, f"{family} damping {lam} query {j}: rel err {e:.3g}"


def test_projected_ggn_direct_matches_projected_brute_force_and_factored_cg():
    model, enc, val = _setup("gpt_neox")
    sites = trainable_linears(model)
    proj = KroneckerProjector([(s.d_out, s.d_in) for s in sites], k_out=3, k_in=3, seed=5)
    _, Gm, w = _ggn(model, enc)
    # Project the oracle's per-pair margin gradients layer by layer: Φ_i = P_out G_i P_inᵀ.
    Phi = proj.project_query(ParameterLayout(sites).split(Gm.T.contiguous()))  # (n, dim)
    Hp = Phi.T @ (w[:, None] * Phi) / len(enc)
    B = _val_grads(model, val)
    Bp = proj.project_query(ParameterLayout(sites).split(B)).T
    dampings = [0.05, 0.5]
    plan = _plan("projected_ggn", B.shape[0], len(enc), dampings, projection_dim=proj.dim)
    assert plan.method == "direct" and plan.space == "projected"
    Q, rec, fac = _solve(model, B, _batches(enc), plan=plan, dampings=dampings,
                                  projection_k=3, projection_seed=5, impl="reference")
    plan_cg = _plan("projected_ggn", B.shape[0], len(enc), dampings, projection_dim=proj.dim, solver="cg")
    Qcg, rec_cg, _ = _solve(model, B, _batches(enc), plan=plan_cg, dampings=dampings,
                                     projection_k=3, projection_seed=5, impl="reference", tol=1e-13,
                                     max_iter=500)
    assert rec.curvature_passes == 1 and rec_cg.curvature_passes == 1
    for i, lam in enumerate(dampings):
        qp = torch.linalg.solve(Hp + lam * _eye(Hp), Bp)  # (dim, m) in projected space
        ref = torch.stack([torch.cat([x.reshape(-1) for x in proj.lift(qp[:, j : j + 1].T)])
                           for j in range(B.shape[1])], 1)
        assert rel_err(Q[i], ref) <= 1e-6, (lam, rel_err(Q[i], ref))
        assert rel_err(Qcg[i], ref) <= 1e-6, (lam, rel_err(Qcg[i], ref))
    tr = float(torch.trace(Hp))
    assert abs(fac.eigen.mean_eigenvalue - tr / proj.dim) <= 1e-10 * tr


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "bert"])
def test_batched_hvp_equals_one_double_backward_per_column(family):
    model, enc, _ = _setup(family)
    sites = trainable_linears(model)
    p = sum(s.numel for s in sites)
    V = torch.randn(p, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with eager_attention(model):
        ref = _hvp_per_column(model, _batches(enc, bs=4), V)
        # Chunks of the whole batch, as the reference takes them (other chunks round eager attention's
        # float32 softmax differently: test_hvp_chunks); columns one by one and in one vmapped block.
        exact = ExactHessian(model, ParameterLayout(sites), _batches(enc, bs=4), hvp_batch_size=4)
        outs = [exact.matvec(V, column_block=k) for k in (1, 4)]
    for k, out in zip((1, 4), outs, strict=True):
        assert rel_err(out, ref) <= 1e-12, f"{family} column_block {k}: {rel_err(out, ref):.3g}"


def test_exact_sweep_multishift_and_multicolumn_cg_match_linalg_solve_and_flag_indefinite_columns():
    """exact: one Krylov space for every damping; the indefinite small-damping column says so."""
    model, enc, val = _setup("gpt_neox")
    H = _hessian("gpt_neox")
    lo = float(torch.linalg.eigvalsh(H)[0])
    assert lo < -0.1, f"expected an indefinite Hessian, smallest eigenvalue {lo}"
    B = _val_grads(model, val)[:, :2]
    dampings = [1e-3, -lo + 0.3, -lo + 3.0]
    for solver in ("multishift", "cg"):
        plan = _plan("exact", H.shape[0], len(enc), dampings, solver=solver)
        Q, rec, _ = _solve(model, B, _batches(enc, "left"), plan=plan, dampings=dampings,
                                    tol=1e-10, max_iter=400, impl="reference")
        assert rec.columns[0]["status"] == "nonpositive_curvature", rec.columns[0]
        assert rec.columns[0]["nonpositive_value"] <= 0 and rec.columns[0]["nonpositive_queries"] >= 1
        for i, lam in enumerate(dampings[1:], start=1):
            assert rec.columns[i]["status"] == "converged", (solver, rec.columns[i])
            ref = torch.linalg.solve(H + lam * _eye(H), B)
            # Eager attention's float32 softmax bounds HVP agreement at ~1e-7 (see test_curvature).
            e = rel_err(Q[i], ref)
            assert e <= 1e-6, f"{solver} damping {lam}: rel err {e:.3g}"
        if solver == "multishift":
            # One HVP block per iteration for all four shifts: passes = iterations of the slowest column.
            assert rec.curvature_passes == max(c["iterations"] for c in rec.columns)
            ms_passes = rec.curvature_passes
    assert ms_passes <= rec.curvature_passes, (ms_passes, rec.curvature_passes)


def test_multishift_equals_cg_per_shift_on_an_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(97, 97, generator=g, dtype=torch.float64)
    H = A @ A.T / 97 - 0.2 * torch.eye(97, dtype=torch.float64)  # indefinite
    B = torch.randn(97, 3, generator=g, dtype=torch.float64)
    shifts = [0.05, 0.4, 1.0]
    res = multishift_cg(lambda V: H @ V, B, shifts, tol=1e-12, max_iter=400)
    for i, s in enumerate(shifts):
        ref = cg_reference(lambda V, s=s: H @ V + s * V, B, tol=1e-12, max_iter=400)
        assert res.status[i].tolist() == ref.status.tolist(), (s, res.status[i], ref.status)
        if ref.status_names()[0] == "nonpositive_curvature":
            assert res.iterations[i].tolist() == ref.iterations.tolist()
            assert torch.allclose(res.curvature[i], ref.curvature, rtol=1e-8)
        else:
            sol = torch.linalg.solve(H + s * torch.eye(97, dtype=torch.float64), B)
            assert rel_err(res.x[i], sol) <= 1e-9, (s, rel_err(res.x[i], sol))


def test_relative_damping_uses_the_mean_eigenvalue():
    model, enc, val = _setup("llama")
    H, _, _ = _ggn(model, enc)
    scale = float(torch.trace(H)) / H.shape[0]
    B = _val_grads(model, val)[:, :1]
    factors = [0.1, 1.0]
    for solver in ("direct", "multishift"):
        plan = _plan("ggn", H.shape[0], len(enc), factors, relative=True, solver=solver)
        Q, rec, _ = _solve(model, B, _batches(enc), plan=plan, dampings=factors,
                                    relative=True, tol=1e-12, max_iter=500, impl="reference")
        assert abs(rec.damping_scale - scale) <= 1e-10 * scale, (solver, rec.damping_scale, scale)
        assert rec.damping_factors == factors and rec.column_names == ["influence@r0.1", "influence@r1.0"]
        assert rec.curvature_passes == (1 if solver == "direct" else 1 + rec.columns[0]["iterations"])
        for i, f in enumerate(factors):
            assert abs(rec.dampings[i] - f * scale) <= 1e-12 * scale
            ref = torch.linalg.solve(H + f * scale * _eye(H), B)
            assert rel_err(Q[i], ref) <= 1e-6, (solver, f, rel_err(Q[i], ref))


def test_self_influence_quadratic_matches_brute_force():
    model, enc, _ = _setup("gpt_neox")
    sites = trainable_linears(model)
    H, Gm, w = _ggn(model, enc)
    G, _ = oracle_pair_gradients(model, enc, pad_token_id=PAD)
    batches = _batches(enc, "left", bs=4)
    rows = torch.cat([r for _, r in pair_gradient_rows(model, ParameterLayout(sites), batches,
                                                       objective=lambda m: torch.nn.functional.softplus(-m),
                                                       impl="reference")])
    assert rel_err(rows, G) <= 1e-10  # captured per-pair loss gradients = the single-pair oracle
    for form in ("gram", "primal"):
        eig = GaussNewtonEigen.from_rows(Gm, w, form=form)
        S = eig.quadratic(G, [0.01, 1.0])
        for i, lam in enumerate([0.01, 1.0]):
            ref = (G * torch.linalg.solve(H + lam * _eye(H), G.T).T).sum(1)
            assert rel_err(S[:, i], ref) <= 1e-6, (form, lam, rel_err(S[:, i], ref))
    Hx = _hessian("gpt_neox")
    eig = GaussNewtonEigen.from_matrix(Hx)
    lo = float(torch.linalg.eigvalsh(Hx)[0])
    S = eig.quadratic(G, [1e-3, -lo + 0.5])
    assert torch.isnan(S[:, 0]).all()  # indefinite: no number
    ref = (G * torch.linalg.solve(Hx + (-lo + 0.5) * _eye(Hx), G.T).T).sum(1)
    assert rel_err(S[:, 1], ref) <= 1e-6


def test_plan_choices_and_bad_input_before_any_pass():
    assert _plan("ggn", 1000, 50, [1.0]).form == "gram"
    assert _plan("ggn", 100, 500, [1.0]).form == "primal"
    far = _plan("ggn", 10**7, 100, [1.0, 0.1], memory_budget_mb=1)
    assert far.method == "multishift" and "exceed" in far.reason
    assert _plan("ggn", 10**7, 100, [1.0], memory_budget_mb=1).method == "cg"
    assert _plan("exact", 100, 10, [1.0]).method == "pcg"  # the Gauss–Newton factors fit: preconditioned
    assert _plan("exact", 10**7, 100, [1.0], memory_budget_mb=1).method == "cg"
    assert _plan("exact", 10**7, 100, [1.0, 2.0], memory_budget_mb=1).method == "multishift"
    assert _plan("identity", 100, 0, [0.0]).method == "none"
    with pytest.raises(ValueError, match=r"> 0 with curvature='exact'.*0.0"):
        _plan("exact", 100, 10, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"duplicate damping values \[0.5\]"):
        _plan("ggn", 100, 10, [0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="too small even for the projected Gram"):
        _plan("projected_ggn", 10**6, 10**5, [1.0], memory_budget_mb=1, projection_dim=4096)
    with pytest.raises(ValueError, match="singular"):
        _plan("ggn", 1000, 10, [0.0, 1.0])
    with pytest.raises(ValueError, match="solver='direct' needs"):
        _plan("ggn", 10**7, 100, [1.0], memory_budget_mb=1, solver="direct")
    with pytest.raises(ValueError, match="needs a Gauss–Newton curvature"):
        _plan("exact", 100, 10, [1.0], solver="direct")
    assert damping_column_names([1.0], relative=False) == ["influence"]
    assert damping_column_names([1e-5, 0.1], relative=False) == ["influence@1e-05", "influence@0.1"]
