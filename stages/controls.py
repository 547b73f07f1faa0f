"""controls: leave-one-language-out (LAKNs selected without a language, suppressed in it) and
fact specificity (a fact's queries under another fact's neurons), AMIG's baseline against the zero
baseline (equal-size sets); suppression ΔP per query."""

from __future__ import annotations

from matrice.experiments.controls import run_controls, write_outputs
from matrice.method.attribution.runner import ZERO_MAPS_DIR, load_attributions
from matrice.method.selection import leave_one_out_from_json
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    path = stage.out / "lolo_neurons.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the select stage for model {stage.key} first (dvc repro)")
    _, zero_maps = load_attributions(stage.out / ZERO_MAPS_DIR)  # AMIG's queries under the zero baseline
    result = run_controls(stage.adapter, stage.attributed_queries, leave_one_out_from_json(path), stage.sets,
                          stage.params["seed"], stage.params["few_shot"], stage.params["manipulate"]["batch_size"],
                          zero_maps, stage.params["layer_norm"], stage.params["answer_token"])
    write_outputs(result, stage.outputs, stage.rule, stage.relations)


if __name__ == "__main__":
    main()
