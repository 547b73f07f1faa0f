"""The verdict table: claims computed from experiment records on evaluation queries."""

from __future__ import annotations

import numpy as np
import pytest

from matrice.evaluation.claims import claims_table, layer_claims, verdict_counts
from matrice.experiments.edit import editing_claims
from matrice.experiments.manipulate import manipulation_claims
from matrice.experiments.registry import all_claims


def manip_records(n_facts: int, effect: dict[str, float], eval_effect: dict[str, float] | None = None, seed: int = 0):
    """ΔP/P per query: localisation queries (template 0, 1) get `effect[method]`, evaluation
    queries (template 2) get `eval_effect[method]` (suppress = −effect, enhance = +effect), plus noise."""
    rng = np.random.default_rng(seed)
    records = []
    for f in range(n_facts):
        for t in range(3):
            for method in effect:
                size = (eval_effect or effect)[method] if t == 2 else effect[method]
                for mode, sign in (("suppress", -1), ("enhance", 1)):
                    records.append({"query_id": f"F{f}-en-{t}", "fact_id": f"F{f}", "method": method, "mode": mode,
                                    "delta_p": sign * size + rng.normal(0, 0.02)})
    return {"records": records, "empty_facts": {}}


def is_eval(query_id: str) -> bool:
    return query_id.endswith("-2")


def by_comparison(claims):
    return {c.comparison: c for c in claims}


def test_a_clear_effect_replicates_and_a_null_one_is_inconclusive():
    effect = {"matrice": 0.4, "random": 0.0, "amig": 0.4, "wo_uaq": 0.2, "wo_ual": 0.4}
    claims = by_comparison(manipulation_claims(manip_records(10, effect), is_eval))
    assert claims["ΔP/P MATRICE − Random (suppress)"].verdict == "replicates"
    assert claims["ΔP/P MATRICE − Random (enhance)"].verdict == "replicates"
    assert claims["ΔP/P MATRICE − AMIG (suppress)"].verdict == "inconclusive"  # equal effects
    wo_uaq = claims["effect MATRICE − w/o UaQ (−ΔP suppress, +ΔP enhance, mean)"]
    assert wo_uaq.verdict == "replicates" and wo_uaq.estimate.n == 10
    assert abs(wo_uaq.estimate.mean - 0.2) < 0.02
    assert claims["effect w/o UaL − effect w/o UaQ"].verdict == "replicates"


def test_only_evaluation_queries_count_when_the_run_has_them():
    """On attributed queries MATRICE wins; on held-out ones it is worse than random: the verdict
    must follow the held-out queries."""
    records = manip_records(10, {"matrice": 0.5, "random": 0.1}, eval_effect={"matrice": 0.0, "random": 0.3})
    claims = by_comparison(manipulation_claims(records, is_eval))
    c = claims["ΔP/P MATRICE − Random (suppress)"]
    assert c.verdict == "contradicts" and "evaluation" in c.queries
    no_eval = by_comparison(manipulation_claims(records, lambda q: False))["ΔP/P MATRICE − Random (suppress)"]
    assert no_eval.verdict == "replicates" and "no held-out" in no_eval.queries


def test_a_wrong_direction_effect_counts_against_in_table_ii():
    """|ΔP| would call an ablation that raises P under suppression 'as strong'; the signed effect does not."""
    records = manip_records(8, {"matrice": 0.3, "wo_uaq": 0.3, "wo_ual": 0.3})
    for r in records["records"]:
        if r["method"] == "wo_uaq" and r["mode"] == "suppress":
            r["delta_p"] = -r["delta_p"]  # P goes up when suppressing
    c = by_comparison(manipulation_claims(records, is_eval))["effect MATRICE − w/o UaQ (−ΔP suppress, +ΔP enhance, mean)"]
    assert c.verdict == "replicates" and c.estimate.mean > 0.25


def test_editing_reliability_is_pooled_per_fact_and_paired():
    records = []
    for f in range(6):
        for lang in ("en", "fr"):
            for method, ok in (("matrice", 2), ("random", 0), ("amig", 2)):
                records.append({"fact_id": f"F{f}", "method": method, "operation": "erasure", "lang": lang,
                                "rel_n": 2, "rel_ok": ok})
    claims = by_comparison(editing_claims({"records": records, "empty_facts": {"amig": ["F0"]}}))
    assert claims["erasure reliability MATRICE − Random"].verdict == "replicates"
    assert claims["erasure reliability MATRICE − Random"].estimate.mean == 1.0
    amig = claims["erasure reliability MATRICE − AMIG"]
    assert amig.verdict == "not testable" and amig.untestable == "both sides are 1 in every fact"
    assert "empty for 1 of 6" in amig.note


def test_layer_claim_and_the_whole_table():
    top_heavy = {f"F{i}": {"matrice": [[17, i], [16, i + 1], [3, i]]} for i in range(8)}
    (claim,) = layer_claims(top_heavy, 18)
    assert claim.verdict == "replicates" and abs(claim.estimate.mean - (2 / 3 - 1 / 3)) < 1e-9
    claims = all_claims(sets=top_heavy, n_layers=18, manip=manip_records(8, {"matrice": 0.3, "random": 0.0}),
                        editing={"records": []}, enhancement={"records": []}, is_evaluation=is_eval)
    table = claims_table(claims)
    assert table.count("\n") == len(claims) + 2
    assert "(n=8)" in table and "| Table V |" not in table  # no injection results given: no Table V row
    assert verdict_counts(claims)["replicates"] >= 3


def test_size_and_layer_matched_baselines_get_their_own_rows():
    """An empty threshold-based AMIG scores 'nothing happened'; its size-matched twin is judged beside it."""
    effect = {"matrice": 0.4, "amig": 0.0, "amig_k": 0.4, "random": 0.0, "random_layer": 0.0,
              "wo_uaq": 0.3, "wo_uaq_k": 0.3, "wo_ual": 0.3, "wo_ual_k": 0.3}
    records = manip_records(10, effect)
    records["empty_facts"] = {"amig": [f"F{f}" for f in range(10)]}
    claims = by_comparison(manipulation_claims(records, is_eval))
    empty_amig = claims["ΔP/P MATRICE − AMIG (suppress)"]
    assert empty_amig.verdict == "not testable" and empty_amig.untestable == "AMIG selected or trained nothing for 10 of 10 facts"
    assert empty_amig.note == ""  # the reason says it
    assert claims["ΔP/P MATRICE − AMIG (size-matched) (suppress)"].verdict == "inconclusive"
    assert claims["ΔP/P MATRICE − Random (layer-matched) (enhance)"].verdict == "replicates"
    assert "effect w/o UaL (size-matched) − effect w/o UaQ (size-matched)" in claims


def test_manipulation_interval_tables_show_n_and_an_interval_per_cell():
    from matrice.experiments.manipulate import manipulation_interval_tables

    records = manip_records(6, {"matrice": 0.4, "random": 0.0})
    for r in records["records"]:
        r["lang"] = "en"
    table = manipulation_interval_tables(records, is_eval, ["en", "fr"])
    row = next(line for line in table.splitlines() if line.startswith("| MATRICE") and "-0.4" in line)
    assert "(n=6)" in row and "[" in row and "– (n=0)" in row  # fr has no records: said, not invented
    assert "evaluation queries" in table and table.count("| Random |") == 2


def test_control_claims_lolo_and_specificity():
    from matrice.experiments.controls import control_claims, lolo_interval_table

    rng = np.random.default_rng(1)
    lolo, spec = [], []
    for f in range(10):
        for lang in ("en", "fr", "zh"):
            for t in range(3):
                qid = f"F{f}-{lang}-{t}"
                for method, size in (("lolo", 0.5), ("lolo_random_layer", 0.0), ("matrice", 0.6)):
                    lolo.append({"query_id": qid, "fact_id": f"F{f}", "lang": lang, "method": method,
                                 "delta_p": -size + rng.normal(0, 0.02)})
                # own neurons suppress on evaluation queries only; donors never do
                for method, size in (("own", 0.4 if t == 2 else 0.0), ("same_relation", 0.0), ("other_relation", 0.0)):
                    spec.append({"query_id": qid, "fact_id": f"F{f}", "lang": lang, "method": method,
                                 "delta_p": -size + rng.normal(0, 0.02)})
    claims = control_claims({"lolo": lolo, "specificity": spec}, is_eval)
    assert [c.source for c in claims] == ["LOLO", "Specificity", "Specificity"]
    assert all(c.verdict == "replicates" and c.estimate.n == 10 for c in claims)
    assert claims[1].estimate.mean < -0.35  # evaluation queries only: the localisation ones would dilute it
    flipped = [dict(r, delta_p=-r["delta_p"]) if r["method"] == "lolo" else r for r in lolo]
    assert control_claims({"lolo": flipped}, is_eval)[0].verdict == "contradicts"
    table = lolo_interval_table({"lolo": lolo}, is_eval, ["en", "fr", "zh"])
    assert table.count("(n=10)") == 9 and "[" in table
    assert control_claims({}, is_eval) == []


def test_editing_and_enhancement_interval_tables_pool_per_fact():
    from matrice.experiments.edit import editing_interval_tables
    from matrice.experiments.enhance import enhancement_interval_table

    records = []
    for f in range(4):
        for lang, (ok, n) in (("en", (1, 1)), ("fr", (0, 3))):  # pooled per fact: 1 / 4
            records.append({"fact_id": f"F{f}", "method": "matrice", "operation": "erasure", "lang": lang,
                            "rel_ok": ok, "rel_n": n, "gen_ok": 0, "gen_n": 0, "loc_ok": n, "loc_n": n})
    text = editing_interval_tables({"records": records}, ["en", "fr"])
    row = next(l for l in text.splitlines() if "| reliability |" in l)
    # every fact at rate 1 (or 0): Clopper-Pearson's interval over the 4 relations, 0.025^(1/4) = 0.40 from the bound
    assert row.split("|")[3:6] == [" 1.00 [0.40, 1.00] (n=4) ", " 0.00 [0.00, 0.60] (n=4) ", " 0.25 [0.25, 0.25] (n=4) "]
    assert "– (n=0)" in next(l for l in text.splitlines() if "| generality |" in l)  # no sample: no number
    enh = [{"query_id": f"F{f}-fi-{t}", "fact_id": f"F{f}", "lang": "fi", "method": "matrice",
            "correct_after": t == 2} for f in range(3) for t in range(3)]
    table = enhancement_interval_table({"records": enh}, is_eval, ["fi"])
    assert "1.00 [0.29, 1.00] (n=3)" in table and "evaluation queries" in table


def test_an_empty_set_is_counted_among_the_facts_the_experiment_scored():
    """Enhancement scores only facts with a Q_error query: the selection's empty sets of other facts
    must not enter its "not testable" count (it read "16 of 14 facts")."""
    from matrice.experiments.enhance import enhancement_claims

    enh = [{"query_id": f"F{f}-fi-{t}", "fact_id": f"F{f}", "lang": "fi", "method": m, "correct_after": m == "matrice"}
           for f in range(4) for t in range(3) for m in ("matrice", "amig")]
    empty = {"amig": [f"F{f}" for f in range(6)]}  # F4, F5: empty, but not scored here
    row = next(c for c in enhancement_claims({"records": enh}, is_eval, empty=empty) if c.key == "fig6_matrice_vs_amig")
    assert row.verdict == "not testable" and "4 of 4 facts" in row.untestable


def test_injection_claims_use_each_variants_selected_rate():
    from matrice.experiments.inject import injection_claims, injection_interval_table

    records = []
    for f in range(6):
        for variant, lr, acc in (("matrice", 0.1, 1), ("matrice", 0.3, 0), ("random", 0.1, 0), ("direct_ft", 0.01, 0)):
            for split in ("heldout", "transfer", "old"):
                records += [{"variant": variant, "lr": lr, "split": split, "fact_id": f"F{f}", "lang": "fr",
                             "query_id": f"F{f}-{split}", "correct": bool(acc), "seed": seed} for seed in range(6)]
    injection = {"records": records, "selected": {"matrice": 0.1, "random": 0.1, "direct_ft": 0.01}}
    claims = {(c.comparison): c for c in injection_claims(injection)}
    assert claims["heldout accuracy MATRICE_FT − Random_FT"].estimate.mean == 1.0  # lr 0.3's zeros are not used
    assert claims["heldout accuracy MATRICE_FT − Random_FT"].verdict == "replicates"  # 6 of 6 runs, same sign
    old = claims["old accuracy MATRICE_FT − Direct_FT"]
    assert old.estimate.n == 6 and old.unit == "training run" and old.fact_estimate.n == 6
    assert claims["old accuracy MATRICE_FT − Random_FT"].estimate.mean == 1.0  # Q_old against the same-size control too
    injection["selected"]["matrice"] = 0.3
    assert {c.estimate.mean for c in injection_claims(injection)} == {0.0}
    assert "(n=6)" in injection_interval_table(injection, ["fr"])
    assert injection_claims({}) == []


def test_table_v_rows_are_tested_over_training_runs():
    """Every fact of a run shares its trained model: the seed is the unit. Six runs that all favour
    MATRICE_FT replicate; three cannot (no sign pattern of 3 gives p < 0.05), however many relations
    agree within them; runs that disagree are inconclusive though every relation agrees on average."""
    from matrice.evaluation.claims import judge
    from matrice.experiments.inject import injection_claims

    def injection(seeds, random_correct):
        records = [{"variant": v, "lr": 0.1, "split": "old", "fact_id": f"P{f}-e1", "lang": "fr",
                    "query_id": f"P{f}-old", "seed": s, "correct": True if v == "matrice" else random_correct(s, f)}
                   for f in range(16) for v in ("matrice", "random") for s in seeds]
        return {"records": records, "selected": {"matrice": 0.1, "random": 0.1}}

    six = {c.key: c for c in judge(injection_claims(injection(range(6), lambda s, f: f % 2 == 0)))}
    row = six["table5_old_vs_random"]
    assert row.verdict == "replicates" and row.estimate.n == 6 and row.estimate.mean == pytest.approx(0.5)
    assert row.fact_estimate.n == 16 and "over relations within these runs" in row.note
    three = {c.key: c for c in judge(injection_claims(injection(range(3), lambda s, f: f % 2 == 0)))}
    assert three["table5_old_vs_random"].verdict == "not testable"
    assert "3 of its 3 training runs differ from 0" in three["table5_old_vs_random"].untestable
    assert "at best 0.25" in three["table5_old_vs_random"].untestable
    # run luck: Random_FT forgets everything in three seeds and nothing in the other three
    lucky = {c.key: c for c in judge(injection_claims(injection(range(6), lambda s, f: s % 2 == 0)))}
    assert lucky["table5_old_vs_random"].estimate.mean == pytest.approx(0.5)
    assert lucky["table5_old_vs_random"].verdict == "not testable"  # 3 of 6 runs differ: p ≥ 0.25


def test_a_row_whose_units_are_mostly_zero_cannot_be_tested_but_can_be_equivalent():
    """Relations whose difference is exactly 0 keep their |sum| under every flip: with 4 of 24 that
    differ, p ≥ 2/2^4 whatever the effect (Monte Carlo beyond 20 relations: about that). Such a row is left out of the Holm family (the others'
    adjustment is over the rows that can pass) and is not testable, unless its interval is inside
    the margin."""
    from matrice.evaluation.claims import cannot_reject, judge, make_claim

    a = {f"P{r}-e1": 1.0 if r < 4 else 0.0 for r in range(24)}
    b = {f: 0.0 for f in a}
    weak = make_claim("Fig. X", "t", "c", "greater", "q", a, b, key="weak", metric="rate")
    assert weak.estimate.p == pytest.approx(2 / 2**4, abs=0.01) and "4 of its 24 relations differ" in cannot_reject(weak, 0.05)
    strong_a = {f"P{r}-e1": 1.0 + 0.01 * r for r in range(24)}
    strong = make_claim("Fig. X", "t", "c", "greater", "q", strong_a, b, key="strong", metric="rate")
    judged = {c.key: c for c in judge([weak, strong], primary=["weak", "strong"])}
    assert judged["weak"].verdict == "not testable" and judged["weak"].p_holm is None
    assert judged["strong"].verdict == "replicates" and judged["strong"].p_holm == judged["strong"].estimate.p
    small_a = {f"P{r}-e1": 0.001 if r < 4 else 0.0 for r in range(24)}
    small = make_claim("Fig. X", "t", "c", "greater", "q", small_a, b, key="small", metric="rate")
    assert judge([small], margins={"rate": 0.05})[0].verdict == "equivalent"
    assert judge([small])[0].verdict == "not testable"


def test_an_untrained_injection_variant_is_labelled():
    from matrice.experiments.inject import injection_claims

    records = [{"variant": v, "lr": 0.1, "split": "heldout", "fact_id": f"F{f}", "lang": "fr", "query_id": f"q{f}",
                "correct": v == "matrice"} for f in range(3) for v in ("matrice", "amig")]
    injection = {"records": records, "selected": {"matrice": 0.1, "amig": 0.1},
                 "runs": {"matrice": {"0.1": {"n_trainable": 10}}, "amig": {"0.1": {"n_trainable": 0}}}}
    claims = injection_claims(injection)
    assert claims and all("trained nothing" in c.note for c in claims)


def test_relations_are_the_unit_and_one_relation_claims_nothing():
    """Two facts of one relation that agree in sign: once 'replicates, p < 0.001'; now one unit."""
    records = manip_records(2, {"matrice": 0.5, "random": 0.0})
    for r in records["records"]:
        r["fact_id"] = "P36-" + r["fact_id"]
    claims = by_comparison(manipulation_claims(records, is_eval))
    row = claims["ΔP/P MATRICE − Random (suppress)"]
    assert row.estimate.n == 1 and row.fact_estimate.n == 2
    assert row.verdict == "inconclusive" and row.fact_estimate.p == 0.5  # two facts: p cannot go below 1/2
    assert all(c.verdict in ("inconclusive", "not testable") for c in claims.values())


def test_primary_rows_use_holm_and_exploratory_rows_their_raw_p():
    from matrice.evaluation.claims import judge

    effect = {"matrice": 0.4, "random": 0.0, "amig_k": 0.4}
    claims = manipulation_claims(manip_records(6, effect), is_eval)  # 6 relations: raw p ≥ 1/32
    keys = {c.key for c in claims}
    assert {"fig5_suppress_vs_random", "fig5_enhance_vs_amig_k"} <= keys
    judged = {c.key: c for c in judge(claims, primary=["fig5_suppress_vs_random", "fig5_enhance_vs_random"])}
    primary = judged["fig5_suppress_vs_random"]
    assert primary.primary and primary.p_holm == pytest.approx(2 * primary.estimate.p)
    assert primary.verdict == ("replicates" if 2 * primary.estimate.p < 0.05 else "inconclusive")
    assert not judged["fig5_suppress_vs_amig_k"].primary and judged["fig5_suppress_vs_amig_k"].p_holm is None
    from matrice.evaluation.claims import missing_primary

    assert missing_primary(claims, ["fig9_nothing", "fig5_suppress_vs_random"]) == ["fig9_nothing"]


def test_a_null_within_the_declared_margin_is_equivalent():
    from matrice.evaluation.claims import judge

    claims = manipulation_claims(manip_records(12, {"matrice": 0.4, "amig_k": 0.4}), is_eval)
    judged = {c.key: c for c in judge(claims, margins={"delta_p": 0.05})}
    assert judged["fig5_suppress_vs_amig_k"].verdict == "equivalent"
    assert {c.key: c for c in judge(claims)}["fig5_suppress_vs_amig_k"].verdict == "inconclusive"


def test_the_power_table_says_when_no_primary_row_can_pass():
    from matrice.evaluation.claims import judge, power_table

    records = manip_records(8, {"matrice": 0.4, "random": 0.0})
    judged = judge(manipulation_claims(records, is_eval), primary=["fig5_suppress_vs_random", "fig5_enhance_vs_random"])
    text = power_table(judged, 0.05, 1.0)
    assert "at least **7 relations**" in text  # 1/2^(n−1) < 0.025 needs n ≥ 7
    assert "| fig5_suppress_vs_random | 8 |" in text


def _statements(n_relations: int, good: str, bad: str):
    """Per relation one fact, a true and a false statement: `good` flags only the false one, `bad` both."""
    rows = []
    for r in range(n_relations):
        for true in (True, False):
            rows.append({"fact_id": f"P{r}-a", "true": true, "flagged": {good: not true, bad: True}})
    return rows


def test_fact_checking_f1_difference_is_tested_over_relations():
    from matrice.experiments.fact_check import f1_difference_by_relation

    rows = _statements(6, "dkn", "prob")
    est = f1_difference_by_relation(rows, "dkn", "prob", lambda f: f.split("-")[0])
    assert est.n == 6 and est.mean == pytest.approx(1.0 - 2 / 3)  # F1 1 against 2·6/(2·6 + 6)
    assert est.p == pytest.approx(2 / 64)  # six relations, one swap pattern each way as extreme
    same = f1_difference_by_relation(rows, "dkn", "dkn", lambda f: f.split("-")[0])
    assert same.mean == 0.0 and same.p == 1.0
    one_relation = f1_difference_by_relation(rows, "dkn", "prob", lambda f: "P")
    assert one_relation.n == 1 and one_relation.p == 1.0


def test_table_ii_is_the_signed_effect_on_the_verdicts_queries_and_unit():
    from matrice.experiments.manipulate import ablation_estimates

    records = manip_records(8, {"matrice": 0.3, "wo_uaq": 0.3}, eval_effect={"matrice": 0.2, "wo_uaq": 0.1})
    for r in records["records"]:
        if r["method"] == "wo_uaq" and r["mode"] == "suppress":
            r["delta_p"] = -r["delta_p"]  # P goes up when suppressing: counts against, not as strength
    est = ablation_estimates(records, is_eval)
    assert est["matrice"].mean == pytest.approx(0.2, abs=0.02)  # evaluation queries only
    assert est["wo_uaq"].mean == pytest.approx(0.0, abs=0.02)  # (−0.1 + 0.1) / 2
    assert est["matrice"].n == 8  # relations (each F-fact is its own here)


def test_editing_rows_beyond_reliability_read_held_out_locality_and_the_other_languages():
    """Held-out generality, locality and reliability outside English each get a row against the
    same-size competitor and random neurons, computed from their own counts."""
    records = []
    for f in range(12):
        for lang in ("en", "fr"):
            for method, held, loc, rel in (("matrice", 2, 1, 2), ("amig_k", 0, 2, 2), ("random", 1, 2, 0)):
                rel_ok = 2 if lang == "en" else rel  # everyone is reliable in English
                records.append({"fact_id": f"P{f % 12}-e{f}", "method": method, "operation": "erasure", "lang": lang,
                                "rel_n": 2, "rel_ok": rel_ok, "gen_n": 3, "gen_ok": 2, "held_n": 2, "held_ok": held,
                                "loc_n": 2, "loc_ok": loc})
    claims = {c.key: c for c in editing_claims({"records": records, "empty_facts": {}})}
    assert claims["table3_erasure_heldout_matrice_vs_amig_k"].estimate.mean == pytest.approx(1.0)
    assert claims["table3_erasure_heldout_matrice_vs_random"].estimate.mean == pytest.approx(0.5)
    assert claims["table3_erasure_locality_matrice_vs_amig_k"].estimate.mean == pytest.approx(-0.5)
    assert claims["table3_erasure_locality_matrice_vs_amig_k"].verdict == "contradicts"
    assert claims["table3_erasure_other_languages_matrice_vs_random"].estimate.mean == pytest.approx(1.0)
    assert claims["table3_erasure_other_languages_matrice_vs_amig_k"].verdict == "not testable"  # both 1 everywhere
    assert {c.verdict for k, c in claims.items() if k.startswith("table4")} == {"no data"}  # no update records


def test_the_last_layers_of_fig4_are_a_declared_fraction_of_depth():
    sets = {f"F{i}": {"matrice": [[13, i], [12, i]]} for i in range(8)}  # layers 12-13 of 18
    third, = layer_claims(sets, 18)  # the last 6 layers: 12-17
    sixth, = layer_claims(sets, 18, top_fraction=1 / 6)  # the last 3: 15-17
    assert "layers 12-17" in third.comparison and third.estimate.mean == pytest.approx(1 - 1 / 3)
    assert "layers 15-17" in sixth.comparison and sixth.estimate.mean == pytest.approx(0 - 3 / 18)
    with pytest.raises(ValueError, match="top_layers"):
        layer_claims(sets, 18, top_fraction=1.0)


def test_primary_rows_are_retested_without_flagged_relations():
    from dataclasses import replace

    from matrice.data.sources import relation_flags
    from matrice.evaluation.claims import make_claim, sensitivity_table

    flags = relation_flags("embedded")
    assert flags["P37"] == {"copyable"} and flags["P463"] == {"many_answers"} and flags["P36"] == frozenset()
    assert relation_flags("mlama") == {}
    a = {f"{r}-e{i}": 1.0 for r in ("P36", "P30", "P17", "P19", "P1376", "P37", "P138", "P463") for i in range(2)}
    b = {f: (0.0 if f.split("-")[0] in ("P37", "P138", "P463") else 1.0) for f in a}  # only flagged relations differ
    claim = replace(make_claim("Fig. X", "t", "c", "greater", "q", a, b, key="row", metric="rate"), primary=True)
    assert claim.units == tuple(sorted({f.split("-")[0] for f in a})) and len(claim.unit_diffs) == 8
    table = sensitivity_table([claim], flags, 0.05)
    assert "Left out: P138 (copyable), P37 (copyable), P463 (many_answers)" in table
    row = next(line for line in table.splitlines() if line.startswith("| row | 0.375"))  # 3 of 8 relations differ by 1
    assert row.split("|")[3].strip().startswith("0.000") and "(n=5)" in row  # without them: 0 over five relations
    assert "nothing to leave out" in sensitivity_table([claim], {"P36": frozenset()}, 0.05)


def test_masked_lora_is_compared_with_plain_lora():
    from matrice.experiments.inject import injection_claims

    records = [{"variant": v, "lr": 0.1, "split": split, "fact_id": f"P{f}-e1", "lang": "fr", "query_id": f"q{f}{split}",
                "correct": v == "matrice_lora"} for f in range(4) for v in ("matrice", "lora", "matrice_lora")
               for split in ("heldout", "old")]
    claims = {c.key: c for c in injection_claims({"records": records,
                                                  "selected": {"matrice": 0.1, "lora": 0.1, "matrice_lora": 0.1}})}
    assert {"table5_heldout_matrice_lora_vs_lora", "table5_old_matrice_lora_vs_lora"} <= set(claims)
    assert claims["table5_heldout_matrice_lora_vs_lora"].estimate.mean == 1.0
    assert claims["table5_heldout_matrice_lora_vs_lora"].comparison == "heldout accuracy MATRICE_LoRA − LoRA"


def test_a_verdict_that_rests_on_one_relation_says_so():
    """A large difference in one relation (a mean of unbounded ratios can have one) beside small ones
    of both signs: p < 0.05 with it, not without it. The verdict stands; its note names the relation.
    A p just under 0.05 that dropping most relations lifts is called fragile; an effect spread over
    every relation with a small p gets no note."""
    from matrice.evaluation.claims import judge, make_claim

    def claim(diffs, key):
        return make_claim("Fig. X", "t", "c", "greater", "q", {f"P{r}-e1": d for r, d in enumerate(diffs)},
                          {f"P{r}-e1": 0.0 for r in range(len(diffs))}, key=key, metric="rate")

    outlier = claim([10.0] + [0.1] * 11 + [-0.1] * 3, "outlier")  # p = 0.029; without P0: 0.057
    fragile = claim([3.0, 0.2, 0.1, 0.15, -0.05, 0.1, 0.2, -0.1, 0.05, 0.1], "fragile")  # p = 0.033
    spread = claim([1.0] * 10, "spread")
    judged = {c.key: c for c in judge([outlier, fragile, spread])}
    assert judged["outlier"].verdict == "replicates" and judged["outlier"].estimate.p == pytest.approx(0.0287, abs=1e-3)
    assert "rests on one relation: without P0, p = 0.057" in judged["outlier"].note
    assert judged["fragile"].verdict == "replicates"
    assert "fragile: without any one of 7 of its 10 relations p ≥ 0.05 (up to 0.066, without P0)" in judged["fragile"].note
    assert judged["spread"].verdict == "replicates" and "rests on" not in judged["spread"].note
    assert "fragile" not in judged["spread"].note
    null = claim([(-1) ** r * (r + 1) for r in range(10)], "null")
    holm = {c.key: c for c in judge([fragile, spread, null], primary=["fragile", "spread", "null"])}
    assert holm["fragile"].p_holm == pytest.approx(2 * holm["fragile"].estimate.p)  # second of three
    assert holm["fragile"].verdict == "inconclusive" and "fragile" not in holm["fragile"].note
