"""Benchmark: a fact's editing passes with the LM head once over every pass's rows against the head
once per batch (what `score_answers` does), or with several edits' passes in one forward (per-row
weight edits, `--edits-per-pass N`) against one pass per edit; in one run, alternating.

    python benchmarks/edit_passes.py --project /path/to/a/finished/run --facts 2 --rounds 2
    python benchmarks/edit_passes.py --project /path/to/a/finished/run --edits-per-pass 6

The project is a finished pipeline copy (`benchmarks/pipeline.py --keep DIR`): its dataset, neuron
sets and prepared model. The work is the λ sweep's (`matrice.experiments.edit_sweep`): per fact, the
unedited pass and one pass per (method, λ), no memo. Both ways run the same forwards through the
body (the unedited blocks below each edit replayed); they differ only in how the LM head is called.
Reports seconds per way and fact, the ratio, and whether the two ways give the same sweep records
(every count exactly; exit status 1 if not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_head_per_batch(self, scored, edits):
    """EditedPasses.run with each pass scored by `score_answers` (the head after every batch)."""
    from matrice.experiments.edit.passes import edited_output_weights, recorded_blocks, replayed_below
    from matrice.models.predict import score_answers

    with recorded_blocks(self.adapter) as unedited_blocks:
        before = score_answers(self.adapter, scored, batch_size=self.batch_size)
    after = {}
    for name, edit in edits.items():
        with edited_output_weights(self.adapter, edit.vectors()), \
                replayed_below(self.adapter, unedited_blocks, int(edit.pairs[:, 0].min())):
            after[name] = score_answers(self.adapter, scored, batch_size=self.batch_size)
    return before, after


def _in(context, run):
    with context:
        return run()


@contextmanager
def head_per_batch() -> Iterator[None]:
    from matrice.experiments.edit.passes import EditedPasses

    own = EditedPasses.run
    EditedPasses.run = run_head_per_batch
    try:
        yield
    finally:
        EditedPasses.run = own


def sweep(project: Path, n_facts: int):
    """The λ sweep of the project's first ``n_facts`` attributed facts, as a callable of the edits per
    forward (default 1), and those facts; read with the stages' own loaders from inside the project."""
    import os

    from matrice.data.schema import load_queries
    from matrice.experiments.edit import EditConfig
    from matrice.experiments.edit_sweep import sweep_update
    from stages.common import DATASET_DIR, load_neuron_sets, load_params, load_prepared

    os.chdir(project)
    params = load_params()
    key = next(iter(params["models"]))
    adapter = load_prepared(key, params)
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    sets = load_neuron_sets(key)
    cfg = EditConfig.from_params(params)
    methods = params["edit_sweep"].get("methods") or params["edit"]["methods"]
    facts = sorted(sets.facts)[:n_facts]

    def run(edits_per_pass: int = 1):
        return sweep_update(adapter, queries, sets, methods, params["edit_sweep"]["lambdas"],
                            dataclasses.replace(cfg, edits_per_pass=edits_per_pass),
                            few_shot=params["few_shot"], facts=facts, progress=False)
    return run, facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--facts", type=int, default=2, help="the first N attributed facts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--edits-per-pass", type=int, default=None, metavar="N",
                        help="compare N edits per forward (per-row weight edits) with one (weights edited)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    out = args.out.resolve() if args.out else None  # before the sweep moves into the project
    project = args.project.resolve()
    base, facts = sweep(project, args.facts)
    if args.edits_per_pass is None:  # (new way, old way): callables that run the sweep
        ways = {"head once per fact": base, "head per batch": lambda: _in(head_per_batch(), base)}
    else:
        ways = {f"{args.edits_per_pass} edits per pass": lambda: base(args.edits_per_pass), "1 edit per pass": base}
    for run in ways.values():
        run()  # warm-up: first-call allocations and kernel choices
    times: dict[str, list[float]] = {way: [] for way in ways}
    records = {}
    for _ in range(args.rounds):
        for way, run in ways.items():
            start = time.perf_counter()
            records[way] = run().records
            times[way].append(time.perf_counter() - start)
    new, old = ways
    same = records[new] == records[old]
    best = {way: min(t) for way, t in times.items()}
    report = {"facts": facts, "threads": torch.get_num_threads(), "seconds": times,
              "best_seconds_per_fact": {w: t / len(facts) for w, t in best.items()},
              "speedup": best[old] / best[new], "same_records": same}
    print(json.dumps(report, indent=1))
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
