"""degenerate: degenerate knowledge neurons (AMIG) among each fact's LAKNs and its language-specific
knowledge neurons, searched on the original query of each language and verified on a held-out
paraphrase (matrice.experiments.degenerate)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

from tqdm import tqdm

from matrice.data.schema import load_queries
from matrice.data.split import HeldOutSplit
from matrice.experiments.degenerate import DegenerateConfig, search_fact, summarise
from matrice.io import atomic_write_json, atomic_write_text
from matrice.models.encoding import encode_query
from matrice.report import ordered_langs
from matrice.scores import ScoreStore
from matrice.selection import select_by_threshold
from stages.common import (DATASET_DIR, load_neuron_sets, load_params, load_prepared, model_arg, results_dir,
                           setup_logging)

ROWS = {"found": "share of languages with a degenerate group", "groups": "groups per language",
        "size": "neurons per group", "layers": "layers a group spans", "verified": "groups that hold on the held-out paraphrase",
        "shared": "other languages where a LAKN group holds too"}


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["degenerate"]
    try:
        cfg = DegenerateConfig(t_high=section["t_high"], t_low=section["t_low"], max_candidates=section["max_candidates"],
                               max_group=section["max_group"], batch_size=params["manipulate"]["batch_size"])
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
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
        search, held_out = _queries(adapter, by_fact[fact], split, params["few_shot"])
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
    atomic_write_text(out / "degenerate_table.md", _tables(rows, summary, cfg))
    atomic_write_json(out / "degenerate_plot.json", _plot_rows(rows))


def _queries(adapter, queries, split: HeldOutSplit, few_shot):
    """Per language: the search query (the original, lowest template) and a held-out paraphrase
    (the first held-out template), both encoded."""
    search, held_out = {}, {}
    for q in sorted(queries, key=lambda q: q.template_id):
        try:
            enc = encode_query(adapter, q, few_shot)
        except ValueError:
            continue
        if q.lang not in search:
            search[q.lang] = enc
        elif split.is_held_out(q) and q.lang not in held_out:
            held_out[q.lang] = enc
    return search, held_out


def _per_language(rows) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(set kind, language) -> (facts with a degenerate group, facts searched, groups found)."""
    out = {}
    for kind in ("lakn", "language"):
        for lang in ordered_langs({r["lang"] for r in rows}):
            mine = [r for r in rows if r["set_kind"] == kind and r["lang"] == lang and r["n_candidates"] > 0]
            out[(kind, lang)] = (sum(bool(r["groups"]) for r in mine), len(mine), sum(len(r["groups"]) for r in mine))
    return out


def _plot_rows(rows) -> list[dict]:
    """Per language: the share of searched facts with a degenerate group, per neuron set (`dvc plots`)."""
    counts = _per_language(rows)
    return [{"lang": lang, **{kind: (counts[(kind, lang)][0] / counts[(kind, lang)][1] if counts[(kind, lang)][1] else None)
                              for kind in ("lakn", "language")}}
            for lang in ordered_langs({r["lang"] for r in rows})]


def _tables(rows, summary, cfg) -> str:
    lines = ["| | LAKNs (every language) | language-specific neurons |", "|---|---|---|"]
    for metric, text in ROWS.items():
        lines.append(f"| {text} | {summary['lakn'][metric].format(2)} | {summary['language'][metric].format(2)} |")
    langs = ordered_langs({r["lang"] for r in rows})
    counts = _per_language(rows)
    per_lang = ["| set | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for kind, name in (("lakn", "LAKNs"), ("language", "language-specific")):
        cells = [f"{found}/{searched} ({groups} groups)" for found, searched, groups in (counts[(kind, lang)] for lang in langs)]
        per_lang.append(f"| {name} | " + " | ".join(cells) + " |")
    return (f"Degenerate groups (member alone: P ≥ {cfg.t_high}·P₀; group: P < {cfg.t_low}·P₀; the top "
            f"{cfg.max_candidates} neurons of each set searched, groups up to {cfg.max_group}): mean [95% CI over "
            "facts] (n facts)\n\n" + "\n".join(lines) + "\n\nFacts with a degenerate group / facts searched, per "
            "language (groups found):\n\n" + "\n".join(per_lang) + "\n")


if __name__ == "__main__":
    main()
