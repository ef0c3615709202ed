"""refimpl against Hugging Face transformers on tiny random Llama 4 text checkpoints.

Models are built and randomised with transformers itself (``Llama4ForCausalLM`` on a
``Llama4TextConfig``), saved with ``save_pretrained`` (config.json says
``"architectures": ["Llama4ForCausalLM"]``, ``"model_type": "llama4_text"``) and loaded
with ``refimpl.from_pretrained``. Two bars: transformers as shipped (float32 islands in
RMSNorm, QK-norm, complex64 RoPE, the temperature and the router sigmoid) within 1e-5
relative RMS, and transformers with those islands lifted (``conformance.backends.hf_exact``)
within 1e-10 on the logits and every tap. Also: the ``moe_block`` contract against
transformers' ``Llama4TextMoe`` module, config reading, the temperature formula and the
published presets.
"""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conformance.backends.hf_exact import exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.errors import ConfigError, MissingWeightsError, WeightShapeError  # noqa: E402
from refimpl.models import llama4  # noqa: E402

BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=1, no_rope_layer_interval=4, attention_chunk_size=5, use_qk_norm=True,
    attn_temperature_tuning=True, floor_scale=3, attn_scale=0.1, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 8}

#: seed, batch, seq, config overrides
SHAPES = [
    # Scout-like: all MoE, QK-norm, llama3 with low == high (hard switch), chunk 5 over 23 tokens
    (711, 2, 23, {"rope_parameters": SCOUT_ROPE}),
    # the spec sheet's tiny config: Maverick-like interleave 2, llama3 with a blended band, chunk 4, floor 2
    (712, 2, 11, {"interleave_moe_layer_step": 2, "attention_chunk_size": 4, "floor_scale": 2,
                  "rope_parameters": {**SCOUT_ROPE, "high_freq_factor": 4.0}}),
    # top-2, attention biases, MQA, explicit NoPE and MoE schedules (NoPE first layer), E = 8
    (713, 1, 17, {"num_experts_per_tok": 2, "num_local_experts": 8, "attention_bias": True, "num_key_value_heads": 1,
                  "no_rope_layers": [0, 1, 1, 0], "moe_layers": [0, 2], "attention_chunk_size": 6,
                  "floor_scale": 4, "attn_scale": 0.2}),
    # no chunking, top-k = E, tied head, no temperature, YaRN (cos and sin carry its magnitude), MHA
    (714, 2, 9, {"num_hidden_layers": 2, "num_local_experts": 3, "num_experts_per_tok": 3,
                 "no_rope_layer_interval": 2, "attention_chunk_size": None, "attn_temperature_tuning": False,
                 "tie_word_embeddings": True, "num_key_value_heads": 4,
                 "rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 4}}),
    # one token per row
    (715, 3, 1, {"num_hidden_layers": 2}),
    # longer: head_dim 32, chunk 7 over 40 tokens, floor 5, no QK-norm, every layer MoE, Maverick's E=128-like top-1
    (716, 1, 40, {"head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "attention_chunk_size": 7,
                  "floor_scale": 5, "use_qk_norm": False, "num_local_experts": 16, "num_hidden_layers": 3,
                  "no_rope_layer_interval": 3}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, b, t, extra = request.param
    config = transformers.Llama4TextConfig(**{**BASE, **extra})
    return build_case(transformers.Llama4ForCausalLM, config, seed, "llama4", tmp_path_factory, 160, b, t)


def test_checkpoint_round_trips_as_llama4_for_causal_lm(case):
    path, _, _ = case
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["Llama4ForCausalLM"] and raw["model_type"] == "llama4_text"
    assert type(transformers.AutoModelForCausalLM.from_pretrained(path)).__name__ == "Llama4ForCausalLM"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_as_shipped(case, dtype, attn):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), attn), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_float64_islands_lifted(case, attn):
    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, attn)
    assert_agrees_to_float64(logits, taps, ours)


# The moe_block contract: module-relative weights of transformers' Llama4TextMoe, a config.json dict.

@pytest.mark.parametrize("top_k, experts", [(1, 4), (2, 5), (5, 5)])
def test_moe_block_agrees_with_transformers_module(top_k, experts):
    config = transformers.Llama4TextConfig(**{**BASE, "num_experts_per_tok": top_k, "num_local_experts": experts})
    g = torch.Generator().manual_seed(720 + top_k)
    with exact_float64():
        module = transformers.models.llama4.modeling_llama4.Llama4TextMoe(config).double()
        with torch.no_grad():
            for name, p in module.named_parameters():
                fan_in = p.shape[1] if p.ndim == 3 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in ** 0.5)
            x = torch.randn(2, 7, 64, generator=g, dtype=torch.float64)
            theirs = module(x)[0].reshape(2, 7, 64).numpy()
    weights = {name: t.detach().numpy() for name, t in module.state_dict().items()}
    raw = {**json.loads(config.to_json_string()), "architectures": ["Llama4ForCausalLM"]}
    ours = llama4.moe_block(x.numpy(), weights, raw)
    assert rel_rms(ours, theirs) < 1e-12


def test_moe_block_refuses_missing_and_misshapen_weights():
    config = llama4.Llama4TextConfig.from_dict({**BASE, "architectures": ["Llama4ForCausalLM"]})
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape) for name, shape in llama4.moe_weight_shapes(config).items()}
    x = rng.standard_normal((1, 3, 64))
    with pytest.raises(MissingWeightsError, match="shared_expert.up_proj.weight"):
        llama4.moe_block(x, {k: v for k, v in weights.items() if "shared_expert.up_proj" not in k}, config)
    # down_proj output-major (E, M, I) instead of input-major (E, I, M): the DeepSeek layout by mistake.
    with pytest.raises(WeightShapeError, match="experts.down_proj"):
        llama4.moe_block(x, {**weights, "experts.down_proj": weights["experts.down_proj"].transpose(0, 2, 1)}, config)


# Config reading.

def _raw(**overrides):
    return {**BASE, "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **overrides}


@pytest.mark.parametrize("overrides, message", [
    ({"attn_temperature_tuning": 4}, "attn_temperature_tuning"),
    ({"floor_scale": 2.5}, "floor_scale"),
    ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ({"no_rope_layers": [1, 1, 2, 0]}, "no_rope_layers"),
    ({"moe_layers": [0, 4]}, "moe_layers"),
    ({"attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4}, "attention_chunk_size"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    # the Scout hard switch still validates the other llama3 keys
    ({"rope_parameters": {**SCOUT_ROPE, "factor": 0.5}}, "factor"),
    ({"rope_parameters": {**SCOUT_ROPE, "low_freq_factor": "1", "high_freq_factor": "1"}}, "low_freq_factor"),
])
def test_bad_configs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        llama4.Llama4TextConfig.from_dict(_raw(**overrides))


def test_schedules_resolve_as_transformers_does():
    for overrides in ({}, {"interleave_moe_layer_step": 2}, {"moe_layers": []}, {"no_rope_layer_interval": 2},
                      {"no_rope_layers": []}, {"attention_chunk_size": None}, {"num_hidden_layers": 7,
                                                                               "interleave_moe_layer_step": 3}):
        theirs = transformers.Llama4TextConfig(**{**BASE, **overrides})
        ours = llama4.Llama4TextConfig.from_dict(_raw(**overrides))
        assert list(ours.no_rope_layers) == list(theirs.no_rope_layers), overrides
        assert list(ours.layer_types) == list(theirs.layer_types), overrides
        assert [i for i, moe in enumerate(ours.is_moe_layer) if moe] == list(theirs.moe_layers), overrides


def test_temperature_matches_the_published_figures():
    # Spec sheet sec. 3.1 (floor_scale 8192, attn_scale 0.1): exactly 1 up to index 8190,
    # 1 + 0.1 ln 2 at 8191, 1 + 0.1 ln 3 at 16383, 1 + 0.1 ln 13 at 100000.
    tau = llama4.attention_temperature(np.arange(100001), 8192, 0.1)
    assert np.all(tau[:8191] == 1.0)
    assert tau[8191] == pytest.approx(1 + 0.1 * math.log(2), rel=1e-15)
    assert tau[16383] == pytest.approx(1 + 0.1 * math.log(3), rel=1e-15)
    assert tau[100000] == pytest.approx(1.2564949357461537, rel=1e-15)
    assert llama4.attention_temperature(np.array([[8190, 8191]]), 8192, 0.1).tolist() == [[1.0, tau[8191]]]


def test_scout_hard_switch_frequencies_match_transformers_buffer():
    # low_freq_factor == high_freq_factor: transformers only warns; each frequency is kept or divided by 16.
    scout = {"head_dim": 128, "num_attention_heads": 2,
             "rope_parameters": {**SCOUT_ROPE, "original_max_position_embeddings": 8192}}
    with exact_float64():
        rotary = transformers.models.llama4.modeling_llama4.Llama4TextRotaryEmbedding(
            transformers.Llama4TextConfig(**{**BASE, **scout}))
        theirs = rotary.inv_freq.numpy()
    ours, scaling = llama4.rope_inv_freq(llama4.Llama4TextConfig.from_dict(_raw(**scout)))
    assert scaling == 1.0 and np.max(np.abs(ours / theirs - 1)) < 1e-15
    # Spec sheet sec. 3.1: 35 of 64 frequencies kept, 29 divided by 16.
    plain = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    assert np.sum(np.isclose(ours, plain, rtol=1e-12)) == 35
    assert np.sum(np.isclose(ours, plain / 16, rtol=1e-12)) == 29


@pytest.mark.parametrize("name, total_billions", [("Llama-4-Scout-17B-16E", 109), ("Llama-4-Maverick-17B-128E", 400)])
def test_presets_have_the_published_sizes(name, total_billions):
    # Meta's model cards: 17B active parameters for both; 109B (Scout) and 400B (Maverick) total,
    # counting the vision encoder, which the text model lacks (under 1.5B).
    config = llama4.Llama4TextConfig.from_dict(llama4.PRESETS[name])
    shapes = llama4.weight_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    routed = sum(int(np.prod(s)) for n, s in shapes.items() if ".experts." in n)
    active = total - routed + routed // config.num_local_experts
    assert total_billions - 1.5 < total / 1e9 <= total_billions + 1
    assert round(active / 1e9) == 17
