"""Leave-one-out on a tiny float64 reward model trained to its optimum: `prefprune validate` against an
independent brute force (issue 13; DESIGN §2's damping figures).

The task has a finite optimum: every training content appears k ∈ {4, 5} times, twice with its label
flipped, so the Bradley–Terry optimum of that content is the margin log((k − 2) / 2) and full-batch
training reaches it (the script prints the gradient norm and the Hessian's extreme eigenvalues there).
Leaving out any one copy leaves both labels present, so every leave-one-out optimum is finite too.

Two computations of the leave-one-out correlation of `exact` influence at each damping:

- ``validate``: `prefprune.validate.run_validation` with ``loo`` = every training pair (its CG /
  multi-shift solve, its retrains, its Pearson);
- ``brute force``: written here without validate's code: the dense Hessian of the training loss by
  double backward, ``torch.linalg.solve`` for each damping, and a plain loop of retrains from the same
  initial weights with one pair removed.

Run (about 2 × (n + 6) retrains of a 288-parameter model; minutes on one CPU core)::

    python bench/loo_reproduction.py            # --contents 4 --epochs 600 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from prefprune.data import PreferenceDataset, PreferencePair, collate_pairs, plant_label_noise
from prefprune.influence.capture import pair_margins
from prefprune.model import ModelConfig, build_model, eager_attention
from prefprune.score import ScoreConfig
from prefprune.train import TrainConfig, encode_for_training, evaluate, train_reward_model
from prefprune.validate import ValidateConfig, ValidationSetup, run_validation

DESIGN_FIGURES = {1.0: 0.99, 0.1: 0.49, 0.01: 0.25}
WORDS = ["cat", "dog", "sun", "tree", "car", "rain", "book", "milk"]
MAX_LENGTH = 64


def _pairs(n: int, seed: int, prefix: str) -> list[PreferencePair]:
    """The chosen answer repeats the prompt's first word."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=3, replace=False))
        other = str(rng.choice([w for w in WORDS if w not in words]))
        prompt = f"Q: {' '.join(words)}? A:"
        out.append(PreferencePair(f"{prefix}{i}", prompt, f" {words[0]} good", f" {other} bad"))
    return out


def contradictory_copies(n_contents: int, *, seed: int = 3) -> PreferenceDataset:
    """Each content k ∈ (4, 5) times, copies 0 and 1 with chosen and rejected swapped: a finite optimum."""
    out = []
    for c, p in enumerate(_pairs(n_contents, seed, "c")):
        for j in range((4, 5)[c % 2]):
            q = dataclasses.replace(p, id=f"t{c}_{j}")
            out.append(dataclasses.replace(q, chosen=p.rejected, rejected=p.chosen) if j < 2 else q)
    return PreferenceDataset(out, schema="prompt_chosen_rejected", source="contradictory copies")


def _setup(args: argparse.Namespace) -> ValidationSetup:
    train = contradictory_copies(args.contents)
    val_pairs = PreferenceDataset(_pairs(args.val, 11, "v"), schema="prompt_chosen_rejected", source="val")
    val = plant_label_noise(val_pairs, 0.2, seed=1)
    model_cfg = ModelConfig(model="tiny:gpt_neox", dtype="float64", lora={"r": 1})
    tc = TrainConfig(epochs=args.epochs, batch_size=len(train), lr=args.lr, warmup_ratio=0.0,
                     max_grad_norm=None, max_length=MAX_LENGTH, progress=False, device="cpu",
                     group_by_length=False)
    sc = ScoreConfig(max_length=MAX_LENGTH, tol=1e-12, max_iter=400, batch_size=64)
    return ValidationSetup(train, val, build=lambda: build_model(model_cfg, seed=0), train_config=tc,
                           score_config=sc, source={"bench": "loo_reproduction"})


def _batch(data: PreferenceDataset, tok) -> dict:
    enc, skipped = encode_for_training(data, tok, max_length=MAX_LENGTH)
    assert not skipped
    return collate_pairs(enc, pad_token_id=tok.pad_token_id)


def brute_force(setup: ValidationSetup, dampings: list[float]) -> dict:
    """Dense Hessian, torch.linalg.solve, and a plain retraining loop; none of validate's code."""
    model, tok = setup.build()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def retrain(data: PreferenceDataset) -> float:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])
        train_reward_model(model, tok, data, config=setup.train_config)
        return float(evaluate(model, tok, setup.val, max_length=MAX_LENGTH)["loss"])

    l_full = retrain(setup.train)
    ps = [p for p in model.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    tb, vb = _batch(setup.train, tok), _batch(setup.val, tok)
    with eager_attention(model):  # double backward needs eager attention
        margins = pair_margins(model, tb)
        g = flat(torch.autograd.grad(F.softplus(-margins).mean(), ps, create_graph=True))
        hess = torch.stack([flat(torch.autograd.grad(g[i], ps, retain_graph=True)) for i in range(g.numel())])
        per_pair = torch.stack([flat(torch.autograd.grad(F.softplus(-margins[i]), ps, retain_graph=True))
                                for i in range(margins.numel())])
        g_val = flat(torch.autograd.grad(F.softplus(-pair_margins(model, vb)).mean(), ps))
    hess = (hess + hess.T).detach() / 2
    eig = torch.linalg.eigvalsh(hess)
    eye = torch.eye(hess.shape[0], dtype=hess.dtype)
    # influence_i = ∇ℓ_iᵀ (H + λI)⁻¹ ∇L_V: removing pair i moves the optimum by (H + λI)⁻¹ ∇ℓ_i / n, so
    # L_V changes by +influence_i / n (DESIGN §2: positive = helpful)
    solve = lambda lam: torch.linalg.solve(hess + lam * eye, g_val)  # noqa: E731
    infl = {lam: (per_pair.detach() @ solve(lam)).numpy() for lam in dampings}
    ids = list(setup.train.ids)
    actual = np.asarray([retrain(setup.train.exclude([i])) - l_full for i in ids])
    return {
        "ids": ids,
        "actual": actual,
        "pearson": {lam: float(np.corrcoef(infl[lam] / len(ids), actual)[0, 1]) for lam in dampings},
        "grad_norm": float(g.detach().norm()),
        "hessian_eig_min": float(eig[0]),
        "hessian_eig_max": float(eig[-1]),
        "n_params": int(hess.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contents", type=int, default=4, help="distinct training contents (pairs: 4.5x)")
    p.add_argument("--val", type=int, default=10, help="validation pairs")
    p.add_argument("--epochs", type=int, default=600, help="full-batch AdamW epochs (linear decay to 0)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = _setup(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        vc = ValidateConfig(output=out, subsets=5, loo=len(setup.train), dampings=args.dampings,
                            curvature="exact", progress=False, bootstrap_samples=200)
        res = run_validation(vc, setup=setup)
    t_validate = time.perf_counter() - t0
    ref = brute_force(setup, args.dampings)
    rows = []
    print(f"{len(setup.train)} training pairs, {ref['n_params']} parameters; at the trained optimum: "
          f"gradient norm {ref['grad_norm']:.2e}, Hessian eigenvalues [{ref['hessian_eig_min']:.2e}, "
          f"{ref['hessian_eig_max']:.2e}]; validate {t_validate:.0f} s, brute force "
          f"{time.perf_counter() - t0 - t_validate:.0f} s")
    print("| λ | H + λI PD | validate LOO Pearson | brute-force LOO Pearson | difference | DESIGN §2 |")
    print("|---|---|---|---|---|---|")
    for lam in args.dampings:
        col = res["columns"][f"influence@{lam:g}"]
        got = col["loo"]["pearson"] if "loo" in col else float("nan")
        want = ref["pearson"][lam]
        rows.append({"damping": lam, "validate": got, "brute_force": want, "design": DESIGN_FIGURES.get(lam)})
        design = DESIGN_FIGURES.get(lam, "—")
        pd = "yes" if ref["hessian_eig_min"] + lam > 0 else "no"
        print(f"| {lam:g} | {pd} | {got:.3f} | {want:.3f} | {abs(got - want):.3f} | {design} |")
    if args.json:
        with open(args.json, "w") as fh:
            facts = {k: v for k, v in ref.items() if k not in ("ids", "actual", "pearson")}
            json.dump({"rows": rows, **facts}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
