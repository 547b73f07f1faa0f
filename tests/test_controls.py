"""The controls: leave-one-language-out sets and specificity donors."""

from __future__ import annotations

import pytest

from implant import FACTS, IMPLANT, QUERIES, pairs
from matrice.experiments.manipulate import manipulate

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_leave_one_language_out_uses_each_languages_own_set(gpt2_implant):
    from matrice.experiments.controls import leave_one_language_out

    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id == "f1"]
    # the implant is in the set selected without "en" only; "fr"/"fi" get an unrelated neuron
    lolo = {"f1": {"en": {"lolo": pairs(IMPLANT), "lolo_random_layer": pairs((0, 1))},
                   "fr": {"lolo": pairs((0, 3)), "lolo_random_layer": pairs((0, 1))},
                   "fi": {"lolo": pairs((0, 3)), "lolo_random_layer": pairs((0, 1))}}}
    records = leave_one_language_out(a, qs, lolo, {"f1": {"matrice": pairs(IMPLANT)}}, few_shot=False)
    assert len(records) == len(qs) * 3
    for r in records:  # every query is scored with the set chosen without its own language
        expected = lolo["f1"][r.lang].get(r.method, pairs(IMPLANT))
        assert r.n_neurons == len(expected) and r.mode == "suppress"
    en = [r for r in records if r.lang == "en" and r.method == "lolo"]
    assert en and all(r.delta_p < -0.9 for r in en)  # the implant carried " Paris"
    direct = manipulate(a, [q for q in qs if q.lang == "fr"], {"f1": {"lolo": pairs((0, 3))}}, ("lolo",),
                        {"suppress": 0.0}, progress=False).records
    got = {r.query_id: r.delta_p for r in records if r.lang == "fr" and r.method == "lolo"}
    assert got == pytest.approx({r.query_id: r.delta_p for r in direct}, abs=1e-6)  # batches differ: float rounding


def test_specificity_borrows_donor_neurons(gpt2_implant):
    from matrice.experiments.controls import choose_donors, specificity

    a, _ = gpt2_implant
    relations = {f.fact_id: f.relation for f in FACTS}
    donors = choose_donors(relations, seed=0)
    assert donors == choose_donors(relations, seed=0)
    for f, d in donors.items():
        assert d["same_relation"] != f and (d["same_relation"] is None or relations[d["same_relation"]] == relations[f])
        assert relations[d["other_relation"]] != relations[f]
    assert donors["f4"]["same_relation"] is None  # the only continent fact
    sets = {"f1": {"matrice": pairs(IMPLANT)}, "f2": {"matrice": pairs((0, 2))}, "f3": {"matrice": pairs((1, 2), (1, 3))},
            "f4": {"matrice": pairs((0, 7))}}
    records, got_donors = specificity(a, QUERIES, sets, seed=0, few_shot=False)
    assert got_donors == donors
    for r in records:
        source = r.fact_id if r.method == "own" else donors[r.fact_id][r.method]
        assert r.n_neurons == len(sets[source]["matrice"])
    assert not any(r.fact_id == "f4" and r.method == "same_relation" for r in records)
    assert {r.method for r in records} == {"own", "same_relation", "other_relation"}


def test_a_donor_never_shares_the_facts_object_in_any_language():
    from matrice.experiments.controls import choose_donors

    relations = {"a": "P30", "b": "P30", "c": "P30", "d": "P36"}
    objects = {"a": frozenset({("en", "Asia"), ("fr", "Asie")}), "b": frozenset({("en", "Asia"), ("fr", "Asie")}),
               "c": frozenset({("en", "Europe"), ("fr", "Europe")}), "d": frozenset({("en", "Paris"), ("fr", "Europe")})}
    for seed in range(20):
        donors = choose_donors(relations, seed, objects)
        assert donors["a"]["same_relation"] == "c" and donors["b"]["same_relation"] == "c"  # never each other
        assert donors["c"]["other_relation"] is None  # d's fr object is Europe too
        assert donors["d"]["other_relation"] in ("a", "b")
    assert {choose_donors(relations, s)["a"]["same_relation"] for s in range(20)} == {"b", "c"}  # without objects: any


def test_lolo_same_relation_donor_suppresses_with_the_donors_set_selected_without_the_language(gpt2_implant):
    from matrice.experiments.controls import LOLO_DONOR, control_claims, leave_one_language_out

    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id in ("f1", "f2")]
    lolo = {f: {lang: {"lolo": pairs(IMPLANT) if f == "f1" else pairs((0, 3 + i)), "lolo_random_layer": pairs((0, 1))}
                for i, lang in enumerate(("en", "fr", "fi"))} for f in ("f1", "f2")}
    full = {"f1": {"matrice": pairs(IMPLANT)}, "f2": {"matrice": pairs((0, 2))}}
    donors = {"f1": {"same_relation": "f2"}, "f2": {"same_relation": "f1"}}
    records = leave_one_language_out(a, qs, lolo, full, few_shot=False, donors=donors)
    borrowed = [r for r in records if r.method == LOLO_DONOR]
    assert {(r.fact_id, r.lang) for r in borrowed} == {(q.fact_id, q.lang) for q in qs}
    for r in borrowed:  # the donor's set chosen without this query's language, never the fact's own
        assert r.n_neurons == len(lolo[donors[r.fact_id]["same_relation"]][r.lang]["lolo"])
    f1_en = [r.delta_p for r in records if r.fact_id == "f1" and r.lang == "en"]
    assert f1_en  # sanity: f1's en queries were scored
    assert all(r.delta_p > -0.9 for r in borrowed if r.fact_id == "f1")  # f2's neurons do not carry " Paris"
    assert not any(r.method == LOLO_DONOR for r in leave_one_language_out(a, qs, lolo, full, few_shot=False))
    rows = {c.key for c in control_claims({"lolo": [r.__dict__ for r in records]}, lambda q: True)}
    assert "lolo_vs_same_relation_donor" in rows


def test_zero_baseline_set_is_built_as_amig_k_is_from_the_same_maps():
    """Fed AMIG's own maps as the 'zero' maps, the zero-baseline set is exactly select's amig_k: only the
    baseline differs between the two arms of the comparison."""
    import numpy as np
    from matrice.experiments.controls import zero_baseline_sets
    from matrice.method.selection import select_fact
    from matrice.method.uncertainty import aggregate_fact

    rng = np.random.default_rng(0)
    fqs = [q for q in QUERIES if q.fact_id == "f1"]
    langs = sorted({q.lang for q in fqs})
    raw = {lang: rng.normal(size=(3, 4, 8)) for lang in langs}  # 3 queries per language, [L=4, N=8]
    amig_first = {lang: rng.normal(size=(4, 8)) + 0.5 for lang in langs}
    sets = select_fact(aggregate_fact(raw, amig_first=amig_first))
    firsts = {q.query_id: amig_first[q.lang] for q in fqs if q.template_id == 0}
    zero = zero_baseline_sets(fqs, firsts, {"f1": {k: v.tolist() for k, v in sets.items()}})
    assert len(sets["matrice"]) and np.array_equal(zero["f1"], sets["amig_k"])
    missing = dict(list(firsts.items())[1:])  # a language without its zero map: no set, not an empty one
    assert zero_baseline_sets(fqs, missing, {"f1": {k: v.tolist() for k, v in sets.items()}}) == {}


def test_baseline_comparison_suppresses_both_equal_size_sets_and_makes_a_row(gpt2_implant):
    from matrice.experiments.controls import baseline_comparison, control_claims

    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id in ("f1", "f2")]
    sets = {"f1": {"matrice": pairs(IMPLANT), "amig_k": pairs(IMPLANT)}, "f2": {"matrice": pairs((0, 2)), "amig_k": pairs((0, 2))}}
    records = baseline_comparison(a, qs, sets, {"f1": pairs((0, 5)), "f2": pairs((0, 6))}, few_shot=False)
    assert {(r.fact_id, r.method) for r in records} == {(f, m) for f in ("f1", "f2") for m in ("amig_k", "zero_k")}
    assert all(r.n_neurons == 1 for r in records)
    assert all(r.delta_p < -0.9 for r in records if r.fact_id == "f1" and r.method == "amig_k" and r.lang == "en")
    rows = {c.key: c for c in control_claims({"baselines": [r.__dict__ for r in records]}, lambda q: True)}
    assert "amig_baseline_vs_zero" in rows and rows["amig_baseline_vs_zero"].estimate.n == 2  # f1, f2: two units


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_requests_scored_together_equal_one_call_each(family, tiny, monkeypatch):
    """Controls score every request in one call (each prompt and unedited row once, a (queries, set)
    pair that two requests repeat once): the records equal one :func:`manipulate` call per request, in
    the same order, up to batching's float rounding."""
    import matrice.experiments.manipulate as manipulation
    from matrice.experiments.manipulate import Request, manipulate_many

    scored_rows: list[int] = []
    real_score_rows = manipulation.score_rows
    monkeypatch.setattr(manipulation, "score_rows",
                        lambda adapter, encs, scalings, rows, *args, **kw: scored_rows.append(len(rows))
                        or real_score_rows(adapter, encs, scalings, rows, *args, **kw))
    a = tiny(family)
    sets = {"f1": {"x": pairs((0, 1), (1, 2)), "y": pairs((1, 5))}, "f2": {"x": pairs((0, 3)), "y": pairs()},
            "f3": {"x": pairs((1, 0)), "y": pairs((0, 4), (0, 6))}, "f4": {"x": pairs((0, 7)), "y": pairs((1, 1))}}
    requests = [Request([q for q in QUERIES if q.lang == "en"], sets, ("x",)),
                Request(QUERIES, sets, ("y", "x")),
                Request([q for q in QUERIES if q.fact_id in ("f2", "f3")], sets, ("y",)),
                Request(QUERIES, sets, ("x",))]  # the second request's x rows again
    together = manipulate_many(a, requests, {"suppress": 0.0, "enhance": 2.0}, progress=False)
    per_fact = {f: sum(q.fact_id == f for q in QUERIES) for f in sets}
    en = {f: sum(q.fact_id == f and q.lang == "en" for q in QUERIES) for f in sets}
    edited = (sum(2 * en[f] for f in sets)  # request 1: x, both modes, English queries
              + sum(2 * per_fact[f] * (1 + (f != "f2")) for f in sets))  # request 2: x, and y where it is not empty
    # request 3 (y of f3 on all of f3's queries; f2's y is empty) and request 4 repeat request 2's rows
    assert scored_rows == [len(QUERIES) + edited]
    for request, got in zip(requests, together):
        alone = manipulate(a, request.queries, request.sets, request.methods, {"suppress": 0.0, "enhance": 2.0},
                           progress=False)
        assert [(r.query_id, r.method, r.mode, r.n_neurons) for r in got.records] == \
               [(r.query_id, r.method, r.mode, r.n_neurons) for r in alone.records]
        assert [r.p_after for r in got.records] == pytest.approx([r.p_after for r in alone.records], rel=1e-5, abs=1e-9)
        assert [r.p_before for r in got.records] == pytest.approx([r.p_before for r in alone.records], rel=1e-5, abs=1e-9)
        assert got.empty_facts == alone.empty_facts
