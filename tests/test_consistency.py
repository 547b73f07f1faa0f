"""Query localisation: the consistency score and its link to the experiments, on cases where the
answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from matrice.experiments.consistency import (fact_consistency, fact_effects, group_difference, jaccard, link_table, spearman,
                                 split_consistent, top_k)

LANGS = {"q_en0": "en", "q_en1": "en", "q_fr0": "fr", "q_fr1": "fr"}


def _hot(cells: list[int], shape=(3, 10), seed: int = 0) -> np.ndarray:
    """A map with small noise and large values at the given flat cells."""
    m = np.random.default_rng(seed).uniform(0, 0.01, size=shape)
    m.ravel()[cells] = np.linspace(2.0, 1.0, len(cells))
    return m


def test_identical_maps_are_fully_consistent():
    maps = {q: _hot([3, 7, 12, 25]) for q in LANGS}
    c = fact_consistency("f", maps, LANGS, k=4)
    assert c.consistency == c.within_language == c.cross_language == 1.0
    assert c.cas_agreement == 1.0 and c.n_queries == 4


def test_disjoint_maps_score_zero_and_paraphrase_agreement_is_within_language():
    disjoint = {q: _hot([4 * i, 4 * i + 1], seed=i) for i, q in enumerate(LANGS)}
    assert fact_consistency("f", disjoint, LANGS, k=2).consistency == 0.0
    by_lang = {"q_en0": _hot([1, 2]), "q_en1": _hot([1, 2], seed=1), "q_fr0": _hot([20, 21]), "q_fr1": _hot([20, 21], seed=2)}
    c = fact_consistency("f", by_lang, LANGS, k=2)
    assert c.within_language == 1.0 and c.cross_language == 0.0
    assert c.consistency == pytest.approx(2 / 6)  # 2 of the 6 pairs share a language
    with pytest.raises(ValueError, match="top_k"):
        fact_consistency("f", by_lang, LANGS, k=0)


def test_cas_agreement_drops_when_the_largest_mean_is_not_the_stable_neuron():
    """Neuron 1 is moderate in every query (mean 0.2, std 0.1); neuron 2 is large in the English queries
    only (mean 0.45, std 0.45): the mean picks 2, mean − std picks 1."""
    maps = {q: np.zeros((2, 5)) for q in LANGS}
    for q in ("q_en0", "q_en1"):
        maps[q].ravel()[[1, 2]] = [0.1, 0.9]
    for q in ("q_fr0", "q_fr1"):
        maps[q].ravel()[[1, 3]] = [0.3, 0.7]
    assert fact_consistency("f", maps, LANGS, k=1).cas_agreement == 0.0


def test_top_k_and_jaccard():
    assert top_k(np.array([0.1, 3.0, 2.0, 3.0]), 2) == frozenset({1, 3})  # ties broken by index
    assert jaccard(frozenset({1, 2}), frozenset({2, 3})) == pytest.approx(1 / 3)


def test_split_at_the_median_or_a_fixed_threshold():
    scores = {"a": 0.1, "b": 0.5, "c": 0.9}
    groups, cut = split_consistent(scores)
    assert cut == 0.5 and groups == {"a": False, "b": True, "c": True}
    assert split_consistent(scores, 0.95)[0] == {"a": False, "b": False, "c": False}


def test_link_finds_a_built_in_difference_and_correlation():
    rng = np.random.default_rng(0)
    facts = [f"f{i}" for i in range(20)]
    consistency = {f: i / 20 for i, f in enumerate(facts)}
    groups, _ = split_consistent(consistency)
    effect = {f: -consistency[f] + rng.normal(0, 0.01) for f in facts}  # more consistent, more suppressed
    (row,) = link_table(consistency, groups, {"suppression": effect})
    assert row["difference"].high < 0 and row["difference"].n == 20
    assert row["spearman"].mean < -0.9 and row["spearman"].high < 0
    flat = group_difference([1.0, 1.0, 1.0, 1.0], [True, True, False, False])
    assert flat.mean == 0.0
    assert spearman([1, 2], [2, 1]).mean is None  # too few facts to rank


def test_effects_per_fact_use_evaluation_queries_and_pool_editing_over_languages():
    manip = {"records": [
        {"method": "matrice", "mode": "suppress", "fact_id": "a", "query_id": "a|en|0", "delta_p": -0.9},
        {"method": "matrice", "mode": "suppress", "fact_id": "a", "query_id": "a|en|3", "delta_p": -0.2},
        {"method": "random", "mode": "suppress", "fact_id": "a", "query_id": "a|en|3", "delta_p": -0.5},
    ]}
    editing = {"records": [
        {"method": "matrice", "operation": "update", "fact_id": "a", "rel_ok": 1, "rel_n": 1},
        {"method": "matrice", "operation": "update", "fact_id": "a", "rel_ok": 0, "rel_n": 3},
        {"method": "matrice", "operation": "erasure", "fact_id": "a", "rel_ok": 0, "rel_n": 0},
    ]}
    effects = fact_effects(manip, editing, lambda qid: qid.endswith("|3"))
    assert effects["suppression ΔP/P"] == {"a": -0.2}
    assert effects["update reliability"] == {"a": 0.25} and effects["erasure reliability"] == {}
    assert fact_effects(manip, editing, lambda qid: False)["suppression ΔP/P"] == {"a": pytest.approx(-0.55)}


def test_spearman_keeps_an_interval_when_some_resamples_are_all_tied():
    """Update reliability is 0 for most facts: resamples of only those have no ρ; the interval comes
    from the others instead of turning into NaN."""
    from matrice.experiments.consistency import spearman

    x = np.arange(16.0)
    y = np.r_[np.zeros(13), [1 / 7, 0.0, 2 / 7]]
    est = spearman(x, y)
    assert est.low is not None and est.high is not None and est.low <= est.mean <= est.high


def test_intervals_resample_relations_when_a_relations_facts_share_a_group():
    """Six relations of five facts each, a relation's facts all in one group: the facts say the groups
    differ tightly, the relations (the independent draws) much less surely, so the interval widens."""
    rng = np.random.default_rng(1)
    relation_effect = {f"P{r}": rng.normal(0, 1) for r in range(6)}
    facts = [(f"P{r}-e{i}", f"P{r}") for r in range(6) for i in range(5)]
    values = [relation_effect[rel] + rng.normal(0, 0.05) for _, rel in facts]
    groups = [int(rel[1:]) % 2 == 0 for _, rel in facts]
    by_fact = group_difference(values, groups)
    by_relation = group_difference(values, groups, [rel for _, rel in facts])
    assert by_fact.mean == by_relation.mean and by_relation.n == 30
    assert (by_relation.high - by_relation.low) > 2 * (by_fact.high - by_fact.low)
    rho_fact = spearman(range(30), values)
    rho_rel = spearman(range(30), values, [rel for _, rel in facts])
    assert rho_fact.mean == rho_rel.mean and (rho_rel.high - rho_rel.low) > (rho_fact.high - rho_fact.low)
    consistency = {f: float(k) for k, (f, _) in enumerate(facts)}
    effect = dict(zip((f for f, _ in facts), values))
    (row,) = link_table(consistency, dict(zip(consistency, groups)), {"e": effect}, relation_of=lambda f: f.split("-")[0])
    assert row["difference"].low == by_relation.low and row["difference"].high == by_relation.high
