import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.attention import grouped_query_attention, masked_softmax
from refimpl.errors import ShapeError
from refimpl.masks import causal_mask, sliding_window_mask


def naive_attention(q, k, v, mask, scale):
    """Loop form: every query head against its key/value head h // G."""
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // g] * scale for j in range(k.shape[1])])
                visible = mask[i]
                w = np.exp(s[visible] - s[visible].max())
                out[bi, i, hi] = (w / w.sum()) @ v[bi, visible, hi // g]
    return out


@pytest.mark.parametrize("h,hkv,t", [(4, 2, 7), (4, 4, 1), (6, 1, 5), (3, 3, 11)])
def test_matches_loop_form(h, hkv, t):
    rng = np.random.default_rng(h * 100 + t)
    q = rng.standard_normal((2, t, h, 8))
    k = rng.standard_normal((2, t, hkv, 8))
    v = rng.standard_normal((2, t, hkv, 5))
    mask = causal_mask(t, t)
    np.testing.assert_allclose(
        grouped_query_attention(q, k, v, mask, 8**-0.5), naive_attention(q, k, v, mask, 8**-0.5), rtol=1e-12, atol=1e-13
    )


def test_uniform_attention_probe_sees_causal_prefix():
    # q = k = 0 -> uniform weights over visible keys; v[j] = one-hot(j) shows which keys were seen.
    t = 6
    q = np.zeros((1, t, 1, 4))
    k = np.zeros((1, t, 1, 4))
    v = np.eye(t).reshape(1, t, 1, t)
    out = grouped_query_attention(q, k, v, causal_mask(t, t), 1.0)[0, :, 0]
    expected = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-15)


def test_causal_mask_with_past_length():
    m = causal_mask(2, 5, past_length=3)
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_gqa_equals_mha_with_repeated_kv():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 9, 6, 4))
    k = rng.standard_normal((1, 9, 2, 4))
    v = rng.standard_normal((1, 9, 2, 4))
    mask = causal_mask(9, 9)
    repeated = grouped_query_attention(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), mask, 0.5)
    np.testing.assert_allclose(grouped_query_attention(q, k, v, mask, 0.5), repeated, rtol=1e-13)


@given(st.integers(2, 12), st.integers(0, 11))
def test_changing_future_keys_leaves_earlier_outputs_unchanged(t, cut):
    cut = cut % t
    rng = np.random.default_rng(t)
    q, k, v = rng.standard_normal((3, 1, t, 2, 4))
    k2, v2 = k.copy(), v.copy()
    k2[:, cut + 1:] += 5.0
    v2[:, cut + 1:] -= 3.0
    mask = causal_mask(t, t)
    a = grouped_query_attention(q, k, v, mask, 0.5)[:, : cut + 1]
    b = grouped_query_attention(q, k2, v2, mask, 0.5)[:, : cut + 1]
    np.testing.assert_array_equal(a, b)


def test_fully_masked_row_gives_zeros():
    p = masked_softmax(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[True, False], [False, False]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0], [0.0, 0.0]])


def test_rejects_bad_shapes():
    q = np.zeros((1, 3, 4, 8))
    with pytest.raises(ShapeError, match="multiple"):
        grouped_query_attention(q, np.zeros((1, 3, 3, 8)), np.zeros((1, 3, 3, 8)), causal_mask(3, 3), 1.0)
    with pytest.raises(ShapeError, match="mask"):
        grouped_query_attention(q, np.zeros((1, 3, 2, 8)), np.zeros((1, 3, 2, 8)), causal_mask(3, 4), 1.0)


def test_sliding_window_sees_exactly_w_keys():
    # SWA-01 probe: T = 8, W = 4, uniform attention; query 7 must average v[4..7], not v[3..7].
    t, w = 8, 4
    v = np.eye(t).reshape(1, t, 1, t)
    out = grouped_query_attention(np.zeros((1, t, 1, 2)), np.zeros((1, t, 1, 2)), v,
                                  sliding_window_mask(t, t, w), 1.0)[0, :, 0]
    np.testing.assert_allclose(out[7], [0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25], rtol=1e-15)
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0, 0, 0, 0, 0, 0], rtol=1e-15)


@given(st.integers(1, 12), st.integers(1, 14), st.integers(0, 5))
def test_sliding_window_mask_definition(t, w, past):
    m = sliding_window_mask(t, past + t, w, past_length=past)
    for i in range(t):
        for j in range(past + t):
            assert m[i, j] == (past + i - w < j <= past + i)
    # window >= number of keys: the same as plain causal
    np.testing.assert_array_equal(sliding_window_mask(t, past + t, past + t, past), causal_mask(t, past + t, past))


def test_sliding_window_rejects_zero():
    with pytest.raises(ValueError, match=">= 1"):
        sliding_window_mask(3, 3, 0)
