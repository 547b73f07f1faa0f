"""Batched answer probability, rank and greedy-decoding correctness, optionally under neuron edits."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.cache import cache_rows, tiled
from matrice.models.hooks import Edit, neuron_hooks

HEAD_ROWS = 256  # rows per LM-head call when batches decode in lockstep (the 262,144-token head: ~50 GFLOP/s there, ~30 at 32)


RowsCallback = Callable[[torch.Tensor], None]  # told which copy each row of the next forward call is


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


def length_buckets(encs: Sequence[Encoded], batch_size: int, shared_prefixes: bool = False) -> list[list[int]]:
    """Indices of `encs` in batches of similar length (prompt, then answer): padding is computed and
    thrown away, and dataset order mixes languages whose prompts differ by 2x. With
    ``shared_prefixes`` the queries of one demonstration prefix come together first, so a batch holds
    few distinct prefixes (:func:`_prefill_causal` computes each once). Stable, so equal keys keep
    their order; callers put each result back at its index."""
    def key(i: int) -> tuple:
        e = encs[i]
        if shared_prefixes:
            cut = shared_prefix_length(e)
            return (cut, tuple(e.input_ids[:cut]), len(e.input_ids) - cut, len(e.answer_ids))
        return (len(e.input_ids), len(e.answer_ids))

    order = sorted(range(len(encs)), key=key)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def shared_prefix_length(enc: Encoded) -> int:
    """Tokens before the query's own words: the start token and the one-shot demonstration, the same
    for every query of a (relation, language, template). Any cut of a causal prompt is exact; this one
    is where queries share the most."""
    return max(0, min(min(enc.baseline_positions, default=0), len(enc.input_ids) - 1))


def _in_input_order(n: int, batches: Sequence[Sequence[int]], results: Sequence[Sequence]) -> list:
    out: list = [None] * n
    for idx, res in zip(batches, results):
        for i, r in zip(idx, res):
            out[i] = r
    return out


def target_logits(adapter: ModelAdapter, batch: Batch, edits: Mapping[int, Edit] | None = None) -> torch.Tensor:
    """Logits [B, V] at each row's target position (float32), with `edits` applied there."""
    with neuron_hooks(adapter, batch.positions, edits):
        return adapter.logits_at(batch.input_ids, batch.attention_mask, batch.positions).float()


@dataclass(frozen=True)
class AnswerScore:
    """One query's answer score. First token: P(gold first token) at the target, its rank, the top
    token. A whole answer (:mod:`matrice.models.whole_answer`): the product of its tokens' teacher-forced
    probabilities, rank 0 when every token is top-1 (the greedy output is the answer), the top token of
    each step (``top_token`` the first's, ``top_rest`` the others')."""

    prob: float  # P(first gold token | query) at the target position, or P(whole answer | query)
    rank: int  # 0 = the model's top-1 token (every token's, for a whole answer)
    top_token: int
    top_rest: tuple[int, ...] = ()

    def same_top(self, other: "AnswerScore") -> bool:
        """The same top token at every step (locality: the edit left this query's prediction alone)."""
        return self.top_token == other.top_token and self.top_rest == other.top_rest


def _scores_from_logits(logits: torch.Tensor, chunk: Sequence[Encoded]) -> list[AnswerScore]:
    probs = torch.softmax(logits.float(), dim=-1)
    gold = torch.tensor([e.answer_ids[0] for e in chunk], device=probs.device)
    p_gold = probs.gather(1, gold[:, None])[:, 0]
    ranks = (probs > p_gold[:, None]).sum(dim=1, dtype=torch.int32)  # int32: half the time of int64 on a CPU, same counts
    top = probs.argmax(dim=1)
    return [AnswerScore(float(p), int(r), int(t)) for p, r, t in zip(p_gold, ranks, top)]


@torch.no_grad()
def score_answers(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32,
    shared_prefixes: bool = True,
) -> list[AnswerScore]:
    """P(first gold token), its rank and the top token at each query's target. ``shared_prefixes``
    False: one forward per batch over whole prompts, no cache."""
    prefill = _prefills(adapter, encs, shared_prefixes)
    batches = length_buckets(encs, batch_size, shared_prefixes=prefill)
    results = []
    for idx in batches:
        chunk = [encs[i] for i in idx]
        logits = adapter.head_logits(_target_hidden(adapter, chunk, edits, prefill)).float()
        results.append(_scores_from_logits(logits, chunk))
    return _in_input_order(len(encs), batches, results)


@torch.no_grad()
def target_hidden(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32,
    shared_prefixes: bool = True,
) -> torch.Tensor:
    """What the LM head reads at each query's target [n, d], in input order: :func:`score_answers`
    without its head, so that one head call can serve the rows of several passes
    (:func:`scores_from_hidden`)."""
    return target_hidden_copies(adapter, encs, 1, None, edits, batch_size, shared_prefixes)[0]


@torch.no_grad()
def target_hidden_copies(
    adapter: ModelAdapter, encs: Sequence[Encoded], copies: int, on_rows: RowsCallback | None,
    edits: Mapping[int, Edit] | None = None, batch_size: int = 32, shared_prefixes: bool = True,
) -> torch.Tensor:
    """:func:`target_hidden` of ``copies`` copies of every batch in one forward each [copies, n, d]:
    each batch of :func:`target_hidden` (the same batches, so a replay of its recorded blocks can
    tile them) is repeated copy after copy along the batch, and ``on_rows(copy of each row)`` is
    called before every forward call, so per-row edits (:mod:`matrice.models.edit_rows`) can give
    each copy its own."""
    prefill = _prefills(adapter, encs, shared_prefixes)
    batches = length_buckets(encs, batch_size, shared_prefixes=prefill)
    parts = [_target_hidden(adapter, [encs[i] for i in idx], edits, prefill, copies, on_rows).unflatten(0, (copies, len(idx)))
             for idx in batches]
    hidden = torch.cat(parts, dim=1)
    order = torch.tensor([i for idx in batches for i in idx], device=hidden.device)
    return torch.empty_like(hidden).index_copy_(1, order, hidden)


@torch.no_grad()
def scores_from_hidden(adapter: ModelAdapter, hidden: torch.Tensor, encs: Sequence[Encoded], rows: int = 128
                       ) -> list[AnswerScore]:
    """:func:`score_answers`' scores from the head inputs ``hidden[i]`` of ``encs[i]``, the head run
    on ``rows`` rows at a time: a large vocabulary's head is the costliest matmul per row, and a CPU
    runs it faster per row on many rows than on one batch's few."""
    scores: list[AnswerScore] = []
    for start in range(0, len(encs), rows):
        logits = adapter.head_logits(hidden[start : start + rows]).float()
        scores += _scores_from_logits(logits, encs[start : start + rows])
    return scores


def _prefills(adapter: ModelAdapter, encs: Sequence[Encoded], shared_prefixes: bool) -> bool:
    """Whether scoring runs :func:`_prefill_causal` (causal prompts ending at their target)."""
    return shared_prefixes and adapter.causal and all(e.target_pos == len(e.input_ids) - 1 for e in encs)


def _target_hidden(adapter: ModelAdapter, chunk: Sequence[Encoded], edits: Mapping[int, Edit] | None,
                   prefill: bool, copies: int = 1, on_rows: RowsCallback | None = None) -> torch.Tensor:
    """One batch's head inputs at its targets [copies * B, d], the edits applied there (copies: see
    :func:`target_hidden_copies`)."""
    if prefill:
        out, _, _ = _prefill_causal(adapter, chunk, edits, use_cache=False, copies=copies, on_rows=on_rows)
        return out.last_hidden_state[:, -1]
    batch = pad_batch([e.input_ids for e in chunk], [e.target_pos for e in chunk], adapter.pad_token_id, adapter.device)
    ids, mask, positions = (tiled(t, copies) for t in (batch.input_ids, batch.attention_mask, batch.positions))
    _assign_copies(on_rows, len(chunk), copies)
    with neuron_hooks(adapter, positions, edits):
        hidden = adapter.model.base_model(input_ids=ids, attention_mask=mask)[0]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


def _assign_copies(on_rows: RowsCallback | None, rows: int, copies: int) -> None:
    """Tell ``on_rows`` which copy each row of the next forward call (``copies`` × ``rows``) is."""
    if on_rows is not None:
        on_rows(torch.arange(copies).repeat_interleave(rows))


@torch.no_grad()
def score_answers_many(
    adapter: ModelAdapter, encs: Sequence[Encoded], edit_sets: Sequence[Mapping[int, Edit] | None], batch_size: int = 32
) -> list[list[AnswerScore]]:
    """``[score_answers(adapter, encs, edits) for edits in edit_sets]``, faster. Edits act at the target
    position only, so when it is the last token (causal models) every earlier token is computed once
    per batch into a KV cache and each edit set runs the target token alone on a copy of that cache."""
    if not adapter.causal or any(len(e.input_ids) < 2 or e.target_pos != len(e.input_ids) - 1 for e in encs):
        return [score_answers(adapter, encs, edits, batch_size) for edits in edit_sets]
    batches = length_buckets(encs, batch_size)
    per_batch = []  # [batch][edit set] -> scores
    for idx in batches:
        chunk = [encs[i] for i in idx]
        prompts = PromptCache(adapter, chunk)
        every = range(len(chunk))
        per_batch.append([_scores_from_logits(prompts.target_logits(every, edits), chunk) for edits in edit_sets])
    return [_in_input_order(len(encs), batches, [b[k] for b in per_batch]) for k in range(len(edit_sets))]


class PromptCache:
    """A chunk of causal prompts minus their last token (the target), run once, left-padded and
    unedited; each call then runs the target token of chosen prompts on a copy of their keys and
    values, with edits there (edits at the target cannot change the positions before it)."""

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

    def target_logits(self, members: Sequence[int], edits: Mapping[int, Edit] | None) -> torch.Tensor:
        """Logits [R, V] (float32) at the target of prompt ``members[r]``."""
        step, _ = self.target_step(members, edits)
        return self.adapter.head_logits(step.last_hidden_state[:, -1]).float()

    def greedy(self, members: Sequence[int], edits: Mapping[int, Edit] | None, lengths: Sequence[int]) -> list[list[int]]:
        """``lengths[r]`` greedy tokens of prompt ``members[r]``, edited at the target only; the LM
        head runs only for rows still decoding."""
        step, sel = self.target_step(members, edits)
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

    def target_step(self, members: Sequence[int], edits: Mapping[int, Edit] | None):
        """The body's output for the target token of prompt ``members[r]`` (its cache continues
        decoding), and the members as an index tensor."""
        sel = torch.tensor(list(members), device=self.mask.device)
        with neuron_hooks(self.adapter, torch.zeros(1, dtype=torch.long), edits):
            step = self.adapter.model.base_model(
                input_ids=self.last[sel], attention_mask=self.mask[sel], past_key_values=cache_rows(self.cache, sel),
                use_cache=True, **({"position_ids": self.positions[sel, -1:]} if self.pass_positions else {}))
        return step, sel


def normalize_answer(text: str) -> str:
    """Compare answers on text, not tokens: NFKC, case-folded, no whitespace, no edge punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not ch.isspace())
    return text.strip(".,;:!?\"'()[]「」『』。、・")


@torch.no_grad()
def decode_and_score(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32,
    progress: str | None = None, head_rows: int | None = None,
) -> list[tuple[list[int], AnswerScore]]:
    """Greedy tokens (as many as each gold answer has) and the gold answer's score, from one pass;
    edits stay at the original target position. ``progress``: a progress-bar label (None: no bar).
    ``head_rows`` (causal models): batches run in lockstep, as many as make about that many rows, each
    with its own prefill and cache as alone, the LM head once per step over all their rows (a large
    vocabulary's head runs faster per row on many rows; each row's logits are the same whatever the
    row count once a call has 8 or more, measured on the CPU). None: the head per batch."""
    batches = length_buckets(encs, batch_size, shared_prefixes=adapter.causal)
    per_group = max(1, (head_rows or 0) // batch_size) if adapter.causal else 1
    results = []
    with tqdm(total=len(batches), desc=progress, unit="batch", disable=progress is None) as bar:
        for start in range(0, len(batches), per_group):
            group = [[encs[i] for i in idx] for idx in batches[start : start + per_group]]
            decoded = (_decode_causal_lockstep(adapter, group, edits) if adapter.causal
                       else [_decode_masked(adapter, chunk, edits) for chunk in group])
            for chunk, (generated, logits) in zip(group, decoded):
                results.append(list(zip(generated, _scores_from_logits(logits, chunk))))
            bar.update(len(group))
    return _in_input_order(len(encs), batches, results)


def greedy_decode(
    adapter: ModelAdapter, encs: Sequence[Encoded], edits: Mapping[int, Edit] | None = None, batch_size: int = 32,
    head_rows: int | None = None,
) -> list[list[int]]:
    """As many greedy tokens as each gold answer has; edits stay at the original target position.
    ``head_rows``: batches decoded in lockstep, as :func:`decode_and_score` says."""
    return [g for g, _ in decode_and_score(adapter, encs, edits, batch_size, head_rows=head_rows)]


def _accepts_position_ids(model) -> bool:
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def _left_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq))
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _prefill_causal(adapter: ModelAdapter, chunk: Sequence[Encoded], edits, use_cache: bool = True, copies: int = 1,
                    on_rows: RowsCallback | None = None):
    """The prompts' forward pass, every row ending at the last column (its target), with `edits`
    there. Each distinct demonstration prefix (:func:`shared_prefix_length`) runs once and its keys
    and values are gathered to its rows; the rows' own tokens follow, left-padded behind the
    prefixes, so the mask has a hole between the two and positions come from the mask. Returns the
    body output (its cache continues decoding), the full attention mask and the positions.
    ``copies``: every forward call's rows repeated copy after copy, each copy with its own prefixes
    (:func:`target_hidden_copies`)."""
    pass_positions = _accepts_position_ids(adapter.model)
    base = adapter.model.base_model
    cuts = [shared_prefix_length(e) for e in chunk]
    prefixes = [tuple(e.input_ids[:c]) for e, c in zip(chunk, cuts)]
    distinct = list(dict.fromkeys(prefixes))
    longest = max(len(e.input_ids) + len(e.answer_ids) for e in chunk) + max(cuts)  # columns, padding included
    if min(cuts) == 0 or len(distinct) == len(chunk) or not _window_holds(adapter, longest):
        # nothing shared, or a sliding window the hole between prefix and query would shift: one pass
        ids, mask = (tiled(t, copies) for t in _left_padded([e.input_ids for e in chunk], adapter.pad_token_id, adapter.device))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        _assign_copies(on_rows, len(chunk), copies)
        with neuron_hooks(adapter, torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long), edits):
            out = base(input_ids=ids, attention_mask=mask, use_cache=use_cache,
                       **({"position_ids": positions} if pass_positions else {}))
        return out, mask, positions
    ids_p, mask_p = (tiled(t, copies) for t in _left_padded(distinct, adapter.pad_token_id, adapter.device))
    positions_p = (mask_p.cumsum(-1) - 1).clamp(min=0)
    # the edits act at the targets, which no prefix contains
    _assign_copies(on_rows, len(distinct), copies)
    cache = base(input_ids=ids_p, attention_mask=mask_p, use_cache=True,
                 **({"position_ids": positions_p} if pass_positions else {})).past_key_values
    where = {p: i for i, p in enumerate(distinct)}
    own = torch.tensor([where[p] for p in prefixes], device=mask_p.device)
    rows = torch.cat([own + k * len(distinct) for k in range(copies)]) if copies > 1 else own
    cache = cache_rows(cache, rows)
    ids_s, mask_s = (tiled(t, copies) for t in _left_padded([e.input_ids[c:] for e, c in zip(chunk, cuts)],
                                                              adapter.pad_token_id, adapter.device))
    mask = torch.cat([mask_p[rows], mask_s], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _assign_copies(on_rows, len(chunk), copies)
    with neuron_hooks(adapter, torch.full((ids_s.shape[0],), ids_s.shape[1] - 1, dtype=torch.long), edits):
        out = base(input_ids=ids_s, attention_mask=mask, past_key_values=cache, use_cache=True,
                   **({"position_ids": positions[:, -ids_s.shape[1]:]} if pass_positions else {}))
    return out, mask, positions


def _window_holds(adapter: ModelAdapter, columns: int) -> bool:
    """A sliding-window layer attends to the last W columns, padding included, and caches W - 1 of
    them: a hole in the mask changes what it sees unless every column fits in the window."""
    window = getattr(adapter.model.config, "sliding_window", None)
    return window is None or columns < int(window) - 1


@dataclass
class _Decoding:
    """One batch decoding greedily: its cache (in ``out``), mask, next position, tokens and lengths."""

    out: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    generated: list[list[int]]

    @property
    def steps(self) -> int:
        return int(self.lengths.max())


def _decode_causal_lockstep(adapter: ModelAdapter, chunks: Sequence[Sequence[Encoded]], edits
                            ) -> list[tuple[list[list[int]], torch.Tensor]]:
    """Greedy decoding of each chunk (its prefill with the edits at the target, then one cached token
    per step, the edited target's keys and values kept, as a full recomputation would), the chunks
    in lockstep: each chunk's forward calls are the ones it makes alone, the LM head runs once per
    step over the rows of every chunk still decoding. Every chunk's cache lives until the group ends."""
    pass_positions = _accepts_position_ids(adapter.model)
    base = adapter.model.base_model
    prefilled = [_prefill_causal(adapter, chunk, edits) for chunk in chunks]
    # 2-D: one plain matmul for the head
    logits = adapter.head_logits(torch.cat([out.last_hidden_state[:, -1] for out, _, _ in prefilled]))
    sizes = [len(chunk) for chunk in chunks]
    target_logits = logits.float().split(sizes)
    states = [_Decoding(out, mask, positions[:, -1:], tokens,
                        torch.tensor([len(e.answer_ids) for e in chunk], device=tokens.device), [[] for _ in chunk])
              for chunk, (out, mask, positions), tokens in zip(chunks, prefilled, logits.argmax(dim=-1).split(sizes))]
    for step in range(max(s.steps for s in states)):
        for state in states:
            for g, n, tok in zip(state.generated, state.lengths.tolist(), state.tokens.tolist()):
                if step < n:
                    g.append(int(tok))
        running = [s for s in states if step + 1 < s.steps]
        hidden = []
        for state in running:
            state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
            state.next_pos = state.next_pos + 1
            extra = {"position_ids": state.next_pos} if pass_positions else {}
            state.out = base(input_ids=state.tokens[:, None], attention_mask=state.mask,
                             past_key_values=state.out.past_key_values, use_cache=True, **extra)
            # the head only for rows still decoding; finished rows keep feeding their last token so
            # the cache stays one rectangle
            last = state.out.last_hidden_state[:, -1]
            hidden.append(last[(state.lengths > step + 1).to(last.device)])
        if not running:
            break
        chosen = adapter.head_logits(torch.cat(hidden)).argmax(dim=-1).split([len(h) for h in hidden])
        for state, new in zip(running, chosen):
            state.tokens = state.tokens.clone()
            state.tokens[state.lengths > step + 1] = new.to(state.tokens.device)
    return [(s.generated, t) for s, t in zip(states, target_logits)]


def _decode_masked(adapter: ModelAdapter, chunk: Sequence[Encoded], edits) -> tuple[list[list[int]], torch.Tensor]:
    batch = pad_batch([e.input_ids for e in chunk], [e.target_pos for e in chunk], adapter.pad_token_id, adapter.device)
    with neuron_hooks(adapter, batch.positions, edits):
        hidden = adapter.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    out, first = [], []
    for row, e in enumerate(chunk):
        logits = adapter.head_logits(hidden[row, e.target_pos : e.target_pos + len(e.answer_ids)])
        out.append(logits.argmax(dim=-1).tolist())
        first.append(logits[0])
    return out, torch.stack(first).float()


def is_correct(adapter: ModelAdapter, generated: Sequence[int], gold_text: str) -> bool:
    return normalize_answer(adapter.tokenizer.decode(list(generated), skip_special_tokens=True)) == normalize_answer(gold_text)
