"""Deliberately wrong gpt-oss backends: each makes one mistake engines have shipped.

Each is the reference with one gpt-oss component swapped for a wrong variant (the
pattern of ``tests/broken_backends.py``), used as ``--backend broken_gpt_oss:<factory>``
with ``tests/`` on the import path. Every mistake is written out here in full; none
calls the component it replaces with a changed argument.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit, _DefaultEps, _FinalNormEps
from refimpl import kv_cache
from refimpl.attention import grouped_query_attention
from refimpl.routers import router_logits
from refimpl.models import _llama_like, gpt_oss


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _expert(activation):
    """A gpt-oss expert ``(act(x W + b)) D + d`` with ``activation(h)`` in place of the interleaved clamped SwiGLU."""
    def expert(x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *, swiglu_limit, alpha=1.702):
        h = x @ gate_up_proj + gate_up_proj_bias
        return activation(h, swiglu_limit, alpha) @ down_proj + down_proj_bias
    return expert


def _no_clamp(h, limit, alpha):
    """ACT-02: the limit never reaches the kernel."""
    g, u = h[:, 0::2], h[:, 1::2]
    return (u + 1) * g * _sigmoid(alpha * g)


def _clamp_after_activation(h, limit, alpha):
    """Ling / GLM-5 clamp form ``min(act(gate), L) * clip(up, -L, L)`` in place of gpt-oss's ``act(min(gate, L))``."""
    g, u = h[:, 0::2], np.clip(h[:, 1::2], -limit, limit)
    return (u + 1) * np.minimum(g * _sigmoid(alpha * g), limit)


def _concatenated_halves(h, limit, alpha):
    """ACT-04: gate = first half, up = second half, as in every concatenated-SwiGLU checkpoint."""
    i = h.shape[1] // 2
    g, u = np.minimum(h[:, :i], limit), np.clip(h[:, i:], -limit, limit)
    return (u + 1) * g * _sigmoid(alpha * g)


def _without_plus_one(h, limit, alpha):
    """The linear half without gpt-oss's ``+ 1`` (plain gated form)."""
    g, u = np.minimum(h[:, 0::2], limit), np.clip(h[:, 1::2], -limit, limit)
    return u * g * _sigmoid(alpha * g)


def _alpha_one(h, limit, alpha):
    """``sigmoid(gate)`` (SiLU) in place of ``sigmoid(1.702 gate)``."""
    g, u = np.minimum(h[:, 0::2], limit), np.clip(h[:, 1::2], -limit, limit)
    return (u + 1) * g * _sigmoid(g)


def _expert_backend(name, activation) -> _BrokenBackend:
    return _BrokenBackend(name, lambda: mock.patch.object(gpt_oss, "clamped_swiglu_expert", _expert(activation)))


def clamp_dropped() -> _BrokenBackend:
    return _expert_backend("broken:ACT-02-no-clamp", _no_clamp)


def clamp_after_activation() -> _BrokenBackend:
    return _expert_backend("broken:ACT-02-min-silu-L", _clamp_after_activation)


def gate_up_concatenated() -> _BrokenBackend:
    return _expert_backend("broken:ACT-04-concatenated", _concatenated_halves)


def missing_plus_one() -> _BrokenBackend:
    return _expert_backend("broken:no-plus-one", _without_plus_one)


def alpha_one() -> _BrokenBackend:
    return _expert_backend("broken:alpha-1", _alpha_one)


def _attention_without_sinks(q, k, v, mask, scale, *, sinks=None, softcap=None):
    return grouped_query_attention(q, k, v, mask, scale, softcap=softcap)


def sink_dropped() -> _BrokenBackend:
    """SINK-01: the sink logit never reaches the softmax denominator (gpt-oss attends through
    :func:`refimpl.kv_cache.attend_with_cache`, which alone passes sinks there)."""
    return _BrokenBackend("broken:SINK-01", lambda: mock.patch.object(
        kv_cache, "grouped_query_attention", _attention_without_sinks))


def _swap_types(config):
    swapped = {"sliding_attention": "full_attention", "full_attention": "sliding_attention"}
    return dataclasses.replace(config, layer_types=tuple(swapped[t] for t in config.layer_types))


def window_on_wrong_layers() -> _BrokenBackend:
    """PAT / PAT-05: the window on the odd layers (and full attention on the even ones)."""
    return _ConfigEdit("broken:PAT-odd-layers-slide", _swap_types)


def window_plus_one() -> _BrokenBackend:
    """SWA-01 / SWA-05: W + 1 visible keys (the window taken as a radius)."""
    return _ConfigEdit("broken:SWA-W+1", lambda c: dataclasses.replace(c, sliding_window=c.sliding_window + 1))


def _softmax_over_all_then_top_k(router_logits, top_k):
    e = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    indices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    return np.take_along_axis(probs, indices, axis=-1), indices


def router_softmax_over_all() -> _BrokenBackend:
    """Softmax over all E experts, then the top-k probabilities, not renormalised (spec quirk 4.3.4, reading A)."""
    return _BrokenBackend("broken:router-softmax-all-E", lambda: mock.patch.object(
        gpt_oss, "top_k_softmax", _softmax_over_all_then_top_k))


def _router_logits_without_bias(x, weight, bias=None):
    """The router projection without its bias."""
    return router_logits(x, weight)


def router_bias_dropped() -> _BrokenBackend:
    return _BrokenBackend("broken:router-bias-dropped", lambda: mock.patch.object(
        gpt_oss, "router_logits", _router_logits_without_bias))


def _moe_block_unweighted_down_bias(hidden_states, weights, config):
    """gpt-oss's MoE block with the down bias added once per chosen expert, outside the routing weight."""
    b, t, m = hidden_states.shape
    x = hidden_states.reshape(b * t, m)
    logits = x @ weights["router.weight"].T + weights["router.bias"]
    indices = np.argsort(-logits, axis=-1, kind="stable")[:, :config.num_experts_per_tok]
    chosen = np.take_along_axis(logits, indices, axis=-1)
    routing = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
    routing = routing / routing.sum(axis=-1, keepdims=True)
    limit, alpha = config.swiglu_limit, config.swiglu_alpha
    out = np.zeros_like(x)
    for n in range(b * t):
        for slot, e in enumerate(indices[n]):
            h = x[n] @ weights["experts.gate_up_proj"][e] + weights["experts.gate_up_proj_bias"][e]
            g, u = np.minimum(h[0::2], limit), np.clip(h[1::2], -limit, limit)
            a = (u + 1) * g * _sigmoid(alpha * g)
            out[n] += routing[n, slot] * (a @ weights["experts.down_proj"][e]) + weights["experts.down_proj_bias"][e]
    return out.reshape(b, t, m)


def down_bias_unweighted() -> _BrokenBackend:
    """The expert down bias added after the weighted sum (e.g. once per expert on every rank), not scaled by w."""
    return _BrokenBackend("broken:down-bias-unweighted", lambda: mock.patch.object(
        gpt_oss, "moe_block", _moe_block_unweighted_down_bias))


def _rope_edit(edit):
    return lambda c: dataclasses.replace(c, rope_parameters=edit(dict(c.rope_parameters)))


def yarn_magnitude_dropped() -> _BrokenBackend:
    """RSC-12: YaRN frequencies without the magnitude factor (0.1 ln s + 1) on cos and sin."""
    return _ConfigEdit("broken:RSC-12-no-magnitude", _rope_edit(lambda p: {**p, "attention_factor": 1.0}))


def plain_rope_for_yarn() -> _BrokenBackend:
    """PAT-05: a RoPE kernel that computes plain RoPE at the same base for a YaRN config."""
    return _ConfigEdit("broken:PAT-05-plain-rope", _rope_edit(
        lambda p: {"rope_type": "default", "rope_theta": p["rope_theta"]}))


def yarn_truncated() -> _BrokenBackend:
    """``truncate: false`` ignored: the correction range floored / ceiled as by default."""
    return _ConfigEdit("broken:yarn-truncate-ignored", _rope_edit(lambda p: {**p, "truncate": True}))


def _transpose_square_down_proj(weights):
    """A loader that tells the expert down_proj orientation by its shape: (M, I) is out-major and gets
    transposed, (I, M) is kept; a square stack (I == M) is taken as out-major and transposed."""
    for name, w in weights.items():
        if name.endswith("experts.down_proj") and w.shape[-1] == w.shape[-2]:
            weights[name] = np.ascontiguousarray(np.swapaxes(w, -1, -2))


def down_proj_orientation_from_shape() -> _BrokenBackend:
    return _BrokenBackend("broken:down-proj-orientation-from-shape", edit_weights=_transpose_square_down_proj)


def eps_default() -> _BrokenBackend:
    """``rms_norm_eps`` never read: transformers' gpt-oss default 1e-5 in every norm."""
    return _DefaultEps("broken:eps-default-1e-5", gpt_oss.GptOssConfig, 1e-5)


def final_norm_eps_default() -> _BrokenBackend:
    """The final norm at a fixed 1e-5, the layer norms at ``rms_norm_eps``."""
    return _FinalNormEps("broken:final-norm-eps-1e-5", gpt_oss.GptOssConfig, _llama_like, 1e-5)
