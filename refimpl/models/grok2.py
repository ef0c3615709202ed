"""Grok 2.5 (xai-org/grok-2, ``Grok1ForCausalLM``) as sglang serves it.

transformers has no Grok model; the definition here is a reading of sglang's
``python/sglang/srt/models/grok.py`` and the kernels it calls (see "Checked
against" below). Forward pass, sandwich norms, per layer l (weights under
``model.layers.{l}.``)::

    x_0 = E[input_ids] * s_emb                        s_emb = embedding_multiplier_scale
    h   = RMSNorm(x; pre_attn_norm)
    q, k, v = h Wq^T, h Wk^T, h Wv^T                  (B,T,H,D), (B,T,Hkv,D), (B,T,Hkv,D); no biases
    q, k = RoPE_rotate_half(q, k)                     all D dims, theta = int(rope_theta), positions p = 0, 1, ...
    s[i, j] = D^-1/2 q_i . k_j                        scale
    s[i, j] = c_a tanh(s[i, j] / c_a)                 cap c_a = attn_logit_softcapping (<= 0: none)
    s[i, j] = tau(p_i) s[i, j]                        temperature, after the cap (see below)
    a   = o_proj( softmax_causal(s) v )
    x   = x + RMSNorm(a; post_attn_norm)
    h   = RMSNorm(x; pre_moe_norm)
    y   = moe_block(h)                                router, experts and the dense MLP (below)
    x   = x + RMSNorm(y; post_moe_norm)
    logits = RMSNorm(x_L; norm) (s_out W_lm)^T        s_out = output_multiplier_scale
    logits = c_f tanh(logits / c_f)                   c_f = final_logit_softcapping (null or <= 0: none)

Attention temperature, with L = ``attn_temperature_len`` (<= 0: none) and the
query's absolute 0-based position p (strictly greater than L)::

    tau(p) = log2(p) / log2(L)   if p > L,   else 1        (L = 1024: 1.2 at p = 4096)

MoE block (``moe_block``; sglang ``Grok1DecoderLayer.moe_with_rmoe``)::

    z   = h W_g^T                                     router logits (N, E), W_g = block_sparse_moe.gate
    p   = softmax( c_r tanh(z / c_r) )                over all E experts, c_r = router_logit_softcapping
    e_1..e_k = top-k of p; weights w_j = p_{e_j}      NOT renormalised: sum_j w_j < 1
    moe = sum_j w_j Expert_{e_j}(h),   Expert_e(h) = w2_e( GELU(w1_e h) * (w3_e h) )
    mlp = down( GELU(gate h) * (up h) )               the always-on dense MLP (residual_moe only)
    y   = (mlp + moe) / sqrt(2)   if residual_moe,   else moe

GELU is the exact erf form ``0.5 z (1 + erf(z / sqrt 2))`` (:func:`refimpl.mlp.gelu`).

Incremental decoding (:func:`forward_step`, :mod:`refimpl.kv_cache`): every layer is full
causal attention (the published config has no sliding window) and caches every key (after
RoPE) and value. The temperature is not cached state: each new query gets tau(p) at its
own position p, its index in its own sequence (sglang's ``seq_len - 1`` in a decode,
prefix length plus index in an extend).

Notation:
    paper / sglang symbol   code name                                      shape
    E                       ``model.embed_tokens.weight``                  (V, M)
    s_emb, s_out            ``embedding_multiplier_scale``, ``output_multiplier_scale``  scalars
    Wq, Wk, Wv, Wo          ``self_attn.{q,k,v,o}_proj.weight``            (H*D, M), (Hkv*D, M) x2, (M, H*D)
    W_g                     ``block_sparse_moe.gate.weight``               (E, M)
    w1_e, w3_e, w2_e        ``block_sparse_moe.experts.{e}.w{1,3,2}.weight``  (I, M), (I, M), (M, I)
    gate, up, down          ``mlp.{gate,up,down}_proj.weight``             (F, M), (F, M), (M, F)
    four sandwich norms     ``{pre,post}_{attn,moe}_norm.weight``          (M,)
    W_lm                    ``lm_head.weight`` (never tied)                (V, M)
    c_a, c_r, c_f           the three soft-caps                            scalars
    L                       ``attn_temperature_len``                       scalar
    I, F                    ``moe_intermediate_size``, ``intermediate_size``

Dtype: everything in the dtype of the weights (float64, or float32); constants are
rounded to it where they meet an array. sglang keeps the router weight in float32
and computes the cap and softmax in float32 (the reference computes them in the
compute dtype), normalises in float32 inside fused kernels, and folds
``output_multiplier_scale`` into the bfloat16 ``lm_head`` weights at load time
(``lm_head`` times s_out in float32, then cast); so does this module, in the
compute dtype. With s_out = 0.5 folding is exact.
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Sources: xai-org/grok-2 ``config.json`` (Hugging Face; values quoted in
``shared/spec/moe-architectures.md`` sec. 5.1 from sgl-jax test scripts that embed it);
xAI's Grok-1 JAX release ``model.py`` for the lineage (sandwich norms, un-renormalised
router probabilities). There is no paper.
Checked against (read, not executed: no sglang here): sglang
``python/sglang/srt/models/grok.py`` @031ad4cebee77180f1d3a7776bacb3eceecc3ca3
(``Grok1MoE``, ``Grok1Attention``, ``Grok1DecoderLayer.forward`` / ``moe_with_rmoe``,
``Grok1Model.forward``, ``Grok1ForCausalLM.load_weights``),
``layers/attention/triton_ops/decode_attention.py`` and ``extend_attention.py``
(``qk *= sm_scale``; ``qk = logit_cap * tanh(qk / logit_cap)``; ``qk *= xai_temperature_reg``),
``layers/moe/router.py`` (``fused_moe_router_shim``), ``layers/elementwise.py``
(``fused_dual_residual_rmsnorm``, ``gelu_and_mul_triton``), ``layers/logits_processor.py``
(``final_logit_softcapping``). Choices and ambiguities: ``docs/architectures/grok2.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..architecture import Architecture
from ..attention import masked_softmax
from ..config import check_known_keys, get_field, get_positive_int
from ..embedding import lm_head, scaled_embed_tokens
from ..errors import ConfigError, MissingWeightsError, ShapeError
from ..kv_cache import KVCache, StepContext, extend_kv, fresh_context, visibility
from ..linear import linear
from ..mlp import gated_mlp
from ..moe import dispatch
from ..numerics import (
    as_float_array, as_integer_array, check_finite_nonnegative, check_finite_positive, check_same_dtype, to_compute,
    to_storage,
)
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, default_inv_freq, rope_cos_sin
from ..routers import router_logits, soft_capped_softmax_top_k
from ..softcap import soft_cap
from ._llama_like import layer_weights

NAME = "Grok1ForCausalLM"

#: The experts' and the dense MLP's activation. sglang hard-codes it (``activation="gelu"``
#: in ``FusedMoE``; ``gelu_and_mul_triton`` in ``Grok1MLP``); config.json has no key for it.
HIDDEN_ACT = "gelu"
#: sglang's ``Grok1MoE.router_logit_softcapping`` (a constant there, see ``Grok2Config``).
SGLANG_ROUTER_CAP = 30.0

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Under rope_type "original" sglang's ScalingRotaryEmbedding uses the plain (extrapolation)
    # frequencies: these only size its cos/sin cache or feed a YaRN mscale whose multiplication
    # is commented out (grok.py ScalingRotaryEmbedding._compute_cos_sin_cache).
    "original_max_position_embeddings", "scaling_factor", "extrapolation_factor", "attn_factor",
    "beta_fast", "beta_slow",
    # Loading, sharding and cache sizing in sglang; no effect on the math.
    "merge_gate_up", "load_presharded_mlp", "load_presharded_moe", "load_presharded_attn",
    "load_presharded_embedding", "replicate_lm_head", "replicate_embedding", "context_len",
})
#: Keys checked for values this reference (and sglang's grok.py) can honour; not fields.
_CHECKED_KEYS = frozenset({
    "sliding_window_size", "global_attn_every_n", "rope_rotate_half_dims", "tie_word_embeddings",
})
#: rope_type values whose frequencies are the plain ``theta^(-2i/D)`` ones (None: key absent).
_PLAIN_ROPE_TYPES = (None, "original")


def _cap_on(key: str, value: float) -> bool:
    """Whether a soft-cap value turns the cap on (> 0; sglang reads <= 0 as "no cap").

    Raises:
        ConfigError: the value is NaN or infinite (which would silently mean "no cap").
    """
    if not np.isfinite(value):
        raise ConfigError(f"config.json field '{key}' must be a finite number (<= 0 means no cap), got {value!r}")
    return value > 0


@dataclass(frozen=True)
class Grok2Config:
    """Grok 2.5 hyper-parameters; field names are the config.json keys.

    Defaults are sglang's ``getattr`` defaults where grok.py has one; keys it reads
    unconditionally are required. Resolved values:

    * ``moe_intermediate_size`` defaults to ``intermediate_size`` (grok.py).
    * ``rope_theta`` is ``int(rope_theta)``: sglang passes ``base=int(self.rope_theta)``.
    * ``attn_logit_softcapping``: sglang uses ``max(value, 0)``, and 0 means no cap;
      stored as None when <= 0. Default 30.
    * ``final_logit_softcapping``: None when absent, null or <= 0 (sglang's
      ``LogitsProcessor`` turns a negative value into None and skips a zero one).
    * ``attn_temperature_len``: <= 0 (default -1) means no temperature.
    * ``router_logit_softcapping``: read from config.json (default 30). sglang's
      grok.py never reads the key: ``Grok1MoE`` hard-codes 30.0, the published value.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    head_dim: int = 128
    residual_moe: bool = False
    rope_theta: int = 10000
    rope_type: str | None = None
    attn_logit_softcapping: float | None = 30.0
    attn_logit_softcapping_method: str = "tanh"
    attn_temperature_len: int = -1
    router_logit_softcapping: float = SGLANG_ROUTER_CAP
    final_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "Grok2Config":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields; heads or experts that
                do not fit; a RoPE variant, cap method, sliding window, layer pattern
                or tied head that sglang's grok.py does not implement for Grok 2.5.
        """
        intermediate = get_positive_int(raw, "intermediate_size")
        attn_cap = get_field(raw, "attn_logit_softcapping", float, 30.0)
        final_cap = get_field(raw, "final_logit_softcapping", float, None, nullable=True)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=get_positive_int(raw, "hidden_size"),
            intermediate_size=intermediate,
            moe_intermediate_size=get_positive_int(raw, "moe_intermediate_size", intermediate),
            num_hidden_layers=get_positive_int(raw, "num_hidden_layers"),
            num_attention_heads=get_positive_int(raw, "num_attention_heads"),
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads"),
            num_local_experts=get_positive_int(raw, "num_local_experts"),
            num_experts_per_tok=get_positive_int(raw, "num_experts_per_tok"),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float),
            embedding_multiplier_scale=get_field(raw, "embedding_multiplier_scale", float),
            output_multiplier_scale=get_field(raw, "output_multiplier_scale", float),
            head_dim=get_positive_int(raw, "head_dim", 128),
            residual_moe=get_field(raw, "residual_moe", bool, False),
            rope_theta=_rope_theta(raw),
            rope_type=get_field(raw, "rope_type", str, None, nullable=True),
            attn_logit_softcapping=attn_cap if _cap_on("attn_logit_softcapping", attn_cap) else None,
            attn_logit_softcapping_method=get_field(raw, "attn_logit_softcapping_method", str, "tanh"),
            attn_temperature_len=get_field(raw, "attn_temperature_len", int, -1),
            router_logit_softcapping=get_field(raw, "router_logit_softcapping", float, SGLANG_ROUTER_CAP),
            final_logit_softcapping=final_cap if final_cap is not None and _cap_on("final_logit_softcapping", final_cap)
            else None,
        )
        config._validate()
        _check_unsupported(raw)
        check_known_keys(raw, set(cls.__dataclass_fields__) | _CHECKED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{NAME}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_local_experts ({self.num_local_experts})")
        check_finite_nonnegative(f"{NAME}: rms_norm_eps", self.rms_norm_eps, error=ConfigError)
        for key in ("embedding_multiplier_scale", "output_multiplier_scale", "router_logit_softcapping"):
            check_finite_positive(f"{NAME}: {key}", getattr(self, key), error=ConfigError)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, key) is not None:
                check_finite_positive(f"{NAME}: {key}", getattr(self, key), error=ConfigError)
        if self.rope_type not in _PLAIN_ROPE_TYPES:
            raise ConfigError(f"{NAME}: rope_type={self.rope_type!r} is not implemented (Grok 2.5 uses 'original', "
                              "the unscaled frequencies)")
        if self.attn_logit_softcapping_method != "tanh":
            raise ConfigError(f"{NAME}: attn_logit_softcapping_method={self.attn_logit_softcapping_method!r} is not "
                              "implemented (only 'tanh')")
        # log2(1) = 0: sglang's kernels would divide by zero.
        if self.attn_temperature_len == 1:
            raise ConfigError(f"{NAME}: attn_temperature_len must be <= 0 (off) or >= 2, got 1 (log2(1) = 0)")


def _rope_theta(raw: dict) -> int:
    """``int(rope_theta)`` as sglang computes the RoPE base; must exceed 1."""
    theta = get_field(raw, "rope_theta", float, 10000.0)
    if not math.isfinite(theta) or int(theta) <= 1:
        raise ConfigError(f"{NAME}: rope_theta must be a finite number whose integer part exceeds 1, got {theta!r}")
    return int(theta)


def _check_unsupported(raw: dict) -> None:
    """Refuse values of keys sglang's grok.py never reads but whose presence would mean
    something it does not implement (all layers global, full-width rotary, separate head).

    Raises:
        ConfigError: naming the key and its value.
    """
    published = {"sliding_window_size": -1, "global_attn_every_n": 1, "rope_rotate_half_dims": False,
                 "tie_word_embeddings": False}
    for key, expected in published.items():
        value = raw.get(key)
        if value is not None and (type(value) is not type(expected) or value != expected):
            raise ConfigError(f"{NAME}: {key}={value!r} is not implemented (Grok 2.5 and sglang's grok.py: "
                              f"{expected!r})")


def _as_config(config) -> Grok2Config:
    if isinstance(config, Grok2Config):
        return config
    if isinstance(config, dict):
        return Grok2Config.from_dict(config)
    raise ConfigError(f"{NAME}: config must be a config.json dict or a Grok2Config, got {type(config).__name__}")


# Checkpoint layout

def expert_weight_names(expert: int) -> tuple[str, str, str]:
    """Layer-relative names of expert ``e``'s ``(w1, w3, w2)`` = (gate, up, down)."""
    return tuple(f"block_sparse_moe.experts.{expert}.{w}.weight" for w in ("w1", "w3", "w2"))


#: Layer-relative names of the dense MLP (present only when ``residual_moe``).
DENSE_MLP_NAMES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def moe_weight_shapes(config: Grok2Config) -> dict[str, tuple[int, ...]]:
    """Layer-relative names and shapes of what :func:`moe_block` reads."""
    m, i, f = config.hidden_size, config.moe_intermediate_size, config.intermediate_size
    shapes = {"block_sparse_moe.gate.weight": (config.num_local_experts, m)}
    for e in range(config.num_local_experts):
        shapes.update(zip(expert_weight_names(e), ((i, m), (i, m), (m, i))))
    if config.residual_moe:
        shapes.update(zip(DENSE_MLP_NAMES, ((f, m), (f, m), (m, f))))
    return shapes


def weight_shapes(config: Grok2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    The names are those of an unsharded checkpoint as sglang's
    ``Grok1ForCausalLM.load_weights`` consumes them (it stacks ``q/k/v_proj`` into
    ``qkv_proj``, ``gate/up_proj`` into ``gate_up_proj`` and the experts' ``w1/w3/w2``
    into ``FusedMoE``); the published xai-org/grok-2 files use them, split across
    tensor-parallel shards (``docs/architectures/grok2.md``).
    """
    m, d = config.hidden_size, config.head_dim
    qd, kvd = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = {
        "pre_attn_norm.weight": (m,), "post_attn_norm.weight": (m,),
        "pre_moe_norm.weight": (m,), "post_moe_norm.weight": (m,),
        "self_attn.q_proj.weight": (qd, m), "self_attn.k_proj.weight": (kvd, m),
        "self_attn.v_proj.weight": (kvd, m), "self_attn.o_proj.weight": (m, qd),
        **moe_weight_shapes(config),
    }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, m), "model.norm.weight": (m,),
              "lm_head.weight": (config.vocab_size, m)}
    for layer in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{name}": s for name, s in per_layer.items()})
    return shapes


def _require(weights: dict, names, where: str) -> None:
    missing = sorted(set(names) - set(weights))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise MissingWeightsError(f"{where}: missing weight(s) {shown}")


# Attention

def attention_temperature(positions: np.ndarray, attn_temperature_len: int) -> np.ndarray:
    """Per-query multiplier of the capped scores: ``log2(p) / log2(L)`` where ``p > L``, else 1.

    Args:
        positions: integer absolute 0-based positions p, any shape.
        attn_temperature_len: L; <= 0 switches the temperature off (all ones).

    Returns:
        float64, the shape of ``positions``. Strict: ``tau(L) = 1`` and ``tau(L + 1) > 1``.

    Checked against: sglang ``decode_attention.py`` / ``extend_attention.py``
    (``xai_temperature_reg = where(offs_qidx > xai_temperature_len,
    log2(offs_qidx) / log2(xai_temperature_len), 1.0)``, ``offs_qidx`` the absolute
    position of the query: prefix length plus index in an extend, ``seq_len - 1``
    in a decode).
    """
    p = as_integer_array("attention_temperature: positions", positions)
    if attn_temperature_len <= 0:
        return np.ones(p.shape)
    tempered = p > attn_temperature_len
    return np.where(tempered, np.log2(np.maximum(p, 1)) / math.log2(attn_temperature_len), 1.0)


def capped_tempered_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, *, scale: float,
    softcap: float | None, temperature: np.ndarray,
) -> np.ndarray:
    """Grouped-query attention with scores ``tau_i * c tanh(scale q_i.k_j / c)``.

    Order (sglang's triton extend and decode kernels): scale, then the tanh cap, then
    the per-query temperature, then mask and softmax. Query head h reads key/value
    head ``h // (H / Hkv)``.

    Args:
        q: ``(B, T, H, D)`` after RoPE; k: ``(B, S, Hkv, D)`` after RoPE; v: ``(B, S, Hkv, Dv)``.
        mask: bool ``(T, S)`` or ``(B, T, S)``, True where visible (a row with no visible key
            gives zeros).
        scale: ``D ** -0.5``.
        softcap: c > 0, or None for no cap.
        temperature: ``(T,)`` or ``(B, T)`` multipliers from :func:`attention_temperature`.

    Returns:
        ``(B, T, H, Dv)`` in the dtype of ``q``.

    Dtype: float16 / bfloat16: q, k, v widened, scores, cap, temperature, softmax and the
    weighted sum in float32 (the scale, cap and temperature rounded to float32), the output
    rounded once (sglang's attention kernels accumulate in float32).

    Raises:
        InputError: a non-float array. ShapeError: shapes that do not fit.
    """
    q, k, v = (as_float_array(f"capped_tempered_attention: {n}", a, ndim=4) for n, a in (("q", q), ("k", k), ("v", v)))
    storage = check_same_dtype(q=q, k=k, v=v)
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    b, t, h, d = q.shape
    hkv, s = k.shape[2], k.shape[1]
    if hkv == 0 or h % hkv or k.shape[:3] != v.shape[:3] or k.shape[3] != d or np.shape(mask) not in ((t, s), (b, t, s)):
        raise ShapeError(f"capped_tempered_attention: q{q.shape}, k{k.shape}, v{v.shape}, mask{np.shape(mask)} "
                         "do not fit")
    if np.shape(temperature) not in ((t,), (b, t)):
        raise ShapeError(f"capped_tempered_attention: temperature must be ({t},) or ({b}, {t}), "
                         f"got {np.shape(temperature)}")
    dtype = q.dtype
    qg = q.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D)
    scores = (qg @ k.transpose(0, 2, 3, 1)[:, :, None]) * dtype.type(scale)  # (B, Hkv, G, T, S)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    # The temperature multiplies the capped scores of query row i.
    tau = np.asarray(temperature, dtype=dtype)
    scores = scores * (tau[:, None] if tau.ndim == 1 else tau[:, None, None, :, None])
    p = masked_softmax(scores, mask[:, None, None] if np.ndim(mask) == 3 else mask)
    out = p @ v.transpose(0, 2, 1, 3)[:, :, None]  # (B, Hkv, G, T, Dv)
    return to_storage(out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1]), storage)


def rope_tables(config: Grok2Config, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(B, T, D/2)`` (or ``(T, D/2)``) at integer ``positions`` ``(B, T)`` (or ``(T,)``),
    base ``int(rope_theta)``, all D dims."""
    return rope_cos_sin(positions, default_inv_freq(config.head_dim, config.rope_theta), dtype)


def attention_block(
    h: np.ndarray, p: dict[str, np.ndarray], config: Grok2Config, rope: tuple[np.ndarray, np.ndarray],
    temperature: np.ndarray, context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """Self-attention on normalised ``h`` ``(B, T, M)``: projections, NeoX RoPE, capped and
    tempered GQA over layer ``layer``'s cache and the new keys, ``o_proj``.

    ``rope`` and ``temperature`` are at the tokens' positions (``context.positions``).
    Returns ``(B, T, M)`` and the layer's cache for the next call (every key, after RoPE).
    """
    b, t, _ = h.shape
    d = config.head_dim
    q = linear(h, p["self_attn.q_proj.weight"]).reshape(b, t, -1, d)
    k = linear(h, p["self_attn.k_proj.weight"]).reshape(b, t, -1, d)
    v = linear(h, p["self_attn.v_proj.weight"]).reshape(b, t, -1, d)
    q, k = apply_rope_rotate_half(q, *rope), apply_rope_rotate_half(k, *rope)
    visible, kept = extend_kv(context.layer_cache(layer), k, v, context)
    out = capped_tempered_attention(q, visible.keys, visible.values, visibility(context, visible),
                                    scale=d ** -0.5, softcap=config.attn_logit_softcapping, temperature=temperature)
    return linear(out.reshape(b, t, -1), p["self_attn.o_proj.weight"]), kept


# MoE block

def residual_moe_combine(mlp: np.ndarray, moe: np.ndarray) -> np.ndarray:
    """``(mlp + moe) / sqrt(2)`` (sglang ``moe_with_rmoe``: ``/ 1.4142135623730951``)."""
    return (mlp + moe) / mlp.dtype.type(math.sqrt(2.0))


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """Grok's feed-forward: capped softmax router, top-k GELU experts, and the dense MLP.

    Args:
        hidden_states: ``(..., M)``, the output of ``pre_moe_norm``.
        weights: layer-relative names (``model.layers.{l}.`` stripped), as in the
            checkpoint: ``block_sparse_moe.gate.weight``,
            ``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` and, with ``residual_moe``,
            ``mlp.gate_proj/up_proj/down_proj.weight``. Grok's block spans two sibling
            modules, so neither prefix is stripped. Other names are ignored.
        config: a :class:`Grok2Config` or a complete config.json dict.

    Returns:
        ``(..., M)`` in the dtype of ``hidden_states``, before ``post_moe_norm``:
        ``(mlp + moe) / sqrt(2)`` with ``residual_moe``, else ``moe``.

    Raises:
        MissingWeightsError: a tensor is missing (named). ConfigError: a bad config.
        InputError, ShapeError: arrays of the wrong kind or shape.

    Checked against: sglang grok.py ``Grok1MoE.forward`` (``TopK(renormalize=False)`` with
    ``fused_moe_router_shim``, ``FusedMoE(activation="gelu")``), ``Grok1MLP.forward``
    and ``Grok1DecoderLayer.moe_with_rmoe``.
    """
    config = _as_config(config)
    _require(weights, moe_weight_shapes(config), f"{NAME} moe_block")
    x = as_float_array("moe_block: hidden_states", hidden_states)
    rows = x.reshape(-1, x.shape[-1])
    # Router: soft-cap, softmax over all experts, top-k, no renormalisation.
    logits = router_logits(rows, weights["block_sparse_moe.gate.weight"])
    routing, chosen = soft_capped_softmax_top_k(
        logits, config.num_experts_per_tok, router_logit_softcapping=config.router_logit_softcapping)

    def expert(e: int, tokens: np.ndarray) -> np.ndarray:
        w1, w3, w2 = (weights[name] for name in expert_weight_names(e))
        return gated_mlp(tokens, w1, w3, w2, HIDDEN_ACT)

    moe = dispatch(rows, routing, chosen, expert, config.num_local_experts, weight_on="output")
    if config.residual_moe:
        mlp = gated_mlp(rows, *(weights[name] for name in DENSE_MLP_NAMES), HIDDEN_ACT)
        moe = residual_moe_combine(mlp, moe)
    return moe.reshape(x.shape)


# Decoder

def sandwich_residual(x: np.ndarray, sublayer, pre_norm: np.ndarray, post_norm: np.ndarray, eps: float) -> np.ndarray:
    """``x + RMSNorm(sublayer(RMSNorm(x; pre_norm)); post_norm)``: one half of a Grok layer.

    sglang's ``fused_dual_residual_rmsnorm`` fuses the post-norm of one half with the
    pre-norm of the next; unrolled it is exactly this.
    """
    return x + rms_norm(sublayer(rms_norm(x, pre_norm, eps)), post_norm, eps)


def decoder_layer(
    x: np.ndarray, p: dict[str, np.ndarray], config: Grok2Config, rope: tuple[np.ndarray, np.ndarray],
    temperature: np.ndarray, context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One Grok layer: sandwich-normed attention, then the sandwich-normed MoE block; returns the
    new residual stream and the layer's cache."""
    eps = config.rms_norm_eps
    kept = []

    def attend(h: np.ndarray) -> np.ndarray:
        out, cache = attention_block(h, p, config, rope, temperature, context, layer)
        kept.append(cache)
        return out

    x = sandwich_residual(x, attend, p["pre_attn_norm.weight"], p["post_attn_norm.weight"], eps)
    x = sandwich_residual(x, lambda h: moe_block(h, p, config), p["pre_moe_norm.weight"], p["post_moe_norm.weight"],
                          eps)
    return x, kept[0]


def check_scaled_logits(logits: np.ndarray, normed: np.ndarray, config: Grok2Config) -> None:
    """Refuse logits that ``output_multiplier_scale`` pushed beyond the float range.

    Any positive finite scale is a valid config value, but whether ``s W_lm`` and the
    logits stay finite depends on the weights and the compute dtype (1e300 overflows
    float32 at once). Rather than return inf or NaN (or let the final soft-cap quietly
    turn inf into +-c), the forward stops here when the normalised hidden states are
    finite and the scaled logits are not.

    Raises:
        ConfigError: naming ``output_multiplier_scale``, its value and the dtype.
    """
    if np.isfinite(normed).all() and not np.isfinite(logits).all():
        raise ConfigError(f"{NAME}: output_multiplier_scale = {config.output_multiplier_scale!r} makes the logits "
                          f"overflow {logits.dtype.name} (scaled lm_head or logits beyond the float range)")


def forward_step(
    weights: dict[str, np.ndarray], config: Grok2Config, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`); RoPE and the temperature read ``context.positions``, so
            the temperature engages from position L + 1 of each sequence.

    Returns:
        ``(logits, taps, caches)``: logits ``(B, T, V)`` (scaled by ``output_multiplier_scale``,
        then soft-capped when ``final_logit_softcapping`` is set); taps ``"embed"`` (the
        embedding *times* ``embedding_multiplier_scale``, the residual stream entering
        layer 0), ``"layers.{l}"`` and ``"norm"``, each ``(B, T, M)``, in that order; one
        KVCache per layer.

    Raises:
        ConfigError: ``output_multiplier_scale`` makes the logits overflow the compute
            dtype (:func:`check_scaled_logits`).
    """
    embedding = weights["model.embed_tokens.weight"]
    dtype = embedding.dtype
    rope = rope_tables(config, context.positions, dtype)
    temperature = attention_temperature(context.positions, config.attn_temperature_len)
    # The scale is rounded to the compute dtype, then multiplies the rows.
    x = scaled_embed_tokens(input_ids, embedding, config.embedding_multiplier_scale)
    taps = {"embed": x}
    caches = []
    for layer in range(config.num_hidden_layers):
        x, kept = decoder_layer(x, layer_weights(weights, layer), config, rope, temperature, context, layer)
        caches.append(kept)
        taps[f"layers.{layer}"] = x
    x = rms_norm(x, weights["model.norm.weight"], config.rms_norm_eps)
    taps["norm"] = x
    # sglang folds output_multiplier_scale into the lm_head weights at load time.
    with np.errstate(over="ignore", invalid="ignore"):
        logits = lm_head(x, weights["lm_head.weight"] * dtype.type(config.output_multiplier_scale))
    check_scaled_logits(logits, x, config)
    if config.final_logit_softcapping is not None:
        logits = soft_cap(logits, config.final_logit_softcapping)
    return logits, taps, tuple(caches)


def forward(
    weights: dict[str, np.ndarray], config: Grok2Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache (no padding: positions ``0..T-1`` in every row)."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: The published Grok 2.5 config.json (values that carry math, plus the keys ignored here).
#: Source: xai-org/grok-2 ``config.json`` on the Hugging Face Hub, as embedded verbatim (except
#: shrunken intermediate sizes and depth) in sgl-jax's Grok test scripts, with the real
#: ``moe_intermediate_size`` 16384, ``intermediate_size`` 32768 and 64 layers from a table citing
#: the config and the xai-org/grok-2 HF discussion #6 parameter breakdown
#: (shared/spec/moe-architectures.md sec. 5.1). :func:`weight_shapes` sums to about 269.5e9
#: parameters for it (tests/test_grok2.py), the count that breakdown gives.
PRESETS = {
    "grok-2": {
        "architectures": [NAME], "model_type": "git", "vocab_size": 131072, "hidden_size": 8192,
        "intermediate_size": 32768, "moe_intermediate_size": 16384, "num_hidden_layers": 64,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
        "num_experts_per_tok": 2, "residual_moe": True, "rms_norm_eps": 1e-5,
        "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
        "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0, "final_logit_softcapping": 50,
        "attn_temperature_len": 1024, "rope_theta": 208533496, "rope_type": "original",
        "original_max_position_embeddings": 8192, "scaling_factor": 16.0, "extrapolation_factor": 1.0,
        "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1, "max_position_embeddings": 131072,
        "sliding_window_size": -1, "global_attn_every_n": 1, "torch_dtype": "bfloat16",
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Grok2Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=lambda config: {},
    presets=PRESETS,
    citations=(
        "xai-org/grok-2 config.json (Hugging Face Hub)",
        "sglang python/sglang/srt/models/grok.py @031ad4cebee77180f1d3a7776bacb3eceecc3ca3 and its triton "
        "attention kernels (logit cap, xai_temperature_len)",
    ),
)
