"""The masked-filling measurement (benchmarks/masked_filling.py): its left-to-right decoding is what
whole-answer scoring reads, and its parallel decoding is the probe's."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

import matrice.api as mx
from matrice.models.encoding import encode_query
from matrice.models.predict import greedy_decode
from matrice.models.whole_answer import answer_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from masked_filling import FillingRecord, left_to_right, measure, measure_encoded, summarise  # noqa: E402

FACTS = [mx.Fact("capital", {"en": s}, {"en": o}, fact_id=f"P36-{i}")
         for i, (s, o) in enumerate([("Argentina", "Buenos Aires"), ("France", "Paris"), ("Ghana", "Accra"),
                                     ("the United Kingdom", "London Town")])]
TEMPLATES = {"en": ["The capital of [X] is [Y].", "[X]'s capital city is [Y]."]}


def fact_queries():
    return [q for f in FACTS for q in mx.queries(f, TEMPLATES)]


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_left_to_right_returns_the_gold_tokens_exactly_when_every_teacher_forced_rank_is_0(tiny, family):
    adapter = tiny(family)
    queries = fact_queries()
    encs = [encode_query(adapter, q) for q in queries]
    assert max(len(e.answer_ids) for e in encs) >= 2  # multi-token answers are in the test
    serial, parallel = left_to_right(adapter, encs), greedy_decode(adapter, encs)
    records = measure(adapter, queries)
    for e, s, p, r in zip(encs, serial, parallel, records):
        assert len(s) == len(p) == len(e.answer_ids) == r.n_tokens
        assert s[0] == p[0]  # the first mask is read with every mask in place by both
        assert (s == list(e.answer_ids)) == r.teacher_forced_rank0
        if len(s) == 1:
            assert r.parallel_correct == r.left_to_right_correct
    # the model's own left-to-right fill as the gold answer: every teacher-forced step is top-1
    own = [replace(e, answer_ids=list(s)) for e, s in zip(encs, serial)]
    assert all(score.rank == 0 for score in answer_scores(adapter, own, "all"))
    assert left_to_right(adapter, own) == serial
    assert all(r.teacher_forced_rank0 for r in measure_encoded(adapter, queries, own))


def test_rates_weigh_each_fact_once_and_agreement_reads_only_multi_token_answers():
    """Per-fact means, then the mean over facts; the agreement rates count multi-token answers only."""
    def record(fact: str, n: int, parallel: bool, serial: bool) -> FillingRecord:
        return FillingRecord(f"{fact}-{n}-{parallel}", fact, "en", n, parallel, serial, serial, str(parallel), str(serial))

    records = [record("a", 1, True, True), record("a", 2, True, False), record("a", 3, True, False),
               record("b", 2, False, False)]
    overall = summarise(records)["overall"]
    assert overall["parallel_correct"]["mean"] == pytest.approx(0.5)  # a: 3/3, b: 0/1
    assert overall["left_to_right_correct"]["mean"] == pytest.approx((1 / 3 + 0) / 2)
    agree = overall["same_correctness_on_multi_token"]
    assert agree["n_queries"] == 3 and agree["mean"] == pytest.approx(0.5)  # a: 0/2 agree, b: 1/1


def test_a_causal_model_is_refused(tiny):
    with pytest.raises(ValueError, match="masked"):
        measure(tiny("llama"), fact_queries())
