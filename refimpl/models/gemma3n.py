"""Gemma 3n text decoder (``Gemma3nForCausalLM``, model_type ``gemma3n_text``).

The published checkpoints are ``Gemma3nForConditionalGeneration``; their text path is
this decoder (``refimpl/models/gemma3n_conditional.py`` loads them). Forward pass, with
A = ``altup_num_inputs`` residual streams and a = ``altup_active_idx``::

    e     = E[ids] * sqrt(M)                                        (B, T, M)
    pli   = per_layer_inputs(ids, e)                                 (B, T, L, P)  refimpl/per_layer_embedding.py
    S     = altup_embed(e)                                           (A, B, T, M)  refimpl/altup.py
    for layer l of type tau_l:
        m     = router(S_a);  pred = altup_predict(S, m)             predict
        x     = RMSNorm(pred_a; input_layernorm)
        lr    = laurel(x)                                            refimpl/laurel.py
        q     = RoPE(RMSNorm_per_head(x Wq^T; q_norm))
        k, v  = RoPE(RMSNorm_per_head(x Wk^T; k_norm)), RMSNorm_per_head_no_weight(x Wv^T)
                or, on a KV-consumer layer, the k, v of its producer
        attn  = o_proj( GQA(q, k, v; scale 1.0, mask of tau_l) )
        al    = (pred_a + RMSNorm(attn; post_attention_layernorm) + lr) / sqrt(2)
        g     = RMSNorm(al; pre_feedforward_layernorm) Wg^T;  g = gaussian_top_k(g, s_l) if s_l > 0
        out   = al + RMSNorm( (gelu_tanh(g) * (RMSNorm(al; pre_ff) Wu^T)) Wd^T ; post_feedforward_layernorm )
        S     = altup_correct(pred, out, router(out))                correct
        S_1..S_{A-1} += per_layer_input_update(S_a * correct_output_scale, pli[:, :, l])
    h      = RMSNorm(altup_unembed(S); norm)
    logits = c tanh((h E^T) / c),  c = final_logit_softcapping (30 in the releases)

Every RMSNorm has a plain weight ``w``, initialised to ones (not Gemma 3's ``1 + w``,
quirk G3n-1, bug class NRM-02 in reverse); the value norm has no weight at all (G3n-3).
The attention scale is 1.0: the q/k norms carry it, and config.json's
``query_pre_attn_scalar`` is never read (G3n-2). Layer types: 4 sliding to 1 full,
layer l full iff ``(l + 1) % 5 == 0`` when config.json has no ``layer_types`` (G3n-12;
Gemma 3 uses 6), sliding window W keys including the query's own.

KV sharing (G3n-13). With n = ``num_kv_shared_layers`` and ``first = L - n``, layers
``>= first`` compute no keys or values: each reuses those of the last layer of its own
type before ``first`` (its producer), which were computed from the producer's input and
rotated at the producer's positions (the same positions). Published E4B: consumers
20-34 reuse layer 18 (sliding) or 19 (full). :func:`kv_source_layers` resolves this
per layer; their k_proj / v_proj / k_norm weights, present in the published
checkpoints, are dropped unread (:func:`ignored_weights`).

Incremental decoding (:func:`forward_step`; ``forward`` is one fresh step): a layer with
its own keys and values keeps a :class:`refimpl.kv_cache.KVCache` of them (keys after
k_norm and RoPE, values after their weightless norm): every one on a full-attention
layer, the last W slots on a sliding layer. A KV-sharing layer keeps nothing (its
cache entry is None): in each call it attends over its producer's keys and values of
that call, the producer's cache followed by the new tokens, with its own mask.
AltUp, LAuReL, the per-layer inputs and the activation sparsity act on each token
alone and carry nothing between calls.

Taps, each ``(B, T, M)``. ``"embed"`` is the scaled embedding e (what transformers'
``embed_tokens`` returns), ``"norm"`` the final-normalised state, and ``"layers.{l}"``
the active stream S_a after layer l (corrected, and for a != 0 with the per-layer
input added). transformers' decoder layer returns all A streams; the conformance
backend takes stream a of it. Mistakes confined to the other streams (their per-layer
input, for instance) show from the next layer on, where the prediction mixes them in.

AltUp with a != 0 (no release uses it; Google's code has no such option, its AltUp is
always built with active index 0): the reference follows transformers, which embeds
into stream 0, folds relative to stream 0, routes, predicts and corrects on stream a,
gates the per-layer input from corrected stream a and adds it to streams 1..A-1, i.e.
to stream a and not to stream 0.

Notation (more in the component modules):
    paper symbol       code name                                   shape
    A, a               ``altup_num_inputs``, ``altup_active_idx``   scalars
    P                  ``hidden_size_per_layer_input``              scalar
    R                  ``laurel_rank``                              scalar
    F_l                ``intermediate_size[l]`` (MatFormer widths)  per layer
    s_l                ``activation_sparsity_pattern[l]``           per layer, in [0, 1)
    W                  ``sliding_window``                           scalar

How config.json is resolved (transformers 5.24 ``Gemma3nTextConfig``):
* ``intermediate_size``: an int for every layer or a list of L ints.
* ``activation_sparsity_pattern``: absent or null means 0.95 on the first 10 layers and 0
  elsewhere when L > 10, else 0 everywhere (configuration_gemma3n.py:145-149).
* ``layer_types``: explicit list, else pattern 5 (configuration_gemma3n.py:140-143).
* RoPE per layer type exactly as Gemma 3 (``models/gemma3.py``): defaults theta 1e6
  (full) and 1e4 (sliding), a legacy ``rope_scaling`` only on the full layers.

Dtype: computed in the dtype of the weights (float64 or float32); scalar factors
(sqrt(M), sqrt(P), M^-1/2, M^-1, 2^-1/2) are rounded to it first, as transformers casts
its scalar buffers; ``1/sqrt(2)`` of the residual average is a division, as in
transformers. transformers takes every RMSNorm, the router tanh and the sparsity
quantile in float32 (spec sheet sec. A.8 item 5); the reference does not.
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Gemma Team, Gemma 3n model card and developer guide (Google, 2025; no technical
report). Components: AltUp arXiv:2301.13310, LAuReL arXiv:2411.07501, MatFormer
arXiv:2310.07707, statistical top-k arXiv:2506.06644.
Checked against: transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``
(``Gemma3nRMSNorm`` 118-136, ``Gemma3nTextMLP`` 938-973, ``Gemma3nTextAltUp`` 976-1072,
``Gemma3nTextAttention`` 1150-1245, ``Gemma3nTextDecoderLayer`` 1248-1322,
``Gemma3nTextModel.forward`` 1630-1735, ``Gemma3nForCausalLM.forward`` 1795-1853) and
``configuration_gemma3n.py`` (defaults 95-126, ``__post_init__`` 128-156,
``kv_sharing_modes`` 205-231); Google's ``gemma/gm/nn/gemma3n/`` (``_modules.py``,
``_transformer.py``, ``_config.py``, ``_gemma3n.py``). Two deliberate departures from
transformers (Google's magnitude guard in ``refimpl/altup.py``; the exact sparsity
quantile in ``refimpl/activation_sparsity.py``) and the differences between transformers
and Google's code: docs/architectures/gemma3n.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..activation_sparsity import gaussian_top_k
from ..altup import altup_correct, altup_embed, altup_predict, altup_unembed, router_modalities
from ..architecture import Architecture
from .. import kv_cache
from ..attention import grouped_query_attention
from ..config import check_known_keys, get_field, get_positive_int
from ..embedding import lm_head, scaled_embed_tokens
from ..errors import ConfigError
from ..kv_cache import KVCache, StepContext, fresh_context
from ..laurel import laurel_residual
from ..linear import linear
from ..mlp import activation
from ..per_layer_embedding import per_layer_input_update, per_layer_inputs
from ..rmsnorm import rms_norm, rms_normalize
from ..rope import apply_rope_rotate_half
from ..softcap import soft_cap
from ._llama_like import layer_weights, projection
# The per-layer window (W keys up to the query's own, or None) and the RoPE tables at positions (one
# per layer type) are Gemma 3's, read from the same config fields.
from .gemma3 import LAYER_TYPES, _layer_rope_parameters, layer_window, rope_tables_at

NAME = "Gemma3nForCausalLM"

#: Layer l is full attention iff ``(l + 1) % 5 == 0`` when config.json has no ``layer_types``.
LAYER_PATTERN = 5
#: ``activation_sparsity_pattern`` default: this sparsity on the first layers when L > 10.
DEFAULT_SPARSITY, DEFAULT_SPARSE_LAYERS = 0.95, 10
#: Prefix under which a multimodal checkpoint stores the text decoder (transformers renames it to
#: ``model.`` when a Gemma3nForCausalLM loads it: conversion_mapping.py, "gemma3n_text").
LANGUAGE_MODEL_PREFIX = "model.language_model."

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Training only: coefficients are clamped to +-120 only when module.training
    # (modeling_gemma3n.py:1015-1016, 1047-1049).
    "altup_coef_clip",
    # Learning-rate multiplier of the AltUp parameters (training).
    "altup_lr_multiplier",
    # Never read by the text stack: the attention scale is 1.0 (modeling_gemma3n.py:1161);
    # Google's config uses QueryPreAttentionNormalisation.NONE (scalar 1.0). G3n-2.
    "query_pre_attn_scalar",
    # Generation cache layout; no effect on a forward.
    "cache_implementation",
})
#: config.json keys read while resolving RoPE (not dataclass fields).
_RESOLVED_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq"})
#: Names of a KV-consumer layer's tensors that the published checkpoints still carry.
_CONSUMER_UNUSED = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")


@dataclass(frozen=True)
class Gemma3nConfig:
    """Gemma 3n text hyper-parameters; field names are the config.json keys.

    Defaults are ``Gemma3nTextConfig``'s (the E4B values). Per-layer schedules are
    resolved into tuples of length L: ``intermediate_size``, ``layer_types``,
    ``activation_sparsity_pattern``, ``layer_rope_parameters`` (derived, not a key) and
    ``kv_source_layers`` (derived: the layer whose keys and values layer l attends
    over; l itself unless l is a KV consumer).
    """

    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    intermediate_size: tuple[int, ...] = ()
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    sliding_window: int | None = 512
    final_logit_softcapping: float | None = 30.0
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    num_kv_shared_layers: int = 15
    activation_sparsity_pattern: tuple[float, ...] = ()
    layer_types: tuple[str, ...] = ()
    layer_rope_parameters: tuple[dict, ...] = ()
    kv_source_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Gemma3nConfig":
        """Build from a parsed config.json (the ``text_config`` of a multimodal checkpoint).

        Raises:
            ConfigError: missing, mistyped or out-of-range fields; per-layer lists of the
                wrong length; heads that do not divide; a layer type with no KV producer
                before the shared layers (G3n-13); unsupported RoPE parameters.
        """
        layers = get_positive_int(raw, "num_hidden_layers", 35)
        head_dim = get_positive_int(raw, "head_dim", 256)
        types = _layer_types(raw, layers)
        shared = get_field(raw, "num_kv_shared_layers", int, 15)
        # transformers' standardize_rope_params defaults original_max_position_embeddings to this.
        rope_raw = {"max_position_embeddings": 32_768, **raw}
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", 262_400),
            vocab_size_per_layer_input=get_positive_int(raw, "vocab_size_per_layer_input", 262_144),
            hidden_size=get_positive_int(raw, "hidden_size", 2048),
            hidden_size_per_layer_input=get_positive_int(raw, "hidden_size_per_layer_input", 256),
            intermediate_size=_per_layer_ints(raw, "intermediate_size", 16_384, layers),
            num_hidden_layers=layers,
            num_attention_heads=get_positive_int(raw, "num_attention_heads", 8),
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 2),
            head_dim=head_dim,
            hidden_activation=get_field(raw, "hidden_activation", str, "gelu_pytorch_tanh"),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, True),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            sliding_window=get_field(raw, "sliding_window", int, 512, nullable=True),
            final_logit_softcapping=get_field(raw, "final_logit_softcapping", float, 30.0, nullable=True),
            altup_num_inputs=get_positive_int(raw, "altup_num_inputs", 4),
            altup_active_idx=get_field(raw, "altup_active_idx", int, 0),
            altup_correct_scale=get_field(raw, "altup_correct_scale", bool, True),
            laurel_rank=get_positive_int(raw, "laurel_rank", 64),
            num_kv_shared_layers=shared,
            activation_sparsity_pattern=_sparsity_pattern(raw, layers),
            layer_types=types,
            layer_rope_parameters=_layer_rope_parameters(rope_raw, types, head_dim, NAME),
            kv_source_layers=kv_source_layers(types, shared),
        )
        config._validate()
        check_known_keys(raw, set(cls.__dataclass_fields__) | _RESOLVED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        # transformers refuses this even though head_dim is explicit (configuration_gemma3n.py:158-164).
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{NAME}: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads}), as transformers' Gemma3nTextConfig requires")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{NAME}: head_dim must be even for RoPE, got {self.head_dim}")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"{NAME}: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        cap = self.final_logit_softcapping
        if cap is not None and not (np.isfinite(cap) and cap > 0):
            raise ConfigError(f"{NAME}: final_logit_softcapping must be a positive finite number or null, got {cap}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"{NAME}: sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{NAME}: layer_types has 'sliding_attention' layers but sliding_window is null")
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError(f"{NAME}: altup_active_idx must be in [0, altup_num_inputs = {self.altup_num_inputs}), "
                              f"got {self.altup_active_idx}")
        activation(self.hidden_activation)


def _layer_types(raw: dict, layers: int) -> tuple[str, ...]:
    """``layer_types``, else full attention iff ``(l + 1) % 5 == 0`` (G3n-12).

    Raises:
        ConfigError: ``layer_types`` of the wrong length or with other entries.
    """
    types = raw.get("layer_types")
    if types is None:
        return tuple("full_attention" if (i + 1) % LAYER_PATTERN == 0 else "sliding_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{NAME}: 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    return tuple(types)


def _per_layer_ints(raw: dict, key: str, default: int, layers: int) -> tuple[int, ...]:
    """An int for every layer, or a list of L positive ints (MatFormer widths).

    Raises:
        ConfigError: a list of the wrong length or with entries that are not positive ints.
    """
    value = raw.get(key, default)
    if isinstance(value, list):
        if len(value) != layers or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{NAME}: '{key}' must be a positive integer or a list of {layers} of them, "
                              f"got {value!r}")
        return tuple(get_positive_int({key: v}, key) for v in value)
    return (get_positive_int(raw, key, default),) * layers


def _sparsity_pattern(raw: dict, layers: int) -> tuple[float, ...]:
    """``activation_sparsity_pattern`` resolved to one value in [0, 1) per layer (G3n-8).

    Raises:
        ConfigError: not a list of L numbers in [0, 1) (transformers also refuses a bare number).
    """
    value = raw.get("activation_sparsity_pattern")
    if value is None:
        sparse = DEFAULT_SPARSE_LAYERS if layers > DEFAULT_SPARSE_LAYERS else 0
        return (DEFAULT_SPARSITY,) * sparse + (0.0,) * (layers - sparse)
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or len(value) != layers or not all(0.0 <= v < 1.0 for v in value):
        raise ConfigError(f"{NAME}: 'activation_sparsity_pattern' must list {layers} numbers in [0, 1), "
                          f"got {value!r}")
    return tuple(float(v) for v in value)


def kv_source_layers(layer_types: tuple[str, ...], num_kv_shared_layers: int) -> tuple[int, ...]:
    """For each layer, the layer whose keys and values it attends over.

    Layers below ``first = L - num_kv_shared_layers`` use their own; a layer at or
    above ``first`` uses the last layer of its type below ``first``.

    Raises:
        ConfigError: ``num_kv_shared_layers`` outside ``[0, L)``, or a layer type of the
            shared region with no layer of that type before it (transformers raises
            ValueError, configuration_gemma3n.py:218-221; spec quirk G3n-13).
    """
    layers = len(layer_types)
    if not 0 <= num_kv_shared_layers < layers:
        raise ConfigError(f"{NAME}: num_kv_shared_layers must be in [0, num_hidden_layers = {layers}), "
                          f"got {num_kv_shared_layers}")
    first = layers - num_kv_shared_layers
    producer = {tau: l for l, tau in enumerate(layer_types[:first])}
    orphans = sorted(set(layer_types[first:]) - set(producer))
    if orphans:
        raise ConfigError(f"{NAME}: layers {first}..{layers - 1} share keys and values, but no layer before {first} "
                          f"is of type {orphans[0]} to produce them (num_kv_shared_layers={num_kv_shared_layers})")
    return tuple(l if l < first else producer[tau] for l, tau in enumerate(layer_types))


def is_kv_consumer(config: Gemma3nConfig, layer: int) -> bool:
    """True when layer ``layer`` reuses another layer's keys and values."""
    return config.kv_source_layers[layer] != layer


def _layer_shapes(config: Gemma3nConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer (names after ``model.layers.{layer}.``)."""
    m, d, a, p, r = (config.hidden_size, config.head_dim, config.altup_num_inputs,
                     config.hidden_size_per_layer_input, config.laurel_rank)
    qd, kvd, f = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size[layer]
    shapes = {f"{n}.weight": (m,) for n in ("input_layernorm", "post_attention_layernorm",
                                           "pre_feedforward_layernorm", "post_feedforward_layernorm")}
    shapes.update({"self_attn.q_proj.weight": (qd, m), "self_attn.q_norm.weight": (d,),
                   "self_attn.o_proj.weight": (m, qd)})
    if not is_kv_consumer(config, layer):
        shapes.update({"self_attn.k_proj.weight": (kvd, m), "self_attn.v_proj.weight": (kvd, m),
                       "self_attn.k_norm.weight": (d,)})
    if config.attention_bias:
        shapes.update({f"self_attn.{n}_proj.bias": (s[0],) for n, s in (
            ("q", (qd,)), ("k", (kvd,)), ("v", (kvd,)), ("o", (m,))) if f"self_attn.{n}_proj.weight" in shapes})
    shapes.update({"mlp.gate_proj.weight": (f, m), "mlp.up_proj.weight": (f, m), "mlp.down_proj.weight": (m, f)})
    shapes.update({"altup.correct_output_scale": (m,), "altup.correction_coefs.weight": (a, a),
                   "altup.prediction_coefs.weight": (a * a, a), "altup.modality_router.weight": (a, m),
                   "altup.router_norm.weight": (m,)})
    shapes.update({"laurel.linear_left.weight": (r, m), "laurel.linear_right.weight": (m, r),
                   "laurel.post_laurel_norm.weight": (m,)})
    shapes.update({"per_layer_input_gate.weight": (p, m), "per_layer_projection.weight": (m, p),
                   "post_per_layer_input_norm.weight": (m,)})
    return shapes


def weight_shapes(config: Gemma3nConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    KV-consumer layers have no k_proj, v_proj or k_norm; ``lm_head.weight`` is absent
    when ``tie_word_embeddings`` is true (all releases).
    """
    m, lp = config.hidden_size, config.num_hidden_layers * config.hidden_size_per_layer_input
    shapes = {"model.embed_tokens.weight": (config.vocab_size, m),
              "model.embed_tokens_per_layer.weight": (config.vocab_size_per_layer_input, lp),
              "model.per_layer_model_projection.weight": (lp, m),
              "model.per_layer_projection_norm.weight": (config.hidden_size_per_layer_input,),
              "model.norm.weight": (m,)}
    for i in range(config.altup_num_inputs - 1):
        shapes[f"model.altup_projections.{i}.weight"] = (m, m)
        shapes[f"model.altup_unembed_projections.{i}.weight"] = (m, m)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, m)
    for layer in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{n}": s for n, s in _layer_shapes(config, layer).items()})
    return shapes


def tied_head(config: Gemma3nConfig) -> dict[str, str]:
    """``optional_weights``: a tied checkpoint may still carry ``lm_head.weight`` equal to E."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


def ignored_weights(config: Gemma3nConfig) -> tuple[str, ...]:
    """KV-consumer layers' k_proj / v_proj / k_norm / v_norm, which published checkpoints
    carry and transformers drops on load (``_keys_to_ignore_on_load_unexpected``,
    modeling_gemma3n.py:1615-1621), under both the text and the multimodal prefix."""
    return tuple(f"{base}layers.{layer}.{name}" for base in ("model.", LANGUAGE_MODEL_PREFIX)
                 for layer in range(config.num_hidden_layers) if is_kv_consumer(config, layer)
                 for name in _CONSUMER_UNUSED)


def convert_weights(config: Gemma3nConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model.language_model.*`` renamed ``model.*``, as transformers loads a multimodal
    checkpoint's decoder into Gemma3nForCausalLM; any other layout is returned unchanged."""
    return {("model." + n[len(LANGUAGE_MODEL_PREFIX):] if n.startswith(LANGUAGE_MODEL_PREFIX) else n): w
            for n, w in weights.items()}


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-case draws for the AltUp tensors the default rule makes inert.

    The router input is scaled by 1/M, so an N(0, 1/M) router leaves tanh within 1e-2
    of 0 and the mixing coefficients near 0: the router and the coefficient layout
    (G3n-5) would barely touch the output. The router is drawn N(0, 0.04 M) instead
    (pre-tanh values of about 0.2) and the prediction coefficients N(0, 1/(16 A)). Larger
    ones make the tiny random models sensitive enough that bfloat16 runs of transformers
    drift past their tolerance within 6 layers (measured: a router N(0, M) triples the
    bfloat16 error of a 10-layer case).
    """
    if name.endswith("altup.modality_router.weight"):
        return rng.standard_normal(shape) * 0.2 * np.sqrt(shape[-1])
    if name.endswith("altup.prediction_coefs.weight"):
        return rng.standard_normal(shape) * 0.25 / np.sqrt(shape[-1])
    return None


def norm(x: np.ndarray, weight: np.ndarray, config: Gemma3nConfig) -> np.ndarray:
    """Gemma 3n's RMSNorm: plain gain ``w`` (G3n-1; Gemma 3 uses ``1 + w``)."""
    return rms_norm(x, weight, config.rms_norm_eps)


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: Gemma3nConfig, rope: tuple[np.ndarray, np.ndarray],
    context: StepContext, layer: int, shared: KVCache | None,
) -> tuple[np.ndarray, KVCache, KVCache | None]:
    """Self-attention of one call on normalised ``x`` ``(B, T, M)``.

    ``rope`` holds ``(B, T, D/2)`` tables at the tokens' positions; ``context`` the positions,
    padding and caches; ``shared`` is None on a layer with its own keys and values, else
    the producer's visible keys and values of this call (its cache, then the new tokens).

    Returns:
        ``(output (B, T, M), visible, kept)``: the keys and values this call attended over
        (k after its norm and RoPE, v after its weightless norm, ``(B, S, Hkv, D)``) and the
        layer's cache for the next call (None on a KV-sharing layer).
    """
    b, t, _ = x.shape
    d, window = config.head_dim, layer_window(config, layer)
    # Projection, per-head q-norm over D, then RoPE.
    q = norm(projection(x, p, "self_attn.q_proj").reshape(b, t, -1, d), p["self_attn.q_norm.weight"], config)
    q = apply_rope_rotate_half(q, *rope)
    if shared is None:
        k = norm(projection(x, p, "self_attn.k_proj").reshape(b, t, -1, d), p["self_attn.k_norm.weight"], config)
        k = apply_rope_rotate_half(k, *rope)
        # G3n-3: values RMS-normalised per head, without a weight.
        v = rms_normalize(projection(x, p, "self_attn.v_proj").reshape(b, t, -1, d), config.rms_norm_eps)
        visible, kept = kv_cache.extend_kv(context.layer_cache(layer), k, v, context, span=window)
    else:
        visible, kept = shared, None
    # The layer's own mask (sliding or full), from positions.
    mask = kv_cache.visibility(context, visible, sliding_window=window)
    # G3n-2: scale 1.0, the q/k norms set the score magnitude.
    out = grouped_query_attention(q, visible.keys, visible.values, mask, scale=1.0)
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), visible, kept


def mlp_block(y: np.ndarray, p: dict[str, np.ndarray], config: Gemma3nConfig, layer: int) -> np.ndarray:
    """``down( act(top_k(y Wg^T)) * (y Wu^T) )`` with the Gaussian top-k on layers with sparsity > 0."""
    gate = linear(y, p["mlp.gate_proj.weight"])
    sparsity = config.activation_sparsity_pattern[layer]
    if sparsity > 0:
        gate = gaussian_top_k(gate, sparsity)
    act = activation(config.hidden_activation)
    return linear(act(gate) * linear(y, p["mlp.up_proj.weight"]), p["mlp.down_proj.weight"])


def inject_per_layer_input(streams: np.ndarray, update: np.ndarray) -> np.ndarray:
    """``streams`` ``(A, B, T, M)`` with ``update`` ``(B, T, M)`` added to streams 1..A-1 only.

    Stream 0 never receives the per-layer input, whatever ``altup_active_idx`` is
    (G3n-7; transformers ``corrected_predictions[1:] += ...``, modeling_gemma3n.py:1320;
    Google: "outputs[0] is altup output, outputs[1:] inc PLI").
    """
    injected = streams.copy()
    injected[1:] += update
    return injected


def decoder_layer(
    streams: np.ndarray, p: dict[str, np.ndarray], config: Gemma3nConfig, layer: int,
    rope: tuple[np.ndarray, np.ndarray], context: StepContext, per_layer_input: np.ndarray,
    shared: KVCache | None,
) -> tuple[np.ndarray, KVCache, KVCache | None]:
    """One layer on the AltUp state ``(A, B, T, M)`` of one call; returns the new state and, as
    :func:`attention_block`, the keys and values it attended over and its cache."""
    a, eps = config.altup_active_idx, config.rms_norm_eps
    router = (p["altup.router_norm.weight"], p["altup.modality_router.weight"], eps)
    # AltUp predict from the active stream's routing.
    predictions = altup_predict(streams, router_modalities(streams[a], *router), p["altup.prediction_coefs.weight"])
    active = predictions[a]
    x = norm(active, p["input_layernorm.weight"], config)
    laurel = laurel_residual(x, p["laurel.linear_left.weight"], p["laurel.linear_right.weight"],
                             p["laurel.post_laurel_norm.weight"], eps)
    attn, visible, kept = attention_block(x, p, config, rope, context, layer, shared)
    # G3n-11: the unnormalised prediction, the normed attention and LAuReL, averaged by 1/sqrt(2).
    attn_laurel = ((active + norm(attn, p["post_attention_layernorm.weight"], config)) + laurel) / np.sqrt(
        active.dtype.type(2))
    mlp = mlp_block(norm(attn_laurel, p["pre_feedforward_layernorm.weight"], config), p, config, layer)
    out = attn_laurel + norm(mlp, p["post_feedforward_layernorm.weight"], config)
    # AltUp correct, then the per-layer input mixed into streams 1..A-1 (G3n-7).
    corrected = altup_correct(predictions, out, router_modalities(out, *router),
                              p["altup.correction_coefs.weight"], a)
    gate_input = corrected[a] * p["altup.correct_output_scale"] if config.altup_correct_scale else corrected[a]
    update = per_layer_input_update(gate_input, per_layer_input, p["per_layer_input_gate.weight"],
                                    p["per_layer_projection.weight"], p["post_per_layer_input_norm.weight"], eps,
                                    config.hidden_activation)
    return inject_per_layer_input(corrected, update), visible, kept


def decode_step(
    weights: dict[str, np.ndarray], config: Gemma3nConfig, input_ids: np.ndarray, embeddings: np.ndarray,
    context: StepContext,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """Logits, taps and layer caches of one call from token ids and their input embeddings ``(B, T, M)``.

    The text model's embeddings are ``E[ids] * sqrt(M)`` (:func:`forward_step`); the
    multimodal wrapper replaces the rows of vision and audio ids. The per-layer inputs
    always come from the ids (their token part) and these embeddings (their projection).
    ``context`` carries the tokens' positions, padding and the caches of the previous call;
    the caches returned hold one entry per layer (None on KV-sharing layers).
    """
    pli = per_layer_inputs(input_ids, embeddings, weights["model.embed_tokens_per_layer.weight"],
                           weights["model.per_layer_model_projection.weight"],
                           weights["model.per_layer_projection_norm.weight"], config.rms_norm_eps)
    extra = range(config.altup_num_inputs - 1)
    streams = altup_embed(embeddings, [weights[f"model.altup_projections.{i}.weight"] for i in extra])
    tables = rope_tables_at(config, context.positions, embeddings.dtype)
    taps = {"embed": embeddings}
    # visible[l]: the keys and values layer l attended over in this call (what its KV-sharing layers read)
    visible, caches = {}, []
    for layer in range(config.num_hidden_layers):
        source = config.kv_source_layers[layer]
        shared = visible[source] if source != layer else None
        streams, visible[layer], kept = decoder_layer(streams, layer_weights(weights, layer), config, layer,
                                                      tables[layer], context, pli[:, :, layer], shared)
        caches.append(kept)
        taps[f"layers.{layer}"] = streams[config.altup_active_idx]
    h = altup_unembed(streams, [weights[f"model.altup_unembed_projections.{i}.weight"] for i in extra])
    h = norm(h, weights["model.norm.weight"], config)
    taps["norm"] = h
    logits = lm_head(h, weights["model.embed_tokens.weight"] if config.tie_word_embeddings
                     else weights["lm_head.weight"])
    if config.final_logit_softcapping is not None:
        logits = soft_cap(logits, config.final_logit_softcapping)
    return logits, taps, tuple(caches)


def decode(
    weights: dict[str, np.ndarray], config: Gemma3nConfig, input_ids: np.ndarray, embeddings: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and taps of a whole sequence from ids and input embeddings: :func:`decode_step`, fresh."""
    logits, taps, _ = decode_step(weights, config, input_ids, embeddings, fresh_context(*input_ids.shape))
    return logits, taps


def forward_step(
    weights: dict[str, np.ndarray], config: Gemma3nConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """Logits, named hidden states and layer caches for one call's checked token ids ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within ``[0, vocab_size)``.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits (B, T, V), taps, caches)``: logits soft-capped when ``final_logit_softcapping``
        is set; taps ``"embed"`` (scaled embedding), ``"layers.{l}"`` (AltUp stream
        ``altup_active_idx`` after layer l) and ``"norm"``, each ``(B, T, M)``; one cache per
        layer (a KVCache, or None on a KV-sharing layer).

    Dtype: everything in the dtype of the weights.
    """
    # Python's M ** 0.5, rounded to the weights' dtype as transformers' embed_scale buffer is.
    embeddings = scaled_embed_tokens(input_ids, weights["model.embed_tokens.weight"], config.hidden_size ** 0.5)
    return decode_step(weights, config, input_ids, embeddings, context)


def forward(
    weights: dict[str, np.ndarray], config: Gemma3nConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _checked_skips(config: Gemma3nConfig, layers_to_skip) -> list[int]:
    """``layers_to_skip`` as a sorted list of layer indices that can be removed.

    Raises:
        ConfigError: not a list of layer indices, every layer, or a layer whose keys and
            values later layers reuse (the MatFormer Lab refuses those too).
    """
    layers = config.num_hidden_layers
    if isinstance(layers_to_skip, (str, bytes, dict)) or not hasattr(layers_to_skip, "__iter__"):
        raise ConfigError(f"extract_submodel: layers_to_skip must be a list of layer indices, got {layers_to_skip!r}")
    skips = list(layers_to_skip)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < layers for s in skips):
        raise ConfigError(f"extract_submodel: layers_to_skip must be layer indices in [0, {layers}), got {skips}")
    skips = sorted(set(int(s) for s in skips))
    if len(skips) == layers:
        raise ConfigError(f"extract_submodel: layers_to_skip {skips} skips every layer; a sub-model keeps at least one")
    producers = sorted({s for l, s in enumerate(config.kv_source_layers) if s != l} & set(skips))
    if producers:
        raise ConfigError(f"extract_submodel: layer {producers[0]} produces the keys and values of the KV-shared "
                          "layers and cannot be skipped")
    return skips


def extract_submodel(
    weights: dict[str, np.ndarray], raw_config: dict, intermediate_size, layers_to_skip=()
) -> tuple[dict[str, np.ndarray], dict]:
    """A MatFormer sub-model of a Gemma 3n checkpoint ("Mix-n-Match"): fewer layers, narrower MLPs.

    config.json does not describe the nested models: Google publishes the slicing
    choices separately (the ``google/gemma3n-slicing-configs`` dataset: per-layer FFN
    widths and layers to skip, e.g. E2B = E4B without layers 20-24 and with width 8192)
    and the procedure in the MatFormer Lab notebook, which this follows:

    * the MLP of each kept layer keeps its first F' neurons: rows ``[:F']`` of gate_proj and
      up_proj, columns ``[:F']`` of down_proj (the nested sub-network of MatFormer);
    * skipped layers are removed and the rest renumbered; their P-wide slots are removed
      from ``embed_tokens_per_layer`` (columns) and ``per_layer_model_projection`` (rows);
    * ``num_kv_shared_layers`` loses the skipped shared layers; the KV producers cannot be
      skipped; ``activation_sparsity_pattern`` keeps the kept layers' entries.

    One generalisation: the kept layers keep their own ``layer_types`` (written
    explicitly). The notebook leaves ``layer_types`` as it was, so transformers types the
    sub-model's layers by their new position; the two agree when whole 5-layer blocks
    are skipped, as in every published slicing configuration.

    Args:
        weights: the text model's tensors in ``weight_shapes`` names (``Model.weights``).
        raw_config: its config.json (``text_config``) as a dict.
        intermediate_size: F' for each kept layer, each at most that layer's width; or one int
            for every kept layer (as config.json's ``intermediate_size`` may be).
        layers_to_skip: indices of the layers to remove.

    Returns:
        ``(weights, config)``: the sub-model's tensors (the input arrays, sliced; not
        copied) and its config.json dict.

    Raises:
        ConfigError: widths that are not an int or a list of ints, a list of the wrong
            length, a width outside [1, that layer's width], ``layers_to_skip`` that is not
            a list of layer indices or names every layer, a skipped KV producer, or a result
            transformers would refuse.

    Paper: Devvrit, Kudugunta et al., "MatFormer: Nested Transformer for Elastic
    Inference", arXiv:2310.07707, sec. 3 (Mix'n'Match: a per-layer choice of nested
    FFN width). Source: google-gemini/gemma-cookbook ``Gemma/[Gemma_3n]MatFormer_Lab.ipynb``.
    """
    config = Gemma3nConfig.from_dict(raw_config)
    skips = _checked_skips(config, layers_to_skip)
    kept = [l for l in range(config.num_hidden_layers) if l not in skips]
    widths = _checked_widths(intermediate_size, len(kept))
    if len(widths) != len(kept) or any(
            isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 < w <= config.intermediate_size[l]
            for w, l in zip(widths, kept)):
        raise ConfigError(f"extract_submodel: intermediate_size must give one width per kept layer ({len(kept)}), each "
                          f"in [1, that layer's width]; got {widths}")
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    sub_raw = {**raw_config, "num_hidden_layers": len(kept), "intermediate_size": [int(w) for w in widths],
               "layer_types": [config.layer_types[l] for l in kept],
               "activation_sparsity_pattern": [config.activation_sparsity_pattern[l] for l in kept],
               "num_kv_shared_layers": config.num_kv_shared_layers - sum(s >= first_shared for s in skips)}
    sub = Gemma3nConfig.from_dict(sub_raw)
    renumber = {old: new for new, old in enumerate(kept)}
    if [renumber[config.kv_source_layers[l]] for l in kept] != list(sub.kv_source_layers):
        raise ConfigError("extract_submodel: the skipped layers change which layer produces the shared keys and values")
    return _slice_weights(weights, config, kept, widths), sub_raw


def _checked_widths(intermediate_size, kept: int) -> list:
    """``intermediate_size`` as a list of ``kept`` entries (an int stands for every kept layer).

    Raises:
        ConfigError: neither an int nor a list or tuple.
    """
    if isinstance(intermediate_size, (int, np.integer)) and not isinstance(intermediate_size, bool):
        return [intermediate_size] * kept
    if not isinstance(intermediate_size, (list, tuple, np.ndarray)):
        raise ConfigError(f"extract_submodel: intermediate_size must be an int or a list of {kept} ints (one per kept "
                          f"layer), got {intermediate_size!r}")
    return list(intermediate_size)


def _slice_weights(weights: dict[str, np.ndarray], config: Gemma3nConfig, kept: list[int],
                   widths: list[int]) -> dict[str, np.ndarray]:
    """The tensors of the sub-model described in :func:`extract_submodel`."""
    p, layers = config.hidden_size_per_layer_input, config.num_hidden_layers
    slots = np.concatenate([np.arange(l * p, (l + 1) * p) for l in kept])
    renumber = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, w in weights.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            if name == "model.embed_tokens_per_layer.weight":
                w = w[:, slots]
            elif name == "model.per_layer_model_projection.weight":
                w = w[slots]
            out[name] = w
            continue
        old, rest = int(match.group(1)), match.group(2)
        if old not in renumber or old >= layers:
            continue
        width = widths[renumber[old]]
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            w = w[:width]
        elif rest == "mlp.down_proj.weight":
            w = w[:, :width]
        out[f"model.layers.{renumber[old]}.{rest}"] = w
    return out


def _release(layers: int, width: int, shared: int) -> dict:
    """A Gemma 3n ``text_config`` in the published (transformers 4.53) key style, run as Gemma3nForCausalLM."""
    return {
        "architectures": [NAME], "model_type": "gemma3n_text", "vocab_size": 262_400,
        "vocab_size_per_layer_input": 262_144, "hidden_size": 2048, "hidden_size_per_layer_input": 256,
        "intermediate_size": [width] * layers, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "attention_bias": False, "attention_dropout": 0.0, "sliding_window": 512,
        "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": None,
        "max_position_embeddings": 32_768, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
        "altup_active_idx": 0, "altup_coef_clip": 120.0, "altup_correct_scale": True, "altup_lr_multiplier": 1.0,
        "altup_num_inputs": 4, "laurel_rank": 64, "num_kv_shared_layers": shared,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (layers - 10),
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
    }


#: Published text configs (the ``text_config`` of google/gemma-3n-E4B(-it) and -E2B(-it),
#: run as Gemma3nForCausalLM). Sources: transformers' Gemma3nTextConfig defaults, which are
#: the E4B values (configuration_gemma3n.py:95-126); Google's gemma library
#: (``gemma/gm/nn/gemma3n/_gemma3n.py``: embed 2048, 8 / 2 heads of 256, window 512,
#: pattern LLLLG, FFN 2048*8 over 35 layers (E4B) and 2048*4 over 30 (E2B), 20 layers with
#: their own KV, PLE width 256, LAuReL rank 64, sparsity 0.95 on layers 0-9); AI-Edge-Torch
#: ``get_model_config_e2b/e4b`` (final soft-cap 30, 10 / 15 shared layers); spec sheet sec. 3.1.
#: The E2B shapes are confirmed by the parameter counts the MatFormer Lab prints for it
#: (tests/test_hf_agreement_gemma3n.py).
PRESETS = {
    "gemma-3n-E4B": _release(35, 16_384, 15),
    "gemma-3n-E2B": _release(30, 8_192, 10),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Gemma3nConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Google, Gemma 3n model card and developer guide (2025)",
        "Baykal et al., Alternating Updates for Efficient Transformers, arXiv:2301.13310",
        "Menghani et al., LAuReL: Learned Augmented Residual Layer, arXiv:2411.07501",
        "Devvrit, Kudugunta et al., MatFormer: Nested Transformer for Elastic Inference, arXiv:2310.07707",
        "You et al., Spark Transformer (statistical top-k), arXiv:2506.06644",
        "transformers 5.24 models/gemma3n/modeling_gemma3n.py, configuration_gemma3n.py",
        "google-deepmind/gemma gemma/gm/nn/gemma3n/",
    ),
    weight_init=weight_init,
    ignored_weights=ignored_weights,
    convert_weights=convert_weights,
)
