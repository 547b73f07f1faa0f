"""Fact checking's statements and detectors: a true and a false statement per fact and language, and
the three scores that should be higher for the true one (the package doc)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from matrice.method.attribution.common import AttributionConfig, target_activations
from matrice.method.attribution.fast import fast_attribution_many
from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.experiments import experiment_rng
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import normalize_answer, score_answers
from matrice.models.whole_answer import AnswerSteps, told_apart

Neuron = tuple[int, int]
DETECTORS = ("dkn_attribution", "kn_activation", "probability", "random_attribution", "dkn_share")
# the controls: "random_attribution" reads as many random neurons of the DKNs' layers (the same maps);
# "dkn_share" divides the DKN attribution by P(object), since attributions of P grow with P itself
NEURON_SOURCES = ("relation", "fact")


@dataclass(frozen=True)
class Statement:
    """One statement to check: a query of a fact with the true object or a false one."""

    fact_id: str
    relation: str
    lang: str
    query_id: str
    obj: str
    true: bool


@dataclass(frozen=True)
class DetectorNeurons:
    """The neurons the neuron-based detectors read for one fact."""

    dkn: frozenset[Neuron]
    kn: frozenset[Neuron]
    random: frozenset[Neuron] = frozenset()  # as many per layer as ``dkn``, none of them (the control)


def build_statements(adapter: ModelAdapter, queries: Sequence[Query], pool: Iterable[Query], seed: int,
                     few_shot: bool, whole: bool = False) -> list[tuple[Statement, Encoded]]:
    """A true and a false statement per query in `queries` (one per fact and language); the false
    object is drawn (seeded per fact and language) from `pool`'s objects of the same relation and
    language that differ from the true object in text and first token (``whole``: in text, and neither
    object's tokens start the other's, so a false object may share the true one's first token but
    cannot be a token prefix of it). A query with no such object, or whose
    object the tokenizer cannot encode, gives no statement (never one without its pair)."""
    objects: dict[tuple[str, str], set[str]] = defaultdict(set)
    for q in pool:
        objects[(q.relation, q.lang)].add(q.answer)
    out = []
    for q in queries:
        try:
            true_enc = encode_query(adapter, q, few_shot)
        except ValueError:
            continue
        candidates = sorted(o for o in objects[(q.relation, q.lang)] if normalize_answer(o) != normalize_answer(q.answer))
        random.Random(f"{seed}/{q.fact_id}/{q.lang}").shuffle(candidates)
        for obj in candidates:
            try:
                false_enc = encode_query(adapter, replace(q, answer=obj), few_shot)
            except ValueError:
                continue
            if not told_apart(false_enc.answer_ids, true_enc.answer_ids, whole):
                continue
            out += [(Statement(q.fact_id, q.relation, q.lang, q.query_id, q.answer, True), true_enc),
                    (Statement(q.fact_id, q.relation, q.lang, q.query_id, obj, False), false_enc)]
            break
    return out


def degenerate_neurons(records: Iterable[Mapping]) -> dict[str, frozenset[Neuron]]:
    """Each fact's degenerate neurons: every member of every group the degenerate stage found for it
    (either neuron set, any language)."""
    out: dict[str, set[Neuron]] = defaultdict(set)
    for r in records:
        for group in r["groups"]:
            out[r["fact_id"]].update((int(l), int(n)) for l, n in group)
    return {f: frozenset(v) for f, v in out.items()}


def detector_neurons(relation_of: Mapping[str, str], dkns: Mapping[str, frozenset[Neuron]],
                     kns: Mapping[str, frozenset[Neuron]], source: str) -> dict[str, DetectorNeurons]:
    """Per fact: with ``source="relation"`` the union over the *other* facts of its relation (no
    label leak), with ``"fact"`` its own sets."""
    if source not in NEURON_SOURCES:
        raise ValueError(f"fact_check.neuron_source must be one of {NEURON_SOURCES}, got {source!r}")
    out = {}
    for fact, rel in relation_of.items():
        donors = [fact] if source == "fact" else [g for g, r in relation_of.items() if r == rel and g != fact]
        out[fact] = DetectorNeurons(frozenset().union(*(dkns.get(g, frozenset()) for g in donors)),
                                    frozenset().union(*(kns.get(g, frozenset()) for g in donors)))
    return out


def layer_matched_random(neurons: frozenset[Neuron], n_per_layer: int, rng: np.random.Generator) -> frozenset[Neuron]:
    """As many neurons in each layer as ``neurons`` has there, drawn uniformly from that layer's others."""
    by_layer: dict[int, set[int]] = defaultdict(set)
    for layer, n in neurons:
        by_layer[layer].add(n)
    out = set()
    for layer in sorted(by_layer):
        others = np.setdiff1d(np.arange(n_per_layer), sorted(by_layer[layer]))
        out |= {(layer, int(n)) for n in rng.choice(others, size=len(by_layer[layer]), replace=False)}
    return frozenset(out)


def with_random_controls(neurons: Mapping[str, DetectorNeurons], n_per_layer: int, seed: int
                         ) -> dict[str, DetectorNeurons]:
    """Each fact's detector neurons with its layer-matched random control (seeded per fact)."""
    return {fact: replace(n, random=layer_matched_random(n.dkn, n_per_layer, experiment_rng(seed, "fact_check_random", fact)))
            for fact, n in neurons.items()}


def neuron_attribution_scores(adapter: ModelAdapter, encs: Sequence[Encoded], sets: Mapping[str, frozenset[Neuron]],
                              cfg: AttributionConfig, memo: Memo | None = None) -> dict[str, list[float | None]]:
    """:func:`attribution_scores` of several neuron sets from one integration of their layers."""
    layers = sorted({l for neurons in sets.values() for l, _ in neurons})
    maps = layer_attributions(adapter, encs, cfg, layers, memo) if layers and encs else []
    return {name: ([None] * len(encs) if not neurons else
                   [float(torch.stack([per_layer[l][n] for l, n in sorted(neurons)]).mean()) for per_layer in maps])
            for name, neurons in sets.items()}


def share_scores(attribution: Sequence[float | None], probability: Sequence[float]) -> list[float | None]:
    """Attribution as a share of P(object) (None where either is missing or P is 0)."""
    return [None if a is None or not p else a / p for a, p in zip(attribution, probability)]


def attribution_scores(adapter: ModelAdapter, encs: Sequence[Encoded], neurons: frozenset[Neuron],
                       cfg: AttributionConfig, memo: Memo | None = None) -> list[float | None]:
    """Mean over `neurons` of each statement's attribution of P(object) (mean over baselines), only the
    neurons' layers integrated; None for every statement when there are no neurons."""
    return neuron_attribution_scores(adapter, encs, {"neurons": neurons}, cfg, memo)["neurons"]


def layer_attributions(adapter: ModelAdapter, encs: Sequence[Encoded], cfg: AttributionConfig, layers: Sequence[int],
                       memo: Memo | None = None) -> list[dict[int, torch.Tensor]]:
    """Per statement and layer, every neuron's attribution of P(object), averaged over baselines [N].

    With ``memo``, each (statement, layer) is stored, so it serves any later neuron set: a sweep that
    moves the degenerate neurons integrates only the layers it has not seen, all of them in one call
    (rows of several layers share batches; a layer's numbers measured bit-equal whichever layers come
    with it on CPU, and equal to float rounding wherever the batch shape changes the kernels)."""
    out: list[dict[int, torch.Tensor]] = [{} for _ in encs]
    keys = {(i, l): memo.key(kind="fact_check_attribution", statement=enc, layer=l, config=cfg)
            for i, enc in enumerate(encs) for l in layers} if memo else {}
    missing: dict[tuple[int, ...], list[int]] = defaultdict(list)  # layers to integrate -> statements
    for i in range(len(encs)):
        todo = []
        for layer in layers:
            stored = memo.load_array(keys[i, layer]) if memo else None
            if stored is None:
                todo.append(layer)
            else:
                out[i][layer] = torch.from_numpy(stored)
        if todo:
            missing[tuple(todo)].append(i)
    for todo, rows in missing.items():
        for i, attr in zip(rows, fast_attribution_many(adapter, [encs[i] for i in rows], cfg, list(todo))):
            mean = attr.mean(dim=0)
            for layer in todo:
                out[i][layer] = mean[layer].clone()
                if memo:
                    memo.store_array(keys[i, layer], out[i][layer].numpy())
    return out


def statement_input(adapter: ModelAdapter, enc: Encoded) -> tuple[list[int], int]:
    """The filled statement and the position of its object's last token: causal models read the
    object after the prompt; masked models have it written into the mask slots."""
    if adapter.causal:
        ids = list(enc.input_ids) + list(enc.answer_ids)
        return ids, len(ids) - 1
    ids = list(enc.input_ids)
    ids[enc.target_pos: enc.target_pos + len(enc.answer_ids)] = enc.answer_ids
    return ids, enc.target_pos + len(enc.answer_ids) - 1


def activation_scores(adapter: ModelAdapter, encs: Sequence[Encoded], neurons: frozenset[Neuron]) -> list[float | None]:
    """Mean activation of `neurons` at the object's last token of each filled statement."""
    if not neurons:
        return [None] * len(encs)
    cells = sorted(neurons)
    idx_l, idx_n = torch.tensor([l for l, _ in cells]), torch.tensor([n for _, n in cells])
    out = []
    for enc in encs:
        ids, pos = statement_input(adapter, enc)
        acts = target_activations(adapter, torch.tensor([ids]), pos)[0].float().cpu()  # [L, N]
        out.append(float(acts[idx_l, idx_n].mean()))
    return out


def probability_scores(adapter: ModelAdapter, encs: Sequence[Encoded], batch_size: int = 32,
                       answer_token: str = "first") -> tuple[list[float], list[float]]:
    """(P(object), the mean of its tokens' probabilities): its first token's P twice, or under
    ``answer_token: all`` the whole object's (teacher-forced product) and the mean over its tokens of
    P(t_k | q, t_<k), the scale of a whole-answer attribution (a mean over tokens) for ``dkn_share``."""
    steps = AnswerSteps.of(adapter, encs, answer_token)
    per_token = score_answers(adapter, steps.encs, batch_size=batch_size)
    means = [sum(s.prob for s in per_token[a:b]) / (b - a) for a, b in steps.spans]
    return [s.prob for s in steps.fold(per_token)], means


# ---- decisions and metrics -----------------------------------------------------------------------


def held_out_queries(queries: list[Query], facts: set[str], split: HeldOutSplit) -> list[Query]:
    """Per attributed fact and language, its first paraphrase selection never attributed; with every
    template attributed (null), the original query."""
    mine = [q for q in queries if q.fact_id in facts]
    if split.localisation is None:  # nothing held out: the lowest template, written last, wins
        chosen = {(q.fact_id, q.lang): q for q in sorted(mine, key=lambda q: q.template_id, reverse=True)}
    else:
        chosen = split.first_held_out(mine)
    return [chosen[k] for k in sorted(chosen)]
