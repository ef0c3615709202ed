"""DeepSeek-V3 / Kimi K2 model-level golden cases (MLA + sigmoid group-limited MoE).

Every case has dense and MoE layers (``first_k_dense_replace`` 1) unless it says
otherwise. ``e_score_correction_bias`` is drawn ``-0.6 + 0.3 N`` by the
architecture's ``weight_init``: mostly negative, so a group mask filled with 0
instead of -inf changes the chosen experts (MOE-02/03). Seeds were chosen so that no
token's expert choice sits at a near-tie (the smallest gap between the last chosen
and the first rejected selection score, and between the last kept and the first
dropped group score, is stated per case); transformers then picks the reference's
experts in float64, float32, float16 and bfloat16. A config value of None leaves the key
out of config.json (the default applies, as in ``router-defaults``); ``JSON_NULL`` writes
an explicit null (``q_lora_rank`` of ``no-renorm-scaled``).
"""

from __future__ import annotations

from .common import JSON_NULL, ModelCase

ARCH = "DeepseekV3ForCausalLM"

YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
#: YaRN without the mscale / mscale_all_dim keys: no softmax correction, cos/sin magnitude m(factor, 1).
YARN_NO_MSCALE = {k: v for k, v in YARN_V3.items() if k not in ("mscale", "mscale_all_dim")}


def _deepseek(**overrides) -> dict:
    base = {
        "architectures": [ARCH], "model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8,
        "num_experts_per_tok": 3, "n_shared_experts": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rope_interleave": True, "rope_parameters": YARN_V3,
        "max_position_embeddings": 640, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "hidden_act": "silu", "num_nextn_predict_layers": 0, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "deepseek_v3/group-limited-routing",
        "DeepSeek-V3 shape in miniature: layer 0 dense, layers 1-2 MoE with 8 experts in n_group 4 groups, "
        "topk_group 2, top-3, norm_topk_prob, routed_scaling_factor 2.5, 2 shared experts as one MLP, q_lora_rank "
        "24, interleaved YaRN (factor 40, original context 16) over 20 tokens. For 3 of 40 token-layers the best "
        "single expert lies in a dropped group; the group limit changes the chosen set of 17 of 40 against plain "
        "top-3 (tests/test_broken_deepseek_v3.py)",
        seed=601, config=_deepseek(), batch=2, seq=10,
    ),
    ModelCase(
        "deepseek_v3/no-renorm-scaled",
        "norm_topk_prob false with routed_scaling_factor 2.5 (MOE-05: the factor applies without renormalising), "
        "n_group 2 / topk_group 1, q_lora_rank null in config.json (one q_proj, no query compression; an absent "
        "key would mean 1536), attention_bias on kv_a/o only (q_proj has no bias), rope_interleave false "
        "(rotate-half pairs), default RoPE",
        seed=614,
        config=_deepseek(norm_topk_prob=False, n_group=2, topk_group=1, q_lora_rank=JSON_NULL, attention_bias=True,
                         rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        batch=2, seq=9,
    ),
    ModelCase(
        "deepseek_v3/yarn-mscale-differs",
        "YaRN with mscale 0.707 != mscale_all_dim 1.0 (factor 40, original context 8, 40 tokens): cos/sin carry "
        "m(40, 0.707) / m(40, 1) = 0.921 (RSC-12) and the softmax scale is 20^-1/2 m(40, 1)^2 with "
        "mscale_all_dim, not mscale (MLA-03, MLA-02)",
        seed=619,
        config=_deepseek(num_hidden_layers=2, max_position_embeddings=320,
                         rope_parameters=dict(YARN_V3, original_max_position_embeddings=8, mscale=0.707)),
        batch=1, seq=40,
    ),
    ModelCase(
        "deepseek_v3/kimi-k2-like",
        "Kimi K2 shape in miniature: n_group 1 / topk_group 1 (no group limit), 12 experts, top-4, "
        "routed_scaling_factor 2.827, one shared expert, YaRN base 50000 with factor 32 and beta_fast = "
        "beta_slow = 1, rms_norm_eps 1e-5 (K2.5) while the latent norms keep eps 1e-6, tied embeddings",
        seed=636,
        config=_deepseek(n_routed_experts=12, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
                         routed_scaling_factor=2.827, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=512,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                          "original_max_position_embeddings": 16, "beta_fast": 1.0,
                                          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
        batch=2, seq=12,
    ),
    ModelCase(
        "deepseek_v3/legacy-config-all-moe",
        "published-style config.json: legacy rope_scaling {type: yarn} with a top-level rope_theta, "
        "first_k_dense_replace 0 (every layer MoE), one MTP layer declared (num_nextn_predict_layers 1, its "
        "tensors absent), 8 heads, batch 3 of 5 tokens",
        seed=611,
        config=_deepseek(num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=160,
                         num_nextn_predict_layers=1, rope_parameters=None, rope_theta=10000.0,
                         rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                         scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1),
        batch=3, seq=5,
    ),
    ModelCase(
        "deepseek_v3/mla-widths-distinct",
        "Dn 16, Dr 8, Dv 12, Dc 20 (V3's Dn = 2 Dr, with Dv distinct): the softmax scale is (Dn + Dr)^-1/2 = "
        "24^-1/2 times m(40, 1)^2, not (2 Dr)^-1/2 (transformers' head_dim is Dr) nor (2 Dn)^-1/2; the nope / "
        "rope split of each query head and the k / v split of kv_b_proj fall at Dn",
        seed=628,
        config=_deepseek(qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kv_lora_rank=20),
        batch=2, seq=7,
    ),
    ModelCase(
        "deepseek_v3/yarn-without-mscale-keys",
        "YaRN (factor 40, original context 16) whose rope_parameters lack mscale and mscale_all_dim: no softmax "
        "correction (scale 16^-1/2 exactly) and cos/sin magnitude m(40, 1) = 1.369 on the rope dims; an engine "
        "defaulting mscale_all_dim to 1 multiplies the scores by m(40, 1)^2 = 1.874 (MLA-02 / RSC-12)",
        seed=635,
        config=_deepseek(rope_parameters=YARN_NO_MSCALE),
        batch=2, seq=8,
    ),
    ModelCase(
        "deepseek_v3/router-defaults",
        "routed_scaling_factor, n_group and topk_group absent from config.json: the DeepSeek-V3 defaults 2.5, 8 "
        "and 4 apply (16 experts in 8 groups of 2, 4 groups kept, top-4, renormalised); an engine defaulting "
        "the factor to 1 or the groups to 1 / 1 is caught",
        seed=624,
        config=_deepseek(num_hidden_layers=2, n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=None,
                         n_group=None, topk_group=None),
        batch=1, seq=8,
    ),
    ModelCase(
        "deepseek_v3/latent-norm-eps-visible",
        "rms_norm_eps 1e-3 with q_a_proj and kv_a_proj_with_mqa weights x 0.03, so the latent c_q and c_kv "
        "have mean squares near 1e-3: q_a_layernorm / kv_a_layernorm keep eps 1e-6 (a backend using "
        "rms_norm_eps there shrinks them by about 0.7, visible at float32), the layer norms use 1e-3",
        seed=639,
        config=_deepseek(rms_norm_eps=1e-3),
        batch=2, seq=7,
        weight_scales={"q_a_proj": 0.03, "kv_a_proj_with_mqa": 0.03},
    ),
]
