"""Bootstrap intervals: exact in degenerate cases, calibrated coverage, correlations equal to scipy's."""

from __future__ import annotations

import numpy as np
import pytest

from prefprune.bootstrap import correlation_interval, paired_delta, pearson, spearman


def test_paired_delta_degenerate_cases_are_exact():
    rng = np.random.default_rng(0)
    a = (rng.uniform(size=(3, 97)) < 0.8).astype(float)
    iv = paired_delta(a, a)
    assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.excludes_zero
    # Arm a ranks exactly one more pair of every 97 correctly in every seed: Δ varies only through the
    # resampled pair, so the interval brackets 1/97 and excludes zero.
    b = a.copy()
    flip = np.flatnonzero(a[0] == 1)[0]
    b[:, flip] = 0.0
    a[:, flip] = 1.0
    iv = paired_delta(a, b, n_boot=500)
    assert iv.value == pytest.approx(1 / 97)
    assert 0 <= iv.low <= iv.value <= iv.high, iv


def test_paired_delta_covers_the_true_difference_and_is_at_most_twice_as_wide_as_needed():
    """Simulated experiments with a known Δ (seed effects + per-pair noise): resampling both seeds and
    pairs counts the pair noise twice (once inside each seed's mean), so the interval is conservative:
    it must cover at least its level, and be no more than twice the width the spread of the estimate
    itself calls for."""
    rng = np.random.default_rng(1)
    true_delta, covered, n_exp = 0.03, 0, 200
    estimates, widths = [], []
    for k in range(n_exp):
        seeds, pairs = 5, 300
        p_base = 0.75 + 0.02 * rng.standard_normal((seeds, 1))  # seed-to-seed spread
        base = (rng.uniform(size=(seeds, pairs)) < p_base).astype(float)
        arm = (rng.uniform(size=(seeds, pairs)) < p_base + true_delta).astype(float)
        iv = paired_delta(arm, base, n_boot=400, seed=k)
        covered += iv.low <= true_delta <= iv.high
        estimates.append(iv.value)
        widths.append(iv.high - iv.low)
    needed = 2 * 1.96 * float(np.std(estimates))
    assert covered >= 0.95 * n_exp, covered
    assert needed <= float(np.mean(widths)) <= 2 * needed, (np.mean(widths), needed)


def test_correlations_match_scipy_and_intervals_bracket_them():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, size=41).astype(float)  # ties
    y = 0.5 * x + rng.standard_normal(41)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    iv = correlation_interval(x, y, n_boot=500)
    assert iv.low <= iv.value <= iv.high and iv.excludes_zero, iv


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="level must be in"):
        paired_delta(np.ones((2, 3)), np.ones((2, 3)), level=1.5)
    with pytest.raises(ValueError, match="n_boot must be at least 100"):
        paired_delta(np.ones((2, 3)), np.ones((2, 3)), n_boot=10)
    with pytest.raises(ValueError, match="same shape"):
        paired_delta(np.ones(3), np.ones(3))
