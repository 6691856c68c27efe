"""The two-level bootstrap: coverage on synthetic outcomes, pairing, determinism, and each verdict."""

import numpy as np
import pytest

from topkconv.reproduce import stats


def _synthetic(rng, accuracy, seed_spread, seeds=3, n=360):
    """Per-seed 0/1 outcomes: each seed's own accuracy drawn around ``accuracy``, then its examples."""
    per_seed = np.clip(rng.normal(accuracy, seed_spread, seeds), 0, 1)
    return [(rng.random(n) < p).astype(np.int8) for p in per_seed]


@pytest.mark.parametrize("accuracy, seed_spread, n", [(0.5, 0.03, 360), (0.95, 0.02, 200), (0.3, 0.05, 200)])
def test_interval_covers_the_true_accuracy_in_90_to_99_percent_of_trials(accuracy, seed_spread, n):
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        estimate = stats.bootstrap(_synthetic(rng, accuracy, seed_spread, n=n), resamples=1000, seed=trial)
        covered += estimate.lo <= accuracy <= estimate.hi
    assert 0.90 * 200 <= covered <= 0.99 * 200, covered


def test_bootstrap_is_seeded_and_reports_the_per_seed_means():
    outcomes = [np.array([1, 0, 1, 1] * 25), np.array([0, 0, 1, 1] * 25), np.array([1, 1, 1, 1] * 25)]
    first, again = stats.bootstrap(outcomes), stats.bootstrap(outcomes)
    assert first == again
    assert first.per_seed == (0.75, 0.5, 1.0) and first.mean == pytest.approx(0.75)
    assert 0 <= first.lo <= first.mean <= first.hi <= 1 and first.resamples >= 1000
    assert stats.bootstrap(outcomes, seed=1) != first


def test_more_seeds_and_examples_narrow_the_interval():
    rng = np.random.default_rng(0)
    small = stats.bootstrap(_synthetic(rng, 0.6, 0.02, seeds=3, n=100))
    large = stats.bootstrap(_synthetic(rng, 0.6, 0.02, seeds=10, n=2000))
    assert large.hi - large.lo < (small.hi - small.lo) / 2


def test_paired_difference_cancels_what_the_columns_share():
    """B = A with 10 of 300 examples flipped to wrong: the paired interval is tight around +10/300, while
    the two unpaired intervals overlap widely."""
    rng = np.random.default_rng(3)
    a = [(rng.random(300) < p).astype(np.int8) for p in (0.4, 0.6, 0.5)]
    b = []
    for seed in a:
        flipped = seed.copy()
        flipped[np.flatnonzero(seed)[:10]] = 0
        b.append(flipped)
    difference = stats.paired_difference(a, b)
    assert difference.mean == pytest.approx(10 / 300)
    assert 0 < difference.lo and difference.hi < 0.06
    unpaired_a, unpaired_b = stats.bootstrap(a), stats.bootstrap(b)
    assert unpaired_b.hi > unpaired_a.lo  # unpaired, the two overlap


def test_paired_difference_needs_the_same_seeds_and_examples():
    with pytest.raises(ValueError, match="seeds"):
        stats.paired_difference([np.ones(4)], [np.ones(4), np.ones(4)])
    with pytest.raises(ValueError, match="examples"):
        stats.paired_difference([np.ones(4)], [np.ones(5)])


def _interval(lo, hi):
    return stats.Estimate((lo + hi) / 2, lo, hi, (), 100)


@pytest.mark.parametrize("interval, direction, margin, expected", [
    ((0.05, 0.20), "greater", None, stats.REPRODUCED),        # clearly better
    ((-0.20, -0.05), "greater", None, stats.CONTRADICTED),    # clearly worse
    ((-0.05, 0.10), "greater", None, stats.INCONCLUSIVE),     # overlapping 0
    ((-0.20, -0.05), "less", None, stats.REPRODUCED),
    ((0.05, 0.20), "less", None, stats.CONTRADICTED),
    ((-0.015, 0.012), "equivalent", 0.02, stats.REPRODUCED),  # inside the margin
    ((0.03, 0.08), "equivalent", 0.02, stats.CONTRADICTED),   # wholly beyond it
    ((-0.09, -0.03), "equivalent", 0.02, stats.CONTRADICTED),
    ((-0.01, 0.05), "equivalent", 0.02, stats.INCONCLUSIVE),  # straddles the margin
    ((-0.015, 0.05), "not_less", 0.02, stats.REPRODUCED),
    ((-0.08, -0.03), "not_less", 0.02, stats.CONTRADICTED),
    ((-0.05, 0.01), "not_less", 0.02, stats.INCONCLUSIVE),
])
def test_verdicts_on_constructed_intervals(interval, direction, margin, expected):
    assert stats.verdict(_interval(*interval), direction, margin).verdict == expected


def test_verdicts_from_outcomes_clearly_better_worse_and_equal():
    rng = np.random.default_rng(5)
    good = [(rng.random(400) < 0.8).astype(np.int8) for _ in range(3)]
    bad = [(rng.random(400) < 0.4).astype(np.int8) for _ in range(3)]
    assert stats.verdict(stats.paired_difference(good, bad), "greater").verdict == stats.REPRODUCED
    assert stats.verdict(stats.paired_difference(bad, good), "greater").verdict == stats.CONTRADICTED
    assert stats.verdict(stats.paired_difference(good, good), "equivalent", 0.02).verdict == stats.REPRODUCED


def test_verdict_rejects_a_bad_direction_or_margin():
    with pytest.raises(ValueError, match="direction"):
        stats.verdict(_interval(0, 1), "bigger")
    with pytest.raises(ValueError, match="margin"):
        stats.verdict(_interval(0, 1), "equivalent")
