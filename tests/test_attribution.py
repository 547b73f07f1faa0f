"""SAIG attribution: the fast engine equals the reference; both agree with captum and satisfy completeness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import across_shapes, default_text, encode_text, tiny_on_device
from matrice.method.attribution.common import (
    AttributionConfig,
    baseline_activations,
    baseline_inputs,
    quadrature,
    step_points,
    target_activations,
)
from matrice.method.attribution.fast import fast_attribution, fast_attribution_many
from matrice.method.attribution.head import autograd_answer_probability, fused_answer_probability
from matrice.models.head import LinearHead, answer_probabilities, head_input, linear_head
from matrice.method.attribution.peer import peer_attribution
from matrice.method.attribution.reference import reference_attribution
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.tiny import TINY_FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")

FEW_SHOT = "The capital of Italy is Rome.\nThe capital of France is"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach() - ref.detach()).abs().max() / ref.detach().abs().max())


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
            ids = torch.tensor([self.enc.input_ids], device=self.adapter.device).expand(n, -1)
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
            adapter.model(input_ids=torch.tensor([input_ids], device=adapter.device))
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


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "bert"])
def test_peer_style_engine_equals_reference(tiny, family):
    """The benchmark's second comparison computes the same scores."""
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    cfg = AttributionConfig(steps=3, baseline="saig")
    assert rel_err(peer_attribution(adapter, enc, cfg), reference_attribution(adapter, enc, cfg)) <= 1e-4


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


@pytest.mark.parametrize("baseline", ["saig", "amig"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cross_query_batches_equal_reference(tiny, family, baseline):
    """Rows of queries of different lengths and answers share batches (a batch boundary falls inside
    a query, a batch holds the tail of one query and the head of the next): each query's scores are
    still its own reference scores, in order."""
    adapter = tiny(family)
    texts = ["The capital of France is", "Helsinki is the capital of", "Tokyo"]
    if not adapter.causal:
        texts = [t + "[Y]." for t in texts]
    encs = [encode_text(adapter, t, a) for t, a in zip(texts, (" Paris", " Europe", " Asia"))]
    cfg = AttributionConfig(steps=2, baseline=baseline, batch_size=7)
    got = list(fast_attribution_many(adapter, encs, cfg))
    assert len(got) == len(encs)
    for enc, attr in zip(encs, got):
        assert rel_err(attr, reference_attribution(adapter, enc, cfg)) <= 1e-4


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
        ids = torch.tensor([enc.input_ids], device=adapter.device)
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


# ---- fused LM-head gradient == autograd ------------------------------------------------------------------


def prob_and_grad(prob_fn, adapter: ModelAdapter, hidden: torch.Tensor, upstream: torch.Tensor):
    h = hidden.clone().requires_grad_(True)
    prob = prob_fn(head_input(adapter, h))
    return prob.detach(), torch.autograd.grad((prob * upstream).sum(), h)[0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_head_gradient_equals_autograd(tiny, family):
    """Every family's head (masked ones through their MLM transform), chunks that do not divide V,
    the answer in the last chunk, rows weighted differently on the way back."""
    adapter = tiny(family)
    head = linear_head(adapter)
    vocab = head.weight.shape[0]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, adapter.model.config.hidden_size, generator=gen).to(adapter.device)
    upstream = (torch.rand(6, generator=gen) + 0.5).to(adapter.device)
    for answer in (3, vocab - 1):
        p_ref, g_ref = prob_and_grad(lambda x: autograd_answer_probability(x, head, answer), adapter, hidden, upstream)
        for chunk in (37, vocab):
            p, g = prob_and_grad(lambda x: fused_answer_probability(x, head, answer, chunk), adapter, hidden, upstream)
            assert g_ref.abs().max() > 0
            assert rel_err(p, p_ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5


def test_fused_head_is_exact_for_a_confident_answer_over_a_large_vocabulary():
    """P ≈ 0.9 over 100k tokens: written as W_y − Σ_v p_v W_v the gradient loses ~1e-4 to float32
    cancellation (as torch's float32 softmax backward did on Gemma); the fused head must not."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(100_000, 32, generator=gen)
    hidden = (weight[7] * 0.9 + 0.1 * torch.randn(4, 32, generator=gen)).contiguous()
    head64 = LinearHead(weight.double(), None, None)
    h64, h = hidden.double().requires_grad_(True), hidden.clone().requires_grad_(True)
    p64 = autograd_answer_probability(h64, head64, 7)
    p = fused_answer_probability(h, LinearHead(weight, None, None), 7, chunk=4096)
    assert (p64 > 0.8).all()
    g64, g = (torch.autograd.grad(x.sum(), y)[0] for x, y in ((p64, h64), (p, h)))
    assert rel_err(p.double(), p64) <= 1e-5 and rel_err(g.double(), g64) <= 1e-5


def test_fused_head_with_bias_and_softcap_equals_autograd():
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)
    hidden = torch.randn(5, 16, generator=gen) * 3
    for head in (LinearHead(weight, bias, None), LinearHead(weight, bias, 4.0), LinearHead(weight, None, 30.0)):
        h_ref, h = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
        p_ref = autograd_answer_probability(h_ref, head, 7)
        p = fused_answer_probability(h, head, 7, chunk=64)
        g_ref, g = (torch.autograd.grad(x.sum(), y)[0] for x, y in ((p_ref, h_ref), (p, h)))
        assert rel_err(p, p_ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_answer_probability(hidden, LinearHead(weight, None, None), 300)
    with pytest.raises(ValueError, match="freeze"):
        fused_answer_probability(hidden, LinearHead(weight.clone().requires_grad_(True), None, None), 1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_answer_probabilities_equal_the_float64_softmax_of_the_logits(tiny, family):
    """The gradient-free head (degenerate neurons' P) on every family's head, one answer id per row,
    chunks that do not divide V, the answers spread over the vocabulary's first and last chunk."""
    adapter = tiny(family)
    head = linear_head(adapter)
    vocab = head.weight.shape[0]
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, adapter.model.config.hidden_size, generator=gen).to(adapter.device)
    answers = [0, 37, 74, vocab // 2, vocab - 1]  # 37 and 74 open the second and third chunks of 37
    with torch.no_grad():
        x = head_input(adapter, hidden)
        want = torch.softmax(head.logits(x).double(), dim=-1).gather(1, torch.tensor(answers)[:, None].to(x.device))[:, 0]
    for chunk in (37, vocab):
        got = answer_probabilities(x, head, answers, chunk)
        assert got.dtype == torch.float64 and got.shape == (5,)
        assert float(((got - want) / want).abs().max()) <= 1e-6


def test_answer_probabilities_over_a_large_vocabulary_with_bias_and_softcap():
    """A wide logit range over 100k tokens against float64 throughout, with a bias and soft caps;
    an id outside the vocabulary is refused."""
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(100_000, 32, generator=gen), torch.randn(100_000, generator=gen)
    hidden = torch.randn(4, 32, generator=gen) * 2
    hidden[0] = weight[7] * 3  # a confident row
    answers = torch.tensor([7, 99_999, 5, 50_000])
    for b, cap in ((None, None), (bias, None), (bias, 30.0)):
        head, head64 = LinearHead(weight, b, cap), LinearHead(weight.double(), None if b is None else b.double(), cap)
        want = torch.softmax(head64.logits(hidden.double()), dim=-1).gather(1, answers[:, None])[:, 0]
        got = answer_probabilities(hidden, head, answers, chunk=4096)
        assert float(((got - want) / want).abs().max()) <= 1e-5
    assert answer_probabilities(hidden, LinearHead(weight, None, None), answers, chunk=4096)[0] > 0.99
    with pytest.raises(ValueError, match="outside the vocabulary"):
        answer_probabilities(hidden, LinearHead(weight, None, None), [1, 2, 3, 100_000])


def test_answer_probabilities_sum_the_vocabulary_in_float64():
    """2^20 tokens of nearly equal logits in 512 chunks: a float32 running sum is off by ~4e-7 here,
    the float64 one by ~2e-9."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(2**20, 4, generator=gen) * 0.005
    hidden = torch.randn(3, 4, generator=gen)
    answers = torch.tensor([5, 2048 * 7, 2**20 - 1])
    want = torch.softmax(LinearHead(weight.double(), None, None).logits(hidden.double()), dim=-1).gather(1, answers[:, None])[:, 0]
    got = answer_probabilities(hidden, LinearHead(weight, None, None), answers, chunk=2048)
    assert float(((got - want) / want).abs().max()) <= 2e-8


# ---- baselines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "xlm-roberta"])
def test_baseline_sentences_and_activations(tiny, family):
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    pad = adapter.baseline_token_id
    original = torch.tensor(enc.input_ids)  # baseline_inputs builds on the CPU; the engines move them
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
            torch.testing.assert_close(w_base[i, layer], plain, **across_shapes(1e-6, 1e-5))
        assert not torch.allclose(w_base[i], w_orig)
    assert torch.equal(baseline_activations(adapter, enc, "zero", w_orig), torch.zeros_like(w_orig)[None])


def test_step_points_are_right_riemann():
    base, orig = torch.tensor([[0.0, 2.0]]), torch.tensor([4.0, 2.0])
    points = step_points(base, orig, 4)
    assert points.shape == (1, 4, 2)
    torch.testing.assert_close(points[0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(points[0, :, 1], torch.full((4,), 2.0))


def test_quadrature_nodes_and_weights():
    nodes, weights = quadrature(4, "riemann_right")
    torch.testing.assert_close(nodes, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.full((4,), 0.25, dtype=torch.float64))
    nodes, weights = quadrature(3, "gauss_legendre")
    assert ((nodes > 0) & (nodes < 1)).all() and abs(float(weights.sum()) - 1) < 1e-12
    for degree in range(6):  # exact up to degree 2M - 1 = 5
        assert abs(float((weights * nodes**degree).sum()) - 1 / (degree + 1)) < 1e-12


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_reference_gauss_legendre(tiny, family):
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    cfg = AttributionConfig(steps=3, baseline="saig", batch_size=16, integration="gauss_legendre")
    ref = reference_attribution(adapter, enc, cfg)
    assert rel_err(fast_attribution(adapter, enc, cfg), ref) <= 1e-4
    riemann = reference_attribution(adapter, enc, AttributionConfig(steps=3, baseline="saig"))
    assert rel_err(riemann, ref) > 1e-3  # a different rule, not the same numbers by accident


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
        return out[0].float().cpu()

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

    (Not for Gemma from a zero baseline: its post-FFN RMSNorm makes P jump at 0; see docs/method.md
    §Knowledge attribution (SAIG).)"""
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    delta = completeness_delta(adapter, enc, baseline)
    assert delta.abs().max() > 1e-5
    errors = completeness_errors(adapter, enc, baseline, (2, 32), "riemann_right")
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.1 * float(delta.abs().max())


def completeness_delta(adapter: ModelAdapter, enc: Encoded, baseline: str) -> torch.Tensor:
    """P(w̄) − P(w'_i) with layer l's target neurons patched: [B, L] float64."""
    w_orig = target_activations(adapter, torch.tensor([enc.input_ids]), enc.target_pos)[0]
    w_base = baseline_activations(adapter, enc, baseline, w_orig)
    delta = torch.zeros(w_base.shape[:2], dtype=torch.float64)  # on the CPU, like the engines' scores
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            patched = Patched(adapter, enc, layer)
            delta[:, layer] = (patched(w_orig[layer][None])[0] - patched(w_base[:, layer])).cpu()
    return delta


def completeness_errors(adapter, enc, baseline, steps_list, integration) -> list[float]:
    """Max |Σ_j Attr − ΔP| over (baseline, layer) for each number of rows per (baseline, layer)."""
    delta = completeness_delta(adapter, enc, baseline)
    errors = []
    for steps in steps_list:
        attr = fast_attribution(adapter, enc, AttributionConfig(steps=steps, baseline=baseline, integration=integration))
        errors.append(float((attr.sum(dim=-1).double() - delta).abs().max()))
    return errors


@pytest.mark.parametrize("family", ["llama", "gpt2", "xlm-roberta"])
def test_gauss_legendre_converges_faster_than_riemann(tiny, family):
    """Completeness error against the number of rows: Gauss-Legendre with 4 nodes beats the right
    Riemann sum with 4 and even with 16 rows."""
    adapter = tiny(family)
    enc = encode_text(adapter, default_text(adapter))
    riemann = completeness_errors(adapter, enc, "saig", (4, 16), "riemann_right")
    gauss = completeness_errors(adapter, enc, "saig", (4,), "gauss_legendre")
    assert gauss[0] < riemann[0] / 4
    assert gauss[0] < riemann[1]


# ---- reduced precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bfloat16_fast_engine_close_to_float32(tiny, family):
    adapter32 = tiny(family)
    adapter16 = tiny_on_device(family)
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
    assert AttributionConfig().steps == 4 and AttributionConfig().baseline == "saig"
    for bad in (0, -1, 2.5, "10"):
        with pytest.raises(ValueError, match="steps"):
            AttributionConfig(steps=bad)
    with pytest.raises(ValueError, match="baseline"):
        AttributionConfig(baseline="ig")
    with pytest.raises(ValueError, match="batch_size"):
        AttributionConfig(batch_size=0)


# ---- whole answers (answer_token: all) ------------------------------------------------------------------


def whole_answer_query(adapter: ModelAdapter, n_tokens: int, text: str = "The capital of France is") -> Encoded:
    """A query whose gold answer has exactly `n_tokens` tokens (masked: as many [MASK]s), built by hand."""
    tok = adapter.tokenizer
    answer = list(tok(" Paris, the city of light and of the river", add_special_tokens=False)["input_ids"])[:n_tokens]
    assert len(answer) == n_tokens
    ids = list(tok(text if adapter.causal else text + tok.mask_token * n_tokens + ".")["input_ids"])
    target = len(ids) - 1 if adapter.causal else ids.index(tok.mask_token_id)
    special = set(tok.all_special_ids)
    return Encoded(ids, target, answer, [p for p, i in enumerate(ids) if i not in special])


@pytest.mark.parametrize("n_tokens", [1, 2, 4])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_whole_answer_fast_equals_reference(tiny, family, n_tokens):
    """The fast engine (a causal step truncated after its gold prefix, every step in one stream) equals
    the reference run on the whole teacher-forced sequence, token by token, then averaged."""
    adapter = tiny(family)
    enc = whole_answer_query(adapter, n_tokens)
    cfg = AttributionConfig(steps=2, baseline="saig", batch_size=48, answer_token="all")
    ref = reference_attribution(adapter, enc, cfg)
    fast = fast_attribution(adapter, enc, cfg)
    assert ref.shape == fast.shape == (len(enc.baseline_positions), adapter.n_layers, adapter.n_neurons)
    assert ref.abs().max() > 0
    assert rel_err(fast, ref) <= 1e-4
    first = reference_attribution(adapter, enc, AttributionConfig(steps=2, baseline="saig"))
    if n_tokens == 1:
        torch.testing.assert_close(ref, first, rtol=0, atol=0)  # one token: the paper's Eq. 3 exactly
    else:
        assert rel_err(first, ref) > 1e-3  # later tokens change the map


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "bert"])
def test_whole_answer_is_the_mean_of_its_tokens_and_streams_across_queries(tiny, family):
    """The combination rule (mean over tokens of P(t_k | query, gold t_<k) attributions), and queries of
    different answer lengths sharing batches keep their own maps, in order."""
    from matrice.models.encoding import answer_steps

    adapter = tiny(family)
    encs = [whole_answer_query(adapter, 3), whole_answer_query(adapter, 2, "Helsinki is the capital of")]
    cfg = AttributionConfig(steps=2, baseline="amig", batch_size=5, answer_token="all")
    got = list(fast_attribution_many(adapter, encs, cfg))
    first = AttributionConfig(steps=2, baseline="amig", batch_size=5)
    for enc, attr in zip(encs, got):
        steps = answer_steps(adapter, enc, whole_sequence=True)
        assert [s.answer_ids[0] for s in steps] == enc.answer_ids
        mean = torch.stack([reference_attribution(adapter, s, first) for s in steps]).mean(dim=0)
        assert rel_err(attr, mean) <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_whole_answer_raw_maps_equal_the_reference_and_reuse_token_one_exactly(tiny, family):
    """What the stage stores under ``answer_token: all`` (each token's map summed over its baselines,
    then the mean over tokens) equals the reference, and token 1 read from a first-token run gives
    the same bits as computing it: it is that computation."""
    import numpy as np

    from matrice.method.attribution.executors import raw_maps

    adapter = tiny(family)
    encs = [whole_answer_query(adapter, 3), whole_answer_query(adapter, 1, "Helsinki is the capital of"),
            whole_answer_query(adapter, 2, "Rome is a city in")]
    cfg = AttributionConfig(steps=2, baseline="saig", batch_size=7, answer_token="all")
    whole = raw_maps(adapter, encs, cfg)
    first = raw_maps(adapter, encs, AttributionConfig(steps=2, baseline="saig", batch_size=7))
    reused = raw_maps(adapter, encs, cfg, first_token=first)
    np.testing.assert_array_equal(reused.raw, whole.raw)
    np.testing.assert_array_equal(reused.n_baselines, whole.n_baselines)
    np.testing.assert_array_equal(whole.raw[1], first.raw[1])  # a one-token answer: the first-token map
    with pytest.raises(ValueError, match="first_token has maps of 3 queries for 2"):
        raw_maps(adapter, encs[:2], cfg, first_token=first)
    with pytest.raises(ValueError, match="no queries"):
        raw_maps(adapter, [], cfg)
    for enc, got in zip(encs, whole.raw):
        ref = reference_attribution(adapter, enc, cfg).sum(dim=0)
        assert rel_err(torch.from_numpy(got).to(ref.device), ref) <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_completeness_holds_per_answer_token(tiny, family):
    """For every answer token, Σ_j Attr over a layer's neurons → P(t_k) at w̄ − P(t_k) at the baseline
    (the gold prefix kept) as the steps grow."""
    from matrice.models.encoding import answer_steps

    adapter = tiny(family)
    for step in answer_steps(adapter, whole_answer_query(adapter, 3)):
        delta = completeness_delta(adapter, step, "saig")
        assert delta.abs().max() > 1e-6
        errors = completeness_errors(adapter, step, "saig", (2, 32), "riemann_right")
        assert errors[1] < errors[0] / 4 and errors[1] < 0.1 * float(delta.abs().max())


def test_answer_steps_teacher_force_the_gold_prefix(tiny):
    from matrice.models.encoding import answer_steps

    causal, masked = tiny("llama"), tiny("bert")
    enc = whole_answer_query(causal, 3)
    short, whole = answer_steps(causal, enc), answer_steps(causal, enc, whole_sequence=True)
    assert [s.input_ids for s in short] == [enc.input_ids + enc.answer_ids[:k] for k in range(3)]
    assert all(s.target_pos == len(s.input_ids) - 1 for s in short)
    assert all(w.input_ids == enc.input_ids + enc.answer_ids[:2] for w in whole)
    assert [w.target_pos for w in whole] == [s.target_pos for s in short]
    assert all(s.baseline_positions == enc.baseline_positions for s in short + whole)  # the answer is never PADded
    enc = whole_answer_query(masked, 3)
    steps = answer_steps(masked, enc)
    mask = masked.tokenizer.mask_token_id
    for k, s in enumerate(steps):
        assert s.input_ids[enc.target_pos: enc.target_pos + k] == enc.answer_ids[:k]  # filled left to right
        assert s.input_ids[s.target_pos] == mask and s.target_pos == enc.target_pos + k
    with pytest.raises(ValueError, match="not contiguous"):
        answer_steps(masked, Encoded(enc.input_ids, enc.target_pos + 1, enc.answer_ids, enc.baseline_positions))
    with pytest.raises(ValueError, match="answer_token"):
        AttributionConfig(answer_token="last")
