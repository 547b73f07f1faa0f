"""Intervals, paired comparisons and the verdict rule: what lets a reader tell methods apart.

The unit of resampling is the *fact*: queries of one fact (paraphrases, languages) share its neurons
and are not independent, so a bootstrap over queries would overstate certainty. Every estimate
carries n (facts) and a 95% percentile-bootstrap interval; a MATRICE-vs-X comparison is the paired
per-fact difference, with a two-sided bootstrap p-value. A claim's verdict is read off the
interval of that difference, never written by hand.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

Verdict = Literal["replicates", "contradicts", "inconclusive", "no data", "not judged"]
Direction = Literal["greater", "less"]


@dataclass(frozen=True)
class Estimate:
    """Mean of per-fact values with its 95% bootstrap interval; p is set for paired differences
    (two-sided test of a zero mean difference)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    p: float | None = None

    def format(self, digits: int = 3) -> str:
        """`-0.412 [-0.520, -0.301] (n=8)`; `– (n=0)` without data."""
        if self.mean is None:
            return f"– (n={self.n})"
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def _clean(values: Sequence[float | None]) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] unit indices drawn with replacement: the fact resamples every interval here uses
    (a statistic of several per-fact arrays resamples them with the same rows, keeping pairs)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    return values[resample_indices(len(values), n_boot, seed)].mean(axis=1)


def bootstrap_mean(values: Sequence[float | None], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean and percentile-bootstrap interval of `values` (one per fact; None/NaN are left out).
    One value: the mean without an interval. No values: no estimate."""
    arr = _clean(values)
    if len(arr) == 0:
        return Estimate(None, None, None, 0)
    if len(arr) == 1:
        return Estimate(float(arr[0]), None, None, 1)
    means = _bootstrap_means(arr, n_boot, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(arr.mean()), float(low), float(high), len(arr))


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> Estimate:
    """Mean of a_i − b_i over the units where both are defined, its bootstrap interval and a
    two-sided bootstrap p-value for "mean difference = 0" (resampling the centred differences)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    est = bootstrap_mean(diffs, n_boot, seed, level)
    arr = _clean(diffs)
    if len(arr) < 2:
        return est
    centred = _bootstrap_means(arr - arr.mean(), n_boot, seed + 1)
    p = float((np.sum(np.abs(centred) >= abs(arr.mean())) + 1) / (n_boot + 1))
    return Estimate(est.mean, est.low, est.high, est.n, p)


def verdict(difference: Estimate, direction: Direction, alpha: float = 0.05) -> Verdict:
    """The paper claims the difference is `direction` than 0. Its interval entirely on that side (and,
    where the estimate has a p-value, p < alpha): replicates; entirely on the other side (p < alpha):
    contradicts; otherwise (or with fewer than 2 facts, so no interval): inconclusive. Requiring both
    is deliberate: with a handful of facts a percentile interval can exclude 0 on one lucky fact."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    if difference.n == 0 or difference.mean is None:
        return "no data"
    if difference.low is None or difference.high is None:
        return "inconclusive"
    if difference.p is not None and difference.p >= alpha:
        return "inconclusive"
    sign = 1 if direction == "greater" else -1
    low, high = sorted((sign * difference.low, sign * difference.high))
    if low > 0:
        return "replicates"
    if high < 0:
        return "contradicts"
    return "inconclusive"


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
