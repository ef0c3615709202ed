"""Qwen3 model-level golden cases."""

from __future__ import annotations

from .common import ModelCase


def _qwen3(**overrides) -> dict:
    base = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 4096, "attention_bias": False, "use_sliding_window": False,
        "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "qwen3/untied-gqa-odd-len",
        "untied head, GQA H=4/Hkv=2, head_dim 32 != hidden/heads 16, batch 2, odd length 9",
        seed=1, config=_qwen3(), batch=2, seq=9,
    ),
    ModelCase(
        "qwen3/tied-mqa-prime-len",
        "tied embeddings, MQA (Hkv=1), head_dim 24, 3 layers, prime length 13, rope_theta at top level",
        seed=2,
        config=_qwen3(
            tie_word_embeddings=True, num_key_value_heads=1, head_dim=24, num_hidden_layers=3,
            rope_parameters=None, rope_theta=1000000.0,
        ),
        batch=1, seq=13,
    ),
    ModelCase(
        "qwen3/mha-batch3",
        "MHA (Hkv=H=4), head_dim = hidden/heads = 16, batch 3, length 8, eps 1e-5",
        seed=3,
        config=_qwen3(num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5),
        batch=3, seq=8,
    ),
    ModelCase(
        "qwen3/single-token",
        "one token per row (T=1), batch 2, GQA H=6/Hkv=3, hidden 48, tied",
        seed=4,
        config=_qwen3(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                      tie_word_embeddings=True),
        batch=2, seq=1,
    ),
    ModelCase(
        "qwen3/eps-sensitive",
        "embeddings and q/k projections scaled by 1e-3 so that mean squares reach rms_norm_eps (1e-6): "
        "the placement and value of eps in the input, q and k norms change the output at float32",
        seed=6,
        config=_qwen3(num_hidden_layers=2),
        batch=2, seq=6,
        weight_scales={"embed_tokens": 1e-3, "self_attn.q_proj": 1e-3, "self_attn.k_proj": 1e-3},
    ),
    ModelCase(
        "qwen3/sliding-window",
        "use_sliding_window with sliding_window 4 and max_window_layers 1: layers [full, sliding, sliding], "
        "length 11 > window, batch 2",
        seed=7,
        config=_qwen3(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        batch=2, seq=11,
    ),
    ModelCase(
        "qwen3/window-flag-off",
        "sliding_window 3 present but use_sliding_window false (and max_window_layers 0): every layer is full "
        "attention; an engine that applies the window whenever the field is set fails",
        seed=9,
        config=_qwen3(use_sliding_window=False, sliding_window=3, max_window_layers=0),
        batch=1, seq=9,
    ),
    ModelCase(
        "qwen3/long-sequence",
        "one layer, 320 tokens: positions past 256, where bfloat16 positions or float32 angles first go wrong",
        seed=10,
        config=_qwen3(num_hidden_layers=1, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
        batch=1, seq=320,
    ),
    ModelCase(
        "qwen3/attention-bias",
        "attention_bias: q/k/v/o projection biases, GQA H=4/Hkv=2, length 10",
        seed=8,
        config=_qwen3(attention_bias=True),
        batch=1, seq=10,
    ),
    ModelCase(
        "qwen3/long-theta1e6",
        "released-style RoPE (rope_theta 1e6), 4 layers, length 67, vocab 256",
        seed=5,
        config=_qwen3(vocab_size=256, num_hidden_layers=4,
                      rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
        batch=1, seq=67,
    ),
    ModelCase(
        "qwen3/yarn-past-original",
        "YaRN (factor 4, original_max_position_embeddings 16, theta 1e6): 40 tokens run past the original "
        "context; cos and sin carry the 0.1 ln 4 + 1 magnitude",
        seed=11,
        config=_qwen3(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16}),
        batch=1, seq=40,
    ),
]
