"""The gated delta rule (refimpl.linear_attention.delta_rule) and the causal short conv
(refimpl.linear_attention.short_conv): the chunked form equals the recurrent definition, pieces
carrying the state equal one pass, closed-form probes, and the errors bad input raises.

transformers' own delta-rule functions are compared in tests/test_gated_deltanet_hf.py.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.errors import InputError, RefimplError, ShapeError
from refimpl.linear_attention.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from refimpl.linear_attention.short_conv import causal_conv1d


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def inputs(seed, b=1, t=37, hk=2, hv=4, dk=8, dv=12, state=False, dtype=np.float64):
    """q, k unit vectors (as the layer feeds them), g in [-0.2, -0.005], beta in (0.05, 0.95)."""
    rng = np.random.default_rng(seed)
    arrays = {"q": unit(rng, b, t, hk, dk), "k": unit(rng, b, t, hk, dk), "v": rng.standard_normal((b, t, hv, dv)),
              "g": -rng.uniform(0.005, 0.2, (b, t, hv)), "beta": rng.uniform(0.05, 0.95, (b, t, hv))}
    if state:
        arrays["initial_state"] = 0.5 * rng.standard_normal((b, hv, dk, dv))
    return {k: v.astype(dtype) for k, v in arrays.items()}


# -- chunked == recurrent


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("length", [1, 5, 37, 64, 65, 150])
def test_chunked_equals_recurrent(length, state, r):
    x = inputs(length * 10 + r, b=2, t=length, hk=2, hv=2 * r, dk=6, dv=5, state=state)
    o_ref, s_ref = gated_delta_rule_recurrent(**x)
    for chunk in (1, 3, 4, 16, 64):
        o, s = gated_delta_rule_chunked(**x, chunk_size=chunk)
        assert rel(o, o_ref) <= 1e-13, (chunk, rel(o, o_ref))
        assert rel(s, s_ref) <= 1e-13, (chunk, rel(s, s_ref))


@given(b=st.integers(1, 2), t=st.integers(1, 40), hk=st.integers(1, 3), r=st.integers(1, 3), dk=st.integers(1, 9),
       dv=st.integers(1, 9), chunk=st.integers(1, 20), state=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_equals_recurrent_over_shapes(b, t, hk, r, dk, dv, chunk, state, seed):
    x = inputs(seed, b=b, t=t, hk=hk, hv=hk * r, dk=dk, dv=dv, state=state)
    o_ref, s_ref = gated_delta_rule_recurrent(**x)
    o, s = gated_delta_rule_chunked(**x, chunk_size=chunk)
    assert o.shape == (b, t, hk * r, dv) and s.shape == (b, hk * r, dk, dv)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-13 * max(1.0, np.abs(o_ref).max()))
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-13 * max(1.0, np.abs(s_ref).max()))


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_two_pieces_carrying_the_state_equal_one_pass(form):
    x = inputs(7, b=2, t=20, state=True)
    run = gated_delta_rule_recurrent if form == "recurrent" else (
        lambda **kw: gated_delta_rule_chunked(**kw, chunk_size=4))
    o_whole, s_whole = run(**x)
    for split in range(1, 20):
        first = {k: (v[:, :split] if k != "initial_state" else v) for k, v in x.items()}
        second = {k: v[:, split:] for k, v in x.items() if k != "initial_state"}
        o1, s1 = run(**first)
        o2, s2 = run(**second, initial_state=s1)
        assert rel(np.concatenate([o1, o2], axis=1), o_whole) <= 1e-13, split
        assert rel(s2, s_whole) <= 1e-13, split


def test_gdn04_chunked_over_five_equals_four_then_one_step():
    x = inputs(8, t=5)
    o_whole, s_whole = gated_delta_rule_chunked(**x, chunk_size=4)
    o4, s4 = gated_delta_rule_chunked(**{k: v[:, :4] for k, v in x.items()}, chunk_size=4)
    o1, s1 = gated_delta_rule_recurrent(**{k: v[:, 4:] for k, v in x.items()}, initial_state=s4)
    assert rel(o1[:, 0], o_whole[:, 4]) <= 1e-14 and rel(s1, s_whole) <= 1e-14


# -- closed-form probes (values derived by hand, not by the code under test)


def test_full_write_then_read_returns_the_value_after_decay_first():
    # beta = 1, q = k (unit), scale 1: the state S' = a S + k (v - a S^T k)^T answers S'^T k = v exactly,
    # whatever S and the decay a. Decaying after the write would give a v.
    rng = np.random.default_rng(3)
    k = unit(rng, 1, 1, 1, 6)
    v = rng.standard_normal((1, 1, 1, 4))
    s0 = rng.standard_normal((1, 1, 6, 4))
    o, _ = gated_delta_rule_recurrent(k, k, v, np.full((1, 1, 1), -0.7), np.ones((1, 1, 1)), initial_state=s0,
                                      scale=1.0)
    np.testing.assert_allclose(o[0, 0, 0], v[0, 0, 0], rtol=1e-14, atol=1e-14)


def test_zero_beta_only_decays_the_state():
    x = inputs(4, t=6, hk=1, hv=1, state=True)
    x["beta"] = np.zeros_like(x["beta"])
    o, s = gated_delta_rule_chunked(**x, chunk_size=4)
    total = np.cumsum(x["g"][0, :, 0])
    np.testing.assert_allclose(s[0, 0], np.exp(total[-1]) * x["initial_state"][0, 0], rtol=1e-14)
    expected = np.exp(total)[:, None] * (x["q"][0, :, 0] * 8 ** -0.5 @ x["initial_state"][0, 0])
    np.testing.assert_allclose(o[0, :, 0], expected, rtol=1e-13)


def test_value_heads_read_key_head_h_over_r_repeat_interleaved():
    # Hk = 2, Hv = 4: value heads 0, 1 read key head 0 and 2, 3 read key head 1. Running each value
    # head alone with its key head must reproduce the grouped call; tiling (h % Hk) gives another result.
    x = inputs(5, t=9, hk=2, hv=4, state=True)
    o, s = gated_delta_rule_recurrent(**x)
    for h in range(4):
        one = {"q": x["q"][:, :, h // 2:h // 2 + 1], "k": x["k"][:, :, h // 2:h // 2 + 1],
               "v": x["v"][:, :, h:h + 1], "g": x["g"][:, :, h:h + 1], "beta": x["beta"][:, :, h:h + 1],
               "initial_state": x["initial_state"][:, h:h + 1]}
        o_h, s_h = gated_delta_rule_recurrent(**one)
        np.testing.assert_allclose(o_h[:, :, 0], o[:, :, h], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(s_h[:, 0], s[:, h], rtol=1e-14, atol=1e-15)
    tiled = {**x, "q": np.tile(x["q"], (1, 1, 2, 1)), "k": np.tile(x["k"], (1, 1, 2, 1))}
    assert rel(gated_delta_rule_recurrent(**tiled)[0], o) > 0.1


def test_gdn03_state_is_sized_by_heads_not_by_length():
    x = inputs(6, b=1, t=3, hk=2, hv=2, dk=4, dv=4)
    for run in (gated_delta_rule_recurrent, gated_delta_rule_chunked):
        assert run(**x)[1].shape == (1, 2, 4, 4)
    wrong = np.zeros((1, 3, 4, 4))
    with pytest.raises(ShapeError, match=r"initial_state \(1, 3, 4, 4\) must be \(B, Hv, d_k, d_v\) = \(1, 2, 4, 4\)"):
        gated_delta_rule_chunked(**x, initial_state=wrong)


def test_float32_inputs_compute_in_float32():
    x = inputs(9, t=40, state=True, dtype=np.float32)
    o, s = gated_delta_rule_chunked(**x, chunk_size=16)
    assert o.dtype == np.float32 and s.dtype == np.float32
    o64, _ = gated_delta_rule_recurrent(**{k: v.astype(np.float64) for k, v in x.items()})
    assert 1e-9 < rel(o, o64) < 1e-5


def strong_inputs(seed, weak_fraction, t=150, hv=2, dtype=np.float64):
    """As :func:`inputs` (Hk = 1, an initial state) with log-decays in [-30, -1] (trained layers: g = -A softplus(.)
    with transformers' A ~ U(0.01, 16) reaches -20 and below), except a ``weak_fraction`` left in [-0.2, -0.005]."""
    x = inputs(seed, t=t, hk=1, hv=hv, state=True)
    rng = np.random.default_rng(seed + 1)
    strong = -rng.uniform(1.0, 30.0, x["g"].shape)
    x["g"] = np.where(rng.uniform(size=strong.shape) < weak_fraction, x["g"], strong)
    return {k: v.astype(dtype) for k, v in x.items()}


def deepest_chunk_decay(g, chunk):
    """The most negative cumulative log-decay gamma inside any chunk (any batch row, head)."""
    return min(np.cumsum(g[:, i:i + chunk], axis=1).min() for i in range(0, g.shape[1], chunk))


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_strong_decays_chunked_float32_is_finite_and_close_to_the_definition(seed):
    # delta_rule.md, Numerics: the pairwise decay exp(gamma_r - gamma_s), masked before the exp, stays finite
    # where a chunk's cumulative log-decay is far outside float32's exp range (a ratio exp(gamma_r) exp(-gamma_s)
    # would be inf * 0 there); the float32 chunked form then stays within op_attention's float32 bound (2e-6).
    x = strong_inputs(seed, weak_fraction=0.0)
    # exp(-gamma) leaves the float32 range (and, with C = 64, the float64 range) inside a chunk
    assert -deepest_chunk_decay(x["g"], 16) > np.log(np.finfo(np.float32).max)
    assert -deepest_chunk_decay(x["g"], 64) > np.log(np.finfo(np.float64).max)
    o_ref, s_ref = gated_delta_rule_recurrent(**x)
    x32 = {k: v.astype(np.float32) for k, v in x.items()}
    for chunk in (16, 64):
        o, s = gated_delta_rule_chunked(**x32, chunk_size=chunk)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
        assert rel(o, o_ref) < 2e-6 and rel(s, s_ref) < 2e-6, (chunk, rel(o, o_ref), rel(s, s_ref))
    assert rel(gated_delta_rule_recurrent(**x32)[0], o_ref) < 5e-7


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_float32_chunked_error_grows_with_the_cumulative_decay(seed):
    # delta_rule.md, Numerics: gamma_r - gamma_s is the difference of two float32 numbers of size |gamma|, so a
    # weak step after strong ones (a pairwise decay of order 1 at |gamma| ~ 800) carries an error of order
    # |gamma| 2^-24. Chunks of 64 then miss the 2e-6 bound that chunks of 16 (|gamma| ~ 250) and the
    # recurrence (no cumulative sums) keep.
    x = strong_inputs(seed, weak_fraction=0.25)
    o_ref, _ = gated_delta_rule_recurrent(**x)
    x32 = {k: v.astype(np.float32) for k, v in x.items()}
    depth = -deepest_chunk_decay(x["g"], 64)
    err64 = rel(gated_delta_rule_chunked(**x32, chunk_size=64)[0], o_ref)
    assert 2e-6 < err64 < depth * 2.0 ** -24, (err64, depth)
    assert rel(gated_delta_rule_chunked(**x32, chunk_size=16)[0], o_ref) < 2e-6
    assert rel(gated_delta_rule_recurrent(**x32)[0], o_ref) < 5e-7


def test_positive_log_decay_is_accepted_and_grows_the_state():
    # g > 0 is not refused (transformers and fla accept it too): exp(g) > 1 grows the state without bound,
    # and both forms agree while the numbers stay finite. The layer never produces it (g = -A softplus(.) <= 0).
    x = inputs(34, t=20, hk=1, hv=1, state=True)
    x["g"] = -x["g"]
    o_ref, s_ref = gated_delta_rule_recurrent(**x)
    o, s = gated_delta_rule_chunked(**x, chunk_size=8)
    assert rel(o, o_ref) < 1e-13 and rel(s, s_ref) < 1e-13
    x["beta"] = np.zeros_like(x["beta"])
    _, grown = gated_delta_rule_recurrent(**x)
    np.testing.assert_allclose(grown, np.exp(x["g"].sum()) * x["initial_state"], rtol=1e-13)
    assert np.abs(grown).max() > np.abs(x["initial_state"]).max()


def test_scale_defaults_to_inverse_sqrt_dk():
    x = inputs(10, t=7, dk=9)
    np.testing.assert_array_equal(gated_delta_rule_recurrent(**x)[0],
                                  gated_delta_rule_recurrent(**x, scale=1 / 3)[0])


# -- errors


@pytest.mark.parametrize("change, error, message", [
    (lambda x: {**x, "v": x["v"][:, :, :3]}, ShapeError, "multiple of key heads"),
    (lambda x: {**x, "q": x["q"][..., :4]}, ShapeError, "must have one shape"),
    (lambda x: {**x, "g": x["g"][:, :, :2]}, ShapeError, "g .* must be"),
    (lambda x: {**x, "beta": x["beta"][:, :5]}, ShapeError, "beta .* must be"),
    (lambda x: {**x, "v": x["v"][:, :5]}, ShapeError, "v .* must be"),
    (lambda x: {**x, "k": x["k"][0]}, ShapeError, "k must have 4 axes"),
    (lambda x: {k: v[:, :0] for k, v in x.items()}, ShapeError, "empty axis"),
    (lambda x: {**x, "g": np.where(np.arange(4) == 1, np.nan, x["g"])}, InputError, "g holds NaN"),
    (lambda x: {**x, "v": x["v"] * np.inf}, InputError, "v holds NaN or infinite"),
    (lambda x: {**x, "q": x["q"].astype(np.int64)}, InputError, "q must be a float64, float32, bfloat16 or float16"),
    (lambda x: {**x, "beta": x["beta"].astype(np.float32)}, RefimplError, "share one compute dtype"),
    (lambda x: {**x, "scale": 0.0}, InputError, "scale must be a positive"),
    (lambda x: {**x, "scale": float("nan")}, InputError, "scale must be a positive"),
])
def test_bad_input_is_refused(change, error, message):
    x = change(inputs(11, t=6))
    for run in (gated_delta_rule_recurrent, gated_delta_rule_chunked):
        with pytest.raises(error, match=message):
            run(**x)


@pytest.mark.parametrize("chunk", [0, -1, 2.0, True, "4", None])
def test_bad_chunk_size_is_refused(chunk):
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1"):
        gated_delta_rule_chunked(**inputs(12, t=4), chunk_size=chunk)


# -- causal short conv


def conv_inputs(seed, b=2, t=7, c=3, k=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, t, c)), rng.standard_normal((c, k))


def test_conv_output_t_sees_inputs_t_minus_k_plus_1_to_t():
    # one channel, taps [1, 10, 100, 1000] (oldest first), inputs 1, 2, 3, ...: out[t] = sum_j w[j] x[t-3+j]
    x = np.arange(1.0, 7.0).reshape(1, 6, 1)
    w = np.array([[1.0, 10.0, 100.0, 1000.0]])
    out, state = causal_conv1d(x, w, activation=None)
    assert out[0, :, 0].tolist() == [1000.0, 2100.0, 3210.0, 4321.0, 5432.0, 6543.0]
    assert state.tolist() == [[[4.0, 5.0, 6.0]]]


def test_conv_silu_is_applied_after_the_sum():
    x, w = conv_inputs(1)
    plain, _ = causal_conv1d(x, w, activation=None)
    np.testing.assert_allclose(causal_conv1d(x, w)[0], plain / (1 + np.exp(-plain)), rtol=1e-15)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_gdn06_prefill_then_decode_equals_one_pass(split, k):
    x, w = conv_inputs(2, t=6, c=3, k=k)
    whole, state_whole = causal_conv1d(x, w)
    first, state = causal_conv1d(x[:, :split], w)
    rest = []
    for t in range(split, 6):
        out, state = causal_conv1d(x[:, t:t + 1], w, conv_state=state)
        rest.append(out)
    np.testing.assert_allclose(np.concatenate([first, *rest], axis=1), whole, rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(state, state_whole)


def test_gdn06_state_is_channel_major_oldest_first():
    # conv width 4, 3 channels: the state after 3 tokens holds x[t, c] at [c, t]
    x, w = conv_inputs(3, b=1, t=3, c=3, k=4)
    _, state = causal_conv1d(x, w)
    np.testing.assert_array_equal(state[0], x[0].T)
    # a time-major reading of the same buffer is another history: the decode step differs
    x4, _ = conv_inputs(4, b=1, t=1, c=3, k=4)
    right, _ = causal_conv1d(x4, w, conv_state=state)
    wrong, _ = causal_conv1d(x4, w, conv_state=state.reshape(1, 3, 3).transpose(0, 2, 1).copy())
    assert not np.allclose(right, wrong)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"weight": np.ones((4, 4))}, ShapeError, "must be \\(C, K\\)"),
    ({"conv_state": np.zeros((2, 3, 4))}, ShapeError, "conv_state .* must be \\(B, C, K-1\\)"),
    ({"conv_state": np.zeros((2, 3, 3), dtype=np.float32)}, RefimplError, "share one compute dtype"),
    ({"activation": "gelu"}, InputError, "activation must be one of"),
    ({"x": np.zeros((2, 0, 3))}, ShapeError, "must not be empty"),
])
def test_conv_bad_input_is_refused(kwargs, error, message):
    x, w = conv_inputs(5)
    args = {"x": x, "weight": w, **kwargs}
    with pytest.raises(error, match=message):
        causal_conv1d(args.pop("x"), args.pop("weight"), **args)
