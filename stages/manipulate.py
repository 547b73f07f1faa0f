"""manipulate: suppress (×0) / enhance (×2) each fact's neurons; ΔP per language and method (Fig. 5)
and the ablation table (Table II)."""

from __future__ import annotations

from matrice.claims import method_name, manipulation_estimates
from matrice.data.schema import load_queries
from matrice.experiments.manipulate import ablation_table, manipulate
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table, ordered_langs, pivot, plot_manipulation
from matrice.selection import METHODS
from stages.common import (
    DATASET_DIR, evaluation_rule, figure_path, load_neuron_sets, load_params, load_prepared, model_arg, not_drawn_note,
    queries_of, results_dir, split_empty,
    setup_logging,
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
    ablation = ablation_table(result)
    out = results_dir(key)
    atomic_write_json(out / "manipulation.json", {**result.to_dict(), "ablation": ablation})
    metrics = {m: {r["mode"]: r["mean_delta_p"] for r in result.overall if r["method"] == m} for m in METHODS}
    atomic_write_json(out / "manipulation_metrics.json", {
        "manipulation": metrics,
        "ablation": {m: {mode: v["mean"] for mode, v in a.items() if isinstance(v, dict)} for m, a in ablation.items()},
    })
    langs = ordered_langs({r["lang"] for r in result.summary})
    for mode in ("suppress", "enhance"):
        rows = [r for r in result.summary if r["mode"] == mode]
        series = {m: [next((r["mean_delta_p"] for r in rows if r["method"] == m and r["lang"] == l), None) for l in langs] for m in METHODS}
        atomic_write_json(out / f"manipulation_{mode}_plot.json",
                          [{"lang": l, **{m: series[m][i] for m in METHODS}} for i, l in enumerate(langs)])
    estimates, have_eval = manipulation_estimates(result.to_dict(), evaluation_rule(params), langs)
    shown, empty = split_empty(sets, ["matrice", "amig", "amig_k", "random", "random_layer"])
    plot_manipulation({mode: {method_name(m): per[m] for m in shown if m in per} for mode, per in estimates.items()}, langs,
                      figure_path(key, "fig5_manipulation.png"), f"Fig. 5 — {key}: relative change of P(answer), "
                      + ("held-out paraphrases" if have_eval else "all queries") + not_drawn_note(empty, method_name))
    tables = []
    for mode in ("suppress", "enhance"):
        rows = [r for r in result.summary if r["mode"] == mode]
        tables.append(f"**{mode}** — mean ΔP/P per language\n\n" + markdown_table(
            ["method", *langs], pivot(rows, "method", "lang", "mean_delta_p", list(METHODS), langs)))
    abl_rows = [[m, *(ablation[m].get(mode, {}).get("mean") for mode in ("suppress", "enhance"))] for m in ablation]
    tables.append("**Table II** — |ΔP| of each ablation as a fraction of MATRICE's (per language, averaged)\n\n"
                  + markdown_table(["variant", "suppress", "enhance"], abl_rows))
    atomic_write_text(out / "manipulation_tables.md", "\n".join(tables))


if __name__ == "__main__":
    main()
