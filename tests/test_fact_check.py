"""Fact checking (AMIG): statements, neuron sources, the scores against slow references on every
family, and the decision rule on constructed cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matrice.method.attribution import AttributionConfig, reference_attribution
from matrice.method.attribution.common import target_activations
from matrice.experiments.fact_check import (DETECTORS, activation_scores, attribution_scores, best_threshold, build_statements,
                                degenerate_neurons, detection_scores, detector_neurons, f1_difference,
                                leave_one_fact_out, pair_accuracy, statement_input)
from matrice.models.encoding import encode_query
from matrice.models.tiny import TINY_FAMILIES
from implant import QUERIES

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def _rows(true_scores: dict[str, float], false_scores: dict[str, float], langs=("en", "fr")) -> list[dict]:
    """Statements of facts f0..fk: the same score for every detector, flagged leave-one-fact-out."""
    rows = []
    for fact in true_scores:
        for lang in langs:
            for true, s in ((True, true_scores[fact]), (False, false_scores[fact])):
                rows.append({"fact_id": fact, "lang": lang, "true": true, "scores": {d: s for d in DETECTORS}})
    for d in DETECTORS:
        flags = leave_one_fact_out([r["fact_id"] for r in rows], [r["scores"][d] for r in rows], [not r["true"] for r in rows])
        for r, f in zip(rows, flags):
            r.setdefault("flagged", {})[d] = f
    return rows


def test_a_separable_detector_reaches_f1_one_and_a_blind_one_does_not():
    rng = np.random.default_rng(0)
    facts = [f"f{i}" for i in range(6)]
    separable = _rows({f: 1.0 + rng.random() for f in facts}, {f: -rng.random() for f in facts})
    scores = detection_scores(separable, "dkn_attribution")
    assert scores.f1.mean == 1.0 and scores.precision.mean == 1.0 and scores.recall.mean == 1.0
    assert scores.f1.n == 6 and scores.n_statements == 24
    assert pair_accuracy(separable, "dkn_attribution").mean == 1.0
    blind = _rows({f: 0.5 for f in facts}, {f: 0.5 for f in facts})  # true and false look the same
    b = detection_scores(blind, "probability")
    assert b.f1.mean == pytest.approx(2 / 3)  # the best it can do is flag everything
    assert pair_accuracy(blind, "probability").mean == 0.5
    inverted = _rows({f: -1.0 - rng.random() for f in facts}, {f: rng.random() for f in facts})
    assert pair_accuracy(inverted, "kn_activation").mean == 0.0


def test_the_f1_difference_is_paired_and_judged_against_zero():
    rng = np.random.default_rng(1)
    facts = [f"f{i}" for i in range(8)]
    rows = _rows({f: 1.0 + rng.random() for f in facts}, {f: -rng.random() for f in facts})
    for r in rows:  # probability is blind: the same score for both statements of a fact
        r["scores"]["probability"] = 0.5
    flags = leave_one_fact_out([r["fact_id"] for r in rows], [0.5] * len(rows), [not r["true"] for r in rows])
    for r, f in zip(rows, flags):
        r["flagged"]["probability"] = f
    diff = f1_difference(rows, "dkn_attribution", "probability")
    assert diff.mean == pytest.approx(1 / 3) and diff.n == 8 and diff.p is not None
    assert diff.low == pytest.approx(1 / 3) and diff.high == pytest.approx(1 / 3)  # separable in every resample


def test_thresholds_never_see_the_fact_they_judge():
    facts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    is_false = [False, True] * 4
    # a alone would put θ in (0.2, 0.4) and be judged perfectly; the others put it in (0.4, 1), so both
    # of a's statements are flagged: a is judged by the others' θ, never by its own
    scores = [0.4, 0.2, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    flags = leave_one_fact_out(facts, scores, is_false)
    assert flags[:2] == [True, True] and flags[2:] == [False, True] * 3
    assert best_threshold([1.0, 0.0], [False, True]) == 0.5
    assert leave_one_fact_out(["a", "a"], [1.0, None], [False, True]) == [None, None]  # no other fact: no θ


def test_statements_pair_each_query_with_another_object_of_its_relation(tiny):
    a = tiny("gpt2")
    checked = [q for q in QUERIES if q.template_id == 0]
    stmts = build_statements(a, checked, QUERIES, seed=0, few_shot=False)
    assert stmts == build_statements(a, checked, QUERIES, seed=0, few_shot=False)  # seeded
    by = {}
    for s, enc in stmts:
        by.setdefault((s.fact_id, s.lang), {})[s.true] = (s, enc)
    assert all(len(v) == 2 for v in by.values())  # never a statement without its pair
    assert not any(f == "f4" for f, _ in by)  # the only fact of its relation: no false object to draw
    capitals = {q.answer for q in QUERIES if q.relation == "capital"}
    for (fact, lang), pair in by.items():
        (t, t_enc), (f, f_enc) = pair[True], pair[False]
        assert f.obj in capitals and f.obj != t.obj and f_enc.answer_ids[0] != t_enc.answer_ids[0]
        assert f_enc.input_ids == t_enc.input_ids  # the same question, another object (causal)


def test_relation_neurons_come_only_from_the_other_facts():
    records = [{"fact_id": "a", "groups": [[[1, 2], [3, 4]]]}, {"fact_id": "b", "groups": []},
               {"fact_id": "b", "groups": [[[5, 6], [1, 2]]]}, {"fact_id": "c", "groups": [[[7, 7], [8, 8]]]}]
    dkns = degenerate_neurons(records)
    assert dkns["a"] == {(1, 2), (3, 4)} and dkns["b"] == {(5, 6), (1, 2)}
    kns = {"a": frozenset({(0, 0)}), "b": frozenset({(0, 1)}), "c": frozenset({(0, 2)})}
    relation_of = {"a": "r", "b": "r", "c": "s"}
    held_out = detector_neurons(relation_of, dkns, kns, "relation")
    assert held_out["a"].dkn == dkns["b"] and held_out["b"].dkn == dkns["a"] and held_out["a"].kn == kns["b"]
    assert held_out["c"].dkn == frozenset() and held_out["c"].kn == frozenset()  # alone in its relation: abstains
    own = detector_neurons(relation_of, dkns, kns, "fact")
    assert own["c"].dkn == dkns["c"] and own["a"].kn == kns["a"]
    with pytest.raises(ValueError, match="neuron_source"):
        detector_neurons(relation_of, dkns, kns, "everything")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dkn_attribution_equals_the_reference_cells(tiny, family):
    a = tiny(family)
    encs = [encode_query(a, q) for q in QUERIES if q.lang == "en" and q.template_id == 0][:2]
    neurons = frozenset({(0, 1), (0, 5), (a.n_layers - 1, a.n_neurons - 1)})
    cfg = AttributionConfig(steps=3, baseline="saig", batch_size=7)
    fast = attribution_scores(a, encs, neurons, cfg)
    for enc, score in zip(encs, fast):
        ref = reference_attribution(a, enc, cfg).mean(dim=0)
        expected = float(np.mean([ref[l, n] for l, n in sorted(neurons)]))
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert attribution_scores(a, encs, frozenset(), cfg) == [None, None]


def test_memoized_layers_equal_fresh_ones_and_only_new_layers_are_integrated(tiny, tmp_path, monkeypatch):
    import matrice.experiments.fact_check.detectors as fc
    from matrice.memo import Memo

    a = tiny("llama")
    encs = [encode_query(a, q) for q in QUERIES if q.lang == "en" and q.template_id == 0][:2]
    cfg = AttributionConfig(steps=2, baseline="saig", batch_size=16)
    first = frozenset({(0, 1), (1, 3)})
    moved = frozenset({(1, 2), (a.n_layers - 1, 0)})  # a sweep moved the neurons: layer 1 seen, the last not
    fresh = [attribution_scores(a, encs, n, cfg) for n in (first, moved)]
    integrated: list[list[int]] = []
    real = fc.fast_attribution_many
    monkeypatch.setattr(fc, "fast_attribution_many", lambda ad, es, c, layers: (integrated.append(list(layers)),
                                                                                real(ad, es, c, layers))[1])
    memo = Memo.for_model(tmp_path, a.model)
    assert attribution_scores(a, encs, first, cfg, memo) == fresh[0]
    assert integrated == [[0, 1]]
    integrated.clear()
    # layer 1 read back, the last layer integrated alone: equal to integrating both together
    assert attribution_scores(a, encs, moved, cfg, memo) == pytest.approx(fresh[1], rel=1e-6, abs=1e-9)
    assert integrated == [[a.n_layers - 1]]
    integrated.clear()
    both = attribution_scores(a, encs, first | moved, cfg)
    assert attribution_scores(a, encs, first | moved, cfg, memo) == pytest.approx(both, rel=1e-6, abs=1e-9)
    assert integrated == [[0, 1, a.n_layers - 1]]  # the fresh call's: the memoized one integrated nothing


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_kn_activation_reads_the_object_in_the_filled_statement(tiny, family):
    a = tiny(family)
    q = next(q for q in QUERIES if q.lang == "en")
    enc = encode_query(a, q)
    ids, pos = statement_input(a, enc)
    assert ids[pos] == enc.answer_ids[-1] and pos > (enc.target_pos if a.causal else enc.target_pos - 1)
    neurons = frozenset({(0, 3), (1, 2)})
    acts = target_activations(a, torch.tensor([ids]), pos)[0]
    expected = float((acts[0, 3] + acts[1, 2]) / 2)
    assert activation_scores(a, [enc], neurons)[0] == pytest.approx(expected, rel=1e-5)
    assert activation_scores(a, [enc], frozenset()) == [None]


def test_the_stage_names_a_bad_parameter_and_a_missing_input(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    import yaml

    from stages import fact_check

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fact_check", "gemma3_270m"])
    params["fact_check"]["neuron_source"] = "everything"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="fact_check.neuron_source"):
        fact_check.main()
    params["fact_check"]["neuron_source"] = "relation"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="degenerate.json is missing"):
        fact_check.main()
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("fact_check*"))


def test_the_random_control_matches_the_dkns_per_layer_and_the_share_divides_by_p():
    from matrice.experiments import experiment_rng
    from matrice.experiments.fact_check.detectors import layer_matched_random, share_scores

    dkn = frozenset({(3, 1), (3, 7), (5, 2)})
    control = layer_matched_random(dkn, 10, experiment_rng(0, "x"))
    assert sorted(l for l, _ in control) == [3, 3, 5] and not control & dkn
    assert control == layer_matched_random(dkn, 10, experiment_rng(0, "x"))  # seeded
    assert layer_matched_random(frozenset(), 10, experiment_rng(0, "x")) == frozenset()
    assert share_scores([0.2, None, 0.1], [0.4, 0.5, 0.0]) == [0.5, None, None]


def test_fact_check_controls_get_their_own_rows():
    from matrice.experiments.fact_check import fact_check_claims, summarise, summary_json

    rows = []
    for f in range(10):
        for true in (True, False):
            p = 0.6 if true else 0.4
            scores = {"dkn_attribution": p * (1.5 if true else 0.5), "kn_activation": 0.0, "probability": p,
                      "random_attribution": 0.1, "dkn_share": 1.5 if true else 0.5}
            rows.append({"fact_id": f"P{f}-e1", "lang": "en", "true": true, "scores": scores,
                         "flagged": {d: (not true) if d != "random_attribution" else True for d in scores}})
    summary = summarise(rows, 0)
    claims = {c.key: c for c in fact_check_claims({"summary": summary_json(summary), "statements": rows})}
    assert claims["amig_fact_check_control_random"].estimate.mean > 0  # perfect DKN flags vs flag-everything
    assert claims["amig_fact_check_control_share"].estimate.mean == pytest.approx(0.0)  # both perfect

