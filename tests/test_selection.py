"""Hand-computed checks of neuron selection, baselines and the run-level record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matrice.method.selection import (
    METHODS,
    NeuronSets,
    SelectionConfig,
    fact_rng,
    intersect,
    intersection_score,
    layer_distribution,
    layer_matched_random,
    random_neurons,
    select_by_threshold,
    select_fact,
    summary,
    top_k,
)
from matrice.method.uncertainty import AggregationConfig, FactScores, aggregate_fact

REPO = Path(__file__).resolve().parents[1]


def pairs(*ps):
    return np.array(ps, dtype=np.int64).reshape(-1, 2)


# --- select_by_threshold ----------------------------------------------------------------------

def test_threshold_strict_at_tie():
    scores = np.array([[1.0, 0.5], [0.5, 0.25]])
    # tau*max = 0.5 exactly: the 0.5 scores are NOT above it
    np.testing.assert_array_equal(select_by_threshold(scores, 0.5), pairs([0, 0]))
    # tau*max = 0.25: the 0.25 score is excluded; equal scores ordered by (layer, neuron)
    np.testing.assert_array_equal(select_by_threshold(scores, 0.25), pairs([0, 0], [0, 1], [1, 0]))


def test_threshold_sorted_by_score_desc():
    scores = np.array([[0.3, -1.0, 0.9], [0.6, 0.0, 0.3]])
    out = select_by_threshold(scores, 0.2)  # threshold 0.18
    np.testing.assert_array_equal(out, pairs([0, 2], [1, 0], [0, 0], [1, 2]))
    assert out.dtype == np.int64


def test_threshold_tau_one_selects_nothing():
    # strict '>' against the maximum itself
    assert select_by_threshold(np.array([[1.0, 0.2]]), 1.0).shape == (0, 2)


@pytest.mark.parametrize("scores", [[[0.0, 0.0]], [[-1.0, -0.5]], [[-0.1, 0.0]]])
def test_threshold_nonpositive_max_is_empty(scores):
    out = select_by_threshold(np.array(scores), 0.2)
    assert out.shape == (0, 2)
    assert out.dtype == np.int64


def test_threshold_negatives_never_selected():
    scores = np.array([[2.0, -5.0], [0.1, 1.0]])
    np.testing.assert_array_equal(select_by_threshold(scores, 0.01), pairs([0, 0], [1, 1], [1, 0]))


@pytest.mark.parametrize("tau", [0, -0.1, 1.5, float("nan")])
def test_threshold_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        select_by_threshold(np.ones((2, 2)), tau)


def test_threshold_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        select_by_threshold(np.array([[1.0, np.nan]]), 0.2)


# --- intersect / random -----------------------------------------------------------------------

def test_intersect_sorted():
    a = pairs([3, 1], [0, 2], [1, 1])
    b = pairs([1, 1], [3, 1], [2, 2])
    c = pairs([3, 1], [1, 1], [0, 0])
    np.testing.assert_array_equal(intersect([a, b, c]), pairs([1, 1], [3, 1]))
    np.testing.assert_array_equal(intersect([a]), pairs([0, 2], [1, 1], [3, 1]))


def test_intersect_empty_member_gives_empty():
    out = intersect([pairs([0, 0]), np.zeros((0, 2), dtype=np.int64)])
    assert out.shape == (0, 2)


def test_intersect_needs_a_set():
    with pytest.raises(ValueError):
        intersect([])


def test_random_neurons_count_range_distinct():
    rng = np.random.default_rng(0)
    out = random_neurons(50, 4, 30, rng)
    assert out.shape == (50, 2)
    assert out[:, 0].min() >= 0 and out[:, 0].max() < 4
    assert out[:, 1].min() >= 0 and out[:, 1].max() < 30
    assert len({tuple(p) for p in out.tolist()}) == 50
    # all neurons of a tiny model: every pair exactly once, sorted
    np.testing.assert_array_equal(random_neurons(4, 2, 2, rng), pairs([0, 0], [0, 1], [1, 0], [1, 1]))
    assert random_neurons(0, 2, 2, rng).shape == (0, 2)
    with pytest.raises(ValueError):
        random_neurons(5, 2, 2, rng)


def test_random_neurons_deterministic_per_seed_and_fact():
    a = random_neurons(20, 10, 1000, fact_rng(0, "P36:Q90"))
    b = random_neurons(20, 10, 1000, fact_rng(0, "P36:Q90"))
    c = random_neurons(20, 10, 1000, fact_rng(0, "P36:Q64"))
    d = random_neurons(20, 10, 1000, fact_rng(1, "P36:Q90"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_random_stable_across_processes():
    # crc32, not hash(): the draw must not depend on PYTHONHASHSEED
    code = (
        "from matrice.method.selection import fact_rng, random_neurons;"
        "print(random_neurons(5, 8, 500, fact_rng(3, 'fact-1')).tolist())"
    )
    outs = []
    for hs in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hs, "PYTHONPATH": str(REPO)}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1]
    assert outs[0] == str(random_neurons(5, 8, 500, fact_rng(3, "fact-1")).tolist()) + "\n"


# --- SelectionConfig --------------------------------------------------------------------------

def test_selection_config_defaults_and_validation():
    cfg = SelectionConfig()
    assert (cfg.tau, cfg.tau_amig, cfg.seed) == (0.2, 0.2, 0)
    SelectionConfig(tau=1.0, tau_amig=1)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got 0"):
        SelectionConfig(tau=0)
    with pytest.raises(ValueError, match=r"tau_amig must be in \(0, 1\], got 1.2"):
        SelectionConfig(tau_amig=1.2)
    with pytest.raises(ValueError, match="seed"):
        SelectionConfig(seed=-1)
    with pytest.raises(ValueError, match="seed"):
        SelectionConfig(seed=1.5)


# --- select_fact ------------------------------------------------------------------------------

def _fact_scores():
    en = np.array([[[1.0, 3.0], [2.0, 2.0]], [[3.0, 1.0], [4.0, 0.0]]])
    fr = np.array([[[0.0, 2.0], [1.0, 3.0]]])
    return aggregate_fact({"en": en, "fr": fr}, AggregationConfig())


def test_select_fact_all_methods_hand_computed():
    # Score maps (hand-computed in test_uncertainty): S [[0,.5],[.25,0]];
    # S_wo_uaq [[0,1],[.25,.5]]; first queries en [[.25,.75],[.5,.5]], fr [[0,1],[.25,.75]];
    # UaQ maps en [[.25,.25],[.5,0]], fr [[0,1],[.25,.75]].
    out = select_fact(_fact_scores(), SelectionConfig(tau=0.2, tau_amig=0.2, seed=0), "f1")
    assert list(out) == list(METHODS)
    np.testing.assert_array_equal(out["matrice"], pairs([0, 1], [1, 0]))  # > 0.1
    # amig: en > .15 -> all four; fr > .2 -> (0,1),(1,0),(1,1)
    np.testing.assert_array_equal(out["amig"], pairs([0, 1], [1, 0], [1, 1]))
    np.testing.assert_array_equal(out["wo_uaq"], pairs([0, 1], [1, 1], [1, 0]))  # > 0.2, by score
    # wo_ual: en > .1 -> (0,0),(0,1),(1,0); fr > .2 -> (0,1),(1,0),(1,1)
    np.testing.assert_array_equal(out["wo_ual"], pairs([0, 1], [1, 0]))
    assert out["random"].shape == (2, 2)


def test_size_matched_sets_hand_computed():
    # k = 2 (MATRICE). amig_k: min over languages of first-query maps / their max:
    # en/.75 [[.333,1],[.667,.667]], fr/1 [[0,1],[.25,.75]] -> min [[0,1],[.25,.667]] -> (0,1),(1,1)
    out = select_fact(_fact_scores(), SelectionConfig(tau=0.2, tau_amig=0.2, seed=0), "f1")
    np.testing.assert_array_equal(out["amig_k"], pairs([0, 1], [1, 1]))
    np.testing.assert_array_equal(out["wo_uaq_k"], pairs([0, 1], [1, 1]))  # S_wo_uaq top-2
    # UaQ maps / max: en [[.5,.5],[1,0]], fr [[0,1],[.25,.75]] -> min [[0,.5],[.25,0]] -> (0,1),(1,0)
    np.testing.assert_array_equal(out["wo_ual_k"], pairs([0, 1], [1, 0]))
    np.testing.assert_array_equal(out["random_layer"][:, 0], [0, 1])  # one in layer 0, one in layer 1


def test_intersection_score_is_the_intersection_at_every_threshold():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(4, 5, 30))
    score = intersection_score(maps)
    for tau in (0.05, 0.2, 0.5, 0.8):
        expected = intersect([select_by_threshold(m, tau) for m in maps])
        got = np.argwhere(score > tau)
        assert {tuple(p) for p in got} == {tuple(p) for p in expected}
    maps[2] = -np.abs(maps[2])  # a language with no positive score admits nothing
    assert len(top_k(intersection_score(maps), 5)) == 0


def test_top_k_and_layer_matched_random():
    scores = np.array([[0.5, -1.0, 0.5], [2.0, 0.0, 0.1]])
    np.testing.assert_array_equal(top_k(scores, 3), pairs([1, 0], [0, 0], [0, 2]))  # ties by (layer, neuron)
    assert len(top_k(scores, 10)) == 4  # only positive scores
    assert top_k(scores, 0).shape == (0, 2)
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, -1)
    reference = pairs([2, 5], [2, 9], [7, 1], [7, 3], [7, 4])
    a = layer_matched_random(reference, 1000, np.random.default_rng(1))
    b = layer_matched_random(reference, 1000, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert sorted(a[:, 0].tolist()) == [2, 2, 7, 7, 7] and len({tuple(p) for p in a}) == 5
    assert not np.array_equal(a, reference)
    assert layer_matched_random(pairs(), 10, np.random.default_rng(0)).shape == (0, 2)


def test_select_fact_tau_amig_separate():
    # tau_amig=0.5: en > .375 -> (0,1),(1,0),(1,1); fr > .5 -> (0,1),(1,1)
    out = select_fact(_fact_scores(), SelectionConfig(tau=0.2, tau_amig=0.5), "f1")
    np.testing.assert_array_equal(out["amig"], pairs([0, 1], [1, 1]))
    np.testing.assert_array_equal(out["matrice"], pairs([0, 1], [1, 0]))


def test_select_fact_random_matches_matrice_count_and_is_deterministic():
    rng = np.random.default_rng(7)
    L, N = 6, 200
    en = rng.normal(size=(3, L, N))
    de = en[:2] + 0.1 * rng.normal(size=(2, L, N))
    fs = aggregate_fact({"en": en, "de": de})
    cfg = SelectionConfig(tau=0.3)
    a = select_fact(fs, cfg, "fact-A")
    b = select_fact(fs, cfg, "fact-A")
    c = select_fact(fs, cfg, "fact-B")
    assert len(a["matrice"]) > 2
    assert len(a["random"]) == len(a["matrice"]) == len(c["random"])
    np.testing.assert_array_equal(a["random"], b["random"])
    assert not np.array_equal(a["random"], c["random"])
    np.testing.assert_array_equal(a["random"], random_neurons(len(a["matrice"]), L, N, fact_rng(0, "fact-A")))


def test_select_fact_single_language():
    fs = aggregate_fact({"en": np.array([[[1.0, 3.0], [2.0, 2.0]], [[3.0, 1.0], [4.0, 0.0]]])}, AggregationConfig(lang_norm="per_language"))
    # UaQ [[.25,.25],[.5,0]] -> min-max [[.5,.5],[1,0]] = S; tau .6 -> only (1,0)
    out = select_fact(fs, SelectionConfig(tau=0.6, tau_amig=0.6), "x")
    np.testing.assert_array_equal(out["matrice"], pairs([1, 0]))
    np.testing.assert_array_equal(out["wo_ual"], pairs([1, 0]))  # UaQ map > .3
    # first query [[.25,.75],[.5,.5]]: amig > .45 -> (0,1),(1,0),(1,1); wo_uaq min-max [[0,1],[.5,.5]] > .6
    np.testing.assert_array_equal(out["amig"], pairs([0, 1], [1, 0], [1, 1]))
    np.testing.assert_array_equal(out["wo_uaq"], pairs([0, 1]))


def test_select_fact_empty_when_s_nonpositive():
    z = np.zeros((2, 2, 3))
    fs = FactScores(["en", "fr"], np.full((2, 3), -0.1), z, z, np.zeros((2, 3)))
    out = select_fact(fs, SelectionConfig(), "f")
    for m in METHODS:
        assert out[m].shape == (0, 2), m


# --- NeuronSets / summary / layer distribution ------------------------------------------------

def _sets():
    ns = NeuronSets(methods=["matrice", "amig"])
    ns.add("f1", {"matrice": pairs([0, 1], [2, 5]), "amig": pairs([0, 1])})
    ns.add("f2", {"matrice": np.zeros((0, 2), dtype=np.int64), "amig": np.zeros((0, 2), dtype=np.int64)})
    ns.add("f3", {"matrice": pairs([1, 0], [1, 1], [0, 3], [2, 2]), "amig": pairs([2, 2])})
    return ns


def test_neuron_sets_json_roundtrip(tmp_path):
    ns = _sets()
    d = ns.to_dict()
    assert d == {
        "methods": ["matrice", "amig"],
        "facts": {
            "f1": {"matrice": [[0, 1], [2, 5]], "amig": [[0, 1]]},
            "f2": {"matrice": [], "amig": []},
            "f3": {"matrice": [[1, 0], [1, 1], [0, 3], [2, 2]], "amig": [[2, 2]]},
        },
    }
    path = tmp_path / "sub" / "neurons.json"
    ns.to_json(path)
    assert json.loads(path.read_text()) == d
    back = NeuronSets.from_json(path)
    assert back.methods == ["matrice", "amig"]
    assert back.facts["f2"]["amig"].shape == (0, 2)
    for fid in ("f1", "f2", "f3"):
        for m in ("matrice", "amig"):
            np.testing.assert_array_equal(back.facts[fid][m], ns.facts[fid][m])
            assert back.facts[fid][m].dtype == np.int64


def test_neuron_sets_empty_roundtrip(tmp_path):
    ns = NeuronSets()
    ns.to_json(tmp_path / "n.json")
    back = NeuronSets.from_json(tmp_path / "n.json")
    assert back.methods == list(METHODS) and back.facts == {}


def test_neuron_sets_validation():
    ns = NeuronSets(methods=["matrice"])
    with pytest.raises(ValueError, match="methods"):
        ns.add("f", {"amig": pairs([0, 0])})
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        ns.add("f", {"matrice": np.array([[0, 1, 2]])})
    ns.add("f", {"matrice": pairs([0, 0])})
    with pytest.raises(ValueError, match="already"):
        ns.add("f", {"matrice": pairs([0, 0])})


def test_summary():
    s = summary(_sets(), n_layers=3)
    m = s["matrice"]
    assert (m["n_facts"], m["n_empty"], m["mean_per_fact"], m["median_per_fact"]) == (3, 1, 2.0, 2.0)
    assert (m["min_per_fact"], m["max_per_fact"], m["total_neurons"]) == (0, 4, 6)
    a = s["amig"]
    assert (a["n_facts"], a["n_empty"], a["mean_per_fact"], a["median_per_fact"]) == (3, 1, 2 / 3, 1.0)
    json.dumps(s)  # JSON-able


def test_layer_distribution():
    dist = layer_distribution(_sets(), n_layers=4)
    # matrice layers: f1 [0,2], f3 [1,1,0,2] -> counts [2,2,2,0] / 6
    np.testing.assert_allclose(dist["matrice"], [1 / 3, 1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(dist["amig"], [0.5, 0.0, 0.5, 0.0])
    assert sum(dist["matrice"]) == pytest.approx(1.0)


def test_layer_distribution_plain_dict_and_empty_method():
    sets = {"f1": {"matrice": pairs([1, 0]), "random": np.zeros((0, 2))}}
    dist = layer_distribution(sets, n_layers=2)
    assert dist == {"matrice": [0.0, 1.0], "random": [0.0, 0.0]}
    with pytest.raises(ValueError, match="out of range"):
        layer_distribution(sets, n_layers=1)


def test_amig_uses_its_own_attribution_when_the_run_has_it(tmp_path):
    en = np.array([[[1.0, 3.0], [2.0, 2.0]]])
    fr = np.array([[[0.0, 2.0], [1.0, 3.0]]])
    # AMIG's own first-query maps: en |.|-normalised per layer [[1, 0], [0, 1]], fr [[.5, .5], [0, 1]]
    amig_first = {"en": np.array([[4.0, 0.0], [0.0, 2.0]]), "fr": np.array([[1.0, 1.0], [0.0, 5.0]])}
    fs = aggregate_fact({"en": en, "fr": fr}, AggregationConfig(), amig_first)
    np.testing.assert_allclose(fs.amig_norm, [[[1, 0], [0, 1]], [[.5, .5], [0, 1]]])
    out = select_fact(fs, SelectionConfig(tau=0.2, tau_amig=0.6), "f1")
    np.testing.assert_array_equal(out["amig"], pairs([1, 1]))  # en > .6: (0,0),(1,1); fr > .6: (1,1)
    without = select_fact(aggregate_fact({"en": en, "fr": fr}), SelectionConfig(tau=0.2, tau_amig=0.6), "f1")
    assert {tuple(p) for p in without["amig"]} != {(1, 1)}  # the SAIG maps give another set
    np.testing.assert_array_equal(out["matrice"], without["matrice"])  # MATRICE never reads AMIG's maps
    from matrice.method.scores import ScoreStore, save_scores
    save_scores(tmp_path / "s", [("f1", fs)])
    np.testing.assert_allclose(ScoreStore(tmp_path / "s")["f1"].amig_norm, fs.amig_norm, rtol=1e-6)
    with pytest.raises(ValueError, match="missing for language"):
        aggregate_fact({"en": en, "fr": fr}, AggregationConfig(), {"en": amig_first["en"]})


def test_leave_one_out_sets_roundtrip_and_threshold_without_the_language(tmp_path):
    from matrice.method.selection import leave_one_out_from_json, leave_one_out_to_json, select_leave_one_out

    rng = np.random.default_rng(2)
    fs = aggregate_fact({lang: rng.normal(size=(2, 3, 40)) for lang in ("en", "fr", "zh")})
    sets = select_leave_one_out(fs, SelectionConfig(tau=0.3), "f")
    assert list(sets) == ["en", "fr", "zh"]
    for k, lang in enumerate(sets):
        np.testing.assert_array_equal(sets[lang]["lolo"], select_by_threshold(fs.S_leave_out[k], 0.3))
        assert sorted(sets[lang]["lolo_random_layer"][:, 0].tolist()) == sorted(sets[lang]["lolo"][:, 0].tolist())
    leave_one_out_to_json({"f": sets}, tmp_path / "l.json")
    back = leave_one_out_from_json(tmp_path / "l.json")
    for lang in sets:
        for m in sets[lang]:
            np.testing.assert_array_equal(back["f"][lang][m], sets[lang][m])
