"""Tests for prefprune.data.synthetic: determinism, planted noise, TL;DR layout, a non-length rule."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from prefprune.data import PreferenceDataset, load_preferences, tldr_prompt
from prefprune.data.synthetic import NEGATIVE_KINDS, make_synthetic

_WORD = re.compile(r"[a-z']+")


def _overlap_score(post: str, summary: str) -> int:
    """Content words of the summary found in the post minus those not found (the rule the data follows)."""
    post_words = set(_WORD.findall(post.lower()))
    words = [w for w in _WORD.findall(summary.lower()) if len(w) > 3]
    return sum(w in post_words for w in words) - sum(w not in post_words for w in words)


def _post(p) -> str:
    a, b = p.truncatable
    return p.prompt[a:b]


def _prefers_chosen(scores: list[tuple[float, float]]) -> float:
    """Accuracy of a scorer that prefers the higher score (ties count one half)."""
    return sum((c > r) + 0.5 * (c == r) for c, r in scores) / len(scores)


def test_same_seed_same_dataset_other_seed_differs():
    a, b, c = make_synthetic(300, label_noise=0.1, seed=7), make_synthetic(300, label_noise=0.1, seed=7), None
    assert [(p.id, p.prompt, p.chosen, p.rejected, p.truncatable, dict(p.meta)) for p in a] == [
        (p.id, p.prompt, p.chosen, p.rejected, p.truncatable, dict(p.meta)) for p in b
    ]
    c = make_synthetic(300, label_noise=0.1, seed=8)
    assert sum(p.prompt == q.prompt for p, q in zip(a, c, strict=True)) < 10
    assert a.flipped_ids != c.flipped_ids


@pytest.mark.parametrize(("n", "noise"), [(1000, 0.1), (997, 0.25), (50, 0.0), (40, 1.0)])
def test_label_noise_fraction_and_recorded_flips(n, noise):
    clean = make_synthetic(n, seed=3)
    noisy = make_synthetic(n, label_noise=noise, seed=3)
    assert len(noisy) == n and noisy.stats["flipped"] == round(noise * n)
    assert noisy.flipped_ids == {p.id for p in noisy if p.meta.get("flipped")}
    assert len(noisy.flipped_ids) == round(noise * n)
    assert clean.flipped_ids == set()
    # The noisy dataset is the clean one with exactly the recorded pairs swapped.
    for p, q in zip(clean, noisy, strict=True):
        assert (p.id, p.prompt) == (q.id, q.prompt)
        if q.id in noisy.flipped_ids:
            assert (q.chosen, q.rejected) == (p.rejected, p.chosen)
        else:
            assert (q.chosen, q.rejected) == (p.chosen, p.rejected)


def test_tldr_layout_ids_and_kinds():
    ds = make_synthetic(2000, seed=0)
    assert isinstance(ds, PreferenceDataset) and ds.schema == "tldr" and len(ds) == 2000
    assert ds.ids[:2] == ["syn0-000000", "syn0-000001"] and len(set(ds.ids)) == 2000
    assert len({(p.prompt, p.chosen, p.rejected) for p in ds}) == 2000
    for p in ds:
        info = p.meta["record"]["info"]
        assert (p.prompt, p.truncatable) == tldr_prompt(
            info["post"], title=info["title"], subreddit=info["subreddit"]
        )
        assert p.prompt.startswith("SUBREDDIT: r/") and p.prompt.endswith("\nTL;DR:")
        assert p.chosen.startswith(" ") and p.chosen != p.rejected
    kinds = Counter(p.meta["kind"] for p in ds)
    assert set(kinds) == set(NEGATIVE_KINDS)
    assert all(0.2 < kinds[k] / len(ds) < 0.5 for k in NEGATIVE_KINDS), kinds
    posts = [len(_post(p)) for p in ds]
    assert max(posts) > 1.8 * min(posts)  # post lengths vary (filler sentences)


def test_rule_is_word_overlap_not_length():
    ds = make_synthetic(4000, seed=1)
    overlap = _prefers_chosen(
        [(_overlap_score(_post(p), p.chosen), _overlap_score(_post(p), p.rejected)) for p in ds]
    )
    chars = _prefers_chosen([(len(p.chosen), len(p.rejected)) for p in ds])
    words = _prefers_chosen([(len(p.chosen.split()), len(p.rejected.split())) for p in ds])
    shorter = _prefers_chosen([(-len(p.chosen), -len(p.rejected)) for p in ds])
    assert overlap > 0.95, overlap
    assert 0.45 < chars < 0.55 and 0.45 < words < 0.55 and 0.45 < shorter < 0.55, (chars, words, shorter)
    for kind in NEGATIVE_KINDS:
        sub = [p for p in ds if p.meta["kind"] == kind]
        acc = _prefers_chosen([(len(p.chosen), len(p.rejected)) for p in sub])
        assert 0.4 < acc < 0.6, (kind, acc)


def test_flipped_pairs_are_the_ones_the_rule_disagrees_with():
    ds = make_synthetic(3000, label_noise=0.2, seed=2)
    disagree = {p.id for p in ds if _overlap_score(_post(p), p.chosen) < _overlap_score(_post(p), p.rejected)}
    hit = len(disagree & ds.flipped_ids)
    assert hit / len(disagree) > 0.9 and hit / len(ds.flipped_ids) > 0.9, (
        hit,
        len(disagree),
        len(ds.flipped_ids),
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_save_load_round_trip_keeps_flips(tmp_path, fmt):
    ds = make_synthetic(200, label_noise=0.15, seed=4)
    pruned = ds.exclude(sorted(ds.flipped_ids)[:10])
    pruned.save(tmp_path / f"s.{fmt}")
    back = load_preferences(tmp_path / f"s.{fmt}")
    assert back.schema == "tldr" and back.ids == pruned.ids
    assert back.flipped_ids == pruned.flipped_ids and len(back.flipped_ids) == 20
    assert [(p.prompt, p.chosen, p.rejected, p.truncatable) for p in back] == [
        (p.prompt, p.chosen, p.rejected, p.truncatable) for p in pruned
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_pairs must be positive, got 0"):
        make_synthetic(0)
    with pytest.raises(ValueError, match=r"label_noise must be in \[0, 1\], got 1.5"):
        make_synthetic(10, label_noise=1.5)


def test_load_or_generate_generates_or_loads(tmp_path):
    from prefprune.data import load_or_generate

    gen = load_or_generate("synthetic", synthetic_pairs=10, max_pairs=4, label_noise=0.5, seed=1)
    ref = make_synthetic(4, label_noise=0.5, seed=1)
    assert gen.ids == ref.ids and gen.flipped_ids == ref.flipped_ids and len(gen) == 4
    path = tmp_path / "pairs.jsonl"
    make_synthetic(6, seed=2).save(path)
    loaded = load_or_generate(str(path), max_pairs=5, schema="auto")
    assert loaded.ids == make_synthetic(6, seed=2).ids[:5]
