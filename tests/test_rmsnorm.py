import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from refimpl.errors import RefimplError, ShapeError
from refimpl.rmsnorm import rms_norm


def test_rms_norm_hand_example():
    # x = [3, 4]: mean square 12.5; eps 0.5 -> root sqrt(13) = 3.6055512754639896
    x = np.array([3.0, 4.0])
    w = np.array([2.0, -1.0])
    out = rms_norm(x, w, eps=0.5)
    r = np.sqrt(13.0)
    np.testing.assert_array_equal(out, np.array([2.0 * 3.0 / r, -4.0 / r]))


def test_rms_norm_eps_inside_root():
    # all-zero input: eps inside the root gives 0, never NaN
    out = rms_norm(np.zeros((2, 4)), np.ones(4), eps=1e-6)
    assert np.all(out == 0)


@given(
    arrays(np.float64, (3, 16), elements=st.floats(-10, 10)).filter(lambda a: np.all(np.mean(a * a, -1) > 1e-2)),
    st.floats(0.01, 100),
)
def test_rms_norm_invariant_to_positive_scaling(x, c):
    w = np.linspace(0.5, 1.5, 16)
    # eps = 0 makes the invariance exact up to rounding
    np.testing.assert_allclose(rms_norm(c * x, w, 0.0), rms_norm(x, w, 0.0), rtol=1e-12, atol=1e-12)


def test_rms_norm_float32_stays_float32():
    x = np.ones((2, 8), np.float32)
    assert rms_norm(x, np.ones(8, np.float32), 1e-6).dtype == np.float32


def test_rms_norm_rejects_wrong_weight_shape_and_mixed_dtypes():
    with pytest.raises(ShapeError, match="weight shape"):
        rms_norm(np.ones((2, 8)), np.ones(7), 1e-6)
    with pytest.raises(RefimplError, match="one compute dtype"):
        rms_norm(np.ones((2, 8)), np.ones(8, np.float32), 1e-6)
