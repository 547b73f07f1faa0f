"""What an attribution run will cost, before it is started: rows, measured speed, hours, bytes.

Rows are what the engine computes: per query, (baselines) × (layers) × (steps) forward/backward rows
(SAIG: one baseline per query token; AMIG: one). Speed is measured on this machine by attributing a
few of the run's own queries, so the projection holds for this model, dtype, device and batch size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.fast import _n_baselines, fast_attribution_many
from matrice.models.adapter import Encoded, ModelAdapter

GIB = 1024**3


@dataclass(frozen=True)
class RunPlan:
    queries: int
    rows: int
    layers: int
    neurons: int
    measured_queries: int
    measured_rows: int
    rows_per_s: float
    device: str
    workers: int
    hours_one_worker: float
    hours_wall: float
    raw_gib: float  # attribution shards, uncompressed (npz deflate saves little on these maps)
    scores_gib: float  # scores/: (4 + 2 × languages) maps per fact, one file each
    facts: int
    languages: int
    store_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return "\n".join([
            f"attribution plan: {self.facts} facts × {self.languages} languages, {self.queries:,} queries, "
            f"{self.layers} layers × {self.neurons:,} neurons",
            f"  rows (baseline × layer × step): {self.rows:,}",
            f"  measured here ({self.device}): {self.rows_per_s:,.0f} rows/s over {self.measured_queries} queries "
            f"({self.measured_rows:,} rows)",
            f"  projected from scratch (shards on disk, kept or serving as token 1 under answer_token all, not "
            f"subtracted): {self.hours_one_worker:,.2f} h on one worker; {self.hours_wall:,.2f} h wall on {self.workers}",
            f"  storage: {self.raw_gib:,.2f} GiB of raw maps ({self.store_dtype}), {self.scores_gib:,.2f} GiB of scores",
        ])


def count_rows(encs: Sequence[Encoded], cfg: AttributionConfig, n_layers: int) -> int:
    """(layer, baseline, step) rows of ``encs``: one set per answer token under ``answer_token: all``."""
    tokens = (lambda e: len(e.answer_ids)) if cfg.answer_token == "all" else (lambda e: 1)
    return sum(_n_baselines(e, cfg) * tokens(e) for e in encs) * n_layers * max(1, cfg.steps)


def measure_rows_per_s(adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig) -> tuple[float, int]:
    """Rows per second attributing ``encs`` (after one warm-up query, so start-up is not counted)."""
    if len(encs) < 2:
        raise ValueError("measuring speed needs at least 2 queries (one warms up)")
    for _ in fast_attribution_many(adapter, encs[:1], cfg):
        pass
    start = time.perf_counter()
    for _ in fast_attribution_many(adapter, encs[1:], cfg):
        pass
    elapsed = time.perf_counter() - start
    rows = count_rows(encs[1:], cfg, adapter.n_layers)
    return rows / elapsed, rows


def plan_run(adapter: ModelAdapter, parts: Sequence[tuple[Sequence[Encoded], AttributionConfig]], n_facts: int,
             n_languages: int, workers: int = 1, store_dtype: str = "float32", measure_queries: int = 3) -> RunPlan:
    """The plan of attributing every (queries, config) part of the run (SAIG maps, AMIG maps), the
    speed measured on the first few queries of the first part (rows cost the same in every part)."""
    encs, cfg = parts[0]
    sample = list(encs[: max(2, measure_queries)])
    rate, measured = measure_rows_per_s(adapter, sample, cfg)
    rows = sum(count_rows(e, c, adapter.n_layers) for e, c in parts)
    n_queries = sum(len(e) for e, _ in parts)
    map_bytes = adapter.n_layers * adapter.n_neurons
    hours = rows / rate / 3600
    return RunPlan(
        queries=n_queries, rows=rows, layers=adapter.n_layers, neurons=adapter.n_neurons,
        measured_queries=len(sample) - 1, measured_rows=measured, rows_per_s=rate, device=str(adapter.device),
        workers=workers, hours_one_worker=hours, hours_wall=hours / max(workers, 1),
        raw_gib=n_queries * map_bytes * np.dtype(store_dtype).itemsize / GIB,
        scores_gib=n_facts * (4 + 2 * n_languages) * map_bytes * 4 / GIB,
        facts=n_facts, languages=n_languages, store_dtype=store_dtype,
    )
