"""DeepSeek-V3 / Kimi K2 decoder (``DeepseekV3ForCausalLM``).

Forward pass, pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]                                    no embedding scale
    h   = h + MLA( RMSNorm(h; input_layernorm) )          refimpl.mla, causal, at the tokens' positions
    x   = RMSNorm(h; post_attention_layernorm)
    h   = h + SwiGLU_F(x)                                 dense layer: l < first_k_dense_replace
    h   = h + MoE(x)                                      otherwise (moe_block):
          s = sigmoid(x W_g^T)                     (N, E)  router affinities (mlp.gate.weight)
          w, i = sigmoid_group_top_k(s; bias b, n_group, topk_group, k, norm_topk_prob, rsf)
               (b = mlp.gate.e_score_correction_bias selects only; weights are s[i], renormalised
                if norm_topk_prob, then times routed_scaling_factor -- refimpl.routers)
          MoE(x) = sum_j w_j SwiGLU_I(x; expert i_j)  +  SwiGLU_{I * n_shared_experts}(x; shared_experts)
    logits = RMSNorm(h_L; norm) W_lm^T                    untied (W_lm = E when tie_word_embeddings)

F = ``intermediate_size`` (dense layers), I = ``moe_intermediate_size`` (each routed
expert); the shared experts are **one** gated MLP of width ``I * n_shared_experts``
(equal to ``n_shared_experts`` MLPs of width I summed, with their weights
concatenated). Kimi K2 is this code with another config: ``n_group = topk_group = 1``
(no group limit), 384 experts, ``routed_scaling_factor`` 2.827, YaRN over rope base
50000 with ``beta_fast = beta_slow = 1``, 64 heads, one dense layer.

Checkpoint layout: routed experts are stored one matrix per expert,
``mlp.experts.{e}.{gate,up,down}_proj.weight`` ((I, M), (I, M), (M, I)), as in the
published checkpoints and as transformers' ``save_pretrained`` writes them;
transformers stacks them on load into ``experts.gate_up_proj`` (E, 2I, M) (gate rows
first) and ``experts.down_proj`` (E, M, I), the layout :func:`moe_block` takes.
``save_pretrained(dir, save_original_format=False)`` writes those stacks as
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``; :func:`convert_weights` splits
them back (exactly) into the per-expert names of :func:`weight_shapes`, layer by layer.
Multi-token-prediction depths (``model.layers.{L + d}.*`` for ``d < num_nextn_predict_layers``;
DeepSeek-V3 ships one at layer 61, Kimi K2 none) are not part of the logits; when a checkpoint
carries them complete, ``Model.forward(ids, return_mtp_logits=True)`` computes their draft
logits (:mod:`refimpl.mtp`): depth d holds ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and a MoE decoder layer (:func:`mtp_block`); its ``embed_tokens`` and
``shared_head.head``, when stored, must equal the main model's.

Incremental decoding (:func:`forward_step`, :mod:`refimpl.kv_cache`): every layer keeps one
:class:`~refimpl.kv_cache.KVCache` (span None) whose keys are ``c^{KV}`` ``(B, S, kv_lora_rank)``
after kv_a_layernorm and whose values are the roped ``k^R`` ``(B, S, qk_rope_head_dim)``, in
transformers' layout (de-interleaved when ``rope_interleave``): Dc + Dr numbers per token and
layer, nothing per head (transformers' ``DynamicLayer`` keeps the same two tensors as "keys"
``(B, 1, S, Dc)`` and "values" ``(B, 1, S, Dr)``). A fresh call (prefill, and :func:`forward`)
attends in the literal form (:func:`refimpl.mla.mla_attend_literal`: per-head keys and values
expanded through kv_b_proj, what transformers computes), so the golden logits are unchanged; a
call continuing a cache (decode, a chunked-prefill piece, a speculative verification) attends in
the absorbed form (:func:`refimpl.mla.mla_attend_absorbed`: q^C through W^{UK} into the latent
space, one shared key/value head over ``[c^{KV} ; k^R]`` and ``c^{KV}``, then W^{UV} and o_proj),
reading the cache exactly as stored, as inference engines decode (DeepSeek-V2 sec. 2.1.2; vLLM
``v1/attention/backends/mla/common.py`` uses the expanded form for prefill and the absorbed one
for decode). Both forms are equal up to rounding (~1e-15 relative in float64). The new tokens of
a call see the cached slots and each other causally (:func:`refimpl.kv_cache.visibility`, from
positions; bug class MLA-08). The MTP depths run over the whole sequence without a cache.

Quirks (spec sheet sec. 1.4): the router runs in float32 in transformers
(``gate.weight`` and the bias are kept float32 on load); group score = sum of the two
largest biased scores of the group; excluded experts are masked with -inf;
``+1e-20`` in the renormalisation; ``moe_layer_freq`` is ignored (refused unless 1);
``scoring_func`` / ``topk_method`` are informational (refused unless sigmoid /
noaux_tc, the only router transformers implements). ``num_key_value_heads`` must
equal ``num_attention_heads`` (transformers' eager attention breaks otherwise).

Notation: M hidden_size, N = B*T tokens, E n_routed_experts, k num_experts_per_tok;
MLA symbols in :mod:`refimpl.mla`.

Dtype: computed in the dtype of the weights (float64 or float32). transformers keeps
float32 islands (norm cores, RoPE tables, softmax, the whole router).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: DeepSeek-V3 Technical Report, arXiv:2412.19437, sec. 2.1.1 (MLA), sec. 2.1.2
(DeepSeekMoE with auxiliary-loss-free balancing, eqs. 12-16, node-limited routing),
sec. 4.2 (first three layers dense); DeepSeekMoE, arXiv:2401.06066 (shared experts);
Kimi K2, arXiv:2507.20534 (same architecture: 384 experts, 64 heads, one dense layer).
Checked against: transformers 5.24 ``models/deepseek_v3/modeling_deepseek_v3.py``
(``DeepseekV3TopkRouter`` 120-158, ``DeepseekV3Experts`` 161-198, ``DeepseekV3MoE``
201-222, ``DeepseekV3DecoderLayer`` 486-531, ``DeepseekV3Model`` 565-638,
``DeepseekV3ForCausalLM`` 641-715) and ``configuration_deepseek_v3.py`` (defaults 81-124).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture, MtpHook
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError
from ..experts import swiglu_expert
from ..kv_cache import KVCache, StepContext, extend_kv, fresh_context, visibility
from ..mla import (
    MlaDims, mla_attend_absorbed, mla_attend_literal, mla_dims, mla_project, mla_softmax_scale,
    mla_weight_shapes,
)
from ..mlp import activation, gated_mlp
from ..moe import dispatch, first_k_dense_schedule
from ..mtp import mtp_chain, mtp_layer
from ..numerics import as_float_array, check_finite_positive, compute_dtype, to_compute
from ..rmsnorm import rms_norm
from ..routers import router_logits, sigmoid_group_top_k
from ..rope import rope_frequencies
from ._expert_layout import MLP_EXPERTS, split_fused_experts
from ._llama_like import (
    ROPE_KEYS, decoder_layer_mtp_logits, num_key_value_heads, resolve_rope_parameters, run_decoder_step,
)

NAME = "DeepseekV3ForCausalLM"

#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Derived by DeepseekV3Config.__post_init__ (head_dim = qk_rope_head_dim,
    # qk_head_dim = qk_nope_head_dim + qk_rope_head_dim). A value in config.json replaces
    # it when transformers loads the file, and its RoPE then takes head_dim as the rotary
    # width: from_dict refuses a head_dim other than qk_rope_head_dim (and a qk_head_dim
    # other than the sum) instead of computing something transformers would not.
    "head_dim", "qk_head_dim",
    # Training-time or bookkeeping fields of the DeepSeek / Kimi configs.
    "output_router_logits", "pretraining_tp", "aux_loss_alpha", "seq_aux", "ep_size",
})
#: config.json keys read outside the dataclass fields (checked, then dropped).
_CHECKED_KEYS = frozenset({"scoring_func", "topk_method", "moe_layer_freq", "num_mtp_layers"})
#: What the informational router keys must say: the only router transformers implements.
_ROUTER_KEYS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
#: transformers' DeepseekV3Config class defaults (the DeepSeek-V3 release values).
_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 1,
}


@dataclass(frozen=True)
class DeepseekV3Config:
    """DeepSeek-V3 hyper-parameters; field names are the config.json keys.

    Defaults are transformers' ``DeepseekV3Config`` class defaults where config.json
    may omit a key. ``num_nextn_predict_layers`` (transformers' ``num_mtp_layers``)
    is the number of MTP depths a checkpoint may carry (``model.layers.{L + d}.*``), not part of
    the logits (:func:`mtp_forward` gives their draft logits). ``moe_layers`` is derived:
    one entry per layer, True where the layer is MoE (``l >= first_k_dense_replace``).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0},
                                  hash=False)
    rope_interleave: bool = True
    attention_bias: bool = False
    num_nextn_predict_layers: int = 1
    moe_layers: tuple[bool, ...] = ()

    @property
    def mla(self) -> MlaDims:
        """The attention widths as :class:`refimpl.mla.MlaDims`."""
        return mla_dims(num_attention_heads=self.num_attention_heads, q_lora_rank=self.q_lora_rank,
                        kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                        qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim)

    @classmethod
    def from_dict(cls, raw: dict) -> "DeepseekV3Config":
        """Build from a parsed config.json (``model_type`` deepseek_v3 or kimi_k2).

        Raises:
            ConfigError: missing, mistyped or out-of-range fields; key/value heads other
                than the query heads; expert groups that do not divide the experts or
                leave fewer than k experts; a router or layer schedule other than the
                one transformers implements; unsupported RoPE parameters.
        """
        heads = get_positive_int(raw, "num_attention_heads", _DEFAULTS["num_attention_heads"])
        layers = get_positive_int(raw, "num_hidden_layers", _DEFAULTS["num_hidden_layers"])
        dense = get_field(raw, "first_k_dense_replace", int, _DEFAULTS["first_k_dense_replace"])
        ints = {key: get_positive_int(raw, key, _DEFAULTS[key]) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "n_shared_experts",
            "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
            "topk_group", "num_experts_per_tok", "max_position_embeddings")}
        for key, derived in (("head_dim", ints["qk_rope_head_dim"]),
                             ("qk_head_dim", ints["qk_nope_head_dim"] + ints["qk_rope_head_dim"])):
            if key in raw and raw[key] is not None and raw[key] != derived:
                raise ConfigError(
                    f"config.json field '{key}' is {raw[key]!r}, but DeepSeek-V3 derives it as {derived} from "
                    "qk_rope_head_dim / qk_nope_head_dim; transformers would then use the stored value as the RoPE "
                    "width, which no released model does; refused")
        config = cls(
            **ints,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=num_key_value_heads(raw, heads, _DEFAULTS["num_key_value_heads"]),
            routed_scaling_factor=get_field(raw, "routed_scaling_factor", float, 2.5),
            q_lora_rank=_q_lora_rank(raw),
            first_k_dense_replace=dense,
            norm_topk_prob=get_field(raw, "norm_topk_prob", bool, True),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            rope_parameters=resolve_rope_parameters(raw, 10000.0, NAME),
            rope_interleave=get_field(raw, "rope_interleave", bool, True),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            num_nextn_predict_layers=_mtp_layers(raw),
            moe_layers=first_k_dense_schedule(layers, dense),
        )
        config._validate()
        _check_router_keys(raw)
        check_known_keys(raw, set(cls.__dataclass_fields__) | ROPE_KEYS | _CHECKED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"{NAME}: num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}): MLA expands one latent into every head (transformers' eager "
                "attention fails otherwise)")
        e, g = self.n_routed_experts, self.n_group
        if e % g or e // g < 2:
            raise ConfigError(f"{NAME}: n_group ({g}) must divide n_routed_experts ({e}) into groups of >= 2 "
                              "(the group score sums the two best experts of a group)")
        if self.topk_group > g:
            raise ConfigError(f"{NAME}: topk_group ({self.topk_group}) exceeds n_group ({g})")
        if self.num_experts_per_tok > self.topk_group * (e // g):
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                              f"{self.topk_group * (e // g)} experts of the kept groups (transformers would pick "
                              "masked experts)")
        check_finite_positive(f"{NAME}: routed_scaling_factor", self.routed_scaling_factor, error=ConfigError)
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"{NAME}: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        activation(self.hidden_act)
        self.mla  # widths (an odd qk_rope_head_dim is refused here)
        # Refuse bad or unsupported RoPE settings at load time, not at the first forward.
        rope_frequencies(self.rope_parameters, self.qk_rope_head_dim,
                         max_position_embeddings=self.max_position_embeddings)
        mla_softmax_scale(self.qk_nope_head_dim + self.qk_rope_head_dim, self.rope_parameters)


def _q_lora_rank(raw: dict) -> int | None:
    """``q_lora_rank``: null means no query compression (``q_proj``); absent means 1536."""
    value = get_field(raw, "q_lora_rank", int, _DEFAULTS["q_lora_rank"], nullable=True)
    if value is not None and value < 1:
        raise ConfigError(f"config.json field 'q_lora_rank' must be a positive integer or null, got {value}")
    return value


def _mtp_layers(raw: dict) -> int:
    """``num_nextn_predict_layers`` (or its transformers alias ``num_mtp_layers``), >= 0."""
    key = "num_nextn_predict_layers" if "num_nextn_predict_layers" in raw else "num_mtp_layers"
    value = get_field(raw, key, int, _DEFAULTS["num_nextn_predict_layers"])
    if value < 0:
        raise ConfigError(f"config.json field '{key}' must be >= 0, got {value}")
    return value


def _check_router_keys(raw: dict) -> None:
    """Refuse informational keys that ask for a router or schedule transformers does not implement."""
    for key, expected in _ROUTER_KEYS.items():
        if key in raw and raw[key] != expected:
            raise ConfigError(f"{NAME}: {key}={raw[key]!r} is not supported: transformers hard-codes the "
                              f"{expected} router (DeepSeek-V3 / Kimi K2)")
    if raw.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{NAME}: moe_layer_freq={raw['moe_layer_freq']!r} is not supported (transformers "
                          "ignores it and makes every layer from first_k_dense_replace on MoE)")


def _as_config(config) -> DeepseekV3Config:
    if isinstance(config, DeepseekV3Config):
        return config
    if isinstance(config, dict):
        return DeepseekV3Config.from_dict(config)
    raise ConfigError(f"{NAME}: config must be a config.json dict or a DeepseekV3Config, got {type(config).__name__}")


# Weights

def _gated_mlp_shapes(prefix: str, m: int, f: int) -> dict:
    return {f"{prefix}.gate_proj.weight": (f, m), f"{prefix}.up_proj.weight": (f, m),
            f"{prefix}.down_proj.weight": (m, f)}


def moe_checkpoint_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """The MoE block's checkpoint tensors (relative to ``mlp.``): router, per-expert matrices, shared MLP."""
    m, i, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    shapes = {"gate.weight": (e, m), "gate.e_score_correction_bias": (e,)}
    for expert in range(e):
        shapes.update(_gated_mlp_shapes(f"experts.{expert}", m, i))
    shapes.update(_gated_mlp_shapes("shared_experts", m, i * config.n_shared_experts))
    return shapes


def moe_module_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """The MoE block's tensors as transformers' ``DeepseekV3MoE`` state dict holds them (see :func:`moe_block`)."""
    m, i, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    return {"gate.weight": (e, m), "gate.e_score_correction_bias": (e,), "experts.gate_up_proj": (e, 2 * i, m),
            "experts.down_proj": (e, m, i), **_gated_mlp_shapes("shared_experts", m, i * config.n_shared_experts)}


def layer_shapes(config: DeepseekV3Config, moe: bool) -> dict[str, tuple[int, ...]]:
    """Tensors of one decoder layer, relative to ``model.layers.{l}.``."""
    m = config.hidden_size
    shapes = {"input_layernorm.weight": (m,), "post_attention_layernorm.weight": (m,)}
    shapes.update({f"self_attn.{k}": s for k, s in mla_weight_shapes(m, config.mla, config.attention_bias).items()})
    if moe:
        shapes.update({f"mlp.{k}": s for k, s in moe_checkpoint_shapes(config).items()})
    else:
        shapes.update(_gated_mlp_shapes("mlp", m, config.intermediate_size))
    return shapes


def weight_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape (``lm_head.weight`` absent when tied)."""
    v, m = config.vocab_size, config.hidden_size
    shapes = {"model.embed_tokens.weight": (v, m), "model.norm.weight": (m,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, m)
    for layer, moe in enumerate(config.moe_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in layer_shapes(config, moe).items()})
    return shapes


def optional_weights(config: DeepseekV3Config) -> dict[str, str]:
    """A tied checkpoint may still carry ``lm_head.weight`` equal to the embedding."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


def ignored_weights(config: DeepseekV3Config) -> tuple[str, ...]:
    """Name prefixes of the ``num_nextn_predict_layers`` multi-token-prediction modules
    (``model.layers.{L + d}.``): present in DeepSeek-V3 checkpoints, unused by the logits."""
    return tuple(f"model.layers.{config.num_hidden_layers + d}." for d in range(config.num_nextn_predict_layers))


def mtp_weight_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """The tensors of the ``num_nextn_predict_layers`` MTP depths: per depth ``model.layers.{L + d}.``
    ``enorm`` / ``hnorm`` ``(M,)``, ``eh_proj`` ``(M, 2M)``, ``shared_head.norm`` ``(M,)`` and a
    MoE decoder layer (per-expert tensors, as published)."""
    m = config.hidden_size
    per_depth = {"enorm.weight": (m,), "hnorm.weight": (m,), "eh_proj.weight": (m, 2 * m),
                 "shared_head.norm.weight": (m,), **layer_shapes(config, moe=True)}
    return {f"{prefix}{k}": s for prefix in ignored_weights(config) for k, s in per_depth.items()}


def mtp_copies(config: DeepseekV3Config) -> dict[str, str]:
    """The per-depth copies of the shared embedding and head a published checkpoint may store."""
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    copies = {}
    for prefix in ignored_weights(config):
        copies.update({f"{prefix}embed_tokens.weight": "model.embed_tokens.weight",
                       f"{prefix}shared_head.head.weight": head})
    return copies


def convert_weights(config: DeepseekV3Config, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with MoE layers saved in transformers' fused layout split into per-expert tensors
    (:func:`refimpl.models._expert_layout.split_fused_experts`; CheckpointError for a mixed layer).
    The MTP depths' layers (``model.layers.{L + d}``) are MoE layers too."""
    depths = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    layers = [layer for layer, moe in enumerate(config.moe_layers) if moe] + list(depths)
    shape = (config.n_routed_experts, config.moe_intermediate_size, config.hidden_size)
    return split_fused_experts(weights, layers, MLP_EXPERTS, shape)


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-generator draws for what the default rule draws badly.

    ``e_score_correction_bias`` (zero-initialised in transformers, 1 + 0.2 N by the
    default 1-D rule) is drawn ``-0.6 + 0.3 N``: mostly negative, so that a group
    mask filled with 0 instead of -inf lets excluded experts win (MOE-02/03), and
    varied enough to change which experts win (MOE-01).
    """
    if name.endswith("e_score_correction_bias"):
        return -0.6 + 0.3 * rng.standard_normal(shape)
    return None


def moe_module_weights(p: dict[str, np.ndarray], config: DeepseekV3Config) -> dict[str, np.ndarray]:
    """A layer's checkpoint MoE tensors (``mlp.``-prefixed, per expert) in the module layout of :func:`moe_block`.

    ``experts.gate_up_proj[e]`` = ``[gate_proj; up_proj]`` of expert e (rows), as
    transformers' checkpoint conversion stacks them.
    """
    experts = range(config.n_routed_experts)
    return {
        "gate.weight": p["mlp.gate.weight"],
        "gate.e_score_correction_bias": p["mlp.gate.e_score_correction_bias"],
        "experts.gate_up_proj": np.stack([np.concatenate(
            [p[f"mlp.experts.{e}.gate_proj.weight"], p[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts]),
        "experts.down_proj": np.stack([p[f"mlp.experts.{e}.down_proj.weight"] for e in experts]),
        **{f"shared_experts.{k}_proj.weight": p[f"mlp.shared_experts.{k}_proj.weight"] for k in ("gate", "up", "down")},
    }


def _check_moe_weights(weights: dict, config: DeepseekV3Config, dtype) -> dict[str, np.ndarray]:
    """The tensors of :func:`moe_module_shapes`, checked (names, shapes, float dtype)."""
    if not isinstance(weights, dict):
        raise ShapeError(f"moe_block: weights must be a dict of arrays, got {type(weights).__name__}")
    shapes = moe_module_shapes(config)
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing:
        raise MissingWeightsError(f"moe_block: weights lack {', '.join(missing)}")
    if unexpected:
        raise UnexpectedWeightsError(f"moe_block: unexpected weights {', '.join(unexpected)}")
    checked = {k: as_float_array(f"moe_block: {k}", weights[k]) for k in shapes}
    for name, shape in shapes.items():
        if checked[name].shape != shape:
            raise ShapeError(f"moe_block: {name} has shape {checked[name].shape}, the config needs {shape}")
        # The router's tensors may be float32 beside float16 / bfloat16 hidden states (ARCHITECTURE.float32_weights).
        router_float32 = name in ROUTER_WEIGHTS and checked[name].dtype == compute_dtype(dtype)
        if checked[name].dtype != dtype and not router_float32:
            raise ShapeError(f"moe_block: {name} is {checked[name].dtype}, hidden_states are {np.dtype(dtype)}")
    return checked


#: The router's tensors (names in the MoE block), which transformers keeps in float32.
ROUTER_WEIGHTS = ("gate.weight", "gate.e_score_correction_bias")


# Blocks

def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """DeepSeek-V3's sparse MoE block: routed experts plus the shared expert MLP.

    Args:
        hidden_states: ``(B, T, M)`` after post_attention_layernorm.
        weights: transformers' ``DeepseekV3MoE`` state-dict names: ``"gate.weight"`` (E, M),
            ``"gate.e_score_correction_bias"`` (E,), ``"experts.gate_up_proj"`` (E, 2I, M),
            ``"experts.down_proj"`` (E, M, I), ``"shared_experts.{gate,up,down}_proj.weight"``.
        config: a config.json dict or a :class:`DeepseekV3Config`.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Dtype: router logits, sigmoid and weights in the compute dtype (transformers: float32).

    Raises:
        ConfigError: bad config. InputError, ShapeError: bad arrays.
        MissingWeightsError / UnexpectedWeightsError: weight names do not match.

    Paper: arXiv:2412.19437, sec. 2.1.2, eqs. 12-16.
    Checked against: transformers 5.24 ``DeepseekV3MoE.forward`` (modeling_deepseek_v3.py:215-222).
    """
    config = _as_config(config)
    x = as_float_array("moe_block: hidden_states", hidden_states, ndim=3)
    w = _check_moe_weights(weights, config, x.dtype)
    tokens = x.reshape(-1, x.shape[-1])
    # Eqs. 13-16: affinities, biased group-limited top-k, unbiased (renormalised, scaled) weights.
    routing, chosen = sigmoid_group_top_k(
        router_logits(tokens, w["gate.weight"]), to_compute(w["gate.e_score_correction_bias"]),
        top_k=config.num_experts_per_tok,
        n_group=config.n_group, topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor)
    gate_up, down = w["experts.gate_up_proj"], w["experts.down_proj"]
    routed = dispatch(tokens, routing, chosen,
                      lambda e, rows: swiglu_expert(rows, gate_up[e], down[e], config.hidden_act),
                      config.n_routed_experts)
    # Eq. 12: the shared experts see every token, unweighted and unscaled.
    shared = gated_mlp(tokens, w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"],
                       w["shared_experts.down_proj.weight"], config.hidden_act)
    return (routed + shared).reshape(x.shape)


def mla_params(config: DeepseekV3Config) -> dict:
    """The keyword arguments of :func:`refimpl.mla.mla_project` taken from the config."""
    return dict(
        num_attention_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        rope_parameters=config.rope_parameters, rope_interleave=config.rope_interleave,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        attention_bias=config.attention_bias)


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: DeepseekV3Config, context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """MLA on normalised ``x`` ``(B, T, M)`` for one call's tokens.

    The layer's cache holds ``c^{KV}`` ``(B, S, Dc)`` as its keys and the roped ``k^R``
    ``(B, S, Dr)`` as its values (span None). The new tokens see the cached slots and, causally,
    each other (:func:`refimpl.kv_cache.visibility`, from positions).

    Returns:
        ``(B, T, M)`` and the layer's cache for the next call.
    """
    attn = {k[len("self_attn."):]: v for k, v in p.items() if k.startswith("self_attn.")}
    step = mla_project(x, context.positions, attn, **mla_params(config))
    cache = context.layer_cache(layer)
    visible, kept = extend_kv(cache, step.c_kv, step.k_rope, context)
    mask = visibility(context, visible)
    # A fresh call expands per-head keys and values (the definition, what transformers runs); a call
    # continuing a cache attends in the latent space over the cached slots (absorbed, as inference engines do).
    attend = mla_attend_literal if cache is None else mla_attend_absorbed
    return attend(step, visible.keys, visible.values, mask), kept


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: DeepseekV3Config, context: StepContext, layer: int,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm layer: MLA, then the dense MLP or the MoE block (as ``moe_layers[layer]``
    says), each with a residual; returns the new ``h`` and the layer's cache."""
    return pre_norm_layer(h, p, config, context, layer, moe=config.moe_layers[layer])


def pre_norm_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: DeepseekV3Config, context: StepContext, layer: int, *,
    moe: bool,
) -> tuple[np.ndarray, KVCache]:
    """MLA then the MoE block (``moe``) or the dense MLP, pre-norm, each with a residual."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, context, layer)
    h = h + attended
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps)
    if moe:
        return h + moe_block(x, moe_module_weights(p, config), config), kept
    return h + gated_mlp(x, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"], p["mlp.down_proj.weight"],
                         config.hidden_act), kept


def mtp_block(h: np.ndarray, p: dict[str, np.ndarray], config: DeepseekV3Config) -> np.ndarray:
    """TRM_k of an MTP depth: a MoE decoder layer (MLA at positions 0..T'-1, then the MoE block).

    Always MoE: the published depth (layer 61) is one, transformers builds MTP layers with
    ``first_k_dense_replace = 0`` (``configuration_utils.py`` ``get_mtp_config``) and vLLM by its
    index ``L + d >= first_k_dense_replace``. Run over the whole sequence, without a cache.
    """
    return pre_norm_layer(h, p, config, fresh_context(*h.shape[:2]), 0, moe=True)[0]


def mtp_depth(
    hidden_states: np.ndarray, next_token_embeddings: np.ndarray, weights: dict[str, np.ndarray], config,
) -> np.ndarray:
    """One MTP depth (:func:`refimpl.mtp.mtp_layer` with :func:`mtp_block`): ``h^k`` ``(B, T', M)``.

    Args:
        hidden_states: ``h^{k-1}`` ``(B, T', M)``. next_token_embeddings: ``E[t_{i+k}]`` ``(B, T', M)``.
        weights: the depth's tensors relative to ``model.layers.{L + k - 1}.`` (per-expert, as
            published): ``enorm.weight``, ``hnorm.weight``, ``eh_proj.weight``,
            ``shared_head.norm.weight``, ``input_layernorm.weight``, ``self_attn.*``, ...
        config: a config.json dict or a :class:`DeepseekV3Config`.

    Raises:
        ConfigError: bad config. InputError, ShapeError, MissingWeightsError: bad arrays or names.
    """
    config = _as_config(config)
    missing = sorted(set(layer_shapes(config, moe=True)) - set(weights))
    if missing:
        raise MissingWeightsError(f"mtp_layer: weights lack {', '.join(missing[:4])}"
                                  f"{' and more' if len(missing) > 4 else ''}")
    return mtp_layer(hidden_states, next_token_embeddings, weights, rms_norm_eps=config.rms_norm_eps,
                     block=lambda x: mtp_block(x, weights, config))


def mtp_forward(
    weights: dict[str, np.ndarray], config: DeepseekV3Config, input_ids: np.ndarray, main_hidden: np.ndarray,
) -> list[np.ndarray]:
    """Draft logits of the MTP depths k = 1..D, ``(B, T-k, V)`` each
    (:func:`._llama_like.decoder_layer_mtp_logits` with this model's :func:`mtp_depth`).

    Args:
        weights: the main model's and the MTP depths' tensors (:func:`mtp_weight_shapes`).
        main_hidden: the main model's final-normed hidden state ``(B, T, M)`` (tap ``"norm"``).
    """
    return decoder_layer_mtp_logits(weights, config, input_ids, main_hidden, mtp_depth, mtp_chain)


def forward_step(
    weights: dict[str, np.ndarray], config: DeepseekV3Config, input_ids: np.ndarray, context: StepContext,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits (B, T, V), taps, caches)``; taps ``"embed"``, ``"layers.{l}"`` (output of
        layer l), ``"norm"`` (final-normalised), each ``(B, T, M)``, in that order; one
        :class:`refimpl.kv_cache.KVCache` of ``c^{KV}`` / ``k^R`` per layer.
    """
    return run_decoder_step(weights, config, input_ids, context,
                            lambda h, p, layer: decoder_layer(h, p, config, context, layer))


def forward(
    weights: dict[str, np.ndarray], config: DeepseekV3Config, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _release(**fields) -> dict:
    """A DeepSeek-V3-family config.json with the fields that carry math (no quantization_config)."""
    base = {
        "architectures": [NAME], "model_type": "deepseek_v3", "attention_bias": False, "hidden_act": "silu",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    base.update(fields)
    return base


#: Published flagship configs (config.json values that carry math). Sources: the
#: config.json of deepseek-ai/DeepSeek-V3 (identical architecture fields in DeepSeek-V3-0324
#: and DeepSeek-R1) and of moonshotai/Kimi-K2-Instruct (July 2025), as tabulated in
#: shared/spec/moe-architectures.md sec. 1.1; transformers' DeepseekV3Config defaults equal
#: the V3 values except max_position_embeddings and RoPE. Kimi's model_type "kimi_k2" is
#: not registered in transformers; Moonshot's deployment guide loads it as deepseek_v3.
PRESETS = {
    "DeepSeek-V3": _release(
        vocab_size=129280, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_group=8,
        topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5, max_position_embeddings=163840,
        rope_theta=10000, num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "Kimi-K2-Instruct": _release(
        model_type="kimi_k2", vocab_size=163840, num_attention_heads=64, num_key_value_heads=64,
        n_routed_experts=384, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
        max_position_embeddings=131072, rope_theta=50000.0, num_nextn_predict_layers=0,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=DeepseekV3Config,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=optional_weights,
    presets=PRESETS,
    citations=(
        "DeepSeek-AI, DeepSeek-V3 Technical Report, arXiv:2412.19437",
        "DeepSeek-AI, DeepSeek-V2, arXiv:2405.04434 (MLA)",
        "Kimi Team, Kimi K2: Open Agentic Intelligence, arXiv:2507.20534",
        "transformers 5.24 models/deepseek_v3/modeling_deepseek_v3.py, configuration_deepseek_v3.py",
    ),
    weight_init=weight_init,
    ignored_weights=ignored_weights,
    convert_weights=convert_weights,
    mtp=MtpHook(weight_shapes=mtp_weight_shapes, prefixes=ignored_weights, copies=mtp_copies, forward=mtp_forward),
    # transformers' DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict.
    float32_weights=tuple(f"mlp.{name}" for name in ROUTER_WEIGHTS),
)
