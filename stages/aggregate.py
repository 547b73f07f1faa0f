"""aggregate: layer normalisation, UaQ (alpha1, alpha2) and UaL (beta1, beta2) per fact."""

from __future__ import annotations

from matrice.attribution.runner import load_attributions
from matrice.data.schema import load_queries
from matrice.scores import aggregate_all, group_by_fact, save_scores
from matrice.uncertainty import AggregationConfig
from stages.common import DATASET_DIR, load_params, model_arg, results_dir, setup_logging


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    cfg = AggregationConfig(
        layer_norm=params["layer_norm"], alpha1=params["alpha1"], alpha2=params["alpha2"],
        lang_norm=params["lang_norm"], beta1=params["beta1"], beta2=params["beta2"],
    )
    _, raw = load_attributions(results_dir(key) / "attributions")
    _, raw_amig = load_attributions(results_dir(key) / "attributions_amig")
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    languages = sorted({q.lang for q in queries}, key=[q.lang for q in queries].index)
    scores = aggregate_all(group_by_fact(queries, raw), cfg, languages, group_by_fact(queries, raw_amig))
    save_scores(results_dir(key) / "scores.npz", scores)


if __name__ == "__main__":
    main()
