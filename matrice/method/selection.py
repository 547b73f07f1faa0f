"""Knowledge-neuron selection (paper Eq. 12-13) for MATRICE and its baselines/ablations.

A neuron set is an int64 array ``[n, 2]`` of (layer, neuron) pairs. All methods reuse the score
maps of :class:`matrice.method.uncertainty.FactScores`, so they cost nothing beyond the attributions.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from matrice.io import atomic_write_text
from matrice.method.uncertainty import FactScores

METHODS: tuple[str, ...] = (
    "matrice", "amig", "random", "wo_uaq", "wo_ual",  # the paper's threshold-based sets
    "amig_k", "wo_uaq_k", "wo_ual_k", "random_layer",  # size-matched (k = MATRICE's count) and layer-matched
)
SIZE_MATCHED: dict[str, str] = {"amig_k": "amig", "wo_uaq_k": "wo_uaq", "wo_ual_k": "wo_ual"}


def _empty() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def _check_tau(name: str, tau: object) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1], got {tau!r}")
    if not (0.0 < float(tau) <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {tau!r}")


def _as_pairs(a: Any, what: str = "neuron set") -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0:
        return _empty()
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must have shape [n, 2], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{what} must hold integer (layer, neuron) pairs")
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"{what} has negative indices")
    return arr


def _sort_pairs(pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return _empty()
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order]


def select_by_threshold(scores: np.ndarray, tau: float) -> np.ndarray:
    """Neurons with score > τ·max(scores) (Eq. 12-13, strict), as ``[n, 2]`` (layer, neuron).

    Sorted by score descending, ties by (layer, neuron), so output is deterministic. The threshold
    is relative to the fact's own maximum (the paper's dynamic threshold). If max ≤ 0 the result is
    empty: τ·max would then be ≤ 0 and a relative threshold no longer means "close to the best
    neuron" (with max < 0, τ·max > max and the set is empty anyway; with max == 0 nothing scores
    above zero).
    """
    _check_tau("tau", tau)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [L, N], got {scores.shape}")
    if scores.size == 0:
        return _empty()
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    top = float(scores.max())
    if top <= 0:
        return _empty()
    layers, neurons = np.nonzero(scores > tau * top)
    vals = scores[layers, neurons]
    order = np.lexsort((neurons, layers, -vals))
    return np.stack([layers[order], neurons[order]], axis=1).astype(np.int64)


def intersect(sets: Sequence[np.ndarray]) -> np.ndarray:
    """(layer, neuron) pairs present in every set, sorted by (layer, neuron).

    At least one set is required: the intersection of no sets would be every neuron.
    """
    if len(sets) == 0:
        raise ValueError("intersect needs at least one set")
    common: set[tuple[int, int]] | None = None
    for s in sets:
        pairs = {(int(l), int(n)) for l, n in _as_pairs(s)}
        common = pairs if common is None else common & pairs
        if not common:
            return _empty()
    assert common is not None
    return np.array(sorted(common), dtype=np.int64).reshape(-1, 2)


def random_neurons(count: int, n_layers: int, n_neurons: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct neurons drawn uniformly from all n_layers × n_neurons, sorted by (layer, neuron)."""
    total = n_layers * n_neurons
    if n_layers < 0 or n_neurons < 0:
        raise ValueError(f"n_layers and n_neurons must be >= 0, got {n_layers}, {n_neurons}")
    if count < 0 or count > total:
        raise ValueError(f"count must be in [0, {total}], got {count}")
    if count == 0:
        return _empty()
    flat = rng.choice(total, size=count, replace=False)
    layers, neurons = np.divmod(flat.astype(np.int64), n_neurons)
    return _sort_pairs(np.stack([layers, neurons], axis=1))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest positive scores as ``[n, 2]`` (layer, neuron), n = min(k, #positive), sorted by
    score descending, ties by (layer, neuron). A neuron with score ≤ 0 passes no threshold τ > 0."""
    scores = np.asarray(scores, dtype=np.float64)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    layers, neurons = np.nonzero(scores > 0)
    vals = scores[layers, neurons]
    order = np.lexsort((neurons, layers, -vals))[:k]
    return np.stack([layers[order], neurons[order]], axis=1).astype(np.int64).reshape(-1, 2)


def intersection_score(maps: np.ndarray) -> np.ndarray:
    """min over languages of map / max(map): a neuron passes every language's threshold τ·max iff its
    score exceeds τ, so the top-k of this score is the intersection grown (or shrunk) to k neurons.
    A language whose maximum is ≤ 0 admits no neuron: every score is −inf."""
    maps = np.asarray(maps, dtype=np.float64)
    tops = maps.reshape(len(maps), -1).max(axis=1)
    if len(maps) == 0 or np.any(tops <= 0):
        return np.full(maps.shape[1:], -np.inf)
    return (maps / tops[:, None, None]).min(axis=0)


def layer_matched_random(reference: np.ndarray, n_neurons: int, rng: np.random.Generator) -> np.ndarray:
    """As many random neurons in each layer as `reference` has there (uniform within the layer)."""
    pairs = _as_pairs(reference)
    out = [
        np.stack([np.full(count, layer), rng.choice(n_neurons, size=count, replace=False)], axis=1)
        for layer, count in zip(*np.unique(pairs[:, 0], return_counts=True))
    ]
    return _sort_pairs(np.concatenate(out).astype(np.int64)) if out else _empty()


@dataclass(frozen=True)
class SelectionConfig:
    """Selection parameters (params.yaml ``selection``): τ for MATRICE and the ablations, τ for AMIG, seed for Random."""

    tau: float = 0.2
    tau_amig: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_tau("tau", self.tau)
        _check_tau("tau_amig", self.tau_amig)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def fact_rng(seed: int, fact_id: str) -> np.random.Generator:
    """Generator seeded from (seed, crc32(fact_id)): stable across processes, unlike hash()."""
    return np.random.default_rng([int(seed), zlib.crc32(fact_id.encode("utf-8"))])


def select_fact(fs: FactScores, cfg: SelectionConfig | None = None, fact_id: str = "") -> dict[str, np.ndarray]:
    """Neuron sets of one fact for every method in :data:`METHODS`.

    - ``matrice``: threshold τ on S.
    - ``amig``: per language, threshold τ_amig on the first query's layer-normalised map under AMIG's
      own baseline (``FactScores.amig_maps``); intersection across languages.
    - ``random``: as many neurons as ``matrice``, uniform, seeded by (cfg.seed, fact_id).
    - ``wo_uaq``: threshold τ on S_wo_uaq (first queries, UaL).
    - ``wo_ual``: per language, threshold τ on its UaQ map s_per_lang[k]; intersection.
    - ``amig_k`` / ``wo_uaq_k`` / ``wo_ual_k``: the same scores, top-k with k = MATRICE's count (an
      intersection ranked by :func:`intersection_score`), so sizes do not decide a comparison.
    - ``random_layer``: MATRICE's count in each of its layers, uniform within the layer.
    """
    cfg = cfg or SelectionConfig()
    n_layers, n_neurons = fs.S.shape
    matrice = select_by_threshold(fs.S, cfg.tau)
    k = len(matrice)
    return {
        "matrice": matrice,
        "amig": intersect([select_by_threshold(m, cfg.tau_amig) for m in fs.amig_maps]),
        "random": random_neurons(k, n_layers, n_neurons, fact_rng(cfg.seed, fact_id)),
        "wo_uaq": select_by_threshold(fs.S_wo_uaq, cfg.tau),
        "wo_ual": intersect([select_by_threshold(m, cfg.tau) for m in fs.s_per_lang]),
        "amig_k": top_k(intersection_score(fs.amig_maps), k),
        "wo_uaq_k": top_k(fs.S_wo_uaq, k),
        "wo_ual_k": top_k(intersection_score(fs.s_per_lang), k),
        "random_layer": layer_matched_random(matrice, n_neurons, fact_rng(cfg.seed, f"{fact_id}:layer")),
    }


LEAVE_OUT_METHODS: tuple[str, ...] = ("lolo", "lolo_random_layer")


def select_leave_one_out(fs: FactScores, cfg: SelectionConfig | None = None, fact_id: str = ""
                         ) -> dict[str, dict[str, np.ndarray]]:
    """Per language k: ``lolo`` = threshold τ on S computed without k (``FactScores.S_leave_out``),
    ``lolo_random_layer`` = as many random neurons per layer. Language k never reaches either set,
    so their effect in k tests whether the neurons are language-agnostic. Empty for a fact with one
    language."""
    cfg = cfg or SelectionConfig()
    if fs.S_leave_out is None:
        return {}
    n_neurons = fs.shape[1]
    out = {}
    for lang, scores in zip(fs.languages, fs.S_leave_out):
        lolo = select_by_threshold(scores, cfg.tau)
        out[lang] = {"lolo": lolo,
                     "lolo_random_layer": layer_matched_random(lolo, n_neurons, fact_rng(cfg.seed, f"{fact_id}:lolo:{lang}"))}
    return out


def leave_one_out_to_json(sets: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], path: str | Path) -> None:
    """``{"facts": {fact: {held-out lang: {method: [[layer, neuron], ...]}}}}``, written atomically."""
    data = {"methods": list(LEAVE_OUT_METHODS),
            "facts": {f: {lang: {m: _as_pairs(p).tolist() for m, p in per.items()} for lang, per in langs.items()}
                      for f, langs in sets.items()}}
    atomic_write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def leave_one_out_from_json(path: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {f: {lang: {m: _as_pairs(p, f"{f}/{lang}/{m}") for m, p in per.items()} for lang, per in langs.items()}
            for f, langs in data["facts"].items()}


@dataclass
class NeuronSets:
    """Neuron sets of a whole run: ``facts[fact_id][method] = [n, 2]`` int64 (layer, neuron)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    facts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, fact_id: str, per_method: Mapping[str, np.ndarray]) -> None:
        """Record one fact; it must have exactly this run's methods."""
        if fact_id in self.facts:
            raise ValueError(f"fact {fact_id!r} already recorded")
        if set(per_method) != set(self.methods):
            raise ValueError(f"fact {fact_id!r}: methods {sorted(per_method)} != {sorted(self.methods)}")
        self.facts[fact_id] = {m: _as_pairs(per_method[m], f"{fact_id}/{m}") for m in self.methods}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"methods": [...], "facts": {fact_id: {method: [[layer, neuron], ...]}}}``."""
        return {
            "methods": list(self.methods),
            "facts": {
                fid: {m: _as_pairs(sets[m]).tolist() for m in self.methods} for fid, sets in self.facts.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NeuronSets":
        """Inverse of :meth:`to_dict` (validates shapes and that every fact has every method)."""
        if "methods" not in d or "facts" not in d:
            raise ValueError("neuron sets need 'methods' and 'facts' keys")
        out = cls(methods=list(d["methods"]), facts={})
        for fid, per_method in d["facts"].items():
            out.add(fid, per_method)
        return out

    def to_json(self, path: str | Path) -> None:
        """Write atomically; one fact per line keeps the file compact yet diffable."""
        data = self.to_dict()
        lines = [json.dumps(fid, ensure_ascii=False) + ": " + json.dumps(sets, separators=(",", ":"))
                 for fid, sets in data["facts"].items()]
        body = ",\n".join("    " + line for line in lines)
        text = (
            "{\n"
            f'  "methods": {json.dumps(data["methods"])},\n'
            '  "facts": {' + ("\n" + body + "\n  " if lines else "") + "}\n"
            "}\n"
        )
        atomic_write_text(path, text)

    @classmethod
    def from_json(cls, path: str | Path) -> "NeuronSets":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _as_sets(sets: NeuronSets | Mapping[str, Mapping[str, np.ndarray]]) -> tuple[list[str], Mapping[str, Mapping[str, np.ndarray]]]:
    if isinstance(sets, NeuronSets):
        return list(sets.methods), sets.facts
    methods: list[str] = []
    for per_method in sets.values():
        for m in per_method:
            if m not in methods:
                methods.append(m)
    return methods, sets


def layer_distribution(
    sets: NeuronSets | Mapping[str, Mapping[str, np.ndarray]], n_layers: int
) -> dict[str, list[float]]:
    """Share of selected neurons per layer, pooled over all facts (Fig. 4).

    Sums to 1 per method when the method selected anything; all zeros when it selected nothing.
    """
    methods, facts = _as_sets(sets)
    out: dict[str, list[float]] = {}
    for m in methods:
        counts = np.zeros(n_layers, dtype=np.int64)
        for fid, per_method in facts.items():
            if m not in per_method:
                continue
            pairs = _as_pairs(per_method[m])
            if len(pairs) and pairs[:, 0].max() >= n_layers:
                raise ValueError(f"{fid}/{m}: layer {int(pairs[:, 0].max())} out of range for {n_layers} layers")
            counts += np.bincount(pairs[:, 0], minlength=n_layers)
        total = int(counts.sum())
        out[m] = (counts / total).tolist() if total else [0.0] * n_layers
    return out


def summary(sets: NeuronSets | Mapping[str, Mapping[str, np.ndarray]], n_layers: int) -> dict[str, dict[str, Any]]:
    """Per-method size statistics over facts (JSON-able), plus the per-layer share of Fig. 4.

    Keys per method: n_facts, n_empty (facts with no neuron selected), mean/median/min/max neurons
    per fact (None/0 when no fact has the method), total_neurons, layer_share.
    """
    methods, facts = _as_sets(sets)
    dist = layer_distribution(sets, n_layers)
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        sizes = np.array([len(_as_pairs(pm[m])) for pm in facts.values() if m in pm], dtype=np.int64)
        n = int(len(sizes))
        out[m] = {
            "n_facts": n,
            "n_empty": int((sizes == 0).sum()),
            "mean_per_fact": float(sizes.mean()) if n else None,
            "median_per_fact": float(np.median(sizes)) if n else None,
            "min_per_fact": int(sizes.min()) if n else 0,
            "max_per_fact": int(sizes.max()) if n else 0,
            "total_neurons": int(sizes.sum()),
            "layer_share": dist[m],
        }
    return out
