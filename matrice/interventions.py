"""Output-weight edits of knowledge neurons (erasure and update, paper Eq. 15), restored bit for bit.
Neuron-masked fine-tuning is `matrice.finetune`.

An edit changes a neuron's *output vector* only: column i of layer l's FFN output projection for
neuron n_i^l (row i of GPT-2's Conv1D ``c_proj``); a neuron's parameters are defined in
`matrice.finetune` (docs/method.md §Objects).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from matrice.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

Pairs = np.ndarray | Sequence[tuple[int, int]]


class WeightRestoreError(RuntimeError):
    """An edited weight did not come back bit-for-bit: later results would be contaminated."""


def _pairs(neurons: Pairs) -> list[tuple[int, int]]:
    arr = np.asarray(neurons, dtype=np.int64).reshape(-1, 2) if len(neurons) else np.zeros((0, 2), np.int64)
    return [(int(l), int(i)) for l, i in arr]


def neurons_by_layer(neurons: Pairs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, idx in _pairs(neurons):
        out.setdefault(layer, []).append(idx)
    return {layer: sorted(set(idx)) for layer, idx in sorted(out.items())}


# ---- output-weight edits (knowledge erasure / update, paper Eq. 15) -------------------------

def erasure_vectors(adapter: ModelAdapter, neurons: Pairs) -> dict[tuple[int, int], torch.Tensor]:
    """Erasure: each neuron's output vector becomes 0."""
    return {(l, i): torch.zeros_like(adapter.output_weight(l, i)) for l, i in _pairs(neurons)}


UPDATE_SCALINGS = ("raw", "column_norm")


def answer_direction(adapter: ModelAdapter, answer: int | Sequence[int]) -> torch.Tensor:
    """E(o), float32: the unembedding row of o's first token (an int), or for a whole answer (its token
    ids) the mean of its tokens' rows: every token of o' is pushed up, each by about 1/K of a row
    (docs/method.md, Whole answers)."""
    if isinstance(answer, (int, np.integer)):
        return adapter.unembedding(int(answer)).detach().float()
    return torch.stack([adapter.unembedding(int(t)).detach().float() for t in answer]).mean(dim=0)


def update_vectors(
    adapter: ModelAdapter, neurons: Pairs, old_token: int | Sequence[int], new_token: int | Sequence[int],
    lambda1: float = 1.0, lambda2: float = 1.0, scaling: str = "raw",
) -> dict[tuple[int, int], torch.Tensor]:
    """Update: ``W − λ1·E(o) + λ2·E(o')`` (Eq. 15; ``scaling="raw"``, the default, as Dai et al.'s
    code adds raw embeddings), or with ``scaling="column_norm"`` λk' = λk·‖W‖/‖E‖ per column, so each
    term has norm λk·‖W‖ (our option: the same λ means the same relative change in every layer).

    E is the output (unembedding) row of a token, or the mean row of a whole answer's tokens
    (:func:`answer_direction`). Computed in float32, cast to the weight's dtype.
    With column_norm, a column with ‖W‖ = 0 is left unchanged (both terms vanish).
    """
    if scaling not in UPDATE_SCALINGS:
        raise ValueError(f"update scaling must be one of {UPDATE_SCALINGS}, got {scaling!r}")
    e_old, e_new = answer_direction(adapter, old_token), answer_direction(adapter, new_token)
    n_old, n_new = e_old.norm(), e_new.norm()
    if n_old == 0 or n_new == 0:
        raise ValueError(f"token {old_token if n_old == 0 else new_token} has a zero unembedding vector")
    out = {}
    for l, i in _pairs(neurons):
        w = adapter.output_weight(l, i)
        w32 = w.detach().float()
        k_old, k_new = (lambda1, lambda2) if scaling == "raw" else (lambda1 * w32.norm() / n_old, lambda2 * w32.norm() / n_new)
        new = w32 - k_old * e_old.to(w.device) + k_new * e_new.to(w.device)
        out[(l, i)] = new.to(w.dtype)
    return out


def checked_output_vector(adapter: ModelAdapter, layer: int, neuron: int, vector: torch.Tensor) -> torch.Tensor:
    """The neuron's current output vector (a view of the weight), once ``vector`` is known to fit it."""
    view = adapter.output_weight(layer, neuron)
    if vector.shape != view.shape:
        raise ValueError(f"neuron ({layer}, {neuron}): new output vector has shape {tuple(vector.shape)}, "
                         f"expected {tuple(view.shape)}")
    return view


@contextmanager
def edited_output_weights(adapter: ModelAdapter, vectors: Mapping[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Within the block, each (layer, neuron)'s output vector is replaced by ``vectors[(l, i)]``.

    The whole weight of every touched output projection is snapshotted (a copy on its device) and
    copied back on exit — also when the body raises — then checked with ``torch.equal``; a
    mismatch raises :class:`WeightRestoreError`.
    """
    layers = sorted({l for l, _ in vectors})
    saved = {l: adapter.out_proj(l).weight.detach().clone() for l in layers}
    try:
        with torch.no_grad():
            for (l, i), v in vectors.items():
                view = checked_output_vector(adapter, l, i, v)
                view.copy_(v.to(device=view.device, dtype=view.dtype))
        yield
    finally:
        with torch.no_grad():
            for l in layers:
                adapter.out_proj(l).weight.data.copy_(saved[l])
        bad = [l for l in layers if not torch.equal(adapter.out_proj(l).weight.data, saved[l])]
        if bad:
            raise WeightRestoreError(f"output projection weights of layers {bad} were not restored bit-for-bit")
