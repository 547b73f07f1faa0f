"""Fact checking's decisions and what they show: leave-one-fact-out thresholds, precision/recall/F1
with intervals, the paired differences, the claim, the stage's tables and the report's section."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from matrice.evaluation.claims import Claim, RelationOf, relation_prefix
from matrice.experiments.fact_check.detectors import DETECTORS
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, ordered_langs, plot_fact_check
from matrice.evaluation.stats import (RATE, Estimate, bootstrap_mean, cluster_statistic, flag_counts, paired_ratio_difference, prf,
                           verdict)

log = logging.getLogger(__name__)

NAMES = {"dkn_attribution": "DKN attribution (AMIG)", "kn_activation": "KN activation", "probability": "P(object)",
         "random_attribution": "random neurons' attribution", "dkn_share": "DKN attribution / P(object)"}
# the controls' rows: DKN attribution against random neurons of the same layers, and its share of P against P
CONTROLS = {"random": ("dkn_attribution", "random_attribution"), "share": ("dkn_share", "probability")}


def best_threshold(scores: Sequence[float], is_false: Sequence[bool]) -> float:
    """The threshold θ (flag false when score < θ) that maximises F1 of flagging false statements on
    these statements: midpoints between sorted distinct scores and one beyond each end; ties go to
    the smallest θ (flag the fewest)."""
    s = np.unique(np.asarray(scores, dtype=np.float64))
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]]) if len(s) else np.array([0.0])
    y = np.asarray(is_false, dtype=bool)
    best, best_f1 = float(candidates[0]), -1.0
    for theta in candidates:
        pred = np.asarray(scores) < theta
        f1 = _f1(np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y))
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(theta), f1
    return best


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def leave_one_fact_out(facts: Sequence[str], scores: Sequence[float | None], is_false: Sequence[bool]
                       ) -> list[bool | None]:
    """Each scored statement flagged false (True) or not with the threshold chosen on the other facts'
    scored statements; None where the score is None or no other fact is scored."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    thresholds: dict[str, float | None] = {}
    for fact in {facts[i] for i in scored}:
        train = [i for i in scored if facts[i] != fact]
        thresholds[fact] = best_threshold([scores[i] for i in train], [is_false[i] for i in train]) if train else None
    return [None if s is None or thresholds[f] is None else bool(s < thresholds[f]) for f, s in zip(facts, scores)]


@dataclass(frozen=True)
class DetectionScores:
    precision: Estimate
    recall: Estimate
    f1: Estimate
    n_statements: int


def fact_counts(rows: Sequence[Mapping], detector: str) -> tuple[list[str], np.ndarray]:
    """(facts, [facts, 3] tp/fp/fn of flagging false statements) over `rows` with a decision."""
    return flag_counts(rows, detector, lambda r: r["fact_id"])


def detection_scores(rows: Sequence[Mapping], detector: str, seed: int = 0) -> DetectionScores:
    """Precision, recall, F1 of flagging false statements, each with a 95% interval over facts."""
    _, counts = fact_counts(rows, detector)
    n = sum(r["flagged"][detector] is not None for r in rows)
    return DetectionScores(*(cluster_statistic(counts, lambda c, k=k: prf(c)[..., k], seed=seed) for k in range(3)), n)


def f1_difference(rows: Sequence[Mapping], a: str, b: str, seed: int = 0) -> Estimate:
    """F1(a) − F1(b) on the statements both decide, facts resampled together (paired), with a p-value."""
    both = [r for r in rows if r["flagged"][a] is not None and r["flagged"][b] is not None]
    facts_a, ca = fact_counts(both, a)
    facts_b, cb = fact_counts(both, b)
    assert facts_a == facts_b
    counts = np.concatenate([ca, cb], axis=1)
    return cluster_statistic(counts, lambda c: prf(c[..., :3])[..., 2] - prf(c[..., 3:])[..., 2], seed=seed, with_p=True)


def pair_accuracy(rows: Sequence[Mapping], detector: str) -> Estimate:
    """Threshold-free: per fact, the share of its (language) pairs whose true statement scores above
    the false one (ties count ½), then the mean over facts with a 95% interval."""
    pairs: dict[tuple[str, str], dict[bool, float]] = defaultdict(dict)
    for r in rows:
        if r["scores"][detector] is not None:
            pairs[(r["fact_id"], r["lang"])][r["true"]] = r["scores"][detector]
    per_fact: dict[str, list[float]] = defaultdict(list)
    for (fact, _), s in pairs.items():
        if len(s) == 2:
            per_fact[fact].append(1.0 if s[True] > s[False] else 0.5 if s[True] == s[False] else 0.0)
    return bootstrap_mean([float(np.mean(v)) for v in per_fact.values()], bounds=RATE)


# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

def f1_difference_by_relation(statements: Sequence[Mapping[str, Any]], a: str, b: str, relation_of: RelationOf,
                              seed: int = 0) -> Estimate:
    """F1(a) − F1(b) of flagging false statements on those both decide, relations as the units (their
    facts' counts summed): the verdict's test, a paired permutation over relations."""
    both = [r for r in statements if r["flagged"][a] is not None and r["flagged"][b] is not None]
    units, counts_a = flag_counts(both, a, lambda r: relation_of(r["fact_id"]))
    units_b, counts_b = flag_counts(both, b, lambda r: relation_of(r["fact_id"]))
    assert units == units_b
    return paired_ratio_difference(counts_a, counts_b, lambda c: prf(c)[..., 2], seed=seed)



def fact_check_claims(fact_check: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """AMIG: degenerate knowledge neurons detect false statements better than the model itself — the
    F1 of flagging false statements, DKN attribution − P(object), on the statements both decide. A
    ratio of sums, not a mean of per-fact values: relations are the units of a paired permutation test
    (`f1_difference_by_relation`); the fact-level estimate is the stage's."""
    if not fact_check:
        return []
    fact_level = Estimate(**fact_check["summary"]["difference"]["dkn_attribution"])
    est = f1_difference_by_relation(fact_check.get("statements", []), "dkn_attribution", "probability", relation_of)
    source = fact_check.get("neuron_source", "relation")
    queries = "held-out paraphrases" + ("" if source == "relation" else "; neurons found with the true object")
    claims = [Claim("AMIG (fact checking)", "degenerate knowledge neurons detect false facts better than the model",
                    "F1 (false flagged) DKN attribution − P(object)", "greater", queries, est, verdict(est, "greater"),
                    key="amig_fact_check", metric="f1", fact_estimate=fact_level)]
    texts = {"random": "the DKNs' attribution flags false facts better than random neurons of the same layers",
             "share": "the DKNs add to P(object): their attribution as a share of P flags false facts better than P"}
    for name, (a, b) in CONTROLS.items():
        if name not in fact_check["summary"].get("controls", {}):
            continue  # a result from before the controls
        est = f1_difference_by_relation(fact_check.get("statements", []), a, b, relation_of)
        claims.append(Claim("AMIG (fact checking)", texts[name], f"F1 (false flagged) {NAMES[a]} − {NAMES[b]}", "greater",
                            queries, est, verdict(est, "greater"), key=f"amig_fact_check_control_{name}", metric="f1",
                            fact_estimate=Estimate(**fact_check["summary"]["controls"][name])))
    return claims


# ---- its section of the report ------------------------------------------------------------------

def _answer(summary: Mapping[str, Any], row: Claim) -> str:
    """Whether the DKN detector beats P(object): the verdict row's (relations as units), the fact-level
    difference beside it."""
    diff = row.estimate
    answer = {"replicates": "**beats** the probability baseline", "contradicts": "**does worse than** the probability baseline",
              "equivalent": "**is equivalent to** the probability baseline (within the declared margin)"
              }.get(row.verdict, "**cannot be told apart from** the probability baseline on these data")
    return (f"DKN-based fact checking {answer}: F1 difference over relations {diff.format(3)}"
            f"{'' if diff.p is None else f', p = {diff.p:.3f}'} (over facts {row.fact_estimate.format(3)}), on the "
            f"{summary['n_facts_common']} facts whose relation has degenerate neurons in another fact.\n\n")


def section(run: RunResults) -> str:
    """Fact checking with degenerate knowledge neurons against the model's probability."""
    data = run.json("fact_check.json")
    common = data["summary"]["n_facts_common"]
    verdict = ("No fact has degenerate neurons to read under this neuron source, so the DKN detector abstains "
               "everywhere and the data cannot tell whether it beats the probability baseline.\n\n" if common == 0
               else _answer(data["summary"], run.claim("amig_fact_check")))
    return (
        "### Fact checking with degenerate knowledge neurons (AMIG)\nAMIG flags a statement as false when the "
        "integrated-gradients attribution of P(object) to the relation's degenerate neurons is low. Here it is "
        "compared with the model's own P(object) and with the plain activation of the relation's LAKNs on the filled "
        "statement, each flagging with a threshold chosen on the other facts. Two controls ask what the DKNs add: "
        "as many random neurons of the same layers read from the same attribution maps, and the DKN attribution "
        "divided by P(object) (attributions of P grow with P itself).\n\n" + verdict
        + run.figure_and_table("fact_check.png", f"Fact checking: F1 of flagging false statements per language, {run.key}",
                               "fact_check_table.md")
    )


# ---- the stage's summary and tables ------------------------------------------------------------

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
        "controls": {name: f1_difference(rows, a, b, seed) for name, (a, b) in CONTROLS.items()},
    }


def summary_json(value):
    if isinstance(value, dict):
        return {k: summary_json(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


def metrics(summary: dict) -> dict:
    pooled = summary["common"]["pooled"]
    return {"n_facts_common": summary["n_facts_common"],
            "f1": {d: pooled[d].f1.mean for d in DETECTORS},
            "pair_accuracy": {d: summary["common"]["pair_accuracy"][d].mean for d in DETECTORS},
            "f1_minus_probability": {d: e.mean for d, e in summary["difference"].items()},
            "controls": {name: e.mean for name, e in summary["controls"].items()},
            "probability_all_f1": summary["all"]["probability"].f1.mean}


def _p_text(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def table(summary: dict, source: str) -> str:
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
             for d, e in summary["difference"].items() if d != "dkn_share"]
    diffs += [f"- F1 {NAMES[a]} − {NAMES[b]} (control): {summary['controls'][name].format(3)}, "
              f"p {_p_text(summary['controls'][name].p)}" for name, (a, b) in CONTROLS.items()]
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


def write_outputs(rows: list[dict], neurons: Mapping[str, Any], source: str, seed: int, out: RunOutputs) -> None:
    """The statements with their summary, its metrics, table, `dvc plots` rows and the F1 figure."""
    summary = summarise(rows, seed)
    log.info("fact_check: %d statements, %d facts; F1 %s", len(rows), summary["n_facts"],
             {d: summary["common"]["pooled"][d].f1.format(2) for d in DETECTORS})
    out.json("fact_check.json", {
        "neuron_source": source, "detectors": list(DETECTORS),
        "neurons": {f: {"dkn": sorted(map(list, n.dkn)), "kn": sorted(map(list, n.kn))} for f, n in sorted(neurons.items())},
        "summary": summary_json(summary), "statements": rows})
    out.json("fact_check_metrics.json", {"fact_check": metrics(summary)})
    out.text("fact_check_table.md", table(summary, source))
    per_lang = summary["common"]["per_lang"]
    out.json("fact_check_plot.json", [{"lang": lang, **{d: per_lang[lang][d].f1.mean for d in DETECTORS}}
                                      for lang in summary["langs"]])
    plot_fact_check({NAMES[d]: [per_lang[lang][d].f1 for lang in summary["langs"]] for d in DETECTORS},
                    summary["langs"], out.figure("fact_check.png"),
                    f"{out.model}: flagging false statements (F1, held-out paraphrases, statements every detector scores)")
