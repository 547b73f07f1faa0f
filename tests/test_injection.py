"""New-knowledge injection (Table V): masked fine-tuning touches only the neurons' parameters, the loss on
answer positions, LoRA's targets, units and Q_old."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import across_shapes
from conftest import tiny_on_device as tiny_adapter
from implant import FACTS, QUERIES, pairs, state, assert_same_state, probe
from matrice.experiments import MissingNeuronSetError
from matrice.experiments.inject import InjectConfig, inject_knowledge, train_variant
from matrice.finetune import (answer_loss, answer_loss_reference, check_masked_update, neuron_param_masks,
                              packs_sequences)
from matrice.models.encoding import encode_query
from matrice.models.tiny import TINY_FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


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
    """The training loss runs the LM head on the answer positions only, the batch packed into one row
    where the family allows it; the obvious loss (every position's logits, one unpadded query at a
    time) is the same number, gradients included."""
    a = tiny_adapter(family)
    assert packs_sequences(a) == (family in ("gpt2", "llama", "qwen2", "gemma3"))  # the tiny gemma3's window is 4: packed masks keep it
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


def test_packing_is_checked_once_and_off_where_masks_would_let_sequences_meet(monkeypatch):
    """A transformers whose masks ignored the position ids would let packed sequences attend to each
    other: the once-per-model check sees it, and training pads (the loss still equals the reference)."""
    import transformers.masking_utils as masking

    assert packs_sequences(tiny_adapter("llama"))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # one causal mask
    a = tiny_adapter("llama", seed=3)  # a new model: checked anew
    assert not packs_sequences(a)
    encs = [encode_query(a, q) for q in QUERIES if q.lang in ("en", "fi")]
    torch.testing.assert_close(answer_loss(a, a.model, encs), answer_loss_reference(a.model, a, encs),
                               **across_shapes(1e-5, 1e-5))


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
    cfg = InjectConfig(lrs={"default": [5e-2], "direct_ft": [1e-3, 5e-2]}, epochs=15, batch_size=8, lora_r=2,
                       seeds=(0,), lr_extend=0)
    res = inject_knowledge(a, QUERIES, probes, sets, variants=("direct_ft", "matrice", "random", "amig", "lora"),
                           cfg=cfg, is_evaluation=held_out, progress=False)
    assert_same_state(a.model, saved)
    base = res.runs["base"]["None"]
    assert base["heldout"] == 0.0 and base["transfer"] in (None, 0.0) and base["old"] in (None, 1.0)  # by construction
    assert set(res.runs["direct_ft"]) == {"0.001", "0.05"} and res.selected["direct_ft"] in (1e-3, 5e-2)
    assert res.runs["amig"]["0.05"]["n_trainable"] == 0  # empty union: nothing to train
    assert res.runs["matrice"]["0.05"]["n_neurons"] == 2 and res.runs["random"]["0.05"]["n_neurons"] == 2  # size-matched
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
    assert {r.fact_id for r in res.records if r.split in ("old", "old_select")} == {"f3", "f4"}


# ---- Table V's design: the rate grid, the seeds, Q_old's split, Random_FT's size ----------------------------

class _FakeRuns:
    """Stands in for the trained runs: accuracy on each split is a given function of the rate."""

    def __init__(self, trained, old_select, old=lambda lr: 0.0):
        self.acc = {"trained": trained, "old_select": old_select, "old": old, "heldout": old}
        self.calls: list[tuple[float, int]] = []

    def run(self, variant, lr, seed):
        from matrice.experiments.inject.training import InjectionRecord
        self.calls.append((lr, seed))
        records = [InjectionRecord(variant, lr, split, f"F{i}", "en", f"{split}{i}", i < round(10 * f(lr)), seed)
                   for split, f in self.acc.items() for i in range(10)]
        return {"n_trainable": 1, "n_neurons": 1, "losses": [], "lr": lr}, records


def test_the_rate_grid_grows_until_the_best_rate_is_interior():
    from matrice.experiments.inject.training import sweep_variant

    peak = lambda lr: max(0.0, 1 - abs(__import__("math").log10(lr) - (-5)) / 4)  # best at 1e-5
    runs = _FakeRuns(trained=peak, old_select=peak)
    cfg = InjectConfig(lrs={"default": [1e-3, 1e-2]}, seeds=(0, 1, 2), lr_extend=3)
    best, at_edge, done = sweep_variant(runs, "matrice", cfg)
    assert best == 1e-5 and not at_edge  # grown 1e-4, 1e-5, 1e-6: the best is interior
    assert {lr for lr, _ in done} == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2}
    assert sorted(seed for lr, seed in done if lr == best) == [0, 1, 2]  # every seed at the selected rate only
    assert all(seed == 0 for lr, seed in done if lr != best)
    best, at_edge, _ = sweep_variant(_FakeRuns(peak, peak), "matrice", InjectConfig(lrs={"default": [1e-3, 1e-2]},
                                                                                 lr_extend=1, seeds=(0,)))
    assert best == 1e-4 and at_edge  # the budget ran out at an end: recorded


def test_rate_selection_never_sees_the_evaluated_q_old():
    from matrice.experiments.inject.training import sweep_variant

    cfg = InjectConfig(lrs={"default": [1e-3, 3e-3, 1e-2]}, seeds=(0,), lr_extend=0)
    picks = {sweep_variant(_FakeRuns(lambda lr: 0.5, lambda lr: 1.0 if lr == 3e-3 else 0.2, old), "m", cfg)[0]
             for old in (lambda lr: 0.0, lambda lr: 1.0 if lr == 1e-2 else 0.0, lambda lr: lr * 50)}
    assert picks == {3e-3}  # whatever the evaluated Q_old says


def test_q_old_split_is_by_fact_and_both_halves_are_evaluated_separately():
    from matrice.experiments.inject.training import split_q_old

    a = tiny_adapter("gpt2")
    probes = [{"query_id": q.query_id, "fact_id": q.fact_id, "relation": q.relation, "lang": q.lang, "prob": 0.5,
               "rank": 0, "correct": q.fact_id in ("f3", "f4") or q.template_id == 0} for q in QUERIES]
    chooser, evaluated = split_q_old([q for q in QUERIES if q.fact_id in ("f3", "f4")], seed=0)
    assert chooser and evaluated and not {q.fact_id for q in chooser} & {q.fact_id for q in evaluated}
    res = inject_knowledge(a, QUERIES, probes, {"f1": {"matrice": pairs((2, 1))}, "f2": {"matrice": pairs((2, 2))}},
                           variants=("matrice",), cfg=InjectConfig(lrs={"default": [1e-3]}, epochs=1, seeds=(0,)),
                           is_evaluation=lambda q: q.template_id >= 1, progress=False)
    old = {r.fact_id for r in res.records if r.split == "old"}
    chosen_on = {r.fact_id for r in res.records if r.split == "old_select"}
    assert old and chosen_on and not old & chosen_on and old | chosen_on == {"f3", "f4"}
    assert res.n_old and res.n_old_select


def test_random_ft_has_matrice_fts_count_in_every_layer_drawn_per_seed():
    from collections import Counter
    from matrice.experiments.inject.training import _Runs

    a = tiny_adapter("llama")
    matrice = pairs((0, 1), (2, 1), (2, 5), (3, 0), (3, 2), (3, 7))
    runs = _Runs(a, InjectConfig(), {}, [], [], {"matrice": matrice, "random": pairs((1, 1))}, None, False)
    draws = [runs.neurons("random", seed) for seed in (0, 1, 2)]
    for d in draws:
        assert Counter(d[:, 0].tolist()) == Counter(matrice[:, 0].tolist())  # per layer, not only in total
        assert len({tuple(p) for p in d.tolist()}) == len(d)
    assert len({d.tobytes() for d in draws}) == 3  # a fresh draw per seed
    assert runs.neurons("matrice", 0) is matrice


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_neuron_masked_lora_moves_nothing_outside_the_neurons_rows_and_columns(family):
    a = tiny_adapter(family)
    saved = state(a.model)
    ps = pairs((0, 3), (2, 10), (2, 11))
    encs = [encode_query(a, q) for q in QUERIES if q.lang == "en"]
    trained, info = train_variant(a, "matrice_lora", ps, encs, InjectConfig(epochs=3, batch_size=4, lora_r=2), 1e-2,
                                  progress=False)
    assert_same_state(a.model, saved)  # the caller's model is untouched
    assert info["losses"][-1] < info["losses"][0] and info["n_neurons"] == 3
    masks = neuron_param_masks(a, ps)
    moved, targeted = set(), set()
    for name, module in trained.model.named_modules():
        if "default" not in getattr(module, "lora_A", {}):
            continue
        key = f"{name}.weight"
        assert key in masks, key  # LoRA only on the projections of the neurons' layers
        targeted.add(key)
        delta = module.get_delta_weight("default")
        assert delta.shape == masks[key].shape and not delta[~masks[key]].any(), key  # nothing outside the neurons
        if delta[masks[key]].any():
            moved.add(key)
    weights = {k for k in masks if k.endswith(".weight")}
    assert targeted == weights and moved == weights  # every neuron projection learned something


def test_inject_runs_a_neuron_masked_lora_variant_on_matrices_neurons():
    a = tiny_adapter("llama")
    probes = probe(a, QUERIES)
    sets = {f.fact_id: {"matrice": pairs((2, 1), (2, 2))} for f in FACTS}
    res = inject_knowledge(a, QUERIES, probes, sets, variants=("matrice_lora",),
                           cfg=InjectConfig(lrs={"default": [1e-2]}, epochs=2, lora_r=2, seeds=(0,)),
                           is_evaluation=lambda q: q.template_id >= 1, progress=False)
    run = res.runs["matrice_lora"]["0.01"]
    assert run["n_neurons"] == 2 and run["n_trainable"] > 0
