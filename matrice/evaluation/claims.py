"""The paper's claims as computed comparisons: one row per claim, our estimate, the verdict. This
module is the machinery (a claim, how it is judged, the verdict and power tables); each experiment
states its own claims in its module, and `matrice.experiments.registry` gathers them.

Each claim is a paired per-fact difference (MATRICE − X, or a share − its uniform value) whose sign
the paper asserts, tested over relation clusters (`matrice.evaluation.stats.clustered_difference`: each
relation's facts averaged first, sign-flip test: exact up to 20 relations, Monte Carlo beyond) with the fact-level estimate beside it. A row
is *not testable* when a side selected or trained nothing for at least half the facts, both sides
sit at one value in every fact, or no sign pattern of its unit differences can give p < α (too few
units differ from 0; equivalence can still be shown). `judge` gives the verdicts: Holm over the declared primary family,
raw p for the exploratory rows, equivalence within the declared margins. Manipulation and
enhancement are scored on *evaluation* queries (paraphrases never attributed) when the run has them;
editing's reliability is, by the experiment's design, on the edited (attributed) query, and says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from matrice.evaluation.stats import (SIGN_FLIP_EXACT_UP_TO, SIGN_FLIP_MONTE_CARLO, Comparison, Direction, Estimate,
                                     Verdict, clustered_difference, holm, power, sign_flip_estimate, sign_flip_p,
                                     verdict)

RelationOf = Callable[[str], str]


def relation_prefix(fact_id: str) -> str:
    """The relation of a fact id written `<relation>-<id>` (embedded and mLAMA facts); the report
    passes the dataset's own mapping instead."""
    return fact_id.split("-", 1)[0]


NAMES = {"lolo": "LOLO (selected without the language)", "lolo_random_layer": "Random (layer-matched to LOLO)",
         "lolo_same_relation": "LOLO of another fact, same relation",
         "zero_k": "zero baseline (size-matched)",
         "own": "the fact's own LAKNs", "same_relation": "another fact's LAKNs, same relation",
         "other_relation": "another fact's LAKNs, other relation", "matrice": "MATRICE", "amig": "AMIG", "random": "Random", "wo_uaq": "w/o UaQ", "wo_ual": "w/o UaL",
         "amig_k": "AMIG (size-matched)", "wo_uaq_k": "w/o UaQ (size-matched)", "wo_ual_k": "w/o UaL (size-matched)",
         "random_layer": "Random (layer-matched)"}
# MATRICE against each baseline: the paper's (threshold-based) one, then the fair variant beside it.
BASELINES = ("random", "random_layer", "amig", "amig_k")


CELL = "mean over relations of their facts' means [95% CI, relations and their facts resampled] (n relations)"


def method_name(method: str) -> str:
    return NAMES.get(method, method)


@dataclass(frozen=True)
class Claim:
    """One row of "Does the paper replicate here?"."""

    source: str  # "Fig. 5", "Table III", ...
    claim: str  # the paper's statement, in a line
    comparison: str  # what is estimated, e.g. "ΔP/P MATRICE − Random (suppress)"
    direction: Direction  # the sign the paper asserts for the difference
    queries: str  # which queries the number rests on
    estimate: Estimate  # over relations: the verdict's unit
    verdict: Verdict
    note: str = ""
    key: str = ""  # stable id (params.yaml `verdicts.primary` names rows by it)
    metric: str = ""  # which equivalence margin applies (params.yaml `verdicts.margins`)
    fact_estimate: Estimate | None = None  # over facts, beside the verdict's
    unit_diffs: tuple[float, ...] = ()  # the relation-level differences (power analysis)
    units: tuple[str, ...] = ()  # the relations those differences belong to, in order (sensitivity analysis)
    untestable: str = ""  # why no verdict is possible ("" when one is)
    primary: bool = False
    p_holm: float | None = None
    unit: str = "relation"  # what the test resamples: "relation", or "training run" (Table V)


def _untestable(a: Mapping[str, float | None], b: Mapping[str, float | None], empty: Mapping[str, int], n_facts: int) -> str:
    """Why a row cannot be tested: a side selected/trained nothing for ≥ half the facts (`empty`:
    side name -> facts without neurons), or both sides at one value in every fact."""
    for name, k in empty.items():
        if n_facts and 2 * k >= n_facts:
            return f"{name} selected or trained nothing for {k} of {n_facts} facts"
    shared = [(a[f], b[f]) for f in set(a) & set(b) if a[f] is not None and b[f] is not None]
    values = {v for pair in shared for v in pair}
    if shared and len(values) == 1:
        return f"both sides are {values.pop():g} in every fact"
    return ""


def make_claim(source: str, text: str, comparison: str, direction: Direction, queries: str,
           a: Mapping[str, float | None], b: Mapping[str, float | None], note: str = "", *, key: str, metric: str,
           relation_of: RelationOf = relation_prefix, empty: Mapping[str, int] | None = None, n_facts: int = 0) -> Claim:
    comp: Comparison = clustered_difference(a, b, relation_of)
    untestable = _untestable(a, b, empty or {}, n_facts or len(set(a) | set(b)))
    if "selected or trained nothing" in untestable and "is empty for" in note:  # the reason says it already
        note = ""
    return Claim(source, text, comparison, direction, queries, comp.relation,
                 verdict(comp.relation, direction, untestable=untestable), note, key, metric, comp.fact,
                 comp.relation_diffs, comp.relations, untestable)


def nonzero_units(diffs: Sequence[float]) -> int:
    """Units whose difference is not 0 (up to float noise): the only ones a sign flip can move."""
    return int(np.count_nonzero(np.abs(np.asarray(diffs, dtype=np.float64)) > 1e-12))


def cannot_reject(c: Claim, alpha: float) -> str:
    """Why no sign pattern of the row's unit differences gives p < ``alpha`` ("" when one can): a unit
    whose difference is 0 keeps its |sum| under every flip, so with k units ≠ 0 the sign-flip p is at
    least 2/2^k, whatever the effect. The smallest p the magnitudes allow is the p of all of them on
    one side; which units are 0 does not change under the null's sign flips, so leaving such rows out
    of the Holm family (as Tarone's rule does for discrete tests) keeps its error rate."""
    if c.untestable or not c.unit_diffs:
        return ""
    diffs = np.asarray(c.unit_diffs, dtype=np.float64)
    best = sign_flip_p(np.abs(diffs))
    if best is None or best < alpha:
        return ""
    k, unit = nonzero_units(diffs), c.unit + "s"
    return (f"{k} of its {len(diffs)} {unit} differ from 0: no sign pattern gives p < {alpha:g} "
            f"(at best {best:.3g})")


def judge(claims: Sequence[Claim], primary: Sequence[str] = (), margins: Mapping[str, float] | None = None,
          alpha: float = 0.05) -> list[Claim]:
    """Final verdicts: rows named in `primary` get Holm-adjusted p (over the primary rows that can be
    tested) and decide with it; the others are exploratory and use their raw p; every row may be
    judged equivalent within its metric's declared margin. A row that cannot reach p < alpha
    (:func:`cannot_reject`) is not testable unless it is equivalent, and is not in the Holm family."""
    margins = margins or {}
    weak = {c.key: cannot_reject(c, alpha) for c in claims}
    family = [c for c in claims if c.key in primary and not c.untestable and not weak[c.key]]
    adjusted = dict(zip((c.key for c in family), holm([c.estimate.p for c in family])))
    out = []
    for c in claims:
        p_holm = adjusted.get(c.key)
        v = verdict(c.estimate, c.direction, alpha, margins.get(c.metric), p_holm, c.untestable)
        untestable = c.untestable
        if weak[c.key] and v != "equivalent":
            v, untestable = "not testable", weak[c.key]
        judged = replace(c, primary=c.key in primary, p_holm=p_holm, verdict=v, untestable=untestable)
        rests = resting_on_one_unit(judged, alpha)
        out.append(replace(judged, note="; ".join(x for x in (c.note, rests) if x)) if rests else judged)
    return out


def resting_on_one_unit(c: Claim, alpha: float) -> str:
    """For a row that replicates or contradicts: which single units, left out one at a time, would lift
    its p (Holm-scaled for a primary row, by the row's own adjustment) to alpha or above ("" when none
    would). A mean of unbounded ratios can rest on one relation, and a p just under alpha on many; the
    verdict stands, the note says how fragile it is."""
    if c.verdict not in ("replicates", "contradicts") or len(c.unit_diffs) < 3 or not c.estimate.p:
        return ""
    scale = (c.p_holm / c.estimate.p) if c.primary and c.p_holm is not None else 1.0
    diffs = np.asarray(c.unit_diffs, dtype=np.float64)
    units = list(c.units or range(len(diffs)))
    lifted = [(min(1.0, p * scale), unit) for k, unit in enumerate(units)
              for p in [sign_flip_p(np.delete(diffs, k))] if p is not None and p * scale >= alpha]
    if not lifted:
        return ""
    p, unit = max(lifted, key=lambda pu: pu[0])
    if len(lifted) == 1:
        return f"rests on one {c.unit}: without {unit}, p = {_p(p)}"
    return (f"fragile: without any one of {len(lifted)} of its {len(units)} {c.unit}s p ≥ {alpha:g} "
            f"(up to {_p(p)}, without {unit})")


def scored_queries(records: Sequence[Mapping[str, Any]], is_evaluation: Callable[[str], bool]
                   ) -> tuple[Callable[[Mapping[str, Any]], bool], bool]:
    """(keep(record), whether that means evaluation queries): the evaluation queries when the records
    have any, else every query (a run without held-out paraphrases says so in its labels)."""
    have_eval = any(is_evaluation(r["query_id"]) for r in records)
    return (lambda r: is_evaluation(r["query_id"])) if have_eval else (lambda r: True), have_eval


def empty_note(empty: Mapping[str, Sequence[str]], method: str, n_facts: int) -> str:
    k = len(empty.get(method, []))
    if not k:
        return ""
    return (f"{method} is empty for {k} of {n_facts} facts (threshold-based, as the paper): there it is scored as "
            "doing nothing")


def empty_counts(empty: Mapping[str, Sequence[str]], *methods: str) -> dict[str, int]:
    """{display name: facts where the method selected nothing} for the methods of one row."""
    return {method_name(m): len(empty.get(m, [])) for m in methods if empty.get(m)}


def layer_claims(sets: Mapping[str, Mapping[str, Sequence[Sequence[int]]]], n_layers: int,
                 relation_of: RelationOf = relation_prefix, top_fraction: float = 1 / 3) -> list[Claim]:
    """Fig. 4: 'the last few layers contain a higher proportion' — share of a fact's LAKNs in the last
    ``top_fraction`` of the layers (rounded to whole layers; declared in params as
    ``verdicts.top_layers``) against the uniform share."""
    if not 0 < top_fraction < 1:
        raise ValueError(f"verdicts.top_layers must be a fraction of the depth in (0, 1), got {top_fraction}")
    top = n_layers - max(1, round(n_layers * top_fraction))
    uniform = (n_layers - top) / n_layers
    shares = {f: float(np.mean([l >= top for l, _ in per["matrice"]])) for f, per in sets.items() if len(per["matrice"])}
    return [make_claim("Fig. 4", "the last few layers hold a higher share of LAKNs",
                   f"share of MATRICE neurons in layers {top}-{n_layers - 1} − uniform ({uniform:.2f})", "greater",
                   "all selected neurons", shares, {f: uniform for f in shares}, key="fig4_top_layer_share",
                   metric="share", relation_of=relation_of)]


def _p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def claims_table(claims: Sequence[Claim]) -> str:
    """Markdown: one row per claim; the verdict's estimate is over its units (relations, each
    relation's facts averaged first; Table V: training runs), the fact-level one beside it; p is the
    sign-flip p over those units, Holm the family-wise adjusted one (primary rows only)."""
    lines = ["| source | the paper's claim | we estimate | on | paper's sign "
             "| unit (relations; Table V: runs): mean [95% CI] (n) | facts: mean [95% CI] (n) | p | Holm p | family "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in claims:
        sign = "> 0" if c.direction == "greater" else "< 0"
        why = "; ".join(x for x in (c.untestable, c.note) if x)
        facts = c.fact_estimate.format() if c.fact_estimate is not None else "–"
        lines.append(f"| {c.source} | {c.claim} | {c.comparison} | {c.queries} | {sign} | {c.estimate.format()} | {facts} "
                     f"| {_p(c.estimate.p)} | {_p(c.p_holm) if c.primary else '–'} | {'primary' if c.primary else 'exploratory'} "
                     f"| **{c.verdict}**{f' ({why})' if why else ''} |")
    return "\n".join(lines) + "\n"


def power_table(claims: Sequence[Claim], alpha: float, facts_per_relation: float) -> str:
    """Per primary row: the standardised effect over relations, the smallest difference this n can
    detect with 80% power, and the relations (facts) the observed effect would need; beside n, how
    many relations differ from 0 (only those can move the sign-flip p)."""
    family = [c for c in claims if c.primary and c.verdict not in ("not testable", "no data")]
    if not family:
        return "No primary row can be tested in this run.\n"
    level = alpha / len(family)  # Holm's first step, the strictest
    rows = [(c, power(c.unit_diffs, level, facts_per_relation)) for c in family]
    floor = rows[0][1].floor
    lines = ["| row | relations | ≠ 0 | effect (mean/sd) | detectable at 80% power | relations needed | facts needed |",
             "|---|---|---|---|---|---|---|"]
    for c, pw in rows:
        fmt = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        nonzero = nonzero_units(c.unit_diffs)
        lines.append(f"| {c.key} | {c.estimate.n} | {nonzero if c.unit_diffs else '–'} | {fmt(pw.effect_size)} "
                     f"| {fmt(pw.minimum_detectable, 3)} | {pw.relations_needed or '–'} | {pw.facts_needed or '–'} |")
    n_rel = max(c.estimate.n for c in family)
    return (f"Two-sided α = {alpha} over {len(family)} primary rows: Holm's first step tests at {level:.4f}. With n "
            f"relations the sign-flip p cannot go below 1/2^(n−1) (nor 1/{SIGN_FLIP_MONTE_CARLO + 1:,} where it is "
            f"estimated from random sign patterns, beyond {SIGN_FLIP_EXACT_UP_TO} relations), and relations whose "
            f"difference is 0 do not count in n, so at least **{floor} relations** that differ are needed "
            f"before any primary row can pass it" + (f" (this run has {n_rel}: no primary row can replicate or "
            "contradict here, whatever the effect)" if n_rel < floor else "") + ". Normal approximation for a paired "
            "mean, 80% power; facts at this run's facts per relation.\n\n" + "\n".join(lines) + "\n")


FLAG_TEXT = {"copyable": "copyable (the object is often a copy of, or inside, the subject: copying can pass for "
                         "knowledge)",
             "many_answers": "many_answers (a subject has other right answers, which score as wrong)"}


def sensitivity_table(claims: Sequence[Claim], flags: Mapping[str, frozenset[str]], alpha: float) -> str:
    """Each testable primary row with relation units again without the relations the dataset flags
    (``flags``: relation -> its flags), tested as the verdicts are (Holm over these rows, a row that
    cannot reach p < alpha not testable): does a verdict rest on relations that measure something
    else than recall?"""
    flagged = {r for r, f in flags.items() if f}
    family = [c for c in claims if c.primary and c.units and c.unit == "relation"
              and c.verdict not in ("not testable", "no data")]
    present = sorted(flagged & {u for c in family for u in c.units})
    if not present:
        return "No relation of this run is flagged copyable or many_answers: nothing to leave out.\n"
    kept = [replace(c, estimate=sign_flip_estimate(diffs), unit_diffs=tuple(diffs), p_holm=None)
            for c in family for diffs in [[d for u, d in zip(c.units, c.unit_diffs) if u not in flagged]]]
    rejudged = judge(kept, primary=[c.key for c in kept], alpha=alpha)
    lines = ["| row | with them | without them | p (raw) | Holm p | verdict without them |", "|---|---|---|---|---|---|"]
    for c, again in zip(family, rejudged):
        why = f" ({again.untestable})" if again.untestable else ""
        lines.append(f"| {c.key} | {c.estimate.format()} | {again.estimate.format()} | {_p(again.estimate.p)} "
                     f"| {_p(again.p_holm)} | {again.verdict}{why} |")
    kinds = sorted({f for r in present for f in flags[r]})
    named = ", ".join(r + " (" + ", ".join(sorted(flags[r])) + ")" for r in present)
    return (f"Left out: {named}; " + "; ".join(FLAG_TEXT[k] for k in kinds if k in FLAG_TEXT) + ". Each primary row's relation "
            "differences without them, tested as the verdicts above are (Holm over these rows; no margins): a check on "
            "the verdict, not a second verdict.\n\n" + "\n".join(lines) + "\n")


def missing_primary(claims: Sequence[Claim], primary: Sequence[str]) -> list[str]:
    """Declared primary rows this run has no data for (a method or experiment left out): the report names them."""
    return sorted(set(primary) - {c.key for c in claims})


def verdict_counts(claims: Sequence[Claim]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for c in claims:
        counts[c.verdict] += 1
    return dict(counts)
