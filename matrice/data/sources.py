"""Read facts and templates from the embedded dataset or from mLAMA 1.1 (+ mParaRel paraphrases).

Loaders only read, validate and join; sampling, causal filtering and query building live in
`build.py`. Every problem in an input file raises `DatasetError` naming file:line; everything that
is skipped on purpose (a fact missing a language, a broken paraphrase) is counted in a `Tally`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from matrice.data.schema import DatasetError, Fact, iter_jsonl, template_problem

ALL_LANGUAGES = ["en", "fr", "zh", "fi", "hu", "ja", "ko"]
SOURCES = ("embedded", "mlama")
MPARAREL_DIRS = {"zh": "zh-hans"}  # mParaRel names its Simplified-Chinese folder differently
_MLAMA_FIELDS = ("sub_uri", "obj_uri", "sub_label", "obj_label", "lineid", "uuid")


@dataclass
class DatasetConfig:
    """What to build; every field is a `data` parameter of the pipeline."""

    source: str = "embedded"
    languages: list[str] = field(default_factory=lambda: list(ALL_LANGUAGES))
    relations: list[str] | None = None
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


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    return obj[key]


def _label(obj: dict[str, Any], key: str, where: str) -> str:
    value = _require(obj, key, where)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _checked_template(template: Any, where: str) -> str:
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
    value = _require(obj, key, where)
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
            fact_id=str(_require(obj, "fact_id", where)),
            relation=str(_require(obj, "relation", where)),
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
        relation = str(_require(obj, "relation", where))
        if relation not in relations:
            raise DatasetError(f"{where}: unknown relation {relation!r} (not in relations.jsonl)")
        lang = str(_require(obj, "lang", where))
        out[relation][lang].append(_checked_template(_require(obj, "template", where), where))
    return out


def _complete(fact: Fact, languages: list[str]) -> bool:
    return all(lang in fact.subject and lang in fact.object for lang in languages)


def load_embedded(cfg: DatasetConfig, dropped: Tally) -> SourceData:
    """The dataset shipped with matrice: relations, templates, facts and one demo per relation."""
    root = embedded_dir(cfg)
    relations_path = root / "relations.jsonl"
    known = set()
    for lineno, obj in iter_jsonl(relations_path):
        known.add(str(_require(obj, "relation", f"{relations_path}:{lineno}")))
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


# ---------------------------------------------------------------- mParaRel cleanup

_SUFFIX_BRACKET = re.compile(r"(\[[XY]\])\s?([^\W\d_]+)\]")  # fi: "[X]n]", "[X] n]", "[Y]ssä]" -> "[X]n"
_WRAPPED = re.compile(r"\[\s*(\[[XY]\])\s*\]")  # ko: "[ [X] ]" -> "[X]"
_OPEN_BEFORE = re.compile(r"\[\s+(\[[XY]\])")  # ko: "[ [X]" -> "[X]"
_CLOSE_AFTER = re.compile(r"(\[[XY]\])\s+\]")  # ko: "[Y] ]" -> "[Y]"


def _clean_brackets(pattern: str) -> str:
    """Remove stray brackets around or after a slot; joins a detached case suffix to its slot."""
    text = _SUFFIX_BRACKET.sub(r"\1\2", pattern)
    text = _WRAPPED.sub(r"\1", text)
    text = _OPEN_BEFORE.sub(r"\1", text)
    text = _CLOSE_AFTER.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _well_formed(pattern: str) -> bool:
    """Exactly one [X], one [Y], and no other square bracket."""
    if template_problem(pattern):
        return False
    rest = pattern.replace("[X]", "").replace("[Y]", "")
    return "[" not in rest and "]" not in rest


def clean_pattern(pattern: str) -> tuple[str | None, bool]:
    """(usable pattern or None, whether a repair was needed)."""
    if _well_formed(pattern):
        return pattern, False
    cleaned = _clean_brackets(pattern)
    return (cleaned, True) if _well_formed(cleaned) else (None, False)


NO_SPACE_LANGUAGES = frozenset({"zh", "ja"})


def squeeze_spaces(template: str) -> str:
    """zh/ja: drop machine-translation spaces ("[X] 的首都是 [Y]"), keeping those between two Latin words."""

    def keep(m: re.Match[str]) -> str:
        a = template[m.start() - 1] if m.start() else ""
        b = template[m.end()] if m.end() < len(template) else ""
        return " " if a.isascii() and a.isalnum() and b.isascii() and b.isalnum() else ""

    return re.sub(r"\s+", keep, template).strip()


def dedupe_key(template: str) -> str:
    """Templates differing only in case, spacing or final punctuation are the same query."""
    text = re.sub(r"\s+", " ", template).strip()
    text = re.sub(r"[\s.。!?！？]+$", "", text)
    return text.casefold()


# ---------------------------------------------------------------- mLAMA


def _mlama_languages(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "templates.jsonl").is_file())


def _mlama_templates(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        relation = str(_require(obj, "relation", where))
        if relation in out:
            raise DatasetError(f"{where}: second template for relation {relation!r}")
        out[relation] = _checked_template(_require(obj, "template", where), where)
    return out


def _mlama_relations(root: Path, lang: str, templates: dict[str, str]) -> set[str]:
    return {p.stem for p in (root / lang).glob("P*.jsonl") if p.stem in templates}


def _mlama_rows(path: Path) -> dict[str, dict[str, Any]]:
    """uuid -> row (labels stripped) of one language file of one relation."""
    rows: dict[str, dict[str, Any]] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in _MLAMA_FIELDS:
            _require(obj, key, where)
        row = {k: obj[k] for k in _MLAMA_FIELDS}
        row["sub_label"] = _label(obj, "sub_label", where)
        row["obj_label"] = _label(obj, "obj_label", where)
        uuid = str(row["uuid"])
        if uuid in rows:
            raise DatasetError(f"{where}: duplicate uuid {uuid!r}")
        rows[uuid] = row
    return rows


def _join_mlama(relation: str, per_lang: dict[str, dict[str, dict[str, Any]]], dropped: Tally) -> list[Fact]:
    """Facts present in every language, joined by uuid; lineid and URIs must agree across languages."""
    languages = list(per_lang)
    every = set.union(*(set(rows) for rows in per_lang.values()))
    complete = set.intersection(*(set(rows) for rows in per_lang.values()))
    dropped.add("facts_missing_language", relation, len(every - complete))
    facts = []
    for uuid in complete:
        rows = [per_lang[lang][uuid] for lang in languages]
        if len({(str(r["lineid"]), r["sub_uri"], r["obj_uri"]) for r in rows}) != 1:
            dropped.add("facts_join_mismatch", relation)
            continue
        if any("<!--" in r["sub_label"] or "<!--" in r["obj_label"] for r in rows):
            dropped.add("facts_markup_in_label", relation)  # e.g. a wiki comment pasted into a ja label
            continue
        facts.append(Fact(
            fact_id=f"{relation}-{rows[0]['lineid']}",
            relation=relation,
            subject={lang: r["sub_label"] for lang, r in zip(languages, rows)},
            object={lang: r["obj_label"] for lang, r in zip(languages, rows)},
        ))
    return sorted(facts, key=lambda f: _lineid_key(f.fact_id))


def _lineid_key(fact_id: str) -> tuple[int, str]:
    tail = fact_id.rsplit("-", 1)[-1]
    return (int(tail), fact_id) if tail.isdigit() else (10**12, fact_id)


def _mpararel_patterns(root: Path, lang: str, relation: str, dropped: Tally, repaired: Tally) -> list[str]:
    """Paraphrase patterns of one relation/language, repaired where safe; missing files mean none."""
    lang_dir = root / MPARAREL_DIRS.get(lang, lang)
    if not lang_dir.is_dir():
        raise DatasetError(f"DatasetConfig.mpararel_dir: no folder {lang_dir} for language {lang!r}")
    path = lang_dir / f"{relation}.jsonl"
    if not path.is_file():
        return []
    out = []
    for lineno, obj in iter_jsonl(path):
        raw = _require(obj, "pattern", f"{path}:{lineno}")
        pattern, fixed = clean_pattern(str(raw))
        if pattern is None:
            dropped.add("templates_malformed", f"{relation}/{lang}")
            continue
        if fixed:
            repaired.add("templates_stray_brackets", f"{relation}/{lang}")
        if lang in NO_SPACE_LANGUAGES and squeeze_spaces(pattern) != pattern:
            repaired.add("templates_cjk_spaces", f"{relation}/{lang}")
            pattern = squeeze_spaces(pattern)
        out.append(pattern)
    return out


def _dedupe(templates: list[str], where: str, dropped: Tally) -> list[str]:
    seen, out = set(), []
    for t in templates:
        key = dedupe_key(t)
        if key in seen:
            dropped.add("templates_duplicate", where)
            continue
        seen.add(key)
        out.append(t)
    return out


def _available_mlama_relations(root: Path, languages: list[str], templates: dict[str, dict[str, str]]) -> tuple[set[str], set[str]]:
    per_lang = [_mlama_relations(root, lang, templates[lang]) for lang in languages]
    return set.intersection(*per_lang), set.union(*per_lang)


def load_mlama(cfg: DatasetConfig, dropped: Tally, repaired: Tally) -> SourceData:
    """mLAMA 1.1 facts joined across languages; templates = mLAMA's first, then mParaRel's."""
    root = Path(cfg.mlama_dir or "")
    languages = select(cfg.languages, _mlama_languages(root), "languages", "language")
    templates = {lang: _mlama_templates(root / lang / "templates.jsonl") for lang in languages}
    in_all, in_any = _available_mlama_relations(root, languages, templates)
    if cfg.relations is not None:
        select(cfg.relations, in_any, "relations", "relation")
        partial = [r for r in cfg.relations if r not in in_all]
        if partial:
            raise DatasetError(
                f"DatasetConfig.relations: {partial} lack a facts file or template in some of the languages "
                f"{languages}; relations available in all of them: {sorted(in_all, key=relation_sort_key)}")
    else:
        for r in in_any - in_all:
            dropped.add("relations_missing_in_language", r)
    relations = select(cfg.relations, in_all, "relations", "relation")
    facts, tmpl = {}, {}
    for r in relations:
        per_lang = {lang: _mlama_rows(root / lang / f"{r}.jsonl") for lang in languages}
        facts[r] = _join_mlama(r, per_lang, dropped)
        tmpl[r] = {}
        for lang in languages:
            extra = _mpararel_patterns(Path(cfg.mpararel_dir), lang, r, dropped, repaired) if cfg.mpararel_dir else []
            tmpl[r][lang] = _dedupe([templates[lang][r], *extra], f"{r}/{lang}", dropped)
    return SourceData(languages, relations, cfg.relations is not None, facts, tmpl, demos={})


def load_source(cfg: DatasetConfig, dropped: Tally, repaired: Tally) -> SourceData:
    if cfg.source == "embedded":
        return load_embedded(cfg, dropped)
    return load_mlama(cfg, dropped, repaired)
