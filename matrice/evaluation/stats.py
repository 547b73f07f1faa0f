"""Intervals, paired comparisons and the verdict rule: what lets a reader tell methods apart.

The verdict's unit is the *relation*: facts of one relation share their neurons (specificity is
relation-level, some share their object), so they are not independent; each relation's per-fact
differences are averaged first and the relation means are the units of a paired sign-flip
permutation test (`sign_flip_p`: exact, every sign pattern, up to 20 units; beyond that Monte Carlo,
the observed pattern and 99,999 seeded ones; checked against scipy.stats.permutation_test). Its 95% interval is the test inverted
(`sign_flip_interval`: the shifts it does not reject, over the same patterns), so "the interval
excludes 0" and "p < 0.05" say the same thing at any n. The fact-level
estimate is shown beside it. A verdict is one of five, read off that estimate (`verdict`), never
written by hand; Holm adjusts the declared primary family (`holm`); `power` says what this n can see.
The experiments' descriptive tables use the same unit (`relation_mean`: a two-stage bootstrap over
relations and their facts); `bootstrap_mean` (over facts) serves the analyses without relations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

Verdict = Literal["replicates", "contradicts", "equivalent", "inconclusive", "not testable", "no data", "not judged"]
SIGN_FLIP_EXACT_UP_TO = 20  # units: every sign pattern (2^20 ≈ 1e6) up to this n, Monte Carlo beyond
SIGN_FLIP_MONTE_CARLO = 99_999
Direction = Literal["greater", "less"]


@dataclass(frozen=True)
class Estimate:
    """Mean of per-unit values with its 95% interval (a bootstrap's, the sign-flip test's inverted, or
    at a rate's bound :func:`boundary_interval`'s); p is set for paired differences (two-sided test
    of a zero mean difference)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    p: float | None = None

    def format(self, digits: int = 3) -> str:
        """`-0.412 [-0.520, -0.301] (n=8)`; `– (n=0)` without data; an unbounded side reads ∞."""
        if self.mean is None:
            return f"– (n={self.n})"
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f} (n={self.n})"

        def bound(x: float) -> str:
            return f"{x:.{digits}f}" if math.isfinite(x) else ("−∞" if x < 0 else "∞")

        return f"{self.mean:.{digits}f} [{bound(self.low)}, {bound(self.high)}] (n={self.n})"


def _clean(values: Sequence[float | None]) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] unit indices drawn with replacement: the fact resamples every interval here uses
    (a statistic of several per-fact arrays resamples them with the same rows, keeping pairs)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    return values[resample_indices(len(values), n_boot, seed)].mean(axis=1)


RATE = (0.0, 1.0)  # the bounds of a rate or share: ``bounds=RATE``


def boundary_interval(values: np.ndarray, bounds: tuple[float, float] | None, n: int, level: float = 0.95
                      ) -> tuple[float, float] | None:
    """The interval of a mean whose every value sits at one end of ``bounds`` (a rate of 0 or 1 for
    every unit), where a percentile bootstrap collapses to that point. For units in [lo, hi] the
    chance that all n sit at hi is at most ((μ − lo)/(hi − lo))^n (Markov, unit by unit), so the means
    that leave it above (1 − level)/2 are μ ≥ lo + (hi − lo)·((1 − level)/2)^(1/n): Clopper-Pearson's
    bound for n successes in n, exact for 0/1 units and conservative otherwise (and the mirror image
    at lo). None when the values are not all at one bound."""
    if bounds is None or n < 1 or len(values) == 0:
        return None
    lo, hi = bounds
    reach = (hi - lo) * ((1 - level) / 2) ** (1 / n)
    if np.all(values == hi):
        return lo + reach, hi
    if np.all(values == lo):
        return lo, hi - reach
    return None


def bootstrap_mean(values: Sequence[float | None], n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                   bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean and percentile-bootstrap interval of `values` (one per fact; None/NaN are left out).
    One value: the mean without an interval. No values: no estimate. ``bounds`` (a rate: `RATE`):
    where every value sits at one bound the interval is :func:`boundary_interval`'s, not a point."""
    arr = _clean(values)
    if len(arr) == 0:
        return Estimate(None, None, None, 0)
    if len(arr) == 1:
        return Estimate(float(arr[0]), None, None, 1)
    exact = boundary_interval(arr, bounds, len(arr), level)
    if exact is not None:
        return Estimate(float(arr.mean()), *exact, len(arr))
    return Estimate(float(arr.mean()), *percentile_interval(_bootstrap_means(arr, n_boot, seed), level), len(arr))


def percentile_interval(draws: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of resampled statistics (the percentile bootstrap's)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def by_relation(per_fact: Mapping[str, float | None], relation_of: Callable[[str], str]) -> dict[str, list[float]]:
    """The finite per-fact values grouped by relation, relations and facts in sorted order."""
    groups: dict[str, list[float]] = defaultdict(list)
    for fact in sorted(per_fact):
        value = per_fact[fact]
        if value is not None and np.isfinite(value):
            groups[relation_of(fact)].append(float(value))
    return dict(sorted(groups.items()))


def relation_mean(per_fact: Mapping[str, float | None], relation_of: Callable[[str], str], n_boot: int = 2_000,
                  seed: int = 0, level: float = 0.95, bounds: tuple[float, float] | None = None) -> Estimate:
    """The descriptive twin of the verdicts' unit: each relation's mean over its facts, then the mean
    over relations, with a 95% percentile interval from a two-stage bootstrap (relations resampled,
    and the facts of each relation, once per replicate). n counts relations; a single relation's
    interval is its facts' bootstrap. ``bounds`` (a rate: `RATE`): where every fact sits at one
    bound the interval is :func:`boundary_interval`'s over the relations (its facts for one relation),
    not a point."""
    groups = by_relation(per_fact, relation_of)
    if not groups:
        return Estimate(None, None, None, 0)
    arrays = [np.array(v) for v in groups.values()]
    point = float(np.mean([a.mean() for a in arrays]))
    if len(arrays) == 1 and len(arrays[0]) == 1:
        return Estimate(point, None, None, 1)
    units = len(arrays) if len(arrays) > 1 else len(arrays[0])
    exact = boundary_interval(np.concatenate(arrays), bounds, units, level)
    if exact is not None:
        return Estimate(point, *exact, len(arrays))
    rng = np.random.default_rng(seed)
    within = np.stack([a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1) for a in arrays], axis=1)
    drawn = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
    means = np.take_along_axis(within, drawn, axis=1).mean(axis=1)
    return Estimate(point, *percentile_interval(means, level), len(arrays))


def sign_flip_p(diffs: Sequence[float | None], seed: int = 0) -> float | None:
    """Two-sided p of the paired sign-flip permutation test of "mean difference = 0" (the differences
    are symmetric about 0 under the null): the share of sign patterns whose |sum| reaches the observed
    one. Every pattern up to 2^20 (exact, so valid at any n: with n units it is never below
    2/2^n = 1/2^(n−1), 0.5 at n = 2), beyond that the observed pattern and 99,999 seeded ones, the
    same patterns :func:`sign_flip_interval` inverts, so the interval excludes 0 exactly when p < 0.05
    at either size."""
    d = _clean(diffs)
    if len(d) == 0:
        return None
    if len(d) == 1:  # two patterns, ±d, both as far from 0 as the observed one
        return 1.0
    return _SignFlips(d, seed).p(0.0)


def _all_sign_patterns(n: int) -> np.ndarray:
    """[2^n, n] of ±1: every sign pattern (row 0 is all +1, the observed one)."""
    bits = (np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n)) & 1
    return (1 - 2 * bits).astype(np.int8)


def _sign_patterns(n: int, seed: int) -> np.ndarray:
    """The patterns a test of n units uses: every one up to SIGN_FLIP_EXACT_UP_TO units (whatever the
    seed), else the observed one and SIGN_FLIP_MONTE_CARLO seeded ones."""
    return _sign_matrix(n, None if n <= SIGN_FLIP_EXACT_UP_TO else seed)


@lru_cache(maxsize=8)
def _sign_matrix(n: int, seed: int | None) -> np.ndarray:
    """[patterns, n] of ±1 in float64, kept (a report tests hundreds of claims at a few sizes, and
    drawing and converting the patterns again for each took longer than the tests); seed None: every
    pattern."""
    if seed is None:
        signs = _all_sign_patterns(n)
    else:
        drawn = np.random.default_rng(seed).choice(np.array([-1, 1], dtype=np.int8), size=(SIGN_FLIP_MONTE_CARLO, n))
        signs = np.vstack([np.ones((1, n), dtype=np.int8), drawn])  # the observed pattern counts once, as in p
    matrix = signs.astype(np.float64)
    matrix.setflags(write=False)
    return matrix


class _SignFlips:
    """The sign-flip null distribution of one set of differences: p of any shift μ from one matrix product."""

    def __init__(self, d: np.ndarray, seed: int) -> None:
        signs = _sign_patterns(len(d), seed)
        self.n, self.flipped, self.sign_sums, self.total = len(d), signs @ d, signs.sum(axis=1), float(d.sum())

    def p(self, mu: float) -> float:
        """p of "mean difference = μ": patterns of (d − μ) whose |sum| reaches the observed one (ties
        to rounding count as reached)."""
        observed = abs(self.total - self.n * mu)
        return float(np.mean(np.abs(self.flipped - mu * self.sign_sums) >= observed * (1 - 1e-12) - 1e-15))


def sign_flip_interval(diffs: Sequence[float | None], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The shifts μ that the sign-flip test of (d − μ) does not reject at 1 − level: the test inverted,
    so its coverage is the test's (exact for differences symmetric about their mean). Unbounded
    (−inf, inf) when n is too small for any p below 1 − level (n ≤ 5 at 95%)."""
    d = _clean(diffs)
    if len(d) == 0:
        raise ValueError("no differences to build an interval from")
    null = _SignFlips(d, seed)
    # rounded: 1 − 0.95 is 0.05000000000000004 in floats, which would reject a Monte Carlo p of exactly 0.05
    alpha, span = round(1 - level, 12), float(d.max() - d.min()) + 1.0
    if null.p(float(d.min()) - span) >= alpha:  # even all-one-sign differences are not rejected
        return -math.inf, math.inf

    def edge(inside: float, outside: float) -> float:
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if null.p(mid) >= alpha else (inside, mid)
        return inside

    centre = float(d.mean())
    return edge(centre, float(d.min()) - span), edge(centre, float(d.max()) + span)


def sign_flip_estimate(diffs: Sequence[float | None], level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean difference, its sign-flip interval and two-sided p (module docstring)."""
    d = _clean(diffs)
    if len(d) == 0:
        return Estimate(None, None, None, 0)
    low, high = sign_flip_interval(d, level, seed)
    return Estimate(float(d.mean()), low, high, len(d), sign_flip_p(d, seed))


@dataclass(frozen=True)
class Comparison:
    """A paired comparison at two units: relations (each relation's facts averaged first; the unit of
    the test and the verdict) and facts (beside it; it treats a relation's facts as independent)."""

    relation: Estimate
    fact: Estimate
    relation_diffs: tuple[float, ...] = ()  # the relation means the test ran on (power analysis)
    relations: tuple[str, ...] = ()  # whose means they are, in the same order (sensitivity analyses)


def clustered_difference(a: Mapping[str, float | None], b: Mapping[str, float | None],
                         relation_of: Callable[[str], str], level: float = 0.95, seed: int = 0) -> Comparison:
    """a[f] − b[f] over the facts where both are defined, tested over relation means and over facts."""
    diffs = {f: float(a[f]) - float(b[f]) for f in set(a) & set(b) if a[f] is not None and b[f] is not None}
    groups = by_relation(diffs, relation_of)
    relation_means = tuple(float(np.mean(v)) for v in groups.values())
    fact_diffs = [d for v in groups.values() for d in v]
    return Comparison(sign_flip_estimate(relation_means, level, seed), sign_flip_estimate(fact_diffs, level, seed),
                      relation_means, tuple(groups))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error): the i-th smallest of m p-values times (m − i),
    made monotone and capped at 1; None stays None and does not count in m."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, running, out = len(present), 0.0, list(pvalues)
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(difference: Estimate, direction: Direction, alpha: float = 0.05, margin: float | None = None,
            p: float | None = None, untestable: str = "") -> Verdict:
    """The paper claims the difference is `direction` than 0.
    - not testable: `untestable` says why (a side selected or trained nothing, both at one floor/ceiling);
    - replicates / contradicts: the interval entirely on the claimed / the other side and the p-value
      (`p`, e.g. Holm-adjusted, else the estimate's own) below alpha;
    - equivalent: the interval inside ±`margin` (declared before the run; none: never);
    - inconclusive: anything else, including a single unit (no interval)."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    if untestable:
        return "not testable"
    if difference.n == 0 or difference.mean is None:
        return "no data"
    if difference.low is None or difference.high is None:
        return "inconclusive"
    p = difference.p if p is None else p
    sign = 1 if direction == "greater" else -1
    low, high = sorted((sign * difference.low, sign * difference.high))
    if p is None or p < alpha:
        if low > 0:
            return "replicates"
        if high < 0:
            return "contradicts"
    if margin is not None and -margin < difference.low and difference.high < margin:
        return "equivalent"
    return "inconclusive"


@dataclass(frozen=True)
class Power:
    """What a row's n can see (normal approximation for a paired mean at two-sided `alpha`, 80% power):
    the standardised effect (mean / sd of the unit differences), the smallest mean difference this n
    detects, and the relations (and facts, at this run's facts per relation) the observed effect needs;
    `floor`: the fewest relations whose smallest possible sign-flip p (1/2^(n−1)) is below alpha."""

    effect_size: float | None
    minimum_detectable: float | None
    relations_needed: int | None
    facts_needed: int | None
    floor: int


def power(unit_diffs: Sequence[float | None], alpha: float, facts_per_relation: float, target: float = 0.8) -> Power:
    from scipy.stats import norm

    d = _clean(unit_diffs)
    floor = int(math.floor(1 - math.log2(alpha))) + 1  # 1/2^(n−1) < alpha
    if len(d) < 2 or not np.std(d, ddof=1) > 0:
        return Power(None, None, None, None, floor)
    z = norm.ppf(1 - alpha / 2) + norm.ppf(target)
    sd = float(np.std(d, ddof=1))
    effect = float(d.mean()) / sd
    needed = max(floor, math.ceil((z / abs(effect)) ** 2)) if effect else None
    return Power(effect, z * sd / math.sqrt(len(d)), needed,
                 None if needed is None else math.ceil(needed * facts_per_relation), floor)


def cluster_statistic(
    counts: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int = 10_000, seed: int = 0,
    level: float = 0.95, with_p: bool = False,
) -> Estimate:
    """A statistic of summed per-unit counts (F1 from true/false positives...) with a percentile interval
    from resampling the units (facts) with replacement: ``counts`` is [units, k], ``statistic`` maps
    [..., k] summed counts to [...] values (NaN where undefined). A ratio of sums is not a mean of
    per-fact values, so `bootstrap_mean` does not apply. ``with_p``: a two-sided bootstrap p-value for
    "statistic = 0" (twice the smaller share of resamples on either side of 0), for differences."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.shape[0]
    if n == 0:
        return Estimate(None, None, None, 0)
    point = float(statistic(counts.sum(axis=0)))
    if not np.isfinite(point):
        return Estimate(None, None, None, n)
    if n == 1:
        return Estimate(point, None, None, 1)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [n_boot, units]: how often each unit is drawn
    values = np.asarray(statistic(weights @ counts), dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Estimate(point, None, None, n)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    p = float(min(1.0, 2 * min(np.mean(values <= 0), np.mean(values >= 0)))) if with_p else None
    return Estimate(point, float(low), float(high), n, p)


def prf(counts: np.ndarray) -> np.ndarray:
    """[..., 3] summed (tp, fp, fn) -> [..., 3] (precision, recall, F1); NaN where undefined."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([tp / (tp + fp), tp / (tp + fn), 2 * tp / (2 * tp + fp + fn)], axis=-1)


def flag_counts(rows: Iterable[Mapping[str, Any]], detector: str, unit_of: Callable[[Mapping[str, Any]], str]
                ) -> tuple[list[str], np.ndarray]:
    """(units, [units, 3] tp/fp/fn) of a detector flagging false statements (`row["flagged"][detector]`,
    None: no decision; `row["true"]`), summed per unit (a fact, a relation)."""
    per: dict[str, np.ndarray] = {}
    for r in rows:
        pred = r["flagged"][detector]
        if pred is None:
            continue
        per.setdefault(unit_of(r), np.zeros(3))[:] += [pred and not r["true"], pred and r["true"], (not pred) and not r["true"]]
    units = sorted(per)
    return units, np.array([per[u] for u in units]).reshape(len(units), 3)


def paired_ratio_difference(counts_a: np.ndarray, counts_b: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                            seed: int = 0, level: float = 0.95) -> Estimate:
    """statistic(Σ counts_a) − statistic(Σ counts_b) over paired units (relations; rows [units, k]) for a
    ratio of sums such as F1: the interval from resampling units (`cluster_statistic`), the p-value
    from the paired permutation test that swaps a unit's two count rows (scipy; exact up to 2^20
    units), the counterpart of `sign_flip_p` for a statistic that is not a mean of per-unit values."""
    a, b = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    k = a.shape[1]
    est = cluster_statistic(np.concatenate([a, b], axis=1), lambda c: statistic(c[..., :k]) - statistic(c[..., k:]),
                            seed=seed, level=level)
    if est.mean is None or len(a) < 2:
        return replace(est, p=None if est.mean is None else 1.0)
    if len(a) <= SIGN_FLIP_EXACT_UP_TO:
        return replace(est, p=_every_swap_p(a, b, statistic))
    from scipy.stats import permutation_test

    def difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return statistic(np.sum(x, axis=axis)) - statistic(np.sum(y, axis=axis))

    result = permutation_test((a, b), difference, permutation_type="samples", vectorized=True, axis=0,
                              n_resamples=SIGN_FLIP_MONTE_CARLO, alternative="two-sided", rng=np.random.default_rng(seed))
    return replace(est, p=float(min(1.0, result.pvalue)))


def _every_swap_p(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray]) -> float:
    """The exact paired permutation p of statistic(Σa) − statistic(Σb): every one of the 2^n ways to swap
    units' two rows, the sums of each from one matrix product, then scipy's `permutation_test` rule
    (two-sided: twice the smaller tail, at most 1; ties within 100 ε of the observed value count in both).
    scipy enumerates the same 2^n with Python-level batching: ~15 s at n = 20 where this takes under
    a second; integer counts sum exactly in any order, so the p is scipy's to the bit (tested)."""
    swapped = (1.0 - _sign_matrix(len(a), None)) / 2.0  # [2^n, n]: 1 where unit i's rows swap
    kept = 1.0 - swapped
    null = statistic(kept @ a + swapped @ b) - statistic(swapped @ a + kept @ b)
    observed = statistic(a.sum(axis=0)) - statistic(b.sum(axis=0))
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    below, above = np.mean(null <= observed + gamma), np.mean(null >= observed - gamma)
    return float(min(1.0, 2 * min(below, above)))


def per_fact_mean(records: Iterable[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None],
                  keep: Callable[[Mapping[str, Any]], bool] = lambda r: True) -> dict[str, float]:
    """Mean of `value` over each fact's kept records (records whose value is None are left out):
    the per-fact values every interval here resamples."""
    by_fact: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if keep(r):
            v = value(r)
            if v is not None:
                by_fact[r["fact_id"]].append(float(v))
    return {f: float(np.mean(vs)) for f, vs in by_fact.items() if vs}


def pooled_ratio(records: Iterable[Mapping[str, Any]], ok: str, n: str) -> dict[str, float]:
    """Per fact: Σ ok / Σ n over its records (a rate pooled over languages; facts with no sample left out)."""
    pooled: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        pooled[r["fact_id"]][0] += r[ok]
        pooled[r["fact_id"]][1] += r[n]
    return {f: a / b for f, (a, b) in pooled.items() if b}
