"""SmolLM3 decoder (``SmolLM3ForCausalLM``): Llama pre-norm with NoPE layers.

Forward pass, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = x Wq^T + bq   (B, T, H, D)      no QK-norm
    k   = x Wk^T + bk   (B, T, Hkv, D)
    v   = x Wv^T + bv   (B, T, Hkv, D)
    q, k = RoPE_rotate_half(q, k; rope_parameters)   only if no_rope_layers[l] == 1
    h   = h + o_proj( GQA(q, k, v; scale = D^-0.5, mask_l) ) (+ bo)
    mask_l: causal, or causal within sliding_window W where layer_types[l] is "sliding_attention"
    h   = h + SwiGLU( RMSNorm(h; post_attention_layernorm) )   (biases when mlp_bias)
    logits = RMSNorm(h_L; norm) W_lm^T        (W_lm = E when tie_word_embeddings, the default)

Notation: M hidden_size, H num_attention_heads, Hkv num_key_value_heads, D head
width (not a config field: ``M // H`` unless config.json carries ``head_dim``),
W sliding_window.

The per-layer schedules are resolved once, as transformers 5.24's
``SmolLM3Config.__post_init__`` does (``configuration_smollm3.py:100-112``):

* ``no_rope_layers`` (misnomer: **1 means the layer applies RoPE**, 0 means NoPE);
  when absent, ``no_rope_layers[l] = int((l + 1) % no_rope_layer_interval != 0)``:
  interval 4 makes layers 3, 7, 11, ... NoPE (bug class NOPE-01).
* ``layer_types``; when absent, a layer is ``"sliding_attention"`` iff
  ``use_sliding_window`` and ``sliding_window`` is not null and the layer is
  **NoPE** (RoPE layers stay full), else ``"full_attention"``.

A NoPE layer is otherwise identical: same scale, same mask rule, no rotation.
Absent ``rope_theta`` means 2e6 (``default_theta``), not 10000; SmolLM3-3B sets 5e6.

Incremental decoding: every layer keeps a :class:`refimpl.kv_cache.KVCache` of its
keys and values, RoPE layers their rotated keys and NoPE layers their keys as projected
(a NoPE key needs no position later); a ``"sliding_attention"`` layer keeps the last W
slots, a ``"full_attention"`` layer every slot. :func:`forward` is :func:`forward_step`
from position 0.

Dtype: computed in the dtype of the weights (float64 or float32).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Hugging Face, "SmolLM3: smol, multilingual, long-context reasoner" (blog,
2025-07-08, and the HuggingFaceTB/SmolLM3-3B model card): Llama-style GQA decoder
with NoPE on every 4th layer (Yang et al., "Rope to Nope and back again",
arXiv:2501.18795).
Checked against: transformers 5.24 ``models/smollm3/modeling_smollm3.py``
(``SmolLM3Attention.__init__``/``forward`` lines 192-235, ``SmolLM3Model.forward``
390-415) and ``configuration_smollm3.py`` (lines 54, 71-112).
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
    mlp_weight_shapes, num_key_value_heads, projection, resolve_rope_parameters, rope_tables_at, run_decoder_step,
    split_heads, tied_head, validate_common,
)

NAME = "SmolLM3ForCausalLM"

#: config.json keys deliberately without effect here: SmolLM3-3B's config.json carries
#: both, and transformers' SmolLM3 reads neither.
IGNORED_KEYS = frozenset({"max_window_layers", "pretraining_tp"})
#: ``SmolLM3Config.default_theta`` (configuration_smollm3.py:54).
DEFAULT_ROPE_THETA = 2_000_000.0
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class SmolLM3Config:
    """SmolLM3 hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``SmolLM3Config``. ``head_dim`` is resolved,
    ``no_rope_layers`` and ``layer_types`` are tuples with one entry per layer, and
    ``rope_parameters`` is the flat dict transformers resolves from
    ``rope_parameters`` / ``rope_scaling`` / ``rope_theta``. ``max_position_embeddings``
    matters only to scaled RoPE types (the default ``original_max_position_embeddings``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_parameters: dict = field(hash=False)
    max_position_embeddings: int = 32768
    no_rope_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    no_rope_layer_interval: int = 4
    use_sliding_window: bool = False
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> "SmolLM3Config":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not
                divide, an odd head width, malformed ``no_rope_layers`` or
                ``layer_types``, a sliding layer without a window, an unknown
                activation, or a RoPE type this version does not implement.
        """
        hidden = get_positive_int(raw, "hidden_size")
        heads = get_positive_int(raw, "num_attention_heads")
        layers = get_positive_int(raw, "num_hidden_layers")
        use_sliding = get_field(raw, "use_sliding_window", bool, False)
        window = get_field(raw, "sliding_window", int, None, nullable=True)
        interval = get_positive_int(raw, "no_rope_layer_interval", 4)
        no_rope = _no_rope_layers(raw, layers, interval)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=num_key_value_heads(raw, heads, absent_default=4),
            head_dim=implicit_head_dim(raw, hidden, heads, null_means_default=False),
            rope_parameters=resolve_rope_parameters(raw, DEFAULT_ROPE_THETA, NAME),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 32768),
            no_rope_layers=no_rope,
            layer_types=_layer_types(raw, no_rope, use_sliding, window),
            no_rope_layer_interval=interval,
            use_sliding_window=use_sliding,
            sliding_window=window,
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, True),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            mlp_bias=get_field(raw, "mlp_bias", bool, False),
        )
        validate_common(NAME, config)
        check_known_keys(raw, set(cls.__dataclass_fields__) | ROPE_KEYS, IGNORED_KEYS, NAME)
        return config


def _no_rope_layers(raw: dict, layers: int, interval: int) -> tuple[int, ...]:
    """1 (apply RoPE) or 0 (NoPE) per layer, from ``no_rope_layers`` or the interval rule.

    transformers indexes ``no_rope_layers`` by layer, so a longer list is allowed
    and its tail unused.

    Raises:
        ConfigError: not a list of 0/1 integers, or shorter than ``num_hidden_layers``.
    """
    given = raw.get("no_rope_layers")
    if given is None:
        return tuple(int((layer + 1) % interval != 0) for layer in range(layers))
    if not isinstance(given, list) or len(given) < layers or any(
            isinstance(x, bool) or x not in (0, 1) for x in given):
        raise ConfigError(f"config.json 'no_rope_layers' must list at least {layers} entries of 0 or 1, got {given!r}")
    return tuple(int(x) for x in given[:layers])


def _layer_types(raw: dict, no_rope: tuple[int, ...], use_sliding: bool, window: int | None) -> tuple[str, ...]:
    """One attention type per layer, from ``layer_types`` or, as transformers derives it,
    sliding for the NoPE layers when ``use_sliding_window`` and a window are set.

    An explicit ``"sliding_attention"`` entry needs ``use_sliding_window`` true and a
    window: with the flag false, transformers' eager/sdpa masks slide but its
    flash-attention path does not (``modeling_smollm3.py:193-197`` vs ``:405``), so
    the result would depend on the attention backend.

    Raises:
        ConfigError: wrong length or unknown entries, a sliding layer without a
            window or without ``use_sliding_window``, or a window below 1.
    """
    layers = len(no_rope)
    types = raw.get("layer_types")
    if types is None:
        slides = use_sliding and window is not None
        types = ["sliding_attention" if slides and not rope else "full_attention" for rope in no_rope]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    if "sliding_attention" in types and (not use_sliding or window is None):
        raise ConfigError("layer_types has 'sliding_attention' layers but use_sliding_window is false or "
                          "sliding_window is null")
    if "sliding_attention" in types and window < 1:
        raise ConfigError(f"sliding_window must be >= 1, got {window}")
    return tuple(types)


def weight_shapes(config: SmolLM3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    Projection biases exist with ``attention_bias``, MLP biases with ``mlp_bias``;
    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true.
    """
    m = config.hidden_size
    per_layer = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                  config.attention_bias),
        "post_attention_layernorm.weight": (m,),
        **mlp_weight_shapes(m, config.intermediate_size, config.mlp_bias),
    }
    return decoder_weight_shapes(config, per_layer)


def layer_window(config: SmolLM3Config, layer: int) -> int | None:
    """``sliding_window`` on a ``"sliding_attention"`` layer, None (causal over all keys) otherwise."""
    return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: SmolLM3Config, rope: tuple | None, context: StepContext,
    layer: int,
) -> tuple[np.ndarray, KVCache]:
    """SmolLM3 self-attention of layer ``layer`` on normalised input ``x`` ``(B, T, M)``.

    ``rope`` is ``(cos, sin)`` ``(B, T, D/2)`` at the tokens' positions on a RoPE layer and None
    on a NoPE layer; ``context`` carries the positions, padding and the caches. Returns
    ``(B, T, M)`` and the layer's cache for the next call (keys unrotated on a NoPE layer).
    """
    d = config.head_dim
    q = split_heads(projection(x, p, "self_attn.q_proj"), d)
    k = split_heads(projection(x, p, "self_attn.k_proj"), d)
    v = split_heads(projection(x, p, "self_attn.v_proj"), d)
    return attend_step(q, k, v, p, rope, context, layer, layer_window(config, layer))


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: SmolLM3Config, rope: tuple | None, context: StepContext,
    layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm decoder layer: attention then SwiGLU MLP, each with a residual; also the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, rope, context, layer)
    h = h + attended
    return h + gated_mlp_block(rms_norm(h, p["post_attention_layernorm.weight"], eps), p, config.hidden_act), kept


def forward_step(
    weights: dict[str, np.ndarray], config: SmolLM3Config, input_ids: np.ndarray, context: StepContext
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

    def layer(h, p, index):
        layer_rope = rope if config.no_rope_layers[index] else None
        return decoder_layer(h, p, config, layer_rope, context, index)

    return run_decoder_step(weights, config, input_ids, context, layer)


def forward(
    weights: dict[str, np.ndarray], config: SmolLM3Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: Published flagship configs (config.json values that carry math).
#: Source: HuggingFaceTB/SmolLM3-3B config.json (verbatim fixtures quoted in
#: shared/spec/dense-architectures.md sec. 7.1): NoPE on every 4th layer, theta 5e6, tied.
PRESETS = {
    "SmolLM3-3B": {
        "architectures": [NAME], "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "rope_scaling": None,
        "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0] * 9,
        "use_sliding_window": False, "sliding_window": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 65536,
        "pad_token_id": 128004, "eos_token_id": 128012,
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=SmolLM3Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Hugging Face, SmolLM3 blog post and HuggingFaceTB/SmolLM3-3B model card (2025)",
        "transformers 5.24 models/smollm3/modeling_smollm3.py",
    ),
)
