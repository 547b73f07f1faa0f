"""How a masked model fills a multi-token answer: in parallel, or left to right. Measured on a
dataset's queries, because the two readings can disagree and the pipeline uses both.

The pipeline reads a masked model's answer in two ways. The probe decodes the answer's [MASK]s in
parallel: each mask takes its argmax with all the masks still in place. Whole-answer attribution and
scoring (`answer_token: all`) read it left to right: mask k is scored with masks 1..k−1 already
holding the gold tokens. "Rank 0 of the whole answer" under teacher forcing is the same as "greedy
left-to-right decoding returns the gold tokens", so the rates that matter are:

- parallel: the probe's "known" (the parallel fill's text equals the gold answer, normalised);
- left to right: greedy left-to-right decoding returns the gold answer, normalised;
- teacher-forced rank 0: every gold token is top-1 given the gold tokens before it. This is what
  scoring uses; barring exact ties it is "left to right returns the gold tokens" (tested), which the
  left-to-right rate reads through text normalisation.

Each fact counts once (the mean over its queries), and every rate has a 95% bootstrap interval over
facts. On answers of two or more tokens (for one token the two fills are the same computation) it
also gives how often the fills are both right or both wrong, and how often they give the same text.

    python benchmarks/masked_filling.py --model bert-base-multilingual-cased \\
        --queries data/dataset/queries.jsonl --out masked_filling.json

A causal model is refused: its decoding is left to right by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrice.data.schema import Query, load_queries  # noqa: E402
from matrice.evaluation.stats import bootstrap_mean, per_fact_mean  # noqa: E402
from matrice.models.adapter import ModelAdapter  # noqa: E402
from matrice.models.encoding import Encoded, answer_steps, encode_query  # noqa: E402
from matrice.models.predict import greedy_decode, is_correct, pad_batch  # noqa: E402
from matrice.models.whole_answer import answer_scores  # noqa: E402


@dataclass(frozen=True)
class FillingRecord:
    """One query's answer read three ways (see the module docstring)."""

    query_id: str
    fact_id: str
    lang: str
    n_tokens: int
    parallel_correct: bool
    left_to_right_correct: bool
    teacher_forced_rank0: bool
    parallel_text: str
    left_to_right_text: str


@torch.no_grad()
def left_to_right(adapter: ModelAdapter, encs: Sequence[Encoded], batch_size: int = 32) -> list[list[int]]:
    """Greedy left-to-right fill of each query's answer masks: mask k takes its argmax while masks
    1..k−1 hold the tokens chosen before it and the later masks are still in place."""
    out: list[list[int]] = [[] for _ in encs]
    for start in range(0, len(encs), batch_size):
        chunk = list(encs[start: start + batch_size])
        filled = [list(e.input_ids) for e in chunk]
        for k in range(max(len(e.answer_ids) for e in chunk)):
            rows = [i for i, e in enumerate(chunk) if k < len(e.answer_ids)]
            batch = pad_batch([filled[i] for i in rows], [chunk[i].target_pos + k for i in rows],
                              adapter.pad_token_id, adapter.device)
            hidden = adapter.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            picked = hidden[torch.arange(len(rows), device=hidden.device), batch.positions]
            for i, token in zip(rows, adapter.head_logits(picked).argmax(dim=-1).tolist()):
                filled[i][chunk[i].target_pos + k] = token
                out[start + i].append(token)
    return out


def measure(adapter: ModelAdapter, queries: Sequence[Query], batch_size: int = 32) -> list[FillingRecord]:
    """Each query's answer filled in parallel and left to right, and its teacher-forced rank; queries
    the pipeline cannot score either (an answer the tokenizer does not reproduce) are skipped."""
    if adapter.causal:
        raise ValueError("masked_filling measures masked models; a causal model decodes left to right by construction")
    kept, encs = [], []
    for q in queries:
        try:
            enc = encode_query(adapter, q)
            answer_steps(adapter, enc)  # the masks must be contiguous for both fills
        except ValueError as exc:
            print(f"skipped {q.query_id}: {exc}", file=sys.stderr)
            continue
        kept.append(q)
        encs.append(enc)
    return measure_encoded(adapter, kept, encs, batch_size)


def measure_encoded(adapter: ModelAdapter, queries: Sequence[Query], encs: Sequence[Encoded], batch_size: int = 32
                    ) -> list[FillingRecord]:
    """:func:`measure` on queries already encoded (``encs[i]`` is ``queries[i]``'s)."""
    parallel = greedy_decode(adapter, encs, batch_size=batch_size)
    serial = left_to_right(adapter, encs, batch_size)
    forced = answer_scores(adapter, encs, "all", batch_size=batch_size)
    decode = adapter.tokenizer.decode
    return [FillingRecord(q.query_id, q.fact_id, q.lang, len(e.answer_ids),
                          is_correct(adapter, p, q.answer_sep + q.answer), is_correct(adapter, s, q.answer_sep + q.answer),
                          f.rank == 0, decode(p, skip_special_tokens=True), decode(s, skip_special_tokens=True))
            for q, e, p, s, f in zip(queries, encs, parallel, serial, forced)]


def per_fact_rate(records: Sequence[FillingRecord], value: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any]:
    """The mean of `value` over each fact's records, then over facts, with its bootstrap interval."""
    est = bootstrap_mean(list(per_fact_mean(map(asdict, records), value).values()))
    return {**asdict(est), "n_queries": len(records)}


def summarise(records: Sequence[FillingRecord]) -> dict[str, Any]:
    """Rates overall and per language; on answers of two or more tokens, how often the two fills are
    right or wrong together and how often they give the same text."""
    def rates(rs: Sequence[FillingRecord]) -> dict[str, Any]:
        multi = [r for r in rs if r.n_tokens > 1]
        return {
            "parallel_correct": per_fact_rate(rs, lambda r: r["parallel_correct"]),
            "left_to_right_correct": per_fact_rate(rs, lambda r: r["left_to_right_correct"]),
            "teacher_forced_rank0": per_fact_rate(rs, lambda r: r["teacher_forced_rank0"]),
            "multi_token_share": per_fact_rate(rs, lambda r: r["n_tokens"] > 1),
            "same_correctness_on_multi_token": per_fact_rate(multi, lambda r: r["parallel_correct"] == r["left_to_right_correct"]),
            "same_text_on_multi_token": per_fact_rate(multi, lambda r: r["parallel_text"] == r["left_to_right_text"]),
        }

    langs = sorted({r.lang for r in records})
    return {"overall": rates(records), "by_language": {lang: rates([r for r in records if r.lang == lang]) for lang in langs}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF id or a local path of a masked LM")
    parser.add_argument("--queries", default="data/dataset/queries.jsonl", help="a queries.jsonl (build_dataset)")
    parser.add_argument("--languages", nargs="*", default=None, help="keep these languages (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many queries (in file order)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True, help="JSON: the records and the summary")
    args = parser.parse_args(argv)
    import matrice.api as mx

    queries = [q for q in load_queries(args.queries) if not args.languages or q.lang in args.languages][: args.limit]
    if not queries:
        raise SystemExit(f"{args.queries}: no queries for languages {args.languages}")
    records = measure(mx.load(args.model, device=args.device), queries, args.batch_size)
    result = {"model": args.model, "queries": args.queries, "summary": summarise(records),
              "records": [asdict(r) for r in records]}
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(json.dumps(result["summary"]["overall"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
