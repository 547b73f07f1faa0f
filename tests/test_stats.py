"""Bootstrap intervals, paired differences and the verdict rule."""

from __future__ import annotations

import numpy as np
import pytest

from matrice.stats import Estimate, bootstrap_mean, paired_difference, verdict


def test_bootstrap_interval_covers_the_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_mean, covered, runs = 1.0, 0, 300
    for run in range(runs):
        est = bootstrap_mean(rng.normal(true_mean, 2.0, size=30), n_boot=2000, seed=run)
        covered += est.low <= true_mean <= est.high
        assert est.low < est.mean < est.high and est.n == 30
    assert 0.89 <= covered / runs <= 0.98


def test_bootstrap_interval_narrows_with_more_facts_and_is_deterministic():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=10), rng.normal(size=1000)
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(bootstrap_mean(large)) < width(bootstrap_mean(small)) / 5
    assert bootstrap_mean(small, seed=3) == bootstrap_mean(small, seed=3)


def test_missing_values_are_left_out_and_tiny_samples_have_no_interval():
    assert bootstrap_mean([None, float("nan"), 2.0, 4.0]).n == 2
    assert bootstrap_mean([]) == Estimate(None, None, None, 0)
    assert bootstrap_mean([0.5]) == Estimate(0.5, None, None, 1)
    assert bootstrap_mean([]).format() == "– (n=0)"
    assert bootstrap_mean([0.5]).format() == "0.500 (n=1)"
    assert bootstrap_mean([1.0, 3.0]).format().startswith("2.000 [")


def test_paired_difference_detects_a_shift_and_not_its_absence():
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    shifted = paired_difference(base + 0.5 + rng.normal(0, 0.1, size=40), base)
    assert shifted.p < 0.001 and 0.4 < shifted.mean < 0.6 and shifted.low > 0
    null = paired_difference(base + rng.normal(0, 0.1, size=40), base)
    assert null.p > 0.05 and null.low < 0 < null.high
    # pairs with a missing side are dropped, not misaligned
    assert paired_difference([1.0, None, 3.0], [0.0, 5.0, 1.0]).n == 2
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_verdict_reads_the_interval_against_the_claimed_direction():
    above = Estimate(0.3, 0.1, 0.5, 8)
    below = Estimate(-0.3, -0.5, -0.1, 8)
    across = Estimate(0.1, -0.2, 0.4, 8)
    assert verdict(above, "greater") == "replicates" and verdict(above, "less") == "contradicts"
    assert verdict(below, "less") == "replicates" and verdict(below, "greater") == "contradicts"
    assert verdict(across, "greater") == "inconclusive" == verdict(across, "less")
    assert verdict(Estimate(0.3, None, None, 1), "greater") == "inconclusive"
    assert verdict(Estimate(None, None, None, 0), "greater") == "no data"
    assert verdict(Estimate(0.0, 0.0, 0.0, 8), "greater") == "inconclusive"  # touching 0 is not a win
    assert verdict(Estimate(0.3, 0.1, 0.5, 8, p=0.01), "greater") == "replicates"
    assert verdict(Estimate(0.3, 0.1, 0.5, 8, p=0.10), "greater") == "inconclusive"  # interval alone is not enough
    assert verdict(Estimate(-0.3, -0.5, -0.1, 8, p=0.10), "greater") == "inconclusive"
    with pytest.raises(ValueError, match="direction"):
        verdict(above, "bigger")
