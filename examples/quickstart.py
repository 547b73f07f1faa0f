"""Find one fact's language-agnostic knowledge neurons, suppress them, and edit the fact through
them — the library from Python, no DVC (`matrice.api`).

    .venv/bin/python examples/quickstart.py                       # the packaged Gemma 3 270M on the CPU
    .venv/bin/python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --device cuda

About 3 minutes on two CPU cores for the default (the first run also converts the packaged model
once, about 90 s, into ~/.cache/matrice).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

import matrice.api as mx

FRANCE = mx.Fact("capital", {"en": "France", "fr": "la France", "zh": "法国"}, {"en": "Paris", "fr": "Paris", "zh": "巴黎"},
                 fact_id="P36-france")
ITALY = mx.Fact("capital", {"en": "Italy", "fr": "l'Italie", "zh": "意大利"}, {"en": "Rome", "fr": "Rome", "zh": "罗马"},
                fact_id="P36-italy")  # the one-shot demonstration
TEMPLATES = {
    "en": ["The capital of [X] is [Y].", "[X]'s capital city is [Y].", "The capital city of [X] is [Y]."],
    "fr": ["La capitale de [X] est [Y].", "La ville capitale de [X] est [Y].", "Le siège du gouvernement de [X] est [Y]."],
    "zh": ["[X]的首都是[Y]。", "[X]的首都为[Y]。", "[X]首都是[Y]。"],
}


def run(model: Any, fact: mx.Fact = FRANCE, templates: dict = TEMPLATES, demo: mx.Fact | None = ITALY,
        new_object: str = "Berlin", tau: float | None = None, edit_cfg: Any = None, attribution: Any = None
        ) -> dict[str, Any]:
    """Locate, suppress, edit; returns what it printed (the example's test reads it). ``edit_cfg``
    (:class:`matrice.experiments.edit.EditConfig`) and ``attribution``
    (:class:`matrice.method.attribution.common.AttributionConfig`) default to the pipeline's."""
    model = mx.load(model)
    qs = mx.queries(fact, templates, demo)
    few_shot = demo is not None
    neurons = mx.locate(model, qs, tau=tau, attribution=attribution, few_shot=few_shot)
    print(f"{len(neurons)} neurons, layers {sorted(set(neurons.pairs[:, 0].tolist()))}")
    effects = mx.suppress(model, neurons, qs, few_shot=few_shot)
    drops = [e.delta_p for e in effects if e.delta_p is not None]
    print(f"suppressed: mean ΔP/P {np.mean(drops):+.2f} over {len(drops)} queries")
    first = [q for q in qs if q.template_id == 0]
    before = mx.answers(model, first, few_shot)
    with mx.edit(model, neurons, first[0], new_object, edit_cfg, few_shot=few_shot):
        during = mx.answers(model, first, few_shot)
    after = mx.answers(model, first, few_shot)
    for q, b, d in zip(first, before, during):
        print(f"{q.lang}: {q.prompt!r} → {b!r}; edited to {new_object!r}: {d!r}")
    return {"neurons": neurons, "effects": effects, "before": before, "during": during, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:gemma3-270m", help="an HF id, a local path or embedded:gemma3-270m")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(mx.load(args.model, device=args.device))


if __name__ == "__main__":
    main()
