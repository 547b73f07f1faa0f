"""Read facts and templates from the embedded dataset or from mLAMA 1.1 (+ mParaRel paraphrases,
`matrice/data/mlama.py`).

Loaders only read, validate and join; sampling, causal filtering and query building live in
`build.py`. Every problem in an input file raises `DatasetError` naming file:line; everything that
is skipped on purpose (a fact missing a language, a broken paraphrase) is counted in a `Tally`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from matrice.data.schema import DatasetError, Fact, iter_jsonl, template_problem

ALL_LANGUAGES = ["en", "fr", "zh", "fi", "hu", "ja", "ko"]
SOURCES = ("embedded", "mlama")


@dataclass
class DatasetConfig:
    """What to build; every field is a `data` parameter of the pipeline."""

    source: str = "embedded"
    languages: list[str] = field(default_factory=lambda: list(ALL_LANGUAGES))
    relations: list[str] | None = None  # None: every relation
    max_facts_per_relation: int | None = None
    max_templates_per_language: int | None = 4
    seed: int = 0
    causal: bool = True
    zh_simplified: bool = True
    mlama_dir: str | None = None
    mpararel_dir: str | None = None
    embedded_dir: str | None = None  # None = the copy shipped inside the package

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetConfig":
        """Build from a params.yaml section; unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DatasetError(f"DatasetConfig: unknown parameter(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check types and ranges up front so a bad parameter fails before any file is read."""
        if self.source not in SOURCES:
            raise DatasetError(f"DatasetConfig.source: {self.source!r} is not one of {list(SOURCES)}")
        for name in ("languages", "relations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                raise DatasetError(f"DatasetConfig.{name}: need a list of strings, got {value!r}")
        for name in ("causal", "zh_simplified"):
            if not isinstance(getattr(self, name), bool):
                raise DatasetError(f"DatasetConfig.{name}: need true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DatasetError(f"DatasetConfig.seed: need an integer, got {self.seed!r}")
        if not self.languages or len(set(self.languages)) != len(self.languages):
            raise DatasetError(f"DatasetConfig.languages: need a non-empty list without repeats, got {self.languages}")
        if self.relations is not None and (not self.relations or len(set(self.relations)) != len(self.relations)):
            raise DatasetError(f"DatasetConfig.relations: need null or a non-empty list without repeats, got {self.relations}")
        for name in ("max_facts_per_relation", "max_templates_per_language"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DatasetError(f"DatasetConfig.{name}: need null or an integer >= 1, got {value!r}")
        if self.source == "mlama":
            if not self.mlama_dir or not Path(self.mlama_dir).is_dir():
                raise DatasetError(f"DatasetConfig.mlama_dir: {self.mlama_dir!r} is not a directory")
            if self.mpararel_dir and not Path(self.mpararel_dir).is_dir():
                raise DatasetError(f"DatasetConfig.mpararel_dir: {self.mpararel_dir!r} is not a directory")


class Tally:
    """Counts of what was dropped or repaired and why, with a per relation/language breakdown."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.detail: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, reason: str, where: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.totals[reason] += n
        if where:
            self.detail[reason][where] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.totals.items()))

    def detail_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(sorted(v.items())) for k, v in sorted(self.detail.items())}


@dataclass
class SourceData:
    """Facts (complete in the chosen languages) and templates per relation, before sampling/filters."""

    languages: list[str]
    relations: list[str]
    explicit_relations: bool
    facts: dict[str, list[Fact]]
    templates: dict[str, dict[str, list[str]]]
    demos: dict[str, Fact]


def relation_sort_key(relation: str) -> tuple[int, str]:
    """P17 before P138: numeric order of Wikidata property ids, then text."""
    digits = relation[1:]
    return (int(digits), relation) if digits.isdigit() else (10**9, relation)


def select(requested: list[str] | None, available: Iterable[str], param: str, what: str) -> list[str]:
    """The requested names (all available ones if None); unknown names raise naming the parameter."""
    available = sorted(set(available), key=relation_sort_key if what == "relation" else str)
    if requested is None:
        return available
    unknown = [r for r in requested if r not in available]
    if unknown:
        raise DatasetError(f"DatasetConfig.{param}: unknown {what}(s) {unknown}; available: {available}")
    return list(requested)


def require_field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    return obj[key]


def label_field(obj: dict[str, Any], key: str, where: str) -> str:
    value = require_field(obj, key, where)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def checked_template(template: Any, where: str) -> str:
    if not isinstance(template, str):
        raise DatasetError(f"{where}: field 'template' must be a string, got {template!r}")
    problem = template_problem(template)
    if problem:
        raise DatasetError(f"{where}: {problem}")
    return template


# ---------------------------------------------------------------- embedded


def embedded_dir(cfg: DatasetConfig) -> Path:
    """Where the embedded dataset lives: the packaged copy unless the config points elsewhere."""
    if cfg.embedded_dir:
        return Path(cfg.embedded_dir)
    return Path(str(resources.files("matrice.data") / "embedded"))


def _labels(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = require_field(obj, key, where)
    if not isinstance(value, dict) or not value:
        raise DatasetError(f"{where}: field {key!r} must be a non-empty object of language -> label")
    out = {}
    for lang, label in value.items():
        if not isinstance(label, str) or not label.strip():
            raise DatasetError(f"{where}: {key}[{lang!r}] must be a non-empty string, got {label!r}")
        out[lang] = label.strip()
    return out


def _read_embedded_facts(path: Path, relations: set[str]) -> list[tuple[str, Fact]]:
    """(file:line, fact) for every row; ids must be unique and relations known."""
    out, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        fact = Fact(
            fact_id=str(require_field(obj, "fact_id", where)),
            relation=str(require_field(obj, "relation", where)),
            subject=_labels(obj, "subject", where),
            object=_labels(obj, "object", where),
        )
        if fact.relation not in relations:
            raise DatasetError(f"{where}: unknown relation {fact.relation!r} (not in relations.jsonl)")
        if fact.fact_id in seen:
            raise DatasetError(f"{where}: duplicate fact_id {fact.fact_id!r}")
        seen.add(fact.fact_id)
        out.append((where, fact))
    return out


def _read_embedded_templates(path: Path, relations: set[str]) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        relation = str(require_field(obj, "relation", where))
        if relation not in relations:
            raise DatasetError(f"{where}: unknown relation {relation!r} (not in relations.jsonl)")
        lang = str(require_field(obj, "lang", where))
        out[relation][lang].append(checked_template(require_field(obj, "template", where), where))
    return out


def _complete(fact: Fact, languages: list[str]) -> bool:
    return all(lang in fact.subject and lang in fact.object for lang in languages)


RELATION_FLAGS = ("copyable", "many_answers")


def relation_flags(source: str) -> dict[str, frozenset[str]]:
    """Relation -> the flags the dataset sets true for it (``RELATION_FLAGS``; embedded relations.jsonl).
    Other sources carry none: every relation counts as plain recall."""
    if source != "embedded":
        return {}
    path = Path(str(resources.files("matrice.data") / "embedded")) / "relations.jsonl"
    return {str(require_field(obj, "relation", f"{path}:{lineno}")): frozenset(f for f in RELATION_FLAGS if obj.get(f) is True)
            for lineno, obj in iter_jsonl(path)}


def load_embedded(cfg: DatasetConfig, dropped: Tally) -> SourceData:
    """The dataset shipped with matrice: relations, templates, facts and one demo per relation."""
    root = embedded_dir(cfg)
    relations_path = root / "relations.jsonl"
    known = set()
    for lineno, obj in iter_jsonl(relations_path):
        known.add(str(require_field(obj, "relation", f"{relations_path}:{lineno}")))
    templates = _read_embedded_templates(root / "templates.jsonl", known)
    languages = select(cfg.languages, {lang for per in templates.values() for lang in per}, "languages", "language")
    relations = select(cfg.relations, known, "relations", "relation")
    facts: dict[str, list[Fact]] = {r: [] for r in relations}
    for _, fact in _read_embedded_facts(root / "facts.jsonl", known):
        if fact.relation not in facts:
            continue
        if _complete(fact, languages):
            facts[fact.relation].append(fact)
        else:
            dropped.add("facts_missing_language", fact.relation)
    demos = {}
    for where, demo in _read_embedded_facts(root / "demos.jsonl", known):
        if demo.relation in facts and _complete(demo, languages):
            demos[demo.relation] = demo
    return SourceData(
        languages=languages,
        relations=relations,
        explicit_relations=cfg.relations is not None,
        facts=facts,
        templates={r: {lang: list(templates.get(r, {}).get(lang, [])) for lang in languages} for r in relations},
        demos=demos,
    )


def load_source(cfg: DatasetConfig, dropped: Tally, repaired: Tally) -> SourceData:
    if cfg.source == "embedded":
        return load_embedded(cfg, dropped)
    from matrice.data.mlama import load_mlama  # it reads this module's records and checks

    return load_mlama(cfg, dropped, repaired)
