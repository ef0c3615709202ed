"""refimpl.experts: the three fused expert layouts, the gpt-oss clamp (ACT-02/04/05 probes), transformers' experts.

Hand probes use one or two channels so each value can be followed with ``math``.
The transformers comparisons build ``DeepseekV3Experts``, ``Llama4TextExperts`` and
``GptOssExperts`` of transformers 5.24 with random float64 weights (eager experts)
and compare them with :func:`refimpl.moe.dispatch` over the matching expert function.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.experts import clamped_swiglu, clamped_swiglu_expert, input_major_swiglu_expert, swiglu_expert
from refimpl.mlp import gated_mlp
from refimpl.moe import dispatch
from refimpl.routers import softmax_top_k, top_k_softmax


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def silu(z: float) -> float:
    return z * sigmoid(z)


# ACT-04: standard SwiGLU with concatenated [gate; up]

def test_act04_swiglu_expert_gate_rows_first_then_up_rows():
    # I = 2: rows [g0, g1, u0, u1] of gate_up_proj; x = [1] so h = [1, 2, 3, 4].
    x = np.array([[1.0]])
    gate_up = np.array([[1.0], [2.0], [3.0], [4.0]])
    down = np.array([[1.0, 1.0]])
    # concatenated: silu(1) * 3 + silu(2) * 4 (interleaved would be silu(1) * 2 + silu(3) * 4)
    expected = silu(1.0) * 3.0 + silu(2.0) * 4.0
    np.testing.assert_allclose(swiglu_expert(x, gate_up, down), [[expected]], rtol=1e-15)


def test_swiglu_expert_equals_gated_mlp_with_split_weights():
    rng = np.random.default_rng(0)
    x, gate_up, down = rng.standard_normal((7, 5)), rng.standard_normal((6, 5)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(swiglu_expert(x, gate_up, down), gated_mlp(x, gate_up[:3], gate_up[3:], down),
                               rtol=1e-14)


def test_swiglu_expert_other_activation():
    x, gate_up, down = np.array([[1.0]]), np.array([[2.0], [3.0]]), np.array([[1.0]])
    gelu_2 = 0.5 * 2.0 * (1 + math.erf(2.0 / math.sqrt(2)))
    np.testing.assert_allclose(swiglu_expert(x, gate_up, down, hidden_act="gelu"), [[gelu_2 * 3.0]], rtol=1e-14)


def test_input_major_is_the_transposed_layout():
    rng = np.random.default_rng(1)
    x, gate_up, down = rng.standard_normal((5, 4)), rng.standard_normal((6, 4)), rng.standard_normal((4, 3))
    np.testing.assert_allclose(input_major_swiglu_expert(x, gate_up.T.copy(), down.T.copy()),
                               swiglu_expert(x, gate_up, down), rtol=1e-14)


def test_input_major_hand_probe():
    # M = 1, I = 1: columns [gate | up] = [2, 5]; down [[3]]: silu(2) * 5 * 3.
    out = input_major_swiglu_expert(np.array([[1.0]]), np.array([[2.0, 5.0]]), np.array([[3.0]]))
    np.testing.assert_allclose(out, [[silu(2.0) * 15.0]], rtol=1e-15)


# ACT-02 / ACT-05: the gpt-oss clamp form (gate clamped above only, up both sides, + 1, alpha 1.702)

def gpt_oss(gate: float, up: float, limit: float, alpha: float = 1.702) -> float:
    g = min(gate, limit)
    u = min(max(up, -limit), limit)
    return (u + 1) * g * sigmoid(alpha * g)


@pytest.mark.parametrize("gate, up, limit, expected, other_forms", [
    # ACT-02 probe: gpt-oss form 11 * 10 * sigmoid(17.02) = 109.999996; the DeepSeek-V4 form gives 99.995,
    # the Ling/GLM form 100, no clamp silu(15) * 12 = 180.
    (15.0, 12.0, 10.0, 110.0 * sigmoid(17.02), (99.995, 100.0, 180.0)),
    # ACT-05 probe: gpt-oss form 5 * 4 * sigmoid(6.808) = 19.978; Ling's 4 * 4 = 16, no clamp 29.9.
    (6.0, 5.0, 4.0, 20.0 * sigmoid(6.808), (16.0, 29.9)),
    # The gate is not clamped from below: g = -20 stays, u = -7: (-6)(-20) sigmoid(-34.04) = 1.97e-13
    # (a symmetric clamp would give (-6)(-7) sigmoid(-11.914) = 2.8e-4).
    (-20.0, -20.0, 7.0, 120.0 * sigmoid(-34.04), (2.8e-4,)),
    # Inside the limits: (u + 1) * g * sigmoid(alpha g), not silu(g) * u.
    (1.0, 2.0, 7.0, 3.0 * sigmoid(1.702), (silu(1.0) * 2.0,)),
])
def test_clamped_swiglu_probes(gate, up, limit, expected, other_forms):
    assert math.isclose(gpt_oss(gate, up, limit), expected, rel_tol=1e-12)
    out = clamped_swiglu(np.array([gate]), np.array([up]), swiglu_limit=limit)
    np.testing.assert_allclose(out, [expected], rtol=1e-13)
    for wrong in other_forms:
        assert not math.isclose(out[0], wrong, rel_tol=1e-3)


def test_clamped_swiglu_expert_interleaved_columns_and_biases():
    # M = 1, I = 2: columns [g0, u0, g1, u1] = x * [1, 2, 3, 4] + [0.5, 0, -0.5, 1]; x = 2.
    x = np.array([[2.0]])
    gate_up = np.array([[1.0, 2.0, 3.0, 4.0]])
    gate_up_bias = np.array([0.5, 0.0, -0.5, 1.0])
    down = np.array([[1.0], [-2.0]])
    down_bias = np.array([0.25])
    # g0 = 2.5, u0 = 4; g1 = 5.5, u1 = 9 -> clamped to 7 (limit 7).
    a0, a1 = gpt_oss(2.5, 4.0, 7.0), gpt_oss(5.5, 9.0, 7.0)
    out = clamped_swiglu_expert(x, gate_up, gate_up_bias, down, down_bias, swiglu_limit=7.0)
    np.testing.assert_allclose(out, [[a0 - 2 * a1 + 0.25]], rtol=1e-14)


def test_clamped_swiglu_alpha_is_used():
    out = clamped_swiglu(np.array([1.0]), np.array([0.0]), swiglu_limit=7.0, alpha=1.0)
    np.testing.assert_allclose(out, [sigmoid(1.0)], rtol=1e-15)


def test_experts_keep_float32():
    rng = np.random.default_rng(2)
    f = np.float32
    x = rng.standard_normal((3, 4)).astype(f)
    assert swiglu_expert(x, rng.standard_normal((6, 4)).astype(f), rng.standard_normal((4, 3)).astype(f)).dtype == f
    assert input_major_swiglu_expert(x, rng.standard_normal((4, 6)).astype(f),
                                     rng.standard_normal((3, 4)).astype(f)).dtype == f
    assert clamped_swiglu_expert(x, rng.standard_normal((4, 6)).astype(f), np.zeros(6, f),
                                 rng.standard_normal((3, 4)).astype(f), np.zeros(4, f), swiglu_limit=7.0).dtype == f


# Errors

X = np.ones((2, 4))
ERRORS = [
    (lambda: swiglu_expert(X, np.ones((5, 4)), np.ones((4, 2))), ShapeError, r"gate_up_proj \(5, 4\)"),
    (lambda: swiglu_expert(X, np.ones((6, 3)), np.ones((4, 3))), ShapeError, "need x"),
    (lambda: swiglu_expert(X, np.ones((6, 4)), np.ones((3, 4))), ShapeError, r"down_proj \(3, 4\)"),
    (lambda: swiglu_expert(np.ones(4), np.ones((6, 4)), np.ones((4, 3))), ShapeError, "x"),
    (lambda: swiglu_expert(X, np.ones((6, 4), np.float32), np.ones((4, 3))), RefimplError, "one compute dtype"),
    (lambda: swiglu_expert(X.astype(int), np.ones((6, 4)), np.ones((4, 3))), InputError, "x must be"),
    (lambda: swiglu_expert(X, np.ones((6, 4)), np.ones((4, 3)), hidden_act="relu"), ConfigError, "relu"),
    (lambda: input_major_swiglu_expert(X, np.ones((6, 4)), np.ones((3, 4))), ShapeError, r"need x \(n, M\), "
                                                                                          r"gate_up_proj \(M, 2I\)"),
    (lambda: input_major_swiglu_expert(X, np.ones((4, 5)), np.ones((2, 4))), ShapeError, "gate_up_proj"),
    (lambda: clamped_swiglu_expert(X, np.ones((4, 6)), np.ones(5), np.ones((3, 4)), np.ones(4), swiglu_limit=7.0),
     ShapeError, r"gate_up_proj_bias \(5,\)"),
    (lambda: clamped_swiglu_expert(X, np.ones((4, 6)), np.ones(6), np.ones((3, 4)), np.ones(3), swiglu_limit=7.0),
     ShapeError, r"down_proj_bias \(3,\)"),
    (lambda: clamped_swiglu_expert(X, np.ones((4, 6)), np.ones(6), np.ones((3, 4)), np.ones(4), swiglu_limit=0.0),
     ConfigError, "swiglu_limit"),
    (lambda: clamped_swiglu_expert(X, np.ones((4, 6)), np.ones(6), np.ones((3, 4)), np.ones(4), swiglu_limit=7.0,
                                   alpha=float("nan")), ConfigError, "alpha"),
]


@pytest.mark.parametrize("call, error, match", ERRORS, ids=[f"{i}" for i in range(len(ERRORS))])
def test_bad_input_raises_one_line_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, RefimplError) and "\n" not in str(info.value)


# Agreement with transformers' expert modules (float64, eager)

SEEDS = (0, 1, 2)
M, I, E, N = 12, 5, 4, 11


def _routing(rng, top_k):
    return softmax_top_k(rng.standard_normal((N, E)), top_k, norm_topk_prob=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_swiglu_expert_dispatch_agrees_with_deepseek_v3_experts(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, M))
    gate_up = rng.standard_normal((E, 2 * I, M)) / math.sqrt(M)
    down = rng.standard_normal((E, M, I)) / math.sqrt(I)
    weights, indices = _routing(rng, top_k)
    config = transformers.DeepseekV3Config(hidden_size=M, n_routed_experts=E, moe_intermediate_size=I,
                                           experts_implementation="eager")
    with torch.no_grad():
        experts = DeepseekV3Experts(config).double()
        experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        experts.down_proj.copy_(torch.from_numpy(down))
        hf = experts(torch.from_numpy(x), torch.from_numpy(indices), torch.from_numpy(weights)).numpy()
    ours = dispatch(x, weights, indices, lambda e, rows: swiglu_expert(rows, gate_up[e], down[e]), E)
    np.testing.assert_allclose(ours, hf, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_input_major_swiglu_expert_agrees_with_llama4_text_experts(seed):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    rng = np.random.default_rng(seed)
    # Llama4TextExperts takes E blocks of rows, block e for expert e.
    x = rng.standard_normal((E, N, M))
    gate_up = rng.standard_normal((E, M, 2 * I)) / math.sqrt(M)
    down = rng.standard_normal((E, I, M)) / math.sqrt(I)
    config = transformers.Llama4TextConfig(hidden_size=M, num_local_experts=E, intermediate_size=I)
    with torch.no_grad():
        experts = Llama4TextExperts(config).double()
        experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        experts.down_proj.copy_(torch.from_numpy(down))
        hf = experts(torch.from_numpy(x.reshape(E * N, M))).numpy().reshape(E, N, M)
    for e in range(E):
        np.testing.assert_allclose(input_major_swiglu_expert(x[e], gate_up[e], down[e]), hf[e], rtol=1e-13,
                                   atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_clamped_swiglu_expert_dispatch_agrees_with_gpt_oss_experts(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, M))
    # Weights of scale 3 / sqrt(M): pre-activations of about 3, so the limit 2.5 clamps a good share.
    gate_up = 3 * rng.standard_normal((E, M, 2 * I)) / math.sqrt(M)
    gate_up_bias = rng.standard_normal((E, 2 * I))
    down = rng.standard_normal((E, I, M)) / math.sqrt(I)
    down_bias = rng.standard_normal((E, M))
    weights, indices = top_k_softmax(rng.standard_normal((N, E)), top_k)
    limit, alpha = 2.5, 1.5
    pre = np.einsum("nm,emj->enj", x, gate_up) + gate_up_bias[:, None]
    assert np.mean(pre[..., 0::2] > limit) > 0.1 and np.mean(np.abs(pre[..., 1::2]) > limit) > 0.1
    config = transformers.GptOssConfig(hidden_size=M, num_local_experts=E, intermediate_size=I,
                                       swiglu_limit=limit, swiglu_alpha=alpha, experts_implementation="eager")
    with torch.no_grad():
        experts = GptOssExperts(config).double()
        for name, value in (("gate_up_proj", gate_up), ("gate_up_proj_bias", gate_up_bias), ("down_proj", down),
                            ("down_proj_bias", down_bias)):
            getattr(experts, name).copy_(torch.from_numpy(value))
        hf = experts(torch.from_numpy(x), torch.from_numpy(indices), torch.from_numpy(weights)).numpy()

    def expert(e, rows):
        return clamped_swiglu_expert(rows, gate_up[e], gate_up_bias[e], down[e], down_bias[e], swiglu_limit=limit,
                                     alpha=alpha)

    np.testing.assert_allclose(dispatch(x, weights, indices, expert, E), hf, rtol=1e-13, atol=1e-14)
