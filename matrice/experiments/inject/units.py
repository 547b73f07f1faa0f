"""What the injection experiment injects and what it checks for forgetting: the units (a fact the
model does not know in one language), their neurons, and Q_old with its two halves (one chooses the
learning rate, the other is evaluated). The design is in :mod:`matrice.experiments.inject.training`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, ProbesLike, as_probe_map, experiment_rng, fact_neurons, original_queries
from matrice.finetune import MASKED_LORA_SUFFIX
from matrice.models.adapter import ModelAdapter


@dataclass(frozen=True)
class Unit:
    fact_id: str
    lang: str
    train: list[str]  # query ids (localisation paraphrases)
    heldout: list[str]
    transfer: list[str]


def choose_units(queries: Sequence[Query], probes: ProbesLike, is_evaluation: Callable[[Query], bool],
                 max_units: int | None, seed: int) -> list[Unit]:
    """One (fact, language) per fact whose held-out paraphrases in that language the model gets all
    wrong and that has localisation paraphrases there (seeded language choice), then a seeded sample
    of ``max_units`` facts."""
    pm = as_probe_map(probes)
    by_fact: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        if q.query_id in pm:
            by_fact[q.fact_id].append(q)
    units = []
    for fid in sorted(by_fact):
        fqs = by_fact[fid]
        candidates = []
        for lang in sorted({q.lang for q in fqs}):
            held = [q for q in fqs if q.lang == lang and is_evaluation(q)]
            train = [q for q in fqs if q.lang == lang and not is_evaluation(q)]
            if held and train and not any(pm[q.query_id].correct for q in held):
                candidates.append((lang, train, held))
        if not candidates:
            continue
        lang, train, held = candidates[int(experiment_rng(seed, "unit", fid).integers(len(candidates)))]
        transfer = [q.query_id for l, q in sorted(original_queries(fqs).items())
                    if l != lang and not pm[q.query_id].correct]
        units.append(Unit(fid, lang, [q.query_id for q in train], [q.query_id for q in held], transfer))
    if max_units is not None and len(units) > max_units:
        idx = experiment_rng(seed, "units").choice(len(units), size=max_units, replace=False)
        units = [units[i] for i in sorted(idx)]
    return units


def union_neurons(sets: NeuronSetsLike, fact_ids: Sequence[str], method: str, adapter: ModelAdapter) -> np.ndarray:
    """Sorted distinct (layer, neuron) pairs of ``method`` over ``fact_ids``."""
    pairs = {(int(l), int(i)) for fid in dict.fromkeys(fact_ids) for l, i in fact_neurons(sets, fid, method, adapter)}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def neuron_method(variant: str) -> str:
    """The neuron set a variant trains on: "matrice_lora" (LoRA confined to the neurons) uses "matrice"."""
    return variant.removesuffix(MASKED_LORA_SUFFIX)


def split_q_old(old_q: Sequence[Query], seed: int) -> tuple[list[Query], list[Query]]:
    """(selection, evaluation): Q_old's facts in a seeded order, the first half's queries choose the
    learning rate and the rest are evaluated; no fact is in both."""
    facts = sorted({q.fact_id for q in old_q})
    order = experiment_rng(seed, "q_old_split").permutation(len(facts))
    chooser = {facts[i] for i in order[: len(facts) // 2]}
    return [q for q in old_q if q.fact_id in chooser], [q for q in old_q if q.fact_id not in chooser]


def choose_q_old(queries: Sequence[Query], probes: ProbesLike, unit_facts: set[str], max_old: int | None, seed: int
                 ) -> list[Query]:
    """Q_old: the queries the model answers correctly, of facts not injected (a seeded sample of ``max_old``)."""
    pm = as_probe_map(probes)
    old_q = [q for q in queries if q.query_id in pm and pm[q.query_id].correct and q.fact_id not in unit_facts]
    if max_old is not None and len(old_q) > max_old:
        idx = experiment_rng(seed, "q_old").choice(len(old_q), size=max_old, replace=False)
        old_q = [old_q[i] for i in sorted(idx)]
    return old_q
