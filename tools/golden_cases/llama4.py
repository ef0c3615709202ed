"""Llama 4 text model-level golden cases (``Llama4ForCausalLM``), seeds 701-749.

Every chunked multi-token case runs past its ``attention_chunk_size`` with a length
that is not a multiple of it (chunk boundaries inside the sequence), and past
``floor_scale`` so that the NoPE-layer temperature differs from 1 within the
sequence. Router near-ties flip expert choices in low precision, so each seed was
picked from 701-749 as the one whose smallest gap between the k-th and (k+1)-th
router logit (over all tokens and MoE layers, float64 reference) was largest:
scout 0.048 (seed 723), maverick 0.053 (708), top-2 0.100 (740), single-token 0.617
(727), head-dim 0.119 (744); top-k = E (704) cannot flip. With these, transformers (eager) chooses exactly
the reference's experts for every token at float32, float16 and bfloat16, and every
case passes at float64, float32, float16 and bfloat16.
"""

from __future__ import annotations

from .common import ModelCase



def _llama4(**overrides) -> dict:
    base = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
        "no_rope_layer_interval": 4, "attention_chunk_size": 5, "use_qk_norm": True,
        "attn_temperature_tuning": True, "floor_scale": 3, "attn_scale": 0.1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "attention_bias": False, "dtype": "float32",
    }
    base.update(overrides)
    return base


#: Scout's llama3 RoPE (factor 16, low_freq_factor == high_freq_factor: a hard switch),
#: with the original context shrunk to 8 so that both bands exist at head_dim 16.
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 8}

CASES = [
    ModelCase(
        "llama4/scout-chunked-nope-temperature",
        "Scout-like: every layer MoE (step 1, E=4, top-1, shared expert), QK-norm after interleaved RoPE, "
        "llama3 RoPE with low == high freq factor (hard switch), NoPE layer 3 (interval 4) with temperature "
        "(floor_scale 3: tau > 1 from position 2), chunk 5 over 13 tokens (boundaries at 5 and 10), batch 2",
        seed=723, config=_llama4(rope_parameters=SCOUT_ROPE), batch=2, seq=13,
    ),
    ModelCase(
        "llama4/maverick-interleaved-dense-moe",
        "Maverick-like: interleave_moe_layer_step 2 (layers 1, 3 MoE with E=8 top-1; layers 0, 2 dense with "
        "intermediate_size_mlp 96), no QK-norm, unscaled RoPE, chunk 4 over 11 tokens, NoPE layer 3 with "
        "floor_scale 2, batch 2",
        seed=708,
        config=_llama4(interleave_moe_layer_step=2, num_local_experts=8, use_qk_norm=False, attention_chunk_size=4,
                       floor_scale=2),
        batch=2, seq=11,
    ),
    ModelCase(
        "llama4/top2-explicit-schedules-bias",
        "top-2 of 4 experts (sigmoid weights, no renormalisation), explicit no_rope_layers [0, 1, 1, 0] (NoPE "
        "first layer) and moe_layers [0, 2], attention biases, MQA (Hkv=1), chunk 6 over 17 tokens, "
        "floor_scale 4, attn_scale 0.2",
        seed=740,
        config=_llama4(num_experts_per_tok=2, no_rope_layers=[0, 1, 1, 0], moe_layers=[0, 2], attention_bias=True,
                       num_key_value_heads=1, attention_chunk_size=6, floor_scale=4, attn_scale=0.2),
        batch=1, seq=17,
    ),
    ModelCase(
        "llama4/no-chunk-top-all-tied",
        "attention_chunk_size null (every layer full attention), top-k = E = 3, NoPE every 2nd layer with "
        "attn_temperature_tuning false, tied embeddings, MHA (Hkv=H=4), 9 tokens",
        seed=704,
        config=_llama4(num_hidden_layers=2, num_local_experts=3, num_experts_per_tok=3, no_rope_layer_interval=2,
                       attention_chunk_size=None, attn_temperature_tuning=False, tie_word_embeddings=True,
                       num_key_value_heads=4),
        batch=1, seq=9,
    ),
    ModelCase(
        "llama4/single-token",
        "one token per row (T=1): position 0, where RoPE is the identity and tau = 1; batch 3, 2 layers",
        seed=727, config=_llama4(num_hidden_layers=2, no_rope_layer_interval=2), batch=3, seq=1,
    ),
    ModelCase(
        "llama4/qk-norm-eps-visible",
        "rms_norm_eps 1e-3 with q_proj and k_proj weights x 0.03, so q and k per head have mean squares near "
        "1e-3: the weight-less QK-norm uses rms_norm_eps (not a fixed 1e-6) and shrinks them by about 0.7, "
        "visible at float32; 2 layers (RoPE + QK-norm, then NoPE without temperature tuning: with q this small "
        "its effect would sit at the float32 bound), chunk 5 over 9 tokens",
        seed=729,
        config=_llama4(num_hidden_layers=2, no_rope_layer_interval=2, rms_norm_eps=1e-3, attn_temperature_tuning=False),
        batch=2, seq=9,
        weight_scales={"q_proj": 0.03, "k_proj": 0.03},
    ),
    ModelCase(
        "llama4/head-dim-not-hidden-per-head",
        "head_dim 24 with hidden_size 64 and 4 heads (hidden/heads = 16): the attention scale is 24^-0.5 = 0.204, "
        "not (hidden/heads)^-0.5 = 0.25 (transformers' Llama4TextAttention uses head_dim; the two agree in "
        "every released Llama 4) - the wrong one moves layers.0 by 5 % (rel RMS); q width 96 != 64; "
        "2 layers (RoPE + QK-norm, chunk 5; then NoPE with temperature, floor_scale 3), batch 2, length 11",
        seed=744, config=_llama4(head_dim=24, num_hidden_layers=2, no_rope_layer_interval=2), batch=2, seq=11,
    ),
]
