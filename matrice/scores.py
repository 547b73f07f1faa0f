"""Group raw per-query attributions by fact and language, aggregate them, and store the score maps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from matrice.data.schema import Query
from matrice.io import atomic_save_npz
from matrice.uncertainty import AggregationConfig, FactScores, aggregate_fact


def group_by_fact(queries: Sequence[Query], raw: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{fact: {lang: [T, L, N]}} with rows ordered by template id, so row 0 is the original query.
    Only queries that were attributed take part."""
    rows: dict[str, dict[str, list[tuple[int, np.ndarray]]]] = defaultdict(lambda: defaultdict(list))
    for q in queries:
        if q.query_id in raw:
            rows[q.fact_id][q.lang].append((q.template_id, raw[q.query_id]))
    return {
        fact: {lang: np.stack([a for _, a in sorted(items, key=lambda t: t[0])]) for lang, items in langs.items()}
        for fact, langs in rows.items()
    }


def aggregate_all(grouped: Mapping[str, Mapping[str, np.ndarray]], cfg: AggregationConfig, languages: Sequence[str],
                  amig_grouped: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                  progress: bool = True) -> dict[str, FactScores]:
    """Aggregate every fact over `languages`; a fact missing one of them is an error naming both.
    `amig_grouped` (AMIG's own attribution of the first queries, grouped like `grouped`) must then
    cover every fact."""
    out: dict[str, FactScores] = {}
    for fact, per_lang in tqdm(sorted(grouped.items()), desc="aggregate", unit="fact", disable=not progress):
        missing = [lang for lang in languages if lang not in per_lang]
        if missing:
            raise ValueError(f"fact {fact} has no attributed query in language(s) {missing}")
        amig_first = None
        if amig_grouped is not None:
            if fact not in amig_grouped:
                raise ValueError(f"fact {fact} has no AMIG attribution")
            amig_first = {lang: rows[0] for lang, rows in amig_grouped[fact].items()}
        out[fact] = aggregate_fact({lang: per_lang[lang] for lang in languages}, cfg, amig_first)
    return out


def aggregate_stream(fact_maps: Iterable[tuple[str, Mapping[str, np.ndarray]]],
                     amig_maps: Callable[[str], Mapping[str, np.ndarray]] | None, queries: Sequence[Query],
                     cfg: AggregationConfig, languages: Sequence[str]) -> dict[str, FactScores]:
    """:func:`aggregate_all` over (fact, {query id: raw map}) pairs as they are read (one attribution
    shard at a time; ``amig_maps(fact)`` gives that fact's AMIG maps), so memory holds one fact's raw
    maps, not the whole run's."""
    by_fact: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        by_fact[q.fact_id].append(q)
    out: dict[str, FactScores] = {}
    for fact, raw in tqdm(fact_maps, desc="aggregate", unit="fact"):
        amig = group_by_fact(by_fact[fact], amig_maps(fact)) if amig_maps is not None else None
        out.update(aggregate_all(group_by_fact(by_fact[fact], raw), cfg, languages, amig, progress=False))
    return out


def save_scores(path: Path, scores: Mapping[str, FactScores]) -> None:
    facts = sorted(scores)
    if not facts:
        raise ValueError("no fact to save: the attribution stage produced nothing")
    langs = scores[facts[0]].languages
    atomic_save_npz(
        path,
        fact_ids=np.array(facts),
        languages=np.array(langs),
        S=np.stack([scores[f].S for f in facts]).astype(np.float32),
        S_wo_uaq=np.stack([scores[f].S_wo_uaq for f in facts]).astype(np.float32),
        s_per_lang=np.stack([scores[f].s_per_lang for f in facts]).astype(np.float32),
        first_query_norm=np.stack([scores[f].first_query_norm for f in facts]).astype(np.float32),
        **_amig_arrays(scores, facts),
        **({"S_leave_out": np.stack([scores[f].S_leave_out for f in facts]).astype(np.float32)}
           if scores[facts[0]].S_leave_out is not None else {}),
    )


def _amig_arrays(scores: Mapping[str, FactScores], facts: Sequence[str]) -> dict[str, np.ndarray]:
    have = [scores[f].amig_norm is not None for f in facts]
    if not any(have):
        return {}
    if not all(have):
        raise ValueError("AMIG maps exist for some facts only")
    return {"amig_norm": np.stack([scores[f].amig_norm for f in facts]).astype(np.float32)}


def load_scores(path: Path) -> dict[str, FactScores]:
    with np.load(path) as d:
        langs = [str(x) for x in d["languages"]]
        return {
            str(f): FactScores(langs, d["S"][i], d["s_per_lang"][i], d["first_query_norm"][i], d["S_wo_uaq"][i],
                               d["amig_norm"][i] if "amig_norm" in d else None,
                               d["S_leave_out"][i] if "S_leave_out" in d else None)
            for i, f in enumerate(d["fact_ids"])
        }
