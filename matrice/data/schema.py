"""Records shared by the whole pipeline: facts, queries, and how a template becomes a query.

A fact carries its labels in every language; a query is one (fact, language, template). Every
field a model needs is precomputed here so downstream stages never re-parse templates.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

X = "[X]"
Y = "[Y]"
_SLOT = re.compile(r"\[X\]|\[Y\]")


class DatasetError(ValueError):
    """Bad input data or configuration; the message names the file:line or the parameter."""


@dataclass(frozen=True)
class Fact:
    """A (subject, relation, object) triple with labels keyed by language code."""

    fact_id: str
    relation: str
    subject: dict[str, str]
    object: dict[str, str]


@dataclass(frozen=True)
class Query:
    """One cloze query of a fact in one language with one template (see module docstring)."""

    query_id: str
    fact_id: str
    relation: str
    lang: str
    template_id: int
    template: str
    prompt: str
    cloze: str
    answer: str
    answer_sep: str
    subject: str
    prefix: str


def template_problem(template: str) -> str | None:
    """Why a template cannot be used (None if it can): exactly one [X] and one [Y] are needed."""
    nx, ny = template.count(X), template.count(Y)
    if nx != 1 or ny != 1:
        return f"template must contain exactly one [X] and one [Y] (found {nx} [X], {ny} [Y]): {template!r}"
    return None


def x_after_y(template: str) -> bool:
    """True when the subject comes after the blank: such a template cannot serve a causal model."""
    return template.index(X) > template.index(Y)


def fill_template(template: str, subject: str, obj: str) -> str:
    """Fill [X] and [Y] in one pass, so labels that themselves contain brackets stay intact."""
    return _SLOT.sub(lambda m: subject if m.group(0) == X else obj, template)


def _fill_subject(template: str, subject: str) -> str:
    return _SLOT.sub(lambda m: subject if m.group(0) == X else Y, template)


def make_query(fact: Fact, lang: str, template_id: int, template: str, demo: Fact | None) -> Query:
    """Build the query of `fact` in `lang`; `demo` (another fact of the relation) gives the one-shot prefix."""
    problem = template_problem(template)
    if problem:
        raise DatasetError(problem)
    if demo is not None and demo.fact_id == fact.fact_id:
        raise DatasetError(f"fact {fact.fact_id}: the demonstration fact must differ from the queried fact")
    subject = fact.subject[lang]
    cut = template.index(Y)
    before = template[:cut]
    prefix = ""
    if demo is not None:
        prefix = fill_template(template, demo.subject[lang], demo.object[lang]).strip() + "\n"
    return Query(
        query_id=f"{fact.fact_id}|{lang}|{template_id}",
        fact_id=fact.fact_id,
        relation=fact.relation,
        lang=lang,
        template_id=template_id,
        template=template,
        prompt=_fill_subject(before, subject).rstrip(),
        cloze=_fill_subject(template, subject),
        answer=fact.object[lang],
        answer_sep=" " if before[-1:].isspace() else "",
        subject=subject,
        prefix=prefix,
    )


def fact_to_dict(fact: Fact) -> dict[str, Any]:
    return asdict(fact)


def fact_from_dict(d: dict[str, Any]) -> Fact:
    return Fact(fact_id=d["fact_id"], relation=d["relation"], subject=dict(d["subject"]), object=dict(d["object"]))


def query_to_dict(query: Query) -> dict[str, Any]:
    return asdict(query)


def query_from_dict(d: dict[str, Any]) -> Query:
    return Query(**{name: d[name] for name in Query.__dataclass_fields__})


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise with file:line."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from e
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _load(path: str | Path, convert, what: str) -> list:
    rows = []
    for lineno, obj in iter_jsonl(path):
        try:
            rows.append(convert(obj))
        except KeyError as e:
            raise DatasetError(f"{path}:{lineno}: missing field {e.args[0]!r} in {what}") from e
        except TypeError as e:
            raise DatasetError(f"{path}:{lineno}: bad {what}: {e}") from e
    return rows


def load_facts(path: str | Path) -> list[Fact]:
    """Read a facts.jsonl written by `write_dataset`."""
    return _load(path, fact_from_dict, "fact")


def load_queries(path: str | Path) -> list[Query]:
    """Read a queries.jsonl written by `write_dataset`."""
    return _load(path, query_from_dict, "query")
