"""aggregate: layer normalisation, UaQ (alpha1, alpha2) and UaL (beta1, beta2) per fact."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.method.attribution.runner import AMIG_MAPS_DIR, MAPS_DIR, iter_fact_attributions, load_shard, read_manifest
from matrice.method.scores import aggregate_stream, save_scores
from matrice.method.uncertainty import AggregationConfig
from stages.common import DATASET_DIR, load_params, model_arg, results_dir, setup_logging


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    cfg = AggregationConfig(
        layer_norm=params["layer_norm"], alpha1=params["alpha1"], alpha2=params["alpha2"],
        lang_norm=params["lang_norm"], beta1=params["beta1"], beta2=params["beta2"],
    )
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    languages = sorted({q.lang for q in queries}, key=[q.lang for q in queries].index)
    out = results_dir(key)
    amig_dir = out / AMIG_MAPS_DIR
    amig_shards = {s["fact_id"]: amig_dir / s["name"] for s in read_manifest(amig_dir)["shards"]}

    def amig_maps(fact: str):
        if fact not in amig_shards:
            raise SystemExit(f"{amig_dir}: fact {fact} has no AMIG attribution; rerun the attribute stage")
        return load_shard(amig_shards[fact])

    scores = aggregate_stream(iter_fact_attributions(out / MAPS_DIR), amig_maps, queries, cfg, languages)
    save_scores(results_dir(key) / "scores", scores)


if __name__ == "__main__":
    main()
