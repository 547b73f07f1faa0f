"""Cross-lingual knowledge editing through the neurons' output weights (paper §IV-F, Tables III, IV).

For each fact and method, with the edit made once "in English" and evaluated in every language:

- **erasure**: every neuron's output vector (its column of the FFN output projection; row of GPT-2's
  Conv1D) is set to 0;
- **update**: it is set to ``W − λ1·E(o) + λ2·E(o')`` where E is the unembedding row of the first
  answer token of the object in English (Eq. 15 with raw λ, as Dai et al.'s code adds raw
  embeddings; λ1 = λ2 = 1 by default). ``scaling="column_norm"`` is our option: λk' = λk·‖W‖/‖E‖,
  so each term has norm λk·‖W‖ (see :func:`matrice.interventions.update_vectors`).

Metrics per (method, operation, language), micro-averaged over queries:

- **reliability** on the fact's original query of the language (lowest template id, i.e. template 0);
- **generality** on its other paraphrases in that language;
- **locality** on the original queries of ``locality_k`` other facts (seeded sample per edited fact):
  success when the top-1 token is the same as before the edit.

Success for erasure: the gold first token is no longer top-1 (rank > 0). With ``erasure_known_only``
(default) only queries whose gold first token *was* top-1 before the edit are scored (others are
counted in ``n_unknown``): erasing knowledge the model never expressed would count as success for
free. Success for update: the new object's first token is top-1, where the new object is tokenised
*in that language and in the query's context* (the query re-encoded with o's label replaced by o''s
label in that language; for masked models that also sets the number of [MASK] tokens to o''s length).

Choices where the paper is silent:
- E(o), E(o'): the first answer token of the English original query *as encoded in context* (what
  the target position predicts and what reliability scores). For masked models and whenever the
  context/answer boundary merges this is ``encoding.answer_ids_alone``; for causal models it is the
  first token of the answer as it follows the prompt (Llama's SentencePiece can tokenise a lone
  " Paris" differently).
- o' is the English object of another fact of the same relation whose English label differs and
  whose first token differs from o's; one is drawn per fact with ``experiment_rng(seed, "new_object",
  fact_id)`` and shared by all methods. A fact with no such candidate is not updated (counted).
  Its labels in other languages come from that fact's queries; a language without one is skipped
  for the update (counted).
- A fact with an empty neuron set is evaluated as a no-op edit (counted per method), not dropped.
- Unrelated facts for locality: any other fact (any relation).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from matrice.claims import (BASELINES, CELL, Claim, RelationOf, empty_counts, empty_note, make_claim, method_name,
                            relation_prefix)
from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, dataclass_dict, encode_all, fact_neurons, group_by_fact, original_queries
from matrice.experiments.edit_targets import choose_new_object, locality_sampler
from matrice.interventions import UPDATE_SCALINGS, edited_output_weights, erasure_vectors, update_vectors
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import AnswerScore, score_answers
from matrice.models.replay import recorded_blocks, replayed_below
from matrice.stats import Estimate, pooled_ratio, relation_mean
from matrice.report import RunResults

log = logging.getLogger(__name__)

OPERATIONS: tuple[str, ...] = ("erasure", "update")


@dataclass(frozen=True)
class EditConfig:
    """Editing parameters: λ1, λ2 of Eq. 15 (relative to the column norm), the language edited in,
    the number of unrelated facts for locality, the seed for o' and the locality sample, and whether
    erasure is scored only on queries the model answered (top-1) before the edit."""

    lambda1: float = 1.0
    lambda2: float = 1.0
    scaling: str = "raw"  # raw: Eq. 15 as written | column_norm: λ relative to the column's norm
    source_lang: str = "en"
    locality_k: int = 4
    seed: int = 0
    erasure_known_only: bool = True
    batch_size: int = 32

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "EditConfig":
        s = params["edit"]
        return cls(lambda1=s["lambda1"], lambda2=s["lambda2"], scaling=s.get("scaling", "raw"), locality_k=s["locality_k"],
                   seed=params["seed"], batch_size=s["batch_size"])

    def __post_init__(self) -> None:
        if self.locality_k < 0:
            raise ValueError(f"locality_k must be >= 0, got {self.locality_k}")
        if self.scaling not in UPDATE_SCALINGS:
            raise ValueError(f"scaling must be one of {UPDATE_SCALINGS}, got {self.scaling!r}")


@dataclass(frozen=True)
class EditRecord:
    """Counts for one (fact, method, operation, language)."""

    fact_id: str
    relation: str
    method: str
    operation: str
    lang: str
    n_neurons: int
    rel_n: int
    rel_ok: int
    gen_n: int
    gen_ok: int
    loc_n: int
    loc_ok: int
    n_unknown: int  # erasure with erasure_known_only: queries not top-1 before, not scored
    new_object: str | None  # update: o' in this language


@dataclass
class EditResult:
    """``records``: per (fact, method, operation, lang). ``summary``: per (method, operation, lang)
    reliability / generality / locality (None without samples) and counts, plus an ``"average"``
    language row (mean over languages, the tables' "average"). ``skipped``: why facts or queries were
    left out (counts), ``empty_facts[method]``: facts edited as a no-op. ``new_objects``: o' per fact."""

    config: dict[str, Any] = field(default_factory=dict)
    records: list[EditRecord] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, Any] = field(default_factory=dict)
    empty_facts: dict[str, list[str]] = field(default_factory=dict)
    new_objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        d = {
            "config": self.config,
            "summary": self.summary,
            "skipped": self.skipped,
            "empty_facts": self.empty_facts,
            "n_empty_facts": {m: len(v) for m, v in self.empty_facts.items()},
            "new_objects": self.new_objects,
        }
        if with_records:
            d["records"] = [dataclass_dict(r) for r in self.records]
        return d


def _ratio(ok: int, n: int) -> float | None:
    return ok / n if n else None


def summarise_edits(records: Sequence[EditRecord]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[EditRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.operation, r.lang)].append(r)
    rows = []
    for method, op in sorted({(m, o) for m, o, _ in groups}):
        lang_rows = []
        for lang in sorted({l for m, o, l in groups if (m, o) == (method, op)}):
            rs = groups[(method, op, lang)]
            tot = {k: sum(getattr(r, k) for r in rs) for k in ("rel_n", "rel_ok", "gen_n", "gen_ok", "loc_n", "loc_ok", "n_unknown")}
            lang_rows.append({
                "method": method, "operation": op, "lang": lang,
                "reliability": _ratio(tot["rel_ok"], tot["rel_n"]),
                "generality": _ratio(tot["gen_ok"], tot["gen_n"]),
                "locality": _ratio(tot["loc_ok"], tot["loc_n"]),
                "n_facts": len({r.fact_id for r in rs}),
                "n_empty_facts": len({r.fact_id for r in rs if r.n_neurons == 0}),
                **tot,
            })
        avg = {"method": method, "operation": op, "lang": "average"}
        for metric in ("reliability", "generality", "locality"):
            vals = [r[metric] for r in lang_rows if r[metric] is not None]
            avg[metric] = float(np.mean(vals)) if vals else None
        rows += lang_rows + [avg]
    return rows


def edit_facts(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    sets: NeuronSetsLike,
    methods: Sequence[str] = ("matrice", "amig", "random"),
    operations: Sequence[str] = OPERATIONS,
    cfg: EditConfig | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    facts: Sequence[str] | None = None,
    progress: bool = True,
) -> EditResult:
    """Edit every fact (or the given ``facts``) with each method and operation; see the module doc.

    Every edit runs inside :func:`matrice.interventions.edited_output_weights`, which restores the
    weights and asserts bit-for-bit restoration after each edit.
    """
    cfg = cfg or EditConfig()
    bad_ops = [o for o in operations if o not in OPERATIONS]
    if bad_ops:
        raise ValueError(f"unknown edit operations {bad_ops}; choose from {OPERATIONS}")
    encs, failed = encode_all(adapter, queries, few_shot, encoded)
    by_fact = group_by_fact(q for q in queries if q.query_id in encs)
    originals = {fid: original_queries(fqs) for fid, fqs in by_fact.items()}
    sample_locality = locality_sampler(list(by_fact), cfg.locality_k, cfg.seed)
    by_relation: dict[str, list[str]] = defaultdict(list)
    for f, fqs in by_fact.items():
        by_relation[fqs[0].relation].append(f)
    targets = list(by_fact) if facts is None else list(facts)
    unknown = [f for f in targets if f not in by_fact]
    if unknown:
        raise KeyError(f"facts {unknown[:5]} have no (encodable) queries")
    neurons = {(fid, m): fact_neurons(sets, fid, m, adapter) for fid in targets for m in methods}

    result = EditResult(config=dict(cfg.__dict__), empty_facts={m: [] for m in methods})
    skipped: dict[str, Any] = {"unencodable_queries": len(failed), "no_source_query": [], "no_new_object": [],
                               "update_queries_without_label": 0, "update_queries_unencodable": 0}
    lang_of = {q.query_id: q.lang for fqs in by_fact.values() for q in fqs}

    def score(encodings: list[Encoded]) -> list[AnswerScore]:
        # the same batches and forward calls for every pass, so an edited pass can replay the unedited
        # blocks below its edit (their cache entries for a shared demonstration prefix included)
        return score_answers(adapter, encodings, batch_size=cfg.batch_size)

    for fid in tqdm(targets, desc="editing", unit="fact", disable=not progress):
        fqs = by_fact[fid]
        orig = originals[fid]
        src = orig.get(cfg.source_lang)
        if src is None:
            skipped["no_source_query"].append(fid)
            continue
        gold_token = encs[src.query_id].answer_ids[0]
        relation = fqs[0].relation
        orig_ids = {q.query_id for q in orig.values()}
        fact_ids = [q.query_id for q in fqs]
        loc_ids = [q.query_id for f in sample_locality(fid) for q in originals[f].values()]
        loc_encs = [encs[q] for q in loc_ids]
        fact_langs = sorted({q.lang for q in fqs})

        new = None
        upd_encs: dict[str, Encoded] = {}
        if "update" in operations:
            new = choose_new_object(adapter, fid, by_fact, gold_token, cfg.source_lang, cfg.seed, few_shot,
                                    pool=by_relation[relation])
            if new is None:
                skipped["no_new_object"].append(fid)
            else:
                result.new_objects[fid] = {"from_fact": new.fact_id, "labels": new.labels, "token": new.token,
                                           "old_token": int(gold_token)}
                for q in fqs:
                    label = new.labels.get(q.lang)
                    if label is None:
                        skipped["update_queries_without_label"] += 1
                        continue
                    try:
                        upd_encs[q.query_id] = encode_query(adapter, replace(q, answer=label), few_shot)
                    except ValueError:
                        skipped["update_queries_unencodable"] += 1
        # the unedited model on exactly the batches the edited one sees (same shapes, so an empty
        # set reproduces it exactly and near-ties cannot flip between batch compositions)
        probes_of = {"erasure": (fact_ids, [encs[q] for q in fact_ids]),
                     "update": (list(upd_encs), list(upd_encs.values()))}
        base: dict[str, list[AnswerScore]] = {}
        unedited_blocks: dict[str, list] = {}
        for op in operations:
            if op == "update" and new is None:
                continue
            with recorded_blocks(adapter) as unedited_blocks[op]:
                base[op] = score(probes_of[op][1] + loc_encs)
        before = dict(zip(fact_ids, base["erasure"])) if "erasure" in base else {}  # erasure only

        for method in methods:
            pairs = neurons[(fid, method)]
            if len(pairs) == 0:
                result.empty_facts[method].append(fid)
            for op in base:
                probe_ids, probe_encs = probes_of[op]
                loc_before = base[op][len(probe_ids):]
                if len(pairs) == 0:  # a no-op edit: the unedited model's scores
                    scores = base[op]
                else:
                    vectors = (erasure_vectors(adapter, pairs) if op == "erasure" else
                               update_vectors(adapter, pairs, gold_token, new.token, cfg.lambda1, cfg.lambda2,
                                              cfg.scaling))
                    with edited_output_weights(adapter, vectors), \
                            replayed_below(adapter, unedited_blocks[op], int(pairs[:, 0].min())):
                        scores = score(probe_encs + loc_encs)
                fact_after, loc_after = scores[: len(probe_ids)], scores[len(probe_ids):]

                counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
                for qid, s in zip(probe_ids, fact_after):
                    c = counts[lang_of[qid]]
                    kind = "rel" if qid in orig_ids else "gen"
                    if op == "erasure":
                        if cfg.erasure_known_only and before[qid].rank != 0:
                            c["n_unknown"] += 1
                            continue
                        ok = s.rank > 0
                    else:
                        ok = s.rank == 0
                    c[f"{kind}_n"] += 1
                    c[f"{kind}_ok"] += int(ok)
                for qid, s, b in zip(loc_ids, loc_after, loc_before):
                    c = counts[lang_of[qid]]
                    c["loc_n"] += 1
                    c["loc_ok"] += int(s.top_token == b.top_token)
                for lang in sorted(set(fact_langs) | set(counts)):
                    c = counts[lang]
                    result.records.append(EditRecord(
                        fid, relation, method, op, lang, int(len(pairs)),
                        c["rel_n"], c["rel_ok"], c["gen_n"], c["gen_ok"], c["loc_n"], c["loc_ok"], c["n_unknown"],
                        new.labels.get(lang) if (op == "update" and new is not None) else None,
                    ))
    result.skipped = {**skipped, "n_no_source_query": len(skipped["no_source_query"]),
                      "n_no_new_object": len(skipped["no_new_object"])}
    result.summary = summarise_edits(result.records)
    return result


# ---- claims: the paper's statements about this experiment, tested (matrice.claims) ----------------

def editing_claims(editing: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Tables III/IV: reliability per fact, pooled over languages (edited in English)."""
    records = editing["records"]
    n_facts = len({r["fact_id"] for r in records})

    def reliability(method: str, operation: str) -> dict[str, float]:
        return pooled_ratio([r for r in records if r["method"] == method and r["operation"] == operation], "rel_ok", "rel_n")

    methods = {r["method"] for r in records}
    empty = editing.get("empty_facts", {})
    out = []
    for operation, table in (("erasure", "Table III"), ("update", "Table IV")):
        pairs = [*(("matrice", m) for m in BASELINES), ("amig", "random")]
        for a, b in pairs:
            if a in methods and b in methods:
                out.append(make_claim(
                    table, f"{method_name(a)}'s {operation} is more reliable than {method_name(b)}'s",
                    f"{operation} reliability {method_name(a)} − {method_name(b)}", "greater", "edited query, every language (attributed)",
                    reliability(a, operation), reliability(b, operation),
                    empty_note(empty, "amig", n_facts) if "amig" in (a, b) else "",
                    key=f"{'table3' if operation == 'erasure' else 'table4'}_{operation}_{a}_vs_{b}", metric="rate",
                    relation_of=relation_of, empty=empty_counts(empty, a, b), n_facts=n_facts))
    return out



EDIT_METRICS = {"reliability": ("rel_ok", "rel_n"), "generality": ("gen_ok", "gen_n"), "locality": ("loc_ok", "loc_n")}



def editing_estimates(editing: Mapping[str, Any], languages: Sequence[str | None],
                      relation_of: RelationOf = relation_prefix) -> dict[tuple[str, str, str], list[Estimate]]:
    """{(operation, method, metric): [Estimate per language (None: all)]}: each fact's rate pooled over
    its queries in the language (all: every language), then `relation_mean` — the verdicts' unit."""
    records = editing["records"]
    out = {}
    for operation in ("erasure", "update"):
        for method in dict.fromkeys(r["method"] for r in records):
            mine = [r for r in records if r["method"] == method and r["operation"] == operation]
            for metric, (ok, n) in EDIT_METRICS.items():
                out[(operation, method, metric)] = [relation_mean(pooled_ratio(
                    [r for r in mine if lang in (None, r["lang"])], ok, n), relation_of) for lang in languages]
    return out



def editing_interval_tables(editing: Mapping[str, Any], languages: Sequence[str],
                            relation_of: RelationOf = relation_prefix) -> str:
    """Tables III/IV: per method, metric and language the fact's rate pooled over its queries there
    ("all": over every language), then `CELL` (facts with no sample in a language are out of that cell)."""
    estimates = editing_estimates(editing, [*languages, None], relation_of)
    parts = []
    for operation, title in (("erasure", "Table III — erasure"), ("update", "Table IV — update")):
        lines = ["| method | metric | " + " | ".join([*languages, "all"]) + " |", "|---|---|" + "---|" * (len(languages) + 1)]
        for (op, method, metric), cells in estimates.items():
            if op == operation:
                lines.append(f"| {method_name(method)} | {metric} | " + " | ".join(e.format(2) for e in cells) + " |")
        parts.append(f"**{title}**: {CELL}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


# ---- its section of the report ------------------------------------------------------------------

def scaling_text(params: Mapping[str, Any]) -> str:
    if params["edit"].get("scaling", "raw") == "raw":
        return "raw λ, Eq. 15 as written"
    return "λ relative to each column's norm: each term has norm λ·‖W‖"


def section(run: RunResults) -> str:
    edit = run.params["edit"]
    return (
        "### Cross-lingual editing (Tables III, IV)\nEdits made with the English object only; reliability on the "
        "edited query, generality on its paraphrases, locality on unrelated facts, per language. Erasure zeroes each "
        "neuron's output weight column; update sets it to W − λ1·E(o) + λ2·E(o') with "
        f"λ1 = {edit['lambda1']}, λ2 = {edit['lambda2']} ({scaling_text(run.params)}).\n\n"
        + "Reliability is on the edited (attributed) query, generality on its paraphrases, held-out ones included.\n\n"
        + run.text("editing_tables.md"))
