"""edit_sweep: the update edit over a range of λ, reliability against locality per method (Eq. 15),
with the edit stage's o', locality sample, scaling and neurons."""

from __future__ import annotations

from matrice.experiments.edit import EditConfig
from matrice.experiments.edit.passes import EditedPasses
from matrice.experiments.edit_sweep import sweep_update, write_outputs
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__, memo_code=[EditedPasses.__module__])
    sweep, sets = stage.params["edit_sweep"], stage.sets
    # passes a sweep did not move: read back; a change to code the values do not run keeps them
    memo = stage.memo("edit_sweep_runs")
    try:
        result = sweep_update(stage.adapter, stage.queries, sets, sweep.get("methods") or stage.params["edit"]["methods"],
                              sweep["lambdas"], stage.config(EditConfig, "edit"), few_shot=stage.params["few_shot"],
                              facts=sorted(sets.facts), memo=memo, answer_token=stage.params["answer_token"])
    except ValueError as exc:
        raise SystemExit(f"params.yaml: edit_sweep.lambdas: {exc}") from exc
    write_outputs(result.to_dict(), stage.outputs)


if __name__ == "__main__":
    main()
