"""Model adapters: the neuron hooks read and override the right activations for every family."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import TEST_DEVICE, encode_text
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.cache import broadcast_cache
from matrice.models.families import (
    FAMILIES,
    Family,
    UnsupportedArchitectureError,
    family_for,
    supported_model_types,
)
from matrice.models.hooks import neuron_edits, neuron_hooks, replace_with, scale_neurons
from matrice.models.loading import ModelConfig, load_adapter, resolve_device
from matrice.models.predict import (
    length_buckets,
    decode_and_score,
    greedy_decode,
    is_correct,
    normalize_answer,
    pad_batch,
    score_answers,
    target_logits,
)
from matrice.models.tiny import TINY_CAUSAL_FAMILIES, TINY_FAMILIES, TINY_MASKED_FAMILIES, tiny_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5

CAUSAL_TEXTS = ["The capital of France is", "Paris is in", "La capitale de la France est Paris. Berlin Rome"]
MASKED_TEXTS = ["The capital of France is[Y].", "[Y] is in Europe.", "La capitale de la France est Paris. Berlin Rome[Y] Asia"]


def texts_for(adapter: ModelAdapter) -> list[str]:
    return CAUSAL_TEXTS if adapter.causal else MASKED_TEXTS


def batch_of(adapter: ModelAdapter, positions_from_end: bool = True):
    """Three queries of different lengths, right-padded, with a different target position per row."""
    encs = [encode_text(adapter, t) for t in texts_for(adapter)]
    if adapter.causal and not positions_from_end:
        positions = [len(encs[0].input_ids) - 1, 2, len(encs[2].input_ids) - 3]
    else:
        positions = [e.target_pos for e in encs]
    batch = pad_batch([e.input_ids for e in encs], positions, adapter.pad_token_id, adapter.device)
    assert len({len(e.input_ids) for e in encs}) == 3, "rows must have different lengths (padding)"
    assert len(set(positions)) == 3
    return encs, batch


def run(adapter: ModelAdapter, batch) -> torch.Tensor:
    return adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


# ---- manual FFN activations, written from each family's weights -------------------------------------


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def gelu_erf(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def ffn_input_module(adapter: ModelAdapter, family: str, layer: int) -> nn.Module:
    """The module whose first input is the hidden state the FFN starts from."""
    block = adapter.layers[layer]
    return block.intermediate if family in TINY_MASKED_FAMILIES else block.mlp


def manual_neurons(adapter: ModelAdapter, family: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The input of the FFN output projection computed by hand from the block's weights."""
    block = adapter.layers[layer]
    if family == "gpt2":  # Conv1D: weight is (in, out); activation gelu_new (tanh approximation)
        fc = block.mlp.c_fc
        return gelu_tanh(x @ fc.weight + fc.bias)
    if family in ("llama", "qwen2", "gemma3"):  # act(gate) * up, no biases
        gate = x @ block.mlp.gate_proj.weight.T
        up = x @ block.mlp.up_proj.weight.T
        act = gelu_tanh(gate) if family == "gemma3" else gate * torch.sigmoid(gate)
        return act * up
    if family == "bloom":
        fc = block.mlp.dense_h_to_4h
        h = x @ fc.weight.T + fc.bias
        return h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1.0 + 0.044715 * h * h)))
    if family in TINY_MASKED_FAMILIES:  # exact (erf) GELU
        fc = block.intermediate.dense
        return gelu_erf(x @ fc.weight.T + fc.bias)
    raise AssertionError(family)


def test_manual_activations_match_the_configs(tiny):
    """The hand-written activations above assume these configs; fail loudly if tiny.py changes them."""
    assert tiny("gpt2").model.config.activation_function == "gelu_new"
    assert tiny("llama").model.config.hidden_act == "silu"
    assert tiny("qwen2").model.config.hidden_act == "silu"
    assert tiny("gemma3").model.config.hidden_activation == "gelu_pytorch_tanh"
    assert tiny("bert").model.config.hidden_act == "gelu"
    assert tiny("xlm-roberta").model.config.hidden_act == "gelu"


class PlainCapture:
    """Plain forward pre-hooks (no matrice code) on a set of modules, storing their first input."""

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(l), with_kwargs=True) for l, m in modules.items()]

    def _hook(self, layer):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.inputs[layer] = x.detach().clone()

        return hook

    def __enter__(self):
        return self.inputs

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---- hooks read the right activation ------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hook_reads_out_proj_input_and_matches_manual_ffn(tiny, family):
    adapter = tiny(family)
    layers = list(range(adapter.n_layers))
    encs, batch = batch_of(adapter, positions_from_end=False)
    rows = torch.arange(3)
    ffn_in = {l: ffn_input_module(adapter, family, l) for l in layers}
    out_in = {l: adapter.out_proj(l) for l in layers}
    with torch.no_grad(), PlainCapture(ffn_in) as x_ffn, PlainCapture(out_in) as x_out:
        with neuron_hooks(adapter, batch.positions, capture=layers) as captured:
            run(adapter, batch)
    for l in layers:
        got = captured[l]
        assert got.shape == (3, adapter.n_neurons)
        assert got.abs().max() > 1e-3  # a real, non-trivial activation
        # exactly what a plain pre-hook on the output projection sees at each row's own position
        assert torch.equal(got, x_out[l][rows, batch.positions])
        # and what the block's own weights give from the FFN input hidden state
        manual = manual_neurons(adapter, family, l, x_ffn[l][rows, batch.positions])
        torch.testing.assert_close(got, manual, atol=ATOL, rtol=1e-4)
        # rows really sit at different positions: reading another row's position gives other values
        assert not torch.allclose(got[1], x_out[l][1, batch.positions[0]])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hook_batched_with_padding_equals_unbatched(tiny, family):
    adapter = tiny(family)
    layers = list(range(adapter.n_layers))
    encs, batch = batch_of(adapter, positions_from_end=False)
    with torch.no_grad(), neuron_hooks(adapter, batch.positions, capture=layers) as batched:
        run(adapter, batch)
    for row, enc in enumerate(encs):
        ids = torch.tensor([enc.input_ids], device=adapter.device)
        with torch.no_grad(), neuron_hooks(adapter, batch.positions[row : row + 1], capture=layers) as single:
            adapter.model(input_ids=ids)
        for l in layers:
            torch.testing.assert_close(batched[l][row], single[l][0], atol=ATOL, rtol=1e-4)


# ---- overriding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_overrides_change_only_the_target(tiny, family):
    adapter = tiny(family)
    encs, batch = batch_of(adapter)
    rows = torch.arange(3)
    layer = 1
    with torch.no_grad():
        with neuron_hooks(adapter, batch.positions, capture=[layer]) as cap:
            clean = run(adapter, batch)
        act = cap[layer].clone()
        top = act.abs().topk(8, dim=1).indices[0]

        for edit in (replace_with(act.clone()), scale_neurons(top, 1.0)):
            with neuron_hooks(adapter, batch.positions, {layer: edit}):
                same = run(adapter, batch)
            assert torch.equal(same, clean)

        for edit in (scale_neurons(top, 0.0), scale_neurons(top, 2.0), replace_with(torch.zeros_like(act))):
            with neuron_hooks(adapter, batch.positions, {layer: edit}, capture=[layer]) as cap_e, PlainCapture(
                {layer: adapter.out_proj(layer)}
            ) as seen:
                edited = run(adapter, batch)
            # the logits at every row's target change
            for r in range(3):
                p = batch.positions[r]
                assert (edited[r, p] - clean[r, p]).abs().max() > 1e-4
            # the out_proj input changed at the target only (all other positions of the edited layer unchanged)
            expected = edit(act.clone())
            torch.testing.assert_close(cap_e[layer], expected)
            torch.testing.assert_close(seen[layer][rows, batch.positions], expected)
            with PlainCapture({layer: adapter.out_proj(layer)}) as ref:
                run(adapter, batch)
            keep = torch.ones(ref[layer].shape[:2], dtype=torch.bool)
            keep[rows, batch.positions] = False
            assert torch.equal(seen[layer][keep], ref[layer][keep])
            if adapter.causal:  # earlier positions cannot see the target
                for r in range(3):
                    p = batch.positions[r]
                    torch.testing.assert_close(edited[r, :p], clean[r, :p], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_scale_neurons_and_neuron_edits(tiny, family):
    adapter = tiny(family)
    encs, batch = batch_of(adapter)
    with torch.no_grad(), neuron_hooks(adapter, batch.positions, capture=[0, 2]) as clean:
        run(adapter, batch)
    edits = neuron_edits([(0, 3), (2, 5), (0, 7)], 0.0)
    assert sorted(edits) == [0, 2]
    with torch.no_grad(), neuron_hooks(adapter, batch.positions, edits, capture=[0, 2]) as got:
        run(adapter, batch)
    assert (got[0][:, [3, 7]] == 0).all() and (got[2][:, 5] == 0).all()
    untouched = [i for i in range(adapter.n_neurons) if i not in (3, 7)]
    torch.testing.assert_close(got[0][:, untouched], clean[0][:, untouched])
    edits2 = neuron_edits(torch.tensor([[1, 4]]), 2.0)
    with torch.no_grad(), neuron_hooks(adapter, batch.positions, edits2, capture=[1]) as doubled:
        run(adapter, batch)
    with torch.no_grad(), neuron_hooks(adapter, batch.positions, capture=[1]) as plain:
        run(adapter, batch)
    torch.testing.assert_close(doubled[1][:, 4], 2 * plain[1][:, 4])
    torch.testing.assert_close(doubled[1][:, 5:], plain[1][:, 5:])


def test_hooks_are_removed_after_the_block(tiny):
    adapter = tiny("llama")
    module = adapter.out_proj(0)
    before = len(module._forward_pre_hooks)
    with pytest.raises(RuntimeError):
        with neuron_hooks(adapter, torch.tensor([0]), {0: scale_neurons(torch.tensor([1]), 0.0)}, capture=[0]):
            assert len(module._forward_pre_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(module._forward_pre_hooks) == before


# ---- prediction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_score_answers_matches_plain_forward(tiny, family):
    adapter = tiny(family)
    encs = [encode_text(adapter, t, a) for t, a in zip(texts_for(adapter), [" Paris", " Europe", " Berlin"])]
    batched = score_answers(adapter, encs, batch_size=32)
    single = [score_answers(adapter, [e], batch_size=1)[0] for e in encs]
    chunked = score_answers(adapter, encs, batch_size=2)
    assert [s.prob for s in chunked] == pytest.approx([s.prob for s in batched], rel=1e-4)
    assert [(s.rank, s.top_token) for s in chunked] == [(s.rank, s.top_token) for s in batched]
    for e, s, s1 in zip(encs, batched, single):
        with torch.no_grad():
            logits = adapter.model(input_ids=torch.tensor([e.input_ids], device=adapter.device)).logits[0, e.target_pos]
        probs = torch.softmax(logits.double(), dim=-1)
        gold = e.answer_ids[0]
        assert s.prob == pytest.approx(float(probs[gold]), rel=1e-4, abs=1e-7)
        assert s1.prob == pytest.approx(s.prob, rel=1e-4, abs=1e-7)
        assert s.top_token == s1.top_token == int(probs.argmax())
        assert s.rank == int((probs > probs[gold]).sum())
        assert 0.0 < s.prob < 1.0
    top_encs = [Encoded(e.input_ids, e.target_pos, [s.top_token], e.baseline_positions) for e, s in zip(encs, batched)]
    assert all(s.rank == 0 for s in score_answers(adapter, top_encs))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_score_answers_under_edits_and_target_logits(tiny, family):
    adapter = tiny(family)
    encs = [encode_text(adapter, t) for t in texts_for(adapter)]
    batch = pad_batch([e.input_ids for e in encs], [e.target_pos for e in encs], adapter.pad_token_id, adapter.device)
    edits = {1: replace_with(torch.zeros(adapter.n_neurons))}
    with torch.no_grad():
        logits = target_logits(adapter, batch, edits)
    probs = torch.softmax(logits, -1)[torch.arange(3), [e.answer_ids[0] for e in encs]]
    scored = score_answers(adapter, encs, edits)
    assert [s.prob for s in scored] == pytest.approx(probs.tolist(), rel=1e-5)
    assert [s.prob for s in scored] != pytest.approx([s.prob for s in score_answers(adapter, encs)], rel=1e-3)


def manual_greedy(adapter: ModelAdapter, enc: Encoded, edits=None) -> list[int]:
    position = torch.tensor([enc.target_pos])
    with torch.no_grad(), neuron_hooks(adapter, position, edits):
        if not adapter.causal:
            logits = adapter.model(input_ids=torch.tensor([enc.input_ids], device=adapter.device)).logits[0]
            return [int(logits[enc.target_pos + k].argmax()) for k in range(len(enc.answer_ids))]
        seq = list(enc.input_ids)
        out = []
        for _ in enc.answer_ids:
            nxt = int(adapter.model(input_ids=torch.tensor([seq], device=adapter.device)).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
        return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_decode_matches_manual_loop(tiny, family):
    adapter = tiny(family)
    # answers of 1, 2 and 6 tokens, on rows of different lengths
    encs = [encode_text(adapter, t, a) for t, a in zip(texts_for(adapter), [" Paris", " Pariisi", " Xyzzy"])]
    assert sorted(len(e.answer_ids) for e in encs) == [1, 2, 6]
    expected = [manual_greedy(adapter, e) for e in encs]
    assert greedy_decode(adapter, encs) == expected
    assert greedy_decode(adapter, encs, batch_size=2) == expected
    assert [len(g) for g in expected] == [len(e.answer_ids) for e in encs]
    edits = {0: replace_with(torch.zeros(adapter.n_neurons)), 2: scale_neurons(torch.arange(10), 3.0)}
    expected_edit = [manual_greedy(adapter, e, edits) for e in encs]
    assert greedy_decode(adapter, encs, edits) == expected_edit


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decode_and_score_equals_separate_passes(tiny, family):
    """One pass (causal: left-padded prefill + KV cache) gives the same tokens and scores as the
    right-padded scorer and the manual loop, with and without edits."""
    adapter = tiny(family)
    encs = [encode_text(adapter, t, a) for t, a in zip(texts_for(adapter), [" Xyzzy", " Paris", " Pariisi"])]
    for edits in (None, {1: scale_neurons(torch.arange(0, adapter.n_neurons, 2), 0.0)}):
        joint = decode_and_score(adapter, encs, edits, batch_size=3)
        scores = score_answers(adapter, encs, edits)
        assert [g for g, _ in joint] == [manual_greedy(adapter, e, edits) for e in encs]
        assert [s.prob for _, s in joint] == pytest.approx([s.prob for s in scores], rel=1e-4, abs=1e-8)
        assert [(s.rank, s.top_token) for _, s in joint] == [(s.rank, s.top_token) for s in scores]
        assert [s.top_token for _, s in joint] == [g[0] for g, _ in joint]


def test_length_buckets_sort_by_prompt_then_answer_and_cover_every_index():
    encs = [Encoded(list(range(n)), n - 1, list(range(a)), []) for n, a in [(9, 1), (3, 2), (9, 1), (5, 3), (3, 1)]]
    batches = length_buckets(encs, 2)
    assert batches == [[4, 1], [3, 0], [2]]  # stable among equals
    assert sorted(i for b in batches for i in b) == list(range(len(encs)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_length_bucketed_batches_equal_single_queries(tiny, family):
    """Scores and greedy tokens come back in input order and equal each query run alone, although
    bucketing regroups the rows (longest first here) and finished rows skip the head while decoding."""
    adapter = tiny(family)
    texts, answers = texts_for(adapter), [" Xyzzy", " Paris", " Pariisi", " Europe"]
    encs = [encode_text(adapter, t, a) for t in texts for a in answers]
    encs.sort(key=lambda e: -len(e.input_ids))
    assert [i for b in length_buckets(encs, 3) for i in b] != list(range(len(encs)))  # the order does change
    edits = {1: scale_neurons(torch.arange(0, adapter.n_neurons, 3), 0.0)}
    single = [decode_and_score(adapter, [e], edits, batch_size=1)[0] for e in encs]
    bucketed = decode_and_score(adapter, encs, edits, batch_size=3)
    assert [g for g, _ in bucketed] == [g for g, _ in single]
    assert [s.prob for _, s in bucketed] == pytest.approx([s.prob for _, s in single], rel=1e-4, abs=1e-8)
    scored = score_answers(adapter, encs, edits, batch_size=3)
    assert [s.prob for s in scored] == pytest.approx([s.prob for _, s in single], rel=1e-4, abs=1e-8)
    assert [s.top_token for s in scored] == [s.top_token for _, s in single]
    # batches in lockstep, the head once per step over all of them (the probe's way)
    for head_rows in (6, 64):
        lockstep = decode_and_score(adapter, encs, edits, batch_size=3, head_rows=head_rows)
        assert [g for g, _ in lockstep] == [g for g, _ in single]
        assert [s.prob for _, s in lockstep] == pytest.approx([s.prob for _, s in single], rel=1e-4, abs=1e-8)
        assert [(s.rank, s.top_token) for _, s in lockstep] == [(s.rank, s.top_token) for _, s in bucketed]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logits_at_equals_full_forward(tiny, family):
    adapter = tiny(family)
    encs, batch = batch_of(adapter, positions_from_end=False)
    with torch.no_grad():
        full = run(adapter, batch)[torch.arange(3), batch.positions]
        got = adapter.logits_at(batch.input_ids, batch.attention_mask, batch.positions)
    assert got.shape == (3, len(adapter.tokenizer))
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_broadcast_cache_equals_per_row_full_forwards(tiny, family):
    """Rows that run the last token on one broadcast prefix cache get the full sequence's last hidden
    state, and the shared cache is left as it was (the model appends to the fresh one only)."""
    adapter = tiny(family)
    ids = torch.tensor([adapter.tokenizer(CAUSAL_TEXTS[2])["input_ids"]], device=adapter.device)
    base = adapter.model.base_model
    rows = 3
    with torch.no_grad():
        full = base(input_ids=ids).last_hidden_state[:, -1]
        prefix = base(input_ids=ids[:, :-1], use_cache=True).past_key_values
        before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers]
        for counts in (rows, [rows] * len(prefix.layers)):
            out = base(input_ids=ids[:, -1:].expand(rows, 1), past_key_values=broadcast_cache(prefix, counts), use_cache=True)
            torch.testing.assert_close(out.last_hidden_state[:, -1], full.expand(rows, -1), atol=ATOL, rtol=ATOL)
    for layer, (keys, values) in zip(prefix.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    with pytest.raises(ValueError, match="row counts"):
        broadcast_cache(prefix, [rows] * (len(prefix.layers) - 1))


def test_head_logits_applies_final_softcapping():
    adapter = tiny_adapter("gemma3")
    ids = torch.tensor([adapter.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        raw = adapter.model(input_ids=ids).logits[0, -1]
        adapter.model.config.final_logit_softcapping = 2.0
        full = adapter.model(input_ids=ids).logits[0, -1]
        got = adapter.logits_at(ids, None, torch.tensor([ids.shape[1] - 1]))[0]
    assert raw.abs().max() > 3.0 and full.abs().max() <= 2.0  # the cap matters here
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "a, b",
    [
        ("Paris", " paris"),
        ("  Paris.", "PARIS"),
        ("ＰＡＲＩＳ", "paris"),  # NFKC full width
        ("New York", "NewYork"),
        ("Straße", "STRASSE"),  # casefold
        ("「東京」", "東京"),
        ("パリ。", "パリ"),
        ('"Rome"', "rome"),
    ],
)
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("Paris", "Pariisi"), ("Rome", "Roma"), ("U.S.", "US"), ("東京", "京都")])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_is_correct(tiny):
    adapter = tiny("llama")
    paris = adapter.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert is_correct(adapter, paris, "Paris")
    assert is_correct(adapter, paris + [adapter.tokenizer.eos_token_id], "paris.")
    assert not is_correct(adapter, paris, "Rome")


# ---- structure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_structure(tiny, family):
    adapter = tiny(family)
    tok = adapter.tokenizer
    assert adapter.n_layers == 3
    hidden = adapter.model.config.hidden_size
    assert adapter.n_neurons == (4 * hidden if family == "bloom" else 48)
    assert adapter.causal == (family not in TINY_MASKED_FAMILIES)
    if adapter.causal:
        assert adapter.baseline_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    else:
        assert adapter.baseline_token_id == tok.mask_token_id == tok.convert_tokens_to_ids("<mask>")
    assert adapter.pad_token_id == tok.pad_token_id
    assert [len(p.weight.shape) for p in adapter.in_projs(0)] == [2] * len(adapter.family.in_projs)
    assert adapter.unembedding(5).shape == (hidden,)
    assert adapter.dtype == torch.float32 and adapter.device.type == TEST_DEVICE.type
    assert not any(p.requires_grad for p in adapter.model.parameters())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_output_weight_is_the_neurons_output_vector(tiny, family):
    adapter = tiny(family)
    layer, neuron, other = 2, 5, 9
    proj = adapter.out_proj(layer)
    hidden = adapter.model.config.hidden_size
    if family == "gpt2":
        assert proj.weight.shape == (adapter.n_neurons, hidden)  # Conv1D (in, out): a row per neuron
    else:
        assert proj.weight.shape == (hidden, adapter.n_neurons)  # Linear (out, in): a column per neuron

    def contribution(i: int, a: float = 1.7) -> torch.Tensor:
        e = torch.zeros(1, adapter.n_neurons, device=adapter.device)
        e[0, i] = a
        with torch.no_grad():
            return (proj(e) - proj(torch.zeros_like(e)))[0]

    w = adapter.output_weight(layer, neuron)
    assert w.shape == (hidden,)
    torch.testing.assert_close(contribution(neuron), 1.7 * w)
    assert contribution(neuron).abs().max() > 1e-3
    saved = w.clone()
    other_before = contribution(other)
    try:
        adapter.output_weight(layer, neuron).zero_()  # a view: editing it edits the model
        assert contribution(neuron).abs().max() == 0
        torch.testing.assert_close(contribution(other), other_before)
    finally:
        adapter.output_weight(layer, neuron).copy_(saved)
    torch.testing.assert_close(contribution(neuron), 1.7 * saved)


# ---- errors -------------------------------------------------------------------------------------------


def test_unknown_architecture_lists_supported_types():
    with pytest.raises(UnsupportedArchitectureError) as info:
        family_for("mamba")
    message = str(info.value)
    assert "mamba" in message
    for model_type in ("gpt2", "llama", "qwen2", "gemma3_text", "bloom", "bert", "xlm-roberta"):
        assert model_type in message
    assert set(supported_model_types()) == {t for f in FAMILIES for t in f.model_types}

    class Mamba(nn.Module):
        config = SimpleNamespace(model_type="mamba")

    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        ModelAdapter(Mamba(), tiny_adapter("llama").tokenizer)


@pytest.mark.parametrize("model_type, family", [("mistral", "llama"), ("gemma3_text", "llama"), ("roberta", "bert")])
def test_family_for_known_types(model_type, family):
    assert family_for(model_type).name == family


def test_missing_ffn_module_is_a_clear_error():
    adapter = tiny_adapter("llama")
    broken = Family("broken", ("llama",), True, ("model.layers",), "mlp.fc_out", ("mlp.fc_in",))
    with pytest.raises(UnsupportedArchitectureError, match="mlp.fc_out"):
        ModelAdapter(adapter.model, adapter.tokenizer, broken).n_neurons
    with pytest.raises(UnsupportedArchitectureError, match="mlp.fc_out"):
        with neuron_hooks(ModelAdapter(adapter.model, adapter.tokenizer, broken), torch.tensor([0]), capture=[0]):
            pass
    no_blocks = Family("broken", ("llama",), True, ("model.blocks", "decoder.layers"), "mlp.down_proj", ())
    with pytest.raises(UnsupportedArchitectureError, match="model.blocks"):
        ModelAdapter(adapter.model, adapter.tokenizer, no_blocks)


def test_model_config_validation():
    assert ModelConfig("m", "x", device="cuda:1", dtype="bfloat16").device == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        ModelConfig("m", "x", device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig("m", "x", dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        load_adapter("does/not-matter", dtype="float64")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(device)


# ---- encoding of dataset queries ------------------------------------------------------------------------

schema = pytest.importorskip("matrice.data.schema")
encoding = pytest.importorskip("matrice.models.encoding")

FRANCE = schema.Fact("f1", "P36", {"en": "France", "zh": "法国"}, {"en": "Paris", "zh": "巴黎"})
ITALY = schema.Fact("f2", "P36", {"en": "Italy", "zh": "意大利"}, {"en": "Rome", "zh": "罗马"})


def test_encode_causal_zero_shot(tiny):
    adapter = tiny("llama")
    tok = adapter.tokenizer
    query = schema.make_query(FRANCE, "en", 0, "The capital of [X] is [Y].", ITALY)
    enc = encoding.encode_query(adapter, query, few_shot=False)
    assert enc.input_ids == tok("The capital of France is")["input_ids"]
    assert enc.target_pos == len(enc.input_ids) - 1
    assert tok.decode(enc.answer_ids) == " Paris"
    assert enc.input_ids + enc.answer_ids == tok("The capital of France is Paris")["input_ids"]
    assert enc.input_ids[0] == tok.bos_token_id and 0 not in enc.baseline_positions
    assert enc.baseline_positions == list(range(1, len(enc.input_ids)))


def test_encode_causal_few_shot_excludes_prefix(tiny):
    adapter = tiny("gpt2")
    tok = adapter.tokenizer
    query = schema.make_query(FRANCE, "en", 0, "The capital of [X] is [Y].", ITALY)
    assert query.prefix  # the demonstration
    enc = encoding.encode_query(adapter, query, few_shot=True)
    assert enc.input_ids == tok(query.prefix + query.prompt)["input_ids"]
    n_prefix = len(tok(query.prefix)["input_ids"])  # <s> + demonstration tokens
    assert enc.baseline_positions == list(range(n_prefix, len(enc.input_ids)))
    assert tok.decode([enc.input_ids[p] for p in enc.baseline_positions]) == "The capital of France is"
    assert tok.decode(enc.answer_ids) == " Paris"
    assert enc.target_pos == len(enc.input_ids) - 1
    zero = encoding.encode_query(adapter, query, few_shot=False)
    assert zero.input_ids == tok(query.prompt)["input_ids"]
    assert [zero.input_ids[p] for p in zero.baseline_positions] == [enc.input_ids[p] for p in enc.baseline_positions]


def test_encode_causal_answer_merging_with_the_prompt(tiny):
    """No space before the answer (Chinese): the answer's first bytes may merge with the prompt's end."""
    adapter = tiny("qwen2")
    tok = adapter.tokenizer
    query = schema.make_query(FRANCE, "zh", 0, "[X]的首都是[Y]。", None)
    assert query.answer_sep == ""
    enc = encoding.encode_query(adapter, query)
    assert enc.input_ids == tok("法国的首都是")["input_ids"]
    assert tok.decode(enc.answer_ids) == "巴黎"
    assert tok.unk_token_id not in enc.answer_ids


@pytest.mark.parametrize("family", TINY_MASKED_FAMILIES)
@pytest.mark.parametrize("obj", ["Paris", "Xyzzy"])
def test_encode_masked(tiny, family, obj):
    adapter = tiny(family)
    tok = adapter.tokenizer
    fact = schema.Fact("f9", "P36", {"en": "France"}, {"en": obj})
    query = schema.make_query(fact, "en", 0, "The capital of [X] is [Y].", None)
    enc = encoding.encode_query(adapter, query)
    answer = tok(" " + obj, add_special_tokens=False)["input_ids"]
    assert enc.answer_ids == answer
    masks = [p for p, i in enumerate(enc.input_ids) if i == tok.mask_token_id]
    assert len(masks) == len(answer) and masks == list(range(masks[0], masks[0] + len(answer)))
    assert enc.target_pos == masks[0]
    special = set(tok.all_special_ids)
    assert enc.baseline_positions == [p for p, i in enumerate(enc.input_ids) if i not in special]
    assert not set(masks) & set(enc.baseline_positions)
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[-1] == tok.sep_token_id
    assert tok.decode([enc.input_ids[p] for p in enc.baseline_positions]).startswith("The capital of France is")


def wordlevel_adapter(causal: bool) -> ModelAdapter:
    """A word-level tokenizer: any word outside its vocabulary becomes <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "The", "capital", "of", "France", "is", "Paris", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )
    return ModelAdapter(tiny_model("llama" if causal else "bert", len(tok)), tok)


@pytest.mark.parametrize("causal", [True, False])
def test_unencodable_answer(causal):
    adapter = wordlevel_adapter(causal)
    ok = schema.make_query(FRANCE, "en", 0, "The capital of [X] is [Y].", None)
    enc = encoding.encode_query(adapter, ok)
    assert enc.answer_ids == [adapter.tokenizer.convert_tokens_to_ids("Paris")]
    # wholly unknown, partly unknown (must not be silently truncated to "Paris"), and empty answers
    for obj in ("Londres", "Paris Londres", ""):
        fact = schema.Fact("f7", "P36", {"en": "France"}, {"en": obj})
        query = schema.make_query(fact, "en", 0, "The capital of [X] is [Y].", None)
        with pytest.raises(encoding.UnencodableAnswerError, match="f7"):
            encoding.encode_query(adapter, query)


GEMMA_DIR = Path(__file__).resolve().parents[1] / "models" / "gemma3_270m"


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GEMMA_DIR)


@pytest.mark.slow
@pytest.mark.skipif(not (GEMMA_DIR / "tokenizer.json").exists(), reason="embedded Gemma not prepared (make pipeline)")
@pytest.mark.parametrize(
    "lang, template",
    [("en", "The capital of [X] is [Y]."), ("zh", "[X]的首都是[Y]。"), ("ja", "[X]の首都は[Y]です。"), ("fi", "[X]n pääkaupunki on [Y].")],
)
def test_encode_causal_with_the_real_gemma_tokenizer(gemma_tokenizer, lang, template):
    tok = gemma_tokenizer
    adapter = SimpleNamespace(tokenizer=tok, causal=True)  # encoding needs only these two
    fact = schema.Fact("f1", "P36", {lang: {"en": "France", "zh": "法国", "ja": "フランス", "fi": "Ranska"}[lang]},
                       {lang: {"en": "Paris", "zh": "巴黎", "ja": "パリ", "fi": "Pariisi"}[lang]})
    demo = schema.Fact("f2", "P36", {lang: "Italia"}, {lang: "Roma"})
    query = schema.make_query(fact, lang, 0, template, demo)
    for few_shot in (False, True):
        enc = encoding.encode_query(adapter, query, few_shot)
        assert tok.decode(enc.answer_ids).strip() == query.answer
        assert tok.decode([enc.input_ids[p] for p in enc.baseline_positions]) == query.prompt
        assert enc.input_ids[0] == tok.bos_token_id and enc.target_pos == len(enc.input_ids) - 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cached_prefix_scoring_equals_full_passes(family):
    """score_answers_many (one prefix pass, the target token per edit set) = score_answers per edit set."""
    from conftest import tiny_on_device
    from matrice.models.hooks import neuron_edits
    from matrice.models.predict import score_answers, score_answers_many

    adapter = tiny_on_device(family)
    qs = [q for q in _queries_for_scoring()]
    from matrice.models.encoding import encode_query
    import numpy as np

    encs = [encode_query(adapter, q, few_shot=True) for q in qs]
    rng = np.random.default_rng(0)
    edit_sets = [None] + [neuron_edits(np.stack([rng.integers(0, adapter.n_layers, 6), rng.integers(0, adapter.n_neurons, 6)], 1), f)
                          for f in (0.0, 2.0, 3.5)]
    fast = score_answers_many(adapter, encs, edit_sets, batch_size=3)
    for edits, got in zip(edit_sets, fast):
        want = score_answers(adapter, encs, edits, batch_size=3)
        assert [s.prob for s in got] == pytest.approx([s.prob for s in want], rel=1e-5, abs=1e-9)
        assert [s.top_token for s in got] == [s.top_token for s in want]
    assert [s.prob for s in fast[1]] != pytest.approx([s.prob for s in fast[0]], rel=1e-3)  # the edits do act


def _wide_window(adapter: ModelAdapter) -> ModelAdapter:
    """The tiny Gemma 3's sliding window (4) is shorter than a few-shot prompt, which keeps scoring
    on whole prompts; widened, its queries take the shared-prefix path too."""
    if getattr(adapter.model.config, "sliding_window", None):
        adapter.model.config.sliding_window = 512
        for module in adapter.model.modules():
            if getattr(module, "sliding_window", None):
                module.sliding_window = 512
    return adapter


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_shared_prefix_scoring_and_decoding_equal_whole_prompts(family, monkeypatch):
    """Each demonstration prefix runs once and its cache is gathered to its queries; scores, ranks and
    greedy tokens equal every query run alone on its whole prompt, with edits at the target and
    with edited weights."""
    from conftest import tiny_on_device
    from matrice.interventions import edited_output_weights, erasure_vectors
    from matrice.models import predict
    from matrice.models.encoding import encode_query
    import numpy as np

    adapter = _wide_window(tiny_on_device(family))
    encs = [encode_query(adapter, q, few_shot=True) for q in _queries_for_scoring(demos=2)]
    cuts = [predict.shared_prefix_length(e) for e in encs]
    assert len({tuple(e.input_ids[:c]) for e, c in zip(encs, cuts)}) == 2 and min(cuts) > 1
    gathered = []
    real_gather = predict.cache_rows
    monkeypatch.setattr(predict, "cache_rows", lambda cache, rows: (gathered.append(len(rows)), real_gather(cache, rows))[1])
    hook_edits = {1: scale_neurons(torch.arange(0, adapter.n_neurons, 3), 0.0)}
    vectors = erasure_vectors(adapter, np.array([[0, 1], [adapter.n_layers - 1, 2]]))
    for edits, weights in ((None, None), (hook_edits, None), (None, vectors)):
        with edited_output_weights(adapter, weights) if weights is not None else _nothing():
            single = [(manual_greedy(adapter, e, edits), score_answers(adapter, [e], edits, batch_size=1)[0]) for e in encs]
            gathered.clear()
            joint = decode_and_score(adapter, encs, edits, batch_size=5)
            scored = score_answers(adapter, encs, edits, batch_size=5)
        assert gathered, "the shared-prefix path was not taken"
        assert [g for g, _ in joint] == [g for g, _ in single]
        for got in ([s for _, s in joint], scored):
            assert [s.prob for s in got] == pytest.approx([s.prob for _, s in single], rel=1e-4, abs=1e-8)
            assert [(s.rank, s.top_token) for s in got] == [(s.rank, s.top_token) for _, s in single]


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def _queries_for_scoring(demos: int = 1):
    from matrice.data.schema import Fact, make_query

    facts = [Fact("a", "P36", {"en": "France"}, {"en": "Paris"}), Fact("b", "P36", {"en": "the Kingdom of Spain"}, {"en": "Madrid"}),
             Fact("c", "P36", {"en": "Italy"}, {"en": "Rome"})]
    demo = [Fact("d", "P36", {"en": "Japan"}, {"en": "Tokyo"}), Fact("e", "P36", {"en": "Peru"}, {"en": "Lima"})]
    tpls = ["The capital of [X] is [Y].", "[X]'s capital city, as everyone knows, is [Y]."]
    if demos == 1:
        return [make_query(f, "en", t, tpl, demo[0]) for f in facts[:2] for t, tpl in enumerate(tpls)]
    return [make_query(f, "en", 0, tpls[0], demo[i % demos]) for i, f in enumerate(facts + facts)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scaled_rows_equal_one_pass_per_edit_set(family):
    """Rows of different queries and neuron scalings share forwards over cached prompts; each equals
    the plain scorer run with that row's edits alone."""
    from conftest import tiny_on_device
    from matrice.models.encoding import encode_query
    from matrice.models.scaled_rows import decode_scaled_rows, scaling_set, score_scaled_rows
    import numpy as np

    adapter = tiny_on_device(family)  # Gemma 3 with its 4-token window: the prompts' cache is left-padded only
    encs = [encode_query(adapter, q, few_shot=adapter.causal) for q in _queries_for_scoring(demos=2)]
    rng = np.random.default_rng(1)
    pairs = [np.stack([rng.integers(0, adapter.n_layers, 5), rng.integers(0, adapter.n_neurons, 5)], 1) for _ in range(3)]
    scalings = [[], scaling_set(pairs[0], 0.0), scaling_set(pairs[1], 2.0), scaling_set(pairs[2], 0.0) + scaling_set(pairs[0][:1], 3.0)]
    rows = [(q, k) for q in range(len(encs)) for k in range(len(scalings)) if (q + k) % 3 != 1]
    got = score_scaled_rows(adapter, encs, scalings, rows, batch_size=2, rows_per_pass=3)
    decoded = decode_scaled_rows(adapter, encs, scalings, rows, batch_size=2, rows_per_pass=3)
    assert max(len(encs[q].answer_ids) for q, _ in rows) > 1
    for (q, k), s, tokens in zip(rows, got, decoded):
        layers: dict[int, list] = {}
        for layer, neuron, factor in scalings[k]:
            layers.setdefault(layer, []).append((neuron, factor))
        edits = {layer: _scale_each(cells) for layer, cells in layers.items()}
        want = score_answers(adapter, [encs[q]], edits or None)[0]
        assert s.prob == pytest.approx(want.prob, rel=1e-4, abs=1e-8), (q, k)
        assert (s.rank, s.top_token) == (want.rank, want.top_token)
        assert tokens == manual_greedy(adapter, encs[q], edits or None), (q, k)
    assert len({round(s.prob, 9) for s in got}) > len(encs)  # the scalings do act


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_replay_fills_the_cache_of_a_shared_prefix_pass(family, monkeypatch):
    """With demonstration prefixes computed once and gathered to their queries, replayed blocks also
    write their recorded keys and values into the edited pass's cache: the scores equal computing
    every block, bit for bit, and the shared-prefix path is the one taken."""
    from conftest import tiny_on_device
    from matrice.interventions import edited_output_weights, update_vectors
    from matrice.models import predict
    from matrice.models.encoding import encode_query
    from matrice.models.replay import recorded_blocks, replayed_below
    import numpy as np

    adapter = _wide_window(tiny_on_device(family))
    encs = [encode_query(adapter, q, few_shot=True) for q in _queries_for_scoring(demos=2)]
    gathered = []
    real_gather = predict.cache_rows
    monkeypatch.setattr(predict, "cache_rows", lambda cache, rows: (gathered.append(len(rows)), real_gather(cache, rows))[1])
    with recorded_blocks(adapter) as record:
        before = score_answers(adapter, encs, batch_size=5)
    assert gathered and len({len(calls) for calls in record}) == 1 and len(record[0]) > len(gathered)
    assert all(any(call.cache_writes for call in calls) for calls in record)  # a prefix pass wrote the cache
    pairs = np.array([[2, 1], [2, 5], [adapter.n_layers - 1, 3]])
    vectors = update_vectors(adapter, pairs, int(encs[0].answer_ids[0]), int(encs[1].answer_ids[0]), 4.0, 4.0)
    with edited_output_weights(adapter, vectors):
        full = score_answers(adapter, encs, batch_size=5)
        with replayed_below(adapter, record, int(pairs[:, 0].min())):
            replayed = score_answers(adapter, encs, batch_size=5)
        with pytest.raises(RuntimeError, match="not the recorded one"), replayed_below(adapter, record, 2):
            score_answers(adapter, encs, batch_size=5, shared_prefixes=False)  # no cache where the record has one
    assert [s.prob for s in replayed] == [s.prob for s in full]
    assert [(s.rank, s.top_token) for s in replayed] == [(s.rank, s.top_token) for s in full]
    assert [s.prob for s in full] != pytest.approx([s.prob for s in before], rel=1e-6)  # the edit acts


@pytest.mark.parametrize("family", TINY_CAUSAL_FAMILIES)
def test_replayed_cache_writes_are_tiled_with_the_copies(family):
    """Under ``copies`` > 1 each replayed block writes its recorded keys and values once per copy:
    the cache after a replayed forward of the tiled batch is the one computing every block writes
    (the blocks above read their own layers' entries, so this is what a caller that replays only part
    of a pass would see)."""
    from conftest import tiny_on_device
    from matrice.models.replay import recorded_blocks, replayed_below

    adapter = tiny_on_device(family)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], device=adapter.device)
    body = adapter.model.base_model
    with torch.no_grad():
        with recorded_blocks(adapter) as record:
            body(input_ids=ids, use_cache=True)
        want = body(input_ids=ids.repeat(3, 1), use_cache=True).past_key_values
        with replayed_below(adapter, record, 2, copies=3):
            got = body(input_ids=ids.repeat(3, 1), use_cache=True).past_key_values
    assert len(got.layers) == len(want.layers) == adapter.n_layers
    for mine, theirs in zip(got.layers, want.layers):
        assert mine.keys.shape[0] == 6
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_head_run_once_over_many_rows_scores_as_each_batch_does(family):
    """target_hidden then scores_from_hidden (the head over rows of any grouping) equals score_answers,
    with and without edits at the target, on shared-prefix and whole-prompt batches."""
    from conftest import tiny_on_device
    from matrice.models.encoding import encode_query
    from matrice.models.predict import scores_from_hidden, target_hidden

    adapter = _wide_window(tiny_on_device(family))
    encs = [encode_query(adapter, q, few_shot=True) for q in _queries_for_scoring(demos=2)]
    for edits in (None, {1: replace_with(torch.zeros(adapter.n_neurons))}):
        for shared in (True, False):
            want = score_answers(adapter, encs, edits, batch_size=4, shared_prefixes=shared)
            hidden = target_hidden(adapter, encs, edits, batch_size=4, shared_prefixes=shared)
            assert hidden.shape == (len(encs), adapter.model.config.hidden_size)
            for rows in (1, 5, 128):
                got = scores_from_hidden(adapter, hidden, encs, rows=rows)
                assert [s.prob for s in got] == pytest.approx([s.prob for s in want], rel=1e-5, abs=1e-9)
                assert [(s.rank, s.top_token) for s in got] == [(s.rank, s.top_token) for s in want]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edited_passes_equal_scoring_under_each_edit_applied(family):
    """A fact's passes (the unedited one recorded, each edit replaying the blocks below it, the head once
    over all of them) equal applying each edit to the weights and scoring the queries alone."""
    from conftest import tiny_on_device
    from matrice.experiments.edit.passes import EditedPasses, erasure_edit, update_edit
    from matrice.interventions import edited_output_weights
    from matrice.models.encoding import encode_query
    import numpy as np

    adapter = _wide_window(tiny_on_device(family))
    encs = [encode_query(adapter, q, few_shot=adapter.causal) for q in _queries_for_scoring(demos=2)]
    top = adapter.n_layers - 1
    gold, new = int(encs[0].answer_ids[0]), int(encs[1].answer_ids[0])
    edits = {"erase-top": erasure_edit(adapter, np.array([[top, 3], [top, 7]])),
             "erase-low": erasure_edit(adapter, np.array([[0, 1], [top, 2]])),
             "update": update_edit(adapter, np.array([[1, 4], [top, 5]]), gold, new, 4.0, 4.0, "raw")}
    before, after = EditedPasses(adapter, batch_size=4, memo=None, kind="test").run(encs, edits)
    reference = {"unedited": score_answers(adapter, encs, batch_size=4)}
    for name, edit in edits.items():
        with edited_output_weights(adapter, edit.vectors()):
            reference[name] = score_answers(adapter, encs, batch_size=4)
    for name, got in [("unedited", before), *after.items()]:
        want = reference[name]
        assert [s.prob for s in got] == pytest.approx([s.prob for s in want], rel=1e-5, abs=1e-9), name
        assert [(s.rank, s.top_token) for s in got] == [(s.rank, s.top_token) for s in want], name
    assert [s.prob for s in after["update"]] != pytest.approx([s.prob for s in before], rel=1e-4)  # the edits act


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rows_of_different_weight_edits_equal_applying_each_edit(family):
    """Batched weight-edit rows: the copies of each batch, each adding its own rank-k change of FFN
    output columns (and the unedited blocks below the group's lowest edit replayed, tiled), give the
    head inputs and scores of applying each edit to the weights; a group smaller than the pass size
    and one row left unedited (−1) included."""
    from conftest import tiny_on_device
    from matrice.experiments.edit.passes import EditedPasses, erasure_edit, update_edit
    from matrice.interventions import edited_output_weights
    from matrice.models.edit_rows import output_deltas, per_row_output_deltas
    from matrice.models.encoding import encode_query
    from matrice.models.predict import target_hidden, target_hidden_copies
    from matrice.models.replay import recorded_blocks, replayed_below
    import numpy as np

    adapter = _wide_window(tiny_on_device(family))
    encs = [encode_query(adapter, q, few_shot=adapter.causal) for q in _queries_for_scoring(demos=2)]
    top = adapter.n_layers - 1
    gold, new = int(encs[0].answer_ids[0]), int(encs[1].answer_ids[0])
    edits = {"erase-top": erasure_edit(adapter, np.array([[top, 3], [top, 7]])),
             "update": update_edit(adapter, np.array([[1, 4], [top, 5]]), gold, new, 4.0, 4.0, "raw"),
             "erase-low": erasure_edit(adapter, np.array([[0, 1], [top, 2]])),
             "update-top": update_edit(adapter, np.array([[top, 1], [top, 6]]), new, gold, 2.0, 2.0, "raw")}
    reference = {"unedited": score_answers(adapter, encs, batch_size=4)}
    want_hidden = {}
    for name, edit in edits.items():
        with edited_output_weights(adapter, edit.vectors()):
            reference[name] = score_answers(adapter, encs, batch_size=4)
            want_hidden[name] = target_hidden(adapter, encs, batch_size=4)

    names = ["update", "erase-top", "update-top"]  # lowest edited layers 1, top, top: blocks 0 replayed
    with recorded_blocks(adapter) as record:
        target_hidden(adapter, encs, batch_size=4)
    deltas = [output_deltas(adapter, edits[n].vectors()) for n in names]
    with per_row_output_deltas(adapter, deltas) as rows, replayed_below(adapter, record, 1, copies=len(names)):
        got = target_hidden_copies(adapter, encs, len(names), rows.set, batch_size=4)
    for name, hidden in zip(names, got):
        assert hidden == pytest.approx(want_hidden[name], rel=1e-5, abs=1e-5), name
    unedited = target_hidden(adapter, encs, batch_size=4)
    with per_row_output_deltas(adapter, deltas[:1]) as rows:  # copy 1 carries no edit
        got = target_hidden_copies(adapter, encs, 2, lambda copy: rows.set(torch.where(copy == 0, 0, -1)), batch_size=4)
    assert got[0] == pytest.approx(want_hidden["update"], rel=1e-5, abs=1e-5)
    assert torch.equal(got[1], unedited) or got[1] == pytest.approx(unedited, rel=1e-6, abs=1e-6)

    for per_pass in (2, 3):
        before, after = EditedPasses(adapter, batch_size=4, memo=None, kind="test", edits_per_pass=per_pass).run(encs, edits)
        for name, scores in [("unedited", before), *after.items()]:
            want = reference[name]
            assert [s.prob for s in scores] == pytest.approx([s.prob for s in want], rel=1e-5, abs=1e-9), (per_pass, name)
            assert [(s.rank, s.top_token) for s in scores] == [(s.rank, s.top_token) for s in want], (per_pass, name)
    assert [s.prob for s in after["update"]] != pytest.approx([s.prob for s in before], rel=1e-4)  # the edits act


def test_rows_of_weight_edits_refuse_a_batch_without_its_assignment():
    """A forward whose rows were not assigned edits (or assigned for another batch size) raises
    instead of editing the wrong rows."""
    from conftest import tiny_on_device
    from matrice.interventions import erasure_vectors
    from matrice.models.edit_rows import output_deltas, per_row_output_deltas
    from matrice.models.predict import target_hidden_copies
    from matrice.models.encoding import encode_query

    adapter = tiny_on_device("llama")
    encs = [encode_query(adapter, q) for q in _queries_for_scoring()]
    deltas = [output_deltas(adapter, erasure_vectors(adapter, [(1, 2)]))]
    with per_row_output_deltas(adapter, deltas), pytest.raises(RuntimeError, match="no row assignment"):
        target_hidden_copies(adapter, encs, 1, None, batch_size=4)
    with per_row_output_deltas(adapter, deltas) as rows, pytest.raises(RuntimeError, match="row assignments"):
        target_hidden_copies(adapter, encs, 2, lambda copy: rows.set(copy[:1]), batch_size=4)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]], device=adapter.device)
    with per_row_output_deltas(adapter, deltas) as rows:
        rows.set([0, -1])
        adapter.model.base_model(input_ids=ids)  # the assignment serves this call only
        with pytest.raises(RuntimeError, match="no row assignment"):
            adapter.model.base_model(input_ids=ids)
    with pytest.raises(ValueError, match="edits_per_pass"):
        from matrice.experiments.edit.passes import EditedPasses
        EditedPasses(adapter, batch_size=4, memo=None, kind="test", edits_per_pass=0)
    bloom = tiny_on_device("bloom")  # its projection bypassed: the correction would silently not be added
    bloom.model.config.pretraining_tp, bloom.model.config.slow_but_exact = 2, True
    with pytest.raises(ValueError, match="slow_but_exact"), per_row_output_deltas(bloom, deltas[:0]):
        pass


def _scale_each(cells):
    def edit(act):
        out = act.clone()
        for neuron, factor in cells:
            out[:, neuron] = act[:, neuron] * factor
        return out

    return edit


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_replayed_blocks_below_an_output_weight_edit_equal_computing_them(family):
    """Under an edit of layer-2 neurons, blocks 0 and 1 replayed from an unedited pass over the same
    batches give the same scores as computing every block; a different pass is refused."""
    from conftest import tiny_on_device
    from matrice.interventions import edited_output_weights, erasure_vectors
    from matrice.models.replay import recorded_blocks, replayed_below
    import numpy as np

    adapter = tiny_on_device(family)
    encs = [encode_text(adapter, t, a) for t in texts_for(adapter) for a in (" Paris", " Pariisi")]
    with recorded_blocks(adapter) as record:
        before = score_answers(adapter, encs, batch_size=4, shared_prefixes=False)
    assert all(len(calls) == 2 for calls in record)  # two batches, one forward each
    pairs = np.array([[2, 1], [2, 5], [adapter.n_layers - 1, 3]])
    with edited_output_weights(adapter, erasure_vectors(adapter, pairs)):
        full = score_answers(adapter, encs, batch_size=4, shared_prefixes=False)
        with replayed_below(adapter, record, int(pairs[:, 0].min())):
            replayed = score_answers(adapter, encs, batch_size=4, shared_prefixes=False)
        with pytest.raises(RuntimeError, match="not the recorded one|more forward calls"), \
                replayed_below(adapter, record, 2):
            score_answers(adapter, encs[:3], batch_size=4, shared_prefixes=False)
    assert [s.prob for s in replayed] == [s.prob for s in full]  # the same kernels on the same inputs
    assert [s.prob for s in full] != pytest.approx([s.prob for s in before], rel=1e-6)  # the edit acts
