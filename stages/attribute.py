"""attribute: raw attribution [layers × neurons] per query, in resumable shards (one per fact); then
AMIG's own (all-PAD baseline) attribution of each first query, for the AMIG arm."""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace

from matrice.attribution.common import AttributionConfig
from matrice.attribution.executors import EXECUTORS, LocalExecutor, RayExecutor
from matrice.attribution.plan import plan_run
from matrice.attribution.runner import choose_facts, plan_shards, run_attribution
from matrice.data.schema import load_queries
from matrice.data.split import HeldOutSplit
from matrice.probing import encode_all
from stages.common import (DATASET_DIR, config_from_params, load_params, load_prepared, load_probes, model_params,
                           results_dir, setup_logging)

ANSWER_TOKEN_POLICIES = ("first",)


def main() -> None:
    setup_logging()
    args = _args()
    key = args.model
    params = load_params()
    section = params["attribute"]
    if params["answer_token"] not in ANSWER_TOKEN_POLICIES:
        raise SystemExit(f"params.yaml: answer_token must be one of {ANSWER_TOKEN_POLICIES}, got {params['answer_token']!r}")
    cfg = config_from_params(AttributionConfig, params, "attribution")
    executor_kind = section.get("executor", "local")
    # a Ray driver only encodes queries and writes shards: the workers hold the weights
    adapter = load_prepared(key, params, dtype=section["dtype"], weights=executor_kind == "local" or args.plan)
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    policy = section["fact_policy"]
    try:
        facts = choose_facts(queries, section["facts_per_relation"], params["seed"], policy,
                             load_probes(key) if policy == "known" else None, section.get("fact_language", "en"))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    if not facts:
        raise SystemExit(f"attribute: no fact satisfies fact_policy={policy!r}; set attribute.fact_policy: any")
    chosen = set(facts)
    split = HeldOutSplit.from_params(params)
    queries = [q for q in queries if q.fact_id in chosen and split.localises(q)]
    encs = encode_all(adapter, queries, params["few_shot"])
    settings = {
        "model": key, "source": model_params(params, key)["source"], "dtype": section["dtype"],
        "steps": cfg.steps, "integration": cfg.integration, "baseline": cfg.baseline, "answer_token": params["answer_token"],
        "few_shot": params["few_shot"],
    }
    out = results_dir(key)
    store = section.get("store_dtype", "float32")
    amig_cfg = replace(cfg, baseline="amig")
    firsts = [(q, e) for q, e in zip(queries, encs) if q.template_id == 0]
    amig_queries, amig_encs = [q for q, _ in firsts], [e for _, e in firsts]
    if args.plan:
        workers = section.get("workers") or (1 if executor_kind == "local" else 2)
        plan = plan_run(adapter, [(encs, cfg), (amig_encs, amig_cfg)], len(facts), len({q.lang for q in queries}),
                        workers, store, args.plan_queries)
        print(plan.text())
        return
    with make_executor(section, adapter, functools.partial(load_prepared, key, params, dtype=section["dtype"])) as executor:
        run_attribution(adapter, queries, encs, plan_shards(queries, facts), cfg, settings, out / "attributions",
                        executor, store)
        # AMIG's own attribution (the AMIG baseline arm): one all-PAD baseline, the first query per language
        run_attribution(adapter, amig_queries, amig_encs, plan_shards(amig_queries, facts), amig_cfg,
                        {**settings, "baseline": "amig"}, out / "attributions_amig", executor, store)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="key of the model under `models:` in params.yaml")
    parser.add_argument("--plan", action="store_true",
                        help="print rows, measured speed, projected hours and storage of the run; compute nothing else")
    parser.add_argument("--plan-queries", type=int, default=3, help="queries to time for --plan (one more warms up)")
    return parser.parse_args()


def make_executor(section: dict, adapter, load_adapter):
    """`attribute.executor`: local (this process) or ray (model-holding actors on a Ray cluster)."""
    kind = section.get("executor", "local")
    if kind == "local":
        return LocalExecutor(adapter)
    if kind != "ray":
        raise SystemExit(f"params.yaml: attribute.executor must be one of {EXECUTORS}, got {kind!r}")
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise SystemExit("attribute.executor: ray needs Ray: pip install -e '.[ray]'") from exc
    return RayExecutor(load_adapter, address=section.get("ray_address") or "local", workers=section.get("workers"),
                       cpus_per_worker=section.get("cpus_per_worker", 1),
                       gpus_per_worker=section.get("gpus_per_worker", 1))


if __name__ == "__main__":
    main()
