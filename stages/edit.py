"""edit: cross-lingual erasure and update through the neurons' FFN output weights, edited in
English and evaluated in every language (Tables III, IV)."""

from __future__ import annotations

from matrice.experiments.edit import EditConfig, edit_facts, write_outputs
from matrice.experiments.edit.passes import EditedPasses
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__, memo_code=[EditedPasses.__module__])
    sets = stage.sets
    # passes a sweep did not move: read back; a change to code the values do not run keeps them
    memo = stage.memo("edit_runs")
    # locality samples unrelated facts from every query of the dataset
    result = edit_facts(stage.adapter, stage.queries, sets, stage.params["edit"]["methods"],
                        cfg=stage.config(EditConfig, "edit"), few_shot=stage.params["few_shot"], facts=sorted(sets.facts),
                        is_evaluation=stage.rule, memo=memo, answer_token=stage.params["answer_token"])
    write_outputs(result.to_dict(), stage.outputs, stage.relations)


if __name__ == "__main__":
    main()
