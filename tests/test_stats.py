"""Bootstrap intervals, paired differences and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matrice.evaluation.stats import (RATE, Estimate, bootstrap_mean, clustered_difference, holm, power,
                                     relation_mean, sign_flip_estimate, sign_flip_interval, sign_flip_p, verdict)


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


def test_a_rate_at_its_bound_gets_clopper_pearsons_interval_not_a_point():
    """Every fact at rate 1 (or 0): the bootstrap's resamples are all that one value, so its interval
    is a point; a rate's interval is then Clopper-Pearson's for n successes in n (scipy's, exactly)."""
    from scipy.stats import binomtest

    for n in (2, 5, 8, 30):
        ci = binomtest(n, n).proportion_ci(0.95, method="exact")
        assert bootstrap_mean([1.0] * n) == Estimate(1.0, 1.0, 1.0, n)  # what the percentile bootstrap gives
        est = bootstrap_mean([1.0] * n, bounds=RATE)
        assert (est.mean, est.high, est.n) == (1.0, 1.0, n) and est.low == pytest.approx(ci.low, rel=1e-9)
        zero = bootstrap_mean([0.0] * n, bounds=RATE)
        assert (zero.low, zero.mean) == (0.0, 0.0) and zero.high == pytest.approx(1 - ci.low, rel=1e-9)
    mixed = [1.0, 1.0, 0.5, 1.0, 0.0, 1.0]  # not all at a bound: the bootstrap's own interval
    assert bootstrap_mean(mixed, bounds=RATE) == bootstrap_mean(mixed)
    assert bootstrap_mean([1.0], bounds=RATE) == Estimate(1.0, None, None, 1)


def test_rate_intervals_cover_a_rate_near_one_where_the_bootstrap_alone_does_not():
    """Facts that each know the answer with chance 0.95: most samples of 8 are all 1, where the
    percentile bootstrap's point interval misses 0.95; with the bound the intervals cover it."""
    rng = np.random.default_rng(5)
    p, runs = 0.95, 300
    samples = [rng.binomial(1, p, size=8).astype(float) for _ in range(runs)]
    plain = sum(e.low <= p <= e.high for e in (bootstrap_mean(x, n_boot=500, seed=i) for i, x in enumerate(samples)))
    bounded = sum(e.low <= p <= e.high for e in (bootstrap_mean(x, n_boot=500, seed=i, bounds=RATE)
                                                 for i, x in enumerate(samples)))
    assert plain / runs < 0.5 and bounded / runs >= 0.9


def test_relation_rates_at_their_bound_use_the_relations_as_units():
    of = lambda f: f.split("-")[0]  # noqa: E731
    per_fact = {"P1-a": 1.0, "P1-b": 1.0, "P2-a": 1.0, "P3-a": 1.0}
    est = relation_mean(per_fact, of, bounds=RATE)
    assert (est.mean, est.high, est.n) == (1.0, 1.0, 3) and est.low == pytest.approx(0.025 ** (1 / 3))
    assert relation_mean(per_fact, of).low == 1.0  # the two-stage bootstrap alone: a point
    one = relation_mean({"P1-a": 0.0, "P1-b": 0.0}, of, bounds=RATE)  # one relation: its facts are the units
    assert (one.low, one.n) == (0.0, 1) and one.high == pytest.approx(1 - 0.025 ** (1 / 2))
    mixed = {"P1-a": 1.0, "P1-b": 0.0, "P2-a": 1.0}
    assert relation_mean(mixed, of, bounds=RATE) == relation_mean(mixed, of)


def test_missing_values_are_left_out_and_tiny_samples_have_no_interval():
    assert bootstrap_mean([None, float("nan"), 2.0, 4.0]).n == 2
    assert bootstrap_mean([]) == Estimate(None, None, None, 0)
    assert bootstrap_mean([0.5]) == Estimate(0.5, None, None, 1)
    assert bootstrap_mean([]).format() == "– (n=0)"
    assert bootstrap_mean([0.5]).format() == "0.500 (n=1)"
    assert bootstrap_mean([1.0, 3.0]).format().startswith("2.000 [")


def test_relation_level_estimates_detect_a_shift_and_not_its_absence():
    rng = np.random.default_rng(2)
    base = {f"R{i}-a": float(x) for i, x in enumerate(rng.normal(size=12))}
    shifted = clustered_difference({f: v + 0.5 + rng.normal(0, 0.1) for f, v in base.items()}, base, lambda f: f.split("-")[0])
    assert shifted.relation.p < 0.001 and 0.4 < shifted.relation.mean < 0.6 and shifted.relation.low > 0
    null = clustered_difference({f: v + rng.normal(0, 0.1) for f, v in base.items()}, base, lambda f: f.split("-")[0])
    assert null.relation.p > 0.05 and null.relation.low < 0 < null.relation.high
    # pairs with a missing side are dropped, not misaligned
    assert clustered_difference({"A-1": 1.0, "B-1": None, "C-1": 3.0}, {"A-1": 0.0, "B-1": 5.0, "C-1": 1.0},
                                lambda f: f.split("-")[0]).fact.n == 2


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


# ---- the verdict's test: exact sign flips over relation clusters -----------------------------------

@pytest.mark.parametrize("diffs, expected", [
    ([1.0, 2.0, 3.0], 2 / 8),                      # n = 3: only all-+ and all-− reach |sum| = 6
    ([1.0, -2.0, 3.0, 4.0, 5.0], 6 / 32),          # n = 5: flipped magnitude ≤ 2 or ≥ 13
    ([float(i) for i in range(1, 9)], 2 / 256),    # n = 8, one sign: the floor 1/2^7
    ([1.0] * 7 + [-1.0], 18 / 256),                # n = 8: ≤ 1 or ≥ 7 negatives among eight ±1
])
def test_sign_flip_p_is_exact_on_hand_made_cases(diffs, expected):
    assert sign_flip_p(diffs) == pytest.approx(expected, abs=1e-12)


def test_sign_flip_p_never_goes_below_its_floor_and_is_one_for_no_difference():
    rng = np.random.default_rng(3)
    for n in range(1, 11):
        assert sign_flip_p(rng.uniform(0.1, 1.0, size=n)) == pytest.approx(1 / 2 ** (n - 1))
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([]) is None
    big = rng.normal(1.5, 1.0, size=25)  # beyond 2^20 patterns: seeded Monte Carlo
    assert sign_flip_p(big, seed=1) == sign_flip_p(big, seed=1) < 0.05


def test_the_interval_is_the_inverted_test():
    rng = np.random.default_rng(4)
    for _ in range(20):
        d = rng.normal(0.3, 0.5, size=9)
        est = sign_flip_estimate(d)
        assert est.low < est.mean < est.high
        assert (est.p < 0.05) == (not est.low <= 0.0 <= est.high)  # excludes 0 exactly when p < 0.05
    assert sign_flip_interval([0.5, 0.7, 0.9, 1.1, 1.3]) == (-math.inf, math.inf)  # n = 5: no p below 0.0625


def test_monte_carlo_sign_flips_agree_with_every_pattern(monkeypatch):
    """Beyond 2^20 patterns (21+ relations, as the 24-relation default has) p and the interval come from
    99,999 seeded sign patterns, the same ones for both; at n = 21, where every pattern can still be
    enumerated, they agree with the exact ones to Monte Carlo error, and the interval excludes 0
    exactly when p < 0.05."""
    import matrice.evaluation.stats as stats

    rng = np.random.default_rng(5)
    for shift in (0.0, 0.25, 0.6):
        d = rng.normal(shift, 0.8, size=21)
        sampled = sign_flip_estimate(d, seed=2)
        monkeypatch.setattr(stats, "SIGN_FLIP_EXACT_UP_TO", 21)
        exact = sign_flip_estimate(d, seed=2)
        monkeypatch.undo()
        assert sampled.p == pytest.approx(exact.p, abs=0.005)  # Monte Carlo s.e. at most 0.0016
        spread = float(d.max() - d.min())
        assert sampled.low == pytest.approx(exact.low, abs=0.02 * spread)
        assert sampled.high == pytest.approx(exact.high, abs=0.02 * spread)
        for est in (sampled, exact):
            assert (est.p < 0.05) == (not est.low <= 0.0 <= est.high)


def test_monte_carlo_interval_ends_where_p_crosses_alpha():
    """At 24 relations (Monte Carlo) the interval's ends are the shifts where p crosses 0.05 exactly:
    p and the interval use the same seeded patterns, so p at an end is not 0.05 ± Monte Carlo error
    (p of d − μ equals the interval's p at μ: the patterns depend on n and the seed only). A p of
    exactly 0.05, which Monte Carlo can give (5,000 of 100,000), is not rejected: 1 − 0.95 in floats
    is above 0.05."""
    rng = np.random.default_rng(11)
    for shift in (0.0, 0.2):
        d = rng.normal(shift, 0.6, size=24)
        est = sign_flip_estimate(d, seed=3)
        eps = 1e-9 * float(d.max() - d.min())
        # ±eps: exactly at an end a pattern ties the observed sum to within the 1e-12 rounding allowance
        assert sign_flip_p(d - (est.low + eps), seed=3) >= 0.05 > sign_flip_p(d - (est.low - eps), seed=3)
        assert sign_flip_p(d - (est.high - eps), seed=3) >= 0.05 > sign_flip_p(d - (est.high + eps), seed=3)


def test_sign_flip_p_is_scipys_exact_permutation_test():
    """The reference: scipy's paired permutation test, every sign pattern, two-sided."""
    from scipy.stats import permutation_test

    rng = np.random.default_rng(6)
    for n in range(2, 13):
        d = rng.normal(0.4, 1.0, size=n)
        d[0] = -d[1] if n > 3 else d[0]  # a sum that an other pattern ties
        ref = permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=np.inf, alternative="two-sided").pvalue
        assert sign_flip_p(d) == pytest.approx(min(1.0, ref), abs=1e-12)


def _clustered(rng, rho: float, n_relations: int = 8, per_relation: int = 2, mean: float = 0.3) -> np.ndarray:
    shared = rng.normal(0.0, math.sqrt(rho), size=(n_relations, 1))
    return mean + shared + rng.normal(0.0, math.sqrt(1 - rho), size=(n_relations, per_relation))


def test_relation_level_interval_covers_clustered_data_and_the_fact_level_one_does_not():
    """8 relations × 2 facts, facts of a relation correlated (ρ = 0.8), true mean 0.3. The sign-flip
    test over relation means is exact (coverage 1 − 12/256 = 95.3% at n = 8): measured 94.5% over
    2,000 runs. Over the 16 facts as if independent it is not: measured 82% over 200 runs."""
    rng = np.random.default_rng(5)
    data = [_clustered(rng, 0.8) for _ in range(2000)]
    relation = np.mean([lo <= 0.3 <= hi for lo, hi in (sign_flip_interval(d.mean(axis=1)) for d in data)])
    fact = np.mean([lo <= 0.3 <= hi for lo, hi in (sign_flip_interval(d.ravel()) for d in data[:200])])
    assert 0.93 <= relation <= 0.97
    assert fact < 0.91


def test_clustered_difference_averages_each_relation_first():
    a = {"P1-a": 1.0, "P1-b": 3.0, "P2-a": 0.5, "P3-a": None}
    b = {"P1-a": 0.0, "P1-b": 0.0, "P2-a": 0.0, "P3-a": 0.0, "P4-a": 1.0}
    comp = clustered_difference(a, b, lambda f: f.split("-")[0])
    assert comp.relation.n == 2 and comp.relation.mean == pytest.approx((2.0 + 0.5) / 2)
    assert comp.fact.n == 3 and comp.fact.mean == pytest.approx(4.5 / 3)
    assert comp.relation.p == pytest.approx(0.5)  # two relations: p cannot go below 1/2


def test_holm_adjusts_step_down_and_keeps_missing_rows_out():
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06], nan_ok=True)
    assert holm([0.5]) == [0.5]
    assert holm([0.2, 0.9, 0.6]) == pytest.approx([0.6, 1.0, 1.0])  # 3·0.2; 2·0.6 capped; monotone


def test_five_verdicts_on_constructed_rows():
    tight_null = Estimate(0.004, -0.02, 0.03, 8, p=0.7)
    assert verdict(tight_null, "greater", margin=0.05) == "equivalent"
    assert verdict(tight_null, "greater", margin=0.02) == "inconclusive"  # the interval leaves ±margin
    assert verdict(tight_null, "greater") == "inconclusive"  # no margin declared: never equivalent
    above = Estimate(0.3, 0.1, 0.5, 8, p=0.01)
    assert verdict(above, "greater", untestable="AMIG selected nothing for 16 of 16 facts") == "not testable"
    assert verdict(above, "greater", p=0.08) == "inconclusive"  # the Holm-adjusted p decides
    assert verdict(above, "less", p=0.01) == "contradicts"


def test_power_names_the_relations_an_effect_needs():
    small = power([0.1, 0.2, -0.05, 0.3, 0.15, 0.1, 0.2, 0.0], alpha=0.05 / 8, facts_per_relation=2)
    assert small.floor == 9  # 1/2^7 = 0.0078 > 0.05/8: eight relations cannot pass Holm over eight rows
    assert small.relations_needed >= small.floor and small.facts_needed == 2 * small.relations_needed
    assert small.minimum_detectable > 0
    assert power([0.1], alpha=0.05, facts_per_relation=2).effect_size is None


def test_relation_mean_weighs_relations_equally_and_resamples_them():
    from matrice.evaluation.stats import relation_mean

    per_fact = {"A-1": 1.0, "A-2": 1.0, "A-3": 1.0, "B-1": 0.0}
    est = relation_mean(per_fact, lambda f: f.split("-")[0])
    assert est.mean == 0.5 and est.n == 2  # not 0.75: relation A's three facts count once
    assert est.low <= 0.0 and est.high >= 1.0  # two relations: the resamples reach both
    one = relation_mean({"A-1": 0.2, "A-2": 0.4}, lambda f: "A")
    assert one.n == 1 and one.low >= 0.2 and one.high <= 0.4
    assert relation_mean({}, lambda f: f).n == 0 and relation_mean({"A-1": None}, lambda f: f).n == 0


def test_every_swap_p_is_scipys_exact_paired_permutation_p():
    """The exact paired permutation p of an F1 difference (every one of the 2^n swaps of units' count
    rows, enumerated here from one matrix product) equals scipy's `permutation_test` to the bit, with
    units whose F1 is undefined, tied statistics and identical detectors among the cases."""
    from scipy.stats import permutation_test

    from matrice.evaluation.stats import _every_swap_p, prf

    def f1(c: np.ndarray) -> np.ndarray:
        return prf(c)[..., 2]

    def difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return f1(np.sum(x, axis=axis)) - f1(np.sum(y, axis=axis))

    rng = np.random.default_rng(8)
    cases = [rng.integers(0, 6, size=(n, 3)).astype(float) for n in (2, 3, 7, 12)]
    cases.append(np.zeros((4, 3)))  # F1 undefined everywhere
    seen = set()
    for a in cases:
        for b in (rng.integers(0, 6, size=a.shape).astype(float), a.copy(), a + np.array([2.0, 0.0, 0.0])):
            want = permutation_test((a, b), difference, permutation_type="samples", vectorized=True, axis=0,
                                    n_resamples=np.inf, alternative="two-sided").pvalue
            got = _every_swap_p(a, b, f1)
            assert got == float(want)
            seen.add(round(got, 6))
    assert len(seen) >= 4  # the cases reach different p-values, small ones included
    assert min(seen) < 0.2


def test_paired_ratio_difference_uses_the_exact_test_up_to_its_limit(monkeypatch):
    """Up to SIGN_FLIP_EXACT_UP_TO units the p is the exact one; beyond, scipy's Monte Carlo estimate
    of it (seeded; 2^18 swaps, more than its 99,999 draws), within its error."""
    import matrice.evaluation.stats as stats

    def f1(c: np.ndarray) -> np.ndarray:
        return stats.prf(c)[..., 2]

    rng = np.random.default_rng(18)
    a = rng.integers(0, 9, size=(18, 3)).astype(float)
    b = np.maximum(a + rng.integers(-1, 2, size=(18, 3)) * np.array([0.0, 1.0, 1.0]), 0)  # fp and fn moved by ±1
    exact = stats.paired_ratio_difference(a, b, f1, seed=1)
    assert exact.p == stats._every_swap_p(a, b, f1) and 0.01 < exact.p < 0.2
    monkeypatch.setattr(stats, "SIGN_FLIP_EXACT_UP_TO", 17)
    sampled = stats.paired_ratio_difference(a, b, f1, seed=1)
    assert sampled.p == pytest.approx(exact.p, abs=0.005) and sampled.p != exact.p
    assert (sampled.mean, sampled.low, sampled.high) == (exact.mean, exact.low, exact.high)
