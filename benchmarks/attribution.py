"""Benchmark: the fast SAIG engine against the reference and the peer-style engine, in one run.

    python benchmarks/attribution.py                                  # CPU: prepared default model + tiny LLaMA
    python benchmarks/attribution.py --shapes gemma3-270m --no-reference
    python benchmarks/attribution.py --device cuda --dtype bfloat16 --shapes llama-2-7b qwen2-7b gemma3-270m \\
        --steps 20 --batch-sizes 128 512 2048 --no-reference

Shapes other than `prepared` are random-initialised models built from the real configs (hidden size,
layers, heads, vocabulary; no download): cost does not depend on the weights. Their query is a random
24-token prompt with 8 baseline tokens (the issue's setting); `prepared` uses the default run's real
queries with the one-shot prefix.

Reports per engine rows/s (one row = one (layer, baseline, step) forward+backward), queries/min,
speed-up, max relative difference of scores, the fast engine's achieved FLOP/s against the measured
matmul peak of the same device and dtype, peak memory, and where its time goes (profiler). With
`--agreement`, bfloat16 against float32 per query: Spearman and top-50 overlap. With
`--answer-tokens`, `answer_token: all` against `first` on the prepared model's queries of one relation
in every language (answers of 1 to several tokens): rows/s, seconds per query and answer tokens per
query, both policies in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from matrice.method.attribution import fast
from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.fast import fast_attribution_many
from matrice.method.attribution.peer import peer_attribution
from matrice.method.attribution.reference import reference_attribution
from matrice.models.adapter import Encoded, ModelAdapter

# Real configs (hidden, intermediate, layers, heads, kv heads, vocabulary) of the models users run.
SHAPES: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=2000),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        sliding_window=512, query_pre_attn_scalar=256),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a large square matmul on this device and dtype: the ceiling we compare with."""
    n, repeats = (n or 2048, 10) if device.type == "cpu" else (n or 8192, 50)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelAdapter:
    import transformers as tf

    from matrice.models.tiny import tiny_tokenizer

    spec = dict(SHAPES[shape])
    config = tf.AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=4096, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return ModelAdapter(model.eval(), tiny_tokenizer())


def random_queries(adapter: ModelAdapter, n: int, length: int = 24, n_baselines: int = 8, seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    vocab = adapter.model.config.vocab_size
    encs = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
        answer = int(torch.randint(10, vocab, (1,), generator=gen))
        encs.append(Encoded(ids, length - 1, [answer], list(range(length - n_baselines, length))))
    return encs


def prepared_queries(adapter: ModelAdapter, n: int) -> list[Encoded]:
    """The default run's English capital queries (P36), encoded as the pipeline encodes them."""
    from matrice.data.build import build_dataset
    from matrice.data.sources import DatasetConfig
    from matrice.models.encoding import encode_query

    queries = [q for q in build_dataset(DatasetConfig()).queries if q.relation == "P36" and q.lang == "en"][:n]
    return [encode_query(adapter, q, few_shot=True) for q in queries]


def useful_flops(adapter: ModelAdapter, rows_per_layer: int) -> tuple[float, float]:
    """Matmul FLOPs a causal row needs, summed over a query's rows, split into (LM head, blocks):
    a row patched at layer l runs one token through blocks l..L-1 and the head, forward and
    input-gradient backward (2×). Work the engine does beyond this counts as overhead."""
    per_block = sum(p.numel() for p in adapter.layers[0].parameters() if p.dim() == 2)
    head = adapter.model.get_output_embeddings().weight.numel()
    n = adapter.n_layers
    head_flops = n * rows_per_layer * 2 * head * 2
    block_flops = sum(rows_per_layer * 2 * per_block * 2 * (n - l) for l in range(n))
    return float(head_flops), float(block_flops)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark


def where_time_goes(adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig, top: int = 8) -> dict:
    """Self time of the costliest operators of one fast run (profiler), as shares of the total; on a
    GPU also the host side's and how busy the device was (kernel time / wall time): a low figure
    means the host (Python, launches, syncs) is what limits, not the kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = adapter.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities, acc_events=True) as prof:
        list(fast_attribution_many(adapter, encs, cfg))
        synchronize(adapter.device)
    wall = time.perf_counter() - start

    def shares(key: str) -> tuple[list[dict], float]:
        events = [e for e in prof.key_averages() if getattr(e, key) > 0]
        total = sum(getattr(e, key) for e in events)
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        return [{"op": e.key, "share": round(getattr(e, key) / total, 3)} for e in events[:top]], total / 1e6

    ops, busy = shares("self_device_time_total" if cuda else "self_cpu_time_total")
    out = {"ops": ops, "profiled_wall_s": round(wall, 3)}
    if cuda:
        out["device_busy_fraction"] = round(busy / wall, 3)
        out["host_ops"] = shares("self_cpu_time_total")[0]
    return out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_shape(name: str, adapter: ModelAdapter, encs: list[Encoded], args: argparse.Namespace, peak: float,
                progress: Callable[[dict], None] | None = None) -> dict:
    device = adapter.device
    base_cfg = AttributionConfig(steps=args.steps, baseline="saig", integration=args.integration)
    n_base = [len(e.baseline_positions) for e in encs]
    rows = sum(n_base) * adapter.n_layers * args.steps
    head_f, block_f = (sum(x) for x in zip(*(useful_flops(adapter, b * args.steps) for b in n_base)))
    out: dict = {"shape": name, "device": str(device), "dtype": str(adapter.dtype).replace("torch.", ""),
                 "queries": len(encs), "steps": args.steps, "rows": rows,
                 "lm_head_share_of_flops": round(head_f / (head_f + block_f), 3), "fast": []}
    list(fast_attribution_many(adapter, encs[:1], AttributionConfig(steps=1, batch_size=8)))  # warm-up
    fast_scores = None
    for batch in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = AttributionConfig(steps=args.steps, baseline="saig", batch_size=batch, integration=args.integration)
        try:
            scores, seconds = timed(lambda: list(fast_attribution_many(adapter, encs, cfg)), device)
        except torch.cuda.OutOfMemoryError:  # a batch too large for this device: say so, try the next
            torch.cuda.empty_cache()
            out["fast"].append({"batch_size": batch, "error": "out of memory"})
            print(json.dumps(out["fast"][-1]), flush=True)
            continue
        fast_scores = fast_scores or scores
        achieved = (head_f + block_f) / seconds
        out["fast"].append({
            "batch_size": batch, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
            "seconds_per_query": round(seconds / len(encs), 3), "queries_per_min": round(60 * len(encs) / seconds, 2),
            "achieved_tflops": round(achieved / 1e12, 4), "fraction_of_peak": round(achieved / peak, 3),
            "peak_memory_gib": round(peak_memory_gib(device), 2),
        })
        print(json.dumps(out["fast"][-1]), flush=True)
        if progress is not None:
            progress(out)
    measured = [r for r in out["fast"] if "seconds" in r]
    if not measured:
        return out
    best = min(measured, key=lambda r: r["seconds"])
    engines = {"peer": peer_attribution} if not args.no_peer else {}
    if not args.no_reference:
        engines["reference"] = reference_attribution
    for engine, fn in engines.items():
        n = min(len(encs), args.slow_queries)
        scores, seconds = timed(lambda: [fn(adapter, e, base_cfg) for e in encs[:n]], device)
        per_query = seconds / n
        out[engine] = {"queries": n, "seconds_per_query": round(per_query, 3),
                       "rows_per_s": round(rows / len(encs) / per_query, 2),
                       "fast_speedup": round(per_query / best["seconds_per_query"], 1),
                       "max_relative_difference": max(max_rel(f, s) for f, s in zip(fast_scores, scores))}
        print(engine, json.dumps(out[engine]), flush=True)
    profile_cfg = AttributionConfig(steps=args.steps, baseline="saig", batch_size=best["batch_size"])
    out["time_by_op"] = where_time_goes(adapter, encs[:2], profile_cfg)
    return out


def agreement(path: str, device: str, args: argparse.Namespace) -> dict:
    """bfloat16 against float32 on the default queries: per-query Spearman and top-50 overlap."""
    from scipy.stats import spearmanr

    from matrice.models.loading import load_adapter

    per_dtype = {}
    for dtype in ("float32", "bfloat16"):
        adapter = load_adapter(path, device, dtype)
        encs = prepared_queries(adapter, args.agreement_queries)
        cfg = AttributionConfig(steps=args.steps, baseline="saig", batch_size=max(args.batch_sizes))
        scores, seconds = timed(lambda: [a.sum(0).flatten() for a in fast_attribution_many(adapter, encs, cfg)], adapter.device)
        rows = sum(len(e.baseline_positions) for e in encs) * adapter.n_layers * args.steps
        per_dtype[dtype] = {"scores": scores, "rows_per_s": round(rows / seconds, 2),
                            "matmul_peak_tflops": round(matmul_peak(adapter.device, DTYPES[dtype]) / 1e12, 4)}
    rows_out = []
    for s32, s16 in zip(per_dtype["float32"]["scores"], per_dtype["bfloat16"]["scores"]):
        top32, top16 = set(s32.topk(50).indices.tolist()), set(s16.topk(50).indices.tolist())
        rows_out.append({"spearman": round(float(spearmanr(s32.numpy(), s16.numpy())[0]), 4),
                         "top50_overlap": len(top32 & top16) / 50})
    return {**{f"{d}_{k}": v for d, r in per_dtype.items() for k, v in r.items() if k != "scores"},
            "per_query": rows_out}


def answer_token_cost(path: str, device: str, args: argparse.Namespace) -> dict:
    """``answer_token: all`` against ``first`` on the same queries (P36, the first paraphrase in every
    language): a query costs one row set per answer token, so the ratio should follow the tokens."""
    from matrice.data.build import build_dataset
    from matrice.data.sources import DatasetConfig
    from matrice.models.encoding import encode_query
    from matrice.models.loading import load_adapter

    adapter = load_adapter(path, device, args.dtype)
    queries = [q for q in build_dataset(DatasetConfig()).queries
               if q.relation == "P36" and q.template_id == 0][: args.queries * 7]
    encs = [encode_query(adapter, q, few_shot=True) for q in queries]
    out: dict = {"queries": len(encs), "answer_tokens_per_query": round(sum(len(e.answer_ids) for e in encs) / len(encs), 3)}
    for policy in ("first", "all"):
        cfg = AttributionConfig(steps=args.steps, baseline="saig", batch_size=max(args.batch_sizes), answer_token=policy)
        tokens = [len(e.answer_ids) if policy == "all" else 1 for e in encs]
        rows = sum(len(e.baseline_positions) * k for e, k in zip(encs, tokens)) * adapter.n_layers * args.steps
        _, seconds = timed(lambda: list(fast_attribution_many(adapter, encs, cfg)), adapter.device)
        out[policy] = {"seconds": round(seconds, 2), "seconds_per_query": round(seconds / len(encs), 3),
                       "rows": rows, "rows_per_s": round(rows / seconds, 1)}
        print(policy, json.dumps(out[policy]), flush=True)
    out["all_over_first_seconds"] = round(out["all"]["seconds"] / out["first"]["seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/gemma3_270m", help="prepared model dir for the `prepared` shape")
    parser.add_argument("--shapes", nargs="+", default=["tiny-llama", "prepared"], choices=[*SHAPES, "prepared"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--integration", default="riemann_right", choices=["riemann_right", "gauss_legendre"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--slow-queries", type=int, default=1, help="queries the reference/peer engines run")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slowest) reference engine")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer-style engine")
    parser.add_argument("--agreement", action="store_true", help="bfloat16 vs float32 on the prepared model")
    parser.add_argument("--agreement-queries", type=int, default=4)
    parser.add_argument("--answer-tokens", action="store_true", help="answer_token all vs first on the prepared model")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--peak-n", type=int, default=None, help="side of the peak-measuring matmul (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="let SDPA use cuDNN (PyTorch's choice) instead of the engine's backends (an A/B switch)")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_attention:
        fast.CUDA_ATTENTION_BACKENDS = None
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    peak = matmul_peak(device, dtype, args.peak_n)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                    "dtype": args.dtype, "cuda_attention_backends": fast.CUDA_ATTENTION_BACKENDS, "matmul_peak_tflops": round(peak / 1e12, 4), "shapes": []}
    print(json.dumps({k: v for k, v in report.items() if k != "shapes"}), flush=True)
    for shape in args.shapes:
        if shape == "prepared":
            from matrice.models.loading import load_adapter

            adapter = load_adapter(args.model, args.device, args.dtype)
            encs = prepared_queries(adapter, args.queries)
        else:
            adapter = random_model(shape, device, dtype)
            encs = random_queries(adapter, args.queries)
        print(f"== {shape}", flush=True)
        def keep(partial: dict) -> None:  # each batch size kept as soon as it is measured
            Path(args.out).write_text(json.dumps({**report, "shapes": [*report["shapes"], partial]}, indent=2) + "\n")

        report["shapes"].append(bench_shape(shape, adapter, encs, args, peak, keep))
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        del adapter
    if args.agreement:
        report["bfloat16_agreement"] = agreement(args.model, args.device, args)
        print(json.dumps(report["bfloat16_agreement"]), flush=True)
    if args.answer_tokens:
        report["answer_token"] = answer_token_cost(args.model, args.device, args)
        print(json.dumps(report["answer_token"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
