"""Run the stale stages of dvc.yaml several at a time, then record each in dvc.lock as `dvc repro` does.

Why: `dvc repro` runs one stage at a time, and DVC cannot run two at once in one project. Here a
stage computes near a core's matmul rate on one thread (a small model's small matmuls gain little
from a second), and the experiments after `select` read only what is upstream of them: on a machine
with c cores, j stages of c/j threads each finish the pipeline sooner (the default's experiments on
two one-thread lanes: 2 h 07 min of wall time for 4 h 41 min of stage time, benchmarks/README.md).

What runs is what `dvc repro` would run: every stage `dvc status` reports, and every stage downstream
of one. A stage starts when everything upstream of it has finished; its outputs that do not persist
are removed first, as DVC does; once its command succeeds it is recorded (`dvc commit -f` of that
stage: its dependencies, parameters and outputs as they are now). A failed stage stops new starts;
the running ones finish and are recorded, and nothing downstream of the failure runs.

Of the stages ready to start, the one with the longest remaining path (its own time plus the
longest chain of stages downstream of it, from the times the last runs took) starts first, so the
long stages do not end up alone at the end; a stage never timed counts as 0 s, dvc.yaml's order
breaks ties. The times are kept in `.dvc/tmp/parallel/durations.json`.

With ``-S`` and ``--exp`` it is `dvc exp run -S ...` with several stages at a time: the parameter
overrides (DVC's syntax: ``tau=0.3``, ``edit.lambda1=2``, ``file.yaml:key=value``) are written into
the parameter files, the stale stages run, and the workspace is saved as an experiment (`dvc exp
save`), so `dvc exp show`, `dvc metrics diff` and `dvc plots diff` compare it as they would a
`dvc exp run`.

    python -m stages.parallel --jobs 2                          # or: make pipeline JOBS=2
    python -m stages.parallel --jobs 2 -S tau=0.3 --exp         # or: make exp S=tau=0.3 JOBS=2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx  # DVC's own graph library: its stage graph is a networkx DiGraph

from matrice.io import atomic_write_json, atomic_write_text, read_yaml

POLL_S = 0.2
DURATIONS = "durations.json"


@dataclass(frozen=True)
class Stage:
    """One stage as DVC expands it: its address (``name@key`` for a foreach), command, working
    directory, the outputs to remove before it runs, and the stages it reads from."""

    address: str
    cmd: str
    wdir: Path
    transient_outs: tuple[Path, ...]
    upstream: frozenset[str]


@dataclass
class Outcome:
    """What a run did: stages recorded, the one that failed (with its log), and those never started."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def stale_stages(root: Path, targets: list[str] | None = None) -> list[Stage]:
    """The stages `dvc repro` would run in ``root`` (all of them, or those ``targets`` lead to): the
    ones `dvc status` reports and everything downstream of them, in an order that respects the graph."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it reads from
        stages = {s.addressing: s for s in graph.nodes}
        wanted = set(stages)
        if targets:
            wanted = {a for t in targets for a in _closure_upstream(graph, stages, t)}
        changed = {a for a in repo.status(targets=targets or None, with_deps=True) if a in stages}
        to_run = changed | {d.addressing for a in changed for d in nx.ancestors(graph, stages[a])}
        to_run &= wanted
        position = {s.addressing: i for i, s in enumerate(repo.index.stages)}  # dvc.yaml's order breaks ties
        upstream_first = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: position[s.addressing])
        order = [s.addressing for s in upstream_first if s.addressing in to_run]
        return [Stage(a, stages[a].cmd, Path(stages[a].wdir),
                      tuple(Path(o.fs_path) for o in stages[a].outs if not o.persist),
                      frozenset(u.addressing for u in graph.successors(stages[a]) if u.addressing in to_run))
                for a in order]


def _closure_upstream(graph: nx.DiGraph, stages: dict, target: str) -> set[str]:
    if target not in stages:
        raise SystemExit(f"no stage {target!r} in dvc.yaml (stages: {', '.join(sorted(stages))})")
    return {target} | {s.addressing for s in nx.descendants(graph, stages[target])}


def remaining_path(stages: list[Stage], durations: dict[str, float]) -> dict[str, float]:
    """Per stage: its time plus the longest chain of times downstream of it (the time still needed
    once it starts, however many cores); a stage never timed counts as 0."""
    downstream: dict[str, list[str]] = {s.address: [] for s in stages}
    for s in stages:
        for up in s.upstream:
            downstream[up].append(s.address)
    path: dict[str, float] = {}
    for s in reversed(stages):  # upstream first, so every stage downstream of s is done before s
        path[s.address] = durations.get(s.address, 0.0) + max((path[d] for d in downstream[s.address]), default=0.0)
    return path


def read_durations(log_dir: Path) -> dict[str, float]:
    """The seconds each stage took when it last ran here (empty before the first run)."""
    try:
        return {str(k): float(v) for k, v in json.loads((log_dir / DURATIONS).read_text()).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def run(root: Path, stages: list[Stage], jobs: int, threads: int, log_dir: Path) -> Outcome:
    """Every stage in ``stages`` (upstream first), at most ``jobs`` at a time with ``threads`` torch
    threads each, the ready stage with the longest remaining path first; each recorded in dvc.lock
    as soon as it succeeds, and its time kept for the next run's order. A stage that starts alone,
    with every stage still waiting downstream of it (the probe, the attribution: nothing can run
    beside them), gets the threads of all ``jobs``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    durations = read_durations(log_dir)
    path = remaining_path(stages, durations)
    below = downstream_closure(stages)
    outcome = Outcome()
    waiting = sorted(stages, key=lambda s: -path[s.address])  # stable: ties keep the graph's order
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    while waiting or running:
        for address, (process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[address]
            if process.returncode == 0 and _record(root, address, log):
                outcome.done.append(address)
                durations[address] = round(time.monotonic() - started, 1)
                atomic_write_json(log_dir / DURATIONS, dict(sorted(durations.items())))
                _say(f"done     {address} ({durations[address]:.0f} s)")
            else:
                outcome.failed[address] = log
                _say(f"FAILED   {address} (exit {process.returncode}; log {log})")
        ready = [s for s in waiting if s.upstream <= set(outcome.done)] if not outcome.failed else []
        for stage in ready[: max(0, jobs - len(running))]:
            waiting.remove(stage)
            alone = not running and all(s.address in below[stage.address] for s in waiting)
            running[stage.address] = (*_start(stage, _thread_env(jobs * threads if alone else threads), log_dir),
                                      time.monotonic())
        if outcome.failed and not running:
            break
        time.sleep(POLL_S)
    outcome.skipped = [s.address for s in waiting]
    return outcome


def downstream_closure(stages: list[Stage]) -> dict[str, set[str]]:
    """Per stage: every stage that reads, directly or not, from it."""
    below: dict[str, set[str]] = {s.address: set() for s in stages}
    for s in reversed(stages):  # downstream first: a stage's readers have their closure already
        for up in s.upstream:
            below[up] |= {s.address} | below[s.address]
    return below


def _thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _start(stage: Stage, env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen, Path]:
    for path in stage.transient_outs:  # as DVC does before a stage runs: nothing stale is taken as output
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    log = log_dir / f"{stage.address}.log"
    _say(f"start    {stage.address} (output: {log})")
    with open(log, "w") as stream:
        process = subprocess.Popen(stage.cmd, shell=True, cwd=stage.wdir, env=env, stdout=stream,
                                   stderr=subprocess.STDOUT)
    return process, log


def _record(root: Path, address: str, log: Path) -> bool:
    """`dvc commit -f` of one stage (DVC's own lock serialises it with nothing else: one at a time here)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", address], cwd=root,
                          capture_output=True, text=True)
    if done.returncode:
        with open(log, "a") as stream:
            stream.write(f"\ndvc commit -f {address} failed:\n{done.stdout}{done.stderr}")
    return done.returncode == 0


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="stages to bring up to date (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="stages at a time (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per stage (default: the cores divided among the jobs, at least 1)")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="[FILE:]PARAM=VALUE",
                        help="a parameter override, as `dvc exp run -S` takes it (repeatable)")
    parser.add_argument("--exp", action="store_true",
                        help="save the result as an experiment (`dvc exp save`), as `dvc exp run` does")
    parser.add_argument("-n", "--name", default=None, help="the experiment's name (with --exp)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.name and not args.exp:
        parser.error("--name names an experiment: add --exp")
    root = Path.cwd()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.set_param:
        set_params(root, args.set_param)
    stages = stale_stages(root, args.targets or None)
    if not stages:
        _say("every stage is up to date")
        return save_experiment(root, args.name) if args.exp else 0
    _say(f"{len(stages)} stages to run, {args.jobs} at a time, {threads} thread(s) each "
         f"({args.jobs * threads} for a stage that runs alone): "
         + ", ".join(s.address for s in stages))
    outcome = run(root, stages, args.jobs, threads, root / ".dvc" / "tmp" / "parallel")
    if outcome.failed:
        _say(f"failed: {', '.join(outcome.failed)}; not started: {', '.join(outcome.skipped) or 'none'}")
        return 1
    _say(f"all {len(outcome.done)} stages done and recorded in dvc.lock")
    return save_experiment(root, args.name) if args.exp else 0


def set_params(root: Path, overrides: list[str]) -> None:
    """Write `dvc exp run -S`'s overrides into the parameter files: DVC's own parser computes the new
    values (so a key that does not exist is refused as `dvc exp run` refuses it), and only the values
    that changed are rewritten, the rest of the file (comments, list style) as it was."""
    from dvc.utils.cli_parse import to_path_overrides

    for path, by_file in to_path_overrides(overrides).items():
        if not (root / path).is_file():
            raise SystemExit(f"-S {' '.join(by_file)}: no parameter file {path}")
        _rewrite_changed(root / path, _overridden(root / path, by_file, ' '.join(by_file)))
        _say(f"set      {', '.join(by_file)} in {path}")


def _overridden(path: Path, overrides: list[str], shown: str) -> dict:
    """The parameters of ``path`` with ``overrides`` applied by DVC (on a copy: ``path`` is untouched)."""
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        try:
            apply_overrides(copy, overrides)
        except InvalidArgumentError as error:
            raise SystemExit(f"-S {shown}: {error.__cause__ or error} ({path.name})") from None
        return read_yaml(copy.read_text()) or {}  # DVC writes 3e-05, which yaml.safe_load reads as a string


def _rewrite_changed(path: Path, new: dict) -> None:
    """Set in ``path`` (a YAML file, round-tripped) every value that differs from ``new``; atomic.
    Unchanged lines stay as they were; a new list of scalars is written inline, as params.yaml's are."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq
    from ruamel.yaml.representer import RoundTripRepresenter

    class ParamsRepresenter(RoundTripRepresenter):
        """ruamel's round-trip writer with null and float written as below; a subclass, because
        add_representer on ruamel's own class would change every later writer in the process (DVC's too)."""

    ParamsRepresenter.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    ParamsRepresenter.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml_float(v)))
    original = path.read_text()
    yaml = YAML()  # round-trip: comments, inline lists and key order stay
    yaml.Representer = ParamsRepresenter
    yaml.preserve_quotes = True
    yaml.width = 4096
    mapping, offset = block_indents(original)
    yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    doc = yaml.load(original)

    def inline(value):
        if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        return value

    def merge(into, values) -> None:
        for key in [k for k in into if k not in values]:
            del into[key]  # a `~key` override removes it
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            elif key not in into or into[key] != value:
                into[key] = inline(value)

    merge(doc, new)
    text = io.StringIO()
    yaml.dump(doc, text)
    atomic_write_text(path, text.getvalue())


def block_indents(text: str) -> tuple[int, int]:
    """(a nested mapping's indent, a block list's dash offset under its key) as the file writes them,
    so a rewrite leaves the unchanged lines as they were: (2, 2) for this project's params.yaml,
    (2, 0) for PyYAML's output; (2, 2) where the file shows neither."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    indents = [len(line) - len(line.lstrip()) for line in lines]
    mapping = min((i for i in indents if i > 0), default=2)
    for above, line, indent in zip(lines, lines[1:], indents[1:]):
        if line.lstrip().startswith("- ") and above.split(" #")[0].rstrip().endswith(":"):  # a key, maybe commented
            return mapping, indent - (len(above) - len(above.lstrip()))
    return mapping, 2


def yaml_float(value: float) -> str:
    """A float as YAML 1.1 and 1.2 readers both take it: 3.0e-05, not 3e-05 (a string to yaml.safe_load)."""
    if value != value:
        return ".nan"
    if value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def save_experiment(root: Path, name: str | None) -> int:
    """`dvc exp save` of the workspace (its parameters, dvc.lock, metrics and cached outputs)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", *(["--name", name] if name else [])],
                          cwd=root, capture_output=True, text=True)
    _say(f"dvc exp save: {(done.stdout + done.stderr).strip()}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
