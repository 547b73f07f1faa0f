"""Read and override FFN neuron activations at each row's target position with forward pre-hooks.

The hook sits on the FFN output projection and sees its input, i.e. exactly the neurons. Every
function here is batched: `positions[b]` is the target position of batch row b (one position: all rows).
A model spread over devices (device_map) runs each block on its own device: edits are moved to the
block's device and captured values come back on `adapter.device`, so callers see one device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch

from matrice.models.adapter import ModelAdapter

Edit = Callable[[torch.Tensor], torch.Tensor]  # [B, N] activations at the target -> replacement [B, N]


def _row_index(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's target is positions[b]; a single position serves every row (batches may vary in size)."""
    rows = torch.arange(x.shape[0], device=x.device)
    positions = positions.to(x.device)
    return rows, positions.expand(x.shape[0]) if positions.numel() == 1 else positions


@contextmanager
def neuron_hooks(
    adapter: ModelAdapter,
    positions: torch.Tensor,
    edits: Mapping[int, Edit] | None = None,
    capture: list[int] | tuple[int, ...] = (),
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, layer l's target-position neurons are replaced by `edits[l](act)` and the
    (possibly edited) values of the layers in `capture` are stored in the yielded dict."""
    edits = dict(edits or {})
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module, args):
            x = args[0]
            rows, pos = _row_index(x, positions)
            if layer in edits:
                new = edits[layer](x[rows, pos]).to(device=x.device, dtype=x.dtype)
                x = x.index_put((rows, pos), new)
            if layer in capture:
                captured[layer] = x[rows, pos].to(adapter.device)
            return (x, *args[1:])

        return hook

    try:
        for layer in sorted(set(edits) | set(capture)):
            handles.append(adapter.out_proj(layer).register_forward_pre_hook(make_hook(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def instance_forward(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The forward a module carries as an instance attribute: accelerate's device hook when the
    model is dispatched over devices. Whoever replaces a module's forward puts this one back."""
    return vars(module).get("forward")


def restore_forward(module: torch.nn.Module, forward: Callable[..., Any] | None) -> None:
    """Undo a temporary `module.forward = ...`: back to `forward` (from `instance_forward`), or to the class's."""
    if forward is None:
        vars(module).pop("forward", None)
    else:
        module.forward = forward


def scale_neurons(neurons: torch.Tensor, factor: float) -> Edit:
    """Multiply the given neuron indices by `factor` (0 suppresses, 2 enhances; docs/method.md
    §Manipulation (Fig. 5))."""

    def edit(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[:, neurons.to(act.device)] = out[:, neurons.to(act.device)] * factor
        return out

    return edit


def replace_with(values: torch.Tensor) -> Edit:
    """Override the whole target-position vector (attribution patches one layer this way)."""
    return lambda act: values


def neuron_edits(neurons: list[tuple[int, int]] | torch.Tensor, factor: float) -> dict[int, Edit]:
    """Group (layer, neuron) pairs by layer into scaling edits."""
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in (neurons.tolist() if hasattr(neurons, "tolist") else neurons):
        by_layer.setdefault(int(layer), []).append(int(neuron))
    return {layer: scale_neurons(torch.tensor(idx), factor) for layer, idx in by_layer.items()}
