"""Degenerate knowledge neurons (AMIG, "Journey to the Center of the Knowledge Neurons"): neurons
that each store a fact redundantly, so suppressing any one leaves the answer while suppressing them
together removes it.

Definition (AMIG's, thresholds are params): within a fact's neuron set, a group G is *degenerate*
on a query when every member suppressed alone keeps P(answer) ≥ ``t_high``·P₀, while suppressing all
of G drops it below ``t_low``·P₀ (P₀: the unedited probability). Suppression is the manipulation
experiment's (activation ×0 at the answer position).

Search, not exponential (AMIG enumerates all 2^n subsets):
1. the ``max_candidates`` members with the highest scores; each suppressed alone (n edits); the
   *harmless* ones pass ``t_high``;
2. **pairs**: every pair of harmless members (n²/2 edits, all in one batched call);
3. **larger groups**: greedy growth from the harmless members that are in no degenerate pair: add the
   member whose addition lowers P most, until P < ``t_low``·P₀ (found) or ``max_group`` members; a
   found group is kept only if it is minimal (dropping any member lifts P back above ``t_low``·P₀).
Every candidate suppression of a query is one edit set of one :func:`score_answers_many` call, which
runs the prompt once and each edit set on the answer token only.

A group found on the search query is *verified* on another query of the fact (a held-out
paraphrase): each member alone still harmless and the group still below ``t_low``·P₀ there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import numpy as np

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.hooks import neuron_edits
from matrice.models.predict import score_answers_many
from matrice.stats import Estimate, bootstrap_mean

Neuron = tuple[int, int]


@dataclass(frozen=True)
class DegenerateConfig:
    t_high: float = 0.8
    t_low: float = 0.5
    max_candidates: int = 20
    max_group: int = 4
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.t_low < self.t_high:
            raise ValueError(f"degenerate: need 0 < t_low < t_high, got t_low={self.t_low}, t_high={self.t_high}")
        if self.max_candidates < 2 or self.max_group < 2:
            raise ValueError("degenerate: max_candidates and max_group must be >= 2")


@dataclass
class GroupSearch:
    """What the search found on one query: harmless members and the degenerate groups (pairs first)."""

    p0: float
    n_candidates: int
    harmless: list[Neuron] = field(default_factory=list)
    groups: list[list[Neuron]] = field(default_factory=list)
    group_ratio: list[float] = field(default_factory=list)  # P(group suppressed) / P0
    n_evaluated: int = 0


def suppression_ratios(adapter: ModelAdapter, enc: Encoded, groups: Sequence[Sequence[Neuron]], batch_size: int = 32
                       ) -> tuple[float, np.ndarray]:
    """P₀ and P(answer | group suppressed)/P₀ for every group, in one batched call."""
    scored = score_answers_many(adapter, [enc], [None, *(neuron_edits(list(g), 0.0) for g in groups)], batch_size)
    p0 = scored[0][0].prob
    after = np.array([s[0].prob for s in scored[1:]], dtype=np.float64)
    return p0, (after / p0 if p0 > 0 else np.full(len(groups), np.nan))


def find_degenerate(adapter: ModelAdapter, enc: Encoded, candidates: Sequence[Neuron], cfg: DegenerateConfig
                    ) -> GroupSearch:
    """Degenerate groups among ``candidates`` (ordered by score, best first) on one query."""
    members = [tuple(map(int, n)) for n in candidates[: cfg.max_candidates]]
    if not members:
        return GroupSearch(p0=float("nan"), n_candidates=0)
    p0, single = suppression_ratios(adapter, enc, [[m] for m in members], cfg.batch_size)
    out = GroupSearch(p0=p0, n_candidates=len(members), n_evaluated=len(members))
    if not p0 > 0:
        return out
    out.harmless = [m for m, r in zip(members, single) if r >= cfg.t_high]
    pairs = list(combinations(out.harmless, 2))
    if pairs:
        _, ratios = suppression_ratios(adapter, enc, pairs, cfg.batch_size)
        out.n_evaluated += len(pairs)
        for pair, r in zip(pairs, ratios):
            if r < cfg.t_low:
                out.groups.append(list(pair))
                out.group_ratio.append(float(r))
    in_pair = {m for g in out.groups for m in g}
    rest = [m for m in out.harmless if m not in in_pair]
    if len(rest) >= 3 and cfg.max_group >= 3:
        group, ratio, n = _grow(adapter, enc, rest, cfg)
        out.n_evaluated += n
        if group is not None:
            out.groups.append(group)
            out.group_ratio.append(ratio)
    return out


def _grow(adapter: ModelAdapter, enc: Encoded, pool: list[Neuron], cfg: DegenerateConfig
          ) -> tuple[list[Neuron] | None, float, int]:
    """Greedy growth: add the member that lowers P most until it drops below t_low (then check that
    the group is minimal). O(pool × max_group) evaluations."""
    group: list[Neuron] = []
    evaluated = 0
    while len(group) < cfg.max_group:
        options = [m for m in pool if m not in group]
        if not options:
            break
        _, ratios = suppression_ratios(adapter, enc, [group + [m] for m in options], cfg.batch_size)
        evaluated += len(options)
        best = int(np.nanargmin(ratios))
        group = group + [options[best]]
        if ratios[best] < cfg.t_low:
            if len(group) < 3:
                return None, float("nan"), evaluated  # pairs are the pair search's job
            _, without = suppression_ratios(adapter, enc, [[m for m in group if m != x] for x in group], cfg.batch_size)
            evaluated += len(group)
            minimal = bool(np.all(without >= cfg.t_low))
            return (group if minimal else None), float(ratios[best]), evaluated
    return None, float("nan"), evaluated


def verify(adapter: ModelAdapter, enc: Encoded, group: Sequence[Neuron], cfg: DegenerateConfig) -> dict[str, float | bool]:
    """The definition re-checked on another query: every member alone harmless, the group harmful."""
    _, ratios = suppression_ratios(adapter, enc, [[m] for m in group] + [list(group)], cfg.batch_size)
    singles, together = ratios[:-1], float(ratios[-1])
    return {"min_single_ratio": float(np.min(singles)), "group_ratio": together,
            "holds": bool(np.all(singles >= cfg.t_high) and together < cfg.t_low)}


@dataclass
class DegenerateRecord:
    """The search in one (fact, neuron set, language): ``set_kind`` is ``lakn`` (MATRICE's LAKNs,
    searched in every language) or ``language`` (that language's own knowledge neurons)."""

    fact_id: str
    relation: str
    set_kind: str
    lang: str
    n_candidates: int
    n_harmless: int
    n_evaluated: int
    p0: float
    groups: list[list[list[int]]]
    group_ratios: list[float]
    layers_spanned: list[int]  # distinct layers per group
    verified: list[dict | None]  # on the held-out paraphrase of the language (None: none there)
    shared_langs: list[list[str]]  # lakn groups: the other languages whose original query shows it too


def search_fact(adapter: ModelAdapter, fact_id: str, relation: str, search: dict[str, Encoded],
                held_out: dict[str, Encoded], lakns: Sequence[Neuron], own_sets: dict[str, Sequence[Neuron]],
                cfg: DegenerateConfig) -> list[DegenerateRecord]:
    """Every search of one fact: its LAKNs on each language's search query (groups then re-checked on
    the other languages' queries: is the degeneracy shared?), and each language's own set there;
    every group re-checked on the language's held-out paraphrase."""
    records = []
    for kind, sets in (("lakn", {lang: lakns for lang in search}), ("language", own_sets)):
        for lang, enc in search.items():
            found = find_degenerate(adapter, enc, list(sets.get(lang, [])), cfg)
            checks = [verify(adapter, held_out[lang], g, cfg) if lang in held_out else None for g in found.groups]
            shared = [[other for other, e in search.items() if other != lang and verify(adapter, e, g, cfg)["holds"]]
                      if kind == "lakn" else [] for g in found.groups]
            records.append(DegenerateRecord(
                fact_id, relation, kind, lang, found.n_candidates, len(found.harmless), found.n_evaluated, found.p0,
                [[list(n) for n in g] for g in found.groups], found.group_ratio,
                [len({l for l, _ in g}) for g in found.groups], checks, shared))
    return records


def _per_fact(records: Sequence[dict], value) -> list[float]:
    """Each fact's mean of ``value(record)`` over its records (None values left out)."""
    by_fact: dict[str, list[float]] = {}
    for r in records:
        v = value(r)
        if v is not None:
            by_fact.setdefault(r["fact_id"], []).append(float(v))
    return [float(np.mean(v)) for v in by_fact.values()]


def summarise(records: Sequence[dict], n_languages: int) -> dict[str, dict[str, Estimate]]:
    """Per set kind, each a mean over facts with its 95% bootstrap interval (n facts):
    ``found`` share of the fact's languages with a degenerate group; ``groups`` per language;
    ``size`` and ``layers`` of a group; ``verified`` share of groups that hold on the held-out
    paraphrase; ``shared`` (LAKNs) share of the other languages where a group holds too."""
    out: dict[str, dict[str, Estimate]] = {}
    for kind in ("lakn", "language"):
        mine = [r for r in records if r["set_kind"] == kind and r["n_candidates"] > 0]
        checks = [dict(r, ok=[c["holds"] for c in r["verified"] if c is not None]) for r in mine]
        out[kind] = {
            "found": bootstrap_mean(_per_fact(mine, lambda r: float(bool(r["groups"])))),
            "groups": bootstrap_mean(_per_fact(mine, lambda r: len(r["groups"]))),
            "size": bootstrap_mean(_per_fact(mine, lambda r: np.mean([len(g) for g in r["groups"]]) if r["groups"] else None)),
            "layers": bootstrap_mean(_per_fact(mine, lambda r: np.mean(r["layers_spanned"]) if r["groups"] else None)),
            "verified": bootstrap_mean(_per_fact(checks, lambda r: np.mean(r["ok"]) if r["ok"] else None)),
            "shared": bootstrap_mean(_per_fact(
                mine, lambda r: np.mean([len(s) / max(n_languages - 1, 1) for s in r["shared_langs"]])
                if r["groups"] and kind == "lakn" else None)),
        }
    return out
