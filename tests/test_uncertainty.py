"""Hand-computed checks of the uncertainty aggregation (expected values written out, not recomputed)."""

import numpy as np
import pytest

from matrice.method.uncertainty import (
    AggregationConfig,
    aggregate_fact,
    normalize_languages,
    normalize_layers,
    ual,
    uaq,
)

RAW = np.array(
    [
        [1.0, -3.0, 4.0],  # signed sum 2, |sum| 8
        [0.0, 0.0, 0.0],  # both denominators 0
        [-2.0, -2.0, 1.0],  # signed sum -3, |sum| 5
        [1.0, -1.0, 0.0],  # signed sum 0, |sum| 2
    ]
)


# --- normalize_layers -------------------------------------------------------------------------

def test_layer_norm_abs():
    out = normalize_layers(RAW, "abs")
    expected = [
        [0.125, -0.375, 0.5],
        [0.0, 0.0, 0.0],
        [-0.4, -0.4, 0.2],
        [0.5, -0.5, 0.0],
    ]
    np.testing.assert_allclose(out, expected)
    assert np.all(np.isfinite(out))


def test_layer_norm_abs_is_default():
    np.testing.assert_allclose(normalize_layers(RAW), normalize_layers(RAW, "abs"))


def test_layer_norm_signed_negative_and_zero_sums():
    out = normalize_layers(RAW, "signed")
    expected = [
        [0.5, -1.5, 2.0],
        [0.0, 0.0, 0.0],
        [2 / 3, 2 / 3, -1 / 3],  # negative sum flips signs (literal Eq. 5)
        [0.0, 0.0, 0.0],  # signed sum exactly 0 -> zeros, not inf
    ]
    np.testing.assert_allclose(out, expected)
    assert np.all(np.isfinite(out))


def test_layer_norm_none_copies():
    out = normalize_layers(RAW, "none")
    np.testing.assert_array_equal(out, RAW)
    out[0, 0] = 99.0
    assert RAW[0, 0] == 1.0


def test_layer_norm_batched_and_input_untouched():
    batch = np.stack([RAW, 2 * RAW])  # [T=2, L, N]; scaling a query must not change its normalised map
    before = batch.copy()
    out = normalize_layers(batch, "abs")
    assert out.shape == (2, 4, 3)
    np.testing.assert_allclose(out[1], out[0])
    np.testing.assert_allclose(out[0, 0], [0.125, -0.375, 0.5])
    np.testing.assert_array_equal(batch, before)


def test_layer_norm_bad_mode_lists_allowed():
    with pytest.raises(ValueError, match=r"abs.*signed.*none"):
        normalize_layers(RAW, "l1")


def test_layer_norm_needs_2d():
    with pytest.raises(ValueError):
        normalize_layers(np.ones(3), "abs")


# --- uaq / ual --------------------------------------------------------------------------------

def test_uaq_two_queries():
    attr = np.array([[[1.0, 4.0]], [[3.0, 4.0]]])  # T=2, L=1, N=2: mean [2,4], pop std [1,0]
    np.testing.assert_allclose(uaq(attr, 1.0, 1.0), [[1.0, 4.0]])
    np.testing.assert_allclose(uaq(attr, 2.0, 0.5), [[3.5, 8.0]])
    np.testing.assert_allclose(uaq(attr, 1.0, 0.0), [[2.0, 4.0]])


def test_uaq_population_std():
    vals = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, population std 2 (sample std would be 2.138)
    attr = np.array(vals).reshape(8, 1, 1)
    np.testing.assert_allclose(uaq(attr, 1.0, 1.0), [[3.0]])


def test_uaq_single_query_has_zero_std():
    attr = np.array([[[0.5, -0.25], [1.0, 0.0]]])  # T=1
    np.testing.assert_allclose(uaq(attr, 3.0, 10.0), [[1.5, -0.75], [3.0, 0.0]])


def test_ual_single_language():
    sbar = np.array([[[0.0, 0.5, 1.0]]])  # K=1
    np.testing.assert_allclose(ual(sbar, 2.0, 5.0), [[0.0, 1.0, 2.0]])


def test_ual_two_languages():
    sbar = np.array([[[0.0, 0.5, 1.0]], [[0.0, 0.25, 1.0]]])
    # mean [0, .375, 1], std [0, .125, 0]
    np.testing.assert_allclose(ual(sbar, 1.0, 1.0), [[0.0, 0.25, 1.0]])
    np.testing.assert_allclose(ual(sbar, 1.0, 2.0), [[0.0, 0.125, 1.0]])


# --- normalize_languages ----------------------------------------------------------------------

S_TWO = np.array([[[1.0, 2.0, 3.0]], [[10.0, 20.0, 50.0]]])  # K=2, L=1, N=3


def test_lang_norm_per_language():
    out = normalize_languages(S_TWO, "per_language")
    np.testing.assert_allclose(out, [[[0.0, 0.5, 1.0]], [[0.0, 0.25, 1.0]]])


def test_lang_norm_per_neuron():
    out = normalize_languages(S_TWO, "per_neuron")
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]])


def test_lang_norm_modes_differ_downstream():
    # per-language keeps the within-language ranking; per-neuron erases it (every neuron spans [0,1]).
    s_lang = ual(normalize_languages(S_TWO, "per_language"), 1.0, 1.0)
    s_neur = ual(normalize_languages(S_TWO, "per_neuron"), 1.0, 1.0)
    np.testing.assert_allclose(s_lang, [[0.0, 0.25, 1.0]])
    np.testing.assert_allclose(s_neur, [[0.0, 0.0, 0.0]])


def test_lang_norm_multi_layer_per_language_uses_all_neurons():
    s = np.array([[[0.0, 1.0], [2.0, 4.0]]])  # one language, L=2: min 0, max 4 over all layers
    np.testing.assert_allclose(normalize_languages(s, "per_language"), [[[0.0, 0.25], [0.5, 1.0]]])


def test_lang_norm_constant_maps_become_zero():
    s = np.array([[[5.0, 5.0, 5.0]], [[-1.0, 0.0, 1.0]]])
    out = normalize_languages(s, "per_language")
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.0]], [[0.0, 0.5, 1.0]]])
    # per neuron: neuron 0 is [5, -1] -> [1, 0]; neuron 2 is [5, 1] -> [1, 0]; neuron 1 is [5, 0] -> [1, 0]
    np.testing.assert_allclose(normalize_languages(s, "per_neuron"), [[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]])
    same = np.array([[[2.0, 3.0]], [[2.0, 7.0]]])  # neuron 0 equal in both languages
    np.testing.assert_allclose(normalize_languages(same, "per_neuron"), [[[0.0, 0.0]], [[0.0, 1.0]]])
    assert np.all(np.isfinite(normalize_languages(np.zeros((3, 2, 2)), "per_language")))


def test_lang_norm_single_language_per_neuron_is_zero():
    s = np.array([[[1.0, 2.0, 3.0]]])
    np.testing.assert_allclose(normalize_languages(s, "per_neuron"), [[[0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(normalize_languages(s, "per_language"), [[[0.0, 0.5, 1.0]]])


def test_lang_norm_bad_mode():
    with pytest.raises(ValueError, match=r"per_language.*per_neuron"):
        normalize_languages(S_TWO, "global")


# --- AggregationConfig ------------------------------------------------------------------------

def test_config_defaults():
    cfg = AggregationConfig()
    assert (cfg.layer_norm, cfg.alpha1, cfg.alpha2, cfg.lang_norm, cfg.beta1, cfg.beta2) == (
        "abs", 1.0, 1.0, "zero_max", 1.0, 1.0,
    )


@pytest.mark.parametrize("name", ["alpha1", "alpha2", "beta1", "beta2"])
def test_config_rejects_negative_weights(name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 0, got -1"):
        AggregationConfig(**{name: -1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", True])
def test_config_rejects_non_numbers(value):
    with pytest.raises(ValueError, match="alpha2"):
        AggregationConfig(alpha2=value)


def test_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match=r"layer_norm must be one of \['abs', 'signed', 'none'\]"):
        AggregationConfig(layer_norm="l2")
    with pytest.raises(ValueError, match=r"lang_norm must be one of \[.zero_max., .per_language., .per_neuron.\]"):
        AggregationConfig(lang_norm="global")


def test_zero_std_weights_leave_the_plain_means():
    """alpha2 = beta2 = 0 is allowed and turns UaQ and UaL into the means over queries and languages."""
    d = _two_lang_fact()
    fs = aggregate_fact(d, AggregationConfig(alpha2=0, beta2=0.0, lang_norm="per_language"))
    np.testing.assert_allclose(fs.s_per_lang[0], [[0.5, 0.5], [0.75, 0.25]])  # en: mean of its two normalised maps
    np.testing.assert_allclose(fs.S, [[0.25, 0.75], [0.625, 0.375]])  # the mean of the min-max maps (hand case above)


# --- aggregate_fact ---------------------------------------------------------------------------

def _two_lang_fact():
    # en: T=2; fr: T=1 (different T per language). L=2, N=2.
    en = np.array(
        [
            [[1.0, 3.0], [2.0, 2.0]],  # abs-norm -> [[.25,.75],[.5,.5]]
            [[3.0, 1.0], [4.0, 0.0]],  # abs-norm -> [[.75,.25],[1,0]]
        ]
    )
    fr = np.array([[[0.0, 2.0], [1.0, 3.0]]])  # abs-norm -> [[0,1],[.25,.75]]
    return {"en": en, "fr": fr}


def test_aggregate_fact_hand_computed():
    fs = aggregate_fact(_two_lang_fact(), AggregationConfig(lang_norm="per_language"))
    assert fs.languages == ["en", "fr"]
    # UaQ en: mean [[.5,.5],[.75,.25]], std [[.25,.25],[.25,.25]]; fr: T=1 -> its map
    np.testing.assert_allclose(fs.s_per_lang, [[[0.25, 0.25], [0.5, 0.0]], [[0.0, 1.0], [0.25, 0.75]]])
    np.testing.assert_allclose(fs.first_query_norm, [[[0.25, 0.75], [0.5, 0.5]], [[0.0, 1.0], [0.25, 0.75]]])
    # per-language min-max: en -> [[.5,.5],[1,0]], fr unchanged; mean [[.25,.75],[.625,.375]],
    # std [[.25,.25],[.375,.375]]
    np.testing.assert_allclose(fs.S, [[0.0, 0.5], [0.25, 0.0]])
    # first queries min-max: en -> [[0,1],[.5,.5]], fr -> [[0,1],[.25,.75]]; std [[0,0],[.125,.125]]
    np.testing.assert_allclose(fs.S_wo_uaq, [[0.0, 1.0], [0.25, 0.5]])
    assert fs.shape == (2, 2)


def test_aggregate_fact_weights_and_signed_mode():
    per_lang = {"en": np.array([[[1.0, 3.0]], [[-1.0, -1.0]]])}  # L=1, N=2, T=2; signed sums 4, -2
    cfg = AggregationConfig(layer_norm="signed", alpha1=1.0, alpha2=0.0, beta1=2.0, beta2=7.0, lang_norm="per_language")
    fs = aggregate_fact(per_lang, cfg)
    # signed: q0 -> [.25,.75], q1 -> [.5,.5]; mean -> [.375,.625]
    np.testing.assert_allclose(fs.s_per_lang, [[[0.375, 0.625]]])
    # single language: min-max -> [0,1], std 0 -> S = 2*[0,1]
    np.testing.assert_allclose(fs.S, [[0.0, 2.0]])
    np.testing.assert_allclose(fs.first_query_norm, [[[0.25, 0.75]]])
    np.testing.assert_allclose(fs.S_wo_uaq, [[0.0, 2.0]])


def test_aggregate_fact_keeps_language_order():
    d = _two_lang_fact()
    fs = aggregate_fact({"fr": d["fr"], "en": d["en"]})
    assert fs.languages == ["fr", "en"]
    np.testing.assert_allclose(fs.s_per_lang[0], [[0.0, 1.0], [0.25, 0.75]])
    np.testing.assert_allclose(fs.S, [[0.0, 0.5], [0.25, 0.0]])  # S does not depend on order


def test_aggregate_fact_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        aggregate_fact({})
    with pytest.raises(ValueError, match="'de'"):
        aggregate_fact({"en": np.ones((1, 2, 2)), "de": np.ones((1, 2, 3))})
    with pytest.raises(ValueError, match="'en'"):
        aggregate_fact({"en": np.ones((0, 2, 2))})
    with pytest.raises(ValueError, match="'en'"):
        aggregate_fact({"en": np.ones((2, 2))})
    bad = np.ones((1, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aggregate_fact({"en": bad})


def test_zero_max_language_normalisation_keeps_zero_and_drops_negatives():
    s = np.array([[[-2.0, 0.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, -3.0], [-2.0, -1.0]]])
    out = normalize_languages(s, "zero_max")
    np.testing.assert_allclose(out[0], [[0.0, 0.0], [0.25, 1.0]])  # divided by 4, negative -> 0
    np.testing.assert_allclose(out[1], 0.0)  # constant map
    np.testing.assert_allclose(out[2], 0.0)  # nothing positive: no signal
    # min-max maps the zero-attribution neuron of language 0 to 1/3, not 0: why zero_max is default
    np.testing.assert_allclose(normalize_languages(s, "per_language")[0], [[0.0, 1 / 3], [0.5, 1.0]])


def test_leave_one_language_out_never_reads_the_held_out_language():
    from matrice.method.uncertainty import AggregationConfig, aggregate_fact

    rng = np.random.default_rng(0)
    per_lang = {lang: rng.normal(size=(3, 4, 6)) for lang in ("en", "fr", "zh", "fi")}
    cfg = AggregationConfig()
    fs = aggregate_fact(per_lang, cfg)
    assert fs.S_leave_out.shape == (4, 4, 6)
    for k, lang in enumerate(per_lang):
        changed = dict(per_lang, **{lang: rng.normal(size=(3, 4, 6)) * 100})
        again = aggregate_fact(changed, cfg)
        np.testing.assert_array_equal(again.S_leave_out[k], fs.S_leave_out[k])  # k's data never enters row k
        assert not np.allclose(again.S, fs.S)
        others = aggregate_fact({l: a for l, a in per_lang.items() if l != lang}, cfg)
        np.testing.assert_allclose(fs.S_leave_out[k], others.S)  # row k = MATRICE on the other languages
    assert aggregate_fact({"en": per_lang["en"]}, cfg).S_leave_out is None
