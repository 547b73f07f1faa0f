"""The dvc.yaml stages in their order as plain commands, and a runner for them in a copy of the project.

Why: a machine without DVC (a lent GPU machine) or a test that wants every stage's wiring runs the
same commands `dvc repro` would, in the file's order (dvc.yaml lists the stages top to bottom, each
after what it reads), with per-stage wall times."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_SOURCE = "embedded:gemma3-270m"  # the packaged default (matrice.models.loading.EMBEDDED_GEMMA)
DEFAULT_KEY = "gemma3_270m"
STDERR_TAIL_CHARS = 3000  # of a failed command's stderr, kept to say why
PROGRESS_EVERY_S = 10  # seconds between a logged progress bar's redraws


def stderr_tail(stderr: str) -> str:
    """The end of a failed command's stderr: its error, without the whole log before it."""
    return stderr[-STDERR_TAIL_CHARS:]


@dataclass
class StageRun:
    """One stage command's outcome: its wall time and, when it failed, the end of its stderr."""

    stage: str
    cmd: str
    seconds: float
    returncode: int
    stderr_tail: str = ""


def stage_commands(model_keys: list[str], dvc_yaml: Path = REPO / "dvc.yaml") -> list[tuple[str, str]]:
    """(stage name, command) in dvc.yaml's order; a `foreach: ${models}` stage once per model key."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = []
    for name, stage in stages.items():
        if "foreach" in stage:
            out += [(f"{name}@{key}", stage["do"]["cmd"].replace("${key}", key)) for key in model_keys]
        else:
            out.append((name, stage["cmd"]))
    return out


def project_copy(root: Path, params: dict[str, Any]) -> Path:
    """A runnable copy of the code (stages/, matrice/) under `root` with `params` as its params.yaml."""
    for name in ("stages", "matrice"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def reduced_params(params: dict[str, Any], key: str, source: str, device: str) -> dict[str, Any]:
    """`params` shrunk to a minutes-long run of every stage on one (random) model: two relations,
    three languages, two facts each, M = 2. A random model knows no fact, so every fact is attributed."""
    params = yaml.safe_load(yaml.safe_dump(params))  # a deep copy
    params["models"] = {key: {"source": source, "device": device, "dtype": "float32"}}
    params["dataset"].update(relations=["P36", "P30"], languages=["en", "fr", "zh"], max_facts_per_relation=4)
    params["attribute"].update(facts_per_relation=2, fact_policy="any", batch_size=64)
    params["inject"].update(max_new=4, max_old=4, epochs=1)
    params["enhance"]["languages"] = ["fr", "zh"]  # the "low-resource" ones among the three kept
    params["steps"] = 2
    return params


def smoke_params(params: dict[str, Any], key: str = DEFAULT_KEY) -> dict[str, Any]:
    """`reduced_params` on the real packaged model (on the CPU): the run `make smoke` makes, small
    enough for ten minutes on two busy cores, real enough that the model's own wiring is exercised.
    Beyond `reduced_params`, each experiment keeps every method but does less of it: three paraphrases
    per language (two localise, one is held out), two unrelated facts for locality, two λ in the
    sweep, one learning rate (the grid's second) and one seed per injection variant, six
    degenerate-neuron candidates. The attribution batch stays the default's (a real model's rows run
    faster in large batches)."""
    smoke = reduced_params(params, key, EMBEDDED_SOURCE, "cpu")
    smoke["dataset"]["max_templates_per_language"] = 3
    smoke["attribute"].update(templates_per_language=2, batch_size=params["attribute"]["batch_size"])
    smoke["edit"]["locality_k"] = 2
    smoke["edit_sweep"]["lambdas"] = [1.0, 4.0]
    smoke["inject"]["lrs"] = {variant: sorted(rates)[1:2] or rates[:1] for variant, rates in params["inject"]["lrs"].items()}
    smoke["inject"]["seeds"] = params["inject"]["seeds"][:1]
    smoke["degenerate"]["max_candidates"] = 6
    return smoke


def stage_env(root: Path, progress: bool = False) -> dict[str, str]:
    """The environment a stage command runs in inside the copy: its code first on the path; progress
    bars off, or (`progress`) on and redrawn at most every PROGRESS_EVERY_S, for a log file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if not progress:
        return {**env, "TQDM_DISABLE": "1"}
    env.pop("TQDM_DISABLE", None)
    return {**env, "TQDM_MININTERVAL": str(PROGRESS_EVERY_S)}


def run_stage_command(cmd: str, root: Path, env: dict[str, str], log: Path | None) -> tuple[int, str]:
    """One stage command's return code and stderr; with `log`, its stdout and stderr go to that file as
    they come (a stage stopped from outside still leaves how far it got), read back only if it failed."""
    argv = [sys.executable, *cmd.split()[1:]]
    if log is None:
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        return done.returncode, done.stderr
    with open(log, "w") as stream:
        returncode = subprocess.run(argv, cwd=root, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    return returncode, log.read_text(errors="replace") if returncode else ""


def run_stages(root: Path, model_keys: list[str],
               on_stage: Callable[[StageRun], None] | None = None, *,
               on_start: Callable[[str], None] | None = None, skip: Collection[str] = (),
               log_dir: Path | None = None) -> list[StageRun]:
    """Every stage in `root` (a `project_copy`), in order, stopping at the first failure. `skip`: stage
    names (as `stage_commands` spells them) whose outputs the caller already put in place. `log_dir`:
    each stage's output, progress bars included, in `<log_dir>/<stage>.log` as it runs."""
    env = stage_env(root, progress=log_dir is not None)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, cmd in stage_commands(model_keys):
        if name in skip:
            continue
        if on_start is not None:
            on_start(name)
        start = time.perf_counter()
        returncode, stderr = run_stage_command(cmd, root, env, log_dir / f"{name}.log" if log_dir else None)
        run = StageRun(name, cmd, round(time.perf_counter() - start, 2), returncode,
                       stderr_tail(stderr) if returncode else "")
        runs.append(run)
        if on_stage is not None:
            on_stage(run)
        if returncode:
            break
    return runs


def as_records(runs: list[StageRun]) -> list[dict[str, Any]]:
    return [asdict(r) for r in runs]
