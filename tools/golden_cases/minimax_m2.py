"""MiniMax-M2 model-level golden cases (seeds 851-899).

Correction biases are drawn by ``MiniMaxM2ForCausalLM``'s ``weight_init`` (0.1 N(0, 1)),
large enough to change which experts are chosen. Seeds were chosen so that every
token's k-th and (k+1)-th selection scores (sigmoid + bias) are far enough apart for
float16 and bfloat16 runs to choose the same experts as the float64 reference.
"""

from __future__ import annotations

from .common import ModelCase


def _minimax_m2(**overrides) -> dict:
    base = {
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": 128,
        "hidden_size": 32, "intermediate_size": 20, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "rotary_dim": 12,
        "num_local_experts": 7, "num_experts_per_tok": 3, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 5000000.0, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "minimax_m2/gqa-partial-rotary",
        "QK-norm over all heads: q_norm 4 x 24 = 96 wide, k_norm 2 x 24 = 48 (GQA); rotary_dim 12 of head_dim 24; "
        "head_dim 24 != hidden/heads 8; top-3 of E = 7 with correction biases; batch 2, length 7",
        seed=885, config=_minimax_m2(), batch=2, seq=7,
    ),
    ModelCase(
        "minimax_m2/top-k-equals-e",
        "top-k = E = 4: every expert chosen, weights sigmoid(z) / sum (the bias cannot change the choice, only "
        "a backend that adds it to the weights changes the output); H=6/Hkv=2, rope_parameters dict",
        seed=852,
        config=_minimax_m2(num_local_experts=4, num_experts_per_tok=4, num_attention_heads=6, head_dim=16,
                           rotary_dim=8, rope_theta=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        batch=1, seq=8,
    ),
    ModelCase(
        "minimax_m2/mqa-top1-3-layers",
        "MQA (Hkv=1, k_norm one head wide), top-1 of E = 6, three layers, rotary_dim 16 of 32, theta 1e4",
        seed=873,
        config=_minimax_m2(num_key_value_heads=1, head_dim=32, rotary_dim=16, num_local_experts=6,
                           num_experts_per_tok=1, num_hidden_layers=3, rope_theta=10000.0),
        batch=1, seq=8,
    ),
    ModelCase(
        "minimax_m2/partial-factor-beats-rotary-dim",
        "top-level partial_rotary_factor 0.25 and rotary_dim 16 with head_dim 32: transformers' config takes the "
        "factor (Dr = 8), not rotary_dim; MHA H=Hkv=2, top-2 of 5, theta 1e4",
        seed=869,
        config=_minimax_m2(num_attention_heads=2, num_key_value_heads=2, head_dim=32, rotary_dim=16,
                           partial_rotary_factor=0.25, num_local_experts=5, num_experts_per_tok=2,
                           rope_theta=10000.0),
        batch=1, seq=11,
    ),
    ModelCase(
        "minimax_m2/twelve-experts-top2",
        "E = 12 experts (indices past 9: a loader that stacks experts.{e} in string order, 0, 1, 10, 11, 2, ..., "
        "puts experts 10 and 11 in slots 2 and 3 and shifts the rest), top-2 of 12 with correction biases, "
        "length 7",
        seed=888, config=_minimax_m2(num_local_experts=12, num_experts_per_tok=2), batch=1, seq=7,
    ),
    ModelCase(
        "minimax_m2/eps-visible",
        "rms_norm_eps 0.2 against row mean squares of 0.5-3.0 at every norm (input, post-attention, "
        "whole-projection q/k; the final norm's 1.3-3.0): a default eps (1e-6) in every norm moves layers.0 by "
        "15 % (rel RMS), in the final norm only the norm tap by 5 %, both far past the float32 bound; top-3 of 7, "
        "batch 2, length 6",
        seed=877, config=_minimax_m2(rms_norm_eps=0.2), batch=2, seq=6,
    ),
]
