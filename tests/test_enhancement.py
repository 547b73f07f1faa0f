"""Enhancement in low-resource languages (Fig. 6): Q_error and the accuracy gained."""

from __future__ import annotations

import json

import pytest

from implant import IMPLANT, QUERIES, pairs, implanted_gpt2, sets_for, probe
from matrice.experiments import as_probe_map
from matrice.experiments.enhance import enhance_low_resource

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_enhancement_q_error_and_gain():
    a, _ = implanted_gpt2(scale=0.5)  # too weak to make " Paris" top-1; ×20 on the neuron makes it
    en = [q for q in QUERIES if q.lang == "en"]
    probes = probe(a, en)
    pm = as_probe_map(probes)
    assert not pm["f1|en|0"].correct
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    res = enhance_low_resource(a, en, probes, sets, methods=("matrice", "amig"), languages=("en",), factor=20.0,
                               progress=False)
    n_err = sum(not p.correct for p in probes)
    assert res.n_q_error == n_err and res.n_probe_mismatch == 0  # before: 0 correct by construction
    assert all(r["accuracy_before"] == 0.0 for r in res.overall)
    f1 = {r.query_id: r for r in res.records if r.method == "matrice" and r.fact_id == "f1"}
    assert f1["f1|en|0"].correct_after and f1["f1|en|1"].correct_after
    amig = next(r for r in res.overall if r["method"] == "amig")
    assert amig["accuracy_gain"] == 0.0 and amig["n_empty"] == n_err  # empty sets gain nothing
    assert set(res.empty_facts["amig"]) == {p.fact_id for p in probes if not p.correct}
    mat = {r["relation"]: r for r in res.by_relation if r["method"] == "matrice"}
    n_cap = sum(1 for p in probes if not p.correct and p.relation == "capital")
    assert mat["capital"]["n_correct_after"] >= 2 and mat["capital"]["n_queries"] == n_cap
    assert mat["capital"]["accuracy_gain"] == pytest.approx(mat["capital"]["n_correct_after"] / n_cap)
    json.dumps(res.to_dict())
    by_lang = [r for r in res.by_lang if r["method"] == "matrice"]
    assert [r["lang"] for r in by_lang] == ["en"]


def test_enhancement_default_languages_and_unprobed(llama):
    probes = probe(llama, QUERIES)
    partial = [p for p in probes if p.query_id != "f2|fi|0"]
    res = enhance_low_resource(llama, QUERIES, partial, sets_for({}, ("matrice",)), methods=("matrice",), progress=False)
    assert res.n_unprobed == 1
    assert {r.lang for r in res.records} <= {"fi"} and all(not r.correct_after for r in res.records)
