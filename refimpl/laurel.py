"""LAuReL, the learned augmented residual of Gemma 3n (low-rank form).

A low-rank linear map of the normalised layer input, normalised again and added to
that input; Gemma 3n then averages it with the attention residual stream::

    laurel(x) = x + RMSNorm( (x W_L^T) W_R^T ; post_laurel_norm )        x: (..., M)
    layer:      al = (a_pred + RMSNorm(attn(x)) + laurel(x)) / sqrt(2)    x = RMSNorm(a_pred)

The averaging with the other residual terms belongs to the decoder layer
(``refimpl/models/gemma3n.py``); this module computes ``laurel(x)``.

Notation:
    paper symbol             code name                                shape
    x                        ``x`` (the layer's normalised input)     (..., M)
    A (down, rank r)         ``laurel.linear_left.weight``  W_L       (R, M)   R = ``laurel_rank``
    B (up)                   ``laurel.linear_right.weight`` W_R       (M, R)
    norm gain                ``laurel.post_laurel_norm.weight``       (M,)     plain w (not 1 + w)

Paper: G. Menghani, R. Kumar, S. Kumar, "LAuReL: Learned Augmented Residual Layer",
arXiv:2411.07501, the LAuReL-LR variant (the residual x replaced by x + B A x with a
rank-r pair A, B). Gemma 3n adds the RMSNorm after B A x.
Checked against: transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``
(``Gemma3nTextLaurelBlock``, lines 920-935; its use in ``Gemma3nTextDecoderLayer.forward``,
lines 1282-1300) and Google's ``gemma/gm/nn/gemma3n/_modules.py`` (``Laurel`` and
``Block.__call__``: ``inputs_normalized + post_laurel_norm(laurel(inputs_normalized))``).
"""

from __future__ import annotations

import numpy as np

from .linear import linear
from .rmsnorm import rms_norm


def laurel_residual(
    x: np.ndarray, linear_left: np.ndarray, linear_right: np.ndarray, post_laurel_norm: np.ndarray, eps: float
) -> np.ndarray:
    """``x + RMSNorm((x W_L^T) W_R^T; post_laurel_norm)`` with a plain-weight RMSNorm.

    Args:
        x: ``(..., M)`` the decoder layer's normalised input.
        linear_left: ``(R, M)`` W_L.
        linear_right: ``(M, R)`` W_R.
        post_laurel_norm: ``(M,)`` RMSNorm weight, used as ``w`` (not ``1 + w``).
        eps: ``rms_norm_eps``.

    Returns:
        ``(..., M)`` in the dtype of ``x``.

    Dtype: computed in the dtype of ``x``; every array must share it.

    Raises:
        InputError: an array is not a float array; eps negative or not finite.
        ShapeError: the weights do not fit ``x`` or each other.
        RefimplError: the arrays differ in dtype.
    """
    low_rank = linear(linear(x, linear_left), linear_right)
    return x + rms_norm(low_rank, post_laurel_norm, eps)
