"""inject: fine-tune on queries the model gets wrong (Q_new) changing only the neurons' parameters,
vs direct fine-tuning, Random/AMIG neurons and LoRA; accuracy on Q_new and Q_old (Table V)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.inject import InjectConfig, inject_knowledge
from matrice.io import atomic_write_json, atomic_write_text
from matrice.report import markdown_table
from stages.common import (
    DATASET_DIR, load_neuron_sets, load_params, load_prepared, load_probes, model_arg, queries_of, results_dir,
    setup_logging,
)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    s = params["inject"]
    cfg = InjectConfig(lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"], seed=params["seed"],
                       lora_r=s["lora_r"], max_new=s["max_new"], max_old=s["max_old"], variant_lr=s.get("variant_lr") or {})
    probes = load_probes(key)
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = queries_of(load_queries(DATASET_DIR / "queries.jsonl"), sets.facts)
    result = inject_knowledge(adapter, queries, probes, sets, s["variants"], cfg, few_shot=params["few_shot"])
    out = results_dir(key)
    atomic_write_json(out / "injection.json", result.to_dict())
    atomic_write_json(out / "injection_metrics.json", {"injection": {
        v: {"q_new": d["overall"]["q_new"], "q_old": d["overall"]["q_old"]} for v, d in result.variants.items()}})
    rows = [[v, d["n_trainable"], d["n_neurons"], d["overall"]["q_new"], d["overall"]["q_old"], d["overall"]["avg"]]
            for v, d in result.variants.items()]
    atomic_write_text(out / "injection_tables.md",
                      f"**Table V** — accuracy after fine-tuning on Q_new ({result.n_new} queries) and on Q_old "
                      f"({result.n_old} queries it answered before)\n\n"
                      + markdown_table(["variant", "trainable params", "neurons", "Q_new", "Q_old", "avg"], rows))


if __name__ == "__main__":
    main()
