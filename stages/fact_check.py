"""fact_check: AMIG's fact checking with degenerate knowledge neurons against the model's probability
and plain knowledge-neuron activation, on held-out paraphrases (matrice.experiments.fact_check)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict

from tqdm import tqdm

from matrice.attribution.common import AttributionConfig
from matrice.data.schema import Query, load_queries
from matrice.data.split import HeldOutSplit
from matrice.experiments.fact_check import (DETECTORS, NEURON_SOURCES, activation_scores, attribution_scores,
                                build_statements, degenerate_neurons, detection_scores, detector_neurons,
                                f1_difference, leave_one_fact_out, pair_accuracy, probability_scores)
from matrice.io import atomic_write_json, atomic_write_text
from matrice.memo import Memo
from matrice.report import ordered_langs, plot_fact_check
from stages.common import (DATASET_DIR, figure_path, load_neuron_sets, load_params, load_prepared, model_arg,
                           results_dir, setup_logging)

log = logging.getLogger(__name__)
NAMES = {"dkn_attribution": "DKN attribution (AMIG)", "kn_activation": "KN activation", "probability": "P(object)"}


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    source = params["fact_check"]["neuron_source"]
    if source not in NEURON_SOURCES:
        raise SystemExit(f"params.yaml: fact_check.neuron_source must be one of {NEURON_SOURCES}, got {source!r}")
    try:
        cfg = AttributionConfig(steps=params["steps"], baseline=params["baseline"],
                                batch_size=params["attribute"]["batch_size"],
                                integration=params.get("integration", "riemann_right"))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
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
        "summary": _jsonable(summary), "statements": rows})
    atomic_write_json(out / "fact_check_metrics.json", {"fact_check": _metrics(summary)})
    atomic_write_text(out / "fact_check_table.md", _table(summary, source))
    atomic_write_json(out / "fact_check_plot.json", [
        {"lang": lang, **{d: summary["common"]["per_lang"][lang][d].f1.mean for d in DETECTORS}} for lang in summary["langs"]])
    plot_fact_check({NAMES[d]: [summary["common"]["per_lang"][lang][d].f1 for lang in summary["langs"]] for d in DETECTORS},
                    summary["langs"], figure_path(key, "fact_check.png"),
                    f"{key}: flagging false statements (F1, held-out paraphrases, statements every detector scores)")


def held_out_queries(queries: list[Query], facts: set[str], split: HeldOutSplit) -> list[Query]:
    """Per attributed fact and language, its first paraphrase selection never attributed; with every
    template attributed (null), the original query."""
    mine = [q for q in queries if q.fact_id in facts]
    if split.localisation is None:  # nothing held out: the lowest template, written last, wins
        chosen = {(q.fact_id, q.lang): q for q in sorted(mine, key=lambda q: q.template_id, reverse=True)}
    else:
        chosen = split.first_held_out(mine)
    return [chosen[k] for k in sorted(chosen)]


def summarise(rows: list[dict], seed: int) -> dict:
    """Detection scores per detector, pooled and per language, on the statements every detector
    decides ("common"), the probability baseline on every statement, the paired F1 differences and
    the threshold-free pair accuracy."""
    common = [r for r in rows if all(r["flagged"][d] is not None for d in DETECTORS)]
    langs = ordered_langs({r["lang"] for r in rows})
    return {
        "langs": langs,
        "n_facts": len({r["fact_id"] for r in rows}), "n_facts_common": len({r["fact_id"] for r in common}),
        "common": {"pooled": {d: detection_scores(common, d, seed) for d in DETECTORS},
                   "per_lang": {lang: {d: detection_scores([r for r in common if r["lang"] == lang], d, seed)
                                       for d in DETECTORS} for lang in langs},
                   "pair_accuracy": {d: pair_accuracy(common, d) for d in DETECTORS}},
        "all": {"probability": detection_scores(rows, "probability", seed),
                "pair_accuracy": pair_accuracy(rows, "probability")},
        "difference": {d: f1_difference(rows, d, "probability", seed) for d in DETECTORS if d != "probability"},
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


def _metrics(summary: dict) -> dict:
    pooled = summary["common"]["pooled"]
    return {"n_facts_common": summary["n_facts_common"],
            "f1": {d: pooled[d].f1.mean for d in DETECTORS},
            "pair_accuracy": {d: summary["common"]["pair_accuracy"][d].mean for d in DETECTORS},
            "f1_minus_probability": {d: e.mean for d, e in summary["difference"].items()},
            "probability_all_f1": summary["all"]["probability"].f1.mean}


def _p_text(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _table(summary: dict, source: str) -> str:
    common = summary["common"]
    lines = ["| detector | statements | precision | recall | F1 | true scored above false |", "|---|---|---|---|---|---|"]
    for d in DETECTORS:
        s = common["pooled"][d]
        lines.append(f"| {NAMES[d]} | {s.n_statements} | {s.precision.format(2)} | {s.recall.format(2)} | "
                     f"{s.f1.format(2)} | {common['pair_accuracy'][d].format(2)} |")
    every = summary["all"]["probability"]
    lines.append(f"| {NAMES['probability']}, every statement | {every.n_statements} | {every.precision.format(2)} | "
                 f"{every.recall.format(2)} | {every.f1.format(2)} | {summary['all']['pair_accuracy'].format(2)} |")
    per_lang = ["| language | " + " | ".join(f"F1 {NAMES[d]}" for d in DETECTORS) + " |", "|---|" + "---|" * len(DETECTORS)]
    for lang in summary["langs"]:
        per_lang.append(f"| {lang} | " + " | ".join(common["per_lang"][lang][d].f1.format(2) for d in DETECTORS) + " |")
    diffs = [f"- F1 {NAMES[d]} − {NAMES['probability']}: {e.format(3)}, p {_p_text(e.p)}"
             for d, e in summary["difference"].items()]
    donors = ("the degenerate groups and LAKNs of the other attributed facts of the fact's relation (no label leak)"
              if source == "relation" else "the fact's own degenerate groups and LAKNs (found with its true object)")
    return (f"Neurons: {donors}. Facts: {summary['n_facts']}; with DKNs to read: {summary['n_facts_common']}. "
            "A true and a false statement (same relation's object) per fact and language on a held-out paraphrase; "
            "flagged false when the score is below a threshold chosen on the other facts (leave-one-fact-out). "
            "Precision/recall/F1 of flagging false statements with 95% intervals over facts (n facts); flagging "
            "everything scores F1 = 0.67. Statements every detector scores:\n\n" + "\n".join(lines)
            + "\n\nPer language (same statements):\n\n" + "\n".join(per_lang)
            + "\n\nPaired differences, each on the statements both detectors decide (facts resampled together; "
            "p: twice the smaller share of 10,000 resamples on either side of 0):\n\n" + "\n".join(diffs) + "\n")


if __name__ == "__main__":
    main()
