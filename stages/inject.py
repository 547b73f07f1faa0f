"""inject: fine-tune on localisation paraphrases of facts the model does not know, changing only the
neurons' parameters, vs direct fine-tuning, Random/AMIG neurons and LoRA, each over a learning-rate
sweep; accuracy on held-out paraphrases, in the other languages, on the training queries and on Q_old
(Table V)."""

from __future__ import annotations

from matrice.experiments.inject import InjectConfig, inject_knowledge, training, write_outputs
from stages.common import ModelStage, keep_freed_memory


def main() -> None:
    keep_freed_memory()  # training allocates gigabytes per step (benchmarks/README.md)
    stage = ModelStage.start(__doc__, memo_code=[training.__name__])
    cfg = stage.config(InjectConfig, "inject")
    probes, adapter, rule = stage.probes, stage.adapter, stage.rule
    # runs a sweep did not change are read back; a change to code the values do not run keeps them
    memo = stage.memo("inject_runs")
    # units: attributed facts; Q_old: any other fact
    result = inject_knowledge(adapter, stage.queries, probes, stage.sets, stage.params["inject"]["variants"], cfg,
                              lambda q: rule(q.query_id), few_shot=stage.params["few_shot"], memo=memo)
    write_outputs(result.to_dict(), stage.outputs, stage.relations)


if __name__ == "__main__":
    main()
