"""P(answer) of many (query, neuron scaling) rows in full batches over each prompt's cached prefix.

Suppression and enhancement (Fig. 5, the controls) scale a few neurons at the target position only,
so every position before the target is the unedited model's: a chunk of queries runs its prompts
minus the last token once, and each (query, scaling set) row then runs the last token alone on its
query's cached keys and values, with its own scalings (a per-row edit, so rows of different facts
and methods share one forward). Rows of all facts together fill batches that one fact's few queries
could not; the LM head, the costliest matmul per row, runs at its large-batch rate.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import Edit, neuron_hooks
from matrice.models.predict import (
    AnswerScore, _accepts_position_ids, _left_padded, _scores_from_logits, greedy_decode, length_buckets,
    score_answers,
)

Scaling = tuple[int, int, float]  # (layer, neuron, factor)


@torch.no_grad()
def score_scaled_rows(
    adapter: ModelAdapter,
    encs: Sequence[Encoded],
    scalings: Sequence[Sequence[Scaling]],
    rows: Sequence[tuple[int, int]],
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: str | None = None,
) -> list[AnswerScore]:
    """Score of ``encs[q]`` with the neuron scalings ``scalings[k]`` at its target, for every row
    ``(q, k)`` of ``rows``, in the order of ``rows``. An empty scaling set is the unedited model.
    ``progress``: a progress-bar label (None: no bar)."""
    if not rows:
        return []
    if not _last_token_targets(adapter, encs, rows):
        return _per_scaling_set(adapter, encs, scalings, rows, batch_size)
    out: list[AnswerScore | None] = [None] * len(rows)
    for prefix, local, part in _passes(adapter, encs, rows, batch_size, rows_per_pass, progress):
        logits = prefix.last_token_logits([local[rows[r][0]] for r in part], [scalings[rows[r][1]] for r in part])
        for r, score in zip(part, _scores_from_logits(logits, [encs[rows[r][0]] for r in part])):
            out[r] = score
    return out  # type: ignore[return-value]


@torch.no_grad()
def decode_scaled_rows(
    adapter: ModelAdapter,
    encs: Sequence[Encoded],
    scalings: Sequence[Sequence[Scaling]],
    rows: Sequence[tuple[int, int]],
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: str | None = None,
) -> list[list[int]]:
    """Greedy tokens (as many as the gold answer has) of ``encs[q]`` with the scalings ``scalings[k]``
    at its target (later tokens unedited, as :func:`matrice.models.predict.greedy_decode` does), for
    every row ``(q, k)``, in the order of ``rows``."""
    if not rows:
        return []
    if not _last_token_targets(adapter, encs, rows):
        return _per_scaling_set(adapter, encs, scalings, rows, batch_size, decode=True)
    out: list[list[int] | None] = [None] * len(rows)
    for prefix, local, part in _passes(adapter, encs, rows, batch_size, rows_per_pass, progress):
        tokens = prefix.greedy([local[rows[r][0]] for r in part], [scalings[rows[r][1]] for r in part],
                               [len(encs[rows[r][0]].answer_ids) for r in part])
        for r, generated in zip(part, tokens):
            out[r] = generated
    return out  # type: ignore[return-value]


def _last_token_targets(adapter: ModelAdapter, encs: Sequence[Encoded], rows: Sequence[tuple[int, int]]) -> bool:
    return adapter.causal and all(len(encs[q].input_ids) > 1 and encs[q].target_pos == len(encs[q].input_ids) - 1
                                  for q, _ in rows)


def _passes(adapter: ModelAdapter, encs: Sequence[Encoded], rows: Sequence[tuple[int, int]], batch_size: int,
            rows_per_pass: int, progress: str | None):
    """(prefix of a chunk of queries, query -> its index in the chunk, row indices) per forward:
    queries in length buckets, then their rows in passes of at most ``rows_per_pass``."""
    rows_of: dict[int, list[int]] = defaultdict(list)
    for r, (q, _) in enumerate(rows):
        rows_of[q].append(r)
    queries = sorted(rows_of)
    buckets = length_buckets([encs[q] for q in queries], batch_size)
    for bucket in tqdm(buckets, desc=progress, unit="batch", disable=progress is None):
        chunk = [queries[i] for i in bucket]
        prefix = _Prefix(adapter, [encs[q] for q in chunk])
        local = {q: i for i, q in enumerate(chunk)}
        chunk_rows = [r for q in chunk for r in rows_of[q]]
        for start in range(0, len(chunk_rows), rows_per_pass):
            yield prefix, local, chunk_rows[start : start + rows_per_pass]


class _Prefix:
    """A chunk of prompts minus their last token, computed once (left-padded, unedited)."""

    def __init__(self, adapter: ModelAdapter, chunk: Sequence[Encoded]) -> None:
        self.adapter = adapter
        self.pass_positions = _accepts_position_ids(adapter.model)
        ids, mask = _left_padded([e.input_ids[:-1] for e in chunk], adapter.pad_token_id, adapter.device)
        self.mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.last = torch.tensor([[e.input_ids[-1]] for e in chunk], device=adapter.device)
        self.cache = adapter.model.base_model(
            input_ids=ids, attention_mask=mask, use_cache=True,
            **({"position_ids": self.positions[:, :-1]} if self.pass_positions else {})).past_key_values

    def last_token_logits(self, members: Sequence[int], row_scalings: Sequence[Sequence[Scaling]]) -> torch.Tensor:
        """Logits [R, V] of the target token of prompt ``members[r]`` under ``row_scalings[r]``."""
        step, _ = self._target_step(members, row_scalings)
        return self.adapter.head_logits(step.last_hidden_state[:, -1]).float()

    def greedy(self, members: Sequence[int], row_scalings: Sequence[Sequence[Scaling]],
               lengths: Sequence[int]) -> list[list[int]]:
        """``lengths[r]`` greedy tokens of prompt ``members[r]``, scaled at the target only; the LM
        head runs only for rows still decoding."""
        step, sel = self._target_step(members, row_scalings)
        tokens = self.adapter.head_logits(step.last_hidden_state[:, -1]).argmax(dim=-1)
        mask, position = self.mask[sel], self.positions[sel, -1:]
        need = torch.tensor(list(lengths), device=tokens.device)
        generated = [[int(t)] for t in tokens.tolist()]
        for k in range(1, int(need.max())):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            step = self.adapter.model.base_model(
                input_ids=tokens[:, None], attention_mask=mask, past_key_values=step.past_key_values, use_cache=True,
                **({"position_ids": position} if self.pass_positions else {}))
            live = need > k
            hidden = step.last_hidden_state[:, -1]
            tokens = tokens.clone()
            tokens[live] = self.adapter.head_logits(hidden[live.to(hidden.device)]).argmax(dim=-1).to(tokens.device)
            for r in torch.nonzero(live).flatten().tolist():
                generated[r].append(int(tokens[r]))
        return generated

    def _target_step(self, members: Sequence[int], row_scalings: Sequence[Sequence[Scaling]]):
        sel = torch.tensor(members, device=self.mask.device)
        with neuron_hooks(self.adapter, torch.zeros(1, dtype=torch.long), per_row_scalings(row_scalings)):
            step = self.adapter.model.base_model(
                input_ids=self.last[sel], attention_mask=self.mask[sel], past_key_values=cache_rows(self.cache, sel),
                use_cache=True, **({"position_ids": self.positions[sel, -1:]} if self.pass_positions else {}))
        return step, sel


def cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache whose row r is ``cache``'s row rows[r]; ``cache`` itself is left as it was (the
    forward appends to the new one)."""
    memo = {id(t): t for layer in cache.layers for t in (layer.keys, layer.values)}
    fresh = copy.deepcopy(cache, memo)  # the structure, not the tensors
    for layer in fresh.layers:
        layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
        layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return fresh


def per_row_scalings(row_scalings: Sequence[Sequence[Scaling]]) -> dict[int, Edit]:
    """Per layer, an edit that multiplies row r's neurons by row r's factors (other rows untouched)."""
    cells: dict[int, tuple[list[int], list[int], list[float]]] = defaultdict(lambda: ([], [], []))
    for row, scaling in enumerate(row_scalings):
        for layer, neuron, factor in scaling:
            rows_, neurons, factors = cells[int(layer)]
            rows_.append(row), neurons.append(int(neuron)), factors.append(float(factor))

    def scale(rows_: list[int], neurons: list[int], factors: list[float]) -> Edit:
        r, n, f = torch.tensor(rows_), torch.tensor(neurons), torch.tensor(factors)

        def edit(act: torch.Tensor) -> torch.Tensor:
            out = act.clone()
            ri, ni = r.to(act.device), n.to(act.device)
            out[ri, ni] = out[ri, ni] * f.to(device=act.device, dtype=act.dtype)
            return out

        return edit

    return {layer: scale(*c) for layer, c in cells.items()}


def scaling_set(pairs: Any, factor: float) -> list[Scaling]:
    """(layer, neuron) pairs (an array or a list) all scaled by ``factor``."""
    listed = pairs.tolist() if hasattr(pairs, "tolist") else pairs
    return [(int(layer), int(neuron), float(factor)) for layer, neuron in listed]


def _per_scaling_set(adapter: ModelAdapter, encs: Sequence[Encoded], scalings: Sequence[Sequence[Scaling]],
                     rows: Sequence[tuple[int, int]], batch_size: int, decode: bool = False) -> list:
    """Masked models (the target is inside the prompt): one scoring (or decoding) pass per scaling set."""
    from matrice.models.hooks import scale_neurons

    run = greedy_decode if decode else score_answers
    out: list = [None] * len(rows)
    by_set: dict[int, list[int]] = defaultdict(list)
    for r, (_, k) in enumerate(rows):
        by_set[k].append(r)
    for k, members in by_set.items():
        layers: dict[int, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
        for layer, neuron, factor in scalings[k]:
            layers[int(layer)][float(factor)].append(int(neuron))
        edits = {layer: _chain([scale_neurons(torch.tensor(n), f) for f, n in by_factor.items()])
                 for layer, by_factor in layers.items()}
        for r, value in zip(members, run(adapter, [encs[rows[r][0]] for r in members], edits or None, batch_size)):
            out[r] = value
    return out


def _chain(edits: Sequence[Edit]) -> Edit:
    def edit(act: torch.Tensor) -> torch.Tensor:
        for e in edits:
            act = e(act)
        return act

    return edit
