"""The held-out split, defined once: which paraphrases localise a fact and which only ever score it.

A fact's templates in a language are numbered from 0 (the original query). Templates below
``localisation`` (`attribute.templates_per_language`) are attributed and select the neurons; the
others are *held out*: experiments score them, selection never sees them. ``None`` attributes every
template, so nothing is held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from matrice.data.schema import Query


@dataclass(frozen=True)
class HeldOutSplit:
    localisation: int | None = 3

    def __post_init__(self) -> None:
        if self.localisation is not None and (not isinstance(self.localisation, int) or self.localisation < 1):
            raise ValueError(f"attribute.templates_per_language must be an integer >= 1 or null, got {self.localisation!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "HeldOutSplit":
        return cls(params["attribute"]["templates_per_language"])

    def localises(self, query: Query) -> bool:
        return self.localisation is None or query.template_id < self.localisation

    def is_held_out(self, query: Query) -> bool:
        return not self.localises(query)

    def first_held_out(self, queries: Iterable[Query]) -> dict[tuple[str, str], Query]:
        """(fact, language) -> its lowest held-out template: the one paraphrase a per-language check reads."""
        chosen: dict[tuple[str, str], Query] = {}
        for q in sorted(queries, key=lambda q: q.template_id):
            if self.is_held_out(q):
                chosen.setdefault((q.fact_id, q.lang), q)
        return chosen
