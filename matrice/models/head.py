"""The LM head as one linear map over the vocabulary, read chunk by chunk.

The vocabulary projection of a multilingual model is its largest matrix (Gemma 3 270M: 262,144 ×
640). Whoever needs only P(y*) at a position, or its gradient (the attribution's fused head,
:mod:`matrice.method.attribution.head`), can walk it in vocabulary chunks with an online softmax (as in
flash attention) and never hold the [rows, V] logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from matrice.models.adapter import ModelAdapter
from matrice.models.hooks import instance_forward, restore_forward


@dataclass(frozen=True)
class LinearHead:
    """The vocabulary projection: logits = cap·tanh((h·Wᵀ + b)/cap) (no tanh when cap is None)."""

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None  # [V]
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = nn.functional.linear(hidden, self.weight, self.bias)
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z


def linear_head(adapter: ModelAdapter) -> LinearHead:
    """The model's final vocabulary projection (the `decoder` of a masked LM's head)."""
    out = adapter.model.get_output_embeddings()
    if not isinstance(out, nn.Linear):
        raise TypeError(f"output embeddings of {type(adapter.model).__name__} are {type(out).__name__}, not Linear")
    cap = getattr(adapter.model.config, "final_logit_softcapping", None) if adapter.causal else None
    return LinearHead(out.weight, out.bias, float(cap) if cap else None)


@contextmanager
def _bypass(module: nn.Module) -> Iterator[None]:
    own = instance_forward(module)
    module.forward = lambda x, *a, **k: x
    try:
        yield
    finally:
        restore_forward(module, own)


def head_input(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """What the vocabulary projection receives: the final hidden state for causal models; for masked
    models the MLM head's transform (dense, activation, norm), i.e. the head with its decoder bypassed."""
    if adapter.causal:
        return hidden
    with _bypass(adapter.model.get_output_embeddings()):
        return adapter.mlm_head()(hidden)


def default_chunk(device: torch.device) -> int:
    """Vocabulary rows per chunk: a [128, 2048] float32 block (1 MiB) stays in a CPU core's cache;
    a GPU wants fewer, larger launches."""
    return 2048 if device.type == "cpu" else 32768


def checked_ids(answer_ids: torch.Tensor, vocab: int) -> None:
    if int(answer_ids.min()) < 0 or int(answer_ids.max()) >= vocab:
        raise ValueError(f"answer ids {answer_ids.unique().tolist()} are outside the vocabulary of size {vocab}")


def chunk_logits(hidden: torch.Tensor, head: LinearHead, chunk: int
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(first vocabulary row, W_c, l_c float32, l'(z_c) or None without a soft cap) chunk by chunk."""
    weight = head.weight
    for start in range(0, weight.shape[0], chunk):
        w_chunk = weight[start : start + chunk]
        z = nn.functional.linear(hidden, w_chunk, None if head.bias is None else head.bias[start : start + chunk]).float()
        if head.softcap:
            t = torch.tanh(z / head.softcap)
            yield start, w_chunk, t * head.softcap, 1.0 - t * t
        else:
            yield start, w_chunk, z, None


@torch.no_grad()
def answer_probabilities(hidden: torch.Tensor, head: LinearHead, answer_ids: int | Sequence[int] | torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """P(y*) [R] (float64) from head inputs [R, d], without a gradient and without the [R, V] logits.

    For a search that reads only P (degenerate neurons: P under each candidate suppression): a
    float64 softmax over the materialised logits of 256 rows took longer than the head's matmul on
    the CPU. Here an online softmax per vocabulary chunk (logits, soft cap and exponentials in
    float32), the running sum in float64 from float32 chunk sums: within 1e-6 of the float64 softmax
    of the same logits where they are small, a few 1e-6 where they span ±50 (the answer's distance
    from the maximum is taken in float32); tested. ``answer_ids``: one id, or one per row."""
    hidden = hidden.to(head.weight.device)
    ids = torch.as_tensor(answer_ids, dtype=torch.long, device=hidden.device).expand(hidden.shape[0])
    checked_ids(ids, head.weight.shape[0])
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    answer_logit = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    running_max = torch.full((hidden.shape[0],), float("-inf"), dtype=torch.float32, device=hidden.device)
    total = torch.zeros(hidden.shape[0], dtype=torch.float64, device=hidden.device)  # Σ_v exp(l_v − max)
    for start, w_chunk, logit, _ in chunk_logits(hidden, head, chunk or default_chunk(hidden.device)):
        new_max = torch.maximum(running_max, logit.amax(dim=1))
        total = total * torch.exp((running_max - new_max).double()) + (logit - new_max[:, None]).exp_().sum(dim=1).double()
        here = (ids >= start) & (ids < start + w_chunk.shape[0])
        if here.any():
            answer_logit[here] = logit[rows[here], ids[here] - start]
        running_max = new_max
    return torch.exp((answer_logit - running_max).double()) / total
