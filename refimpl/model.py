"""The model object: a config, its weights in one compute dtype, and a forward.

``from_pretrained(path)`` reads a Hugging Face checkpoint directory, checks that
the tensors are exactly those the architecture needs, with the right shapes, and
casts them once to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import read_config, read_weights
from .embedding import check_token_ids
from .errors import CheckpointError, MissingWeightsError, UnexpectedWeightsError, WeightShapeError
from .numerics import resolve_dtype
from .architecture import Architecture
from .registry import get_architecture


@dataclass(frozen=True)
class ModelOutput:
    """Result of :meth:`Model.forward`.

    Attributes:
        logits: ``(B, T, V)`` in the compute dtype.
        hidden_states: ``None``, or an ordered mapping of named intermediates
            (``"embed"``, ``"layers.0"`` ... ``"layers.{L-1}"``, ``"norm"``), each ``(B, T, M)``.
    """

    logits: np.ndarray
    hidden_states: dict[str, np.ndarray] | None = None


def _name_list(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(arch: Architecture, config, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the required tensors of ``weights``, after checking names and shapes.

    Tensors under the architecture's ``ignored_weights`` prefixes are dropped first; then
    its ``convert_weights`` (if any) rewrites another saved layout into the names of
    ``weight_shapes`` (transformers' fused expert stacks into per-expert tensors).

    Raises:
        MissingWeightsError: required tensors are absent (they are named).
        UnexpectedWeightsError: tensors the architecture does not use are present.
        WeightShapeError: a tensor's shape does not match the config.
        CheckpointError: a tensor holds NaN or Inf, or ``convert_weights`` refuses the
            layout (a MoE layer mixing fused and per-expert tensors).
    """
    shapes = arch.weight_shapes(config)
    optional = arch.optional_weights(config)
    ignored = tuple(arch.ignored_weights(config)) if arch.ignored_weights is not None else ()
    if ignored:
        weights = {name: w for name, w in weights.items() if not name.startswith(ignored)}
    if arch.convert_weights is not None:
        weights = arch.convert_weights(config, weights)
    missing = set(shapes) - set(weights)
    if missing:
        raise MissingWeightsError(f"checkpoint lacks {len(missing)} weight(s): {_name_list(missing)}")
    unexpected = set(weights) - set(shapes) - set(optional)
    if unexpected:
        raise UnexpectedWeightsError(f"checkpoint has {len(unexpected)} unexpected weight(s): {_name_list(unexpected)}")
    for name, source in optional.items():
        if name in weights and not np.array_equal(weights[name], weights[source]):
            raise UnexpectedWeightsError(f"'{name}' is present but differs from '{source}', which it must equal")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise WeightShapeError(f"weight '{name}' has shape {tuple(weights[name].shape)}, config needs {tuple(shape)}")
        if not np.isfinite(weights[name]).all():
            raise CheckpointError(f"weight '{name}' holds NaN or Inf values")
    return {name: weights[name] for name in shapes}


class Model:
    """A loaded model: ``model(input_ids) -> logits``.

    Attributes:
        architecture: the registry entry.
        config: the frozen config dataclass.
        weights: ``{Hugging Face name: array}``, all in ``dtype``.
        dtype: the compute dtype (float64 or float32).
    """

    def __init__(self, architecture: Architecture, config, weights: dict[str, np.ndarray], dtype=np.float64):
        self.architecture = architecture
        self.config = config
        self.dtype = resolve_dtype(dtype)
        checked = check_weights(architecture, config, weights)
        self.weights = {name: np.ascontiguousarray(w, dtype=self.dtype) for name, w in checked.items()}

    def forward(self, input_ids, return_hidden_states: bool = False) -> ModelOutput:
        """Run the model on token ids.

        Args:
            input_ids: integer array ``(B, T)``.
            return_hidden_states: also return the named per-layer hidden states.

        Returns:
            :class:`ModelOutput` with logits ``(B, T, V)`` in the compute dtype.

        Raises:
            InputError: ids not integer, not 2-D, or outside ``[0, vocab_size)``.
        """
        ids = check_token_ids(input_ids, self.config.vocab_size)
        logits, taps = self.architecture.forward(self.weights, self.config, ids)
        return ModelOutput(logits=logits, hidden_states=taps if return_hidden_states else None)

    def __call__(self, input_ids) -> np.ndarray:
        """Logits ``(B, T, V)`` for integer token ids ``(B, T)``."""
        return self.forward(input_ids).logits


def from_pretrained(path, dtype=np.float64) -> Model:
    """Load a Hugging Face checkpoint directory into a :class:`Model`.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``).
        dtype: compute dtype, ``np.float64`` (default) or ``np.float32``.

    Raises:
        CheckpointError: files missing or unreadable.
        UnknownArchitectureError: config.json names an architecture not in the registry.
        ConfigError: a config field is missing, mistyped or unsupported.
        MissingWeightsError / UnexpectedWeightsError / WeightShapeError: tensors do not
            match the architecture.
    """
    raw = read_config(path)
    path = Path(path)
    arch = get_architecture(raw)
    config = arch.config_class.from_dict(raw)
    return Model(arch, config, read_weights(path), dtype=dtype)
