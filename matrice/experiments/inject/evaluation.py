"""Table V's evaluation: the claims judged on the injection result, its interval tables, its output
files and its section of the report (the runs themselves: :mod:`matrice.experiments.inject.training`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from matrice.evaluation.claims import CELL, Claim, RelationOf, make_claim, relation_prefix
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, markdown_table
from matrice.evaluation.stats import RATE, Estimate, by_relation, clustered_difference, per_fact_mean, relation_mean

SPLITS = ("heldout", "transfer", "trained", "old")  # what the tables show (old_select chose the rate)
SWEEP_SPLITS = (*SPLITS, "old_select")

# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

INJECT_NAMES = {"direct_ft": "Direct_FT", "matrice": "MATRICE_FT", "amig": "AMIG_FT", "random": "Random_FT",
                "lora": "LoRA", "matrice_lora": "MATRICE_LoRA (LoRA confined to the neurons)", "base": "unedited"}



def _selected_records(injection: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The records of each variant's selected learning rate (and of the unedited model)."""
    selected = injection.get("selected", {})
    return [r for r in injection.get("records", []) if r["variant"] == "base" or r["lr"] == selected.get(r["variant"])]



def injection_accuracy(records: Sequence[Mapping[str, Any]], variant: str, split: str, lang: str | None = None
                       ) -> dict[str, float]:
    """Per fact: accuracy of `variant` on `split` (optionally one language)."""
    return per_fact_mean(records, lambda r: float(r["correct"]),
                         lambda r: r["variant"] == variant and r["split"] == split and lang in (None, r["lang"]))


def injection_avg(records: Sequence[Mapping[str, Any]], variant: str, relation_of: RelationOf = relation_prefix
                  ) -> dict[str, float]:
    """The paper's Avg per relation: the mean of Q_new accuracy (held-out paraphrases of the injected facts)
    and Q_old accuracy, each first averaged over the relation's facts; relations with both only."""
    new = {r: sum(v) / len(v) for r, v in by_relation(injection_accuracy(records, variant, "heldout"), relation_of).items()}
    old = {r: sum(v) / len(v) for r, v in by_relation(injection_accuracy(records, variant, "old"), relation_of).items()}
    return {r: (new[r] + old[r]) / 2 for r in sorted(set(new) & set(old))}



def _runs(records: Sequence[Mapping[str, Any]]) -> list[int | None]:
    """The training seeds of the records ([None] when none names one: a single run)."""
    return sorted({r["seed"] for r in records if r.get("seed") is not None}) or [None]


def _of_run(records: Sequence[Mapping[str, Any]], seed: int | None) -> list[Mapping[str, Any]]:
    """One seed's records; a record without a seed (a variant that trained nothing) is in every run."""
    return [r for r in records if r.get("seed") in (seed, None)]


def _relations_mean(values: Mapping[str, float], keep: set[str], relation_of: RelationOf) -> float:
    return float(np.mean([np.mean(v) for v in by_relation({k: values[k] for k in keep}, relation_of).values()]))


def per_run_means(records: Sequence[Mapping[str, Any]], me: str, other: str,
                  per_fact: Callable[[Sequence[Mapping[str, Any]], str], Mapping[str, float]],
                  relation_of: RelationOf) -> tuple[dict[str, float], dict[str, float]]:
    """Per training seed: each side's mean over relations of its facts' means (``per_fact(records,
    variant)``), on the facts both sides have in that run. Every fact of a run shares its trained
    model, so the run, not the relation, is what repeats the training procedure."""
    mine, theirs = {}, {}
    for seed in _runs(records):
        run = _of_run(records, seed)
        a, b = per_fact(run, me), per_fact(run, other)
        both = set(a) & set(b)
        if both:
            label = f"seed {seed}"
            mine[label], theirs[label] = _relations_mean(a, both, relation_of), _relations_mean(b, both, relation_of)
    return mine, theirs


def _run_claim(source: str, text: str, comparison: str, where: str, note: str, records: Sequence[Mapping[str, Any]],
               me: str, other: str, per_fact: Callable[[Sequence[Mapping[str, Any]], str], Mapping[str, float]],
               relation_of: RelationOf, key: str, empty: Mapping[str, int], n_facts: int) -> Claim:
    """A Table V row tested over training runs (seeds), relations averaged within each run; the
    fact-level estimate (seeds averaged) beside it and the relation-level one in the note, both
    conditional on these runs."""
    mine, theirs = per_run_means(records, me, other, per_fact, relation_of)
    pooled = clustered_difference(per_fact(records, me), per_fact(records, other), relation_of)
    within = f"over relations within these runs: {pooled.relation.format()}"
    claim = make_claim(source, text, comparison, "greater", f"{where}; unit: training run (seed)", mine, theirs,
                       "; ".join(x for x in (note, within) if x), key=key, metric="accuracy",
                       relation_of=lambda run: run, empty=empty, n_facts=n_facts)
    return replace(claim, fact_estimate=pooled.fact, unit="training run")


def injection_claims(injection: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Table V on held-out data: MATRICE_FT learns the injected fact (held-out paraphrase) better than
    Random_FT / AMIG_FT, carries it to other languages, and forgets less than Direct_FT. Each row is
    tested over the training runs (seeds): every fact of a run shares one trained model, so facts and
    relations do not repeat the procedure whose effect the paper claims."""
    records = _selected_records(injection)
    variants = {r["variant"] for r in records}
    if "matrice" not in variants:
        return []
    out = []
    learns = "learns the new fact (held-out paraphrase, never trained on) better than"
    forgets = "forgets less of what the model knew (Q_old) than"
    rows = [("heldout", learns, "matrice", m) for m in ("random", "amig", "direct_ft")]
    rows += [("transfer", "carries the new fact into the other languages more than", "matrice", m) for m in ("random", "amig")]
    rows += [("old", forgets, "matrice", m) for m in ("direct_ft", "random")]
    rows += [("heldout", learns, "matrice_lora", "lora"), ("old", forgets, "matrice_lora", "lora")]  # MEMLA's question
    untrained = {v for v, lr in injection.get("selected", {}).items()
                 if injection.get("runs", {}).get(v, {}).get(str(lr), {}).get("n_trainable") == 0}
    for split, text, me, other in rows:
        if me in variants and other in variants:
            note = "each variant at its selected learning rate"
            if other in untrained:
                note = (f"{INJECT_NAMES[other]} has no neurons for the injected facts and trained nothing: this row "
                        "compares with the unedited model")
            where = {"heldout": "held-out paraphrases of the injected facts",
                     "transfer": "the injected facts' original queries in the other languages",
                     "old": "Q_old (facts not injected)"}[split]
            accuracy = lambda recs, v, split=split: injection_accuracy(recs, v, split)  # noqa: E731
            facts = set(accuracy(records, me)) | set(accuracy(records, other))
            not_trained = {INJECT_NAMES[v]: len(facts) for v in (me, other) if v in untrained}
            name = INJECT_NAMES[me].split(" (")[0]
            out.append(_run_claim("Table V", f"{name} {text} {INJECT_NAMES[other]}",
                                  f"{split} accuracy {name} − {INJECT_NAMES[other]}", where, note, records, me, other,
                                  accuracy, relation_of,
                                  key=f"table5_{split}_vs_{other}" if me == "matrice" else f"table5_{split}_{me}_vs_{other}",
                                  empty=not_trained, n_facts=len(facts)))
    for other in ("random", "amig", "direct_ft"):
        if other in variants:
            note = ("relations with both injected facts and Q_old facts; "
                    + ("the other side trained nothing" if other in untrained else "each variant at its selected rate"))
            avg = lambda recs, v: injection_avg(recs, v, relation_of)  # noqa: E731
            n_rel = len(set(avg(records, "matrice")) | set(avg(records, other)))
            out.append(_run_claim("Table V", f"MATRICE_FT has a higher Avg (mean of Q_new and Q_old accuracy) than "
                                  f"{INJECT_NAMES[other]}", f"Avg accuracy MATRICE_FT − {INJECT_NAMES[other]}",
                                  "held-out paraphrases of the injected facts and Q_old", note, records, "matrice", other,
                                  avg, lambda r: r, key=f"table5_avg_vs_{other}",
                                  empty={INJECT_NAMES[v]: n_rel for v in ("matrice", other) if v in untrained},
                                  n_facts=n_rel))
    return out



def injection_estimates(injection: Mapping[str, Any], relation_of: RelationOf = relation_prefix
                        ) -> dict[str, dict[str, Estimate]]:
    """{variant: {split, and "avg": Estimate}} at each variant's selected rate, over its seeds: each
    fact's accuracy, then each relation's (Avg: the paper's, per relation), as Table V shows them."""
    records = _selected_records(injection)
    return {v: {**{sp: relation_mean(injection_accuracy(records, v, sp), relation_of, bounds=RATE) for sp in SPLITS},
                "avg": relation_mean(injection_avg(records, v, relation_of), lambda r: r, bounds=RATE)}
            for v in dict.fromkeys(r["variant"] for r in records)}


def injection_interval_table(injection: Mapping[str, Any], languages: Sequence[str],
                             relation_of: RelationOf = relation_prefix) -> str:
    """Each variant at its selected rate: accuracy per split, then transfer per language (`CELL`)."""
    records = _selected_records(injection)
    estimates = injection_estimates(injection, relation_of)
    variants = list(estimates)
    edge = injection.get("at_edge", {})
    lines = ["| variant | lr | seeds | " + " | ".join(SPLITS) + " | Avg |", "|---|---|---|" + "---|" * (len(SPLITS) + 1)]
    for v in variants:
        cells = [estimates[v][sp].format(2) for sp in SPLITS]
        avg = estimates[v]["avg"].format(2)
        lr = injection.get("selected", {}).get(v, "–")
        lr_cell = f"{lr} (grid end)" if edge.get(v) else f"{lr}"
        n_seeds = len({r.get("seed") for r in records if r["variant"] == v and r.get("seed") is not None})
        lines.append(f"| {INJECT_NAMES.get(v, v)} | {lr_cell} | {n_seeds or '–'} | " + " | ".join(cells) + f" | {avg} |")
    return (f"Accuracy at each variant's selected learning rate, over its seeds: {CELL} Avg is the paper's: the mean "
            "of Q_new (held-out) and Q_old accuracy, per relation.\n\n" + "\n".join(lines)
            + "\n\n" + _per_language(records, variants, "heldout", languages, relation_of, "Held-out accuracy per "
                                       "language of the injected fact (each fact is injected in one language):")
            + "\n" + _per_language(records, variants, "transfer", languages, relation_of, "Transfer per language (the "
                                    "injected fact's original query in a language it was not trained in):")
            + "\n" + _per_seed(injection, variants))


def _per_language(records: Sequence[Mapping[str, Any]], variants: Sequence[str], split: str, languages: Sequence[str],
                  relation_of: RelationOf, title: str) -> str:
    rows = ["| variant | " + " | ".join(languages) + " |", "|---|" + "---|" * len(languages)]
    for v in variants:
        cells = [relation_mean(injection_accuracy(records, v, split, lang), relation_of, bounds=RATE).format(2) for lang in languages]
        rows.append(f"| {INJECT_NAMES.get(v, v)} | " + " | ".join(cells) + " |")
    return title + "\n\n" + "\n".join(rows) + "\n"


def _per_seed(injection: Mapping[str, Any], variants: Sequence[str]) -> str:
    """Each seed's accuracy at the selected rate (pooled over queries): the spread the seeds add."""
    rows = []
    for v in variants:
        run = injection.get("runs", {}).get(v, {}).get(str(injection.get("selected", {}).get(v)), {})
        for seed, acc in run.get("seeds", {}).items():
            rows.append([INJECT_NAMES.get(v, v), seed, *(acc.get(sp) for sp in SPLITS)])
    if not rows:
        return ""
    return ("Each training seed at the selected rate (accuracy pooled over the split's queries):\n\n"
            + markdown_table(["variant", "seed", *SPLITS], rows))


# ---- its outputs ----------------------------------------------------------------------------------

def sweep_table(injection: Mapping[str, Any]) -> str:
    """Every (variant, learning rate) of the sweep, the selected one marked."""
    selected, edge = injection["selected"], injection.get("at_edge", {})

    def mark(v: str, run: Mapping[str, Any]) -> str:
        if v == "base" or selected.get(v) != run["lr"]:
            return ""
        return "selected, grid end" if edge.get(v) else "selected"

    rows = [[v, lr, len(run.get("seeds", {})) or "–", run["n_trainable"], run["n_neurons"],
             *(run.get(sp) for sp in SWEEP_SPLITS), mark(v, run)]
            for v, runs in injection["runs"].items() for lr, run in runs.items()]
    return (f"**Table V, the whole sweep** — {len(injection['units'])} facts injected, each in one language where "
            f"the model got its held-out paraphrase wrong; Q_old: {injection['n_old']} queries evaluated and "
            f"{injection.get('n_old_select', 0)} of other facts that choose the rate (old_select). Accuracy after "
            "fine-tuning on: the held-out paraphrases, the fact's original query in the other languages it got "
            "wrong (transfer), the training paraphrases, Q_old. Every rate of a variant's grid is trained with "
            "the first seed; the selected rate (best mean of training and old_select accuracy: no evaluated data "
            "chooses it) with every seed; a grid grows past an end while its best rate is there.\n\n"
            + markdown_table(["variant", "lr", "seeds", "trainable params", "neurons", *SWEEP_SPLITS, ""], rows))


def write_outputs(injection: Mapping[str, Any], out: RunOutputs, relation_of: RelationOf = relation_prefix) -> None:
    """The result, each variant's accuracies at its selected rate as Table V shows them (`dvc
    metrics`: :func:`injection_estimates`) and the sweep's table."""
    out.json("injection.json", injection)
    out.json("injection_metrics.json", {"injection": {
        v: {k: e.mean for k, e in cells.items() if e.mean is not None}
        for v, cells in injection_estimates(injection, relation_of).items()}})
    out.text("injection_tables.md", sweep_table(injection))


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    injection = run.json("injection.json")
    return ("### New-knowledge injection (Table V)\nFine-tuning only the neurons' parameters vs all parameters, random "
            "or AMIG neurons, and LoRA, on localisation paraphrases of facts the model does not know; judged on held-out "
            "paraphrases and the other languages; Q_old accuracy measures forgetting.\n\n"
            + injection_interval_table(injection, run.languages(injection["records"]), relation_of=run.relation_of)
            + "\n" + run.text("injection_tables.md"))
