"""fact_check: AMIG's fact checking with degenerate knowledge neurons against the model's probability
and plain knowledge-neuron activation, on held-out paraphrases (matrice.experiments.fact_check)."""

from __future__ import annotations

from matrice.method.attribution.common import AttributionConfig
from matrice.experiments.fact_check import NEURON_SOURCES, check_facts, detectors, write_outputs
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__, memo_code=[detectors.__name__])
    params, source = stage.params, stage.params["fact_check"]["neuron_source"]
    if source not in NEURON_SOURCES:
        raise SystemExit(f"params.yaml: fact_check.neuron_source must be one of {NEURON_SOURCES}, got {source!r}")
    cfg = stage.config(AttributionConfig, "attribution")
    if not (stage.out / "degenerate.json").exists():
        raise SystemExit(f"{stage.out / 'degenerate.json'} is missing: run the degenerate stage for model {stage.key} "
                         "first (dvc repro)")
    degenerate = stage.outputs.read_json("degenerate.json")["records"]
    adapter = stage.adapter
    # layers a sweep did not move: read back; a change to code the values do not run keeps them
    memo = stage.memo("fact_check_attributions")
    run = check_facts(adapter, stage.queries, stage.sets.facts, degenerate, source, stage.split,
                      cfg, params["seed"], params["few_shot"], params["manipulate"]["batch_size"], memo)
    write_outputs(run.rows, run.neurons, source, params["seed"], stage.outputs)


if __name__ == "__main__":
    main()
