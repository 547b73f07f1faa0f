"""Models spread over devices (`models.<key>.device_map`, accelerate): the engine, the neuron hooks,
predictions and weight edits give the numbers of the same model on one device, and leave
accelerate's device hooks in place.

On a CPU-only machine the split is cpu/cpu with accelerate's hooks forced on every block (what
`device_map` adds), which tests that nothing drops or bypasses them; with `MATRICE_TEST_DEVICE=cuda`
the blocks are really split, cpu/cuda on one GPU or cuda:0/cuda:1 on two, so every tensor that
crosses a block boundary must be moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE, across_shapes, encode_text, default_text, tiny_on_device
from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.fast import fast_attribution_many
from matrice.method.attribution.reference import reference_attribution
from matrice.experiments.edit.passes import EditedPasses, erasure_edit, update_edit
from matrice.interventions import edited_output_weights, update_vectors
from matrice.models.adapter import ModelAdapter
from matrice.models.hooks import neuron_edits, neuron_hooks
from matrice.models.loading import ModelConfig, check_not_offloaded, load_adapter, load_skeleton
from matrice.models.predict import decode_and_score, score_answers, score_answers_many
from matrice.models.tiny import TINY_FAMILIES, tiny_adapter

accelerate = pytest.importorskip("accelerate")
# Scale of the allowed difference, relative to the largest attribution: a cpu/cpu split repeats the
# same kernels; cpu/cuda halves sum in other orders (elements near zero then differ by ~1e-6 of it).
SPLIT_ATOL = 1e-7 if TEST_DEVICE.type == "cpu" else 1e-5
pytestmark = pytest.mark.usefixtures("single_thread")


def split_devices() -> tuple[str, str]:
    """Two devices to split over: two GPUs, cpu and a GPU, or (no GPU) cpu twice."""
    if TEST_DEVICE.type == "cuda":
        return ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cpu", "cuda:0")
    return ("cpu", "cpu")


def device_map_of(adapter: ModelAdapter, devices: tuple[str, str]) -> dict[str, str]:
    """As accelerate's sequential placement would do: what comes before the blocks on the first
    device, the blocks split in order, what comes after on the last; modules that share a tensor (the
    LM head of GPT-2 and Gemma is the embedding; BERT's decoder bias is its head's bias) are placed
    together, where the first of them is, as accelerate keeps tied parameters together."""
    model = adapter.model
    prefix = next(name for name, m in model.named_modules() if m is adapter.layers)
    n, placement, after = adapter.n_layers, {}, False
    tied_to: dict[str, str] = {}  # module -> a module it shares a tensor with, placed before it
    owner: dict[int, str] = {}  # tensor -> the first module seen holding it

    def root(module: str) -> str:
        while tied_to.get(module, module) != module:
            module = tied_to[module]
        return module

    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        module = name.rsplit(".", 1)[0]
        if name.startswith(prefix + "."):
            block = int(name[len(prefix) + 1 :].split(".")[0])
            placement[f"{prefix}.{block}"] = devices[block * len(devices) // n]
            after = block == n - 1 or after
            continue
        placement.setdefault(module, devices[-1] if after else devices[0])
        roots = sorted({root(owner.setdefault(id(tensor), module)), root(module)}, key=list(placement).index)
        tied_to[roots[-1]] = roots[0]  # the later-placed group joins the earlier one
    return {m: placement[root(m)] for m in placement}


def dispatched(family: str, devices: tuple[str, str] | None = None) -> ModelAdapter:
    """A fresh tiny adapter of `family` spread over two devices with accelerate's hooks."""
    adapter = tiny_adapter(family)
    model = adapter.model
    placement = device_map_of(adapter, devices or split_devices())
    accelerate.dispatch_model(model, placement, main_device=placement[next(iter(placement))], force_hooks=True,
                              skip_keys=getattr(model, "_skip_keys_device_placement", None))
    return adapter


def device_hooks(adapter: ModelAdapter) -> dict[str, object]:
    """Every module's instance-level forward (accelerate's hook wrappers), by module name."""
    return {name: vars(m)["forward"] for name, m in adapter.model.named_modules() if "forward" in vars(m)}


@pytest.fixture(scope="module")
def pairs():
    """family -> (the tiny model on the test device, the same weights spread over two devices)."""
    cache: dict[str, tuple[ModelAdapter, ModelAdapter]] = {}

    def get(family: str) -> tuple[ModelAdapter, ModelAdapter]:
        if family not in cache:
            cache[family] = (tiny_on_device(family), dispatched(family))
        return cache[family]

    return get


def test_the_split_really_uses_both_devices_and_hooks_every_block():
    adapter = dispatched("llama", ("cpu", "cpu"))
    hooks = device_hooks(adapter)
    assert all(hasattr(block, "_hf_hook") for block in adapter.layers)
    assert {f"model.layers.{i}" for i in range(adapter.n_layers)} <= set(hooks)
    placement = device_map_of(adapter, ("first", "last"))
    assert placement["model.layers.0"] == "first" and placement[f"model.layers.{adapter.n_layers - 1}"] == "last"
    assert placement["model.embed_tokens"] == "first" and placement["model.norm"] == "last"
    tied = device_map_of(tiny_adapter("gemma3"), ("first", "last"))
    assert tied["model.norm"] == "last" and tied["lm_head"] == "first"  # the head is the embedding


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_split_model_attribution_equals_one_device(pairs, family):
    single, split = pairs(family)
    cfg = AttributionConfig(steps=3, batch_size=7)
    texts = [default_text(single), "Berlin is the capital of" if single.causal else "Berlin is the capital of[Y]."]
    encs = [encode_text(single, t) for t in texts]
    hooks = device_hooks(split)
    expected = list(fast_attribution_many(single, encs, cfg))
    got = list(fast_attribution_many(split, encs, cfg))
    assert device_hooks(split) == hooks, "the engine dropped or replaced accelerate's device hooks"
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=across_shapes(0, 1e-5)["rtol"], atol=SPLIT_ATOL * float(e.abs().max()))
    reference = reference_attribution(split, encs[0], cfg, layers=[1])
    torch.testing.assert_close(got[0][:, 1], reference[:, 1], rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_split_model_predictions_and_edits_equal_one_device(pairs, family):
    single, split = pairs(family)
    encs = [encode_text(single, default_text(single)), encode_text(single, default_text(single), " Rome")]
    edits = neuron_edits([(0, 1), (single.n_layers - 1, 3)], 0.0)
    hooks = device_hooks(split)
    for adapter_scores in (score_answers, lambda a, e: score_answers(a, e, edits)):
        expected, got = adapter_scores(single, encs), adapter_scores(split, encs)
        assert [s.prob for s in got] == pytest.approx([s.prob for s in expected], rel=1e-5)
    many = score_answers_many(split, encs, [None, edits])
    assert [s.prob for s in many[1]] == pytest.approx([s.prob for s in score_answers(single, encs, edits)], rel=1e-5)
    decoded, expected = decode_and_score(split, encs, edits), decode_and_score(single, encs, edits)
    assert [g for g, _ in decoded] == [g for g, _ in expected]
    with neuron_hooks(split, torch.tensor([encs[0].target_pos]), capture=list(range(split.n_layers))) as got:
        split.model(input_ids=torch.tensor([encs[0].input_ids], device=split.device))
    assert {t.device for t in got.values()} == {split.device}
    neurons = [(single.n_layers - 1, 2)]
    for adapter in (single, split):
        with edited_output_weights(adapter, update_vectors(adapter, neurons, encs[0].answer_ids[0], encs[1].answer_ids[0])):
            adapter.edited = score_answers(adapter, encs)  # type: ignore[attr-defined]
    assert [s.prob for s in split.edited] == pytest.approx([s.prob for s in single.edited], rel=1e-5)
    # several edits per forward (per-row weight edits, the blocks below replayed) on the split model
    want = EditedPasses(single, batch_size=2, memo=None, kind="t").run(encs, _two_edits(single, encs))[1]
    got = EditedPasses(split, batch_size=2, memo=None, kind="t", edits_per_pass=2).run(encs, _two_edits(split, encs))[1]
    for name in want:
        assert [s.prob for s in got[name]] == pytest.approx([s.prob for s in want[name]], rel=1e-5), name
    assert device_hooks(split) == hooks


def _two_edits(adapter: ModelAdapter, encs) -> dict:
    """An erasure and an update (lowest layers 1 and the top one), built from ``adapter``'s weights."""
    top = adapter.n_layers - 1
    return {"erase": erasure_edit(adapter, np.array([[top, 3], [1, 2]])),
            "update": update_edit(adapter, np.array([[top, 2]]), encs[0].answer_ids[0], encs[1].answer_ids[0], 1.0, 1.0, "raw")}


def test_load_adapter_with_a_device_map_equals_plain_loading(tmp_path):
    source = tiny_adapter("llama")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    plain = load_adapter(str(tmp_path))
    mapped = load_adapter(str(tmp_path), device_map="auto")
    assert mapped.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    enc = encode_text(plain, default_text(plain))
    assert score_answers(mapped, [enc])[0].prob == pytest.approx(score_answers(plain, [enc])[0].prob, rel=1e-6)


def test_skeleton_has_the_shapes_and_tokenizer_but_no_weights(tmp_path):
    source = tiny_adapter("bert")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    skeleton = load_skeleton(str(tmp_path))
    assert skeleton.device.type == "meta"
    assert (skeleton.n_layers, skeleton.n_neurons, skeleton.causal) == (source.n_layers, source.n_neurons, False)
    assert encode_text(skeleton, default_text(skeleton)) == encode_text(source, default_text(source))


def test_an_offloaded_model_is_refused_with_the_modules_named():
    adapter = tiny_adapter("gpt2")
    adapter.out_proj(1).to("meta")
    with pytest.raises(ValueError, match=r"offloaded transformer\.h\.1\.mlp\.c_proj\.weight.*more devices"):
        check_not_offloaded(adapter.model, "auto")
    check_not_offloaded(tiny_adapter("gpt2").model)


def test_device_map_config_validation():
    assert ModelConfig("m", "x", device_map="auto").device_map == "auto"
    assert ModelConfig("m", "x", device_map={"model.layers.0": 0}).device_map == {"model.layers.0": 0}
    with pytest.raises(ValueError, match=r"models\.m\.device_map must be one of"):
        ModelConfig("m", "x", device_map="everywhere")
    with pytest.raises(ValueError, match="either device .* or device_map"):
        ModelConfig("m", "x", device="cuda", device_map="auto")
    with pytest.raises(ValueError, match="at least one module"):
        ModelConfig("m", "x", device_map={})
    with pytest.raises(ValueError, match="device_map must be one of"):
        load_adapter("does/not-matter", device_map="everywhere")
