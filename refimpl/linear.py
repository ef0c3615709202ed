"""Linear projection ``y = x W^T (+ b)`` with Hugging Face weight layout.

Hugging Face (``torch.nn.Linear``) stores W as ``(out_features, in_features)``;
the reference keeps that layout so checkpoint tensors are used without transposes.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Apply ``x @ weight.T + bias`` over the last axis of ``x``.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.

    Returns:
        ``(..., out_features)`` in the dtype of ``x`` (no accumulation beyond
        NumPy's matmul in that dtype).

    Raises:
        ShapeError: the last axis of ``x`` is not ``in_features``.

    Checked against: ``torch.nn.Linear`` (transformers models' projections).
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ShapeError(
            f"linear: input has {x.shape[-1]} features but weight {weight.shape} expects {weight.shape[-1]}"
        )
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y
