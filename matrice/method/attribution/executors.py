"""Where shards are computed: in this process (``local``) or on a Ray cluster (``ray``).

An executor takes the shards still to do and yields each one's result as it finishes, in any order;
the runner (:func:`matrice.method.attribution.runner.run_attribution`) writes every finished shard
atomically the moment it arrives. So a driver that dies leaves only complete shards, and the next
run resumes from them, whichever executor computed them.

A shard is the unit of work and of determinism: its queries are attributed together (the engine
batches rows across them) by :func:`compute_shard`, the same function on every worker, so results do
not depend on the number of workers or on the order shards finish.

Ray: one model-holding actor per GPU (or per ``workers`` on CPU), one shard in flight per actor. An
actor that dies (killed, out of memory) is restarted by Ray and its in-flight shard is retried on the
restarted actor (``max_restarts`` / ``max_task_retries``); no other shard is recomputed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.fast import fast_attribution_many
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import answer_steps

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RawMaps:
    """Every query's raw map and how many baselines were summed into it."""

    raw: np.ndarray  # [queries, layers, neurons] float32, summed over baselines
    n_baselines: np.ndarray  # [queries]


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: its file name (the key results come back under) and encoded queries;
    ``first_token``: under ``answer_token: all``, the first-token maps of the same queries where a
    first-token run left them (token 1 of a whole answer is exactly that computation)."""

    name: str
    fact_id: str
    encs: list[Encoded]
    first_token: RawMaps | None = None


@dataclass(frozen=True)
class ShardOutput:
    name: str
    raw: np.ndarray  # [queries, layers, neurons] float32, summed over baselines
    n_baselines: np.ndarray  # [queries]


def raw_maps(adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig,
             first_token: RawMaps | None = None, on_query: Callable[[], None] | None = None) -> RawMaps:
    """Every query's raw map [L, N] (its baselines summed), as the attribute stage stores it.

    ``answer_token: all``: the mean over the answer's tokens of each token's raw map. Token 1's map is
    the first-token map, computed alone over ``encs`` as a first-token run computes it (so
    ``first_token`` from such a run gives the same numbers and spares that work); the later tokens'
    queries share one stream."""
    if not encs:
        raise ValueError("no queries to attribute")
    if first_token is not None and not len(first_token.raw) == len(first_token.n_baselines) == len(encs):
        raise ValueError(f"first_token has maps of {len(first_token.raw)} queries for {len(encs)} queries")
    first_cfg = replace(cfg, answer_token="first")
    if cfg.answer_token == "first" or first_token is None:
        raw, n_base = [], []
        for attr in fast_attribution_many(adapter, encs, first_cfg):  # [B, L, N] per query, in order
            raw.append(attr.sum(dim=0).float().cpu().numpy())
            n_base.append(attr.shape[0])
            if on_query is not None and cfg.answer_token == "first":
                on_query()
        first_token = RawMaps(np.stack(raw).astype(np.float32), np.array(n_base))
        if cfg.answer_token == "first":
            return first_token
    later = [answer_steps(adapter, enc)[1:] for enc in encs]  # progress counts a query when its last token is done
    maps = fast_attribution_many(adapter, [step for steps in later for step in steps], first_cfg)
    out = np.empty((len(encs), *first_token.raw.shape[1:]), dtype=np.float32)
    for q, steps in enumerate(later):
        total = first_token.raw[q].astype(np.float32)  # a copy
        for _ in steps:
            total += next(maps).sum(dim=0).float().cpu().numpy()
        out[q] = total / np.float32(1 + len(steps))
        if on_query is not None:
            on_query()
    return RawMaps(out, first_token.n_baselines)


def compute_shard(adapter: ModelAdapter, job: ShardJob, cfg: AttributionConfig,
                  on_query: Callable[[], None] | None = None) -> ShardOutput:
    """The attribution of one shard: every query's raw map (summed over its baselines)."""
    maps = raw_maps(adapter, job.encs, cfg, job.first_token, on_query)
    return ShardOutput(job.name, maps.raw, maps.n_baselines)


class ShardExecutor(Protocol):
    def map(self, jobs: Sequence[ShardJob], cfg: AttributionConfig,
            on_query: Callable[[int], None]) -> Iterator[ShardOutput]: ...


class LocalExecutor:
    """Shards one after another in this process, on the adapter the stage loaded."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, jobs: Sequence[ShardJob], cfg: AttributionConfig,
            on_query: Callable[[int], None]) -> Iterator[ShardOutput]:
        for job in jobs:
            yield compute_shard(self.adapter, job, cfg, lambda: on_query(1))


class _ShardWorker:
    """A Ray actor: loads the model once, then computes shard after shard."""

    def __init__(self, load_adapter: Callable[[], ModelAdapter], cwd: str, threads: int | None,
                 trace_dir: str | None):
        os.chdir(cwd)  # relative paths (models/<key>) mean what they mean for the driver
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        if threads:
            torch.set_num_threads(threads)
        self.trace_dir = trace_dir
        self.adapter = load_adapter()

    def compute(self, job: ShardJob, cfg: AttributionConfig) -> ShardOutput:
        if self.trace_dir:  # one empty file per computation started: lets a user (or a test) audit retries
            Path(self.trace_dir, f"{job.name}.{os.getpid()}.{time.monotonic_ns()}").touch()
        return compute_shard(self.adapter, job, cfg)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class RayExecutor:
    """Shards as tasks on model-holding Ray actors (module docstring).

    ``address``: ``local`` starts a Ray instance on this machine (stopped again at the end), ``auto``
    or ``host:port`` joins a running cluster. ``workers``: actors to start (default: one per GPU of
    the cluster, or 2 on a CPU-only one). Each actor takes ``gpus_per_worker`` GPUs when the cluster
    has GPUs, else ``cpus_per_worker`` CPUs and as many torch threads. The run directory must be
    visible at the same path on every node (a shared filesystem), and matrice importable there.
    """

    load_adapter: Callable[[], ModelAdapter]
    address: str = "local"
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    max_restarts: int = 3
    trace_dir: str | None = None
    actors: list[Any] | None = None
    _started_ray: bool = False

    def _connect(self) -> bool:
        """Connects (or starts Ray); True when this executor started it and must stop it."""
        import ray

        if ray.is_initialized():
            return False
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}}
        if self.address == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, (self.workers or 2) * self.cpus_per_worker),
                     include_dashboard=False, runtime_env=env, log_to_driver=False)
        else:
            ray.init(address=self.address, runtime_env=env, log_to_driver=False)
        return True

    def _start_actors(self) -> list[Any]:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = self.workers or (max(1, int(gpus / self.gpus_per_worker)) if gpus else 2)
        worker = ray.remote(max_restarts=self.max_restarts, max_task_retries=self.max_restarts)(_ShardWorker)
        options = {"num_gpus": self.gpus_per_worker, "num_cpus": self.cpus_per_worker} if gpus else {"num_cpus": self.cpus_per_worker}
        log.info("ray: starting %d worker actors (%s)", n, options)
        return [worker.options(**options).remote(self.load_adapter, os.getcwd(), None if gpus else self.cpus_per_worker,
                                                 self.trace_dir) for _ in range(n)]

    def __enter__(self) -> "RayExecutor":
        if self.actors is None:
            self._started_ray = self._connect()
            self.actors = self._start_actors()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the actors (and Ray, if this executor started it)."""
        import ray

        for actor in self.actors or []:
            ray.kill(actor, no_restart=True)
        self.actors = None
        if getattr(self, "_started_ray", False):
            ray.shutdown()
            self._started_ray = False

    def map(self, jobs: Sequence[ShardJob], cfg: AttributionConfig,
            on_query: Callable[[int], None]) -> Iterator[ShardOutput]:
        """Results as shards finish. Starts Ray and the actors on first use (or use ``with``), and
        keeps them for the next call: the stage runs SAIG and AMIG attribution on one set of actors."""
        if not jobs:
            return
        import ray

        self.__enter__()
        todo = list(jobs)[::-1]
        in_flight: dict[Any, tuple[Any, ShardJob]] = {}

        def submit(actor) -> None:
            if todo:
                job = todo.pop()
                in_flight[actor.compute.remote(job, cfg)] = (actor, job)

        for actor in self.actors:
            submit(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, job = in_flight.pop(ready[0])
            try:
                output = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise RuntimeError(f"ray: shard {job.name} ({job.fact_id}) failed after {self.max_restarts} "
                                   f"retries: {exc}; finished shards are kept, rerun to resume") from exc
            submit(actor)
            on_query(len(job.encs))
            yield output


def make_executor(section: Mapping[str, Any], adapter: ModelAdapter, load_adapter: Callable[[], ModelAdapter]
                  ) -> "LocalExecutor | RayExecutor":
    """``section["executor"]``: ``local`` (this process) or ``ray`` (model-holding actors on a Ray cluster)."""
    kind = section.get("executor", "local")
    if kind == "local":
        return LocalExecutor(adapter)
    if kind != "ray":
        raise ValueError(f"attribute.executor must be one of {EXECUTORS}, got {kind!r}")
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ValueError("attribute.executor: ray needs Ray: pip install -e '.[ray]'") from exc
    return RayExecutor(load_adapter, address=section.get("ray_address") or "local", workers=section.get("workers"),
                       cpus_per_worker=section.get("cpus_per_worker", 1),
                       gpus_per_worker=section.get("gpus_per_worker", 1))
