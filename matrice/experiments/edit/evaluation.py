"""Knowledge editing's evaluation: the claims of Tables III/IV, the interval tables and the report's section
(the runs: :mod:`matrice.experiments.edit.run`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from matrice.evaluation.claims import (BASELINES, CELL, Claim, RelationOf, empty_counts, empty_note, make_claim, method_name,
                                       relation_prefix)
from matrice.evaluation.report import RunResults, ordered_langs
from matrice.io import RunOutputs
from matrice.evaluation.stats import RATE, Estimate, pooled_ratio, relation_mean

# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

def editing_claims(editing: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Tables III/IV: reliability per fact, pooled over languages (edited in English)."""
    records = editing["records"]
    n_facts = len({r["fact_id"] for r in records})

    def reliability(method: str, operation: str) -> dict[str, float]:
        return pooled_ratio([r for r in records if r["method"] == method and r["operation"] == operation], "rel_ok", "rel_n")

    methods = {r["method"] for r in records}
    empty = editing.get("empty_facts", {})
    out = []
    for operation, table in (("erasure", "Table III"), ("update", "Table IV")):
        pairs = [*(("matrice", m) for m in BASELINES), ("amig", "random")]
        for a, b in pairs:
            if a in methods and b in methods:
                out.append(make_claim(
                    table, f"{method_name(a)}'s {operation} is more reliable than {method_name(b)}'s",
                    f"{operation} reliability {method_name(a)} − {method_name(b)}", "greater", "edited query, every language (attributed)",
                    reliability(a, operation), reliability(b, operation),
                    empty_note(empty, "amig", n_facts) if "amig" in (a, b) else "",
                    key=f"{'table3' if operation == 'erasure' else 'table4'}_{operation}_{a}_vs_{b}", metric="rate",
                    relation_of=relation_of, empty=empty_counts(empty, a, b), n_facts=n_facts))
        out += _beyond_reliability(records, operation, table, methods, empty, n_facts, relation_of)
    return out


# the paper's other editing claims (generality, locality, every language), each against the same-size
# competitor and random neurons: (metric, what it says, queries, record filter, ok/n fields)
BEYOND_RELIABILITY = (
    ("heldout", "generalises to held-out paraphrases more than", "held-out paraphrases (never attributed), every language",
     lambda r: True, ("held_ok", "held_n")),
    ("locality", "leaves unrelated facts unchanged more often than", "original queries of unrelated facts",
     lambda r: True, ("loc_ok", "loc_n")),
    ("other_languages", "carries into the other languages more than", "edited query, languages other than English",
     lambda r: r["lang"] != "en", ("rel_ok", "rel_n")),
)


def _beyond_reliability(records: Sequence[Mapping[str, Any]], operation: str, table: str, methods: set[str],
                        empty: Mapping[str, Any], n_facts: int, relation_of: RelationOf) -> list[Claim]:
    def rate(method: str, keep, fields) -> dict[str, float]:
        return pooled_ratio([r for r in records if r["method"] == method and r["operation"] == operation and keep(r)
                             and fields[1] in r], *fields)

    out = []
    for metric, text, queries, keep, fields in BEYOND_RELIABILITY:
        for a, b in (("matrice", "amig_k"), ("matrice", "random")):
            if a in methods and b in methods:
                out.append(make_claim(
                    table, f"{method_name(a)}'s {operation} {text} {method_name(b)}'s",
                    f"{operation} {metric} {method_name(a)} − {method_name(b)}", "greater", queries,
                    rate(a, keep, fields), rate(b, keep, fields),
                    key=f"{'table3' if operation == 'erasure' else 'table4'}_{operation}_{metric}_{a}_vs_{b}",
                    metric="rate", relation_of=relation_of, empty=empty_counts(empty, a, b), n_facts=n_facts))
    return out



EDIT_METRICS = {"reliability": ("rel_ok", "rel_n"), "generality": ("gen_ok", "gen_n"),
                "held-out generality": ("held_ok", "held_n"), "locality": ("loc_ok", "loc_n")}



def editing_estimates(editing: Mapping[str, Any], languages: Sequence[str | None],
                      relation_of: RelationOf = relation_prefix) -> dict[tuple[str, str, str], list[Estimate]]:
    """{(operation, method, metric): [Estimate per language (None: all)]}: each fact's rate pooled over
    its queries in the language (all: every language), then `relation_mean` — the verdicts' unit."""
    records = editing["records"]
    out = {}
    for operation in ("erasure", "update"):
        for method in dict.fromkeys(r["method"] for r in records):
            mine = [r for r in records if r["method"] == method and r["operation"] == operation]
            for metric, (ok, n) in EDIT_METRICS.items():
                if not any(n in r for r in mine):  # a result from before the metric existed
                    continue
                out[(operation, method, metric)] = [relation_mean(pooled_ratio(
                    [r for r in mine if lang in (None, r["lang"])], ok, n), relation_of, bounds=RATE) for lang in languages]
    return out



def editing_interval_tables(editing: Mapping[str, Any], languages: Sequence[str],
                            relation_of: RelationOf = relation_prefix) -> str:
    """Tables III/IV: per method, metric and language the fact's rate pooled over its queries there
    ("all": over every language), then `CELL` (facts with no sample in a language are out of that cell)."""
    estimates = editing_estimates(editing, [*languages, None], relation_of)
    parts = []
    for operation, title in (("erasure", "Table III — erasure"), ("update", "Table IV — update")):
        lines = ["| method | metric | " + " | ".join([*languages, "all"]) + " |", "|---|---|" + "---|" * (len(languages) + 1)]
        for (op, method, metric), cells in estimates.items():
            if op == operation:
                lines.append(f"| {method_name(method)} | {metric} | " + " | ".join(e.format(2) for e in cells) + " |")
        parts.append(f"**{title}**: {CELL}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def write_outputs(editing: Mapping[str, Any], out: RunOutputs, relation_of: RelationOf) -> None:
    """The result, each method's rates over every language (`dvc metrics`) and the interval tables; each
    fact's rate pooled over its queries, then each relation's (the verdicts' unit)."""
    out.json("editing.json", editing)
    overall = editing_estimates(editing, [None], relation_of)
    out.json("editing_metrics.json", {"editing": {
        f"{method}.{op}": {m: cells[0].mean for (o, meth, m), cells in overall.items() if (o, meth) == (op, method)}
        for op, method, _ in overall}})
    langs = ordered_langs({r["lang"] for r in editing["records"]})
    out.text("editing_tables.md", "Edited in English.\n\n" + editing_interval_tables(editing, langs, relation_of))


# ---- its section of the report ------------------------------------------------------------------

def scaling_text(params: Mapping[str, Any]) -> str:
    if params["edit"].get("scaling", "raw") == "raw":
        return "raw λ, Eq. 15 as written"
    return "λ relative to each column's norm: each term has norm λ·‖W‖"


def section(run: RunResults) -> str:
    edit = run.params["edit"]
    return (
        "### Cross-lingual editing (Tables III, IV)\nEdits made with the English object only; reliability on the "
        "edited query, generality on its paraphrases, locality on unrelated facts, per language. Erasure zeroes each "
        "neuron's output weight column; update sets it to W − λ1·E(o) + λ2·E(o') with "
        f"λ1 = {edit['lambda1']}, λ2 = {edit['lambda2']} ({scaling_text(run.params)}).\n\n"
        + "Reliability is on the edited (attributed) query, generality on its paraphrases, held-out ones included; "
        "held-out generality on the paraphrases selection never saw. An update is not scored where o' starts with "
        "o's first token in the query's language.\n\n"
        + run.text("editing_tables.md"))
