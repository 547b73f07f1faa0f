"""enhance: double each fact's neurons on the low-resource queries the model gets wrong (Q_error);
accuracy gained per relation and method (Fig. 6)."""

from __future__ import annotations

from matrice.claims import method_name
from matrice.data.schema import load_queries
from matrice.experiments.enhance import enhance_low_resource, enhancement_estimates, enhancement_interval_table
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import plot_enhancement, wide_rows
from stages.common import (
                           DATASET_DIR, evaluation_rule, figure_path, load_neuron_sets, load_params, load_prepared, load_probes, model_arg,
    not_drawn_note, queries_of, relation_of, results_dir, setup_logging, split_empty,
)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["enhance"]
    probes = load_probes(key)
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = queries_of(load_queries(DATASET_DIR / "queries.jsonl"), sets.facts)
    result = enhance_low_resource(adapter, queries, probes, sets, section["methods"], section["languages"],
                                  section["factor"], few_shot=params["few_shot"])
    out = results_dir(key)
    data = result.to_dict()
    atomic_write_json(out / "enhancement.json", data)
    # every number below: Q_error evaluation queries, each fact's mean, then each relation's
    rule, relations = evaluation_rule(params), relation_of(queries)
    overall, have_eval = enhancement_estimates(data, rule, "lang", [None], relations)
    atomic_write_json(out / "enhancement_metrics.json", {"enhancement": {
        m: {"accuracy_gain": cells[0].mean, "n_relations": cells[0].n} for m, cells in overall.items()}})
    names = sorted({r["relation"] for r in result.by_relation})
    per_relation, _ = enhancement_estimates(data, rule, "relation", names, relations)
    atomic_write_json(out / "enhancement_plot.json", wide_rows("relation", per_relation, names))
    shown, empty = split_empty(sets, list(per_relation))
    plot_enhancement({method_name(m): per_relation[m] for m in shown}, names, figure_path(key, "fig6_enhancement.png"),
                     f"Fig. 6 — {key}: enhancement in {', '.join(section['languages'])}, "
                     + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    langs = [l for l in section["languages"] if any(r["lang"] == l for r in result.by_lang)]
    atomic_write_text(out / "enhancement_tables.md",
                      f"Q_error: the queries the model got wrong in {', '.join(section['languages'])}; ×{section['factor']} "
                      "on the fact's neurons.\n\n" + enhancement_interval_table(data, rule, langs, relations))


if __name__ == "__main__":
    main()
