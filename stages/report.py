"""report: reports/report.md — every figure and table of the run with a sentence on what it shows."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import yaml

from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table
from stages.common import (DATASET_DIR, REPORTS_DIR, evaluation_rule, load_params, relation_of, results_dir,
                           setup_logging)

REPORT = REPORTS_DIR / "report.md"
VERDICTS = REPORTS_DIR / "verdicts.json"


def _read(path: Path) -> str:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the stage that writes it (dvc repro)")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _json(path: Path) -> dict:
    """Parsed once per run: the verdicts and the detail sections read the same results (treat as read-only)."""
    return json.loads(_read(path))


def _fig(key: str, name: str, caption: str) -> str:
    path = Path("figures") / key / name
    if not (REPORTS_DIR / path).exists():
        raise SystemExit(f"{REPORTS_DIR / path} is missing")
    return f"![{caption}]({path.as_posix()})\n\n*{caption}*\n"


VERDICT_ORDER = ("replicates", "contradicts", "equivalent", "inconclusive", "no data", "not judged")


@lru_cache(maxsize=None)
def _relation_of():
    """fact id -> relation, from the dataset (stages.common.relation_of)."""
    from matrice.data.schema import load_queries

    return relation_of(load_queries(DATASET_DIR / "queries.jsonl"))


def _verdict_params(params: dict) -> tuple[list[str], dict[str, float], float]:
    section = params.get("verdicts") or {}
    return list(section.get("primary") or []), dict(section.get("margins") or {}), float(section.get("alpha", 0.05))


_CLAIMS: dict[str, list] = {}


def _claims(key: str, params: dict) -> list:
    """Every judged claim row of the run (matrice.claims), computed once: the verdict table and the
    sections that quote a row read the same numbers."""
    if key not in _CLAIMS:
        from matrice.experiments.registry import all_claims

        out = results_dir(key)
        primary, margins, alpha = _verdict_params(params)
        _CLAIMS[key] = all_claims(
            sets=_json(out / "neurons.json")["facts"], n_layers=len(_json(out / "layer_distribution.json")),
            manip=_json(out / "manipulation.json"), editing=_json(out / "editing.json"),
            enhancement=_json(out / "enhancement.json"), is_evaluation=_rule(params),
            controls=_json(out / "controls.json"), injection=_json(out / "injection.json"),
            fact_check=_json(out / "fact_check.json"), relation_of=_relation_of(),
            primary=primary, margins=margins, alpha=alpha)
    return _CLAIMS[key]


def _headline(claims: list) -> str:
    """Counts over the rows that can be tested, primary and exploratory apart; the rest named with why."""
    from matrice.claims import verdict_counts

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


def replication_section(key: str, params: dict) -> str:
    """"Does the paper replicate here?": every claim as a paired difference tested over relation
    clusters, with Holm over the declared primary family (matrice.claims)."""
    from matrice.claims import claims_table, missing_primary, power_table

    claims = _claims(key, params)
    primary, margins, alpha = _verdict_params(params)
    sets = _json(results_dir(key) / "neurons.json")["facts"]
    relations = {_relation_of()(f) for f in sets}
    absent = missing_primary(claims, primary)
    margin_text = ", ".join(f"{m} ±{v}" for m, v in margins.items()) or "none declared"
    return (
        f"### `{key}` ({len(sets)} facts in {len(relations)} relations)\n\n{_headline(claims)}\n\n"
        "How a row is decided. Each row is a difference whose sign the paper asserts (MATRICE − X per fact). Facts "
        "of one relation share neurons, so the unit is the **relation**: each relation's facts are averaged, and the "
        "relation means go into an exact paired sign-flip permutation test (every sign pattern; with n relations p "
        "cannot go below 1/2^(n−1)); the 95% interval is that test inverted (the shifts it does not reject), so it "
        "excludes 0 exactly when p < 0.05. The fact-level estimate stands beside it for reference only. F1 (fact "
        "checking) is a ratio of sums: relations' summed counts, swapped between the two detectors in the "
        "permutation test, resampled for the interval. Verdicts: **not testable** when a side selected or trained "
        "nothing for at least half the facts, or both sides take one value in every fact; **replicates** / "
        "**contradicts** when the interval lies on the paper's / the other side and p < α — the Holm-adjusted p for "
        f"the **primary** rows declared in `params.yaml` (`verdicts.primary`, one per paper figure or table), the "
        f"raw p for every other, **exploratory**, row; **equivalent** when the interval lies inside the metric's "
        f"margin declared before the run ({margin_text}); **inconclusive** otherwise. α = {alpha}. Queries are "
        "*evaluation* queries (paraphrases never attributed) where the run has them.\n\n"
        + (f"Declared primary rows this run has no data for: {', '.join(absent)}.\n\n" if absent else "")
        + claims_table(claims)
        + "\n#### Power\n\n" + power_table(claims, alpha, len(sets) / max(1, len(relations)))
        + "\nScale: the paper uses four LLMs of 1.3B-13B parameters and 7,849 facts; a verdict here is about this "
        "run's model and facts only. An inconclusive row says the data cannot tell, not that the effect is absent.\n"
    )


@lru_cache(maxsize=None)
def _evaluation_rule(localisation: int | None):
    return evaluation_rule({"attribute": {"templates_per_language": localisation}})


def _langs_of(records) -> list[str]:
    """The languages present in `records`, in the report's order."""
    from matrice.report import LANG_ORDER

    present = {r["lang"] for r in records}
    return [l for l in LANG_ORDER if l in present]


def _rule(params: dict):
    return _evaluation_rule(params["attribute"]["templates_per_language"])


def _intervals(key: str, name: str, table, *rule, **kwargs) -> str:
    """An experiment's table with intervals: `table(results, [is_evaluation,] languages present, **kwargs)`."""
    results = _json(results_dir(key) / f"{name}.json")
    return table(results, *rule, _langs_of(results["records"]), **kwargs)


def _controls_section(key: str, params: dict) -> str:
    from matrice.claims import CELL
    from matrice.experiments.controls import lolo_interval_table

    controls = _json(results_dir(key) / "controls.json")
    langs = _langs_of(controls["lolo"])
    donors = controls["donors"]
    pairs = ", ".join(f"{f} ← {d['same_relation']} / {d['other_relation']}" for f, d in sorted(donors.items()))
    return (
        "### Controls: leave-one-language-out and specificity\nLeave-one-language-out: for each language, LAKNs are "
        "selected from the other languages (UaL without it, same τ) and suppressed (×0) on the fact's queries in "
        "the held-out one, which no part of their selection saw; the control is as many random neurons per layer. "
        f"ΔP/P per held-out language, {CELL}:\n\n"
        + lolo_interval_table(controls, _rule(params), langs, _relation_of())
        + "\nSpecificity: each fact's evaluation queries under suppression of its own LAKNs, of another attributed "
        f"fact's of the same relation, and of a fact's of another relation (target ← same / other: {pairs}); the "
        "verdict rows above compare them"
        + (". No attributed fact has another attributed fact of its relation, so the same-relation row has no data: "
           "it needs `attribute.facts_per_relation` ≥ 2.\n" if all(d["same_relation"] is None for d in donors.values())
           else ".\n")
    )


def _scaling_text(params: dict) -> str:
    if params["edit"].get("scaling", "raw") == "raw":
        return "raw λ, Eq. 15 as written"
    return "λ relative to each column's norm: each term has norm λ·‖W‖"


def _sweep_section(key: str, params: dict) -> str:
    """The update edit's reliability-vs-locality trade-off over λ (edit_sweep stage)."""
    from matrice.claims import method_name

    sweep = _json(results_dir(key) / "edit_sweep.json")
    empty = {m: len(f) for m, f in sweep["empty_facts"].items() if f}
    return (
        "### Update edit: reliability against locality over λ\nOne λ hides a trade-off: a larger step flips more "
        "edited queries and more unrelated ones. The update edit of every fact, with λ1 = λ2 = λ over "
        f"{sweep['lambdas']} ({_scaling_text(params)}), scored on each language's original query (reliability: o' "
        "top-1) and on the unrelated facts' original queries (locality: top-1 unchanged); each fact pooled over "
        "languages, then mean [95% CI over facts] (n facts). A method that is up and to the right of another "
        "edits better at every cost.\n\n"
        + _fig(key, "edit_sweep.png", f"Update edit, reliability vs locality over λ, {key}")
        + "\n" + _read(results_dir(key) / "edit_sweep_table.md")
        + ("\nNot swept (empty set for the fact): " + ", ".join(f"{method_name(m)} {n} facts" for m, n in empty.items())
           + ".\n" if empty else "")
    )


def _degenerate_answer(summary: dict) -> str:
    """The section's answer in a sentence, read off the summary's estimates."""
    from matrice.stats import Estimate

    lakn, lang = (Estimate(**summary[k]["found"]) for k in ("lakn", "language"))
    verified = [Estimate(**summary[k]["verified"]) for k in ("lakn", "language")]
    found = any(e.mean for e in (lakn, lang))
    if not found:
        return (f"**No degenerate group is found on this model** (LAKNs {lakn.format(2)}, language-specific neurons "
                f"{lang.format(2)} of languages per fact).\n\n")
    held = [v for v in verified if v.n]
    held_text = " and ".join(v.format(2) for v in held)
    return (f"**Degenerate groups are found on this model** in a share {lakn.format(2)} of a fact's languages among its "
            f"LAKNs and {lang.format(2)} among the language-specific neurons; the share of found groups that still "
            f"hold on the held-out paraphrase is {held_text} (LAKN, language-specific groups)"
            + (": none holds on a paraphrase the search never saw, so here degeneracy is a property of the query "
               "searched, not of the fact" if held and all(v.mean == 0 for v in held) else "") + ".\n\n")


def _degenerate_section(key: str) -> str:
    """Degenerate knowledge neurons (issue #9): are there redundant groups among a fact's neurons?"""
    summary = _json(results_dir(key) / "degenerate.json")["summary"]
    return (
        "### Degenerate knowledge neurons (AMIG)\nGroups of a fact's neurons that each alone can be suppressed "
        "(×0 at the answer position) without losing the answer, but not together, searched among its LAKNs in every "
        "language and among each language's own knowledge neurons (pairs exhaustively, larger groups by greedy growth), "
        "on the original query of each language, then re-checked on a held-out paraphrase and, for LAKN groups, on the "
        "other languages.\n\n" + _degenerate_answer(summary) + _read(results_dir(key) / "degenerate_table.md")
    )


def _fact_check_answer(summary: dict, row) -> str:
    """Whether the DKN detector beats P(object): the verdict row's (relations as units), the fact-level
    difference beside it."""
    diff = row.estimate
    answer = {"replicates": "**beats** the probability baseline", "contradicts": "**does worse than** the probability baseline",
              "equivalent": "**is equivalent to** the probability baseline (within the declared margin)"
              }.get(row.verdict, "**cannot be told apart from** the probability baseline on these data")
    return (f"DKN-based fact checking {answer}: F1 difference over relations {diff.format(3)}"
            f"{'' if diff.p is None else f', p = {diff.p:.3f}'} (over facts {row.fact_estimate.format(3)}), on the "
            f"{summary['n_facts_common']} facts whose relation has degenerate neurons in another fact.\n\n")


def _fact_check_section(key: str, params: dict) -> str:
    """Fact checking with degenerate knowledge neurons against the model's probability."""
    data = _json(results_dir(key) / "fact_check.json")
    common = data["summary"]["n_facts_common"]
    row = next(c for c in _claims(key, params) if c.key == "amig_fact_check")
    verdict = ("No fact has degenerate neurons to read under this neuron source, so the DKN detector abstains "
               "everywhere and the data cannot tell whether it beats the probability baseline.\n\n" if common == 0
               else _fact_check_answer(data["summary"], row))
    return (
        "### Fact checking with degenerate knowledge neurons (AMIG)\nAMIG flags a statement as false when the "
        "integrated-gradients attribution of P(object) to the relation's degenerate neurons is low. Here it is "
        "compared with the model's own P(object) and with the plain activation of the relation's LAKNs on the filled "
        "statement, each flagging with a threshold chosen on the other facts.\n\n" + verdict
        + _fig(key, "fact_check.png", f"Fact checking: F1 of flagging false statements per language, {key}")
        + "\n" + _read(results_dir(key) / "fact_check_table.md")
    )


def _consistency_section(key: str) -> str:
    """Query localisation (issue #9): consistency per fact and its link to the experiments."""
    data = _json(results_dir(key) / "consistency.json")
    return (
        "### Query localisation: are facts localised consistently?\nFor each fact, the mean pairwise Jaccard overlap "
        f"of its localisation queries' top-{data['top_k']} neurons (1: every paraphrase and language picks the same "
        "neurons), within and across languages, and the agreement between the top neurons by mean attribution and by "
        "the consistency-aware score mean − std. The Query Localization paper reports that neuron-level edits work "
        "worse on inconsistent facts; the second table tests that here.\n\n"
        + _fig(key, "consistency.png", f"Consistency vs suppression effect, {key}")
        + "\n" + _read(results_dir(key) / "consistency_table.md")
    )


def model_section(key: str, params: dict) -> str:
    from matrice.experiments.inject import injection_interval_table

    out = results_dir(key)
    sel = _json(out / "selection_metrics.json")["selection"]
    sel_rows = [[m, s["n_facts"], s["mean_per_fact"], s["median_per_fact"], s["n_empty"]] for m, s in sel.items()]
    parts = [
        f"## Model `{key}`\n",
        "### Probing\nP(gold first token) and greedy-decoding accuracy per language on every query; these define "
        "Q_old / Q_error / Q_new.\n\n" + _read(out / "probe_table.md"),
        "### Selected neurons\nNeurons per fact for each method (τ = "
        f"{params['tau']}, τ_AMIG = {params['tau_amig']}); an empty set means no neuron passed the threshold.\n\n"
        + markdown_table(["method", "facts", "mean", "median", "empty sets"], sel_rows),
        "### Distribution over layers (Fig. 4)\nWhere the selected neurons sit: share of all selected neurons per layer.\n\n"
        + _fig(key, "fig4_layer_distribution.png", f"Fig. 4 — layer distribution of selected neurons, {key}"),
        "### Manipulation (Fig. 5, Table II)\nRelative change of P(answer) when each fact's neurons are set to 0 "
        "(suppress) or doubled (enhance) at the answer position; random neurons are the control.\n\n"
        + _fig(key, "fig5_manipulation.png", f"Fig. 5 — suppression and enhancement, {key}")
        + "\n" + _read(out / "manipulation_tables.md"),
        _controls_section(key, params),
        "### Cross-lingual editing (Tables III, IV)\nEdits made with the English object only; reliability on the "
        "edited query, generality on its paraphrases, locality on unrelated facts, per language. Erasure zeroes each "
        "neuron's output weight column; update sets it to W − λ1·E(o) + λ2·E(o') with "
        f"λ1 = {params['edit']['lambda1']}, λ2 = {params['edit']['lambda2']} ({_scaling_text(params)}).\n\n"
        + "Reliability is on the edited (attributed) query, generality on its paraphrases, held-out ones included.\n\n"
        + _read(out / "editing_tables.md"),
        _sweep_section(key, params),
        "### Enhancement in low-resource languages (Fig. 6)\nAccuracy gained on queries the model got wrong "
        "(accuracy before is 0 by construction) when the fact's neurons are doubled.\n\n"
        + _fig(key, "fig6_enhancement.png", f"Fig. 6 — enhancement in low-resource languages, {key}")
        + "\n" + _read(out / "enhancement_tables.md"),
        "### New-knowledge injection (Table V)\nFine-tuning only the neurons' parameters vs all parameters, random "
        "or AMIG neurons, and LoRA, on localisation paraphrases of facts the model does not know; judged on held-out "
        "paraphrases and the other languages; Q_old accuracy measures forgetting.\n\n"
        + _intervals(key, "injection", injection_interval_table, relation_of=_relation_of())
        + "\n" + _read(out / "injection_tables.md"),
        "### Case study (Fig. 7)\nOne fact in every language: the prediction before, after enhancement and after an "
        "update edit made in English.\n\n" + _read(out / "case_study.md"),
        _degenerate_section(key),
        _fact_check_section(key, params),
        _consistency_section(key),
    ]
    return "\n".join(parts)


def main() -> None:
    setup_logging()
    params = load_params()
    sections = [
        "# MATRICE report\n",
        "Language-agnostic knowledge neurons found with MATRICE (SAIG attribution + uncertainty across queries and "
        "languages) and the experiments of the paper's section IV, on this run's models and data. Every number "
        "below was computed by `dvc repro` from `params.yaml`; nothing is copied from the paper.\n",
        "## Does the paper replicate here?\n",
        *(replication_section(key, params) for key in params["models"]),
        "## Dataset (Table I)\n" + "".join(
            line for line in _read(DATASET_DIR / "stats.md").splitlines(keepends=True) if not line.startswith("# ")),
        *(model_section(key, params) for key in params["models"]),
        "## Parameters of this run\n```yaml\n" + yaml.safe_dump(params, sort_keys=False, allow_unicode=True) + "```\n",
    ]
    atomic_write_text(REPORT, "\n".join(sections))
    atomic_write_json(VERDICTS, {key: [asdict(c) for c in _claims(key, params)] for key in params["models"]})


if __name__ == "__main__":
    main()
