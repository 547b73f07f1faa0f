"""MATRICE from Python: load a model, find a fact's language-agnostic knowledge neurons, suppress or
enhance them, edit through them — the functions the pipeline's stages run, without DVC.

    import matrice.api as mx

    model = mx.load("embedded:gemma3-270m")            # or an HF id, a local path, (model, tokenizer)
    queries = mx.queries(mx.Fact("capital", {"en": "France", "fr": "la France"}, {"en": "Paris", "fr": "Paris"}),
                         {"en": ["The capital of [X] is [Y]."], "fr": ["La capitale de [X] est [Y]."]})
    neurons = mx.locate(model, queries)                 # MATRICE's set, with its scores
    effects = mx.suppress(model, neurons, queries)      # ΔP/P per query
    with mx.edit(model, neurons, queries[0], "Berlin"):  # revertible: the weights come back bit for bit
        ...

Every number is the stages' own: :func:`attribute` is the attribution engine the attribute stage
runs (raw map, summed over baselines), :func:`locate` aggregates with UaQ/UaL and thresholds with τ
exactly as the aggregate and select stages do, :func:`suppress`/:func:`enhance` are the manipulation
stage's, :func:`edit` the edit stage's update (or erasure) of the neurons' output columns.
Answers are read at their first token by default; ``AttributionConfig(answer_token="all")`` given to
:func:`attribute` or :func:`locate`, and ``answer_token="all"`` to :func:`suppress`, :func:`enhance` and
:func:`edit`, read the whole answer, as the stages do under ``answer_token: all``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from torch import nn

from matrice.data.schema import Fact as _Fact
from matrice.data.schema import Query, make_query
from matrice.experiments.edit import EditConfig
from matrice.experiments.edit_targets import edit_target
from matrice.experiments.manipulate import ManipulationRecord, manipulate
from matrice.interventions import edited_output_weights, erasure_vectors, update_vectors
from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import raw_maps
from matrice.method.scores import group_by_fact
from matrice.method.selection import SelectionConfig, select_fact
from matrice.method.uncertainty import AggregationConfig, FactScores, aggregate_fact
from matrice.models.adapter import ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import greedy_decode
from matrice.models.loading import EMBEDDED_GEMMA, convert_embedded_gemma, load_adapter
from matrice.models.whole_answer import check_policy, told_apart

__all__ = ["Fact", "Neurons", "load", "queries", "attribute", "locate", "answers", "suppress", "enhance", "edit"]

ModelLike = ModelAdapter | str | tuple[nn.Module, Any]


@dataclass(frozen=True)
class Fact:
    """A fact to ask about: a relation name, and the subject and object in each language."""

    relation: str
    subject: Mapping[str, str]
    object: Mapping[str, str]
    fact_id: str = "fact"


@dataclass(frozen=True)
class Neurons:
    """A fact's neurons: ``pairs`` [n, 2] (layer, neuron) in the selection's order (score descending), their ``scores``
    (the method's score at each), the full ``score_map`` [layers, neurons], and every other method's
    set that the selection stage computes (``others``: AMIG, Random, the ablations, the size-matched ones)."""

    pairs: np.ndarray
    scores: np.ndarray
    score_map: np.ndarray
    method: str = "matrice"
    others: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)


def load(model: ModelLike, tokenizer: Any = None, device: str = "auto", dtype: str = "float32",
         cache_dir: str | Path | None = None) -> ModelAdapter:
    """A model the other functions take: a Hugging Face id or local directory, ``"embedded:gemma3-270m"``
    (the packaged default, converted once into ``cache_dir``, default ``~/.cache/matrice``), an
    already-loaded ``(model, tokenizer)`` pair or model with ``tokenizer``, or an adapter (returned as is)."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, tuple):
        model, tokenizer = model
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: load((model, tokenizer)) or load(model, tokenizer)")
        return ModelAdapter(model, tokenizer)
    if model == EMBEDDED_GEMMA:
        root = Path(cache_dir or os.environ.get("MATRICE_CACHE", Path.home() / ".cache" / "matrice"))
        converted = root / "gemma3_270m"
        if not (converted / "config.json").exists():
            convert_embedded_gemma(converted)
        model = str(converted)
    return load_adapter(str(model), device, dtype)


def queries(fact: Fact, templates: Mapping[str, Sequence[str]], demo: Fact | None = None) -> list[Query]:
    """The fact's cloze queries: one per (language, template); a template has one ``[X]`` (subject) and
    one ``[Y]`` (object, the answer) and only text before ``[Y]`` is the prompt. ``demo``, another fact
    of the relation, gives the one-shot prefix the pipeline's ``few_shot`` uses."""
    f = _Fact(fact.fact_id, fact.relation, dict(fact.subject), dict(fact.object))
    d = None if demo is None else _Fact(f"{demo.fact_id}:demo", demo.relation, dict(demo.subject), dict(demo.object))
    missing = [lang for lang in templates if lang not in fact.subject or lang not in fact.object]
    if missing:
        raise ValueError(f"fact {fact.fact_id!r} has no subject or object in language(s) {missing}")
    return [make_query(f, lang, i, t, d) for lang, ts in templates.items() for i, t in enumerate(ts)]


def attribute(model: ModelAdapter, query_or_queries: Query | Sequence[Query], cfg: AttributionConfig | None = None,
              few_shot: bool = False) -> np.ndarray:
    """Raw attribution [layers, neurons] of each query to its answer's first token, or to every token
    under ``cfg.answer_token = "all"`` (the SAIG baselines summed, as the attribute stage stores it);
    one query gives one map, a sequence a stacked array."""
    single = isinstance(query_or_queries, Query)
    qs = [query_or_queries] if single else list(query_or_queries)
    encs = [encode_query(model, q, few_shot) for q in qs]
    maps = raw_maps(model, encs, cfg or AttributionConfig()).raw
    return maps[0] if single else maps


def locate(model: ModelAdapter, fact_queries: Sequence[Query], tau: float | None = None,
           aggregation: AggregationConfig | None = None, attribution: AttributionConfig | None = None,
           selection: SelectionConfig | None = None, few_shot: bool = False) -> Neurons:
    """MATRICE's neurons of one fact from its queries (several paraphrases in several languages):
    attribution, UaQ per language, UaL across languages, threshold τ (default the selection config's,
    0.2 as in params.yaml)."""
    if not fact_queries:
        raise ValueError("locate needs at least one query of the fact")
    if len({q.fact_id for q in fact_queries}) != 1:
        raise ValueError("locate takes the queries of one fact")
    selection = selection or SelectionConfig()
    if tau is not None:
        selection = replace(selection, tau=tau)
    raw = attribute(model, list(fact_queries), attribution, few_shot)
    fact = fact_queries[0].fact_id
    per_lang = group_by_fact(fact_queries, {q.query_id: m for q, m in zip(fact_queries, raw)})[fact]
    scores: FactScores = aggregate_fact(per_lang, aggregation)
    sets = select_fact(scores, selection, fact)
    pairs = sets["matrice"]
    return Neurons(pairs, scores.S[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.zeros(0), scores.S, "matrice",
                   {m: s for m, s in sets.items() if m != "matrice"})


def answers(model: ModelAdapter, fact_queries: Sequence[Query], few_shot: bool = False) -> list[str]:
    """The model's greedy answer to each query (as many tokens as the gold answer has), decoded text."""
    encs = [encode_query(model, q, few_shot) for q in fact_queries]
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in greedy_decode(model, encs)]


def _as_pairs(neurons: Neurons | np.ndarray) -> np.ndarray:
    """A located set, or any (layer, neuron) pairs, as the [n, 2] int64 array the interventions take."""
    return neurons.pairs if isinstance(neurons, Neurons) else np.asarray(neurons, dtype=np.int64).reshape(-1, 2)


def _manipulated(model: ModelAdapter, neurons: Neurons | np.ndarray, fact_queries: Sequence[Query], mode: str,
                 factor: float, few_shot: bool, answer_token: str) -> list[ManipulationRecord]:
    sets = {fid: {"neurons": _as_pairs(neurons)} for fid in {q.fact_id for q in fact_queries}}
    return manipulate(model, list(fact_queries), sets, ("neurons",), {mode: factor}, few_shot, progress=False,
                      answer_token=answer_token).records


def suppress(model: ModelAdapter, neurons: Neurons | np.ndarray, fact_queries: Sequence[Query],
             few_shot: bool = False, answer_token: str = "first") -> list[ManipulationRecord]:
    """The neurons' activations set to 0 at the answer position: P(answer) before and after, and
    ΔP/P, per query (Fig. 5's measure); ``answer_token="all"``: of the whole answer, the neurons set
    to 0 at each answer token's position."""
    return _manipulated(model, neurons, fact_queries, "suppress", 0.0, few_shot, answer_token)


def enhance(model: ModelAdapter, neurons: Neurons | np.ndarray, fact_queries: Sequence[Query], factor: float = 2.0,
            few_shot: bool = False, answer_token: str = "first") -> list[ManipulationRecord]:
    """The neurons' activations multiplied by ``factor`` (default 2) at the answer position (each
    answer token's with ``answer_token="all"``)."""
    return _manipulated(model, neurons, fact_queries, "enhance", factor, few_shot, answer_token)


@contextlib.contextmanager
def edit(model: ModelAdapter, neurons: Neurons | np.ndarray, query: Query, new_object: str | None = None,
         cfg: EditConfig | None = None, few_shot: bool = False, answer_token: str = "first") -> Iterator[ModelAdapter]:
    """Edit the fact through its neurons' output columns, for the ``with`` block: the update
    (o → ``new_object``: −λ1·E(o) + λ2·E(o'), the edit stage's scaling) or, with no new object, the
    erasure. ``query`` gives o (and o' is tokenised in its context); E is a first token's unembedding,
    or with ``answer_token="all"`` the mean over the object's tokens (the edit stage's rule). On exit
    the weights are restored and checked bit for bit."""
    cfg = cfg or EditConfig()
    pairs = _as_pairs(neurons)
    whole = check_policy(answer_token) == "all"
    old_ids = encode_query(model, query, few_shot).answer_ids
    if new_object is None:
        vectors = erasure_vectors(model, pairs)
    else:
        new_ids = encode_query(model, replace(query, answer=new_object), few_shot).answer_ids
        if not told_apart(new_ids, old_ids, whole):
            raise ValueError(f"{new_object!r} {'is or starts (or is started by)' if whole else 'starts with the same token as'} "
                             f"{query.answer!r} in this context: the update could not be told from the old answer")
        vectors = update_vectors(model, pairs, edit_target(old_ids, whole), edit_target(new_ids, whole), cfg.lambda1,
                                 cfg.lambda2, cfg.scaling)
    with edited_output_weights(model, vectors):
        yield model
