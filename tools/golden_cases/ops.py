"""Op-level golden cases: one component at a time, with the awkward sizes and the
probes of ``docs/bug-classes.md`` (the class each case targets is in its description).

Shapes: attention q (B, T, H, D), k/v (B, S, Hkv, D); the T queries are the last T
of the S key positions (S > T means a cache precedes them).
"""

from __future__ import annotations

import math

import numpy as np

from .common import OpCase

#: Soft-cap: judged within a ULP window of the reference's own result in the run dtype
#: (``conformance.tolerances``); the generator stores that result, ``outputs.<name>@<dtype>``.
ELEMENTWISE = "op_elementwise"
#: RMSNorm and the scaled embedding: elementwise too, and their rounding points (cast order, the
#: scale rounded to the dtype first) are the architecture's: float16 / bfloat16 runs must reproduce
#: the reference's rounding on all but 1 % of the elements.
ROUNDING = "op_rounding"


def _normal(rng, *shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def _qkv(b, t, s, h, hkv, d, dv=None, q_scale=1.0):
    """Random attention inputs (q scaled to give peaked but not one-hot softmaxes)."""

    def make(rng):
        return {
            "q": _normal(rng, b, t, h, d, scale=q_scale),
            "k": _normal(rng, b, s, hkv, d),
            "v": _normal(rng, b, s, hkv, dv or d),
        }

    return make


def _uniform_probe(b, t, s, h, hkv):
    """Q = K = 0 (uniform weights over the visible keys) and V[j] = one-hot(j):
    each output row lists exactly which keys it saw, and with what weight."""

    def make(rng):
        v = np.zeros((b, s, hkv, s))
        v[:, np.arange(s), :, np.arange(s)] = 1.0
        return {"q": np.zeros((b, t, h, 4)), "k": np.zeros((b, s, hkv, 4)), "v": v}

    return make


def _with(make, **extra):
    """``make`` plus fixed or drawn extra inputs (callables get the rng)."""

    def combined(rng):
        inputs = make(rng)
        inputs.update({k: (v(rng) if callable(v) else np.asarray(v, dtype=np.float64)) for k, v in extra.items()})
        return inputs

    return combined


def _attn(**params):
    base = {"scaling": 0.25, "sliding_window": None, "attention_chunk_size": None, "attn_logit_softcapping": None}
    base.update(params)
    return base


def _attention_case(*args, **kwargs) -> OpCase:
    return OpCase(*args, tolerance_class="op_attention", **kwargs)


ATTENTION = [
    _attention_case("op/attention/mha-odd-len", "MHA H=Hkv=4, D=16, batch 2, causal, odd length 9", 501,
           "attention", _attn(), _qkv(2, 9, 9, 4, 4, 16)),
    _attention_case("op/attention/gqa-prime-len", "GQA H=6/Hkv=2 (head h reads kv head h // 3), prime length 13", 502,
           "attention", _attn(scaling=8 ** -0.5), _qkv(1, 13, 13, 6, 2, 8)),
    _attention_case("op/attention/mqa-decode", "MQA Hkv=1, one query (T=1) after 16 cached keys", 503,
           "attention", _attn(), _qkv(2, 1, 17, 4, 1, 16)),
    _attention_case("op/attention/value-dim-differs", "D=12 for queries/keys, Dv=8 for values, GQA 4/2, T=5", 504,
           "attention", _attn(scaling=12 ** -0.5), _qkv(1, 5, 5, 4, 2, 12, dv=8)),
    _attention_case("op/attention/window-probe", "SWA-01: uniform-attention probe, T=8, sliding_window 4: query 7 must "
           "average V[4..7] (4 keys), not V[3..7]", 505,
           "attention", _attn(sliding_window=4), _uniform_probe(1, 8, 8, 2, 1)),
    _attention_case("op/attention/window-after-cache", "KV-02: 6 cached + 3 new queries, sliding_window 4: each new row "
           "sees only its last 4 positions (uniform probe)", 506,
           "attention", _attn(sliding_window=4), _uniform_probe(1, 3, 9, 2, 2)),
    _attention_case("op/attention/window-decode-probe", "SWA-04: one decode query at position 9 after 9 cached "
                    "keys, sliding_window 4: it must average V[6..9] (uniform probe), not V[5..9]", 517,
                    "attention", _attn(sliding_window=4), _uniform_probe(1, 1, 10, 2, 1)),
    _attention_case("op/attention/window-decode-gqa", "decode (T=1) after 12 cached keys, sliding_window 5, "
                    "GQA 4/2, with learned sinks, batch 2", 518,
                    "attention", _attn(sliding_window=5),
                    _with(_qkv(2, 1, 13, 4, 2, 8), sinks=lambda rng: rng.standard_normal(4))),
    _attention_case("op/attention/window-1", "sliding_window 1: each query sees only itself", 507,
           "attention", _attn(sliding_window=1), _qkv(1, 7, 7, 2, 1, 8)),
    _attention_case("op/attention/window-ge-len", "sliding_window 16 >= T=7: same as full causal", 508,
           "attention", _attn(sliding_window=16), _qkv(2, 7, 7, 4, 2, 8)),
    _attention_case("op/attention/window-random", "sliding_window 5, T=19, GQA 4/2, random inputs", 509,
           "attention", _attn(sliding_window=5), _qkv(1, 19, 19, 4, 2, 16)),
    _attention_case("op/attention/chunked-probe", "Llama 4 chunked local attention, attention_chunk_size 3, T=10: a query "
           "sees keys of its own chunk up to itself (uniform probe)", 510,
           "attention", _attn(attention_chunk_size=3), _uniform_probe(1, 10, 10, 2, 1)),
    _attention_case("op/attention/chunked-after-cache", "chunk size 4, 5 cached + 6 new queries, random inputs", 511,
           "attention", _attn(attention_chunk_size=4), _qkv(1, 6, 11, 4, 2, 8)),
    _attention_case("op/attention/sinks-probe", "SINK-02: 2 heads, sink logits [0, ln 4], QK = 0, V = 1, 3 queries "
           "after 1 cached key: output n / (n + e^s) per row, the sink indexed by head", 512,
           "attention", _attn(),
           lambda rng: {"q": np.zeros((1, 3, 2, 4)), "k": np.zeros((1, 4, 1, 4)), "v": np.ones((1, 4, 1, 2)),
                        "sinks": np.array([0.0, math.log(4.0)])}),
    _attention_case("op/attention/sinks-window", "PAT-05 / SINK-04: learned sinks with sliding_window 4, 5 cached + "
           "3 new queries, GQA 4/2", 513,
           "attention", _attn(sliding_window=4),
           _with(_qkv(2, 3, 8, 4, 2, 8), sinks=lambda rng: rng.standard_normal(4))),
    _attention_case("op/attention/sinks-causal", "learned sinks, full causal, T=11, MHA", 514,
           "attention", _attn(), _with(_qkv(1, 11, 11, 3, 3, 8), sinks=lambda rng: 2 * rng.standard_normal(3))),
    _attention_case("op/attention/softcap", "CAP-03: scores soft-capped at 5 (tanh) before masking; queries scaled so "
           "raw scores exceed the cap", 515,
           "attention", _attn(attn_logit_softcapping=5.0), _qkv(1, 9, 9, 4, 2, 16, q_scale=6.0)),
    _attention_case("op/attention/scale-not-head-dim", "SCL-01: scaling 224^-0.5 (query_pre_attn_scalar) with D=16; "
           "an engine using D^-0.5 fails", 516,
           "attention", _attn(scaling=224 ** -0.5), _qkv(1, 6, 6, 2, 1, 16, q_scale=4.0)),
    _attention_case("op/attention/mla-absorbed-decode-shape", "MLA-05: absorbed-MLA decode shape: one query, 4 heads "
           "sharing one latent key/value head, Dk = 576 (kv_lora_rank 512 + rope 64), Dv = 512, 300 cached keys; a "
           "kernel stepping key rows by Dk and value rows by Dv reads the wrong rows after the first block", 519,
           "attention", _attn(scaling=192 ** -0.5), _qkv(1, 1, 300, 4, 1, 576, dv=512)),
    _attention_case("op/attention/mla-extend-after-cache", "MLA-08: a 4-token continuation against 64 cached keys "
           "with MLA's literal head sizes (Dk = 192 = 128 + 64, Dv = 128), MHA H=Hkv=4", 520,
           "attention", _attn(scaling=192 ** -0.5), _qkv(1, 4, 68, 4, 4, 192, dv=128)),
]


def _rope_inputs(b, t, h, d, positions):
    def make(rng):
        return {"x": _normal(rng, b, t, h, d), "positions": np.asarray(positions(rng), dtype=np.int64)}

    return make


def _arange(b, t, start=0):
    return lambda rng: np.broadcast_to(np.arange(start, start + t), (b, t)).copy()


def _rope(rope_parameters, **params):
    base = {"rope_parameters": rope_parameters, "partial_rotary_factor": 1.0, "max_position_embeddings": None,
            "layout": "rotate_half"}
    base.update(params)
    return base


LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LONG_POSITIONS = lambda rng: np.array([[0, 1, 4095, 8192, 20000, 32769, 65537, 131071]])  # noqa: E731

ROPE = [
    OpCase("op/rope/rotate-half", "default RoPE, rotate-half pairs (j, j + D/2), theta 1e4, batch 2, T=9, D=16",
           521, "rope", _rope({"rope_type": "default", "rope_theta": 10000.0}), _rope_inputs(2, 9, 3, 16, _arange(2, 9)),
           tolerance_class="op_rope"),
    OpCase("op/rope/interleaved", "default RoPE, interleaved pairs (2i, 2i+1) (GLM/DeepSeek layout)", 522,
           "rope", _rope({"rope_type": "default", "rope_theta": 10000.0}, layout="interleaved"),
           _rope_inputs(2, 9, 3, 16, _arange(2, 9)), tolerance_class="op_rope"),
    OpCase("op/rope/partial-odd-pairs", "ROPE-02: partial_rotary_factor 0.5 of D=12: 3 rotated pairs, channels "
           "6..11 unchanged, rotate-half", 523,
           "rope", _rope({"rope_type": "default", "rope_theta": 10000.0}, partial_rotary_factor=0.5),
           _rope_inputs(1, 7, 2, 12, _arange(1, 7, start=3)), tolerance_class="op_rope"),
    OpCase("op/rope/partial-interleaved", "ROPE-02 (GLM): partial 0.5 of D=16 with interleaved pairs", 524,
           "rope", _rope({"rope_type": "default", "rope_theta": 10000.0}, partial_rotary_factor=0.5,
                         layout="interleaved"),
           _rope_inputs(1, 5, 2, 16, _arange(1, 5)), tolerance_class="op_rope"),
    OpCase("op/rope/cache-offsets", "positions differ per batch row (rows continue caches of 0, 37 and 500 "
           "tokens), theta 1e6, T=4", 525,
           "rope", _rope({"rope_type": "default", "rope_theta": 1000000.0}),
           _rope_inputs(3, 4, 2, 32, lambda rng: np.array([[0, 1, 2, 3], [37, 38, 39, 40], [500, 501, 502, 503]])),
           tolerance_class="op_rope"),
    OpCase("op/rope/linear-global", "RSC-09: Gemma 3 global layers, linear factor 8 at theta 1e6 (angle p/8 "
           "inv_freq), T=1 at position 999", 526,
           "rope", _rope({"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}),
           _rope_inputs(1, 1, 4, 32, lambda rng: np.array([[999]])), tolerance_class="op_rope"),
    OpCase("op/rope/linear-long", "linear factor 8 (Gemma 3 global layers, 128k context) at positions up to "
           "131071, D=32", 532,
           "rope", _rope({"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}),
           _rope_inputs(1, 8, 2, 32, LONG_POSITIONS), tolerance_class="op_rope_long"),
    OpCase("op/rope/llama3-long", "RSC-01..03: llama3 rope_type (Llama 3.1: factor 8, low 1, high 4, original "
           "8192, theta 5e5), D=64, positions up to 131071", 527,
           "rope", _rope(LLAMA31), _rope_inputs(1, 8, 2, 64, LONG_POSITIONS), tolerance_class="op_rope_long"),
    OpCase("op/rope/llama3-factor32", "RSC-04: llama3 factor 32 (Llama 3.2 1B/3B), positions up to 131071", 528,
           "rope", _rope({**LLAMA31, "factor": 32.0}), _rope_inputs(1, 8, 1, 64, LONG_POSITIONS),
           tolerance_class="op_rope_long"),
    OpCase("op/rope/yarn-long", "YaRN factor 4, original 32768, theta 1e6 (Qwen3 long context): magnitude "
           "0.1 ln 4 + 1 on cos and sin, positions past 32k", 529,
           "rope", _rope({"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                          "original_max_position_embeddings": 32768}),
           _rope_inputs(1, 8, 2, 32, LONG_POSITIONS), tolerance_class="op_rope_long"),
    OpCase("op/rope/yarn-mscale", "RSC-12: YaRN factor 16 with mscale 1 and mscale_all_dim 0.707 (magnitude "
           "is their ratio), beta_fast 32, beta_slow 1", 530,
           "rope", _rope({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "mscale": 1.0,
                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                          "beta_fast": 32.0, "beta_slow": 1.0}),
           _rope_inputs(1, 8, 2, 64, LONG_POSITIONS), tolerance_class="op_rope_long"),
    OpCase("op/rope/yarn-gpt-oss", "YaRN as gpt-oss configures it: factor 32, theta 150000, original 4096, "
           "beta_fast 32, beta_slow 1, truncate false, D=64", 531,
           "rope", _rope({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
           _rope_inputs(1, 8, 2, 64, LONG_POSITIONS), tolerance_class="op_rope_long"),
]

FREQUENCIES = [
    OpCase("op/rope_frequencies/yarn-wide-ramp", "YaRN where the ramp's upper bound exceeds Dr/2 - 1 (theta 1e4, "
           "factor 4, original 131072, D=64): it is clipped at Dr - 1, as transformers does, so even the lowest "
           "frequency is only partly interpolated", 544,
           "rope_frequencies", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 131072},
                                "head_dim": 64, "partial_rotary_factor": 1.0, "max_position_embeddings": 524288},
           lambda rng: {}),
    OpCase("op/rope_frequencies/llama3", "RSC-01: all 64 llama3 inverse frequencies of Llama 3.1 (D=128)", 541,
           "rope_frequencies", {"rope_parameters": LLAMA31, "head_dim": 128, "partial_rotary_factor": 1.0,
                                "max_position_embeddings": 131072}, lambda rng: {}),
    OpCase("op/rope_frequencies/yarn-partial", "YaRN factor 4 over a partial rotary width (D=64, factor 0.5)",
           542, "rope_frequencies",
           {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                "original_max_position_embeddings": 32768},
            "head_dim": 64, "partial_rotary_factor": 0.5, "max_position_embeddings": 131072}, lambda rng: {}),
    OpCase("op/rope_frequencies/linear", "linear factor 8, theta 1e6, D=256 (Gemma 3 global layers)", 543,
           "rope_frequencies", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
                                "head_dim": 256, "partial_rotary_factor": 1.0, "max_position_embeddings": 131072},
           lambda rng: {}),
]


def _norm_inputs(*shape, x_scale=1.0, w_mean=1.0, w_scale=0.2, w_shape=None):
    def make(rng):
        return {"x": _normal(rng, *shape, scale=x_scale),
                "weight": w_mean + _normal(rng, *(w_shape or shape[-1:]), scale=w_scale)}

    return make


NORMS = [
    OpCase("op/rms_norm/plain", "RMSNorm with weight w (Llama/Qwen/OLMo/Mistral), (2, 7, 64), eps 1e-6", 551,
           "rms_norm", {"eps": 1e-6, "weight_offset": 0.0, "cast_order": "cast_then_multiply"}, _norm_inputs(2, 7, 64),
           tolerance_class=ROUNDING),
    OpCase("op/rms_norm/one-plus-w", "NRM-02/03: Gemma RMSNorm, weight used as 1 + w (w stored near 0)", 552,
           "rms_norm", {"eps": 1e-6, "weight_offset": 1.0, "cast_order": "multiply_then_cast"}, _norm_inputs(2, 7, 64, w_mean=0.0),
           tolerance_class=ROUNDING),
    OpCase("op/rms_norm/zero-offset-weight", "NRM-04: Gemma norm with w = 0 is the bare normalisation", 553,
           "rms_norm", {"eps": 1e-6, "weight_offset": 1.0, "cast_order": "multiply_then_cast"},
           lambda rng: {"x": _normal(rng, 3, 48), "weight": np.zeros(48)},
           tolerance_class=ROUNDING),
    OpCase("op/rms_norm/per-head", "QK-norm per head: x (2, 5, 4, 16), weight (16,), statistics over D", 554,
           "rms_norm", {"eps": 1e-6, "weight_offset": 0.0, "cast_order": "cast_then_multiply"}, _norm_inputs(2, 5, 4, 16),
           tolerance_class=ROUNDING),
    OpCase("op/rms_norm/cast-then-multiply", "NRM-07/08: Llama-family cast order in low precision: normalise in "
           "float32, cast, multiply by w in the storage dtype; bfloat16/float16 runs must match the reference's "
           "rounding element for element", 556,
           "rms_norm", {"eps": 1e-6, "weight_offset": 0.0, "cast_order": "cast_then_multiply"},
           _norm_inputs(4, 256, x_scale=3.0, w_mean=1.3, w_scale=0.3), tolerance_class=ROUNDING),
    OpCase("op/rms_norm/multiply-then-cast", "NRM-06/08: OLMo 2 / Gemma cast order: (1 + w) times the float32 "
           "normalised value, cast once at the end (Gemma 1 + w)", 557,
           "rms_norm", {"eps": 1e-6, "weight_offset": 1.0, "cast_order": "multiply_then_cast"},
           _norm_inputs(4, 256, x_scale=3.0, w_mean=0.3, w_scale=0.3), tolerance_class=ROUNDING),
    OpCase("op/rms_norm/eps-dominant", "mean squares near eps (x ~ 1e-3, eps 1e-6): eps inside the root", 555,
           "rms_norm", {"eps": 1e-6, "weight_offset": 0.0, "cast_order": "cast_then_multiply"}, _norm_inputs(2, 3, 32, x_scale=1e-3),
           tolerance_class=ROUNDING),
]


def _mlp_inputs(m, f, *lead):
    def make(rng):
        return {"x": _normal(rng, *lead, m), "gate_proj": _normal(rng, f, m, scale=m ** -0.5),
                "up_proj": _normal(rng, f, m, scale=m ** -0.5), "down_proj": _normal(rng, m, f, scale=f ** -0.5)}

    return make


MISC = [
    OpCase("op/gated_mlp/swiglu", "SwiGLU: silu(gate x) * up x, M=32, F=47", 561,
           "gated_mlp", {"hidden_act": "silu"}, _mlp_inputs(32, 47, 2, 5)),
    OpCase("op/gated_mlp/geglu-tanh", "NRM-06: GeGLU with tanh-approximated GELU (gelu_pytorch_tanh), M=32, F=47; "
           "inputs scaled so erf and tanh GELU differ", 562,
           "gated_mlp", {"hidden_act": "gelu_pytorch_tanh"},
           lambda rng: {k: (3 * v if k == "x" else v) for k, v in _mlp_inputs(32, 47, 2, 5)(rng).items()}),
    OpCase("op/embedding/gemma-scale", "NRM-06: embedding rows times sqrt(hidden_size) = sqrt(48), the scale "
           "rounded to the run dtype first (6.9375 in bfloat16); bfloat16/float16 runs must match that rounding "
           "element for element", 563,
           "embedding", {"embed_scale": math.sqrt(48)},
           lambda rng: {"input_ids": rng.integers(0, 20, size=(2, 6)), "weight": _normal(rng, 20, 48)},
           tolerance_class=ROUNDING),
    OpCase("op/soft_cap/final-logits", "CAP-01/02: final logit soft-cap 30 on logits up to +-100 (60 -> 28.92)", 564,
           "soft_cap", {"cap": 30.0}, lambda rng: {"x": np.concatenate([[60.0, 0.0], _normal(rng, 30, scale=40.0)])},
           tolerance_class=ELEMENTWISE),
    OpCase("op/soft_cap/cap-20", "CAP-02: the cap is read from the config (20, not a hard-coded 30)", 565,
           "soft_cap", {"cap": 20.0}, lambda rng: {"x": _normal(rng, 2, 16, scale=30.0)},
           tolerance_class=ELEMENTWISE),
]

CASES = ATTENTION + ROPE + FREQUENCIES + NORMS + MISC
