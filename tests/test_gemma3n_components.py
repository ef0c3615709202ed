"""Gemma 3n's components on their own: activation sparsity, AltUp, LAuReL, per-layer
embeddings, KV-sharing resolution and the config.

Expected values come from literal loops and hand formulas written here, from Python's
standard library (``statistics``, ``math.erf``), or from transformers' own modules run in
float64 with their float32 islands lifted (tests that need torch skip without it).
"""

import dataclasses
import math
import statistics

import numpy as np
import pytest

from refimpl.activation_sparsity import gaussian_quantile, gaussian_top_k
from refimpl.altup import (
    MAGNITUDE_FLOOR, altup_correct, altup_embed, altup_predict, altup_unembed, match_magnitude, root_mean_square,
    router_modalities,
)
from refimpl.errors import ConfigError, InputError, ShapeError
from refimpl.laurel import laurel_residual
from refimpl.models import gemma3n, gemma3n_conditional
from refimpl.per_layer_embedding import (
    per_layer_input_update, per_layer_inputs, per_layer_token_embeddings, per_layer_token_ids,
)

RNG = np.random.default_rng(1430)


def _rms(x):
    return np.sqrt(np.mean(x * x, axis=-1, keepdims=True))


def _norm(x, w, eps=1e-6):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


# activation sparsity

@pytest.mark.parametrize("p", [0.95, 0.9, 0.99, 0.5, 0.05])
def test_gaussian_quantile_inverts_the_normal_cdf(p):
    z = gaussian_quantile(p)
    assert 0.5 * (1 + math.erf(z / math.sqrt(2))) == pytest.approx(p, rel=1e-15, abs=1e-16)


def test_gaussian_quantile_at_095_rounds_to_transformers_float32_value():
    # The number transformers' float32 Normal(0, 1).icdf gives (spec sheet sec. A.8 item 5).
    assert np.float32(gaussian_quantile(0.95)) == np.float32(1.6448535919189453)
    assert gaussian_quantile(0.95) == pytest.approx(1.6448536269514722, rel=1e-15)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.95", None])
def test_gaussian_quantile_refuses_values_outside_the_open_interval(bad):
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        gaussian_quantile(bad)


def test_gaussian_top_k_is_relu_above_mean_plus_population_std_times_z():
    gate = RNG.standard_normal((3, 4, 37)) * 2 + 0.5
    out = gaussian_top_k(gate, 0.9)
    z = statistics.NormalDist().inv_cdf(0.9)
    for row, got in zip(gate.reshape(-1, 37), out.reshape(-1, 37)):
        cut = statistics.fmean(row) + statistics.pstdev(row) * z
        np.testing.assert_allclose(got, [max(g - cut, 0.0) for g in row], rtol=1e-13, atol=1e-13)


def test_gaussian_top_k_uses_the_population_not_the_sample_std():
    # G3n-8: with F = 5 the two deviations differ by sqrt(5/4); only the population one matches.
    gate = np.array([[0.0, 1.0, 2.0, 3.0, 10.0]])
    z = gaussian_quantile(0.6)
    population = np.maximum(gate - (gate.mean() + gate.std(ddof=0) * z), 0)
    sample = np.maximum(gate - (gate.mean() + gate.std(ddof=1) * z), 0)
    np.testing.assert_allclose(gaussian_top_k(gate, 0.6), population, rtol=1e-15)
    assert not np.allclose(population, sample)


def test_gaussian_top_k_keeps_about_the_target_fraction_of_a_gaussian():
    gate = RNG.standard_normal((64, 4096))
    kept = np.mean(gaussian_top_k(gate, 0.95) > 0)
    assert 0.045 < kept < 0.055


def test_gaussian_top_k_float32_stays_float32_and_uses_the_rounded_quantile():
    gate = RNG.standard_normal((2, 50)).astype(np.float32)
    out = gaussian_top_k(gate, 0.95)
    assert out.dtype == np.float32
    mean = gate.mean(-1, keepdims=True)
    std = np.sqrt(((gate - mean) ** 2).mean(-1, keepdims=True))
    np.testing.assert_array_equal(out, np.maximum(gate - (mean + std * np.float32(1.6448535919189453)), 0))


def test_gaussian_top_k_refuses_bad_gates():
    with pytest.raises(InputError, match="float64, float32, bfloat16 or float16"):
        gaussian_top_k(np.arange(4), 0.95)
    with pytest.raises(InputError, match="non-empty last axis"):
        gaussian_top_k(np.zeros((2, 0)), 0.95)


def test_gaussian_top_k_matches_transformers_mlp_helper_in_float64():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conformance.backends.hf_exact import exact_float64
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    config = transformers.Gemma3nTextConfig(hidden_size=8, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, activation_sparsity_pattern=[0.95])
    gate = RNG.standard_normal((2, 3, 48))
    with exact_float64():
        mlp = Gemma3nTextMLP(config, 0).double()
        theirs = mlp._gaussian_topk(torch.from_numpy(gate)).numpy()
    np.testing.assert_allclose(gaussian_top_k(gate, 0.95), theirs, rtol=1e-13, atol=1e-13)


# AltUp

def _altup_weights(a=4, m=16):
    return dict(router_norm=1 + 0.2 * RNG.standard_normal(m), router=RNG.standard_normal((a, m)) * m ** 0.5 * 0.5,
                prediction=RNG.standard_normal((a * a, a)) * 0.5, correction=RNG.standard_normal((a, a)) * 0.5,
                scale=1 + 0.2 * RNG.standard_normal(m))


def test_router_scales_the_normed_input_by_one_over_hidden_size():
    w = _altup_weights()
    x = RNG.standard_normal((2, 5, 16)) * 3
    expected = np.tanh((_norm(x, w["router_norm"]) / 16) @ w["router"].T)
    np.testing.assert_allclose(router_modalities(x, w["router_norm"], w["router"], 1e-6), expected, rtol=1e-14)


def test_predict_weights_source_j_into_target_i_by_row_a_i_plus_j():
    # G3n-5, written as loops: output row A*i + j of prediction_coefs weights stream j into stream i.
    a, w = 4, _altup_weights()
    streams = RNG.standard_normal((a, 2, 3, 16))
    m = np.tanh(RNG.standard_normal((2, 3, a)))
    expected = streams.copy()
    for i in range(a):
        for j in range(a):
            coef = m @ w["prediction"][a * i + j]
            expected[i] += coef[..., None] * streams[j]
    np.testing.assert_allclose(altup_predict(streams, m, w["prediction"]), expected, rtol=1e-13, atol=1e-13)
    transposed = w["prediction"].reshape(a, a, a).transpose(1, 0, 2).reshape(a * a, a)
    assert not np.allclose(altup_predict(streams, m, transposed), expected)


@pytest.mark.parametrize("active", [0, 2])
def test_correct_adds_one_plus_the_routed_gain_times_the_innovation(active):
    a, w = 4, _altup_weights()
    predictions = RNG.standard_normal((a, 2, 3, 16))
    activated = RNG.standard_normal((2, 3, 16))
    m = np.tanh(RNG.standard_normal((2, 3, a)))
    got = altup_correct(predictions, activated, m, w["correction"], active)
    for i in range(a):
        gain = 1 + m @ w["correction"][i]
        np.testing.assert_allclose(got[i], predictions[i] + gain[..., None] * (activated - predictions[active]),
                                   rtol=1e-13, atol=1e-13)


def test_predict_and_correct_refuse_mismatched_shapes():
    streams = np.zeros((4, 1, 2, 8))
    with pytest.raises(ShapeError, match=r"prediction_coefs \(16, 4\)"):
        altup_predict(streams, np.zeros((1, 2, 4)), np.zeros((4, 16)))
    with pytest.raises(InputError, match="active_idx"):
        altup_correct(streams, np.zeros((1, 2, 8)), np.zeros((1, 2, 4)), np.zeros((4, 4)), 4)
    with pytest.raises(ShapeError, match="correction_coefs"):
        altup_correct(streams, np.zeros((1, 2, 8)), np.zeros((1, 2, 4)), np.zeros((4, 3)), 0)


@pytest.mark.parametrize("active", [0, 1])
def test_predict_router_and_correct_match_transformers_altup(active):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conformance.backends.hf_exact import exact_float64
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp

    config = transformers.Gemma3nTextConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                            altup_num_inputs=3, altup_active_idx=active)
    w = _altup_weights(3, 16)
    streams, activated = RNG.standard_normal((3, 2, 5, 16)) * 2, RNG.standard_normal((2, 5, 16))
    with exact_float64(), torch.no_grad():
        module = Gemma3nTextAltUp(config).double().eval()
        for name, value in (("router_norm.weight", w["router_norm"]), ("modality_router.weight", w["router"]),
                            ("prediction_coefs.weight", w["prediction"]), ("correction_coefs.weight", w["correction"])):
            module.get_parameter(name).copy_(torch.from_numpy(value))
        module.router_input_scale.fill_(16 ** -1.0)
        predicted = module.predict(torch.from_numpy(streams))
        corrected = module.correct(predicted, torch.from_numpy(activated)).numpy()
    args = (w["router_norm"], w["router"], 1e-6)
    ours = altup_predict(streams, router_modalities(streams[active], *args), w["prediction"])
    np.testing.assert_allclose(ours, predicted.numpy(), rtol=1e-13, atol=1e-13)
    ours = altup_correct(ours, activated, router_modalities(activated, *args), w["correction"], active)
    np.testing.assert_allclose(ours, corrected, rtol=1e-13, atol=1e-13)


def test_embed_keeps_stream_0_and_matches_every_stream_to_its_rms():
    e = RNG.standard_normal((2, 3, 16)) * 4
    projections = [RNG.standard_normal((16, 16)) for _ in range(3)]
    streams = altup_embed(e, projections)
    np.testing.assert_array_equal(streams[0], e)
    for s, w in zip(streams[1:], projections):
        np.testing.assert_allclose(_rms(s), _rms(e), rtol=1e-13)
        np.testing.assert_allclose(s, (e @ w.T) * _rms(e) / _rms(e @ w.T), rtol=1e-13)


def test_unembed_is_the_mean_of_stream_0_and_the_rescaled_projections():
    streams = RNG.standard_normal((3, 2, 4, 16))
    projections = [RNG.standard_normal((16, 16)) for _ in range(2)]
    target = _rms(streams[0])
    parts = [streams[0]] + [(s @ w.T) * target / _rms(s @ w.T) for s, w in zip(streams[1:], projections)]
    np.testing.assert_allclose(altup_unembed(streams, projections), sum(parts) / 3, rtol=1e-13)
    with pytest.raises(ShapeError, match="need 2 projections"):
        altup_unembed(streams, projections[:1])


@pytest.mark.parametrize("call,error,message", [
    (lambda: altup_embed(np.ones((2, 3, 8)), [np.zeros((5, 8))]), ShapeError, r"projections\[0\] has shape \(5, 8\)"),
    (lambda: altup_embed(np.ones((2, 3, 8)), [np.eye(8), np.zeros((8, 5))]), ShapeError, r"projections\[1\]"),
    (lambda: altup_embed(np.ones((2, 3, 8)), np.eye(8)), ShapeError, "must be a list"),
    (lambda: altup_embed(np.ones((2, 3, 8)), [np.eye(8, dtype=np.int64)]), InputError, "projections"),
    (lambda: altup_unembed(np.ones((2, 2, 3, 8)), [np.zeros((8, 5))]), ShapeError, r"projections\[0\]"),
], ids=["embed-rows", "embed-second", "embed-not-list", "embed-int", "unembed-columns"])
def test_embed_and_unembed_refuse_projections_that_are_not_m_by_m(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_magnitude_guard_is_googles_rms_floor_not_transformers_mean_square_floor():
    # Google: y * t / max(rms(y), 1e-12); transformers: y * t / sqrt(max(mean(y^2), 1e-5)).
    # They agree while mean(y^2) >= 1e-5 and part below (rms 1e-4 here: 31.6-fold).
    t = np.array([[2.0]])
    for scale, agree in ((1.0, True), (1e-4, False)):
        y = RNG.standard_normal((1, 16)) * scale
        google = y * t / max(float(_rms(y)[0, 0]), 1e-12)
        hf = y * t / np.sqrt(max(float(np.mean(y * y)), 1e-5))
        np.testing.assert_allclose(match_magnitude(y, t), google, rtol=1e-14)
        assert np.allclose(google, hf, rtol=1e-12) is agree
    assert MAGNITUDE_FLOOR == 1e-12
    np.testing.assert_array_equal(match_magnitude(np.zeros((1, 4)), t), np.zeros((1, 4)))


def test_root_mean_square_has_no_epsilon():
    np.testing.assert_array_equal(root_mean_square(np.array([[3.0, 4.0]])), [[np.sqrt(12.5)]])
    np.testing.assert_array_equal(root_mean_square(np.zeros((1, 3))), [[0.0]])


# LAuReL

def test_laurel_adds_the_normed_low_rank_map_to_its_input():
    x = RNG.standard_normal((2, 3, 16))
    left, right, w = RNG.standard_normal((4, 16)), RNG.standard_normal((16, 4)), 1 + 0.2 * RNG.standard_normal(16)
    np.testing.assert_allclose(laurel_residual(x, left, right, w, 1e-6), x + _norm(x @ left.T @ right.T, w),
                               rtol=1e-14, atol=1e-14)
    with pytest.raises(ShapeError):
        laurel_residual(x, right, left, w, 1e-6)


# per-layer embeddings

def test_per_layer_ids_outside_the_table_read_row_0():
    ids = np.array([[0, 5, 95, 96, 127, -1]])
    np.testing.assert_array_equal(per_layer_token_ids(ids, 96), [[0, 5, 95, 0, 0, 0]])
    with pytest.raises(InputError, match="integers"):
        per_layer_token_ids(ids.astype(float), 96)


def test_per_layer_inputs_literal():
    layers, p, m, v_pl = 3, 4, 8, 10
    table = RNG.standard_normal((v_pl, layers * p))
    projection = RNG.standard_normal((layers * p, m))
    w = 1 + 0.2 * RNG.standard_normal(p)
    ids = np.array([[1, 9, 12], [0, 3, 10]])
    e = RNG.standard_normal((2, 3, m))
    got = per_layer_inputs(ids, e, table, projection, w, 1e-6)
    assert got.shape == (2, 3, layers, p)
    for b in range(2):
        for t in range(3):
            row = ids[b, t] if ids[b, t] < v_pl else 0
            for layer in range(layers):
                cols = slice(layer * p, (layer + 1) * p)
                token = table[row, cols] * np.sqrt(p)
                projected = _norm(projection[cols] @ e[b, t] / np.sqrt(m), w)
                np.testing.assert_allclose(got[b, t, layer], (projected + token) / np.sqrt(2), rtol=1e-13)


def test_per_layer_token_embeddings_refuse_a_table_that_does_not_split_into_layers():
    with pytest.raises(ShapeError, match="not a multiple of num_layers"):
        per_layer_token_embeddings(np.zeros((1, 2), np.int64), np.zeros((4, 10)), 3)


def test_per_layer_input_update_literal():
    y, pli = RNG.standard_normal((2, 3, 8)), RNG.standard_normal((2, 3, 4))
    gate, proj, w = RNG.standard_normal((4, 8)), RNG.standard_normal((8, 4)), 1 + 0.2 * RNG.standard_normal(8)
    g = y @ gate.T
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    np.testing.assert_allclose(per_layer_input_update(y, pli, gate, proj, w, 1e-6, "gelu_pytorch_tanh"),
                               _norm((gelu * pli) @ proj.T, w), rtol=1e-13)
    with pytest.raises(ShapeError, match="per-layer input"):
        per_layer_input_update(y, pli[..., :3], gate, proj, w, 1e-6, "gelu_pytorch_tanh")


def test_per_layer_input_goes_to_streams_1_and_up_only():
    streams, update = RNG.standard_normal((4, 1, 2, 8)), RNG.standard_normal((1, 2, 8))
    got = gemma3n.inject_per_layer_input(streams, update)
    np.testing.assert_array_equal(got[0], streams[0])
    np.testing.assert_array_equal(got[1:], streams[1:] + update)


# KV sharing and the config

_S, _F = "sliding_attention", "full_attention"


def test_kv_sources_of_the_published_e4b_and_e2b():
    e4b = gemma3n.Gemma3nConfig.from_dict(gemma3n.PRESETS["gemma-3n-E4B"])
    e2b = gemma3n.Gemma3nConfig.from_dict(gemma3n.PRESETS["gemma-3n-E2B"])
    for config, layers in ((e4b, 35), (e2b, 30)):
        own = list(range(20))
        shared = [19 if (l + 1) % 5 == 0 else 18 for l in range(20, layers)]
        assert list(config.kv_source_layers) == own + shared


def test_kv_source_is_the_last_layer_of_the_same_type_before_the_shared_region():
    types = (_S, _F, _S, _S, _F, _S, _F, _S)
    assert gemma3n.kv_source_layers(types, 3) == (0, 1, 2, 3, 4, 3, 4, 3)
    assert gemma3n.kv_source_layers(types, 0) == tuple(range(8))


@pytest.mark.parametrize("types,shared,message", [
    ((_S, _S, _F), 1, "no layer before 2 is of type full_attention"),
    ((_S, _F), 2, r"must be in \[0, num_hidden_layers = 2\)"),
    ((_S, _F), -1, "must be in"),
])
def test_kv_sharing_without_a_producer_is_refused(types, shared, message):
    with pytest.raises(ConfigError, match=message):
        gemma3n.kv_source_layers(types, shared)


def test_kv_sources_match_transformers_sharing_modes():
    transformers = pytest.importorskip("transformers")
    block = (_S,) * 4 + (_F,)
    for types, shared in (((_S, _F) * 3, 2), (block * 2 + (_S, _S), 0), (block * 3, 5), (block * 2 + (_S,), 3)):
        modes = transformers.Gemma3nTextConfig(num_hidden_layers=len(types), layer_types=list(types),
                                               num_kv_shared_layers=shared, num_attention_heads=2,
                                               hidden_size=8).kv_sharing_modes
        ours = gemma3n.kv_source_layers(tuple(types), shared)
        assert [l for l, s in enumerate(ours) if s != l] == [l for l, m in enumerate(modes) if m == "reuse"]
        assert {s for l, s in enumerate(ours) if s != l} <= {l for l, m in enumerate(modes) if m == "store"}


def test_config_defaults_are_the_e4b_values():
    config = gemma3n.Gemma3nConfig.from_dict({})
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (35, 2048, (16384,) * 35)
    assert config.activation_sparsity_pattern == (0.95,) * 10 + (0.0,) * 25
    assert [l for l, t in enumerate(config.layer_types) if t == _F] == [4, 9, 14, 19, 24, 29, 34]
    assert config.final_logit_softcapping == 30.0 and config.num_kv_shared_layers == 15
    assert [p["rope_theta"] for p in config.layer_rope_parameters[3:5]] == [1e4, 1e6]


def test_small_configs_default_to_no_sparsity():
    raw = {"num_hidden_layers": 10, "num_kv_shared_layers": 0, "hidden_size": 8, "num_attention_heads": 2}
    assert gemma3n.Gemma3nConfig.from_dict(raw).activation_sparsity_pattern == (0.0,) * 10


_TINY = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
         "num_hidden_layers": 2, "num_kv_shared_layers": 0, "layer_types": [_S, _F]}

REFUSED = {
    "widths-wrong-length": ({"intermediate_size": [8]}, "intermediate_size"),
    "widths-not-ints": ({"intermediate_size": [8, 8.5]}, "intermediate_size"),
    "sparsity-wrong-length": ({"activation_sparsity_pattern": [0.95]}, "activation_sparsity_pattern"),
    "sparsity-one": ({"activation_sparsity_pattern": [1.0, 0.0]}, "activation_sparsity_pattern"),
    "sparsity-scalar": ({"activation_sparsity_pattern": 0.95}, "activation_sparsity_pattern"),
    "active-index-out-of-range": ({"altup_active_idx": 4}, "altup_active_idx"),
    "hidden-not-multiple-of-heads": ({"hidden_size": 9}, "multiple of num_attention_heads"),
    "kv-shared-without-full-producer": ({"num_kv_shared_layers": 1}, "no layer before 1"),
    "layer-type-unknown": ({"layer_types": [_S, "chunked_attention"]}, "layer_types"),
    "window-null": ({"sliding_window": None}, "sliding_window is null"),
    "cap-zero": ({"final_logit_softcapping": 0.0}, "final_logit_softcapping"),
    "flat-rope-parameters": ({"rope_parameters": {"rope_type": "linear", "factor": 8.0}}, "keyed by layer type"),
    "activation": ({"hidden_activation": "relu2"}, "not supported"),
}


@pytest.mark.parametrize("overrides,message", REFUSED.values(), ids=REFUSED.keys())
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        gemma3n.Gemma3nConfig.from_dict({**_TINY, **overrides})
    assert "Gemma3ForCausalLM" not in str(info.value)


def test_ignored_keys_are_accepted_without_warning(recwarn):
    gemma3n.Gemma3nConfig.from_dict({**_TINY, "query_pre_attn_scalar": 256, "altup_coef_clip": 120.0,
                                     "altup_lr_multiplier": 1.0})
    assert not [w for w in recwarn if "not read" in str(w.message)]


def test_consumer_layers_have_no_key_value_weights_and_ignore_the_published_ones():
    config = gemma3n.Gemma3nConfig.from_dict({**_TINY, "num_hidden_layers": 4, "layer_types": [_S, _F, _S, _F],
                                              "num_kv_shared_layers": 2})
    shapes = gemma3n.weight_shapes(config)
    assert "model.layers.1.self_attn.k_proj.weight" in shapes
    assert not [n for n in shapes if n.startswith(("model.layers.2.self_attn.k", "model.layers.3.self_attn.v"))]
    ignored = gemma3n.ignored_weights(config)
    assert "model.layers.3.self_attn.k_proj." in ignored
    assert "model.language_model.layers.2.self_attn.v_proj." in ignored
    assert not [p for p in ignored if ".layers.1." in p]


# the model pieces

def _tiny_model(seed, **overrides):
    raw = {**_TINY, "vocab_size": 32, "vocab_size_per_layer_input": 20, "hidden_size_per_layer_input": 4,
           "intermediate_size": [12, 16], "laurel_rank": 3, "sliding_window": 2,
           "activation_sparsity_pattern": [0.9, 0.0], **overrides}
    config = gemma3n.Gemma3nConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(gemma3n.weight_shapes(config).items()):
        custom = gemma3n.weight_init(name, shape, rng)
        if custom is None:
            noise = rng.standard_normal(shape)
            custom = 1 + 0.2 * noise if len(shape) == 1 else noise / np.sqrt(shape[-1])
        weights[name] = custom
    return raw, config, weights


def test_layer_taps_are_the_active_stream():
    _, config, weights = _tiny_model(1431, altup_active_idx=2)
    ids = np.array([[1, 25, 7]])
    streams = []
    original = gemma3n.decoder_layer

    def recording(*args):
        out = original(*args)
        streams.append(out[0])
        return out

    from unittest import mock
    with mock.patch.object(gemma3n, "decoder_layer", recording):
        _, taps = gemma3n.forward(weights, config, ids)
    assert [taps[f"layers.{l}"].shape for l in range(2)] == [(1, 3, 8)] * 2
    for layer, state in enumerate(streams):
        np.testing.assert_array_equal(taps[f"layers.{layer}"], state[2])


def test_extract_submodel_with_every_layer_and_full_widths_is_the_model():
    raw, config, weights = _tiny_model(1432)
    sub, sub_raw = gemma3n.extract_submodel(weights, raw, list(config.intermediate_size))
    assert gemma3n.Gemma3nConfig.from_dict(sub_raw) == config
    assert sub.keys() == weights.keys() and all(np.array_equal(sub[k], weights[k]) for k in weights)


def test_extract_submodel_slices_the_mlp_prefix_and_the_per_layer_slots():
    raw, config, weights = _tiny_model(1433, num_hidden_layers=3, layer_types=[_S, _S, _F], intermediate_size=12,
                                       activation_sparsity_pattern=[0.9, 0.0, 0.0])
    sub, sub_raw = gemma3n.extract_submodel(weights, raw, [8, 12], layers_to_skip=[1])
    assert sub_raw["layer_types"] == [_S, _F] and sub_raw["intermediate_size"] == [8, 12]
    gate, down = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(sub[gate], weights[gate][:8])
    np.testing.assert_array_equal(sub[down], weights[down][:, :8])
    np.testing.assert_array_equal(sub["model.layers.1.laurel.linear_left.weight"],
                                  weights["model.layers.2.laurel.linear_left.weight"])
    table = weights["model.embed_tokens_per_layer.weight"]
    np.testing.assert_array_equal(sub["model.embed_tokens_per_layer.weight"],
                                  np.concatenate([table[:, :4], table[:, 8:]], 1))
    assert not [n for n in sub if n.startswith("model.layers.2.")]


@pytest.mark.parametrize("widths,skip,message", [
    ([12], (), "one width per kept layer"),
    ([12, 20], (), "one width per kept layer"),
    ([12, 16], (5,), "layer indices"),
])
def test_extract_submodel_refusals(widths, skip, message):
    raw, _, weights = _tiny_model(1434)
    with pytest.raises(ConfigError, match=message):
        gemma3n.extract_submodel(weights, raw, widths, skip)


@pytest.mark.parametrize("widths,skip,message", [
    (None, (), "must be an int or a list of 2 ints"),
    ("12", (), "must be an int or a list"),
    (12, 1, "layers_to_skip must be a list of layer indices, got 1"),
    (12, "0", "layers_to_skip must be a list of layer indices"),
    (12, [0.0], "layer indices in"),
    (12, [0, 1], r"skips every layer"),
    (12, [1, 0, 1], r"skips every layer"),
    (17, (), r"each in \[1, that layer's width\]; got \[17, 17\]"),
    (0, (1,), r"got \[0\]"),
], ids=["none", "str", "int-skip", "str-skip", "float-skip", "all", "all-repeated", "too-wide", "zero"])
def test_extract_submodel_refuses_bad_arguments_with_one_line(widths, skip, message):
    raw, _, weights = _tiny_model(1436)
    with pytest.raises(ConfigError, match=message) as caught:
        gemma3n.extract_submodel(weights, raw, widths, skip)
    assert "\n" not in str(caught.value)


def test_extract_submodel_int_width_means_every_kept_layer():
    # config.json's intermediate_size may be one int for every layer; the width argument may too.
    raw, _, weights = _tiny_model(1437, intermediate_size=16)
    by_int = gemma3n.extract_submodel(weights, raw, 12, [1])
    by_list = gemma3n.extract_submodel(weights, raw, [12], [1])
    assert by_int[1] == by_list[1] and by_int[1]["intermediate_size"] == [12]
    assert by_int[0].keys() == by_list[0].keys()
    assert all(np.array_equal(by_int[0][n], by_list[0][n]) for n in by_list[0])
    whole, _ = gemma3n.extract_submodel(weights, raw, 16)
    assert all(np.array_equal(whole[n], weights[n]) for n in weights)


def test_extract_submodel_refuses_to_skip_a_kv_producer():
    raw, _, weights = _tiny_model(1435, num_hidden_layers=4, layer_types=[_S, _F, _S, _F], num_kv_shared_layers=2,
                                  intermediate_size=12, activation_sparsity_pattern=[0.0] * 4)
    with pytest.raises(ConfigError, match="layer 1 produces the keys and values"):
        gemma3n.extract_submodel(weights, raw, [12, 12, 12], [1])


# the multimodal wrapper's embeddings

def test_multimodal_token_embedding_literal():
    table, hard, proj = RNG.standard_normal((5, 6)), 1 + 0.2 * RNG.standard_normal(6), RNG.standard_normal((8, 6))
    ids = np.array([0, 4, 2])
    inner = _norm(table[ids], hard) @ proj.T
    np.testing.assert_allclose(gemma3n_conditional.multimodal_token_embeddings(ids, table, hard, proj, 1e-6),
                               inner / np.sqrt(np.mean(inner * inner, -1, keepdims=True) + 1e-6), rtol=1e-14)


def test_conditional_config_refuses_ids_without_an_embedder_row():
    text = {**_TINY, "vocab_size": 40}
    ok = {"text_config": text, "vision_config": {"vocab_offset": 24, "vocab_size": 8},
          "audio_config": {"vocab_offset": 32, "vocab_size": 8}}
    config = gemma3n_conditional.Gemma3nConditionalConfig.from_dict(ok)
    assert (config.vocab_size, config.embed_audio.vocab_offset) == (40, 32)
    with pytest.raises(ConfigError, match="must fit the embedders"):
        gemma3n_conditional.Gemma3nConditionalConfig.from_dict({**ok, "audio_config": {"vocab_offset": 30,
                                                                                        "vocab_size": 8}})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        gemma3n_conditional.Gemma3nConditionalConfig.from_dict({**ok, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="must be an object"):
        gemma3n_conditional.Gemma3nConditionalConfig.from_dict({**ok, "vision_config": [1]})


def test_config_is_a_frozen_dataclass():
    config = gemma3n.Gemma3nConfig.from_dict(_TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 16
