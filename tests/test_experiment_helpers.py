"""Shared experiment helpers: probe records, neuron-set lookup, each language's original query."""

from __future__ import annotations

import pytest

from implant import QUERIES
from matrice.probing import ProbeResult, accuracy_by_language
from matrice.experiments import MissingNeuronSetError, ProbeRecord, as_probe_map, fact_neurons, original_queries

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_probe_records_and_neuron_lookup(llama):
    recs = [ProbeRecord("q1", "f1", "r", "en", 0.5, 0, True).to_dict(), ProbeRecord("q2", "f1", "r", "fr", 0.1, 3, False)]
    pm = as_probe_map(recs)
    assert pm["q1"].correct and not pm["q2"].correct and pm["q2"].rank == 3
    assert as_probe_map(pm) == pm
    with pytest.raises(ValueError, match="duplicate"):
        as_probe_map(recs + recs[:1])
    with pytest.raises(ValueError, match="misses field"):
        as_probe_map([{"query_id": "q"}])
    sets = {"f1": {"matrice": [[0, 1]], "amig": []}}
    assert fact_neurons(sets, "f1", "amig").shape == (0, 2)
    with pytest.raises(MissingNeuronSetError, match="'f9' has no neuron sets"):
        fact_neurons(sets, "f9", "matrice")
    with pytest.raises(MissingNeuronSetError, match="no neuron set for method 'random'"):
        fact_neurons(sets, "f1", "random")
    with pytest.raises(ValueError, match="out of range"):
        fact_neurons({"f1": {"matrice": [[3, 0]]}}, "f1", "matrice", llama)
    orig = original_queries([q for q in QUERIES if q.fact_id == "f1"])
    assert {l: q.template_id for l, q in orig.items()} == {"en": 0, "fr": 0, "fi": 0}


def test_probe_accuracy_by_language():
    rows = [
        ProbeResult("a", "f", "P36", "en", 0, 0.5, 0, True, "Paris"),
        ProbeResult("b", "f", "P36", "en", 1, 0.1, 3, False, "Lyon"),
        ProbeResult("c", "f", "P36", "fr", 0, 0.2, 0, True, "Paris"),
    ]
    acc = accuracy_by_language(rows)
    assert acc["en"] == {"accuracy": 0.5, "top1_first_token": 0.5, "mean_prob": pytest.approx(0.3), "queries": 2}
    assert acc["fr"]["accuracy"] == 1.0
