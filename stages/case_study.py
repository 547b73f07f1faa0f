"""case_study: one fact's predictions in every language before, after enhancement and after an
update edit (Fig. 7)."""

from __future__ import annotations

from matrice.experiments.case_study import case_study, choose_fact, write_outputs
from matrice.experiments.edit import EditConfig
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    section, sets = stage.params["case_study"], stage.sets
    try:
        fact = choose_fact(section["fact"], sorted(sets.facts))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: case_study.fact: {exc}") from exc
    study = case_study(stage.adapter, stage.queries, sets, fact, section["method"], section["factor"],
                       section["new_object"], stage.config(EditConfig, "edit"), stage.params["few_shot"],
                       answer_token=stage.params["answer_token"])
    write_outputs(study, stage.outputs)


if __name__ == "__main__":
    main()
