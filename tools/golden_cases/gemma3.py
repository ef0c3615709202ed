"""Gemma 3 text (``Gemma3ForCausalLM``) model-level golden cases (seeds 401-499).

Norm weights are drawn as 1 + 0.2 N(0, 1) (``random_weights``), so the Gemma gain
1 + w is about 2 and a backend using w alone is off by about 2x in every norm;
``near-zero-norm-offsets`` scales them to about 0.05, as trained offsets are, where
1 + w and w differ 20-fold.
"""

from __future__ import annotations

from .common import ModelCase


def _gemma3(**overrides) -> dict:
    base = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "sliding_window": 4, "max_position_embeddings": 4096, "dtype": "float32",
    }
    base.update(overrides)
    return base


#: The released RoPE split in the transformers 4.5x key style (4B/12B/27B config.json).
_LEGACY_ROPE = {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}}

CASES = [
    ModelCase(
        "gemma3/default-pattern-6-layers",
        "6 layers, no layer_types and no sliding_window_pattern: transformers' default pattern 6 makes layers "
        "0-4 sliding (W=4) and layer 5 global (PAT-01); legacy rope_theta 1e6 with rope_scaling linear x8 on the "
        "global layer only, rope_local_base_freq 1e4 on the local ones (RSC-09, RSC-11); length 11 > window",
        seed=401,
        config=_gemma3(num_hidden_layers=6, **_LEGACY_ROPE),
        batch=1, seq=11,
    ),
    ModelCase(
        "gemma3/qpas-head-dim-final-softcap",
        "head_dim 24 != hidden/heads 16 and query_pre_attn_scalar 16 != head_dim, as in the 27B (SCL-01); "
        "final_logit_softcapping 30 on logits reaching about 60 (CAP-*); explicit layer_types "
        "[full, sliding, full] with W=3; v5 rope_parameters keyed by layer type; batch 2, prime length 13",
        seed=402,
        config=_gemma3(
            num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=16, sliding_window=3,
            final_logit_softcapping=30.0,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        ),
        batch=2, seq=13,
    ),
    ModelCase(
        "gemma3/window-1-mqa",
        "sliding_window 1 (a sliding query sees only itself), MQA H=4/Hkv=1, sliding_window_pattern 2 without "
        "layer_types (layers [sliding, full, sliding, full]), unscaled RoPE as in the 1B; batch 2, length 17",
        seed=403,
        config=_gemma3(
            num_hidden_layers=4, num_key_value_heads=1, sliding_window=1, sliding_window_pattern=2,
            rope_theta=1000000.0, rope_local_base_freq=10000.0,
        ),
        batch=2, seq=17,
    ),
    ModelCase(
        "gemma3/single-token-untied",
        "one token per row (T=1), batch 2, untied lm_head, hidden 48 (embedding scale sqrt(48) not a "
        "float32 number), GQA H=4/Hkv=2, head_dim 16, query_pre_attn_scalar 12, layers [sliding, full]",
        seed=404,
        config=_gemma3(
            hidden_size=48, head_dim=16, query_pre_attn_scalar=12, tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention"], **_LEGACY_ROPE,
        ),
        batch=2, seq=1,
    ),
    ModelCase(
        "gemma3/near-zero-norm-offsets",
        "every norm offset (4 sandwich norms, q/k norms, final norm) scaled to about 0.05, like trained Gemma "
        "weights: gain 1 + w is about 1.05 while w alone is about 0.05 (NRM-02..04); 3 layers without "
        "layer_types, so all sliding (pattern 6 > 3 layers), W=5, length 10",
        seed=405,
        config=_gemma3(num_hidden_layers=3, sliding_window=5, **_LEGACY_ROPE),
        batch=1, seq=10,
        weight_scales={"norm": 0.05},
    ),
    ModelCase(
        "gemma3/attn-softcap-ignored",
        "attn_logit_softcapping 1.0 is set but has no effect: transformers 5.24 never passes it to the "
        "attention (modeling_gemma3.py:342-352) and Gemma 3 replaced attention soft-capping with QK-norm; "
        "a backend that caps attention scores at 1 fails. Layers [sliding, full], W=3, length 8",
        seed=406,
        config=_gemma3(
            attn_logit_softcapping=1.0, sliding_window=3,
            layer_types=["sliding_attention", "full_attention"], **_LEGACY_ROPE,
        ),
        batch=1, seq=8,
    ),
    ModelCase(
        "gemma3/qpas-distinct-cap-20",
        "query_pre_attn_scalar 40 differs from head_dim (24) and from hidden/heads (16), as in the 1B/4B/12B "
        "releases (256 vs 288/320/240): an engine deriving the scale from either fails (SCL-01); "
        "final_logit_softcapping 20, read from the config, not a hard-coded 30 (CAP-02); layers "
        "[sliding, sliding, full] with W=3, length 10",
        seed=407,
        config=_gemma3(
            num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=40, sliding_window=3,
            final_logit_softcapping=20.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
        batch=1, seq=10,
    ),
]
