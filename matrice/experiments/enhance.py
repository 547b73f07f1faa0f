"""Knowledge enhancement in low-resource languages (paper §IV-G, Fig. 6).

Q_error = the queries in the low-resource languages (default fi, hu, ja, ko) that the probe marked
incorrect, so the accuracy on Q_error before enhancement is 0 by construction. For each fact and
method, the fact's neurons are doubled at the target position (``scaled_rows.scaling_set(pairs, 2)``,
kept at the original target position while the answer is decoded) and the queries are re-decoded
greedily; the accuracy gained is the share now answered correctly. Every (query, method) row of
all facts is decoded in shared batches over the prompts' cached prefixes
(:func:`matrice.models.scaled_rows.decode_scaled_rows`).

Choices where the paper is silent:
- A fact with an empty neuron set is a no-op: its Q_error queries stay wrong (gain 0, no forward
  pass) and are counted (``empty_facts``, ``n_empty``), not dropped.
- The unedited model is re-decoded once as a consistency check: ``n_probe_mismatch`` counts Q_error
  queries it answers correctly (the probe and this run disagree, e.g. a different few-shot
  setting); they stay in Q_error because the probe defines it.
- A query without a probe record is not in Q_error; it is counted (``n_unprobed``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from matrice.data.schema import Query
from matrice.evaluation.claims import (BASELINES, CELL, Claim, RelationOf, empty_counts, make_claim, method_name, relation_prefix,
                            scored_queries)
from matrice.experiments import (
    NeuronSetsLike, ProbesLike, as_probe_map, dataclass_dict, encode_all, fact_neurons, fact_rows, group_by_fact,
)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import is_correct
from matrice.models.scaled_rows import decode_scaled_rows, scaling_set
from matrice.models.whole_answer import score_rows
from matrice.evaluation.stats import RATE, Estimate, per_fact_mean, relation_mean
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, not_drawn_note, plot_enhancement, split_empty, wide_rows

log = logging.getLogger(__name__)

LOW_RESOURCE: tuple[str, ...] = ("fi", "hu", "ja", "ko")


@dataclass(frozen=True)
class EnhancementRecord:
    query_id: str
    fact_id: str
    relation: str
    lang: str
    method: str
    n_neurons: int
    correct_after: bool
    prediction: str


@dataclass
class EnhancementResult:
    """``records``: one per (Q_error query, method). ``by_relation`` / ``by_lang`` /
    ``by_lang_relation`` / ``overall``: rows with n_queries, n_correct_after, accuracy_before (0),
    accuracy_after, accuracy_gain and n_empty (queries whose fact has no neurons for the method)."""

    languages: list[str] = field(default_factory=list)
    factor: float = 2.0
    records: list[EnhancementRecord] = field(default_factory=list)
    by_relation: list[dict[str, Any]] = field(default_factory=list)
    by_lang: list[dict[str, Any]] = field(default_factory=list)
    by_lang_relation: list[dict[str, Any]] = field(default_factory=list)
    overall: list[dict[str, Any]] = field(default_factory=list)
    empty_facts: dict[str, list[str]] = field(default_factory=dict)
    n_q_error: int = 0
    n_probe_mismatch: int = 0
    n_unprobed: int = 0
    unencodable: dict[str, str] = field(default_factory=dict)

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        d = {
            "languages": self.languages, "factor": self.factor, "n_q_error": self.n_q_error,
            "n_probe_mismatch": self.n_probe_mismatch, "n_unprobed": self.n_unprobed,
            "unencodable": self.unencodable,
            "empty_facts": self.empty_facts, "n_empty_facts": {m: len(v) for m, v in self.empty_facts.items()},
            "overall": self.overall, "by_lang": self.by_lang, "by_relation": self.by_relation,
            "by_lang_relation": self.by_lang_relation,
        }
        if with_records:
            d["records"] = [dataclass_dict(r) for r in self.records]
        return d


def _rows(records: Sequence[EnhancementRecord], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[EnhancementRecord]] = defaultdict(list)
    for r in records:
        groups[tuple(getattr(r, k) for k in keys)].append(r)
    rows = []
    for key in sorted(groups):
        rs = groups[key]
        n_ok = sum(r.correct_after for r in rs)
        rows.append({
            **dict(zip(keys, key)), "n_queries": len(rs), "n_correct_after": n_ok,
            "accuracy_before": 0.0, "accuracy_after": n_ok / len(rs), "accuracy_gain": n_ok / len(rs),
            "n_empty": sum(r.n_neurons == 0 for r in rs), "n_facts": len({r.fact_id for r in rs}),
        })
    return rows


def q_error(queries: Sequence[Query], probes: ProbesLike, languages: Sequence[str] = LOW_RESOURCE) -> tuple[list[Query], int]:
    """(queries in ``languages`` the probe marked incorrect, number of those queries without a probe record)."""
    pm = as_probe_map(probes)
    langs = set(languages)
    chosen = [q for q in queries if q.lang in langs and q.query_id in pm and not pm[q.query_id].correct]
    unprobed = sum(1 for q in queries if q.lang in langs and q.query_id not in pm)
    return chosen, unprobed


Answer = tuple[list[int], bool]  # (the answer's tokens as predicted, correct)


def _answer_all(adapter: ModelAdapter, encs: Mapping[str, Encoded], by_fact: Mapping[str, Sequence[Query]],
                neurons: Mapping[tuple[str, str], Any], methods: Sequence[str], factor: float, batch_size: int,
                progress: bool, answer_token: str = "first") -> dict[tuple[str, str | None], list[Answer]]:
    """Every fact's queries answered unedited (key (fact, None)) and with each non-empty method's neurons
    scaled (key (fact, method)): all facts' rows in shared batches. First token: greedy decoding with
    the neurons scaled at the target, correct as the probe judges it. Whole answers: each answer token's
    teacher-forced row scaled at its own position; correct when every token is top-1 (the greedy
    output is the answer), the prediction the top token of each step."""
    plan = fact_rows(by_fact, lambda fid: [(m, scaling_set(neurons[(fid, m)], factor)) for m in methods])
    log.info("enhancement: %d facts, %d (query, edit) rows (answer_token %s)", len(by_fact), len(plan.rows),
             answer_token)
    encodings, label = [encs[q] for q in plan.query_ids], "enhancement" if progress else None
    if answer_token == "first":
        query_of = {q.query_id: q for fqs in by_fact.values() for q in fqs}
        answers = [query_of[plan.query_ids[q]].answer for q, _ in plan.rows]
        decoded = decode_scaled_rows(adapter, encodings, plan.scalings, plan.rows, batch_size, progress=label)
        return plan.per_key([(g, bool(is_correct(adapter, g, a))) for g, a in zip(decoded, answers)])
    scores = score_rows(adapter, encodings, plan.scalings, plan.rows, answer_token, batch_size, progress=label)
    return plan.per_key([([s.top_token, *s.top_rest], s.rank == 0) for s in scores])


def enhance_low_resource(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    probes: ProbesLike,
    sets: NeuronSetsLike,
    methods: Sequence[str] = ("matrice", "amig", "random"),
    languages: Sequence[str] = LOW_RESOURCE,
    factor: float = 2.0,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    answer_token: str = "first",
) -> EnhancementResult:
    """Accuracy gained on Q_error by scaling each fact's neurons by ``factor`` (module docstring);
    ``answer_token: all`` scales them at every answer token's position (:func:`_answer_all`)."""
    errors, unprobed = q_error(queries, probes, languages)
    encs, failed = encode_all(adapter, errors, few_shot, encoded)
    by_fact = group_by_fact(q for q in errors if q.query_id in encs)
    neurons = {(fid, m): fact_neurons(sets, fid, m, adapter) for fid in by_fact for m in methods}
    result = EnhancementResult(languages=list(languages), factor=factor, empty_facts={m: [] for m in methods},
                               n_q_error=sum(len(v) for v in by_fact.values()), n_unprobed=unprobed,
                               unencodable=failed)
    if unprobed:
        log.warning("%d queries in %s have no probe record and are not in Q_error", unprobed, list(languages))

    tok = adapter.tokenizer
    answered = _answer_all(adapter, encs, by_fact, neurons, methods, factor, batch_size, progress, answer_token)
    for fid, fqs in by_fact.items():
        base = answered[(fid, None)]
        result.n_probe_mismatch += sum(ok for _, ok in base)
        for method in methods:
            pairs = neurons[(fid, method)]
            if len(pairs) == 0:
                result.empty_facts[method].append(fid)
                outs, oks = [g for g, _ in base], [False] * len(fqs)  # no-op: as wrong as the probe says
            else:
                outs, oks = [g for g, _ in answered[(fid, method)]], [ok for _, ok in answered[(fid, method)]]
            for q, g, ok in zip(fqs, outs, oks):
                result.records.append(EnhancementRecord(
                    q.query_id, fid, q.relation, q.lang, method, int(len(pairs)), bool(ok),
                    tok.decode(list(g), skip_special_tokens=True),
                ))
    if result.n_probe_mismatch:
        log.warning("%d Q_error queries are answered correctly by the unedited model here: probe/experiment "
                    "settings differ (few_shot?)", result.n_probe_mismatch)
    result.by_relation = _rows(result.records, ("method", "relation"))
    result.by_lang = _rows(result.records, ("method", "lang"))
    result.by_lang_relation = _rows(result.records, ("method", "lang", "relation"))
    result.overall = _rows(result.records, ("method",))
    return result


# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

def enhancement_claims(enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                       relation_of: RelationOf = relation_prefix,
                       empty: Mapping[str, Sequence[str]] | None = None) -> list[Claim]:
    """Fig. 6: accuracy gained on Q_error (low-resource languages) per fact. `empty`: method -> facts
    whose set is empty (from the selection), counted among the facts this experiment scored."""
    records = enhancement["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    split = "Q_error, evaluation queries" if have_eval else "Q_error (no held-out ones in this run)"
    facts = {r["fact_id"] for r in records}
    empty = {m: [f for f in fs if f in facts] for m, fs in (empty or {}).items()}

    def gain(method: str) -> dict[str, float]:
        return per_fact_mean(records, lambda r: float(r["correct_after"]),
                             lambda r: r["method"] == method and scored(r))

    methods = {r["method"] for r in records}
    n_facts = len({r["fact_id"] for r in records})
    return [
        make_claim("Fig. 6", f"{method_name(a)} gains more accuracy than {method_name(b)}",
               f"accuracy gain {method_name(a)} − {method_name(b)}", "greater", split, gain(a), gain(b),
               key=f"fig6_{a}_vs_{b}", metric="accuracy", relation_of=relation_of,
               empty=empty_counts(empty, a, b), n_facts=n_facts)
        for a, b in (*(("matrice", m) for m in BASELINES), ("amig", "random"))
        if a in methods and b in methods
    ]



def enhancement_estimates(enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool], group: str,
                          groups: Sequence[str | None], relation_of: RelationOf = relation_prefix
                          ) -> tuple[dict[str, list[Estimate]], bool]:
    """``({method: [Estimate per group value]}, on evaluation queries?)``: accuracy gained on Q_error,
    each fact's mean over its scored queries with ``record[group] == value`` (None: all), then `relation_mean`."""
    records = enhancement["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    methods = list(dict.fromkeys(r["method"] for r in records))
    return {method: [relation_mean(per_fact_mean(
        records, lambda r: float(r["correct_after"]),
        lambda r: r["method"] == method and scored(r) and value in (None, r[group])), relation_of, bounds=RATE)
        for value in groups]
        for method in methods}, have_eval



def enhancement_interval_table(enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                               languages: Sequence[str], relation_of: RelationOf = relation_prefix) -> str:
    """Fig. 6: accuracy gained on Q_error per method and language (and all languages), each fact's mean
    over its Q_error queries, then `CELL`."""
    estimates, have_eval = enhancement_estimates(enhancement, is_evaluation, "lang", [*languages, None], relation_of)
    lines = ["| method | " + " | ".join([*languages, "all"]) + " |", "|---|" + "---|" * (len(languages) + 1)]
    for method, cells in estimates.items():
        lines.append(f"| {method_name(method)} | " + " | ".join(e.format(2) for e in cells) + " |")
    split = "evaluation queries" if have_eval else "all queries"
    return f"Accuracy gained on Q_error ({split}): {CELL}\n\n" + "\n".join(lines) + "\n"


# ---- its outputs ----------------------------------------------------------------------------------

def write_outputs(enhancement: Mapping[str, Any], out: RunOutputs, is_evaluation: Callable[[str], bool],
                  relation_of: RelationOf, sets: Any) -> None:
    """The result, its metrics, the `dvc plots` rows per relation, Fig. 6 and the interval table; every
    number on Q_error evaluation queries, each fact's mean, then each relation's."""
    out.json("enhancement.json", enhancement)
    languages = enhancement["languages"]
    overall, have_eval = enhancement_estimates(enhancement, is_evaluation, "lang", [None], relation_of)
    out.json("enhancement_metrics.json", {"enhancement": {
        m: {"accuracy_gain": cells[0].mean, "n_relations": cells[0].n} for m, cells in overall.items()}})
    names = sorted({r["relation"] for r in enhancement["by_relation"]})
    per_relation, _ = enhancement_estimates(enhancement, is_evaluation, "relation", names, relation_of)
    out.json("enhancement_plot.json", wide_rows("relation", per_relation, names))
    shown, empty = split_empty(sets, list(per_relation))
    plot_enhancement({method_name(m): per_relation[m] for m in shown}, names, out.figure("fig6_enhancement.png"),
                     f"Fig. 6 — {out.model}: enhancement in {', '.join(languages)}, "
                     + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    scored = [lang for lang in languages if any(r["lang"] == lang for r in enhancement["by_lang"])]
    out.text("enhancement_tables.md",
             f"Q_error: the queries the model got wrong in {', '.join(languages)}; ×{enhancement['factor']} "
             "on the fact's neurons.\n\n" + enhancement_interval_table(enhancement, is_evaluation, scored, relation_of))


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    return ("### Enhancement in low-resource languages (Fig. 6)\nAccuracy gained on queries the model got wrong "
            "(accuracy before is 0 by construction) when the fact's neurons are doubled.\n\n"
            + run.figure_and_table("fig6_enhancement.png", f"Fig. 6 — enhancement in low-resource languages, {run.key}",
                                   "enhancement_tables.md"))
