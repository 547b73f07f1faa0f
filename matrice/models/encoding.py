"""Turn dataset queries into token ids with the answer position and the gold answer tokens."""

from __future__ import annotations

from typing import Sequence

from matrice.data.schema import Query
from matrice.models.adapter import Encoded, ModelAdapter


class UnencodableAnswerError(ValueError):
    """The tokenizer maps the gold answer to nothing or to the unknown token."""


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _strip_special(tokenizer, ids: list[int]) -> list[int]:
    """Drop bos/eos/cls/sep...; keep unk, so that `_check_answer` sees a partly unknown answer."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return [i for i in ids if i not in special]


def _check_answer(tokenizer, query: Query, answer_ids: list[int]) -> None:
    unk = tokenizer.unk_token_id
    if not answer_ids or (unk is not None and unk in answer_ids):
        raise UnencodableAnswerError(
            f"query {query.query_id}: answer {query.answer!r} cannot be encoded by the tokenizer "
            f"(got ids {answer_ids}); drop the fact or use a model whose vocabulary covers '{query.lang}'"
        )


def answer_ids_alone(adapter: ModelAdapter, query: Query) -> list[int]:
    return _strip_special(adapter.tokenizer, _ids(adapter.tokenizer, query.answer_sep + query.answer, special=False))


def encode_causal(adapter: ModelAdapter, query: Query, few_shot: bool) -> Encoded:
    """Context = [special] + prefix + prompt; target = last context token; answer = what follows it."""
    tok = adapter.tokenizer
    prefix = query.prefix if few_shot else ""
    context = _ids(tok, prefix + query.prompt)
    full = _ids(tok, prefix + query.prompt + query.answer_sep + query.answer)
    if full[: len(context)] == context and len(full) > len(context):
        answer = _strip_special(tok, full[len(context):])
    else:  # the boundary merged into one token: tokenise the continuation on its own
        answer = answer_ids_alone(adapter, query)
    _check_answer(tok, query, answer)
    start = _common_prefix(_ids(tok, prefix), context) if prefix else _common_prefix(_ids(tok, ""), context)
    special = set(tok.all_special_ids)
    positions = [p for p in range(start, len(context)) if context[p] not in special]
    return Encoded(context, len(context) - 1, answer, positions)


def encode_masked(adapter: ModelAdapter, query: Query) -> Encoded:
    """Cloze with one [MASK] per answer token; target = the first mask (first answer token)."""
    tok = adapter.tokenizer
    answer = answer_ids_alone(adapter, query)
    _check_answer(tok, query, answer)
    text = query.cloze.replace("[Y]", tok.mask_token * len(answer))
    ids = _ids(tok, text)
    masks = [p for p, i in enumerate(ids) if i == tok.mask_token_id]
    if len(masks) != len(answer):
        raise ValueError(f"query {query.query_id}: expected {len(answer)} mask tokens in {text!r}, found {len(masks)}")
    special = set(tok.all_special_ids)
    positions = [p for p, i in enumerate(ids) if i not in special]
    return Encoded(ids, masks[0], answer, positions)


def encode_query(adapter: ModelAdapter, query: Query, few_shot: bool = False) -> Encoded:
    return encode_causal(adapter, query, few_shot) if adapter.causal else encode_masked(adapter, query)


def answer_steps(adapter: ModelAdapter, enc: Encoded, whole_sequence: bool = False) -> list[Encoded]:
    """One query per answer token, teacher-forced on the gold answer: step k predicts answer token k
    (``answer_ids[0]`` of the step) with the gold tokens before it in place.

    Causal: the context followed by the first k answer tokens, the target its last token;
    ``whole_sequence`` keeps the whole teacher-forced sequence (context + answer but its last token)
    with the target at k, which a causal model scores the same (what the reference engine runs, so
    the fast engine's truncation is checked, not assumed). Masked: the cloze's masks filled left to
    right, the first k with the gold tokens, the target the (k+1)-th mask. Baseline positions stay the
    query's own tokens: a baseline replaces query tokens, never the answer's gold prefix."""
    answer, k_max = list(enc.answer_ids), len(enc.answer_ids)
    base = list(enc.baseline_positions)
    if adapter.causal:
        if whole_sequence:
            ids = list(enc.input_ids) + answer[:-1]
            return [Encoded(ids, enc.target_pos + k, answer[k:], base) for k in range(k_max)]
        return [Encoded(list(enc.input_ids) + answer[:k], enc.target_pos + k, answer[k:], base) for k in range(k_max)]
    masks = [enc.target_pos + k for k in range(k_max)]
    mask_id = adapter.tokenizer.mask_token_id
    if masks[-1] >= len(enc.input_ids) or any(enc.input_ids[p] != mask_id for p in masks):
        raise ValueError(f"the answer's {k_max} mask tokens are not contiguous from position {enc.target_pos}")
    steps = []
    for k in range(k_max):
        ids = list(enc.input_ids)
        ids[enc.target_pos : enc.target_pos + k] = answer[:k]
        steps.append(Encoded(ids, enc.target_pos + k, answer[k:], base))
    return steps
