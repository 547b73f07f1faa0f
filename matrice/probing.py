"""Probe: does the model know each query's answer? Defines the Q_old / Q_error / Q_new splits."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

from matrice.data.schema import Query
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import HEAD_ROWS, decode_and_score, is_correct

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    query_id: str
    fact_id: str
    relation: str
    lang: str
    template_id: int
    prob: float  # P(first gold token) at the target position
    rank: int  # 0 = gold first token is the model's top-1
    correct: bool  # greedy decoding of the answer's length reproduces the gold text
    prediction: str  # what greedy decoding produced

    def to_dict(self) -> dict:
        return asdict(self)


def encode_all(adapter: ModelAdapter, queries: Sequence[Query], few_shot: bool) -> list[Encoded]:
    return [encode_query(adapter, q, few_shot) for q in queries]


def probe(adapter: ModelAdapter, queries: Sequence[Query], few_shot: bool, batch_size: int = 32) -> list[ProbeResult]:
    encs = encode_all(adapter, queries, few_shot)
    # every query in one call: its batches group the queries of one demonstration prefix (computed
    # once per batch) and of similar lengths, which dataset-order chunks of mixed languages cannot;
    # batches decode in lockstep, the LM head once per step over ~256 rows
    results: list[ProbeResult] = []
    decoded = decode_and_score(adapter, encs, batch_size=batch_size, progress="probe", head_rows=HEAD_ROWS)
    for q, (g, s) in zip(queries, decoded):
        text = adapter.tokenizer.decode(g, skip_special_tokens=True)
        ok = is_correct(adapter, g, q.answer_sep + q.answer)
        results.append(ProbeResult(q.query_id, q.fact_id, q.relation, q.lang, q.template_id, s.prob, s.rank, ok, text))
    return results


def accuracy_by_language(results: Sequence[ProbeResult]) -> dict[str, dict[str, float]]:
    """Per language: accuracy, top-1 rate of the first token, mean P(gold), number of queries."""
    groups: dict[str, list[ProbeResult]] = defaultdict(list)
    for r in results:
        groups[r.lang].append(r)
    return {
        lang: {
            "accuracy": sum(r.correct for r in rs) / len(rs),
            "top1_first_token": sum(r.rank == 0 for r in rs) / len(rs),
            "mean_prob": sum(r.prob for r in rs) / len(rs),
            "queries": len(rs),
        }
        for lang, rs in groups.items()
    }
