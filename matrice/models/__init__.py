"""Model adapters: loading, FFN neuron sites, hooks (see families.py for the supported architectures)."""

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.families import FAMILIES, Family, UnsupportedArchitectureError, family_for
from matrice.models.loading import ModelConfig, load_adapter

__all__ = [
    "Encoded", "ModelAdapter", "FAMILIES", "Family", "UnsupportedArchitectureError", "family_for",
    "ModelConfig", "load_adapter",
]
