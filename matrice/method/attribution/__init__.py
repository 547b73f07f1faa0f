"""SAIG knowledge attribution (docs/method.md §Knowledge attribution (SAIG)): a slow reference, a fast exact
engine, a sharded runner."""

from matrice.method.attribution.common import BASELINE_KINDS, AttributionConfig
from matrice.method.attribution.fast import fast_attribution
from matrice.method.attribution.reference import reference_attribution

__all__ = ["AttributionConfig", "BASELINE_KINDS", "fast_attribution", "reference_attribution"]
