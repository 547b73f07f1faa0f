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
A method whose set is empty for a fact has nothing to sweep there (counted in ``empty_facts``).
Per (method, λ) the report gives each fact's rate pooled over languages, then the mean over facts
with a 95% bootstrap interval (:func:`sweep_curves`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, dataclass_dict, encode_all, fact_neurons, group_by_fact, original_queries
from matrice.experiments.edit import EditConfig
from matrice.experiments.edit_targets import NewObject, choose_new_object, locality_sampler, with_new_object
from matrice.interventions import edited_output_weights, update_vectors
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import score_answers
from matrice.models.replay import recorded_blocks, replayed_below
from matrice.evaluation.stats import Estimate, bootstrap_mean, pooled_ratio
from matrice.evaluation.claims import method_name
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
) -> SweepResult:
    """Reliability and locality of the update edit for every (fact, method, λ); see the module doc."""
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

    def score(encodings: list[Encoded]):
        # the same batches and forward calls for every pass, so an edited pass can replay the unedited
        # blocks below its edit (their cache entries for a shared demonstration prefix included)
        return score_answers(adapter, encodings, batch_size=cfg.batch_size)

    for fid in tqdm(targets, desc="λ sweep", unit="fact", disable=not progress):
        src = originals[fid].get(cfg.source_lang)
        if src is None:
            result.skipped["no_source_query"].append(fid)
            continue
        gold_token = encs[src.query_id].answer_ids[0]
        relation = by_fact[fid][0].relation
        new = choose_new_object(adapter, fid, by_fact, gold_token, cfg.source_lang, cfg.seed, few_shot,
                                pool=by_relation[relation])
        if new is None:
            result.skipped["no_new_object"].append(fid)
            continue
        rel = _relabelled_originals(adapter, originals[fid], new, encs, few_shot)
        loc = [(q.lang, encs[q.query_id]) for f in sample_locality(fid)
               for q in originals[f].values()]
        scored = [e for _, e in rel] + [e for _, e in loc]  # the unedited model on the batches the edits see
        with recorded_blocks(adapter) as unedited_blocks:
            loc_before = score(scored)[len(rel):]
        for method in methods:
            pairs = fact_neurons(sets, fid, method, adapter)
            if len(pairs) == 0:
                result.empty_facts[method].append(fid)
                continue
            for lam in grid:
                vectors = update_vectors(adapter, pairs, gold_token, new.token, lam, lam, cfg.scaling)
                with edited_output_weights(adapter, vectors), \
                        replayed_below(adapter, unedited_blocks, int(pairs[:, 0].min())):
                    after = score(scored)
                result.records += _records(fid, relation, method, lam, len(pairs), rel, loc, after, loc_before)
    return result


def _relabelled_originals(adapter: ModelAdapter, originals: Mapping[str, Query], new: NewObject,
                          encs: Mapping[str, Encoded], few_shot: bool) -> list[tuple[str, Encoded]]:
    """Each language's original query with o' as the answer (as the edit stage scores reliability);
    a language where the edit stage would not score the update (:func:`with_new_object`) is left out."""
    relabelled = ((lang, with_new_object(adapter, q, new, encs[q.query_id].answer_ids[0], few_shot)[0])
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
        counts[lang]["loc_ok"] += int(s.top_token == b.top_token)
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
            points.append((lam, bootstrap_mean(list(pooled_ratio(mine, "rel_ok", "rel_n").values())),
                           bootstrap_mean(list(pooled_ratio(mine, "loc_ok", "loc_n").values()))))
        curves[method] = points
    return curves


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
    )
