"""degenerate: degenerate knowledge neurons (AMIG) among each fact's LAKNs and its language-specific
knowledge neurons, searched on the original query of each language and verified on a held-out
paraphrase (matrice.experiments.degenerate)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from tqdm import tqdm

from matrice.data.schema import load_queries
from matrice.data.split import HeldOutSplit
from matrice.experiments.degenerate import (DegenerateConfig, degenerate_plot_rows, degenerate_tables, fact_queries,
                                            search_fact, summarise)
from matrice.io import atomic_write_json, atomic_write_text
from matrice.scores import ScoreStore
from matrice.selection import select_by_threshold
from stages.common import (DATASET_DIR, config_from_params, load_neuron_sets, load_params, load_prepared, model_arg,
                           results_dir, setup_logging)

def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    cfg = config_from_params(DegenerateConfig, params, "degenerate")
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    scores = ScoreStore(results_dir(key) / "scores")
    split = HeldOutSplit.from_params(params)
    by_fact = defaultdict(list)
    for q in load_queries(DATASET_DIR / "queries.jsonl"):
        if q.fact_id in scores:
            by_fact[q.fact_id].append(q)
    records = []
    for fact in tqdm(sorted(scores.facts), desc="degenerate", unit="fact"):
        search, held_out = fact_queries(adapter, by_fact[fact], split, params["few_shot"])
        fs = scores[fact]
        own = {lang: [tuple(n) for n in select_by_threshold(fs.s_per_lang[k], params["tau"]).tolist()]
               for k, lang in enumerate(fs.languages)}
        lakns = [tuple(n) for n in sets.facts[fact]["matrice"].tolist()]
        records += search_fact(adapter, fact, by_fact[fact][0].relation, search, held_out, lakns, own, cfg)
    rows = [asdict(r) for r in records]
    summary = summarise(rows, len(scores.languages))
    out = results_dir(key)
    atomic_write_json(out / "degenerate.json", {"config": asdict(cfg), "records": rows,
                                                "summary": {k: {m: asdict(e) for m, e in v.items()} for k, v in summary.items()}})
    atomic_write_json(out / "degenerate_metrics.json", {"degenerate": {
        kind: {m: e.mean for m, e in v.items()} for kind, v in summary.items()}})
    atomic_write_text(out / "degenerate_table.md", degenerate_tables(rows, summary, cfg))
    atomic_write_json(out / "degenerate_plot.json", degenerate_plot_rows(rows))


if __name__ == "__main__":
    main()
