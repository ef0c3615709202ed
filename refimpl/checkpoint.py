"""Reading a Hugging Face checkpoint directory: config.json and safetensors.

A directory holds ``config.json`` and either ``model.safetensors`` or a sharded
set described by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
Tensors keep their Hugging Face names. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

# Importing ml_dtypes registers bfloat16 with NumPy, so that safetensors' NumPy
# reader returns BF16 tensors (as ml_dtypes.bfloat16 arrays, widened exactly later).
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    """Parse a JSON object from ``path``.

    Raises:
        CheckpointError: the file is missing, unreadable, not JSON, or not an object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    """Map each shard file to its path; validates the index's weight_map."""
    if (checkpoint_dir / SINGLE_FILE).is_file():
        return {SINGLE_FILE: checkpoint_dir / SINGLE_FILE}
    if not (checkpoint_dir / INDEX_FILE).is_file():
        raise CheckpointError(f"{checkpoint_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    weight_map = read_json(checkpoint_dir / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{checkpoint_dir / INDEX_FILE}: 'weight_map' must map names to file names")
    shards = {}
    for name in sorted(set(weight_map.values())):
        path = (checkpoint_dir / name).resolve()
        if checkpoint_dir.resolve() not in path.parents:
            raise CheckpointError(f"{INDEX_FILE}: shard '{name}' lies outside {checkpoint_dir}")
        shards[name] = path
    return shards


#: safetensors dtype codes the reference reads; each converts exactly to float64.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def check_float_dtype(path: Path, name: str, code: str) -> None:
    """Accept a tensor whose safetensors dtype code is in :data:`FLOAT_DTYPES`.

    Raises:
        CheckpointError: any other dtype (integers, FP8, packed quantized data),
            naming the tensor, its dtype and what is supported.
    """
    if code not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{path}: tensor '{name}' is stored as {code}; only {', '.join(FLOAT_DTYPES.values())} "
            "tensors are supported (no quantized formats yet)"
        )


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            codes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            for name, code in codes.items():
                check_float_dtype(path, name, code)
            for name in codes:
                tensors[name] = f.get_tensor(name)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file not found") from None
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    return tensors


def read_weights(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Load every tensor of the checkpoint, keyed by its Hugging Face name.

    Returns:
        ``{name: array}`` in the stored dtypes (float64, float32, float16,
        bfloat16 as ``ml_dtypes.bfloat16``); every one widens exactly to float64.

    Raises:
        CheckpointError: files missing or unreadable, a name stored twice, or a
            tensor whose dtype is not a plain float (see :func:`check_float_dtype`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights: dict[str, np.ndarray] = {}
    for path in _shard_files(checkpoint_dir).values():
        for name, array in _read_shard(path).items():
            if name in weights:
                raise CheckpointError(f"{checkpoint_dir}: tensor '{name}' is stored in more than one shard")
            weights[name] = array
    return weights
