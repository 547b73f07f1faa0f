"""Dataset statistics in the shape of the paper's Table I (per language), as JSON and Markdown."""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from matrice.data.schema import Query

if TYPE_CHECKING:
    from matrice.data.build import BuiltDataset

CHARACTER_LANGUAGES = frozenset({"zh", "ja", "th"})  # written without spaces between words


def length_unit(lang: str) -> str:
    return "characters" if lang in CHARACTER_LANGUAGES else "words"


def _is_punct_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith(("P", "S"))


def query_length(query: Query) -> int:
    """Length of the cloze query without its answer: words, or characters for zh/ja (punctuation excluded)."""
    text = query.cloze.replace("[Y]", " ")
    if query.lang in CHARACTER_LANGUAGES:
        return sum(1 for ch in text if not _is_punct_or_space(ch))
    return sum(1 for word in text.split() if not all(_is_punct_or_space(ch) for ch in word))


def _per_language(ds: "BuiltDataset") -> dict[str, dict[str, Any]]:
    by_lang: dict[str, list[Query]] = defaultdict(list)
    for q in ds.queries:
        by_lang[q.lang].append(q)
    out = {}
    for lang in ds.languages:
        qs = by_lang.get(lang, [])
        lengths = [query_length(q) for q in qs]
        out[lang] = {
            "facts": len({q.fact_id for q in qs}),
            "queries": len(qs),
            "relations": len({q.relation for q in qs}),
            "avg_query_length": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
            "length_unit": length_unit(lang),
        }
    return out


def _several_objects(ds: "BuiltDataset", relation: str) -> int:
    """Facts whose subject has another object in the same relation: such queries have several right answers."""
    subjects = Counter(tuple(sorted(f.subject.items())) for f in ds.facts if f.relation == relation)
    return sum(n for n in subjects.values() if n > 1)


def _per_relation(ds: "BuiltDataset") -> dict[str, dict[str, Any]]:
    queries = Counter(q.relation for q in ds.queries)
    facts = Counter(f.relation for f in ds.facts)
    return {
        r: {
            "facts": facts[r],
            "available_facts": ds.available_facts[r],
            "queries": queries[r],
            "templates": {lang: len(ds.templates[r][lang]) for lang in ds.languages},
            "demo": ds.demos[r].fact_id if r in ds.demos else None,
            "facts_sharing_subject": _several_objects(ds, r),
        }
        for r in ds.relations
    }


def compute_stats(ds: "BuiltDataset") -> dict[str, Any]:
    """Everything stats.json holds: Table I per language, a per-relation view, and what was dropped."""
    return {
        "source": ds.config.source,
        "config": asdict(ds.config),
        "languages": ds.languages,
        "relations": ds.relations,
        "totals": {"facts": len(ds.facts), "queries": len(ds.queries), "relations": len(ds.relations)},
        "per_language": _per_language(ds),
        "per_relation": _per_relation(ds),
        "dropped": ds.dropped,
        "dropped_detail": ds.dropped_detail,
        "repaired": ds.repaired,
        "repaired_detail": ds.repaired_detail,
    }


def _caption(languages: list[str]) -> str:
    words = [lang for lang in languages if length_unit(lang) == "words"]
    chars = [lang for lang in languages if length_unit(lang) == "characters"]
    parts = []
    if words:
        parts.append(f"in words (whitespace-separated, punctuation excluded) for {', '.join(words)}")
    if chars:
        parts.append(f"in characters (spaces and punctuation excluded) for {', '.join(chars)}")
    return ("Average query length is the length of the cloze query without its answer, "
            + " and ".join(parts) + ".")


def _table_i(stats: dict[str, Any]) -> list[str]:
    lines = ["| Language | #Facts | #Queries | #Relations | Avg. query length |", "|---|---:|---:|---:|---:|"]
    for lang, row in stats["per_language"].items():
        unit = "chars" if row["length_unit"] == "characters" else "words"
        lines.append(f"| {lang} | {row['facts']} | {row['queries']} | {row['relations']} | "
                     f"{row['avg_query_length']:.2f} {unit} |")
    return lines


def _relation_table(stats: dict[str, Any]) -> list[str]:
    langs = stats["languages"]
    lines = ["| Relation | #Facts | #Available | #Queries | Templates (" + " / ".join(langs) + ") | Demo |",
             "|---|---:|---:|---:|---|---|"]
    for r, row in stats["per_relation"].items():
        templates = " / ".join(str(row["templates"][lang]) for lang in langs)
        lines.append(f"| {r} | {row['facts']} | {row['available_facts']} | {row['queries']} | {templates} | "
                     f"{row['demo'] or '-'} |")
    return lines


def _counts(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return [f"{title}: none.", ""]
    return [f"{title}:", ""] + [f"- {reason}: {n}" for reason, n in counts.items()] + [""]


def stats_markdown(stats: dict[str, Any]) -> str:
    """Markdown report: Table I (per language), then relations, then what was dropped or repaired."""
    totals = stats["totals"]
    lines = [
        f"# Dataset ({stats['source']})",
        "",
        f"{totals['facts']} facts, {totals['queries']} queries, {totals['relations']} relations.",
        "",
        f"Table I. Dataset per language. {_caption(stats['languages'])}",
        "",
        *_table_i(stats),
        "",
        "Per relation (#Available: facts with labels in every language before sampling and demo reservation).",
        "",
        *_relation_table(stats),
        "",
        *_counts("Dropped", stats["dropped"]),
        *_counts("Repaired", stats["repaired"]),
    ]
    return "\n".join(lines).rstrip() + "\n"
