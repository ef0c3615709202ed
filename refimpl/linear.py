"""Linear projection ``y = x W^T (+ b)`` with Hugging Face weight layout.

Hugging Face (``torch.nn.Linear``) stores W as ``(out_features, in_features)``;
the reference keeps that layout so checkpoint tensors are used without transposes.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .numerics import as_float_array, check_same_dtype, to_compute, to_storage


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Apply ``x @ weight.T + bias`` over the last axis of ``x``.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.

    Returns:
        ``(..., out_features)`` in the dtype of ``x``.

    Dtype: float64 / float32: NumPy's matmul in that dtype. float16 / bfloat16: the
    product and the bias add in float32 (a GEMM's float32 accumulator and epilogue),
    rounded once to the storage dtype.

    Raises:
        InputError: an array is not float64, float32, bfloat16 or float16.
        ShapeError: ``weight`` is not 2-D, the last axis of ``x`` is not ``in_features``,
            or ``bias`` is not ``(out_features,)``.
        RefimplError: the arrays differ in dtype.

    Checked against: ``torch.nn.Linear`` (transformers models' projections).
    """
    x = as_float_array("linear: x", x)
    weight = as_float_array("linear: weight", weight, ndim=2)
    if x.ndim == 0 or x.shape[-1] != weight.shape[-1]:
        raise ShapeError(
            f"linear: input {x.shape} has {x.shape[-1] if x.ndim else 'no'} features but weight {weight.shape} "
            f"expects {weight.shape[-1]}")
    if bias is not None:
        bias = as_float_array("linear: bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ShapeError(f"linear: bias shape {bias.shape} is not ({weight.shape[0]},) of weight {weight.shape}")
    storage = check_same_dtype(x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    y = to_compute(x) @ to_compute(weight).T
    if bias is not None:
        y = y + to_compute(bias)
    return to_storage(y, storage)
