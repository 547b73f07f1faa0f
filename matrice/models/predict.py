"""Batched answer probability, rank and greedy-decoding correctness, optionally under neuron edits."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import Edit, neuron_hooks


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B] target position of each row


def pad_batch(sequences: Sequence[Sequence[int]], positions: Sequence[int], pad_id: int, device) -> Batch:
    """Right padding keeps every real token at its own position, so no position ids are needed."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(ids.to(device), mask.to(device), torch.tensor(list(positions), dtype=torch.long, device=device))


def target_logits(adapter: ModelAdapter, batch: Batch, edits: Mapping[int, Edit] | None = None) -> torch.Tensor:
    """Logits [B, V] at each row's target position (float32), with `edits` applied there."""
    with neuron_hooks(adapter, batch.positions, edits):
        return adapter.logits_at(batch.input_ids, batch.attention_mask, batch.positions).float()


@dataclass(frozen=True)
class AnswerScore:
    prob: float  # P(first gold token | query) at the target position
    rank: int  # 0 = the model's top-1 token
    top_token: int


@torch.no_grad()
def score_answers(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32
) -> list[AnswerScore]:
    scores: list[AnswerScore] = []
    for start in range(0, len(encs), batch_size):
        chunk = encs[start : start + batch_size]
        batch = pad_batch([e.input_ids for e in chunk], [e.target_pos for e in chunk], adapter.pad_token_id, adapter.device)
        probs = torch.softmax(target_logits(adapter, batch, edits), dim=-1)
        gold = torch.tensor([e.answer_ids[0] for e in chunk], device=probs.device)
        p_gold = probs.gather(1, gold[:, None])[:, 0]
        ranks = (probs > p_gold[:, None]).sum(dim=1)
        top = probs.argmax(dim=1)
        scores += [AnswerScore(float(p), int(r), int(t)) for p, r, t in zip(p_gold, ranks, top)]
    return scores


def normalize_answer(text: str) -> str:
    """Compare answers on text, not tokens: NFKC, case-folded, no whitespace, no edge punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not ch.isspace())
    return text.strip(".,;:!?\"'()[]「」『』。、・")


@torch.no_grad()
def greedy_decode(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32
) -> list[list[int]]:
    """As many greedy tokens as each gold answer has; edits stay at the original target position."""
    outputs: list[list[int]] = []
    for start in range(0, len(encs), batch_size):
        chunk = encs[start : start + batch_size]
        outputs += _decode_masked(adapter, chunk, edits) if not adapter.causal else _decode_causal(adapter, chunk, edits)
    return outputs


def _decode_causal(adapter: ModelAdapter, chunk: Sequence[Encoded], edits) -> list[list[int]]:
    generated: list[list[int]] = [[] for _ in chunk]
    for step in range(max(len(e.answer_ids) for e in chunk)):
        seqs = [e.input_ids + g for e, g in zip(chunk, generated)]
        batch = pad_batch(seqs, [len(s) - 1 for s in seqs], adapter.pad_token_id, adapter.device)
        edit_pos = torch.tensor([e.target_pos for e in chunk], device=adapter.device)
        with neuron_hooks(adapter, edit_pos, edits):
            logits = adapter.logits_at(batch.input_ids, batch.attention_mask, batch.positions)
        next_ids = logits.argmax(dim=-1).tolist()
        for g, e, tok in zip(generated, chunk, next_ids):
            if step < len(e.answer_ids):
                g.append(int(tok))
    return generated


def _decode_masked(adapter: ModelAdapter, chunk: Sequence[Encoded], edits) -> list[list[int]]:
    batch = pad_batch([e.input_ids for e in chunk], [e.target_pos for e in chunk], adapter.pad_token_id, adapter.device)
    with neuron_hooks(adapter, batch.positions, edits):
        hidden = adapter.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    out = []
    for row, e in enumerate(chunk):
        masks = list(range(e.target_pos, e.target_pos + len(e.answer_ids)))
        out.append(adapter.head_logits(hidden[row, masks]).argmax(dim=-1).tolist())
    return out


def is_correct(adapter: ModelAdapter, generated: Sequence[int], gold_text: str) -> bool:
    return normalize_answer(adapter.tokenizer.decode(list(generated), skip_special_tokens=True)) == normalize_answer(gold_text)
