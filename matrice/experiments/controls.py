"""Controls that test what the paper assumes: are the neurons language-agnostic, and are
they specific to their fact?

- **Leave-one-language-out** (LOLO): for each language k, the neurons selected from the other
  languages (``select_leave_one_out``) are suppressed on every query of the fact in k, which no
  part of their selection saw; beside them, as many random neurons per layer, MATRICE's full set
  (which did see k's localisation queries), and the neurons selected the same way (without k) for
  another fact of the same relation (``lolo_same_relation``): neurons that carry the relation or the
  answer type rather than the fact would suppress it as much.
- **Specificity**: fact B's queries under suppression of B's own neurons, of the neurons of another
  fact of B's relation, and of the neurons of a fact of another relation. Neurons that store B
  move P(B's answer) more than neurons that store something else.

- **AMIG's baseline against the zero baseline** (AMIG's claim over Dai et al.): the same first
  queries attributed with AMIG's all-PAD baseline and with the zero baseline, each turned into a set
  the same way (layer-normalised maps, intersected over languages, top-k with k = MATRICE's count:
  ``amig_k`` and ``zero_k``), suppressed on the fact's queries. Equal sizes, so only the baseline
  differs.

All are scored by :func:`matrice.experiments.manipulate.manipulate_many` (one call for every
control), so ΔP means exactly what it means
in Fig. 5 (relative change of P(gold first token), or of P(whole answer) under ``answer_token: all``);
records carry the method names below.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from matrice.data.schema import Query
from matrice.evaluation.claims import CELL, Claim, RelationOf, make_claim, method_name, relation_prefix, scored_queries
from matrice.experiments import NeuronSetsLike, _facts_of, dataclass_dict, fact_neurons
from matrice.experiments.manipulate import ManipulationRecord, Request, manipulate_many
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.evaluation.stats import Estimate, relation_mean
from matrice.method.selection import intersection_score, top_k
from matrice.method.uncertainty import normalize_layers
from matrice.evaluation.report import RunResults, report_languages
from matrice.io import RunOutputs

SUPPRESS = {"suppress": 0.0}
LOLO_METHODS = ("lolo", "lolo_random_layer", "matrice")
LOLO_DONOR = "lolo_same_relation"
SPECIFICITY_METHODS = ("own", "same_relation", "other_relation")
BASELINE_METHODS = ("amig_k", "zero_k")


@dataclass
class ControlResult:
    """``lolo`` and ``specificity``: one ManipulationRecord per (query, method), suppression only.
    ``donors[fact] = {"same_relation": fact, "other_relation": fact}`` names whose neurons were used."""

    lolo: list[ManipulationRecord] = field(default_factory=list)
    specificity: list[ManipulationRecord] = field(default_factory=list)
    donors: dict[str, dict[str, str | None]] = field(default_factory=dict)
    baselines: list[ManipulationRecord] = field(default_factory=list)
    zero_sets: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lolo": [dataclass_dict(r) for r in self.lolo],
                "specificity": [dataclass_dict(r) for r in self.specificity],
                "donors": self.donors, "baselines": [dataclass_dict(r) for r in self.baselines],
                "zero_sets": self.zero_sets}


def lolo_requests(queries: Sequence[Query], lolo_sets: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  full_sets: NeuronSetsLike, donors: Mapping[str, Mapping[str, str | None]] | None = None) -> list[Request]:
    """Per held-out language k: suppress the neurons selected without k (and, with ``donors``, the
    same-relation donor's selected without k) on k's queries."""
    requests = []
    for lang in sorted({q.lang for q in queries}):
        held_out = [q for q in queries if q.lang == lang and q.fact_id in lolo_sets]
        if not held_out:
            continue
        sets = {f: {**lolo_sets[f][lang], "matrice": fact_neurons(full_sets, f, "matrice")}
                for f in {q.fact_id for q in held_out}}
        requests.append(Request(held_out, sets, LOLO_METHODS))
        borrowed = {f: {LOLO_DONOR: lolo_sets[d][lang]["lolo"]} for f, d in _lolo_donors(donors, sorted(sets), lolo_sets, lang)}
        if borrowed:
            requests.append(Request([q for q in held_out if q.fact_id in borrowed], borrowed, (LOLO_DONOR,)))
    return requests


def leave_one_language_out(
    adapter: ModelAdapter, queries: Sequence[Query], lolo_sets: Mapping[str, Mapping[str, Mapping[str, Any]]],
    full_sets: NeuronSetsLike, few_shot: bool, encoded: Mapping[str, Encoded] | None = None, batch_size: int = 32,
    donors: Mapping[str, Mapping[str, str | None]] | None = None, answer_token: str = "first",
) -> list[ManipulationRecord]:
    """Suppression in each held-out language k of the neurons selected without k (see module doc);
    with ``donors`` (fact -> {"same_relation": fact}), also the donor's neurons selected without k."""
    return _suppressed(adapter, lolo_requests(queries, lolo_sets, full_sets, donors), few_shot, encoded, batch_size,
                       answer_token)


def _suppressed(adapter: ModelAdapter, requests: Sequence[Request], few_shot: bool, encoded: Mapping[str, Encoded] | None,
                batch_size: int, answer_token: str) -> list[ManipulationRecord]:
    """Every request's suppression records, all requests scored together."""
    if not requests:
        return []
    results = manipulate_many(adapter, requests, SUPPRESS, few_shot, encoded, batch_size, progress=False,
                              answer_token=answer_token)
    return [r for result in results for r in result.records]


def _lolo_donors(donors: Mapping[str, Mapping[str, str | None]] | None, facts: Sequence[str],
                 lolo_sets: Mapping[str, Mapping[str, Mapping[str, Any]]], lang: str) -> list[tuple[str, str]]:
    """(fact, its same-relation donor) where the donor has neurons selected without ``lang``."""
    pairs = [(f, (donors or {}).get(f, {}).get("same_relation")) for f in facts]
    return [(f, d) for f, d in pairs if d is not None and lang in lolo_sets.get(d, {})]


def choose_donors(fact_relations: Mapping[str, str], seed: int,
                  fact_objects: Mapping[str, frozenset[tuple[str, str]]] | None = None) -> dict[str, dict[str, str | None]]:
    """Per fact: a seeded other fact of its relation and a seeded fact of another relation (None
    where there is none), each with an object that differs from the fact's in every language
    (``fact_objects``: fact -> its (language, object label) pairs; a donor with the same answer would
    make "another fact's neurons" a test of the answer, not of the fact)."""
    by_relation: dict[str, list[str]] = defaultdict(list)
    for f, r in sorted(fact_relations.items()):
        by_relation[r].append(f)

    def differs(g: str, f: str) -> bool:
        return fact_objects is None or not fact_objects.get(g, frozenset()) & fact_objects.get(f, frozenset())

    donors = {}
    for f, r in sorted(fact_relations.items()):
        rng = random.Random(f"{seed}:donor:{f}")
        same = [g for g in by_relation[r] if g != f and differs(g, f)]
        other = sorted(g for g, rg in fact_relations.items() if rg != r and differs(g, f))
        donors[f] = {"same_relation": rng.choice(same) if same else None,
                     "other_relation": rng.choice(other) if other else None}
    return donors


def query_donors(queries: Sequence[Query], seed: int) -> dict[str, dict[str, str | None]]:
    """:func:`choose_donors` over the queries' facts, objects compared in every language."""
    objects: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for q in queries:
        objects[q.fact_id].add((q.lang, q.answer))
    return choose_donors({q.fact_id: q.relation for q in queries}, seed, {f: frozenset(o) for f, o in objects.items()})


def specificity_requests(queries: Sequence[Query], sets: NeuronSetsLike,
                         donors: Mapping[str, Mapping[str, str | None]]) -> list[Request]:
    """Per kind of donor (own, same relation, other relation): suppress the donor's MATRICE neurons on
    each fact's queries; a donor that does not exist is left out."""
    relations = {q.fact_id: q.relation for q in queries}
    requests = []
    for method in SPECIFICITY_METHODS:
        chosen = {f: (f if method == "own" else donors[f][method]) for f in relations}
        chosen = {f: d for f, d in chosen.items() if d is not None}
        if chosen:
            borrowed = {f: {method: fact_neurons(sets, d, "matrice")} for f, d in chosen.items()}
            requests.append(Request([q for q in queries if q.fact_id in chosen], borrowed, (method,)))
    return requests


def specificity(
    adapter: ModelAdapter, queries: Sequence[Query], sets: NeuronSetsLike, seed: int, few_shot: bool,
    encoded: Mapping[str, Encoded] | None = None, batch_size: int = 32,
    donors: Mapping[str, Mapping[str, str | None]] | None = None, answer_token: str = "first",
) -> tuple[list[ManipulationRecord], dict[str, dict[str, str | None]]]:
    """Suppress, on fact B's queries, MATRICE's neurons of B, of another fact of B's relation and of
    a fact of another relation, each donor's object different from B's in every language. A donor
    that does not exist is left out (no record). ``donors``: a choice made already (the run's, which
    LOLO shares); default :func:`query_donors`."""
    donors = query_donors(queries, seed) if donors is None else {f: dict(d) for f, d in donors.items()}
    return _suppressed(adapter, specificity_requests(queries, sets, donors), few_shot, encoded, batch_size,
                       answer_token), donors


def zero_baseline_sets(queries: Sequence[Query], zero_maps: Mapping[str, np.ndarray], sets: NeuronSetsLike,
                       layer_norm: str = "abs") -> dict[str, np.ndarray]:
    """Per fact: the zero-baseline set built as ``amig_k`` is from AMIG's maps (selection.py): each
    language's first-query map layer-normalised, the intersection score over languages, top-k with
    k = MATRICE's count. A fact missing a language's zero map gets no set (left out, not emptied)."""
    firsts: dict[str, dict[str, str]] = defaultdict(dict)
    for q in queries:
        if q.template_id == 0:
            firsts[q.fact_id][q.lang] = q.query_id
    out = {}
    for fact, by_lang in sorted(firsts.items()):
        if fact not in _facts_of(sets) or not all(qid in zero_maps for qid in by_lang.values()):
            continue
        maps = normalize_layers(np.stack([zero_maps[by_lang[lang]] for lang in sorted(by_lang)]), layer_norm)
        out[fact] = top_k(intersection_score(maps), len(fact_neurons(sets, fact, "matrice")))
    return out


def baseline_requests(queries: Sequence[Query], sets: NeuronSetsLike, zero_sets: Mapping[str, np.ndarray]) -> list[Request]:
    """Suppression of ``amig_k`` and ``zero_k`` (equal sizes) on the queries of the facts with both."""
    both = {f: {"amig_k": fact_neurons(sets, f, "amig_k"), "zero_k": z} for f, z in zero_sets.items()}
    chosen = [q for q in queries if q.fact_id in both]
    return [Request(chosen, both, BASELINE_METHODS)] if chosen else []


def baseline_comparison(adapter: ModelAdapter, queries: Sequence[Query], sets: NeuronSetsLike,
                        zero_sets: Mapping[str, np.ndarray], few_shot: bool, encoded: Mapping[str, Encoded] | None = None,
                        batch_size: int = 32, answer_token: str = "first") -> list[ManipulationRecord]:
    """Suppression of ``amig_k`` and ``zero_k`` (equal sizes) on the queries of the facts with both."""
    return _suppressed(adapter, baseline_requests(queries, sets, zero_sets), few_shot, encoded, batch_size, answer_token)


def run_controls(adapter: ModelAdapter, queries: Sequence[Query], lolo_sets: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 sets: NeuronSetsLike, seed: int, few_shot: bool, batch_size: int = 32,
                 zero_maps: Mapping[str, np.ndarray] | None = None, layer_norm: str = "abs",
                 answer_token: str = "first") -> ControlResult:
    """Every control on the attributed facts' queries (each query encoded once for all); the baseline
    comparison only with ``zero_maps`` (query id -> raw zero-baseline map). ``answer_token``: ΔP of
    the first token or of the whole answer, as in manipulation."""
    donors = query_donors(queries, seed)  # one choice for LOLO's and specificity's same-relation donor
    result = ControlResult(donors=donors)
    zero = zero_baseline_sets(queries, zero_maps, sets, layer_norm) if zero_maps else {}
    result.zero_sets = {f: z.tolist() for f, z in zero.items()}
    parts = {"lolo": lolo_requests(queries, lolo_sets, sets, donors),
             "specificity": specificity_requests(queries, sets, donors),
             "baselines": baseline_requests(queries, sets, zero)}
    # every control's rows in one scoring call: each query's prompt and unedited row once
    scored = iter(manipulate_many(adapter, [r for rs in parts.values() for r in rs], SUPPRESS, few_shot,
                                  batch_size=batch_size, progress=False, answer_token=answer_token))
    for name, requests in parts.items():
        setattr(result, name, [record for _ in requests for record in next(scored).records])
    return result


def write_outputs(result: ControlResult, out: RunOutputs, is_evaluation: Callable[[str], bool],
                  relation_of: RelationOf) -> None:
    """The result and, for `dvc metrics`, the estimates the report shows (:func:`control_metrics`)."""
    controls = result.to_dict()
    out.json("controls.json", controls)
    out.json("controls_metrics.json", {"controls": control_metrics(controls, is_evaluation, relation_of)})


def control_metrics(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool], relation_of: RelationOf
                    ) -> dict[str, dict[str, float]]:
    """The report's numbers, suppression ΔP/P each fact's mean then each relation's: LOLO's and the
    baselines' table cells (``method/lang``, the languages the tables show) and each specificity
    method's estimate over every language, as its verdict rows use it."""
    langs = report_languages(controls["lolo"])
    tables = {"lolo": lolo_estimates(controls, is_evaluation, langs, relation_of),
              "baselines": baseline_estimates(controls, is_evaluation, langs, relation_of)}
    metrics = {part: {f"{m}/{lang}": e.mean for m, cells in per_method.items() for lang, e in zip(langs, cells)
                      if e.mean is not None} for part, per_method in tables.items()}
    scored, _ = scored_queries(controls.get("specificity", []), is_evaluation)
    specificity = {m: relation_mean(_suppression(controls.get("specificity", []), m, scored), relation_of).mean
                   for m in SPECIFICITY_METHODS}
    metrics["specificity"] = {m: v for m, v in specificity.items() if v is not None}
    return metrics


def lolo_estimates(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool], languages: Sequence[str],
                   relation_of: RelationOf = relation_prefix) -> dict[str, list[Estimate]]:
    """{method: [suppression ΔP/P per held-out language]}: LOLO and its controls on every query of the
    language, MATRICE's full set on its evaluation queries (it saw the language's others)."""
    lolo = controls.get("lolo", [])
    out = {}
    for method in ("lolo", LOLO_DONOR, "lolo_random_layer", "matrice"):
        if any(r["method"] == method for r in lolo):
            keep = (lambda r: is_evaluation(r["query_id"])) if method == "matrice" else (lambda r: True)
            out[method] = _per_language(lolo, method, keep, languages, relation_of)
    return out


def baseline_estimates(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool], languages: Sequence[str],
                       relation_of: RelationOf = relation_prefix) -> dict[str, list[Estimate]]:
    """{method: [suppression ΔP/P per language]} of AMIG's size-matched set and the zero baseline's,
    on evaluation queries."""
    records = controls.get("baselines", [])
    scored, _ = scored_queries(records, is_evaluation)
    return {method: _per_language(records, method, scored, languages, relation_of)
            for method in BASELINE_METHODS if any(r["method"] == method for r in records)}


# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

def _suppression(records: Sequence[Mapping[str, Any]], method: str, keep: Callable[[Mapping[str, Any]], bool]
                 ) -> dict[str, float]:
    """Per fact: mean over languages of the mean ΔP/P over the kept queries of that language, so every
    language weighs the same whatever its number of encodable queries."""
    per_lang: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        if r["method"] == method and r["delta_p"] is not None and keep(r):
            per_lang[(r["fact_id"], r["lang"])].append(r["delta_p"])
    by_fact: dict[str, list[float]] = defaultdict(list)
    for (fact, _), values in per_lang.items():
        by_fact[fact].append(float(np.mean(values)))
    return {f: float(np.mean(v)) for f, v in by_fact.items()}



def control_claims(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                   relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """The paper's premises as tests: LAKNs selected without a language still suppress the answer in
    it (language-agnostic), and a fact's LAKNs suppress it more than another fact's do (specific)."""
    out = []
    lolo = controls.get("lolo", [])
    if lolo:
        out.append(make_claim(
            "LOLO", "LAKNs are language-agnostic: selected from the other languages, suppressing them lowers "
            "P(answer) in the held-out language more than random neurons do", f"ΔP/P {method_name('lolo')} − {method_name('lolo_random_layer')} (suppress)",
            "less", "every query of the held-out language (none reached selection)",
            _suppression(lolo, "lolo", lambda r: True), _suppression(lolo, "lolo_random_layer", lambda r: True),
            key="lolo_vs_random_layer", metric="delta_p", relation_of=relation_of))
        if any(r["method"] == LOLO_DONOR for r in lolo):
            own = _suppression(lolo, "lolo", lambda r: True)
            donor = _suppression(lolo, LOLO_DONOR, lambda r: True)
            out.append(make_claim(
                "LOLO", "LAKNs selected without a language carry the fact, not only its relation: they suppress it "
                "in the held-out language more than another fact's of the same relation (also selected without it) do",
                f"ΔP/P {method_name('lolo')} − {method_name(LOLO_DONOR)} (suppress)", "less",
                "every query of the held-out language (none reached either selection)",
                {f: own[f] for f in donor if f in own}, donor, key="lolo_vs_same_relation_donor", metric="delta_p",
                relation_of=relation_of))
    base = controls.get("baselines", [])
    if base:
        scored, have_eval = scored_queries(base, is_evaluation)
        out.append(make_claim(
            "AMIG (baseline)", "AMIG's all-PAD baseline localises the fact better than the zero baseline (Dai et al.): "
            "its set suppresses P(answer) more than the zero baseline's set of the same size",
            f"ΔP/P {method_name('amig_k')} − {method_name('zero_k')} (suppress)", "less",
            "evaluation queries of the fact" if have_eval else "all queries of the fact",
            _suppression(base, "amig_k", scored), _suppression(base, "zero_k", scored),
            key="amig_baseline_vs_zero", metric="delta_p", relation_of=relation_of))
    spec = controls.get("specificity", [])
    if spec:
        scored, have_eval = scored_queries(spec, is_evaluation)
        split = "evaluation queries of the target fact" if have_eval else "all queries of the target fact"
        own = _suppression(spec, "own", scored)
        for donor in ("same_relation", "other_relation"):
            out.append(make_claim(
                "Specificity", "a fact's LAKNs suppress it more than the LAKNs of "
                + ("another fact of its relation" if donor == "same_relation" else "a fact of another relation") + " do",
                f"ΔP/P own − {donor.replace('_', ' ')} donor (suppress)", "less", split,
                own, _suppression(spec, donor, scored), key=f"specificity_vs_{donor}", metric="delta_p",
                relation_of=relation_of))
    return out



def lolo_interval_table(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool], languages: Sequence[str],
                        relation_of: RelationOf = relation_prefix) -> str:
    """Suppression ΔP/P in each held-out language: LOLO, its layer-matched random control (every query of
    the language) and MATRICE's full set (evaluation queries only, as it saw the language's others)."""
    if not controls.get("lolo"):
        return "No leave-one-language-out records in this run.\n"
    return _language_table(lolo_estimates(controls, is_evaluation, languages, relation_of), languages)


def _per_language(records: Sequence[Mapping[str, Any]], method: str, keep: Callable[[Mapping[str, Any]], bool],
                  languages: Sequence[str], relation_of: RelationOf) -> list[Estimate]:
    return [relation_mean(_suppression(records, method, lambda r, lang=lang: r["lang"] == lang and keep(r)), relation_of)
            for lang in languages]


def _language_table(per_method: Mapping[str, Sequence[Estimate]], languages: Sequence[str]) -> str:
    lines = ["| method | " + " | ".join(languages) + " |", "|---|" + "---|" * len(languages)]
    lines += [f"| {method_name(method)} | " + " | ".join(e.format(2) for e in cells) + " |"
              for method, cells in per_method.items()]
    return "\n".join(lines) + "\n"


def baseline_table(controls: Mapping[str, Any], is_evaluation: Callable[[str], bool], languages: Sequence[str],
                   relation_of: RelationOf = relation_prefix) -> str:
    """Suppression ΔP/P per language of AMIG's size-matched set and the zero baseline's (evaluation queries)."""
    return _language_table(baseline_estimates(controls, is_evaluation, languages, relation_of), languages)


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    controls = run.json("controls.json")
    langs = report_languages(controls["lolo"])
    donors = controls["donors"]
    pairs = ", ".join(f"{f} ← {d['same_relation']} / {d['other_relation']}" for f, d in sorted(donors.items()))
    return (
        "### Controls: leave-one-language-out and specificity\nLeave-one-language-out: for each language, LAKNs are "
        "selected from the other languages (UaL without it, same τ) and suppressed (×0) on the fact's queries in "
        "the held-out one, which no part of their selection saw; the controls are as many random neurons per layer, "
        "and the LOLO set of another attributed fact of the same relation (selected without the language too). "
        f"ΔP/P per held-out language, {CELL}:\n\n"
        + lolo_interval_table(controls, run.is_evaluation, langs, run.relation_of)
        + "\nSpecificity: each fact's evaluation queries under suppression of its own LAKNs, of another attributed "
        f"fact's of the same relation, and of a fact's of another relation (target ← same / other: {pairs}); the "
        "verdict rows above compare them"
        + (". No attributed fact has another attributed fact of its relation, so the same-relation row has no data: "
           "it needs `attribute.facts_per_relation` ≥ 2.\n" if all(d["same_relation"] is None for d in donors.values())
           else ".\n")
        + _baseline_section(run, controls, langs)
    )


def _baseline_section(run: RunResults, controls: Mapping[str, Any], langs: Sequence[str]) -> str:
    if not controls.get("baselines"):
        return "\nAMIG's baseline against the zero baseline: no zero-baseline attribution in this run.\n"
    return ("\nAMIG's baseline against the zero baseline (Dai et al.): the same first queries attributed with each, "
            "turned into sets the same way (intersection over languages, top-k with k = MATRICE's count), suppressed "
            f"(×0) on the fact's evaluation queries; ΔP/P per language, {CELL}:\n\n"
            + baseline_table(controls, run.is_evaluation, langs, run.relation_of))
