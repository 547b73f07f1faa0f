"""Controls that test what the paper assumes (issue #10): are the neurons language-agnostic, and are
they specific to their fact?

- **Leave-one-language-out** (LOLO): for each language k, the neurons selected from the other
  languages (``select_leave_one_out``) are suppressed on every query of the fact in k, which no
  part of their selection saw; beside them, as many random neurons per layer, and MATRICE's full
  set (which did see k's localisation queries).
- **Specificity**: fact B's queries under suppression of B's own neurons, of the neurons of another
  fact of B's relation, and of the neurons of a fact of another relation. Neurons that store B
  move P(B's answer) more than neurons that store something else.

Both reuse :func:`matrice.experiments.manipulate.manipulate`, so ΔP means exactly what it means
in Fig. 5 (relative change of P(gold first token)); records carry the method names below.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from matrice.data.schema import Query
from matrice.experiments import NeuronSetsLike, dataclass_dict, fact_neurons
from matrice.experiments.manipulate import ManipulationRecord, manipulate
from matrice.models.adapter import Encoded, ModelAdapter

SUPPRESS = {"suppress": 0.0}
LOLO_METHODS = ("lolo", "lolo_random_layer", "matrice")
SPECIFICITY_METHODS = ("own", "same_relation", "other_relation")


@dataclass
class ControlResult:
    """``lolo`` and ``specificity``: one ManipulationRecord per (query, method), suppression only.
    ``donors[fact] = {"same_relation": fact, "other_relation": fact}`` names whose neurons were used."""

    lolo: list[ManipulationRecord] = field(default_factory=list)
    specificity: list[ManipulationRecord] = field(default_factory=list)
    donors: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lolo": [dataclass_dict(r) for r in self.lolo],
                "specificity": [dataclass_dict(r) for r in self.specificity],
                "donors": self.donors}


def leave_one_language_out(
    adapter: ModelAdapter, queries: Sequence[Query], lolo_sets: Mapping[str, Mapping[str, Mapping[str, Any]]],
    full_sets: NeuronSetsLike, few_shot: bool, encoded: Mapping[str, Encoded] | None = None, batch_size: int = 32,
) -> list[ManipulationRecord]:
    """Suppression in each held-out language k of the neurons selected without k (see module doc)."""
    records: list[ManipulationRecord] = []
    for lang in sorted({q.lang for q in queries}):
        held_out = [q for q in queries if q.lang == lang and q.fact_id in lolo_sets]
        if not held_out:
            continue
        sets = {f: {**lolo_sets[f][lang], "matrice": fact_neurons(full_sets, f, "matrice")}
                for f in {q.fact_id for q in held_out}}
        records += manipulate(adapter, held_out, sets, LOLO_METHODS, SUPPRESS, few_shot, encoded, batch_size,
                              progress=False).records
    return records


def choose_donors(fact_relations: Mapping[str, str], seed: int) -> dict[str, dict[str, str | None]]:
    """Per fact: a seeded other fact of its relation and a seeded fact of another relation (None
    where there is none)."""
    by_relation: dict[str, list[str]] = defaultdict(list)
    for f, r in sorted(fact_relations.items()):
        by_relation[r].append(f)
    donors = {}
    for f, r in sorted(fact_relations.items()):
        rng = random.Random(f"{seed}:donor:{f}")
        same = [g for g in by_relation[r] if g != f]
        other = sorted(g for g, rg in fact_relations.items() if rg != r)
        donors[f] = {"same_relation": rng.choice(same) if same else None,
                     "other_relation": rng.choice(other) if other else None}
    return donors


def specificity(
    adapter: ModelAdapter, queries: Sequence[Query], sets: NeuronSetsLike, seed: int, few_shot: bool,
    encoded: Mapping[str, Encoded] | None = None, batch_size: int = 32,
) -> tuple[list[ManipulationRecord], dict[str, dict[str, str | None]]]:
    """Suppress, on fact B's queries, MATRICE's neurons of B, of another fact of B's relation and of
    a fact of another relation. A donor that does not exist is left out (no record)."""
    relations = {q.fact_id: q.relation for q in queries}
    donors = choose_donors(relations, seed)
    records: list[ManipulationRecord] = []
    for method in SPECIFICITY_METHODS:
        chosen = {f: (f if method == "own" else donors[f][method]) for f in relations}
        chosen = {f: d for f, d in chosen.items() if d is not None}
        if not chosen:
            continue
        borrowed = {f: {method: fact_neurons(sets, d, "matrice")} for f, d in chosen.items()}
        records += manipulate(adapter, [q for q in queries if q.fact_id in chosen], borrowed, (method,), SUPPRESS,
                              few_shot, encoded, batch_size, progress=False).records
    return records, donors


def per_language_means(records: Sequence[ManipulationRecord | Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """Mean ΔP per (method, lang) over queries with a defined ΔP (for logs and quick looks)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        d = r if isinstance(r, Mapping) else dataclass_dict(r)
        if d["delta_p"] is not None:
            groups[(d["method"], d["lang"])].append(d["delta_p"])
    return {k: float(np.mean(v)) for k, v in groups.items()}
