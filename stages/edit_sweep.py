"""edit_sweep: the update edit over a range of λ, reliability against locality per method (Eq. 15),
with the edit stage's o', locality sample, scaling and neurons."""

from __future__ import annotations

from matrice.claims import method_name
from matrice.data.schema import load_queries
from matrice.experiments.edit import EditConfig
from matrice.experiments.edit_sweep import sweep_curves, sweep_plot_rows, sweep_table, sweep_update
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import plot_edit_sweep
from stages.common import (DATASET_DIR, config_from_params, figure_path, load_neuron_sets, load_params,
                           load_prepared, model_arg, results_dir, setup_logging)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section, sweep = params["edit"], params["edit_sweep"]
    cfg = config_from_params(EditConfig, params, "edit")
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    try:
        result = sweep_update(adapter, queries, sets, sweep.get("methods") or section["methods"], sweep["lambdas"], cfg,
                              few_shot=params["few_shot"], facts=sorted(sets.facts))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: edit_sweep.lambdas: {exc}") from exc
    out = results_dir(key)
    data = result.to_dict()
    curves = sweep_curves(data)
    atomic_write_json(out / "edit_sweep.json", data)
    atomic_write_json(out / "edit_sweep_plot.json", sweep_plot_rows(curves, method_name))
    atomic_write_text(out / "edit_sweep_table.md", sweep_table(curves, method_name))
    plot_edit_sweep({method_name(m): p for m, p in curves.items()}, figure_path(key, "edit_sweep.png"),
                    f"{key}: update edit, λ1 = λ2 = λ ∈ {result.lambdas} ({cfg.scaling} scaling); "
                    "original queries, every language")


if __name__ == "__main__":
    main()
