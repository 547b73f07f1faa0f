"""Manipulation of knowledge neurons (paper §IV-D, Fig. 5) and the ablation table (§IV-E, Table II).

For each fact and method the fact's neurons are scaled at the target position of every query of the
fact (all languages and paraphrases, in one batch): ×0 suppresses, ×2 enhances. Per query

    ΔP = (P_after − P_before) / P_before

with P the probability of the gold answer's first token (docs/method.md §Objects), or with
``answer_token: all`` of the whole answer, teacher-forced (Π_k P(t_k | q, t_<k)), each token's factor
with the neurons scaled at the position that predicts it (:mod:`matrice.models.whole_answer`).
P_before is recomputed here with the same batching, so ΔP = 0 exactly when nothing changes.

Choices where the paper is silent (all visible in the result):
- A fact whose set is empty for a method gets ΔP = 0 by construction (no forward pass); such facts
  are *kept* in the means (``mean_delta_p``) and counted per method (``empty_facts``);
  ``mean_delta_p_nonempty`` leaves them out.
- The language mean is over queries (every paraphrase counts once), not over facts first.
- A query with P_before == 0 (float underflow) has ΔP undefined: ``delta_p`` is None, it is counted
  (``n_undefined``) and left out of the means.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from matrice.data.schema import Query
from matrice.evaluation.claims import (BASELINES, CELL, Claim, RelationOf, empty_counts, empty_note, make_claim, method_name,
                            relation_prefix, scored_queries)
from matrice.experiments import (
    NeuronSetsLike, dataclass_dict, encode_all, fact_neurons, group_by_fact, mean_or_none,
)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.scaled_rows import scaling_set
from matrice.models.whole_answer import score_rows
from matrice.evaluation.stats import Estimate, per_fact_mean, relation_mean
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, not_drawn_note, ordered_langs, plot_manipulation, split_empty, wide_rows

log = logging.getLogger(__name__)

DEFAULT_MODES: dict[str, float] = {"suppress": 0.0, "enhance": 2.0}
DEFAULT_METHODS: tuple[str, ...] = ("matrice", "amig", "random", "wo_uaq", "wo_ual")


@dataclass(frozen=True)
class ManipulationRecord:
    query_id: str
    fact_id: str
    relation: str
    lang: str
    method: str
    mode: str
    n_neurons: int
    p_before: float
    p_after: float
    delta_p: float | None  # None when p_before == 0


@dataclass
class ManipulationResult:
    """``records``: one per (query, method, mode). ``summary``: one row per (method, mode, lang) with
    n_queries, n_facts, n_empty_facts, n_undefined, mean/median ΔP (with and without empty facts).
    ``overall``: the same per (method, mode) over all languages. ``empty_facts[method]``: fact ids
    whose set is empty. ``unencodable``: query ids the tokenizer could not encode (skipped)."""

    records: list[ManipulationRecord] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    overall: list[dict[str, Any]] = field(default_factory=list)
    empty_facts: dict[str, list[str]] = field(default_factory=dict)
    unencodable: dict[str, str] = field(default_factory=dict)
    modes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MODES))

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        d = {
            "modes": dict(self.modes),
            "summary": self.summary,
            "overall": self.overall,
            "empty_facts": {m: list(v) for m, v in self.empty_facts.items()},
            "n_empty_facts": {m: len(v) for m, v in self.empty_facts.items()},
            "unencodable": dict(self.unencodable),
        }
        if with_records:
            d["records"] = [dataclass_dict(r) for r in self.records]
        return d


def _summarise(records: Sequence[ManipulationRecord], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[ManipulationRecord]] = defaultdict(list)
    for r in records:
        groups[tuple(getattr(r, k) for k in keys)].append(r)
    rows = []
    for key in sorted(groups):
        rs = groups[key]
        defined = [r for r in rs if r.delta_p is not None]
        nonempty = [r for r in defined if r.n_neurons > 0]
        all_dp = [r.delta_p for r in defined]
        rows.append({
            **dict(zip(keys, key)),
            "n_queries": len(rs),
            "n_facts": len({r.fact_id for r in rs}),
            "n_empty_facts": len({r.fact_id for r in rs if r.n_neurons == 0}),
            "n_undefined": len(rs) - len(defined),
            "mean_delta_p": mean_or_none(all_dp),
            "median_delta_p": float(np.median(all_dp)) if all_dp else None,
            "mean_delta_p_nonempty": mean_or_none([r.delta_p for r in nonempty]),
            "mean_p_before": mean_or_none([r.p_before for r in rs]),
            "mean_p_after": mean_or_none([r.p_after for r in rs]),
        })
    return rows


@dataclass(frozen=True)
class Request:
    """What one :func:`manipulate` call asks: these queries, each fact's sets, these methods."""

    queries: Sequence[Query]
    sets: NeuronSetsLike
    methods: Sequence[str]


def _records(request_facts: Mapping[str, Sequence[Query]], neurons: Mapping[tuple[str, str], Any],
             methods: Sequence[str], modes: Mapping[str, float], before: Mapping[str, float],
             after: Mapping[tuple[str, str, str], list[float]]) -> list[ManipulationRecord]:
    """One record per (fact, method, mode, query), in that order; an empty set changes nothing."""
    records = []
    for fid, fqs in request_facts.items():
        for method in methods:
            pairs = neurons[(fid, method)]
            for mode in modes:
                scored = after.get((fid, method, mode))
                for i, q in enumerate(fqs):
                    pb = before[q.query_id]
                    pa = pb if scored is None else scored[i]
                    dp = (pa - pb) / pb if pb > 0 else None
                    if dp is not None and not math.isfinite(dp):
                        dp = None
                    records.append(ManipulationRecord(q.query_id, fid, q.relation, q.lang, method, mode, int(len(pairs)),
                                                      float(pb), float(pa), dp))
    return records


def manipulate_many(
    adapter: ModelAdapter,
    requests: Sequence[Request],
    modes: Mapping[str, float] | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    answer_token: str = "first",
) -> list[ManipulationResult]:
    """Several :func:`manipulate` calls scored together: every request's (query, scaling set) rows in
    shared batches, each query's prompt run and its unedited row scored once however many requests
    name it (the controls ask for the same queries under many sets). One result per request."""
    modes = dict(DEFAULT_MODES if modes is None else modes)
    unique = {q.query_id: q for r in requests for q in r.queries}  # the controls name each query in ~6 requests
    encs, failed = encode_all(adapter, list(unique.values()), few_shot, encoded)
    facts = [group_by_fact(q for q in r.queries if q.query_id in encs) for r in requests]
    # check coverage before any forward pass, so a mismatch fails fast
    neurons = [{(fid, m): fact_neurons(r.sets, fid, m, adapter) for fid in by_fact for m in r.methods}
               for r, by_fact in zip(requests, facts)]
    query_ids = list(dict.fromkeys(q.query_id for by_fact in facts for fqs in by_fact.values() for q in fqs))
    where = {qid: i for i, qid in enumerate(query_ids)}
    scalings: list[list[tuple[int, int, float]]] = [[]]
    rows = [(i, 0) for i in range(len(query_ids))]  # every query unedited, once
    spans: dict[tuple[int, str, str, str], tuple[int, int]] = {}
    scored: dict[tuple, tuple[int, int]] = {}  # (queries, scaling) -> its rows: requests that repeat one share it
    for k, (r, by_fact) in enumerate(zip(requests, facts)):
        for fid, fqs in by_fact.items():
            for method in r.methods:
                for mode, factor in modes.items():
                    scaling = scaling_set(neurons[k][(fid, method)], factor)
                    if not scaling:
                        continue
                    key = (tuple(q.query_id for q in fqs), tuple(scaling))
                    if key not in scored:
                        scored[key] = (len(rows), len(fqs))
                        rows += [(where[q.query_id], len(scalings)) for q in fqs]
                        scalings.append(scaling)
                    spans[(k, fid, method, mode)] = scored[key]
    log.info("manipulation: %d requests, %d queries, %d (query, edit) rows (answer_token %s)", len(requests),
             len(query_ids), len(rows), answer_token)
    probs = [s.prob for s in score_rows(adapter, [encs[q] for q in query_ids], scalings, rows, answer_token, batch_size,
                                        progress="manipulation" if progress else None)]
    before = dict(zip(query_ids, probs))
    results = []
    for k, (r, by_fact) in enumerate(zip(requests, facts)):
        after = {(fid, m, mode): probs[a:a + n] for (j, fid, m, mode), (a, n) in spans.items() if j == k}
        result = ManipulationResult(modes=modes, unencodable={q.query_id: failed[q.query_id] for q in r.queries
                                                              if q.query_id in failed},
                                    empty_facts={m: [f for f in by_fact if len(neurons[k][(f, m)]) == 0] for m in r.methods})
        result.records = _records(by_fact, neurons[k], r.methods, modes, before, after)
        result.summary = _summarise(result.records, ("method", "mode", "lang"))
        result.overall = _summarise(result.records, ("method", "mode"))
        results.append(result)
    return results


def manipulate(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    sets: NeuronSetsLike,
    methods: Sequence[str] = DEFAULT_METHODS,
    modes: Mapping[str, float] | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    answer_token: str = "first",
) -> ManipulationResult:
    """Suppress / enhance each fact's neurons for each method and measure ΔP on all its queries
    (``answer_token: all``: on the whole answer's probability, module doc).

    ``modes`` maps a mode name to the activation factor (default suppress ×0, enhance ×2). Raises
    :class:`~matrice.experiments.MissingNeuronSetError` for a fact the neuron sets do not cover.
    """
    result = manipulate_many(adapter, [Request(queries, sets, methods)], modes, few_shot, encoded, batch_size,
                             progress, answer_token)[0]
    for m, fids in result.empty_facts.items():
        if fids:
            log.info("method %s: %d of %d facts have no neurons (ΔP = 0 for them)", m, len(fids),
                     len({q.fact_id for q in queries}))
    return result


# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

def manipulation_effect(records: Sequence[Mapping[str, Any]], method: str, mode: str | None,
                        keep: Callable[[Mapping[str, Any]], bool]) -> dict[str, float]:
    """Per fact: mean ΔP/P over its kept queries for one mode; for mode None the effect in the intended
    direction (−ΔP for suppress, +ΔP for enhance) averaged over both modes, so a wrong-direction change
    counts against (Table II)."""
    sign = {"suppress": -1.0, "enhance": 1.0}
    return per_fact_mean(
        records,
        lambda r: None if r["delta_p"] is None else (r["delta_p"] if mode else sign[r["mode"]] * r["delta_p"]),
        lambda r: r["method"] == method and (mode is None or r["mode"] == mode) and keep(r),
    )



def manipulation_claims(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                        relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Fig. 5 and Table II from per-query ΔP/P, averaged per fact over evaluation queries."""
    records = manip["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    split = "evaluation queries (never attributed)" if have_eval else "localisation queries (no held-out ones in this run)"
    n_facts = len({r["fact_id"] for r in records})

    def effect(method: str, mode: str | None) -> dict[str, float]:
        return manipulation_effect(records, method, mode, scored)

    empty = manip.get("empty_facts", {})
    methods = {r["method"] for r in records}
    common = dict(metric="delta_p", relation_of=relation_of, n_facts=n_facts)
    out = []
    for other in (m for m in BASELINES if m in methods):
        for mode, direction in (("suppress", "less"), ("enhance", "greater")):
            out.append(make_claim(
                "Fig. 5", f"{ {'suppress': 'suppressing', 'enhance': 'enhancing'}[mode]} MATRICE's neurons moves "
                f"P(answer) more than {method_name(other)}'s",
                f"ΔP/P MATRICE − {method_name(other)} ({mode})", direction, split,
                effect("matrice", mode), effect(other, mode), empty_note(empty, other, n_facts),
                key=f"fig5_{mode}_vs_{other}", empty=empty_counts(empty, "matrice", other), **common))
    for ablation in (m for m in ("wo_uaq", "wo_uaq_k", "wo_ual", "wo_ual_k") if m in methods):
        text = f"removing {'UaQ' if 'uaq' in ablation else 'UaL'} weakens the neurons"
        out.append(make_claim("Table II", text, f"effect MATRICE − {method_name(ablation)} (−ΔP suppress, +ΔP enhance, mean)",
                          "greater", split, effect("matrice", None), effect(ablation, None),
                          empty_note(empty, ablation, n_facts), key=f"table2_vs_{ablation}",
                          empty=empty_counts(empty, "matrice", ablation), **common))
    for suffix in ("", "_k"):
        if {f"wo_uaq{suffix}", f"wo_ual{suffix}"} <= methods:
            out.append(make_claim("Table II", "UaQ matters more than UaL",
                              f"effect {method_name('wo_ual' + suffix)} − effect {method_name('wo_uaq' + suffix)}", "greater", split,
                              effect(f"wo_ual{suffix}", None), effect(f"wo_uaq{suffix}", None),
                              key=f"table2_uaq_over_ual{suffix}",
                              empty=empty_counts(empty, f"wo_ual{suffix}", f"wo_uaq{suffix}"), **common))
    return out



def manipulation_estimates(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                           languages: Sequence[str | None], relation_of: RelationOf = relation_prefix
                           ) -> tuple[dict[str, dict[str, list[Estimate]]], bool]:
    """``({mode: {method: [Estimate per language]}}, whether on evaluation queries)``: each fact's mean
    ΔP/P over its evaluation queries in the language (None: every language), then `relation_mean`."""
    records = manip["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    methods = list(dict.fromkeys(r["method"] for r in records))
    out: dict[str, dict[str, list[Estimate]]] = {}
    for mode in ("suppress", "enhance"):
        out[mode] = {method: [relation_mean(manipulation_effect(
            records, method, mode, lambda r, lang=lang: lang in (None, r["lang"]) and scored(r)), relation_of)
            for lang in languages] for method in methods}
    return out, have_eval



def ablation_estimates(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                       relation_of: RelationOf = relation_prefix) -> dict[str, Estimate]:
    """Table II: each variant's signed effect (−ΔP/P suppressing, +ΔP/P enhancing, averaged), on the
    verdicts' queries and unit; MATRICE first."""
    records = manip["records"]
    scored, _ = scored_queries(records, is_evaluation)
    present = {r["method"] for r in records}
    variants = [m for m in ("matrice", "wo_uaq", "wo_uaq_k", "wo_ual", "wo_ual_k") if m in present]
    return {m: relation_mean(manipulation_effect(records, m, None, scored), relation_of) for m in variants}



def manipulation_metrics(estimates: Mapping[str, Mapping[str, Sequence[Estimate]]], ablation: Mapping[str, Estimate]
                         ) -> dict[str, Any]:
    """The metrics JSON: each method's ΔP/P over every language per mode, and Table II's effects."""
    return {"manipulation": {m: {mode: estimates[mode][m][-1].mean for mode in estimates} for m in estimates["suppress"]},
            "ablation": {m: e.mean for m, e in ablation.items()}}


def manipulation_interval_tables(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                                 languages: Sequence[str], relation_of: RelationOf = relation_prefix) -> str:
    """Fig. 5 per language and over all languages, then Table II's signed effects: the verdicts' queries
    and unit (`CELL`)."""
    estimates, have_eval = manipulation_estimates(manip, is_evaluation, [*languages, None], relation_of)
    split = "evaluation queries (never attributed)" if have_eval else "all queries (no held-out ones in this run)"
    parts = []
    for mode, per_method in estimates.items():
        lines = ["| method | " + " | ".join([*languages, "all"]) + " |", "|---|" + "---|" * (len(languages) + 1)]
        for method, cells in per_method.items():
            lines.append(f"| {method_name(method)} | " + " | ".join(e.format(2) for e in cells) + " |")
        parts.append(f"**{mode}**: ΔP/P, {CELL}, {split}\n\n" + "\n".join(lines) + "\n")
    ablation = ablation_estimates(manip, is_evaluation, relation_of)
    if len(ablation) > 1:
        lines = ["| variant | effect |", "|---|---|"] + [f"| {method_name(m)} | {e.format(3)} |" for m, e in ablation.items()]
        parts.append(f"**Table II** — signed effect (−ΔP/P suppressing, +ΔP/P enhancing, averaged; a change in the "
                     f"wrong direction counts against), {CELL}, {split}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


# ---- its outputs ----------------------------------------------------------------------------------

FIGURE_METHODS = ("matrice", "amig", "amig_k", "random", "random_layer")


def write_outputs(manip: Mapping[str, Any], out: RunOutputs, is_evaluation: Callable[[str], bool],
                  relation_of: RelationOf, sets: Any) -> None:
    """The result, its metrics (`dvc metrics`), one `dvc plots` file per mode, Fig. 5 and the interval
    tables; every number on evaluation queries, each fact's mean, then each relation's (the verdicts' unit)."""
    out.json("manipulation.json", manip)
    langs = ordered_langs({r["lang"] for r in manip["summary"]})
    estimates, have_eval = manipulation_estimates(manip, is_evaluation, [*langs, None], relation_of)
    out.json("manipulation_metrics.json",
             manipulation_metrics(estimates, ablation_estimates(manip, is_evaluation, relation_of)))
    for mode, per_method in estimates.items():
        out.json(f"manipulation_{mode}_plot.json", wide_rows("lang", per_method, langs))
    shown, empty = split_empty(sets, list(FIGURE_METHODS))
    plot_manipulation({mode: {method_name(m): per[m][:-1] for m in shown if m in per} for mode, per in estimates.items()},
                      langs, out.figure("fig5_manipulation.png"), f"Fig. 5 — {out.model}: relative change of P(answer), "
                      + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    out.text("manipulation_tables.md", manipulation_interval_tables(manip, is_evaluation, langs, relation_of))


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    return ("### Manipulation (Fig. 5, Table II)\nRelative change of P(answer) when each fact's neurons are set to 0 "
            "(suppress) or doubled (enhance) at the answer position; random neurons are the control.\n\n"
            + run.figure_and_table("fig5_manipulation.png", f"Fig. 5 — suppression and enhancement, {run.key}",
                                   "manipulation_tables.md"))
