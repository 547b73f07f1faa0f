"""What an edit aims at, shared by the editing experiment, the λ sweep and the case study: the new
object o' of an update and the unrelated facts whose answers must not move (locality)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from matrice.data.schema import Query
from matrice.experiments import experiment_rng, original_queries
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import normalize_answer
from matrice.models.whole_answer import told_apart


UNTOLD = {False: "same_first_token", True: "prefix_answer"}  # why o' cannot be scored apart from o


def edit_target(answer_ids: Sequence[int], whole: bool) -> int | tuple[int, ...]:
    """What Eq. 15's E(·) reads of an object: its first token, or its tokens (whole answers)."""
    return tuple(int(t) for t in answer_ids) if whole else int(answer_ids[0])


@dataclass(frozen=True)
class NewObject:
    """The update target o': borrowed from another fact of the same relation."""

    fact_id: str
    labels: dict[str, str]  # lang -> label
    token: int  # first token of o' in the source language, in the edited fact's context
    tokens: tuple[int, ...] = ()  # all of o''s tokens there

    def target(self, whole: bool) -> int | tuple[int, ...]:
        """What the update writes: o''s first token, or its whole answer (``answer_token: all``)."""
        return self.tokens if whole else self.token


def _answer_ids(adapter: ModelAdapter, query: Query, label: str, few_shot: bool) -> list[int] | None:
    try:
        return encode_query(adapter, replace(query, answer=label), few_shot).answer_ids
    except ValueError:
        return None


def choose_new_object(
    adapter: ModelAdapter,
    fact_id: str,
    by_fact: Mapping[str, Sequence[Query]],
    gold: Sequence[int],
    source_lang: str = "en",
    seed: int = 0,
    few_shot: bool = False,
    pool: Sequence[str] | None = None,
    whole: bool = False,
) -> NewObject | None:
    """Seeded o' for ``fact_id``: another fact of the same relation with a different source-language
    label whose tokens scoring can tell from ``gold`` (o's tokens in the edited fact's source-language
    context; :func:`matrice.models.whole_answer.told_apart`): a different first token, or with ``whole``
    (whole answers) tokens that neither start o's nor are started by them, so an update from "Buenos
    Aires" to "Buenos Tiempos" is scored on its whole answer. None if there is no such fact.

    Uniform among the valid candidates: the candidates (``pool``, default every fact of the relation)
    are visited in a seeded random order and the first valid one is taken, so only as many are
    tokenised as needed.
    """
    fqs = by_fact[fact_id]
    src = original_queries(fqs).get(source_lang)
    if src is None:
        return None
    relation = fqs[0].relation
    if pool is None:
        pool = [f for f in by_fact if by_fact[f][0].relation == relation]
    pool = sorted(f for f in set(pool) if f != fact_id and by_fact[f][0].relation == relation)
    gold_norm = normalize_answer(src.answer)
    for j in experiment_rng(seed, "new_object", fact_id).permutation(len(pool)):
        other = pool[int(j)]
        labels = {lang: q.answer for lang, q in original_queries(by_fact[other]).items()}
        label = labels.get(source_lang)
        if label is None or normalize_answer(label) == gold_norm:
            continue
        ids = _answer_ids(adapter, src, label, few_shot)
        if ids is None or not told_apart(ids, gold, whole):
            continue
        return NewObject(other, labels, int(ids[0]), tuple(int(t) for t in ids))
    return None


def locality_sampler(all_facts: Sequence[str], k: int, seed: int) -> Callable[[str], list[str]]:
    """``sample(fact_id)``: a seeded sample of k facts other than ``fact_id`` (all of them if fewer),
    sorted; it depends only on the *set* of facts, not on their order. The pool is sorted once, so
    each sample costs O(k)."""
    pool = sorted(set(all_facts))
    where = {f: i for i, f in enumerate(pool)}

    def sample(fact_id: str) -> list[str]:
        own = where.get(fact_id)
        n = len(pool) - (own is not None)
        if k >= n:
            return [f for f in pool if f != fact_id]
        idx = experiment_rng(seed, "locality", fact_id).choice(n, size=k, replace=False)
        idx = [i + 1 if own is not None and i >= own else i for i in sorted(idx)]
        return [pool[i] for i in idx]

    return sample


def with_new_object(adapter: ModelAdapter, query: Query, new: NewObject, gold: Sequence[int], few_shot: bool,
                    whole: bool = False) -> tuple[Encoded | None, str]:
    """``query`` with o' (its label in the query's language) as the answer, re-encoded in context, or
    None and why an update cannot be scored there: ``without_label``, ``unencodable``, or when scoring
    cannot tell o' from o (``gold``, o's tokens there; :func:`matrice.models.whole_answer.told_apart`):
    ``same_first_token`` (o' starts with o's first token, so "o' is top-1" would only mean o still is)
    or with ``whole`` ``prefix_answer`` (o''s tokens start o's or are started by them; a shared first
    token is scored on the whole answer)."""
    label = new.labels.get(query.lang)
    if label is None:
        return None, "without_label"
    try:
        enc = encode_query(adapter, replace(query, answer=label), few_shot)
    except ValueError:
        return None, "unencodable"
    if told_apart(enc.answer_ids, gold, whole):
        return enc, ""
    return None, UNTOLD[whole]
