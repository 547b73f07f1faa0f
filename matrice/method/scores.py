"""Group raw per-query attributions by fact and language, aggregate them, and store the score maps
(one file per fact, so neither writing nor reading ever holds a whole run's maps)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from matrice.data.schema import Query
from matrice.io import atomic_save_npz, atomic_write_json, safe_stem
from matrice.method.uncertainty import AggregationConfig, FactScores, aggregate_fact


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
                     cfg: AggregationConfig, languages: Sequence[str]) -> Iterator[tuple[str, FactScores]]:
    """:func:`aggregate_all` over (fact, {query id: raw map}) pairs as they are read (one attribution
    shard at a time; ``amig_maps(fact)`` gives that fact's AMIG maps), yielding each fact's scores
    as it is done: memory holds one fact's maps, not the whole run's."""
    by_fact: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        by_fact[q.fact_id].append(q)
    for fact, raw in tqdm(fact_maps, desc="aggregate", unit="fact"):
        amig = group_by_fact(by_fact[fact], amig_maps(fact)) if amig_maps is not None else None
        yield from aggregate_all(group_by_fact(by_fact[fact], raw), cfg, languages, amig, progress=False).items()


INDEX = "index.json"
_MAPS = ("S", "s_per_lang", "first_query_norm", "S_wo_uaq", "amig_norm", "S_leave_out")


def save_scores(out_dir: Path, scores: Iterable[tuple[str, FactScores]]) -> None:
    """One compressed file per fact, written as each arrives (a paper-scale run's maps, ~25 MB per
    fact of a 7B model, never sit in memory together), then the index readers open. The old index
    goes first, so a crash leaves a directory no reader takes as finished; files of facts no longer
    in the run are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX).unlink(missing_ok=True)
    files: dict[str, str] = {}
    languages: list[str] | None = None
    with_amig: set[bool] = set()
    for fact, fs in scores:
        files[fact] = f"scores-{safe_stem(fact)}.npz"
        languages = languages or list(fs.languages)
        with_amig.add(fs.amig_norm is not None)
        maps = {name: getattr(fs, name) for name in _MAPS if getattr(fs, name) is not None}
        atomic_save_npz(out_dir / files[fact], languages=np.array(fs.languages),
                        **{name: np.asarray(m, dtype=np.float32) for name, m in maps.items()})
    if not files:
        raise ValueError("no fact to save: the attribution stage produced nothing")
    if len(with_amig) > 1:
        raise ValueError("AMIG maps exist for some facts only")
    for stale in set(out_dir.glob("scores-*.npz")) - {out_dir / f for f in files.values()}:
        stale.unlink()
    atomic_write_json(out_dir / INDEX, {"languages": languages, "files": dict(sorted(files.items()))})


class ScoreStore:
    """The per-fact score maps `save_scores` wrote, read one fact at a time, in fact-id order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if not index.exists():
            raise FileNotFoundError(f"{index} is missing: the aggregate stage has not finished (dvc repro)")
        data = json.loads(index.read_text(encoding="utf-8"))
        self.languages: list[str] = data["languages"]
        self._files: dict[str, str] = data["files"]

    @property
    def facts(self) -> list[str]:
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, fact: object) -> bool:
        return fact in self._files

    def __getitem__(self, fact: str) -> FactScores:
        with np.load(self.path / self._files[fact]) as d:
            maps = {name: d[name] if name in d else None for name in _MAPS}
            return FactScores([str(x) for x in d["languages"]], **maps)

    def items(self) -> Iterator[tuple[str, FactScores]]:
        for fact in self._files:
            yield fact, self[fact]
