"""edit: cross-lingual erasure and update through the neurons' FFN output weights, edited in
English and evaluated in every language (Tables III, IV)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.edit import EditConfig, edit_facts, editing_estimates, editing_interval_tables
from matrice.io import atomic_write_json, atomic_write_text
from matrice.evaluation.report import ordered_langs
from stages.common import (DATASET_DIR, config_from_params, load_neuron_sets, load_params, load_prepared, model_arg,
                           relation_of, results_dir, setup_logging)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["edit"]
    cfg = config_from_params(EditConfig, params, "edit")
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = load_queries(DATASET_DIR / "queries.jsonl")  # locality samples unrelated facts from all of them
    result = edit_facts(adapter, queries, sets, section["methods"], cfg=cfg, few_shot=params["few_shot"],
                        facts=sorted(sets.facts))
    out = results_dir(key)
    data = result.to_dict()
    atomic_write_json(out / "editing.json", data)
    # every number below: each fact's rate pooled over its queries, then each relation's (the verdicts' unit)
    relations = relation_of(queries)
    overall = editing_estimates(data, [None], relations)
    atomic_write_json(out / "editing_metrics.json", {"editing": {
        f"{method}.{op}": {m: cells[0].mean for (o, meth, m), cells in overall.items() if (o, meth) == (op, method)}
        for op, method, _ in overall}})
    langs = ordered_langs({r["lang"] for r in data["records"]})
    atomic_write_text(out / "editing_tables.md", "Edited in English.\n\n" + editing_interval_tables(data, langs, relations))


if __name__ == "__main__":
    main()
