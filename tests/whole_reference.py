"""The obvious whole-answer reference for tests: each answer token scored on the whole teacher-forced
sequence with plain forward pre-hooks (no matrice hooks, no step encodings)."""

from __future__ import annotations

import torch

from matrice.models.adapter import Encoded, ModelAdapter


def teacher_forced(adapter: ModelAdapter, enc: Encoded, neurons=(), factor: float = 1.0) -> tuple[float, bool]:
    """(Π_k P(t_k | q, t_<k), every t_k top-1), each token's factor with `neurons` scaled by `factor` at
    the position predicting it only. Causal: the whole sequence; masked: masks filled left to right."""
    prob, top1 = 1.0, True
    for k, token in enumerate(enc.answer_ids):
        position = enc.target_pos + k
        if adapter.causal:
            ids = list(enc.input_ids) + list(enc.answer_ids[:-1])
        else:
            ids = list(enc.input_ids)
            ids[enc.target_pos: enc.target_pos + k] = enc.answer_ids[:k]
        handles = []
        for layer in sorted({int(l) for l, _ in neurons}):
            units = [int(i) for l, i in neurons if l == layer]

            def scale(module, args, units=units):
                x = args[0].clone()
                x[:, position, units] *= factor
                return (x, *args[1:])

            handles.append(adapter.out_proj(layer).register_forward_pre_hook(scale))
        try:
            with torch.no_grad():
                logits = adapter.model(input_ids=torch.tensor([ids], device=adapter.device)).logits[0, position]
        finally:
            for h in handles:
                h.remove()
        prob *= float(torch.softmax(logits.float(), dim=-1)[token])
        top1 = top1 and int(logits.argmax()) == token
    return prob, top1
