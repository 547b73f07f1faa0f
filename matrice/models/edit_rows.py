"""Rows of different output-weight edits in one forward: each row adds its own rank-k change.

An edit replaces k neurons' output vectors (columns w_j of a layer's FFN output projection W) by
v_j: (W + ΔW) a = W a + Σ_j a_j (v_j − w_j). So a batch whose rows carry different edits (a fact's
erasure and update by every method, every λ of the sweep) runs the unedited projection once and
adds, row by row, its own edit's k-term correction: the passes of many edits share every matmul,
where applying each edit to the weights needs one forward per edit. Exact up to the rounding of
the added term (the sum is formed in a different order than (W + ΔW) a).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from matrice.interventions import checked_output_vector
from matrice.models.adapter import ModelAdapter


@dataclass(frozen=True)
class LayerDelta:
    """One layer's part of an edit: the neurons whose output vectors change and v_j − w_j per neuron."""

    neurons: torch.Tensor  # [k] long
    delta: torch.Tensor  # [k, d]


def output_deltas(adapter: ModelAdapter, vectors: Mapping[tuple[int, int], torch.Tensor]) -> dict[int, LayerDelta]:
    """The edit that sets each (layer, neuron)'s output vector to ``vectors[(l, i)]`` (as
    :func:`matrice.interventions.edited_output_weights` would), as per-layer deltas from the
    current weights."""
    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (layer, neuron), vector in vectors.items():
        current = checked_output_vector(adapter, layer, neuron, vector)
        by_layer.setdefault(int(layer), []).append(
            (int(neuron), vector.to(device=current.device, dtype=current.dtype) - current.detach()))
    out = {}
    for layer, cells in sorted(by_layer.items()):
        device = cells[0][1].device
        out[layer] = LayerDelta(torch.tensor([n for n, _ in cells], device=device),
                                torch.stack([d for _, d in cells]))
    return out


class RowEdits:
    """Which edit each row of the next forward call carries: ``rows[b]`` indexes the edits (−1: none).
    Callers set it before each forward call of the body (a prefix pass, then its queries); the call
    uses it and clears it, so a call whose rows were not assigned raises instead of reusing an
    assignment made for other rows."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def set(self, rows: Sequence[int] | torch.Tensor) -> None:
        self.rows = torch.as_tensor(rows, dtype=torch.long)


@contextmanager
def per_row_output_deltas(adapter: ModelAdapter, edits: Sequence[Mapping[int, LayerDelta]]) -> Iterator[RowEdits]:
    """Within the block, every touched layer's output projection adds to row b the correction of
    ``edits[rows.rows[b]]`` (the yielded :class:`RowEdits`), at every position of the row."""
    config = adapter.model.config
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise ValueError("per-row output deltas: BLOOM with pretraining_tp > 1 and slow_but_exact computes its "
                         "output projection without calling it, so the correction would never be added; "
                         "use edit.edits_per_pass: 1 (the weights edited)")
    state = RowEdits()
    layers = sorted({layer for edit in edits for layer in edit})

    def hook_for(layer: int):
        present = [(e, edit[layer]) for e, edit in enumerate(edits) if layer in edit]

        def hook(module, args, out):
            if state.rows is None:
                raise RuntimeError("per-row output deltas: no row assignment set before the forward call")
            x = args[0].to(out.device)  # a model spread over devices: the block's own device
            if state.rows.numel() != x.shape[0]:
                raise RuntimeError(f"per-row output deltas: {state.rows.numel()} row assignments for a batch of "
                                   f"{x.shape[0]} rows")
            rows = state.rows.to(out.device)
            out = out.clone()
            for e, d in present:
                members = torch.nonzero(rows == e).flatten()
                if members.numel():
                    part = x.index_select(0, members).index_select(-1, d.neurons.to(out.device))
                    out.index_add_(0, members, (part @ d.delta.to(device=out.device, dtype=x.dtype)).to(out.dtype))
            return out

        return hook

    def clear(module, args, out):
        state.rows = None

    handles = [adapter.out_proj(layer).register_forward_hook(hook_for(layer)) for layer in layers]
    handles.append(adapter.model.base_model.register_forward_hook(clear))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
