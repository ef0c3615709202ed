"""FP8 e4m3 weights with per-block scales (``quant_method: "fp8"``), as DeepSeek-V3 and Kimi K2 publish them.

A weight matrix W ``(R, C)`` is stored as two tensors::

    {name}               float8_e4m3fn  (R, C)            q, the quantized values
    {name}_scale_inv     float32        (ceil(R/b0), ceil(C/b1))   s, one multiplier per block

with ``(b0, b1)`` = ``quantization_config.weight_block_size`` (``[128, 128]`` in every
release). Dequantization multiplies each value by the scale of its block::

    W[i, j] = q[i, j] * s[i // b0, j // b1]

The last block row and column are partial when R or C is not a multiple of the block
(DeepSeek-V3's ``kv_a_proj_with_mqa`` has R = 512 + 64 = 576 = 4.5 x 128): they use the
scale of the block they fall in, exactly as DeepSeek's own ``weight_dequant`` kernel masks
its edge tiles. Leading axes (stacked experts ``(E, R, C)`` with scales ``(E, ., .)``) are
carried through.

Exactness: q has 4 significant bits and s (float32) 24, so the product has at most 28
and is exact in float64; it is rounded once to the compute dtype. In float32 that single
rounding is what a float32 multiply (transformers' ``Fp8Dequantize``, DeepSeek's
``weight_dequant``) gives, bit for bit. Scales stored as E8M0 exponents (one byte,
``2 ** (byte - 127)``, DeepSeek-V4-style ``scale_fmt: "ue8m0"``) are exact powers of two.

The name ``scale_inv``: quantization divides by s (``q = round(W / s)``), so the stored
tensor is the inverse of the quantizer's scale, the dequantization multiplier.

Notation:
    symbol        code name         shape
    W             ``weight``        (..., R, C) dequantized, compute dtype
    q             ``quantized``     (..., R, C) ``ml_dtypes.float8_e4m3fn``
    s             ``scale_inv``     (..., ceil(R/b0), ceil(C/b1))
    (b0, b1)      ``block_size``    ``weight_block_size``

Paper: DeepSeek-V3 Technical Report, arXiv:2412.19437, sec. 3.3.2 (fine-grained quantization:
128 x 128 weight blocks, FP8 E4M3 for all tensors). Format: OCP 8-bit Floating Point
Specification (OFP8) rev. 1.0, E4M3 (no infinities; S.1111.111 is NaN; max 448).
Checked against: DeepSeek-V3 ``inference/kernel.py`` (``weight_dequant_kernel``: block
(i // 128, j // 128), edge tiles masked), ``inference/fp8_cast_bf16.py`` (``{name}_scale_inv``
pairing); transformers 5.24 ``integrations/finegrained_fp8.py`` (``Fp8Dequantize._dequantize_one``,
which derives the block from the grid and so mis-reads partial edge blocks: docs/checkpoints.md).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from ..errors import InputError, ShapeError
from ..numerics import resolve_dtype

#: Suffix of the scale tensor's name: ``{weight name}_scale_inv``.
SCALE_SUFFIX = "_scale_inv"
#: Largest finite float8_e4m3fn value (S.1111.110 = 1.75 * 2**8).
E4M3_MAX = 448.0
#: Exponent bias of an E8M0 scale byte: ``2 ** (byte - 127)``; byte 255 is NaN.
E8M0_BIAS = 127
#: Scale dtypes read as plain multipliers (widened exactly to float64).
FLOAT_SCALE_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Scale dtypes read as E8M0 exponents.
EXPONENT_SCALE_DTYPES = ("uint8", "float8_e8m0fnu")


def scale_grid(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    """The shape of ``scale_inv`` for a weight of ``shape`` ``(..., R, C)``: ``(..., ceil(R/b0), ceil(C/b1))``."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))


def scale_multipliers(scale_inv: np.ndarray) -> np.ndarray:
    """``scale_inv`` as exact float64 multipliers: floats widened, E8M0 bytes as ``2 ** (byte - 127)``.

    Raises:
        InputError: another dtype, or an E8M0 byte 255 (NaN).
    """
    name = scale_inv.dtype.name
    if name in FLOAT_SCALE_DTYPES:
        return scale_inv.astype(np.float64)
    if name in EXPONENT_SCALE_DTYPES:
        exponents = scale_inv.view(np.uint8).astype(np.int64)
        if (exponents == 255).any():
            raise InputError("fp8 scale_inv: E8M0 byte 255 encodes NaN")
        return np.ldexp(1.0, exponents - E8M0_BIAS)
    raise InputError(f"fp8 scale_inv must be float or E8M0 exponents, got dtype {scale_inv.dtype}")


def dequantize_fp8_block(
    quantized: np.ndarray, scale_inv: np.ndarray, block_size: tuple[int, int], dtype=np.float64
) -> np.ndarray:
    """``W[..., i, j] = q[..., i, j] * s[..., i // b0, j // b1]``, exact, then rounded once to ``dtype``.

    Args:
        quantized: q ``(..., R, C)`` ``ml_dtypes.float8_e4m3fn``.
        scale_inv: s ``(..., ceil(R/b0), ceil(C/b1))``: float64/32/16 or bfloat16 multipliers,
            or E8M0 exponents (uint8 / ``float8_e8m0fnu``).
        block_size: ``(b0, b1)``, positive.
        dtype: float64 (exact) or float32 (one rounding of the exact product).

    Returns:
        W ``(..., R, C)`` in ``dtype``. NaN codes of q stay NaN (the loader refuses them).

    Dtype: each block row is formed in float64 (exact: at most 28 significant bits) and
    rounded to ``dtype``; memory beyond the output is one block row in float64.

    Raises:
        InputError: q is not float8_e4m3fn, s has another dtype, a block size below 1.
        ShapeError: q has fewer than 2 axes, or s is not the grid of q's blocks.

    Paper: arXiv:2412.19437, sec. 3.3.2.
    Checked against: DeepSeek-V3 ``inference/kernel.py`` ``weight_dequant_kernel``.
    """
    dtype = resolve_dtype(dtype)
    b0, b1 = _check_block_size(block_size)
    if quantized.dtype != ml_dtypes.float8_e4m3fn:
        raise InputError(f"fp8 dequantize: weight must be float8_e4m3fn, got dtype {quantized.dtype}")
    if quantized.ndim < 2 or scale_inv.shape != scale_grid(quantized.shape, (b0, b1)):
        raise ShapeError(f"fp8 dequantize: scale_inv {scale_inv.shape} is not the {b0}x{b1} block grid "
                         f"{scale_grid(quantized.shape, (b0, b1)) if quantized.ndim >= 2 else '(..., R, C)'} "
                         f"of weight {quantized.shape}")
    multipliers = scale_multipliers(scale_inv)
    rows, cols = quantized.shape[-2:]
    out = np.empty(quantized.shape, dtype=dtype)
    for block_row in range(multipliers.shape[-2]):
        top, bottom = block_row * b0, min((block_row + 1) * b0, rows)
        # s[i // b0, j // b1] along one block row: each scale repeated b1 times, cut to C columns.
        s = np.repeat(multipliers[..., block_row, :], b1, axis=-1)[..., :cols]
        out[..., top:bottom, :] = quantized[..., top:bottom, :].astype(np.float64) * s[..., None, :]
    return out


def _check_block_size(block_size) -> tuple[int, int]:
    ok = (isinstance(block_size, (tuple, list)) and len(block_size) == 2
          and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block_size))
    if not ok:
        raise InputError(f"fp8 block_size must be two positive integers, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def quantize_fp8_block(weight: np.ndarray, block_size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest FP8 quantization with one float32 scale per block: ``(q, scale_inv)``.

    For building test checkpoints in the published layout (tests and tools only; no
    calibration). Per block: ``s = amax / 448`` rounded to float32 (1 for an all-zero block),
    ``q = e4m3(W / s)``, the absmax recipe of DeepSeek's ``weight_quant``. Exact inverse
    of nothing: it loses precision; :func:`dequantize_fp8_block` of its output is what a
    checkpoint in this format means.

    Args:
        weight: ``(..., R, C)`` float64 or float32.
        block_size: ``(b0, b1)``.

    Returns:
        ``(q (..., R, C) float8_e4m3fn, scale_inv (..., ceil(R/b0), ceil(C/b1)) float32)``.

    Raises:
        InputError: a bad block size, or a weight that is not finite float.
        ShapeError: fewer than 2 axes.
    """
    b0, b1 = _check_block_size(block_size)
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2:
        raise ShapeError(f"fp8 quantize: weight must be (..., R, C), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise InputError("fp8 quantize: weight holds NaN or Inf")
    *lead, rows, cols = w.shape
    grid = scale_grid(w.shape, (b0, b1))
    padded = np.zeros((*lead, grid[-2] * b0, grid[-1] * b1))
    padded[..., :rows, :cols] = np.abs(w)
    amax = padded.reshape(*lead, grid[-2], b0, grid[-1], b1).max(axis=(-3, -1))
    scale_inv = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    s = np.repeat(np.repeat(scale_inv.astype(np.float64), b0, axis=-2), b1, axis=-1)[..., :rows, :cols]
    quantized = np.clip(w / s, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(quantized), np.ascontiguousarray(scale_inv)
