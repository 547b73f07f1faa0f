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

    python -m stages.parallel --jobs 2          # or: make pipeline JOBS=2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx  # DVC's own graph library: its stage graph is a networkx DiGraph

POLL_S = 0.2


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


def run(root: Path, stages: list[Stage], jobs: int, threads: int, log_dir: Path) -> Outcome:
    """Every stage in ``stages`` (upstream first), at most ``jobs`` at a time with ``threads`` torch
    threads each; each recorded in dvc.lock as soon as it succeeds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    outcome, waiting = Outcome(), list(stages)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    while waiting or running:
        for address, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[address]
            if process.returncode == 0 and _record(root, address, log):
                outcome.done.append(address)
                _say(f"done     {address}")
            else:
                outcome.failed[address] = log
                _say(f"FAILED   {address} (exit {process.returncode}; log {log})")
        ready = [s for s in waiting if s.upstream <= set(outcome.done)] if not outcome.failed else []
        for stage in ready[: max(0, jobs - len(running))]:
            waiting.remove(stage)
            running[stage.address] = _start(stage, env, log_dir)
        if outcome.failed and not running:
            break
        time.sleep(POLL_S)
    outcome.skipped = [s.address for s in waiting]
    return outcome


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
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    root = Path.cwd()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    stages = stale_stages(root, args.targets or None)
    if not stages:
        _say("every stage is up to date")
        return 0
    _say(f"{len(stages)} stages to run, {args.jobs} at a time, {threads} thread(s) each: "
         + ", ".join(s.address for s in stages))
    outcome = run(root, stages, args.jobs, threads, root / ".dvc" / "tmp" / "parallel")
    if outcome.failed:
        _say(f"failed: {', '.join(outcome.failed)}; not started: {', '.join(outcome.skipped) or 'none'}")
        return 1
    _say(f"all {len(outcome.done)} stages done and recorded in dvc.lock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
