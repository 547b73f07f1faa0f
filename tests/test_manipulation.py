"""Manipulation (Fig. 5) on the implanted GPT-2 neuron and a tiny LLaMA."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHAPE_TOLERANCE
from implant import IMPLANT, QUERIES, pairs, sets_for
from whole_reference import teacher_forced
from matrice.experiments import MissingNeuronSetError
from matrice.experiments.manipulate import manipulate
from matrice.interventions import edited_output_weights
from matrice.models.encoding import encode_query
from matrice.models.predict import score_answers

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_manipulation_hand_case(gpt2_implant):
    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id in ("f1", "f2")]
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT), "random": pairs((0, 0), (1, 3))}})
    res = manipulate(a, qs, sets, methods=("matrice", "amig", "random"), progress=False)
    assert len(res.records) == len(qs) * 3 * 2
    # independent check: zeroing (doubling) the activation equals zeroing (doubling) the neuron's c_proj row
    f1_qs = [q for q in qs if q.fact_id == "f1"]
    encs = [encode_query(a, q) for q in f1_qs]
    p_before = [s.prob for s in score_answers(a, encs)]
    for mode, factor in (("suppress", 0.0), ("enhance", 2.0)):
        layer, i = IMPLANT
        w = a.layers[layer].mlp.c_proj.weight
        with edited_output_weights(a, {IMPLANT: w.data[i] * factor}):
            p_after = [s.prob for s in score_answers(a, encs)]
        by_id = {r.query_id: r for r in res.records if r.fact_id == "f1" and r.method == "matrice" and r.mode == mode}
        got = [by_id[q.query_id] for q in f1_qs]
        assert len(by_id) == len(encs)
        for r, pb, pa in zip(got, p_before, p_after):
            assert r.p_before == pytest.approx(pb, rel=1e-5)
            assert r.p_after == pytest.approx(pa, rel=1e-4, abs=1e-9)
            assert r.delta_p == pytest.approx((pa - pb) / pb, rel=1e-4, abs=1e-6 * SHAPE_TOLERANCE)
    sup_en = next(r for r in res.records if r.query_id == "f1|en|0" and r.method == "matrice" and r.mode == "suppress")
    assert sup_en.p_before > 0.5 and sup_en.delta_p < -0.9  # the implanted neuron carried " Paris"
    # empty sets: ΔP exactly 0, kept in the means and counted per method
    assert res.empty_facts == {"matrice": ["f2"], "amig": ["f1", "f2"], "random": ["f2"]}
    assert all(r.delta_p == 0.0 and r.p_after == r.p_before for r in res.records if r.method == "amig")
    row = next(r for r in res.summary if (r["method"], r["mode"], r["lang"]) == ("amig", "suppress", "en"))
    assert row["mean_delta_p"] == 0.0 and row["n_empty_facts"] == 2 and row["mean_delta_p_nonempty"] is None
    row = next(r for r in res.summary if (r["method"], r["mode"], r["lang"]) == ("matrice", "suppress", "en"))
    f1_en = [r.delta_p for r in res.records if r.method == "matrice" and r.mode == "suppress" and r.lang == "en"]
    assert row["mean_delta_p"] == pytest.approx(np.mean(f1_en)) and row["n_queries"] == 4 and row["n_empty_facts"] == 1
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n_empty_facts"] == {"matrice": 1, "amig": 2, "random": 1} and len(d["records"]) == len(res.records)


def test_manipulation_layer_and_missing_fact(llama):
    qs = [q for q in QUERIES if q.fact_id == "f3"]
    all_layer1 = pairs(*[(1, i) for i in range(llama.n_neurons)])
    res = manipulate(llama, qs, {"f3": {"matrice": all_layer1}}, methods=("matrice",), progress=False)
    assert all(r.delta_p is not None and abs(r.delta_p) > 1e-4 for r in res.records)
    assert res.empty_facts == {"matrice": []}
    with pytest.raises(MissingNeuronSetError, match="f4"):
        manipulate(llama, [q for q in QUERIES if q.fact_id in ("f3", "f4")], {"f3": {"matrice": all_layer1}},
                   methods=("matrice",), progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_whole_answer_manipulation_is_the_product_of_its_tokens_probabilities(family):
    from conftest import tiny_on_device

    a = tiny_on_device(family)
    qs = [q for q in QUERIES if q.fact_id in ("f1", "f3")]
    neurons = pairs((1, 2), (1, 5), (2, 0))
    res = manipulate(a, qs, {f: {"matrice": neurons} for f in ("f1", "f3")}, methods=("matrice",), progress=False,
                     answer_token="all")
    by_key = {(r.query_id, r.mode): r for r in res.records}
    lengths = []
    for q in qs:
        enc = encode_query(a, q)
        lengths.append(len(enc.answer_ids))
        before = teacher_forced(a, enc, neurons, 1.0)[0]
        for mode, factor in (("suppress", 0.0), ("enhance", 2.0)):
            r = by_key[q.query_id, mode]
            assert r.p_before == pytest.approx(before, rel=1e-4)
            assert r.p_after == pytest.approx(teacher_forced(a, enc, neurons, factor)[0], rel=1e-4)
    assert max(lengths) > 1  # multi-token answers were scored
    first = manipulate(a, qs, {f: {"matrice": neurons} for f in ("f1", "f3")}, methods=("matrice",), progress=False)
    single = {(r.query_id, r.mode): r for r in first.records}
    for q, n in zip(qs, lengths):
        same = by_key[q.query_id, "suppress"].p_before == pytest.approx(single[q.query_id, "suppress"].p_before, rel=1e-4)
        assert same == (n == 1)  # a one-token answer scores the same under both policies (batching aside)
