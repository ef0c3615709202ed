"""GLM-4.5 / GLM-4.5-Air mixture-of-experts decoder (``Glm4MoeForCausalLM``, model_type ``glm4_moe``).

Forward pass, pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = x Wq^T + bq          (B, T, H, D)     biases iff attention_bias (q, k, v only; o_proj never)
    k   = x Wk^T + bk          (B, T, Hkv, D)
    v   = x Wv^T + bv          (B, T, Hkv, D)
    q, k = RMSNorm_per_head(q; q_norm), RMSNorm_per_head(k; k_norm)   iff use_qk_norm: over D, before RoPE
    q, k = RoPE_rotate_half on the FIRST Dr = int(D * partial_rotary_factor) channels; D - Dr pass through
    h   = h + o_proj( GQA(q, k, v; scale = D^-0.5, causal) )
    x   = RMSNorm(h; post_attention_layernorm)
    h   = h + SwiGLU_F(x)                                          l <  first_k_dense_replace (dense)
    h   = h + MoE(x)                                               l >= first_k_dense_replace
    logits = RMSNorm(h_L; norm) W_lm^T

    MoE(x) = sum_{j<k} w_j SwiGLU_{I, e_j}(x)  +  SwiGLU_{I * n_shared_experts}(x; shared_experts)
    (w, e) = sigmoid_group_top_k(x W_gate^T; e_score_correction_bias, n_group, topk_group,
                                 norm_topk_prob, routed_scaling_factor)

The router is DeepSeek-V3's "noaux_tc" (:func:`refimpl.routers.sigmoid_group_top_k`):
sigmoid affinities, the correction bias steers selection only, group-limited top-k
(released GLM configs have one group), renormalised with ``+1e-20``, then times
``routed_scaling_factor`` exactly once (2.5 for GLM-4.5, 1.0 for GLM-4.5-Air;
bug class MOE-09). The shared expert is always on, unweighted. "SwiGLU" is the
gated MLP with ``act = hidden_act``: silu in both releases; transformers applies
``config.hidden_act`` in the dense MLPs, the shared expert and the routed experts
alike (``Glm4MoeMLP``, ``Glm4MoeExperts``), so gelu and gelu_pytorch_tanh are accepted too.

Incremental decoding (:func:`forward_step`, :mod:`refimpl.kv_cache`): every layer is full
causal attention and caches every key (after QK-norm and the partial RoPE) and value;
positions are each token's index in its own sequence. The MTP depths (:func:`mtp_forward`)
are not part of the incremental path: they run over a whole sequence, without a cache.

Notation:
    paper symbol                code name                                   shape
    E (embedding)               ``model.embed_tokens.weight``               (V, M)
    W_Q, W_K, W_V, W_O          ``self_attn.{q,k,v,o}_proj.weight``         (H*D, M), (Hkv*D, M), (Hkv*D, M), (M, H*D)
    b_Q, b_K, b_V               ``self_attn.{q,k,v}_proj.bias``             (H*D,), (Hkv*D,), (Hkv*D,)
    QK-norm gains               ``self_attn.{q,k}_norm.weight``             (D,)  shared by all heads (QKN-04)
    Dr (rotary width)           ``int(head_dim * partial_rotary_factor)``   64 of 128 in both released models
    W_gate (router, centroids)  ``mlp.gate.weight``                         (E, M)
    b (bias for selection)      ``mlp.gate.e_score_correction_bias``        (E,)
    expert FFNs                 ``mlp.experts.gate_up_proj``                (E, 2I, M) rows gate | up
                                ``mlp.experts.down_proj``                   (E, M, I)
    shared expert               ``mlp.shared_experts.{gate,up,down}_proj``  (Is, M), (Is, M), (M, Is); Is = I * n_shared
    dense FFN (first layers)    ``mlp.{gate,up,down}_proj.weight``          (F, M), (F, M), (M, F)

with I = ``moe_intermediate_size``, F = ``intermediate_size``, E = ``n_routed_experts``,
k = ``num_experts_per_tok``.

How config.json is resolved (transformers 5.24 ``Glm4MoeConfig``):

* ``head_dim`` is not a declared field; the attention reads ``getattr(config,
  "head_dim", hidden_size // num_attention_heads)`` (modeling_glm4_moe.py:181). Released
  configs carry ``head_dim: 128`` (96 heads x 128 = 12288 != hidden 5120 / 4096).
* ``partial_rotary_factor``: a value inside ``rope_parameters`` (or the legacy
  ``rope_scaling``) wins, else the top-level key, else **0.5**
  (``kwargs.setdefault("partial_rotary_factor", 0.5)``, configuration_glm4_moe.py:122;
  ``convert_rope_params_to_dict`` copies it into the RoPE dict). ``rope_theta``
  defaults to 10000 (released: 1e6).
* The rotation is the NeoX half split on the first Dr channels (modeling:131-171),
  not the interleaved pairs of the dense ``glm`` / ``glm4`` models (bug class ROPE-02).
* Multi-token-prediction weights ``model.layers.{L + i}.*``, i < ``num_nextn_predict_layers``
  (``model.layers.92.*`` in GLM-4.5, ``46`` in Air), are not part of the forward
  (transformers ignores them on load, modeling:461): the main model drops them unread
  (``ARCHITECTURE.ignored_weights``). When they are complete, ``Model.forward(ids,
  return_mtp_logits=True)`` gives their draft logits (:mod:`refimpl.mtp`, :func:`mtp_forward`):
  per depth ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a MoE decoder layer.

Dtype: everything in the compute dtype of the weights (float64 or float32),
including the router; transformers computes the router (``F.linear`` on
``.type(torch.float32)`` inputs, modeling:284), every RMSNorm, the RoPE tables
and the softmax in float32 even for a float64 model (float32 islands, see
``docs/transformers-differences.md``).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: GLM-4.5 Team, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models",
arXiv:2508.06471, sec. 2.1 and Table 1 (MoE with loss-free balance routing and sigmoid
gates, GQA with partial RoPE, 96 heads for 5120 hidden, QK-Norm, MTP layer); the router is
DeepSeek-V3's, arXiv:2412.19437, sec. 2.1.2 (eqs. 12-16).
Checked against: transformers 5.24 ``models/glm4_moe/modeling_glm4_moe.py``
(``Glm4MoeRotaryEmbedding`` 46-91, ``apply_rotary_pos_emb`` 138-171, ``Glm4MoeAttention`` 174-250,
``Glm4MoeTopkRouter`` 269-307, ``Glm4MoeRMSNorm`` 311-328, ``Glm4MoeExperts`` 332-368,
``Glm4MoeMoE`` 371-392, ``Glm4MoeDecoderLayer`` 395-440) and ``configuration_glm4_moe.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture, MtpHook
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import ConfigError, InputError, MissingWeightsError, ShapeError
from ..experts import swiglu_expert
from ..kv_cache import KVCache, StepContext, attend_with_cache, fresh_context
from ..linear import linear
from ..mlp import ACTIVATIONS, gated_mlp
from ..moe import dispatch, first_k_dense_schedule
from ..mtp import mtp_chain, mtp_layer
from ..numerics import as_float_array, check_finite_positive, check_same_dtype, compute_dtype, to_compute
from ..rmsnorm import rms_norm
from ..rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies
from ..routers import router_logits, sigmoid_group_top_k
from ._expert_layout import MLP_EXPERTS, split_fused_experts
from ._llama_like import (
    ROPE_KEYS, decoder_layer_mtp_logits, attention_weight_shapes, implicit_head_dim, num_key_value_heads, projection,
    resolve_rope_parameters, run_decoder_step, tied_head,
)

NAME = "Glm4MoeForCausalLM"

#: ``PreTrainedConfig.default_theta`` (Glm4MoeConfig sets none of its own).
DEFAULT_ROPE_THETA = 10000.0
#: ``Glm4MoeConfig.__post_init__``: ``kwargs.setdefault("partial_rotary_factor", 0.5)``.
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5
MLP_TYPES = ("dense", "sparse")

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Training-time outputs (router logits for the auxiliary loss); no effect on logits.
    "output_router_logits",
    # transformers' attribute_map alias of num_nextn_predict_layers (read below through it).
    "num_mtp_layers",
})


@dataclass(frozen=True)
class Glm4MoeConfig:
    """GLM-4.5 hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``Glm4MoeConfig`` (the GLM-4.5-Air sizes) where
    config.json may omit a key. ``rope_parameters`` always carries the resolved
    ``partial_rotary_factor``; ``mlp_layer_types`` is the resolved per-layer schedule,
    ``"dense"`` for ``l < first_k_dense_replace`` and ``"sparse"`` (MoE) after.
    """

    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    #: absent from config.json: hidden_size // num_attention_heads (4096 // 96 = 42 with the defaults)
    head_dim: int = 42
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {
        "rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA,
        "partial_rotary_factor": DEFAULT_PARTIAL_ROTARY_FACTOR}, hash=False)
    attention_bias: bool = False
    use_qk_norm: bool = False
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1
    mlp_layer_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Glm4MoeConfig":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields; heads that do not
                divide; a rotary width that is odd or zero; expert groups that do not
                divide the experts or leave fewer than ``num_experts_per_tok`` experts
                to choose from; a ``hidden_act`` not in :data:`refimpl.mlp.ACTIVATIONS`; a RoPE type
                :func:`refimpl.rope.rope_frequencies` does not implement.
        """
        d = cls.__dataclass_fields__
        hidden = get_positive_int(raw, "hidden_size", d["hidden_size"].default)
        heads = get_positive_int(raw, "num_attention_heads", d["num_attention_heads"].default)
        layers = get_positive_int(raw, "num_hidden_layers", d["num_hidden_layers"].default)
        first_dense = get_field(raw, "first_k_dense_replace", int, d["first_k_dense_replace"].default)
        if first_dense < 0:
            raise ConfigError(f"config.json field 'first_k_dense_replace' must be >= 0, got {first_dense}")
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", d["vocab_size"].default),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size", d["intermediate_size"].default),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=num_key_value_heads(raw, heads, d["num_key_value_heads"].default),
            head_dim=implicit_head_dim(raw, hidden, heads, null_means_default=False),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings",
                                                     d["max_position_embeddings"].default),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, d["rms_norm_eps"].default),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            rope_parameters=resolve_glm_rope_parameters(raw),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            use_qk_norm=get_field(raw, "use_qk_norm", bool, False),
            moe_intermediate_size=get_positive_int(raw, "moe_intermediate_size", d["moe_intermediate_size"].default),
            n_routed_experts=get_positive_int(raw, "n_routed_experts", d["n_routed_experts"].default),
            num_experts_per_tok=get_positive_int(raw, "num_experts_per_tok", d["num_experts_per_tok"].default),
            n_shared_experts=get_positive_int(raw, "n_shared_experts", d["n_shared_experts"].default),
            routed_scaling_factor=get_field(raw, "routed_scaling_factor", float, 1.0),
            n_group=get_positive_int(raw, "n_group", 1),
            topk_group=get_positive_int(raw, "topk_group", 1),
            norm_topk_prob=get_field(raw, "norm_topk_prob", bool, True),
            first_k_dense_replace=first_dense,
            num_nextn_predict_layers=_num_nextn_predict_layers(raw),
            mlp_layer_types=tuple(MLP_TYPES[moe] for moe in first_k_dense_schedule(layers, first_dense)),
        )
        config._validate()
        used = set(cls.__dataclass_fields__) | ROPE_KEYS
        check_known_keys(raw, used, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"{NAME}: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        check_finite_positive(f"{NAME}: routed_scaling_factor", self.routed_scaling_factor, error=ConfigError)
        # transformers applies hidden_act in the dense MLPs, the shared expert and the routed experts.
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{NAME}: hidden_act={self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        # Refuses an odd or zero rotary width and unsupported RoPE types at load time.
        rope_frequencies(self.rope_parameters, self.head_dim, max_position_embeddings=self.max_position_embeddings)
        e, groups, kept, k = self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok
        if e % groups or e // groups < 2:
            raise ConfigError(f"{NAME}: n_group ({groups}) must divide n_routed_experts ({e}) into groups of "
                              "at least 2 (a group's score is its two best experts)")
        if kept > groups:
            raise ConfigError(f"{NAME}: topk_group ({kept}) exceeds n_group ({groups})")
        if k > kept * (e // groups):
            raise ConfigError(f"{NAME}: num_experts_per_tok ({k}) exceeds the {kept * (e // groups)} experts "
                              f"of the topk_group ({kept}) kept groups")


def resolve_glm_rope_parameters(raw: dict) -> dict:
    """The RoPE parameters of a GLM-4.5 config.json, ``partial_rotary_factor`` included.

    As :func:`refimpl.models._llama_like.resolve_rope_parameters` (``rope_scaling``
    replaces ``rope_parameters``; ``rope_theta`` from the dict, else top level, else
    10000), plus the rotary fraction: the chosen dict's own ``partial_rotary_factor``,
    else the top-level key, else 0.5.

    Raises:
        ConfigError: a null or non-numeric ``partial_rotary_factor`` (transformers
            would crash or silently rotate the whole head), or what
            ``resolve_rope_parameters`` raises.
    """
    stripped = {k: v for k, v in raw.items() if k != "partial_rotary_factor"}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(raw.get(key), dict):
            stripped[key] = {k: v for k, v in raw[key].items() if k != "partial_rotary_factor"}
    params = resolve_rope_parameters(stripped, DEFAULT_ROPE_THETA, NAME)
    chosen = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    factor = chosen.get("partial_rotary_factor", raw.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"{NAME}: partial_rotary_factor must be a number (0.5 in GLM-4.5), got {factor!r}")
    params["partial_rotary_factor"] = float(factor)
    return params


def _num_nextn_predict_layers(raw: dict) -> int:
    """MTP modules after the main layers (``num_nextn_predict_layers``, alias ``num_mtp_layers``); default 1."""
    value = get_field(raw, "num_nextn_predict_layers", int, None, nullable=True)
    alias = get_field(raw, "num_mtp_layers", int, None, nullable=True)
    if value is not None and alias is not None and value != alias:
        raise ConfigError(f"{NAME}: num_nextn_predict_layers ({value}) and num_mtp_layers ({alias}) disagree")
    value = 1 if value is None and alias is None else (value if value is not None else alias)
    if value < 0:
        raise ConfigError(f"{NAME}: num_nextn_predict_layers must be >= 0, got {value}")
    return value


# --- checkpoint layout ------------------------------------------------------------------------------------------


def moe_weight_shapes(config: Glm4MoeConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of one MoE block, relative to ``model.layers.{l}.mlp.``, with their shapes."""
    m, i, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    shared = i * config.n_shared_experts
    return {
        "gate.weight": (e, m),
        "gate.e_score_correction_bias": (e,),
        "experts.gate_up_proj": (e, 2 * i, m),
        "experts.down_proj": (e, m, i),
        "shared_experts.gate_proj.weight": (shared, m),
        "shared_experts.up_proj.weight": (shared, m),
        "shared_experts.down_proj.weight": (m, shared),
    }


def checkpoint_moe_shapes(config: Glm4MoeConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of one MoE block as published checkpoints store them, relative to ``mlp.``.

    One ``experts.{e}.{gate,up,down}_proj.weight`` triple per routed expert (the layout of
    zai-org/GLM-4.5 and of transformers' ``save_pretrained``, which splits its fused stacks
    back on saving; ``conversion_mapping.py`` "glm4_moe" -> "qwen2_moe"). :func:`fuse_experts`
    turns them into the stacks of :func:`moe_weight_shapes`; :func:`convert_weights` turns
    a checkpoint saved with those stacks (``save_original_format=False``) into these names.
    """
    m, i = config.hidden_size, config.moe_intermediate_size
    fused = moe_weight_shapes(config)
    shapes = {name: fused[name] for name in fused if not name.startswith("experts.")}
    for e in range(config.n_routed_experts):
        shapes.update({f"experts.{e}.gate_proj.weight": (i, m), f"experts.{e}.up_proj.weight": (i, m),
                       f"experts.{e}.down_proj.weight": (m, i)})
    return shapes


def convert_weights(config: Glm4MoeConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with MoE layers saved in transformers' fused layout split into per-expert tensors
    (:func:`refimpl.models._expert_layout.split_fused_experts`; CheckpointError for a mixed layer)."""
    depths = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    layers = [layer for layer, kind in enumerate(config.mlp_layer_types) if kind == "sparse"] + list(depths)
    shape = (config.n_routed_experts, config.moe_intermediate_size, config.hidden_size)
    return split_fused_experts(weights, layers, MLP_EXPERTS, shape)


def fuse_experts(p: dict[str, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
    """One layer's checkpoint ``mlp.*`` tensors as the :func:`moe_block` weights (``mlp.`` removed).

    ``experts.gate_up_proj[e] = concat(gate_e, up_e)`` ``(E, 2I, M)`` (gate rows first),
    ``experts.down_proj[e] = down_e`` ``(E, M, I)``: transformers' ``Glm4MoeExperts`` layout.
    """
    mlp = {name[len("mlp."):]: w for name, w in p.items() if name.startswith("mlp.")}
    experts = range(num_experts)
    fused = {name: mlp[name] for name in ("gate.weight", "gate.e_score_correction_bias",
                                          "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                                          "shared_experts.down_proj.weight")}
    fused["experts.gate_up_proj"] = np.stack([
        np.concatenate([mlp[f"experts.{e}.gate_proj.weight"], mlp[f"experts.{e}.up_proj.weight"]]) for e in experts])
    fused["experts.down_proj"] = np.stack([mlp[f"experts.{e}.down_proj.weight"] for e in experts])
    return fused


def weight_shapes(config: Glm4MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true; q/k/v biases
    exist iff ``attention_bias``; q/k norms iff ``use_qk_norm``; dense layers hold
    ``mlp.{gate,up,down}_proj``, MoE layers the tensors of :func:`checkpoint_moe_shapes`
    (per-expert matrices, as published).
    """
    m, v = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, m), "model.norm.weight": (m,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, m)
    for layer, kind in enumerate(config.mlp_layer_types):
        shapes.update({f"model.layers.{layer}.{name}": s for name, s in layer_shapes(config, kind).items()})
    return shapes


def layer_shapes(config: Glm4MoeConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer (``kind`` "dense" or "sparse"), relative to ``model.layers.{l}.``."""
    m, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    attention = attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, d,
                                        bias=config.attention_bias)
    # o_proj is built with bias=False whatever attention_bias says (modeling_glm4_moe.py:197).
    attention.pop("self_attn.o_proj.bias", None)
    if config.use_qk_norm:
        attention.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    dense = {"mlp.gate_proj.weight": (f, m), "mlp.up_proj.weight": (f, m), "mlp.down_proj.weight": (m, f)}
    sparse = {f"mlp.{name}": shape for name, shape in checkpoint_moe_shapes(config).items()}
    return {"input_layernorm.weight": (m,), "post_attention_layernorm.weight": (m,), **attention,
            **(dense if kind == "dense" else sparse)}


def mtp_weight_prefixes(config: Glm4MoeConfig) -> tuple[str, ...]:
    """``ignored_weights``: name prefixes of the multi-token-prediction layers, dropped unread."""
    first = config.num_hidden_layers
    return tuple(f"model.layers.{first + i}." for i in range(config.num_nextn_predict_layers))


def mtp_weight_shapes(config: Glm4MoeConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of the MTP depths: per depth ``model.layers.{L + i}.`` ``enorm`` / ``hnorm`` ``(M,)``,
    ``eh_proj`` ``(M, 2M)``, ``shared_head.norm`` ``(M,)`` and a MoE ("sparse") decoder layer."""
    m = config.hidden_size
    per_depth = {"enorm.weight": (m,), "hnorm.weight": (m,), "eh_proj.weight": (m, 2 * m),
                 "shared_head.norm.weight": (m,), **layer_shapes(config, "sparse")}
    return {f"{prefix}{k}": s for prefix in mtp_weight_prefixes(config) for k, s in per_depth.items()}


def mtp_copies(config: Glm4MoeConfig) -> dict[str, str]:
    """Per-depth copies of the shared embedding and head a checkpoint may store (must be equal)."""
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    copies = {}
    for prefix in mtp_weight_prefixes(config):
        copies.update({f"{prefix}embed_tokens.weight": "model.embed_tokens.weight",
                       f"{prefix}shared_head.head.weight": head})
    return copies


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-generator draws for tensors the default rule draws badly.

    ``e_score_correction_bias`` is a zero-initialised buffer in transformers; the default
    1-D rule (1 + 0.2 N) would shift every expert nearly alike. It gets 0.5 N, about twice
    the spread of the sigmoid affinities: the bias changes which experts win for most
    tokens (bug class MOE-01) and spreads the selection scores, so that float64 routing
    decisions keep a margin that bfloat16 rounding of the router input does not cross.
    Everything else keeps the default.
    """
    if name.endswith("e_score_correction_bias"):
        return 0.5 * rng.standard_normal(shape)
    return None


# --- layers --------------------------------------------------------------------------------------------------------


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """GLM-4.5 self-attention on normalised input ``x`` ``(B, T, M)``.

    ``p`` holds the layer's ``self_attn.*`` tensors; ``cos, sin`` are ``(B, T, Dr/2)`` at the
    tokens' positions, with Dr < D (partial rotary: the first Dr channels of each head turn, the
    rest pass); ``context`` carries the positions, padding and the caches of the previous call.
    Returns ``(B, T, M)`` and the layer's cache for the next call (keys after QK-norm and RoPE).
    """
    b, t, _ = x.shape
    d, eps = config.head_dim, config.rms_norm_eps
    q = projection(x, p, "self_attn.q_proj").reshape(b, t, -1, d)
    k = projection(x, p, "self_attn.k_proj").reshape(b, t, -1, d)
    v = projection(x, p, "self_attn.v_proj").reshape(b, t, -1, d)
    # QK-norm: per head over D with one (D,) gain for all heads (QKN-04), before RoPE.
    if config.use_qk_norm:
        q, k = rms_norm(q, p["self_attn.q_norm.weight"], eps), rms_norm(k, p["self_attn.k_norm.weight"], eps)
    q, k = apply_rope_rotate_half(q, cos, sin), apply_rope_rotate_half(k, cos, sin)
    out, kept = attend_with_cache(q, k, v, context, layer, scale=d**-0.5)
    return linear(out.reshape(b, t, -1), p["self_attn.o_proj.weight"]), kept


def _moe_config(config) -> Glm4MoeConfig:
    if isinstance(config, Glm4MoeConfig):
        return config
    if not isinstance(config, dict):
        raise InputError(f"moe_block: config must be a config.json dict, got {type(config).__name__}")
    return Glm4MoeConfig.from_dict(config)


def _moe_weights(weights: dict, config: Glm4MoeConfig, x: np.ndarray) -> dict[str, np.ndarray]:
    """The MoE block's tensors, checked: every name present, float, one dtype, the config's shapes."""
    shapes = moe_weight_shapes(config)
    missing = sorted(set(shapes) - set(weights))
    unknown = sorted(set(weights) - set(shapes))
    if missing or unknown:
        raise InputError(f"moe_block: weights missing {missing} / not part of a GLM-4.5 MoE block {unknown}")
    checked = {name: as_float_array(f"moe_block: {name}", weights[name]) for name in shapes}
    for name, shape in shapes.items():
        if checked[name].shape != shape:
            raise ShapeError(f"moe_block: '{name}' has shape {checked[name].shape}, the config needs {shape}")
    # The router's tensors may be float32 beside float16 / bfloat16 hidden states (ARCHITECTURE.float32_weights).
    check_same_dtype(hidden_states=x, **{n.replace(".", "_"): w for n, w in checked.items()
                                         if not (n in ROUTER_WEIGHTS and w.dtype == compute_dtype(x.dtype))})
    return checked


#: The router's tensors (names in the MoE block), which transformers keeps in float32.
ROUTER_WEIGHTS = ("gate.weight", "gate.e_score_correction_bias")


def route(x: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Router of one MoE block: ``(weights (N, k), expert indices (N, k))`` for rows ``x`` ``(N, M)``.

    ``logits = x W_gate^T`` (no bias), then :func:`refimpl.routers.sigmoid_group_top_k`,
    which applies ``routed_scaling_factor`` once (MOE-09).
    """
    logits = router_logits(x, p["gate.weight"])
    return sigmoid_group_top_k(
        logits, to_compute(p["gate.e_score_correction_bias"]), top_k=config.num_experts_per_tok, n_group=config.n_group,
        topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor)


def routed_experts(x: np.ndarray, weights: np.ndarray, indices: np.ndarray, p: dict[str, np.ndarray],
                   config: Glm4MoeConfig) -> np.ndarray:
    """``sum_j w_j Expert_{e_j}(x)`` over the chosen experts, rows ``x`` ``(N, M)`` -> ``(N, M)``."""
    gate_up, down = p["experts.gate_up_proj"], p["experts.down_proj"]

    def expert(e: int, rows: np.ndarray) -> np.ndarray:
        return swiglu_expert(rows, gate_up[e], down[e], config.hidden_act)

    return dispatch(x, weights, indices, expert, config.n_routed_experts, weight_on="output")


def shared_experts(x: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig) -> np.ndarray:
    """The always-on shared expert(s): one SwiGLU of width ``moe_intermediate_size * n_shared_experts``."""
    return gated_mlp(x, p["shared_experts.gate_proj.weight"], p["shared_experts.up_proj.weight"],
                     p["shared_experts.down_proj.weight"], config.hidden_act)


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """GLM-4.5's MoE feed-forward: routed experts plus the shared expert, ``(B, T, M) -> (B, T, M)``.

    Args:
        hidden_states: ``(B, T, M)``, the post-attention-normalised input.
        weights: the tensors of :func:`moe_weight_shapes`, named relative to
            ``model.layers.{l}.mlp.`` (``"gate.weight"``, ``"gate.e_score_correction_bias"``,
            ``"experts.gate_up_proj"``, ``"experts.down_proj"``, ``"shared_experts.*_proj.weight"``),
            in the dtype of ``hidden_states``.
        config: a :class:`Glm4MoeConfig` or a config.json dict.

    Returns:
        ``(B, T, M)``: ``sum_j w_j Expert_{e_j}(x) + Shared(x)``.

    Raises:
        InputError: weights missing or unknown, arrays not float arrays, config not a dict.
        ShapeError: ``hidden_states`` not ``(B, T, M)`` or a weight of the wrong shape.
        ConfigError: a bad config. RefimplError: mixed dtypes.

    Checked against: ``Glm4MoeMoE.forward`` (modeling_glm4_moe.py:385-392).
    """
    config = _moe_config(config)
    x = as_float_array("moe_block: hidden_states", hidden_states, ndim=3)
    if x.shape[-1] != config.hidden_size:
        raise ShapeError(f"moe_block: hidden_states {x.shape} must end in hidden_size {config.hidden_size}")
    p = _moe_weights(weights, config, x)
    rows = x.reshape(-1, x.shape[-1])
    routing_weights, indices = route(rows, p, config)
    routed = routed_experts(rows, routing_weights, indices, p, config)
    return routed.reshape(x.shape) + shared_experts(x, p, config)


def dense_mlp(x: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig) -> np.ndarray:
    """The SwiGLU of the first ``first_k_dense_replace`` layers, width ``intermediate_size``."""
    return gated_mlp(x, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"], p["mlp.down_proj.weight"],
                     config.hidden_act)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig, layer: int, cos: np.ndarray, sin: np.ndarray,
    context: StepContext,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm layer: attention, then the dense MLP or the MoE block as ``mlp_layer_types[layer]`` says;
    returns the new hidden state and the layer's cache."""
    return pre_norm_layer(h, p, config, config.mlp_layer_types[layer], cos, sin, context, layer)


def pre_norm_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig, kind: str, cos: np.ndarray, sin: np.ndarray,
    context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """Attention (over entry ``layer`` of the context's caches), then the dense MLP (``kind`` "dense") or
    the MoE block ("sparse"), pre-norm, with residuals; returns the new hidden state and the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, cos, sin, context,
                                     layer)
    h = h + attended
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps)
    if kind == "dense":
        return h + dense_mlp(x, p, config), kept
    return h + moe_block(x, fuse_experts(p, config.n_routed_experts), config), kept


def rope_tables(config: Glm4MoeConfig, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(B, T, Dr/2)`` at integer ``positions`` ``(B, T)`` (partial rotary width)."""
    inv_freq, scaling = rope_frequencies(config.rope_parameters, config.head_dim,
                                         max_position_embeddings=config.max_position_embeddings)
    return rope_cos_sin(positions, inv_freq, dtype, scaling)


def mtp_block(h: np.ndarray, p: dict[str, np.ndarray], config: Glm4MoeConfig) -> np.ndarray:
    """TRM_k of an MTP depth: a MoE decoder layer, causal, at positions ``0 .. T'-1`` (a whole
    sequence, no cache).

    Always MoE ("sparse"): transformers builds MTP layers with ``first_k_dense_replace = 0``
    (``configuration_utils.py`` ``get_mtp_config``), vLLM by index ``L + i >= first_k_dense_replace``.
    """
    context = fresh_context(*h.shape[:2])
    cos, sin = rope_tables(config, context.positions, h.dtype)
    return pre_norm_layer(h, p, config, "sparse", cos, sin, context, 0)[0]


def mtp_depth(
    hidden_states: np.ndarray, next_token_embeddings: np.ndarray, weights: dict[str, np.ndarray], config,
) -> np.ndarray:
    """One MTP depth (:func:`refimpl.mtp.mtp_layer` with :func:`mtp_block`): ``h^k`` ``(B, T', M)``.

    Args:
        hidden_states: ``h^{k-1}`` ``(B, T', M)``. next_token_embeddings: ``E[t_{i+k}]`` ``(B, T', M)``.
        weights: the depth's tensors relative to ``model.layers.{L + k - 1}.`` (per-expert, as published).
        config: a config.json dict or a :class:`Glm4MoeConfig`.

    Raises:
        ConfigError / InputError: bad config. ShapeError, MissingWeightsError: bad arrays or names.
    """
    config = _moe_config(config)
    missing = sorted(set(layer_shapes(config, "sparse")) - set(weights))
    if missing:
        raise MissingWeightsError(f"mtp_layer: weights lack {', '.join(missing[:4])}"
                                  f"{' and more' if len(missing) > 4 else ''}")
    return mtp_layer(hidden_states, next_token_embeddings, weights, rms_norm_eps=config.rms_norm_eps,
                     block=lambda x: mtp_block(x, weights, config))


def mtp_forward(
    weights: dict[str, np.ndarray], config: Glm4MoeConfig, input_ids: np.ndarray, main_hidden: np.ndarray,
) -> list[np.ndarray]:
    """Draft logits of the MTP depths k = 1..D, ``(B, T-k, V)`` each
    (:func:`._llama_like.decoder_layer_mtp_logits` with this model's :func:`mtp_depth`).

    Args:
        weights: the main model's and the MTP depths' tensors (:func:`mtp_weight_shapes`).
        main_hidden: the main model's final-normed hidden state ``(B, T, M)`` (tap ``"norm"``).
    """
    return decoder_layer_mtp_logits(weights, config, input_ids, main_hidden, mtp_depth, mtp_chain)


def forward_step(
    weights: dict[str, np.ndarray], config: Glm4MoeConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits (B, T, V), taps, caches)``; taps ``"embed"``, ``"layers.{l}"``, ``"norm"``,
        each ``(B, T, M)``, in that order; one KVCache per layer.
    """
    cos, sin = rope_tables(config, context.positions, weights["model.embed_tokens.weight"].dtype)
    return run_decoder_step(weights, config, input_ids, context,
                            lambda h, p, layer: decoder_layer(h, p, config, layer, cos, sin, context))


def forward(
    weights: dict[str, np.ndarray], config: Glm4MoeConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


#: Published flagship configs (config.json values that carry math).
#: Sources: shared/spec/moe-architectures.md sec. 2.1 (zai-org/GLM-4.5 and GLM-4.5-Air config.json
#: values, GLM-4.5 report arXiv:2508.06471 Table 1), cross-checked against the THUDM/slime
#: training scripts ``scripts/models/glm4.5-355B-A32B.sh`` / ``glm4.5-106B-A12B.sh`` (96/8 heads of
#: 128, rotary-percent 0.5, base 1e6, 3 / 1 dense layers, 160 experts top-8 with scaling 2.5,
#: moe ffn 1536 / 1408, QK layernorm for 355B only, q/k/v bias).
PRESETS = {
    "GLM-4.5": {
        "architectures": [NAME], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92,
        "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_theta": 1000000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "attention_bias": True, "use_qk_norm": True, "n_routed_experts": 160, "num_experts_per_tok": 8,
        "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "GLM-4.5-Air": {
        "architectures": [NAME], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 46,
        "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_theta": 1000000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "attention_bias": True, "use_qk_norm": False, "n_routed_experts": 128, "num_experts_per_tok": 8,
        "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Glm4MoeConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "GLM-4.5 Team, GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models, arXiv:2508.06471",
        "DeepSeek-V3 Technical Report, arXiv:2412.19437 (sigmoid router with correction bias, group-limited top-k)",
        "transformers 5.24 models/glm4_moe/modeling_glm4_moe.py and configuration_glm4_moe.py",
    ),
    weight_init=weight_init,
    ignored_weights=mtp_weight_prefixes,
    convert_weights=convert_weights,
    mtp=MtpHook(weight_shapes=mtp_weight_shapes, prefixes=mtp_weight_prefixes, copies=mtp_copies,
                forward=mtp_forward),
    # transformers' Glm4MoePreTrainedModel._keep_in_fp32_modules_strict.
    float32_weights=tuple(f"mlp.{name}" for name in ROUTER_WEIGHTS),
)
