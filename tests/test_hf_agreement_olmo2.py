"""refimpl against Hugging Face transformers on tiny random OLMo 2 checkpoints.

Models are built and randomised with transformers itself, saved with
``save_pretrained`` and loaded with ``refimpl.from_pretrained``. Two bars:
transformers as shipped (float32 islands in norms, RoPE and softmax) within 1e-5
relative RMS, and transformers with those islands lifted
(``conformance.backends.hf_exact``) within 1e-10, hidden states included. Then the
golden cases are shown to discriminate: the mistakes engines make on OLMo 2 move
their logits by far more than any tolerance.
"""

from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.models import olmo2  # noqa: E402
from refimpl.models._llama_like import projection, split_heads  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

#: seed, layers, heads, kv heads, hidden, tied, batch, seq, extra config
SHAPES = [
    # GQA with whole-projection QK-norm (per-head statistics would differ)
    (111, 2, 4, 2, 64, False, 2, 9, {}),
    # MHA, tied, 40 tokens
    (112, 3, 4, 4, 48, True, 1, 40, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
    # MQA, a single token
    (113, 1, 6, 1, 48, False, 2, 1, {}),
    # head_dim in config.json (honoured although not an Olmo2Config field) and projection biases
    (114, 2, 4, 2, 64, False, 1, 17, {"head_dim": 24, "attention_bias": True}),
    # linear RoPE scaling from the legacy rope_scaling key
    (115, 2, 4, 2, 32, False, 2, 23, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]
VOCAB = 160


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, layers, heads, kv, hidden, tied, b, t, extra = request.param
    extra = dict(extra)
    extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5e5})
    config = transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, **extra,
    )
    return build_case(transformers.Olmo2ForCausalLM, config, seed, "olmo2", tmp_path_factory, VOCAB, b, t)


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


@pytest.mark.parametrize("raw,expected", [
    # class defaults: Hkv = H, eps 1e-5, theta 10000, head_dim = M // H
    ({}, {"num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "head_dim": 16}),
    ({"num_key_value_heads": None, "rope_theta": 5e5}, {"num_key_value_heads": 4, "rope_theta": 5e5}),
    # rope_parameters wins over a top-level rope_theta; a head_dim key is honoured
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 7e5}, "rope_theta": 3.0, "head_dim": 24},
     {"rope_theta": 7e5, "head_dim": 24}),
], ids=["defaults", "null-kv-heads", "rope-parameters-win"])
def test_config_resolution_matches_transformers(raw, expected):
    full = {"architectures": [olmo2.NAME], "model_type": "olmo2", "vocab_size": 32, "hidden_size": 64,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, **raw}
    ours = olmo2.Olmo2Config.from_dict(full)
    theirs = transformers.Olmo2Config(**{k: v for k, v in full.items() if k != "architectures"})
    attention = transformers.models.olmo2.modeling_olmo2.Olmo2Attention(theirs, 0)
    resolved = {"num_key_value_heads": theirs.num_key_value_heads, "rms_norm_eps": theirs.rms_norm_eps,
                "rope_theta": theirs.rope_parameters["rope_theta"], "head_dim": attention.head_dim}
    mine = {"num_key_value_heads": ours.num_key_value_heads, "rms_norm_eps": ours.rms_norm_eps,
            "rope_theta": ours.rope_parameters["rope_theta"], "head_dim": ours.head_dim}
    assert mine == resolved
    assert {k: mine[k] for k in expected} == expected


@pytest.mark.parametrize("raw,match", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"head_dim": None}, "head_dim"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_refuses_what_it_does_not_implement(raw, match):
    full = {"architectures": [olmo2.NAME], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, **raw}
    with pytest.raises(refimpl.RefimplError, match=match):
        olmo2.Olmo2Config.from_dict(full)


def golden_error(golden_dir, case_id, patch=None):
    """Relative RMS error of the reference's logits, under ``patch``, against a stored golden case."""
    model = refimpl.from_pretrained(golden_dir / case_id / "checkpoint")
    io = load_file(golden_dir / case_id / "io.safetensors")
    with patch or nullcontext():
        logits = model(io["input_ids"])
    return rel_rms(logits, io["logits"])


def per_head_qk_norm_attention(h, p, config, rope, context, layer):
    """The Qwen3 placement on OLMo 2: RMS statistics per head (over D), whole weight applied after."""
    d, eps = config.head_dim, config.rms_norm_eps

    def per_head(x, weight):
        heads = split_heads(x, d)
        normed = heads / np.sqrt(np.mean(heads * heads, axis=-1, keepdims=True) + eps)
        return normed * split_heads(weight, d)

    q = per_head(projection(h, p, "self_attn.q_proj"), p["self_attn.q_norm.weight"])
    k = per_head(projection(h, p, "self_attn.k_proj"), p["self_attn.k_norm.weight"])
    v = split_heads(projection(h, p, "self_attn.v_proj"), d)
    return olmo2.attend_step(q, k, v, p, rope, context, layer, None)


def pre_norm_layer(h, p, config, rope, context, layer):
    """Llama placement with OLMo 2's norm weights: ``h + attn(norm(h))`` instead of ``h + norm(attn(h))``."""
    eps = config.rms_norm_eps
    attended, kept = olmo2.attention_block(olmo2.rms_norm(h, p["post_attention_layernorm.weight"], eps), p, config,
                                           rope, context, layer)
    h = h + attended
    x = olmo2.rms_norm(h, p["post_feedforward_layernorm.weight"], eps)
    return h + olmo2.gated_mlp_block(x, p, config.hidden_act), kept


def test_golden_case_is_reproduced(golden_dir):
    assert golden_error(golden_dir, "olmo2/gqa-whole-qk-norm") < 1e-12


@pytest.mark.parametrize("mistake,patch", [
    ("per-head QK-norm", lambda: mock.patch.object(olmo2, "attention_block", per_head_qk_norm_attention)),
    ("pre-norm instead of post-norm", lambda: mock.patch.object(olmo2, "decoder_layer", pre_norm_layer)),
])
def test_golden_cases_catch_olmo2_mistakes(golden_dir, mistake, patch):
    err = golden_error(golden_dir, "olmo2/gqa-whole-qk-norm", patch())
    assert err > 1e-3, f"{mistake}: only {err:.1e} from the golden logits"
