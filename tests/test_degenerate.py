"""Degenerate knowledge neurons on constructed models where the answer is known: implanted neurons
that each alone carry the answer are redundant (a degenerate group); untouched neurons are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matrice.experiments.degenerate import DegenerateConfig, Suppressor, find_degenerate, verify
from matrice.models.encoding import encode_query
from matrice.models.tiny import TINY_CAUSAL_FAMILIES, tiny_adapter
from implant import QUERIES

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait

CFG = DegenerateConfig(t_high=0.8, t_low=0.5)


def redundant_gpt2(neurons: list[tuple[int, int]], scale: float = 60.0):
    """Tiny GPT-2 in which every given neuron always fires and writes scale·Ê(gold): any one of them
    alone makes the gold token near-certain."""
    a = tiny_adapter("gpt2")
    enc = encode_query(a, QUERIES[0])
    gold = enc.answer_ids[0]
    e = a.unembedding(gold).clone()
    with torch.no_grad():
        for layer, i in neurons:
            mlp = a.layers[layer].mlp
            mlp.c_fc.weight[:, i] = 0.0
            mlp.c_fc.bias[i] = 10.0
            mlp.c_proj.weight[i, :] = scale * e / e.norm()
    return a, enc


def test_a_redundant_pair_is_degenerate_and_an_unrelated_pair_is_not():
    twins, unrelated = [(2, 5), (0, 7)], [(1, 3), (1, 4)]
    a, enc = redundant_gpt2(twins)
    p0, ratios = Suppressor(a).ratios(enc, [[twins[0]], [twins[1]], twins, unrelated])
    assert p0 > 0.8 and ratios[0] >= 0.8 and ratios[1] >= 0.8 and ratios[2] < 0.5  # the construction holds
    found = find_degenerate(Suppressor(a), enc, twins + unrelated, CFG)
    assert found.groups == [twins] and found.group_ratio[0] < 0.5
    assert set(found.harmless) == set(twins + unrelated)
    assert found.n_evaluated == 4 + 6  # singles, then every pair of harmless members, nothing else


def test_a_single_carrier_is_not_harmless_so_never_degenerate():
    a, enc = redundant_gpt2([(2, 5)])
    found = find_degenerate(Suppressor(a), enc, [(2, 5), (1, 3), (1, 4)], CFG)
    assert (2, 5) not in found.harmless and found.groups == []


def test_greedy_growth_finds_a_minimal_triple():
    triple = [(1, 2), (2, 5), (0, 7)]  # any one suffices: pairs are harmless, the three together are not
    a, enc = redundant_gpt2(triple)
    found = find_degenerate(Suppressor(a), enc, triple + [(0, 1)], CFG)
    assert [sorted(g) for g in found.groups] == [sorted(triple)]
    check = verify(Suppressor(a), enc, found.groups[0], CFG)
    assert check["holds"] and check["min_single_ratio"] >= 0.8 and check["group_ratio"] < 0.5


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="t_low < t_high"):
        DegenerateConfig(t_high=0.4, t_low=0.5)


def test_a_fact_search_verifies_on_held_out_paraphrases_shares_across_languages_and_summarises():
    from dataclasses import asdict

    from matrice.experiments.degenerate import search_fact, summarise

    twins = [(2, 5), (0, 7)]
    a, _ = redundant_gpt2(twins)
    f1 = {(q.lang, q.template_id): encode_query(a, q) for q in QUERIES if q.fact_id == "f1" and q.lang in ("en", "fr")}
    search = {lang: f1[(lang, 0)] for lang in ("en", "fr")}
    held_out = {lang: f1[(lang, 1)] for lang in ("en", "fr")}
    records = search_fact(a, "f1", "capital", search, held_out, twins, {"en": twins, "fr": [(1, 3), (1, 4)]}, CFG)
    by = {(r.set_kind, r.lang): r for r in records}
    assert set(by) == {("lakn", "en"), ("lakn", "fr"), ("language", "en"), ("language", "fr")}
    lakn_en = by[("lakn", "en")]
    assert lakn_en.groups == [[[2, 5], [0, 7]]] and lakn_en.layers_spanned == [2]
    assert lakn_en.verified[0]["holds"] and lakn_en.shared_langs == [["fr"]]
    assert by[("language", "fr")].groups == [] and by[("language", "en")].shared_langs == [[]]
    summary = summarise([asdict(r) for r in records], n_languages=2)
    assert summary["lakn"]["found"].mean == 1.0 and summary["lakn"]["shared"].mean == 1.0
    assert summary["language"]["found"].mean == 0.5 and summary["lakn"]["size"].mean == 2.0
    assert summary["lakn"]["verified"].mean == 1.0 and summary["lakn"]["found"].n == 1


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_batched_suppression_rows_equal_one_edit_set_per_group(family):
    """The fast path (groups as rows over the answer token, prefix cache broadcast) gives the
    probabilities of one full scoring per group."""
    from matrice.models.hooks import neuron_edits
    from matrice.models.predict import score_answers_many

    from conftest import tiny_on_device

    a = tiny_on_device(family)
    enc = encode_query(a, QUERIES[0], few_shot=False)
    n = a.n_neurons
    groups = [[], [(0, 1)], [(1, 2), (0, 3)], [(a.n_layers - 1, n - 1), (0, 1), (1, 5)], [(1, 2)]]
    scorer = Suppressor(a, rows=3)  # a batch boundary inside the groups
    p0, fast = scorer.ratios(enc, groups)
    _, again = scorer.ratios(enc, groups[::-1])  # the cached prompt gives the same numbers
    slow = [s[0].prob for s in score_answers_many(a, [enc], [None, *(neuron_edits(g, 0.0) if g else None for g in groups)])]
    np.testing.assert_allclose(p0, slow[0], rtol=2e-5)
    np.testing.assert_allclose(fast * p0, slow[1:], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(again, fast[::-1], rtol=1e-5)  # rows batched differently: float rounding only


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_requests_of_several_queries_in_shared_forwards_equal_one_query_at_a_time(family):
    """ratios_many over prepared prompts (rows of different queries in one forward) gives each
    request's ratios as Suppressor.ratios does alone; the lockstep driver returns each search's result."""
    from conftest import tiny_on_device
    from matrice.experiments.degenerate import run_lockstep, search_steps

    a = tiny_on_device(family)
    encs = [encode_query(a, q, few_shot=True) for q in QUERIES if q.fact_id == "f1"][:4]
    n = a.n_neurons
    requests = [(encs[0], [[(0, 1)], [(1, 2), (0, 3)]]), (encs[1], [[(a.n_layers - 1, n - 1)]]),
                (encs[2], [[(1, 2)], [(0, 1), (1, 5)], [(2, 3)]]), (encs[0], [[(2, 2)]])]
    alone = Suppressor(a)
    want = [alone.ratios(enc, groups) for enc, groups in requests]
    shared = Suppressor(a, rows=4)  # a forward boundary inside the requests
    shared.prepare(encs)
    assert len(shared._prompts) == 1  # the four prompts run together
    got = shared.ratios_many(requests)
    for (p0, ratios), (q0, expected) in zip(got, want):
        np.testing.assert_allclose(p0, q0, rtol=1e-5)
        np.testing.assert_allclose(ratios, expected, rtol=1e-4, atol=1e-7)
    candidates = [(0, 1), (1, 2), (2, 3), (0, 4)]
    together = run_lockstep(shared, [search_steps(e, candidates, CFG) for e in encs[:3]])
    one_by_one = [find_degenerate(alone, e, candidates, CFG) for e in encs[:3]]
    assert [(r.harmless, r.groups, r.n_evaluated) for r in together] == [(r.harmless, r.groups, r.n_evaluated) for r in one_by_one]
