"""One command that measures everything GPU-side and writes it under one folder.

    make gpu-check OUT=gpu-check                     # on a GPU machine (device cuda)
    make gpu-check DEVICE=cpu OUT=/tmp/dry           # the dry run: tiny shapes, the same files
    python benchmarks/gpu_check.py --device cuda --out OUT --tokenizer DIR --budget pipeline=240

Parts, in order, each in its own process and time box (a slow part cannot eat the rest's time):
environment (imports, versions, what is missing and what it blocks), engine_bf16 / engine_fp32 (the
fast engine on LLaMA-2-7B, Qwen2-7B and Gemma-3-270M shapes, random-initialised: rows/s, s/query,
fraction of the same device's measured matmul peak, peak memory), engine_reference (fast against
the reference and peer engines on a tiny model), edit_rows (a fact's editing passes with 1, 3, 6 and
18 edits per forward on the default model's shapes: what `edit.edits_per_pass` should be there), tests (`MATRICE_TEST_DEVICE=<device>` pytest, the
device_map split included), ray (the Ray executor with one GPU actor against the local executor on
the same facts), pipeline (every dvc.yaml stage with `device: <device>` on a random-initialised
model of the default's exact config and real tokenizer, which costs what the real weights cost; on
the reduced config unless `--pipeline default`, each stage's output in OUT/pipeline_logs/, so a
stage cut by the time box still says how far it got).

Writes OUT/environment.json, engine.json, edit_rows.json, tests.json, ray.json, pipeline.json, summary.md (the table
docs/scale.md quotes), pipeline_logs/ and gpu_check.log. Needs nothing from the internet: what the machine lacks is
named in environment.json (carry it as wheels; the tokenizer folder comes from `prepare_model`)."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "engine_bf16", "engine_fp32", "engine_reference", "edit_rows", "tests", "ray", "pipeline")
# Seconds per part on a GPU (sum 535: the whole check stays under 9 minutes); the CPU dry run is tiny.
# The pipeline does not finish in its box on one H100 yet: it records the stages it reached.
GPU_BUDGETS = {"environment": 25, "engine_bf16": 100, "engine_fp32": 45, "engine_reference": 30, "edit_rows": 30,
               "tests": 90, "ray": 15, "pipeline": 200}
CPU_BUDGETS = {"environment": 60, "engine_bf16": 120, "engine_fp32": 120, "engine_reference": 180, "edit_rows": 120,
               "tests": 180, "ray": 180, "pipeline": 600}
# Python packages a part needs, and what their absence blocks.
PACKAGES = {
    "torch": "everything", "transformers": "everything", "accelerate": "device_map tests", "numpy": "everything",
    "scipy": "pipeline (statistics)", "sklearn": "pipeline (fact checking)", "yaml": "pipeline", "tqdm": "pipeline",
    "matplotlib": "pipeline (figures)", "safetensors": "pipeline (model folder)", "peft": "pipeline (inject: LoRA)",
    "opencc": "pipeline (build_dataset: zh_simplified) and dataset tests", "pytest": "tests",
    "captum": "one test (Captum agreement; skipped without it)", "ray": "ray part and the Ray tests",
    "xdist": "nothing (tests run serially without it)", "gguf": "nothing here (prepare_model of the embedded GGUF)",
    "dvc": "nothing here (stages run in dvc.yaml's order without it)",
}
DEFAULT_MODEL_KEY = "gemma3_270m"
# What the pipeline part runs on a GPU: the reduced config (benchmarks/pipeline.py: one relation with at
# most 10 facts, 2 attributed, every language, the default's M and experiments) gives every stage a time
# within a box of a few minutes, which the default's attribution alone exceeds on one GPU; `--pipeline
# default` for a box long enough for the whole default.
PIPELINE_CONFIGS = {"reduced": "the reduced config (benchmarks/pipeline.py)", "default": "default params"}
PIPELINE_LOGS = "pipeline_logs"
GEMMA_GOAL_S_PER_QUERY = 0.30 / 5  # >= 5x the 0.30 s/query measured on an H100 before the engine rework
LLAMA_GOAL_FRACTION = 0.40
PIPELINE_GOAL_S = 600


def engine_args(device: str, part: str) -> list[str]:
    """benchmarks/attribution.py arguments of an engine part: real shapes on a GPU, tiny on the dry run."""
    if device == "cpu":
        tiny = ["--shapes", "tiny-llama", "--steps", "2", "--queries", "1", "--batch-sizes", "64", "--peak-n", "256",
                "--threads", "1"]
        return {"engine_bf16": [*tiny, "--dtype", "bfloat16", "--no-reference", "--no-peer"],
                "engine_fp32": [*tiny, "--dtype", "float32", "--no-reference", "--no-peer"],
                "engine_reference": [*tiny, "--dtype", "float32"]}[part]
    return {
        "engine_bf16": ["--dtype", "bfloat16", "--shapes", "llama-2-7b", "gemma3-270m", "qwen2-7b", "--steps", "20",
                        "--queries", "2", "--batch-sizes", "128", "512", "2048", "--no-reference", "--no-peer"],
        "engine_fp32": ["--dtype", "float32", "--shapes", "gemma3-270m", "llama-2-7b", "--steps", "20",
                        "--queries", "2", "--batch-sizes", "512", "2048", "--no-reference", "--no-peer"],
        "engine_reference": ["--dtype", "float32", "--shapes", "tiny-llama", "--steps", "4", "--batch-sizes", "128"],
    }[part]


# ---- parts (each runs in its own process) ------------------------------------------------------

def part_environment(args: argparse.Namespace) -> dict[str, Any]:
    found, missing = {}, {}
    for name, blocks in PACKAGES.items():
        try:
            module = importlib.import_module(name)
            found[name] = str(getattr(module, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - any import failure means "missing" here
            missing[name] = {"blocks": blocks, "error": f"{type(exc).__name__}: {exc}"[:200]}
    import torch

    cuda = torch.cuda.is_available()
    gpus = [{"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if cuda else []
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": cuda, "gpus": gpus,
           "cpu_count": os.cpu_count(), "packages": found, "missing": missing}
    if args.device == "cuda":
        tok = Path(args.tokenizer) if args.tokenizer else None
        out["tokenizer_dir"] = str(tok) if tok and (tok / "config.json").exists() else None
        if not out["tokenizer_dir"]:
            missing["tokenizer_dir"] = {"blocks": "pipeline", "error": "pass --tokenizer: a folder with the default "
                                        "model's config.json and tokenizer files (benchmarks/gpu_carry.sh makes it)"}
        if not cuda:
            raise SystemExit("--device cuda but torch sees no GPU")
    return out


def part_engine(args: argparse.Namespace) -> dict[str, Any]:
    out_json = Path(args.scratch) / f"{args.part}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "attribution.py"), "--device", args.device,
           "--out", str(out_json), *engine_args(args.device, args.part)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out_json.read_text())


def part_edit_rows(args: argparse.Namespace) -> dict[str, Any]:
    """A fact's editing passes with several edits per forward against one (benchmarks/edit_rows.py):
    the default model's shapes on a GPU (what decides `edit.edits_per_pass` there), tiny on the dry run."""
    out_json = Path(args.scratch) / "edit_rows.bench.json"
    shape = ["--tiny", "--rounds", "1"] if args.device == "cpu" or not args.tokenizer else ["--config", args.tokenizer]
    cmd = [sys.executable, str(REPO / "benchmarks" / "edit_rows.py"), "--device", args.device, "--out", str(out_json), *shape]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out_json.read_text())


def part_tests(args: argparse.Namespace) -> dict[str, Any]:
    """pytest with every tiny model on the device; counts read from the verbose lines as they come,
    so a run cut by its time box still says how far it got."""
    if args.device == "cpu":  # the dry run: a handful, CI runs the whole suite anyway
        targets = ["tests/test_device_map.py", "-k", "validation or skeleton or refused"]
    else:
        targets = ["tests", "--ignore=tests/test_scaleout.py", "--ignore=tests/test_end_to_end.py",
                   "--ignore=tests/test_gpu_check.py"]  # this check's own CPU dry run: CI runs it
    workers = ["-n", "8"] if args.device == "cuda" and _importable("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *workers, *targets]
    env = {**os.environ, "MATRICE_TEST_DEVICE": args.device}  # PYTHONPATH: the orchestrator's (repo first)
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    outcomes: dict[str, str] = {}
    last = ""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(line)
        last = line.rstrip() or last
        if record_outcome(line, outcomes):  # kept as it goes: a run cut by its box still says how far it got
            _write_part(args, tests_summary(outcomes, last, time.perf_counter() - start, cmd, done=False))
    proc.wait()
    return tests_summary(outcomes, last, time.perf_counter() - start, cmd, done=True, returncode=proc.returncode)


def final_counts(last_line: str) -> dict[str, int]:
    """pytest's closing line ("== 661 passed, 19 skipped in 68.8s ==") as counts; {} for any other line.
    The verbose lines undercount when two parametrised ids differ only after a space."""
    if not re.search(r"\bin [\d.]+s\b", last_line):
        return {}
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", last_line)
    return {("error" if word.startswith("error") else word): int(n) for n, word in found}


def record_outcome(line: str, outcomes: dict[str, str]) -> bool:
    """A verbose pytest line's test id and outcome into `outcomes`; True when the line had one."""
    test = re.search(r"(tests/\S+::\S+)", line)
    outcome = re.search(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line)
    if test and outcome:
        outcomes[test.group(1)] = outcome.group(1).lower()
    return bool(test and outcome)


def tests_summary(outcomes: dict[str, str], tail: str, seconds: float, cmd: list[str], done: bool,
                  returncode: int | None = None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    failures = [t for t, o in outcomes.items() if o in ("failed", "error")]
    counts = (final_counts(tail) if done else {}) or counts
    return {"command": " ".join(cmd), "finished": done, "returncode": returncode, "seconds": round(seconds, 1),
            "counts": counts, "failures": failures, "last_line": tail[-300:]}


def part_ray(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray executor (one actor; one GPU when the device is cuda) against the local executor."""
    import functools

    import numpy as np
    import ray

    from matrice.method.attribution.common import AttributionConfig
    from matrice.method.attribution.executors import RayExecutor
    from matrice.method.attribution.runner import load_attributions, plan_shards, run_attribution, sample_facts_per_relation
    from matrice.data.build import build_dataset
    from matrice.data.sources import DatasetConfig
    from matrice.probing import encode_all

    queries = build_dataset(DatasetConfig(relations=["P36", "P30"], languages=["en", "fr"], max_facts_per_relation=3,
                                          max_templates_per_language=2)).queries
    adapter = tiny_on(args.device)
    encs = encode_all(adapter, queries, few_shot=True)
    shards = plan_shards(queries, sample_facts_per_relation(queries, None, 0))
    cfg = AttributionConfig(steps=3, batch_size=64)
    work = Path(args.scratch)
    start = time.perf_counter()
    run_attribution(adapter, queries, encs, shards, cfg, {"steps": 3}, work / "local")
    local_s = time.perf_counter() - start
    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        start = time.perf_counter()
        with RayExecutor(functools.partial(tiny_on, args.device), address="auto", workers=1) as executor:
            run_attribution(None, queries, encs, shards, cfg, {"steps": 3}, work / "ray", executor=executor)
            actor_gpus = ray.get(executor.actors[0].gpu_ids.remote()) if hasattr(executor.actors[0], "gpu_ids") else None
        ray_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    local, remote = load_attributions(work / "local")[1], load_attributions(work / "ray")[1]
    diff = max(float(np.abs(local[q] - remote[q]).max() / max(np.abs(local[q]).max(), 1e-30)) for q in local)
    return {"queries": len(queries), "shards": len(shards), "same_queries": set(local) == set(remote),
            "max_relative_difference": diff, "local_seconds": round(local_s, 2),
            "ray_seconds_with_startup": round(ray_s, 2), "ray_gpus": gpus}


def part_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage, in dvc.yaml's order, in a copy of the project with `device: <device>`."""
    import yaml

    from pipeline import CONFIGS, reduced_config
    from stages.sequence import as_records, project_copy, reduced_params, run_stages

    root = Path(args.scratch) / "pipeline"
    root.mkdir()
    changed = ["models", "attribute.fact_policy"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if args.device == "cpu":
        key, model_dir = "tiny", root / "tiny_model"
        adapter = tiny_on("cpu")
        adapter.model.save_pretrained(model_dir)
        adapter.tokenizer.save_pretrained(model_dir)
        params = reduced_params(params, key, str(model_dir), "cpu")
        changed = ["models", "dataset", "attribute", "inject", "enhance", "steps"]  # the sections it shrinks
        what = "tiny random LLaMA, reduced dataset (dry run)"
    else:
        key, model_dir = DEFAULT_MODEL_KEY, root / "random_default_model"
        start = time.perf_counter()
        random_default_model(Path(args.tokenizer), model_dir)
        print(f"random-initialised default model written in {time.perf_counter() - start:.1f} s", flush=True)
        model = {**params["models"][key], "source": str(model_dir), "device": args.device}
        if args.pipeline == "reduced":
            params = reduced_config(params, key)
            changed += sorted(c for c in CONFIGS["reduced"].changes if not c.startswith("models."))
        params["models"] = {key: model}
        params["attribute"]["fact_policy"] = "any"  # random weights know no fact; the cost is the same
        what = (f"{PIPELINE_CONFIGS[args.pipeline]}, device cuda, random-initialised model of the default's config "
                "and real tokenizer")
    record: dict[str, Any] = {"model": what, "config": args.pipeline if args.device == "cuda" else "dry run",
                              "params_changed": changed, "stages": []}
    part_start = time.perf_counter()

    def on_start(stage: str) -> None:  # a stage cut by the time box is named, with its log
        record["running"] = {"stage": stage, "started_at_s": round(time.perf_counter() - part_start, 1),
                             "log": f"{PIPELINE_LOGS}/{stage}.log"}
        _write_part(args, record)

    def on_stage(run: Any) -> None:
        record.pop("running", None)  # finished (or failed): only a stage the box cuts stays named
        runs_so_far.append(run)
        record["stages"] = as_records(runs_so_far)
        record["total_seconds"] = round(sum(r.seconds for r in runs_so_far), 1)
        _write_part(args, record)
        print(f"{run.stage}: {run.seconds:.1f} s (rc {run.returncode})", flush=True)

    runs_so_far: list[Any] = []
    runs = run_stages(project_copy(root, params), [key], on_stage, on_start=on_start,
                      log_dir=Path(args.out) / PIPELINE_LOGS)
    failed = next((r for r in runs if r.returncode), None)  # run_stages stops at the first failure
    record["all_stages_ran"] = failed is None
    if failed is not None:
        raise SystemExit(f"stage {failed.stage} failed:\n{failed.stderr_tail}")
    return record


# ---- helpers ------------------------------------------------------------------------------------

def tiny_on(device: str):
    """The tiny random LLaMA on `device` (a picklable factory for Ray actors)."""
    from matrice.models.tiny import tiny_adapter

    adapter = tiny_adapter("llama")
    adapter.model.to(device)
    return adapter


def random_default_model(tokenizer_dir: Path, out: Path) -> None:
    """The default model's exact config with random weights (seeded) and its real tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _part_path(args: argparse.Namespace) -> Path:
    """Where a part's result goes: OUT/<part>.json, except the engine parts, merged into engine.json."""
    if args.part.startswith("engine_"):
        return Path(args.scratch) / f"{args.part}.result.json"
    return Path(args.out) / f"{args.part}.json"


def _write_part(args: argparse.Namespace, result: dict[str, Any]) -> None:
    path = _part_path(args)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


PART_FUNCTIONS = {"environment": part_environment, "engine_bf16": part_engine, "engine_fp32": part_engine,
                  "engine_reference": part_engine, "edit_rows": part_edit_rows, "tests": part_tests, "ray": part_ray,
                  "pipeline": part_pipeline}


def run_part(args: argparse.Namespace) -> None:
    if args.part == "ray" and not _importable("ray"):
        _write_part(args, {"skipped": "ray is not installed here (the wheel is ~80 MB, over one call's 64 MiB carry)"})
        return
    _write_part(args, PART_FUNCTIONS[args.part](args))


# ---- the orchestrator -----------------------------------------------------------------------------

def run_timeboxed(args: argparse.Namespace, part: str, budget: float, log) -> dict[str, Any]:
    """Runs one part in a new process group; kills the whole group when its budget is spent."""
    cmd = [sys.executable, __file__, "--part", part, "--device", args.device, "--out", args.out,
           "--scratch", args.scratch, "--pipeline", args.pipeline, *(["--tokenizer", args.tokenizer] if args.tokenizer else [])]
    log.write(f"\n===== {part} (budget {budget:.0f} s) =====\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if args.device == "cpu":  # tiny models gain nothing from threads, and OpenMP spin-waits on a busy machine
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, status = None, "timed_out"
    seconds = round(time.perf_counter() - start, 1)
    print(f"{part}: {status} in {seconds} s (budget {budget:.0f} s)", flush=True)
    return {"part": part, "status": status, "returncode": rc, "seconds": seconds, "budget_s": budget}


def merge_results(args: argparse.Namespace, checks: dict[str, dict]) -> dict[str, Any]:
    """Each part's JSON gets its time-box record; the engine parts become one engine.json."""
    out, scratch = Path(args.out), Path(args.scratch)
    results: dict[str, Any] = {}
    for part, check in checks.items():
        src = scratch / f"{part}.result.json" if part.startswith("engine_") else out / f"{part}.json"
        if part.startswith("engine_") and not src.exists():  # cut by its time box: what the benchmark kept
            src = scratch / f"{part}.json"
        result = json.loads(src.read_text()) if src.exists() else {}
        if check["status"] == "ok" and result.get("skipped"):
            check["status"] = "skipped"
        if part == "pipeline" and "running" in result:
            result["running"]["last_log_line"] = last_log_line(out / result["running"]["log"])
        results[part] = {**result, "check": check}
    engine = {p.removeprefix("engine_"): results.pop(p) for p in list(results) if p.startswith("engine_")}
    _atomic_json(out / "engine.json", engine)
    for part, result in results.items():
        _atomic_json(out / f"{part}.json", result)
    return {**results, "engine": engine}


def last_log_line(log: Path) -> str:
    """The last non-empty line of a stage's log, a progress bar's last redraw included."""
    if not log.exists():
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", log.read_text(errors="replace")) if line.strip()]
    return lines[-1][-300:] if lines else ""


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def summary_markdown(results: dict[str, Any], device: str) -> str:
    """The table docs/scale.md "On a GPU" quotes: per part status and time, engine, tests, pipeline, goals."""
    env = results.get("environment", {})
    gpu = ", ".join(g["name"] for g in env.get("gpus", [])) or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"# GPU check — {gpu}", "",
             f"Date {datetime.date.today().isoformat()}; device `{device}`; torch {env.get('torch')}, python {env.get('python')}.",
             "", "| part | status | seconds | budget (s) |", "|---|---|---|---|"]
    checks = [results.get(p, {}).get("check") for p in ("environment", "edit_rows", "tests", "ray", "pipeline")]
    checks[1:1] = [r.get("check") for r in results.get("engine", {}).values()]
    checks = [c for c in checks if c]
    lines += [f"| {c['part']} | {c['status']} | {c['seconds']} | {c['budget_s']:.0f} |" for c in checks]
    missing = env.get("missing", {})
    if missing:
        lines += ["", "Missing here: " + "; ".join(f"`{k}` (blocks {v['blocks']})" for k, v in missing.items()) + "."]
    lines += ["", "## Attribution engine (fast, SAIG rows)", "",
              "| shape | dtype | steps | batch | rows/s | s/query | TFLOP/s | fraction of peak | peak mem (GiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in results.get("engine", {}).values():
        for shape in run.get("shapes", []):
            for r in shape["fast"]:
                if "error" in r:
                    lines.append(f"| {shape['shape']} | {shape['dtype']} | {shape['steps']} | {r['batch_size']} | {r['error']} | | | | |")
                    continue
                lines.append(f"| {shape['shape']} | {shape['dtype']} | {shape['steps']} | {r['batch_size']} | {r['rows_per_s']} | "
                             f"{r['seconds_per_query']} | {r['achieved_tflops']} | {r['fraction_of_peak']} | {r['peak_memory_gib']} |")
    for run in results.get("engine", {}).values():
        for shape in run.get("shapes", []):
            prof = shape.get("time_by_op")
            if isinstance(prof, dict):
                busy = prof.get("device_busy_fraction")
                lines.append(f"- {shape['shape']} {shape['dtype']}: " + (f"device busy {busy:.0%} of the wall time; " if busy is not None else "")
                             + "top ops " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["ops"][:4])
                             + ("; host " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof.get("host_ops", [])[:3]) if prof.get("host_ops") else ""))
    peaks = [f"{k}: {v['matmul_peak_tflops']} TFLOP/s" for k, v in results.get("engine", {}).items() if "matmul_peak_tflops" in v]
    if peaks:
        lines += ["", "Measured matmul peak (same device and dtype) — " + "; ".join(peaks) + "."]
    ref = results.get("engine", {}).get("reference", {})
    for shape in ref.get("shapes", []):
        for engine in ("reference", "peer"):
            if engine in shape:
                e = shape[engine]
                lines.append(f"- {shape['shape']}: fast vs {engine}: max relative difference {e['max_relative_difference']:.2e}, "
                             f"fast is {e['fast_speedup']}× faster.")
    rows = results.get("edit_rows", {})
    if rows.get("speedup_over_one"):
        lines += ["", "## Editing passes: edits per forward", "",
                  f"{rows['model']}, {rows['queries']} queries × {rows['edits']} edits (one fact of the λ sweep): "
                  + ", ".join(f"{k} per pass {rows['best_seconds_per_fact'][k]} s ({rows['speedup_over_one'][k]}×)"
                              for k in rows["best_seconds_per_fact"])
                  + "; scores against one per pass: max relative difference "
                  + f"{max(v['max_relative_prob_difference'] for v in rows['scores_against_one_per_pass'].values()):.1e}, "
                  + f"same rank and top token {min(v['same_rank_and_top'] for v in rows['scores_against_one_per_pass'].values()):.1%}."]
    tests = results.get("tests", {})
    if tests.get("counts") is not None:
        lines += ["", "## Tests on the device", "",
                  f"`{tests.get('command', '')}`: " + ", ".join(f"{n} {o}" for o, n in sorted(tests["counts"].items()))
                  + f" in {tests.get('seconds')} s" + ("" if tests.get("finished") else " (cut by its time box)") + "."]
        lines += [f"- failed: `{t}`" for t in tests.get("failures", [])[:20]]
    ray = results.get("ray", {})
    lines += ["", "## Ray executor", ""]
    if ray.get("skipped"):
        lines.append(f"Skipped: {ray['skipped']}.")
    elif "max_relative_difference" in ray:
        lines.append(f"One actor ({ray['ray_gpus']} GPU) against the local executor on {ray['queries']} queries: "
                     f"max relative difference {ray['max_relative_difference']:.2e}; local {ray['local_seconds']} s, "
                     f"Ray {ray['ray_seconds_with_startup']} s with start-up.")
    else:
        lines.append(f"{ray.get('check', {}).get('status', 'not run')}.")
    pipe = results.get("pipeline", {})
    lines += ["", "## Pipeline end to end", "", f"Model: {pipe.get('model', '?')}.", "",
              "| stage | seconds | rc |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']} | {s['returncode']} |" for s in pipe.get("stages", [])]
    lines += [f"| **total** | **{pipe.get('total_seconds', '?')}** | |"]
    running = pipe.get("running")
    if running:
        lines += ["", f"Stopped by the time box inside `{running['stage']}`, which started {running['started_at_s']} s "
                  f"into the part; the last line of its log (`{running['log']}`): `{running.get('last_log_line', '')}`"]
    lines += ["", "## Goals", "", *goal_lines(results)]
    return "\n".join(lines) + "\n"


def goal_lines(results: dict[str, Any]) -> list[str]:
    def best(dtype: str, shape: str, key: str, pick) -> float | None:
        for s in results.get("engine", {}).get(dtype, {}).get("shapes", []):
            values = [r[key] for r in s["fast"] if key in r] if s["shape"] == shape else []
            if values:
                return pick(values)
        return None

    llama = best("bf16", "llama-2-7b", "fraction_of_peak", max)
    gemma = [v for v in (best("bf16", "gemma3-270m", "seconds_per_query", min),
                         best("fp32", "gemma3-270m", "seconds_per_query", min)) if v is not None]
    pipe = results.get("pipeline", {})
    whole_default = pipe.get("all_stages_ran") and pipe.get("config") == "default"
    total = pipe.get("total_seconds") if whole_default else None

    def verdict(value, ok) -> str:
        return "not measured" if value is None else ("met" if ok(value) else "not met")

    return [f"- LLaMA-2-7B shape, bf16, ≥ {LLAMA_GOAL_FRACTION:.0%} of the bf16 matmul peak: {llama} — "
            f"{verdict(llama, lambda v: v >= LLAMA_GOAL_FRACTION)}",
            f"- Gemma-3-270M shape, M = 20, ≤ {GEMMA_GOAL_S_PER_QUERY:.2f} s/query: {min(gemma) if gemma else None} — "
            f"{verdict(min(gemma) if gemma else None, lambda v: v <= GEMMA_GOAL_S_PER_QUERY)}",
            f"- whole default pipeline ≤ {PIPELINE_GOAL_S} s: {total} — {verdict(total, lambda v: v <= PIPELINE_GOAL_S)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="folder for the JSON/Markdown results")
    parser.add_argument("--tokenizer", default=None, help="(cuda) the default model's config.json + tokenizer files")
    parser.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS", help="override a part's time box")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--pipeline", default="reduced", choices=sorted(PIPELINE_CONFIGS),
                        help="(cuda) the pipeline part's config: reduced (every stage timed) or default (the goal's)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args)
        return
    budgets = dict(GPU_BUDGETS if args.device == "cuda" else CPU_BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in budgets or not seconds:
            raise SystemExit(f"--budget {item!r}: expected PART=SECONDS with PART in {PARTS}")
        budgets[part] = float(seconds)
    args.scratch = tempfile.mkdtemp(prefix="gpu-check-")
    checks: dict[str, dict] = {}
    with open(Path(args.out) / "gpu_check.log", "w") as log:
        for part in args.parts:
            checks[part] = run_timeboxed(args, part, budgets[part], log)
    results = merge_results(args, checks)
    (Path(args.out) / "summary.md").write_text(summary_markdown(results, args.device))
    print((Path(args.out) / "summary.md").read_text())


if __name__ == "__main__":
    main()
