"""Table V's evaluation: the claims judged on the injection result, its interval tables, its output
files and its section of the report (the runs themselves: :mod:`matrice.experiments.inject.training`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from matrice.evaluation.claims import CELL, Claim, RelationOf, make_claim, relation_prefix
from matrice.io import RunOutputs
from matrice.evaluation.report import RunResults, markdown_table
from matrice.evaluation.stats import per_fact_mean, relation_mean

SPLITS = ("heldout", "transfer", "trained", "old")

# ---- claims: the paper's statements about this experiment, tested (matrice.evaluation.claims) ----------------

INJECT_NAMES = {"direct_ft": "Direct_FT", "matrice": "MATRICE_FT", "amig": "AMIG_FT", "random": "Random_FT",
                "lora": "LoRA", "base": "unedited"}



def _selected_records(injection: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The records of each variant's selected learning rate (and of the unedited model)."""
    selected = injection.get("selected", {})
    return [r for r in injection.get("records", []) if r["variant"] == "base" or r["lr"] == selected.get(r["variant"])]



def injection_accuracy(records: Sequence[Mapping[str, Any]], variant: str, split: str, lang: str | None = None
                       ) -> dict[str, float]:
    """Per fact: accuracy of `variant` on `split` (optionally one language)."""
    return per_fact_mean(records, lambda r: float(r["correct"]),
                         lambda r: r["variant"] == variant and r["split"] == split and lang in (None, r["lang"]))



def injection_claims(injection: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """Table V on held-out data: MATRICE_FT learns the injected fact (held-out paraphrase) better than
    Random_FT / AMIG_FT, carries it to other languages, and forgets less than Direct_FT."""
    records = _selected_records(injection)
    variants = {r["variant"] for r in records}
    if "matrice" not in variants:
        return []
    out = []
    rows = [("heldout", "learns the new fact (held-out paraphrase, never trained on) better than", m)
            for m in ("random", "amig", "direct_ft")]
    rows += [("transfer", "carries the new fact into the other languages more than", m) for m in ("random", "amig")]
    rows += [("old", "forgets less of what the model knew (Q_old) than", m) for m in ("direct_ft", "random")]
    untrained = {v for v, lr in injection.get("selected", {}).items()
                 if injection.get("runs", {}).get(v, {}).get(str(lr), {}).get("n_trainable") == 0}
    for split, text, other in rows:
        if other in variants:
            note = "each variant at its selected learning rate"
            if other in untrained:
                note = (f"{INJECT_NAMES[other]} has no neurons for the injected facts and trained nothing: this row "
                        "compares with the unedited model")
            where = {"heldout": "held-out paraphrases of the injected facts",
                     "transfer": "the injected facts' original queries in the other languages",
                     "old": "Q_old (facts not injected)"}[split]
            mine, theirs = injection_accuracy(records, "matrice", split), injection_accuracy(records, other, split)
            facts = set(mine) | set(theirs)
            not_trained = {INJECT_NAMES[v]: len(facts) for v in ("matrice", other) if v in untrained}
            out.append(make_claim("Table V", f"MATRICE_FT {text} {INJECT_NAMES[other]}",
                              f"{split} accuracy MATRICE_FT − {INJECT_NAMES[other]}", "greater", where, mine, theirs, note,
                              key=f"table5_{split}_vs_{other}", metric="accuracy", relation_of=relation_of,
                              empty=not_trained, n_facts=len(facts)))
    return out



def injection_interval_table(injection: Mapping[str, Any], languages: Sequence[str],
                             relation_of: RelationOf = relation_prefix) -> str:
    """Each variant at its selected rate: accuracy per split, then transfer per language (`CELL`)."""
    records = _selected_records(injection)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    splits = SPLITS
    lines = ["| variant | lr | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for v in variants:
        cells = [relation_mean(injection_accuracy(records, v, sp), relation_of).format(2) for sp in splits]
        lines.append(f"| {INJECT_NAMES.get(v, v)} | {injection.get('selected', {}).get(v, '–')} | " + " | ".join(cells) + " |")
    per_lang = ["| variant | " + " | ".join(languages) + " |", "|---|" + "---|" * len(languages)]
    for v in variants:
        cells = [relation_mean(injection_accuracy(records, v, "transfer", lang), relation_of).format(2)
                 for lang in languages]
        per_lang.append(f"| {INJECT_NAMES.get(v, v)} | " + " | ".join(cells) + " |")
    return (f"Accuracy at each variant's selected learning rate: {CELL}\n\n"
            + "\n".join(lines) + "\n\nTransfer per language (the injected fact's original query in a language it "
            "was not trained in):\n\n" + "\n".join(per_lang) + "\n")


# ---- its outputs ----------------------------------------------------------------------------------

def sweep_table(injection: Mapping[str, Any]) -> str:
    """Every (variant, learning rate) of the sweep, the selected one marked."""
    selected = injection["selected"]
    rows = [[v, lr, run["n_trainable"], run["n_neurons"], *(run[sp] for sp in SPLITS),
             "selected" if v != "base" and selected.get(v) == run["lr"] else ""]
            for v, runs in injection["runs"].items() for lr, run in runs.items()]
    return (f"**Table V, the whole sweep** — {len(injection['units'])} facts injected, each in one language where "
            f"the model got its held-out paraphrase wrong; {injection['n_old']} Q_old queries. Accuracy after "
            "fine-tuning on: the held-out paraphrases, the fact's original query in the other languages it got "
            "wrong (transfer), the training paraphrases, Q_old. A variant's selected rate is the one with the "
            "best mean of training and Q_old accuracy (no held-out data used to choose).\n\n"
            + markdown_table(["variant", "lr", "trainable params", "neurons", *SPLITS, ""], rows))


def write_outputs(injection: Mapping[str, Any], out: RunOutputs) -> None:
    """The result, each variant's accuracies at its selected rate (`dvc metrics`) and the sweep's table."""
    out.json("injection.json", injection)
    out.json("injection_metrics.json", {"injection": {
        v: {sp: injection["runs"][v][str(lr)][sp] for sp in SPLITS} for v, lr in injection["selected"].items()}})
    out.text("injection_tables.md", sweep_table(injection))


# ---- its section of the report ------------------------------------------------------------------

def section(run: RunResults) -> str:
    injection = run.json("injection.json")
    return ("### New-knowledge injection (Table V)\nFine-tuning only the neurons' parameters vs all parameters, random "
            "or AMIG neurons, and LoRA, on localisation paraphrases of facts the model does not know; judged on held-out "
            "paraphrases and the other languages; Q_old accuracy measures forgetting.\n\n"
            + injection_interval_table(injection, run.languages(injection["records"]), relation_of=run.relation_of)
            + "\n" + run.text("injection_tables.md"))
