"""Multi-head Latent Attention: literal == absorbed, literal == transformers, errors."""

import math

import numpy as np
import pytest

from refimpl.errors import ConfigError, InputError, MissingWeightsError, ShapeError, UnexpectedWeightsError
from refimpl.mla import (
    LATENT_NORM_EPS, apply_rope_deinterleaved, mla_absorbed, mla_cache_entries, mla_dims, mla_literal,
    mla_softmax_scale, mla_weight_shapes,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}

#: id: (H, Dq, Dc, Dn, Dr, Dv, M, rope_parameters, rope_interleave, attention_bias, B, T)
CONFIGS = {
    "lora-interleave-yarn": (4, 24, 16, 8, 8, 12, 64, YARN, True, False, 2, 11),
    "no-q-lora-bias": (3, None, 12, 6, 4, 10, 40, YARN, True, True, 1, 7),
    "rotate-half-default": (2, 16, 20, 8, 6, 8, 32, DEFAULT, False, False, 3, 13),
    "single-token": (4, 24, 16, 8, 8, 12, 64, YARN, True, True, 2, 1),
    "one-head-dv-gt-dn": (1, 8, 5, 3, 2, 17, 24, DEFAULT, True, False, 1, 19),
}


def params_of(h, dq, dc, dn, dr, dv, rope, interleave, bias, eps=1e-6):
    return dict(num_attention_heads=h, q_lora_rank=dq, kv_lora_rank=dc, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                v_head_dim=dv, rope_parameters=rope, rope_interleave=interleave, rms_norm_eps=eps,
                max_position_embeddings=64, attention_bias=bias)


def random_weights(rng, m, params, dtype=np.float64):
    dims = mla_dims(**{k: params[k] for k in ("num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")})
    weights = {}
    for name, shape in mla_weight_shapes(m, dims, params["attention_bias"]).items():
        if name.endswith(".bias"):
            w = 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1 + 0.2 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w.astype(dtype)
    return weights


def case(config_id, seed=0, dtype=np.float64):
    h, dq, dc, dn, dr, dv, m, rope, interleave, bias, b, t = CONFIGS[config_id]
    rng = np.random.default_rng(seed)
    params = params_of(h, dq, dc, dn, dr, dv, rope, interleave, bias)
    x = rng.standard_normal((b, t, m)).astype(dtype)
    positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int64)
    return x, positions, random_weights(rng, m, params, dtype), params


def rel_rms(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("config_id", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_absorbed_equals_literal_to_float64_rounding(config_id, seed):
    x, positions, weights, params = case(config_id, seed)
    literal = mla_literal(x, positions, weights, **params)
    absorbed = mla_absorbed(x, positions, weights, **params)
    assert literal.shape == x.shape and literal.dtype == np.float64
    assert rel_rms(absorbed, literal) < 1e-13


def test_absorbed_equals_literal_in_float32():
    x, positions, weights, params = case("lora-interleave-yarn", 3, np.float32)
    literal = mla_literal(x, positions, weights, **params)
    assert literal.dtype == np.float32
    assert rel_rms(mla_absorbed(x, positions, weights, **params), literal) < 1e-5


def test_positions_feed_rope_only():
    # Shifting every position by the same offset leaves q.k unchanged for unscaled RoPE magnitudes.
    x, positions, weights, params = case("rotate-half-default", 5)
    out = mla_literal(x, positions, weights, **params)
    assert rel_rms(mla_literal(x, positions + 37, weights, **params), out) < 1e-12
    assert rel_rms(mla_literal(x, positions[0], weights, **params), out) == 0.0


def test_rms_norm_eps_does_not_reach_the_latent_norms():
    x, positions, weights, params = case("lora-interleave-yarn", 6)
    x = x * 1e-3
    weights = dict(weights, **{"q_a_proj.weight": weights["q_a_proj.weight"] * 1e-3,
                               "kv_a_proj_with_mqa.weight": weights["kv_a_proj_with_mqa.weight"] * 1e-3})
    out = mla_literal(x, positions, weights, **params)
    assert np.array_equal(mla_literal(x, positions, weights, **dict(params, rms_norm_eps=0.5)), out)
    assert LATENT_NORM_EPS == 1e-6


def test_softmax_scale_uses_mscale_all_dim():
    # MLA-03 probe: mscale 0.707 vs mscale_all_dim 1.0 give different scales; only the latter is right.
    expected = 192 ** -0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert mla_softmax_scale(192, dict(YARN, mscale_all_dim=1.0)) == pytest.approx(expected, rel=1e-15)
    assert mla_softmax_scale(192, DEFAULT) == 192 ** -0.5
    assert mla_softmax_scale(192, {k: v for k, v in YARN.items() if k != "mscale_all_dim"}) == 192 ** -0.5
    # transformers applies it for any scaled rope_type, not only yarn
    assert mla_softmax_scale(16, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0,
                                  "mscale_all_dim": 0.5}) == pytest.approx(0.25 * (0.05 * math.log(4) + 1) ** 2)


def test_softmax_scale_matches_transformers_flagships():
    pytest.importorskip("torch")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    for rope in (YARN, dict(YARN, mscale=1.0, factor=32.0, mscale_all_dim=0.707), DEFAULT,
                 dict(YARN, mscale_all_dim=0)):
        assert mla_softmax_scale(192, rope) == pytest.approx(yarn_apply_mscale(rope, 192 ** -0.5), rel=1e-15)


def test_deinterleaved_layout():
    # out = [x0 c - x1 s, x2 c - x3 s | x1 c + x0 s, x3 c + x2 s] for pairs (0,1), (2,3).
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos, sin = np.array([[0.6, 0.8]]), np.array([[0.8, 0.6]])
    out = apply_rope_deinterleaved(x, cos, sin)[0, 0, 0]
    np.testing.assert_allclose(out, [1 * 0.6 - 2 * 0.8, 3 * 0.8 - 4 * 0.6, 2 * 0.6 + 1 * 0.8, 4 * 0.8 + 3 * 0.6])


def test_interleave_flag_changes_the_output():
    x, positions, weights, params = case("lora-interleave-yarn", 7)
    a = mla_literal(x, positions, weights, **params)
    b = mla_literal(x, positions, weights, **dict(params, rope_interleave=False))
    assert rel_rms(a, b) > 1e-3


# Errors

def test_missing_and_unexpected_weights_are_named():
    x, positions, weights, params = case("lora-interleave-yarn")
    with pytest.raises(MissingWeightsError, match="kv_b_proj.weight"):
        mla_literal(x, positions, {k: v for k, v in weights.items() if k != "kv_b_proj.weight"}, **params)
    with pytest.raises(UnexpectedWeightsError, match="q_proj.weight"):
        mla_absorbed(x, positions, dict(weights, **{"q_proj.weight": weights["q_b_proj.weight"]}), **params)
    with pytest.raises(UnexpectedWeightsError, match="o_proj.bias"):
        mla_literal(x, positions, dict(weights, **{"o_proj.bias": np.zeros(64)}), **params)


def test_wrong_shapes_are_refused():
    x, positions, weights, params = case("lora-interleave-yarn")
    with pytest.raises(ShapeError, match="kv_b_proj.weight"):
        mla_literal(x, positions, dict(weights, **{"kv_b_proj.weight": weights["kv_b_proj.weight"][:-1]}), **params)
    with pytest.raises(ShapeError, match="positions"):
        mla_literal(x, positions[:, :-1], weights, **params)
    with pytest.raises(ShapeError, match="hidden_states"):
        mla_literal(x[0], positions, weights, **params)
    with pytest.raises(ShapeError, match="q_a_proj.weight"):
        mla_literal(x[..., :-1], positions, weights, **params)


def test_bad_parameters_and_dtypes_are_refused():
    x, positions, weights, params = case("lora-interleave-yarn")
    with pytest.raises(ConfigError, match="qk_rope_head_dim must be even"):
        mla_literal(x, positions, weights, **dict(params, qk_rope_head_dim=7))
    with pytest.raises(ConfigError, match="rope_interleave"):
        mla_literal(x, positions, weights, **dict(params, rope_interleave="yes"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        mla_literal(x, positions, weights, **dict(params, num_attention_heads=0))
    with pytest.raises(ConfigError, match="factor"):
        mla_literal(x, positions, weights, **dict(params, rope_parameters=dict(YARN, factor=None)))
    with pytest.raises(InputError, match="positions"):
        mla_literal(x, positions.astype(np.float64), weights, **params)
    with pytest.raises(InputError, match="hidden_states"):
        mla_cache_entries(x.astype(np.int64), positions, weights, **params)
    with pytest.raises(ValueError, match="compute dtype"):
        mla_literal(x.astype(np.float32), positions, weights, **params)


# Against transformers' DeepseekV3Attention, float64 with the float32 islands lifted

def _hf_attention(config_id, seed, eps=1e-6):
    """refimpl's literal MLA and transformers' attention module (+ its cache) on the same random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conformance.backends.hf_exact import exact_float64
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    h, dq, dc, dn, dr, dv, m, rope, interleave, bias, b, t = CONFIGS[config_id]
    x, positions, weights, params = case(config_id, seed)
    config = transformers.DeepseekV3Config(
        hidden_size=m, num_attention_heads=h, num_key_value_heads=h, q_lora_rank=dq, kv_lora_rank=dc,
        qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, rope_parameters=dict(rope),
        rope_interleave=interleave, attention_bias=bias, rms_norm_eps=eps, max_position_embeddings=64,
        num_hidden_layers=1, vocab_size=32, pad_token_id=None)
    config._attn_implementation = "eager"
    with exact_float64(), torch.no_grad():
        module = hf.DeepseekV3Attention(config, 0).double().eval()
        for name, p in module.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
        rotary = hf.DeepseekV3RotaryEmbedding(config)
        hs = torch.from_numpy(x)
        cos_sin = rotary(hs, torch.from_numpy(positions))
        mask = torch.full((t, t), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
        cache = transformers.DynamicCache(config=config)
        out, _ = module(hs, cos_sin, mask, cache=cache)
        layer = cache.layers[0]
        hf_cache = (layer.keys[:, 0].numpy(), layer.values[:, 0].numpy())
    return x, positions, weights, dict(params, rms_norm_eps=eps), out.numpy(), hf_cache


@pytest.mark.parametrize("config_id", sorted(CONFIGS))
def test_literal_matches_transformers_attention_float64(config_id):
    x, positions, weights, params, theirs, _ = _hf_attention(config_id, 11)
    assert rel_rms(mla_literal(x, positions, weights, **params), theirs) < 1e-10


def test_cache_entries_match_transformers_cache_layout():
    # transformers caches the normalised latent as "keys" and the rotated, de-interleaved k^R as "values".
    x, positions, weights, params, _, (keys, values) = _hf_attention("lora-interleave-yarn", 12)
    c_kv, k_rope = mla_cache_entries(x, positions, weights, **params)
    assert rel_rms(c_kv, keys) < 1e-12 and rel_rms(k_rope, values) < 1e-12


def test_transformers_ignores_rms_norm_eps_in_the_latent_norms():
    # With rms_norm_eps = 0.1 in the config transformers' attention still agrees with eps 1e-6 latents.
    x, positions, weights, params, theirs, _ = _hf_attention("no-q-lora-bias", 13, eps=0.1)
    assert rel_rms(mla_literal(x, positions, weights, **params), theirs) < 1e-10
