"""probe: P(gold), rank and greedy-decoding correctness for every query; per-language accuracy."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.io import atomic_write_json, atomic_write_text, write_jsonl
from matrice.probing import accuracy_by_language, probe
from matrice.evaluation.report import probe_table
from stages.common import DATASET_DIR, load_params, load_prepared, model_arg, results_dir, setup_logging


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    adapter = load_prepared(key, params)
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    results = probe(adapter, queries, params["few_shot"], params["probe"]["batch_size"])
    by_lang = accuracy_by_language(results)
    out = results_dir(key)
    write_jsonl(out / "probe.jsonl", [r.to_dict() for r in results])
    atomic_write_json(out / "probe_metrics.json", {"probe": by_lang})
    atomic_write_text(out / "probe_table.md", probe_table(by_lang, key))


if __name__ == "__main__":
    main()
