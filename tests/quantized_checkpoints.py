"""Small checkpoints in each published storage format, for tests/test_storage_formats.py and
tests/test_lazy_loading.py.

A plain float32 checkpoint (written by transformers' ``save_pretrained`` or by hand) is turned
into the FP8-block layout of DeepSeek-V3 / Kimi K2 or the MXFP4 layout of gpt-oss with the
test quantizers of :mod:`refimpl.quantization` (round to nearest, no calibration), keeping in
plain floats what the releases keep there, and config.json gets the releases'
``quantization_config``. Also: a raw safetensors writer for hand-made (and malformed) files.

FP8 tensors are written through ``safetensors.torch`` (the NumPy writer has no float8), so
callers import torch first.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from refimpl.quantization.fp8_block import quantize_fp8_block
from refimpl.quantization.mxfp4 import quantize_mxfp4

#: Tensors DeepSeek's ``inference/bf16_cast_fp8.py`` keeps in bf16 (its SKIP_QUANT_PATTERNS), plus any
#: tensor that is not 2-D; everything else 2-D is FP8 with block scales.
FP8_KEEP = (r".*norm\.weight$", r".*embed_tokens\.weight$", r".*lm_head\.weight$", r".*\.gate\.weight$",
            r".*e_score_correction_bias$", r".*\.eh_proj\.weight$")
#: gpt-oss's released quantization_config.
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
#: The expert stacks gpt-oss stores as MXFP4 (transformers' input-major names).
MXFP4_STACKS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def fp8_config(block) -> dict:
    """DeepSeek-V3's published quantization_config, with ``weight_block_size`` = ``block``."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def save_torch(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` with safetensors' torch writer; float8_e4m3fn arrays become F8_E4M3."""
    import ml_dtypes
    import torch
    from safetensors.torch import save_file

    out = {}
    for name, array in tensors.items():
        if array.dtype == ml_dtypes.float8_e4m3fn:
            out[name] = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8)).view(torch.float8_e4m3fn)
        elif array.dtype.name == "bfloat16":
            out[name] = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(np.ascontiguousarray(array))
    save_file(out, str(path), metadata={"format": "pt"})


def _copy_config(src: Path, dst: Path, quantization_config: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(src) / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    for extra in ("generation_config.json",):
        if (Path(src) / extra).is_file():
            shutil.copy(Path(src) / extra, dst / extra)


def to_fp8(src: Path, dst: Path, block=(128, 128)) -> Path:
    """``dst``: the single-file checkpoint ``src`` with every 2-D weight outside :data:`FP8_KEEP`
    quantized to F8_E4M3 plus an F32 ``{name}_scale_inv`` (``block`` blocks)."""
    dst = Path(dst)
    _copy_config(src, dst, fp8_config(block))
    out = {}
    for name, array in load_file(Path(src) / "model.safetensors").items():
        if array.ndim == 2 and not any(re.match(p, name) for p in FP8_KEEP):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(array, block)
        else:
            out[name] = array
    save_torch(dst / "model.safetensors", out)
    return dst


def to_mxfp4(src: Path, dst: Path) -> Path:
    """``dst``: the single-file gpt-oss checkpoint ``src`` with its expert stacks (input-major
    ``(E, C, R)``) stored as MXFP4 ``{name}_blocks`` / ``{name}_scales`` of the output-major
    ``(E, R, C)`` matrices, as the releases store them."""
    dst = Path(dst)
    _copy_config(src, dst, MXFP4_CONFIG)
    out = {}
    for name, array in load_file(Path(src) / "model.safetensors").items():
        if name.endswith(MXFP4_STACKS):
            out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(np.swapaxes(array, -1, -2))
        else:
            out[name] = array
    save_torch(dst / "model.safetensors", out)
    return dst


def write_raw_safetensors(path: Path, entries: dict[str, tuple[str, tuple, bytes]], header: dict | None = None,
                          header_length: int | None = None) -> None:
    """A safetensors file by hand: ``{name: (dtype code, shape, data bytes)}`` laid out in order,
    or ``header`` verbatim (with ``header_length`` overriding the 8-byte length field)."""
    offsets, data = {}, b""
    for name, (code, shape, raw) in entries.items():
        offsets[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header if header is not None else offsets).encode()
    length = len(text) if header_length is None else header_length
    Path(path).write_bytes(struct.pack("<Q", length) + text + data)
