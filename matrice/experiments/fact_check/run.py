"""Fact checking's run: every held-out statement scored by each detector, then flagged against a
threshold chosen on the other facts (the package doc states the design)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from matrice.method.attribution.common import AttributionConfig
from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.experiments.fact_check.detectors import (DETECTORS, DetectorNeurons, activation_scores, build_statements,
                                                      degenerate_neurons, detector_neurons, held_out_queries,
                                                      neuron_attribution_scores, probability_scores, share_scores,
                                                      with_random_controls)
from matrice.experiments.fact_check.evaluation import leave_one_fact_out
from matrice.memo import Memo
from matrice.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


@dataclass
class FactCheckRun:
    """Every statement (its fields, each detector's score and flag) and the neurons each fact's detectors read."""

    rows: list[dict]
    neurons: dict[str, DetectorNeurons]


def check_facts(adapter: ModelAdapter, queries: Sequence[Query], lakn_sets: Mapping[str, Mapping[str, Any]],
                degenerate_records: Sequence[Mapping], source: str, split: HeldOutSplit, cfg: AttributionConfig,
                seed: int, few_shot: bool, batch_size: int, memo: Memo | None = None) -> FactCheckRun:
    """A true and a false statement per attributed fact and language on a held-out paraphrase, each
    scored by every detector, then flagged leave-one-fact-out. ``cfg.answer_token``: the object's
    first token or the whole object, in the attribution and the probability alike."""
    checked = held_out_queries(queries, set(lakn_sets), split)
    statements = build_statements(adapter, checked, queries, seed, few_shot, whole=cfg.answer_token == "all")
    neurons = with_random_controls(detector_neurons(
        {q.fact_id: q.relation for q in checked}, degenerate_neurons(degenerate_records),
        {f: frozenset(map(tuple, per["matrice"].tolist())) for f, per in lakn_sets.items()}, source),
        adapter.n_neurons, seed)
    by_fact = defaultdict(list)
    for stmt, enc in statements:
        by_fact[stmt.fact_id].append((stmt, enc))
    rows = []
    for fact in tqdm(sorted(by_fact), desc="fact_check", unit="fact"):
        stmts, encs = zip(*by_fact[fact])
        scores = neuron_attribution_scores(adapter, encs, {"dkn_attribution": neurons[fact].dkn,
                                                           "random_attribution": neurons[fact].random}, cfg, memo)
        scores["kn_activation"] = activation_scores(adapter, encs, neurons[fact].kn)
        scores["probability"], token_mean = probability_scores(adapter, encs, batch_size, cfg.answer_token)
        scores["dkn_share"] = share_scores(scores["dkn_attribution"], token_mean)  # attribution's own scale
        rows += [{**asdict(s), "scores": {d: scores[d][i] for d in DETECTORS}} for i, s in enumerate(stmts)]
    for detector in DETECTORS:
        flags = leave_one_fact_out([r["fact_id"] for r in rows], [r["scores"][detector] for r in rows],
                                   [not r["true"] for r in rows])
        for r, flag in zip(rows, flags):
            r.setdefault("flagged", {})[detector] = flag
    return FactCheckRun(rows, neurons)
