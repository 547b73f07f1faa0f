"""P(answer) of many (query, neuron scaling) rows in full batches over each prompt's cached prefix.

Suppression and enhancement (Fig. 5, the controls) scale a few neurons at the target position only,
so every position before the target is the unedited model's: a chunk of queries runs its prompts
minus the last token once, and each (query, scaling set) row then runs the last token alone on its
query's cached keys and values, with its own scalings (a per-row edit, so rows of different facts
and methods share one forward). Rows of all facts together fill batches that one fact's few queries
could not; the LM head, the costliest matmul per row, runs at its large-batch rate.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import Edit, scale_neurons
from matrice.models.predict import (
    AnswerScore, PromptCache, _scores_from_logits, greedy_decode, length_buckets, score_answers,
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
    def run(prompts: PromptCache, members: list[int], edits: dict[int, Edit], part: list[int]) -> list[AnswerScore]:
        return _scores_from_logits(prompts.target_logits(members, edits), [encs[rows[r][0]] for r in part])

    return _each_row(adapter, encs, scalings, rows, batch_size, rows_per_pass, progress, run, score_answers)


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
    def run(prompts: PromptCache, members: list[int], edits: dict[int, Edit], part: list[int]) -> list[list[int]]:
        return prompts.greedy(members, edits, [len(encs[rows[r][0]].answer_ids) for r in part])

    return _each_row(adapter, encs, scalings, rows, batch_size, rows_per_pass, progress, run, greedy_decode)


def _each_row(adapter: ModelAdapter, encs: Sequence[Encoded], scalings: Sequence[Sequence[Scaling]],
              rows: Sequence[tuple[int, int]], batch_size: int, rows_per_pass: int, progress: str | None,
              run: Callable[[PromptCache, list[int], dict[int, Edit], list[int]], list],
              plain: Callable[..., list]) -> list:
    """``run(prompts, members, edits, row indices)`` over every pass of rows (queries in length
    buckets, each bucket's prompts run once, its rows in passes of at most ``rows_per_pass``), the
    results in the order of ``rows``. Masked models (the target is inside the prompt): ``plain``
    (the scorer or the decoder) once per scaling set."""
    if not rows:
        return []
    if not (adapter.causal and all(len(encs[q].input_ids) > 1 and encs[q].target_pos == len(encs[q].input_ids) - 1
                                   for q, _ in rows)):
        return _per_scaling_set(adapter, encs, scalings, rows, batch_size, plain)
    rows_of: dict[int, list[int]] = defaultdict(list)
    for r, (q, _) in enumerate(rows):
        rows_of[q].append(r)
    queries = sorted(rows_of)
    out: list = [None] * len(rows)
    for bucket in tqdm(length_buckets([encs[q] for q in queries], batch_size), desc=progress, unit="batch",
                       disable=progress is None):
        chunk = [queries[i] for i in bucket]
        prompts = PromptCache(adapter, [encs[q] for q in chunk])
        local = {q: i for i, q in enumerate(chunk)}
        chunk_rows = [r for q in chunk for r in rows_of[q]]
        for start in range(0, len(chunk_rows), rows_per_pass):
            part = chunk_rows[start : start + rows_per_pass]
            edits = per_row_scalings([scalings[rows[r][1]] for r in part])
            for r, value in zip(part, run(prompts, [local[rows[r][0]] for r in part], edits, part)):
                out[r] = value
    return out


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
                     rows: Sequence[tuple[int, int]], batch_size: int, run: Callable[..., list]) -> list:
    """One ``run`` (score_answers or greedy_decode) per scaling set, over that set's queries."""
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
