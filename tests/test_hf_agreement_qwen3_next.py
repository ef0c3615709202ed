"""refimpl against Hugging Face transformers on tiny random Qwen3-Next checkpoints.

Models are built and randomised with transformers itself, saved with ``save_pretrained``
(the published per-expert layout) and loaded with ``refimpl.from_pretrained``. Two bars:
transformers as shipped (float32 islands in the norms, RoPE, softmaxes, router, the whole
gated-delta core) within 1e-5 relative RMS of the logits, and transformers with those
islands lifted (``conformance.backends.hf_exact``) within 1e-10 on the logits and every
tap. Also: the recurrent and chunked delta rule give the same model, ``moe_block`` against
``Qwen3NextSparseMoeBlock`` on its own state dict, the config reading against
``Qwen3NextConfig``, and the checkpoint layouts (``mtp.*`` ignored, fused experts).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.errors import ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError  # noqa: E402
from refimpl.models import qwen3_next  # noqa: E402

VOCAB = 160
FULL, LINEAR = "full_attention", "linear_attention"

#: seed, batch, seq, norm offset of the randomised 1-D parameters, config overrides (of a 4-layer,
#: hidden 32 model: layers [linear, full, linear, full], E = 6 top-2, mlp_only_layers [0])
SHAPES = [
    # GQA 4/2, head_dim 16 != hidden/heads 8, Dr = 4, GDN Hk 2 / Hv 4 with d_k 8 != d_v 12, shared expert
    (1341, 2, 9, 1.0, {}),
    # explicit layer_types, MQA, 70 tokens (two delta-rule chunks), norm gains around 1 (offsets 0.2 N)
    (1342, 1, 70, 0.0, {"num_hidden_layers": 3, "layer_types": [FULL, LINEAR, LINEAR], "num_key_value_heads": 1}),
    # 150 tokens (three chunks), top-3 without renormalisation, YaRN over a partial factor of 0.5 in the dict
    (1343, 1, 150, 0.0, {"num_hidden_layers": 2, "norm_topk_prob": False, "num_experts_per_tok": 3,
                         "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e7, "factor": 4.0,
                                             "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
                         "max_position_embeddings": 256}),
    # tied head, attention biases, decoder_sparse_step 2 ([dense, MoE, dense, MoE] less mlp_only_layers [0])
    (1344, 2, 6, 1.0, {"tie_word_embeddings": True, "attention_bias": True, "decoder_sparse_step": 2,
                       "full_attention_interval": 4}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def hf_config(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.25, rope_theta=1e7,
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                linear_num_value_heads=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
                shared_expert_intermediate_size=20, norm_topk_prob=True, full_attention_interval=2,
                mlp_only_layers=[0], rms_norm_eps=1e-6)
    base.update(overrides)
    if "rope_parameters" in base:
        base.pop("rope_theta")
        base.pop("partial_rotary_factor")
    return transformers.Qwen3NextConfig(**base)


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, b, t, offset, overrides = request.param
    return build_case(transformers.Qwen3NextForCausalLM, hf_config(**overrides), seed, "qwen3_next",
                      tmp_path_factory, VOCAB, b, t, norm_offset=offset)


def test_agrees_with_transformers_as_shipped(case):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, torch.float32, "eager"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_agrees_with_transformers_float64_islands_lifted(case):
    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, "eager")
    assert_agrees_to_float64(logits, taps, ours)


def test_sdpa_and_grouped_mm_agree(case):
    # transformers' defaults (sdpa attention, grouped_mm experts) compute the same math.
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, torch.float32, "sdpa", experts="grouped_mm"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_the_layer_schedule_is_the_one_transformers_built(case):
    path, _, _ = case
    ours = refimpl.from_pretrained(path).config
    theirs = transformers.AutoConfig.from_pretrained(path)
    assert ours.layer_types == tuple(theirs.layer_types)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert ours.is_moe == tuple(type(layer.mlp).__name__ == "Qwen3NextSparseMoeBlock" for layer in model.model.layers)


def test_recurrent_and_chunked_delta_rule_give_the_same_model(case):
    path, ids, ours = case
    model = refimpl.from_pretrained(path)
    recurrent, _ = qwen3_next.forward(model.weights, model.config, ids, chunk_size=None)
    small_chunks, _ = qwen3_next.forward(model.weights, model.config, ids, chunk_size=5)
    assert rel_rms(recurrent, ours.logits) < 1e-12
    assert rel_rms(small_chunks, ours.logits) < 1e-12


def test_decoder_stack_stops_before_the_final_norm(case):
    path, ids, ours = case
    model = refimpl.from_pretrained(path)
    h, taps = qwen3_next.decoder_stack(model.weights, model.config, ids)
    assert list(taps) == list(ours.hidden_states)[:-1]
    assert np.array_equal(h, ours.hidden_states[f"layers.{model.config.num_hidden_layers - 1}"])


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_matches_the_transformers_module_on_its_state_dict(tmp_path_factory, norm_topk_prob):
    config = hf_config(norm_topk_prob=norm_topk_prob, num_experts=7, num_experts_per_tok=3, num_hidden_layers=2)
    path, _, _ = build_case(transformers.Qwen3NextForCausalLM, config, 1345, "qwen3_next-block", tmp_path_factory,
                            VOCAB, 1, 2)
    x = np.random.default_rng(1345).standard_normal((2, 5, 32))
    with exact_float64():
        block = load_exact_float64(path).model.layers[1].mlp
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
        weights = {name: t.numpy() for name, t in block.state_dict().items()}
    assert sorted(weights) == sorted(qwen3_next.moe_module_shapes(refimpl.from_pretrained(path).config))
    raw = json.loads((path / "config.json").read_text())
    assert rel_rms(qwen3_next.moe_block(x, weights, raw), theirs) < 1e-13


def test_moe_block_refuses_wrong_weights():
    raw = {**qwen3_next.PRESETS["Qwen3-Next-80B-A3B"], "hidden_size": 8, "moe_intermediate_size": 4,
           "shared_expert_intermediate_size": 6, "num_experts": 3, "num_experts_per_tok": 2}
    config = qwen3_next.Qwen3NextConfig.from_dict(raw)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s) for k, s in qwen3_next.moe_module_shapes(config).items()}
    x = rng.standard_normal((1, 2, 8))
    assert qwen3_next.moe_block(x, weights, raw).shape == (1, 2, 8)
    with pytest.raises(MissingWeightsError, match="shared_expert_gate.weight"):
        qwen3_next.moe_block(x, {k: v for k, v in weights.items() if k != "shared_expert_gate.weight"}, raw)
    with pytest.raises(ShapeError, match="shared_expert.up_proj.weight"):
        qwen3_next.moe_block(x, weights | {"shared_expert.up_proj.weight": np.zeros((4, 8))}, config)
    with pytest.raises(ShapeError, match="hidden_size 8"):
        qwen3_next.moe_block(np.zeros((1, 2, 9)), weights, config)


# -- config reading


def test_preset_reads_as_transformers_reads_it():
    raw = qwen3_next.PRESETS["Qwen3-Next-80B-A3B"]
    ours, theirs = qwen3_next.Qwen3NextConfig.from_dict(raw), transformers.Qwen3NextConfig.from_dict(raw)
    assert ours.layer_types == tuple(theirs.layer_types)
    assert [i for i, t in enumerate(ours.layer_types) if t == FULL] == list(range(3, 48, 4))
    assert ours.rope_parameters == theirs.rope_parameters == {"rope_theta": 1e7, "rope_type": "default",
                                                              "partial_rotary_factor": 0.25}
    assert (ours.head_dim, ours.num_experts, ours.norm_topk_prob) == (theirs.head_dim, theirs.num_experts, True)
    assert ours.is_moe == (True,) * 48
    shapes = qwen3_next.weight_shapes(ours)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (2048, 4096)


BASE = {"architectures": ["Qwen3NextForCausalLM"], "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2}

RESOLUTIONS = {
    "defaults": {},
    "interval-3": {"full_attention_interval": 3},
    "layer-types-beat-interval": {"layer_types": [FULL] * 2 + [LINEAR] * 4, "full_attention_interval": 2},
    "top-level-factor-and-theta": {"partial_rotary_factor": 0.5, "rope_theta": 1e6},
    "dict-factor-wins": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5, "partial_rotary_factor": 0.5},
                         "partial_rotary_factor": 0.75},
    "null-factor-means-full-rotary": {"partial_rotary_factor": None},
    "legacy-rope-scaling": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1e6},
    "schedule": {"mlp_only_layers": [1], "decoder_sparse_step": 2, "norm_topk_prob": False},
    "mlp-only-null": {"mlp_only_layers": None},
}


@pytest.mark.parametrize("name", sorted(RESOLUTIONS))
def test_config_resolution_follows_transformers(name):
    raw = {**BASE, **RESOLUTIONS[name]}
    ours, theirs = qwen3_next.Qwen3NextConfig.from_dict(raw), transformers.Qwen3NextConfig.from_dict(raw)
    assert ours.layer_types == tuple(theirs.layer_types)
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.mlp_only_layers == tuple(theirs.mlp_only_layers)
    assert ours.norm_topk_prob == theirs.norm_topk_prob
    assert ours.head_dim == theirs.head_dim


@pytest.mark.parametrize("edit,message", [
    ({"full_attention_interval": 0}, "full_attention_interval"),
    ({"layer_types": [FULL] * 5}, "layer_types"),
    ({"layer_types": ["sliding_attention"] * 6}, "layer_types"),
    ({"linear_num_value_heads": 3, "linear_num_key_heads": 2}, "linear_num_value_heads"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "num_key_value_heads"),
    ({"num_experts_per_tok": 5}, "exceeds num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attn_output_gate": False}, "attn_output_gate"),
    ({"partial_rotary_factor": 0.125}, "partial_rotary_factor"),
    ({"head_dim": None}, "head_dim"),
    ({"mlp_only_layers": [6]}, "mlp_only_layers"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
])
def test_config_errors_name_the_field(edit, message):
    with pytest.raises(ConfigError, match=message):
        qwen3_next.Qwen3NextConfig.from_dict({**BASE, **edit})


# -- checkpoint layouts


def _rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(file)
    save_file(edit(weights), file, metadata={"format": "pt"})


def test_mtp_weights_are_ignored_as_transformers_ignores_them(tmp_path_factory):
    path, ids, ours = build_case(transformers.Qwen3NextForCausalLM, hf_config(num_hidden_layers=2), 1346,
                                 "qwen3_next-mtp", tmp_path_factory, VOCAB, 1, 5)
    _rewrite_weights(path, lambda w: {**w, "mtp.fc.weight": np.ones((32, 64), np.float32),
                                      "mtp.layers.0.input_layernorm.weight": np.ones(32, np.float32)})
    again = refimpl.from_pretrained(path).forward(ids)
    assert np.array_equal(again.logits, ours.logits)
    assert rel_rms(hf_logits(path, ids, torch.float64, "eager"), ours.logits) < 1e-5
    _rewrite_weights(path, lambda w: {**w, "model.mtp_like.weight": np.ones(3, np.float32)})
    with pytest.raises(UnexpectedWeightsError, match="model.mtp_like.weight"):
        refimpl.from_pretrained(path)


def test_fused_expert_layout_loads_to_the_same_weights(tmp_path_factory):
    torch.manual_seed(1347)
    model = transformers.Qwen3NextForCausalLM(hf_config(num_hidden_layers=2))
    published, fused = tmp_path_factory.mktemp("qn-published"), tmp_path_factory.mktemp("qn-fused")
    model.save_pretrained(published)
    model.save_pretrained(fused, save_original_format=False)
    from safetensors.numpy import load_file

    names = set(load_file(fused / "model.safetensors"))
    # layer 0 is dense (mlp_only_layers [0]); layer 1 is the MoE layer
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in set(load_file(published / "model.safetensors"))
    a, b = refimpl.from_pretrained(published), refimpl.from_pretrained(fused)
    assert a.weights.keys() == b.weights.keys()
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
