"""The experiments of paper section IV on top of the selected neurons (docs/method.md §Experiments).

Every experiment is a pure function: an adapter, the dataset's queries (or pre-encoded ones), the
probe results and the neuron sets in; JSON-ready dataclass records out (``.to_dict()``). Stages do
the file I/O. This module holds what they share: the probe record, neuron-set lookup with clear
errors, query encoding that counts (never hides) what could not be encoded, and seeded RNGs.

- :mod:`.manipulate` — suppress / enhance neuron activations, ΔP (Fig. 5) and the ablation (Table II).
- :mod:`.edit` — cross-lingual erasure and update by output-weight edits (Tables III, IV).
- :mod:`.enhance` — doubling activations on low-resource queries the model gets wrong (Fig. 6).
- :mod:`.inject` — neuron-masked fine-tuning vs direct / random / AMIG / LoRA (Table V).
- :mod:`.case_study` — one fact before/after enhancement and update in every language (Fig. 7).

The submodules are not re-exported here: a stage imports only the experiment it runs, so its
`dvc.yaml` deps can name exactly the files that determine its numbers (checked by a test).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from matrice.data.schema import Query
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.method.selection import NeuronSets

log = logging.getLogger(__name__)

NeuronSetsLike = NeuronSets | Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ProbeRecord:
    """The probe stage's verdict on one query (unedited model): P(gold first token), its rank
    (0 = top-1) and whether greedy decoding reproduces the whole gold answer."""

    query_id: str
    fact_id: str
    relation: str
    lang: str
    prob: float
    rank: int
    correct: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProbeRecord":
        try:
            return cls(
                query_id=str(d["query_id"]), fact_id=str(d["fact_id"]), relation=str(d["relation"]),
                lang=str(d["lang"]), prob=float(d["prob"]), rank=int(d["rank"]), correct=bool(d["correct"]),
            )
        except KeyError as e:
            raise ValueError(f"probe record misses field {e.args[0]!r}: {dict(d)!r}") from e


ProbesLike = Mapping[str, ProbeRecord | Mapping[str, Any]] | Sequence[ProbeRecord | Mapping[str, Any]]


def as_probe_map(probes: ProbesLike) -> dict[str, ProbeRecord]:
    """``{query_id: ProbeRecord}`` from a mapping or a list of records / dicts (duplicates are an error)."""
    items = probes.values() if isinstance(probes, Mapping) else probes
    out: dict[str, ProbeRecord] = {}
    for item in items:
        rec = item if isinstance(item, ProbeRecord) else ProbeRecord.from_dict(item)
        if rec.query_id in out:
            raise ValueError(f"duplicate probe record for query {rec.query_id!r}")
        out[rec.query_id] = rec
    return out


class MissingNeuronSetError(KeyError):
    """A fact (or a method of a fact) has no entry in the neuron sets: selection and experiment disagree."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _facts_of(sets: NeuronSetsLike) -> Mapping[str, Mapping[str, Any]]:
    return sets.facts if isinstance(sets, NeuronSets) else sets


def fact_neurons(sets: NeuronSetsLike, fact_id: str, method: str, adapter: ModelAdapter | None = None) -> np.ndarray:
    """The ``[n, 2]`` int64 (layer, neuron) set of ``method`` for ``fact_id``; checked against the
    model's shape when an adapter is given. A fact missing from the sets is an error, not an empty set."""
    facts = _facts_of(sets)
    if fact_id not in facts:
        raise MissingNeuronSetError(
            f"fact {fact_id!r} has no neuron sets (the neuron sets cover {len(facts)} facts): the queries and the "
            f"selection output come from different runs or datasets"
        )
    per_method = facts[fact_id]
    if method not in per_method:
        raise MissingNeuronSetError(f"fact {fact_id!r} has no neuron set for method {method!r} (has {sorted(per_method)})")
    arr = np.asarray(per_method[method], dtype=np.int64)
    arr = np.zeros((0, 2), dtype=np.int64) if arr.size == 0 else arr.reshape(-1, 2)
    if adapter is not None and len(arr):
        if arr.min() < 0 or arr[:, 0].max() >= adapter.n_layers or arr[:, 1].max() >= adapter.n_neurons:
            raise ValueError(
                f"fact {fact_id!r}/{method}: neurons out of range for a model with {adapter.n_layers} layers × "
                f"{adapter.n_neurons} neurons (max layer {int(arr[:, 0].max())}, max neuron {int(arr[:, 1].max())})"
            )
    return arr


def encode_all(
    adapter: ModelAdapter,
    queries: Iterable[Query],
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
) -> tuple[dict[str, Encoded], dict[str, str]]:
    """Encode queries (pre-encoded ones are reused): ``({query_id: Encoded}, {query_id: why not})``.

    A query the tokenizer cannot encode is returned in the second dict and logged, so the caller
    can count it; it is never dropped silently.
    """
    from matrice.models.encoding import encode_query

    out: dict[str, Encoded] = {}
    failed: dict[str, str] = {}
    for q in queries:
        if encoded is not None and q.query_id in encoded:
            out[q.query_id] = encoded[q.query_id]
            continue
        try:
            out[q.query_id] = encode_query(adapter, q, few_shot)
        except ValueError as e:  # UnencodableAnswerError and mask-count mismatches
            failed[q.query_id] = str(e)
    if failed:
        log.warning("%d queries could not be encoded (first: %s)", len(failed), next(iter(failed.values())))
    return out, failed


def group_by_fact(queries: Iterable[Query]) -> dict[str, list[Query]]:
    """Queries per fact in first-seen fact order, each list sorted by (lang, template_id)."""
    groups: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        groups[q.fact_id].append(q)
    return {fid: sorted(qs, key=lambda q: (q.lang, q.template_id)) for fid, qs in groups.items()}


def original_queries(fact_queries: Iterable[Query]) -> dict[str, Query]:
    """Per language, the fact's original query: the lowest template id present (template 0 unless it
    was dropped, e.g. an [X]-after-[Y] template for a causal model) — the uncertainty module's "first query"."""
    out: dict[str, Query] = {}
    for q in fact_queries:
        if q.lang not in out or q.template_id < out[q.lang].template_id:
            out[q.lang] = q
    return out


@dataclass
class FactRows:
    """Every fact's queries unedited (key ``(fact, None)``) and under each of its scaling sets (key
    ``(fact, name)``), as (query, scaling set) rows for :mod:`matrice.models.scaled_rows`."""

    query_ids: list[str]
    scalings: list[list[tuple[int, int, float]]]
    rows: list[tuple[int, int]]
    keys: list[tuple[str, Any]]

    def per_key(self, values: Sequence[Any]) -> dict[tuple[str, Any], list[Any]]:
        """One value per row (in row order) -> each key's values in its fact's query order."""
        out: dict[tuple[str, Any], list[Any]] = defaultdict(list)
        for (_, k), value in zip(self.rows, values):
            out[self.keys[k]].append(value)
        return out


def fact_rows(by_fact: Mapping[str, Sequence[Query]],
              scalings_of: Callable[[str], Iterable[tuple[Any, Sequence[tuple[int, int, float]]]]]) -> FactRows:
    """``scalings_of(fact)`` yields (name, scaling set) for the fact's edits (empty sets are skipped:
    they change nothing, so callers read the unedited key)."""
    keys: list[tuple[str, Any]] = []
    scalings: list[list[tuple[int, int, float]]] = []
    for fid in by_fact:
        keys.append((fid, None)), scalings.append([])
        for name, scaling in scalings_of(fid):
            if scaling:
                keys.append((fid, name)), scalings.append(list(scaling))
    qids = [q.query_id for fqs in by_fact.values() for q in fqs]
    where = {qid: i for i, qid in enumerate(qids)}
    rows = [(where[q.query_id], k) for k, (fid, _) in enumerate(keys) for q in by_fact[fid]]
    return FactRows(qids, scalings, rows, keys)


def experiment_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator seeded by (seed, keys…) with crc32 for strings: stable across processes, unlike hash()."""
    parts = [int(seed)] + [zlib.crc32(k.encode("utf-8")) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(parts)


def mean_or_none(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def dataclass_dict(obj: Any) -> dict[str, Any]:
    """asdict that turns numpy scalars/arrays into plain Python values (JSON-ready)."""

    def clean(v: Any) -> Any:
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return {f.name: clean(getattr(obj, f.name)) for f in fields(obj)}


__all__ = [
    "ProbeRecord", "as_probe_map", "MissingNeuronSetError", "fact_neurons", "encode_all", "group_by_fact",
    "original_queries", "experiment_rng",
]
