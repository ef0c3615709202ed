"""Mistral decoder (``MistralForCausalLM``; the text model of Mistral Small 3.1).

Forward pass, Llama pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = x Wq^T   (B, T, H, D)      no biases, no QK-norm
    k   = x Wk^T   (B, T, Hkv, D)
    v   = x Wv^T   (B, T, Hkv, D)
    q, k = RoPE_rotate_half(q, k; rope_parameters, positions)
    h   = h + o_proj( GQA(q, k, v; scale = D^-0.5, mask) )
    mask: causal within sliding_window W on EVERY layer when W is not null, else causal
    h   = h + SwiGLU( RMSNorm(h; post_attention_layernorm) )   (the pre-MLP norm)
    logits = RMSNorm(h_L; norm) W_lm^T        (W_lm = E when tie_word_embeddings)

Notation: M hidden_size, H num_attention_heads, Hkv num_key_value_heads, D head_dim,
W sliding_window (a query sees itself and the W - 1 keys before it).

Config quirks that change numbers (transformers 5.24):

* ``sliding_window`` **defaults to 4096** when config.json omits the key
  (``configuration_mistral.py:79``); only an explicit null means full attention.
  Mistral Small 3.1 sets null. When it is not null, every layer slides
  (``modeling_mistral.py:355``: one mask for all layers). ``use_sliding_window``
  and ``layer_types`` are not read by Mistral at all (the latter only logs a
  warning, ``configuration_mistral.py:87-90``), so they are ignored here too.
* ``head_dim`` null or absent means ``M // H`` (``configuration_mistral.py:83``);
  Mistral Small 3.1 needs its explicit 128 (M / H would be 160).
* ``num_key_value_heads`` absent means 8; null is refused, as transformers' strict
  ``MistralConfig`` refuses it (the field is typed ``int``).
* ``attention_bias`` is not a Mistral field: projections never have biases
  (``modeling_mistral.py:134-137``); ``true`` is refused rather than ignored.

Incremental decoding: every layer keeps a :class:`refimpl.kv_cache.KVCache` of its
keys (after RoPE) and values: the last W slots (a ring of W: the W - 1 keys a new token
still sees, and its own) when ``sliding_window`` is set, every slot when it is null;
:func:`forward` is :func:`forward_step` from position 0.

Dtype: computed in the dtype of the weights (float64 or float32).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Jiang et al., "Mistral 7B", arXiv:2310.06825, sec. 2 (sliding window attention,
GQA; architecture of Touvron et al., arXiv:2302.13971).
Checked against: transformers 5.24 ``models/mistral/modeling_mistral.py``
(``MistralAttention``, ``MistralDecoderLayer``, ``MistralModel.forward``) and
``configuration_mistral.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import ConfigError
from ..kv_cache import KVCache, StepContext, fresh_context
from ..rmsnorm import rms_norm
from ._llama_like import (
    ROPE_KEYS, attend_step, attention_weight_shapes, decoder_weight_shapes, gated_mlp_block, implicit_head_dim,
    mlp_weight_shapes, projection, resolve_rope_parameters, rope_tables_at, run_decoder_step,
    split_heads, tied_head, validate_common,
)

NAME = "MistralForCausalLM"

#: config.json keys deliberately without effect here (transformers' Mistral does not read them).
IGNORED_KEYS = frozenset({"use_sliding_window", "layer_types"})
#: ``MistralConfig`` has no ``default_theta`` of its own: the mixin's 10000 applies.
DEFAULT_ROPE_THETA = 10000.0
#: ``MistralConfig.sliding_window`` when config.json lacks the key.
DEFAULT_SLIDING_WINDOW = 4096


@dataclass(frozen=True)
class MistralConfig:
    """Mistral hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``MistralConfig`` where config.json may omit a
    key. ``head_dim`` is resolved (``M // H`` when null or absent), ``sliding_window``
    is the window every layer uses or None, and ``rope_parameters`` is the flat
    dict transformers resolves from ``rope_parameters`` / ``rope_scaling`` /
    ``rope_theta``. ``max_position_embeddings`` matters only to scaled RoPE types
    (the default ``original_max_position_embeddings``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_parameters: dict = field(hash=False)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = DEFAULT_SLIDING_WINDOW

    @classmethod
    def from_dict(cls, raw: dict) -> "MistralConfig":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not
                divide, an odd head width, a window below 1, ``attention_bias`` true,
                an unknown activation, or a RoPE type this version does not implement.
        """
        hidden = get_positive_int(raw, "hidden_size")
        heads = get_positive_int(raw, "num_attention_heads")
        if get_field(raw, "attention_bias", bool, False):
            raise ConfigError(f"{NAME}: attention_bias is true, but Mistral projections have no biases "
                              "(transformers ignores the key and would drop bias tensors)")
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size"),
            num_hidden_layers=get_positive_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 8),
            head_dim=implicit_head_dim(raw, hidden, heads, null_means_default=True),
            rope_parameters=resolve_rope_parameters(raw, DEFAULT_ROPE_THETA, NAME),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 131072),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            sliding_window=get_field(raw, "sliding_window", int, DEFAULT_SLIDING_WINDOW, nullable=True),
        )
        validate_common(NAME, config)
        if config.sliding_window is not None and config.sliding_window < 1:
            raise ConfigError(f"{NAME}: sliding_window must be >= 1 or null, got {config.sliding_window}")
        used = set(cls.__dataclass_fields__) | ROPE_KEYS | {"attention_bias"}
        check_known_keys(raw, used, IGNORED_KEYS, NAME)
        return config


def weight_shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true.
    """
    m = config.hidden_size
    per_layer = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                  bias=False),
        "post_attention_layernorm.weight": (m,),
        **mlp_weight_shapes(m, config.intermediate_size, bias=False),
    }
    return decoder_weight_shapes(config, per_layer)


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: MistralConfig, rope: tuple, context: StepContext, layer: int
) -> tuple[np.ndarray, KVCache]:
    """Mistral self-attention on normalised input ``x`` ``(B, T, M)``.

    ``p`` holds the layer's tensors; ``rope`` is ``(cos, sin)`` ``(B, T, D/2)`` at the tokens'
    positions; ``context`` carries the positions, padding and the caches. Every layer uses the
    one ``sliding_window`` (None: causal over all keys). Returns ``(B, T, M)`` and the layer's
    cache for the next call (the last W keys and values, or all of them).
    """
    d = config.head_dim
    q = split_heads(projection(x, p, "self_attn.q_proj"), d)
    k = split_heads(projection(x, p, "self_attn.k_proj"), d)
    v = split_heads(projection(x, p, "self_attn.v_proj"), d)
    return attend_step(q, k, v, p, rope, context, layer, config.sliding_window)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: MistralConfig, rope: tuple, context: StepContext, layer: int
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm decoder layer: attention then SwiGLU MLP, each with a residual; also the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, rope, context, layer)
    h = h + attended
    return h + gated_mlp_block(rms_norm(h, p["post_attention_layernorm.weight"], eps), p, config.hidden_act), kept


def forward_step(
    weights: dict[str, np.ndarray], config: MistralConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits, taps, caches)``: logits ``(B, T, V)``; taps maps ``"embed"``,
        ``"layers.{l}"`` (output of layer l) and ``"norm"`` to ``(B, T, M)`` arrays; one
        KVCache per layer.
    """
    rope = rope_tables_at(config, context.positions, weights["model.embed_tokens.weight"].dtype)
    return run_decoder_step(weights, config, input_ids, context,
                            lambda h, p, layer: decoder_layer(h, p, config, rope, context, layer))


def forward(
    weights: dict[str, np.ndarray], config: MistralConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: Published flagship configs (config.json values that carry math).
#: Source: the ``text_config`` of mistralai/Mistral-Small-3.1-24B-Base-2503 (and -Instruct-2503),
#: replicated by transformers' ``Mistral3Config`` text defaults (configuration_mistral3.py:53-71),
#: as summarised in shared/spec/dense-architectures.md sec. 4.1. The checkpoint ships its own
#: lm_head (untied, spec quirk M4).
PRESETS = {
    "Mistral-Small-3.1-24B": {
        "architectures": [NAME], "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
        "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "max_position_embeddings": 131072,
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=MistralConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Jiang et al., Mistral 7B, arXiv:2310.06825",
        "transformers 5.24 models/mistral/modeling_mistral.py",
    ),
)
