"""manipulate: suppress (×0) / enhance (×2) each fact's neurons; ΔP per language and method (Fig. 5)
and the ablation table (Table II)."""

from __future__ import annotations

from matrice.experiments.manipulate import manipulate, write_outputs
from matrice.method.selection import METHODS
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    result = manipulate(stage.adapter, stage.attributed_queries, stage.sets, METHODS, few_shot=stage.params["few_shot"],
                        batch_size=stage.params["manipulate"]["batch_size"], answer_token=stage.params["answer_token"])
    write_outputs(result.to_dict(), stage.outputs, stage.rule, stage.relations, stage.sets)


if __name__ == "__main__":
    main()
