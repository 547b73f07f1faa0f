"""Knowledge editing (Tables III/IV), the λ sweep and the case study on the implanted GPT-2 neuron: erasure and update
flip the prediction, weights are restored bit for bit, the seeded choices of o' and the locality sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_on_device as tiny_adapter
from implant import FACTS, IMPLANT, QUERIES, pairs, sets_for, state, assert_same_state
from matrice.experiments.case_study import case_study
from matrice.experiments.edit import EditConfig, edit_facts
from matrice.experiments.edit_targets import choose_new_object, locality_sampler

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_edit_flips_prediction(gpt2_implant):
    a, gold = gpt2_implant
    saved = state(a.model)
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    cfg = EditConfig(locality_k=2, seed=0, scaling="column_norm")  # the implant is built for norm-relative λ
    res = edit_facts(a, QUERIES, sets, methods=("matrice", "amig"), cfg=cfg, facts=["f1"], progress=False)
    assert_same_state(a.model, saved)  # bit-for-bit after every edit
    new = res.new_objects["f1"]
    assert new["from_fact"] in ("f2", "f3") and new["old_token"] == gold  # same relation, seeded
    rows = {(r["method"], r["operation"], r["lang"]): r for r in res.summary}
    for lang in ("en", "fr"):  # " Paris" / " Berlin" / " Rome" share their first token in en and fr
        for op in ("erasure", "update"):
            r = rows[("matrice", op, lang)]
            assert r["reliability"] == 1.0 and r["rel_n"] == 1, (op, lang, r)
            assert r["generality"] == 1.0 and r["gen_n"] == 1, (op, lang, r)
        # no-op edit (empty set): nothing erased, nothing updated, nothing else disturbed
        assert rows[("amig", "erasure", lang)]["reliability"] == 0.0
        assert rows[("amig", "update", lang)]["reliability"] == 0.0
        assert rows[("amig", "erasure", lang)]["locality"] == 1.0
        assert rows[("amig", "update", lang)]["locality"] == 1.0
    assert res.empty_facts == {"matrice": [], "amig": ["f1"]}
    assert {r["lang"] for r in res.summary} == {"en", "fr", "fi", "average"}
    assert json.loads(json.dumps(res.to_dict()))["n_empty_facts"] == {"matrice": 0, "amig": 1}


def _locality_reference(fact_id, all_facts, k, seed):
    """The locality sample the obvious way: the other facts sorted, k of them drawn by the fact's seed."""
    from matrice.experiments import experiment_rng

    ordered = sorted(set(all_facts) - {fact_id})
    if k >= len(ordered):
        return ordered
    idx = experiment_rng(seed, "locality", fact_id).choice(len(ordered), size=k, replace=False)
    return [ordered[i] for i in sorted(idx)]


def test_edit_seeded_choices_and_skips(gpt2_implant):
    a, gold = gpt2_implant
    from matrice.experiments import group_by_fact

    by_fact = group_by_fact(QUERIES)
    picks = {choose_new_object(a, "f1", by_fact, [gold], seed=s).fact_id for s in range(8)}
    assert picks <= {"f2", "f3"} and choose_new_object(a, "f1", by_fact, [gold], seed=3) == choose_new_object(a, "f1", by_fact, [gold], seed=3)
    assert choose_new_object(a, "f4", by_fact, [0]) is None  # the only fact of its relation
    assert locality_sampler(["f1", "f2", "f3", "f4"], 2, 0)("f1") == locality_sampler(["f4", "f3", "f2", "f1"], 2, 0)("f1")
    assert "f1" not in locality_sampler(["f1", "f2", "f3", "f4"], 10, 0)("f1")
    fids = [f"g{i:03d}" for i in range(50)]
    sampler = locality_sampler(fids[::-1], 7, 3)
    for f in ("g000", "g017", "g049", "zzz"):
        assert sampler(f) == _locality_reference(f, fids, 7, 3) and f not in sampler(f) and len(sampler(f)) == 7
    res = edit_facts(a, QUERIES, sets_for({}), methods=("matrice",), cfg=EditConfig(locality_k=1), facts=["f4"], progress=False)
    assert res.skipped["no_new_object"] == ["f4"] and {r["operation"] for r in res.summary} == {"erasure"}
    only = edit_facts(a, QUERIES, sets_for({"f1": {"matrice": pairs(IMPLANT)}}), methods=("matrice",),
                      operations=("update",), cfg=EditConfig(locality_k=1, scaling="column_norm"), facts=["f1"],
                      progress=False)
    assert {r["operation"] for r in only.summary} == {"update"}
    assert next(r for r in only.summary if r["lang"] == "en")["reliability"] == 1.0
    with pytest.raises(ValueError, match="unknown edit operations"):
        edit_facts(a, QUERIES, sets_for({}), operations=("rewrite",), progress=False)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_edit_restores_weights_other_families(family):
    a = tiny_adapter(family)
    saved = state(a.model)
    rng = np.random.default_rng(0)
    sets = {f.fact_id: {"matrice": pairs(*[(int(l), int(i)) for l, i in zip(rng.integers(0, 3, 6), rng.integers(0, 48, 6))])}
            for f in FACTS}
    res = edit_facts(a, QUERIES, sets, methods=("matrice",), cfg=EditConfig(locality_k=2, erasure_known_only=False),
                     progress=False)
    assert_same_state(a.model, saved)
    rows = [r for r in res.summary if r["lang"] != "average"]
    assert {r["operation"] for r in rows} == {"erasure", "update"}
    for r in rows:
        for m in ("reliability", "generality", "locality"):
            assert r[m] is None or 0.0 <= r[m] <= 1.0

def test_case_study_fact_is_the_requested_one_or_the_first_capital():
    from matrice.experiments.case_study import choose_fact

    attributed = ["P17-1", "P36-4", "P36-9"]
    assert choose_fact(None, attributed) == "P36-4"
    assert choose_fact(None, ["P17-1", "P30-2"]) == "P17-1"
    assert choose_fact("P36-9", attributed) == "P36-9"
    with pytest.raises(ValueError, match="P17-1"):  # the message lists what can be studied
        choose_fact("P99-0", attributed)


def test_case_study(gpt2_implant):
    a, _ = gpt2_implant
    saved = state(a.model)
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    cs = case_study(a, QUERIES, sets, "f1", new_object={"en": "Rome", "fr": "Rome", "fi": "Rooma"},
                    cfg=EditConfig(scaling="column_norm"))  # the implant is built for norm-relative λ
    assert_same_state(a.model, saved)
    en = cs.languages["en"]
    assert en["gold"] == "Paris" and en["before"]["text"].strip() == "Paris" and en["before"]["correct"]
    assert en["enhanced"]["correct"] and en["enhanced"]["p_gold"] >= en["before"]["p_gold"]
    # " Rome" is " Ro" + "me": the edit promotes its first token (top-1 at the target)
    assert en["before"]["rank_gold"] == 0 and en["before"]["rank_new"] > 0
    assert en["updated"]["rank_new"] == 0 and en["updated"]["p_new"] > 0.5 and en["updated"]["p_gold"] < en["before"]["p_gold"]
    assert en["updated"]["text"].startswith(" Ro") and not en["updated"]["correct"]
    assert cs.languages["fr"]["updated"]["rank_new"] == 0
    assert set(cs.languages) == {"en", "fr", "fi"} and cs.n_neurons == 1
    seeded = case_study(a, QUERIES, sets, "f1")
    assert seeded.new_object_from in ("f2", "f3") and json.loads(json.dumps(seeded.to_dict()))["fact_id"] == "f1"

def test_lambda_sweep_matches_the_edit_stage_at_the_same_lambda(gpt2_implant):
    from matrice.experiments.edit_sweep import sweep_update

    a, _ = gpt2_implant
    saved = state(a.model)
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}, "f2": {"matrice": pairs()}})
    cfg = EditConfig(locality_k=2, seed=0, scaling="column_norm")
    sweep = sweep_update(a, QUERIES, sets, ("matrice",), [2.0, 1.0, 0.5], cfg, facts=["f1", "f2"], progress=False)
    assert_same_state(a.model, saved)
    assert sweep.lambdas == [0.5, 1.0, 2.0] and sweep.empty_facts["matrice"] == ["f2"]
    edit = edit_facts(a, QUERIES, sets, methods=("matrice",), operations=("update",), cfg=cfg, facts=["f1"], progress=False)
    for lam in (0.5, 1.0, 2.0):
        mine = {r.lang: r for r in sweep.records if r.lam == lam}
        assert mine and all(r.fact_id == "f1" and r.n_neurons == len(pairs(IMPLANT)) for r in mine.values())
        if lam == 1.0:  # the edit stage's λ: the same o', locality sample and scores
            for r in edit.records:
                assert (mine[r.lang].rel_n, mine[r.lang].rel_ok) == (r.rel_n, r.rel_ok)
                assert (mine[r.lang].loc_n, mine[r.lang].loc_ok) == (r.loc_n, r.loc_ok)
    assert mine["en"].rel_ok == 1  # the implant flips the English original at λ = 2 as at λ = 1
    with pytest.raises(ValueError, match="positive"):
        sweep_update(a, QUERIES, sets, ("matrice",), [0.0, 1.0], cfg, progress=False)


def test_lambda_sweep_curves_pool_each_fact_over_languages_then_average_facts():
    from matrice.experiments.edit_sweep import sweep_curves, sweep_table

    def rec(fact, lang, rel_n, rel_ok, loc_n, loc_ok, lam=1.0, method="matrice"):
        return {"fact_id": fact, "method": method, "lam": lam, "lang": lang,
                "rel_n": rel_n, "rel_ok": rel_ok, "loc_n": loc_n, "loc_ok": loc_ok}

    records = [rec("a", "en", 1, 1, 4, 4), rec("a", "fr", 3, 0, 4, 2), rec("b", "en", 2, 2, 0, 0)]
    curves = sweep_curves({"config": {"methods": ["matrice", "random"]}, "lambdas": [1.0], "records": records})
    (lam, rel, loc), = curves["matrice"]
    assert lam == 1.0 and rel.n == 2 and rel.mean == pytest.approx((1 / 4 + 1.0) / 2)
    assert loc.n == 1 and loc.mean == pytest.approx(6 / 8)  # fact b has no locality sample
    assert curves["random"][0][1].n == 0
    assert "| matrice | 1 | 0.62" in sweep_table(curves)


def test_held_out_paraphrases_are_counted_apart_and_only_when_never_attributed(gpt2_implant):
    a, _ = gpt2_implant
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    cfg = EditConfig(locality_k=2, seed=0, scaling="column_norm")
    held = lambda qid: qid.endswith("|1")  # noqa: E731 (template 1 plays the held-out paraphrase)
    res = edit_facts(a, QUERIES, sets, methods=("matrice",), cfg=cfg, facts=["f1"], progress=False, is_evaluation=held)
    for r in res.records:
        expected = sum(1 for q in QUERIES if q.fact_id == "f1" and q.lang == r.lang and held(q.query_id))
        if r.operation == "erasure" and r.n_unknown:
            assert r.held_n <= expected
        else:
            assert r.held_n == expected  # en and fr have a template 1, fi does not
        assert r.held_n <= r.gen_n and r.held_ok <= r.gen_ok  # held-out paraphrases are generality queries
    assert any(r.held_n for r in res.records)
    plain = edit_facts(a, QUERIES, sets, methods=("matrice",), cfg=cfg, facts=["f1"], progress=False)
    assert all(r.held_n == 0 for r in plain.records)
    assert [(r.rel_ok, r.gen_ok, r.loc_ok) for r in plain.records] == [(r.rel_ok, r.gen_ok, r.loc_ok) for r in res.records]


def test_update_leaves_out_queries_where_the_new_object_starts_like_the_old(gpt2_implant):
    from matrice.experiments.edit.run import _EditRun
    from matrice.experiments.edit_targets import NewObject
    from matrice.experiments import encode_all, group_by_fact

    a, _ = gpt2_implant
    encs, _ = encode_all(a, QUERIES)
    run = _EditRun(a, EditConfig(), False, encs, group_by_fact(QUERIES), ["update"], lambda qid: False)
    f1 = [q for q in QUERIES if q.fact_id == "f1"]
    same_in_fr = NewObject("f2", {"en": "Berlin", "fr": "Paris", "fi": "Berliini"}, 0)  # fr: o' is o
    out = run.update_encodings(f1, same_in_fr)
    assert {q.lang for q in f1 if q.query_id in out} == {"en", "fi"}
    assert run.skipped["update_queries_same_first_token"] == sum(q.lang == "fr" for q in f1)


def test_case_study_says_in_how_many_languages_the_update_worked_and_keeps_its_table_whole():
    from matrice.experiments.case_study import CaseStudy, case_study_table

    def state(text, correct, is_new=None):
        return {"text": text, "correct": correct, "is_new": is_new}

    study = CaseStudy("f1", "matrice", 2.0, 3, "f2", 7, {
        "en": {"query_id": "f1|en|0", "prompt": "The capital of France is", "gold": "Paris", "new_object": "Berlin",
               "before": state(" Paris", True), "enhanced": state(" Paris", True),
               "updated": state(" Berlin", False, True)},
        "zh": {"query_id": "f1|zh|0", "prompt": "法国的首都是", "gold": "巴黎", "new_object": "柏林",
               "before": state("巴黎。\n", True), "enhanced": state("巴|黎", False), "updated": state("巴黎", True, False)},
        "fi": {"query_id": "f1|fi|0", "unencodable": "too long"},
    })
    text = case_study_table(study, "f1")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and all(line.count(" | ") == 5 for line in table[2:4])  # no cell broke its row
    assert "巴黎。↵" in text and "巴\\|黎" in text
    assert ("correctly in 2 before (en, zh) and in 1 with its neurons ×2 (en)" in text
            and "The update to *Berlin* worked in part: the new object is the greedy answer in 1 of the 2 languages" in text)


def test_reliability_at_matched_locality_interpolates_between_the_bracketing_lambdas():
    from matrice.experiments.edit_sweep import reliability_at_locality

    curve = [(0.25, 0.0, 1.0), (1.0, 0.4, 0.95), (4.0, 0.8, 0.85), (16.0, 1.0, 0.2)]
    assert reliability_at_locality(curve, 0.9) == pytest.approx(0.6)  # halfway from 0.95 to 0.85
    assert reliability_at_locality(curve, 0.95) == pytest.approx(0.4)  # on a grid point
    assert reliability_at_locality(curve, 1.01) is None  # below the level already at the smallest λ
    assert reliability_at_locality(curve[:2], 0.9) is None  # never falls to the level: not bracketed
    assert reliability_at_locality(list(reversed(curve)), 0.9) == pytest.approx(0.6)  # order of the points


def test_matched_locality_claim_compares_methods_at_the_same_locality_not_the_same_lambda():
    from matrice.experiments.edit_sweep import matched_reliability, sweep_claims

    records = []
    for f in range(12):
        fid = f"P{f % 6}-e{f}"
        for lam, (m_rel, m_loc), (r_rel, r_loc) in ((1.0, (0.5, 0.95), (0.1, 1.0)), (4.0, (0.9, 0.85), (0.3, 0.95)),
                                                   (16.0, (1.0, 0.1), (0.4, 0.85))):
            for method, rel, loc in (("matrice", m_rel, m_loc), ("random_layer", r_rel, r_loc)):
                records.append({"fact_id": fid, "relation": fid.split("-")[0], "method": method, "lam": lam,
                                "lang": "en", "n_neurons": 3, "rel_n": 10, "rel_ok": round(10 * rel),
                                "loc_n": 20, "loc_ok": round(20 * loc)})
    sweep = {"config": {"methods": ["matrice", "random_layer"]}, "lambdas": [1.0, 4.0, 16.0], "records": records}
    assert list(matched_reliability(sweep, "matrice", 0.9).values()) == pytest.approx([0.7] * 12)  # between λ 1 and 4
    assert list(matched_reliability(sweep, "random_layer", 0.9).values()) == pytest.approx([0.35] * 12)  # between 4, 16
    (claim,) = sweep_claims(sweep, 0.9)
    assert claim.key == "table4_update_matched_locality_matrice_vs_random_layer"
    assert claim.estimate.mean == pytest.approx(0.35) and claim.estimate.n == 6  # six relations
    assert "12 of 12 facts bracketed" in claim.note
    assert sweep_claims(sweep, 1.01)[0].untestable  # nothing bracketed: no verdict
