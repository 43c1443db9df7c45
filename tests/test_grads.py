"""Per-pair gradients from linear-layer captures against the single-pair-loop oracle."""

from __future__ import annotations

import copy
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _scoring_helpers import PAD, make_pairs, rel_err, tiny_model, tokenizer
from torch import nn

from prefprune.data import PairBatches, collate_pairs, encode_pairs
from prefprune.influence.capture import BatchLayout, StreamingCapture
from prefprune.influence.layout import ParameterLayout, flatten_site_matrices
from prefprune.influence.oracle import oracle_pair_gradients
from prefprune.influence.reducers import _drop_zero_rows, stream_pair_dots
from prefprune.model import trainable_linears
from prefprune.ops.reference import pair_sequence_grad_dot_reference
from prefprune.ops.segment import segment_grad_dot

CASES = [
    ("gpt_neox", "right"), ("gpt_neox", "left"),
    ("llama", "right"), ("llama", "left"),
    ("bert", "right"),
    ("gpt2", "left"),
]


def num_params(sites):
    return ParameterLayout(sites).numel


def split_flat(vec, sites):
    return ParameterLayout(sites).split(vec)


def _captured(model, enc, side, objective, queries, impl="reference"):
    """Margins, the layers' packed rows as the gradient-row reducer sees them (rows whose Δ is exactly zero
    dropped), and the streamed dots and squared norms of one batch."""
    sites = trainable_linears(model)
    batch = collate_pairs(enc, pad_token_id=PAD, padding_side=side)
    packed = [None] * len(sites)

    def keep(k, X, dY, offsets):
        X, dY, offsets = _drop_zero_rows(X, dY, offsets)
        packed[k] = SimpleNamespace(X=X.clone(), dY=dY.clone(), offsets=offsets.clone())

    with StreamingCapture(sites) as cap:
        cap.run(model, batch, BatchLayout.from_mask(batch["attention_mask"]), objective, keep)
    batches = PairBatches(enc, batch_size=len(enc), pad_token_id=PAD, padding_side=side)
    S, sq, margins = stream_pair_dots(model, ParameterLayout(sites), batches, list(queries.T),
                                      objective=objective, impl=impl)
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


def _streamed(model, enc, side, objective, queries, impl="reference", dtype=None, on_reduce=None,
              packed=True):
    """Dots and norms from the streaming capture: each layer reduced by its own fused call (packed rows),
    or by the per-sequence batched matmuls on the unpacked tensors, padding included (packed=False)."""
    sites = trainable_linears(model)
    batch = collate_pairs(enc, pad_token_id=PAD, padding_side=side)
    layout = BatchLayout.from_mask(batch["attention_mask"])
    Qs = split_flat(queries, sites)
    acc = {}

    def reduce(k, X, dY, offsets):
        if on_reduce is not None:
            on_reduce(k, X, dY)
        assert (offsets is None) == (not packed)
        if packed:
            s, q = segment_grad_dot(X, dY, offsets, Qs[k], impl=impl, offsets_checked=True)
        else:
            assert X.dim() == 3 and X.shape[0] == 2 * len(enc), X.shape
            s, q = pair_sequence_grad_dot_reference(X, dY, Qs[k])
        acc[k] = (s.double(), q.double())

    with StreamingCapture(sites, dtype=dtype, packed=packed) as cap:
        margins = cap.run(model, batch, layout, objective, reduce)
    S = sum(v[0] for v in acc.values())
    sq = sum(v[1] for v in acc.values())
    return margins, S, sq, acc, cap


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("family,side", CASES)
def test_streaming_capture_matches_oracle_float64(family, side, packed):
    model = tiny_model(family)
    enc = encode_pairs(make_pairs(5, seed=3), tokenizer(), max_length=512)
    G, m_oracle = oracle_pair_gradients(model, enc, pad_token_id=PAD)
    Q = torch.randn(G.shape[1], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flags = [p.requires_grad for p in model.parameters()]
    margins, S, sq, acc, _ = _streamed(model, enc, side, lambda m: F.softplus(-m), Q, packed=packed)
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad restored on exit"
    assert len(acc) == len(trainable_linears(model)), "every site reduced once"
    assert rel_err(margins, m_oracle) <= 1e-10, (margins, m_oracle)
    for j in range(3):
        e = rel_err(S[:, j], G @ Q[:, j])
        assert e <= 1e-10, f"{family}/{side}: streamed dot column {j} rel err {e:.3g}"
    e = rel_err(sq, (G * G).sum(1))
    assert e <= 1e-10, f"{family}/{side}: streamed squared norms rel err {e:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_streaming_capture_holds_one_layer_at_a_time(packed):
    """When a layer is reduced, no earlier layer's (X, Δ) is alive and its raw input is released."""
    model = tiny_model("llama")
    sites = trainable_linears(model)
    enc = encode_pairs(make_pairs(4, seed=9), tokenizer(), max_length=512)
    Q = torch.randn(num_params(sites), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    refs, seen, cap_box = [], [], []

    def on_reduce(k, X, dY):
        gc.collect()
        alive = [i for i, (rx, rd) in enumerate(refs) if rx() is not None or rd() is not None]
        assert alive == [], f"layer {k}: packed (X, Δ) of earlier reductions {alive} still alive"
        cap = cap_box[0]
        assert cap._inputs[k] is None, f"layer {k}: raw input still held while it is reduced"
        # Inputs still held belong exactly to the layers not reduced yet (their Δ has not arrived).
        pending = {i for i, x in enumerate(cap._inputs) if x is not None}
        assert pending == set(range(len(sites))) - set(seen) - {k}, (k, pending, seen)
        seen.append(k)
        refs.append((weakref.ref(X), weakref.ref(dY)))

    class Probe(StreamingCapture):
        def __enter__(self):
            cap_box.append(self)
            return super().__enter__()

    batch = collate_pairs(enc, pad_token_id=PAD, padding_side="left")
    layout = BatchLayout.from_mask(batch["attention_mask"])
    Qs = split_flat(Q, sites)

    def reduce(k, X, dY, offsets):
        on_reduce(k, X, dY)
        if packed:
            segment_grad_dot(X, dY, offsets, Qs[k], offsets_checked=True)
        else:
            pair_sequence_grad_dot_reference(X, dY, Qs[k])

    with Probe(sites, packed=packed) as cap:
        cap.run(model, batch, layout, lambda m: F.softplus(-m), reduce)
        assert cap.held_inputs() == 0
    gc.collect()
    assert sorted(seen) == list(range(len(sites))), seen
    assert all(rx() is None and rd() is None for rx, rd in refs)


def test_streaming_capture_bfloat16_on_cpu():
    """bf16 capture under CPU autocast: tensors handed over in bf16, dots close to the fp64 oracle."""
    model = tiny_model("gpt_neox", dtype=torch.float32)
    enc = encode_pairs(make_pairs(4, seed=7), tokenizer(), max_length=512)
    G64, _ = oracle_pair_gradients(copy.deepcopy(model).double(), enc, pad_token_id=PAD)
    Q = torch.randn(G64.shape[1], 2, generator=torch.Generator().manual_seed(1))
    dtypes = set()
    batch = collate_pairs(enc, pad_token_id=PAD, padding_side="right")
    layout = BatchLayout.from_mask(batch["attention_mask"])
    sites = trainable_linears(model)
    Qs = split_flat(Q, sites)
    S = torch.zeros(len(enc), 2)

    def reduce(k, X, dY, offsets):
        dtypes.update({X.dtype, dY.dtype})
        S.add_(segment_grad_dot(X, dY, offsets, Qs[k], offsets_checked=True)[0])

    with StreamingCapture(sites, dtype=torch.bfloat16) as cap:
        cap.run(model, batch, layout, lambda m: F.softplus(-m), reduce,
                autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert dtypes == {torch.bfloat16}
    e = rel_err(S.double(), G64 @ Q.double())
    assert e <= 5e-2, f"bf16 streamed dots rel err {e:.3g}"


def test_batch_layout_rows_and_offsets():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])  # B = 2: chosen rows 0-1, rejected 2-3
    lay = BatchLayout.from_mask(mask)
    # pair 0 = chosen row 0 (cols 0, 1) + rejected row 2 (col 0); pair 1 = row 1 (cols 1, 2) + row 3 (all)
    assert lay.token_index.tolist() == [0, 1, 6, 4, 5, 9, 10, 11]
    assert lay.token_offsets.tolist() == [0, 3, 8]
    assert lay.seq_index.tolist() == [0, 2, 1, 3] and lay.seq_offsets.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="even number of rows"):
        BatchLayout.from_mask(mask[:3])
