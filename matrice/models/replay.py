"""Blocks below an edit return what they returned without it.

An output-weight edit of neurons in layers ≥ l changes nothing below block l: every block under it
sees the same inputs and computes the same outputs as the unedited model. So a pass under the edit
over the same batches as a recorded unedited pass can take those blocks' outputs from the record
and run only blocks l and above (MATRICE's neurons sit mostly in the top layers). The pass must make
the same forward calls in the same order (the same inputs, batched the same way); each replayed
output is checked against the shape of the input it replaces.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from matrice.models.adapter import ModelAdapter
from matrice.models.hooks import instance_forward, restore_forward


def _hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def recorded_blocks(adapter: ModelAdapter) -> Iterator[list[list[Any]]]:
    """``record[j]``: block j's outputs, one per forward call in the block, in call order."""
    record: list[list[Any]] = [[] for _ in adapter.layers]
    handles = [block.register_forward_hook(lambda m, a, out, j=j: record[j].append(out))
               for j, block in enumerate(adapter.layers)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replayed_below(adapter: ModelAdapter, record: list[list[Any]], layer: int) -> Iterator[None]:
    """Within the block, blocks ``j < layer`` return their next recorded output instead of computing.
    ``layer`` 0 (or a record that is None) replays nothing."""
    if record is None or layer <= 0:
        yield
        return
    blocks = adapter.layers
    own = [instance_forward(blocks[j]) for j in range(layer)]
    calls = [iter(record[j]) for j in range(layer)]

    def replay(j: int):
        def forward(hidden, *args, **kwargs):
            try:
                out = next(calls[j])
            except StopIteration:
                raise RuntimeError(f"block {j}: more forward calls than were recorded") from None
            if _hidden(out).shape != hidden.shape:
                raise RuntimeError(f"block {j}: replayed output {tuple(_hidden(out).shape)} for an input of "
                                   f"{tuple(hidden.shape)}: the pass is not the recorded one")
            return out
        return forward

    for j in range(layer):
        blocks[j].forward = replay(j)
    try:
        yield
    finally:
        for j in range(layer):
            restore_forward(blocks[j], own[j])
