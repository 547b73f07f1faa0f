"""enhance: double each fact's neurons on the low-resource queries the model gets wrong (Q_error);
accuracy gained per relation and method (Fig. 6)."""

from __future__ import annotations

from matrice.experiments.enhance import enhance_low_resource, write_outputs
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    section = stage.params["enhance"]
    result = enhance_low_resource(stage.adapter, stage.attributed_queries, stage.probes, stage.sets, section["methods"],
                                  section["languages"], section["factor"], few_shot=stage.params["few_shot"],
                                  answer_token=stage.params["answer_token"])
    write_outputs(result.to_dict(), stage.outputs, stage.rule, stage.relations, stage.sets)


if __name__ == "__main__":
    main()
