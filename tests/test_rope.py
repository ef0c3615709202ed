import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.errors import ShapeError
from refimpl.rope import apply_rope_rotate_half, default_inv_freq, rope_cos_sin


def rope(x, positions, theta=10000.0):
    inv = default_inv_freq(x.shape[-1], theta)
    cos, sin = rope_cos_sin(positions, inv, x.dtype)
    return apply_rope_rotate_half(x, cos, sin)


def test_inv_freq_values():
    # D = 4, theta = 100: exponents 0 and 0.5 -> 1 and 1/10
    np.testing.assert_allclose(default_inv_freq(4, 100.0), [1.0, 0.1], rtol=0, atol=1e-16)


def test_rotate_half_pairs_j_with_j_plus_half():
    # D = 4, pair 0 = channels (0, 2), pair 1 = channels (1, 3); theta 100 -> freqs 1, 0.1
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    p = 2
    out = rope(x, np.array([p]), theta=100.0).ravel()
    a0, a1 = p * 1.0, p * 0.1
    expected = [
        1 * np.cos(a0) - 3 * np.sin(a0),
        2 * np.cos(a1) - 4 * np.sin(a1),
        3 * np.cos(a0) + 1 * np.sin(a0),
        4 * np.cos(a1) + 2 * np.sin(a1),
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=1e-15)


def test_position_zero_is_identity():
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 8))
    np.testing.assert_array_equal(rope(x, np.array([0])), x)


@given(st.integers(1, 5000), st.sampled_from([2, 8, 32, 64]))
def test_rope_preserves_norms(p, d):
    x = np.random.default_rng(p).standard_normal((1, 1, 2, d))
    out = rope(x, np.array([p]))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)


@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 500))
def test_qk_depends_only_on_position_difference(m, n, shift):
    rng = np.random.default_rng(m * 7 + n)
    q, k = rng.standard_normal((2, 1, 1, 1, 16))
    dot = lambda a, b: float(np.sum(rope(q, np.array([a])) * rope(k, np.array([b]))))
    assert dot(m, n) == pytest.approx(dot(m + shift, n + shift), rel=1e-9, abs=1e-9)


def test_rejects_tables_that_do_not_fit():
    x = np.zeros((1, 3, 2, 8))
    cos, sin = rope_cos_sin(np.arange(3), default_inv_freq(6, 1e4), np.float64)
    with pytest.raises(ShapeError, match="do not fit"):
        apply_rope_rotate_half(x, cos, sin)
    with pytest.raises(ShapeError, match="even"):
        default_inv_freq(7, 1e4)
