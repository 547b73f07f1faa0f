"""Knowledge editing's evaluation: the claims of Tables III/IV, the interval tables and the report's section
(the runs: :mod:`matrice.experiments.edit.run`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from matrice.evaluation.claims import (BASELINES, CELL, Claim, RelationOf, empty_counts, empty_note, make_claim, method_name,
                                       relation_prefix)
from matrice.evaluation.report import RunResults
from matrice.evaluation.stats import Estimate, pooled_ratio, relation_mean

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
    return out



EDIT_METRICS = {"reliability": ("rel_ok", "rel_n"), "generality": ("gen_ok", "gen_n"), "locality": ("loc_ok", "loc_n")}



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
                out[(operation, method, metric)] = [relation_mean(pooled_ratio(
                    [r for r in mine if lang in (None, r["lang"])], ok, n), relation_of) for lang in languages]
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
        + "Reliability is on the edited (attributed) query, generality on its paraphrases, held-out ones included.\n\n"
        + run.text("editing_tables.md"))
