"""fact_check: AMIG's fact checking with degenerate knowledge neurons against the model's probability
and plain knowledge-neuron activation, on held-out paraphrases (matrice.experiments.fact_check)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict

from tqdm import tqdm

from matrice.attribution.common import AttributionConfig
from matrice.data.schema import load_queries
from matrice.data.split import HeldOutSplit
from matrice.experiments.fact_check import (DETECTORS, NAMES, NEURON_SOURCES, activation_scores, attribution_scores,
                                            build_statements, degenerate_neurons, detector_neurons, held_out_queries,
                                            leave_one_fact_out, metrics, probability_scores, summarise, summary_json,
                                            table)
from matrice.io import atomic_write_json, atomic_write_text
from matrice.memo import Memo
from matrice.report import plot_fact_check
from stages.common import (DATASET_DIR, config_from_params, figure_path, load_neuron_sets, load_params,
                           load_prepared, model_arg, results_dir, setup_logging)

log = logging.getLogger(__name__)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    source = params["fact_check"]["neuron_source"]
    if source not in NEURON_SOURCES:
        raise SystemExit(f"params.yaml: fact_check.neuron_source must be one of {NEURON_SOURCES}, got {source!r}")
    cfg = config_from_params(AttributionConfig, params, "attribution")
    out = results_dir(key)
    degenerate_path = out / "degenerate.json"
    if not degenerate_path.exists():
        raise SystemExit(f"{degenerate_path} is missing: run the degenerate stage for model {key} first (dvc repro)")
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    checked = held_out_queries(queries, set(sets.facts), HeldOutSplit.from_params(params))
    statements = build_statements(adapter, checked, queries, params["seed"], params["few_shot"])
    relation_of = {q.fact_id: q.relation for q in checked}
    neurons = detector_neurons(
        relation_of, degenerate_neurons(json.loads(degenerate_path.read_text(encoding="utf-8"))["records"]),
        {f: frozenset(map(tuple, per["matrice"].tolist())) for f, per in sets.facts.items()}, source)
    memo = Memo.for_model(out / "fact_check_attributions", adapter.model)  # layers a sweep did not move: read back
    by_fact = defaultdict(list)
    for stmt, enc in statements:
        by_fact[stmt.fact_id].append((stmt, enc))
    rows = []
    for fact in tqdm(sorted(by_fact), desc="fact_check", unit="fact"):
        stmts, encs = zip(*by_fact[fact])
        scores = {"dkn_attribution": attribution_scores(adapter, encs, neurons[fact].dkn, cfg, memo),
                  "kn_activation": activation_scores(adapter, encs, neurons[fact].kn),
                  "probability": probability_scores(adapter, encs, params["manipulate"]["batch_size"])}
        rows += [{**asdict(s), "scores": {d: scores[d][i] for d in DETECTORS}} for i, s in enumerate(stmts)]
    for detector in DETECTORS:
        flags = leave_one_fact_out([r["fact_id"] for r in rows], [r["scores"][detector] for r in rows],
                                   [not r["true"] for r in rows])
        for r, flag in zip(rows, flags):
            r.setdefault("flagged", {})[detector] = flag
    summary = summarise(rows, params["seed"])
    log.info("fact_check: %d statements, %d facts; F1 %s", len(rows), len(by_fact),
             {d: summary["common"]["pooled"][d].f1.format(2) for d in DETECTORS})
    atomic_write_json(out / "fact_check.json", {
        "neuron_source": source, "detectors": list(DETECTORS),
        "neurons": {f: {"dkn": sorted(map(list, n.dkn)), "kn": sorted(map(list, n.kn))} for f, n in sorted(neurons.items())},
        "summary": summary_json(summary), "statements": rows})
    atomic_write_json(out / "fact_check_metrics.json", {"fact_check": metrics(summary)})
    atomic_write_text(out / "fact_check_table.md", table(summary, source))
    atomic_write_json(out / "fact_check_plot.json", [
        {"lang": lang, **{d: summary["common"]["per_lang"][lang][d].f1.mean for d in DETECTORS}} for lang in summary["langs"]])
    plot_fact_check({NAMES[d]: [summary["common"]["per_lang"][lang][d].f1 for lang in summary["langs"]] for d in DETECTORS},
                    summary["langs"], figure_path(key, "fact_check.png"),
                    f"{key}: flagging false statements (F1, held-out paraphrases, statements every detector scores)")


if __name__ == "__main__":
    main()
