"""Attribution runs: which facts are attributed, resumable shards (one per fact), float16 storage, the
run plan, and the score store's I/O."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from matrice.method.attribution import executors as runner_mod
from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.runner import (
    choose_facts, load_attributions, plan_shards, run_attribution, shard_name, sample_facts_per_relation,
)
from matrice.data.build import build_dataset
from matrice.data.sources import DatasetConfig
from matrice.probing import encode_all
from matrice.method.scores import ScoreStore, group_by_fact, save_scores
from matrice.method.uncertainty import AggregationConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def small_run():
    ds = build_dataset(DatasetConfig(relations=["P36", "P30"], languages=["en", "fr"], max_facts_per_relation=2,
                                     max_templates_per_language=2))
    return ds.queries


def test_fact_sample_is_seeded_and_per_relation(small_run):
    a = sample_facts_per_relation(small_run, 1, seed=0)
    assert a == sample_facts_per_relation(small_run, 1, seed=0)
    assert sorted(f.split("-")[0] for f in a) == ["P30", "P36"]
    assert len(sample_facts_per_relation(small_run, None, seed=0)) == 4


def test_known_fact_policy_takes_only_facts_answered_in_the_editing_language(small_run):
    facts = sorted({q.fact_id for q in small_run})
    known = facts[1:3]  # one P30 and/or P36 fact answered in English on template 0
    probes = [{"fact_id": q.fact_id, "lang": q.lang, "template_id": q.template_id,
               "correct": (q.fact_id in known and q.lang == "en" and q.template_id == 0)
               or (q.lang == "fr")  # French answers never qualify a fact
               or (q.template_id == 1)}  # nor do paraphrases
              for q in small_run]
    chosen = choose_facts(small_run, 2, 0, "known", probes, "en")
    assert sorted(chosen) == sorted(known)
    assert choose_facts(small_run, 1, 0, "any") == sample_facts_per_relation(small_run, 1, 0)
    assert sorted(choose_facts(small_run, None, 0, "known", probes, "fr")) == facts
    with pytest.raises(ValueError, match="fact_policy"):
        choose_facts(small_run, 1, 0, "famous", probes)
    with pytest.raises(ValueError, match="needs the probe"):
        choose_facts(small_run, 1, 0, "known")


def test_attribution_shards_resume_and_recompute_only_what_changed(tmp_path, small_run, tiny, monkeypatch):
    adapter = tiny("llama")
    queries = small_run
    facts = sample_facts_per_relation(queries, None, 0)
    encs = encode_all(adapter, queries, few_shot=True)
    shards = plan_shards(queries, facts)
    cfg = AttributionConfig(steps=2)
    calls = []
    real = runner_mod.fast_attribution_many

    def counted(adapter, encs, *a, **k):  # one call per shard; count the queries it attributes
        calls.extend([1] * len(encs))
        return real(adapter, encs, *a, **k)

    monkeypatch.setattr(runner_mod, "fast_attribution_many", counted)
    settings = {"steps": 2}
    run_attribution(adapter, queries, encs, shards, cfg, settings, tmp_path)
    assert len(calls) == len(queries)
    manifest, raw = load_attributions(tmp_path)
    assert set(raw) == {q.query_id for q in queries}
    assert raw[queries[0].query_id].shape == (adapter.n_layers, adapter.n_neurons)

    calls.clear()
    (tmp_path / shards[1].name).unlink()  # an interrupted run lost this shard
    (tmp_path / "stale-looking.tmp").write_text("partial")  # temp files are never read
    run_attribution(adapter, queries, encs, shards, cfg, settings, tmp_path)
    assert len(calls) == len(shards[1].query_ids)
    _, raw_again = load_attributions(tmp_path)
    for qid in raw:
        np.testing.assert_array_equal(raw[qid], raw_again[qid])

    calls.clear()
    run_attribution(adapter, queries, encs, shards[:2], cfg, {"steps": 3}, tmp_path)  # settings changed
    assert len(calls) == sum(len(s.query_ids) for s in shards[:2])
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == [s.name for s in shards[:2]]


def test_a_run_over_more_facts_keeps_the_shards_of_the_facts_it_shares(tmp_path, small_run, tiny, monkeypatch):
    adapter = tiny("llama")
    facts = sample_facts_per_relation(small_run, None, 0)
    encs = encode_all(adapter, small_run, few_shot=True)
    cfg = AttributionConfig(steps=2)
    run_attribution(adapter, small_run, encs, plan_shards(small_run, facts[1:2]), cfg, {"steps": 2}, tmp_path)
    calls = []
    real = runner_mod.fast_attribution_many
    monkeypatch.setattr(runner_mod, "fast_attribution_many",
                        lambda adapter, encs, *a, **k: (calls.append(len(encs)), real(adapter, encs, *a, **k))[1])
    run_attribution(adapter, small_run, encs, plan_shards(small_run, facts), cfg, {"steps": 2}, tmp_path)
    per_fact = Counter(q.fact_id for q in small_run)
    assert len(facts) > 1 and per_fact[facts[1]] > 0
    assert sum(calls) == sum(per_fact[f] for f in facts) - per_fact[facts[1]]  # only the new facts were attributed
    assert set(load_attributions(tmp_path)[1]) == {q.query_id for q in small_run if q.fact_id in facts}


def test_whole_answer_run_reads_token_one_from_the_first_token_runs_shards(tmp_path, small_run, tiny, monkeypatch):
    """``dvc exp run -S answer_token=all`` after a first-token baseline: each shard's first-token maps
    (same queries and settings) serve as token 1, only the later tokens are attributed, and the maps
    equal a whole-answer run from scratch bit for bit."""
    adapter = tiny("gpt2")
    facts = sample_facts_per_relation(small_run, None, 0)
    encs = encode_all(adapter, small_run, few_shot=True)
    shards = plan_shards(small_run, facts)
    settings = {"steps": 2, "answer_token": "first"}
    run_attribution(adapter, small_run, encs, shards, AttributionConfig(steps=2), settings, tmp_path / "run")
    whole_cfg, whole_settings = AttributionConfig(steps=2, answer_token="all"), {**settings, "answer_token": "all"}
    run_attribution(adapter, small_run, encs, shards, whole_cfg, whole_settings, tmp_path / "scratch")
    attributed: list[int] = []
    real = runner_mod.fast_attribution_many
    monkeypatch.setattr(runner_mod, "fast_attribution_many",
                        lambda adapter, encs, *a, **k: (attributed.extend([1] * len(encs)),
                                                        real(adapter, encs, *a, **k))[1])
    run_attribution(adapter, small_run, encs, shards, whole_cfg, whole_settings, tmp_path / "run")
    later = sum(len(e.answer_ids) - 1 for e in encs)  # the step queries of tokens 2..K
    assert later > 0 and len(attributed) == later  # no token-1 query was attributed again
    _, reused = load_attributions(tmp_path / "run")
    _, scratch = load_attributions(tmp_path / "scratch")
    assert set(reused) == set(scratch)
    for qid in scratch:
        np.testing.assert_array_equal(reused[qid], scratch[qid])
    attributed.clear()  # a finished whole-answer shard is kept as it is
    run_attribution(adapter, small_run, encs, shards, whole_cfg, whole_settings, tmp_path / "run")
    assert attributed == []


def test_shard_names_are_file_safe_and_distinct():
    assert shard_name("P17-e01") == "shard-P17-e01.npz"
    odd = [shard_name(f) for f in ("P17/a b", "P17/a_b", "P17 a/b", "../x")]
    assert len(set(odd)) == len(odd)
    assert all("/" not in n and " " not in n and n.startswith("shard-") for n in odd)


def test_scores_group_by_template_order_and_round_trip(tmp_path, small_run):
    rng = np.random.default_rng(0)
    raw = {q.query_id: rng.normal(size=(2, 5)).astype(np.float32) for q in small_run}
    grouped = group_by_fact(list(reversed(small_run)), raw)
    q0 = next(q for q in small_run if q.template_id == 0)
    np.testing.assert_array_equal(grouped[q0.fact_id][q0.lang][0], raw[q0.query_id])
    from matrice.method.scores import aggregate_all

    scores = aggregate_all(grouped, AggregationConfig(), ["en", "fr"])
    save_scores(tmp_path / "s", scores.items())
    back = ScoreStore(tmp_path / "s")
    assert back.facts == sorted(scores) and back.languages == ["en", "fr"]
    for f in scores:
        for name in ("S", "s_per_lang", "first_query_norm", "S_wo_uaq", "S_leave_out"):
            np.testing.assert_array_equal(getattr(back[f], name), getattr(scores[f], name).astype(np.float32))
        assert back[f].amig_norm is None and back[f].languages == ["en", "fr"]
    with pytest.raises(ValueError, match="no attributed query in language"):
        aggregate_all(grouped, AggregationConfig(), ["en", "fr", "ja"])

def test_float16_storage_round_trips_and_selects_like_float32(tmp_path, small_run, tiny):
    from matrice.method.attribution.runner import iter_fact_attributions
    from matrice.method.scores import aggregate_all, aggregate_stream
    from matrice.method.selection import SelectionConfig, select_fact
    from matrice.method.uncertainty import AggregationConfig

    adapter = tiny("llama")
    facts = sample_facts_per_relation(small_run, None, 0)
    encs = encode_all(adapter, small_run, few_shot=True)
    shards = plan_shards(small_run, facts)
    cfg = AttributionConfig(steps=2)
    for dtype in ("float32", "float16"):
        run_attribution(adapter, small_run, encs, shards, cfg, {"steps": 2}, tmp_path / dtype, store_dtype=dtype)
    with np.load(tmp_path / "float16" / shards[0].name) as data:
        assert data["raw"].dtype == np.float16
    _, raw32 = load_attributions(tmp_path / "float32")
    _, raw16 = load_attributions(tmp_path / "float16")
    for qid in raw32:
        assert raw16[qid].dtype == np.float32
        scale = np.abs(raw32[qid]).max()
        assert np.abs(raw16[qid] - raw32[qid]).max() <= 1e-3 * scale  # float16: 11 significant bits
    langs = ["en", "fr"]
    agg = AggregationConfig()
    scores32 = dict(aggregate_stream(iter_fact_attributions(tmp_path / "float32"), None, small_run, agg, langs))
    scores16 = dict(aggregate_stream(iter_fact_attributions(tmp_path / "float16"), None, small_run, agg, langs))
    in_memory = aggregate_all(group_by_fact(small_run, raw32), agg, langs)
    assert set(scores32) == set(in_memory) == set(facts)
    for fact in facts:  # streaming, one fact at a time, is the in-memory aggregation
        np.testing.assert_array_equal(scores32[fact].S, in_memory[fact].S)
        sel32 = select_fact(scores32[fact], SelectionConfig(), fact)
        sel16 = select_fact(scores16[fact], SelectionConfig(), fact)
        np.testing.assert_array_equal(sel16["matrice"], sel32["matrice"])
    # an unknown storage type is refused before anything is computed
    with pytest.raises(ValueError, match="store_dtype"):
        run_attribution(adapter, small_run, encs, shards, cfg, {}, tmp_path / "x", store_dtype="int8")


def test_plan_counts_rows_and_projects_from_the_measured_speed(small_run, tiny):
    from dataclasses import replace

    from matrice.method.attribution.plan import count_rows, plan_run

    adapter = tiny("llama")
    encs = encode_all(adapter, small_run, few_shot=True)
    cfg = AttributionConfig(steps=3)
    amig = replace(cfg, baseline="amig")
    expected = sum(len(e.baseline_positions) for e in encs) * adapter.n_layers * 3
    assert count_rows(encs, cfg, adapter.n_layers) == expected
    assert count_rows(encs[:4], amig, adapter.n_layers) == 4 * adapter.n_layers * 3
    plan = plan_run(adapter, [(encs, cfg), (encs[:4], amig)], n_facts=4, n_languages=2, workers=2,
                    store_dtype="float16", measure_queries=2)
    assert plan.rows == expected + 4 * adapter.n_layers * 3 and plan.queries == len(encs) + 4
    assert plan.rows_per_s > 0 and plan.measured_queries == 1
    assert plan.hours_one_worker == pytest.approx(plan.rows / plan.rows_per_s / 3600)
    assert plan.hours_wall == pytest.approx(plan.hours_one_worker / 2)
    assert plan.raw_gib * 1024**3 == pytest.approx(plan.queries * adapter.n_layers * adapter.n_neurons * 2)
    assert plan.scores_gib * 1024**3 == pytest.approx(4 * (4 + 2 * 2) * adapter.n_layers * adapter.n_neurons * 4)
    assert "rows (baseline × layer × step)" in plan.text()


def test_score_store_writes_one_file_per_fact_as_they_come_and_the_index_last(tmp_path, small_run):
    """A crash mid-write leaves no index (no reader takes it as finished); a later run with fewer
    facts removes the files of the facts it dropped; facts come back in id order whatever the order
    they were written in."""
    from matrice.method.scores import INDEX, aggregate_all

    rng = np.random.default_rng(1)
    raw = {q.query_id: rng.normal(size=(2, 5)).astype(np.float32) for q in small_run}
    scores = aggregate_all(group_by_fact(small_run, raw), AggregationConfig(), ["en", "fr"])
    facts = sorted(scores)
    out = tmp_path / "scores"
    save_scores(out, [(f, scores[f]) for f in reversed(facts)])
    assert ScoreStore(out).facts == facts and len(list(out.glob("scores-*.npz"))) == len(facts)

    def crashes_after_one():
        yield facts[0], scores[facts[0]]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_scores(out, crashes_after_one())
    assert not (out / INDEX).exists()
    with pytest.raises(FileNotFoundError, match="aggregate stage has not finished"):
        ScoreStore(out)
    save_scores(out, [(f, scores[f]) for f in facts[:2]])
    assert ScoreStore(out).facts == facts[:2] and len(list(out.glob("scores-*.npz"))) == 2
    with pytest.raises(ValueError, match="no fact to save"):
        save_scores(tmp_path / "empty", [])
