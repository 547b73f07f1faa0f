"""Whole-answer scores from per-token ones (``answer_token: all``).

P(answer | q) = Π_k P(t_k | q, t_<k), teacher-forced on the gold answer: each query becomes one query
per answer token (:func:`matrice.models.encoding.answer_steps`: the gold prefix in place, the target
the position predicting t_k), every scorer of the package scores those like any queries (same
batches, prefix caches and per-row edits), and the step scores fold back into one per query. An
intervention at the target position then acts at each answer token's own position, the position the
token was attributed at. The greedy output is the answer exactly when every step's gold token is
top-1 (greedy decoding with the gold prefix is teacher forcing), so rank 0 of the folded score is
"the model outputs the whole answer".

``answer_token: first`` is the identity: one step per query, scores unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import answer_steps
from matrice.models.predict import AnswerScore, score_answers
from matrice.models.scaled_rows import Scaling, score_scaled_rows

ANSWER_POLICIES: tuple[str, ...] = ("first", "all")


@dataclass(frozen=True)
class AnswerSteps:
    """The encodings to score for some queries under a policy (``encs``), query i's being
    ``encs[spans[i][0]:spans[i][1]]``."""

    encs: list[Encoded]
    spans: list[tuple[int, int]]

    @classmethod
    def of(cls, adapter: ModelAdapter, encs: Sequence[Encoded], policy: str) -> "AnswerSteps":
        if check_policy(policy) == "first":
            return cls(list(encs), [(i, i + 1) for i in range(len(encs))])
        steps, spans = [], []
        for enc in encs:
            start = len(steps)
            steps += answer_steps(adapter, enc)
            spans.append((start, len(steps)))
        return cls(steps, spans)

    def rows(self, rows: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(query, edit) rows as (step, edit) rows, and each given row's span among them."""
        out, spans = [], []
        for query, edit in rows:
            start, stop = self.spans[query]
            spans.append((len(out), len(out) + stop - start))
            out += [(step, edit) for step in range(start, stop)]
        return out, spans

    def fold(self, scores: Sequence[AnswerScore], spans: Sequence[tuple[int, int]] | None = None) -> list[AnswerScore]:
        """One score per query (or per row, with the spans :meth:`rows` gave) from its steps' scores."""
        return [whole_score(scores[start:stop]) for start, stop in (self.spans if spans is None else spans)]


def answer_scores(adapter: ModelAdapter, encs: Sequence[Encoded], policy: str, edits=None, batch_size: int = 32
          ) -> list[AnswerScore]:
    """:func:`matrice.models.predict.score_answers` of each query's answer under ``policy``."""
    steps = AnswerSteps.of(adapter, encs, policy)
    return steps.fold(score_answers(adapter, steps.encs, edits, batch_size))


def score_rows(adapter: ModelAdapter, encs: Sequence[Encoded], scalings: Sequence[Sequence[Scaling]],
               rows: Sequence[tuple[int, int]], policy: str, batch_size: int = 32, progress: str | None = None
               ) -> list[AnswerScore]:
    """:func:`matrice.models.scaled_rows.score_scaled_rows` of (query, scaling set) rows under ``policy``:
    a whole answer's rows are its tokens' (each scaled at its own position), folded."""
    steps = AnswerSteps.of(adapter, encs, policy)
    step_rows, spans = steps.rows(rows)
    return steps.fold(score_scaled_rows(adapter, steps.encs, scalings, step_rows, batch_size, progress=progress), spans)


def check_policy(policy: str) -> str:
    if policy not in ANSWER_POLICIES:
        raise ValueError(f"answer_token must be one of {ANSWER_POLICIES}, got {policy!r}")
    return policy


def told_apart(a: Sequence[int], b: Sequence[int], whole: bool) -> bool:
    """Whether scoring can tell answer ``a`` from ``b``: different first tokens, or for whole answers
    neither a token prefix of the other (with no end-of-answer term, the shorter one would be "the
    greedy output" whenever the longer one is, and always the more probable)."""
    if not whole:
        return a[0] != b[0]
    n = min(len(a), len(b))
    return list(a[:n]) != list(b[:n])


def whole_score(steps: Sequence[AnswerScore]) -> AnswerScore:
    """The answer's score from its tokens' (in order): a one-token answer's score is its token's."""
    if len(steps) == 1:
        return steps[0]
    rank = next((s.rank for s in steps if s.rank), 0)
    return AnswerScore(math.prod(s.prob for s in steps), rank, steps[0].top_token, tuple(s.top_token for s in steps[1:]))
