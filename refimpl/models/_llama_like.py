"""Pieces shared by the Llama-shaped decoders (OLMo 2, Mistral, SmolLM3).

Each model module reads top to bottom on its own: its config, its attention and
decoder layer, its forward. What is identical across the three lives here: how
transformers 5.24 resolves the config fields they share (RoPE parameters, key/value
heads, the implicit head_dim), projections with optional biases, the attention
core after q/k/v are formed, the gated MLP with optional biases, the checkpoint
layout outside the decoder layers, and the embed -> layers -> norm -> head loop.

Qwen3 and Gemma 3 reuse only the plumbing (weight-shape tables, :func:`layer_weights`,
:func:`projection`, :func:`tied_head`); their norms, RoPE, attention and masks are
called from their own modules, where tests patch them.

Notation (see ``refimpl/NOTATION.md``): B batch, T tokens, M hidden_size,
F intermediate_size, H query heads, Hkv key/value heads, D head_dim, V vocab_size.

Checked against: transformers 5.24 ``modeling_rope_utils.py``
(``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``, ``standardize_rope_params``),
``models/{olmo2,mistral,smollm3}/configuration_*.py`` and ``modeling_*.py``.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from ..config import get_field, get_positive_int
from ..embedding import embed_tokens, lm_head
from ..errors import ConfigError
from ..kv_cache import KVCache, StepContext, attend_with_cache
from ..linear import linear
from ..mlp import activation
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies

#: config.json keys read by :func:`resolve_rope_parameters`.
ROPE_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"})


def resolve_rope_parameters(raw: dict, default_theta: float, architecture: str) -> dict:
    """The RoPE parameters transformers ends up with, as one flat ``rope_parameters`` dict.

    transformers 5.24 (``convert_rope_params_to_dict``): a non-empty legacy
    ``rope_scaling`` dict *replaces* ``rope_parameters``; ``rope_theta`` then comes
    from that dict, else from the top-level ``rope_theta``, else from the class's
    ``default_theta``; ``rope_type`` defaults to the legacy ``type`` key, else
    ``"default"``.

    Raises:
        ConfigError: the fields are not objects, ``rope_theta`` is not a positive
            finite number, or ``partial_rotary_factor`` is set to anything but 1
            (these models' default RoPE ignores it while scaled types honour it;
            refused rather than guessed).
    """
    for key in ("rope_parameters", "rope_scaling"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json field '{key}' must be an object or null, got {value!r}")
    chosen = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if "rope_theta" not in chosen:
        chosen["rope_theta"] = get_field(raw, "rope_theta", float, default_theta)
    chosen.setdefault("rope_type", chosen.get("type", "default"))
    theta = chosen["rope_theta"]
    is_number = isinstance(theta, (int, float)) and not isinstance(theta, bool)
    # Compared as Python numbers (exact for any int): np.isfinite raises TypeError beyond int64.
    if not is_number or not 0 < theta <= sys.float_info.max:
        raise ConfigError(f"{architecture}: rope_theta must be a positive finite number, got {theta!r}")
    chosen["rope_theta"] = float(theta)
    for factor in (raw.get("partial_rotary_factor"), chosen.get("partial_rotary_factor")):
        if factor is not None and factor != 1.0:
            raise ConfigError(f"{architecture}: partial_rotary_factor={factor!r} is not supported (only 1.0)")
    return chosen


def num_key_value_heads(raw: dict, heads: int, absent_default: int | None) -> int:
    """``num_key_value_heads``: an explicit null means ``num_attention_heads``; an absent
    key means the class default (``absent_default``; None again means ``heads``)."""
    if "num_key_value_heads" not in raw:
        return heads if absent_default is None else absent_default
    if raw["num_key_value_heads"] is None:
        return heads
    return get_positive_int(raw, "num_key_value_heads")


def implicit_head_dim(raw: dict, hidden_size: int, heads: int, *, null_means_default: bool) -> int:
    """``head_dim``: the config.json value when given, else ``hidden_size // heads``.

    OLMo 2 and SmolLM3 have no ``head_dim`` field; their attention reads
    ``getattr(config, "head_dim", M // H)``, so a value in config.json is honoured
    and a null one breaks the model (refused here). Mistral's field defaults to
    None, which ``__post_init__`` turns into ``M // H`` (``null_means_default``).
    The division is floor division, as in transformers.

    Raises:
        ConfigError: null where not allowed, or not a positive integer.
    """
    if raw.get("head_dim", 0) is None:
        if not null_means_default:
            raise ConfigError("config.json field 'head_dim' is null; give an integer or leave it out")
        return hidden_size // heads
    return get_positive_int(raw, "head_dim", hidden_size // heads)


def validate_common(name: str, config) -> None:
    """Checks every one of these configs needs, on the built config.

    Raises:
        ConfigError: ``num_attention_heads`` not a multiple of ``num_key_value_heads``,
            an odd or zero ``head_dim``, a negative or non-finite eps, an unknown
            activation, or a RoPE type :func:`refimpl.rope.rope_frequencies` does not
            implement (refused at load time, not at the first forward).
    """
    heads, kv_heads, head_dim, eps = (config.num_attention_heads, config.num_key_value_heads,
                                      config.head_dim, config.rms_norm_eps)
    if heads % kv_heads:
        raise ConfigError(
            f"{name}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"{name}: head_dim must be even and >= 2 for RoPE, got {head_dim}")
    if not np.isfinite(eps) or eps < 0:
        raise ConfigError(f"{name}: rms_norm_eps must be a finite number >= 0, got {eps}")
    activation(config.hidden_act)
    rope_frequencies(config.rope_parameters, head_dim, max_position_embeddings=config.max_position_embeddings)


def attention_weight_shapes(m: int, heads: int, kv_heads: int, head_dim: int, bias: bool) -> dict:
    """``self_attn.{q,k,v,o}_proj`` weights (and biases when ``bias``) of one layer."""
    qd, kvd = heads * head_dim, kv_heads * head_dim
    shapes = {"self_attn.q_proj.weight": (qd, m), "self_attn.k_proj.weight": (kvd, m),
              "self_attn.v_proj.weight": (kvd, m), "self_attn.o_proj.weight": (m, qd)}
    if bias:
        shapes.update({f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", qd), ("k", kvd), ("v", kvd), ("o", m))})
    return shapes


def mlp_weight_shapes(m: int, f: int, bias: bool) -> dict:
    """``mlp.{gate,up,down}_proj`` weights (and biases when ``bias``) of one layer."""
    shapes = {"mlp.gate_proj.weight": (f, m), "mlp.up_proj.weight": (f, m), "mlp.down_proj.weight": (m, f)}
    if bias:
        shapes.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (m,)})
    return shapes


def decoder_weight_shapes(config, per_layer: dict) -> dict[str, tuple[int, ...]]:
    """Embedding, final norm, ``lm_head`` (absent when tied) and ``per_layer`` for every layer."""
    v, m = config.vocab_size, config.hidden_size
    shapes = {"model.embed_tokens.weight": (v, m), "model.norm.weight": (m,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, m)
    for layer in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{name}": s for name, s in per_layer.items()})
    return shapes


def tied_head(config) -> dict[str, str]:
    """``optional_weights``: a tied checkpoint may still carry ``lm_head.weight`` equal to E."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


def layer_weights(weights: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The tensors of one decoder layer, with the ``model.layers.{layer}.`` prefix removed.

    Names are selected before any value is read, so that lazy weights
    (:class:`refimpl.lazy_weights.LazyWeights`) convert this layer's tensors only."""
    prefix = f"model.layers.{layer}."
    return {name[len(prefix):]: weights[name] for name in weights if name.startswith(prefix)}


def projection(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    """``{name}`` (e.g. ``"self_attn.q_proj"``) applied to ``x``, with its bias when present."""
    return linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def split_heads(x: np.ndarray, head_dim: int) -> np.ndarray:
    """``(B, T, n*D) -> (B, T, n, D)``, head-major channels ``c = h*D + d``."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def attend_step(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray], rope: tuple | None,
    context: StepContext, layer: int, window: int | None,
) -> tuple[np.ndarray, KVCache]:
    """RoPE at the tokens' positions (unless ``rope`` is None), GQA with scale ``D**-0.5`` over
    layer ``layer``'s cache and the new keys, heads merged, ``o_proj``.

    Args:
        q: ``(B, T, H, D)``; k, v: ``(B, T, Hkv, D)``, the call's new tokens.
        p: the layer's tensors (``self_attn.o_proj.*`` is used).
        rope: ``(cos, sin)``, each ``(B, T, D/2)`` at ``context.positions``, or None (NoPE layer).
        context: the call's :class:`refimpl.kv_cache.StepContext`; ``layer`` indexes its caches.
        window: the layer's sliding window W (its cache keeps W slots), or None (keeps all).

    Returns:
        ``(B, T, M)`` in the dtype of ``q``, and the layer's :class:`refimpl.kv_cache.KVCache`
        for the next call (keys after RoPE).
    """
    b, t, _, d = q.shape
    if rope is not None:
        q, k = apply_rope_rotate_half(q, *rope), apply_rope_rotate_half(k, *rope)
    out, kept = attend_with_cache(q, k, v, context, layer, scale=d**-0.5, sliding_window=window)
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), kept


def gated_mlp_block(x: np.ndarray, p: dict[str, np.ndarray], hidden_act: str) -> np.ndarray:
    """``down( act(gate x + b_g) * (up x + b_u) ) + b_d``; biases only where the checkpoint has them."""
    act = activation(hidden_act)
    return projection(act(projection(x, p, "mlp.gate_proj")) * projection(x, p, "mlp.up_proj"), p, "mlp.down_proj")


def rope_tables(config, num_tokens: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(T, D/2)`` for positions ``0..T-1`` from ``config.rope_parameters``.

    ``max_position_embeddings`` only matters to scaled RoPE types (the default
    ``original_max_position_embeddings`` of llama3 / yarn, as transformers'
    ``standardize_rope_params`` sets it).

    Raises:
        ConfigError: a RoPE type :func:`refimpl.rope.rope_frequencies` does not implement.
    """
    inv_freq, scaling = rope_frequencies(config.rope_parameters, config.head_dim,
                                         max_position_embeddings=config.max_position_embeddings)
    return rope_cos_sin(np.arange(num_tokens), inv_freq, dtype, scaling)


def rope_tables_at(config, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(B, T, D/2)`` at the tokens' ``positions`` ``(B, T)``, as :func:`rope_tables`."""
    inv_freq, scaling = rope_frequencies(config.rope_parameters, config.head_dim,
                                         max_position_embeddings=config.max_position_embeddings)
    return rope_cos_sin(positions, inv_freq, dtype, scaling)


def run_decoder_step(
    weights: dict[str, np.ndarray], config, input_ids: np.ndarray, context,
    layer: Callable[[np.ndarray, dict, int], tuple],
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """:func:`run_decoder` for one incremental call: ``layer(h, layer_weights, l) -> (h, cache)``.

    ``context`` is the call's :class:`refimpl.kv_cache.StepContext` (the layer closes over it).

    Returns:
        ``(logits (B, T, V), taps, caches)`` with one cache per layer, in layer order.
    """
    caches = []

    def keep(h, p, index):
        h, kept = layer(h, p, index)
        caches.append(kept)
        return h

    logits, taps = run_decoder(weights, config, input_ids, keep)
    return logits, taps, tuple(caches)


def run_decoder(
    weights: dict[str, np.ndarray], config, input_ids: np.ndarray,
    layer: Callable[[np.ndarray, dict, int], np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embed, apply ``layer(h, layer_weights, l)`` for every l, final RMSNorm, LM head.

    Returns:
        ``(logits (B, T, V), taps)``; taps ``"embed"``, ``"layers.{l}"``, ``"norm"``
        are ``(B, T, M)``, in that order.
    """
    embedding = weights["model.embed_tokens.weight"]
    h = embed_tokens(input_ids, embedding)
    taps = {"embed": h}
    for index in range(config.num_hidden_layers):
        h = layer(h, layer_weights(weights, index), index)
        taps[f"layers.{index}"] = h
    h = rms_norm(h, weights["model.norm.weight"], config.rms_norm_eps)
    taps["norm"] = h
    head = embedding if config.tie_word_embeddings else weights["lm_head.weight"]
    return lm_head(h, head), taps


def decoder_layer_mtp_logits(
    weights: dict[str, np.ndarray], config, input_ids: np.ndarray, main_hidden: np.ndarray, depth: Callable,
    chain: Callable,
) -> list[np.ndarray]:
    """Draft logits of the MTP depths k = 1..D stored as extra decoder layers
    ``model.layers.{L + k - 1}.*`` (DeepSeek-V3 / Kimi K2, GLM-4.5), ``(B, T-k, V)`` each.

    Args:
        weights: the main model's and the MTP depths' tensors.
        config: with ``num_hidden_layers`` L, ``num_nextn_predict_layers`` D and ``tie_word_embeddings``.
        input_ids: ``(B, T)``. main_hidden: the final-normed hidden state ``(B, T, M)`` (tap ``"norm"``).
        depth: ``depth(hidden_states, next_token_embeddings, *, weights, config) -> (B, T', M)``, one
            depth given its layer's tensors (the model module's ``mtp_depth``).
        chain: :func:`refimpl.mtp.mtp_chain` (which hidden state and which token each depth reads),
            passed by the model module so that its name there stays the one place to replace it.

    The head and the embedding are the main model's.
    """
    from functools import partial

    embedding = weights["model.embed_tokens.weight"]
    head = embedding if config.tie_word_embeddings else weights["lm_head.weight"]
    layers = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    depths = [partial(depth, weights=layer_weights(weights, layer), config=config) for layer in layers]
    return [lm_head(h, head) for h in chain(main_hidden, input_ids, embedding, depths)]
