"""The Python API (`matrice.api`) is the pipeline's own code: the same maps, sets, effects and edits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHAPE_TOLERANCE, across_shapes, tiny_on_device as tiny_adapter
from implant import FACTS, IMPLANT, QUERIES, TEMPLATES, assert_same_state, state
import matrice.api as mx
from matrice.experiments.edit import EditConfig
from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import ShardJob, compute_shard
from matrice.models.encoding import encode_query

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait

FRANCE = mx.Fact("capital", FACTS[0].subject, FACTS[0].object, fact_id="f1")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_attribute_is_the_attribute_stages_map(family):
    a = tiny_adapter(family)
    qs = [q for q in QUERIES if q.fact_id == "f1"][:3]
    cfg = AttributionConfig(steps=2, batch_size=64)
    stage = compute_shard(a, ShardJob("s", "f1", [encode_query(a, q) for q in qs]), cfg).raw
    assert np.array_equal(mx.attribute(a, qs, cfg), stage)
    alone = mx.attribute(a, qs[1], cfg)  # a batch of one: on a GPU its GEMMs may take other kernels
    if SHAPE_TOLERANCE == 1.0:
        assert np.array_equal(alone, stage[1])
    else:
        scale = float(np.abs(stage[1]).max())
        torch.testing.assert_close(torch.from_numpy(alone), torch.from_numpy(stage[1]),
                                   **across_shapes(atol=1e-6 * scale, rtol=1e-6))


def test_queries_are_the_datasets_queries():
    built = mx.queries(FRANCE, TEMPLATES)
    assert [q.prompt for q in built] == [q.prompt for q in QUERIES if q.fact_id == "f1"]
    assert {q.query_id for q in built} == {q.query_id for q in QUERIES if q.fact_id == "f1"}
    with pytest.raises(ValueError, match="language"):
        mx.queries(FRANCE, {"de": ["[X] [Y]"]})


def test_locate_selects_with_the_stages_functions():
    from matrice.method.selection import select_fact
    from matrice.method.uncertainty import aggregate_fact

    a = tiny_adapter("llama")
    qs = mx.queries(FRANCE, TEMPLATES)
    cfg = AttributionConfig(steps=2, batch_size=64)
    neurons = mx.locate(a, qs, tau=0.3, attribution=cfg)
    raw = mx.attribute(a, qs, cfg)
    per_lang = {lang: raw[[i for i, q in enumerate(qs) if q.lang == lang]] for lang in TEMPLATES}
    from matrice.method.selection import SelectionConfig
    want = select_fact(aggregate_fact(per_lang), SelectionConfig(tau=0.3), "f1")
    assert np.array_equal(neurons.pairs, want["matrice"]) and len(neurons) > 0
    assert np.all(neurons.scores >= 0.3 * neurons.score_map.max() - 1e-12)
    assert set(neurons.others) >= {"amig", "random", "amig_k"}


def test_suppress_and_edit_act_on_the_implanted_neuron_and_edit_reverts(gpt2_implant):
    a, _ = gpt2_implant
    qs = [q for q in mx.queries(FRANCE, TEMPLATES) if q.lang == "en"]
    effects = mx.suppress(a, np.array([IMPLANT]), qs)
    assert effects and all(e.delta_p < -0.9 for e in effects)  # the implant carried " Paris"
    enhanced = mx.enhance(a, np.array([IMPLANT]), qs, factor=2.0)
    assert [e.query_id for e in enhanced] == [e.query_id for e in effects] and all(e.mode == "enhance" for e in enhanced)
    saved = state(a.model)
    assert mx.answers(a, qs[:1]) == ["Paris"]
    with mx.edit(a, np.array([IMPLANT]), qs[0], "Berlin", EditConfig(scaling="column_norm")) as edited:
        assert edited is a and mx.answers(a, qs[:1]) != ["Paris"]
    assert_same_state(a.model, saved)  # restored bit for bit
    with mx.edit(a, np.array([IMPLANT]), qs[0]):  # erasure
        assert mx.answers(a, qs[:1]) != ["Paris"]
    assert_same_state(a.model, saved)
    with pytest.raises(ValueError, match="same token"):
        with mx.edit(a, np.array([IMPLANT]), qs[0], "Paris"):
            pass


def test_load_takes_an_adapter_a_loaded_model_or_a_directory(tmp_path):
    a = tiny_adapter("gpt2")
    assert mx.load(a) is a
    assert mx.load((a.model, a.tokenizer)).model is a.model
    with pytest.raises(ValueError, match="tokenizer"):
        mx.load(a.model)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.save_pretrained(tmp_path)
    loaded = mx.load(str(tmp_path), device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.model(ids).logits, a.model.cpu()(ids).logits)


def test_the_quickstart_example_runs(gpt2_implant):
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    a, _ = gpt2_implant
    # the implant fires whatever the input, so only a zero baseline (not SAIG's token baselines) sees it
    out = example.run(a, FRANCE, TEMPLATES, demo=None, new_object="Berlin", tau=0.5,
                      edit_cfg=EditConfig(scaling="column_norm"), attribution=AttributionConfig(steps=4, baseline="zero"))
    assert tuple(IMPLANT) in {tuple(p) for p in out["neurons"].pairs.tolist()}  # it finds the implanted neuron
    assert out["before"] == out["after"] and out["before"][0] == "Paris"  # restored after the block
    assert all(d != b for d, b in zip(out["during"], out["before"]))  # edited in every language
