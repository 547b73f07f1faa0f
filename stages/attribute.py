"""attribute: raw attribution [layers × neurons] per query, in resumable shards (one per fact); then
AMIG's own (all-PAD baseline) attribution of each first query, for the AMIG arm."""

from __future__ import annotations

from dataclasses import replace

from matrice.attribution.common import AttributionConfig
from matrice.attribution.runner import choose_facts, plan_shards, run_attribution
from matrice.data.schema import load_queries
from matrice.probing import encode_all
from stages.common import (DATASET_DIR, load_params, load_prepared, load_probes, model_arg, model_params, results_dir,
                           setup_logging)

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
    policy = section.get("fact_policy", "any")
    try:
        facts = choose_facts(queries, section["facts_per_relation"], params["seed"], policy,
                             load_probes(key) if policy == "known" else None, section.get("fact_language", "en"))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    if not facts:
        raise SystemExit(f"attribute: no fact satisfies fact_policy={policy!r}; set attribute.fact_policy: any")
    chosen = set(facts)
    per_lang = section["templates_per_language"]
    queries = [q for q in queries if q.fact_id in chosen and (per_lang is None or q.template_id < per_lang)]
    encs = encode_all(adapter, queries, params["few_shot"])
    settings = {
        "model": key, "source": model_params(params, key)["source"], "dtype": section["dtype"],
        "steps": cfg.steps, "integration": cfg.integration, "baseline": cfg.baseline, "answer_token": params["answer_token"],
        "few_shot": params["few_shot"],
    }
    out = results_dir(key)
    run_attribution(adapter, queries, encs, plan_shards(queries, facts), cfg, settings, out / "attributions")
    # AMIG's own attribution (the AMIG baseline arm): one all-PAD baseline, the first query per language
    amig_cfg = replace(cfg, baseline="amig")
    firsts = [(q, e) for q, e in zip(queries, encs) if q.template_id == 0]
    amig_queries, amig_encs = [q for q, _ in firsts], [e for _, e in firsts]
    run_attribution(adapter, amig_queries, amig_encs, plan_shards(amig_queries, facts), amig_cfg,
                    {**settings, "baseline": "amig"}, out / "attributions_amig")


if __name__ == "__main__":
    main()
