"""The result memo: keys cover what determines a result, and a memoized injection equals a fresh one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import matrice.experiments.inject.training as inject_module
from matrice.experiments.inject import InjectConfig, inject_knowledge
from matrice.memo import Memo, code_fingerprint, model_digest
from conftest import tiny_on_device as tiny_adapter  # on MATRICE_TEST_DEVICE
from implant import FACTS, QUERIES, pairs, probe

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_keys_change_with_every_input(tmp_path):
    memo = Memo(tmp_path, "salt")
    base = memo.key(variant="matrice", lr=1e-3, neurons=pairs((2, 1)))
    assert base == memo.key(lr=1e-3, neurons=np.array([[2, 1]]), variant="matrice")  # order and array type
    assert base != memo.key(variant="matrice", lr=1e-3, neurons=pairs((2, 2)))
    assert base != memo.key(variant="matrice", lr=3e-3, neurons=pairs((2, 1)))
    assert base != Memo(tmp_path, "other salt").key(variant="matrice", lr=1e-3, neurons=pairs((2, 1)))
    with pytest.raises(TypeError):
        memo.key(bad=object())


def test_model_digest_sees_one_changed_weight_and_code_fingerprint_is_stable():
    a = tiny_adapter("gpt2")
    before = model_digest(a.model)
    assert before == model_digest(a.model)
    with torch.no_grad():
        a.layers[1].mlp.c_proj.weight[3, 2] += 1e-6
    assert model_digest(a.model) != before
    assert code_fingerprint() == code_fingerprint() and len(code_fingerprint()) == 64


def test_unreadable_entry_is_recomputed(tmp_path):
    memo = Memo(tmp_path, "s")
    key = memo.key(x=1)
    (tmp_path / f"{key}.json").write_text("{truncated")
    assert memo.load(key) is None
    memo.store(key, {"v": [1.5, True]})
    assert memo.load(key) == {"v": [1.5, True]}


SETS = {f.fact_id: {"matrice": pairs((2, 1), (2, 2)), "random": pairs((0, 4)), "amig": pairs((1, 3))} for f in FACTS}
CFG = InjectConfig(lrs={"default": [5e-2], "direct_ft": [1e-3]}, epochs=2, batch_size=8, lora_r=2, seeds=(0,),
                   lr_extend=0)


def _inject(adapter, probes, sets, variants, memo=None):
    return inject_knowledge(adapter, QUERIES, probes, sets, variants=variants, cfg=CFG,
                            is_evaluation=lambda q: q.template_id >= 1, progress=False, memo=memo)


def _counting_training(monkeypatch) -> list[str]:
    trained: list[str] = []
    real = inject_module.train_variant

    def counted(adapter, variant, *args, **kwargs):
        trained.append(variant)
        return real(adapter, variant, *args, **kwargs)

    monkeypatch.setattr(inject_module, "train_variant", counted)
    return trained


def test_memoized_injection_equals_a_fresh_one_and_retrains_only_what_changed(tmp_path, monkeypatch):
    a = tiny_adapter("gpt2")
    probes = probe(a, QUERIES)
    variants = ("direct_ft", "matrice", "random", "amig", "lora")
    fresh = json.dumps(_inject(a, probes, SETS, variants).to_dict(), sort_keys=True)
    memo = Memo.for_model(tmp_path, a.model)
    trained = _counting_training(monkeypatch)
    assert json.dumps(_inject(a, probes, SETS, variants, memo).to_dict(), sort_keys=True) == fresh
    assert sorted(trained) == sorted(variants)
    trained.clear()
    assert json.dumps(_inject(a, probes, SETS, variants, memo).to_dict(), sort_keys=True) == fresh  # all read back
    assert trained == []
    changed = {fid: {**per, "matrice": pairs((2, 1))} for fid, per in SETS.items()}  # a sweep moved MATRICE's set
    again = _inject(a, probes, changed, variants, memo)
    assert sorted(trained) == ["matrice", "random"]  # Random_FT is drawn layer by layer to MATRICE_FT's size: it follows
    assert again.runs["matrice"]["0.05"]["n_neurons"] == 1 == again.runs["random"]["0.05"]["n_neurons"]
    assert again.runs["lora"] == json.loads(fresh)["runs"]["lora"]


def test_a_lora_run_does_not_depend_on_the_runs_before_it():
    a = tiny_adapter("llama")
    probes = probe(a, QUERIES)
    alone = _inject(a, probes, SETS, ("lora",))
    after = _inject(a, probes, SETS, ("direct_ft", "matrice", "lora"))
    assert alone.runs["lora"] == after.runs["lora"]
    assert [r for r in alone.records if r.variant == "lora"] == [r for r in after.records if r.variant == "lora"]
