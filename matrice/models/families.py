"""Per-architecture knowledge: where the FFN neurons live and how the model predicts.

A *neuron* is one unit of the input of the FFN output projection (docs/method.md §Objects): the
post-activation intermediate vector, i.e. act(gate)*up for gated MLPs. Peers hook the wrong module
for gated MLPs (gate_proj) or GPT-2 (pre-GELU c_fc); everything here hooks the output projection's
*input*, which is exactly what the next matmul sees.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one architecture family exposes its FFN neurons."""

    name: str
    model_types: tuple[str, ...]
    causal: bool
    layer_paths: tuple[str, ...]  # candidates for the ModuleList of blocks, tried in order
    out_proj: str  # FFN output projection, relative to a block; its input are the neurons
    in_projs: tuple[str, ...]  # FFN input projections, relative to a block (rows = neurons)
    conv1d: bool = False  # GPT-2 Conv1D stores weight as (in, out) instead of (out, in)
    mlm_heads: tuple[str, ...] = ()  # masked LMs: candidate prediction heads applied to base_model output


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), True, ("transformer.h",), "mlp.c_proj", ("mlp.c_fc",), conv1d=True),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3"),
        True,
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
        "mlp.down_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
    ),
    Family("bloom", ("bloom",), True, ("transformer.h",), "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
    Family(
        "bert",
        ("bert", "xlm-roberta", "roberta"),
        False,
        ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
        "output.dense",
        ("intermediate.dense",),
        mlm_heads=("cls", "lm_head"),
    ),
)


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose FFN neuron site we do not know."""


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family of a transformers `config.model_type`; a clear error lists what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"unsupported architecture model_type={model_type!r}: matrice knows where the FFN neurons are "
        f"only for {', '.join(supported_model_types())}. Add a Family to matrice/models/families.py."
    )
