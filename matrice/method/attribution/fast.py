"""Fast exact SAIG: same numbers as `reference.py`, a small fraction of the work.

What it saves (docs/method.md §Knowledge attribution (SAIG) costs m × L × M forward+backward passes per query):
- the (layer, baseline, step) rows of all queries of a shard form one stream cut into batches, so a
  batch may hold several queries;
- the blocks below a row's patched layer are unaffected by the patch: their output is recorded once;
  a row joins the batch at its own layer (no block computes a row it cannot change);
- causal models: positions before the target are unaffected too, so their key/value cache is
  computed once and each row runs a single token (the target) through the network;
- gradients are taken only with respect to the patched activations (parameters are frozen);
- P(y*) only at the target position (one token for causal models; the MLM head on the target row
  only for masked models), with the LM head's softmax and gradient fused (`head.py`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Sequence

import torch

from matrice.method.attribution.common import (
    AttributionConfig,
    all_layers,
    baseline_activations,
    integrate,
    step_points,
)
from matrice.method.attribution.head import fused_answer_probability
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.cache import broadcast_cache
from matrice.models.encoding import answer_steps
from matrice.models.head import head_input, linear_head
from matrice.models.hooks import Edit, instance_forward, neuron_hooks, restore_forward


# SDPA backends the engine's passes may use on a GPU (None: PyTorch's own choice). cuDNN's attention
# is left out: it builds an execution plan per new input shape, and the growing batch gives a new row
# count at almost every block, so plan building (host time) dominated bf16 runs on an H100; the
# flash and memory-efficient kernels need no plan and give the same numbers to float rounding.
CUDA_ATTENTION_BACKENDS: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def attention_kernels(device: torch.device) -> ContextManager[Any]:
    """The engine's SDPA backends on CUDA (`CUDA_ATTENTION_BACKENDS`); elsewhere nothing changes."""
    if device.type != "cuda" or CUDA_ATTENTION_BACKENDS is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in CUDA_ATTENTION_BACKENDS])


def _hidden(output: Any) -> torch.Tensor:
    """The hidden state of a recorded block output (a tensor, or a tuple whose first item it is)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot replay a block output of type {type(output).__name__}")


def _expand(output: Any, rows: int) -> Any:
    """Broadcast a recorded block output (tensor or tuple whose first item is the hidden state)."""
    hidden = _hidden(output)
    hidden = hidden.expand(rows, *hidden.shape[1:])
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


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


def _rows_of(x: Any, total: int, rows: int) -> Any:
    """The first `rows` of the batch of a block argument built for `total` rows: masks [total, ...],
    BLOOM's alibi [total·heads, ...], (cos, sin) tuples; anything not batched passes unchanged."""
    if isinstance(x, tuple):
        return tuple(_rows_of(item, total, rows) for item in x)
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] >= total and x.shape[0] % total == 0:
        return x[: rows * (x.shape[0] // total)]
    return x


@contextmanager
def _growing_batch(adapter: ModelAdapter, recorded: list[Any], active: list[int], total: int) -> Iterator[None]:
    """Block j runs only the `active[j]` rows patched at a layer <= j (rows are ordered by layer).

    Below its patched layer a row's hidden state is the unpatched one, the same for every row: blocks
    below the chunk's lowest layer return their recorded output, and a row joins the batch at its own
    layer with the recorded input of that block. No block computes a row it cannot change."""
    lowest = next(j for j, n in enumerate(active) if n > 0)
    blocks = adapter.layers
    own = [instance_forward(block) for block in blocks]
    for j in range(lowest):
        blocks[j].forward = lambda *a, _out=_expand(recorded[j], active[lowest]), **k: _out
    for j in range(lowest, len(blocks)):
        joining = None if j == 0 else _hidden(recorded[j - 1])

        def forward(hidden, *args, _j=j, _run=blocks[j].forward, _joining=joining, **kwargs):
            rows = active[_j]
            if hidden.shape[0] < rows:
                extra = _joining.to(hidden.device).expand(rows - hidden.shape[0], *_joining.shape[1:])
                hidden = torch.cat([hidden, extra])
            hidden = hidden[:rows]
            if rows < total:
                args, kwargs = _rows_of(args, total, rows), {k: _rows_of(v, total, rows) for k, v in kwargs.items()}
            return _run(hidden, *args, **kwargs)

        blocks[j].forward = forward
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            restore_forward(block, forward)


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
                adapter.model.base_model(input_ids=self.last, past_key_values=copy.deepcopy(self.cache), use_cache=True)
        self.recorded = recorded
        self.original = torch.stack([cap[l] for l in layers], dim=1)[0]  # [L, N]

    def _cache_for(self, active: list[int]):
        """The prefix cache with layer j broadcast (not copied) to the active[j] rows of that block."""
        return None if self.cache is None else broadcast_cache(self.cache, active)

    def head_inputs(self, active: list[int], edits: dict[int, Edit]) -> torch.Tensor:
        rows = active[-1]
        position = torch.zeros(1, dtype=torch.long)
        with _growing_batch(self.adapter, self.recorded, active, rows), neuron_hooks(self.adapter, position, edits):
            out = self.adapter.model.base_model(
                input_ids=self.last.expand(rows, 1), past_key_values=self._cache_for(active), use_cache=True
            )
        return out.last_hidden_state[:, -1]  # [rows, d]: the head runs as plain GEMMs


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

    def head_inputs(self, active: list[int], edits: dict[int, Edit]) -> torch.Tensor:
        rows = active[-1]
        position = torch.tensor([self.target])
        with _growing_batch(self.adapter, self.recorded, active, rows), neuron_hooks(self.adapter, position, edits):
            hidden = self.adapter.model.base_model(input_ids=self.ids.expand(rows, -1))[0]
        return head_input(self.adapter, hidden[:, self.target])


def _replace_rows(rows: torch.Tensor, values: torch.Tensor) -> Edit:
    """Rows `rows` of the batch get `values` at this layer; the other rows keep their activation."""
    return lambda act: act.index_put((rows.to(act.device),), values.to(act.device, act.dtype))


class _QueryRows:
    """One query's rows (layer, baseline, step), ordered by layer, and the gradients they collect."""

    def __init__(self, adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int]) -> None:
        self.runner = _CausalRunner(adapter, enc) if adapter.causal else _MaskedRunner(adapter, enc)
        self.answer_id = enc.answer_ids[0]
        self.original = self.runner.original
        self.base = baseline_activations(adapter, enc, cfg.baseline, self.original)  # [B, L, N]
        self.layers, self.cfg, self.n_layers = layers, cfg, adapter.n_layers
        self.per_layer = self.base.shape[0] * cfg.steps
        self.points = torch.cat(
            [step_points(self.base[:, l], self.original[l], cfg.steps, cfg.integration).reshape(self.per_layer, -1) for l in layers]
        )
        self.row_layer = torch.tensor(layers).repeat_interleave(self.per_layer)
        self.grads = torch.empty(self.points.shape, dtype=torch.float32, device=self.points.device)

    @property
    def n_rows(self) -> int:
        return self.points.shape[0]

    def forward(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Head inputs of rows start:stop [rows, d] and the patched values they are differentiable in."""
        chunk_layers = self.row_layer[start:stop]
        values, edits = [], {}
        for layer in chunk_layers.unique().tolist():
            local = (chunk_layers == layer).nonzero()[:, 0]
            values.append(self.points[start + local].clone().requires_grad_(True))
            edits[layer] = _replace_rows(local, values[-1])
        active = [int((chunk_layers <= j).sum()) for j in range(self.n_layers)]
        with attention_kernels(self.original.device):
            return self.runner.head_inputs(active, edits), values

    def attributions(self) -> torch.Tensor:
        attr = torch.zeros(self.base.shape, dtype=torch.float32)
        steps = self.cfg.steps
        for k, layer in enumerate(self.layers):
            layer_grads = self.grads[k * self.per_layer : (k + 1) * self.per_layer].reshape(self.base.shape[0], steps, -1)
            delta = self.original[layer] - self.base[:, layer]
            attr[:, layer] = integrate(delta, layer_grads, steps, self.cfg.integration).cpu()
        return attr


def _batches(sizes: Sequence[int], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Cut the queries' rows, in order, into batches of `batch_size` rows: lists of (query, start, stop)."""
    batch, free = [], batch_size
    for query, n_rows in enumerate(sizes):
        start = 0
        while start < n_rows:
            stop = min(n_rows, start + free)
            batch.append((query, start, stop))
            free -= stop - start
            start = stop
            if free == 0:
                yield batch
                batch, free = [], batch_size
    if batch:
        yield batch


def fast_attribution_many(
    adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig, layers: list[int] | None = None
) -> Iterator[torch.Tensor]:
    """Per-baseline attributions [B, L, N] of each query in turn, equal to `reference_attribution`.

    The rows (layer, baseline, step) of all queries form one stream cut into batches of `batch_size`
    rows, so a batch may hold several queries (small models fill the device; no half-empty batch per
    query). Within a batch each query's rows run the blocks from their lowest patched layer up (a row
    joins at its own layer), then every row of the batch goes through one fused LM-head pass and one
    backward. A query's state lives only while its rows are in flight.

    ``answer_token: all``: each query becomes one query per answer token (:func:`answer_steps`, the
    causal ones truncated after the token's gold prefix so the target is last), all in the same
    stream, and a query's map is the mean of its tokens' maps.
    """
    if cfg.answer_token == "first":
        yield from _stream(adapter, encs, cfg, layers)
        return
    steps = [answer_steps(adapter, enc) for enc in encs]
    maps = _stream(adapter, [step for per_query in steps for step in per_query], cfg, layers)
    for per_query in steps:
        yield torch.stack([next(maps) for _ in per_query]).mean(dim=0)


def _stream(adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig, layers: list[int] | None
            ) -> Iterator[torch.Tensor]:
    """Per-baseline attributions [B, L, N] of each query's first answer token, in turn."""
    layers = sorted(layers) if layers is not None else all_layers(adapter)  # rows ordered by layer
    if not layers:
        raise ValueError("no layers to attribute")
    head = linear_head(adapter)
    n_rows = len(layers) * max(1, cfg.steps)
    live: dict[int, _QueryRows] = {}
    sizes = [_n_baselines(enc, cfg) * n_rows for enc in encs]
    done = 0
    for batch in _batches(sizes, cfg.batch_size):
        hidden, values, answers = [], [], []
        for query, start, stop in batch:
            if query not in live:
                live[query] = _QueryRows(adapter, encs[query], cfg, layers)
            h, v = live[query].forward(start, stop)
            hidden.append(h)
            values.append(v)
            answers.append(torch.full((stop - start,), live[query].answer_id, dtype=torch.long))
        prob = fused_answer_probability(torch.cat(hidden), head, torch.cat(answers).to(hidden[0].device))
        grads = iter(torch.autograd.grad(prob.sum(), [v for vs in values for v in vs]))
        for (query, start, stop), vs in zip(batch, values):
            live[query].grads[start:stop] = torch.cat([next(grads).float() for _ in vs])
        while done in live and (done != batch[-1][0] or batch[-1][2] == sizes[done]):
            yield live.pop(done).attributions()
            done += 1


def _n_baselines(enc: Encoded, cfg: AttributionConfig) -> int:
    if cfg.baseline == "saig":
        if not enc.baseline_positions:
            raise ValueError("query has no tokens to build SAIG baselines from")
        return len(enc.baseline_positions)
    return 1


def fast_attribution(
    adapter: ModelAdapter, enc: Encoded, cfg: AttributionConfig, layers: list[int] | None = None
) -> torch.Tensor:
    """Per-baseline attributions Attr_i(n_j^l) of one query: [B, L, N] float32 (see `fast_attribution_many`)."""
    return next(fast_attribution_many(adapter, [enc], cfg, layers))
