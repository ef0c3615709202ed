"""Qwen3 dense decoder (``Qwen3ForCausalLM``).

Forward pass, pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = RMSNorm_per_head(x Wq^T + bq; q_norm)   (B, T, H, D)   QK-norm over D, before RoPE
    k   = RMSNorm_per_head(x Wk^T + bk; k_norm)   (B, T, Hkv, D)
    v   = x Wv^T + bv                             (B, T, Hkv, D)
    q, k = RoPE_rotate_half(q, k; rope_parameters, positions 0..T-1)   default, linear, llama3 or YaRN
    h   = h + o_proj( GQA(q, k, v; scale = D^-0.5, mask) ) (+ bo)
    mask: causal, or causal within sliding_window W on "sliding_attention" layers
    h   = h + SwiGLU( RMSNorm(h; post_attention_layernorm) )
    logits = RMSNorm(h_L; norm) W_lm^T        (W_lm = E when tie_word_embeddings)

head_dim D is its own config field (default 128) and need not equal
hidden_size / num_attention_heads (Qwen3-32B: 64 heads x 128 = 8192 != 5120).
The biases b exist only when ``attention_bias`` is true (no released Qwen3 uses
them). Sliding-window layers exist only when ``use_sliding_window`` is true:
then layer l slides iff l >= ``max_window_layers`` (or as ``layer_types`` says).

Paper: Qwen3 Technical Report, arXiv:2505.09388, sec. 2 (QK-Norm, GQA, SwiGLU, RoPE, pre-RMSNorm).
Checked against: transformers 5.24 ``models/qwen3/modeling_qwen3.py`` and
``configuration_qwen3.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..embedding import embed_tokens, lm_head
from ..errors import ConfigError
from ..kv_cache import KVCache, StepContext, attend_with_cache, fresh_context
from ..masks import causal_mask, sliding_window_mask
from ..mlp import swiglu_mlp
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies
from ._llama_like import (
    ROPE_KEYS, attention_weight_shapes, decoder_weight_shapes, layer_weights, mlp_weight_shapes, projection,
    resolve_rope_parameters, tied_head,
)

NAME = "Qwen3ForCausalLM"

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset()
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``Qwen3Config`` where config.json may omit
    a key. ``layer_types`` is resolved to a tuple with one entry per layer, and
    ``sliding_window`` is None unless ``use_sliding_window`` is true (as in
    transformers' ``Qwen3Config.__post_init__``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0},
                                  hash=False)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen3Config":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not
                divide, inconsistent layer types, or a feature this version does not
                implement (RoPE scaling, an activation other than silu).
        """
        heads = get_positive_int(raw, "num_attention_heads")
        layers = get_positive_int(raw, "num_hidden_layers")
        use_sliding = get_field(raw, "use_sliding_window", bool, False)
        window = get_field(raw, "sliding_window", int, 4096, nullable=True) if use_sliding else None
        max_window_layers = get_field(raw, "max_window_layers", int, 28)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=get_positive_int(raw, "hidden_size"),
            intermediate_size=get_positive_int(raw, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_num_key_value_heads(raw, heads),
            head_dim=get_positive_int(raw, "head_dim", 128),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            rope_parameters=resolve_rope_parameters(raw, 10000.0, NAME),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 32768),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            use_sliding_window=use_sliding,
            sliding_window=window,
            max_window_layers=max_window_layers,
            layer_types=_layer_types(raw, layers, window, max_window_layers),
        )
        config._validate()
        used = {f for f in cls.__dataclass_fields__} | ROPE_KEYS
        check_known_keys(raw, used, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        # Refuses an unsupported or malformed RoPE scaling at load time, naming the key.
        rope_frequencies(self.rope_parameters, self.head_dim, max_position_embeddings=self.max_position_embeddings)
        if self.hidden_act != "silu":
            raise ConfigError(f"{NAME}: hidden_act={self.hidden_act!r} is not supported (Qwen3 uses 'silu')")


def _num_key_value_heads(raw: dict, heads: int) -> int:
    """``num_key_value_heads``; transformers' Qwen3Config defaults an absent key to 32
    and only an explicit null to ``num_attention_heads``."""
    if raw.get("num_key_value_heads", 0) is None:
        return heads
    return get_positive_int(raw, "num_key_value_heads", 32)


def _layer_types(raw: dict, layers: int, window: int | None, max_window_layers: int) -> tuple[str, ...]:
    """One attention type per layer, from ``layer_types`` or, as transformers derives
    it, sliding for layers at or above ``max_window_layers`` when a window is in force.

    Raises:
        ConfigError: wrong length or unknown entries, or a sliding layer without a
            window (``use_sliding_window`` false).
    """
    types = raw.get("layer_types")
    if types is None:
        return tuple(
            "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
            for i in range(layers)
        )
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    if window is None and "sliding_attention" in types:
        raise ConfigError("layer_types has 'sliding_attention' layers but use_sliding_window is false (no window)")
    return tuple(types)


def layer_mask(config: Qwen3Config, layer: int, num_tokens: int) -> np.ndarray:
    """The ``(T, T)`` visibility mask of one layer: causal, or sliding-window causal."""
    if config.layer_types[layer] == "sliding_attention":
        return sliding_window_mask(num_tokens, num_tokens, config.sliding_window)
    return causal_mask(num_tokens, num_tokens)


def weight_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true.
    """
    m, d = config.hidden_size, config.head_dim
    per_layer = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, d,
                                  bias=config.attention_bias),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "post_attention_layernorm.weight": (m,),
        **mlp_weight_shapes(m, config.intermediate_size, bias=False),
    }
    return decoder_weight_shapes(config, per_layer)


def layer_window(config: Qwen3Config, layer: int) -> int | None:
    """``sliding_window`` on sliding layers, None on full-attention ones."""
    return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int, window: int | None,
) -> tuple[np.ndarray, KVCache]:
    """Qwen3 self-attention on normalised input ``x`` ``(B, T, M)``.

    ``p`` holds the layer's ``self_attn.*`` tensors; ``cos, sin`` are ``(B, T, D/2)`` at the
    tokens' positions; ``context`` carries the positions, padding and the caches; ``window``
    is the layer's sliding window or None. Reads only ``head_dim`` and ``rms_norm_eps`` of
    ``config`` (Qwen3-MoE shares it). Returns ``(B, T, M)`` and the layer's cache for the next
    call (keys after QK-norm and RoPE).
    """
    b, t, _ = x.shape
    d, eps = config.head_dim, config.rms_norm_eps
    # QK-norm is per head, over head_dim, and comes before RoPE.
    q = rms_norm(projection(x, p, "self_attn.q_proj").reshape(b, t, -1, d), p["self_attn.q_norm.weight"], eps)
    k = rms_norm(projection(x, p, "self_attn.k_proj").reshape(b, t, -1, d), p["self_attn.k_norm.weight"], eps)
    v = projection(x, p, "self_attn.v_proj").reshape(b, t, -1, d)
    q, k = apply_rope_rotate_half(q, cos, sin), apply_rope_rotate_half(k, cos, sin)
    out, kept = attend_with_cache(q, k, v, context, layer, scale=d**-0.5, sliding_window=window)
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), kept


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Qwen3Config, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm decoder layer: attention then SwiGLU MLP, each with a residual."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, cos, sin, context,
                                     layer, layer_window(config, layer))
    h = h + attended
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps)
    return h + swiglu_mlp(x, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"], p["mlp.down_proj.weight"]), kept


def forward_step(
    weights: dict[str, np.ndarray], config: Qwen3Config, input_ids: np.ndarray, context: StepContext
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
        ``"layers.{l}"`` (output of layer l) and ``"norm"`` (final-normalised
        hidden state) to ``(B, T, M)`` arrays, in that order; one KVCache per layer.
    """
    embedding = weights["model.embed_tokens.weight"]
    dtype = embedding.dtype
    inv_freq, scaling = rope_frequencies(
        config.rope_parameters, config.head_dim, max_position_embeddings=config.max_position_embeddings)
    cos, sin = rope_cos_sin(context.positions, inv_freq, dtype, scaling)
    h = embed_tokens(input_ids, embedding)
    taps = {"embed": h}
    caches = []
    for layer in range(config.num_hidden_layers):
        h, kept = decoder_layer(h, layer_weights(weights, layer), config, cos, sin, context, layer)
        caches.append(kept)
        taps[f"layers.{layer}"] = h
    h = rms_norm(h, weights["model.norm.weight"], config.rms_norm_eps)
    taps["norm"] = h
    head = embedding if config.tie_word_embeddings else weights["lm_head.weight"]
    return lm_head(h, head), taps, tuple(caches)


def forward(
    weights: dict[str, np.ndarray], config: Qwen3Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: Published flagship configs (config.json values that carry math).
#: Sources: the config.json files of Qwen/Qwen3-0.6B, Qwen/Qwen3-8B and Qwen/Qwen3-32B
#: on the Hugging Face Hub, as summarised in shared/spec/dense-architectures.md sec. 5.1.
PRESETS = {
    "Qwen3-0.6B": {
        "architectures": [NAME], "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "hidden_act": "silu",
    },
    "Qwen3-8B": {
        "architectures": [NAME], "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "Qwen3-32B": {
        "architectures": [NAME], "vocab_size": 151936, "hidden_size": 5120,
        "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Qwen3Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Qwen3 Technical Report, arXiv:2505.09388",
        "transformers 5.24 models/qwen3/modeling_qwen3.py",
    ),
)
