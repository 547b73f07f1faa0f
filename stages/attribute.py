"""attribute: raw SAIG attribution [layers × neurons] per query, in resumable shards (one per fact)."""

from __future__ import annotations

from matrice.attribution.common import AttributionConfig
from matrice.attribution.runner import plan_shards, run_attribution, sample_facts_per_relation
from matrice.data.schema import load_queries
from matrice.probing import encode_all
from stages.common import DATASET_DIR, load_params, load_prepared, model_arg, model_params, results_dir, setup_logging

ANSWER_TOKEN_POLICIES = ("first",)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["attribute"]
    if params["answer_token"] not in ANSWER_TOKEN_POLICIES:
        raise SystemExit(f"params.yaml: answer_token must be one of {ANSWER_TOKEN_POLICIES}, got {params['answer_token']!r}")
    try:
        cfg = AttributionConfig(
            steps=params["steps"], baseline=params["baseline"], batch_size=section["batch_size"],
            integration=params.get("integration", "riemann_right"),
        )
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    adapter = load_prepared(key, params, dtype=section["dtype"])
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    facts = sample_facts_per_relation(queries, section["facts_per_relation"], params["seed"])
    chosen = set(facts)
    per_lang = section["templates_per_language"]
    queries = [q for q in queries if q.fact_id in chosen and (per_lang is None or q.template_id < per_lang)]
    encs = encode_all(adapter, queries, params["few_shot"])
    settings = {
        "model": key, "source": model_params(params, key)["source"], "dtype": section["dtype"],
        "steps": cfg.steps, "integration": cfg.integration, "baseline": cfg.baseline, "answer_token": params["answer_token"],
        "few_shot": params["few_shot"],
    }
    run_attribution(adapter, queries, encs, plan_shards(queries, facts), cfg, settings, results_dir(key) / "attributions")


if __name__ == "__main__":
    main()
