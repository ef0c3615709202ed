"""Reading a Hugging Face checkpoint directory: config.json and safetensors, in every published storage format.

A directory holds ``config.json`` and either ``model.safetensors`` or a sharded set
described by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
Tensors keep their Hugging Face names. Nothing is ever unpickled.

Storage formats read (each converts exactly to float64, and to float32 with one rounding
at most):

====================  ==========================================  =================================
format                tensors in the file                         config.json
====================  ==========================================  =================================
plain float           F64, F32, F16, BF16 (``ml_dtypes.bfloat16``)  no ``quantization_config``
FP8 block             ``X`` F8_E4M3 + ``X_scale_inv`` (F32/BF16/  ``quant_method: "fp8"``,
                      F16/F64, or E8M0 bytes U8 / F8_E8M0)         ``weight_block_size [b0, b1]``
MXFP4 (gpt-oss)       ``X_blocks`` U8 + ``X_scales`` U8 -> ``X``    ``quant_method: "mxfp4"``
====================  ==========================================  =================================

Anything else is refused with a one-line error naming the tensor (or the file, or the
``quant_method``) and what is supported: integer tensors (GPTQ / AWQ ``qweight``,
bitsandbytes), F8_E5M2, GGUF files, pickled ``pytorch_model.bin``. The math of each
format is in :mod:`refimpl.quantization`.

The safetensors files are memory-mapped and their headers parsed here (8-byte little-endian
header length, a JSON header, then the data; offsets relative to the data), not through
``safetensors.safe_open``: its NumPy API cannot return F8_E4M3 tensors (NumPy has no float8
dtype; ``ml_dtypes.float8_e4m3fn`` is not registered under a name it knows) and cannot
release a tensor's pages after use, which lazy mode needs to stay within one layer's memory.
The header checks follow the safetensors library: the tensors' byte ranges tile the data
section exactly (no gap, overlap or trailing byte), each equal to its shape times its element
size; a name listed twice and shapes NumPy cannot make are refused too (:func:`read_header`).
A path that is not a regular file (a FIFO, a device) is refused before it is opened. Opening a
checkpoint reads the headers only; :func:`open_checkpoint` returns
:class:`~refimpl.lazy_weights.LazyTensor` objects that read their bytes when materialized,
and then tell the kernel it may drop those pages from the resident set (``madvise``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError
from .lazy_weights import LazyTensor
from .quantization import QuantizationScheme, decode_tensors, scheme_from_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype code -> the NumPy dtype its bytes are viewed as (little-endian).
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
}
#: safetensors dtype codes read as they are; each converts exactly to float64.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: Largest JSON header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions a stored tensor may have (NumPy 1.x's limit; no checkpoint uses more than 8).
MAX_TENSOR_DIMS = 32
#: Most elements a stored shape may describe, zero dimensions counted as 1: a tensor of size 0
#: still has to be made by NumPy, which refuses shapes such as ``[0, 2**62]`` ("array is too
#: big"). 2**48 elements is far beyond any checkpoint's tensor and within NumPy's range.
MAX_TENSOR_ELEMENTS = 1 << 48
#: Files that are not safetensors, and why they are not read.
_FOREIGN_FILES = {
    "*.gguf": "GGUF files (llama.cpp) are not read; use the Hugging Face safetensors release",
    "pytorch_model*.bin": "pickled PyTorch checkpoints are never unpickled here; convert them to safetensors",
    "*.pt": "pickled PyTorch checkpoints are never unpickled here; convert them to safetensors",
    "*.pth": "pickled PyTorch checkpoints are never unpickled here; convert them to safetensors",
}


def check_regular_file(path: Path, missing: str = "file not found") -> None:
    """Refuse what is not a regular file (a FIFO would block ``open`` for ever, a device or
    a folder cannot be parsed), before anything opens it; symbolic links are followed.

    Raises:
        CheckpointError: ``path`` does not exist (``missing`` says so) or is not a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file")


def read_json(path: Path) -> dict:
    """Parse a JSON object from ``path``.

    Raises:
        CheckpointError: the file is missing, not a regular file (a FIFO is refused before
            it is opened), unreadable, not JSON (including nesting deeper than Python's
            recursion limit and integers of more than 4300 digits), or not an object.
    """
    check_regular_file(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read JSON (nested too deeply)") from None
    # ValueError: json.JSONDecodeError, and int() refusing more than 4300 digits.
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(checkpoint_dir: Path) -> dict:
    """Return the parsed ``config.json`` of a checkpoint directory.

    Raises:
        CheckpointError: the directory or its config.json is missing or unreadable.
    """
    if not isinstance(checkpoint_dir, (str, Path)):
        raise CheckpointError(f"a checkpoint path must be a str or Path, got {type(checkpoint_dir).__name__}")
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a checkpoint directory")
    return read_json(checkpoint_dir / "config.json")


def _shard_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map each shard file to its path; validates the index's weight_map.

    Raises:
        CheckpointError: no safetensors (naming a GGUF or pickle file found instead),
            a malformed index, or a shard outside the directory.
    """
    if (checkpoint_dir / SINGLE_FILE).is_file():
        return {SINGLE_FILE: checkpoint_dir / SINGLE_FILE}
    if not (checkpoint_dir / INDEX_FILE).is_file():
        for pattern, why in _FOREIGN_FILES.items():
            found = sorted(checkpoint_dir.glob(pattern))
            if found:
                raise CheckpointError(f"{checkpoint_dir}: found {found[0].name} but neither {SINGLE_FILE} nor "
                                      f"{INDEX_FILE}: {why}")
        raise CheckpointError(f"{checkpoint_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    weight_map = read_json(checkpoint_dir / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{checkpoint_dir / INDEX_FILE}: 'weight_map' must map names to file names")
    shards = {}
    for name in sorted(set(weight_map.values())):
        if "\0" in name:
            raise CheckpointError(f"{INDEX_FILE}: shard file name {name!r} holds a NUL character")
        try:
            path = (checkpoint_dir / name).resolve()
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{INDEX_FILE}: shard file name {name!r} cannot be resolved ({exc})") from None
        if checkpoint_dir.resolve() not in path.parents:
            raise CheckpointError(f"{INDEX_FILE}: shard {name!r} lies outside {checkpoint_dir}")
        shards[name] = path
    return shards


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a safetensors header.

    Attributes:
        name: the tensor's name.
        dtype: the safetensors dtype code (``"BF16"``, ``"F8_E4M3"``, ``"U8"``...).
        shape: its shape.
        begin, end: absolute byte offsets of its data in the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and check the header of one safetensors file, reading no tensor data.

    The rules are the safetensors library's (``Metadata::validate`` and the
    "file not fully covered" check): sorted by offsets, the tensors' byte ranges tile the
    data section exactly, without gap, overlap or trailing byte. Stricter than the library
    in three points: a tensor name listed twice is refused (the library keeps the last
    silently), so is a name holding a line break or another non-printable character (it
    would break the one-line messages that name tensors), and a shape must have at most
    :data:`MAX_TENSOR_DIMS` dimensions and describe at most :data:`MAX_TENSOR_ELEMENTS`
    elements with its zero dimensions counted as 1 (the library accepts ``[0, 2**62]``,
    which NumPy cannot make).

    Raises:
        CheckpointError: the file is missing, not a regular file (a FIFO is refused before
            it is opened) or not safetensors: header length beyond the file, not a JSON
            object, nested too deeply, a name listed twice or not printable, an entry
            without dtype / shape / data_offsets, offsets outside the data, overlapping or
            leaving bytes no tensor covers, a byte count that does not match the shape and
            dtype, or a shape beyond the bounds above.
    """
    check_regular_file(path, "shard file not found")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: cannot read safetensors (header length {length} does not fit a "
                                      f"{size}-byte file)")
            header = json.loads(f.read(length).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file not found") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read safetensors (the header is nested too deeply)") from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: cannot read safetensors (the header lists {exc.key!r} twice)") from None
    # ValueError: json.JSONDecodeError, and int() refusing more than 4300 digits.
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: cannot read safetensors (the header is not a JSON object)")
    # Names end up in one-line messages (missing, unexpected, malformed tensors).
    for name in header:
        if not name.isprintable():
            raise CheckpointError(f"{path}: cannot read safetensors (tensor name {name!r} holds a line break or "
                                  "another non-printable character)")
    start = 8 + length
    tensors = {name: _header_entry(path, name, entry, start, size)
               for name, entry in header.items() if name != "__metadata__"}
    _check_tiling(path, tensors, start, size)
    return tensors


class _DuplicateKey(Exception):
    """A JSON object of a safetensors header names ``key`` twice."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` ``object_pairs_hook``: the object as a dict, refusing a key given twice."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _header_entry(path: Path, name: str, entry, start: int, size: int) -> StoredTensor:
    """One checked header entry; offsets made absolute."""
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
          and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
          and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"])
          and len(entry["data_offsets"]) == 2
          and all(isinstance(n, int) and not isinstance(n, bool) for n in entry["data_offsets"]))
    if not ok:
        raise CheckpointError(f"{path}: cannot read safetensors (entry '{name}' needs dtype, shape and two "
                              f"data_offsets, got {entry!r})")
    begin, end = entry["data_offsets"]
    if not 0 <= begin <= end <= size - start:
        raise CheckpointError(f"{path}: cannot read safetensors (tensor '{name}' data_offsets [{begin}, {end}] lie "
                              f"outside the {size - start} data bytes)")
    itemsize = SAFETENSORS_DTYPES[entry["dtype"]].itemsize if entry["dtype"] in SAFETENSORS_DTYPES else None
    if itemsize is not None and end - begin != math.prod(entry["shape"]) * itemsize:
        raise CheckpointError(f"{path}: cannot read safetensors (tensor '{name}' has {end - begin} bytes, but shape "
                              f"{entry['shape']} of {entry['dtype']} needs {math.prod(entry['shape']) * itemsize})")
    # Only an empty tensor gets here with a large shape: its bytes (0) match any shape holding a 0.
    if len(entry["shape"]) > MAX_TENSOR_DIMS or math.prod(max(n, 1) for n in entry["shape"]) > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{path}: cannot read safetensors (tensor '{name}' has shape {entry['shape']}; at most "
                              f"{MAX_TENSOR_DIMS} dimensions and {MAX_TENSOR_ELEMENTS} elements, zero dimensions "
                              "counted as 1, are read)")
    return StoredTensor(name, entry["dtype"], tuple(entry["shape"]), start + begin, start + end)


def _check_tiling(path: Path, tensors: dict[str, StoredTensor], start: int, size: int) -> None:
    """The tensors, sorted by (begin, end), cover the data bytes ``[start, size)`` exactly,
    as the safetensors library requires (an empty tensor sits at a boundary between two)."""
    covered, previous = start, None
    for begin, end, name in sorted((t.begin, t.end, t.name) for t in tensors.values()):
        if begin < covered:
            raise CheckpointError(f"{path}: cannot read safetensors (tensors '{previous}' and '{name}' overlap)")
        if begin > covered:
            raise CheckpointError(f"{path}: cannot read safetensors (data bytes [{covered - start}, {begin - start}) "
                                  f"before tensor '{name}' are covered by no tensor)")
        covered, previous = end, name
    if covered < size:
        raise CheckpointError(f"{path}: cannot read safetensors (the last {size - covered} data bytes are covered "
                              "by no tensor)")


class _MappedFile:
    """A read-only memory map of one safetensors file, opened on first use."""

    def __init__(self, path: Path):
        self.path = path
        self._map: mmap.mmap | None = None

    def view(self, tensor: StoredTensor) -> np.ndarray:
        """The tensor's bytes as a read-only array of its dtype and shape (no copy)."""
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        if tensor.end == tensor.begin:
            return np.empty(tensor.shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(tensor.shape)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=tensor.begin).reshape(tensor.shape)

    def release(self, tensor: StoredTensor) -> None:
        """Let the kernel drop the tensor's pages from this process's resident set (they stay
        in the page cache, and are read again from the file if touched)."""
        if self._map is None or not hasattr(self._map, "madvise") or tensor.end == tensor.begin:
            return
        start = tensor.begin - tensor.begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, tensor.end - start)


def stored_tensors(checkpoint_dir: Path) -> dict[str, tuple[StoredTensor, _MappedFile, Path]]:
    """Every tensor of the checkpoint's safetensors files, from their headers only.

    Raises:
        CheckpointError: files missing or unreadable, or a name stored in two shards.
    """
    checkpoint_dir = Path(checkpoint_dir)
    found: dict[str, tuple[StoredTensor, _MappedFile, Path]] = {}
    for path in _shard_files(checkpoint_dir).values():
        mapped = _MappedFile(path)
        for name, tensor in read_header(path).items():
            if name in found:
                raise CheckpointError(f"{checkpoint_dir}: tensor '{name}' is stored in more than one shard")
            found[name] = (tensor, mapped, path)
    return found


def _lazy(tensor: StoredTensor, mapped: _MappedFile) -> LazyTensor:
    """A LazyTensor over one stored tensor (its bytes viewed in the stored dtype on use); its
    ``storage`` is the safetensors dtype code, which :func:`decode_tensors` checks before any read."""
    return LazyTensor(tensor.shape, tensor.dtype, view=lambda: mapped.view(tensor),
                      release=lambda: mapped.release(tensor))


def open_checkpoint(checkpoint_dir: Path, scheme: QuantizationScheme | None) -> dict[str, LazyTensor]:
    """The checkpoint's tensors under the names a model reads, read from the headers only.

    Plain float tensors map to themselves; FP8 pairs (``X``, ``X_scale_inv``) become one
    dequantized ``X``; MXFP4 pairs (``X_blocks``, ``X_scales``) become ``X``, input-major
    (:func:`refimpl.quantization.decode_tensors`).

    Args:
        checkpoint_dir: the checkpoint directory.
        scheme: what ``quantization_config`` declares
            (:func:`refimpl.quantization.scheme_from_config`), or None.

    Raises:
        CheckpointError: unreadable files, a tensor in an unsupported dtype or without its
            scale (naming the tensor, its dtype and what is supported), or scales whose
            grid does not fit their tensor.
    """
    found = stored_tensors(checkpoint_dir)
    where = {name: str(path) for name, (_, _, path) in found.items()}
    return decode_tensors({name: _lazy(t, mapped) for name, (t, mapped, _) in found.items()}, scheme, where)


def read_weights(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Load every tensor of the checkpoint, keyed by the name a model reads.

    The storage format comes from config.json's ``quantization_config``.

    Returns:
        ``{name: array}``: plain tensors in their stored dtypes (float64, float32, float16,
        bfloat16 as ``ml_dtypes.bfloat16``), quantized ones dequantized exactly to float64.

    Raises:
        CheckpointError: as :func:`open_checkpoint`, or config.json unreadable.
        ConfigError: a ``quantization_config`` this reader does not support.
    """
    scheme = scheme_from_config(read_config(checkpoint_dir))
    return {name: tensor.materialize(None) for name, tensor in open_checkpoint(checkpoint_dir, scheme).items()}
