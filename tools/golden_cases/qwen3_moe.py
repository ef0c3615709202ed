"""Qwen3-MoE model-level golden cases (seeds 651-699).

Seeds were chosen so that every token's k-th and (k+1)-th router probabilities are
far enough apart for float16 and bfloat16 runs to choose the same experts as the
float64 reference (a near-tie flips the choice and the whole token's output): at least
0.021 apart (docs/architectures/qwen3_moe.md); the twelve-expert case (656: 0.029) needs
router weights x 3 for that, as softmax probabilities over 12 experts crowd together.
One exception: ``norm-topk-prob-absent`` (662) is 0.0070 apart in probability (chosen by a
relative gap of 0.097); it passes transformers at every dtype (worst bfloat16 error of the
family 1.1e-2) but sits closer to a flip than the others.
"""

from __future__ import annotations

from .common import ModelCase



def _qwen3_moe(**overrides) -> dict:
    base = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128,
        "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "max_position_embeddings": 4096,
        "attention_bias": False, "use_sliding_window": False, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "qwen3_moe/renorm-top2-of-6",
        "norm_topk_prob true, top-2 of E = 6 experts on every layer, GQA H=4/Hkv=2, head_dim 16 != hidden/heads 12, "
        "batch 2, length 6",
        seed=672, config=_qwen3_moe(), batch=2, seq=6,
    ),
    ModelCase(
        "qwen3_moe/no-renorm-sparse-step-2",
        "norm_topk_prob false (weights are the softmax probabilities, summing to < 1), top-3 of 6, "
        "decoder_sparse_step 2 over 3 layers: [dense, MoE, dense], dense width intermediate_size 80",
        seed=653,
        config=_qwen3_moe(norm_topk_prob=False, num_experts_per_tok=3, decoder_sparse_step=2, num_hidden_layers=3),
        batch=1, seq=9,
    ),
    ModelCase(
        "qwen3_moe/mlp-only-top1-no-renorm",
        "mlp_only_layers [0] with 3 layers: [dense, MoE, MoE]; top-1 of E = 5 without renormalisation "
        "(weight = the winning probability, not 1); experts stored under num_local_experts",
        seed=666,
        config=_qwen3_moe(norm_topk_prob=False, num_experts_per_tok=1, num_experts=None, num_local_experts=5,
                          mlp_only_layers=[0], num_hidden_layers=3),
        batch=2, seq=5,
    ),
    ModelCase(
        "qwen3_moe/top-k-equals-e",
        "top-k = E = 4, norm_topk_prob false: every expert on every token, mixed by the full softmax; "
        "MQA (Hkv=1), tied embeddings",
        seed=651,
        config=_qwen3_moe(num_experts=4, num_experts_per_tok=4, norm_topk_prob=False, num_key_value_heads=1,
                          tie_word_embeddings=True),
        batch=1, seq=8,
    ),
    ModelCase(
        "qwen3_moe/sliding-window-all-layers",
        "use_sliding_window with sliding_window 3 (and a max_window_layers of 1 that Qwen3-MoE does not read): "
        "every layer slides; top-2 of 6, length 8",
        seed=674,
        config=_qwen3_moe(use_sliding_window=True, sliding_window=3, max_window_layers=1),
        batch=1, seq=8,
    ),
    ModelCase(
        "qwen3_moe/norm-topk-prob-absent",
        "norm_topk_prob absent from config.json: transformers' Qwen3MoeConfig default false applies (weights are "
        "the top-k softmax probabilities, not renormalised; Qwen3-MoE checkpoints all set true explicitly); "
        "top-2 of 6, batch 2, length 6",
        seed=662,
        config=_qwen3_moe(norm_topk_prob=None),
        batch=2, seq=6,
    ),
    ModelCase(
        "qwen3_moe/twelve-experts-top2",
        "E = 12 experts (indices past 9: a loader that stacks experts.{e} in string order, 0, 1, 10, 11, 2, ..., "
        "puts experts 10 and 11 in slots 2 and 3 and shifts the rest), top-2 of 12, norm_topk_prob true, "
        "router weights x 3 (so that top-2 of 12 is clear of near-ties), length 6",
        seed=656, config=_qwen3_moe(num_experts=12), batch=1, seq=6,
        weight_scales={"mlp.gate.weight": 3.0},
    ),
    ModelCase(
        "qwen3_moe/eps-visible",
        "rms_norm_eps 0.1 against row mean squares of 0.3-3.1 at every norm (input, post-attention, per-head "
        "q/k; the final norm's 1.5-3.1): a default eps (1e-6) in every norm moves layers.0 by 6 % (rel RMS), in "
        "the final norm only the norm tap by 2.6 %, both far past the float32 bound; top-2 of 6, length 6",
        seed=678, config=_qwen3_moe(rms_norm_eps=0.1), batch=1, seq=6,
    ),
]
