"""Uncertainty quantification of MATRICE (paper Eq. 5-11; docs/method.md §Per-layer normalisation to §Selection).

Everything here is pure numpy and works on *raw* attributions (Σ_i Attr_i, not normalised), so the
normalisation choices are cheap downstream parameters instead of reasons to recompute attributions.

Shapes: one query's attribution is ``[L, N]`` (layers × FFN neurons); one fact in one language is
``[T, L, N]`` (T paraphrase queries, row 0 = the original/first template); several languages
stacked are ``[K, L, N]``. All outputs are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

LayerNorm = Literal["abs", "signed", "none"]
LangNorm = Literal["zero_max", "per_language", "per_neuron"]

LAYER_NORM_MODES: tuple[str, ...] = ("abs", "signed", "none")
LANG_NORM_MODES: tuple[str, ...] = ("zero_max", "per_language", "per_neuron")


def _check_mode(name: str, mode: str, allowed: tuple[str, ...]) -> None:
    if mode not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {mode!r}")


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 wherever den == 0 (a degenerate slice carries no signal; never NaN/inf)."""
    num, den = np.broadcast_arrays(num, den)
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def normalize_layers(raw: np.ndarray, mode: LayerNorm = "abs") -> np.ndarray:
    """Per-layer normalisation of raw attributions (Eq. 5) over the last two axes ``[..., L, N]``.

    - ``"abs"`` (default): divide layer l by Σ_j |raw_lj|. Sign and order within the layer are kept,
      and a layer whose signed sum is near zero or negative cannot blow up or flip its scores.
    - ``"signed"``: the literal Eq. 5, divide by the signed Σ_j raw_lj (a negative sum flips signs,
      a near-zero sum inflates the layer; see docs/method.md §Per-layer normalisation).
    - ``"none"``: raw scores (as float64 copy).

    A layer whose denominator is exactly 0 (all zeros for ``"abs"``; a signed sum of exactly 0 for
    ``"signed"``) gets all-zero scores rather than NaN/inf: there is nothing to normalise by.
    """
    _check_mode("layer_norm", mode, LAYER_NORM_MODES)
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim < 2:
        raise ValueError(f"raw must have shape [..., L, N], got shape {raw.shape}")
    if mode == "none":
        return raw.copy()
    if mode == "abs":
        den = np.abs(raw).sum(axis=-1, keepdims=True)
    else:
        den = raw.sum(axis=-1, keepdims=True)
    return _safe_divide(raw, den)


def _mean_minus_std(x: np.ndarray, w_mean: float, w_std: float, axis: int) -> np.ndarray:
    """w_mean·mean − w_std·sqrt(population variance) along ``axis`` (Eq. 8 and Eq. 11 share this)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        raise ValueError("cannot aggregate over an empty axis")
    mean = x.mean(axis=axis)
    std = np.sqrt(x.var(axis=axis, ddof=0))  # population variance: docs/method.md §Uncertainty across queries (UaQ)
    return w_mean * mean - w_std * std


def uaq(attr: np.ndarray, alpha1: float = 1.0, alpha2: float = 1.0) -> np.ndarray:
    """Uncertainty across queries (Eq. 6-8): ``[T, L, N]`` → ``[L, N]``.

    α1·mean_T − α2·std_T rewards neurons that matter for every paraphrase and penalises those
    that only light up for some. Population variance (1/T), so T = 1 gives std 0 (score = α1·attr).
    """
    attr = np.asarray(attr)
    if attr.ndim != 3:
        raise ValueError(f"attr must have shape [T, L, N], got shape {attr.shape}")
    return _mean_minus_std(attr, alpha1, alpha2, axis=0)


def normalize_languages(s: np.ndarray, mode: LangNorm = "zero_max") -> np.ndarray:
    """Normalise per-language scores to [0, 1] so languages are comparable (Eq. 9): ``[K, L, N]``.

    - ``"zero_max"`` (default): each language's map is divided by its largest score over all L×N
      neurons, negative scores (neurons that work against the answer) become 0. Zero attribution
      stays 0, so the threshold τ·max S keeps its meaning.
    - ``"per_language"``: min-max over each language's whole map. With signed attributions the
      minimum is negative, so the bulk of irrelevant neurons lands mid-range (measured on Gemma 3
      270M: ~0.4) and τ·max S selects almost every neuron; kept as an option for comparison.
    - ``"per_neuron"``: the literal Eq. 9, each neuron's K-vector is min-max scaled across
      languages. This erases magnitude (every neuron spans [0, 1]) and with K = 1 it is all zeros.

    A constant slice (max == min; for zero_max a map whose max is ≤ 0) becomes all zeros: it has
    no spread to scale and carries no ranking information.
    """
    _check_mode("lang_norm", mode, LANG_NORM_MODES)
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 3:
        raise ValueError(f"s must have shape [K, L, N], got shape {s.shape}")
    if mode == "zero_max":
        positive = np.clip(s, 0.0, None)
        return _safe_divide(positive, positive.max(axis=(1, 2), keepdims=True))
    axes: int | tuple[int, ...] = (1, 2) if mode == "per_language" else 0
    lo = s.min(axis=axes, keepdims=True)
    hi = s.max(axis=axes, keepdims=True)
    return _safe_divide(s - lo, hi - lo)


def ual(sbar: np.ndarray, beta1: float = 1.0, beta2: float = 1.0) -> np.ndarray:
    """Uncertainty across languages (Eq. 10-11): ``[K, L, N]`` → ``[L, N]``.

    β1·mean_K − β2·std_K (population variance) of the language-normalised scores: a neuron scores
    high only if it is important in every language, i.e. language-agnostic.
    """
    sbar = np.asarray(sbar)
    if sbar.ndim != 3:
        raise ValueError(f"sbar must have shape [K, L, N], got shape {sbar.shape}")
    return _mean_minus_std(sbar, beta1, beta2, axis=0)


def _check_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class AggregationConfig:
    """Parameters of the uncertainty aggregation (params.yaml ``aggregation``)."""

    layer_norm: LayerNorm = "abs"
    alpha1: float = 1.0
    alpha2: float = 1.0
    lang_norm: LangNorm = "zero_max"
    beta1: float = 1.0
    beta2: float = 1.0

    def __post_init__(self) -> None:
        _check_mode("layer_norm", self.layer_norm, LAYER_NORM_MODES)
        _check_mode("lang_norm", self.lang_norm, LANG_NORM_MODES)
        for name in ("alpha1", "alpha2", "beta1", "beta2"):
            _check_weight(name, getattr(self, name))


@dataclass
class FactScores:
    """All score maps of one fact that the selection methods (MATRICE and baselines) need.

    ``languages[k]`` names row k of every ``[K, L, N]`` array.
    """

    languages: list[str]
    S: np.ndarray  # [L, N] language-agnostic attribution score (MATRICE, Eq. 11)
    s_per_lang: np.ndarray  # [K, L, N] UaQ per language (Eq. 8), before language normalisation
    first_query_norm: np.ndarray  # [K, L, N] layer-normalised attribution of each first query
    S_wo_uaq: np.ndarray  # [L, N] UaL on the first queries only (ablation w/o UaQ)
    # [K, L, N] layer-normalised attribution of each first query under AMIG's own (all-PAD) baseline;
    # None when the run has none, and AMIG then falls back to first_query_norm (the SAIG maps)
    amig_norm: np.ndarray | None = None
    # [K, L, N] row k = S aggregated over every language but languages[k] (leave-one-language-out);
    # None for a single-language fact
    S_leave_out: np.ndarray | None = None

    @property
    def amig_maps(self) -> np.ndarray:
        """The maps the AMIG baseline thresholds: its own attribution when the run has it."""
        return self.first_query_norm if self.amig_norm is None else self.amig_norm

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_neurons)."""
        return (int(self.S.shape[0]), int(self.S.shape[1]))


def aggregate_fact(per_lang: Mapping[str, np.ndarray], cfg: AggregationConfig | None = None,
                   amig_first: Mapping[str, np.ndarray] | None = None) -> FactScores:
    """Turn one fact's raw attributions ``{lang: [T_lang, L, N]}`` into its score maps.

    Pipeline: layer-normalise each query (Eq. 5) → UaQ per language (Eq. 8) → normalise languages
    (Eq. 9) → UaL (Eq. 11) = ``S``. The ablation w/o UaQ and the AMIG baseline use only the first
    query of each language. T may differ per language; languages keep the mapping's order.
    ``amig_first`` (``{lang: [L, N]}``, AMIG's own attribution of each first query) gives
    ``amig_norm``, layer-normalised the same way.
    Non-finite attributions are rejected (they signal an upstream failure, not a score).
    """
    cfg = cfg or AggregationConfig()
    if not per_lang:
        raise ValueError("per_lang is empty: a fact needs at least one language")
    languages = list(per_lang)
    shape: tuple[int, int] | None = None
    s_rows, first_rows = [], []
    for lang in languages:
        a = np.asarray(per_lang[lang])
        if a.ndim != 3 or a.shape[0] == 0:
            raise ValueError(f"language {lang!r}: attributions must have shape [T>=1, L, N], got {a.shape}")
        if shape is None:
            shape = a.shape[1:]
        elif a.shape[1:] != shape:
            raise ValueError(f"language {lang!r}: [L, N] = {a.shape[1:]} differs from {shape} of {languages[0]!r}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"language {lang!r}: attributions contain NaN or inf")
        normed = normalize_layers(a, cfg.layer_norm)
        s_rows.append(uaq(normed, cfg.alpha1, cfg.alpha2))
        first_rows.append(normed[0])
    s_per_lang = np.stack(s_rows)
    first_query_norm = np.stack(first_rows)
    S = ual(normalize_languages(s_per_lang, cfg.lang_norm), cfg.beta1, cfg.beta2)
    S_wo_uaq = ual(normalize_languages(first_query_norm, cfg.lang_norm), cfg.beta1, cfg.beta2)
    return FactScores(
        languages=languages,
        S=S,
        s_per_lang=s_per_lang,
        first_query_norm=first_query_norm,
        S_wo_uaq=S_wo_uaq,
        amig_norm=None if amig_first is None else _amig_norm(amig_first, languages, shape, cfg.layer_norm),
        S_leave_out=leave_one_language_out(s_per_lang, cfg) if len(languages) > 1 else None,
    )


def leave_one_language_out(s_per_lang: np.ndarray, cfg: AggregationConfig) -> np.ndarray:
    """``[K, L, N]``: row k is S (Eq. 9-11) computed without language k, as if it had never been
    attributed: the neurons its selection gives are tested in language k alone."""
    keep = [np.arange(len(s_per_lang)) != k for k in range(len(s_per_lang))]
    return np.stack([ual(normalize_languages(s_per_lang[m], cfg.lang_norm), cfg.beta1, cfg.beta2) for m in keep])


def _amig_norm(amig_first: Mapping[str, np.ndarray], languages: list[str], shape, layer_norm: LayerNorm) -> np.ndarray:
    missing = [lang for lang in languages if lang not in amig_first]
    if missing:
        raise ValueError(f"AMIG attribution missing for language(s) {missing}")
    maps = np.stack([np.asarray(amig_first[lang]) for lang in languages])
    if maps.shape[1:] != shape:
        raise ValueError(f"AMIG attribution [L, N] = {maps.shape[1:]} differs from {shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("AMIG attributions contain NaN or inf")
    return normalize_layers(maps, layer_norm)
