"""The hand-built cases the experiment tests share: tiny random models whose outcome is known.

The central trick: a GPT-2 "knowledge neuron" is implanted by hand. Neuron i of the last layer gets
a constant activation (its c_fc column is 0, its bias 10 → GELU(10) = 10) and writes c·Ê(" Paris")
into the residual stream (its c_proj row). The model then predicts " Paris" for every query, and
erasing / updating / scaling that one neuron has a known effect.
"""

from __future__ import annotations

import numpy as np
import torch

from conftest import tiny_on_device as tiny_adapter  # on MATRICE_TEST_DEVICE
from matrice.data.schema import Fact, make_query
from matrice.experiments import ProbeRecord, encode_all
from matrice.models.encoding import encode_query
from matrice.models.predict import greedy_decode, is_correct, score_answers

TEMPLATES = {
    "en": ["The capital of [X] is [Y].", "[X] has its capital in [Y]."],
    "fr": ["La capitale de [X] est [Y].", "[X] a pour capitale [Y]."],
    "fi": ["[X] pääkaupunki on [Y]."],
}
FACTS = [
    Fact("f1", "capital", {"en": "France", "fr": "la France", "fi": "Ranskan"}, {"en": "Paris", "fr": "Paris", "fi": "Pariisi"}),
    Fact("f2", "capital", {"en": "Germany", "fr": "l'Allemagne", "fi": "Saksan"}, {"en": "Berlin", "fr": "Berlin", "fi": "Berliini"}),
    Fact("f3", "capital", {"en": "Italy", "fr": "l'Italie", "fi": "Italian"}, {"en": "Rome", "fr": "Rome", "fi": "Rooma"}),
    Fact("f4", "continent", {"en": "Japan", "fr": "le Japon", "fi": "Japanin"}, {"en": "Asia", "fr": "Asie", "fi": "Aasia"}),
]
IMPLANT = (2, 5)  # (layer, neuron) of the implanted GPT-2 neuron


def build_queries():
    return [make_query(f, lang, t, tpl, None) for f in FACTS for lang, tpls in TEMPLATES.items() for t, tpl in enumerate(tpls)]


QUERIES = build_queries()


def pairs(*ps):
    return np.array(ps, dtype=np.int64).reshape(-1, 2)


def implanted_gpt2(scale: float = 50.0):
    """Tiny GPT-2 whose neuron IMPLANT always fires (10) and writes scale·Ê(first token of " Paris")."""
    a = tiny_adapter("gpt2")
    gold = encode_query(a, QUERIES[0]).answer_ids[0]
    layer, i = IMPLANT
    mlp = a.layers[layer].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, i] = 0.0
        mlp.c_fc.bias[i] = 10.0
        e = a.unembedding(gold).clone()
        mlp.c_proj.weight[i, :] = scale * e / e.norm()
    return a, gold


def sets_for(fact_sets: dict[str, dict[str, np.ndarray]], methods=("matrice", "amig", "random")):
    out = {}
    for f in FACTS:
        per = fact_sets.get(f.fact_id, {})
        out[f.fact_id] = {m: per.get(m, pairs()) for m in methods}
    return out


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved):
    now = model.state_dict()
    assert set(now) == set(saved)
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def probe(adapter, queries):
    """What the lead's probe stage writes: P, rank and greedy correctness of the unedited model."""
    encs, _ = encode_all(adapter, queries)
    qs = [q for q in queries if q.query_id in encs]
    scores = score_answers(adapter, [encs[q.query_id] for q in qs])
    gen = greedy_decode(adapter, [encs[q.query_id] for q in qs])
    return [ProbeRecord(q.query_id, q.fact_id, q.relation, q.lang, s.prob, s.rank, bool(is_correct(adapter, g, q.answer)))
            for q, s, g in zip(qs, scores, gen)]
