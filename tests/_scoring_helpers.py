"""Shared fixtures for the scoring tests: tiny LoRA reward models, short pairs, float64 brute force.

The brute force never uses the capture/segment code under test: per-pair gradients come from the
single-pair-loop oracle, the exact Hessian from `torch.autograd.functional.hessian` of the float64
mean training loss written with `torch.func.functional_call`, and the solve from `torch.linalg.solve`.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from prefprune.data import PreferencePair, collate_pairs, encode_pairs
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.model import LoRASettings, build_reward_model, trainable_linears
from prefprune.testing import tiny_config, tiny_tokenizer

PAD = 0


def make_pairs(
    n: int, *, seed: int, prefix: str = "p", min_len: int = 3, max_len: int = 23
) -> list[PreferencePair]:
    """n pairs of random lower-case text with odd, unequal lengths (ids prefix0, prefix1, ...)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice("abcdefgh ijklmnop") for _ in range(k))

    pairs = []
    for i in range(n):
        pairs.append(
            PreferencePair(
                id=f"{prefix}{i}",
                prompt=text(rng.randrange(min_len, max_len) | 1),
                chosen=text(rng.randrange(1, 12) | 1),
                rejected=text(rng.randrange(2, 13)),
            )
        )
    return pairs


def tiny_model(
    family: str, *, dtype=torch.float64, seed: int = 0, r: int = 2, hidden: int = 16, scale: float = 0.3
):
    """A tiny LoRA reward model in eval mode with LoRA B moved off zero (so every block has gradients)."""
    cfg = tiny_config(family, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                      **({"num_key_value_heads": 2} if family == "llama" else {}))
    model, _ = build_reward_model(cfg, lora=LoRASettings(r=r, alpha=float(r)), dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.eval()
    return model


def tokenizer():
    return tiny_tokenizer()


def flat_params(model) -> torch.Tensor:
    return ParameterLayout(trainable_linears(model)).values()


def exact_hessian(model, encoded) -> torch.Tensor:
    """(p, p) Hessian of mean_i softplus(−m_i) over `encoded` w.r.t. the flat trainable parameters."""
    sites = trainable_linears(model)
    names = {id(p): n for n, p in model.named_parameters()}
    base = model.get_base_model()
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")  # fused attention kernels have no double backward

    def loss(flat):
        params = {}
        for s, M in zip(sites, ParameterLayout(sites).split(flat), strict=True):
            w_cols = s.d_in - int(s.has_bias)
            params[names[id(s.module.weight)]] = M[:, :w_cols]
            if s.has_bias:
                params[names[id(s.module.bias)]] = M[:, w_cols]
        total = 0.0
        for e in encoded:
            batch = collate_pairs([e], pad_token_id=PAD)
            r = functional_call(model, params, (), batch).logits[:, 0]
            total = total + F.softplus(-(r[0] - r[1]))
        return total / len(encoded)

    try:
        return torch.autograd.functional.hessian(loss, flat_params(model), vectorize=True)
    finally:
        base.set_attn_implementation(before)


def brute_force_scores(model, tok, train, val, *, curvature: str, damping: float, max_length: int = 512,
                       hessian_idx=None):
    """Every score column by brute force in float64 (see module docstring)."""
    model = copy.deepcopy(model).double()
    tr = encode_pairs(train, tok, max_length=max_length)
    va = encode_pairs(val, tok, max_length=max_length)
    G, m = oracle_pair_gradients(model, tr, pad_token_id=PAD)
    Gv, _ = oracle_pair_gradients(model, va, pad_token_id=PAD)
    g_val = Gv.mean(0)
    curv = tr if hessian_idx is None else [tr[i] for i in hessian_idx]
    p = g_val.numel()
    if curvature == "identity":
        q = g_val
        H = None
    else:
        if curvature == "exact":
            H = exact_hessian(model, curv)
        else:
            Gm, mc = oracle_pair_gradients(model, curv, pad_token_id=PAD, of="margin")
            w = torch.sigmoid(mc) * torch.sigmoid(-mc)
            H = Gm.T @ (w[:, None] * Gm) / len(curv)
        q = torch.linalg.solve(H + damping * torch.eye(p, dtype=H.dtype), g_val)
    grad_dot = G @ g_val
    norms = G.norm(dim=1)
    return {
        "influence": G @ q,
        "grad_dot": grad_dot,
        "grad_cos": grad_dot / (norms * g_val.norm()),
        "train_loss": F.softplus(-m),
        "margin": m,
    }, H, g_val


def rel_err(a, b) -> float:
    """Norm-wise relative error ‖a − b‖ / ‖b‖ of two vectors (float64)."""
    a, b = (x.detach().double().reshape(-1) if isinstance(x, torch.Tensor)
            else torch.from_numpy(np.array(x, dtype=np.float64)).reshape(-1) for x in (a, b))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
