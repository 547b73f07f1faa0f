"""What the degenerate-neuron search found, summarised: estimates over facts, the stage's tables and
plot data, and the report's section."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np

from matrice.experiments.degenerate.search import DegenerateConfig
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, ordered_langs
from matrice.evaluation.stats import RATE, Estimate, bootstrap_mean, per_fact_mean


def _per_fact(records: Sequence[dict], value) -> list[float]:
    return list(per_fact_mean(records, value).values())


def summarise(records: Sequence[dict], n_languages: int) -> dict[str, dict[str, Estimate]]:
    """Per set kind, each a mean over facts with its 95% bootstrap interval (n facts):
    ``found`` share of the fact's languages with a degenerate group; ``groups`` per language;
    ``size`` and ``layers`` of a group; ``verified`` share of groups that hold on the held-out
    paraphrase; ``shared`` (LAKNs) share of the other languages where a group holds too."""
    out: dict[str, dict[str, Estimate]] = {}
    for kind in ("lakn", "language"):
        mine = [r for r in records if r["set_kind"] == kind and r["n_candidates"] > 0]
        checks = [dict(r, ok=[c["holds"] for c in r["verified"] if c is not None]) for r in mine]
        out[kind] = {
            "found": bootstrap_mean(_per_fact(mine, lambda r: float(bool(r["groups"]))), bounds=RATE),
            "groups": bootstrap_mean(_per_fact(mine, lambda r: len(r["groups"]))),
            "size": bootstrap_mean(_per_fact(mine, lambda r: np.mean([len(g) for g in r["groups"]]) if r["groups"] else None)),
            "layers": bootstrap_mean(_per_fact(mine, lambda r: np.mean(r["layers_spanned"]) if r["groups"] else None)),
            "verified": bootstrap_mean(_per_fact(checks, lambda r: np.mean(r["ok"]) if r["ok"] else None), bounds=RATE),
            "shared": bootstrap_mean(_per_fact(
                mine, lambda r: np.mean([len(s) / max(n_languages - 1, 1) for s in r["shared_langs"]])
                if r["groups"] and kind == "lakn" else None), bounds=RATE),
        }
    return out


# ---- tables and plot data ------------------------------------------------------------------------

ROWS = {"found": "share of languages with a degenerate group", "groups": "groups per language",
        "size": "neurons per group", "layers": "layers a group spans", "verified": "groups that hold on the held-out paraphrase",
        "shared": "other languages where a LAKN group holds too"}


def _per_language(rows) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(set kind, language) -> (facts with a degenerate group, facts searched, groups found)."""
    out = {}
    for kind in ("lakn", "language"):
        for lang in ordered_langs({r["lang"] for r in rows}):
            mine = [r for r in rows if r["set_kind"] == kind and r["lang"] == lang and r["n_candidates"] > 0]
            out[(kind, lang)] = (sum(bool(r["groups"]) for r in mine), len(mine), sum(len(r["groups"]) for r in mine))
    return out


def degenerate_plot_rows(rows) -> list[dict]:
    """Per language: the share of searched facts with a degenerate group, per neuron set (`dvc plots`)."""
    counts = _per_language(rows)
    return [{"lang": lang, **{kind: (counts[(kind, lang)][0] / counts[(kind, lang)][1] if counts[(kind, lang)][1] else None)
                              for kind in ("lakn", "language")}}
            for lang in ordered_langs({r["lang"] for r in rows})]


def degenerate_tables(rows, summary, cfg: DegenerateConfig) -> str:
    """The report's tables: each summary row for both neuron sets, then facts with a group per language."""
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


# ---- its section of the report ------------------------------------------------------------------

def _answer(summary: Mapping[str, Any]) -> str:
    """The section's answer in a sentence, read off the summary's estimates."""
    lakn, lang = (Estimate(**summary[k]["found"]) for k in ("lakn", "language"))
    verified = [Estimate(**summary[k]["verified"]) for k in ("lakn", "language")]
    if not any(e.mean for e in (lakn, lang)):
        return (f"**No degenerate group is found on this model** (LAKNs {lakn.format(2)}, language-specific neurons "
                f"{lang.format(2)} of languages per fact).\n\n")
    held = [v for v in verified if v.n]
    held_text = " and ".join(v.format(2) for v in held)
    return (f"**Degenerate groups are found on this model** in a share {lakn.format(2)} of a fact's languages among its "
            f"LAKNs and {lang.format(2)} among the language-specific neurons; the share of found groups that still "
            f"hold on the held-out paraphrase is {held_text} (LAKN, language-specific groups)"
            + (": none holds on a paraphrase the search never saw, so here degeneracy is a property of the query "
               "searched, not of the fact" if held and all(v.mean == 0 for v in held) else "") + ".\n\n")


def write_outputs(records: Sequence[Any], n_languages: int, cfg: DegenerateConfig, out: RunOutputs) -> None:
    """The records with their summary over facts, its metrics, tables and `dvc plots` rows."""
    rows = [asdict(r) for r in records]
    summary = summarise(rows, n_languages)
    out.json("degenerate.json", {"config": asdict(cfg), "records": rows,
                                 "summary": {k: {m: asdict(e) for m, e in v.items()} for k, v in summary.items()}})
    out.json("degenerate_metrics.json", {"degenerate": {kind: {m: e.mean for m, e in v.items()} for kind, v in summary.items()}})
    out.text("degenerate_table.md", degenerate_tables(rows, summary, cfg))
    out.json("degenerate_plot.json", degenerate_plot_rows(rows))


def section(run: RunResults) -> str:
    """Are there redundant groups among a fact's neurons?"""
    return (
        "### Degenerate knowledge neurons (AMIG)\nGroups of a fact's neurons that each alone can be suppressed "
        "(×0 at the answer position) without losing the answer, but not together, searched among its LAKNs in every "
        "language and among each language's own knowledge neurons (pairs exhaustively, larger groups by greedy growth), "
        "on the original query of each language, then re-checked on a held-out paraphrase and, for LAKN groups, on the "
        "other languages.\n\n" + _answer(run.json("degenerate.json")["summary"]) + run.text("degenerate_table.md")
    )
