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


def _torch_norm(cls, x_low, w_low, torch_dtype):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        norm = cls(w_low.shape[0], eps=1e-6)
        norm.weight.data = torch.from_numpy(w_low.astype(np.float32)).to(torch_dtype)
        return norm(torch.from_numpy(x_low.astype(np.float32)).to(torch_dtype)).float().numpy()


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("module,cls,offset,order", [
    ("llama", "LlamaRMSNorm", 0.0, "cast_then_multiply"),
    ("olmo2", "Olmo2RMSNorm", 0.0, "multiply_then_cast"),
    ("gemma3", "Gemma3RMSNorm", 1.0, "multiply_then_cast"),
])
def test_low_precision_cast_orders_match_transformers_norms(dtype_name, module, cls, offset, order):
    torch = pytest.importorskip("torch")
    transformers_module = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    import ml_dtypes

    from refimpl.rmsnorm import rms_norm_low_precision

    low = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float16
    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal((32, 256))).astype(low)
    w = (1.3 - offset + 0.3 * rng.standard_normal(256)).astype(low)
    expected = _torch_norm(getattr(transformers_module, cls), x, w, getattr(torch, dtype_name))
    ours = rms_norm_low_precision(x, w, 1e-6, weight_offset=offset, cast_order=order)
    other = "multiply_then_cast" if order == "cast_then_multiply" else "cast_then_multiply"
    wrong = rms_norm_low_precision(x, w, 1e-6, weight_offset=offset, cast_order=other)
    assert ours.dtype == low
    # rsqrt (torch) against 1/sqrt (NumPy) in float32 may flip a rounding now and then
    assert np.mean(ours.astype(np.float32) != expected) <= 1e-3
    assert np.mean(wrong.astype(np.float32) != expected) > 0.2
