"""Blocks below an edit return what they returned without it.

An output-weight edit of neurons in layers ≥ l changes nothing below block l: every block under it
sees the same inputs and computes the same outputs as the unedited model. So a pass under the edit
over the same batches as a recorded unedited pass can take those blocks' outputs from the record
and run only blocks l and above (MATRICE's neurons sit mostly in the top layers). The pass must make
the same forward calls in the same order (the same inputs, batched the same way); each replayed
output is checked against the shape of the input it replaces.

Passes that keep a key/value cache (a demonstration prefix computed once and gathered to its
queries) need the replayed blocks' cache entries too: the record keeps the keys and values each
block wrote into the cache, and the replay writes them into the edited pass's cache, so the blocks
above, the gathering of a prefix cache and the next call's mask see the cache they would have seen.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache

from matrice.models.adapter import ModelAdapter
from matrice.models.cache import tiled
from matrice.models.hooks import instance_forward, restore_forward


@dataclass(frozen=True)
class CacheWrite:
    """One `Cache.update` a block made: the layer it wrote and the exact arguments."""

    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class BlockCall:
    """A block's output in one forward call and what it wrote into the call's cache (empty without one)."""

    output: Any
    cache_writes: tuple[CacheWrite, ...]


def _hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _cache_in(args: tuple, kwargs: dict) -> Cache | None:
    """The key/value cache a block was handed, whatever the family calls the argument."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)


@contextmanager
def recorded_blocks(adapter: ModelAdapter) -> Iterator[list[list[BlockCall]]]:
    """``record[j]``: block j's calls (output and cache writes), one per forward call, in call order."""
    record: list[list[BlockCall]] = [[] for _ in adapter.layers]
    writes: list[CacheWrite] = []  # the running block's cache writes (blocks do not nest)
    real_update = Cache.update

    def update(cache, key_states, value_states, layer_idx, *args, **kwargs):
        writes.append(CacheWrite(int(layer_idx), key_states, value_states, args, kwargs))
        return real_update(cache, key_states, value_states, layer_idx, *args, **kwargs)

    def before(module, args):
        writes.clear()

    def after(j):
        def hook(module, args, out):
            record[j].append(BlockCall(out, tuple(writes)))
            writes.clear()
        return hook

    handles = [h for j, block in enumerate(adapter.layers)
               for h in (block.register_forward_pre_hook(before), block.register_forward_hook(after(j)))]
    Cache.update = update
    try:
        yield record
    finally:
        Cache.update = real_update
        for handle in handles:
            handle.remove()


@contextmanager
def replayed_below(adapter: ModelAdapter, record: list[list[BlockCall]] | None, layer: int,
                   copies: int = 1) -> Iterator[None]:
    """Within the block, blocks ``j < layer`` return their next recorded output, and write their
    recorded keys and values into the call's cache, instead of computing. ``layer`` 0 (or a record
    that is None) replays nothing. ``copies``: each call's batch is the recorded one repeated that
    many times along the batch (rows of several edits, :mod:`matrice.models.edit_rows`), and so is
    what the replay returns and writes."""
    if record is None or layer <= 0:
        yield
        return
    blocks = adapter.layers
    own = [instance_forward(blocks[j]) for j in range(layer)]
    calls = [iter(record[j]) for j in range(layer)]

    def replay(j: int):
        def forward(hidden, *args, **kwargs):
            try:
                call = next(calls[j])
            except StopIteration:
                raise RuntimeError(f"block {j}: more forward calls than were recorded") from None
            output = tiled(call.output, copies)
            if _hidden(output).shape != hidden.shape:
                raise RuntimeError(f"block {j}: replayed output {tuple(_hidden(output).shape)} for an input of "
                                   f"{tuple(hidden.shape)}: the pass is not the recorded one")
            cache = _cache_in(args, kwargs)
            if (cache is None) != (not call.cache_writes):
                raise RuntimeError(f"block {j}: the recorded call {'wrote' if call.cache_writes else 'had'} no cache "
                                   "where this one has one (or the reverse): the pass is not the recorded one")
            for w in call.cache_writes:
                cache.update(tiled(w.keys, copies), tiled(w.values, copies), w.layer_idx, *w.args, **w.kwargs)
            return output
        return forward

    for j in range(layer):
        blocks[j].forward = replay(j)
    try:
        yield
    finally:
        for j in range(layer):
            restore_forward(blocks[j], own[j])
