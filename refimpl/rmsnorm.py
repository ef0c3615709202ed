"""Root-mean-square layer normalisation (RMSNorm) and its weight and cast variants.

    RMSNorm(x) = g(w) * x / sqrt(mean(x^2) + eps),   g(w) = w      (Llama, Qwen, OLMo 2, Mistral, SmolLM3)
                                                      g(w) = 1 + w  (Gemma 3: w is stored as an offset, init 0)

Notation:
    x    input, (..., M)         normalised over its last axis
    w    weight, (M,)             ``weight_offset`` 0 (plain) or 1 (Gemma's 1 + w)
    eps  epsilon, scalar          added inside the square root (``rms_norm_eps``)

In a low-precision storage dtype (bfloat16, float16) every implementation
normalises in float32. The reference's own rule (:mod:`refimpl.numerics`) makes each
function here one component: widen to float32, normalise and scale in float32, round
the output once (the ``"multiply_then_cast"`` order below). Engines use two cast
orders, which give different bits (:func:`rms_norm_low_precision`, the op suite's
named variants):

* ``"cast_then_multiply"`` (Llama family, Qwen3, Mistral, SmolLM3):
  ``w * cast(n(x))``, the product taken in the storage dtype;
* ``"multiply_then_cast"`` (OLMo 2, Gemma 3): ``cast(g(w) * n(x))``, the product in float32.

Placement (pre-norm, post-norm inside the residual, sandwich) belongs to the model
modules; QK-norm is this function applied per head (``x`` ``(B, T, H, D)``, ``w``
``(D,)``) or over the whole projection (``x`` ``(B, T, H*D)``, ``w`` ``(H*D,)``).

Paper: Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv:1910.07467, eq. 4.
Checked against: transformers 5.24 ``Qwen3RMSNorm`` / ``LlamaRMSNorm`` (cast then
multiply), ``Olmo2RMSNorm`` (multiply then cast) and ``Gemma3RMSNorm`` (1 + w,
multiply then cast).

:func:`gated_rms_norm` is Gated DeltaNet's output norm, ``(w * n(x)) * silu(z)``
(plain w), checked against ``Qwen3NextRMSNormGated``.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError
from .mlp import silu
from .numerics import (
    FLOAT_DTYPES, as_float_array, check_finite_nonnegative, check_same_dtype, compute_dtype, to_compute, to_storage,
)

#: Named cast orders of :func:`rms_norm_low_precision`.
CAST_ORDERS = ("cast_then_multiply", "multiply_then_cast")
#: Allowed values of ``weight_offset``: plain w, or Gemma's 1 + w.
WEIGHT_OFFSETS = (0.0, 1.0)
#: Storage dtypes of :func:`rms_norm_low_precision`.
LOW_PRECISION_STORAGE = ("bfloat16", "float16", "float32")


def _check(x, weight, weight_offset: float, dtypes) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """``(x, weight, dtype)`` after checking dtypes, shapes and ``weight_offset``."""
    x = as_float_array("rms_norm: x", x, dtypes=dtypes)
    weight = as_float_array("rms_norm: weight", weight, dtypes=dtypes)
    if x.ndim == 0 or weight.shape != (x.shape[-1],):
        raise ShapeError(f"rms_norm: weight shape {weight.shape} does not match last axis of x {x.shape}")
    is_number = isinstance(weight_offset, (int, float, np.integer, np.floating)) and not isinstance(
        weight_offset, (bool, np.bool_))
    if not (is_number and weight_offset in WEIGHT_OFFSETS):
        raise InputError(f"rms_norm: weight_offset must be 0 (w) or 1 (1 + w), got {weight_offset!r}")
    return x, weight, check_same_dtype(x=x, weight=weight)


def check_cast_order(cast_order: str) -> None:
    """Raise InputError unless ``cast_order`` is one of :data:`CAST_ORDERS`."""
    if not isinstance(cast_order, str) or cast_order not in CAST_ORDERS:
        raise InputError(f"rms_norm: cast_order must be one of {CAST_ORDERS}, got {cast_order!r}")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, *, weight_offset: float = 0.0) -> np.ndarray:
    """RMSNorm in the compute dtype: ``(weight_offset + w) * x / sqrt(mean(x**2, -1) + eps)``.

    Args:
        x: ``(..., M)`` activations.
        weight: ``(M,)`` per-channel weight, same dtype as ``x``.
        eps: added to the mean square inside the root (``rms_norm_eps``).
        weight_offset: 0 for a plain weight, 1 for Gemma's ``1 + w``.

    Returns:
        ``(..., M)``, same dtype as ``x``.

    Dtype: computed entirely in the dtype of ``x``; the mean of squares accumulates
    in that dtype. In float64 and float32 the two cast orders coincide. float16 /
    bfloat16: computed in float32 (eps rounded to float32), rounded once to the
    storage dtype: :func:`rms_norm_low_precision` with ``"multiply_then_cast"``.

    Raises:
        ShapeError: ``weight`` does not have shape ``(M,)``.
        InputError: ``x`` or ``weight`` not float64, float32, bfloat16 or float16; ``eps``
            not a finite number >= 0; ``weight_offset`` not 0 or 1.
        RefimplError: ``x`` and ``weight`` differ in dtype.
    """
    x, weight, storage = _check(x, weight, weight_offset, FLOAT_DTYPES)
    dtype = compute_dtype(storage)
    eps = check_finite_nonnegative("rms_norm: eps", eps, dtype=dtype)
    x, weight = to_compute(x), to_compute(weight)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    normalised = x / np.sqrt(mean_square + eps)
    scale = weight + dtype.type(weight_offset) if weight_offset else weight
    return to_storage(scale * normalised, storage)


def rms_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """Weight-less RMS normalisation ``x / sqrt(mean(x**2, -1) + eps)`` (no gain, no offset).

    Llama 4's QK-norm (transformers calls it ``Llama4TextL2Norm``, but it divides by
    the root *mean* square, so a normalised head of width D has L2 norm about
    ``sqrt(D)``, not 1). Applied per head: ``x`` ``(B, T, H, D)``, statistics over D.

    Args:
        x: ``(..., D)`` activations.
        eps: added to the mean square inside the root (Llama 4 passes ``rms_norm_eps``).

    Returns:
        ``(..., D)``, same dtype as ``x``.

    Dtype: computed entirely in the dtype of ``x``; float16 / bfloat16 in float32,
    rounded once.

    Raises:
        InputError: ``x`` not a float array with at least one axis; ``eps``
            not a finite number >= 0.

    Checked against: transformers 5.24 ``models/llama4/modeling_llama4.py``
    (``Llama4TextL2Norm``, lines 106-118).
    """
    x = as_float_array("rms_normalize: x", x)
    if x.ndim == 0:
        raise InputError("rms_normalize: x must have at least one axis, got a scalar")
    eps = check_finite_nonnegative("rms_normalize: eps", eps, dtype=compute_dtype(x.dtype))
    wide = to_compute(x)
    return to_storage(wide / np.sqrt(np.mean(wide * wide, axis=-1, keepdims=True) + eps), x.dtype)


def rms_norm_low_precision(
    x: np.ndarray, weight: np.ndarray, eps: float, *, weight_offset: float = 0.0,
    cast_order: str = "cast_then_multiply",
) -> np.ndarray:
    """RMSNorm of a low-precision tensor, normalised in float32, with a named cast order.

    Args:
        x: ``(..., M)`` in a storage dtype (``ml_dtypes.bfloat16``, float16, or float32).
        weight: ``(M,)`` in the same dtype.
        eps: ``rms_norm_eps``.
        weight_offset: 0 (``w``) or 1 (``1 + w``, added in float32).
        cast_order: ``"cast_then_multiply"``: ``w * cast(n(x_f32))`` in the storage
            dtype (Llama); ``"multiply_then_cast"``: ``cast((offset + w_f32) * n(x_f32))`` (OLMo 2, Gemma).

    Returns:
        ``(..., M)`` in the dtype of ``x``.

    Raises:
        ShapeError: as :func:`rms_norm`.
        InputError: ``x`` or ``weight`` not bfloat16, float16 or float32; ``eps``,
            ``weight_offset`` as :func:`rms_norm`; unknown ``cast_order``.
        RefimplError: ``x`` and ``weight`` differ in dtype.
    """
    x, weight, storage = _check(x, weight, weight_offset, LOW_PRECISION_STORAGE)
    check_cast_order(cast_order)
    eps = check_finite_nonnegative("rms_norm: eps", eps, dtype=np.float32)
    x32 = x.astype(np.float32)
    normalised = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if cast_order == "cast_then_multiply":
        scale = weight if not weight_offset else (weight.astype(np.float32) + np.float32(1)).astype(storage)
        return (scale * normalised.astype(storage)).astype(storage)
    scale = weight.astype(np.float32) + np.float32(weight_offset)
    return (scale * normalised).astype(storage)


def gated_rms_norm(x: np.ndarray, weight: np.ndarray, z: np.ndarray, eps: float) -> np.ndarray:
    """Gated RMSNorm of Gated DeltaNet's output: ``(w * x / sqrt(mean(x**2, -1) + eps)) * silu(z)``.

    Normalise, then the plain weight ``w`` (not 1 + w; initialised to ones), then the
    gate ``silu(z)``: the norm comes before the gate, and the gate does not enter the
    statistics. Qwen3-Next applies it per value head (``x``, ``z`` ``(B, T, Hv, d_v)``,
    ``w`` ``(d_v,)``, statistics over d_v).

    Args:
        x: ``(..., D)`` activations.
        weight: ``(D,)`` plain per-channel weight.
        z: gate, same shape and dtype as ``x``.
        eps: added to the mean square inside the root (``rms_norm_eps``).

    Returns:
        ``(..., D)``, same dtype as ``x``.

    Dtype: computed in the dtype of ``x``. transformers normalises in float32, casts
    the normalised value back, multiplies by w in the storage dtype, multiplies by
    ``silu(z)`` taken in float32 and casts the product back; in float64 and float32
    (islands lifted) that is this one expression. float16 / bfloat16: this expression
    in float32, rounded once (transformers rounds the normalised value, the product
    with w and the gated product).

    Raises:
        ShapeError: ``weight`` not ``(D,)``; ``z`` not the shape of ``x``.
        InputError: an array not a float array; ``eps`` not a finite number >= 0.
        RefimplError: the arrays differ in dtype.

    Paper: Yang, Kautz, Hatamizadeh, arXiv:2412.06464 (block design: output norm and gate).
    Checked against: transformers 5.24 ``Qwen3NextRMSNormGated``
    (``models/qwen3_next/modeling_qwen3_next.py:58-75``).
    """
    x = as_float_array("gated_rms_norm: x", x)
    weight = as_float_array("gated_rms_norm: weight", weight)
    z = as_float_array("gated_rms_norm: z", z)
    if x.ndim == 0 or weight.shape != (x.shape[-1],):
        raise ShapeError(f"gated_rms_norm: weight shape {weight.shape} does not match last axis of x {x.shape}")
    if z.shape != x.shape:
        raise ShapeError(f"gated_rms_norm: gate z {z.shape} must have the shape of x {x.shape}")
    storage = check_same_dtype(x=x, weight=weight, z=z)
    eps = check_finite_nonnegative("gated_rms_norm: eps", eps, dtype=compute_dtype(storage))
    x, weight, z = to_compute(x), to_compute(weight), to_compute(z)
    normalised = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return to_storage((weight * normalised) * silu(z), storage)
