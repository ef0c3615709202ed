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
        mtp: optional :class:`MtpHook`: the multi-token-prediction modules a checkpoint may
            carry besides the main model (DeepSeek-V3, GLM-4.5, Qwen3-Next); see :mod:`refimpl.mtp`.
        float32_weights: name suffixes of the tensors a model in float16 / bfloat16 holds in
            float32, as engines do whatever the model dtype (transformers'
            ``_keep_in_fp32_modules_strict``: DeepSeek-V3's and GLM-4.5's router weight and
            ``e_score_correction_bias``); the functions reading them widen the storage-dtype
            operands beside them (:func:`refimpl.routers.router_logits`). Empty: none.
        forward_step: ``(weights, config, input_ids, context) -> (logits, taps, caches)``: the
            forward over one call's new tokens given a :class:`refimpl.kv_cache.StepContext`
            (their positions, padding and the layers' caches from the previous call); returns
            the caches for the next call, one per layer. ``forward`` is this with a fresh
            context. None: the architecture has no incremental decoding.
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
    mtp: "MtpHook | None" = None
    forward_step: Callable | None = None
    float32_weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class MtpHook:
    """What the model object needs for an architecture's multi-token-prediction (MTP) modules.

    The MTP tensors are optional: a checkpoint without them (or with an incomplete set)
    loads as the main model only, and asking it for draft logits names what is missing.

    Attributes:
        weight_shapes: ``config -> {tensor name: shape}`` of every MTP depth's tensors, in
            the checkpoint's names (``model.layers.{L + k - 1}.*`` for DeepSeek-V3 and GLM-4.5,
            ``mtp.*`` for Qwen3-Next); empty when the config declares no depth. The names may lie under the
            architecture's ``ignored_weights`` prefixes (the main model never reads them). A ConfigError
            here (a depth count the reference cannot draft for) refuses the drafts only, when asked for.
        prefixes: ``config -> tuple of name prefixes`` under which the MTP tensors live
            (``model.layers.{L + k - 1}.``); any other tensor there is unexpected.
        copies: ``config -> {name: source}``: tensors an MTP depth may carry that must equal
            a main-model tensor (DeepSeek-V3's per-depth ``embed_tokens`` and ``shared_head.head``).
        forward: ``(weights, config, input_ids, main_hidden) -> [draft logits of depth k]``:
            ``weights`` holds the main and the MTP tensors, ``main_hidden`` is the main
            model's final-normed hidden state ``(B, T, M)``; depth k's logits are ``(B, T-k, V)``.
    """

    weight_shapes: Callable
    prefixes: Callable
    copies: Callable
    forward: Callable
