"""Architecture registry: the ``architectures`` entry of config.json to its code.

One literal dict. Adding an architecture is one visible entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import UnknownArchitectureError
from .models import qwen3


@dataclass(frozen=True)
class Architecture:
    """Everything the loader and the model object need to know about one architecture.

    Attributes:
        name: the config.json ``architectures`` entry, e.g. ``"Qwen3ForCausalLM"``.
        config_class: frozen dataclass with ``from_dict(raw) -> config``.
        forward: ``(weights, config, input_ids) -> (logits, taps)``.
        weight_shapes: ``config -> {tensor name: shape}`` of the required tensors.
        optional_weights: names that may be present and are then ignored if they
            equal the tensor named as value (tied heads saved twice).
        presets: real flagship configs (config.json dicts), keyed by model name.
        citations: where the math and the presets come from.
    """

    name: str
    config_class: Any
    forward: Callable
    weight_shapes: Callable
    optional_weights: Callable
    presets: dict[str, dict]
    citations: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3ForCausalLM": Architecture(
        name="Qwen3ForCausalLM",
        config_class=qwen3.Qwen3Config,
        forward=qwen3.forward,
        weight_shapes=qwen3.weight_shapes,
        optional_weights=lambda config: (
            {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
        ),
        presets=qwen3.PRESETS,
        citations=(
            "Qwen3 Technical Report, arXiv:2505.09388",
            "transformers 5.24 models/qwen3/modeling_qwen3.py",
        ),
    ),
}


def get_architecture(raw_config: dict) -> Architecture:
    """Look up the architecture named by a parsed config.json.

    Raises:
        UnknownArchitectureError: ``architectures`` is missing, not a one-element
            list, or names an unsupported architecture (the supported ones are listed).
    """
    names = raw_config.get("architectures")
    supported = ", ".join(sorted(ARCHITECTURES))
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise UnknownArchitectureError(
            f"config.json must name exactly one entry in 'architectures' (got {names!r}); supported: {supported}"
        )
    if names[0] not in ARCHITECTURES:
        raise UnknownArchitectureError(f"unknown architecture '{names[0]}'; supported: {supported}")
    return ARCHITECTURES[names[0]]
