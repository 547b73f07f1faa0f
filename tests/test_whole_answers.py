"""Whole answers (`answer_token: all`) in scoring and editing: rank 0 is the greedy output in full, an
update to an object that shares the gold's first token is scored on the whole object, and the edit
stage's counts equal greedy decoding under the same edit."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

from conftest import tiny_on_device
from implant import IMPLANT, QUERIES, pairs, sets_for
from whole_reference import teacher_forced
from matrice.experiments import encode_all, group_by_fact
from matrice.experiments.edit import EditConfig, edit_facts
from matrice.experiments.edit.run import _EditRun
from matrice.experiments.edit_targets import NewObject, with_new_object
from matrice.interventions import edited_output_weights, erasure_vectors, update_vectors
from matrice.models.adapter import Encoded
from matrice.models.predict import greedy_decode, score_answers
from matrice.models.whole_answer import AnswerSteps, answer_scores, whole_score

pytestmark = pytest.mark.usefixtures("single_thread")


def _whole(adapter, encs):
    return answer_scores(adapter, encs, "all")


def _query(adapter, n_tokens: int) -> Encoded:
    tok = adapter.tokenizer
    ids = list(tok("The capital of France is" if adapter.causal else "The capital of France is" + tok.mask_token * n_tokens)
               ["input_ids"])
    target = len(ids) - 1 if adapter.causal else ids.index(tok.mask_token_id)
    return Encoded(ids, target, [0] * n_tokens, [p for p, i in enumerate(ids) if i not in set(tok.all_special_ids)])


def _fill_left_to_right(adapter, enc: Encoded) -> list[int]:
    """Greedy filling of a masked query's masks one at a time, left to right (independent of the steps)."""
    import torch

    ids, out = list(enc.input_ids), []
    for k in range(len(enc.answer_ids)):
        with torch.no_grad():
            logits = adapter.model(input_ids=torch.tensor([ids], device=adapter.device)).logits[0, enc.target_pos + k]
        out.append(int(logits.argmax()))
        ids[enc.target_pos + k] = out[-1]
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "bert"])
def test_rank_zero_is_the_greedy_output_in_full(family):
    a = tiny_on_device(family)
    enc = _query(a, 3)
    greedy = greedy_decode(a, [enc])[0] if a.causal else _fill_left_to_right(a, enc)
    own = replace(enc, answer_ids=list(greedy))
    near = replace(enc, answer_ids=[greedy[0], greedy[1], (greedy[2] + 1) % a.model.config.vocab_size])
    whole = _whole(a, [own, near])
    assert whole[0].rank == 0 and whole[1].rank > 0  # a different last token is a different answer
    first = score_answers(a, [own, near])
    assert first[0].rank == first[1].rank == 0  # first-token scoring cannot tell them apart
    steps = AnswerSteps.of(a, [own], "all")
    per_token = score_answers(a, steps.encs)
    assert whole[0].prob == pytest.approx(per_token[0].prob * per_token[1].prob * per_token[2].prob, rel=1e-4)
    assert (whole[0].top_token, *whole[0].top_rest) == tuple(greedy)


def test_whole_score_of_one_token_is_the_token_score_and_locality_compares_every_step():
    from matrice.models.predict import AnswerScore

    one = AnswerScore(0.3, 2, 7)
    assert whole_score([one]) is one
    a = whole_score([AnswerScore(0.5, 0, 7), AnswerScore(0.4, 3, 9)])
    b = whole_score([AnswerScore(0.5, 0, 7), AnswerScore(0.1, 0, 4)])
    assert a.rank == 3 and a.prob == pytest.approx(0.2) and not a.same_top(b)
    assert a.same_top(whole_score([AnswerScore(0.9, 0, 7), AnswerScore(0.2, 1, 9)]))


def test_an_update_to_an_object_sharing_the_first_token_is_scored_on_the_whole_object(gpt2_implant):
    """o = "Berlin", o' = "Bern" (same first token, neither a prefix of the other): first-token scoring
    has to leave such queries out (o' top-1 would only mean o still is); whole answers keep them and
    count success only when the greedy output is o' in full. "Berlinale" starts with o's tokens: with
    no end-of-answer term it cannot be told from o, so it is left out under either policy."""
    a, _ = gpt2_implant
    encs, _ = encode_all(a, QUERIES)
    f2 = [q for q in QUERIES if q.fact_id == "f2" and q.lang in ("en", "fr")]
    runs = {policy: _EditRun(a, EditConfig(), False, encs, group_by_fact(QUERIES), ["update"], lambda qid: False,
                             answer_token=policy) for policy in ("first", "all")}
    gold = encs[f2[0].query_id].answer_ids
    tokens = tuple(with_new_object(a, f2[0], NewObject("f1", {"en": "Bern"}, 0), [-1], False)[0].answer_ids)
    assert tokens[0] == gold[0] and tokens[: len(gold)] != tuple(gold)
    new = NewObject("f1", {"en": "Bern", "fr": "Bern"}, tokens[0], tokens)
    assert runs["first"].update_encodings(f2, new) == {}
    assert runs["first"].skipped["update_queries_same_first_token"] == len(f2)
    kept = runs["all"].update_encodings(f2, new)
    assert set(kept) == {q.query_id for q in f2}
    encodings = list(kept.values())
    first, whole, greedy = score_answers(a, encodings), _whole(a, encodings), greedy_decode(a, encodings)
    assert [w.rank == 0 for w in whole] == [g == e.answer_ids for g, e in zip(greedy, encodings)]
    assert [w.prob for w in whole] == pytest.approx([teacher_forced(a, e)[0] for e in encodings], rel=1e-4)
    assert not any(w.rank == 0 for w in whole) and first[0].prob > whole[0].prob
    prefixed = NewObject("f1", {"en": "Berlinale"}, tokens[0], ())
    en = [q for q in f2 if q.lang == "en"]
    assert runs["all"].update_encodings(en, prefixed) == {}
    assert runs["all"].skipped["update_queries_prefix_answer"] == len(en)
    assert "update_queries_same_first_token" not in runs["all"].skipped


def test_whole_answer_editing_counts_equal_greedy_decoding_under_the_same_edit(gpt2_implant):
    a, _ = gpt2_implant
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    cfg = EditConfig(locality_k=2, seed=0, scaling="column_norm", lambda1=2.0, lambda2=2.0)
    res = edit_facts(a, QUERIES, sets, methods=("matrice",), cfg=cfg, facts=["f1"], progress=False, answer_token="all")
    info = res.new_objects["f1"]
    new = NewObject(info["from_fact"], info["labels"], info["token"], tuple(info["tokens"]))
    encs, _ = encode_all(a, QUERIES)
    vectors = update_vectors(a, pairs(IMPLANT), tuple(info["old_tokens"]), new.tokens, cfg.lambda1, cfg.lambda2,
                             cfg.scaling)
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with edited_output_weights(a, vectors):
        for q in (q for q in QUERIES if q.fact_id == "f1"):
            gold = encs[q.query_id].answer_ids
            enc, _ = with_new_object(a, q, new, gold, False, whole=True)
            if enc is not None:
                expected[q.lang][0] += 1
                expected[q.lang][1] += int(greedy_decode(a, [enc])[0] == enc.answer_ids)
    got = {r.lang: [r.rel_n + r.gen_n, r.rel_ok + r.gen_ok] for r in res.records if r.operation == "update"}
    assert got == dict(expected)
    run = _EditRun(a, cfg, False, encs, group_by_fact(QUERIES), ["update"], lambda qid: False, answer_token="all")
    fact = run.fact_probes("f1", res)
    after = run.edited_passes(fact, "update", {"matrice": pairs(IMPLANT)})["matrice"]
    with edited_output_weights(a, vectors):  # the edited scores are the edited model's, token by token
        reference = [teacher_forced(a, e)[0] for e in fact.scored("update")]
    assert [s.prob for s in after] == pytest.approx(reference, rel=1e-4)
    assert len({round(p, 12) for p in reference}) > 1
    erased: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # o answered in full before, no longer after
    f1 = [q for q in QUERIES if q.fact_id == "f1"]
    before = {q.query_id: greedy_decode(a, [encs[q.query_id]])[0] == encs[q.query_id].answer_ids for q in f1}
    with edited_output_weights(a, erasure_vectors(a, pairs(IMPLANT))):
        for q in (q for q in f1 if before[q.query_id]):
            erased[q.lang][0] += 1
            erased[q.lang][1] += int(greedy_decode(a, [encs[q.query_id]])[0] != encs[q.query_id].answer_ids)
    got = {r.lang: [r.rel_n + r.gen_n, r.rel_ok + r.gen_ok] for r in res.records if r.operation == "erasure" and r.rel_n + r.gen_n}
    assert got == dict(erased) and sum(ok for _, ok in got.values()) > 0  # the implant's erasure removes " Paris"


def test_whole_answer_enhancement_is_every_token_top1_with_the_neurons_scaled_at_its_position():
    from implant import implanted_gpt2, probe
    from matrice.experiments.enhance import enhance_low_resource
    from matrice.models.encoding import encode_query

    a, _ = implanted_gpt2(scale=0.5)  # too weak to make " Paris" top-1; ×20 on the neuron makes it
    qs = [q for q in QUERIES if q.lang in ("en", "fi")]
    probes = probe(a, qs)
    neurons = pairs(IMPLANT, (1, 3))
    sets = {f: {"matrice": neurons} for f in {q.fact_id for q in qs}}
    res = enhance_low_resource(a, qs, probes, sets, methods=("matrice",), languages=("en", "fi"), factor=20.0,
                               progress=False, answer_token="all")
    assert res.records and any(r.correct_after for r in res.records)
    by_id = {q.query_id: q for q in qs}
    lengths = set()
    for r in res.records:
        enc = encode_query(a, by_id[r.query_id])
        lengths.add(len(enc.answer_ids))
        assert r.correct_after == teacher_forced(a, enc, neurons, 20.0)[1], r.query_id
    assert max(lengths) > 1


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_degenerate_search_on_whole_answers_suppresses_each_token_at_its_position(family):
    from matrice.experiments.degenerate.search import Suppressor
    from matrice.models.encoding import encode_query

    a = tiny_on_device(family)
    q = next(q for q in QUERIES if q.fact_id == "f2" and q.lang == "en")  # " Berlin": more than one token
    enc = encode_query(a, q)
    assert len(enc.answer_ids) > 1
    groups = [[(1, 2)], [(1, 2), (2, 0)], [(0, 4), (1, 5), (2, 3)]]
    p0, ratios = Suppressor(a, rows=2, answer_token="all").ratios(enc, groups)
    assert p0 == pytest.approx(teacher_forced(a, enc)[0], rel=1e-4)
    for group, ratio in zip(groups, ratios):
        assert ratio == pytest.approx(teacher_forced(a, enc, group, 0.0)[0] / p0, rel=1e-4)


def test_case_study_on_whole_answers_reads_each_language_as_the_teacher_forced_reference(gpt2_implant):
    from matrice.experiments.case_study import case_study
    from matrice.models.encoding import encode_query

    a, _ = gpt2_implant
    sets = sets_for({"f2": {"matrice": pairs(IMPLANT, (1, 4))}})
    study = case_study(a, QUERIES, sets, "f2", factor=3.0, answer_token="all")
    originals = {q.lang: q for q in QUERIES if q.fact_id == "f2" and q.template_id == 0}
    for lang, d in study.languages.items():
        enc = encode_query(a, originals[lang])
        prob, top1 = teacher_forced(a, enc)
        assert d["before"]["p_gold"] == pytest.approx(prob, rel=1e-4) and d["before"]["correct"] == top1
        assert d["enhanced"]["correct"] == teacher_forced(a, enc, pairs(IMPLANT, (1, 4)), 3.0)[1]
    assert max(len(encode_query(a, q).answer_ids) for q in originals.values()) > 1


def test_fact_checking_on_whole_answers_scores_the_whole_object_and_may_pair_a_shared_first_token(gpt2_implant):
    from matrice.experiments.fact_check.detectors import build_statements, probability_scores

    a, _ = gpt2_implant
    f2 = [q for q in QUERIES if q.fact_id == "f2" and q.lang == "en"][:1]
    near = [replace(f2[0], fact_id="fx", answer="Bern")]  # shares " Ber" with "Berlin", not a prefix
    prefixed = [replace(f2[0], fact_id="fy", answer="Berlinale")]  # starts with "Berlin": cannot be told apart
    assert build_statements(a, f2, f2 + near, 0, False) == []  # first tokens: no false object to pair with
    assert build_statements(a, f2, f2 + prefixed, 0, False, whole=True) == []
    pairs_ = build_statements(a, f2, f2 + near, 0, False, whole=True)
    assert [s.true for s, _ in pairs_] == [True, False] and pairs_[1][0].obj == "Bern"
    encs = [e for _, e in pairs_]
    assert encs[0].answer_ids[0] == encs[1].answer_ids[0]
    probs, token_mean = probability_scores(a, encs, answer_token="all")
    assert probs == pytest.approx([teacher_forced(a, e)[0] for e in encs], rel=1e-4)

    def token_probability(enc, k):  # P(t_k | q, t_<k) from two products of the reference
        head = teacher_forced(a, replace(enc, answer_ids=enc.answer_ids[:k]))[0] if k else 1.0
        return teacher_forced(a, replace(enc, answer_ids=enc.answer_ids[: k + 1]))[0] / head

    expected = [sum(token_probability(e, k) for k in range(len(e.answer_ids))) / len(e.answer_ids) for e in encs]
    assert token_mean == pytest.approx(expected, rel=1e-4)
    first, same = probability_scores(a, encs)
    assert first == same and first[1] == pytest.approx(teacher_forced(a, replace(encs[1], answer_ids=encs[1].answer_ids[:1]))[0], rel=1e-4)


def test_the_api_reads_whole_answers_when_asked(gpt2_implant):
    import torch

    import matrice.api as mx
    from matrice.models.encoding import encode_query

    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id == "f2"]
    neurons = pairs(IMPLANT, (1, 4))
    by_id = {q.query_id: q for q in qs}
    records = mx.suppress(a, neurons, qs, answer_token="all")
    assert sorted(r.query_id for r in records) == sorted(by_id)
    for r in records:
        enc = encode_query(a, by_id[r.query_id])
        assert r.p_after == pytest.approx(teacher_forced(a, enc, neurons, 0.0)[0], rel=1e-4)
    berlin = next(q for q in QUERIES if q.query_id == "f2|en|0")
    with pytest.raises(ValueError, match="starts with the same token"):
        with mx.edit(a, neurons, berlin, "Bern"):
            pass
    before = a.out_proj(IMPLANT[0]).weight.detach().clone()
    gold, new = encode_query(a, berlin).answer_ids, encode_query(a, replace(berlin, answer="Bern")).answer_ids
    expected = update_vectors(a, neurons, tuple(gold), tuple(new))
    with mx.edit(a, neurons, berlin, "Bern", answer_token="all"):  # shares " Ber", differs as a whole
        for (layer, unit), vector in expected.items():
            assert torch.equal(a.output_weight(layer, unit), vector)  # the mean-direction update
    assert torch.equal(a.out_proj(IMPLANT[0]).weight, before)
    for same in ("Berlin", "Berlinale"):
        with pytest.raises(ValueError, match="could not be told"):
            with mx.edit(a, neurons, berlin, same, answer_token="all"):
                pass
    with pytest.raises(ValueError, match="answer_token"):
        with mx.edit(a, neurons, berlin, "Bern", answer_token="All"):
            pass
