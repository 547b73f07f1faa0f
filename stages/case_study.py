"""case_study: one fact's predictions in every language before, after enhancement and after an
update edit (Fig. 7)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.case_study import case_study
from matrice.experiments.edit import EditConfig
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table, ordered_langs
from stages.common import (DATASET_DIR, config_from_params, load_neuron_sets, load_params, load_prepared, model_arg,
                           results_dir, setup_logging)


def choose_fact(requested: str | None, attributed: list[str]) -> str:
    """The requested fact, or the first attributed capital (P36) fact, or the first attributed one."""
    if requested is not None:
        if requested not in attributed:
            raise SystemExit(f"params.yaml: case_study.fact={requested!r} has no neuron set; attributed facts: {attributed}")
        return requested
    capitals = [f for f in attributed if f.startswith("P36")]
    return (capitals or attributed)[0]


def _cell(state: dict | None, key: str) -> str:
    if state is None:
        return "–"
    mark = "✓" if state.get(key) else "✗"
    return f"{state['text']!s} {mark}"


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["case_study"]
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    fact = choose_fact(section["fact"], sorted(sets.facts))
    cfg = config_from_params(EditConfig, params, "edit")
    study = case_study(adapter, load_queries(DATASET_DIR / "queries.jsonl"), sets, fact, section["method"],
                       section["factor"], section["new_object"], cfg, params["few_shot"])
    out = results_dir(key)
    atomic_write_json(out / "case_study.json", study.to_dict())
    rows = []
    for lang in ordered_langs(study.languages):
        d = study.languages[lang]
        if "unencodable" in d:
            rows.append([lang, d["query_id"], "unencodable", "", "", ""])
            continue
        rows.append([lang, f"`{d['prompt'] if 'prompt' in d else d['cloze']}`", d["gold"],
                     _cell(d["before"], "correct"), _cell(d["enhanced"], "correct"), _cell(d["updated"], "is_new")])
    text = (f"**Fig. 7** — fact `{fact}` ({study.method}: {study.n_neurons} neurons); update to the object of "
            f"`{study.new_object_from}`. ✓ = gold answer (before/enhanced) or new object (updated)\n\n"
            + markdown_table(["lang", "query", "gold", "before", f"enhanced ×{study.factor:g}", "updated"], rows))
    atomic_write_text(out / "case_study.md", text)


if __name__ == "__main__":
    main()
