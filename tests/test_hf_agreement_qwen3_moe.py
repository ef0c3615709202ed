"""refimpl against Hugging Face transformers on tiny random Qwen3-MoE checkpoints.

Models are built and randomised with transformers itself, saved with
``save_pretrained`` (which writes the published per-expert layout) and loaded with
``refimpl.from_pretrained``. Two bars: transformers as shipped (float32 islands in
norms, RoPE, softmax and the router softmax) within 1e-5 relative RMS, and
transformers with those islands lifted (``conformance.backends.hf_exact``) within
1e-10, hidden states included. ``moe_block`` is checked against transformers'
``Qwen3MoeSparseMoeBlock`` fed with its own state dict, and the config reading
against ``Qwen3MoeConfig``.
"""

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.errors import ConfigError, MissingWeightsError, ShapeError  # noqa: E402
from refimpl.models import qwen3_moe  # noqa: E402

VOCAB = 160

#: seed, batch, seq, config overrides (of a 2-layer, hidden 32, E = 6, top-2 model)
SHAPES = [
    # renormalised top-2 of 6, GQA, head_dim 16 != hidden/heads 8
    (661, 2, 9, {"norm_topk_prob": True}),
    # no renormalisation, top-3, decoder_sparse_step 2 over 4 layers, mlp_only_layers [3]: [dense, MoE, dense, dense]
    (662, 1, 13, {"num_experts_per_tok": 3, "decoder_sparse_step": 2, "num_hidden_layers": 4, "mlp_only_layers": [3]}),
    # top-1 of 5 without renormalisation (weight = probability) and top-k = E = 5 with it, one each
    (663, 2, 7, {"num_experts": 5, "num_experts_per_tok": 1}),
    (664, 1, 11, {"num_experts": 5, "num_experts_per_tok": 5, "norm_topk_prob": True, "num_key_value_heads": 1}),
    # sliding window 4 on every layer, attention biases, tied head, head_dim absent (hidden/heads = 8)
    (665, 1, 15, {"use_sliding_window": True, "sliding_window": 4, "attention_bias": True, "tie_word_embeddings": True,
                  "head_dim": None}),
    # num_experts 0: every layer dense
    (666, 2, 5, {"num_experts": 0}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def hf_config(**overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6)
    base.update(overrides)
    if base["head_dim"] is None:
        del base["head_dim"]
    return transformers.Qwen3MoeConfig(**base)


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, b, t, overrides = request.param
    return build_case(transformers.Qwen3MoeForCausalLM, hf_config(**overrides), seed, "qwen3_moe", tmp_path_factory,
                      VOCAB, b, t)


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
    # transformers' defaults (sdpa attention, grouped_mm experts) compute the same math.
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, torch.float32, "sdpa", experts="grouped_mm"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_block_matches_the_transformers_module_on_its_state_dict(tmp_path_factory, norm_topk_prob):
    config = hf_config(norm_topk_prob=norm_topk_prob, num_experts=7, num_experts_per_tok=3)
    path, _, _ = build_case(transformers.Qwen3MoeForCausalLM, config, 667, "qwen3_moe-block", tmp_path_factory,
                            VOCAB, 1, 2)
    x = np.random.default_rng(667).standard_normal((2, 5, 32))
    with exact_float64():
        block = load_exact_float64(path).model.layers[1].mlp
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
        weights = {name: t.numpy() for name, t in block.state_dict().items()}
    assert sorted(weights) == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
    raw = json.loads((path / "config.json").read_text())
    ours = qwen3_moe.moe_block(x, weights, raw)
    assert rel_rms(ours, theirs) < 1e-13


def test_moe_block_refuses_wrong_weights():
    raw = {**qwen3_moe.PRESETS["Qwen3-30B-A3B"], "hidden_size": 8, "moe_intermediate_size": 4, "num_experts": 3,
           "num_experts_per_tok": 2}
    weights = {"gate.weight": np.zeros((3, 8)), "experts.gate_up_proj": np.zeros((3, 8, 8)),
               "experts.down_proj": np.zeros((3, 8, 4))}
    x = np.zeros((1, 2, 8))
    assert qwen3_moe.moe_block(x, weights, raw).shape == (1, 2, 8)
    with pytest.raises(MissingWeightsError, match="experts.down_proj"):
        qwen3_moe.moe_block(x, {k: v for k, v in weights.items() if k != "experts.down_proj"}, raw)
    with pytest.raises(ShapeError, match="experts.gate_up_proj"):
        qwen3_moe.moe_block(x, weights | {"experts.gate_up_proj": np.zeros((3, 4, 8))}, raw)
    with pytest.raises(ShapeError, match="hidden_size 8"):
        qwen3_moe.moe_block(np.zeros((1, 2, 9)), weights, raw)


@pytest.mark.parametrize("name", sorted(qwen3_moe.PRESETS))
def test_presets_read_as_transformers_reads_them(name):
    raw = qwen3_moe.PRESETS[name]
    ours = qwen3_moe.Qwen3MoeConfig.from_dict(raw)
    theirs = transformers.Qwen3MoeConfig.from_dict(raw)
    assert ours.head_dim == theirs.head_dim == 128 != ours.hidden_size // ours.num_attention_heads
    assert ours.num_experts == theirs.num_experts == 128
    assert ours.is_moe == (True,) * theirs.num_hidden_layers
    assert ours.rope_parameters == theirs.rope_parameters
    assert (ours.norm_topk_prob, ours.sliding_window) == (theirs.norm_topk_prob, theirs.sliding_window) == (True, None)


def test_config_defaults_and_aliases_follow_transformers():
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_local_experts": 6, "num_experts_per_tok": 2,
           "decoder_sparse_step": 2,
           "mlp_only_layers": None, "use_sliding_window": True, "max_window_layers": 3}
    ours, theirs = qwen3_moe.Qwen3MoeConfig.from_dict(raw), transformers.Qwen3MoeConfig.from_dict(raw)
    assert (ours.num_key_value_heads, ours.head_dim) == (theirs.num_key_value_heads, 32 // 4) == (4, 8)
    assert ours.num_experts == theirs.num_experts == 6
    assert ours.sliding_window == theirs.sliding_window == 4096
    assert ours.norm_topk_prob is theirs.norm_topk_prob is False
    assert ours.is_moe == (False, True, False, True)


@pytest.mark.parametrize("edit,message", [
    ({"num_experts": 4, "num_local_experts": 5}, "disagree"),
    ({"num_experts_per_tok": 7}, "exceeds num_experts"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"mlp_only_layers": [48]}, "mlp_only_layers"),
    ({"num_key_value_heads": None}, "num_key_value_heads"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_config_errors_name_the_field(edit, message):
    with pytest.raises(ConfigError, match=message):
        qwen3_moe.Qwen3MoeConfig.from_dict(
            {**qwen3_moe.PRESETS["Qwen3-30B-A3B"], "num_experts": 6, "num_experts_per_tok": 2, **edit})


def test_max_window_layers_is_read_by_nobody():
    # Released configs carry max_window_layers; Qwen3MoeConfig has no such field: no warning, no effect.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = qwen3_moe.Qwen3MoeConfig.from_dict({**qwen3_moe.PRESETS["Qwen3-30B-A3B"], "max_window_layers": 2,
                                                     "use_sliding_window": True, "sliding_window": 16})
    assert config.sliding_window == 16
    assert qwen3_moe.layer_mask(config, 20).sum() == sum(min(i + 1, 16) for i in range(20))


def test_checkpoint_layout_is_the_published_per_expert_one(case):
    path, _, _ = case
    names = set(refimpl.checkpoint.read_weights(path))
    config = refimpl.from_pretrained(path).config
    moe = [i for i, m in enumerate(config.is_moe) if m]
    for layer in moe:
        assert f"model.layers.{layer}.mlp.experts.0.gate_proj.weight" in names
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj" not in names
