"""Gated feed-forward block, SwiGLU.

    MLP(x) = W_down ( silu(W_gate x) * (W_up x) ),   silu(z) = z * sigmoid(z)

Notation: M hidden_size, F intermediate_size.

Paper: Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202, eq. 6 (FFN_SwiGLU).
Checked against: transformers ``models/qwen3/modeling_qwen3.py`` ``Qwen3MLP``
(``hidden_act = "silu"``).
"""

from __future__ import annotations

import numpy as np

from .linear import linear


def silu(z: np.ndarray) -> np.ndarray:
    """``z * sigmoid(z)`` elementwise, in the dtype of ``z``.

    Written as ``z / (1 + exp(-z))``; for very negative z, exp overflows to inf and
    the result is -0.0, the correct limit.
    """
    with np.errstate(over="ignore"):
        return z / (1 + np.exp(-z))


def swiglu_mlp(
    x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray
) -> np.ndarray:
    """SwiGLU feed-forward.

    Args:
        x: ``(..., M)``.
        gate_proj: ``(F, M)`` (``mlp.gate_proj.weight``).
        up_proj: ``(F, M)`` (``mlp.up_proj.weight``).
        down_proj: ``(M, F)`` (``mlp.down_proj.weight``).

    Returns:
        ``(..., M)`` in the dtype of ``x``.

    Raises:
        ShapeError: the weights do not fit ``x`` (from :func:`linear`).
    """
    return linear(silu(linear(x, gate_proj)) * linear(x, up_proj), down_proj)
