"""GLM-4.5 (``Glm4MoeForCausalLM``) model-level golden cases.

Every case mixes dense and MoE layers (``first_k_dense_replace``), randomises the
router's ``e_score_correction_bias`` (``ARCHITECTURE.weight_init``) and keeps its
routing decisions clear of near-ties: in float64, on every token of every MoE layer,
the k-th and (k+1)-th selection scores (and, with groups, the kept and the first
dropped group score) differ by at least ``ROUTING_MARGIN`` (checked by
``tests/test_hf_agreement_glm4_moe.py``), so that bfloat16 and float16 engines, whose
router inputs are rounded, choose the same experts: transformers in bfloat16 moves
these scores by up to about 0.01. Seeds, router weight scale (x1.5: logits of spread
about 1.5, so that tokens pick different experts) and correction-bias scale (x0.6 of
``weight_init``'s 0.5 N in two cases) were picked from seeds 801-849 for a margin of at
least 0.02 with several distinct expert sets per layer; most draws have a near-tie
somewhere, and the draws with the largest margins route every token alike.
"""

from __future__ import annotations

from .common import ModelCase

#: Smallest float64 gap between the last chosen and the first rejected selection score
#: (sigmoid + correction bias, or group score) of any token in any case.
ROUTING_MARGIN = 0.02


def _glm(**overrides) -> dict:
    base = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "max_position_embeddings": 4096, "attention_bias": True, "use_qk_norm": True,
        "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "glm4_moe/glm45-style",
        "GLM-4.5 in miniature: per-head QK-norm (D=24 != hidden/heads 16), q/k/v biases, "
        "partial_rotary_factor omitted (GLM default 0.5: RoPE half-split on the first 12 of 24 dims), "
        "1 dense + 2 MoE layers, 8 experts top-3 + 1 shared, routed_scaling_factor 2.5, batch 2, length 6",
        seed=811, config=_glm(), batch=2, seq=6, weight_scales={"mlp.gate.weight": 1.5},
    ),
    ModelCase(
        "glm4_moe/grouped-routing",
        "expert groups: 16 experts in n_group 4, topk_group 2 (the group limit changes the chosen set), "
        "top-4, routed_scaling_factor 1.5, 2 shared experts (width 2 I), 2 dense + 2 MoE layers, "
        "no QK-norm, q/k/v biases, H=8/Hkv=2, D=16, partial_rotary_factor 0.5 and rope_theta 1e4 at top level",
        seed=829,
        config=_glm(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4,
                    n_group=4, topk_group=2, routed_scaling_factor=1.5, n_shared_experts=2, use_qk_norm=False,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_parameters=None,
                    rope_theta=10000.0, partial_rotary_factor=0.5),
        batch=1, seq=9, weight_scales={"mlp.gate.weight": 1.5},
    ),
    ModelCase(
        "glm4_moe/air-style-no-bias",
        "GLM-4.5-Air switches: no QK-norm, routed_scaling_factor 1; plus no attention biases, "
        "norm_topk_prob false (raw sigmoid weights), partial_rotary_factor 0.25 inside rope_parameters "
        "(Dr = 8 of D = 32), MHA H=Hkv=4, 1 dense + 1 MoE layer",
        seed=839,
        config=_glm(num_hidden_layers=2, use_qk_norm=False, attention_bias=False, routed_scaling_factor=1.0,
                    norm_topk_prob=False, num_key_value_heads=4, head_dim=32,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25}),
        batch=1, seq=8, weight_scales={"mlp.gate.weight": 1.5, "e_score_correction_bias": 0.6},
    ),
    ModelCase(
        "glm4_moe/all-moe-single-token",
        "first_k_dense_replace 0 (every layer MoE), one token per row (T=1, position 0: RoPE is the identity), "
        "batch 3, QK-norm, MQA (Hkv=1), top-2 of 8, routed_scaling_factor 2.5",
        seed=849,
        config=_glm(num_hidden_layers=2, first_k_dense_replace=0, num_key_value_heads=1, num_experts_per_tok=2),
        batch=3, seq=1, weight_scales={"mlp.gate.weight": 1.5, "e_score_correction_bias": 0.6},
    ),
    ModelCase(
        "glm4_moe/eps-visible",
        "rms_norm_eps 0.1 against row mean squares of 0.5-8 at every norm (input, post-attention, per-head q/k; "
        "the final norm's 4.3-8): a default eps (1e-5) in every norm moves layers.0 by 6 % (rel RMS), in the "
        "final norm only the norm tap by 0.9 %, both far past the float32 bound; GLM-4.5 layout otherwise "
        "(QK-norm, biases, 1 dense + 2 MoE, top-3 of 8 + shared, rsf 2.5), length 7",
        seed=822, config=_glm(rms_norm_eps=0.1), batch=1, seq=7, weight_scales={"mlp.gate.weight": 1.5},
    ),
]
