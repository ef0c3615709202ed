"""What the loader and the model object need to know about one architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Architecture:
    """One entry of the registry; each ``refimpl.models.<name>`` module defines ``ARCHITECTURE``.

    Attributes:
        name: the config.json ``architectures`` entry, e.g. ``"Qwen3ForCausalLM"``.
        config_class: frozen dataclass with ``from_dict(raw) -> config``.
        forward: ``(weights, config, input_ids) -> (logits, taps)``; taps map
            ``"embed"``, ``"layers.{l}"`` and ``"norm"`` to ``(B, T, M)`` arrays.
        weight_shapes: ``config -> {tensor name: shape}`` of the required tensors.
        optional_weights: ``config -> {name: source}``: names that may be present and
            are then ignored if they equal the tensor ``source`` (tied heads saved twice).
        presets: real flagship configs (config.json dicts), keyed by model name.
        citations: where the math and the presets come from.
        weight_init: optional ``(name, shape, rng) -> array or None`` used by the golden
            generator for tensors the default rule draws badly (input-major fused
            experts, correction biases, sinks); None, or a None return, keeps the default.
        ignored_weights: optional ``config -> tuple of name prefixes``: tensors a published
            checkpoint carries that the forward does not use (GLM-4.5's multi-token-prediction
            layer ``model.layers.{L}.*``); dropped unread before the name and shape checks.
        convert_weights: optional ``(config, weights) -> weights``: rewrites another saved
            layout of the same tensors into the names of ``weight_shapes``, after
            ``ignored_weights`` and before the name and shape checks (transformers' fused
            expert stacks, ``save_pretrained(save_original_format=False)``, into the
            per-expert tensors of published checkpoints). Exact (slicing and renaming only),
            returns a checkpoint already in the ``weight_shapes`` layout unchanged, and
            raises a CheckpointError (naming the layer) for a layout it cannot convert.
    """

    name: str
    config_class: Any
    forward: Callable
    weight_shapes: Callable
    optional_weights: Callable
    presets: dict[str, dict]
    citations: tuple[str, ...]
    weight_init: Callable | None = None
    ignored_weights: Callable | None = None
    convert_weights: Callable | None = None
