"""The degenerate-neuron search (the package doc): a fact's candidates suppressed alone, in pairs and
in greedy groups, batched by :class:`Suppressor`, verified on a held-out paraphrase."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Generator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.encoding import encode_query
from matrice.models.whole_answer import AnswerSteps, check_policy
from matrice.models.hooks import neuron_edits
from matrice.models.predict import PromptCache, score_answers_many
from matrice.models.head import answer_probabilities, head_input, linear_head
from matrice.models.scaled_rows import per_row_scalings
from matrice.method.selection import select_by_threshold

Neuron = tuple[int, int]


@dataclass(frozen=True)
class DegenerateConfig:
    t_high: float = 0.8
    t_low: float = 0.5
    max_candidates: int = 12
    max_group: int = 4
    batch_size: int = 32

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "DegenerateConfig":
        s = params["degenerate"]
        return cls(t_high=s["t_high"], t_low=s["t_low"], max_candidates=s["max_candidates"], max_group=s["max_group"],
                   batch_size=params["manipulate"]["batch_size"])

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


class Suppressor:
    """P(answer) under many candidate suppressions of queries. Causal models: a query's prompt minus
    its target runs once and is kept (:class:`matrice.models.predict.PromptCache`; the search asks
    about the same few queries again and again, and :meth:`prepare` runs a fact's prompts together);
    each forward then runs only the target token, one candidate group per row, rows of several
    queries together, and P comes from the LM head without its [rows, V] logits
    (:func:`matrice.models.head.answer_probabilities`, its soft cap in float32 whatever the
    model's dtype). Masked models: one edit set per group (slower, the same numbers up to float
    rounding).

    ``answer_token: all``: P is the whole answer's, Π_k P(t_k | q, t_<k), each token's row (the gold
    prefix in place) with the group suppressed at its own position."""

    def __init__(self, adapter: ModelAdapter, batch_size: int = 32, rows: int = 64, answer_token: str = "first"):
        self.adapter = adapter
        self.batch_size = batch_size
        self.rows = rows
        self.answer_token = check_policy(answer_token)
        self._prompts: list[PromptCache] = []
        self._where: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt -> (cache, its row there)
        self._head = linear_head(adapter) if adapter.causal else None

    def prepare(self, encs: Sequence[Encoded]) -> None:
        """Run the prompts not yet kept, together (one left-padded batch)."""
        encs = AnswerSteps.of(self.adapter, encs, self.answer_token).encs
        new = list({tuple(e.input_ids): e for e in encs if tuple(e.input_ids) not in self._where}.values())
        if not new:
            return
        with torch.no_grad():
            self._prompts.append(PromptCache(self.adapter, new))
        self._where.update({tuple(e.input_ids): (len(self._prompts) - 1, i) for i, e in enumerate(new)})

    def ratios(self, enc: Encoded, groups: Sequence[Sequence[Neuron]]) -> tuple[float, np.ndarray]:
        """P₀ and P(answer | group suppressed)/P₀ for every group."""
        return self.ratios_many([(enc, groups)])[0]

    def ratios_many(self, requests: Sequence[tuple[Encoded, Sequence[Sequence[Neuron]]]]) -> list[tuple[float, np.ndarray]]:
        """:meth:`ratios` of every (query, groups) request, the rows of all of them in shared forwards."""
        steps = AnswerSteps.of(self.adapter, [enc for enc, _ in requests], self.answer_token)
        flat = [(step, groups) for (_, groups), (a, b) in zip(requests, steps.spans) for step in steps.encs[a:b]]
        if not (self.adapter.causal and all(len(e.input_ids) > 1 and e.target_pos == len(e.input_ids) - 1
                                            for e, _ in flat)):
            step_probs = [self._masked(enc, groups) for enc, groups in flat]
        else:
            self.prepare([enc for enc, _ in flat])
            step_probs = self._split(self._row_probs(flat), flat)
        probs = [np.prod(step_probs[a:b], axis=0) for a, b in steps.spans]  # a whole answer's: its tokens' product
        return [(float(p[0]), p[1:] / p[0] if p[0] > 0 else np.full(len(p) - 1, np.nan)) for p in probs]

    @torch.no_grad()
    def _row_probs(self, requests: Sequence[tuple[Encoded, Sequence[Sequence[Neuron]]]]) -> list[float]:
        """P(gold) of every row (each request's unedited row, then its groups), in request order."""
        rows = [(self._where[tuple(enc.input_ids)], [(int(l), int(n), 0.0) for l, n in group], enc.answer_ids[0])
                for enc, groups in requests for group in [[], *groups]]
        by_cache: dict[int, list[int]] = {}
        for r, ((cache, _), _, _) in enumerate(rows):
            by_cache.setdefault(cache, []).append(r)
        probs = [0.0] * len(rows)
        for cache, members in by_cache.items():
            for start in range(0, len(members), self.rows):
                part = members[start : start + self.rows]
                step, _ = self._prompts[cache].target_step([rows[r][0][1] for r in part],
                                                           per_row_scalings([rows[r][1] for r in part]))
                hidden = head_input(self.adapter, step.last_hidden_state[:, -1])
                for r, p in zip(part, answer_probabilities(hidden, self._head, [rows[r][2] for r in part]).tolist()):
                    probs[r] = p
        return probs

    @staticmethod
    def _split(probs: list[float], requests) -> list[np.ndarray]:
        out, at = [], 0
        for _, groups in requests:
            out.append(np.array(probs[at : at + len(groups) + 1], dtype=np.float64))
            at += len(groups) + 1
        return out

    def _masked(self, enc: Encoded, groups: Sequence[Sequence[Neuron]]) -> np.ndarray:
        scored = score_answers_many(self.adapter, [enc], [None, *(neuron_edits(list(g), 0.0) for g in groups)],
                                    self.batch_size)
        return np.array([s[0].prob for s in scored], dtype=np.float64)


Request = tuple[Encoded, Sequence[Sequence[Neuron]]]  # a query and candidate groups to suppress on it


def run_lockstep(scorer: Suppressor, searches: Sequence[Generator[Request, tuple[float, np.ndarray], Any]]) -> list[Any]:
    """Drive independent searches together: each round, every search's next request goes into one
    :meth:`Suppressor.ratios_many` call (full batches instead of a few rows per forward); returns
    each search's result. A search is a generator that yields requests, receives (P₀, ratios)."""
    results: list[Any] = [None] * len(searches)
    pending: dict[int, Request] = {}

    def advance(i: int, answer: Any) -> None:
        try:
            pending[i] = searches[i].send(answer)
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        order = sorted(pending)
        answers = scorer.ratios_many([pending[i] for i in order])
        for i, answer in zip(order, answers):
            advance(i, answer)
    return results


def find_degenerate(scorer: Suppressor, enc: Encoded, candidates: Sequence[Neuron], cfg: DegenerateConfig
                    ) -> GroupSearch:
    """Degenerate groups among ``candidates`` (ordered by score, best first) on one query."""
    return run_lockstep(scorer, [search_steps(enc, candidates, cfg)])[0]


def search_steps(enc: Encoded, candidates: Sequence[Neuron], cfg: DegenerateConfig
                 ) -> Generator[Request, tuple[float, np.ndarray], GroupSearch]:
    """:func:`find_degenerate` as a search that yields its requests (see :func:`run_lockstep`)."""
    members = [tuple(map(int, n)) for n in candidates[: cfg.max_candidates]]
    if not members:
        return GroupSearch(p0=float("nan"), n_candidates=0)
    p0, single = yield enc, [[m] for m in members]
    out = GroupSearch(p0=p0, n_candidates=len(members), n_evaluated=len(members))
    if not p0 > 0:
        return out
    out.harmless = [m for m, r in zip(members, single) if r >= cfg.t_high]
    pairs = list(combinations(out.harmless, 2))
    if pairs:
        _, ratios = yield enc, pairs
        out.n_evaluated += len(pairs)
        for pair, r in zip(pairs, ratios):
            if r < cfg.t_low:
                out.groups.append(list(pair))
                out.group_ratio.append(float(r))
    in_pair = {m for g in out.groups for m in g}
    rest = [m for m in out.harmless if m not in in_pair]
    if len(rest) >= 3 and cfg.max_group >= 3:
        group, ratio, n = yield from _grow(enc, rest, cfg)
        out.n_evaluated += n
        if group is not None:
            out.groups.append(group)
            out.group_ratio.append(ratio)
    return out


def _grow(enc: Encoded, pool: list[Neuron], cfg: DegenerateConfig
          ) -> Generator[Request, tuple[float, np.ndarray], tuple[list[Neuron] | None, float, int]]:
    """Greedy growth: add the member that lowers P most until it drops below t_low (then check that
    the group is minimal). O(pool × max_group) evaluations."""
    group: list[Neuron] = []
    evaluated = 0
    while len(group) < cfg.max_group:
        options = [m for m in pool if m not in group]
        if not options:
            break
        _, ratios = yield enc, [group + [m] for m in options]
        evaluated += len(options)
        best = int(np.nanargmin(ratios))
        group = group + [options[best]]
        if ratios[best] < cfg.t_low:
            if len(group) < 3:
                return None, float("nan"), evaluated  # pairs are the pair search's job
            _, without = yield enc, [[m for m in group if m != x] for x in group]
            evaluated += len(group)
            minimal = bool(np.all(without >= cfg.t_low))
            return (group if minimal else None), float(ratios[best]), evaluated
    return None, float("nan"), evaluated


def verify(scorer: Suppressor, enc: Encoded, group: Sequence[Neuron], cfg: DegenerateConfig) -> dict[str, float | bool]:
    """The definition re-checked on another query: every member alone harmless, the group harmful."""
    return run_lockstep(scorer, [verify_steps(enc, group, cfg)])[0]


def verify_steps(enc: Encoded, group: Sequence[Neuron], cfg: DegenerateConfig
                 ) -> Generator[Request, tuple[float, np.ndarray], dict[str, float | bool]]:
    _, ratios = yield enc, [[m] for m in group] + [list(group)]
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
                cfg: DegenerateConfig, answer_token: str = "first") -> list[DegenerateRecord]:
    """Every search of one fact: its LAKNs on each language's search query (groups then re-checked on
    the other languages' queries: is the degeneracy shared?), and each language's own set there;
    every group re-checked on the language's held-out paraphrase. The searches run together
    (:func:`run_lockstep`), then all the checks."""
    scorer = Suppressor(adapter, cfg.batch_size, rows=256, answer_token=answer_token)  # one per fact: it keeps its prompts
    scorer.prepare([*search.values(), *held_out.values()])
    runs = [(kind, lang, enc, list(sets.get(lang, [])))
            for kind, sets in (("lakn", {lang: lakns for lang in search}), ("language", own_sets))
            for lang, enc in search.items()]
    found = run_lockstep(scorer, [search_steps(enc, candidates, cfg) for _, _, enc, candidates in runs])
    checks: list[tuple[int, int, str | None]] = []  # (run, group, other language or None: held-out)
    steps = []
    for r, ((kind, lang, _, _), result) in enumerate(zip(runs, found)):
        for g, group in enumerate(result.groups):
            if lang in held_out:
                checks.append((r, g, None)), steps.append(verify_steps(held_out[lang], group, cfg))
            if kind == "lakn":
                for other, e in search.items():
                    if other != lang:
                        checks.append((r, g, other)), steps.append(verify_steps(e, group, cfg))
    outcome = dict(zip(checks, run_lockstep(scorer, steps)))
    records = []
    for r, ((kind, lang, _, _), result) in enumerate(zip(runs, found)):
        groups = range(len(result.groups))
        records.append(DegenerateRecord(
            fact_id, relation, kind, lang, result.n_candidates, len(result.harmless), result.n_evaluated, result.p0,
            [[list(n) for n in g] for g in result.groups], result.group_ratio,
            [len({l for l, _ in g}) for g in result.groups],
            [outcome[(r, g, None)] if lang in held_out else None for g in groups],
            [[o for o in search if o != lang and outcome[(r, g, o)]["holds"]] if kind == "lakn" else [] for g in groups]))
    return records


def fact_queries(adapter: ModelAdapter, queries: Sequence[Query], split: HeldOutSplit, few_shot: bool
                 ) -> tuple[dict[str, Encoded], dict[str, Encoded]]:
    """Per language: the search query (the original, lowest template) and a held-out paraphrase
    (the first held-out template), both encoded."""
    search, held_out = {}, {}
    for q in sorted(queries, key=lambda q: q.template_id):
        try:
            enc = encode_query(adapter, q, few_shot)
        except ValueError:
            continue
        if q.lang not in search:
            search[q.lang] = enc
        elif split.is_held_out(q) and q.lang not in held_out:
            held_out[q.lang] = enc
    return search, held_out


def search_facts(adapter: ModelAdapter, queries: Sequence[Query], scores: Any, lakn_sets: Mapping[str, Any],
                 split: HeldOutSplit, tau: float, few_shot: bool, cfg: DegenerateConfig,
                 answer_token: str = "first") -> list[DegenerateRecord]:
    """Every attributed fact (``scores``: its per-language scores, a :class:`matrice.method.scores.ScoreStore`):
    its LAKNs (``lakn_sets[fact]["matrice"]``) and each language's own knowledge neurons (the language's
    score above ``tau``), searched with :func:`search_fact`."""
    by_fact = defaultdict(list)
    for q in queries:
        if q.fact_id in scores:
            by_fact[q.fact_id].append(q)
    records = []
    for fact in tqdm(sorted(scores.facts), desc="degenerate", unit="fact"):
        search, held_out = fact_queries(adapter, by_fact[fact], split, few_shot)
        fs = scores[fact]
        own = {lang: [tuple(n) for n in select_by_threshold(fs.s_per_lang[k], tau).tolist()]
               for k, lang in enumerate(fs.languages)}
        lakns = [tuple(n) for n in lakn_sets[fact]["matrice"].tolist()]
        records += search_fact(adapter, fact, by_fact[fact][0].relation, search, held_out, lakns, own, cfg, answer_token)
    return records
