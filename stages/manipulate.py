"""manipulate: suppress (×0) / enhance (×2) each fact's neurons; ΔP per language and method (Fig. 5)
and the ablation table (Table II)."""

from __future__ import annotations

from matrice.claims import method_name
from matrice.data.schema import load_queries
from matrice.experiments.manipulate import (ablation_estimates, manipulate, manipulation_estimates,
                                           manipulation_interval_tables, manipulation_metrics)
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import ordered_langs, plot_manipulation, wide_rows
from matrice.selection import METHODS
from stages.common import (
                           DATASET_DIR, evaluation_rule, figure_path, load_neuron_sets, load_params, load_prepared, model_arg, not_drawn_note,
    queries_of, relation_of, results_dir, split_empty, setup_logging,
)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = queries_of(load_queries(DATASET_DIR / "queries.jsonl"), sets.facts)
    result = manipulate(adapter, queries, sets, METHODS, few_shot=params["few_shot"],
                        batch_size=params["manipulate"]["batch_size"])
    out = results_dir(key)
    data = result.to_dict()
    atomic_write_json(out / "manipulation.json", data)
    # every number below: evaluation queries, each fact's mean, then each relation's (the verdicts' unit)
    rule, relations = evaluation_rule(params), relation_of(queries)
    langs = ordered_langs({r["lang"] for r in result.summary})
    estimates, have_eval = manipulation_estimates(data, rule, [*langs, None], relations)
    atomic_write_json(out / "manipulation_metrics.json",
                      manipulation_metrics(estimates, ablation_estimates(data, rule, relations)))
    for mode, per_method in estimates.items():
        atomic_write_json(out / f"manipulation_{mode}_plot.json", wide_rows("lang", per_method, langs))
    shown, empty = split_empty(sets, ["matrice", "amig", "amig_k", "random", "random_layer"])
    plot_manipulation({mode: {method_name(m): per[m][:-1] for m in shown if m in per} for mode, per in estimates.items()},
                      langs, figure_path(key, "fig5_manipulation.png"), f"Fig. 5 — {key}: relative change of P(answer), "
                      + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    atomic_write_text(out / "manipulation_tables.md", manipulation_interval_tables(data, rule, langs, relations))


if __name__ == "__main__":
    main()
