"""Qwen3-Next's gated attention (refimpl.gated_attention): against a literal per-head loop written here,
against transformers' Qwen3NextAttention, and its errors."""

import numpy as np
import pytest

from refimpl import gated_attention as ga
from refimpl.errors import (
    ConfigError, InputError, MissingWeightsError, RefimplError, ShapeError, UnexpectedWeightsError,
)
from refimpl.ops import OPS

M = 24


def draw_weights(rng, heads, kv_heads, head_dim, bias, hidden=M):
    shapes = ga.gated_attention_weight_shapes(hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                              head_dim=head_dim, attention_bias=bias)
    return {name: 0.2 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1])
            for name, s in sorted(shapes.items())}


def literal(x, positions, w, heads, kv_heads, head_dim, theta, factor, eps):
    """Token by token, head by head, from the description of transformers' Qwen3NextAttention."""
    b_, t_, _ = x.shape
    d, dr = head_dim, int(head_dim * factor)
    inv_freq = 1.0 / theta ** (np.arange(0, dr, 2) / dr)

    def lin(v, name):
        return w[f"{name}.weight"] @ v + w.get(f"{name}.bias", 0)

    def norm(v, gain):
        return v / np.sqrt(np.mean(v * v) + eps) * (1 + gain)

    def rope(v, p):
        out = v.copy()
        for i in range(dr // 2):
            c, s = np.cos(p * inv_freq[i]), np.sin(p * inv_freq[i])
            out[i], out[i + dr // 2] = v[i] * c - v[i + dr // 2] * s, v[i + dr // 2] * c + v[i] * s
        return out

    out = np.zeros((b_, t_, w["o_proj.weight"].shape[0]))
    for b in range(b_):
        qg = [lin(x[b, t], "q_proj") for t in range(t_)]
        keys = [lin(x[b, t], "k_proj") for t in range(t_)]
        values = [lin(x[b, t], "v_proj") for t in range(t_)]
        for t in range(t_):
            gated = []
            for h in range(heads):
                j = h // (heads // kv_heads)
                q = rope(norm(qg[t][2 * h * d:2 * h * d + d], w["q_norm.weight"]), positions[b, t])
                gate = qg[t][2 * h * d + d:2 * (h + 1) * d]
                k = [rope(norm(keys[s][j * d:(j + 1) * d], w["k_norm.weight"]), positions[b, s]) for s in range(t + 1)]
                scores = np.array([q @ k[s] for s in range(t + 1)]) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                o = sum(p[s] * values[s][j * d:(j + 1) * d] for s in range(t + 1))
                gated.append(o / (1 + np.exp(-gate)))
            out[b, t] = lin(np.concatenate(gated), "o_proj")
    return out


def run(x, positions, w, heads, kv_heads, head_dim, theta=1e4, factor=0.25, eps=1e-6, bias=False, **extra):
    return ga.gated_attention(x, positions, w, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": theta},
                              partial_rotary_factor=factor, rms_norm_eps=eps, attention_bias=bias, **extra)


SHAPES = [  # heads, kv_heads, head_dim, T, partial_rotary_factor, bias
    (4, 2, 16, 7, 0.25, False),
    (4, 1, 16, 1, 0.5, True),     # MQA, T = 1
    (2, 2, 8, 13, 1.0, False),    # MHA, full rotary, prime length
    (1, 1, 12, 5, 1 / 3, True),   # one head: Dr = 4 of 12
    (6, 3, 10, 11, 0.2, False),   # Dr = 2
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,t,factor,bias", SHAPES)
def test_matches_the_literal_loop(heads, kv_heads, head_dim, t, factor, bias):
    rng = np.random.default_rng(heads * 100 + t)
    w = draw_weights(rng, heads, kv_heads, head_dim, bias)
    x = rng.standard_normal((2, t, M))
    positions = np.stack([np.arange(t), 40 + np.arange(t)])
    ours = run(x, positions, w, heads, kv_heads, head_dim, factor=factor, bias=bias)
    expected = literal(x, positions, w, heads, kv_heads, head_dim, 1e4, factor, 1e-6)
    assert np.abs(ours - expected).max() < 1e-12 * np.abs(expected).max()


def test_query_and_gate_are_split_per_head():
    # q_proj rows [q_0 | g_0 | q_1 | g_1 | ...], D = 3, H = 2.
    q, gate = ga.split_query_and_gate(np.arange(12.0)[None, None], 3)
    assert q.tolist() == [[[[0, 1, 2], [6, 7, 8]]]]
    assert gate.tolist() == [[[3, 4, 5, 9, 10, 11]]]


def halves(query_and_gate, head_dim):
    q, gate = np.split(query_and_gate, 2, axis=-1)
    return q.reshape(*q.shape[:-1], -1, head_dim), gate


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (1, 1)])
def test_a_split_into_halves_differs_unless_there_is_one_head(heads, kv_heads, monkeypatch):
    rng = np.random.default_rng(7)
    w = draw_weights(rng, heads, kv_heads, 8, False)
    x, positions = rng.standard_normal((1, 6, M)), np.arange(6)
    per_head = run(x, positions, w, heads, kv_heads, 8)
    monkeypatch.setattr(ga, "split_query_and_gate", halves)
    half_split = run(x, positions, w, heads, kv_heads, 8)
    difference = np.linalg.norm(half_split - per_head) / np.linalg.norm(per_head)
    if heads == 1:
        assert difference == 0
    else:
        assert difference > 0.1


def test_the_gate_scales_the_attention_output_before_o_proj():
    # Gate rows of q_proj zeroed, the gate set by q_proj's bias: sigmoid(-50) ~ 0 silences every head but
    # leaves o_proj's bias (the gate acts before o_proj); sigmoid(0) = 1/2 halves the open-gate output.
    rng = np.random.default_rng(3)
    w = draw_weights(rng, 2, 1, 8, True)
    x, positions = rng.standard_normal((1, 5, M)), np.arange(5)
    rows = w["q_proj.weight"].reshape(2, 2, 8, M).copy()
    rows[:, 1] = 0
    w["q_proj.weight"] = rows.reshape(-1, M)

    def with_gate_bias(value):
        bias = w["q_proj.bias"].reshape(2, 2, 8).copy()
        bias[:, 1] = value
        return {**w, "q_proj.bias": bias.reshape(-1)}

    closed = run(x, positions, with_gate_bias(-50.0), 2, 1, 8, bias=True)
    assert np.abs(closed - w["o_proj.bias"]).max() < 1e-18
    half = run(x, positions, with_gate_bias(0.0), 2, 1, 8, bias=True) - w["o_proj.bias"]
    opened = run(x, positions, with_gate_bias(800.0), 2, 1, 8, bias=True) - w["o_proj.bias"]
    assert np.abs(opened).max() > 0.1
    assert np.abs(half - opened / 2).max() < 1e-15


def test_relative_positions_only():
    # RoPE (partial or not) makes q.k depend on position differences: shifting every position
    # by the same amount leaves the output unchanged; shifting one row's positions alone does not.
    rng = np.random.default_rng(11)
    w = draw_weights(rng, 4, 2, 16, False)
    x = rng.standard_normal((1, 9, M))
    base = run(x, np.arange(9), w, 4, 2, 16)
    assert np.abs(run(x, 1000 + np.arange(9), w, 4, 2, 16) - base).max() < 1e-10
    assert np.abs(run(x, np.arange(9) * 2, w, 4, 2, 16) - base).max() > 1e-3


def test_channels_beyond_the_rotary_width_do_not_rotate():
    # With every rotated channel of q and k zeroed (q_norm / k_norm gains 0 there), positions cannot matter.
    rng = np.random.default_rng(5)
    w = draw_weights(rng, 2, 2, 16, False)
    w["q_norm.weight"][:4] = w["k_norm.weight"][:4] = -1.0
    x = rng.standard_normal((1, 6, M))
    assert np.abs(run(x, np.arange(6) * 37, w, 2, 2, 16) - run(x, np.arange(6), w, 2, 2, 16)).max() < 1e-13
    # With full rotary (Dr = 16) the same weights still see the positions.
    full = np.abs(run(x, np.arange(6) * 37, w, 2, 2, 16, factor=1.0) - run(x, np.arange(6), w, 2, 2, 16, factor=1.0))
    assert full.max() > 1e-3


def test_float32_stays_float32_and_positions_broadcast():
    rng = np.random.default_rng(2)
    w = draw_weights(rng, 4, 2, 16, True)
    x = rng.standard_normal((2, 5, M))
    out64 = run(x, np.arange(5), w, 4, 2, 16, bias=True)
    same = run(x, np.broadcast_to(np.arange(5), (2, 5)), w, 4, 2, 16, bias=True)
    assert np.array_equal(out64, same)
    out32 = run(x.astype(np.float32), np.arange(5), {k: v.astype(np.float32) for k, v in w.items()}, 4, 2, 16,
                bias=True)
    assert out32.dtype == np.float32
    assert np.linalg.norm(out32 - out64) / np.linalg.norm(out64) < 1e-5


def test_the_op_is_the_module_function():
    rng = np.random.default_rng(9)
    w = draw_weights(rng, 4, 2, 16, False)
    x, positions = rng.standard_normal((1, 4, M)), np.arange(4)[None]
    params = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e7}, partial_rotary_factor=0.25,
                  rms_norm_eps=1e-6, max_position_embeddings=None, attention_bias=False)
    assert OPS["gated_attention"].integer_inputs == ("positions",)
    assert np.array_equal(OPS["gated_attention"].function(x, positions, **params, **w),
                          ga.gated_attention(x, positions, w, **params))


def test_a_factor_inside_rope_parameters_wins():
    rng = np.random.default_rng(4)
    w = draw_weights(rng, 2, 1, 16, False)
    x, positions = rng.standard_normal((1, 6, M)), np.arange(6)
    params = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    in_dict = ga.gated_attention(x, positions, w, **params, partial_rotary_factor=0.25,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5})
    assert np.array_equal(in_dict, run(x, positions, w, 2, 1, 16, factor=0.5))
    assert not np.allclose(in_dict, run(x, positions, w, 2, 1, 16, factor=0.25))


# -- against transformers


@pytest.mark.parametrize("heads,kv_heads,head_dim,t,factor,bias", SHAPES[:3])
def test_matches_transformers_qwen3_next_attention(heads, kv_heads, head_dim, t, factor, bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import contextlib

    from conformance.backends.hf_exact import exact_float64
    from conformance.backends.transformers_ops import TransformersOps

    rng = np.random.default_rng(heads + 10 * t)
    w = draw_weights(rng, heads, kv_heads, head_dim, bias)
    x = rng.standard_normal((2, t, M))
    positions = np.stack([np.arange(t), 300 + np.arange(t)]).astype(np.int64)
    rope = {"rope_type": "yarn", "rope_theta": 1e7, "factor": 4.0, "original_max_position_embeddings": 64}
    params = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rope_parameters=rope,
                  partial_rotary_factor=factor, rms_norm_eps=1e-6, max_position_embeddings=256, attention_bias=bias)
    ours = ga.gated_attention(x, positions, w, **params)
    lifted = TransformersOps(torch, transformers, lambda d: exact_float64)
    theirs = lifted.gated_attention(x, positions, **params, **w).numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(ours) < 1e-13
    shipped = TransformersOps(torch, transformers, lambda d: contextlib.nullcontext)
    theirs32 = shipped.gated_attention(x.astype(np.float32), positions, **params,
                                       **{k: v.astype(np.float32) for k, v in w.items()}).numpy()
    assert np.linalg.norm(theirs32 - ours) / np.linalg.norm(ours) < 1e-6


# -- errors


def test_errors_name_the_problem():
    rng = np.random.default_rng(1)
    w = draw_weights(rng, 4, 2, 16, False)
    x, positions = rng.standard_normal((1, 3, M)), np.arange(3)
    with pytest.raises(MissingWeightsError, match="q_norm.weight"):
        run(x, positions, {k: v for k, v in w.items() if k != "q_norm.weight"}, 4, 2, 16)
    with pytest.raises(UnexpectedWeightsError, match="o_proj.bias"):
        run(x, positions, {**w, "o_proj.bias": np.zeros(M)}, 4, 2, 16)
    with pytest.raises(ShapeError, match="q_proj.weight"):
        run(x, positions, {**w, "q_proj.weight": w["q_proj.weight"][:64]}, 4, 2, 16)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        run(x, positions, w, 4, 3, 16)
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        run(x, positions, w, 4, 2, 16, factor=0.1875)  # Dr = 3, odd
    with pytest.raises(ConfigError, match="head_dim"):
        run(x, positions, w, 4, 2, 0)
    with pytest.raises(ConfigError, match="attention_bias"):
        run(x, positions, w, 4, 2, 16, bias="no")
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        run(x, positions, w, 4, 2, 16, eps=float("nan"))
    with pytest.raises(InputError, match="positions"):
        run(x, positions.astype(float), w, 4, 2, 16)
    with pytest.raises(InputError, match="hidden_states"):
        run(x.astype(int), positions, w, 4, 2, 16)
    with pytest.raises(ShapeError, match="positions"):
        run(x, np.arange(4), w, 4, 2, 16)
    with pytest.raises(ShapeError, match="empty"):
        run(x[:, :0], np.arange(0), w, 4, 2, 16)
    with pytest.raises(RefimplError, match="one compute dtype"):
        run(x.astype(np.float32), positions, w, 4, 2, 16)
