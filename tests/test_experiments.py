"""Experiments of paper section IV on tiny random models with hand-built cases whose outcome is known.

The central trick: a GPT-2 "knowledge neuron" is implanted by hand. Neuron i of the last layer gets
a constant activation (its c_fc column is 0, its bias 10 → GELU(10) = 10) and writes c·Ê(" Paris")
into the residual stream (its c_proj row). The model then predicts " Paris" for every query, and
erasing / updating / scaling that one neuron has a known effect.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import across_shapes
from conftest import tiny_on_device as tiny_adapter  # on MATRICE_TEST_DEVICE
from matrice.data.schema import Fact, make_query
from matrice.experiments import (
    MissingNeuronSetError, ProbeRecord, as_probe_map, encode_all, fact_neurons, original_queries,
)
from matrice.experiments.case_study import case_study
from matrice.experiments.edit import EditConfig, edit_facts
from matrice.experiments.edit_targets import choose_new_object, locality_sampler
from matrice.experiments.enhance import enhance_low_resource
from matrice.experiments.inject import InjectConfig, inject_knowledge, train_variant
from matrice.experiments.manipulate import manipulate
from matrice.finetune import answer_loss, answer_loss_reference, check_masked_update, neuron_param_masks
from matrice.interventions import edited_output_weights, erasure_vectors, update_vectors
from matrice.models.encoding import encode_query
from matrice.models.tiny import TINY_FAMILIES
from matrice.models.predict import greedy_decode, is_correct, score_answers

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core CI box they lose 10-40×."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt2_implant():
    return implanted_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_adapter("llama")


# ---- shared helpers -----------------------------------------------------------------------------

def test_probe_records_and_neuron_lookup(llama):
    recs = [ProbeRecord("q1", "f1", "r", "en", 0.5, 0, True).to_dict(), ProbeRecord("q2", "f1", "r", "fr", 0.1, 3, False)]
    pm = as_probe_map(recs)
    assert pm["q1"].correct and not pm["q2"].correct and pm["q2"].rank == 3
    assert as_probe_map(pm) == pm
    with pytest.raises(ValueError, match="duplicate"):
        as_probe_map(recs + recs[:1])
    with pytest.raises(ValueError, match="misses field"):
        as_probe_map([{"query_id": "q"}])
    sets = {"f1": {"matrice": [[0, 1]], "amig": []}}
    assert fact_neurons(sets, "f1", "amig").shape == (0, 2)
    with pytest.raises(MissingNeuronSetError, match="'f9' has no neuron sets"):
        fact_neurons(sets, "f9", "matrice")
    with pytest.raises(MissingNeuronSetError, match="no neuron set for method 'random'"):
        fact_neurons(sets, "f1", "random")
    with pytest.raises(ValueError, match="out of range"):
        fact_neurons({"f1": {"matrice": [[3, 0]]}}, "f1", "matrice", llama)
    orig = original_queries([q for q in QUERIES if q.fact_id == "f1"])
    assert {l: q.template_id for l, q in orig.items()} == {"en": 0, "fr": 0, "fi": 0}


# ---- manipulation -------------------------------------------------------------------------------

def test_manipulation_hand_case(gpt2_implant):
    a, _ = gpt2_implant
    qs = [q for q in QUERIES if q.fact_id in ("f1", "f2")]
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT), "random": pairs((0, 0), (1, 3))}})
    res = manipulate(a, qs, sets, methods=("matrice", "amig", "random"), progress=False)
    assert len(res.records) == len(qs) * 3 * 2
    # independent check: zeroing (doubling) the activation equals zeroing (doubling) the neuron's c_proj row
    f1_qs = [q for q in qs if q.fact_id == "f1"]
    encs = [encode_query(a, q) for q in f1_qs]
    p_before = [s.prob for s in score_answers(a, encs)]
    for mode, factor in (("suppress", 0.0), ("enhance", 2.0)):
        layer, i = IMPLANT
        w = a.layers[layer].mlp.c_proj.weight
        with edited_output_weights(a, {IMPLANT: w.data[i] * factor}):
            p_after = [s.prob for s in score_answers(a, encs)]
        by_id = {r.query_id: r for r in res.records if r.fact_id == "f1" and r.method == "matrice" and r.mode == mode}
        got = [by_id[q.query_id] for q in f1_qs]
        assert len(by_id) == len(encs)
        for r, pb, pa in zip(got, p_before, p_after):
            assert r.p_before == pytest.approx(pb, rel=1e-5)
            assert r.p_after == pytest.approx(pa, rel=1e-4, abs=1e-9)
            assert r.delta_p == pytest.approx((pa - pb) / pb, rel=1e-4, abs=1e-6)
    sup_en = next(r for r in res.records if r.query_id == "f1|en|0" and r.method == "matrice" and r.mode == "suppress")
    assert sup_en.p_before > 0.5 and sup_en.delta_p < -0.9  # the implanted neuron carried " Paris"
    # empty sets: ΔP exactly 0, kept in the means and counted per method
    assert res.empty_facts == {"matrice": ["f2"], "amig": ["f1", "f2"], "random": ["f2"]}
    assert all(r.delta_p == 0.0 and r.p_after == r.p_before for r in res.records if r.method == "amig")
    row = next(r for r in res.summary if (r["method"], r["mode"], r["lang"]) == ("amig", "suppress", "en"))
    assert row["mean_delta_p"] == 0.0 and row["n_empty_facts"] == 2 and row["mean_delta_p_nonempty"] is None
    row = next(r for r in res.summary if (r["method"], r["mode"], r["lang"]) == ("matrice", "suppress", "en"))
    f1_en = [r.delta_p for r in res.records if r.method == "matrice" and r.mode == "suppress" and r.lang == "en"]
    assert row["mean_delta_p"] == pytest.approx(np.mean(f1_en)) and row["n_queries"] == 4 and row["n_empty_facts"] == 1
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n_empty_facts"] == {"matrice": 1, "amig": 2, "random": 1} and len(d["records"]) == len(res.records)


def test_manipulation_layer_and_missing_fact(llama):
    qs = [q for q in QUERIES if q.fact_id == "f3"]
    all_layer1 = pairs(*[(1, i) for i in range(llama.n_neurons)])
    res = manipulate(llama, qs, {"f3": {"matrice": all_layer1}}, methods=("matrice",), progress=False)
    assert all(r.delta_p is not None and abs(r.delta_p) > 1e-4 for r in res.records)
    assert res.empty_facts == {"matrice": []}
    with pytest.raises(MissingNeuronSetError, match="f4"):
        manipulate(llama, [q for q in QUERIES if q.fact_id in ("f3", "f4")], {"f3": {"matrice": all_layer1}},
                   methods=("matrice",), progress=False)


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
    picks = {choose_new_object(a, "f1", by_fact, gold, seed=s).fact_id for s in range(8)}
    assert picks <= {"f2", "f3"} and choose_new_object(a, "f1", by_fact, gold, seed=3) == choose_new_object(a, "f1", by_fact, gold, seed=3)
    assert choose_new_object(a, "f4", by_fact, 0) is None  # the only fact of its relation
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


# ---- enhancement ----------------------------------------------------------------------------------

def test_enhancement_q_error_and_gain():
    a, _ = implanted_gpt2(scale=0.5)  # too weak to make " Paris" top-1; ×20 on the neuron makes it
    en = [q for q in QUERIES if q.lang == "en"]
    probes = probe(a, en)
    pm = as_probe_map(probes)
    assert not pm["f1|en|0"].correct
    sets = sets_for({"f1": {"matrice": pairs(IMPLANT)}})
    res = enhance_low_resource(a, en, probes, sets, methods=("matrice", "amig"), languages=("en",), factor=20.0,
                               progress=False)
    n_err = sum(not p.correct for p in probes)
    assert res.n_q_error == n_err and res.n_probe_mismatch == 0  # before: 0 correct by construction
    assert all(r["accuracy_before"] == 0.0 for r in res.overall)
    f1 = {r.query_id: r for r in res.records if r.method == "matrice" and r.fact_id == "f1"}
    assert f1["f1|en|0"].correct_after and f1["f1|en|1"].correct_after
    amig = next(r for r in res.overall if r["method"] == "amig")
    assert amig["accuracy_gain"] == 0.0 and amig["n_empty"] == n_err  # empty sets gain nothing
    assert set(res.empty_facts["amig"]) == {p.fact_id for p in probes if not p.correct}
    mat = {r["relation"]: r for r in res.by_relation if r["method"] == "matrice"}
    n_cap = sum(1 for p in probes if not p.correct and p.relation == "capital")
    assert mat["capital"]["n_correct_after"] >= 2 and mat["capital"]["n_queries"] == n_cap
    assert mat["capital"]["accuracy_gain"] == pytest.approx(mat["capital"]["n_correct_after"] / n_cap)
    json.dumps(res.to_dict())
    by_lang = [r for r in res.by_lang if r["method"] == "matrice"]
    assert [r["lang"] for r in by_lang] == ["en"]


def test_enhancement_default_languages_and_unprobed(llama):
    probes = probe(llama, QUERIES)
    partial = [p for p in probes if p.query_id != "f2|fi|0"]
    res = enhance_low_resource(llama, QUERIES, partial, sets_for({}, ("matrice",)), methods=("matrice",), progress=False)
    assert res.n_unprobed == 1
    assert {r.lang for r in res.records} <= {"fi"} and all(not r.correct_after for r in res.records)


# ---- injection ------------------------------------------------------------------------------------

def _expected_masks(adapter, ps):
    """Hand-written neuron parameter positions, per family: {param name: {(layer, neuron): {index}}}."""
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    want: dict[str, dict[tuple[int, int], set]] = {}

    def add(param, key, idxs):
        want.setdefault(names[id(param)], {}).setdefault(key, set()).update(idxs)

    for layer, i in ps:
        key = (int(layer), int(i))
        for proj in adapter.in_projs(layer):
            w = proj.weight
            if adapter.family.conv1d:  # Conv1D c_fc weight is (in, out): the neuron is a column
                add(w, key, {(r, i) for r in range(w.shape[0])})
            else:
                add(w, key, {(i, c) for c in range(w.shape[1])})
            if proj.bias is not None:
                add(proj.bias, key, {(i,)})
        w = adapter.out_proj(layer).weight
        if adapter.family.conv1d:  # Conv1D c_proj weight is (in = neurons, out): a row
            add(w, key, {(i, c) for c in range(w.shape[1])})
        else:
            add(w, key, {(r, i) for r in range(w.shape[0])})
    return want


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_masked_finetuning_touches_only_neurons(family):
    a = tiny_adapter(family)
    saved = state(a.model)
    ps = pairs((0, 3), (2, 10), (2, 11))
    masks = neuron_param_masks(a, ps)
    want = _expected_masks(a, ps)
    assert set(masks) == set(want)
    for name, m in masks.items():
        assert {tuple(int(x) for x in idx) for idx in torch.nonzero(m)} == set().union(*want[name].values()), name
    encs = [encode_query(a, q) for q in QUERIES if q.lang == "en"]
    cfg = InjectConfig(epochs=3, batch_size=4)
    trained, info = train_variant(a, "matrice", ps, encs, cfg, 1e-2, progress=False)
    assert_same_state(a.model, saved)  # the caller's model is untouched
    assert info["n_trainable"] == sum(int(m.sum()) for m in masks.values()) and info["n_neurons"] == 3
    assert info["losses"][-1] < info["losses"][0]
    orig = dict(a.model.named_parameters())
    for name, p in trained.model.named_parameters():
        o = orig[name].detach()
        if name not in masks:
            assert torch.equal(p.detach(), o), name
            continue
        m = masks[name]
        assert torch.equal(p.detach()[~m], o[~m]), name  # every element outside the mask
        changed = p.detach() != o
        for neuron, idxs in want[name].items():  # every neuron's slice of this tensor moved
            assert any(bool(changed[idx]) for idx in idxs), (name, neuron)
    check_masked_update(a.model, trained.model, masks)
    with torch.no_grad():  # the checker notices a change outside the mask
        name = next(n for n in masks if masks[n].ndim == 2)
        p = dict(trained.model.named_parameters())[name]
        p[~masks[name]] += 1.0
    with pytest.raises(RuntimeError, match="outside the neuron mask"):
        check_masked_update(a.model, trained.model, masks)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_answer_loss_with_head_on_answer_positions_equals_full_logits(family):
    """The training loss runs the LM head on the answer positions only; the obvious loss (every
    position's logits, one unpadded query at a time) is the same number, gradients included."""
    a = tiny_adapter(family)
    encs = [encode_query(a, q) for q in QUERIES if q.lang in ("en", "fi")]
    assert len({len(e.input_ids) for e in encs}) > 1 and max(len(e.answer_ids) for e in encs) > 1  # padding, several tokens
    params = [p for p in a.model.parameters()]
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        fast = answer_loss(a, a.model, encs)
        fast_grads = torch.autograd.grad(fast, params, allow_unused=True)
        slow = answer_loss_reference(a.model, a, encs)
        slow_grads = torch.autograd.grad(slow, params, allow_unused=True)
        for p in params:
            p.requires_grad_(False)
    torch.testing.assert_close(fast, slow, **across_shapes(1e-5, 1e-5))
    for f, s in zip(fast_grads, slow_grads):
        if s is None:
            assert f is None or not f.any()
        else:
            torch.testing.assert_close(f, s, **across_shapes(1e-5, 1e-4))


def test_direct_ft_and_lora_change_parameters(llama):
    saved = state(llama.model)
    encs = [encode_query(llama, q) for q in QUERIES if q.lang == "en"]
    cfg = InjectConfig(epochs=2, batch_size=4, lora_r=2)
    trained, info = train_variant(llama, "direct_ft", None, encs, cfg, 1e-2, progress=False)
    orig = dict(llama.model.named_parameters())
    changed = [n for n, p in trained.model.named_parameters() if not torch.equal(p.detach(), orig[n].detach())]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert info["n_trainable"] == sum(p.numel() for p in llama.model.parameters())
    lora, linfo = train_variant(llama, "lora", None, encs, cfg, 1e-2, progress=False)
    assert 0 < linfo["n_trainable"] < info["n_trainable"] and linfo["losses"][-1] < linfo["losses"][0]
    assert_same_state(llama.model, saved)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_lora_targets_only_ffn_projections(family):
    a = tiny_adapter(family)
    saved = state(a.model)
    encs = [encode_query(a, q) for q in QUERIES if q.lang == "en"]
    trained, info = train_variant(a, "lora", None, encs, InjectConfig(epochs=1, lora_r=2), 1e-2, progress=False)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in trained.model.named_parameters() if ".lora_A" in n}
    from matrice.finetune import ffn_module_names

    assert lora_modules == set(ffn_module_names(a)) and len(lora_modules) == 2 * a.n_layers
    assert info["n_trainable"] == sum(p.numel() for n, p in trained.model.named_parameters() if "lora_" in n)
    assert_same_state(a.model, saved)


def test_inject_knowledge_end_to_end():
    from matrice.experiments.inject import choose_units

    a = tiny_adapter("gpt2")
    saved = state(a.model)
    probes = probe(a, QUERIES)
    held_out = lambda q: q.template_id >= 1  # en/fr template 1 is held out; fi has none
    units = choose_units(QUERIES, probes, held_out, None, seed=0)
    by_id = {q.query_id: q for q in QUERIES}
    correct = {p.query_id: p.correct for p in probes}
    assert units and len({u.fact_id for u in units}) == len(units)  # one unit per fact
    for u in units:
        assert all(by_id[i].template_id == 0 and by_id[i].lang == u.lang for i in u.train)  # localisation only
        assert all(held_out(by_id[i]) and not correct[i] for i in u.heldout)  # held out and unknown before
        assert all(by_id[i].lang != u.lang and not correct[i] for i in u.transfer)
    sets = {f.fact_id: {"matrice": pairs((2, 1), (2, 2)), "random": pairs((0, 4)), "amig": pairs()} for f in FACTS}
    cfg = InjectConfig(lrs={"default": [5e-2], "direct_ft": [1e-3, 5e-2]}, epochs=15, batch_size=8, lora_r=2)
    res = inject_knowledge(a, QUERIES, probes, sets, variants=("direct_ft", "matrice", "random", "amig", "lora"),
                           cfg=cfg, is_evaluation=held_out, progress=False)
    assert_same_state(a.model, saved)
    base = res.runs["base"]["None"]
    assert base["heldout"] == 0.0 and base["transfer"] in (None, 0.0) and base["old"] in (None, 1.0)  # by construction
    assert set(res.runs["direct_ft"]) == {"0.001", "0.05"} and res.selected["direct_ft"] in (1e-3, 5e-2)
    assert res.runs["amig"]["0.05"]["n_trainable"] == 0  # empty union: nothing to train
    assert res.runs["matrice"]["0.05"]["n_neurons"] == 2 and res.runs["random"]["0.05"]["n_neurons"] == 1
    assert res.runs["direct_ft"]["0.05"]["trained"] > 0.5  # full fine-tuning memorises its training queries
    trained_ids = {i for u in units for i in u.train}
    assert not any(r.query_id in trained_ids for r in res.records if r.split in ("heldout", "transfer", "old"))
    assert {r.split for r in res.records} >= {"trained", "heldout"}
    assert set(json.loads(json.dumps(res.to_dict()))["runs"]) == {"base", "direct_ft", "matrice", "random", "amig", "lora"}


def test_inject_missing_fact_fails_before_training():
    a = tiny_adapter("gpt2")
    probes = probe(a, QUERIES)
    with pytest.raises(MissingNeuronSetError):  # the injected facts have no "matrice" set
        inject_knowledge(a, QUERIES, probes, {f.fact_id: {"random": pairs()} for f in FACTS}, variants=("matrice",),
                         is_evaluation=lambda q: q.template_id >= 1, progress=False)


def test_inject_units_come_from_attributed_facts_and_q_old_from_the_others():
    a = tiny_adapter("gpt2")
    probes = [{"query_id": q.query_id, "fact_id": q.fact_id, "relation": q.relation, "lang": q.lang, "prob": 0.5,
               "rank": 0, "correct": q.fact_id in ("f3", "f4") or q.template_id == 0} for q in QUERIES]
    res = inject_knowledge(a, QUERIES, probes, {"f1": {"matrice": pairs((2, 1))}, "f2": {"matrice": pairs((2, 2))}},
                           variants=("matrice",), cfg=InjectConfig(lrs={"default": [1e-3]}, epochs=1),
                           is_evaluation=lambda q: q.template_id >= 1, progress=False)
    assert {u["fact_id"] for u in res.units} == {"f1", "f2"}
    assert {r.fact_id for r in res.records if r.split == "old"} == {"f3", "f4"}


# ---- case study ---------------------------------------------------------------------------------

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
    assert got == pytest.approx({r.query_id: r.delta_p for r in direct})


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


# ---- the update λ sweep -------------------------------------------------------------------------

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
