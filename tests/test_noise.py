"""Planted noise: the biased annotator, restoring true labels, and clean validation/test in the protocol."""

from __future__ import annotations

import pytest

from prefprune.data import DataConfig, load_data, plant_label_noise
from prefprune.data.noise import plant_length_bias, restore_labels
from prefprune.experiment import ExperimentConfig
from prefprune.experiment.protocol import _prepare


def _words(text: str) -> int:
    return len(text.split())


def test_biased_annotator_prefers_the_longer_response_on_its_share():
    clean = load_data(DataConfig(synthetic_pairs=300, data_seed=2))
    biased = plant_length_bias(clean, 0.5, seed=4)
    flipped = biased.flipped_ids
    assert flipped
    by_id = {p.id: p for p in clean.pairs}
    for p in biased.pairs:
        q = by_id[p.id]
        if p.id in flipped:
            # A swap only where the true chosen response was the shorter one; now the longer one wins.
            assert (p.chosen, p.rejected) == (q.rejected, q.chosen)
            assert _words(q.chosen) < _words(q.rejected) and p.meta["noise"] == "prefer_longer"
        else:
            assert (p.chosen, p.rejected) == (q.chosen, q.rejected)
    # The annotator judges round(0.5 * n) pairs; about half of them had the shorter response chosen.
    shorter_chosen = sum(_words(p.chosen) < _words(p.rejected) for p in clean.pairs)
    assert 0 < len(flipped) <= min(150, shorter_chosen)
    # Through the data settings: the same pairs, and a second planting is refused.
    same = load_data(DataConfig(synthetic_pairs=300, data_seed=2, label_noise=0.5, noise="prefer_longer"))
    assert same.flipped_ids == plant_length_bias(clean, 0.5, seed=2).flipped_ids
    with pytest.raises(ValueError, match="already has planted noise"):
        plant_length_bias(biased, 0.1, seed=0)


def test_restore_labels_undoes_exactly_the_named_pairs():
    clean = load_data(DataConfig(synthetic_pairs=100))
    noisy = plant_label_noise(clean, 0.3, seed=1)
    some = set(sorted(noisy.flipped_ids)[:10])
    back = restore_labels(noisy, some)
    assert back.flipped_ids == noisy.flipped_ids - some
    by_id = {p.id: p for p in clean.pairs}
    for p in back.pairs:
        if p.id in some:
            assert (p.chosen, p.rejected) == (by_id[p.id].chosen, by_id[p.id].rejected)


def test_clean_eval_keeps_the_noise_in_the_training_split_only(tmp_path):
    cfg = ExperimentConfig(
        output=str(tmp_path / "run"),
        data={"synthetic_pairs": 120, "label_noise": 0.4, "noise": "prefer_longer"},
        model={"model": "tiny:gpt_neox"},
        split=[0.5, 0.2, 0.3],
        max_length=256,
        seeds=[0],
        fractions=[0.1],
        methods=["random"],
        helpful_methods=[],
        clean_eval=True,
        progress=False,
    )
    cfg.validate()
    plan = _prepare(cfg)
    assert plan.flipped_train and not (plan.dataset.flipped_ids & (set(plan.val.ids) | set(plan.test.ids)))
    assert plan.clean_ids is None  # no noisy test pair left to set apart
    noisy = load_data(cfg.data, plant_noise=True)
    assert set(plan.flipped_train) == noisy.flipped_ids & set(plan.train.ids)
    assert [p.id for p in plan.train.pairs] == [i for i in noisy.ids if i in set(plan.train.ids)]
