"""Query localisation: how consistently do a fact's queries localise it to the same neurons?

"Knowledge Localization: Mission Not Accomplished? Enter Query Localization!" finds that many facts
are not *KN-consistent*: their paraphrases attribute them to different neurons, and neuron-level
edits work worse on them. This module measures that here, from the per-query attribution maps the
pipeline already computed, and links it to the experiments.

Per fact (its localisation queries, every language):
- **consistency** = mean pairwise Jaccard overlap of the queries' top-k neuron sets (by raw
  attribution, k = ``top_k``): 1 when every query picks the same k neurons, 0 when no two share one;
  split into pairs within a language (paraphrases) and across languages;
- **CAS agreement** = Jaccard of the top-k by mean normalised attribution and the top-k by the
  consistency-aware score mean − std over queries (each map divided by its sum of |values|): 1 when
  the neurons that dominate on average are also the stable ones.

A fact is *consistent* when its consistency is at least ``threshold`` (default: the median over the
run's facts, so the split compares the more and the less consistent half). Effects per fact come from
the experiments (suppression ΔP/P of MATRICE's neurons on evaluation queries, erasure and update
reliability) and are compared between the groups (difference of means) and against consistency
(Spearman ρ), each with a 95% interval from resampling relations: a relation's facts share neurons
and mostly fall in one group. Descriptive: no verdict rests on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from matrice.evaluation.stats import RATE, Estimate, boundary_interval, per_fact_mean, percentile_interval, pooled_ratio
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, plot_consistency


@dataclass(frozen=True)
class FactConsistency:
    fact_id: str
    n_queries: int
    consistency: float | None  # all pairs
    within_language: float | None
    cross_language: float | None
    cas_agreement: float


def top_k(flat: np.ndarray, k: int) -> frozenset[int]:
    """Indices of the k largest values (ties broken by index, so the set is deterministic)."""
    order = np.lexsort((np.arange(flat.size), -flat))
    return frozenset(order[:k].tolist())


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def fact_consistency(fact_id: str, maps: Mapping[str, np.ndarray], lang_of: Mapping[str, str], k: int
                     ) -> FactConsistency:
    """Consistency of one fact from its per-query maps ``{query id: [L, N]}`` (module docstring)."""
    if k < 1:
        raise ValueError(f"consistency.top_k must be >= 1, got {k}")
    qids = sorted(maps)
    flat = {q: np.asarray(maps[q], dtype=np.float64).ravel() for q in qids}
    tops = {q: top_k(flat[q], k) for q in qids}
    within, cross = [], []
    for a, b in combinations(qids, 2):
        (within if lang_of[a] == lang_of[b] else cross).append(jaccard(tops[a], tops[b]))
    normed = np.stack([f / max(np.abs(f).sum(), 1e-30) for f in flat.values()])
    mean = normed.mean(axis=0)
    cas = mean - normed.std(axis=0)
    return FactConsistency(fact_id, len(qids), _mean_or_none(within + cross), _mean_or_none(within),
                           _mean_or_none(cross), jaccard(top_k(mean, k), top_k(cas, k)))


def split_consistent(scores: Mapping[str, float], threshold: float | None = None) -> tuple[dict[str, bool], float]:
    """{fact: consistent?} and the threshold used (the median of ``scores`` when none is given)."""
    if not scores:
        return {}, float("nan")
    cut = float(np.median(list(scores.values()))) if threshold is None else float(threshold)
    return {f: s >= cut for f, s in scores.items()}, cut


def _cluster_draws(n: int, clusters: Sequence[str] | None, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` resamples that draw the clusters (relations) with replacement, each
    drawn cluster bringing all its rows; without clusters every row is its own."""
    labels = list(range(n)) if clusters is None else list(clusters)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} cluster labels for {n} values")
    names = sorted(set(labels), key=str)
    rows = {name: np.flatnonzero(np.array([lab == name for lab in labels])) for name in names}
    drawn = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    return [np.concatenate([rows[names[j]] for j in draw]) for draw in drawn]


def _percentile(values: Sequence[float], point: float, n: int) -> Estimate:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return Estimate(point, None, None, n)
    return Estimate(point, *percentile_interval(values), n)


def group_mean(values: Sequence[float], clusters: Sequence[str] | None = None, seed: int = 0,
               bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean of per-fact values with a 95% percentile interval from resampling their relations
    (``clusters``, one label per value; none: the facts); a rate (``bounds``) whose every fact sits at
    one bound gets `stats.boundary_interval`'s over the relations instead of a point."""
    x = np.asarray(values, float)
    if len(x) == 0:
        return Estimate(None, None, None, 0)
    units = len(set(clusters if clusters is not None else range(len(x))))
    if units < 2:
        return Estimate(float(x.mean()), None, None, len(x))
    exact = boundary_interval(x, bounds, units)
    if exact is not None:
        return Estimate(float(x.mean()), *exact, len(x))
    return _percentile([x[i].mean() for i in _cluster_draws(len(x), clusters, 10_000, seed)], float(x.mean()), len(x))


def group_difference(values: Sequence[float], consistent: Sequence[bool], clusters: Sequence[str] | None = None,
                     seed: int = 0) -> Estimate:
    """Mean over the consistent facts − mean over the others, with a 95% percentile interval from
    resampling relations (``clusters``; none: the facts): a relation's facts mostly fall in one group,
    so facts are not independent draws of either; n = facts in both groups."""
    x, g = np.asarray(values, float), np.asarray(consistent, bool)
    n = len(x)
    if not g.any() or g.all():
        return Estimate(None, None, None, n)
    diff = float(x[g].mean() - x[~g].mean())
    if g.sum() < 2 or (~g).sum() < 2:
        return Estimate(diff, None, None, n)
    draws = [x[i][g[i]].mean() - x[i][~g[i]].mean()
             for i in _cluster_draws(n, clusters, 10_000, seed) if g[i].any() and not g[i].all()]
    return _percentile(draws, diff, n)


def spearman(x: Sequence[float], y: Sequence[float], clusters: Sequence[str] | None = None, seed: int = 0) -> Estimate:
    """Spearman ρ between per-fact values with a 95% percentile interval from resampling relations
    (``clusters``; none: the facts); a resample whose values are all tied has no ρ and is left out."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Estimate(None, None, None, n)
    rho = float(sps.spearmanr(x, y).statistic)
    rhos = [sps.spearmanr(x[i], y[i]).statistic if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0 else np.nan
            for i in _cluster_draws(n, clusters, 2_000, seed)]
    return _percentile(rhos, rho, n)


def fact_effects(manip: Mapping[str, Any], editing: Mapping[str, Any], is_evaluation, method: str = "matrice"
                 ) -> dict[str, dict[str, float]]:
    """{effect: {fact: value}}: suppression ΔP/P (mean over the fact's evaluation queries, or over all
    its queries when the run holds none out), erasure and update reliability (the fact's queries
    pooled over languages), for ``method``'s neurons."""
    effects: dict[str, dict[str, float]] = {}
    mine = [r for r in manip["records"] if r["method"] == method and r["mode"] == "suppress" and r["delta_p"] is not None]
    held_out = [r for r in mine if is_evaluation(r["query_id"])]
    effects["suppression ΔP/P"] = per_fact_mean(held_out or mine, lambda r: r["delta_p"])
    for op in ("erasure", "update"):
        effects[f"{op} reliability"] = pooled_ratio(
            [r for r in editing["records"] if r["method"] == method and r["operation"] == op], "rel_ok", "rel_n")
    return effects


def link_table(consistency: Mapping[str, float], consistent: Mapping[str, bool],
               effects: Mapping[str, Mapping[str, float]], seed: int = 0,
               relation_of: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Per effect: mean in each group, their difference and Spearman ρ with consistency (Estimates),
    intervals from resampling relations (``relation_of``; none: the facts)."""
    rows = []
    for name, per_fact in effects.items():
        facts = sorted(f for f in per_fact if f in consistency)
        values, groups = [per_fact[f] for f in facts], [consistent[f] for f in facts]
        clusters = None if relation_of is None else [relation_of(f) for f in facts]

        def within(flag: bool) -> tuple[list[float], list[str] | None]:
            keep = [k for k, g in enumerate(groups) if g == flag]
            return [values[k] for k in keep], None if clusters is None else [clusters[k] for k in keep]

        bounds = RATE if name.endswith("reliability") else None
        rows.append({
            "effect": name, "consistent": group_mean(*within(True), seed=seed, bounds=bounds),
            "inconsistent": group_mean(*within(False), seed=seed, bounds=bounds),
            "difference": group_difference(values, groups, clusters, seed),
            "spearman": spearman([consistency[f] for f in facts], values, clusters, seed),
        })
    return rows


# ---- the stage's tables and metrics --------------------------------------------------------------

SCATTER_EFFECT = "suppression ΔP/P"  # the effect drawn against consistency


def consistency_metrics(facts: list[FactConsistency], consistent: dict[str, bool], rows: list[dict]) -> dict:
    """The metrics JSON: mean consistency, how many facts are consistent, the link estimates."""
    values = [f.consistency for f in facts if f.consistency is not None]
    link = {r["effect"]: {"difference": r["difference"].mean, "spearman": r["spearman"].mean} for r in rows}
    return {"mean": float(sum(values) / len(values)) if values else None, "n_facts": len(values),
            "n_consistent": sum(consistent.values()), "link": link}


def consistency_table(facts: list[FactConsistency], rows: list[dict], cut: float, section: Mapping[str, Any]) -> str:
    """The stage's markdown: every fact's consistency, then the link to the experiments' effects."""
    def num(v):
        return "–" if v is None else f"{v:.3f}"

    lines = ["| fact | queries | consistency | within language | across languages | CAS agreement | group |",
             "|---|---|---|---|---|---|---|"]
    for f in facts:
        group = "–" if f.consistency is None else ("consistent" if f.consistency >= cut else "inconsistent")
        lines.append(f"| {f.fact_id} | {f.n_queries} | {num(f.consistency)} | {num(f.within_language)} | "
                     f"{num(f.cross_language)} | {num(f.cas_agreement)} | {group} |")
    rule = "the median over facts" if section.get("threshold") is None else "fixed in params"
    link = ["| effect (MATRICE neurons) | consistent facts | inconsistent facts | difference | Spearman ρ with consistency |",
            "|---|---|---|---|---|"]
    for r in rows:
        link.append(f"| {r['effect']} | {r['consistent'].format(2)} | {r['inconsistent'].format(2)} | "
                    f"{r['difference'].format(2)} | {r['spearman'].format(2)} |")
    return (f"Per fact (top-{section['top_k']} neurons per query; consistent when consistency ≥ {cut:.3f}, {rule}):\n\n"
            + "\n".join(lines) + "\n\nConsistent vs inconsistent facts: mean [95% CI] (n facts); difference = "
            "consistent − inconsistent; ρ with consistency. Intervals resample relations (a relation's facts share "
            "neurons and mostly fall in one group); descriptive, no verdict rests on them.\n\n"
            + "\n".join(link) + "\n")


def write_outputs(facts: list[FactConsistency], out: RunOutputs, is_evaluation, section: Mapping[str, Any],
                  seed: int, relation_of: Callable[[str], str] | None = None) -> None:
    """Split the facts, link them to the manipulation and editing results already in ``out``, and write
    the result, its metrics, table, `dvc plots` rows and scatter figure."""
    scores = {f.fact_id: f.consistency for f in facts if f.consistency is not None}
    consistent, cut = split_consistent(scores, section.get("threshold"))
    effects = fact_effects(out.read_json("manipulation.json"), out.read_json("editing.json"), is_evaluation)
    rows = link_table(scores, consistent, effects, seed, relation_of)
    out.json("consistency.json", {
        "top_k": section["top_k"], "threshold": cut, "rule": "median" if section.get("threshold") is None else "fixed",
        "facts": [{**asdict(f), "consistent": consistent.get(f.fact_id)} for f in facts],
        "effects": effects, "link": [{k: (asdict(v) if k != "effect" else v) for k, v in r.items()} for r in rows],
    })
    out.json("consistency_metrics.json", {"consistency": consistency_metrics(facts, consistent, rows)})
    out.text("consistency_table.md", consistency_table(facts, rows, cut, section))
    out.json("consistency_plot.json", [
        {"fact": f, "consistency": scores[f], "suppression": effects[SCATTER_EFFECT].get(f), "consistent": consistent[f]}
        for f in sorted(scores)])
    plot_consistency({f: (scores[f], effects[SCATTER_EFFECT].get(f), consistent[f]) for f in scores}, cut, SCATTER_EFFECT,
                     out.figure("consistency.png"),
                     f"{out.model}: query-localisation consistency (top-{section['top_k']}) vs MATRICE suppression")


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    """Query localisation: consistency per fact and its link to the experiments."""
    data = run.json("consistency.json")
    return (
        "### Query localisation: are facts localised consistently?\nFor each fact, the mean pairwise Jaccard overlap "
        f"of its localisation queries' top-{data['top_k']} neurons (1: every paraphrase and language picks the same "
        "neurons), within and across languages, and the agreement between the top neurons by mean attribution and by "
        "the consistency-aware score mean − std. The Query Localization paper reports that neuron-level edits work "
        "worse on inconsistent facts; the second table compares the two groups here (descriptive: relations "
        "resampled for the intervals, no verdict).\n\n"
        + run.figure_and_table("consistency.png", f"Consistency vs suppression effect, {run.key}",
                               "consistency_table.md")
    )
