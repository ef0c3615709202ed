"""gpt-oss decoder (``GptOssForCausalLM``): GQA with sinks, alternating local/global layers, clamped-SwiGLU MoE.

Forward pass, pre-norm, per layer l of type tau_l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = x Wq^T + bq      (B, T, H, D)        k = x Wk^T + bk, v = x Wv^T + bv   (B, T, Hkv, D)
    q, k = RoPE_rotate_half(q, k; YaRN, token positions)   cos and sin carry the YaRN magnitude
    a[i] = sum_j p_ij v_j,   p_ij = exp(s_ij) / (exp(z_h) + sum_j' exp(s_ij'))     s = D^-1/2 q.k
    h   = h + (a Wo^T + bo)                    the sink z_h takes mass but carries no value
    mask: causal within the last W = ``sliding_window`` keys on "sliding_attention" layers, causal otherwise
    x   = RMSNorm(h; post_attention_layernorm)
    r   = x Wr^T + br                  (N, E)  router logits, with bias
    i   = top-k(r);  w = softmax(r[i])         softmax over the k chosen logits only
    h   = h + sum_j w_j Expert_{i_j}(x)        every layer is MoE; no shared expert
    Expert_e(x) = clamped_swiglu(x G_e + g_e) D_e + d_e      (the down bias d_e is scaled by w_j too)
    clamped_swiglu: gate = z[0::2], up = z[1::2] (interleaved); gate = min(gate, L); up = clip(up, -L, L);
                    (up + 1) * gate * sigmoid(alpha * gate),   L = swiglu_limit (7), alpha = swiglu_alpha (1.702)
    logits = RMSNorm(h_L; norm) W_lm^T

Released layer pattern: layer l slides iff l is even (``layer_types`` [sliding, full] x L/2), window
W = 128 keys including the query's own (bug classes SWA-01, SWA-05, PAT-05). RoPE is YaRN over the
whole head (Dr = D = 64), theta 150000, factor 32, ``truncate: false`` (a fractional correction range),
magnitude 0.1 ln 32 + 1 = 1.3466 on cos and sin (bug class RSC-12).

Incremental decoding (:func:`forward_step`, :mod:`refimpl.kv_cache`): a token's position p is
its index in its own sequence (``cumsum(attention_mask) - 1`` under left padding). A full
layer caches every key (after RoPE) and value; a sliding layer keeps the last W = 128 slots
(the W - 1 keys a later query can still see plus the newest, the ring of bug class SWA-04).
The sinks are weights, not cached state: every call's softmax carries them again.

Notation:
    paper symbol              code name                                 shape
    E                         ``model.embed_tokens.weight``             (V, M)
    W_Q, W_K, W_V, W_O        ``self_attn.{q,k,v,o}_proj.weight``       (H*D, M), (Hkv*D, M), (Hkv*D, M), (M, H*D)
    b_Q, b_K, b_V, b_O        ``self_attn.{q,k,v,o}_proj.bias``         (H*D,), (Hkv*D,), (Hkv*D,), (M,)
    z_h (attention sink)      ``self_attn.sinks``                       (H,)
    W_r, b_r (router)         ``mlp.router.weight``, ``mlp.router.bias`` (E, M), (E,)
    G_e, g_e (gate|up)        ``mlp.experts.gate_up_proj[e]``, ``..._bias[e]``   (M, 2I) input-major, (2I,)
    D_e, d_e (down)           ``mlp.experts.down_proj[e]``, ``..._bias[e]``      (I, M) input-major, (M,)
    k                         ``num_experts_per_tok``                   scalar
    E (experts)               ``num_local_experts``                     scalar
    L, alpha                  ``swiglu_limit``, ``swiglu_alpha``        scalars
    I                         ``intermediate_size`` (per expert)        scalar

Dtype: computed in the dtype of the weights (float64 or float32). transformers keeps its RMSNorm
in float32 and multiplies by the weight *before* casting back (unlike Llama); in float64 and
float32 that is the same math as :func:`refimpl.rmsnorm.rms_norm`, and it differs only in
bfloat16 / float16 (``multiply_then_cast``). The attention softmax runs in the activation dtype
in transformers (no float32 island there).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Checkpoints on the Hub store the expert matrices as MXFP4 blocks (``*_blocks``, ``*_scales``, with
``quantization_config.quant_method = "mxfp4"``); the checkpoint reader dequantizes them exactly into
the input-major stacks below (:mod:`refimpl.quantization.mxfp4`), and dequantised bfloat16 copies load
as plain tensors.

Paper: OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv:2508.10925, sec. 2 (MoE with
top-4 routing and softmax over the selected, gated SwiGLU with clamping and residual, alternating
banded-window (128) and dense attention, learned per-head attention-sink bias in the softmax
denominator, YaRN to 131072 tokens, GQA 64/8). YaRN: Peng et al., arXiv:2309.00071.
Checked against: transformers 5.24 ``models/gpt_oss/modeling_gpt_oss.py`` (``GptOssRMSNorm`` 48-66,
``GptOssExperts`` 69-114 with ``_apply_gate`` 82-88, ``GptOssTopKRouter`` 117-131, ``GptOssMLP`` 134-146,
``GptOssRotaryEmbedding`` 149-192, ``_apply_rotary_emb`` 207-216, ``eager_attention_forward``
227-256, ``GptOssAttention`` 259-328, ``GptOssDecoderLayer`` 331-371) and ``configuration_gpt_oss.py``
(defaults 51-77, ``__post_init__`` 79-98); and OpenAI's reference ``gpt_oss/torch/model.py``
(``swiglu``, ``sdpa``, ``RotaryEmbedding._compute_concentration_and_inv_freq``, ``MLPBlock``), which
computes the same math (docs/architectures/gpt_oss.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import CheckpointError, ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError
from ..experts import clamped_swiglu_expert
from ..kv_cache import KVCache, StepContext, attend_with_cache, fresh_context
from ..moe import dispatch
from ..numerics import as_float_array, check_finite_positive, check_same_dtype
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies
from ..routers import router_logits, top_k_softmax
from ._llama_like import attention_weight_shapes, decoder_weight_shapes, projection, run_decoder_step, tied_head

NAME = "GptOssForCausalLM"

LAYER_TYPES = ("sliding_attention", "full_attention")
#: ``GptOssConfig.default_theta``.
DEFAULT_THETA = 150000.0
#: ``rope_parameters`` when config.json has neither it nor ``rope_scaling`` (``configuration_gpt_oss.py:89-97``).
DEFAULT_ROPE_PARAMETERS = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}
#: transformers' ``standardize_rope_params`` copies max_position_embeddings into these types.
_ROPE_TYPES_WITH_ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")
#: The tensors of one MoE block, relative to ``model.layers.{l}.mlp.``.
MOE_WEIGHTS = ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
               "experts.down_proj", "experts.down_proj_bias")

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Never read by modeling_gpt_oss.py: the experts hard-code the clamped SwiGLU.
    "hidden_act",
    # Training only (auxiliary load-balancing loss, router logits in the output).
    "router_aux_loss_coef", "output_router_logits",
    # OpenAI's own name for original_max_position_embeddings (4096 in the releases); transformers
    # never reads it, the value in force is rope_parameters["original_max_position_embeddings"].
    "initial_context_length",
})
#: config.json keys read while resolving (not dataclass fields).
_RESOLVED_KEYS = frozenset({
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "num_experts", "experts_per_token",
})


@dataclass(frozen=True)
class GptOssConfig:
    """gpt-oss hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``GptOssConfig`` (the gpt-oss-120b values) where
    config.json may omit a key. ``head_dim`` and ``num_key_value_heads`` may not be null: the
    class's ``__post_init__`` would derive them, but its strict field types refuse null first.
    ``layer_types`` has one entry per layer; ``rope_parameters`` is the one flat dict
    transformers ends up with.
    """

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(default_factory=lambda: dict(DEFAULT_ROPE_PARAMETERS), hash=False)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "GptOssConfig":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields, heads that do not divide,
                inconsistent layer types, sliding layers without a window, aliases that
                disagree (``num_experts`` / ``num_local_experts``, ``experts_per_token`` /
                ``num_experts_per_tok``), a partial rotary factor, or a RoPE type this
                version does not implement.
        """
        layers = get_positive_int(raw, "num_hidden_layers", 36)
        max_positions = get_positive_int(raw, "max_position_embeddings", 131072)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", 201088),
            hidden_size=get_positive_int(raw, "hidden_size", 2880),
            intermediate_size=get_positive_int(raw, "intermediate_size", 2880),
            num_hidden_layers=layers,
            num_attention_heads=get_positive_int(raw, "num_attention_heads", 64),
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 8),
            head_dim=get_positive_int(raw, "head_dim", 64),
            num_local_experts=_num_local_experts(raw),
            num_experts_per_tok=_num_experts_per_tok(raw),
            sliding_window=get_field(raw, "sliding_window", int, 128, nullable=True),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-5),
            rope_parameters=resolve_rope_parameters(raw, max_positions),
            max_position_embeddings=max_positions,
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            attention_bias=get_field(raw, "attention_bias", bool, True),
            swiglu_limit=get_field(raw, "swiglu_limit", float, 7.0),
            swiglu_alpha=get_field(raw, "swiglu_alpha", float, 1.702),
            layer_types=_layer_types(raw, layers),
        )
        config._validate()
        check_known_keys(raw, set(cls.__dataclass_fields__) | _RESOLVED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{NAME}: head_dim must be even for RoPE, got {self.head_dim}")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"{NAME}: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) must lie in "
                              f"[1, num_local_experts = {self.num_local_experts}]")
        for key in ("swiglu_limit", "swiglu_alpha"):
            check_finite_positive(f"{NAME}: {key}", getattr(self, key), error=ConfigError)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"{NAME}: sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{NAME}: layer_types has 'sliding_attention' layers but sliding_window is null")
        # Refuses an unsupported or malformed RoPE scaling at load time, naming the key.
        rope_frequencies(self.rope_parameters, self.head_dim, max_position_embeddings=self.max_position_embeddings)


def _num_local_experts(raw: dict) -> int:
    """``num_local_experts``, or its alias ``num_experts`` (``GptOssConfig.attribute_map``).

    Raises:
        ConfigError: both are given and differ (transformers silently keeps ``num_experts``).
    """
    experts = get_positive_int(raw, "num_local_experts", 128)
    if "num_experts" in raw:
        alias = get_positive_int(raw, "num_experts")
        if "num_local_experts" in raw and alias != experts:
            raise ConfigError(f"{NAME}: num_experts ({alias}) and num_local_experts ({experts}) disagree")
        experts = alias
    return experts


def _num_experts_per_tok(raw: dict) -> int:
    """``num_experts_per_tok``; OpenAI's ``experts_per_token`` (in the released config.json) must agree.

    transformers reads only ``num_experts_per_tok`` (default 4); a config.json whose
    ``experts_per_token`` says otherwise is ambiguous (OpenAI's reference reads that key) and
    is refused rather than run with a silently different k.

    Raises:
        ConfigError: the two keys disagree.
    """
    top_k = get_positive_int(raw, "num_experts_per_tok", 4)
    if "experts_per_token" in raw and get_positive_int(raw, "experts_per_token") != top_k:
        raise ConfigError(f"{NAME}: experts_per_token ({raw['experts_per_token']}) differs from num_experts_per_tok "
                          f"({top_k}); transformers uses num_experts_per_tok, OpenAI's code experts_per_token")
    return top_k


def resolve_rope_parameters(raw: dict, max_position_embeddings: int) -> dict:
    """The flat ``rope_parameters`` transformers' ``GptOssConfig`` ends up with.

    A non-empty legacy ``rope_scaling`` (the released config.json) replaces ``rope_parameters``;
    with neither, the YaRN default of :data:`DEFAULT_ROPE_PARAMETERS`. ``rope_theta`` comes from
    the dict, else the top-level key, else 150000; ``rope_type`` from the legacy ``type``, else
    "default"; YaRN / llama3 get ``original_max_position_embeddings = max_position_embeddings``
    when the dict has none (``standardize_rope_params``).

    Raises:
        ConfigError: the fields are not objects, or ``partial_rotary_factor`` is not 1
            (gpt-oss's ``_apply_rotary_emb`` splits the whole head in two halves).
    """
    for key in ("rope_parameters", "rope_scaling"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json field '{key}' must be an object or null, got {value!r}")
    params = raw.get("rope_parameters")
    chosen = dict(raw.get("rope_scaling") or (DEFAULT_ROPE_PARAMETERS if params is None else params))
    chosen.setdefault("rope_theta", get_field(raw, "rope_theta", float, DEFAULT_THETA))
    chosen.setdefault("rope_type", chosen.get("type", "default"))
    if chosen["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_CONTEXT:
        chosen.setdefault("original_max_position_embeddings", max_position_embeddings)
    for factor in (raw.get("partial_rotary_factor"), chosen.get("partial_rotary_factor")):
        if factor is not None and factor != 1.0:
            raise ConfigError(f"{NAME}: partial_rotary_factor={factor!r} is not supported (gpt-oss rotates the "
                              "whole head)")
    return chosen


def _layer_types(raw: dict, layers: int) -> tuple[str, ...]:
    """``layer_types``, else transformers' default: layer l slides iff l is even.

    Raises:
        ConfigError: wrong length or entries other than sliding_attention / full_attention.
    """
    types = raw.get("layer_types")
    if types is None:
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    return tuple(types)


def weight_shapes(config: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    The expert stacks are input-major (``x @ W``), as transformers holds them after
    dequantising and transposing the MXFP4 blocks. ``lm_head.weight`` is absent when
    ``tie_word_embeddings`` is true (no release ties).
    """
    m, e, i = config.hidden_size, config.num_local_experts, config.intermediate_size
    per_layer = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                  bias=config.attention_bias),
        "self_attn.sinks": (config.num_attention_heads,),
        "post_attention_layernorm.weight": (m,),
        "mlp.router.weight": (e, m),
        "mlp.router.bias": (e,),
        "mlp.experts.gate_up_proj": (e, m, 2 * i),
        "mlp.experts.gate_up_proj_bias": (e, 2 * i),
        "mlp.experts.down_proj": (e, i, m),
        "mlp.experts.down_proj_bias": (e, m),
    }
    return decoder_weight_shapes(config, per_layer)


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-generator draws for the tensors the default rule gets wrong (None: default rule).

    The input-major expert stacks have their fan-in on axis 1, not the last axis, so they are
    drawn N(0, 1/shape[1]); the expert biases (names ending ``_bias``, not ``.bias``) 0.2 N;
    the sinks 2 N, so that heads have sinks of both signs and of magnitudes from
    negligible (e^-4) to dominant (e^4 against a handful of keys).
    """
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return rng.standard_normal(shape) / np.sqrt(shape[1])
    if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
        return 0.2 * rng.standard_normal(shape)
    if name.endswith("self_attn.sinks"):
        return 2.0 * rng.standard_normal(shape)
    return None


def layer_window(config: GptOssConfig, layer: int) -> int | None:
    """W = ``sliding_window`` keys (the query's own included) on sliding layers, None on full ones."""
    return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


def rope_tables(config: GptOssConfig, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(B, T, D/2)`` at the tokens' ``positions`` ``(B, T)``, times YaRN's magnitude
    (1.3466 in the releases)."""
    inv_freq, attention_scaling = rope_frequencies(
        config.rope_parameters, config.head_dim, max_position_embeddings=config.max_position_embeddings)
    return rope_cos_sin(positions, inv_freq, dtype, attention_scaling)


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: GptOssConfig, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """gpt-oss self-attention on normalised input ``x`` ``(B, T, M)``.

    ``p`` holds the layer's ``self_attn.*`` tensors; ``cos, sin`` are ``(B, T, D/2)`` at the
    tokens' positions; ``context`` carries the positions, padding and the caches of the previous
    call. The per-head sink logit enters every row's softmax denominator, unscaled and unmasked
    (model card sec. 2; ``eager_attention_forward``). Returns ``(B, T, M)`` and the layer's cache
    for the next call: every key on a full layer, the last W on a sliding one (keys after RoPE).
    """
    b, t, _ = x.shape
    d = config.head_dim
    q = projection(x, p, "self_attn.q_proj").reshape(b, t, -1, d)
    k = projection(x, p, "self_attn.k_proj").reshape(b, t, -1, d)
    v = projection(x, p, "self_attn.v_proj").reshape(b, t, -1, d)
    q, k = apply_rope_rotate_half(q, cos, sin), apply_rope_rotate_half(k, cos, sin)
    out, kept = attend_with_cache(q, k, v, context, layer, scale=d ** -0.5, sliding_window=layer_window(config, layer),
                                  sinks=p["self_attn.sinks"])
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), kept


def _moe_weights(weights: dict[str, np.ndarray], hidden: np.ndarray) -> dict[str, np.ndarray]:
    """The six tensors of :data:`MOE_WEIGHTS`, checked against each other and ``hidden`` ``(N, M)``.

    Raises:
        CheckpointError: MXFP4 ``*_blocks`` / ``*_scales`` tensors in place of the expert stacks.
        MissingWeightsError / UnexpectedWeightsError: tensors absent or not of this block.
        InputError: a tensor that is not a float array.
        ShapeError: shapes that do not fit one (E, M, I).
        RefimplError: a tensor in another dtype than the hidden states.
    """
    packed = sorted(n for n in weights if n.endswith(("_blocks", "_scales")))
    if packed:
        raise CheckpointError(f"{NAME} moe_block: {packed} are MXFP4 expert blocks; the op takes dequantised "
                              "input-major experts.gate_up_proj / experts.down_proj (refimpl.from_pretrained "
                              "dequantizes MXFP4 checkpoints; refimpl.quantization.mxfp4 does it for arrays)")
    missing = [n for n in MOE_WEIGHTS if n not in weights]
    if missing:
        raise MissingWeightsError(f"{NAME} moe_block: missing weight(s) {missing}")
    extra = sorted(set(weights) - set(MOE_WEIGHTS))
    if extra:
        raise UnexpectedWeightsError(f"{NAME} moe_block: unexpected weight(s) {extra}")
    w = {n: as_float_array(f"{NAME} moe_block: {n}", weights[n]) for n in MOE_WEIGHTS}
    check_same_dtype(hidden_states=hidden, **{n.replace(".", "_"): a for n, a in w.items()})
    gate_up = w["experts.gate_up_proj"]
    e, m, two_i = gate_up.shape if gate_up.ndim == 3 else (-1, -1, -1)
    want = {"router.weight": (e, m), "router.bias": (e,), "experts.gate_up_proj_bias": (e, two_i),
            "experts.down_proj": (e, two_i // 2, m), "experts.down_proj_bias": (e, m)}
    wrong = {n: w[n].shape for n, shape in want.items() if w[n].shape != shape}
    if gate_up.ndim != 3 or two_i % 2 or m != hidden.shape[1] or wrong:
        raise ShapeError(f"{NAME} moe_block: hidden_states (N, {hidden.shape[1]}) and experts.gate_up_proj "
                         f"{gate_up.shape} (need (E, M, 2I)) do not fit {wrong or 'each other'}")
    return w


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """The sparse MoE block of one layer: biased top-k-softmax router, clamped-SwiGLU experts.

    ``y = sum_j w_j (clamped_swiglu(x G_e + g_e) D_e + d_e)`` over the k chosen experts
    ``e = i_j``, with ``i = top-k(x W_r^T + b_r)`` and ``w = softmax`` of those k logits.
    The routing weight multiplies the whole expert output, down bias included.

    Args:
        hidden_states: ``(B, T, M)`` normalised input (``post_attention_layernorm`` output).
        weights: the tensors of :data:`MOE_WEIGHTS` (module-relative names of transformers'
            ``GptOssMLP``): ``router.weight (E, M)``, ``router.bias (E,)``,
            ``experts.gate_up_proj (E, M, 2I)``, ``experts.gate_up_proj_bias (E, 2I)``,
            ``experts.down_proj (E, I, M)``, ``experts.down_proj_bias (E, M)``.
        config: a :class:`GptOssConfig` or a config.json dict of this architecture
            (``num_experts_per_tok``, ``swiglu_limit``, ``swiglu_alpha`` are read).

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Dtype: router logits, softmax, experts and the combination in the dtype of ``hidden_states``
    (transformers has no float32 island here).

    Raises:
        CheckpointError: MXFP4 block tensors. MissingWeightsError, UnexpectedWeightsError: wrong
        tensor names. InputError, ShapeError: arrays that are not float, or do not fit.
        RefimplError: dtypes differ. ConfigError: a bad config, or ``num_experts_per_tok`` above E.

    Paper: arXiv:2508.10925, sec. 2 (top-4 softmax-weighted experts, clamped SwiGLU with residual).
    Checked against: transformers 5.24 ``GptOssMLP``, ``GptOssTopKRouter``, ``GptOssExperts``
    (``forward`` and ``_apply_gate``).
    """
    config = config if isinstance(config, GptOssConfig) else GptOssConfig.from_dict(config)
    x = as_float_array(f"{NAME} moe_block: hidden_states", hidden_states, ndim=3)
    b, t, m = x.shape
    rows = x.reshape(b * t, m)
    w = _moe_weights(weights, rows)
    # Router: top-k of the biased logits, softmax over the k chosen.
    routing_weights, indices = top_k_softmax(router_logits(rows, w["router.weight"], w["router.bias"]),
                                             config.num_experts_per_tok)

    def expert(e: int, chosen: np.ndarray) -> np.ndarray:
        return clamped_swiglu_expert(
            chosen, w["experts.gate_up_proj"][e], w["experts.gate_up_proj_bias"][e], w["experts.down_proj"][e],
            w["experts.down_proj_bias"][e], swiglu_limit=config.swiglu_limit, alpha=config.swiglu_alpha)

    out = dispatch(rows, routing_weights, indices, expert, w["router.weight"].shape[0], weight_on="output")
    return out.reshape(b, t, m)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: GptOssConfig, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm decoder layer: attention with sinks, then the MoE block, each with a residual;
    returns the new hidden state and the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, cos, sin, context,
                                     layer)
    h = h + attended
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps)
    experts = {name: p[f"mlp.{name}"] for name in MOE_WEIGHTS}
    return h + moe_block(x, experts, config), kept


def forward_step(
    weights: dict[str, np.ndarray], config: GptOssConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits, taps, caches)``: logits ``(B, T, V)``; taps maps ``"embed"``, ``"layers.{l}"``
        (output of layer l) and ``"norm"`` (final-normalised hidden state) to ``(B, T, M)``
        arrays, in that order; one KVCache per layer.
    """
    cos, sin = rope_tables(config, context.positions, weights["model.embed_tokens.weight"].dtype)
    return run_decoder_step(weights, config, input_ids, context,
                            lambda h, p, layer: decoder_layer(h, p, config, cos, sin, context, layer))


def forward(
    weights: dict[str, np.ndarray], config: GptOssConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _release(num_hidden_layers: int, num_local_experts: int) -> dict:
    """A released gpt-oss config.json without its ``quantization_config`` (storage only: MXFP4 experts)."""
    return {
        "architectures": [NAME], "model_type": "gpt_oss", "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * (num_hidden_layers // 2),
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": num_hidden_layers, "num_key_value_heads": 8, "num_local_experts": num_local_experts,
        "output_router_logits": False, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
    }


#: Published configs (config.json values that carry math), each minus its ``quantization_config``
#: ``{"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
#: "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}``.
#: Sources: https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json and
#: https://huggingface.co/openai/gpt-oss-20b/raw/main/config.json ("transformers_version":
#: "4.55.0.dev0"), as quoted verbatim in public test files and summarised in
#: shared/spec/moe-architectures.md sec. 4.1; the two differ only in num_hidden_layers
#: (36 / 24) and num_local_experts (128 / 32). ``swiglu_alpha`` is not in either file (class
#: default 1.702, hard-coded in OpenAI's ``swiglu``).
PRESETS = {
    "gpt-oss-120b": _release(num_hidden_layers=36, num_local_experts=128),
    "gpt-oss-20b": _release(num_hidden_layers=24, num_local_experts=32),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=GptOssConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "OpenAI, gpt-oss-120b & gpt-oss-20b Model Card, arXiv:2508.10925",
        "Peng et al., YaRN, arXiv:2309.00071",
        "transformers 5.24 models/gpt_oss/modeling_gpt_oss.py, configuration_gpt_oss.py",
    ),
    weight_init=weight_init,
)
