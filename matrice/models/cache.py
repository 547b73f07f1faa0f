"""A prompt's key/value cache shared by many rows that each run one more token.

Attribution rows and degenerate-neuron candidate groups run the answer position of one prompt many
times with different neuron edits. The prompt's positions are unaffected
by those edits, so its cache is computed once and each batch attends to it by broadcasting (a view,
no per-row copy of the keys and values). Rows gathered from a cache, and a batch tiled once per
edit, are here too.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch


def broadcast_cache(cache: Any, rows: int | Sequence[int]) -> Any:
    """A fresh cache (the model appends the new token's keys to it, so the shared one is never
    touched) whose layer j holds the prefix broadcast to `rows` rows, or to `rows[j]` rows when one
    count per layer is given (blocks that run only some of the batch's rows)."""
    fresh = copy.deepcopy(cache)
    per_layer = [rows] * len(fresh.layers) if isinstance(rows, int) else list(rows)
    if len(per_layer) != len(fresh.layers):
        raise ValueError(f"{len(per_layer)} row counts for a cache of {len(fresh.layers)} layers")
    for layer, n in zip(fresh.layers, per_layer):
        if n > 1:
            layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            layer.values = layer.values.expand(n, *layer.values.shape[1:])
    return fresh


def cache_rows(cache: Any, rows: Any) -> Any:
    """A new cache whose row r is ``cache``'s row rows[r] (a tensor of indices); ``cache`` itself is
    left as it was (the forward appends to the new one)."""
    memo = {id(t): t for layer in cache.layers for t in (layer.keys, layer.values)}
    fresh = copy.deepcopy(cache, memo)  # the structure, not the tensors
    for layer in fresh.layers:
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return fresh


def tiled(value: Any, copies: int) -> Any:
    """``copies`` copies of a tensor (or of each tensor of a tuple) one after the other along the
    batch (dim 0): a batch repeated once per edit (:func:`matrice.models.predict.target_hidden_copies`,
    and the recorded blocks :func:`matrice.models.replay.replayed_below` returns for it)."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(tiled(v, copies) for v in value)
    return value
