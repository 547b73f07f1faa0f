"""The paper's claims as computed comparisons: one row per claim, our estimate, the verdict.

Each claim is a paired per-fact difference (MATRICE − X, or a share − its uniform value) whose sign
the paper asserts; `matrice.stats` gives the interval, the p-value and the verdict. Manipulation and
enhancement are scored on *evaluation* queries (paraphrases never attributed) when the run has them;
editing's reliability is, by the experiment's design, on the edited (attributed) query, and says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from matrice.stats import Direction, Estimate, Verdict, bootstrap_mean, paired_difference, verdict


NAMES = {"matrice": "MATRICE", "amig": "AMIG", "random": "Random", "wo_uaq": "w/o UaQ", "wo_ual": "w/o UaL",
         "amig_k": "AMIG (size-matched)", "wo_uaq_k": "w/o UaQ (size-matched)", "wo_ual_k": "w/o UaL (size-matched)",
         "random_layer": "Random (layer-matched)"}
# MATRICE against each baseline: the paper's (threshold-based) one, then the fair variant beside it.
BASELINES = ("random", "random_layer", "amig", "amig_k")


def _name(method: str) -> str:
    return NAMES.get(method, method)


@dataclass(frozen=True)
class Claim:
    """One row of "Does the paper replicate here?"."""

    source: str  # "Fig. 5", "Table III", ...
    claim: str  # the paper's statement, in a line
    comparison: str  # what is estimated, e.g. "ΔP/P MATRICE − Random (suppress)"
    direction: Direction  # the sign the paper asserts for the difference
    queries: str  # which queries the number rests on
    estimate: Estimate
    verdict: Verdict
    note: str = ""


def _claim(source: str, text: str, comparison: str, direction: Direction, queries: str,
           a: Sequence[float | None], b: Sequence[float | None], note: str = "") -> Claim:
    est = paired_difference(a, b)
    return Claim(source, text, comparison, direction, queries, est, verdict(est, direction), note)


def per_fact_mean(records: Iterable[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None],
                  keep: Callable[[Mapping[str, Any]], bool]) -> dict[str, float]:
    """Mean of `value` over each fact's kept records (records whose value is None are left out)."""
    by_fact: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if keep(r):
            v = value(r)
            if v is not None:
                by_fact[r["fact_id"]].append(float(v))
    return {f: float(np.mean(vs)) for f, vs in by_fact.items() if vs}


def scored_queries(records: Sequence[Mapping[str, Any]], is_evaluation: Callable[[str], bool]
                   ) -> tuple[Callable[[Mapping[str, Any]], bool], bool]:
    """(keep(record), whether that means evaluation queries): the evaluation queries when the records
    have any, else every query (a run without held-out paraphrases says so in its labels)."""
    have_eval = any(is_evaluation(r["query_id"]) for r in records)
    return (lambda r: is_evaluation(r["query_id"])) if have_eval else (lambda r: True), have_eval


def _paired(x: Mapping[str, float], y: Mapping[str, float]) -> tuple[list[float | None], list[float | None]]:
    facts = sorted(set(x) | set(y))
    return [x.get(f) for f in facts], [y.get(f) for f in facts]


def _empty_note(empty: Mapping[str, Sequence[str]], method: str, n_facts: int) -> str:
    k = len(empty.get(method, []))
    if not k:
        return ""
    return (f"{method} is empty for {k} of {n_facts} facts (threshold-based, as the paper): there it is scored as "
            "doing nothing")


def layer_claims(sets: Mapping[str, Mapping[str, Sequence[Sequence[int]]]], n_layers: int) -> list[Claim]:
    """Fig. 4: 'the last few layers contain a higher proportion' — share of a fact's LAKNs in the top
    third of the layers against the uniform share."""
    top = n_layers - n_layers // 3
    uniform = (n_layers - top) / n_layers
    shares = [float(np.mean([l >= top for l, _ in per["matrice"]])) for per in sets.values() if len(per["matrice"])]
    return [_claim("Fig. 4", "the last few layers hold a higher share of LAKNs",
                   f"share of MATRICE neurons in layers {top}-{n_layers - 1} − uniform ({uniform:.2f})", "greater",
                   "all selected neurons", shares, [uniform] * len(shares))]


def manipulation_claims(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool]) -> list[Claim]:
    """Fig. 5 and Table II from per-query ΔP/P, averaged per fact over evaluation queries."""
    records = manip["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    split = "evaluation queries (never attributed)" if have_eval else "localisation queries (no held-out ones in this run)"
    n_facts = len({r["fact_id"] for r in records})

    def effect(method: str, mode: str | None) -> dict[str, float]:
        """ΔP/P for one mode; for mode None the effect in the intended direction (−ΔP for suppress,
        +ΔP for enhance) averaged over both modes, so a wrong-direction change counts against."""
        sign = {"suppress": -1.0, "enhance": 1.0}
        return per_fact_mean(
            records,
            lambda r: None if r["delta_p"] is None else (r["delta_p"] if mode else sign[r["mode"]] * r["delta_p"]),
            lambda r: r["method"] == method and (mode is None or r["mode"] == mode) and scored(r),
        )

    empty = manip.get("empty_facts", {})
    methods = {r["method"] for r in records}
    out = []
    for other in (m for m in BASELINES if m in methods):
        for mode, direction in (("suppress", "less"), ("enhance", "greater")):
            out.append(_claim(
                "Fig. 5", f"{ {'suppress': 'suppressing', 'enhance': 'enhancing'}[mode]} MATRICE's neurons moves "
                f"P(answer) more than {_name(other)}'s",
                f"ΔP/P MATRICE − {_name(other)} ({mode})", direction, split,
                *_paired(effect("matrice", mode), effect(other, mode)), _empty_note(empty, other, n_facts)))
    for ablation in (m for m in ("wo_uaq", "wo_uaq_k", "wo_ual", "wo_ual_k") if m in methods):
        text = f"removing {'UaQ' if 'uaq' in ablation else 'UaL'} weakens the neurons"
        out.append(_claim("Table II", text, f"effect MATRICE − {_name(ablation)} (−ΔP suppress, +ΔP enhance, mean)",
                          "greater", split, *_paired(effect("matrice", None), effect(ablation, None)),
                          _empty_note(empty, ablation, n_facts)))
    for suffix in ("", "_k"):
        if {f"wo_uaq{suffix}", f"wo_ual{suffix}"} <= methods:
            out.append(_claim("Table II", "UaQ matters more than UaL",
                              f"effect {_name('wo_ual' + suffix)} − effect {_name('wo_uaq' + suffix)}", "greater", split,
                              *_paired(effect(f"wo_ual{suffix}", None), effect(f"wo_uaq{suffix}", None))))
    return out


def editing_claims(editing: Mapping[str, Any]) -> list[Claim]:
    """Tables III/IV: reliability per fact, pooled over languages (edited in English)."""
    records = editing["records"]
    n_facts = len({r["fact_id"] for r in records})

    def reliability(method: str, operation: str) -> dict[str, float]:
        pooled: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in records:
            if r["method"] == method and r["operation"] == operation:
                pooled[r["fact_id"]][0] += r["rel_ok"]
                pooled[r["fact_id"]][1] += r["rel_n"]
        return {f: ok / n for f, (ok, n) in pooled.items() if n}

    methods = {r["method"] for r in records}
    empty = editing.get("empty_facts", {})
    out = []
    for operation, table in (("erasure", "Table III"), ("update", "Table IV")):
        pairs = [*(("matrice", m) for m in BASELINES), ("amig", "random")]
        for a, b in pairs:
            if a in methods and b in methods:
                out.append(_claim(
                    table, f"{_name(a)}'s {operation} is more reliable than {_name(b)}'s",
                    f"{operation} reliability {_name(a)} − {_name(b)}", "greater", "edited query, every language (attributed)",
                    *_paired(reliability(a, operation), reliability(b, operation)),
                    _empty_note(empty, "amig", n_facts) if "amig" in (a, b) else ""))
    return out


def enhancement_claims(enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool]) -> list[Claim]:
    """Fig. 6: accuracy gained on Q_error (low-resource languages) per fact."""
    records = enhancement["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    split = "Q_error, evaluation queries" if have_eval else "Q_error (no held-out ones in this run)"

    def gain(method: str) -> dict[str, float]:
        return per_fact_mean(records, lambda r: float(r["correct_after"]),
                             lambda r: r["method"] == method and scored(r))

    methods = {r["method"] for r in records}
    return [
        _claim("Fig. 6", f"{_name(a)} gains more accuracy than {_name(b)}",
               f"accuracy gain {_name(a)} − {_name(b)}", "greater", split, *_paired(gain(a), gain(b)))
        for a, b in (*(("matrice", m) for m in BASELINES), ("amig", "random"))
        if a in methods and b in methods
    ]


def injection_claims() -> list[Claim]:
    """Table V is not judged yet: the injection experiment reports accuracy on its own training
    queries, which measures memorising, not learning (held-out redesign pending)."""
    none = Estimate(None, None, None, 0)
    return [Claim("Table V", "MATRICE_FT learns new facts with less forgetting than AMIG_FT / Direct_FT",
                  "avg(Q_new, Q_old) MATRICE_FT − others", "greater", "training queries", none, "not judged",
                  "injection scores its training set; needs held-out paraphrases before it can be judged")]


def all_claims(*, sets: Mapping[str, Any], n_layers: int, manip: Mapping[str, Any], editing: Mapping[str, Any],
               enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool]) -> list[Claim]:
    return [*layer_claims(sets, n_layers), *manipulation_claims(manip, is_evaluation), *editing_claims(editing),
            *enhancement_claims(enhancement, is_evaluation), *injection_claims()]


def claims_table(claims: Sequence[Claim]) -> str:
    """Markdown: one row per claim; the estimate is the mean paired difference [95% CI] (n facts)."""
    lines = ["| source | the paper's claim | we estimate | on | paper's sign | ours: mean [95% CI] (n facts) | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        p = "–" if c.estimate.p is None else (f"{c.estimate.p:.3f}" if c.estimate.p >= 0.001 else "<0.001")
        sign = "> 0" if c.direction == "greater" else "< 0"
        note = f" ({c.note})" if c.note else ""
        lines.append(f"| {c.source} | {c.claim} | {c.comparison} | {c.queries} | {sign} | {c.estimate.format()} | {p} "
                     f"| **{c.verdict}**{note} |")
    return "\n".join(lines) + "\n"


def manipulation_interval_tables(manip: Mapping[str, Any], is_evaluation: Callable[[str], bool],
                                 languages: Sequence[str]) -> str:
    """Fig. 5 per language with uncertainty: per method and mode, mean ΔP/P over facts (each fact's
    mean over its evaluation queries in that language), its 95% bootstrap interval and n facts."""
    records = manip["records"]
    scored, have_eval = scored_queries(records, is_evaluation)
    methods = list(dict.fromkeys(r["method"] for r in records))
    parts = []
    for mode in ("suppress", "enhance"):
        lines = ["| method | " + " | ".join(languages) + " |", "|---|" + "---|" * len(languages)]
        for method in methods:
            cells = []
            for lang in languages:
                per_fact = per_fact_mean(
                    records, lambda r: r["delta_p"],
                    lambda r: r["method"] == method and r["mode"] == mode and r["lang"] == lang and scored(r))
                cells.append(bootstrap_mean(list(per_fact.values())).format(2))
            lines.append(f"| {_name(method)} | " + " | ".join(cells) + " |")
        split = "evaluation queries" if have_eval else "all queries"
        parts.append(f"**{mode}**: mean ΔP/P [95% CI over facts] (n facts), {split}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def verdict_counts(claims: Sequence[Claim]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for c in claims:
        counts[c.verdict] += 1
    return dict(counts)
