"""Curvature passes in less memory (issue 22): exact products in chunks of pairs (equal results, one chunk
deep, recorded in the sidecar) and Gauss–Newton rows written once.

References: the float64 brute-force Hessian of `test_curvature` (`torch.autograd.functional.hessian`, one pair
at a time) and the whole-batch product. Eager attention computes softmax in float32 even for float64 models
(DESIGN §2), which bounds the agreement of two differently batched products at ~1e-7.
"""

from __future__ import annotations

import json
import mmap
import os
import weakref

import pytest
import torch
from _scoring_helpers import PAD, make_pairs, rel_err, tiny_model, tokenizer
from test_curvature import _setup

from prefprune.data import PairBatches, encode_pairs, length_order
from prefprune.influence.curvature import ExactHessian, GaussNewton, gauss_newton_weights, make_curvature
from prefprune.influence.layout import ParameterLayout
from prefprune.influence.reducers import pair_gradient_rows
from prefprune.score import ScoreConfig, score_pairs
from prefprune.scorefile import sidecar_path


def _product(model, enc, V, *, batch_size=4, hvp_batch_size=None, column_block=1):
    batches = PairBatches(enc, batch_size=batch_size, pad_token_id=PAD, padding_side="right")
    curvature = ExactHessian(model, ParameterLayout.of(model), batches, hvp_batch_size=hvp_batch_size)
    with curvature.context():
        return curvature.matvec(V, column_block=column_block)


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "bert"])
def test_chunked_product_equals_whole_batch_and_brute_force(family):
    """A product summed over chunks of 1 and 3 pairs (columns one second backward each, or vmapped blocks of
    2 with a partial last block) equals the whole-batch product and the float64 brute-force H V."""
    model, enc, H = _setup(family)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = H @ V
    whole = _product(model, enc, V, hvp_batch_size=4)
    assert rel_err(whole, ref) <= 1e-6
    for chunk in (1, 3):
        for block in (1, 2):
            HV = _product(model, enc, V, hvp_batch_size=chunk, column_block=block)
            e_ref, e_whole = rel_err(HV, ref), rel_err(HV, whole)
            assert e_ref <= 1e-6, f"{family} chunk {chunk} block {block}: rel err {e_ref:.3g} vs brute force"
            assert e_whole <= 1e-6, f"{family} chunk {chunk} block {block}: rel err {e_whole:.3g} vs whole"


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.t = t


class _SavedBytes:
    """Bytes of the tensors autograd graphs save (forward activations, the first backward's graph kept for
    the second) alive at once, at their peak: the memory a Hessian product's graph holds."""

    def __init__(self):
        self.alive = self.peak = 0

    def _pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        box = _Box(t)
        self.alive += n
        self.peak = max(self.peak, self.alive)
        weakref.finalize(box, self._free, n)  # when the graph drops the saved tensor
        return box

    def _free(self, n: int) -> None:
        self.alive -= n

    def measure(self, fn) -> int:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.t):
            fn()
        return self.peak


def test_product_graph_is_one_chunk_deep():
    """The peak of a product's saved graph over two batches of 4 pairs with hvp_batch_size=2 is at most the
    largest graph of a product over any 2 of those pairs alone: no batch's whole graph is built, and no
    chunk's graph outlives its chunk. (The old product built each batch's graph whole: its peak here was
    the 4-pair batch's, about twice a 2-pair chunk's.)"""
    model, enc = tiny_model("gpt_neox"), _encode(8)  # chunks: pairs 0-1, 2-3 (batch 1), 4-5, 6-7 (batch 2)
    V = torch.randn(ParameterLayout.of(model).numel, 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    whole = _SavedBytes().measure(lambda: _product(model, enc, V, batch_size=4, hvp_batch_size=2))
    alone = max(
        _SavedBytes().measure(lambda i=i: _product(model, enc[i : i + 2], V, batch_size=2, hvp_batch_size=2))
        for i in range(0, 8, 2)
    )
    assert 0 < whole <= alone, f"peak saved bytes {whole} over the pass, {alone} for one chunk alone"


def _encode(n: int) -> list:
    return encode_pairs(make_pairs(n, seed=5), tokenizer(), max_length=512)


def test_default_chunk_is_a_quarter_batch_and_the_sidecar_records_it(tmp_path):
    """The chunk a run used is in the sidecar's solve block: batch_size // 4 by default, the setting when
    given; None for curvatures without double backward."""
    model, tok = tiny_model("gpt_neox"), tokenizer()
    train, val = make_pairs(8, seed=2), make_pairs(3, seed=3, prefix="v")
    base = dict(curvature="exact", damping=1.0, batch_size=8, tol=1e-8, max_iter=50, progress=False,
                on_nonpositive="nan")
    for given, used in ((None, 2), (3, 3)):
        res = score_pairs(model, tok, train, val, config=ScoreConfig(**base, hvp_batch_size=given))
        out = tmp_path / f"scores_{given}.csv"
        res.save(out)
        side = json.loads(sidecar_path(out).read_text())
        assert side["solve"]["hvp_batch_size"] == used, side["solve"]
        assert side["config"]["hvp_batch_size"] == given
    ggn = score_pairs(model, tok, train, val, config=ScoreConfig(**{**base, "curvature": "ggn"}))
    assert ggn.metadata["solve"]["hvp_batch_size"] is None


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_hvp_batch_size_is_refused_by_name(bad):
    """A chunk size that is not a positive integer is refused before any pass, naming the setting."""
    with pytest.raises(ValueError, match=rf"hvp_batch_size must be None or an integer >= 1, got {bad!r}"):
        ScoreConfig(hvp_batch_size=bad).validate()
    model = tiny_model("gpt_neox")
    batches = PairBatches(_encode(2), batch_size=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="hvp_batch_size"):
        make_curvature("exact", model, ParameterLayout.of(model), batches, hvp_batch_size=bad)


def test_gauss_newton_rows_are_written_into_one_tensor():
    """The rows pass writes every batch's rows into the one (n, p) tensor it returns (the yielded blocks are
    its views), so the factors' memory is held once: no per-batch blocks kept until a concatenation copies
    them (before, the rows were held twice at the end of the pass). The rows equal the per-batch ones."""
    model, enc = tiny_model("bert"), _encode(7)
    layout = ParameterLayout.of(model)
    batches = PairBatches(enc, batch_size=3, pad_token_id=PAD)
    separate = torch.cat([r for _, r in pair_gradient_rows(model, layout, batches, objective=lambda m: m)])
    out = torch.full((7, layout.numel), torch.nan, dtype=layout.wide)
    blocks = [r for _, r in pair_gradient_rows(model, layout, batches, objective=lambda m: m, out=out)]
    assert [b.untyped_storage().data_ptr() for b in blocks] == [out.untyped_storage().data_ptr()] * 3
    assert torch.equal(out, separate)
    rows, w = GaussNewton(model, layout, batches).rows()
    assert torch.equal(rows, separate) and w.shape == (7,)
    with pytest.raises(ValueError, match=r"out must be \(7, \d+\)"):
        next(pair_gradient_rows(model, layout, batches, objective=lambda m: m, out=out[:6]))


def _own_mapping(t: torch.Tensor) -> bool:
    """Whether `t`'s memory starts a page outside the allocator's heap, per /proc/self/maps (a mapping of its
    own; the kernel may merge it with a neighbouring anonymous one, so its bounds are not checked)."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return ptr % mmap.PAGESIZE == 0 and not line.rstrip().endswith("[heap]")
    return False


def test_gauss_newton_rows_pass_runs_its_largest_batch_first_beside_no_other_rows():
    """The rows pass runs the batch with the most tokens first, into rows held in a mapping of their own (on
    the CPU: pages count once written), so its largest forward + backward runs beside one batch's rows, not
    beside most of the sample's (before: batches in length order, the longest last, rows a heap block whose
    pages were already resident; `ggn` peaked 3-4% above the floor, docs/benchmarks.md). The rows and
    weights equal the batch-order ones bitwise, in sample order."""
    model, tok = tiny_model("gpt_neox"), tokenizer()
    enc = encode_pairs(make_pairs(7, seed=5), tok, max_length=512)
    enc = [enc[i] for i in length_order(enc)]  # what group_by_length gives: the longest batch last
    layout = ParameterLayout.of(model)
    batches = PairBatches(enc, batch_size=3, pad_token_id=PAD)
    ref = list(pair_gradient_rows(model, layout, batches, objective=lambda m: m))
    tokens = [b["input_ids"].numel() for b in batches]
    assert tokens.index(max(tokens)) != 0
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        rows, w = GaussNewton(model, layout, batches).rows()
    finally:
        hook.remove()
    assert seen[0] == max(tokens), f"rows pass forwards (tokens): {seen}; batches: {tokens}"
    assert sorted(seen) == sorted(tokens)
    assert torch.equal(rows, torch.cat([r for _, r in ref]))
    assert torch.equal(w, torch.cat([gauss_newton_weights(m).to(rows.dtype) for m, _ in ref]))
    if os.path.exists("/proc/self/maps"):
        assert _own_mapping(rows), "the rows are a block of the allocator's heap"
