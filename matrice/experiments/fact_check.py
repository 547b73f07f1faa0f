"""Fact checking with degenerate knowledge neurons (AMIG), against the model's own probability.

AMIG's claim: the degenerate knowledge neurons (DKNs) of a relation tell a false statement from a true
one better than the model does. Their detector (heng840/AMIG, ``hallucination_detection``) attributes
P(object | prompt) to the relation's DKNs with integrated gradients and flags the statement as false
when the mean attribution is below a fixed threshold; the DKNs come from the relation's *training*
facts (an 80/20 split), so the detector never sees the tested fact's label.

Here, for every attributed fact and language:

- **statements**: the fact's held-out paraphrase (a template selection never attributed) with the true
  object, and with a false object: the object of another fact of the same relation in that language
  (seeded), whose first token differs from the true one's (every score here reads the first answer
  token, so a shared first token would make the two statements the same question);
- **neurons** (``neuron_source``): ``relation`` (default, AMIG's design) takes the degenerate groups and
  the LAKNs of the *other* attributed facts of the relation, so nothing the detector uses was found
  with the tested fact's object; ``fact`` takes the fact's own (found with its true object: an upper
  bound that leaks the label);
- **detectors**, each a score that should be higher for the true statement:
  ``dkn_attribution`` the mean integrated-gradients attribution of P(object) to the DKNs (AMIG; the
  run's SAIG baselines, steps and integration; only the DKNs' layers are integrated),
  ``kn_activation`` the mean activation of the relation's LAKNs at the object's last token of the filled
  statement (plain knowledge-neuron activation: at the answer position a causal model has not seen the
  object yet, so its activations there cannot tell the statements apart), and
  ``probability`` P(object's first token | prompt), the model alone;
- **decision**: a statement is flagged false when its score is below a threshold chosen on the *other*
  facts' statements (leave-one-fact-out, the threshold that maximises F1 there), never on its own;
- **metrics**: precision, recall and F1 of flagging false statements, per language and pooled, with
  95% intervals from resampling facts (`matrice.stats.cluster_statistic`), and the threshold-free
  share of (fact, language) pairs whose true statement scores above its false one.

A detector without neurons for a fact (no DKN in its relation's other facts) abstains there; the
comparison with the probability baseline uses only the statements every detector scores.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from matrice.attribution.common import AttributionConfig, target_activations
from matrice.attribution.fast import fast_attribution_many
from matrice.claims import Claim, RelationOf, relation_prefix
from matrice.data.schema import Query
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.predict import normalize_answer, score_answers
from matrice.stats import (Estimate, bootstrap_mean, cluster_statistic, flag_counts, paired_ratio_difference, prf,
                           verdict)
from matrice.report import RunResults

Neuron = tuple[int, int]
DETECTORS = ("dkn_attribution", "kn_activation", "probability")
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


def build_statements(adapter: ModelAdapter, queries: Sequence[Query], pool: Iterable[Query], seed: int,
                     few_shot: bool) -> list[tuple[Statement, Encoded]]:
    """A true and a false statement per query in `queries` (one per fact and language); the false
    object is drawn (seeded per fact and language) from `pool`'s objects of the same relation and
    language that differ from the true object in text and first token. A query with no such object,
    or whose object the tokenizer cannot encode, gives no statement (never one without its pair)."""
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
            if false_enc.answer_ids[0] == true_enc.answer_ids[0]:
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


def attribution_scores(adapter: ModelAdapter, encs: Sequence[Encoded], neurons: frozenset[Neuron],
                       cfg: AttributionConfig, memo: Memo | None = None) -> list[float | None]:
    """Mean over `neurons` of each statement's attribution of P(object) (mean over baselines), only the
    neurons' layers integrated; None for every statement when there are no neurons."""
    if not neurons or not encs:
        return [None] * len(encs)
    cells = sorted(neurons)
    maps = layer_attributions(adapter, encs, cfg, sorted({l for l, _ in cells}), memo)
    return [float(torch.stack([per_layer[l][n] for l, n in cells]).mean()) for per_layer in maps]


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


def probability_scores(adapter: ModelAdapter, encs: Sequence[Encoded], batch_size: int = 32) -> list[float]:
    return [s.prob for s in score_answers(adapter, encs, batch_size=batch_size)]


# ---- decisions and metrics -----------------------------------------------------------------------

def best_threshold(scores: Sequence[float], is_false: Sequence[bool]) -> float:
    """The threshold θ (flag false when score < θ) that maximises F1 of flagging false statements on
    these statements: midpoints between sorted distinct scores and one beyond each end; ties go to
    the smallest θ (flag the fewest)."""
    s = np.unique(np.asarray(scores, dtype=np.float64))
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]]) if len(s) else np.array([0.0])
    y = np.asarray(is_false, dtype=bool)
    best, best_f1 = float(candidates[0]), -1.0
    for theta in candidates:
        pred = np.asarray(scores) < theta
        f1 = _f1(np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y))
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(theta), f1
    return best


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def leave_one_fact_out(facts: Sequence[str], scores: Sequence[float | None], is_false: Sequence[bool]
                       ) -> list[bool | None]:
    """Each scored statement flagged false (True) or not with the threshold chosen on the other facts'
    scored statements; None where the score is None or no other fact is scored."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    thresholds: dict[str, float | None] = {}
    for fact in {facts[i] for i in scored}:
        train = [i for i in scored if facts[i] != fact]
        thresholds[fact] = best_threshold([scores[i] for i in train], [is_false[i] for i in train]) if train else None
    return [None if s is None or thresholds[f] is None else bool(s < thresholds[f]) for f, s in zip(facts, scores)]


@dataclass(frozen=True)
class DetectionScores:
    precision: Estimate
    recall: Estimate
    f1: Estimate
    n_statements: int


def fact_counts(rows: Sequence[Mapping], detector: str) -> tuple[list[str], np.ndarray]:
    """(facts, [facts, 3] tp/fp/fn of flagging false statements) over `rows` with a decision."""
    return flag_counts(rows, detector, lambda r: r["fact_id"])


def detection_scores(rows: Sequence[Mapping], detector: str, seed: int = 0) -> DetectionScores:
    """Precision, recall, F1 of flagging false statements, each with a 95% interval over facts."""
    _, counts = fact_counts(rows, detector)
    n = sum(r["flagged"][detector] is not None for r in rows)
    return DetectionScores(*(cluster_statistic(counts, lambda c, k=k: prf(c)[..., k], seed=seed) for k in range(3)), n)


def f1_difference(rows: Sequence[Mapping], a: str, b: str, seed: int = 0) -> Estimate:
    """F1(a) − F1(b) on the statements both decide, facts resampled together (paired), with a p-value."""
    both = [r for r in rows if r["flagged"][a] is not None and r["flagged"][b] is not None]
    facts_a, ca = fact_counts(both, a)
    facts_b, cb = fact_counts(both, b)
    assert facts_a == facts_b
    counts = np.concatenate([ca, cb], axis=1)
    return cluster_statistic(counts, lambda c: prf(c[..., :3])[..., 2] - prf(c[..., 3:])[..., 2], seed=seed, with_p=True)


def pair_accuracy(rows: Sequence[Mapping], detector: str) -> Estimate:
    """Threshold-free: per fact, the share of its (language) pairs whose true statement scores above
    the false one (ties count ½), then the mean over facts with a 95% interval."""
    pairs: dict[tuple[str, str], dict[bool, float]] = defaultdict(dict)
    for r in rows:
        if r["scores"][detector] is not None:
            pairs[(r["fact_id"], r["lang"])][r["true"]] = r["scores"][detector]
    per_fact: dict[str, list[float]] = defaultdict(list)
    for (fact, _), s in pairs.items():
        if len(s) == 2:
            per_fact[fact].append(1.0 if s[True] > s[False] else 0.5 if s[True] == s[False] else 0.0)
    return bootstrap_mean([float(np.mean(v)) for v in per_fact.values()])


# ---- claims: the paper's statements about this experiment, tested (matrice.claims) ----------------

def f1_difference_by_relation(statements: Sequence[Mapping[str, Any]], a: str, b: str, relation_of: RelationOf,
                              seed: int = 0) -> Estimate:
    """F1(a) − F1(b) of flagging false statements on those both decide, relations as the units (their
    facts' counts summed): the verdict's test, a paired permutation over relations."""
    both = [r for r in statements if r["flagged"][a] is not None and r["flagged"][b] is not None]
    units, counts_a = flag_counts(both, a, lambda r: relation_of(r["fact_id"]))
    units_b, counts_b = flag_counts(both, b, lambda r: relation_of(r["fact_id"]))
    assert units == units_b
    return paired_ratio_difference(counts_a, counts_b, lambda c: prf(c)[..., 2], seed=seed)



def fact_check_claims(fact_check: Mapping[str, Any], relation_of: RelationOf = relation_prefix) -> list[Claim]:
    """AMIG: degenerate knowledge neurons detect false statements better than the model itself — the
    F1 of flagging false statements, DKN attribution − P(object), on the statements both decide. A
    ratio of sums, not a mean of per-fact values: relations are the units of a paired permutation test
    (`f1_difference_by_relation`); the fact-level estimate is the stage's."""
    if not fact_check:
        return []
    fact_level = Estimate(**fact_check["summary"]["difference"]["dkn_attribution"])
    est = f1_difference_by_relation(fact_check.get("statements", []), "dkn_attribution", "probability", relation_of)
    source = fact_check.get("neuron_source", "relation")
    queries = "held-out paraphrases" + ("" if source == "relation" else "; neurons found with the true object")
    return [Claim("AMIG (fact checking)", "degenerate knowledge neurons detect false facts better than the model",
                  "F1 (false flagged) DKN attribution − P(object)", "greater", queries, est, verdict(est, "greater"),
                  key="amig_fact_check", metric="f1", fact_estimate=fact_level)]


# ---- its section of the report ------------------------------------------------------------------

def _answer(summary: Mapping[str, Any], row: Claim) -> str:
    """Whether the DKN detector beats P(object): the verdict row's (relations as units), the fact-level
    difference beside it."""
    diff = row.estimate
    answer = {"replicates": "**beats** the probability baseline", "contradicts": "**does worse than** the probability baseline",
              "equivalent": "**is equivalent to** the probability baseline (within the declared margin)"
              }.get(row.verdict, "**cannot be told apart from** the probability baseline on these data")
    return (f"DKN-based fact checking {answer}: F1 difference over relations {diff.format(3)}"
            f"{'' if diff.p is None else f', p = {diff.p:.3f}'} (over facts {row.fact_estimate.format(3)}), on the "
            f"{summary['n_facts_common']} facts whose relation has degenerate neurons in another fact.\n\n")


def section(run: RunResults) -> str:
    """Fact checking with degenerate knowledge neurons against the model's probability."""
    data = run.json("fact_check.json")
    common = data["summary"]["n_facts_common"]
    verdict = ("No fact has degenerate neurons to read under this neuron source, so the DKN detector abstains "
               "everywhere and the data cannot tell whether it beats the probability baseline.\n\n" if common == 0
               else _answer(data["summary"], run.claim("amig_fact_check")))
    return (
        "### Fact checking with degenerate knowledge neurons (AMIG)\nAMIG flags a statement as false when the "
        "integrated-gradients attribution of P(object) to the relation's degenerate neurons is low. Here it is "
        "compared with the model's own P(object) and with the plain activation of the relation's LAKNs on the filled "
        "statement, each flagging with a threshold chosen on the other facts.\n\n" + verdict
        + run.figure_and_table("fact_check.png", f"Fact checking: F1 of flagging false statements per language, {run.key}",
                               "fact_check_table.md")
    )
