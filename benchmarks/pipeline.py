"""Every dvc.yaml stage on a declared small config of the packaged model, timed per stage, in a throwaway copy.

    make smoke                                        # = python benchmarks/pipeline.py --config smoke
    python benchmarks/pipeline.py --config reduced --out pipeline.json --keep /tmp/run
    python benchmarks/pipeline.py --config smoke --reuse-model   # link models/<key> instead of converting
    python benchmarks/pipeline.py --config smoke --set answer_token=all   # any params.yaml value on top

Why: `dvc repro` on the default params takes hours on a laptop, and the unit tests run the stages on a
random tiny model only. This runs the same commands `dvc repro` would, in dvc.yaml's order
(stages/sequence.py), on the real embedded Gemma 3 270M on the CPU, in a copy of the project, so the
repository's results, dvc.lock and DVC cache are never touched. It prints where the time goes, and the
smoke config also checks that the report's verdict table exists and claims nothing its sample cannot
support. Configs (the params.yaml leaves each one changes are declared in CONFIGS):

- smoke: relations P36 and P30, languages en/fr/zh, 4 facts per relation in the dataset, 2 attributed
  per relation (fact_policy any), 3 paraphrases per language (2 localise, 1 held out), M = 2; every
  experiment with every method but less of it: enhancement in fr and zh, 2 unrelated facts for
  locality, λ in {1, 4} for the sweep, a tiny injection (4 new / 4 old facts, 1 epoch, the first
  learning rate of each sweep), 6 degenerate-neuron candidates.
- reduced: relation P36 only, 10 facts in the dataset, 2 attributed, all 7 languages, every other
  parameter the default's."""

from __future__ import annotations

import argparse
import datetime
import json
import time
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrice.io import read_params, read_yaml  # noqa: E402
from stages import warm  # noqa: E402
from stages.sequence import (DEFAULT_KEY, EMBEDDED_SOURCE, StageRun, project_copy, run_stages,  # noqa: E402
                             smoke_params, stage_commands, stage_env, stderr_tail)

CLAIMED = ("replicates", "contradicts")  # the verdicts that assert a direction (matrice/evaluation/document.py)


# ---- configs ----------------------------------------------------------------------------------

def reduced_config(params: dict[str, Any], key: str = DEFAULT_KEY) -> dict[str, Any]:
    """One relation in every language at the default's M, facts per relation and experiments: what one
    relation of the real run costs."""
    params = yaml.safe_load(yaml.safe_dump(params))  # a deep copy
    params["models"] = {key: {"source": EMBEDDED_SOURCE, "device": "cpu", "dtype": "float32"}}
    params["dataset"].update(relations=["P36"], max_facts_per_relation=10)
    params["attribute"]["facts_per_relation"] = 2
    return params


@dataclass(frozen=True)
class Config:
    """A named params builder and the params.yaml leaves (dotted paths) it is allowed to change."""

    build: Callable[[dict[str, Any]], dict[str, Any]]
    changes: frozenset[str]


_MODEL = f"models.{DEFAULT_KEY}"
CONFIGS = {
    "smoke": Config(smoke_params, frozenset({
        f"{_MODEL}.source", f"{_MODEL}.device", f"{_MODEL}.dtype", "dataset.relations", "dataset.languages",
        "dataset.max_facts_per_relation", "dataset.max_templates_per_language", "attribute.facts_per_relation",
        "attribute.templates_per_language", "attribute.fact_policy", "edit.locality_k", "edit_sweep.lambdas",
        "enhance.languages", "inject.max_new", "inject.max_old", "inject.epochs", "inject.lrs.default",
        "inject.lrs.direct_ft", "inject.seeds", "degenerate.max_candidates", "steps"})),
    "reduced": Config(reduced_config, frozenset({
        f"{_MODEL}.source", f"{_MODEL}.device", f"{_MODEL}.dtype", "dataset.relations",
        "dataset.max_facts_per_relation", "attribute.facts_per_relation"})),
}


def with_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``params`` with each ``dotted.key=value`` of ``overrides`` set (the value read as YAML), as
    `dvc exp run -S` would set it; a key that is not in params.yaml is an error."""
    params = yaml.safe_load(yaml.safe_dump(params))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set {item!r}: {key} is not a parameter of params.yaml")
        node[leaf] = read_yaml(text)
    return params


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a params tree; lists are leaves (a list is one param)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_leaves(base: dict[str, Any], other: dict[str, Any]) -> set[str]:
    """Dotted paths whose value differs between two params trees, or that only one of them has."""
    a, b = leaves(base), leaves(other)
    return {k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object())}


# ---- the report check ---------------------------------------------------------------------------

@dataclass(frozen=True)
class VerdictRow:
    """One row of a verdict table: its first cell (the paper's figure or table) and its verdict word."""

    source: str
    verdict: str
    line: str


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _verdict_word(cell: str) -> str:
    """`**inconclusive** (why)` -> `inconclusive`: the bold word when there is one, else the text before a note."""
    bold = re.search(r"\*\*(.+?)\*\*", cell)
    return (bold.group(1) if bold else cell.split("(")[0]).strip().lower()


def verdict_tables(report: str) -> list[list[VerdictRow]]:
    """Every markdown table whose header has a `verdict` column, as its rows (a report has one per model)."""
    lines, tables, i = report.splitlines(), [], 0
    while i < len(lines):
        header = _cells(lines[i]) if lines[i].lstrip().startswith("|") else []
        column = next((j for j, c in enumerate(header) if c.lower() == "verdict"), None)
        if column is None or i + 1 >= len(lines) or not re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()):
            i += 1
            continue
        rows, i = [], i + 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            cells = _cells(lines[i])
            # a note with a "|" in it shifts the cells: the verdict column is then read from the end
            cell = cells[column] if len(cells) == len(header) else cells[column - len(header)]
            rows.append(VerdictRow(cells[0], _verdict_word(cell), lines[i]))
            i += 1
        tables.append(rows)
    return tables


def sign_flip_floor(n_relations: int) -> float:
    """The smallest p the exact two-sided sign-flip test over n relation means can give: 1/2^(n-1)."""
    return 0.5 ** (max(n_relations, 1) - 1)


def claims_possible(n_relations: int | None, alpha: float) -> bool:
    """Whether n relations can reach p < alpha at all; None (every relation) counts as enough."""
    return n_relations is None or sign_flip_floor(n_relations) < alpha


def check_report(report: str, n_relations: int | None, alpha: float = 0.05) -> list[str]:
    """Problems with a report's verdict tables (empty: it passes): none there, a table without rows or
    with an empty verdict, or a claimed direction that `n_relations` cannot support."""
    tables = verdict_tables(report)
    if not tables:
        return ["reports/report.md has no verdict table (a markdown table with a 'verdict' column)"]
    problems = []
    for rows in tables:
        if not rows:
            problems.append("a verdict table has no rows")
        problems += [f"a row has no verdict: {r.line}" for r in rows if not r.verdict]
        if n_relations is not None and not claims_possible(n_relations, alpha):
            problems += [f"{r.source}: claims '{r.verdict}' with {n_relations} relations, where the sign-flip p "
                         f"cannot go below {sign_flip_floor(n_relations):g} (alpha {alpha}): {r.line}"
                         for r in rows if r.verdict in CLAIMED]
    return problems


# ---- the work each stage did (--work) ------------------------------------------------------------
COUNTER = REPO / "benchmarks" / "count_flops.py"
# attribute resumes from its shards, so a rerun computes nothing: benchmarks/attribution.py measures it
NOT_COUNTED = ("attribute",)
STARTUP = ("import sys\nfrom stages.common import load_params, load_prepared\n"
           "load_prepared(sys.argv[1], load_params())")


@dataclass(frozen=True)
class StageWork:
    """A stage's timed seconds beside the FLOPs a counted rerun executed and what they need at the
    machine's matmul rate (`floor_seconds`); `floor_share` = floor / seconds (1 is the ceiling), and
    the same after taking the start-up (imports, tokenizer and weights) off the seconds (None: a
    warm-started run, whose start-up is about a second and is not taken off)."""

    stage: str
    seconds: float
    gflop_blocks: float
    gflop_outside: float
    floor_seconds: float
    floor_share: float
    floor_share_after_startup: float | None
    counted_returncode: int


def counted_stages(runs: list[StageRun]) -> list[StageRun]:
    """The model stages that ran and succeeded, minus those a rerun would not recompute."""
    return [r for r in runs if "@" in r.stage and not r.returncode and r.stage.split("@")[0] not in NOT_COUNTED]


def matmul_rate(threads: int) -> float:
    """FLOP/s of a large fp32 matmul on this CPU with the stages' thread count (the floor's ceiling)."""
    import torch

    from benchmarks.attribution import matmul_peak

    torch.set_num_threads(threads)
    return matmul_peak(torch.device("cpu"), torch.float32)


def startup_seconds(root: Path, key: str, repeats: int = 2) -> float:
    """What every model stage pays before it computes: Python, torch, transformers, the tokenizer and
    the weights (the quicker of `repeats` fresh processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP, key], cwd=root, env=stage_env(root), check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def stage_work(run: StageRun, counted: dict[str, Any], rate: float, startup: float) -> StageWork:
    flops = counted["flops"]
    floor = flops["total"] / rate
    return StageWork(run.stage, run.seconds, round(flops["blocks"] / 1e9, 1), round(flops["outside"] / 1e9, 1),
                     round(floor, 2), round(floor / run.seconds, 3),
                     round(floor / max(run.seconds - startup, 1e-9), 3) if startup else None, counted["returncode"])


def count_work(root: Path, runs: list[StageRun], rate: float, startup: float) -> list[StageWork]:
    """Each counted stage rerun in the copy under benchmarks/count_flops.py (outputs are deterministic,
    so the rerun rewrites the same files)."""
    work = []
    for run in counted_stages(runs):
        _, _, module, *args = run.cmd.split()  # python -m stages.<name> <key>
        out = root / "work" / f"{run.stage}.json"
        log(f"{run.stage}: counting its FLOPs")
        done = subprocess.run([sys.executable, str(COUNTER), str(out), "-m", module, *args], cwd=root,
                              env=stage_env(root), capture_output=True, text=True)
        if not out.exists():
            log(f"{run.stage}: the counted rerun wrote nothing (rc {done.returncode}); the end of its stderr:\n"
                + stderr_tail(done.stderr))
            continue
        work.append(stage_work(run, json.loads(out.read_text()), rate, startup))
    return work


def work_table(work: list[StageWork], rate: float, startup: float) -> str:
    """The floor beside each stage's time; the ceiling and the start-up named in the header."""
    width = max([len(w.stage) for w in work] + [len("stage")])
    start = (f"start-up {startup:.1f} s per model stage" if startup else
             "model stages warm-started (start-up about 1 s, not taken off)")
    lines = [f"matmul ceiling {rate / 1e9:.1f} GFLOP/s; {start}",
             f"{'stage':<{width}}  {'seconds':>8}  {'GFLOP blocks':>12}  {'GFLOP outside':>13}  {'floor s':>8}  "
             f"{'floor/time':>10}  {'after start-up':>14}"]
    lines += [f"{w.stage:<{width}}  {w.seconds:>8.1f}  {w.gflop_blocks:>12.1f}  {w.gflop_outside:>13.1f}  "
              f"{w.floor_seconds:>8.1f}  {w.floor_share:>10.2f}  "
              + (f"{w.floor_share_after_startup:>14.2f}" if w.floor_share_after_startup is not None else f"{'–':>14}")
              + ("  (counted rerun FAILED)" if w.counted_returncode else "") for w in work]
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class Benchmark:
    """What --out records: the config, the machine's load, every stage's time and return code."""

    config: str
    params_changed: list[str]
    model_reused: bool
    cpu_count: int
    threads: int
    load_before: list[float]
    started: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    total_seconds: float = 0.0
    load_after: list[float] = field(default_factory=list)
    failed_stage: str | None = None
    failed_stderr_tail: str = ""
    report_problems: list[str] = field(default_factory=list)
    ok: bool = False
    warm_start: bool = True  # model stages forked by the warm-start server (False: --cold)
    matmul_gflops: float | None = None  # --work: the ceiling the floors use
    startup_seconds: float | None = None  # --work: a model stage's start-up
    work: list[dict[str, Any]] = field(default_factory=list)  # --work: StageWork per counted stage


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def link_prepared_model(root: Path, key: str, source: str) -> bool:
    """Links the repository's prepared models/<key> into the copy when it was made from `source`, so
    prepare_model (the GGUF conversion) can be skipped; False when there is none to link."""
    prepared = REPO / "models" / key
    info = prepared / "source.json"
    if not info.exists() or json.loads(info.read_text()).get("source") != source:
        return False
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / key).symlink_to(prepared, target_is_directory=True)
    return True


def stage_table(runs: list[StageRun]) -> str:
    """stage | seconds | share of the total, and the total."""
    total = sum(r.seconds for r in runs) or 1.0
    width = max([len(r.stage) for r in runs] + [len("total")])
    lines = [f"{'stage':<{width}}  {'seconds':>8}  {'share':>6}", "-" * (width + 18)]
    lines += [f"{r.stage:<{width}}  {r.seconds:>8.1f}  {r.seconds / total:>6.1%}"
              + ("  FAILED" if r.returncode else "") for r in runs]
    lines += ["-" * (width + 18), f"{'total':<{width}}  {sum(r.seconds for r in runs):>8.1f}  {1:>6.0%}"]
    return "\n".join(lines)


def auto_threads(cpus: int, load: float) -> int:
    """Torch threads per stage: the cores the machine's load leaves free, at least one. Two OpenMP
    threads on two cores that another process also wants are several times slower than one."""
    return max(1, min(cpus, cpus - round(load)))


def run_config(name: str, root: Path, reuse_model: bool, record: Benchmark,
               save: Callable[[], None], overrides: Sequence[str] = ()) -> list[StageRun]:
    """The config's params (and ``overrides``) in a project copy at `root`, every stage run there
    (prepare_model skipped only when `reuse_model` and a prepared model of the same source could be linked)."""
    base = read_params(REPO / "params.yaml")
    params = with_overrides(CONFIGS[name].build(base), overrides)
    project_copy(root, params)
    keys = list(params["models"])
    skip = {f"prepare_model@{k}" for k in keys
            if reuse_model and link_prepared_model(root, k, params["models"][k]["source"])}
    record.model_reused = bool(skip)
    if reuse_model and not skip:
        log("no prepared model of this source in models/: prepare_model runs")
    log(f"config {name}: {len(stage_commands(keys)) - len(skip)} stages in {root}")

    def finished(run: StageRun) -> None:
        record.stages.append({"stage": run.stage, "seconds": run.seconds, "returncode": run.returncode})
        record.total_seconds = round(sum(s["seconds"] for s in record.stages), 1)
        save()  # after every stage: a run cut short still says how far it got
        log(f"{run.stage} finished in {run.seconds:.1f} s" + (f" (FAILED, rc {run.returncode})" if run.returncode else ""))

    return run_stages(root, keys, finished, on_start=lambda stage: log(f"{stage} starting"), skip=skip)


def report_problems(root: Path) -> list[str]:
    """check_report on the copy's report, with the config's relation count and alpha."""
    report = root / "reports" / "report.md"
    if not report.exists():
        return [f"{report} is missing"]
    params = read_params(root / "params.yaml")
    relations = params["dataset"].get("relations")
    alpha = float((params.get("verdicts") or {}).get("alpha", 0.05))
    return check_report(report.read_text(encoding="utf-8"), len(relations) if relations else None, alpha)


def write_json(path: Path, record: Benchmark) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    tmp.replace(path)


def workspace(keep: str | None) -> Path:
    """The copy's root: `keep` (new or empty) when asked, else a temporary folder removed afterwards."""
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="matrice-pipeline-"))
    root = Path(keep).resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--keep {keep}: the folder is not empty")
    root.mkdir(parents=True, exist_ok=True)
    return root


def judge(runs: list[StageRun], root: Path, record: Benchmark) -> None:
    """The run's verdict into `record`, printed: the failed stage and its stderr tail, or the report check."""
    failed = next((r for r in runs if r.returncode), None)  # run_stages stops at the first failure
    if failed is not None:
        record.failed_stage, record.failed_stderr_tail = failed.stage, failed.stderr_tail
        print(f"stage {failed.stage} failed (rc {failed.returncode}): {failed.cmd}\n--- stderr tail ---\n"
              f"{failed.stderr_tail}", file=sys.stderr, flush=True)
    else:
        record.report_problems = report_problems(root)
        for problem in record.report_problems:
            print(f"report check: {problem}", file=sys.stderr, flush=True)
        if not record.report_problems:
            log("report check: reports/report.md has its verdict table and claims nothing n cannot support")
    record.ok = failed is None and not record.report_problems


def measure_work(root: Path, runs: list[StageRun], threads: int, record: Benchmark) -> None:
    """--work: the machine's matmul rate, a model stage's start-up and every counted stage's FLOPs into `record`."""
    rate = matmul_rate(threads)
    # a cold run pays a model load per stage (measured, taken off in a second column); a warm one about a second
    startup = 0.0 if record.warm_start else startup_seconds(root, next(r.stage for r in runs if "@" in r.stage).split("@")[1])
    work = count_work(root, runs, rate, startup)
    record.matmul_gflops, record.startup_seconds = round(rate / 1e9, 1), round(startup, 2)
    record.work = [asdict(w) for w in work]
    print("\n" + work_table(work, rate, startup) + "\n", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="smoke")
    parser.add_argument("--out", help="write per-stage seconds, return codes and the total to this JSON file")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new or empty) and keep it")
    parser.add_argument("--reuse-model", action="store_true",
                        help="link the prepared models/<key> and skip prepare_model (not an honest total)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per stage (OMP_NUM_THREADS); default: the cores the load average leaves free")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml value on top of the config, as `dvc exp run -S` (e.g. answer_token=all)")
    parser.add_argument("--cold", action="store_true",
                        help="every stage in a fresh process (MATRICE_WARM=0), as without the warm-start server")
    parser.add_argument("--work", action="store_true",
                        help="afterwards rerun each model stage under torch's FLOP counter and set its floor "
                             "(FLOPs at the measured matmul rate) beside its time")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    base = read_params(REPO / "params.yaml")
    cpus, load = os.cpu_count() or 1, [round(x, 2) for x in os.getloadavg()]
    threads = args.threads or auto_threads(cpus, load[0])
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # the stages inherit it
    # the model stages' warm-start server (stages/warm.py) lives in a folder of this run's own: stopped and
    # removed at the end, so a benchmark or CI run leaves no process behind; --cold turns warm start off
    warm_dir = Path(tempfile.mkdtemp(prefix="matrice-warm-"))
    os.environ.update({warm.DIR_ENV: str(warm_dir), warm.ENABLE_ENV: "0" if args.cold else "1"})
    record = Benchmark(args.config, sorted(changed_leaves(base, with_overrides(CONFIGS[args.config].build(base), args.set))), False,
                       cpus, threads, load, datetime.datetime.now().isoformat(" ", "seconds"))
    record.warm_start = not args.cold
    save = (lambda: write_json(Path(args.out), record)) if args.out else (lambda: None)
    root = workspace(args.keep)
    # SIGTERM (a CI time-out, make interrupted) unwinds like Ctrl-C: the running stage is killed, the copy removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(f"load average before: {load} on {cpus} CPUs; {threads} torch thread(s) per stage")
    try:
        runs = run_config(args.config, root, args.reuse_model, record, save, args.set)
        record.total_seconds = round(sum(r.seconds for r in runs), 1)
        record.load_after = [round(x, 2) for x in os.getloadavg()]
        print("\n" + stage_table(runs) + "\n", flush=True)
        judge(runs, root, record)
        if args.work and runs:
            measure_work(root, runs, threads, record)
        log(f"total {record.total_seconds:.1f} s; load average after: {record.load_after}"
            + (f"; kept in {root}" if args.keep else ""))
        save()
    finally:
        warm.stop_servers(warm_dir)
        shutil.rmtree(warm_dir, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if record.ok else 1


if __name__ == "__main__":
    sys.exit(main())
