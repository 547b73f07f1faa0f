"""enhance: double each fact's neurons on the low-resource queries the model gets wrong (Q_error);
accuracy gained per relation and method (Fig. 6)."""

from __future__ import annotations

from matrice.claims import method_name, enhancement_estimates
from matrice.data.schema import load_queries
from matrice.experiments.enhance import enhance_low_resource
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table, pivot, plot_enhancement
from stages.common import (
    DATASET_DIR, evaluation_rule, figure_path, load_neuron_sets, load_params, load_prepared, load_probes, model_arg,
    not_drawn_note, queries_of, split_empty,
    results_dir, setup_logging,
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
    atomic_write_json(out / "enhancement.json", result.to_dict())
    atomic_write_json(out / "enhancement_metrics.json", {"enhancement": {
        r["method"]: {"accuracy_gain": r["accuracy_gain"], "q_error": r["n_queries"]} for r in result.overall}})
    relations = sorted({r["relation"] for r in result.by_relation})
    atomic_write_json(out / "enhancement_plot.json", [
        {"relation": rel, **{m: next((r["accuracy_gain"] for r in result.by_relation
                                      if r["method"] == m and r["relation"] == rel), None) for m in section["methods"]}}
        for rel in relations])
    estimates, have_eval = enhancement_estimates(result.to_dict(), evaluation_rule(params), "relation", relations)
    shown, empty = split_empty(sets, list(estimates))
    plot_enhancement({method_name(m): estimates[m] for m in shown}, relations, figure_path(key, "fig6_enhancement.png"),
                     f"Fig. 6 — {key}: enhancement in {', '.join(section['languages'])}, "
                     + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    langs = [l for l in section["languages"] if any(r["lang"] == l for r in result.by_lang)]
    text = (f"**Fig. 6 data** — accuracy gained on Q_error ({result.n_q_error} queries the model got wrong in "
            f"{', '.join(section['languages'])}) by ×{section['factor']} on the fact's neurons\n\n"
            + markdown_table(["method", *relations], pivot(result.by_relation, "method", "relation", "accuracy_gain",
                                                           section["methods"], relations))
            + "\nPer language\n\n"
            + markdown_table(["method", *langs], pivot(result.by_lang, "method", "lang", "accuracy_gain",
                                                       section["methods"], langs)))
    atomic_write_text(out / "enhancement_tables.md", text)


if __name__ == "__main__":
    main()
