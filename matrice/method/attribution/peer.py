"""The peer-style engine, for benchmarks: how EleutherAI knowledge-neurons, EasyEdit's KN and AMIG
compute integrated gradients — per (baseline, layer), the M step points in one batch, the full
sequence through every block, the LM head at every position. Same numbers as the reference (tested),
so the benchmark compares engines at equal scores.
"""

from __future__ import annotations

import torch

from matrice.method.attribution.common import (AttributionConfig, all_layers, answer_probability, integrate,
                                               over_answer_tokens, query_activations, step_points)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import neuron_hooks, replace_with


def peer_attribution(
    adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None = None
) -> torch.Tensor:
    """Per-baseline attributions [B, L, N] (float32; unselected layers are 0), per answer token as the
    reference engine (``answer_token``)."""
    return over_answer_tokens(lambda e: _one_token(adapter, e, cfg, layers), adapter, enc, cfg)


def _one_token(adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None) -> torch.Tensor:
    ids, original, base = query_activations(adapter, enc, cfg.baseline)
    positions = torch.tensor([enc.target_pos])
    attr = torch.zeros(base.shape, dtype=torch.float32)
    for i in range(base.shape[0]):
        for layer in layers if layers is not None else all_layers(adapter):
            points = step_points(base[i, layer], original[layer], cfg.steps, cfg.integration)
            values = points.clone().requires_grad_(True)
            with neuron_hooks(adapter, positions, {layer: replace_with(values)}):
                logits = adapter.model(input_ids=ids.expand(cfg.steps, -1)).logits[:, enc.target_pos]
            grads = torch.autograd.grad(answer_probability(logits, enc.answer_ids[0]).sum(), values)[0]
            attr[i, layer] = integrate(original[layer] - base[i, layer], grads, cfg.steps, cfg.integration).cpu()
    return attr
