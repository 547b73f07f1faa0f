"""inject: fine-tune on localisation paraphrases of facts the model does not know, changing only the
neurons' parameters, vs direct fine-tuning, Random/AMIG neurons and LoRA, each over a learning-rate
sweep; accuracy on held-out paraphrases, in the other languages, on the training queries and on Q_old
(Table V)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.experiments.inject import InjectConfig, inject_knowledge
from matrice.io import atomic_write_json, atomic_write_text
from matrice.memo import Memo
from matrice.report import markdown_table
from stages.common import (DATASET_DIR, config_from_params, evaluation_rule, load_neuron_sets, load_params,
                           load_prepared, load_probes, model_arg, results_dir, setup_logging)


def main() -> None:
    setup_logging()
    key = model_arg(__doc__)
    params = load_params()
    s = params["inject"]
    cfg = config_from_params(InjectConfig, params, "inject")
    probes = load_probes(key)
    adapter = load_prepared(key, params)
    sets = load_neuron_sets(key)
    queries = load_queries(DATASET_DIR / "queries.jsonl")  # units: attributed facts; Q_old: any other fact
    rule = evaluation_rule(params)
    out = results_dir(key)
    memo = Memo.for_model(out / "inject_runs", adapter.model)  # runs a sweep did not change are read back
    result = inject_knowledge(adapter, queries, probes, sets, s["variants"], cfg, lambda q: rule(q.query_id),
                              few_shot=params["few_shot"], memo=memo)
    atomic_write_json(out / "injection.json", result.to_dict())
    splits = ("heldout", "transfer", "trained", "old")
    atomic_write_json(out / "injection_metrics.json", {"injection": {
        v: {sp: result.runs[v][str(lr)][sp] for sp in splits} for v, lr in result.selected.items()}})
    rows = [[v, lr, run["n_trainable"], run["n_neurons"], *(run[sp] for sp in splits),
             "selected" if v != "base" and result.selected.get(v) == run["lr"] else ""]
            for v, runs in result.runs.items() for lr, run in runs.items()]
    atomic_write_text(out / "injection_tables.md",
                      f"**Table V, the whole sweep** — {len(result.units)} facts injected, each in one language where "
                      f"the model got its held-out paraphrase wrong; {result.n_old} Q_old queries. Accuracy after "
                      "fine-tuning on: the held-out paraphrases, the fact's original query in the other languages it got "
                      "wrong (transfer), the training paraphrases, Q_old. A variant's selected rate is the one with the "
                      "best mean of training and Q_old accuracy (no held-out data used to choose).\n\n"
                      + markdown_table(["variant", "lr", "trainable params", "neurons", *splits, ""], rows))


if __name__ == "__main__":
    main()
