"""The report document: reports/report.md (the verdict table, then every model's sections) and the
verdict rows as JSON, assembled from one model's judged results per section."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import yaml

from matrice.io import atomic_write_json, atomic_write_text
from matrice.evaluation.report import RunResults, markdown_table

VERDICT_ORDER = ("replicates", "contradicts", "equivalent", "inconclusive", "no data", "not judged")


def _verdict_params(params: dict) -> tuple[list[str], dict[str, float], float]:
    section = params.get("verdicts") or {}
    return list(section.get("primary") or []), dict(section.get("margins") or {}), float(section.get("alpha", 0.05))


def judge(run: RunResults) -> RunResults:
    """``run`` with every claim row judged (once: the verdict table and the sections that quote a row
    read the same numbers)."""
    from matrice.experiments.edit_sweep import matched_locality
    from matrice.experiments.registry import all_claims

    primary, margins, alpha = _verdict_params(run.params)
    run.claims = all_claims(
        sets=run.json("neurons.json")["facts"], n_layers=len(run.json("layer_distribution.json")),
        manip=run.json("manipulation.json"), editing=run.json("editing.json"),
        enhancement=run.json("enhancement.json"), is_evaluation=run.is_evaluation,
        controls=run.json("controls.json"), injection=run.json("injection.json"),
        fact_check=run.json("fact_check.json"), relation_of=run.relation_of,
        primary=primary, margins=margins, alpha=alpha,
        top_layers=float((run.params.get("verdicts") or {}).get("top_layers", 1 / 3)),
        edit_sweep=run.json("edit_sweep.json"), matched_locality=matched_locality(run.params))
    return run


def _headline(claims: list) -> str:
    """Counts over the rows that can be tested, primary and exploratory apart; the rest named with why."""
    from matrice.evaluation.claims import verdict_counts

    def counts(rows: list) -> str:
        n = verdict_counts(rows)
        return ", ".join(f"{n[v]} {v}" for v in VERDICT_ORDER if n.get(v)) or "none"

    testable = [c for c in claims if c.verdict not in ("not testable", "no data")]
    untestable = [c for c in claims if c.verdict == "not testable"]
    no_data = [c.key for c in claims if c.verdict == "no data"]
    primary = [c for c in testable if c.primary]
    return (f"Of {len(claims)} rows, **{len(testable)} can be tested**. Primary family ({len(primary)} testable): "
            f"{counts(primary)}. Exploratory ({len(testable) - len(primary)}): {counts([c for c in testable if not c.primary])}. "
            f"**{len(untestable)} not testable**" + (": " + "; ".join(f"{c.key} ({c.untestable})" for c in untestable)
                                                    if untestable else "") + "."
            + (f" No data in this run: {', '.join(no_data)}." if no_data else ""))


def replication_section(run: RunResults) -> str:
    """"Does the paper replicate here?": every claim as a paired difference tested over relation
    clusters, with Holm over the declared primary family (matrice.evaluation.claims)."""
    from matrice.data.sources import relation_flags
    from matrice.evaluation.claims import claims_table, missing_primary, power_table, sensitivity_table

    key, claims = run.key, run.claims
    primary, margins, alpha = _verdict_params(run.params)
    sets = run.json("neurons.json")["facts"]
    relations = {run.relation_of(f) for f in sets}
    absent = missing_primary(claims, primary)
    margin_text = ", ".join(f"{m} ±{v}" for m, v in margins.items()) or "none declared"
    return (
        f"### `{key}` ({len(sets)} facts in {len(relations)} relations)\n\n{_headline(claims)}\n\n"
        "How a row is decided. Each row is a difference whose sign the paper asserts (MATRICE − X per fact). Facts "
        "of one relation share neurons, so the unit is the **relation**: each relation's facts are averaged, and the "
        "relation means go into a paired sign-flip permutation test (every sign pattern up to 20 relations, 99,999 "
        "seeded ones beyond; with n relations p cannot go below 1/2^(n−1)); the 95% interval is that test inverted (the shifts it does not reject), so it "
        "excludes 0 exactly when p < 0.05. The fact-level estimate stands beside it for reference only. Table V's "
        "rows are tested over **training runs** (seeds) instead: every fact of a run shares its trained model, so "
        "each seed's relation means are averaged and the seeds are the units (the relation-level estimate within "
        "these runs is in the row's note). F1 (fact "
        "checking) is a ratio of sums: relations' summed counts, swapped between the two detectors in the "
        "permutation test, resampled for the interval. Verdicts: **not testable** when a side selected or trained "
        "nothing for at least half the facts, both sides take one value in every fact, or no sign pattern of the "
        "row's unit differences gives p < α (a unit whose difference is 0 counts in no pattern, so with k units "
        "≠ 0 p ≥ 2/2^k; such a row is not in the Holm family, and it can still be equivalent); **replicates** / "
        "**contradicts** when the interval lies on the paper's / the other side and p < α — the Holm-adjusted p for "
        f"the **primary** rows declared in `params.yaml` (`verdicts.primary`, one per paper figure or table), the "
        f"raw p for every other, **exploratory**, row; **equivalent** when the interval lies inside the metric's "
        f"margin declared before the run ({margin_text}); **inconclusive** otherwise. α = {alpha}. Queries are "
        "*evaluation* queries (paraphrases never attributed) where the run has them.\n\n"
        + (f"Declared primary rows this run has no data for: {', '.join(absent)}.\n\n" if absent else "")
        + claims_table(claims)
        + "\n#### Power\n\n" + power_table(claims, alpha, len(sets) / max(1, len(relations)))
        + "\n#### Without copyable and many-answer relations\n\n"
        + sensitivity_table(claims, relation_flags(run.params["dataset"]["source"]), alpha)
        + "\nScale: the paper uses four LLMs of 1.3B-13B parameters and 7,849 facts; a verdict here is about this "
        "run's model and facts only. An inconclusive row says the data cannot tell, not that the effect is absent.\n"
    )


def model_section(run: RunResults) -> str:
    """The model's probe and selection, then every experiment's own section (matrice.experiments.registry)."""
    from matrice.experiments.registry import SECTIONS

    key, params = run.key, run.params
    sel = run.json("selection_metrics.json")["selection"]
    sel_rows = [[m, s["n_facts"], s["mean_per_fact"], s["median_per_fact"], s["n_empty"]] for m, s in sel.items()]
    parts = [
        f"## Model `{key}`\n",
        "### Probing\nP(gold first token) and greedy-decoding accuracy per language on every query; these define "
        "Q_old / Q_error / Q_new.\n\n" + run.text("probe_table.md"),
        "### Selected neurons\nNeurons per fact for each method (τ = "
        f"{params['tau']}, τ_AMIG = {params['tau_amig']}); an empty set means no neuron passed the threshold.\n\n"
        + markdown_table(["method", "facts", "mean", "median", "empty sets"], sel_rows),
        "### Distribution over layers (Fig. 4)\nWhere the selected neurons sit: share of all selected neurons per layer.\n\n"
        + run.figure("fig4_layer_distribution.png", f"Fig. 4 — layer distribution of selected neurons, {key}"),
        *(section(run) for section in SECTIONS),
    ]
    return "\n".join(parts)


def answer_policy_note(params: Mapping) -> str:
    """Which part of each answer every number reads (``answer_token``)."""
    if params.get("answer_token", "first") == "all":
        return ("Answers are whole (`answer_token: all`): every answer token is attributed and scored, teacher-forced "
                "on the gold answer, and P(answer) is the product of its tokens' probabilities (the probe and "
                "injection decode the whole answer greedily under either policy).")
    return ("Answers are read at their first token (`answer_token: first`): attribution, ΔP, editing and fact "
            "checking use the first answer token; correctness and injection use the whole answer.")


def write_report(params: dict, runs: Mapping[str, RunResults], dataset_stats: str, report: Path, verdicts: Path) -> None:
    """``runs``: each model's results, judged (:func:`judge`); ``dataset_stats``: the dataset stage's
    Table I in markdown."""
    sections = [
        "# MATRICE report\n",
        "Language-agnostic knowledge neurons found with MATRICE (SAIG attribution + uncertainty across queries and "
        "languages) and the experiments of the paper's section IV, on this run's models and data. Every number "
        "below was computed by `dvc repro` from `params.yaml`; nothing is copied from the paper. "
        + answer_policy_note(params) + "\n",
        "## Does the paper replicate here?\n",
        *(replication_section(run) for run in runs.values()),
        "## Dataset (Table I)\n" + "".join(line for line in dataset_stats.splitlines(keepends=True) if not line.startswith("# ")),
        *(model_section(run) for run in runs.values()),
        "## Parameters of this run\n```yaml\n" + yaml.safe_dump(params, sort_keys=False, allow_unicode=True) + "```\n",
    ]
    atomic_write_text(report, "\n".join(sections))
    atomic_write_json(verdicts, {key: [asdict(c) for c in run.claims] for key, run in runs.items()})
