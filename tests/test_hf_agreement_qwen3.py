"""refimpl against Hugging Face transformers on tiny random Qwen3 checkpoints.

Models are built and randomised with transformers itself (not the golden ones),
saved with ``save_pretrained`` and loaded with ``refimpl.from_pretrained``.
Two bars: transformers as shipped (float32 islands in norms, RoPE and softmax)
within 1e-5 relative RMS, and transformers with those islands lifted
(``conformance.backends.hf_exact``) within 1e-10.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, randomise, rel_rms  # noqa: E402

#: seed, layers, heads, kv heads, head_dim, hidden, tied, theta, batch, seq, extra config
SHAPES = [
    (11, 2, 4, 2, 32, 64, False, 1e4, 2, 9, {}),
    (12, 3, 8, 1, 16, 64, True, 1e6, 1, 40, {}),
    (13, 2, 4, 4, 24, 48, False, 5e5, 3, 17, {}),
    (14, 1, 2, 1, 8, 32, True, 1e6, 2, 150, {}),
    (15, 3, 4, 2, 16, 32, False, 1e4, 2, 19,
     {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1, "attention_bias": True}),
    # YaRN (Qwen3's long-context recipe) with a tiny original context so that T = 48 runs past it
    (16, 2, 4, 2, 16, 32, False, 1e6, 1, 48,
     {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                          "original_max_position_embeddings": 16}}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, layers, heads, kv, head_dim, hidden, tied, theta, b, t, extra = request.param
    config = transformers.Qwen3Config(
        vocab_size=160, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        rope_parameters=extra.get("rope_parameters", {"rope_type": "default", "rope_theta": theta}),
        rms_norm_eps=1e-6, **{k: v for k, v in extra.items() if k != "rope_parameters"},
    )
    return build_case(transformers.Qwen3ForCausalLM, config, seed, "qwen3", tmp_path_factory, 160, b, t)


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


def test_bfloat16_sharded_checkpoint_agrees(tmp_path):
    # Published Qwen3 checkpoints are bfloat16 and sharded: the same float64 agreement must hold.
    config = transformers.Qwen3Config(
        vocab_size=160, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(21)
    model = transformers.Qwen3ForCausalLM(config)
    randomise(model, 21)
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = np.random.default_rng(21).integers(0, 160, size=(2, 11))
    ours = refimpl.from_pretrained(tmp_path)(ids)
    with exact_float64():
        hf = load_exact_float64(tmp_path)
        with torch.no_grad():
            theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_rms(theirs, ours) < 1e-10
