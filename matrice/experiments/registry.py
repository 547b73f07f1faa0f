"""Every experiment, in the report's order: its claims (the verdict table is their list, judged) and
its section of the report.

Each experiment states its claims and writes its section next to its run, in its own module; this
registry only gathers them, so adding an experiment to the report is a line here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from matrice.evaluation.claims import Claim, RelationOf, judge, layer_claims, relation_prefix
from matrice.experiments import (case_study, consistency, controls, degenerate, edit, edit_sweep, enhance, fact_check,
                                 inject, manipulate)
from matrice.experiments.controls import control_claims
from matrice.experiments.edit import editing_claims
from matrice.experiments.edit_sweep import sweep_claims
from matrice.experiments.enhance import enhancement_claims
from matrice.experiments.inject import injection_claims
from matrice.experiments.fact_check import fact_check_claims
from matrice.experiments.manipulate import manipulation_claims
from matrice.evaluation.report import RunResults


def all_claims(*, sets: Mapping[str, Any], n_layers: int, manip: Mapping[str, Any], editing: Mapping[str, Any],
               enhancement: Mapping[str, Any], is_evaluation: Callable[[str], bool],
               controls: Mapping[str, Any] | None = None, injection: Mapping[str, Any] | None = None,
               fact_check: Mapping[str, Any] | None = None, relation_of: RelationOf = relation_prefix,
               primary: Sequence[str] = (), margins: Mapping[str, float] | None = None, alpha: float = 0.05,
               top_layers: float = 1 / 3, edit_sweep: Mapping[str, Any] | None = None,
               matched_locality: float = 0.9) -> list[Claim]:
    """Every claim row of the run, judged (`judge`); ``top_layers``: Fig. 4's "last layers" as a fraction of
    depth; ``matched_locality``: the locality at which the λ sweep's update reliability is compared."""
    empty_sets = {m: [f for f, per in sets.items() if not len(per.get(m, []))] for per in sets.values() for m in per}
    claims = [*layer_claims(sets, n_layers, relation_of, top_layers), *manipulation_claims(manip, is_evaluation, relation_of),
              *control_claims(controls or {}, is_evaluation, relation_of), *editing_claims(editing, relation_of),
              *(sweep_claims(edit_sweep, matched_locality, relation_of) if edit_sweep else []),
              *enhancement_claims(enhancement, is_evaluation, relation_of, empty_sets),
              *injection_claims(injection or {}, relation_of), *fact_check_claims(fact_check or {}, relation_of)]
    return judge(claims, primary, margins, alpha)


SECTIONS: tuple[Callable[[RunResults], str], ...] = (
    manipulate.section, controls.section, edit.section, edit_sweep.section, enhance.section, inject.section,
    case_study.section, degenerate.section, fact_check.section, consistency.section,
)
