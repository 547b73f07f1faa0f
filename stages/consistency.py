"""consistency: query localisation — how consistently a fact's queries localise it, and whether
suppression and editing work better on consistent facts (matrice.experiments.consistency)."""

from __future__ import annotations

from matrice.method.attribution.runner import MAPS_DIR, iter_fact_attributions
from matrice.experiments.consistency import fact_consistency, write_outputs
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    section = stage.params["consistency"]
    lang_of = {q.query_id: q.lang for q in stage.queries}
    try:
        facts = [fact_consistency(fact, maps, lang_of, section["top_k"])
                 for fact, maps in iter_fact_attributions(stage.out / MAPS_DIR)]
    except ValueError as exc:
        raise SystemExit(f"params.yaml: {exc}") from exc
    write_outputs(facts, stage.outputs, stage.rule, section, stage.params["seed"], stage.relations)


if __name__ == "__main__":
    main()
