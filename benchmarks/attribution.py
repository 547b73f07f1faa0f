"""Benchmark: reference vs fast SAIG engine on the same queries, in one run.

    python benchmarks/attribution.py [--model models/gemma3_270m] [--queries 2] [--steps 5]

Reports rows/s (one row = one (baseline, layer, step) forward+backward), queries/min, speed-up,
max relative difference of scores, the fast engine's achieved FLOP/s against this machine's
measured matmul peak, and where its time goes (LM head vs transformer blocks).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from matrice.attribution.common import AttributionConfig
from matrice.attribution.fast import fast_attribution
from matrice.attribution.reference import reference_attribution
from matrice.data.build import build_dataset
from matrice.data.sources import DatasetConfig
from matrice.models.adapter import ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.loading import load_adapter


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the ceiling the engine is compared with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_query(adapter: ModelAdapter, n_baselines: int, steps: int) -> tuple[float, float]:
    """Matmul FLOPs of the fast engine for one query, split into (LM head, blocks).
    A row runs one token through blocks l..L-1 and the head, forward + input-gradient backward (2×)."""
    per_block = sum(p.numel() for n, p in adapter.layers[0].named_parameters() if p.dim() == 2)
    head = adapter.model.get_output_embeddings().weight.numel()
    rows_per_layer = n_baselines * steps
    head_flops = adapter.n_layers * rows_per_layer * 2 * head * 2
    block_flops = sum(rows_per_layer * 2 * per_block * 2 * (adapter.n_layers - l) for l in range(adapter.n_layers))
    return float(head_flops), float(block_flops)


def head_time(adapter: ModelAdapter, rows: int, batch: int) -> float:
    """Seconds the LM head alone (forward + input gradient) takes for `rows` rows."""
    hidden = adapter.model.config.hidden_size
    start = time.perf_counter()
    for s in range(0, rows, batch):
        h = torch.randn(min(batch, rows - s), hidden, dtype=adapter.dtype, requires_grad=True)
        p = torch.softmax(adapter.head_logits(h).float(), -1)[:, 0]
        torch.autograd.grad(p.sum(), h)
    return time.perf_counter() - start


def tiny_llama(seed: int = 0) -> ModelAdapter:
    """LLaMA-shaped small model (random weights) with the Gemma tokenizer's vocabulary size."""
    import transformers as tf

    from matrice.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=2000)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=256)
    torch.manual_seed(seed)
    return ModelAdapter(tf.AutoModelForCausalLM.from_config(cfg).eval(), tok)


def bench(name: str, adapter: ModelAdapter, encs, cfg: AttributionConfig, run_reference: bool) -> dict:
    fast_s, ref_s, max_rel, rows = 0.0, 0.0, 0.0, 0
    n_base = []
    for enc in encs:
        t = time.perf_counter()
        fast = fast_attribution(adapter, enc, cfg)
        fast_s += time.perf_counter() - t
        n_base.append(fast.shape[0])
        rows += fast.shape[0] * adapter.n_layers * cfg.steps
        if run_reference:
            t = time.perf_counter()
            ref = reference_attribution(adapter, enc, cfg)
            ref_s += time.perf_counter() - t
            max_rel = max(max_rel, float((ref - fast).abs().max() / ref.abs().max()))
    head_f, block_f = (sum(x) for x in zip(*(flops_per_query(adapter, b, cfg.steps) for b in n_base)))
    peak = matmul_peak(adapter.dtype)
    t_head = head_time(adapter, rows, cfg.batch_size)
    out = {
        "model": name, "dtype": str(adapter.dtype).replace("torch.", ""), "queries": len(encs),
        "steps": cfg.steps, "rows": rows, "fast_s": round(fast_s, 2),
        "fast_rows_per_s": round(rows / fast_s, 1), "fast_queries_per_min": round(60 * len(encs) / fast_s, 2),
        "achieved_gflops": round((head_f + block_f) / fast_s / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round((head_f + block_f) / fast_s / peak, 3),
        "lm_head_share_of_flops": round(head_f / (head_f + block_f), 3),
        "lm_head_share_of_time": round(t_head / fast_s, 3),
    }
    if run_reference:
        out.update({"reference_s": round(ref_s, 2), "reference_rows_per_s": round(rows / ref_s, 1),
                    "speedup": round(ref_s / fast_s, 1), "max_relative_difference": max_rel})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/gemma3_270m", help="prepared model dir (run `make pipeline` first)")
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference engine")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    queries = [q for q in build_dataset(DatasetConfig()).queries if q.relation == "P36" and q.lang == "en"][: args.queries]
    cfg = AttributionConfig(steps=args.steps, baseline="saig", batch_size=128)
    results = []
    for name, load in (("tiny-llama", tiny_llama), (args.model, lambda: load_adapter(args.model, "cpu", args.dtype))):
        adapter = load()
        encs = [encode_query(adapter, q, few_shot=True) for q in queries]
        results.append(bench(name, adapter, encs, cfg, not args.no_reference))
        print(json.dumps(results[-1], indent=2), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
