"""select: dynamic threshold tau -> LAKNs per fact, plus AMIG, Random, w/o UaQ and w/o UaL sets, and the
leave-one-language-out sets (LAKNs selected without each language)."""

from __future__ import annotations

from matrice.io import atomic_write_json
from matrice.evaluation.report import plot_layer_distribution, wide_rows
from matrice.method.scores import ScoreStore
from matrice.method.selection import (NeuronSets, SelectionConfig, layer_distribution, leave_one_out_to_json, select_fact,
                               select_leave_one_out, summary)
from stages.common import figure_path, load_params, model_arg, results_dir, setup_logging


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    cfg = SelectionConfig(tau=params["tau"], tau_amig=params["tau_amig"], seed=params["seed"])
    sets, leave_one_out, n_layers = NeuronSets(), {}, 0
    for fact_id, fact_scores in ScoreStore(results_dir(key) / "scores").items():  # one fact in memory at a time
        sets.add(fact_id, select_fact(fact_scores, cfg, fact_id))
        leave_one_out[fact_id] = select_leave_one_out(fact_scores, cfg, fact_id)
        n_layers = fact_scores.shape[0]
    out = results_dir(key)
    sets.to_json(out / "neurons.json")
    leave_one_out_to_json(leave_one_out, out / "lolo_neurons.json")
    stats = summary(sets, n_layers)
    metrics = {m: {k: v for k, v in s.items() if k != "layer_share"} for m, s in stats.items()}
    atomic_write_json(out / "selection_metrics.json", {"selection": metrics})
    dist = layer_distribution(sets, n_layers)
    atomic_write_json(out / "layer_distribution.json", wide_rows("layer", dist))
    totals = {m: s["total_neurons"] for m, s in stats.items()}
    shown = {m: shares for m, shares in dist.items() if m != "random_layer"}  # = MATRICE's counts by construction
    plot_layer_distribution(shown, totals, figure_path(key, "fig4_layer_distribution.png"), f"Fig. 4 — {key}")


if __name__ == "__main__":
    main()
