"""Grok 2.5 (``Grok1ForCausalLM``, sglang semantics) model-level golden cases (seeds 901-949).

transformers has no Grok model, so the reference is the only implementation of these
cases: the transformers backend reports them "not implemented". Every case runs
past a small ``attn_temperature_len`` L (positions L+1.. are tempered) except the
single-token one. Caps are engaged by the config (sglang reads the attention and
final caps from config.json) or by weight scales; the router cap stays at 30, the
constant sglang uses whatever config.json says, and a case scales the router so
its logits reach past it. Seeds were picked from 901-949 for routing margins: the
smallest gap between the k-th and (k+1)-th capped router logit, over every token and
layer, is 0.069, 0.63, 0.20 and 0.58 (in case order) at float64, and refimpl at
float32 chooses the same experts everywhere (docs/architectures/grok2.md).
"""

from __future__ import annotations

from .common import ModelCase


def _grok(**overrides) -> dict:
    """A tiny config in the published xai-org/grok-2 key style (including the ignored RoPE keys)."""
    base = {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 48, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
        "num_experts_per_tok": 2, "residual_moe": True, "rms_norm_eps": 1e-5,
        "embedding_multiplier_scale": 8.0, "output_multiplier_scale": 0.5,
        "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0, "final_logit_softcapping": 50.0,
        "attn_temperature_len": 4, "rope_theta": 208533496, "rope_type": "original",
        "original_max_position_embeddings": 8192, "scaling_factor": 16.0, "extrapolation_factor": 1.0,
        "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1, "max_position_embeddings": 131072,
        "sliding_window_size": -1, "global_attn_every_n": 1, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "grok2/temperature-caps-dense-mlp",
        "residual_moe on: (dense GELU MLP + top-2-of-4 experts) / sqrt(2); attention cap 4 with q/k weights x2 so "
        "scores pass it, then temperature log2(p)/log2(4) on positions 5..12 (cap before temperature); final cap 5 "
        "on logits reaching about 10 (lm_head x8, output multiplier 0.5); embedding x8; batch 2, length 13",
        seed=944,
        config=_grok(attn_logit_softcapping=4.0, final_logit_softcapping=5.0),
        batch=2, seq=13,
        weight_scales={"q_proj": 2.0, "k_proj": 2.0, "lm_head": 8.0},
    ),
    ModelCase(
        "grok2/router-cap-sparse-only",
        "residual_moe off (no dense MLP, no 1/sqrt(2)); router weights x40 so router logits reach past the cap of "
        "30 and the capped softmax is what picks the weights; 3 layers, 8 experts top-2, MQA H=4/Hkv=1, "
        "embedding x3.7 (not sqrt(M)); temperature from position 7 (L=6), length 11",
        seed=923,
        config=_grok(residual_moe=False, num_hidden_layers=3, num_local_experts=8, num_key_value_heads=1,
                     embedding_multiplier_scale=3.7, attn_temperature_len=6),
        batch=1, seq=11,
        weight_scales={"block_sparse_moe.gate": 40.0},
    ),
    ModelCase(
        "grok2/eps-sensitive-ffn-top1",
        "feed-forward outputs shrunk (w2 and mlp.down_proj x0.003) so their mean square is near rms_norm_eps: "
        "post_moe_norm then passes the 1/sqrt(2) of (mlp + moe) / sqrt(2) through instead of normalising it away; "
        "top-1 of 3 experts (weight p < 1, never renormalised to 1); MHA H=Hkv=2, head_dim 32; L=2, length 17",
        seed=916,
        config=_grok(num_local_experts=3, num_experts_per_tok=1, num_attention_heads=2, num_key_value_heads=2,
                     head_dim=32, attn_temperature_len=2),
        batch=1, seq=17,
        weight_scales={".w2.": 0.003, "down_proj": 0.003},
    ),
    ModelCase(
        "grok2/single-token",
        "T=1 (position 0: no RoPE rotation, no temperature, one key); still routes through top-2 of 4 experts and "
        "the dense MLP; batch 3; published caps 30/30/50 and theta 208533496",
        seed=903,
        config=_grok(),
        batch=3, seq=1,
    ),
]
