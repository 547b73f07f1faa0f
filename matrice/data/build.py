"""Turn a source into the pipeline's dataset: filters, sampling, demos, queries, and the files on disk.

`build_dataset` does all validation and filtering in memory and raises `DatasetError` before
anything is written; `write_dataset` then writes every file atomically.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

from matrice.data.schema import DatasetError, Fact, Query, fact_to_dict, make_query, query_to_dict, x_after_y
from matrice.data.sources import DatasetConfig, SourceData, Tally, load_source
from matrice.io import atomic_write_json, atomic_write_text, write_jsonl


@dataclass
class BuiltDataset:
    """Everything `write_dataset` needs, plus the counts that explain what was left out."""

    config: DatasetConfig
    languages: list[str]
    relations: list[str]
    facts: list[Fact]
    queries: list[Query]
    demos: dict[str, Fact]
    templates: dict[str, dict[str, list[str]]]
    available_facts: dict[str, int]  # facts with labels in every chosen language, before sampling
    dropped: dict[str, int]
    repaired: dict[str, int]
    dropped_detail: dict[str, dict[str, int]]
    repaired_detail: dict[str, dict[str, int]]


# ---------------------------------------------------------------- zh script


@lru_cache(maxsize=1)
def _t2s() -> Callable[[str], str]:
    try:
        from opencc import OpenCC
    except ImportError as e:  # pragma: no cover - opencc is a declared dependency
        raise DatasetError("DatasetConfig.zh_simplified: needs the 'opencc' package (pip install opencc)") from e
    return OpenCC("t2s").convert


def to_simplified(text: str) -> str:
    """Traditional -> Simplified Chinese (OpenCC t2s, offline); mLAMA's zh labels mix both scripts."""
    return _t2s()(text)


def _simplify_fact(fact: Fact, repaired: Tally) -> Fact:
    subject, obj = dict(fact.subject), dict(fact.object)
    for labels in (subject, obj):
        converted = to_simplified(labels["zh"])
        if converted != labels["zh"]:
            repaired.add("zh_labels_to_simplified", fact.relation)
            labels["zh"] = converted
    return replace(fact, subject=subject, object=obj)


def _simplify(src: SourceData, repaired: Tally) -> None:
    for r in src.relations:
        src.facts[r] = [_simplify_fact(f, repaired) for f in src.facts[r]]
        src.templates[r]["zh"] = [to_simplified(t) for t in src.templates[r]["zh"]]
    src.demos = {r: _simplify_fact(d, Tally()) for r, d in src.demos.items()}


# ---------------------------------------------------------------- filters


def _prune(src: SourceData, empty: Callable[[str], str | None], reason: str, dropped: Tally, by: str) -> None:
    """Drop relations `empty` complains about: an error for explicitly requested ones, counted otherwise.

    `by` names the filter, so an empty result says which one emptied it.
    """
    for r in list(src.relations):
        problem = empty(r)
        if problem is None:
            continue
        if src.explicit_relations:
            raise DatasetError(problem)
        dropped.add(reason, r)
        src.relations.remove(r)
    if not src.relations:
        raise DatasetError(f"empty dataset: {by} left no relation (languages {src.languages})")


def _filter_templates(src: SourceData, cfg: DatasetConfig, dropped: Tally) -> None:
    for r in src.relations:
        for lang in src.languages:
            kept = src.templates[r][lang]
            if cfg.causal:
                causal = [t for t in kept if not x_after_y(t)]
                dropped.add("templates_x_after_y", f"{r}/{lang}", len(kept) - len(causal))
                kept = causal
            if cfg.max_templates_per_language is not None:
                dropped.add("templates_over_max", f"{r}/{lang}", len(kept) - cfg.max_templates_per_language)
                kept = kept[: cfg.max_templates_per_language]
            src.templates[r][lang] = kept

    def no_template(r: str) -> str | None:
        missing = [lang for lang in src.languages if not src.templates[r][lang]]
        if not missing:
            return None
        return (f"DatasetConfig.causal: relation {r} has no template with [X] before [Y] in {missing}"
                if cfg.causal else f"relation {r} has no template in {missing}")

    by = "the causal template filter (DatasetConfig.causal)" if cfg.causal else "template filtering"
    _prune(src, no_template, "relations_without_templates", dropped, by)


def _drop_demo_twins(src: SourceData, dropped: Tally) -> None:
    """A fact identical to its relation's demonstration would be answered by the prefix."""
    for r, demo in src.demos.items():
        if r not in src.facts:
            continue
        keep = [f for f in src.facts[r] if (f.subject, f.object) != (demo.subject, demo.object)]
        dropped.add("facts_equal_to_demo", r, len(src.facts[r]) - len(keep))
        src.facts[r] = keep


def _reserve_demos(src: SourceData, dropped: Tally) -> None:
    """mLAMA has no separate demo file: the first complete fact of a relation becomes its demo."""
    for r in src.relations:
        if r in src.demos or len(src.facts[r]) < 2:
            continue
        src.demos[r] = src.facts[r][0]
        src.facts[r] = src.facts[r][1:]
        dropped.add("facts_reserved_as_demo", r)


def sample_facts(facts: list[Fact], k: int | None, seed: int, relation: str) -> list[Fact]:
    """A seeded sample of at most k facts, kept in source order (same seed, same sample, any run)."""
    if k is None or len(facts) <= k:
        return list(facts)
    rng = random.Random(f"{seed}:{relation}")
    chosen = sorted(rng.sample(range(len(facts)), k))
    return [facts[i] for i in chosen]


# ---------------------------------------------------------------- build


def _queries(src: SourceData) -> list[Query]:
    out = []
    for r in src.relations:
        demo = src.demos.get(r)
        for fact in src.facts[r]:
            for lang in src.languages:
                for tid, template in enumerate(src.templates[r][lang]):
                    out.append(make_query(fact, lang, tid, template, demo))
    return out


def build_dataset(cfg: DatasetConfig) -> BuiltDataset:
    """Read, filter, sample and expand into queries; raises DatasetError before anything is written."""
    cfg.validate()
    dropped, repaired = Tally(), Tally()
    src = load_source(cfg, dropped, repaired)
    if cfg.zh_simplified and "zh" in src.languages:
        _simplify(src, repaired)
    available = {r: len(src.facts[r]) for r in src.relations}
    if not any(available.values()):
        raise DatasetError(
            f"no fact of relations {src.relations} has labels in every language of DatasetConfig.languages {src.languages}")
    _prune(src, lambda r: None if src.facts[r] else
           f"DatasetConfig.languages: relation {r} has no fact with labels in all of {src.languages}",
           "relations_without_complete_facts", dropped, "the language filter (DatasetConfig.languages)")
    _filter_templates(src, cfg, dropped)
    _drop_demo_twins(src, dropped)
    _reserve_demos(src, dropped)
    for r in src.relations:
        sampled = sample_facts(src.facts[r], cfg.max_facts_per_relation, cfg.seed, r)
        dropped.add("facts_over_max_per_relation", r, len(src.facts[r]) - len(sampled))
        src.facts[r] = sampled
    _prune(src, lambda r: None if src.facts[r] else f"relation {r} has no fact left besides its demonstration",
           "relations_without_facts", dropped, "reserving demonstration facts")
    queries = _queries(src)
    return BuiltDataset(
        config=cfg,
        languages=list(src.languages),
        relations=list(src.relations),
        facts=[f for r in src.relations for f in src.facts[r]],
        queries=queries,
        demos={r: src.demos[r] for r in src.relations if r in src.demos},
        templates={r: src.templates[r] for r in src.relations},
        available_facts={r: available[r] for r in src.relations},
        dropped=dropped.as_dict(),
        repaired=repaired.as_dict(),
        dropped_detail=dropped.detail_dict(),
        repaired_detail=repaired.detail_dict(),
    )


def write_dataset(ds: BuiltDataset, out_dir: str | Path) -> None:
    """Write facts.jsonl, queries.jsonl, dropped.json, stats.json, stats.md (each atomically).

    Everything is rendered in memory first, so a failure here also leaves nothing half-written.
    """
    from matrice.data.stats import compute_stats, stats_markdown

    stats = compute_stats(ds)
    markdown = stats_markdown(stats)
    json.dumps(stats)  # fail before writing if something is not serialisable
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "facts.jsonl", [fact_to_dict(f) for f in ds.facts])
    write_jsonl(out / "queries.jsonl", [query_to_dict(q) for q in ds.queries])
    atomic_write_json(out / "dropped.json", ds.dropped)
    atomic_write_json(out / "stats.json", stats)
    atomic_write_text(out / "stats.md", markdown)


def main(argv: list[str] | None = None) -> None:
    """`python -m matrice.data --params params.yaml --out DIR`: build from the `dataset` section (the
    seed is params.yaml's top-level `seed`, as the build_dataset stage uses it)."""
    from matrice.io import read_params

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="dataset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    params = read_params(args.params)
    section = params.get(args.section)
    if not isinstance(section, dict):
        raise SystemExit(f"{args.params}: no '{args.section}' section")
    ds = build_dataset(DatasetConfig.from_dict({**section, "seed": params.get("seed", 0)}))
    write_dataset(ds, args.out)
    print(f"{len(ds.facts)} facts, {len(ds.queries)} queries -> {args.out}")


if __name__ == "__main__":
    main()
