"""Deliberately wrong backends: each makes one mistake engines have shipped.

Each is the reference with one component swapped for a wrong variant, so the only
difference from a correct backend is that mistake. Used as
``--backend broken_backends:<factory>`` (with ``tests/`` on the import path).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from unittest import mock

import numpy as np

from conformance.backends.refimpl_backend import RefimplBackend, RefimplModel
from refimpl.attention import grouped_query_attention
from refimpl import kv_cache
from refimpl.models import gemma3, olmo2, qwen3
from refimpl.rmsnorm import rms_norm


def rope_interleaved(x, cos, sin):
    """RoPE pairing channels (2i, 2i+1) instead of (i, i + D/2): the GPT-J layout."""
    c, s = cos[..., None, :], sin[..., None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


def rms_norm_eps_outside_root(x, weight, eps):
    """``w * x / (sqrt(mean(x^2)) + eps)``: eps added after the root."""
    return weight * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + x.dtype.type(eps))


def rms_norm_qk_over_all_heads(x, weight, eps):
    """QK-norm statistics over all heads of a token at once instead of per head (the
    OLMo 2 placement applied to a per-head model); other norms unchanged."""
    if x.ndim != 4:
        return rms_norm(x, weight, eps)
    return weight * x / np.sqrt(np.mean(x * x, axis=(-2, -1), keepdims=True) + x.dtype.type(eps))


def gqa_heads_modulo(q, k, v, mask, scale, **kwargs):
    """Query head h reads key/value head h % Hkv instead of h // (H / Hkv)."""
    reps = q.shape[2] // k.shape[2]
    return grouped_query_attention(q, np.tile(k, (1, 1, reps, 1)), np.tile(v, (1, 1, reps, 1)), mask, scale,
                                   **kwargs)


_visibility = kv_cache.visibility


def visibility_window_one_too_wide(context, visible, *, sliding_window=None, attention_chunk_size=None):
    """:func:`refimpl.kv_cache.visibility` with a window of W + 1 keys (SWA-01)."""
    return _visibility(context, visible, sliding_window=None if sliding_window is None else sliding_window + 1,
                               attention_chunk_size=attention_chunk_size)


class _PatchedModel(RefimplModel):
    def __init__(self, model, patch):
        super().__init__(model)
        self._patch = patch

    def run(self, input_ids):
        with self._patch():
            return super().run(input_ids)


class _BrokenBackend(RefimplBackend):
    def __init__(self, name, patch=nullcontext, edit_weights=None):
        self.name = name
        self._patch = patch
        self._edit_weights = edit_weights

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype).model
        if self._edit_weights is not None:
            self._edit_weights(model.weights)
        return _PatchedModel(model, self._patch)


def interleaved_rope() -> _BrokenBackend:
    return _BrokenBackend("broken:interleaved-rope",
                          lambda: mock.patch.object(qwen3, "apply_rope_rotate_half", rope_interleaved))


def eps_outside_root() -> _BrokenBackend:
    return _BrokenBackend("broken:eps-outside-root",
                          lambda: mock.patch.object(qwen3, "rms_norm", rms_norm_eps_outside_root))


def gemma_final_norm() -> _BrokenBackend:
    """The final norm applied as ``(1 + w)``, as if it were a Gemma norm."""
    return _BrokenBackend("broken:final-norm-1+w",
                          edit_weights=lambda w: w.__setitem__("model.norm.weight", w["model.norm.weight"] + 1))


def qk_norm_over_all_heads() -> _BrokenBackend:
    return _BrokenBackend("broken:qk-norm-over-all-heads",
                          lambda: mock.patch.object(qwen3, "rms_norm", rms_norm_qk_over_all_heads))


def gqa_modulo() -> _BrokenBackend:
    return _BrokenBackend("broken:gqa-h-mod-hkv",
                          lambda: mock.patch.object(kv_cache, "grouped_query_attention", gqa_heads_modulo))


def sliding_window_plus_one() -> _BrokenBackend:
    return _BrokenBackend("broken:window-plus-one",
                          lambda: mock.patch.object(kv_cache, "visibility", visibility_window_one_too_wide))


def window_without_flag() -> _BrokenBackend:
    """Sliding window applied whenever config.json has ``sliding_window``, ignoring
    ``use_sliding_window`` (the Qwen2-family engine mistake)."""
    import json

    class WindowWithoutFlag(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            raw = json.loads((checkpoint_dir / "config.json").read_text())
            if raw.get("sliding_window"):
                config = model.model.config
                types = tuple("sliding_attention" if i >= config.max_window_layers else "full_attention"
                              for i in range(config.num_hidden_layers))
                model.model.config = dataclasses.replace(config, sliding_window=raw["sliding_window"], layer_types=types)
            return model

    return WindowWithoutFlag("broken:window-without-flag")


class _ConfigEdit(_BrokenBackend):
    """The reference with its parsed config rewritten: a mistake in reading config.json."""

    def __init__(self, name, edit, patch=nullcontext):
        super().__init__(name, patch)
        self._edit = edit

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        model.model.config = self._edit(model.model.config)
        return model


def gemma3_all_layers_sliding() -> _BrokenBackend:
    """PAT-01/02: the per-layer schedule lost; every layer windowed (global layers fall back to the window)."""
    return _ConfigEdit("broken:PAT-all-sliding", lambda c: dataclasses.replace(
        c, layer_types=("sliding_attention",) * c.num_hidden_layers) if hasattr(c, "query_pre_attn_scalar") else c)


def gemma3_scale_from_head_dim() -> _BrokenBackend:
    """SCL-01: attention scaled by head_dim^-0.5, ignoring query_pre_attn_scalar."""
    return _ConfigEdit("broken:SCL-head-dim", lambda c: dataclasses.replace(
        c, query_pre_attn_scalar=float(c.head_dim)) if hasattr(c, "query_pre_attn_scalar") else c)


def gemma3_scale_from_hidden_per_head() -> _BrokenBackend:
    """SCL-01: attention scaled by (hidden_size / num_attention_heads)^-0.5, right for the 27B only."""
    return _ConfigEdit("broken:SCL-hidden-per-head", lambda c: dataclasses.replace(
        c, query_pre_attn_scalar=float(c.hidden_size // c.num_attention_heads))
        if hasattr(c, "query_pre_attn_scalar") else c)


def gemma3_final_softcap_hardcoded_30() -> _BrokenBackend:
    """CAP-02: whenever a final soft-cap is configured, 30 is used."""
    return _ConfigEdit("broken:CAP-final-30", lambda c: dataclasses.replace(
        c, final_logit_softcapping=30.0) if getattr(c, "final_logit_softcapping", None) else c)


def gemma3_final_softcap_dropped() -> _BrokenBackend:
    """CAP-05/06: final_logit_softcapping read but never applied."""
    return _ConfigEdit("broken:CAP-final-dropped", lambda c: dataclasses.replace(
        c, final_logit_softcapping=None) if hasattr(c, "final_logit_softcapping") else c)


def gemma3_norm_without_offset() -> _BrokenBackend:
    """NRM-02: Gemma's RMSNorm computed as w * x instead of (1 + w) * x."""
    return _BrokenBackend("broken:NRM-gemma-w", lambda: mock.patch.object(
        gemma3, "rms_norm", lambda x, weight, eps, weight_offset=0.0: rms_norm(x, weight, eps)))


def smollm3_rope_everywhere() -> _BrokenBackend:
    """NOPE-01: ``no_rope_layers`` / ``no_rope_layer_interval`` never read; every layer applies RoPE."""
    return _ConfigEdit("broken:NOPE-rope-everywhere", lambda c: dataclasses.replace(
        c, no_rope_layers=(1,) * c.num_hidden_layers) if hasattr(c, "no_rope_layers") else c)


def olmo2_qk_norm_per_head() -> _BrokenBackend:
    """QKN-02: OLMo 2's QK-norm (over the whole H*D projection) computed per head over D."""
    original = olmo2.attention_block

    def per_head_block(h, p, config, *args, **kwargs):
        d = config.head_dim

        def per_head(x, weight, eps):
            heads = x.reshape(*x.shape[:-1], -1, d)
            normed = heads / np.sqrt(np.mean(heads * heads, axis=-1, keepdims=True) + x.dtype.type(eps))
            return weight * normed.reshape(x.shape)

        with mock.patch.object(olmo2, "rms_norm", per_head):
            return original(h, p, config, *args, **kwargs)

    return _BrokenBackend("broken:QKN-olmo2-per-head", lambda: mock.patch.object(olmo2, "attention_block", per_head_block))


class _DefaultEps(_ConfigEdit):
    """``rms_norm_eps`` never read: every norm of a ``config_class`` model (QK-norms too) runs at the
    engine's fixed ``eps``; other architectures are left alone."""

    def __init__(self, name, config_class, eps):
        super().__init__(name, lambda c: dataclasses.replace(c, rms_norm_eps=eps) if isinstance(c, config_class) else c)


class _FinalNormEps(_BrokenBackend):
    """The final norm of a ``config_class`` model run at a fixed ``eps`` (the engine's own final-norm
    module not given the config's); every other norm reads ``rms_norm_eps``; other architectures are left alone.

    ``module`` is the one whose ``rms_norm`` global computes the final norm; that norm is told
    apart from the layer norms computed there too by its weight, the array ``model.norm.weight``.
    """

    def __init__(self, name, config_class, module, eps):
        super().__init__(name)
        self._config_class, self._module, self._eps = config_class, module, eps

    def load_model(self, checkpoint_dir, dtype):
        loaded = super().load_model(checkpoint_dir, dtype)
        if not isinstance(loaded.model.config, self._config_class):
            return loaded
        final, fixed = loaded.model.weights["model.norm.weight"], self._eps

        def norm(x, weight, eps, *args, **kwargs):
            return rms_norm(x, weight, fixed if weight is final else eps, *args, **kwargs)

        loaded._patch = lambda: mock.patch.object(self._module, "rms_norm", norm)
        return loaded
