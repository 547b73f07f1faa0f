"""One model's attribution run, as the pipeline makes it: the chosen facts' localisation queries with
the run's baseline (SAIG by default), then AMIG's own attribution (one all-PAD baseline) of each fact's
first query in every language, for the AMIG arm, and the same first queries under Dai et al.'s zero
baseline, so AMIG's claim that its baseline localises better than the zero one can be tested on
equal queries. All are written as resumable shards, one per fact."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import ShardExecutor
from matrice.method.attribution.plan import RunPlan, plan_run
from matrice.method.attribution.runner import AMIG_MAPS_DIR, MAPS_DIR, ZERO_MAPS_DIR, plan_shards, run_attribution
from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.probing import encode_all



def run_settings(model: str, source: str, dtype: str, cfg: AttributionConfig, few_shot: bool) -> dict[str, Any]:
    """What a shard's fingerprint records (a change to any recomputes it)."""
    return {"model": model, "source": source, "dtype": dtype, "steps": cfg.steps, "integration": cfg.integration,
            "baseline": cfg.baseline, "answer_token": cfg.answer_token, "few_shot": few_shot}


@dataclass(frozen=True)
class AttributionJob:
    """The queries (and their encodings) of both arms of one run."""

    facts: list[str]
    queries: list[Query]
    encs: list[Encoded]
    cfg: AttributionConfig
    settings: Mapping[str, Any]  # what the shards' fingerprints record: a change recomputes them

    @property
    def amig(self) -> tuple[list[Query], list[Encoded], AttributionConfig]:
        firsts = [(q, e) for q, e in zip(self.queries, self.encs) if q.template_id == 0]
        return [q for q, _ in firsts], [e for _, e in firsts], replace(self.cfg, baseline="amig")

    @property
    def zero(self) -> tuple[list[Query], list[Encoded], AttributionConfig]:
        """AMIG's queries under the zero baseline (Dai et al.): the comparison AMIG makes."""
        queries, encs, _ = self.amig
        return queries, encs, replace(self.cfg, baseline="zero")


def attribution_job(adapter: ModelAdapter, queries: Sequence[Query], facts: Sequence[str], split: HeldOutSplit,
                    cfg: AttributionConfig, settings: Mapping[str, Any], few_shot: bool) -> AttributionJob:
    """The localisation queries of `facts` (the paraphrases `split` keeps for selection), encoded."""
    chosen = set(facts)
    kept = [q for q in queries if q.fact_id in chosen and split.localises(q)]
    return AttributionJob(list(facts), kept, encode_all(adapter, kept, few_shot), cfg, dict(settings))


def plan_job(adapter: ModelAdapter, job: AttributionJob, workers: int, store_dtype: str, measure_queries: int) -> RunPlan:
    _, amig_encs, amig_cfg = job.amig
    _, zero_encs, zero_cfg = job.zero
    return plan_run(adapter, [(job.encs, job.cfg), (amig_encs, amig_cfg), (zero_encs, zero_cfg)], len(job.facts),
                    len({q.lang for q in job.queries}), workers, store_dtype, measure_queries)


def run_job(adapter: ModelAdapter, job: AttributionJob, out: Path, executor: ShardExecutor, store_dtype: str) -> None:
    """Every arm, each fact's shard written as it finishes (a rerun resumes from the shards present)."""
    run_attribution(adapter, job.queries, job.encs, plan_shards(job.queries, job.facts), job.cfg, dict(job.settings),
                    out / MAPS_DIR, executor, store_dtype)
    for (queries, encs, cfg), folder in ((job.amig, AMIG_MAPS_DIR), (job.zero, ZERO_MAPS_DIR)):
        run_attribution(adapter, queries, encs, plan_shards(queries, job.facts), cfg,
                        {**job.settings, "baseline": cfg.baseline}, out / folder, executor, store_dtype)
