"""Gemma 3 text decoder (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Forward pass, sandwich norms, per layer l of type tau_l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids] * s                    s = sqrt(M), rounded to the compute dtype
    x   = RMSNorm1p(h; input_layernorm)
    q   = RMSNorm1p_per_head(x Wq^T + bq; q_norm)   (B, T, H, D)   QK-norm over D, before RoPE
    k   = RMSNorm1p_per_head(x Wk^T + bk; k_norm)   (B, T, Hkv, D)
    v   = x Wv^T + bv                               (B, T, Hkv, D)  v is not normalised
    q, k = RoPE_rotate_half(q, k; rope parameters of tau_l, positions)
    a   = o_proj( GQA(q, k, v; scale = query_pre_attn_scalar^-0.5, mask of tau_l) ) (+ bo)
    h   = h + RMSNorm1p(a; post_attention_layernorm)
    h   = h + RMSNorm1p( GeGLU_tanh( RMSNorm1p(h; pre_feedforward_layernorm) ); post_feedforward_layernorm )
    logits = RMSNorm1p(h_L; norm) W_lm^T            W_lm = E (unscaled) when tie_word_embeddings
    logits = c tanh(logits / c)                     only when final_logit_softcapping c is set

``RMSNorm1p`` is RMSNorm with gain ``1 + w``: the checkpoint stores w as an offset from 1
(zero-initialised), for all four sandwich norms, q_norm, k_norm and the final norm
(bug classes NRM-02, NRM-03, NRM-04). Layer types (bug class PAT-01):

    tau_l = "sliding_attention": causal within the last W = ``sliding_window`` keys,
            RoPE ``rope_parameters["sliding_attention"]`` (released: theta 1e4, unscaled)
    tau_l = "full_attention":    causal over all keys,
            RoPE ``rope_parameters["full_attention"]`` (released: theta 1e6, linear factor 8;
            the 1B model: unscaled) (bug classes RSC-09, RSC-11)

Notation:
    paper symbol                 code name                     shape
    E                            ``model.embed_tokens.weight`` (V, M)
    sqrt(d_model)                ``embed_scale``               scalar, sqrt(M)
    W_Q, W_K, W_V, W_O           ``self_attn.{q,k,v}_proj``    (H*D, M), (Hkv*D, M), (Hkv*D, M), (M, H*D)
    QK-norm gains                ``self_attn.{q,k}_norm``      (D,) offsets w, gain 1 + w
    d_k^-1/2 (query scale)       ``query_pre_attn_scalar``     scalar, need not equal D (27B: 168 vs 128)
    local / global layer         ``layer_types[l]``            "sliding_attention" / "full_attention"
    local window                 ``sliding_window``            W
    theta_local, theta_global    ``layer_rope_parameters[l]["rope_theta"]``

How config.json is resolved (transformers 5.24 ``Gemma3TextConfig``):

* ``layer_types``, when present, wins; otherwise layer l slides iff
  ``(l + 1) % sliding_window_pattern != 0``, with the pattern defaulting to 6 when
  config.json has neither (``configuration_gemma3.py:105-111``).
* RoPE per layer type (``convert_rope_params_to_dict``, ``configuration_gemma3.py:132-159``):
  start from ``rope_parameters`` keyed by layer type (default ``{"rope_type":
  "default"}`` for each); a legacy ``rope_scaling`` dict is merged into the
  **full_attention** entry only; a missing ``rope_theta`` comes from the top-level
  ``rope_theta`` (full) or ``rope_local_base_freq`` (sliding), else the class defaults
  1e6 / 1e4.
* Omitted keys take ``Gemma3TextConfig``'s class defaults (the published 4B and 27B
  ``text_config`` omit heads, head_dim, vocabulary, window pattern and RoPE bases).

Incremental decoding: each layer keeps a :class:`refimpl.kv_cache.KVCache` of its keys
(after the (1 + w) QK-norm and its type's RoPE) and values: a sliding layer the last W
slots (a ring of W: the W - 1 keys a new token still sees, and its own), a global layer
every slot. The RoPE tables are taken per layer type at the tokens' absolute positions.
:func:`forward` is :func:`forward_step` from position 0.

Dtype: computed in the dtype of the weights (float64 or float32). transformers
multiplies by ``1 + w`` in float32 before casting back (``multiply_then_cast``); that
differs from this only in bfloat16/float16. The embedding scale is rounded to the
compute dtype before the multiply, as transformers casts its ``embed_scale`` buffer
(bug class NRM-06).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Gemma Team, "Gemma 3 Technical Report", arXiv:2503.19786, sec. 2 (5 local :
1 global layers, local window 1024, GQA with QK-norm replacing Gemma 2's soft-capping,
RoPE base 10k local / 1M global, positional interpolation for 128K context);
sandwich norms and the sqrt(d_model) embedding scale as in Gemma 2, arXiv:2408.00118, sec. 2.
Checked against: transformers 5.24 ``models/gemma3/modeling_gemma3.py``
(``Gemma3TextScaledWordEmbedding`` 89-100, ``Gemma3RMSNorm`` 119-133,
``Gemma3RotaryEmbedding`` 139-197, ``Gemma3Attention.forward`` 322-356,
``Gemma3DecoderLayer.forward`` 382-403, ``Gemma3ForCausalLM.forward`` 614-620) and
``configuration_gemma3.py`` (defaults 73-98, layer pattern 104-111, RoPE 132-159).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..embedding import lm_head, scaled_embed_tokens
from ..errors import ConfigError
from ..kv_cache import KVCache, StepContext, attend_with_cache, fresh_context
from ..masks import causal_mask, sliding_window_mask
from ..mlp import activation, gated_mlp
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies
from ..softcap import soft_cap
from ._llama_like import (
    attention_weight_shapes, decoder_weight_shapes, layer_weights, mlp_weight_shapes, projection, tied_head,
)

NAME = "Gemma3ForCausalLM"

LAYER_TYPES = ("sliding_attention", "full_attention")
#: ``Gemma3TextConfig.default_theta``, and the legacy top-level key that overrides it, per layer type.
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
LEGACY_THETA_KEY = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}
#: ``sliding_window_pattern`` when config.json has neither it nor ``layer_types``.
DEFAULT_SLIDING_WINDOW_PATTERN = 6
#: transformers' ``standardize_rope_params`` copies max_position_embeddings into these types.
_ROPE_TYPES_WITH_ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Never reaches the attention in transformers 5.24: Gemma3Attention.forward passes only
    # dropout, scaling and sliding_window to every attention implementation
    # (modeling_gemma3.py:342-352), and the Gemma 3 report (sec. 2) replaced Gemma 2's
    # attention soft-capping with QK-norm. Null in every released config (spec quirk G3-4).
    "attn_logit_softcapping",
    # transformers 5.24 serialises its private copy of the pattern; it is never read back
    # (__post_init__ reads only "sliding_window_pattern", configuration_gemma3.py:105).
    "_sliding_window_pattern",
    # Cache layout for generation ("hybrid" in released configs); no effect on a forward.
    "cache_implementation",
})
#: config.json keys read while resolving RoPE and layer types (not dataclass fields).
_RESOLVED_KEYS = frozenset({
    "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern",
})


@dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3 text hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``Gemma3TextConfig`` where config.json may
    omit a key. ``layer_types`` has one entry per layer. ``layer_rope_parameters`` is
    derived, not a config.json key: the resolved ``rope_parameters`` entry of each
    layer's type (``rope_type``, ``rope_theta`` and the scaling keys), one per layer.
    """

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    layer_types: tuple[str, ...] = ()
    layer_rope_parameters: tuple[dict, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Gemma3Config":
        """Build from a parsed config.json (the ``text_config`` of a multimodal checkpoint).

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not
                divide, inconsistent layer types, sliding layers without a window,
                RoPE parameters transformers would ignore or that this version does not
                implement, or ``use_bidirectional_attention`` (EmbeddingGemma).
        """
        layers = get_positive_int(raw, "num_hidden_layers", 26)
        head_dim = get_positive_int(raw, "head_dim", 256)
        types = _layer_types(raw, layers)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", 262_208),
            hidden_size=get_positive_int(raw, "hidden_size", 2304),
            intermediate_size=get_positive_int(raw, "intermediate_size", 9216),
            num_hidden_layers=layers,
            num_attention_heads=get_positive_int(raw, "num_attention_heads", 8),
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 4),
            head_dim=head_dim,
            hidden_activation=get_field(raw, "hidden_activation", str, "gelu_pytorch_tanh"),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, True),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            query_pre_attn_scalar=get_field(raw, "query_pre_attn_scalar", float, 256.0),
            sliding_window=get_field(raw, "sliding_window", int, 4096, nullable=True),
            final_logit_softcapping=get_field(raw, "final_logit_softcapping", float, None, nullable=True),
            use_bidirectional_attention=bool(get_field(raw, "use_bidirectional_attention", bool, False, nullable=True)),
            layer_types=types,
            layer_rope_parameters=_layer_rope_parameters(raw, types, head_dim),
        )
        config._validate()
        check_known_keys(raw, set(cls.__dataclass_fields__) | _RESOLVED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.use_bidirectional_attention:
            raise ConfigError(
                f"{NAME}: use_bidirectional_attention (EmbeddingGemma: non-causal attention, window rewritten "
                "to W // 2 + 1) is not implemented")
        # transformers refuses this even though head_dim is explicit (configuration_gemma3.py:115-121,
        # spec quirk G3-11); refusing it too keeps every accepted config runnable by the reference.
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads}), as transformers' Gemma3TextConfig requires")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        for key in ("query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, key)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive finite number, got {value}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError("layer_types has 'sliding_attention' layers but sliding_window is null "
                              "(transformers fails on this config too)")
        activation(self.hidden_activation)


def _layer_types(raw: dict, layers: int) -> tuple[str, ...]:
    """One attention type per layer: ``layer_types``, else from ``sliding_window_pattern``.

    Raises:
        ConfigError: ``layer_types`` of the wrong length or with entries other than
            sliding_attention / full_attention; a pattern that is not a positive integer.
    """
    types = raw.get("layer_types")
    if types is None:
        pattern = get_positive_int(raw, "sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    return tuple(types)


def _rope_entries(raw: dict, name: str = NAME) -> dict[str, dict]:
    """``rope_parameters`` keyed by layer type, with a legacy ``rope_scaling`` merged into
    the full_attention entry, before defaults (``configuration_gemma3.py:137-143``).

    Raises:
        ConfigError: the fields are not objects; ``rope_parameters`` has keys other
            than the two layer types (a flat dict, which transformers silently
            replaces by the defaults); ``rope_scaling`` beside a ``rope_parameters``
            without a full_attention entry (transformers raises KeyError).
    """
    params, scaling = raw.get("rope_parameters"), raw.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json field '{key}' must be an object or null, got {value!r}")
    if params is None:
        params = {tau: {"rope_type": "default"} for tau in LAYER_TYPES}
    stray = sorted(set(params) - set(LAYER_TYPES))
    if stray:
        raise ConfigError(
            f"{name}: rope_parameters must be keyed by layer type {LAYER_TYPES}, found {stray}; transformers 5.24 "
            "ignores a flat rope_parameters dict for Gemma 3 and 3n and uses the defaults")
    entries = {}
    for tau, entry in params.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"rope_parameters[{tau!r}] must be an object or null, got {entry!r}")
        entries[tau] = dict(entry) if entry is not None else None
    if scaling is not None:
        if "full_attention" not in entries:
            raise ConfigError(f"{name}: rope_scaling needs a full_attention entry in rope_parameters to merge into")
        entries["full_attention"] = {**(entries["full_attention"] or {"rope_type": "default"}), **scaling}
    return entries


def _resolve_rope_entry(raw: dict, tau: str, entry: dict | None, name: str = NAME) -> dict:
    """One layer type's RoPE parameters with rope_type and rope_theta filled in as
    transformers' ``convert_rope_params_to_dict`` / ``standardize_rope_params`` do.

    Raises:
        ConfigError: a legacy ``type`` that contradicts ``rope_type`` (transformers keeps
            ``rope_type`` and silently drops the scaling: a ``rope_scaling`` written with
            ``type`` only leaves the global layers unscaled), or a
            ``partial_rotary_factor`` other than 1 (transformers' default Gemma RoPE
            ignores it while the scaled types honour it; refused rather than guessed).
    """
    entry = dict(entry or {"rope_type": "default"})
    if "rope_theta" not in entry:
        entry["rope_theta"] = get_field(raw, LEGACY_THETA_KEY[tau], float, DEFAULT_THETA[tau])
    legacy_type = entry.pop("type", None)
    entry.setdefault("rope_type", legacy_type or "default")
    if legacy_type is not None and legacy_type != entry["rope_type"]:
        raise ConfigError(
            f"{name}: rope parameters of {tau} say rope_type={entry['rope_type']!r} but type={legacy_type!r}; "
            "transformers 5.24 uses rope_type and ignores the other (write 'rope_type')")
    for factor in (raw.get("partial_rotary_factor"), entry.get("partial_rotary_factor")):
        if factor is not None and factor != 1.0:
            raise ConfigError(f"{name}: partial_rotary_factor={factor!r} is not supported (only 1.0)")
    if entry["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_CONTEXT:
        entry.setdefault("original_max_position_embeddings", get_field(raw, "max_position_embeddings", int, 131_072))
    return entry


def _layer_rope_parameters(raw: dict, types: tuple[str, ...], head_dim: int, name: str = NAME) -> tuple[dict, ...]:
    """The resolved RoPE parameters of each layer's type, one dict per layer.

    Only the types in use are resolved and checked, as transformers builds RoPE
    tables only for those (``modeling_gemma3.py:145``). ``name`` is the architecture
    the errors name (Gemma 3n resolves its RoPE with these functions too).

    Raises:
        ConfigError: see :func:`_rope_entries` and :func:`_resolve_rope_entry`; an
            unsupported ``rope_type`` or bad scaling parameters (:func:`rope_frequencies`).
    """
    entries = _rope_entries(raw, name)
    resolved = {}
    for tau in sorted(set(types)):
        resolved[tau] = _resolve_rope_entry(raw, tau, entries.get(tau), name)
        rope_frequencies(resolved[tau], head_dim)
    return tuple(resolved[tau] for tau in types)


def layer_mask(config: Gemma3Config, layer: int, num_tokens: int) -> np.ndarray:
    """The ``(T, T)`` visibility mask of one layer: sliding-window causal or causal."""
    if config.layer_types[layer] == "sliding_attention":
        return sliding_window_mask(num_tokens, num_tokens, config.sliding_window)
    return causal_mask(num_tokens, num_tokens)


def rope_tables(config: Gemma3Config, num_tokens: int, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(cos, sin)``, each ``(T, D/2)`` in ``dtype``, for every layer at positions ``0..T-1``."""
    return rope_tables_at(config, np.arange(num_tokens), dtype)


def rope_tables_at(config: Gemma3Config, positions: np.ndarray, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(cos, sin)`` for every layer at ``positions`` ``(T,)`` or ``(B, T)``, each table
    ``positions.shape + (D/2,)`` in ``dtype``, with the RoPE parameters of the layer's type
    (computed once per layer type)."""
    by_type = {}
    for tau, params in zip(config.layer_types, config.layer_rope_parameters):
        if tau not in by_type:
            inv_freq, scaling = rope_frequencies(params, config.head_dim)
            by_type[tau] = rope_cos_sin(positions, inv_freq, dtype, scaling)
    return [by_type[tau] for tau in config.layer_types]


def layer_window(config: Gemma3Config, layer: int) -> int | None:
    """``sliding_window`` on a ``"sliding_attention"`` layer, None (causal over all keys) on a global one."""
    return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


def weight_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true (all releases).
    """
    m, d = config.hidden_size, config.head_dim
    per_layer = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, d,
                                  bias=config.attention_bias),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "post_attention_layernorm.weight": (m,),
        "pre_feedforward_layernorm.weight": (m,),
        **mlp_weight_shapes(m, config.intermediate_size, bias=False),
        "post_feedforward_layernorm.weight": (m,),
    }
    return decoder_weight_shapes(config, per_layer)


def norm_1p(x: np.ndarray, weight: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """Gemma's RMSNorm with gain ``1 + w`` (w stored as an offset from 1)."""
    return rms_norm(x, weight, config.rms_norm_eps, weight_offset=1.0)


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: Gemma3Config, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """Gemma 3 self-attention of layer ``layer`` on normalised input ``x`` ``(B, T, M)``.

    ``p`` holds the layer's ``self_attn.*`` tensors; ``cos, sin`` are ``(B, T, D/2)`` at the
    tokens' positions for the layer's type; ``context`` carries the positions, padding and the
    caches. No attention soft-cap (see ``IGNORED_KEYS``). Returns ``(B, T, M)`` and the layer's
    cache for the next call (keys after QK-norm and RoPE; the last W slots on a sliding layer).
    """
    b, t, _ = x.shape
    d = config.head_dim
    # Projection, then per-head (1 + w) QK-norm over D, then RoPE (spec quirk G3-9).
    q = norm_1p(projection(x, p, "self_attn.q_proj").reshape(b, t, -1, d), p["self_attn.q_norm.weight"], config)
    k = norm_1p(projection(x, p, "self_attn.k_proj").reshape(b, t, -1, d), p["self_attn.k_norm.weight"], config)
    v = projection(x, p, "self_attn.v_proj").reshape(b, t, -1, d)
    q, k = apply_rope_rotate_half(q, cos, sin), apply_rope_rotate_half(k, cos, sin)
    # Scale query_pre_attn_scalar ** -0.5, not D ** -0.5 (bug class SCL-01).
    out, kept = attend_with_cache(q, k, v, context, layer, scale=config.query_pre_attn_scalar ** -0.5,
                                  sliding_window=layer_window(config, layer))
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), kept


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Gemma3Config, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One sandwich-norm decoder layer: norm, attention, norm, residual; norm, GeGLU, norm, residual.
    Also returns the layer's cache."""
    a, kept = attention_block(norm_1p(h, p["input_layernorm.weight"], config), p, config, cos, sin, context, layer)
    h = h + norm_1p(a, p["post_attention_layernorm.weight"], config)
    x = norm_1p(h, p["pre_feedforward_layernorm.weight"], config)
    m = gated_mlp(x, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"], p["mlp.down_proj.weight"],
                  config.hidden_activation)
    return h + norm_1p(m, p["post_feedforward_layernorm.weight"], config), kept


def forward_step(
    weights: dict[str, np.ndarray], config: Gemma3Config, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits, taps, caches)``: logits ``(B, T, V)`` (soft-capped when
        ``final_logit_softcapping`` is set); taps maps ``"embed"`` (the *scaled*
        embedding, as transformers' ``embed_tokens`` module returns it),
        ``"layers.{l}"`` (output of layer l) and ``"norm"`` (final-normalised hidden
        state) to ``(B, T, M)`` arrays, in that order; one KVCache per layer.

    Dtype: everything in the dtype of the weights; ``sqrt(M)`` is rounded to it.
    """
    embedding = weights["model.embed_tokens.weight"]
    tables = rope_tables_at(config, context.positions, embedding.dtype)
    # Python's M ** 0.5, as transformers computes the buffer (modeling_gemma3.py:468).
    h = scaled_embed_tokens(input_ids, embedding, config.hidden_size ** 0.5)
    taps = {"embed": h}
    caches = []
    for layer in range(config.num_hidden_layers):
        cos, sin = tables[layer]
        h, kept = decoder_layer(h, layer_weights(weights, layer), config, cos, sin, context, layer)
        caches.append(kept)
        taps[f"layers.{layer}"] = h
    h = norm_1p(h, weights["model.norm.weight"], config)
    taps["norm"] = h
    # Tied head: the raw table E, without the embedding scale.
    logits = lm_head(h, embedding if config.tie_word_embeddings else weights["lm_head.weight"])
    if config.final_logit_softcapping is not None:
        logits = soft_cap(logits, config.final_logit_softcapping)
    return logits, taps, tuple(caches)


def forward(
    weights: dict[str, np.ndarray], config: Gemma3Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _release(**fields) -> dict:
    """A Gemma 3 text config.json in the published (transformers 4.5x) key style."""
    base = {
        "architectures": [NAME], "model_type": "gemma3_text", "vocab_size": 262_208, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "max_position_embeddings": 131_072,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }
    base.update(fields)
    return base


#: Published flagship text configs (config.json values that carry math). 4B, 12B and 27B
#: ship as Gemma3ForConditionalGeneration; these are their ``text_config`` run as
#: Gemma3ForCausalLM (identical hidden states; no final soft-cap is set in any release).
#: Sources: shared/spec/dense-architectures.md sec. 2.1 (27B: TensorRT-LLM
#: ``GEMMA3_27B_MINI_CONFIG`` and a test stating it matches google/gemma-3-27b-it/config.json;
#: 4B and 1B: config-parsing test fixtures). The spec gives the 12B from memory; its values
#: were checked against a copy of the gemma-3-12b ``text_config`` embedded in the LTX-2.3
#: text-encoder converter (transformers_version 4.51.0: H 3840, L 48, 16/8 heads, D 256,
#: F 15360, qpas 256, window 1024, pattern 6, theta 1e6 + linear 8, local 1e4, V 262208,
#: max_pos 131072). The shapes of all four are confirmed by parameter counts: with a
#: 262144-row table, :func:`weight_shapes` sums to exactly the keras-hub preset counts
#: (keras_hub/src/models/gemma3/gemma3_presets.py: 999885952, 3880099328, 11765788416,
#: 27009002240; tests/test_hf_agreement_gemma3.py). The HF 4B/12B/27B tables have 262208
#: rows (64 more, from the image token id 262144 upward). No value here is unverified.
PRESETS = {
    "gemma-3-1b": _release(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, sliding_window=512, rope_scaling=None,
        max_position_embeddings=32_768,
    ),
    "gemma-3-4b": _release(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "gemma-3-12b": _release(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8,
    ),
    "gemma-3-27b": _release(
        hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
    ),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Gemma3Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Gemma Team, Gemma 3 Technical Report, arXiv:2503.19786",
        "transformers 5.24 models/gemma3/modeling_gemma3.py, configuration_gemma3.py",
    ),
)
