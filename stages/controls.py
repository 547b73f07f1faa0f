"""controls: leave-one-language-out (LAKNs selected without a language, suppressed in it) and
fact specificity (a fact's queries under another fact's neurons); suppression ΔP per query."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments import encode_all
from matrice.experiments.controls import ControlResult, leave_one_language_out, per_language_means, specificity
from matrice.io import atomic_write_json
from matrice.method.selection import leave_one_out_from_json
from stages.common import (
                           DATASET_DIR, load_neuron_sets, load_params, load_prepared, model_arg, queries_of, results_dir, setup_logging,
)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    path = results_dir(key) / "lolo_neurons.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the select stage for model {key} first (dvc repro)")
    lolo_sets = leave_one_out_from_json(path)
    queries = queries_of(load_queries(DATASET_DIR / "queries.jsonl"), sets.facts)
    few_shot, batch = params["few_shot"], params["manipulate"]["batch_size"]
    encoded, _ = encode_all(adapter, queries, few_shot)
    result = ControlResult()
    result.lolo = leave_one_language_out(adapter, queries, lolo_sets, sets, few_shot, encoded, batch)
    result.specificity, result.donors = specificity(adapter, queries, sets, params["seed"], few_shot, encoded, batch)
    out = results_dir(key)
    atomic_write_json(out / "controls.json", result.to_dict())
    metrics = {part: {f"{m}/{lang}": v for (m, lang), v in sorted(per_language_means(records).items())}
               for part, records in (("lolo", result.lolo), ("specificity", result.specificity))}
    atomic_write_json(out / "controls_metrics.json", {"controls_mean_delta_p": metrics})


if __name__ == "__main__":
    main()
