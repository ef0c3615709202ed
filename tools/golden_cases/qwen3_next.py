"""Qwen3-Next model-level golden cases (Gated DeltaNet + gated attention + MoE with a shared expert) and
op-level cases of the gated attention (seeds 1301-1349).

Every model case has both kinds of token mixer, q_proj split per head into query and output gate (H = 4
query heads, so splitting the projection into halves pairs the wrong rows), partial RoPE with
``partial_rotary_factor`` 0.25 of head_dim 16 (Dr = 4), Gated DeltaNet with Hv / Hk = 2 and
d_k = 8 != d_v = 12, and a shared expert beside E = 6 routed experts (4 in the long and eps cases; the
strong-decay case has dense MLPs only). The zero-centred norms are drawn as offsets ``0.2 N`` and ``A_log`` as
``log U(0.02, 0.2)`` by the architecture's ``weight_init`` (the delta-rule state then carries across 64-token
chunks), except in ``strong-decay-transformers-a-init``, whose ``checkpoint_layout`` redraws ``A_log`` as
transformers initialises it, ``log U(0.01, 16)``.

Seeds and input sizes were chosen against two hazards of low-precision runs, both measured with
transformers (``tools/make_goldens.py --only`` then ``llm-conformance run --backend transformers``):

* Routing flips. transformers' bfloat16 router logits are off by up to 0.051 (float16: 0.008) from
  the float64 reference's; every token's k-th and (k+1)-th router logits are at least 0.067 apart on
  every MoE layer (smallest gap per case: interval-2-gqa 0.080, explicit-layer-types 0.077,
  no-renorm-dense-layers 0.130, defaults-tied 0.067, yarn-partial-factor-in-dict 0.213; the long
  case routes every token to all k = E experts). With 4 MoE layers over 18 tokens no seed in
  1301-1349 reaches that, hence the short inputs and the dense layers.
* Ill-conditioned Gated DeltaNet outputs. Where a token's read-out ``o_t = S_t^T q_t`` nearly cancels
  (early tokens, few keys in the state), the per-head RMSNorm that follows rescales it to unit size,
  and the relative error of float16 inputs becomes an absolute one: on many seeds transformers'
  float16 run exceeds the float16 max-abs bound at one such token (by up to about 2x in the sweep;
  e.g. seed 1305 of defaults-tied: a read-out of RMS 0.0012 where its neighbours have 0.005-0.07).
  The seeds kept pass at float16 within 0.79x and bfloat16 within 0.82x of every bound. Strong decays
  (``strong-decay-transformers-a-init``) make such read-outs common (o_t ~ beta (q_t . k_t) v_t): 2 of the 6
  seeds scanned failed float16 (1307: 6.0x, 1310: 1.4x); 1304 passes within 0.24x / 0.31x.

A config value of None leaves the key out of config.json (the class default applies).
"""

from __future__ import annotations

import numpy as np

from .common import ModelCase, OpCase

ARCH = "Qwen3NextForCausalLM"
STRONG_DECAY_SEED, EPS_SEED = 1304, 1305


def _qwen3_next(**overrides) -> dict:
    base = {
        "architectures": [ARCH], "model_type": "qwen3_next", "vocab_size": 128, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "partial_rotary_factor": 0.25, "rope_theta": 10000000.0, "max_position_embeddings": 4096,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 12,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 6, "num_experts_per_tok": 2,
        "moe_intermediate_size": 12, "shared_expert_intermediate_size": 20, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "full_attention_interval": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "qwen3_next/interval-2-gqa",
        "4 layers from full_attention_interval 2 (no layer_types in config.json): [linear, full, linear, full]; "
        "gated attention H=4 / Hkv=2, head_dim 16 != hidden/heads 8, Dr = 4 of 16; Gated DeltaNet Hk=2, Hv=4; "
        "decoder_sparse_step 2: dense MLPs on layers 0 and 2, top-2 of 6 renormalised plus the gated shared "
        "expert on layers 1 and 3; batch 2, length 6",
        seed=1348, config=_qwen3_next(decoder_sparse_step=2), batch=2, seq=6,
    ),
    ModelCase(
        "qwen3_next/explicit-layer-types",
        "layer_types [full, linear, linear] given explicitly beside a full_attention_interval 2 that would give "
        "[linear, full, linear]: the list wins (transformers pops the interval only when layer_types is absent); "
        "MQA (Hkv=1), length 10",
        seed=1347,
        config=_qwen3_next(num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "linear_attention"],
                           num_key_value_heads=1),
        batch=1, seq=10,
    ),
    ModelCase(
        "qwen3_next/long-150-three-chunks",
        "T = 150 tokens: the delta rule's 64-token chunks (64 + 64 + 22, the last one padded) and the "
        "recurrent state handed between them; layers [linear, full] from full_attention_interval 2; top-k = E = 4 "
        "(every expert on every token, mixed by the full softmax: no routing decision among 150 tokens for a "
        "float16 / bfloat16 run to flip) plus the shared expert",
        seed=1303, config=_qwen3_next(num_hidden_layers=2, num_experts=4, num_experts_per_tok=4), batch=1, seq=150,
    ),
    ModelCase(
        "qwen3_next/no-renorm-dense-layers",
        "norm_topk_prob false (weights are the top-3 softmax probabilities, summing to < 1), decoder_sparse_step 2 "
        "and mlp_only_layers [3] over 4 layers: [dense, MoE, dense, dense] feed-forwards (dense width "
        "intermediate_size 48) under [linear, full, linear, full] mixers; batch 2",
        seed=1336,
        config=_qwen3_next(norm_topk_prob=False, num_experts_per_tok=3, decoder_sparse_step=2, mlp_only_layers=[3]),
        batch=2, seq=8,
    ),
    ModelCase(
        "qwen3_next/defaults-tied",
        "config.json without full_attention_interval, partial_rotary_factor or norm_topk_prob: transformers' "
        "defaults 4 (layers [linear, linear, linear, full]), 0.25 and true (Qwen3-MoE's default is false); "
        "tied embeddings; batch 2",
        seed=1317,
        config=_qwen3_next(full_attention_interval=None, partial_rotary_factor=None, norm_topk_prob=None,
                           tie_word_embeddings=True),
        batch=2, seq=5,
    ),
    ModelCase(
        "qwen3_next/yarn-partial-factor-in-dict",
        "rope_parameters {yarn, factor 4, original context 8, partial_rotary_factor 0.5} beside a top-level "
        "partial_rotary_factor 0.25: the dict's factor wins (Dr = 8 of 16, YaRN over those 8 channels, cos/sin "
        "magnitude 1 + 0.1 ln 4); layers [linear, full], MoE on layer 1 only (decoder_sparse_step 2); length 20",
        seed=1315,
        config=_qwen3_next(num_hidden_layers=2, decoder_sparse_step=2, max_position_embeddings=32, rope_theta=None,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 8, "partial_rotary_factor": 0.5}),
        batch=1, seq=20,
    ),
]




def _transformers_a_log(weights: dict, rng: np.random.Generator) -> dict:
    """The checkpoint with every Gated DeltaNet's ``A_log`` as transformers initialises it,
    ``log U(0.01, 16)`` (``Qwen3NextGatedDeltaNet.__init__`` / ``_init_weights``), drawn from the layout
    stream: log-decays ``g = -A softplus(a + dt_bias)`` down to about -40 per token."""
    return {name: np.log(rng.uniform(0.01, 16.0, w.shape)) if name.endswith("linear_attn.A_log") else w
            for name, w in weights.items()}


CASES += [
    ModelCase(
        "qwen3_next/strong-decay-transformers-a-init",
        "A_log as transformers initialises it (A ~ U(0.01, 16); the other cases draw A in [0.02, 0.2]): per-token "
        "log-decays down to about -40, a chunk's cumulative log-decay far below float32's exp range, so the "
        "delta rule's pairwise decay must be exp(gamma_r - gamma_s) (a ratio exp(gamma_r) exp(-gamma_s) is "
        "inf * 0 = NaN); T = 70 over two 64-token chunks; layers [linear, full] with dense MLPs (mlp_only_layers "
        "[0, 1]: a NaN reaches the logits, no router refuses it first)",
        seed=STRONG_DECAY_SEED, config=_qwen3_next(num_hidden_layers=2, mlp_only_layers=[0, 1]),
        batch=1, seq=70, checkpoint_layout=_transformers_a_log,
    ),
    ModelCase(
        "qwen3_next/rms-norm-eps-1e-3",
        "rms_norm_eps 1e-3: the (1 + w) norms and the Gated DeltaNet's gated output norm take it, the q / k L2 "
        "norm inside the Gated DeltaNet keeps its own 1e-6 (each mix-up moves the logits beyond float32 "
        "rounding); layers [linear, full], top-k = E = 4; batch 2",
        seed=EPS_SEED, config=_qwen3_next(num_hidden_layers=2, num_experts=4, num_experts_per_tok=4, rms_norm_eps=1e-3),
        batch=2, seq=12,
    ),
]


# -- op level: the gated attention on its own -----------------------------------------------------------------


def _gated(**overrides) -> dict:
    """Gated-attention parameters at tiny widths: H=4 over Hkv=2 heads of D=16, partial_rotary_factor 0.25
    (Dr = 4), rope_theta 1e7 (the 80B's), no biases."""
    base = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0}, "partial_rotary_factor": 0.25,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "attention_bias": False}
    base.update(overrides)
    return base


def _gated_inputs(params: dict, batch: int, length: int, hidden: int = 32, positions=None):
    """hidden_states ~ N(0, 1), positions (default 0..T-1), and the ``Qwen3NextAttention`` weights: matrices
    N(0, 1/in), the q/k norm offsets 0.2 N (gain 1 + w), biases 0.2 N."""

    def make(rng):
        from refimpl.gated_attention import gated_attention_weight_shapes

        shapes = gated_attention_weight_shapes(
            hidden, num_attention_heads=params["num_attention_heads"],
            num_key_value_heads=params["num_key_value_heads"], head_dim=params["head_dim"],
            attention_bias=params["attention_bias"])
        inputs = {"hidden_states": rng.standard_normal((batch, length, hidden))}
        pos = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else positions
        inputs["positions"] = np.array(pos, dtype=np.int64)
        for name, shape in sorted(shapes.items()):
            if name.endswith(".bias") or len(shape) == 1:
                inputs[name] = 0.2 * rng.standard_normal(shape)
            else:
                inputs[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
        return inputs

    return make


def _gated_case(case_id, description, seed, params, make_inputs) -> OpCase:
    return OpCase(f"op/gated_attention/{case_id}", description, seed, "gated_attention", params, make_inputs,
                  tolerance_class="op_mla")


YARN_PARTIAL_HALF = {"rope_type": "yarn", "rope_theta": 10000000.0, "factor": 4.0,
                     "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5}

OP_CASES = [
    _gated_case("gqa-quarter-rotary", "Qwen3-Next's gated attention: q_proj (2 H D rows) split per head into "
                "query and sigmoid gate, (1 + w) q/k norms, RoPE on the first Dr = 4 of D = 16 channels, H=4 over "
                "Hkv=2, gate before o_proj; batch 2, T=7", 1321, _gated(), _gated_inputs(_gated(), 2, 7)),
    _gated_case("mqa-half-rotary-bias", "MQA (Hkv=1), partial_rotary_factor 0.5 (Dr = 8), attention_bias on all "
                "four projections (q_proj's bias covers query and gate rows), rope_theta 1e4; T=9", 1322,
                _gated(num_key_value_heads=1, partial_rotary_factor=0.5, attention_bias=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                _gated_inputs(_gated(attention_bias=True, num_key_value_heads=1), 1, 9)),
    _gated_case("yarn-factor-in-dict", "YaRN (factor 4, original context 64) whose rope_parameters carry "
                "partial_rotary_factor 0.5, beside the argument 0.25: the dict wins (Dr = 8); rows at positions "
                "0.. and 200.. (a cache before them)", 1323, _gated(rope_parameters=YARN_PARTIAL_HALF),
                _gated_inputs(_gated(), 2, 6, positions=[np.arange(6), 200 + np.arange(6)])),
    _gated_case("mha-one-token", "T=1 (each row attends to itself only: the output is o_proj(sigmoid(gate) * v)) "
                "at positions 5 and 300, H = Hkv = 2", 1324, _gated(num_attention_heads=2, num_key_value_heads=2),
                _gated_inputs(_gated(num_attention_heads=2, num_key_value_heads=2), 2, 1, positions=[[5], [300]])),
    _gated_case("full-rotary", "partial_rotary_factor 1.0: all D = 16 channels rotated, pairs (i, i + 8) (the "
                "factor is a parameter, 0.25 only by default); T=8", 1325, _gated(partial_rotary_factor=1.0),
                _gated_inputs(_gated(), 1, 8)),
]

CASES += OP_CASES


# -- op level: the MoE block with its gated shared expert -----------------------------------------------------


def _moe_block_inputs(config: dict, batch: int, length: int):
    """The ``Qwen3NextSparseMoeBlock`` weights (matrices N(0, 1/in)), then hidden_states ~ N(0, 1) whose
    tokens all have router-logit gaps >= 0.2 at the top-k boundary (as ``moe_ops`` draws its blocks)."""

    def make(rng):
        from refimpl.models.qwen3_next import Qwen3NextConfig, moe_module_shapes

        from .moe_ops import _boundary_gap, _gapped_rows

        shapes = moe_module_shapes(Qwen3NextConfig.from_dict(config))
        weights = {name: rng.standard_normal(s) / np.sqrt(s[-1]) for name, s in sorted(shapes.items())}
        k = config["num_experts_per_tok"]
        rows = _gapped_rows(rng, batch * length, lambda r: r.standard_normal(config["hidden_size"]),
                            lambda row: _boundary_gap(weights["gate.weight"] @ row, k) >= 0.2)
        return {"hidden_states": rows.reshape(batch, length, -1), **weights}

    return make


_MOE_CONFIG = _qwen3_next(norm_topk_prob=False, num_experts_per_tok=3)

CASES.append(OpCase(
    "op/moe_block/qwen3_next", "Qwen3-Next MoE block (Qwen3NextSparseMoeBlock): softmax router over 6 experts, "
    "top-3 without renormalisation, SwiGLU experts, plus the shared expert scaled per token by "
    "sigmoid(shared_expert_gate(x))", 1326, "moe_block", {"config": _MOE_CONFIG},
    _moe_block_inputs(_MOE_CONFIG, 2, 5), tolerance_class="op_moe"))
