"""SAIG attribution: the fast engine equals the reference; both agree with captum and satisfy completeness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import default_text, encode_text
from matrice.attribution.common import (
    AttributionConfig,
    baseline_activations,
    baseline_inputs,
    step_points,
    target_activations,
)
from matrice.attribution.fast import fast_attribution
from matrice.attribution.reference import reference_attribution
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.tiny import TINY_FAMILIES, tiny_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

FEW_SHOT = "The capital of Italy is Rome.\nThe capital of France is"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


# ---- independent helpers: plain PyTorch hooks on the FFN output projection (no matrice hooks) ----------


class Patched(nn.Module):
    """P(y*) as a function of layer `layer`'s target-position neurons: input [n, N] -> output [n].

    Runs the model on the query with that vector replaced by the input, with a plain pre-hook."""

    def __init__(self, adapter: ModelAdapter, enc: Encoded, layer: int) -> None:
        super().__init__()
        self.adapter, self.enc, self.layer = adapter, enc, layer

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        n, target = values.shape[0], self.enc.target_pos

        def hook(module, args):
            x = args[0].clone()
            x[:, target] = values.to(x.dtype)
            return (x, *args[1:])

        handle = self.adapter.out_proj(self.layer).register_forward_pre_hook(hook)
        try:
            ids = torch.tensor([self.enc.input_ids]).expand(n, -1)
            logits = self.adapter.model(input_ids=ids).logits[:, target]
        finally:
            handle.remove()
        return torch.softmax(logits.double(), dim=-1)[:, self.enc.answer_ids[0]]


def plain_activation(adapter: ModelAdapter, input_ids: list[int], target: int, layer: int) -> torch.Tensor:
    """The out_proj input at `target` for one sentence, read with a plain forward pre-hook."""
    seen = {}
    handle = adapter.out_proj(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0, target]))
    try:
        with torch.no_grad():
            adapter.model(input_ids=torch.tensor([input_ids]))
    finally:
        handle.remove()
    return seen["x"].clone()


# ---- fast == reference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["saig", "amig", "zero"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_reference(tiny, family, baseline):
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    cfg = AttributionConfig(steps=3, baseline=baseline, batch_size=64)
    ref = reference_attribution(adapter, enc, cfg)
    fast = fast_attribution(adapter, enc, cfg)
    n_base = len(enc.baseline_positions) if baseline == "saig" else 1
    assert ref.shape == fast.shape == (n_base, adapter.n_layers, adapter.n_neurons)
    assert ref.dtype == fast.dtype == torch.float32
    assert ref.abs().max() > 0 and (ref != 0).float().mean() > 0.5
    assert rel_err(fast, ref) <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_reference_chunked_and_layer_subset(tiny, family):
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    full = reference_attribution(adapter, enc, AttributionConfig(steps=3, baseline="saig"))
    # 3 steps x B baselines rows in chunks of 2 (an odd remainder included), one layer only
    cfg = AttributionConfig(steps=3, baseline="saig", batch_size=2)
    fast = fast_attribution(adapter, enc, cfg, layers=[1])
    assert (fast[:, [0, 2]] == 0).all()
    assert rel_err(fast[:, 1], full[:, 1]) <= 1e-4
    ref = reference_attribution(adapter, enc, cfg, layers=[2, 0])
    assert (ref[:, 1] == 0).all()
    torch.testing.assert_close(ref[:, [0, 2]], full[:, [0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "bloom"])
def test_fast_equals_reference_long_context_few_shot(tiny, family):
    """Context longer than gemma3's sliding window (4); baselines only on the query after the prefix."""
    adapter = tiny(family)
    enc = encode_text(adapter, FEW_SHOT)
    n_query = len(adapter.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"])
    enc = Encoded(enc.input_ids, enc.target_pos, enc.answer_ids, enc.baseline_positions[-n_query:])
    assert len(enc.input_ids) > 4 * adapter.n_layers
    cfg = AttributionConfig(steps=2, baseline="saig", batch_size=5)
    ref = reference_attribution(adapter, enc, cfg)
    assert ref.shape[0] == n_query
    assert rel_err(fast_attribution(adapter, enc, cfg), ref) <= 1e-4


def test_engines_leave_the_model_as_they_found_it(tiny):
    for family in ("llama", "bert"):
        adapter = tiny(family)
        enc = encode_text(adapter, default_text(adapter))
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            before = adapter.model(input_ids=ids).logits
        fast_attribution(adapter, enc, AttributionConfig(steps=2))
        reference_attribution(adapter, enc, AttributionConfig(steps=1), layers=[0])
        for module in adapter.model.modules():
            assert not module._forward_pre_hooks and not module._forward_hooks
            assert "forward" not in vars(module)  # no replayed block left behind
        assert not any(p.requires_grad for p in adapter.model.parameters())
        with torch.no_grad():
            assert torch.equal(adapter.model(input_ids=ids).logits, before)


def test_causal_fast_engine_needs_the_target_last(tiny):
    adapter = tiny("llama")
    enc = encode_text(adapter, default_text(adapter))
    shifted = Encoded(enc.input_ids, enc.target_pos - 1, enc.answer_ids, enc.baseline_positions)
    with pytest.raises(ValueError, match="last token"):
        fast_attribution(adapter, shifted, AttributionConfig(steps=1))


def test_saig_needs_baseline_positions(tiny):
    adapter = tiny("llama")
    enc = encode_text(adapter, default_text(adapter))
    empty = Encoded(enc.input_ids, enc.target_pos, enc.answer_ids, [])
    with pytest.raises(ValueError, match="baselines"):
        fast_attribution(adapter, empty, AttributionConfig(steps=1))


# ---- baselines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "xlm-roberta"])
def test_baseline_sentences_and_activations(tiny, family):
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    pad = adapter.baseline_token_id
    original = torch.tensor(enc.input_ids)
    saig = baseline_inputs(adapter, enc, "saig")
    assert saig.shape == (len(enc.baseline_positions), len(enc.input_ids))
    for row, pos in zip(saig, enc.baseline_positions):
        changed = (row != original).nonzero().flatten().tolist()
        assert changed == [pos] and row[pos] == pad
    amig = baseline_inputs(adapter, enc, "amig")
    assert amig.shape == (1, len(enc.input_ids))
    assert (amig[0, enc.baseline_positions] == pad).all()
    keep = [p for p in range(len(enc.input_ids)) if p not in enc.baseline_positions]
    assert torch.equal(amig[0, keep], original[keep])
    # w' of each baseline sentence, every layer, read at the target position
    w_orig = target_activations(adapter, original[None], enc.target_pos)[0]
    w_base = baseline_activations(adapter, enc, "saig", w_orig)
    for i in (0, len(enc.baseline_positions) - 1):
        for layer in range(adapter.n_layers):
            plain = plain_activation(adapter, saig[i].tolist(), enc.target_pos, layer)
            torch.testing.assert_close(w_base[i, layer], plain, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(w_base[i], w_orig)
    assert torch.equal(baseline_activations(adapter, enc, "zero", w_orig), torch.zeros(1, *w_orig.shape))


def test_step_points_are_right_riemann():
    base, orig = torch.tensor([[0.0, 2.0]]), torch.tensor([4.0, 2.0])
    points = step_points(base, orig, 4)
    assert points.shape == (1, 4, 2)
    torch.testing.assert_close(points[0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(points[0, :, 1], torch.full((4,), 2.0))


# ---- independent cross-check with captum ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "bloom", "bert"])
def test_reference_matches_captum_integrated_gradients(tiny, family):
    captum_attr = pytest.importorskip("captum.attr")
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    steps, layer, i = 5, 1, 2
    w_orig = plain_activation(adapter, enc.input_ids, enc.target_pos, layer)
    baseline_ids = list(enc.input_ids)
    baseline_ids[enc.baseline_positions[i]] = adapter.baseline_token_id
    w_base = plain_activation(adapter, baseline_ids, enc.target_pos, layer)
    ig = captum_attr.IntegratedGradients(Patched(adapter, enc, layer))

    def captum(base: torch.Tensor) -> torch.Tensor:
        out = ig.attribute(w_orig[None].double(), baselines=base[None].double(), n_steps=steps, method="riemann_right")
        return out[0].float()

    saig = reference_attribution(adapter, enc, AttributionConfig(steps=steps, baseline="saig"), layers=[layer])
    expected = captum(w_base)
    assert expected.abs().max() > 0
    assert rel_err(saig[i, layer], expected) <= 1e-5
    zero = reference_attribution(adapter, enc, AttributionConfig(steps=steps, baseline="zero"), layers=[layer])
    assert rel_err(zero[0, layer], captum(torch.zeros_like(w_orig))) <= 1e-5


# ---- completeness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, baseline", [("llama", "saig"), ("bloom", "saig"), ("xlm-roberta", "saig"), ("bloom", "zero"), ("bert", "zero")]
)
def test_completeness_improves_with_steps(tiny, family, baseline):
    """sum_j Attr_i(n_j^l) -> P(w̄) - P(w'_i patched at layer l) as the number of steps grows.

    (Not for Gemma from a zero baseline: its post-FFN RMSNorm makes P jump at 0; see METHOD.md §1.)"""
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    w_orig = target_activations(adapter, torch.tensor([enc.input_ids]), enc.target_pos)[0]
    w_base = baseline_activations(adapter, enc, baseline, w_orig)
    delta = torch.zeros(w_base.shape[:2], dtype=torch.float64)
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            patched = Patched(adapter, enc, layer)
            p_orig = patched(w_orig[layer][None])[0]
            delta[:, layer] = p_orig - patched(w_base[:, layer])
    assert delta.abs().max() > 1e-5
    errors = []
    for steps in (2, 32):
        attr = fast_attribution(adapter, enc, AttributionConfig(steps=steps, baseline=baseline))
        errors.append(float((attr.sum(dim=-1).double() - delta).abs().max()))
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.1 * float(delta.abs().max())


# ---- reduced precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bfloat16_fast_engine_close_to_float32(tiny, family):
    adapter32 = tiny(family)
    adapter16 = tiny_adapter(family)
    adapter16.model.to(torch.bfloat16)
    assert adapter16.dtype == torch.bfloat16
    enc = encode_text(adapter32, default_text(adapter32))
    cfg = AttributionConfig(steps=3, baseline="saig")
    a32 = fast_attribution(adapter32, enc, cfg)
    a16 = fast_attribution(adapter16, enc, cfg)
    assert a16.dtype == torch.float32 and a16.shape == a32.shape
    assert torch.isfinite(a16).all()
    corr = torch.corrcoef(torch.stack([a16.flatten(), a32.flatten()]).double())[0, 1]
    assert corr > 0.99
    assert rel_err(a16, a32) < 0.25


# ---- configuration -----------------------------------------------------------------------------------------


def test_attribution_config_validation():
    assert AttributionConfig().steps == 10 and AttributionConfig().baseline == "saig"
    for bad in (0, -1, 2.5, "10"):
        with pytest.raises(ValueError, match="steps"):
            AttributionConfig(steps=bad)
    with pytest.raises(ValueError, match="baseline"):
        AttributionConfig(baseline="ig")
    with pytest.raises(ValueError, match="batch_size"):
        AttributionConfig(batch_size=0)
