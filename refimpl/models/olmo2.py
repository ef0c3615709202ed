"""OLMo 2 decoder (``Olmo2ForCausalLM``).

Forward pass, post-norm inside the residual, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]                                       no input norm, no embedding scale
    q   = RMSNorm(h Wq^T + bq; q_norm)      (B, T, H*D)      QK-norm over the WHOLE projection,
    k   = RMSNorm(h Wk^T + bk; k_norm)      (B, T, Hkv*D)    all heads of a token jointly,
    v   = h Wv^T + bv                       (B, T, Hkv*D)    before the head split and RoPE
    q, k, v -> (B, T, H|Hkv, D);  q, k = RoPE_rotate_half(q, k; rope_parameters, positions)
    h   = h + RMSNorm( o_proj( GQA(q, k, v; scale = D^-0.5, causal) ); post_attention_layernorm )
    h   = h + RMSNorm( SwiGLU(h); post_feedforward_layernorm )
    logits = RMSNorm(h_L; norm) W_lm^T        (W_lm = E when tie_word_embeddings)

Notation: M hidden_size, F intermediate_size, H num_attention_heads, Hkv
num_key_value_heads, D head width. D is not an Olmo2Config field: transformers'
attention reads ``getattr(config, "head_dim", M // H)``, so it is ``M // H`` unless
config.json carries a ``head_dim``. q_norm has H*D entries and k_norm Hkv*D (bug
classes QKN-02, QKN-07). Every RMSNorm is the plain ``w * x / rms(x)``: eps inside
the root, weight not offset (NRM-*). The biases b exist only when
``attention_bias`` is true (no released OLMo 2 uses them); the MLP never has biases.

Incremental decoding: every layer attends causally over all earlier tokens and
keeps a plain :class:`refimpl.kv_cache.KVCache` of every key (after the whole-projection
QK-norm and RoPE) and value; :func:`forward` is :func:`forward_step` from position 0.

Dtype: computed in the dtype of the weights (float64 or float32). transformers
multiplies by the norm weight before casting back to the input dtype, unlike Llama;
that only differs in bfloat16/float16 (spec quirk O3).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: OLMo Team, "2 OLMo 2 Furious", arXiv:2501.00656, training-stability section (reordered norm:
RMSNorm on the outputs of attention and MLP inside the residual; QK-norm).
Checked against: transformers 5.24 ``models/olmo2/modeling_olmo2.py``
(``Olmo2Attention.forward`` lines 228-237, ``Olmo2DecoderLayer.forward`` 299-317,
``Olmo2RMSNorm`` 60-65) and ``configuration_olmo2.py`` (defaults, lines 69-92).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..kv_cache import KVCache, StepContext, fresh_context
from ..rmsnorm import rms_norm
from ._llama_like import (
    ROPE_KEYS, attend_step, attention_weight_shapes, decoder_weight_shapes, gated_mlp_block, implicit_head_dim,
    mlp_weight_shapes, num_key_value_heads, projection, resolve_rope_parameters, rope_tables_at, run_decoder_step,
    split_heads, tied_head, validate_common,
)

NAME = "Olmo2ForCausalLM"

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset()
#: ``Olmo2Config`` has no ``default_theta`` of its own: the mixin's 10000 applies.
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Olmo2Config:
    """OLMo 2 hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``Olmo2Config`` where config.json may omit a
    key (they are the old OLMo-1 7B values, e.g. ``rms_norm_eps`` 1e-5, not the
    released OLMo 2 ones). ``head_dim`` is resolved (``M // H`` when absent) and
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
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> "Olmo2Config":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not
                divide, an odd head width, an unknown activation, or a RoPE type or
                partial rotary factor this version does not implement.
        """
        hidden = get_positive_int(raw, "hidden_size")
        heads = get_positive_int(raw, "num_attention_heads")
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size"),
            num_hidden_layers=get_positive_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=num_key_value_heads(raw, heads, absent_default=None),
            head_dim=implicit_head_dim(raw, hidden, heads, null_means_default=False),
            rope_parameters=resolve_rope_parameters(raw, DEFAULT_ROPE_THETA, NAME),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 2048),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-5),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            attention_bias=get_field(raw, "attention_bias", bool, False),
        )
        validate_common(NAME, config)
        check_known_keys(raw, set(cls.__dataclass_fields__) | ROPE_KEYS, IGNORED_KEYS, NAME)
        return config


def weight_shapes(config: Olmo2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    There is no ``input_layernorm``; ``q_norm``/``k_norm`` span all heads.
    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true.
    """
    m, d = config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_layer = {
        **attention_weight_shapes(m, heads, kv, d, config.attention_bias),
        "self_attn.q_norm.weight": (heads * d,),
        "self_attn.k_norm.weight": (kv * d,),
        "post_attention_layernorm.weight": (m,),
        **mlp_weight_shapes(m, config.intermediate_size, bias=False),
        "post_feedforward_layernorm.weight": (m,),
    }
    return decoder_weight_shapes(config, per_layer)


def attention_block(
    h: np.ndarray, p: dict[str, np.ndarray], config: Olmo2Config, rope: tuple, context: StepContext, layer: int
) -> tuple[np.ndarray, KVCache]:
    """OLMo 2 self-attention on the raw residual stream ``h`` ``(B, T, M)``.

    ``p`` holds the layer's tensors; ``rope`` is ``(cos, sin)`` ``(B, T, D/2)`` at the tokens'
    positions; ``context`` carries the positions, padding and the caches (causal attention).
    Returns ``(B, T, M)`` and the layer's cache for the next call (keys after QK-norm and RoPE).
    """
    d, eps = config.head_dim, config.rms_norm_eps
    # QK-norm over the whole projection (H*D and Hkv*D channels), before the head split and RoPE.
    q = rms_norm(projection(h, p, "self_attn.q_proj"), p["self_attn.q_norm.weight"], eps)
    k = rms_norm(projection(h, p, "self_attn.k_proj"), p["self_attn.k_norm.weight"], eps)
    v = projection(h, p, "self_attn.v_proj")
    return attend_step(split_heads(q, d), split_heads(k, d), split_heads(v, d), p, rope, context, layer, None)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Olmo2Config, rope: tuple, context: StepContext, layer: int
) -> tuple[np.ndarray, KVCache]:
    """One post-norm layer: ``h + norm(attn(h))``, then ``h + norm(mlp(h))``; also returns the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(h, p, config, rope, context, layer)
    h = h + rms_norm(attended, p["post_attention_layernorm.weight"], eps)
    return h + rms_norm(gated_mlp_block(h, p, config.hidden_act), p["post_feedforward_layernorm.weight"], eps), kept


def forward_step(
    weights: dict[str, np.ndarray], config: Olmo2Config, input_ids: np.ndarray, context: StepContext
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
    weights: dict[str, np.ndarray], config: Olmo2Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: Published flagship configs (config.json values that carry math).
#: Sources: OLMo-core ``TransformerConfig.olmo2_7B`` / ``olmo2_13B`` / ``olmo2_32B`` and
#: config.json copies of allenai/OLMo-2-1124-7B, -1124-13B and -0325-32B, as summarised in
#: shared/spec/dense-architectures.md sec. 1.1 (V 100352, theta 5e5, eps 1e-6, untied).
PRESETS = {
    "OLMo-2-1124-7B": {
        "architectures": [NAME], "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": 4096,
    },
    "OLMo-2-1124-13B": {
        "architectures": [NAME], "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 5120,
        "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": 4096,
    },
    "OLMo-2-0325-32B": {
        "architectures": [NAME], "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 5120,
        "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": 4096,
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Olmo2Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "OLMo Team, 2 OLMo 2 Furious, arXiv:2501.00656",
        "transformers 5.24 models/olmo2/modeling_olmo2.py",
    ),
)
