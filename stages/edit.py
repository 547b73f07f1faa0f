"""edit: cross-lingual erasure and update through the neurons' FFN output weights, edited in
English and evaluated in every language (Tables III, IV)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.edit import EditConfig, edit_facts
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table, ordered_langs
from stages.common import DATASET_DIR, load_neuron_sets, load_params, load_prepared, model_arg, results_dir, setup_logging

METRICS = ("reliability", "generality", "locality")


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["edit"]
    try:
        cfg = EditConfig(lambda1=section["lambda1"], lambda2=section["lambda2"], scaling=section.get("scaling", "raw"),
                         locality_k=section["locality_k"], seed=params["seed"], batch_size=section["batch_size"])
    except ValueError as exc:
        raise SystemExit(f"params.yaml: edit: {exc}") from exc
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = load_queries(DATASET_DIR / "queries.jsonl")  # locality samples unrelated facts from all of them
    result = edit_facts(adapter, queries, sets, section["methods"], cfg=cfg, few_shot=params["few_shot"],
                        facts=sorted(sets.facts))
    out = results_dir(key)
    atomic_write_json(out / "editing.json", result.to_dict())
    average = [r for r in result.summary if r["lang"] == "average"]
    atomic_write_json(out / "editing_metrics.json", {"editing": {
        f"{r['method']}.{r['operation']}": {m: r[m] for m in METRICS} for r in average}})
    langs = ordered_langs({r["lang"] for r in result.summary if r["lang"] != "average"}) + ["average"]
    tables = []
    for op, title in (("erasure", "Table III — erasure"), ("update", "Table IV — update")):
        rows = []
        for method in section["methods"]:
            cell = {r["lang"]: r for r in result.summary if r["method"] == method and r["operation"] == op}
            for metric in METRICS:
                rows.append([method, metric, *(cell.get(l, {}).get(metric) for l in langs)])
        tables.append(f"**{title}** (edited in English)\n\n" + markdown_table(["method", "metric", *langs], rows))
    atomic_write_text(out / "editing_tables.md", "\n".join(tables))


if __name__ == "__main__":
    main()
