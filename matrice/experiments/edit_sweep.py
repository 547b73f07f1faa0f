"""The update edit over a range of λ: reliability against locality per method (paper Eq. 15).

One λ says little: a larger step flips more edited queries *and* more unrelated ones. This sweep
makes the trade-off visible. For every fact, method and λ (λ1 = λ2 = λ, with the edit's scaling),
the fact's neurons get ``W − λ·E(o) + λ·E(o')`` exactly as :mod:`.edit` does (same o', same
locality sample, same neurons), and two things are scored:

- **reliability**: the fact's original query (template 0) in each language, with o' as the answer:
  success when o''s first token is top-1;
- **locality**: the original queries of ``locality_k`` unrelated facts: success when the top-1 token
  is the same as before the edit.

Generality is left out to keep the sweep affordable (the edit stage reports it at the default λ).

**Reliability at matched locality.** One λ favours whichever method moves the model least. For a
declared locality level (``verdicts.matched_locality``), each fact's reliability is read where its
locality curve crosses the level: linear between the two grid points that bracket it (the first
crossing, λ ascending). A fact whose locality is below the level already at the smallest λ, or never
falls to it, is not bracketed and is left out of that method's mean (counted in the report); the λ
grid is wide enough when every method brackets most facts.
A method whose set is empty for a fact has nothing to sweep there (counted in ``empty_facts``).
Per (method, λ) the report gives each fact's rate pooled over languages, then the mean over facts
with a 95% bootstrap interval (:func:`sweep_curves`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, dataclass_dict, encode_all, fact_neurons, group_by_fact, original_queries
from matrice.experiments.edit import EditConfig
from matrice.experiments.edit_targets import NewObject, choose_new_object, edit_target, locality_sampler, with_new_object
from matrice.experiments.edit.passes import EditedPasses, update_edit
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.whole_answer import AnswerSteps
from matrice.evaluation.stats import RATE, Estimate, bootstrap_mean, pooled_ratio, relation_mean
from matrice.evaluation.claims import Claim, RelationOf, make_claim, method_name, relation_prefix
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, plot_edit_sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRecord:
    """Counts for one (fact, method, λ, language)."""

    fact_id: str
    relation: str
    method: str
    lam: float
    lang: str
    n_neurons: int
    rel_n: int
    rel_ok: int
    loc_n: int
    loc_ok: int


@dataclass
class SweepResult:
    config: dict[str, Any] = field(default_factory=dict)
    lambdas: list[float] = field(default_factory=list)
    records: list[SweepRecord] = field(default_factory=list)
    empty_facts: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "lambdas": self.lambdas, "empty_facts": self.empty_facts,
                "skipped": self.skipped, "records": [dataclass_dict(r) for r in self.records]}


def _check_lambdas(lambdas: Sequence[float]) -> list[float]:
    values = [float(x) for x in lambdas]
    if not values or any(x <= 0 for x in values):
        raise ValueError(f"the λ sweep needs positive values, got {list(lambdas)}")
    return sorted(set(values))


def sweep_update(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    sets: NeuronSetsLike,
    methods: Sequence[str],
    lambdas: Sequence[float],
    cfg: EditConfig | None = None,
    few_shot: bool = False,
    facts: Sequence[str] | None = None,
    encoded: Mapping[str, Encoded] | None = None,
    progress: bool = True,
    memo: Memo | None = None,
    answer_token: str = "first",
) -> SweepResult:
    """Reliability and locality of the update edit for every (fact, method, λ); see the module doc.
    With ``memo``, every scored pass (a fact's unedited pass, each (method, λ) edit) is stored under its
    exact inputs and read back by a run that would compute it again (bit-identical: a pass's batches
    are fixed by its inputs), so a τ sweep recomputes only the passes whose neurons moved.
    ``answer_token: all``: reliability is o' as the greedy output in full, locality every step's top
    token, E(o) and E(o') the mean unembedding of their tokens (as the edit stage)."""
    cfg = cfg or EditConfig()
    grid = _check_lambdas(lambdas)
    encs, _ = encode_all(adapter, queries, few_shot, encoded)
    by_fact = group_by_fact(q for q in queries if q.query_id in encs)
    originals = {fid: original_queries(fqs) for fid, fqs in by_fact.items()}
    by_relation: dict[str, list[str]] = defaultdict(list)
    for f, fqs in by_fact.items():
        by_relation[fqs[0].relation].append(f)
    targets = list(by_fact) if facts is None else list(facts)
    sample_locality = locality_sampler(list(by_fact), cfg.locality_k, cfg.seed)
    result = SweepResult(config={**cfg.__dict__, "methods": list(methods)}, lambdas=grid,
                         empty_facts={m: [] for m in methods}, skipped={"no_source_query": [], "no_new_object": []})

    passes = EditedPasses(adapter, cfg.batch_size, memo, kind="edit_sweep_pass", edits_per_pass=cfg.edits_per_pass)
    whole = answer_token == "all"
    for fid in tqdm(targets, desc="λ sweep", unit="fact", disable=not progress):
        src = originals[fid].get(cfg.source_lang)
        if src is None:
            result.skipped["no_source_query"].append(fid)
            continue
        gold_ids = encs[src.query_id].answer_ids
        relation = by_fact[fid][0].relation
        new = choose_new_object(adapter, fid, by_fact, gold_ids, cfg.source_lang, cfg.seed, few_shot,
                                pool=by_relation[relation], whole=whole)
        if new is None:
            result.skipped["no_new_object"].append(fid)
            continue
        gold = edit_target(gold_ids, whole)
        rel = _relabelled_originals(adapter, originals[fid], new, encs, few_shot, whole)
        loc = [(q.lang, encs[q.query_id]) for f in sample_locality(fid)
               for q in originals[f].values()]
        scored = [e for _, e in rel] + [e for _, e in loc]  # the unedited model on the batches the edits see
        neurons = {method: fact_neurons(sets, fid, method, adapter) for method in methods}
        for method, pairs in neurons.items():
            if len(pairs) == 0:
                result.empty_facts[method].append(fid)
        edits = {(method, lam): update_edit(adapter, pairs, gold, new.target(whole), lam, lam, cfg.scaling)
                 for method, pairs in neurons.items() if len(pairs) for lam in grid}  # λ1 = λ2 = λ
        steps = AnswerSteps.of(adapter, scored, answer_token)
        before, after = passes.run(steps.encs, edits)
        before, after = steps.fold(before), {e: steps.fold(s) for e, s in after.items()}
        loc_before = before[len(rel):]
        for (method, lam), edit in edits.items():
            result.records += _records(fid, relation, method, lam, len(edit.pairs), rel, loc, after[method, lam],
                                       loc_before)
    return result


def _relabelled_originals(adapter: ModelAdapter, originals: Mapping[str, Query], new: NewObject,
                          encs: Mapping[str, Encoded], few_shot: bool, whole: bool = False) -> list[tuple[str, Encoded]]:
    """Each language's original query with o' as the answer (as the edit stage scores reliability);
    a language where the edit stage would not score the update (:func:`with_new_object`) is left out."""
    relabelled = ((lang, with_new_object(adapter, q, new, encs[q.query_id].answer_ids, few_shot, whole)[0])
                  for lang, q in sorted(originals.items()))
    return [(lang, enc) for lang, enc in relabelled if enc is not None]


def _records(fid: str, relation: str, method: str, lam: float, n_neurons: int, rel, loc, after, loc_before
             ) -> list[SweepRecord]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (lang, _), s in zip(rel, after[: len(rel)]):
        counts[lang]["rel_n"] += 1
        counts[lang]["rel_ok"] += int(s.rank == 0)
    for (lang, _), s, b in zip(loc, after[len(rel):], loc_before):
        counts[lang]["loc_n"] += 1
        counts[lang]["loc_ok"] += int(s.same_top(b))
    return [SweepRecord(fid, relation, method, lam, lang, n_neurons, c["rel_n"], c["rel_ok"], c["loc_n"], c["loc_ok"])
            for lang, c in sorted(counts.items())]


def sweep_curves(sweep: Mapping[str, Any]) -> dict[str, list[tuple[float, Estimate, Estimate]]]:
    """Per method, per λ: (λ, reliability, locality), each the mean over facts of the fact's pooled
    rate with its 95% bootstrap interval (n facts)."""
    records = sweep["records"]
    curves: dict[str, list[tuple[float, Estimate, Estimate]]] = {}
    for method in sweep["config"]["methods"]:
        points = []
        for lam in sweep["lambdas"]:
            mine = [r for r in records if r["method"] == method and r["lam"] == lam]
            points.append((lam, bootstrap_mean(list(pooled_ratio(mine, "rel_ok", "rel_n").values()), bounds=RATE),
                           bootstrap_mean(list(pooled_ratio(mine, "loc_ok", "loc_n").values()), bounds=RATE)))
        curves[method] = points
    return curves


def reliability_at_locality(points: Sequence[tuple[float, float, float]], level: float) -> float | None:
    """Reliability where locality first falls to ``level`` over ``points`` = (λ, reliability, locality),
    linear between the bracketing grid points; None when the grid does not bracket the level."""
    points = sorted(points)
    if not points or points[0][2] < level:
        return None
    for (_, rel0, loc0), (_, rel1, loc1) in zip(points, points[1:]):
        if loc0 >= level >= loc1:
            t = 0.0 if loc0 == loc1 else (loc0 - level) / (loc0 - loc1)
            return rel0 + t * (rel1 - rel0)
    return points[-1][1] if points[-1][2] == level else None


def matched_reliability(sweep: Mapping[str, Any], method: str, level: float) -> dict[str, float | None]:
    """Per fact: the update's reliability at locality ``level`` (None: not bracketed by the λ grid)."""
    per_fact: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for lam in sweep["lambdas"]:
        mine = [r for r in sweep["records"] if r["method"] == method and r["lam"] == lam]
        rel, loc = pooled_ratio(mine, "rel_ok", "rel_n"), pooled_ratio(mine, "loc_ok", "loc_n")
        for fid in set(rel) & set(loc):
            per_fact[fid].append((lam, rel[fid], loc[fid]))
    return {fid: reliability_at_locality(points, level) for fid, points in sorted(per_fact.items())}


def sweep_claims(sweep: Mapping[str, Any], level: float, relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Table IV at matched locality: MATRICE's update reliability against each other swept method's, both
    read at the same locality; facts bracketed for both sides only."""
    methods = list(sweep.get("config", {}).get("methods", []))
    if "matrice" not in methods:
        return []
    mine = matched_reliability(sweep, "matrice", level)
    out = []
    for other in (m for m in methods if m != "matrice"):
        theirs = matched_reliability(sweep, other, level)
        both = [f for f in mine if mine[f] is not None and theirs.get(f) is not None]
        claim = make_claim(
            "Table IV", f"MATRICE's update is more reliable than {method_name(other)}'s at the same locality ({level:g})",
            f"update reliability at locality {level:g} MATRICE − {method_name(other)}", "greater",
            "original queries, every language; locality on unrelated facts' original queries",
            {f: mine[f] for f in both}, {f: theirs[f] for f in both},
            f"{len(both)} of {len(mine)} facts bracketed by the λ grid {sweep['lambdas']} for both",
            key=f"table4_update_matched_locality_matrice_vs_{other}", metric="rate", relation_of=relation_of,
            n_facts=len(both))
        if 2 * len(both) < len(mine):  # a mean over the few facts the grid happens to bracket says little
            why = f"the λ grid brackets locality {level:g} for both methods in only {len(both)} of {len(mine)} facts"
            claim = replace(claim, untestable=why, verdict="not testable")
        out.append(claim)
    return out


def matched_table(sweep: Mapping[str, Any], level: float, relation_of: RelationOf, name=lambda m: m) -> str:
    """Markdown: each method's reliability at the locality level, mean [95% CI] over relations, and how
    many facts the grid brackets."""
    lines = [f"| method | reliability at locality {level:g} | facts bracketed |", "|---|---|---|"]
    for method in sweep["config"]["methods"]:
        values = matched_reliability(sweep, method, level)
        kept = {f: v for f, v in values.items() if v is not None}
        lines.append(f"| {name(method)} | {relation_mean(kept, relation_of, bounds=RATE).format(2)} | {len(kept)} of {len(values)} |")
    return "\n".join(lines) + "\n"


def sweep_plot_rows(curves: Mapping[str, Sequence[tuple[float, Estimate, Estimate]]], name=lambda m: m) -> list[dict]:
    """`dvc plots` rows: one per (method, λ) with a reliability estimate."""
    return [{"method": name(m), "lambda": lam, "reliability": rel.mean, "locality": loc.mean, "n_facts": rel.n}
            for m, points in curves.items() for lam, rel, loc in points if rel.mean is not None]


def sweep_table(curves: Mapping[str, Sequence[tuple[float, Estimate, Estimate]]], name=lambda m: m) -> str:
    """Markdown: one row per (method, λ), reliability and locality as mean [95% CI] (n facts)."""
    lines = ["| method | λ | reliability | locality |", "|---|---|---|---|"]
    for method, points in curves.items():
        for lam, rel, loc in points:
            lines.append(f"| {name(method)} | {lam:g} | {rel.format(2)} | {loc.format(2)} |")
    return "\n".join(lines) + "\n"


# ---- its section of the report ------------------------------------------------------------------

def write_outputs(sweep: Mapping[str, Any], out: RunOutputs) -> None:
    """The result, the `dvc plots` rows, the table with intervals and the reliability/locality figure."""
    curves = sweep_curves(sweep)
    out.json("edit_sweep.json", sweep)
    out.json("edit_sweep_plot.json", sweep_plot_rows(curves, method_name))
    out.text("edit_sweep_table.md", sweep_table(curves, method_name))
    plot_edit_sweep({method_name(m): p for m, p in curves.items()}, out.figure("edit_sweep.png"),
                    f"{out.model}: update edit, λ1 = λ2 = λ ∈ {sweep['lambdas']} ({sweep['config']['scaling']} scaling); "
                    "original queries, every language")


def section(run: RunResults) -> str:
    """The update edit's reliability-vs-locality trade-off over λ."""
    from matrice.evaluation.claims import method_name
    from matrice.experiments.edit import scaling_text

    sweep = run.json("edit_sweep.json")
    level = matched_locality(run.params)
    empty = {m: len(f) for m, f in sweep["empty_facts"].items() if f}
    return (
        "### Update edit: reliability against locality over λ\nOne λ hides a trade-off: a larger step flips more "
        "edited queries and more unrelated ones. The update edit of every fact, with λ1 = λ2 = λ over "
        f"{sweep['lambdas']} ({scaling_text(run.params)}), scored on each language's original query (reliability: o' "
        "top-1) and on the unrelated facts' original queries (locality: top-1 unchanged); each fact pooled over "
        "languages, then mean [95% CI over facts] (n facts). A method that is up and to the right of another "
        "edits better at every cost.\n\n"
        + run.figure_and_table("edit_sweep.png", f"Update edit, reliability vs locality over λ, {run.key}",
                               "edit_sweep_table.md")
        + ("\nNot swept (empty set for the fact): " + ", ".join(f"{method_name(m)} {n} facts" for m, n in empty.items())
           + ".\n" if empty else "")
        + f"\nReliability at matched locality: each fact's update reliability where its locality curve crosses "
        f"{level:g} (`verdicts.matched_locality`), linear between the bracketing λ; mean [95% CI over relations] "
        "(n relations). A method that moves the model less cannot win here by moving it less.\n\n"
        + matched_table(sweep, level, run.relation_of, method_name)
    )


def matched_locality(params: Mapping[str, Any]) -> float:
    """The declared locality level at which methods' update reliability is compared."""
    return float((params.get("verdicts") or {}).get("matched_locality", 0.9))
