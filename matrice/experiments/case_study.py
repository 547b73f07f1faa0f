"""Case study of one fact (paper §IV-I, Fig. 7): its prediction in every language before any
intervention, after enhancing its neurons (×2 at the target), and after an update edit.

For each language the fact's original query (lowest template id) is greedy-decoded for as many
tokens as the gold answer has (before, enhanced) or as the new object has (updated; for masked
models the query is re-encoded with the new object's number of masks). Probabilities are of the
first token of the gold object and of the new object, each tokenised in that language and context.
The new object is ``new_object`` (labels per language) if given, else the seeded choice of
:func:`matrice.experiments.edit_targets.choose_new_object` (the same one the editing experiment uses).

``answer_token: all``: probabilities are the whole answer's (teacher-forced, folded as in
:mod:`matrice.models.whole_answer`), a rank is 0 when every token is top-1 and otherwise the rank of the
first token that is not, enhancement scales the neurons at every answer token's position,
the update writes the mean unembedding of the objects' tokens, and a prediction is the top token of
each teacher-forced step (the greedy output wherever it is right; "correct" and "is new" are rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, encode_all, fact_neurons, group_by_fact, original_queries
from matrice.experiments.edit import EditConfig
from matrice.experiments.edit_targets import choose_new_object, edit_target
from matrice.interventions import edited_output_weights, update_vectors
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.hooks import neuron_edits
from matrice.models.predict import greedy_decode, is_correct
from matrice.models.whole_answer import answer_scores
from matrice.evaluation.report import RunResults, markdown_table, ordered_langs
from matrice.io import RunOutputs


@dataclass
class CaseStudy:
    """``languages[lang]``: query_id, prompt, gold, new_object and, for each of ``before``,
    ``enhanced``, ``updated``: ``text`` (decoded prediction), ``correct`` (vs gold), ``is_new`` (vs the
    new object; None without a label), ``p_gold`` / ``rank_gold`` and ``p_new`` / ``rank_new`` of the first
    answer token (rank 0 = top-1; None when the new object has no label in that language)."""

    fact_id: str
    method: str
    factor: float
    n_neurons: int
    new_object_from: str | None
    new_object_token: int | None
    languages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def case_study(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    sets: NeuronSetsLike,
    fact_id: str,
    method: str = "matrice",
    factor: float = 2.0,
    new_object: Mapping[str, str] | None = None,
    cfg: EditConfig | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    answer_token: str = "first",
) -> CaseStudy:
    """Before / enhanced / updated predictions of ``fact_id`` in every language (module docstring)."""
    cfg = cfg or EditConfig()
    whole = answer_token == "all"
    by_fact = group_by_fact(queries)
    if fact_id not in by_fact:
        raise KeyError(f"fact {fact_id!r} has no queries")
    pairs = fact_neurons(sets, fact_id, method, adapter)
    orig = original_queries(by_fact[fact_id])
    encs, failed = encode_all(adapter, orig.values(), few_shot, encoded)
    src = orig.get(cfg.source_lang)
    if src is None or src.query_id not in encs:
        raise ValueError(f"fact {fact_id!r} has no encodable {cfg.source_lang!r} query to edit with")
    gold_ids = encs[src.query_id].answer_ids

    new_from, labels = _new_object(adapter, fact_id, by_fact, gold_ids, new_object, cfg, few_shot, whole)
    new_token, new_ids = None, None
    if labels is not None:
        new_ids = encode_query(adapter, replace(src, answer=labels[cfg.source_lang]), few_shot).answer_ids
        new_token = new_ids[0]

    langs = [lang for lang in sorted(orig) if orig[lang].query_id in encs]
    gold_encs = [encs[orig[lang].query_id] for lang in langs]
    new_encs = _with_new_answers(adapter, {lang: orig[lang] for lang in langs}, labels, few_shot)
    new_langs = [lang for lang in langs if lang in new_encs]

    def snapshot(edits, on_new: bool) -> dict[str, dict[str, Any]]:
        s_gold = dict(zip(langs, answer_scores(adapter, gold_encs, answer_token, edits)))
        s_new = dict(zip(new_langs, answer_scores(adapter, [new_encs[l] for l in new_langs], answer_token, edits)))
        if whole:  # each step's top token; right exactly where the greedy output is
            texts = {l: [s.top_token, *s.top_rest] for l, s in (s_new if on_new else s_gold).items()}
            correct = {l: s_gold[l].rank == 0 for l in texts}
            is_new = {l: s_new[l].rank == 0 for l in texts if l in s_new}
        else:
            decode_encs = [new_encs[l] for l in new_langs] if on_new else gold_encs
            decode_langs = new_langs if on_new else langs
            texts = {l: g for l, g in zip(decode_langs, greedy_decode(adapter, decode_encs, edits))}
            correct = {l: bool(is_correct(adapter, g, orig[l].answer)) for l, g in texts.items()}
            is_new = {l: bool(is_correct(adapter, g, labels[l])) for l, g in texts.items() if l in new_encs}
        out = {}
        for lang in langs:
            g = texts.get(lang)
            out[lang] = {
                "text": None if g is None else adapter.tokenizer.decode(list(g), skip_special_tokens=True),
                "correct": correct.get(lang),
                "is_new": is_new.get(lang),
                "p_gold": s_gold[lang].prob,
                "rank_gold": s_gold[lang].rank,
                "p_new": s_new[lang].prob if lang in s_new else None,
                "rank_new": s_new[lang].rank if lang in s_new else None,
            }
        return out

    before = snapshot(None, on_new=False)
    enhanced = snapshot(neuron_edits(pairs, factor) if len(pairs) else None, on_new=False)
    updated = None
    if new_token is not None:
        vectors = update_vectors(adapter, pairs, edit_target(gold_ids, whole), edit_target(new_ids, whole),
                                 cfg.lambda1, cfg.lambda2, cfg.scaling)
        with edited_output_weights(adapter, vectors):
            updated = snapshot(None, on_new=True)

    study = CaseStudy(fact_id, method, factor, int(len(pairs)), new_from, new_token)
    for lang in langs:
        q = orig[lang]
        study.languages[lang] = {
            "query_id": q.query_id, "prompt": q.prompt, "cloze": q.cloze, "gold": q.answer,
            "new_object": None if labels is None else labels.get(lang),
            "before": before[lang], "enhanced": enhanced[lang],
            "updated": None if updated is None else updated[lang],
        }
    for lang, q in orig.items():
        if q.query_id in failed:
            study.languages[lang] = {"query_id": q.query_id, "unencodable": failed[q.query_id]}
    return study


def _new_object(adapter: ModelAdapter, fact_id: str, by_fact: Mapping[str, Sequence[Query]], gold: Sequence[int],
                new_object: Mapping[str, str] | None, cfg: EditConfig, few_shot: bool,
                whole: bool = False) -> tuple[str | None, dict[str, str] | None]:
    """(the fact o' is borrowed from, o' per language): the caller's, or chosen as the edit stage does."""
    if new_object is not None:
        if cfg.source_lang not in new_object:
            raise ValueError(f"new_object needs a {cfg.source_lang!r} label (the edit is made in that language)")
        return None, dict(new_object)
    chosen = choose_new_object(adapter, fact_id, by_fact, gold, cfg.source_lang, cfg.seed, few_shot, whole=whole)
    return (None, None) if chosen is None else (chosen.fact_id, chosen.labels)


def _with_new_answers(adapter: ModelAdapter, queries: Mapping[str, Query], labels: Mapping[str, str] | None,
                      few_shot: bool) -> dict[str, Encoded]:
    """Each language's query with o' as its answer, where o' has a label there and it encodes."""
    out: dict[str, Encoded] = {}
    for lang, q in queries.items():
        if labels is not None and lang in labels:
            try:
                out[lang] = encode_query(adapter, replace(q, answer=labels[lang]), few_shot)
            except ValueError:
                pass
    return out


# ---- the fact studied and its table ----------------------------------------------------------

def choose_fact(requested: str | None, attributed: list[str]) -> str:
    """The requested fact, or the first attributed capital (P36) fact, or the first attributed one."""
    if requested is not None:
        if requested not in attributed:
            raise ValueError(f"{requested!r} has no neuron set; attributed facts: {attributed}")
        return requested
    capitals = [f for f in attributed if f.startswith("P36")]
    return (capitals or attributed)[0]


def _cell(state: Mapping[str, Any] | None, key: str) -> str:
    if state is None:
        return "–"
    mark = "✓" if state.get(key) else "✗"
    return f"{state['text']!s} {mark}"


def case_study_table(study: CaseStudy, fact: str) -> str:
    """Fig. 7 as markdown: each language's query, gold answer and the three predictions."""
    rows = []
    for lang in ordered_langs(study.languages):
        d = study.languages[lang]
        if "unencodable" in d:
            rows.append([lang, d["query_id"], "unencodable", "", "", ""])
            continue
        rows.append([lang, f"`{d['prompt'] if 'prompt' in d else d['cloze']}`", d["gold"],
                     _cell(d["before"], "correct"), _cell(d["enhanced"], "correct"), _cell(d["updated"], "is_new")])
    return (f"**Fig. 7** — fact `{fact}` ({study.method}: {study.n_neurons} neurons); update to the object of "
            f"`{study.new_object_from}`. ✓ = gold answer (before/enhanced) or new object (updated)\n\n"
            + markdown_table(["lang", "query", "gold", "before", f"enhanced ×{study.factor:g}", "updated"], rows)
            + "\n" + case_study_verdict(study) + "\n")


def case_study_verdict(study: CaseStudy) -> str:
    """In words: in how many languages the model was right before, after enhancement, and gave o' after the update."""
    scored = {lang: d for lang, d in study.languages.items() if "unencodable" not in d}
    n, langs = len(scored), ordered_langs(scored)

    def count(state: str, key: str) -> tuple[int, str]:
        hits = [lang for lang in langs if (scored[lang][state] or {}).get(key)]
        return len(hits), ", ".join(hits) or "none"

    before, enhanced = count("before", "correct"), count("enhanced", "correct")
    text = (f"Of {n} languages, the model answered the fact correctly in {before[0]} before ({before[1]}) and in "
            f"{enhanced[0]} with its neurons ×{study.factor:g} ({enhanced[1]}). ")
    new = (scored.get("en") or {}).get("new_object")
    if study.new_object_token is None:
        return text + "No update was made: no new object with a first token other than the gold one."
    updated = count("updated", "is_new")
    labelled = sum(1 for d in scored.values() if d.get("updated") and d["updated"].get("is_new") is not None)
    verdict = "worked" if updated[0] == labelled and labelled else ("failed" if updated[0] == 0 else "worked in part")
    return text + (f"The update to *{new}* {verdict}: the new object is the greedy answer in {updated[0]} of the {labelled} "
                   f"languages where it has a label ({updated[1]}).")


def write_outputs(study: CaseStudy, out: RunOutputs) -> None:
    """The study and its Fig. 7 table with the verdict in words."""
    out.json("case_study.json", study.to_dict())
    out.text("case_study.md", case_study_table(study, study.fact_id))


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    return ("### Case study (Fig. 7)\nOne fact in every language: the prediction before, after enhancement and after an "
            "update edit made in English.\n\n" + run.text("case_study.md"))
