"""Fast exact SAIG: same numbers as `reference.py`, a small fraction of the work.

What it saves, per query (METHOD.md §1 costs m × L × M forward+backward passes):
- all (baseline, step) rows of one patched layer run as one batch;
- the blocks below the patched layer are unaffected by the patch: their output is recorded once and
  replayed (the block is not run);
- causal models: positions before the target are unaffected too, so their key/value cache is
  computed once and each row runs a single token (the target) through the network;
- gradients are taken only with respect to the patched activations (parameters are frozen);
- logits only at the target position (one token for causal models; the MLM head on the target row
  only for masked models).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from matrice.attribution.common import (
    AttributionConfig,
    all_layers,
    answer_probability,
    baseline_activations,
    step_points,
)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import Edit, neuron_hooks


def _expand(output: Any, rows: int) -> Any:
    """Broadcast a recorded block output (tensor or tuple whose first item is the hidden state)."""
    if isinstance(output, torch.Tensor):
        return output.expand(rows, *output.shape[1:])
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (_expand(output[0], rows), *output[1:])
    raise TypeError(f"cannot replay a block output of type {type(output).__name__}")


@contextmanager
def _record_blocks(adapter: ModelAdapter) -> Iterator[list[Any]]:
    outputs: list[Any] = [None] * adapter.n_layers
    handles = [
        block.register_forward_hook(lambda m, a, out, j=j: outputs.__setitem__(j, out))
        for j, block in enumerate(adapter.layers)
    ]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replay_below(adapter: ModelAdapter, layer: int, recorded: list[Any], rows: int) -> Iterator[None]:
    """Blocks below `layer` return their recorded output instead of computing it."""
    for j in range(layer):
        adapter.layers[j].forward = lambda *a, _out=_expand(recorded[j], rows), **k: _out
    try:
        yield
    finally:
        for j in range(layer):
            del adapter.layers[j].forward


class _CausalRunner:
    """Prefix cache once; each row then runs only the target token."""

    def __init__(self, adapter: ModelAdapter, enc: Encoded) -> None:
        if enc.target_pos != len(enc.input_ids) - 1:
            raise ValueError("causal attribution expects the target to be the last token")
        self.adapter = adapter
        ids = torch.tensor([enc.input_ids], dtype=torch.long, device=adapter.device)
        self.last = ids[:, -1:]
        self.cache = None
        with torch.no_grad():
            if ids.shape[1] > 1:
                self.cache = adapter.model.base_model(input_ids=ids[:, :-1], use_cache=True).past_key_values
            layers = all_layers(adapter)
            with _record_blocks(adapter) as recorded, neuron_hooks(adapter, torch.zeros(1, dtype=torch.long), capture=layers) as cap:
                adapter.model.base_model(input_ids=self.last, past_key_values=self._cache_for(1), use_cache=True)
        self.recorded = recorded
        self.original = torch.stack([cap[l] for l in layers], dim=1)[0]  # [L, N]

    def _cache_for(self, rows: int):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def logits(self, lowest: int, edits: dict[int, Edit], rows: int) -> torch.Tensor:
        positions = torch.zeros(rows, dtype=torch.long)
        with _replay_below(self.adapter, lowest, self.recorded, rows), neuron_hooks(self.adapter, positions, edits):
            out = self.adapter.model.base_model(
                input_ids=self.last.expand(rows, 1), past_key_values=self._cache_for(rows), use_cache=True
            )
        return self.adapter.head_logits(out.last_hidden_state[:, -1])  # 2-D input: one plain GEMM


class _MaskedRunner:
    """Bidirectional attention: every position is affected above the patch, so rows run the full
    sequence from the patched block up; the MLM head runs on the target row only."""

    def __init__(self, adapter: ModelAdapter, enc: Encoded) -> None:
        self.adapter = adapter
        self.ids = torch.tensor([enc.input_ids], dtype=torch.long, device=adapter.device)
        self.target = enc.target_pos
        layers = all_layers(adapter)
        with torch.no_grad(), _record_blocks(adapter) as recorded, neuron_hooks(
            adapter, torch.tensor([self.target]), capture=layers
        ) as cap:
            adapter.model.base_model(input_ids=self.ids)
        self.recorded = recorded
        self.original = torch.stack([cap[l] for l in layers], dim=1)[0]

    def logits(self, lowest: int, edits: dict[int, Edit], rows: int) -> torch.Tensor:
        positions = torch.full((rows,), self.target, dtype=torch.long)
        with _replay_below(self.adapter, lowest, self.recorded, rows), neuron_hooks(self.adapter, positions, edits):
            hidden = self.adapter.model.base_model(input_ids=self.ids.expand(rows, -1))[0]
        return self.adapter.mlm_head()(hidden[:, self.target])


def _replace_rows(rows: torch.Tensor, values: torch.Tensor) -> Edit:
    """Rows `rows` of the batch get `values` at this layer; the other rows keep their activation."""
    return lambda act: act.index_put((rows.to(act.device),), values.to(act.dtype))


def fast_attribution(
    adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None = None
) -> torch.Tensor:
    """Per-baseline attributions Attr_i(n_j^l): [B, L, N] float32, equal to `reference_attribution`.

    Rows (layer, baseline, step) are ordered by layer and cut into chunks of `batch_size`; a chunk
    may span layers (each row is patched at its own layer, the blocks below the chunk's lowest layer
    are replayed). On CPU the weights are read once per chunk, so big chunks pay: the LM head of a
    multilingual vocabulary is the largest matrix of a small model.
    """
    runner = _CausalRunner(adapter, enc) if adapter.causal else _MaskedRunner(adapter, enc)
    original = runner.original
    base = baseline_activations(adapter, enc, cfg.baseline, original)  # [B, L, N]
    n_base, n_neurons, steps = base.shape[0], original.shape[-1], cfg.steps
    layers = layers if layers is not None else all_layers(adapter)
    per_layer = n_base * steps
    points = torch.cat([step_points(base[:, l], original[l], steps).reshape(per_layer, n_neurons) for l in layers])
    row_layer = torch.tensor(layers).repeat_interleave(per_layer)
    grads = torch.empty(points.shape, dtype=torch.float32, device=points.device)
    for start in range(0, points.shape[0], cfg.batch_size):
        stop = min(start + cfg.batch_size, points.shape[0])
        chunk_layers = row_layer[start:stop]
        values, edits = {}, {}
        for layer in chunk_layers.unique().tolist():
            local = (chunk_layers == layer).nonzero()[:, 0]
            values[layer] = points[start + local].clone().requires_grad_(True)
            edits[layer] = _replace_rows(local, values[layer])
        prob = answer_probability(runner.logits(min(values), edits, stop - start), enc.answer_ids[0])
        chunk_grads = torch.autograd.grad(prob.sum(), list(values.values()))
        grads[start:stop] = torch.cat([g.float() for g in chunk_grads])
    attr = torch.zeros(base.shape, dtype=torch.float32)
    for k, layer in enumerate(layers):
        grad_sum = grads[k * per_layer : (k + 1) * per_layer].reshape(n_base, steps, n_neurons).sum(dim=1)
        attr[:, layer] = ((original[layer] - base[:, layer]).float() * grad_sum / steps).cpu()
    return attr
