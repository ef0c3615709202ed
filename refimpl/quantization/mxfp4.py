"""MXFP4 expert weights (``quant_method: "mxfp4"``), as gpt-oss is published.

Each expert matrix, output-major ``(E, R, C)`` (R output channels, C input features), is
cut along C into groups of 32 values that share one power-of-two scale (an OCP MX block,
element type FP4 E2M1, scale type E8M0). The checkpoint holds two uint8 tensors::

    {name}_blocks   (E, R, G, 16)   two E2M1 codes per byte: value 2j in the low nibble,
                                    value 2j + 1 in the high nibble        (G = C / 32)
    {name}_scales   (E, R, G)       the block's exponent byte x, scale 2 ** (x - 127)

and dequantization is::

    W[e, r, 32 g + 2 j]     = FP4[blocks[e, r, g, j] & 0xF] * 2 ** (scales[e, r, g] - 127)
    W[e, r, 32 g + 2 j + 1] = FP4[blocks[e, r, g, j] >> 4]  * 2 ** (scales[e, r, g] - 127)

with the E2M1 table ``FP4`` = 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0..7 and the same
values negated for codes 8..15 (the sign is bit 3). transformers' ``GptOssExperts`` holds
the stacks input-major, ``gate_up_proj (E, M, 2I)`` and ``down_proj (E, I, M)``, so the
loader stores ``W.swapaxes(-1, -2)`` under ``{name}`` (``gate_up_proj_blocks`` is
``(E, 2I, M/32, 16)``, ``down_proj_blocks`` ``(E, M, I/32, 16)``).

Exactness: an E2M1 value has at most 2 significant bits and the scale is a power of two,
so W is exact in float64 for every scale byte 0..254, and exact in float32 unless it
overflows (possible only for scale bytes 253 and 254; the loader then refuses the Inf).
Byte 255 encodes NaN (OCP MX spec) and is refused.

Notation:
    symbol      code name      shape
    W           ``weight``     (..., R, C) dequantized, C = 32 G
    P           ``blocks``     (..., R, G, 16) uint8
    X           ``scales``     (..., R, G) uint8

Paper: OCP Microscaling Formats (MX) Specification v1.0 (2023), sec. 5 (MXFP4: k = 32, E8M0
scale, E2M1 elements; scale 0xFF is NaN); OpenAI, gpt-oss model card, arXiv:2508.10925, sec. 2.
Checked against: transformers 5.24 ``integrations/mxfp4.py`` (``FP4_VALUES``,
``_convert_moe_packed_tensors``: low nibble first, ``scales - 127``, ``ldexp``, then
``transpose(1, 2)``); OpenAI ``gpt_oss/torch/weights.py`` (``_get_mxfp4_tensor``, same
nibble order and bias, no transpose: their ``MLPBlock`` is output-major).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, ShapeError
from ..numerics import resolve_dtype

#: FP4 E2M1 values by 4-bit code: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: Values per MX block (one shared scale).
BLOCK = 32
#: Exponent bias of the E8M0 scale byte.
SCALE_BIAS = 127
#: Name suffixes of the two stored tensors.
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, dtype=np.float64) -> np.ndarray:
    """W ``(..., R, 32 G)`` from packed E2M1 codes ``(..., R, G, 16)`` and E8M0 scales ``(..., R, G)``.

    Args:
        blocks: uint8, two codes per byte, low nibble first.
        scales: uint8 exponent bytes, scale ``2 ** (x - 127)``.
        dtype: float64 or float32.

    Returns:
        ``(..., R, 32 G)`` in ``dtype``, output-major as stored (no transpose).

    Dtype: table values times exact powers of two (``np.ldexp`` in float64), then cast:
    exact unless the value overflows ``dtype``.

    Raises:
        InputError: blocks or scales not uint8, or a scale byte 255 (NaN).
        ShapeError: blocks not ``(..., G, 16)``, or scales not ``blocks.shape[:-1]``.

    Paper: OCP MX Specification v1.0, sec. 5 and 6.3 (E2M1 encoding).
    Checked against: transformers 5.24 ``integrations/mxfp4.py`` ``_convert_moe_packed_tensors``.
    """
    dtype = resolve_dtype(dtype)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise InputError(f"mxfp4 dequantize: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or scales.shape != blocks.shape[:-1]:
        raise ShapeError(f"mxfp4 dequantize: blocks {blocks.shape} must be (..., G, {BLOCK // 2}) and scales "
                         f"{scales.shape} their leading shape")
    if (scales == 255).any():
        raise InputError("mxfp4 dequantize: scale byte 255 encodes NaN")
    table = np.array(FP4_E2M1_VALUES)
    # Value 2j from the low nibble, 2j + 1 from the high nibble of byte j.
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)                # (..., G, 16, 2)
    values = table[codes].reshape(*blocks.shape[:-1], BLOCK)                # (..., G, 32)
    weight = np.ldexp(values, scales.astype(np.int64)[..., None] - SCALE_BIAS)
    return weight.reshape(*blocks.shape[:-2], -1).astype(dtype)


def quantize_mxfp4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 quantization along the last axis: ``(blocks, scales)`` for W ``(..., R, C)``, C a multiple of 32.

    For building test checkpoints in gpt-oss's layout (tests and tools only). Per block of
    32: shared exponent ``floor(log2(amax)) - 2`` (the OCP MX recipe: E2M1's largest
    exponent is 2), clamped to the E8M0 range, then each value rounded to the nearest E2M1
    value (a tie goes to the smaller magnitude) and clamped to +-6; an all-zero block gets byte 0.

    Returns:
        ``(blocks (..., R, C/32, 16) uint8, scales (..., R, C/32) uint8)``.

    Raises:
        ShapeError: fewer than 2 axes, or C not a multiple of 32.
        InputError: W holds NaN or Inf.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2 or w.shape[-1] % BLOCK:
        raise ShapeError(f"mxfp4 quantize: weight must be (..., R, C) with C a multiple of {BLOCK}, got {w.shape}")
    if not np.isfinite(w).all():
        raise InputError("mxfp4 quantize: weight holds NaN or Inf")
    groups = w.reshape(*w.shape[:-1], -1, BLOCK)                             # (..., R, G, 32)
    amax = np.abs(groups).max(axis=-1)
    exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -SCALE_BIAS)
    exponent = np.clip(exponent, -SCALE_BIAS, 254 - SCALE_BIAS).astype(np.int64)
    scaled = np.ldexp(groups, -exponent[..., None])
    magnitudes = np.array(FP4_E2M1_VALUES[:8])
    # Nearest table magnitude (argmin takes the smaller one on a tie), then the sign bit.
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1).astype(np.uint8)
    codes |= np.where(np.signbit(scaled) & (codes > 0), 8, 0).astype(np.uint8)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(exponent + SCALE_BIAS, dtype=np.uint8)
