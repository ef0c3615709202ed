"""Grok 2.5 (``Grok1ForCausalLM``): each quirk pinned on its own against a small
computation written here, independent of ``refimpl/models/grok2.py``'s code path.

No transformers model exists and sglang cannot run here, so these tests and the
golden cases are the only checks; each reads the behaviour off sglang's grok.py and
kernels (docs/architectures/grok2.md). Every comparison is also shown to separate
the right behaviour from the wrong one, so none can pass vacuously.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

import refimpl
from refimpl.errors import ConfigError, MissingWeightsError, UnexpectedWeightsError
from refimpl.kv_cache import fresh_context
from refimpl.mlp import ACTIVATIONS, gelu, gelu_tanh
from refimpl.models import grok2

ERF = np.vectorize(math.erf)


def tiny(**overrides) -> dict:
    raw = {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "vocab_size": 50, "hidden_size": 24,
        "intermediate_size": 20, "moe_intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
        "residual_moe": True, "rms_norm_eps": 1e-5, "embedding_multiplier_scale": 3.5,
        "output_multiplier_scale": 0.5, "attn_logit_softcapping": 3.0, "router_logit_softcapping": 30.0,
        "final_logit_softcapping": 4.0, "attn_temperature_len": 3, "rope_theta": 1000,
    }
    raw.update(overrides)
    return raw


def weights_for(config, seed=0, scales=None):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(grok2.weight_shapes(config).items()):
        w = 1 + 0.3 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(shape[-1])
        for key, s in (scales or {}).items():
            if key in name:
                w = w * s
        out[name] = w
    return out


def setup(seed=0, scales=None, **overrides):
    config = grok2.Grok2Config.from_dict(tiny(**overrides))
    w = weights_for(config, seed, {"lm_head": 6.0, **(scales or {})})
    ids = np.random.default_rng(seed + 1).integers(0, config.vocab_size, (2, 9))
    return config, w, ids


def rms(x, w, eps=1e-5):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def layer(w, index):
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# Independent pieces (loops and math.erf; nothing from grok2)

def erf_gelu(z):
    return 0.5 * z * (1 + ERF(z / math.sqrt(2)))


def independent_moe(h, p, config, *, cap=30.0, renormalise=False, act=erf_gelu):
    """Loop over tokens: capped softmax router, top-k by probability, un-renormalised weights."""
    e_count, k = config.num_local_experts, config.num_experts_per_tok
    out = np.zeros_like(h)
    flat, res = h.reshape(-1, h.shape[-1]), out.reshape(-1, h.shape[-1])
    for n, x in enumerate(flat):
        z = p["block_sparse_moe.gate.weight"] @ x
        if cap:
            z = cap * np.tanh(z / cap)
        prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        chosen = sorted(range(e_count), key=lambda e: (-prob[e], e))[:k]
        total = sum(prob[e] for e in chosen) if renormalise else 1.0
        for e in chosen:
            w1, w3, w2 = (p[f"block_sparse_moe.experts.{e}.{m}.weight"] for m in ("w1", "w3", "w2"))
            res[n] += prob[e] / total * (w2 @ (act(w1 @ x) * (w3 @ x)))
    if config.residual_moe:
        dense = (act(h @ p["mlp.gate_proj.weight"].T) * (h @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
        out = (dense + out) / math.sqrt(2)
    return out


def independent_attention(h, p, config, *, temperature_first=False):
    """Loops over batch, head and query: NeoX RoPE on all D dims, scale, cap, then temperature."""
    b, t, _ = h.shape
    d, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    q = (h @ p["self_attn.q_proj.weight"].T).reshape(b, t, n_heads, d)
    k = (h @ p["self_attn.k_proj.weight"].T).reshape(b, t, n_kv, d)
    v = (h @ p["self_attn.v_proj.weight"].T).reshape(b, t, n_kv, d)
    theta = float(int(config.rope_theta))

    def rotate(x, pos):
        half = d // 2
        angle = pos * theta ** (-2.0 * np.arange(half) / d)
        c, s = np.cos(angle), np.sin(angle)
        return np.concatenate([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])

    length = config.attn_temperature_len
    out = np.zeros((b, t, n_heads, d))
    for bi in range(b):
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            for i in range(t):
                qi = rotate(q[bi, i, head], i)
                scores = np.array([qi @ rotate(k[bi, j, kv], j) for j in range(i + 1)]) / math.sqrt(d)
                tau = math.log2(i) / math.log2(length) if i > length else 1.0
                c = config.attn_logit_softcapping
                scores = c * np.tanh(tau * scores / c) if temperature_first else tau * c * np.tanh(scores / c)
                prob = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
                out[bi, i, head] = prob @ v[bi, : i + 1, kv]
    return out.reshape(b, t, -1) @ p["self_attn.o_proj.weight"].T


# Quirks

def test_embedding_is_scaled_by_embedding_multiplier_scale():
    config, w, ids = setup()
    _, taps = grok2.forward(w, config, ids)
    np.testing.assert_array_equal(taps["embed"], w["model.embed_tokens.weight"][ids] * 3.5)
    logits_1, _ = grok2.forward(w, dataclasses.replace(config, embedding_multiplier_scale=1.0), ids)
    assert rel(logits_1, grok2.forward(w, config, ids)[0]) > 1e-2


def test_sandwich_norms_four_per_layer_and_final_norm_on_the_residual():
    config, w, ids = setup()
    _, taps = grok2.forward(w, config, ids)
    p = layer(w, 1)
    x = taps["layers.0"]
    rope = grok2.rope_tables(config, np.arange(ids.shape[1]), np.float64)
    tau = grok2.attention_temperature(np.arange(ids.shape[1]), config.attn_temperature_len)
    attn, _ = grok2.attention_block(rms(x, p["pre_attn_norm.weight"]), p, config, rope, tau, fresh_context(2, 9), 0)
    x = x + rms(attn, p["post_attn_norm.weight"])
    x = x + rms(grok2.moe_block(rms(x, p["pre_moe_norm.weight"]), p, config), p["post_moe_norm.weight"])
    np.testing.assert_allclose(taps["layers.1"], x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(taps["norm"], rms(x, w["model.norm.weight"]), rtol=1e-12, atol=1e-12)
    # A pre-norm-only layer is far away (the post norms matter).
    pre_only = taps["layers.0"] + attn
    pre_only = pre_only + grok2.moe_block(rms(pre_only, p["pre_moe_norm.weight"]), p, config)
    assert rel(pre_only, x) > 1e-2


def test_attention_block_rope_cap_then_temperature_matches_loops():
    config, w, ids = setup(scales={"q_proj": 2.0, "k_proj": 2.0})
    p = layer(w, 0)
    h = np.random.default_rng(5).standard_normal((2, 9, config.hidden_size))
    rope = grok2.rope_tables(config, np.arange(9), np.float64)
    tau = grok2.attention_temperature(np.arange(9), config.attn_temperature_len)
    got, _ = grok2.attention_block(h, p, config, rope, tau, fresh_context(2, 9), 0)
    np.testing.assert_allclose(got, independent_attention(h, p, config), rtol=1e-10, atol=1e-12)
    # Temperature before the cap is a different function when the cap bites.
    assert rel(independent_attention(h, p, config, temperature_first=True), got) > 1e-3


def test_temperature_law_threshold_is_strict_and_absolute():
    tau = grok2.attention_temperature(np.arange(12), 4)
    expected = [1.0] * 5 + [math.log2(p) / 2 for p in range(5, 12)]
    np.testing.assert_allclose(tau, expected, rtol=1e-15)
    assert tau[4] == 1.0 and tau[5] > 1.0
    np.testing.assert_array_equal(grok2.attention_temperature(np.arange(12), -1), np.ones(12))
    np.testing.assert_array_equal(grok2.attention_temperature(np.arange(12), 0), np.ones(12))
    # The published L = 1024: 1.2 at 4096, log2(131071) / 10 at the last position.
    np.testing.assert_allclose(grok2.attention_temperature(np.array([1024, 1025, 4096, 131071]), 1024),
                               [1.0, math.log2(1025) / 10, 1.2, math.log2(131071) / 10], rtol=1e-15)


def test_positions_up_to_the_threshold_are_unaffected_and_later_ones_are():
    config, w, ids = setup(scales={"q_proj": 2.0, "k_proj": 2.0})
    tempered, _ = grok2.forward(w, config, ids)
    plain, _ = grok2.forward(w, dataclasses.replace(config, attn_temperature_len=-1), ids)
    length = config.attn_temperature_len
    # Causal: positions 0..L see only untempered queries, in every layer.
    np.testing.assert_array_equal(tempered[:, : length + 1], plain[:, : length + 1])
    assert all(np.abs(tempered[:, p] - plain[:, p]).max() > 1e-6 for p in range(length + 1, 9))


def test_router_softmax_over_all_experts_top_k_not_renormalised():
    config, w, _ = setup()
    p = layer(w, 0)
    h = np.random.default_rng(2).standard_normal((2, 7, config.hidden_size))
    got = grok2.moe_block(h, p, config)
    np.testing.assert_allclose(got, independent_moe(h, p, config), rtol=1e-10, atol=1e-12)
    assert rel(independent_moe(h, p, config, renormalise=True), got) > 1e-2
    # The chosen probabilities sum to less than 1.
    z = h.reshape(-1, config.hidden_size) @ p["block_sparse_moe.gate.weight"].T
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    assert np.all(-np.sort(-prob, -1)[:, :2].sum(-1) < 0.99)


def test_router_soft_cap_applies_to_router_logits():
    config, w, _ = setup(scales={"block_sparse_moe.gate": 40.0})
    p = layer(w, 0)
    h = np.random.default_rng(3).standard_normal((1, 6, config.hidden_size))
    assert np.abs(h @ p["block_sparse_moe.gate.weight"].T).max() > 60
    got = grok2.moe_block(h, p, config)
    np.testing.assert_allclose(got, independent_moe(h, p, config, cap=30.0), rtol=1e-10, atol=1e-12)
    assert rel(independent_moe(h, p, config, cap=None), got) > 1e-3
    # The key is read: a cap of 5 is another function (sglang hard-codes 30, see the docs).
    capped_5 = grok2.moe_block(h, p, dataclasses.replace(config, router_logit_softcapping=5.0))
    np.testing.assert_allclose(capped_5, independent_moe(h, p, config, cap=5.0), rtol=1e-10, atol=1e-12)


def test_dense_mlp_combined_as_mean_over_sqrt2_and_absent_without_residual_moe():
    config, w, _ = setup()
    p = layer(w, 0)
    h = np.random.default_rng(4).standard_normal((3, config.hidden_size))
    sparse = independent_moe(h, p, dataclasses.replace(config, residual_moe=False))
    dense = (erf_gelu(h @ p["mlp.gate_proj.weight"].T) * (h @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
    np.testing.assert_allclose(grok2.moe_block(h, p, config), (dense + sparse) / math.sqrt(2), rtol=1e-10, atol=1e-12)
    assert rel(dense + sparse, grok2.moe_block(h, p, config)) > 0.3
    no_dense = dataclasses.replace(config, residual_moe=False)
    mlp_free = {k: v for k, v in p.items() if not k.startswith("mlp.")}
    np.testing.assert_allclose(grok2.moe_block(h, mlp_free, no_dense), sparse, rtol=1e-10, atol=1e-12)


def test_output_multiplier_then_final_cap():
    config, w, ids = setup()
    logits, taps = grok2.forward(w, config, ids)
    raw = 0.5 * (taps["norm"] @ w["lm_head.weight"].T)
    assert np.abs(raw).max() > 4.0, "the cap must bite"
    np.testing.assert_allclose(logits, 4.0 * np.tanh(raw / 4.0), rtol=1e-12, atol=1e-13)
    assert rel(4.0 * np.tanh(2 * raw / 4.0), logits) > 0.1
    uncapped, _ = grok2.forward(w, dataclasses.replace(config, final_logit_softcapping=None), ids)
    np.testing.assert_allclose(uncapped, raw, rtol=1e-12, atol=1e-13)


def test_gelu_is_the_erf_form_not_tanh():
    z = np.linspace(-6, 6, 241)
    np.testing.assert_allclose(gelu(z), erf_gelu(z), rtol=1e-15, atol=1e-16)
    assert np.abs(gelu(z) - gelu_tanh(z)).max() > 4e-4
    assert ACTIVATIONS["gelu"] is gelu and grok2.HIDDEN_ACT == "gelu"
    np.testing.assert_allclose(gelu(z.astype(np.float32)), erf_gelu(z).astype(np.float32), rtol=2e-7, atol=1e-7)
    assert gelu(z.astype(np.float32)).dtype == np.float32
    np.testing.assert_array_equal(gelu(np.array([-np.inf, 0.0, np.inf])), [-0.0, 0.0, np.inf])
    # The experts use it: the tanh form moves the MoE output.
    config, w, _ = setup()
    h = np.random.default_rng(6).standard_normal((4, config.hidden_size))
    assert rel(independent_moe(h, layer(w, 0), config, act=gelu_tanh), grok2.moe_block(h, layer(w, 0), config)) > 1e-5


def test_rope_theta_is_truncated_to_an_integer_as_sglang_does():
    config, w, ids = setup()
    assert grok2.Grok2Config.from_dict(tiny(rope_theta=1000.9)).rope_theta == 1000
    shifted = grok2.Grok2Config.from_dict(tiny(rope_theta=1000.9))
    np.testing.assert_array_equal(grok2.forward(w, shifted, ids)[0], grok2.forward(w, config, ids)[0])
    assert grok2.Grok2Config.from_dict(grok2.PRESETS["grok-2"]).rope_theta == 208533496


def test_moe_block_takes_a_config_dict_and_names_missing_weights():
    raw = tiny()
    config = grok2.Grok2Config.from_dict(raw)
    p = layer(weights_for(config), 0)
    h = np.random.default_rng(7).standard_normal((1, 3, config.hidden_size))
    np.testing.assert_array_equal(grok2.moe_block(h, p, raw), grok2.moe_block(h, p, config))
    del p["block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(MissingWeightsError, match=r"experts\.3\.w2"):
        grok2.moe_block(h, p, config)


# Checkpoint layout and config

LAYER_NAMES = {
    "pre_attn_norm.weight", "post_attn_norm.weight", "pre_moe_norm.weight", "post_moe_norm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "block_sparse_moe.gate.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    *(f"block_sparse_moe.experts.{e}.{m}.weight" for e in range(4) for m in ("w1", "w2", "w3")),
}


def save(tmp_path, raw, weights):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.astype(np.float32) for k, v in weights.items()}, tmp_path / "model.safetensors")
    return tmp_path


def test_loads_from_the_published_tensor_names(tmp_path):
    raw = tiny()
    config = grok2.Grok2Config.from_dict(raw)
    shapes = grok2.weight_shapes(config)
    assert {n[len("model.layers.0."):] for n in shapes if n.startswith("model.layers.0.")} == LAYER_NAMES
    assert shapes["model.layers.1.block_sparse_moe.experts.0.w2.weight"] == (24, 12)
    assert {n for n in shapes if not n.startswith("model.layers.")} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    w = {k: v.astype(np.float32).astype(np.float64) for k, v in weights_for(config, 3).items()}
    model = refimpl.from_pretrained(save(tmp_path / "ok", raw, w))
    ids = np.array([[1, 7, 3, 49, 0]])
    np.testing.assert_array_equal(model(ids), grok2.forward(w, config, ids)[0])


def test_loading_names_what_is_missing_or_foreign(tmp_path):
    raw = tiny()
    w = weights_for(grok2.Grok2Config.from_dict(raw))
    missing = dict(w)
    del missing["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        refimpl.from_pretrained(save(tmp_path / "missing", raw, missing))
    # transformers-style fused experts are not Grok's layout.
    foreign = dict(w, **{"model.layers.0.block_sparse_moe.experts.gate_up_proj": np.zeros((4, 24, 24))})
    with pytest.raises(UnexpectedWeightsError, match="gate_up_proj"):
        refimpl.from_pretrained(save(tmp_path / "foreign", raw, foreign))
    # Without residual_moe the dense MLP must not be there.
    with pytest.raises(UnexpectedWeightsError, match=r"mlp\.gate_proj"):
        refimpl.from_pretrained(save(tmp_path / "dense", tiny(residual_moe=False), w))


def test_preset_has_the_published_parameter_count():
    config = grok2.Grok2Config.from_dict(grok2.PRESETS["grok-2"])
    total = sum(math.prod(s) for s in grok2.weight_shapes(config).values())
    # xai-org/grok-2 HF discussion #6: about 269.5 B parameters (64 layers x 4 norms, shared FFN 3 x 32768 x 8192).
    assert round(total / 1e9, 1) == 269.5
    assert config.attn_logit_softcapping == 30.0 and config.final_logit_softcapping == 50.0
    assert config.moe_intermediate_size == 16384 and config.intermediate_size == 32768 and config.residual_moe


@pytest.mark.parametrize("changes,match", [
    ({"rope_type": "yarn"}, "rope_type='yarn'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"sliding_window_size": 4096}, "sliding_window_size"),
    ({"global_attn_every_n": 4}, "global_attn_every_n"),
    ({"rope_rotate_half_dims": True}, "rope_rotate_half_dims"),
    ({"attn_temperature_len": 1}, "attn_temperature_len"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"attn_logit_softcapping_method": "clip"}, "attn_logit_softcapping_method"),
    ({"output_multiplier_scale": 0.0}, "output_multiplier_scale"),
    ({"embedding_multiplier_scale": None}, "embedding_multiplier_scale"),
    ({"router_logit_softcapping": float("nan")}, "router_logit_softcapping"),
    ({"rope_theta": 1.5}, "rope_theta"),
])
def test_bad_configs_are_refused_by_name(changes, match):
    with pytest.raises(ConfigError, match=match):
        grok2.Grok2Config.from_dict(tiny(**changes))


def test_sglang_config_defaults_and_off_switches():
    bare = {k: v for k, v in tiny().items() if k not in {
        "moe_intermediate_size", "attn_logit_softcapping", "final_logit_softcapping", "attn_temperature_len",
        "residual_moe", "head_dim", "rope_theta", "router_logit_softcapping"}}
    config = grok2.Grok2Config.from_dict(bare)
    assert (config.moe_intermediate_size, config.attn_logit_softcapping, config.final_logit_softcapping,
            config.attn_temperature_len, config.residual_moe, config.head_dim, config.rope_theta,
            config.router_logit_softcapping) == (20, 30.0, None, -1, False, 128, 10000, 30.0)
    off = grok2.Grok2Config.from_dict(tiny(attn_logit_softcapping=0, final_logit_softcapping=-1))
    assert off.attn_logit_softcapping is None and off.final_logit_softcapping is None


def test_float32_weights_compute_in_float32_and_single_token_runs():
    config, w, ids = setup()
    w32 = {k: v.astype(np.float32) for k, v in w.items()}
    logits, taps = grok2.forward(w32, config, ids[:, :1])
    assert logits.dtype == np.float32 and all(t.dtype == np.float32 for t in taps.values())
    np.testing.assert_allclose(logits, grok2.forward(w, config, ids[:, :1])[0], rtol=2e-5, atol=2e-5)


def test_transformers_backend_reports_unknown_architectures_as_not_implemented():
    pytest.importorskip("transformers")
    from conformance.backends.transformers_backend import TransformersBackend
    from conformance.manifest import Case

    backend = TransformersBackend()

    def case(arch):
        return Case(id="x", level="model", architecture=arch, tolerance_class="model_logits", checkpoint="c",
                    data="d", files={})

    for dtype in ("float64", "float32", "float16", "bfloat16"):
        reason = backend.supports(case("Grok1ForCausalLM"), dtype)
        assert isinstance(reason, str) and "Grok1ForCausalLM" in reason
        assert backend.supports(case("Qwen3ForCausalLM"), dtype) is True
    assert backend.supports(case("Qwen3ForCausalLM"), "int8") == "unknown dtype int8"
