"""Op-level golden cases of the MoE and MLA components: routers, experts, dispatch, MLA, MoE blocks.

The class of ``docs/bug-classes.md`` a case probes is named in its description.
Seeds 1001-1199.

Routing outputs are ``routing_weights`` (N, E) and ``selected`` (N, E) int64; the
suite compares ``selected`` exactly, in every dtype. So every router case must
choose the same experts when its logits are rounded to float32, float16 or
bfloat16: the logits are drawn with clear gaps between the scores that decide the
choice (:func:`_gapped_rows` rejects rows with a gap below ``min_gap``), and the
only exact ties in the corpus are ties whose chosen *set* is unambiguous (all tied
experts chosen, or none). A tie at the selection boundary is implementation-defined
(``torch.topk`` on the CPU returns [1, 2] for ``topk([1, 1, 1, 0], 2)``, the
reference [0, 1]) and is not tested.
"""

from __future__ import annotations

import math

import numpy as np

from .common import OpCase

# -- routers ---------------------------------------------------------------------------------------


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _boundary_gap(scores: np.ndarray, k: int) -> float:
    """How far the k-th largest score lies above the (k+1)-th (inf when all are chosen): the
    margin by which rounding may move scores before the chosen set changes."""
    ordered = np.sort(scores)[::-1]
    return math.inf if k >= len(ordered) or not np.isfinite(ordered[k]) else float(ordered[k - 1] - ordered[k])


def _gapped_rows(rng, n: int, draw, check, tries: int = 10_000) -> np.ndarray:
    """``n`` rows from ``draw(rng)``, each redrawn until ``check(row)`` holds (deterministic for a seed)."""
    rows = []
    for _ in range(n):
        for _ in range(tries):
            row = draw(rng)
            if check(row):
                rows.append(row)
                break
        else:
            raise RuntimeError("no row with a clear selection boundary found; loosen the draw")
    return np.array(rows)


def _logits(n: int, e: int, top_k: int, scale: float = 2.0, min_gap: float = 0.25):
    """Router logits ``(n, e)`` ~ N(0, scale^2) whose k-th and (k+1)-th largest differ by ``min_gap`` or more."""
    return lambda rng: _gapped_rows(rng, n, lambda r: scale * r.standard_normal(e),
                                    lambda row: _boundary_gap(row, top_k) >= min_gap)


def _fixed(**arrays):
    return lambda rng: {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


def _stack(*makers):
    """Concatenate the rows of several ``router_logits`` makers (probe rows first, then random rows)."""
    return lambda rng: np.concatenate([np.asarray(m(rng), dtype=np.float64) for m in makers])


def _router(make_logits):
    return lambda rng: {"router_logits": np.asarray(make_logits(rng), dtype=np.float64)}


def _routing_case(case_id, description, seed, op, params, make_inputs) -> OpCase:
    return OpCase(case_id, description, seed, op, params, make_inputs, tolerance_class="op_routing")


def _group_margin(logits, bias, top_k, n_group, topk_group) -> float:
    """The smaller of DeepSeek's two selection margins: between kept and dropped group scores
    (sum of a group's two largest sigmoid(l) + b) and between chosen and unchosen experts of the kept groups."""
    choice = _sigmoid(logits) + bias
    grouped = choice.reshape(n_group, -1)
    group_scores = -np.sort(-grouped, axis=-1)[:, :2].sum(axis=-1)
    kept = np.argsort(-group_scores, kind="stable")[:topk_group]
    masked = np.full_like(grouped, -np.inf)
    masked[kept] = grouped[kept]
    return min(_boundary_gap(group_scores, topk_group), _boundary_gap(masked.ravel(), top_k))


def _biased_router(n, e, top_k, *, bias, n_group=1, topk_group=1, scale=2.0, min_gap=0.05, rows=None):
    """Inputs of the sigmoid routers: logits drawn so that the selection margins of the selection
    scores sigmoid(l) + b (and of the group scores) are ``min_gap`` or more; ``bias`` fixed or drawn.
    (bfloat16 moves a logit near 4 by up to 0.016, a sigmoid by 0.004, a bias near 3 by 0.008.)"""

    def make(rng):
        b = np.asarray(bias(rng) if callable(bias) else bias, dtype=np.float64)
        drawn = _gapped_rows(rng, n, lambda r: scale * r.standard_normal(e),
                             lambda row: _group_margin(row, b, top_k, n_group, topk_group) >= min_gap)
        logits = drawn if rows is None else np.concatenate([np.asarray(rows, dtype=np.float64), drawn])
        return {"router_logits": logits, "e_score_correction_bias": b}

    return make


def _group(top_k, n_group, topk_group, norm_topk_prob=True, routed_scaling_factor=2.5):
    return {"top_k": top_k, "n_group": n_group, "topk_group": topk_group, "norm_topk_prob": norm_topk_prob,
            "routed_scaling_factor": routed_scaling_factor}


#: MOE-01's probe: 4 experts, logits 0 (sigmoid 0.5 each), bias [2, 0.1, 0, -2]: the bias picks {0, 1},
#: the weights come from the unbiased sigmoid, 0.5 / 0.5 after renormalisation (not 0.806 / 0.194).
MOE01_BIAS = [2.0, 0.1, 0.0, -2.0]

#: A token whose single best expert (3, in group 0) is excluded by the group limit: group 0 scores
#: 0.95 + 0.08, group 1 scores 0.88 + 0.85 (sigmoid of the logits, bias 0).
BEST_EXPERT_EXCLUDED = [[math.log(0.08 / 0.92), math.log(0.05 / 0.95), math.log(0.03 / 0.97), math.log(0.95 / 0.05),
                         math.log(0.88 / 0.12), math.log(0.85 / 0.15), math.log(0.2 / 0.8), math.log(0.1 / 0.9)]]

#: MOE-05's probe: one chosen expert with sigmoid 0.3 and no renormalisation: weight 0.3 * 2.5 = 0.75.
SIGMOID_POINT_3 = [[math.log(0.3 / 0.7), -4.0, -5.0, -6.0]]

SOFTMAX_TOP_K = [
    _routing_case("op/softmax_top_k/renormalised", "Qwen3-MoE router: softmax over E=8, top-2, renormalised "
                  "(norm_topk_prob true), 6 tokens", 1001, "softmax_top_k",
                  {"top_k": 2, "norm_topk_prob": True}, _router(_logits(6, 8, 2))),
    _routing_case("op/softmax_top_k/moe04-probe", "MOE-04: logits [2, 1, 0, -1], top-2, no renormalisation: the "
                  "weights are the probabilities [0.644, 0.237], not the raw logits [2, 1]; plus 4 random tokens",
                  1002, "softmax_top_k", {"top_k": 2, "norm_topk_prob": False},
                  _router(_stack(lambda rng: [[2.0, 1.0, 0.0, -1.0]], _logits(4, 4, 2)))),
    _routing_case("op/softmax_top_k/top-1", "top-k = 1 of E=6 (not a power of two), no renormalisation", 1003,
                  "softmax_top_k", {"top_k": 1, "norm_topk_prob": False}, _router(_logits(5, 6, 1))),
    _routing_case("op/softmax_top_k/top-k-equals-e", "top-k = E = 5, no renormalisation: every expert chosen with "
                  "its full softmax probability", 1004, "softmax_top_k", {"top_k": 5, "norm_topk_prob": False},
                  _router(_logits(4, 5, 5))),
    _routing_case("op/softmax_top_k/ties-unambiguous", "exact ties that do not touch the selection boundary: two "
                  "equal best experts (both chosen), three equal chosen experts, equal unchosen experts; top-3 of 6, "
                  "renormalised", 1005, "softmax_top_k", {"top_k": 3, "norm_topk_prob": True},
                  _router(lambda rng: [[3.0, 3.0, 1.0, 0.0, 0.0, -1.0], [-2.0, 1.5, 1.5, 1.5, 0.0, 0.0],
                                       [4.0, 0.5, 3.0, -1.0, -1.0, -1.0]])),
]

TOP_K_SOFTMAX = [
    _routing_case("op/top_k_softmax/top4-of-12", "gpt-oss router: top-4 of the raw logits of E=12, softmax over "
                  "the 4 chosen only", 1011, "top_k_softmax", {"top_k": 4}, _router(_logits(7, 12, 4))),
    _routing_case("op/top_k_softmax/top-1", "top-k = 1: the one chosen expert gets weight 1", 1012,
                  "top_k_softmax", {"top_k": 1}, _router(_logits(5, 4, 1))),
    _routing_case("op/top_k_softmax/top-k-equals-e", "top-k = E = 3: the softmax over all experts", 1013,
                  "top_k_softmax", {"top_k": 3}, _router(_logits(4, 3, 3))),
    _routing_case("op/top_k_softmax/ties-unambiguous", "exact ties inside the chosen set (equal weights) and "
                  "outside it, top-2 of 5", 1014, "top_k_softmax", {"top_k": 2},
                  _router(lambda rng: [[1.0, 1.0, -1.0, -2.0, -3.0], [0.0, 2.0, -1.0, -1.0, 2.5]])),
]

LLAMA4 = [
    _routing_case("op/llama4_top_k_sigmoid/scout-top1", "Llama 4 router: top-1 of E=16 raw logits, weight "
                  "sigmoid(logit) (not normalised, not a softmax)", 1021, "llama4_top_k_sigmoid", {"top_k": 1},
                  _router(_logits(6, 16, 1))),
    _routing_case("op/llama4_top_k_sigmoid/top2-negative", "top-2 of E=6 with mostly negative logits: the weights "
                  "sigmoid(l) < 0.5 and sum to less than 1", 1022, "llama4_top_k_sigmoid", {"top_k": 2},
                  _router(lambda rng: _logits(5, 6, 2)(rng) - 3.0)),
    _routing_case("op/llama4_top_k_sigmoid/top-k-equals-e", "top-k = E = 4: every expert with weight sigmoid(l)",
                  1023, "llama4_top_k_sigmoid", {"top_k": 4}, _router(_logits(3, 4, 4))),
]

SIGMOID_BIAS = [
    _routing_case("op/sigmoid_bias_top_k/moe01-probe", "MOE-01 (MiniMax-M2): logits 0, bias [2, 0.1, 0, -2], "
                  "top-2: the bias selects {0, 1}, the weights are the unbiased sigmoids renormalised, 0.5 / 0.5",
                  1031, "sigmoid_bias_top_k", {"top_k": 2},
                  _fixed(router_logits=[[0.0, 0.0, 0.0, 0.0]], e_score_correction_bias=MOE01_BIAS)),
    _routing_case("op/sigmoid_bias_top_k/top3-of-8", "MiniMax-M2 router: sigmoid, correction bias for selection "
                  "only, top-3 of 8, renormalised without epsilon or scaling", 1032, "sigmoid_bias_top_k",
                  {"top_k": 3}, _biased_router(6, 8, 3, bias=lambda rng: 0.3 * rng.standard_normal(8))),
    _routing_case("op/sigmoid_bias_top_k/top-1-negative-bias", "top-k = 1 of E=6 with all-negative correction "
                  "biases (-3 .. -2)", 1033, "sigmoid_bias_top_k", {"top_k": 1},
                  _biased_router(5, 6, 1, bias=lambda rng: rng.uniform(-3.0, -2.0, 6))),
    _routing_case("op/sigmoid_bias_top_k/top-k-equals-e", "top-k = E = 5: weights are all sigmoids renormalised; "
                  "the bias changes nothing", 1034, "sigmoid_bias_top_k", {"top_k": 5},
                  _biased_router(3, 5, 5, bias=lambda rng: 0.5 * rng.standard_normal(5))),
]

SIGMOID_GROUP = [
    _routing_case("op/sigmoid_group_top_k/moe01-probe", "MOE-01: 4 experts, 1 group, top-2, logits 0 (sigmoid 0.5), "
                  "bias [2, 0.1, 0, -2]: selects {0, 1} with weights 0.5 / 0.5 after renormalisation (biased scores "
                  "would give 0.806 / 0.194), routed_scaling_factor 1", 1041, "sigmoid_group_top_k",
                  _group(2, 1, 1, routed_scaling_factor=1.0),
                  _fixed(router_logits=[[0.0, 0.0, 0.0, 0.0]], e_score_correction_bias=MOE01_BIAS)),
    _routing_case("op/sigmoid_group_top_k/deepseek-groups", "DeepSeek-V3 routing: E=16 in 4 groups, 2 groups kept "
                  "(tokens route nowhere in the other 2), top-4, renormalised, x 2.5 (MOE-08: once)", 1042,
                  "sigmoid_group_top_k", _group(4, 4, 2),
                  _biased_router(6, 16, 4, bias=lambda rng: 0.2 * rng.standard_normal(16), n_group=4,
                                 topk_group=2)),
    _routing_case("op/sigmoid_group_top_k/negative-bias-group-fill", "MOE-02/03: all correction biases negative "
                  "(-3 .. -2) so every selection score is < 0: experts of excluded groups must be filled with -inf, "
                  "a 0 fill would choose them; E=8, 4 groups, 2 kept, top-3", 1043, "sigmoid_group_top_k",
                  _group(3, 4, 2),
                  _biased_router(6, 8, 3, bias=lambda rng: rng.uniform(-3.0, -2.0, 8), n_group=4, topk_group=2)),
    _routing_case("op/sigmoid_group_top_k/group-limit-excludes-best", "group limit: the first token's best expert "
                  "(3, sigmoid 0.95) sits in group 0, whose top-2 sum 0.95 + 0.08 loses to group 1's 0.88 + 0.85; E=8, "
                  "2 groups, 1 kept, top-2; plus random tokens", 1044, "sigmoid_group_top_k", _group(2, 2, 1),
                  _biased_router(5, 8, 2, bias=np.zeros(8), n_group=2, topk_group=1, rows=BEST_EXPERT_EXCLUDED)),
    _routing_case("op/sigmoid_group_top_k/e12-three-groups", "E=12 (not a power of two) in 3 groups of 4, 2 kept, "
                  "top-3", 1045, "sigmoid_group_top_k", _group(3, 3, 2),
                  _biased_router(6, 12, 3, bias=lambda rng: 0.2 * rng.standard_normal(12), n_group=3, topk_group=2)),
    _routing_case("op/sigmoid_group_top_k/moe05-no-norm-scaled", "MOE-05: norm_topk_prob false with "
                  "routed_scaling_factor 2.5: a chosen sigmoid of 0.3 gives weight 0.75 (the factor applies without "
                  "renormalisation); top-1 of 4 then random tokens", 1046, "sigmoid_group_top_k",
                  _group(1, 1, 1, norm_topk_prob=False),
                  _biased_router(4, 4, 1, bias=lambda rng: 0.1 * rng.standard_normal(4), rows=SIGMOID_POINT_3)),
    _routing_case("op/sigmoid_group_top_k/kimi-one-group", "Kimi K2 routing: one group (no group limit), E=12, "
                  "top-4, renormalised, routed_scaling_factor 2.827", 1047, "sigmoid_group_top_k",
                  _group(4, 1, 1, routed_scaling_factor=2.827),
                  _biased_router(6, 12, 4, bias=lambda rng: 0.2 * rng.standard_normal(12))),
    _routing_case("op/sigmoid_group_top_k/top-k-fills-kept-groups", "top-k equal to every expert of the kept "
                  "groups: E=6 in 3 groups of 2, 1 kept, top-2", 1048, "sigmoid_group_top_k", _group(2, 3, 1),
                  _biased_router(5, 6, 2, bias=lambda rng: 0.2 * rng.standard_normal(6), n_group=3, topk_group=1)),
    _routing_case("op/sigmoid_group_top_k/top-k-equals-e", "top-k = E = 6 with one group: every expert, weights "
                  "the renormalised sigmoids x 2.5", 1049, "sigmoid_group_top_k", _group(6, 1, 1),
                  _biased_router(3, 6, 6, bias=lambda rng: 0.2 * rng.standard_normal(6))),
    _routing_case("op/sigmoid_group_top_k/top-1", "top-k = 1 of E=8, 4 groups, 1 kept, renormalised (weight = "
                  "routed_scaling_factor 2.5)", 1050, "sigmoid_group_top_k", _group(1, 4, 1),
                  _biased_router(5, 8, 1, bias=lambda rng: 0.2 * rng.standard_normal(8), n_group=4, topk_group=1)),
]

SOFT_CAPPED = [
    _routing_case("op/soft_capped_softmax_top_k/grok-cap-30", "Grok 2.5 router: logits up to +-60 soft-capped "
                  "at 30, softmax over E=8, top-2, not renormalised", 1061, "soft_capped_softmax_top_k",
                  {"top_k": 2, "router_logit_softcapping": 30.0}, _router(_logits(5, 8, 2, scale=25.0, min_gap=4.0))),
    _routing_case("op/soft_capped_softmax_top_k/top-1-no-cap", "no cap (router_logit_softcapping null), top-1 of 4",
                  1062, "soft_capped_softmax_top_k", {"top_k": 1, "router_logit_softcapping": None},
                  _router(_logits(4, 4, 1))),
]

ROUTERS = SOFTMAX_TOP_K + TOP_K_SOFTMAX + LLAMA4 + SIGMOID_BIAS + SIGMOID_GROUP + SOFT_CAPPED

# -- experts ---------------------------------------------------------------------------------------


def _normal(rng, *shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def _expert_inputs(n, m, i, *, layout, x_scale=1.0):
    """x (n, M) and one expert's fused weights in ``layout``: "concatenated" (2I, M) / (M, I) or
    "input_major" (M, 2I) / (I, M)."""

    def make(rng):
        x = _normal(rng, n, m, scale=x_scale)
        gate_up = _normal(rng, 2 * i, m, scale=m ** -0.5)
        down = _normal(rng, m, i, scale=i ** -0.5)
        if layout == "input_major":
            gate_up, down = gate_up.T.copy(), down.T.copy()
        return {"x": x, "gate_up_proj": gate_up, "down_proj": down}

    return make


def _clamp_probe(pairs, m):
    """x = the first rows of the identity, so row r of ``x @ gate_up_proj`` is row r of the weight:
    the interleaved columns (2j, 2j+1) of row r hold the (gate, up) pair ``pairs[r][j]``."""

    def make(rng):
        rows, channels = len(pairs), len(pairs[0])
        gate_up = np.zeros((m, 2 * channels))
        for r, row in enumerate(pairs):
            for j, (gate, up) in enumerate(row):
                gate_up[r, 2 * j], gate_up[r, 2 * j + 1] = gate, up
        return {"x": np.eye(m)[:rows], "gate_up_proj": gate_up, "gate_up_proj_bias": np.zeros(2 * channels),
                "down_proj": _normal(rng, channels, m, scale=channels ** -0.5), "down_proj_bias": np.zeros(m)}

    return make


def _clamped_random(n, m, i, x_scale):
    def make(rng):
        return {"x": _normal(rng, n, m, scale=x_scale), "gate_up_proj": _normal(rng, m, 2 * i, scale=m ** -0.5),
                "gate_up_proj_bias": _normal(rng, 2 * i, scale=0.5), "down_proj": _normal(rng, i, m, scale=i ** -0.5),
                "down_proj_bias": _normal(rng, m, scale=0.2)}

    return make


def _moe_case(case_id, description, seed, op, params, make_inputs) -> OpCase:
    return OpCase(case_id, description, seed, op, params, make_inputs, tolerance_class="op_moe")


EXPERTS = [
    _moe_case("op/swiglu_expert/concatenated-i2", "ACT-04: SwiGLU with gate|up concatenated as rows (DeepSeek, "
              "GLM, Qwen3-MoE, MiniMax layout), I=2, M=4: silu(gate) * up, not an interleaved split", 1071,
              "swiglu_expert", {"hidden_act": "silu"}, _expert_inputs(5, 4, 2, layout="concatenated", x_scale=2.0)),
    _moe_case("op/swiglu_expert/odd-sizes", "SwiGLU expert, M=24, I=13, 7 rows", 1072, "swiglu_expert",
              {"hidden_act": "silu"}, _expert_inputs(7, 24, 13, layout="concatenated")),
    _moe_case("op/swiglu_expert/one-row", "one routed row (n=1), M=16, I=8", 1073, "swiglu_expert",
              {"hidden_act": "silu"}, _expert_inputs(1, 16, 8, layout="concatenated")),
    _moe_case("op/input_major_swiglu_expert/llama4-layout", "ACT-04 (Llama 4): input-major gate_up_proj (M, 2I) "
              "used as x @ W, gate the first I columns; M=16, I=11", 1081, "input_major_swiglu_expert", {},
              _expert_inputs(6, 16, 11, layout="input_major", x_scale=2.0)),
    _moe_case("op/input_major_swiglu_expert/i2", "input-major SwiGLU with I=2, M=4", 1082,
              "input_major_swiglu_expert", {}, _expert_inputs(3, 4, 2, layout="input_major", x_scale=2.0)),
    _moe_case("op/clamped_swiglu_expert/act02-probe", "ACT-02 (gpt-oss form), limit 10: (gate, up) = (15, 12) "
              "gives (clip(up) + 1) * min(gate, 10) * sigmoid(1.702 min(gate, 10)) = 110, unclamped 195; also "
              "(-15, 3), (3, -12), (0.5, 0.5), (10, 10)", 1091, "clamped_swiglu_expert",
              {"swiglu_limit": 10.0, "alpha": 1.702},
              _clamp_probe([[(15.0, 12.0), (-15.0, 3.0)], [(3.0, -12.0), (0.5, 0.5)], [(10.0, 10.0), (11.0, -11.0)]],
                           4)),
    _moe_case("op/clamped_swiglu_expert/act05-probe", "ACT-05 (clamp form), limit 4: (gate, up) = (6, 5) gives "
              "5 * 4 sigmoid(6.808) = 19.98; the Ling form clip(silu(gate), 4) * clip(up) = 16 and clamping after "
              "the activation differ; also (4.5, -5), (-6, 2), (2, 4.5)", 1092, "clamped_swiglu_expert",
              {"swiglu_limit": 4.0, "alpha": 1.702},
              _clamp_probe([[(6.0, 5.0), (4.5, -5.0)], [(-6.0, 2.0), (2.0, 4.5)]], 3)),
    _moe_case("op/clamped_swiglu_expert/gpt-oss-random", "gpt-oss expert: interleaved gate/up columns (ACT-04), "
              "biases, limit 7, alpha 1.702; inputs scaled so about a third of gates exceed the limit", 1093,
              "clamped_swiglu_expert", {"swiglu_limit": 7.0, "alpha": 1.702}, _clamped_random(6, 16, 9, 12.0)),
    # Square experts: I == M (released gpt-oss: 2880 == 2880) makes down_proj square, so its orientation
    # cannot be guessed from its shape.
    _moe_case("op/swiglu_expert/square-down", "I == M = 12: down_proj (M, I) is square and used as h @ W.T; a "
              "kernel guessing the orientation from the shape (transposing a square matrix) is caught", 1074,
              "swiglu_expert", {"hidden_act": "silu"}, _expert_inputs(5, 12, 12, layout="concatenated")),
    _moe_case("op/input_major_swiglu_expert/square-down", "input-major with I == M = 10: down_proj (I, M) is "
              "square and used as h @ W, not transposed", 1083, "input_major_swiglu_expert", {},
              _expert_inputs(5, 10, 10, layout="input_major", x_scale=2.0)),
    _moe_case("op/clamped_swiglu_expert/square-down", "gpt-oss expert with I == M = 12 (as released, 2880 == "
              "2880): down_proj (I, M) square, used as h @ W; biases, limit 7, some gates clamped", 1094,
              "clamped_swiglu_expert", {"swiglu_limit": 7.0, "alpha": 1.702}, _clamped_random(6, 12, 12, 6.0)),
]

# -- dispatch --------------------------------------------------------------------------------------


def _dispatch_inputs(n, m, i, e, k, weight_low=0.2, weight_high=0.95):
    """Tokens, a routing (k distinct experts per token, weights away from 1) and E concatenated experts."""

    def make(rng):
        indices = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int64)
        return {"x": _normal(rng, n, m, scale=2.0), "routing_weights": rng.uniform(weight_low, weight_high, (n, k)),
                "indices": indices, "gate_up_proj": _normal(rng, e, 2 * i, m, scale=m ** -0.5),
                "down_proj": _normal(rng, e, m, i, scale=i ** -0.5)}

    return make


DISPATCH = [
    _moe_case("op/moe_dispatch/weight-on-output", "y = sum_j w_j Expert_j(x): E=6 SwiGLU experts, top-2, 7 tokens, "
              "M=16, I=8", 1101, "moe_dispatch", {"weight_on": "output"}, _dispatch_inputs(7, 16, 8, 6, 2)),
    _moe_case("op/moe_dispatch/weight-on-input", "ACT-07 (Llama 4, apply_router_weight_on_input): y = sum_j "
              "Expert_j(w_j x); the same routing as weight-on-output, weights 0.2 .. 0.95", 1101, "moe_dispatch",
              {"weight_on": "input"}, _dispatch_inputs(7, 16, 8, 6, 2)),
    _moe_case("op/moe_dispatch/top1-on-input", "ACT-07: Llama 4 Scout shape, top-1 of E=5, weight on input", 1102,
              "moe_dispatch", {"weight_on": "input"}, _dispatch_inputs(6, 12, 7, 5, 1)),
    _moe_case("op/moe_dispatch/idle-experts", "E=8 experts, 3 tokens, top-1: most experts receive no token", 1103,
              "moe_dispatch", {"weight_on": "output"}, _dispatch_inputs(3, 16, 8, 8, 1)),
    _moe_case("op/moe_dispatch/top-k-equals-e", "top-k = E = 3: every token visits every expert", 1104,
              "moe_dispatch", {"weight_on": "output"}, _dispatch_inputs(5, 8, 5, 3, 3)),
]

# -- MLA -------------------------------------------------------------------------------------------

YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def _mla(**overrides) -> dict:
    """DeepSeek-V3-shaped MLA parameters at tiny widths (the spec sheet's tiny config): H=4, Dq=24, Dc=16,
    Dn=8, Dr=8, Dv=12 (v not equal to the qk widths), YaRN factor 40, interleaved rope pairs."""
    base = {"form": "literal", "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12, "rope_parameters": YARN_V3,
            "rope_interleave": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 640, "attention_bias": False}
    base.update(overrides)
    return base


def _mla_inputs(params: dict, batch: int, length: int, hidden: int = 64, positions=None):
    """hidden_states ~ N(0, 1), positions (default 0..T-1), and the ``DeepseekV3Attention`` weights:
    matrices N(0, 1/in), the two latent norm weights 1 + 0.2 N, biases 0.2 N."""

    def make(rng):
        from refimpl.mla import mla_dims, mla_weight_shapes

        dims = mla_dims(**{k: params[k] for k in ("num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")})
        inputs = {"hidden_states": _normal(rng, batch, length, hidden)}
        pos = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else positions
        inputs["positions"] = np.array(pos, dtype=np.int64)
        for name, shape in sorted(mla_weight_shapes(hidden, dims, params["attention_bias"]).items()):
            if name.endswith(".bias"):
                inputs[name] = _normal(rng, *shape, scale=0.2)
            elif len(shape) == 1:
                inputs[name] = 1.0 + _normal(rng, *shape, scale=0.2)
            else:
                inputs[name] = _normal(rng, *shape, scale=shape[-1] ** -0.5)
        return inputs

    return make


#: MLA-03's probe: mscale 0.707 and mscale_all_dim 1.0 differ, so a softmax scale built from mscale is wrong
#: (and the cos/sin magnitude m(16, 0.707) / m(16, 1) = 0.9275 is not 1).
YARN_MSCALE_DIFFERS = {**YARN_V3, "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 40}
KIMI_YARN = {**YARN_V3, "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0,
             "original_max_position_embeddings": 20}
#: YaRN without mscale / mscale_all_dim: no softmax correction, cos/sin magnitude m(40, 1) = 1.369.
YARN_NO_MSCALE = {k: v for k, v in YARN_V3.items() if k not in ("mscale", "mscale_all_dim")}
#: Dn 16, Dr 8 (V3's 2:1), Dv 12, Dc 20: every width distinct, so (Dn + Dr), 2 Dr, 2 Dn and Dc + Dr all differ.
WIDTHS_DISTINCT = {"qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "kv_lora_rank": 20}
NO_Q_LORA = {"q_lora_rank": None, "attention_bias": True, "rope_interleave": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def _mla_case(case_id, description, seed, params, make_inputs) -> OpCase:
    return OpCase(case_id, description, seed, "mla", params, make_inputs, tolerance_class="op_mla")


MLA = [
    _mla_case("op/mla/literal-yarn", "MLA-02: DeepSeek-V3 MLA, literal form (per-head keys and values), YaRN factor "
              "40 with mscale = mscale_all_dim = 1: softmax scale (Dn + Dr)^-1/2 m(40, 1)^2, cos/sin magnitude 1; "
              "interleaved rope pairs, batch 2, T=7", 1111, _mla(), _mla_inputs(_mla(), 2, 7)),
    _mla_case("op/mla/absorbed-yarn", "the same inputs in the absorbed form (W_UK folded into the query, one "
              "latent key/value head of width Dc + Dr, W_UV after attention): equal to the literal form", 1111,
              _mla(form="absorbed"), _mla_inputs(_mla(), 2, 7)),
    _mla_case("op/mla/literal-mscale-differs", "MLA-03 / RSC-12: YaRN factor 16, mscale 0.707, mscale_all_dim 1: "
              "the softmax scale uses m(16, mscale_all_dim)^2, cos/sin carry m(16, 0.707) / m(16, 1); T=9", 1112,
              _mla(rope_parameters=YARN_MSCALE_DIFFERS), _mla_inputs(_mla(), 1, 9)),
    _mla_case("op/mla/absorbed-mscale-differs", "MLA-03 in the absorbed form (same inputs)", 1112,
              _mla(form="absorbed", rope_parameters=YARN_MSCALE_DIFFERS), _mla_inputs(_mla(), 1, 9)),
    _mla_case("op/mla/literal-no-q-lora", "q_lora_rank null (q_proj, as DeepSeek-V2-Lite), attention_bias on "
              "kv_a_proj_with_mqa and o_proj only, rotate-half rope pairs (rope_interleave false), default RoPE",
              1113, _mla(**NO_Q_LORA), _mla_inputs(_mla(**NO_Q_LORA), 2, 5)),
    _mla_case("op/mla/absorbed-no-q-lora", "the no-q-LoRA case in the absorbed form", 1113,
              _mla(form="absorbed", **NO_Q_LORA), _mla_inputs(_mla(**NO_Q_LORA), 2, 5)),
    _mla_case("op/mla/absorbed-kimi-offsets", "Kimi K2 YaRN (theta 5e4, factor 32, beta 1/1), absorbed form, rows "
              "at positions 0.. and 600.. (a long cache before them)", 1114, _mla(form="absorbed",
              rope_parameters=KIMI_YARN), _mla_inputs(_mla(), 2, 6, positions=[np.arange(6), 600 + np.arange(6)])),
    _mla_case("op/mla/literal-widths-distinct", "Dn 16, Dr 8, Dv 12, Dc 20: softmax scale (Dn + Dr)^-1/2 = "
              "24^-1/2 (times m(40, 1)^2), not (2 Dr)^-1/2 (transformers' head_dim is Dr); batch 2, T=6", 1116,
              _mla(**WIDTHS_DISTINCT), _mla_inputs(_mla(**WIDTHS_DISTINCT), 2, 6)),
    _mla_case("op/mla/absorbed-widths-distinct", "the distinct-widths case in the absorbed form (keys Dc + Dr = 28 "
              "wide, scale still (Dn + Dr)^-1/2)", 1116, _mla(form="absorbed", **WIDTHS_DISTINCT),
              _mla_inputs(_mla(**WIDTHS_DISTINCT), 2, 6)),
    _mla_case("op/mla/literal-yarn-no-mscale-keys", "MLA-02 / RSC-12: YaRN factor 40 whose rope_parameters lack "
              "mscale and mscale_all_dim: softmax scale (Dn + Dr)^-1/2 with no correction, cos/sin magnitude "
              "m(40, 1) = 1.369 (a default mscale_all_dim of 1 would move m^2 into the softmax); T=8", 1117,
              _mla(rope_parameters=YARN_NO_MSCALE), _mla_inputs(_mla(), 1, 8)),
    _mla_case("op/mla/absorbed-yarn-no-mscale-keys", "the YaRN-without-mscale case in the absorbed form", 1117,
              _mla(form="absorbed", rope_parameters=YARN_NO_MSCALE), _mla_inputs(_mla(), 1, 8)),
    _mla_case("op/mla/literal-one-token", "T=1 (each row attends to itself only) at positions 5 and 300", 1115,
              _mla(), _mla_inputs(_mla(), 2, 1, positions=[[5], [300]])),
]

# -- MoE blocks: one per architecture ----------------------------------------------------------------

#: A complete tiny config.json per MoE architecture (the spec sheet's tiny configs).
MOE_CONFIGS = {
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8,
        "num_experts_per_tok": 3, "n_shared_experts": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rope_interleave": True, "rope_parameters": YARN_V3,
        "max_position_embeddings": 640, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "num_nextn_predict_layers": 0, "dtype": "float32"},
    "glm4_moe": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "max_position_embeddings": 4096,
        "attention_bias": True, "use_qk_norm": True, "n_routed_experts": 8, "num_experts_per_tok": 3,
        "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "dtype": "float32"},
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 48,
        "intermediate_size": 80, "moe_intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_experts": 6, "num_experts_per_tok": 2,
        "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "max_position_embeddings": 4096,
        "attention_bias": False, "use_sliding_window": False, "dtype": "float32"},
    "minimax_m2": {
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": 128, "hidden_size": 32,
        "intermediate_size": 20, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 24, "rotary_dim": 12, "num_local_experts": 7, "num_experts_per_tok": 3, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 5000000.0,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"},
    "llama4": {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 32, "intermediate_size_mlp": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "num_local_experts": 4,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "no_rope_layer_interval": 4,
        "attention_chunk_size": 5, "use_qk_norm": True, "attn_temperature_tuning": True, "floor_scale": 3,
        "attn_scale": 0.1, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "attention_bias": False, "dtype": "float32"},
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
        "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": True, "swiglu_limit": 7.0,
        "dtype": "float32"},
    "grok2": {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 48, "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "residual_moe": True, "rms_norm_eps": 1e-5, "embedding_multiplier_scale": 8.0,
        "output_multiplier_scale": 0.5, "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
        "final_logit_softcapping": 50.0, "attn_temperature_len": 4, "rope_theta": 208533496,
        "max_position_embeddings": 131072, "dtype": "float32"},
}


def _moe_weight_shapes(kind: str, c: dict) -> dict[str, tuple[int, ...]]:
    """The MoE block's tensors, named relative to the transformers module (Grok: the layer), with shapes."""
    m = c["hidden_size"]
    if kind in ("deepseek_v3", "glm4_moe"):
        e, i, s = c["n_routed_experts"], c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
        return {"gate.weight": (e, m), "gate.e_score_correction_bias": (e,), "experts.gate_up_proj": (e, 2 * i, m),
                "experts.down_proj": (e, m, i), "shared_experts.gate_proj.weight": (s, m),
                "shared_experts.up_proj.weight": (s, m), "shared_experts.down_proj.weight": (m, s)}
    if kind in ("qwen3_moe", "minimax_m2"):
        e = c["num_experts"] if kind == "qwen3_moe" else c["num_local_experts"]
        i = c["moe_intermediate_size"] if kind == "qwen3_moe" else c["intermediate_size"]
        shapes = {"gate.weight": (e, m), "experts.gate_up_proj": (e, 2 * i, m), "experts.down_proj": (e, m, i)}
        return shapes if kind == "qwen3_moe" else {**shapes, "e_score_correction_bias": (e,)}
    e, i = c["num_local_experts"], c["intermediate_size"]
    if kind == "llama4":
        return {"router.weight": (e, m), "experts.gate_up_proj": (e, m, 2 * i), "experts.down_proj": (e, i, m),
                "shared_expert.gate_proj.weight": (i, m), "shared_expert.up_proj.weight": (i, m),
                "shared_expert.down_proj.weight": (m, i)}
    if kind == "gpt_oss":
        return {"router.weight": (e, m), "router.bias": (e,), "experts.gate_up_proj": (e, m, 2 * i),
                "experts.gate_up_proj_bias": (e, 2 * i), "experts.down_proj": (e, i, m),
                "experts.down_proj_bias": (e, m)}
    moe = c["moe_intermediate_size"]
    shapes = {"block_sparse_moe.gate.weight": (e, m), "mlp.gate_proj.weight": (i, m), "mlp.up_proj.weight": (i, m),
              "mlp.down_proj.weight": (m, i)}
    for x in range(e):
        shapes.update({f"block_sparse_moe.experts.{x}.w1.weight": (moe, m),
                       f"block_sparse_moe.experts.{x}.w3.weight": (moe, m),
                       f"block_sparse_moe.experts.{x}.w2.weight": (m, moe)})
    return shapes


#: Input-major stacks (Llama 4, gpt-oss) contract over axis 1, the others over the last axis.
_INPUT_MAJOR = ("experts.gate_up_proj", "experts.down_proj")


def _draw_moe_weight(rng, kind: str, name: str, shape) -> np.ndarray:
    """Correction biases 0.2 N (they must move the selection), other biases 0.2 N, matrices N(0, 1/fan_in)."""
    if name.endswith("bias"):
        return _normal(rng, *shape, scale=0.2)
    fan_in = shape[1] if kind in ("llama4", "gpt_oss") and name in _INPUT_MAJOR else shape[-1]
    return _normal(rng, *shape, scale=fan_in ** -0.5)


def _selection_margin(kind: str, c: dict, w: dict):
    """``margin(row)``: how far a token's router scores are from changing its chosen experts."""
    k = c["num_experts_per_tok"]
    if kind in ("deepseek_v3", "glm4_moe"):
        return lambda row: _group_margin(w["gate.weight"] @ row, w["gate.e_score_correction_bias"], k,
                                         c["n_group"], c["topk_group"]) / 0.05
    if kind == "minimax_m2":
        return lambda row: _group_margin(w["gate.weight"] @ row, w["e_score_correction_bias"], k, 1, 1) / 0.05
    if kind == "gpt_oss":
        return lambda row: _boundary_gap(w["router.weight"] @ row + w["router.bias"], k) / 0.2
    if kind == "grok2":
        cap = c["router_logit_softcapping"]
        return lambda row: _boundary_gap(cap * np.tanh(w["block_sparse_moe.gate.weight"] @ row / cap), k) / 0.2
    name = {"qwen3_moe": "gate.weight", "llama4": "router.weight"}[kind]
    return lambda row: _boundary_gap(w[name] @ row, k) / 0.2


def _moe_block_inputs(kind: str, batch: int, length: int, weight_scales: dict | None = None):
    """The block's weights, then hidden_states ~ N(0, 1) whose tokens all sit clearly inside their
    routing decision: margins >= 0.2 in logit space (softmax and top-k routers) or 0.05 in the
    sigmoid + bias space (the sigmoid routers), so float16 / bfloat16 runs choose the same experts."""
    config = MOE_CONFIGS[kind]

    def make(rng):
        weights = {}
        for name, shape in sorted(_moe_weight_shapes(kind, config).items()):
            weights[name] = _draw_moe_weight(rng, kind, name, shape) * (weight_scales or {}).get(name, 1.0)
        margin = _selection_margin(kind, config, weights)
        rows = _gapped_rows(rng, batch * length, lambda r: r.standard_normal(config["hidden_size"]),
                            lambda row: margin(row) >= 1.0)
        return {"hidden_states": rows.reshape(batch, length, -1), **weights}

    return make


def _block_case(kind, description, seed, batch, length, weight_scales=None) -> OpCase:
    return OpCase(f"op/moe_block/{kind}", description, seed, "moe_block", {"config": MOE_CONFIGS[kind]},
                  _moe_block_inputs(kind, batch, length, weight_scales), tolerance_class="op_moe")


MOE_BLOCKS = [
    _block_case("deepseek_v3", "DeepSeek-V3 MoE block (DeepseekV3MoE): sigmoid router with correction bias, 8 "
                "experts in 4 groups, 2 kept, top-3, renormalised x 2.5, plus 2 shared experts as one MLP", 1121, 2, 5),
    _block_case("glm4_moe", "GLM-4.5 MoE block (Glm4MoeMoE): the DeepSeek router with 2 groups, 1 kept, top-3, "
                "x 2.5, one shared expert", 1122, 2, 5),
    _block_case("qwen3_moe", "Qwen3-MoE block: softmax router over 6 experts, top-2, norm_topk_prob false "
                "(weights are probabilities, MOE-04), no shared expert", 1123, 2, 5),
    _block_case("minimax_m2", "MiniMax-M2 block: sigmoid router, correction bias for selection only, top-3 of 7, "
                "renormalised", 1124, 2, 5),
    _block_case("llama4", "Llama 4 MoE block (Llama4TextMoe): top-1 of 4 with weight sigmoid(logit) on the expert "
                "INPUT (ACT-07), input-major experts, plus the shared expert", 1125, 2, 5),
    _block_case("gpt_oss", "gpt-oss MLP block (GptOssMLP): biased router, softmax over the top-2 logits, clamped "
                "SwiGLU experts with interleaved gate/up (expert weights x 4 so the clamp at 7 engages)", 1126, 2, 5,
                weight_scales={"experts.gate_up_proj": 4.0}),
    _block_case("grok2", "Grok 2.5 feed-forward (sglang): router logits soft-capped at 30 (router weights x 20), "
                "softmax, top-2 not renormalised, erf-GELU experts, plus the dense MLP, (mlp + moe) / sqrt 2; no "
                "transformers model", 1127, 2, 5, weight_scales={"block_sparse_moe.gate.weight": 20.0}),
]

CASES = ROUTERS + EXPERTS + DISPATCH + MLA + MOE_BLOCKS
