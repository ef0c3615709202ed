"""Quantized checkpoint formats: which ``quantization_config`` is read, and how stored tensors pair up.

Two published formats are read, both dequantized exactly (the math is in the submodules):

* ``quant_method: "fp8"`` (:mod:`.fp8_block`): ``X`` stored as F8_E4M3 with ``X_scale_inv``
  holding one multiplier per ``weight_block_size`` block. DeepSeek-V3, Kimi K2, MiniMax-M2
  and the Qwen3 ``-FP8`` releases. Tensors stored in plain floats (norms, embeddings, the
  router, ``lm_head``) stay as they are.
* ``quant_method: "mxfp4"`` (:mod:`.mxfp4`): gpt-oss's expert stacks ``X_blocks`` /
  ``X_scales``, read as the input-major ``X`` transformers' ``GptOssExperts`` holds.

The reference computes the model these weights define (weights dequantized, activations
in the compute dtype), as transformers does with ``dequantize=True`` and as DeepSeek's
``fp8_cast_bf16.py`` conversion does; an FP8 engine that also quantizes activations
(``activation_scheme: "dynamic"``, 1 x 128 groups) computes something slightly different.

Every other ``quant_method`` (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...) is refused
by :func:`scheme_from_config`, naming it and what is supported.

Checked against: transformers 5.24 ``utils/quantization_config.py`` (``FineGrainedFP8Config``,
``Mxfp4Config``), ``quantizers/quantizer_finegrained_fp8.py``, ``quantizers/quantizer_mxfp4.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from ..lazy_weights import LazyTensor
from .fp8_block import SCALE_SUFFIX, dequantize_fp8_block, scale_grid
from .mxfp4 import BLOCK, BLOCKS_SUFFIX, SCALES_SUFFIX, dequantize_mxfp4

#: quant_method values read, and what they store.
SUPPORTED_METHODS = {
    "fp8": "float8_e4m3fn weights with block scales '<name>_scale_inv'",
    "mxfp4": "gpt-oss MXFP4 experts '<name>_blocks' / '<name>_scales'",
}
#: Other quant_method values seen on the Hub, for the refusal message.
OTHER_METHODS = {
    "gptq": "GPTQ integer weights", "awq": "AWQ integer weights", "bitsandbytes": "bitsandbytes 4/8-bit weights",
    "compressed-tensors": "compressed-tensors packed weights", "fbgemm_fp8": "per-channel FP8 (fbgemm)",
    "hqq": "HQQ integer weights", "eetq": "EETQ int8 weights", "torchao": "torchao quantized weights",
    "aqlm": "AQLM codebooks", "quark": "AMD Quark quantized weights", "bitnet": "BitNet ternary weights",
}
#: safetensors dtype codes of tensors read as they are.
PLAIN_CODES = ("F64", "F32", "F16", "BF16")
#: safetensors dtype codes of FP8 block scales (floats, or E8M0 exponent bytes).
FP8_SCALE_CODES = ("F64", "F32", "F16", "BF16", "U8", "F8_E8M0")
#: What a refusal lists as supported.
SUPPORTED_TEXT = ("only F64, F32, F16 and BF16 tensors are read as they are; quantized weights are read with "
                  "quantization_config quant_method 'fp8' (F8_E4M3 '<name>' with '<name>_scale_inv') or 'mxfp4' "
                  "(U8 '<name>_blocks' with '<name>_scales')")


@dataclass(frozen=True)
class QuantizationScheme:
    """What config.json's ``quantization_config`` declares, checked.

    Attributes:
        quant_method: ``"fp8"`` or ``"mxfp4"``.
        weight_block_size: ``(b0, b1)`` for fp8, None for mxfp4.
    """

    quant_method: str
    weight_block_size: tuple[int, int] | None = None


def scheme_from_config(raw: dict) -> QuantizationScheme | None:
    """The checked ``quantization_config`` of a parsed config.json, or None when there is none.

    Raises:
        ConfigError: not an object; a ``quant_method`` other than fp8 / mxfp4 (named, with
            what is supported); for fp8, a ``weight_block_size`` that is not two positive
            integers (null: per-tensor scales, not published for these models),
            ``activation_scheme: "static"`` (stored activation scales), ``fmt`` other
            than e4m3, ``expert_dtype: "fp4"`` or an unknown ``scale_fmt``.
    """
    config = raw.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ConfigError(f"config.json field 'quantization_config' must be an object, got {config!r}")
    method = config.get("quant_method")
    if method == "mxfp4":
        return QuantizationScheme("mxfp4")
    if method == "fp8":
        return QuantizationScheme("fp8", _fp8_block_size(config))
    what = f" ({OTHER_METHODS[method]})" if method in OTHER_METHODS else ""
    raise ConfigError(
        f"config.json quantization_config: quant_method {method!r}{what} is not supported; this reference reads "
        f"plain float64 / float32 / float16 / bfloat16 checkpoints and quantized ones with quant_method "
        f"{' or '.join(repr(m) + ' (' + d + ')' for m, d in SUPPORTED_METHODS.items())}")


def _fp8_block_size(config: dict) -> tuple[int, int]:
    """``weight_block_size`` of an fp8 config, after refusing the variants not implemented."""
    refusals = {
        "activation_scheme": (config.get("activation_scheme", "dynamic") in ("dynamic", "DYNAMIC"),
                              "stored activation scales ('static') are not read; only 'dynamic'"),
        # DeepSeek-V3 / Kimi K2 write "e4m3", MiniMax-M2 "float8_e4m3fn".
        "fmt": (config.get("fmt", "e4m3") in ("e4m3", "float8_e4m3fn"), "only e4m3 FP8 weights are read"),
        "expert_dtype": (config.get("expert_dtype", "fp8") == "fp8", "FP4-packed experts are not read"),
        "scale_fmt": (config.get("scale_fmt", "float") in ("float", "ue8m0"), "scale_fmt must be float or ue8m0"),
    }
    for key, (ok, why) in refusals.items():
        if not ok:
            raise ConfigError(f"config.json quantization_config: {key}={config[key]!r} is not supported ({why})")
    block = config.get("weight_block_size")
    valid = (isinstance(block, list) and len(block) == 2
             and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block))
    if not valid:
        raise ConfigError(f"config.json quantization_config: weight_block_size must be two positive integers "
                          f"(e.g. [128, 128]), got {block!r}; per-tensor FP8 scales are not read")
    return block[0], block[1]


def decode_tensors(
    stored: dict[str, LazyTensor], scheme: QuantizationScheme | None, where: dict[str, str]
) -> dict[str, LazyTensor]:
    """The model-visible tensors of a checkpoint: plain ones as stored, quantized pairs dequantized.

    Args:
        stored: every stored tensor, its ``storage`` the safetensors dtype code.
        scheme: the checked ``quantization_config``, or None.
        where: the file each name is stored in, for messages.

    Returns:
        ``{name: LazyTensor}``: plain float tensors unchanged; ``X`` for each FP8 pair
        (``X``, ``X_scale_inv``), same shape; ``X`` for each MXFP4 pair (``X_blocks``,
        ``X_scales``), shape ``(..., 32 G, R)`` from blocks ``(..., R, G, 16)``.

    Raises:
        CheckpointError: naming the tensor: a dtype outside the format (integers, F8_E5M2,
            F8_E4M3 or U8 blocks without the matching quant_method), a quantized tensor
            without its scales, scales without their tensor, or shapes that do not pair.
    """
    method = scheme.quant_method if scheme is not None else None
    decoded, consumed = {}, set()
    for name, tensor in stored.items():
        if tensor.storage == "F8_E4M3" and method == "fp8" and name + SCALE_SUFFIX in stored:
            scale = stored[name + SCALE_SUFFIX]
            decoded[name] = _fp8_tensor(name, tensor, scale, scheme.weight_block_size, where[name])
            consumed.add(name + SCALE_SUFFIX)
        elif (tensor.storage == "U8" and method == "mxfp4" and name.endswith(BLOCKS_SUFFIX)
              and name[:-len(BLOCKS_SUFFIX)] + SCALES_SUFFIX in stored):
            base = name[:-len(BLOCKS_SUFFIX)]
            if base in stored:
                raise CheckpointError(f"{where[name]}: '{base}' is stored both plain and as MXFP4 '{name}'")
            decoded[base] = _mxfp4_tensor(base, tensor, stored[base + SCALES_SUFFIX], where[name])
            consumed.add(base + SCALES_SUFFIX)
    for name, tensor in stored.items():
        paired_blocks = name.endswith(BLOCKS_SUFFIX) and name[:-len(BLOCKS_SUFFIX)] in decoded
        if name in decoded or name in consumed or paired_blocks:
            continue
        _check_plain(name, tensor, method, where[name])
        decoded[name] = tensor
    return decoded


def _check_plain(name: str, tensor: LazyTensor, method: str | None, where: str) -> None:
    """Refuse a tensor left over after pairing unless it is a plain float one that is no orphan scale."""
    code = tensor.storage
    if code == "F8_E4M3" and method == "fp8":
        raise CheckpointError(f"{where}: FP8 tensor '{name}' has no '{name}{SCALE_SUFFIX}' (quant_method 'fp8' "
                              "stores one scale per weight_block_size block)")
    if code == "U8" and method == "mxfp4" and name.endswith(BLOCKS_SUFFIX):
        raise CheckpointError(f"{where}: MXFP4 tensor '{name}' has no '{name[:-len(BLOCKS_SUFFIX)]}{SCALES_SUFFIX}'")
    if name.endswith(SCALE_SUFFIX) and method == "fp8":
        raise CheckpointError(f"{where}: '{name}' is an FP8 block scale, but '{name[:-len(SCALE_SUFFIX)]}' is not "
                              "stored as F8_E4M3")
    if name.endswith(SCALES_SUFFIX) and method == "mxfp4" and code == "U8":
        raise CheckpointError(f"{where}: '{name}' is an MXFP4 scale, but '{name[:-len(SCALES_SUFFIX)]}"
                              f"{BLOCKS_SUFFIX}' is not stored as U8 blocks")
    if code not in PLAIN_CODES:
        raise CheckpointError(f"{where}: tensor '{name}' is stored as {code}; {SUPPORTED_TEXT}")


def _fp8_tensor(name: str, weight: LazyTensor, scale: LazyTensor, block: tuple[int, int], where: str) -> LazyTensor:
    """The dequantized ``name`` of an FP8 pair, after checking the scale's dtype and block grid."""
    if scale.storage not in FP8_SCALE_CODES:
        raise CheckpointError(f"{where}: FP8 scale '{name}{SCALE_SUFFIX}' is stored as {scale.storage}; "
                              f"scales must be one of {', '.join(FP8_SCALE_CODES)}")
    grid = scale_grid(weight.shape, block) if weight.ndim >= 2 else None
    if grid is None or scale.shape != grid:
        raise CheckpointError(
            f"{where}: FP8 tensor '{name}' {weight.shape} with weight_block_size {list(block)} needs "
            f"'{name}{SCALE_SUFFIX}' of shape {grid or '(..., ceil(R/b0), ceil(C/b1))'}, found {scale.shape}")

    def produce(dtype):
        try:
            return dequantize_fp8_block(weight.materialize(None), scale.materialize(None), block,
                                        np.float64 if dtype is None else dtype)
        except InputError as exc:
            raise CheckpointError(f"{where}: tensor '{name}': {exc}") from None

    return LazyTensor(weight.shape, f"F8_E4M3, {block[0]}x{block[1]} block scales {scale.storage}", produce=produce)


def _mxfp4_tensor(base: str, blocks: LazyTensor, scales: LazyTensor, where: str) -> LazyTensor:
    """The dequantized, input-major ``base`` of an MXFP4 pair ``(..., 32 G, R)``, after checking shapes."""
    if scales.storage != "U8" or blocks.ndim < 3 or blocks.shape[-1] != BLOCK // 2 or scales.shape != blocks.shape[:-1]:
        raise CheckpointError(
            f"{where}: MXFP4 pair '{base}{BLOCKS_SUFFIX}' {blocks.shape} / '{base}{SCALES_SUFFIX}' {scales.shape} "
            f"({scales.storage}) must be U8 (..., R, G, {BLOCK // 2}) and U8 (..., R, G)")
    *lead, rows, groups, _ = blocks.shape
    shape = (*lead, groups * BLOCK, rows)

    def produce(dtype):
        packed, exponents = blocks.materialize(None), scales.materialize(None)
        out = np.empty(shape, dtype=np.float64 if dtype is None else dtype)
        # One leading index (expert) at a time bounds the float64 temporary.
        try:
            for index in np.ndindex(*lead):
                out[index] = dequantize_mxfp4(packed[index], exponents[index], out.dtype).swapaxes(-1, -2)
        except InputError as exc:
            raise CheckpointError(f"{where}: tensor '{base}': {exc}") from None
        return out

    return LazyTensor(shape, "MXFP4 (U8 blocks, E8M0 scales)", produce=produce)
