"""gpt-oss (``GptOssForCausalLM``) model-level golden cases (seeds 751-799).

Weights come from ``random_weights`` with the architecture's ``weight_init``
(``refimpl/models/gpt_oss.py``): input-major expert stacks N(0, 1/fan-in), expert
biases 0.2 N and per-head sinks 2 N (both signs; e^-4 .. e^4 against a handful of
keys). Every case is longer than its sliding window unless it is the T = 1 case.

Routing is discrete: a backend whose router logits land on the other side of a
near-tie picks another expert. Seeds were chosen so that every token's k-th and
(k+1)-th router logits stay apart by at least ``MIN_ROUTER_GAP`` of that layer's
logit RMS in the float64 reference (tests/test_hf_agreement_gpt_oss.py
``test_golden_routing_decisions_are_not_near_ties``), which keeps the expert choice of
transformers unchanged in float32, float16 and bfloat16 runs (``..._route_alike_in_every_dtype``,
and ``llm-conformance run --backend transformers`` at all four dtypes; see
docs/architectures/gpt_oss.md).
"""

from __future__ import annotations

from .common import ModelCase

#: Smallest k-th / (k+1)-th router-logit gap of the chosen seeds, relative to the logit RMS.
MIN_ROUTER_GAP = 0.05

#: The released YaRN block (config.json ``rope_scaling`` of gpt-oss-120b and -20b).
_RELEASED_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096}
#: The same with an original context of 16 (as in the spec sheet's tiny config): the correction range
#: starts below pair 0 and is clipped there (OpenAI's reference asserts 0 < low instead; transformers clips).
_YARN = {**_RELEASED_YARN, "original_max_position_embeddings": 16}



def _gpt_oss(**overrides) -> dict:
    base = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": 4, "rms_norm_eps": 1e-5, "rope_parameters": {**_YARN, "rope_theta": 150000.0},
        "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": True,
        "swiglu_limit": 7.0, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "gpt_oss/released-style-config",
        "config.json in the released key style and with the released RoPE: head_dim 64, legacy rope_scaling "
        "(YaRN factor 32, beta 32/1, original context 4096, truncate false: fractional correction range "
        "8.09 .. 17.40, 9 of 32 frequencies kept and 14 divided by 32, cos/sin x 1.3466) beside top-level "
        "rope_theta 150000, experts_per_token, initial_context_length, no layer_types (transformers derives "
        "[sliding, full]: even layers slide); W=4, length 11 > W, batch 2; H=4/Hkv=2 (q width 256 != hidden 64); "
        "E=4, top-2; sinks of both signs (2 N)",
        seed=790,
        config=_gpt_oss(head_dim=64, rope_parameters=None, rope_scaling=dict(_RELEASED_YARN), rope_theta=150000,
                        experts_per_token=2, initial_context_length=4096, hidden_act="silu",
                        max_position_embeddings=131072),
        batch=2, seq=11,
    ),
    ModelCase(
        "gpt_oss/swiglu-clamp-engaged",
        "expert gate_up weights and biases x 10: in the float64 reference about a quarter of the gate "
        "pre-activations exceed swiglu_limit 7 (clamped from above only) and about half of the up "
        "pre-activations lie outside [-7, 7] (ACT-02/03); explicit layer_types [sliding, full], W=3, length 10",
        seed=777,
        config=_gpt_oss(sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
        batch=1, seq=10,
        weight_scales={"experts.gate_up_proj": 10.0},
    ),
    ModelCase(
        "gpt_oss/top-1-full-first-mqa",
        "reversed layer pattern [full, sliding, full] (PAT), W=3, MQA H=4/Hkv=1; num_experts_per_tok 1 (the one "
        "weight is 1, so the router bias acts through selection only; it is scaled to about N(0, 1) so that it "
        "changes the chosen expert of some tokens); E=5; length 9",
        seed=768,
        config=_gpt_oss(num_hidden_layers=3, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=1,
                        sliding_window=3, layer_types=["full_attention", "sliding_attention", "full_attention"]),
        batch=1, seq=9,
        weight_scales={"mlp.router.bias": 5.0},
    ),
    ModelCase(
        "gpt_oss/top-k-all-experts-tied",
        "num_experts_per_tok = num_local_experts = 3 (every expert, weights softmax over all logits); MHA "
        "H=Hkv=4 with head_dim 8 (q width 32 != hidden 48); tied embeddings; YaRN factor 4 with truncate "
        "omitted (true: integer correction range) and theta 10000; 3 layers [sliding, full, sliding], W=2; "
        "batch 2, prime length 7",
        seed=754,
        config=_gpt_oss(
            hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_key_value_heads=4, head_dim=8,
            num_local_experts=3, num_experts_per_tok=3, sliding_window=2, tie_word_embeddings=True,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                             "original_max_position_embeddings": 32},
        ),
        batch=2, seq=7,
    ),
    ModelCase(
        "gpt_oss/single-token",
        "one token per row (T=1, position 0: RoPE is the identity and a query sees only itself, so only the "
        "sink separates the attention from the value), batch 3; E=4, top-2",
        seed=759,
        config=_gpt_oss(),
        batch=3, seq=1,
    ),
    ModelCase(
        "gpt_oss/square-experts",
        "intermediate_size == hidden_size == 48 (as released: 2880 == 2880): every expert down_proj (I, M) is "
        "square, so only the input-major reading h @ down_proj is right; a loader guessing the orientation "
        "from the shape (transposing a square matrix) is caught; W=4, length 9",
        seed=784,
        config=_gpt_oss(hidden_size=48, intermediate_size=48),
        batch=2, seq=9,
    ),
    ModelCase(
        "gpt_oss/eps-visible",
        "rms_norm_eps 0.1 against row mean squares of 0.8-4.8 at every norm (input, post-attention; the final "
        "norm's 2.2-4.8): a default eps (1e-5) in every norm moves layers.0 by 6 % (rel RMS), in the final norm "
        "only the norm tap by 1.6 %, both far past the float32 bound; E=4, top-2, W=4, batch 2, length 8",
        seed=779, config=_gpt_oss(rms_norm_eps=0.1), batch=2, seq=8,
    ),
]
