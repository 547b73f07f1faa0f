"""attribute: raw attribution [layers × neurons] per query, in resumable shards (one per fact); then
AMIG's own (all-PAD baseline) attribution of each first query, for the AMIG arm."""

from __future__ import annotations

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import make_executor
from matrice.method.attribution.job import attribution_job, plan_job, run_job, run_settings
from matrice.method.attribution.runner import choose_facts
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__, _options)
    params, s, plan = stage.params, stage.params["attribute"], stage.args.plan
    cfg, store = stage.config(AttributionConfig, "attribution"), s.get("store_dtype", "float32")
    local = s.get("executor", "local") == "local"  # a Ray driver only encodes and writes shards
    load = stage.loader(dtype=s["dtype"])
    try:
        settings = run_settings(stage.key, stage.model["source"], s["dtype"], cfg, params["few_shot"])
        facts = choose_facts(stage.queries, s["facts_per_relation"], params["seed"], s["fact_policy"],
                             stage.probes if s["fact_policy"] == "known" else None, s.get("fact_language", "en"))
        adapter = load(weights=local or plan)
        executor = None if plan else make_executor(s, adapter, load)
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    job = attribution_job(adapter, stage.queries, facts, stage.split, cfg, settings, params["few_shot"])
    if executor is None:
        return print(plan_job(adapter, job, s.get("workers") or (1 if local else 2), store, stage.args.plan_queries).text())
    with executor:
        run_job(adapter, job, stage.out, executor, store)


def _options(parser) -> None:
    parser.add_argument("--plan", action="store_true", help="print rows, speed, hours and storage; compute nothing")
    parser.add_argument("--plan-queries", type=int, default=3, help="queries to time for --plan (one more warms up)")


if __name__ == "__main__":
    main()
