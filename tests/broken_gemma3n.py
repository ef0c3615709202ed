"""Deliberately wrong Gemma 3n backends: each makes one mistake a port of Gemma 3n can make.

Each is the reference with one Gemma 3n component swapped for a wrong variant (the
pattern of ``tests/broken_backends.py``), used as ``--backend broken_gemma3n:<factory>``
with ``tests/`` on the import path. Every mistake is written out here in full.
"""

from __future__ import annotations

import dataclasses
import json
import re
from unittest import mock

import numpy as np
from safetensors.numpy import load_file

from broken_backends import _BrokenBackend, _ConfigEdit
from refimpl import per_layer_embedding
from refimpl.attention import grouped_query_attention
from refimpl.embedding import scaled_embed_tokens
from refimpl.linear import linear
from refimpl.models import gemma3n, gemma3n_conditional
from refimpl.rmsnorm import rms_norm

_NORM_SUFFIXES = ("norm.weight", "layernorm.weight")


def _on_text(edit):
    """A config edit of the decoder's config, inside the multimodal wrapper's config too."""

    def apply(config):
        if isinstance(config, gemma3n_conditional.Gemma3nConditionalConfig):
            return dataclasses.replace(config, text=edit(config.text))
        return edit(config)

    return apply


def _one_plus_w(weights):
    """Every RMSNorm weight read as an offset from 1, as Gemma 3 stores them (G3n-1)."""
    for name in weights:
        if name.endswith(_NORM_SUFFIXES):
            weights[name] = weights[name] + 1


def norms_one_plus_w() -> _BrokenBackend:
    """NRM: a Gemma 3 port reused for 3n computes ``(1 + w) * n(x)`` in every norm."""
    return _BrokenBackend("broken:NRM-1+w", edit_weights=_one_plus_w)


def _gqa_head_dim_scale(q, k, v, mask, scale, **kwargs):
    return grouped_query_attention(q, k, v, mask, q.shape[-1] ** -0.5, **kwargs)


def attention_scale_head_dim() -> _BrokenBackend:
    """G3n-2 / SCL: scores scaled by D^-1/2 (the usual default) instead of 1.0."""
    return _BrokenBackend("broken:SCL-head-dim", lambda: mock.patch.object(
        gemma3n, "grouped_query_attention", _gqa_head_dim_scale))


def v_norm_missing() -> _BrokenBackend:
    """G3n-3: values used as projected, without the weightless RMS normalisation."""
    return _BrokenBackend("broken:no-v-norm", lambda: mock.patch.object(gemma3n, "rms_normalize", lambda x, eps: x))


def _predict_transposed(streams, modalities, prediction_coefs):
    """Output row ``A*i + j`` read as the weight of stream i into stream j."""
    a = streams.shape[0]
    coefs = linear(modalities, prediction_coefs).reshape(*modalities.shape[:-1], a, a)
    mixing = np.moveaxis(coefs, (-1, -2), (0, 1))[..., None]
    return streams + np.sum(mixing * streams[None], axis=1)


def altup_layout_transposed() -> _BrokenBackend:
    """G3n-5: the [A*A, A] prediction coefficients reshaped without the transpose."""
    return _BrokenBackend("broken:altup-coefs-transposed", lambda: mock.patch.object(
        gemma3n, "altup_predict", _predict_transposed))


def _correct_without_one(predictions, activated, modalities, correction_coefs, active_idx):
    gains = linear(modalities, correction_coefs)
    return predictions + np.moveaxis(gains, -1, 0)[..., None] * (activated - predictions[active_idx])[None]


def correction_without_plus_one() -> _BrokenBackend:
    """G3n-6: the correction gains used as stored, without their + 1."""
    return _BrokenBackend("broken:altup-correct-no-plus-one", lambda: mock.patch.object(
        gemma3n, "altup_correct", _correct_without_one))


def _router_sqrt_scale(x, router_norm, modality_router, eps):
    normed = rms_norm(x, router_norm, eps)
    return np.tanh(linear(normed * normed.dtype.type(normed.shape[-1] ** -0.5), modality_router))


def router_scale_sqrt() -> _BrokenBackend:
    """G3n-4: the router input scaled by M^-1/2 (the usual attention-style scale) instead of M^-1."""
    return _BrokenBackend("broken:altup-router-sqrt", lambda: mock.patch.object(
        gemma3n, "router_modalities", _router_sqrt_scale))


def ple_into_every_stream() -> _BrokenBackend:
    """G3n-7: the per-layer input added to all A streams, stream 0 included."""
    return _BrokenBackend("broken:ple-all-streams", lambda: mock.patch.object(
        gemma3n, "inject_per_layer_input", lambda streams, update: streams + update))


def _ids_clamped_to_last_row(input_ids, vocab_size_per_layer_input):
    """Out-of-table ids clipped to the last row (``clamp(ids, 0, V_pl - 1)``, as AI-Edge-Torch's port does)."""
    return np.clip(np.asarray(input_ids), 0, vocab_size_per_layer_input - 1).astype(np.int64)


def ple_ids_clamped_to_last_row() -> _BrokenBackend:
    """G3n-10: ids outside the per-layer table read its last row instead of row 0."""
    return _BrokenBackend("broken:ple-ids-last-row", lambda: mock.patch.object(
        per_layer_embedding, "per_layer_token_ids", _ids_clamped_to_last_row))


def _top_k_sample_std(gate, sparsity):
    from refimpl.activation_sparsity import gaussian_quantile

    mean = np.mean(gate, axis=-1, keepdims=True)
    std = np.std(gate, axis=-1, keepdims=True, ddof=1)
    return np.maximum(gate - (mean + std * gate.dtype.type(gaussian_quantile(sparsity))), 0)


def sparsity_sample_std() -> _BrokenBackend:
    """G3n-8: the cutoff from the sample standard deviation (torch.std's default, unbiased)."""
    return _BrokenBackend("broken:sparsity-unbiased-std", lambda: mock.patch.object(
        gemma3n, "gaussian_top_k", _top_k_sample_std))


def sparsity_skipped() -> _BrokenBackend:
    """G3n-8: activation_sparsity_pattern ignored; every MLP dense."""
    return _BrokenBackend("broken:sparsity-skipped", lambda: mock.patch.object(
        gemma3n, "gaussian_top_k", lambda gate, sparsity: gate))


def _first_producer(config):
    """KV consumers reading the *first* layer of their type instead of the last before the shared region."""
    first = {}
    for layer, tau in enumerate(config.layer_types):
        first.setdefault(tau, layer)
    sources = tuple(first[tau] if gemma3n.is_kv_consumer(config, l) else l for l, tau in enumerate(config.layer_types))
    return dataclasses.replace(config, kv_source_layers=sources)


def kv_from_first_producer() -> _BrokenBackend:
    """G3n-13: shared keys and values taken from the first layer of the type (``layer_types.index``)."""
    return _ConfigEdit("broken:kv-first-producer", _on_text(_first_producer))


class _GemmaThreePattern(_BrokenBackend):
    """Layer types from Gemma 3's pattern 6 when config.json lists none (G3n-12, PAT)."""

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        raw = json.loads((checkpoint_dir / "config.json").read_text())
        text = raw.get("text_config", raw)
        if text.get("layer_types") is None:
            layers = text["num_hidden_layers"]
            types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
            six = gemma3n.Gemma3nConfig.from_dict({**text, "layer_types": types})
            model.model.config = _on_text(lambda config: six)(model.model.config)
        return model


def pattern_six() -> _BrokenBackend:
    return _GemmaThreePattern("broken:PAT-pattern-6")


def softcap_missing() -> _BrokenBackend:
    """CAP-05 / CAP-06: final_logit_softcapping dropped."""
    return _ConfigEdit("broken:CAP-missing", _on_text(lambda c: dataclasses.replace(c, final_logit_softcapping=None)))


def softcap_hardcoded_30() -> _BrokenBackend:
    """CAP-02: a hard-coded cap of 30 (the released value) whatever config.json says."""
    return _ConfigEdit("broken:CAP-30", _on_text(lambda c: dataclasses.replace(c, final_logit_softcapping=30.0)))


def _main_table_embeddings(weights, config, input_ids):
    """Every id, vision and audio ids too, embedded as ``E[id] * sqrt(M)``."""
    return scaled_embed_tokens(input_ids, weights["model.embed_tokens.weight"], config.text.hidden_size ** 0.5)


def multimodal_ids_from_main_table() -> _BrokenBackend:
    """A text-only port run on a Gemma3nForConditionalGeneration checkpoint: vision and audio ids (eoi,
    eoa, image and audio placeholders among them) read rows of the main table instead of going through
    ``embed_vision`` / ``embed_audio`` (the main table has rows for them, so nothing refuses)."""
    return _BrokenBackend("broken:multimodal-ids-main-table", lambda: mock.patch.object(
        gemma3n_conditional, "input_embeddings", _main_table_embeddings))


#: A KV-consumer layer's own key/value tensors, as published (names after the decoder prefix).
_CONSUMER_KV = re.compile(r"model\.layers\.\d+\.self_attn\.(k_proj|v_proj|k_norm)\.(weight|bias)")


class _OwnKeysAndValues(_BrokenBackend):
    """Every layer computes its own keys and values from the checkpoint's tensors, the KV
    consumers from the k_proj / v_proj / k_norm the published checkpoints still carry."""

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        inner = model.model
        for path in sorted(checkpoint_dir.glob("*.safetensors")):
            for name, tensor in load_file(str(path)).items():
                plain = name.replace(gemma3n.LANGUAGE_MODEL_PREFIX, "model.", 1)
                if _CONSUMER_KV.fullmatch(plain) and plain not in inner.weights:
                    inner.weights[plain] = tensor.astype(inner.dtype)
        inner.config = _on_text(lambda c: dataclasses.replace(
            c, kv_source_layers=tuple(range(c.num_hidden_layers))))(inner.config)
        return model


def kv_sharing_ignored() -> _BrokenBackend:
    """G3n-13: num_kv_shared_layers ignored; the consumers project their own keys and values with
    the unused tensors of the checkpoint (an engine that loads every tensor it finds)."""
    return _OwnKeysAndValues("broken:kv-sharing-ignored")
