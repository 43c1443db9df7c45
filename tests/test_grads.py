"""Per-pair gradients from linear-layer captures against the single-pair-loop oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _scoring_helpers import PAD, make_pairs, rel_err, tiny_model, tokenizer
from torch import nn

from prefprune.data import collate_pairs, encode_pairs
from prefprune.grads import (
    SegmentCapture,
    capture_pairs,
    flatten_site_matrices,
    num_params,
    oracle_pair_gradients,
    pair_dots,
    split_flat,
)
from prefprune.model import trainable_linears

CASES = [
    ("gpt_neox", "right"), ("gpt_neox", "left"),
    ("llama", "right"), ("llama", "left"),
    ("bert", "right"),
    ("gpt2", "left"),
]


def _captured(model, enc, side, objective, queries, impl="reference"):
    sites = trainable_linears(model)
    batch = collate_pairs(enc, pad_token_id=PAD, padding_side=side)
    with SegmentCapture(sites) as cap:
        margins, packed = capture_pairs(model, cap, batch, objective)
    S, sq = pair_dots(packed, split_flat(queries, sites), impl=impl)
    return margins, packed, S, sq


@pytest.mark.parametrize("family,side", CASES)
@pytest.mark.parametrize("n_pairs", [1, 5])
def test_pair_dots_and_norms_match_oracle_float64(family, side, n_pairs):
    model = tiny_model(family)
    enc = encode_pairs(make_pairs(n_pairs, seed=3), tokenizer(), max_length=512)
    G, m_oracle = oracle_pair_gradients(model, enc, pad_token_id=PAD)
    p = G.shape[1]
    Q = torch.randn(p, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    margins, packed, S, sq = _captured(model, enc, side, lambda m: F.softplus(-m), Q)
    assert S.dtype == torch.float64
    assert rel_err(margins, m_oracle) <= 1e-10, (margins, m_oracle)
    for j in range(3):
        e = rel_err(S[:, j], G @ Q[:, j])
        assert e <= 1e-10, f"{family}/{side}: dot column {j} rel err {e:.3g}"
    e = rel_err(sq, (G * G).sum(1))
    assert e <= 1e-10, f"{family}/{side}: squared norms rel err {e:.3g}"
    # Every trainable parameter actually gets gradient (the check would be vacuous otherwise).
    assert bool((G.abs().sum(0) > 0).float().mean() > 0.9)


def test_segments_drop_padding_and_head_rows():
    model = tiny_model("gpt_neox")
    enc = encode_pairs(make_pairs(4, seed=5), tokenizer(), max_length=512)
    p = num_params(trainable_linears(model))
    Q = torch.zeros(p, 1, dtype=torch.float64)
    _, packed, _, _ = _captured(model, enc, "left", lambda m: m, Q)
    n_tokens = torch.tensor([len(e.chosen_ids) + len(e.rejected_ids) for e in enc])
    lora = packed[0]  # first LoRA A: every real token, no padding
    assert torch.equal(lora.offsets[1:] - lora.offsets[:-1], n_tokens)
    head = packed[-1]  # the decoder score head: only the pooled last token of each sequence carries Δ
    assert torch.equal(head.offsets, torch.arange(0, 2 * len(enc) + 1, 2))


def test_bias_column_of_sequence_level_head():
    model = tiny_model("bert")
    sites = trainable_linears(model)
    heads = [s for s in sites if s.has_bias]
    assert heads, "the BERT classifier head has a trainable bias"
    enc = encode_pairs(make_pairs(3, seed=2), tokenizer(), max_length=512)
    Q = torch.zeros(num_params(sites), 1, dtype=torch.float64)
    _, packed, _, _ = _captured(model, enc, "right", lambda m: m, Q)
    k = sites.index(heads[-1])
    assert packed[k].X.shape == (6, heads[-1].d_in)  # 2 rows per pair (pooled chosen, pooled rejected)
    assert torch.all(packed[k].X[:, -1] == 1)


@pytest.mark.parametrize("family", ["gpt_neox", "bert"])
def test_margin_objective_and_float32(family):
    model = tiny_model(family, dtype=torch.float32)
    enc = encode_pairs(make_pairs(5, seed=7), tokenizer(), max_length=512)
    G64, _ = oracle_pair_gradients(copy.deepcopy(model).double(), enc, pad_token_id=PAD, of="margin")
    Q = torch.randn(G64.shape[1], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    _, _, S, sq = _captured(model, enc, "right", lambda m: m, Q)
    ref = G64 @ Q.double()
    for j in range(2):
        e = rel_err(S[:, j], ref[:, j])
        assert e <= 1e-3, f"{family} float32 dot column {j}: rel err {e:.3g}"
    e = rel_err(sq, (G64 * G64).sum(1))
    assert e <= 1e-3, f"{family} float32 norms: rel err {e:.3g}"


def test_triton_interpreter_path_matches_reference():
    model = tiny_model("llama", dtype=torch.float32)
    enc = encode_pairs(make_pairs(3, seed=11), tokenizer(), max_length=512)
    Q = torch.randn(num_params(trainable_linears(model)), 2, generator=torch.Generator().manual_seed(2))
    _, _, S_ref, sq_ref = _captured(model, enc, "left", lambda m: F.softplus(-m), Q, impl="reference")
    _, _, S_tri, sq_tri = _captured(model, enc, "left", lambda m: F.softplus(-m), Q, impl="triton")
    assert rel_err(S_tri, S_ref) <= 1e-5 and rel_err(sq_tri, sq_ref) <= 1e-5


def test_flat_layout_round_trip():
    model = tiny_model("bert")
    sites = trainable_linears(model)
    v = torch.arange(num_params(sites), dtype=torch.float64)
    assert torch.equal(flatten_site_matrices(split_flat(v, sites)), v)
    V = torch.randn(num_params(sites), 3, dtype=torch.float64)
    assert torch.equal(flatten_site_matrices(split_flat(V, sites)), V)
    with pytest.raises(ValueError, match="trainable parameters"):
        split_flat(v[:-1], sites)


def test_trainable_linears_rejects_bad_models():
    model = tiny_model("gpt_neox")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_linears(model)

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.norm = nn.LayerNorm(2)

    with pytest.raises(ValueError, match="norm.weight"):
        trainable_linears(WithNorm())
