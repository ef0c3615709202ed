"""Deliberately wrong Llama 4 backends: each is the reference with one mistake engines have made.

Used as ``--backend broken_llama4:<factory>`` (with ``tests/`` on the import path), the
pattern of ``tests/broken_backends.py``: a component of ``refimpl.models.llama4`` patched
for the run, the parsed config rewritten, or the loaded weights edited.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit
from refimpl import kv_cache
from refimpl.attention import grouped_query_attention
from refimpl.models import llama4
from refimpl.moe import dispatch
from refimpl.rmsnorm import rms_normalize
from refimpl.rope import apply_rope_interleaved, apply_rope_rotate_half
from refimpl.routers import top_k_softmax

_is_llama4 = lambda c: isinstance(c, llama4.Llama4TextConfig)  # noqa: E731


def router_weight_on_output() -> _BrokenBackend:
    """ACT-07/08: ``sum_j s_j * Expert(x)`` (Mixtral style) instead of ``sum_j Expert(s_j * x)``."""
    def on_output(x, weights, indices, expert, num_experts, *, weight_on="output"):
        return dispatch(x, weights, indices, expert, num_experts, weight_on="output")

    return _BrokenBackend("broken:ACT-router-weight-on-output",
                          lambda: mock.patch.object(llama4, "dispatch", on_output))


def router_softmax() -> _BrokenBackend:
    """Router read as Mixtral's: softmax over the top-k logits instead of an unnormalised
    sigmoid (with top-1 every chosen expert gets weight 1)."""
    return _BrokenBackend("broken:MOE-llama4-softmax-router",
                          lambda: mock.patch.object(llama4, "llama4_top_k_sigmoid", top_k_softmax))


def shared_expert_dropped() -> _BrokenBackend:
    """The always-on shared expert left out of every MoE layer (its output zeroed)."""
    def drop(weights):
        for name in weights:
            if name.endswith("feed_forward.shared_expert.down_proj.weight"):
                weights[name] = np.zeros_like(weights[name])

    return _BrokenBackend("broken:MOE-shared-expert-dropped", edit_weights=drop)


def _chunked_visibility(same_chunk):
    """:func:`refimpl.kv_cache.visibility` with the chunk rule ``same_chunk(key_pos, query_pos, C)``
    in place of ``j // C == p // C`` (only Llama 4's chunked layers pass ``attention_chunk_size``)."""
    original = kv_cache.visibility

    def visibility(context, visible, *, sliding_window=None, attention_chunk_size=None):
        if attention_chunk_size is None:
            return original(context, visible, sliding_window=sliding_window)
        p = context.positions[:, :, None]
        j = visible.positions[:, None, :]
        return visible.valid[:, None, :] & (j <= p) & same_chunk(j, p, attention_chunk_size)

    return lambda: mock.patch.object(kv_cache, "visibility", visibility)


def chunk_boundary_off_by_one() -> _BrokenBackend:
    """Chunks counted from 1-based positions: ``(j + 1) // C == (p + 1) // C``, so every
    boundary sits one token early (the last token of a chunk starts the next one)."""
    return _BrokenBackend("broken:CHK-boundary-off-by-one", _chunked_visibility(
        lambda j, p, chunk: (j + 1) // chunk == (p + 1) // chunk))


def chunk_as_sliding_window() -> _BrokenBackend:
    """Chunked attention implemented as a sliding window of C keys (the SWA path reused)."""
    return _BrokenBackend("broken:CHK-sliding-window", _chunked_visibility(lambda j, p, chunk: p - j < chunk))


def rope_on_nope_layers() -> _BrokenBackend:
    """NOPE-01: ``no_rope_layers`` never read; every layer is treated as a RoPE layer
    (rotated, QK-normed, no temperature), masks still from ``layer_types``."""
    return _ConfigEdit("broken:NOPE-rope-everywhere", lambda c: dataclasses.replace(
        c, no_rope_layers=(1,) * c.num_hidden_layers) if _is_llama4(c) else c)


def temperature_missing() -> _BrokenBackend:
    """iRoPE temperature tuning never applied (``attn_temperature_tuning`` ignored)."""
    return _ConfigEdit("broken:TEMP-missing", lambda c: dataclasses.replace(
        c, attn_temperature_tuning=False) if _is_llama4(c) else c)


def temperature_on_rope_layers() -> _BrokenBackend:
    """The query temperature applied on RoPE layers as well as on NoPE layers."""
    original_block, original_qk = llama4.attention_block, llama4.rope_layer_qk

    def block(x, p, config, layer, rope, context):
        def with_temperature(q, k, cos, sin, config):
            q, k = original_qk(q, k, cos, sin, config)
            return llama4.nope_layer_qk(q, k, config, context.positions)

        with mock.patch.object(llama4, "rope_layer_qk", with_temperature):
            return original_block(x, p, config, layer, rope, context)

    return _BrokenBackend("broken:TEMP-on-rope-layers", lambda: mock.patch.object(llama4, "attention_block", block))


def qk_norm_before_rope() -> _BrokenBackend:
    """QK-norm placed before RoPE instead of after (the Qwen3 / GLM order). Weight-less, the
    norm commutes with a rotation: this is the same function up to rounding."""
    def norm_then_rope(q, k, cos, sin, config):
        if config.use_qk_norm:
            q, k = rms_normalize(q, config.rms_norm_eps), rms_normalize(k, config.rms_norm_eps)
        return apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)

    return _BrokenBackend("broken:QKN-before-rope", lambda: mock.patch.object(llama4, "rope_layer_qk", norm_then_rope))


def qk_norm_on_nope_layers() -> _BrokenBackend:
    """QK-norm applied on every layer when ``use_qk_norm``, NoPE layers included."""
    original = llama4.nope_layer_qk

    def normed(q, k, config, positions):
        if config.use_qk_norm:
            q, k = rms_normalize(q, config.rms_norm_eps), rms_normalize(k, config.rms_norm_eps)
        return original(q, k, config, positions)

    return _BrokenBackend("broken:QKN-on-nope-layers", lambda: mock.patch.object(llama4, "nope_layer_qk", normed))


def qk_norm_dropped() -> _BrokenBackend:
    """QKN-06: ``use_qk_norm`` ignored; no QK-norm anywhere."""
    return _ConfigEdit("broken:QKN-dropped", lambda c: dataclasses.replace(
        c, use_qk_norm=False) if _is_llama4(c) else c)


def rotate_half_rope() -> _BrokenBackend:
    """RoPE pairing channels (i, i + D/2) (NeoX / Llama 3) instead of Llama 4's (2i, 2i + 1)."""
    return _BrokenBackend("broken:ROPE-rotate-half",
                          lambda: mock.patch.object(llama4, "apply_rope_interleaved", apply_rope_rotate_half))


def qk_norm_fixed_eps() -> _BrokenBackend:
    """The weight-less QK-norm with a fixed eps 1e-6 (Llama 4's L2Norm default) instead of ``rms_norm_eps``
    (transformers builds ``Llama4TextL2Norm(config.rms_norm_eps)``)."""
    def fixed(x, eps):
        return rms_normalize(x, 1e-6)

    return _BrokenBackend("broken:QKN-eps-1e-6", lambda: mock.patch.object(llama4, "rms_normalize", fixed))


def attention_scale_from_hidden_per_head() -> _BrokenBackend:
    """SCL: scores scaled by (hidden_size / num_attention_heads)^-0.5 instead of head_dim^-0.5 (the two
    agree in every released Llama 4: 5120 / 40 = 128 = head_dim)."""
    original = llama4.attention_block

    def block(x, p, config, *args, **kwargs):
        wrong = (config.hidden_size // config.num_attention_heads) ** -0.5

        def attention(q, k, v, mask, scale, **options):
            return grouped_query_attention(q, k, v, mask, wrong, **options)

        with mock.patch.object(kv_cache, "grouped_query_attention", attention):
            return original(x, p, config, *args, **kwargs)

    return _BrokenBackend("broken:SCL-hidden-per-head", lambda: mock.patch.object(llama4, "attention_block", block))
