"""degenerate: degenerate knowledge neurons (AMIG) among each fact's LAKNs and its language-specific
knowledge neurons, searched on the original query of each language and verified on a held-out
paraphrase (matrice.experiments.degenerate)."""

from __future__ import annotations

from matrice.experiments.degenerate import DegenerateConfig, search_facts, write_outputs
from matrice.method.scores import ScoreStore
from stages.common import ModelStage


def main() -> None:
    stage = ModelStage.start(__doc__)
    cfg = stage.config(DegenerateConfig, "degenerate")
    adapter, sets = stage.adapter, stage.sets
    scores = ScoreStore(stage.out / "scores")
    records = search_facts(adapter, stage.queries, scores, sets.facts, stage.split,
                           stage.params["tau"], stage.params["few_shot"], cfg, stage.params["answer_token"])
    write_outputs(records, len(scores.languages), cfg, stage.outputs)


if __name__ == "__main__":
    main()
