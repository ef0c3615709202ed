"""OLMo 2 model-level golden cases (seeds 101-199)."""

from __future__ import annotations

from .common import ModelCase


def _olmo2(**overrides) -> dict:
    base = {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "max_position_embeddings": 4096, "pad_token_id": 0, "eos_token_id": 1, "dtype": "float32",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


CASES = [
    ModelCase(
        "olmo2/gqa-whole-qk-norm",
        "GQA H=4/Hkv=2, D=16: q_norm spans 64 channels and k_norm 32, normalised over all heads of a token "
        "at once (per-head QK-norm differs); post-norm inside the residual, no input norm; batch 2, length 9",
        seed=101, config=_olmo2(), batch=2, seq=9,
    ),
    ModelCase(
        "olmo2/mha-tied-prime-len",
        "MHA (Hkv=H=4), tied embeddings, 3 layers, prime length 13, rope_theta at top level, "
        "rms_norm_eps absent (class default 1e-5)",
        seed=102,
        config=_olmo2(num_key_value_heads=4, num_hidden_layers=3, tie_word_embeddings=True,
                      rope_parameters=None, rope_theta=10000.0, rms_norm_eps=None),
        batch=1, seq=13,
    ),
    ModelCase(
        "olmo2/single-token-mqa",
        "one token per row (T=1), batch 2, MQA H=6/Hkv=1, hidden 48 (D=8): k_norm spans only 8 channels",
        seed=103,
        config=_olmo2(hidden_size=48, num_attention_heads=6, num_key_value_heads=1),
        batch=2, seq=1,
    ),
    ModelCase(
        "olmo2/explicit-head-dim-bias",
        "head_dim 24 in config.json (not an Olmo2Config field, but honoured): q_norm spans H*D = 96 != hidden 64; "
        "attention_bias with q/k/v/o biases (the q/k biases sit before the QK-norm); length 10",
        seed=104,
        config=_olmo2(head_dim=24, attention_bias=True),
        batch=1, seq=10,
    ),
    ModelCase(
        "olmo2/four-layers-len37",
        "4 layers, GQA H=8/Hkv=2 (D=8), length 37, batch 2, vocab 256",
        seed=105,
        config=_olmo2(vocab_size=256, num_hidden_layers=4, num_attention_heads=8),
        batch=2, seq=37,
    ),
]
