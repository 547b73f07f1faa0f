"""Every experiment's claims in the report's order: the verdict table is this list, judged.

Each experiment states its own claims next to its run (`claims` functions in its module); this
registry only gathers them, so adding an experiment's claims is one line here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from matrice.claims import Claim, RelationOf, judge, layer_claims, relation_prefix
from matrice.experiments.controls import control_claims
from matrice.experiments.edit import editing_claims
from matrice.experiments.enhance import enhancement_claims
from matrice.experiments.inject import injection_claims
from matrice.experiments.manipulate import manipulation_claims
from matrice.experiments.fact_check import fact_check_claims


def all_claims(*, sets: Mapping[str, Any], n_layers: int, manip: Mapping[str, Any], editing: Mapping[str, Any],
               enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool],
               controls: Mapping[str, Any] | None = None, injection: Mapping[str, Any] | None = None,
               fact_check: Mapping[str, Any] | None = None, relation_of: RelationOf = relation_prefix,
               primary: Sequence[str] = (), margins: Mapping[str, float] | None = None, alpha: float = 0.05) -> list[Claim]:
    """Every claim row of the run, judged (`judge`)."""
    empty_sets = {m: [f for f, per in sets.items() if not len(per.get(m, []))] for per in sets.values() for m in per}
    claims = [*layer_claims(sets, n_layers, relation_of), *manipulation_claims(manip, is_evaluation, relation_of),
              *control_claims(controls or {}, is_evaluation, relation_of), *editing_claims(editing, relation_of),
              *enhancement_claims(enhancement, is_evaluation, relation_of, empty_sets),
              *injection_claims(injection or {}, relation_of), *fact_check_claims(fact_check or {}, relation_of)]
    return judge(claims, primary, margins, alpha)
