"""mLAMA 1.1 facts joined across languages, with mParaRel's paraphrases cleaned and deduplicated
(the checks and records of `matrice.data.sources`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from matrice.data.schema import DatasetError, Fact, iter_jsonl, template_problem
from matrice.data.sources import (DatasetConfig, SourceData, Tally, checked_template, label_field, relation_sort_key,
                                  require_field, select)

MPARAREL_DIRS = {"zh": "zh-hans"}  # mParaRel names its Simplified-Chinese folder differently
_MLAMA_FIELDS = ("sub_uri", "obj_uri", "sub_label", "obj_label", "lineid", "uuid")

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
        relation = str(require_field(obj, "relation", where))
        if relation in out:
            raise DatasetError(f"{where}: second template for relation {relation!r}")
        out[relation] = checked_template(require_field(obj, "template", where), where)
    return out


def _mlama_relations(root: Path, lang: str, templates: dict[str, str]) -> set[str]:
    return {p.stem for p in (root / lang).glob("P*.jsonl") if p.stem in templates}


def _mlama_rows(path: Path) -> dict[str, dict[str, Any]]:
    """uuid -> row (labels stripped) of one language file of one relation."""
    rows: dict[str, dict[str, Any]] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in _MLAMA_FIELDS:
            require_field(obj, key, where)
        row = {k: obj[k] for k in _MLAMA_FIELDS}
        row["sub_label"] = label_field(obj, "sub_label", where)
        row["obj_label"] = label_field(obj, "obj_label", where)
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
        raw = require_field(obj, "pattern", f"{path}:{lineno}")
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
