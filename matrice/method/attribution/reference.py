"""The obviously faithful SAIG (docs/method.md §Knowledge attribution (SAIG)): one full forward+backward per
(baseline, layer, step).

Slow by design. It is the oracle for the fast engine's tests and the benchmark's baseline.
"""

from __future__ import annotations

import torch

from matrice.method.attribution.common import (AttributionConfig, all_layers, answer_probability, integrate,
                                               over_answer_tokens, query_activations, step_points)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import neuron_hooks, replace_with


def reference_attribution(
    adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None = None
) -> torch.Tensor:
    """Per-baseline attributions Attr_i(n_j^l): [B, L, N] (float32; unselected layers are 0); with
    ``answer_token: all`` the mean over the answer's tokens, each on the whole teacher-forced sequence."""
    return over_answer_tokens(lambda e: _one_token(adapter, e, cfg, layers), adapter, enc, cfg)


def _one_token(adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None) -> torch.Tensor:
    """The attribution of P(answer_ids[0]) at the target position."""
    ids, original, base = query_activations(adapter, enc, cfg.baseline)  # [1, T], [L, N], [B, L, N]
    position = torch.tensor([enc.target_pos])
    attr = torch.zeros(base.shape, dtype=torch.float32)
    for i in range(base.shape[0]):
        for layer in layers if layers is not None else all_layers(adapter):
            grads = []
            for point in step_points(base[i, layer], original[layer], cfg.steps, cfg.integration):
                value = point[None].clone().requires_grad_(True)
                with neuron_hooks(adapter, position, {layer: replace_with(value)}):
                    logits = adapter.model(input_ids=ids).logits[:, enc.target_pos]
                prob = answer_probability(logits, enc.answer_ids[0])[0]
                grads.append(torch.autograd.grad(prob, value)[0][0].float())
            delta = original[layer] - base[i, layer]
            attr[i, layer] = integrate(delta, torch.stack(grads), cfg.steps, cfg.integration).cpu()
    return attr
