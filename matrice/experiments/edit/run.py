"""Knowledge editing's runs (the package doc states the design): every fact edited with each
method and operation, scored per language, every edit reverted bit for bit."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, dataclass_dict, encode_all, fact_neurons, group_by_fact, original_queries
from matrice.experiments.edit_targets import (UNTOLD, NewObject, choose_new_object, edit_target, locality_sampler,
                                              with_new_object)
from matrice.experiments.edit.passes import EditedPasses, WeightEdit, erasure_edit, update_edit
from matrice.interventions import UPDATE_SCALINGS
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import AnswerScore
from matrice.models.whole_answer import AnswerSteps, check_policy

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
    edits_per_pass: int = 1  # edits whose passes share each forward (matrice.models.edit_rows); 1: weights edited

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "EditConfig":
        s = params["edit"]
        return cls(lambda1=s["lambda1"], lambda2=s["lambda2"], scaling=s.get("scaling", "raw"), locality_k=s["locality_k"],
                   seed=params["seed"], batch_size=s["batch_size"], edits_per_pass=s["edits_per_pass"])

    def __post_init__(self) -> None:
        if self.locality_k < 0:
            raise ValueError(f"locality_k must be >= 0, got {self.locality_k}")
        if self.edits_per_pass < 1:
            raise ValueError(f"edit.edits_per_pass must be >= 1, got {self.edits_per_pass}")
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
    held_n: int = 0  # held-out paraphrases (never attributed), a subset of the generality queries
    held_ok: int = 0


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
            tot = {k: sum(getattr(r, k) for r in rs)
                   for k in ("rel_n", "rel_ok", "gen_n", "gen_ok", "loc_n", "loc_ok", "n_unknown", "held_n", "held_ok")}
            lang_rows.append({
                "method": method, "operation": op, "lang": lang,
                "reliability": _ratio(tot["rel_ok"], tot["rel_n"]),
                "generality": _ratio(tot["gen_ok"], tot["gen_n"]),
                "locality": _ratio(tot["loc_ok"], tot["loc_n"]),
                "generality_heldout": _ratio(tot["held_ok"], tot["held_n"]),
                "n_facts": len({r.fact_id for r in rs}),
                "n_empty_facts": len({r.fact_id for r in rs if r.n_neurons == 0}),
                **tot,
            })
        avg = {"method": method, "operation": op, "lang": "average"}
        for metric in ("reliability", "generality", "locality", "generality_heldout"):
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
    is_evaluation: Callable[[str], bool] | None = None,
    memo: Memo | None = None,
    answer_token: str = "first",
) -> EditResult:
    """Edit every fact (or the given ``facts``) with each method and operation; see the package doc.
    ``is_evaluation(query_id)``: the query was never attributed (its counts go to ``held_*`` too).
    ``answer_token: all``: whole answers (erasure: o is no longer the greedy output; update: o' is, in
    full; E(o), E(o') the mean unembedding of their tokens; locality: every step's top token).
    With ``memo``, each scored pass (a fact's unedited pass per operation, each (method, operation)
    edit) is stored under its exact inputs and read back by a later run that would compute it again:
    a τ sweep recomputes only the passes whose neurons moved (AMIG's sets and the unedited model are
    read back). The batches of a pass are fixed by its inputs, so a read-back pass is bit-identical.

    Every edit runs inside :func:`matrice.interventions.edited_output_weights`, which restores the
    weights and asserts bit-for-bit restoration after each edit.
    """
    cfg = cfg or EditConfig()
    bad_ops = [o for o in operations if o not in OPERATIONS]
    if bad_ops:
        raise ValueError(f"unknown edit operations {bad_ops}; choose from {OPERATIONS}")
    encs, failed = encode_all(adapter, queries, few_shot, encoded)
    by_fact = group_by_fact(q for q in queries if q.query_id in encs)
    targets = list(by_fact) if facts is None else list(facts)
    unknown = [f for f in targets if f not in by_fact]
    if unknown:
        raise KeyError(f"facts {unknown[:5]} have no (encodable) queries")
    neurons = {fid: {m: fact_neurons(sets, fid, m, adapter) for m in methods} for fid in targets}  # fail before editing
    run = _EditRun(adapter, cfg, few_shot, encs, by_fact, list(operations), is_evaluation or (lambda qid: False), memo,
                   answer_token)
    result = EditResult(config=dict(cfg.__dict__), empty_facts={m: [] for m in methods})
    skipped = run.skipped
    skipped["unencodable_queries"] = len(failed)
    for fid in tqdm(targets, desc="editing", unit="fact", disable=not progress):
        run.edit_fact(fid, neurons[fid], result)
    result.skipped = {**skipped, "n_no_source_query": len(skipped["no_source_query"]),
                      "n_no_new_object": len(skipped["no_new_object"])}
    result.summary = summarise_edits(result.records)
    return result


@dataclass
class _FactProbes:
    """One fact's queries as every edit of it scores them, with the unedited model's scores."""

    fact_id: str
    relation: str
    gold: int | tuple[int, ...]  # o in the source language: its first token, or its tokens (whole answers)
    original_ids: set[str]
    languages: list[str]
    locality_ids: list[str]
    locality_encs: list[Encoded]
    new: NewObject | None
    probes: dict[str, tuple[list[str], list[Encoded]]]  # operation -> (query ids, encodings)
    base: dict[str, list[AnswerScore]] = field(default_factory=dict)  # operation -> unedited scores (+ locality)

    def scored(self, op: str) -> list[Encoded]:
        """What every pass of ``op`` scores, in one batch order: the fact's probes, then the locality queries."""
        return self.probes[op][1] + self.locality_encs


class _EditRun:
    """The state every fact's edits share: encodings, each fact's original queries, the locality sampler."""

    def __init__(self, adapter: ModelAdapter, cfg: EditConfig, few_shot: bool, encs: Mapping[str, Encoded],
                 by_fact: Mapping[str, list[Query]], operations: list[str], is_evaluation: Callable[[str], bool],
                 memo: Memo | None = None, answer_token: str = "first") -> None:
        self.adapter, self.cfg, self.few_shot, self.encs, self.by_fact = adapter, cfg, few_shot, encs, by_fact
        self.operations, self.is_evaluation = operations, is_evaluation
        self.passes = EditedPasses(adapter, cfg.batch_size, memo, kind="edit_pass", edits_per_pass=cfg.edits_per_pass)
        self.answer_token, self.whole = check_policy(answer_token), answer_token == "all"
        self.originals = {fid: original_queries(fqs) for fid, fqs in by_fact.items()}
        self.sample_locality = locality_sampler(list(by_fact), cfg.locality_k, cfg.seed)
        self.by_relation: dict[str, list[str]] = defaultdict(list)
        for f, fqs in by_fact.items():
            self.by_relation[fqs[0].relation].append(f)
        self.skipped: dict[str, Any] = {"unencodable_queries": 0, "no_source_query": [], "no_new_object": [],
                                        "update_queries_without_label": 0, "update_queries_unencodable": 0,
                                        f"update_queries_{UNTOLD[self.whole]}": 0}
        self.lang_of = {q.query_id: q.lang for fqs in by_fact.values() for q in fqs}

    def edit_fact(self, fid: str, neurons: Mapping[str, np.ndarray], result: EditResult) -> None:
        """Every method's edits of one fact, its records appended to ``result``."""
        fact = self.fact_probes(fid, result)
        if fact is None:
            return
        after = {op: self.edited_passes(fact, op, neurons) for op in self.operations if op in fact.probes}
        for method, pairs in neurons.items():
            if len(pairs) == 0:
                result.empty_facts[method].append(fid)
            for op in after:
                n = len(fact.probes[op][0])
                fact_after, loc_after = after[op][method][:n], after[op][method][n:]
                counts = self.count(fact, op, fact_after, loc_after)
                for lang in sorted(set(fact.languages) | set(counts)):
                    c = counts[lang]
                    result.records.append(EditRecord(
                        fid, fact.relation, method, op, lang, int(len(pairs)),
                        c["rel_n"], c["rel_ok"], c["gen_n"], c["gen_ok"], c["loc_n"], c["loc_ok"], c["n_unknown"],
                        fact.new.labels.get(lang) if (op == "update" and fact.new is not None) else None,
                        c["held_n"], c["held_ok"],
                    ))

    def fact_probes(self, fid: str, result: EditResult) -> _FactProbes | None:
        """The fact's queries per operation, o' for the update, and the unedited model's scores on exactly
        the batches the edited one sees (same shapes, so an empty set reproduces it exactly and near-ties
        cannot flip between batch compositions). None: no query in the source language."""
        cfg, fqs = self.cfg, self.by_fact[fid]
        src = self.originals[fid].get(cfg.source_lang)
        if src is None:
            self.skipped["no_source_query"].append(fid)
            return None
        gold_ids = self.encs[src.query_id].answer_ids
        gold_token = gold_ids[0]
        loc_ids = [q.query_id for f in self.sample_locality(fid) for q in self.originals[f].values()]
        new, upd_encs = None, {}
        if "update" in self.operations:
            new = choose_new_object(self.adapter, fid, self.by_fact, gold_ids, cfg.source_lang, cfg.seed,
                                    self.few_shot, pool=self.by_relation[fqs[0].relation], whole=self.whole)
            if new is None:
                self.skipped["no_new_object"].append(fid)
            else:
                result.new_objects[fid] = {"from_fact": new.fact_id, "labels": new.labels, "token": new.token,
                                           "old_token": int(gold_token),
                                           **({"tokens": list(new.tokens), "old_tokens": list(gold_ids)} if self.whole else {})}
                upd_encs = self.update_encodings(fqs, new)
        fact_ids = [q.query_id for q in fqs]
        probes = {"erasure": (fact_ids, [self.encs[q] for q in fact_ids])}
        if new is not None:
            probes["update"] = (list(upd_encs), list(upd_encs.values()))
        gold = edit_target(gold_ids, self.whole)
        return _FactProbes(fid, fqs[0].relation, gold, {q.query_id for q in self.originals[fid].values()},
                           sorted({q.lang for q in fqs}), loc_ids, [self.encs[q] for q in loc_ids], new, probes)

    def update_encodings(self, fqs: Sequence[Query], new: NewObject) -> dict[str, Encoded]:
        """Each query of the fact with o' (in its language) as the answer. Left out, and counted: no label
        in the language, not encodable, or o' starts with o's first token there (success would then only
        mean o is still top-1)."""
        out: dict[str, Encoded] = {}
        for q in fqs:
            enc, why = with_new_object(self.adapter, q, new, self.encs[q.query_id].answer_ids, self.few_shot, self.whole)
            if enc is None:
                self.skipped[f"update_queries_{why}"] = self.skipped.get(f"update_queries_{why}", 0) + 1
            else:
                out[q.query_id] = enc
        return out

    def edited_passes(self, fact: _FactProbes, op: str, neurons: Mapping[str, np.ndarray]
                      ) -> dict[str, list[AnswerScore]]:
        """Each method's scores of ``op``'s batches under its edit (an empty set: the unedited scores,
        which become ``fact.base[op]``), through the memo."""
        cfg = self.cfg
        new = None if fact.new is None else fact.new.target(self.whole)

        def edit_of(pairs: np.ndarray) -> WeightEdit:
            if op == "erasure":
                return erasure_edit(self.adapter, pairs)
            return update_edit(self.adapter, pairs, fact.gold, new, cfg.lambda1, cfg.lambda2, cfg.scaling)

        edits = {m: edit_of(pairs) for m, pairs in neurons.items() if len(pairs)}
        steps = AnswerSteps.of(self.adapter, fact.scored(op), self.answer_token)
        base, after = self.passes.run(steps.encs, edits)
        fact.base[op] = steps.fold(base)
        return {m: steps.fold(after[m]) if m in after else fact.base[op] for m in neurons}

    def count(self, fact: _FactProbes, op: str, fact_after: Sequence[AnswerScore], loc_after: Sequence[AnswerScore]
              ) -> dict[str, dict[str, int]]:
        """Per language: reliability (original queries), generality (paraphrases) and locality counts."""
        probe_ids = fact.probes[op][0]
        before = dict(zip(fact.probes["erasure"][0], fact.base["erasure"])) if "erasure" in fact.base else {}
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for qid, s in zip(probe_ids, fact_after):
            c = counts[self.lang_of[qid]]
            kind = "rel" if qid in fact.original_ids else "gen"
            if op == "erasure":
                if self.cfg.erasure_known_only and before[qid].rank != 0:
                    c["n_unknown"] += 1
                    continue
                ok = s.rank > 0
            else:
                ok = s.rank == 0
            c[f"{kind}_n"] += 1
            c[f"{kind}_ok"] += int(ok)
            if self.is_evaluation(qid):
                c["held_n"] += 1
                c["held_ok"] += int(ok)
        for qid, s, b in zip(fact.locality_ids, loc_after, fact.base[op][len(probe_ids):]):
            c = counts[self.lang_of[qid]]
            c["loc_n"] += 1
            c["loc_ok"] += int(s.same_top(b))
        return counts
