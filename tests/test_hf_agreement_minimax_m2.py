"""refimpl against Hugging Face transformers on tiny random MiniMax-M2 checkpoints.

Models are built and randomised with transformers itself, including the
zero-initialised ``e_score_correction_bias`` buffers (otherwise the biased choice
is never exercised), saved with ``save_pretrained`` (which writes the published
``block_sparse_moe.*`` / ``w1, w2, w3`` layout) and loaded with
``refimpl.from_pretrained``. Two bars: transformers as shipped within 1e-5
relative RMS, and transformers with its float32 islands lifted within 1e-10,
hidden states included. ``moe_block`` is checked against transformers'
``MiniMaxM2SparseMoeBlock`` on its own state dict, and the config reading
(``rotary_dim`` / ``partial_rotary_factor``, defaults, M2's extra keys) against
``MiniMaxM2Config``.
"""

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, hf_lifted, hf_logits, randomise, rel_rms  # noqa: E402
from refimpl.errors import ConfigError  # noqa: E402
from refimpl.models import minimax_m2  # noqa: E402

VOCAB = 160

#: seed, batch, seq, config overrides (of a 2-layer, hidden 32, H=4/Hkv=2, D=24, rotary 12, E = 7, top-3 model)
SHAPES = [
    # GQA: q_norm 96 wide, k_norm 48; half the head rotated
    (861, 2, 9, {}),
    # MQA, top-1 of 5, three layers, rotary_dim 8 of 16, rope_theta 1e4
    (862, 1, 14, {"num_key_value_heads": 1, "head_dim": 16, "rotary_dim": 8, "num_local_experts": 5,
                  "num_experts_per_tok": 1, "num_hidden_layers": 3,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
    # MHA, top-k = E = 4, tied head, full rotary (no rotary_dim)
    (863, 2, 6, {"num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 4, "rotary_dim": None,
                 "tie_word_embeddings": True}),
    # partial_rotary_factor 0.25 wins over rotary_dim 12 (Dr = 6 of 24), H=6/Hkv=3, one token
    (864, 3, 1, {"num_attention_heads": 6, "num_key_value_heads": 3, "partial_rotary_factor": 0.25}),
    # 23 tokens, biases large enough to override the affinities on most tokens; YaRN on the partial rotary
    # width (original context 8, so the tokens run past it)
    (865, 1, 23, {"bias_scale": 0.5, "max_position_embeddings": 32, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 8}}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def hf_config(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=20, head_dim=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=7, num_experts_per_tok=3, rotary_dim=12,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6}, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2)
    base.update(overrides)
    return transformers.MiniMaxM2Config(**{k: v for k, v in base.items() if v is not None})


def build(config, seed, tmp_path, bias_scale=0.1):
    """A randomised MiniMax-M2 (correction biases ``bias_scale * N(0, 1)``) saved under ``tmp_path``."""
    torch.manual_seed(seed)
    model = transformers.MiniMaxM2ForCausalLM(config)
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(bias_scale * torch.randn(buffer.shape, generator=g, dtype=torch.float64))
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, b, t, overrides = request.param
    overrides = dict(overrides)
    bias_scale = overrides.pop("bias_scale", 0.1)
    path = build(hf_config(**overrides), seed, tmp_path_factory.mktemp(f"minimax_m2-{seed}"), bias_scale)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(b, t))
    return path, ids, refimpl.from_pretrained(path).forward(ids, return_hidden_states=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_agrees_with_transformers_as_shipped(case, dtype):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), "eager"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_agrees_with_transformers_float64_islands_lifted(case):
    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, "eager")
    assert_agrees_to_float64(logits, taps, ours)


def test_sdpa_and_grouped_mm_agree(case):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, torch.float32, "sdpa", experts="grouped_mm"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_correction_biases_change_the_chosen_experts(case):
    # Without this the agreement above could hold with the bias ignored.
    path, ids, ours = case
    model = refimpl.from_pretrained(path)
    if model.config.num_experts_per_tok == model.config.num_local_experts:
        pytest.skip("top-k = E: every expert is chosen whatever the bias")
    for name in model.weights:
        if name.endswith("e_score_correction_bias"):
            model.weights[name] = np.zeros_like(model.weights[name])
    assert rel_rms(model(ids), ours.logits) > 1e-3


def test_checkpoint_layout_is_the_published_one(case):
    path, _, _ = case
    names = set(refimpl.checkpoint.read_weights(path))
    assert {"model.layers.0.block_sparse_moe.e_score_correction_bias", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight"} <= names
    assert not any(".mlp." in n for n in names)


def test_moe_block_matches_the_transformers_module_on_its_state_dict(tmp_path):
    config = hf_config()
    path = build(config, 866, tmp_path)
    x = np.random.default_rng(866).standard_normal((2, 5, 32))
    with exact_float64():
        block = load_exact_float64(path).model.layers[1].mlp
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
        weights = {name: t.numpy() for name, t in block.state_dict().items()}
    assert sorted(weights) == ["e_score_correction_bias", "experts.down_proj", "experts.gate_up_proj", "gate.weight"]
    ours = minimax_m2.moe_block(x, weights, json.loads((path / "config.json").read_text()))
    assert rel_rms(ours, theirs) < 1e-13


#: config.json fragments and the rotary width transformers derives (head_dim 24)
ROTARY = [
    ({"rotary_dim": 12}, 12),
    ({"rotary_dim": 12, "partial_rotary_factor": 0.25}, 6),
    ({"rotary_dim": 12, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}},
     24),
    ({"rope_theta": 1e4}, 24),
    ({"rotary_dim": 8, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, 8),
]


@pytest.mark.parametrize("fragment,width", ROTARY, ids=[str(i) for i in range(len(ROTARY))])
def test_rotary_width_is_read_as_transformers_reads_it(tmp_path, fragment, width):
    raw = {"architectures": ["MiniMaxM2ForCausalLM"], "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
           "num_local_experts": 4, "num_experts_per_tok": 2, **fragment}
    theirs = transformers.MiniMaxM2Config.from_dict(raw)
    ours = minimax_m2.MiniMaxM2Config.from_dict(raw)
    assert ours.rope_parameters == theirs.rope_parameters
    with torch.device("meta"):
        rotary = transformers.models.minimax_m2.modeling_minimax_m2.MiniMaxM2RotaryEmbedding(theirs)
    cos, _ = minimax_m2.rotary_tables(ours, np.arange(3), np.float64)
    assert 2 * rotary.inv_freq.shape[0] == 2 * cos.shape[1] == width


def test_the_published_config_reads_as_transformers_reads_it():
    raw = minimax_m2.PRESETS["MiniMax-M2"] | {"mlp_intermediate_size": 8192, "num_mtp_modules": 3, "use_mtp": True,
                                              "mtp_transformer_layers": 1, "sliding_window": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = minimax_m2.MiniMaxM2Config.from_dict(raw)
    theirs = transformers.MiniMaxM2Config.from_dict(raw)
    assert ours.rope_parameters == theirs.rope_parameters == {
        "rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    for key in ("head_dim", "num_local_experts", "num_experts_per_tok", "intermediate_size", "num_key_value_heads"):
        assert getattr(ours, key) == getattr(theirs, key), key
    shapes = minimax_m2.weight_shapes(ours)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (6144,)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (1024,)
    # 230B parameters in all (MiniMax's model card), about 10B of them active per token
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert 228e9 < total < 231e9


def test_defaults_follow_transformers():
    raw = {"architectures": ["MiniMaxM2ForCausalLM"], "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 16, "num_experts": 8}
    ours, theirs = minimax_m2.MiniMaxM2Config.from_dict(raw), transformers.MiniMaxM2Config.from_dict(raw)
    assert (ours.head_dim, ours.num_key_value_heads, ours.num_local_experts, ours.num_experts_per_tok) == (
        theirs.head_dim, theirs.num_key_value_heads, theirs.num_local_experts, theirs.num_experts_per_tok) == (
        128, 8, 8, 8)
    assert ours.rope_parameters == theirs.rope_parameters


@pytest.mark.parametrize("edit,message", [
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"shared_intermediate_size": 1536}, "shared_intermediate_size"),
    ({"qk_norm_type": "per_head"}, "qk_norm_type"),
    ({"use_routing_bias": False}, "use_routing_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"attn_type_list": [0] + [1] * 61}, "attn_type_list"),
    ({"num_experts_per_tok": 300}, "exceeds num_local_experts"),
    ({"num_experts": 128}, "disagree"),
    ({"rotary_dim": 7}, "rotary width"),
    ({"head_dim": None}, "head_dim"),
])
def test_config_errors_name_the_field(edit, message):
    with pytest.raises(ConfigError, match=message):
        minimax_m2.MiniMaxM2Config.from_dict(minimax_m2.PRESETS["MiniMax-M2"] | edit)
