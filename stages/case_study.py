"""case_study: one fact's predictions in every language before, after enhancement and after an
update edit (Fig. 7)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.case_study import case_study, case_study_table, choose_fact
from matrice.experiments.edit import EditConfig
from matrice.io import atomic_write_json, atomic_write_text
from stages.common import (DATASET_DIR, config_from_params, load_neuron_sets, load_params, load_prepared, model_arg,
                           results_dir, setup_logging)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    section = params["case_study"]
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    try:
        fact = choose_fact(section["fact"], sorted(sets.facts))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: case_study.fact: {exc}") from exc
    cfg = config_from_params(EditConfig, params, "edit")
    study = case_study(adapter, load_queries(DATASET_DIR / "queries.jsonl"), sets, fact, section["method"],
                       section["factor"], section["new_object"], cfg, params["few_shot"])
    out = results_dir(key)
    atomic_write_json(out / "case_study.json", study.to_dict())
    atomic_write_text(out / "case_study.md", case_study_table(study, fact))


if __name__ == "__main__":
    main()
