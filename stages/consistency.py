"""consistency: query localisation — how consistently a fact's queries localise it, and whether
suppression and editing work better on consistent facts (matrice.experiments.consistency)."""

from __future__ import annotations

import json
from dataclasses import asdict

from matrice.attribution.runner import iter_fact_attributions
from matrice.experiments.consistency import (SCATTER_EFFECT, consistency_metrics, consistency_table, fact_consistency,
                                             fact_effects, link_table, split_consistent)
from matrice.data.schema import load_queries
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import plot_consistency
from stages.common import (DATASET_DIR, evaluation_rule, figure_path, load_params, model_arg, results_dir,
                           setup_logging)

def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["consistency"]
    out = results_dir(key)
    lang_of = {q.query_id: q.lang for q in load_queries(DATASET_DIR / "queries.jsonl")}
    try:
        facts = [fact_consistency(fact, maps, lang_of, section["top_k"])
                 for fact, maps in iter_fact_attributions(out / "attributions")]
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    scores = {f.fact_id: f.consistency for f in facts if f.consistency is not None}
    consistent, cut = split_consistent(scores, section.get("threshold"))
    manip = json.loads((out / "manipulation.json").read_text(encoding="utf-8"))
    editing = json.loads((out / "editing.json").read_text(encoding="utf-8"))
    effects = fact_effects(manip, editing, evaluation_rule(params))
    rows = link_table(scores, consistent, effects, params["seed"])
    atomic_write_json(out / "consistency.json", {
        "top_k": section["top_k"], "threshold": cut, "rule": "median" if section.get("threshold") is None else "fixed",
        "facts": [{**asdict(f), "consistent": consistent.get(f.fact_id)} for f in facts],
        "effects": effects, "link": [{k: (asdict(v) if k != "effect" else v) for k, v in r.items()} for r in rows],
    })
    atomic_write_json(out / "consistency_metrics.json", {"consistency": consistency_metrics(facts, consistent, rows)})
    atomic_write_text(out / "consistency_table.md", consistency_table(facts, rows, cut, section))
    atomic_write_json(out / "consistency_plot.json", [
        {"fact": f, "consistency": scores[f], "suppression": effects[SCATTER_EFFECT].get(f), "consistent": consistent[f]}
        for f in sorted(scores)])
    plot_consistency({f: (scores[f], effects[SCATTER_EFFECT].get(f), consistent[f]) for f in scores}, cut, SCATTER_EFFECT,
                     figure_path(key, "consistency.png"),
                     f"{key}: query-localisation consistency (top-{section['top_k']}) vs MATRICE suppression")


if __name__ == "__main__":
    main()
