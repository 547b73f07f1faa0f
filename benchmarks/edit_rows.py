"""Benchmark: a fact's editing passes with several edits per forward (per-row weight edits) against one
forward per edit (weights edited), on synthetic queries, on any device; in one run, alternating.

    python benchmarks/edit_rows.py --device cuda --config DIR --out edit_rows.json   # DIR: a config.json (+ tokenizer)
    python benchmarks/edit_rows.py --device cpu --tiny                                # the dry run's shapes

Why: `edit.edits_per_pass` > 1 stacks a fact's edits (the λ sweep's 3 methods × 6 λ) into one forward
(`matrice.models.edit_rows`). On the 2-core CPU a pass of one edit already runs hundreds of token rows
per matmul (`benchmarks/edit_passes.py --edits-per-pass 6` measured 1.01×); a GPU needs many more rows
to fill it, which is what this measures, without a dataset: the model is random-initialised from the
config (a real model's cost), the queries are the λ sweep's shape for one fact (48 queries in 7
demonstration prefixes of 14 tokens, 8 tokens of their own, answers of 1-3 tokens), 18 erasure edits
of 10 neurons each in the top third of the layers. Reports seconds per fact for each edits-per-pass
value (best of the rounds), the speedup over 1, and how far the scores moved from the weight-edited
ones (probability, rank and top token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrice.experiments.edit.passes import EditedPasses, erasure_edit  # noqa: E402
from matrice.models.adapter import Encoded, ModelAdapter  # noqa: E402


def synthetic_fact(vocab: int, seed: int = 0, queries: int = 48, prefixes: int = 7, prefix_len: int = 14,
                   own: int = 8) -> list[Encoded]:
    """One fact's scored queries: ``prefixes`` shared demonstration prefixes, each query's own tokens
    after it, the target the last prompt token, answers of 1-3 tokens (ids drawn above the specials)."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(10, vocab, prefix_len).tolist() for _ in range(prefixes)]
    encs = []
    for q in range(queries):
        ids = heads[q % prefixes] + rng.integers(10, vocab, own).tolist()
        encs.append(Encoded(ids, len(ids) - 1, rng.integers(10, vocab, 1 + q % 3).tolist(),
                            list(range(prefix_len, len(ids)))))
    return encs


def synthetic_edits(adapter: ModelAdapter, count: int = 18, neurons: int = 10, seed: int = 0) -> dict[int, object]:
    rng = np.random.default_rng(seed)
    low = adapter.n_layers - max(1, adapter.n_layers // 3)
    return {k: erasure_edit(adapter, np.stack([rng.integers(low, adapter.n_layers, neurons),
                                               rng.choice(adapter.n_neurons, neurons, replace=False)], axis=1))
            for k in range(count)}


def load_adapter(device: str, config: Path | None, tiny: bool) -> ModelAdapter:
    if tiny or config is None:
        from matrice.models.tiny import tiny_adapter

        adapter = tiny_adapter("llama")
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=torch.float32)
        adapter = ModelAdapter(model, AutoTokenizer.from_pretrained(config))
    adapter.model.to(device)
    return adapter


def timed(run, device: str) -> tuple[float, tuple]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config", type=Path, help="a folder with the model's config.json and tokenizer")
    parser.add_argument("--tiny", action="store_true", help="the tiny random LLaMA (the dry run)")
    parser.add_argument("--per-pass", type=int, nargs="+", default=[1, 3, 6, 18])
    parser.add_argument("--batch-size", type=int, default=32, help="edit.batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if 1 not in args.per_pass:
        args.per_pass.insert(0, 1)
    adapter = load_adapter(args.device, args.config, args.tiny)
    encs = synthetic_fact(adapter.model.config.vocab_size)
    edits = synthetic_edits(adapter)
    runs = {k: EditedPasses(adapter, args.batch_size, memo=None, kind="bench", edits_per_pass=k) for k in args.per_pass}
    seconds: dict[int, list[float]] = {k: [] for k in runs}
    scores = {}
    with torch.no_grad():
        for k, passes in runs.items():
            passes.run(encs, edits)  # warm-up: allocations, kernel choices
        for _ in range(args.rounds):
            for k, passes in runs.items():
                s, scores[k] = timed(lambda: passes.run(encs, edits), args.device)
                seconds[k].append(round(s, 4))
    best = {k: min(v) for k, v in seconds.items()}
    ref = scores[1][1]
    moved = {}
    for k in runs:
        got = scores[k][1]
        pairs = [(a, b) for name in ref for a, b in zip(got[name], ref[name])]
        moved[k] = {"max_relative_prob_difference": max(abs(a.prob - b.prob) / max(b.prob, 1e-30) for a, b in pairs),
                    "same_rank_and_top": sum((a.rank, a.top_token) == (b.rank, b.top_token) for a, b in pairs) / len(pairs)}
    report = {"device": args.device, "model": "tiny llama" if args.tiny or not args.config else str(args.config),
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
              "queries": len(encs), "edits": len(edits), "batch_size": args.batch_size, "seconds": seconds,
              "best_seconds_per_fact": best, "speedup_over_one": {k: round(best[1] / best[k], 3) for k in runs},
              "scores_against_one_per_pass": moved}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
