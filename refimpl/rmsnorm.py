"""Root-mean-square layer normalisation (RMSNorm).

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)

Notation:
    x    input, (..., M)         normalised over its last axis
    w    weight, (M,)             plain multiplier (Llama/Qwen convention)
    eps  epsilon, scalar          added inside the square root

Paper: Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv:1910.07467, eq. 4.
Checked against: transformers ``models/qwen3/modeling_qwen3.py`` ``Qwen3RMSNorm``
(which normalises in float32 and then casts back before multiplying by w; at float32
that is the same computation as below, at float64 see docs on float32 islands).
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .numerics import check_same_dtype


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with a plain weight: ``w * x / sqrt(mean(x**2, -1) + eps)``.

    Args:
        x: ``(..., M)`` activations.
        weight: ``(M,)`` per-channel multiplier.
        eps: added to the mean square inside the root (``rms_norm_eps``).

    Returns:
        ``(..., M)``, same dtype as ``x``.

    Dtype: computed entirely in the dtype of ``x`` (float64 or float32); the mean
    of squares accumulates in that dtype.

    Raises:
        ShapeError: ``weight`` does not have shape ``(M,)``.
        RefimplError: ``x`` and ``weight`` differ in dtype.
    """
    if weight.shape != (x.shape[-1],):
        raise ShapeError(f"rms_norm: weight shape {weight.shape} does not match last axis {x.shape[-1]}")
    dtype = check_same_dtype(x=x, weight=weight)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    normalised = x / np.sqrt(mean_square + dtype.type(eps))
    return weight * normalised
