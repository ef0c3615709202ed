"""Qwen3-Next (``Qwen3NextForCausalLM``): Gated DeltaNet and gated attention layers, a 512-expert MoE.

Forward pass, pre-norm, per layer l of type tau_l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm1p(h; input_layernorm)
    h   = h + GatedDeltaNet(x; linear_attn.*)     tau_l = "linear_attention"
    h   = h + GatedAttention(x; self_attn.*)      tau_l = "full_attention"
    x   = RMSNorm1p(h; post_attention_layernorm)
    h   = h + MoE(x)         if is_moe[l]   (sparse block with a gated shared expert, below)
    h   = h + SwiGLU_F(x)    otherwise      (dense MLP of width intermediate_size)
    logits = RMSNorm1p(h_L; norm) W_lm^T      (W_lm = E when tie_word_embeddings)

``RMSNorm1p`` is the zero-centred RMSNorm with gain ``1 + w`` (the checkpoint stores
the offset w, initialised to 0), for the input, post-attention, final, q and k norms;
only the Gated DeltaNet's output norm uses a plain w. GatedDeltaNet is
:func:`refimpl.linear_attention.gated_deltanet.gated_deltanet_step` (chunked delta rule,
C = 64, by default; ``chunk_size=None`` runs the recurrent form, equal up to rounding),
GatedAttention is :func:`refimpl.gated_attention.gated_attention_step` (q_proj split
per head into query and sigmoid output gate, partial RoPE, causal GQA).

Sparse MoE block (:func:`moe_block`), on the N = B*T rows of x::

    p  = softmax(x W_g^T)                       (N, E)  over all E experts
    i  = top-k(p);  w = p[i] / sum(p[i]) if norm_topk_prob else p[i]
    y  = sum_j w_j * down_e( silu(gate_e x) * up_e x ),  e = i_j     experts of width moe_intermediate_size
       + sigmoid(x w_sg) * SharedMLP(x)         w_sg = shared_expert_gate (1, M): one scalar per token;
                                                SharedMLP of width shared_expert_intermediate_size

Schedules, resolved once in :class:`Qwen3NextConfig`:

* ``layer_types``: config.json's list when present; otherwise layer l is
  ``"full_attention"`` iff ``(l + 1) % full_attention_interval == 0`` (default 4: layers
  3, 7, 11, ...; every other layer ``"linear_attention"``). ``full_attention_interval``
  is ignored when ``layer_types`` is given.
* ``is_moe[l] = l not in mlp_only_layers and num_experts > 0 and (l + 1) %
  decoder_sparse_step == 0`` (:func:`refimpl.moe.sparse_step_schedule`).

RoPE (``rope_parameters``): a legacy ``rope_scaling`` dict replaces ``rope_parameters``;
``rope_theta`` defaults to the top-level key, then 10000 (the class declares no
default theta; released models set 1e7); ``partial_rotary_factor`` inside the dict wins,
else the top-level key, else 0.25. An explicit top-level ``"partial_rotary_factor":
null`` leaves the dict without a factor, and transformers then rotates all D channels
(``compute_default_rope_parameters`` reads ``.get("partial_rotary_factor", 1.0)``).

Notation: M hidden_size, F intermediate_size, I moe_intermediate_size, Is
shared_expert_intermediate_size, E num_experts, k num_experts_per_tok, H / Hkv / D
(gated attention), Hk / Hv / d_k / d_v / K (Gated DeltaNet: ``linear_num_key_heads``,
``linear_num_value_heads``, ``linear_key_head_dim``, ``linear_value_head_dim``,
``linear_conv_kernel_dim``), C chunk size. ``head_dim`` (256 released) is its own field
and need not equal M / H.

Checkpoint layout: the published checkpoints and ``save_pretrained`` store one matrix per
expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight``; the shared expert is
``mlp.shared_expert.{gate,up,down}_proj.weight`` and its gate ``mlp.shared_expert_gate.weight``
(1, M); the router ``mlp.gate.weight`` (E, M). ``save_pretrained(save_original_format=False)``
writes fused ``mlp.experts.gate_up_proj`` / ``down_proj`` stacks, split back by
:func:`convert_weights`. The multi-token-prediction module ``mtp.*`` of the released
checkpoints is dropped unread by the main model (:func:`ignored_weights`), as transformers does;
when complete, ``Model.forward(ids, return_mtp_logits=True)`` gives its draft logits
(:func:`mtp_forward`: ``mtp.fc`` over ``[pre_fc_norm_embedding(e); pre_fc_norm_hidden(h)]``, one
full-attention decoder layer ``mtp.layers.0``, ``mtp.norm``, the main head; ``refimpl.mtp``).

Incremental decoding (:func:`forward_step`; ``forward`` is one fresh step): a
``full_attention`` layer keeps a :class:`refimpl.kv_cache.KVCache` of every key (after
k_norm and partial RoPE, at the token's position) and value; a ``linear_attention`` layer
keeps a :class:`refimpl.linear_attention.gated_deltanet.GatedDeltaNetCache`: the state S
``(B, Hv, d_k, d_v)``, the last K-1 conv inputs ``(B, conv_dim, K-1)``, and what a rollback
needs to recompute both over an accepted prefix of the last call (MTP-03). A call of one
token after a cache runs the recurrent delta rule, any other call the chunked one (as
transformers). Left padding: pad slots are masked out of attention by position, and the
Gated DeltaNet layers zero their hidden states (transformers' ``apply_mask_to_padding_states``),
so a left-padded row gives the logits of the row alone. The MTP module
(``return_mtp_logits``) stays a whole-sequence path.

Dtype: computed in the dtype of the weights (float64 or float32). transformers keeps
float32 islands in float64 models: every RMSNorm core, RoPE cos/sin, the eager softmax,
the router softmax, ``A_log.float()`` / ``a.float()`` and the whole gated-delta core.
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Qwen3-Next model card and blog, "Qwen3-Next: Towards Ultimate Training & Inference
Efficiency" (Qwen team, Sept. 2025): hybrid 3:1 Gated DeltaNet / gated attention, 512
experts with 10 routed + 1 shared, zero-centred weight-decayed layernorm, MTP; Gated
DeltaNet, arXiv:2412.06464; gated attention, arXiv:2505.06708.
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
(``Qwen3NextExperts`` 789-825, ``Qwen3NextTopKRouter`` 828-846, ``Qwen3NextSparseMoeBlock``
849-868, ``Qwen3NextDecoderLayer`` 871-937, ``Qwen3NextPreTrainedModel`` 940-972,
``Qwen3NextModel.forward`` 992-1050) and ``configuration_qwen3_next.py`` (defaults 91-124,
``__post_init__`` 126-136).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np

from ..architecture import Architecture, MtpHook
from ..config import check_known_keys, get_field, get_positive_int
from ..embedding import embed_tokens, lm_head
from ..errors import ConfigError, MissingWeightsError
from ..experts import swiglu_expert
from ..gated_attention import gated_attention_step, gated_attention_weight_shapes
from ..kv_cache import StepContext, fresh_context
from ..linear import linear
from ..linear_attention.gated_deltanet import gated_deltanet_step, gated_deltanet_weight_shapes
from ..mlp import gated_mlp
from ..moe import dispatch, sparse_step_schedule
from ..mtp import mtp_chain, mtp_layer
from ..numerics import to_compute, to_storage
from ..rmsnorm import rms_norm
from ..rope import rope_cos_sin, rope_frequencies
from ..routers import router_logits, softmax_top_k
from ._expert_layout import MLP_EXPERTS, split_fused_experts
from ._llama_like import decoder_weight_shapes, gated_mlp_block, layer_weights, mlp_weight_shapes, tied_head
from .qwen3_moe import check_moe_weights, checkpoint_expert, expert_weight_shapes

NAME = "Qwen3NextForCausalLM"

LAYER_TYPES = ("linear_attention", "full_attention")
#: ``Qwen3NextConfig`` declares no ``default_theta``: the mixin's 10000 applies.
DEFAULT_ROPE_THETA = 10000.0
#: ``Qwen3NextConfig.__post_init__`` ``setdefault``s this top-level factor.
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.25
#: Chunk size of the delta rule in the reference forward (transformers' ``torch_chunk_gated_delta_rule``).
DEFAULT_CHUNK_SIZE = 64
#: Gated DeltaNet head parameters, passed through to :func:`gated_deltanet_step` by these config names.
GDN_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim")

#: config.json keys deliberately without effect here, and why.
IGNORED_KEYS = frozenset({
    # training-only: the load-balancing loss
    "output_router_logits", "router_aux_loss_coef",
})
#: config.json keys read while resolving RoPE (not dataclass fields).
_ROPE_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"})


@dataclass(frozen=True)
class Qwen3NextConfig:
    """Qwen3-Next hyper-parameters; field names are the config.json keys.

    Defaults are transformers' ``Qwen3NextConfig`` class defaults (those of the 80B
    except ``intermediate_size`` 5632, ``max_position_embeddings`` 32768 and the RoPE
    base), used where config.json omits a key. Resolved here: ``rope_parameters`` (one
    flat dict, with ``partial_rotary_factor``), ``layer_types`` and ``is_moe`` (one entry
    per layer), ``mlp_only_layers`` (a tuple; null means none).
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA,
                                                           "partial_rotary_factor": DEFAULT_PARTIAL_ROTARY_FACTOR},
                                  hash=False)
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    full_attention_interval: int = 4
    layer_types: tuple[str, ...] = ()
    is_moe: tuple[bool, ...] = ()
    #: MTP depths config.json declares (``mtp.*``; not part of the logits). Draft logits only for
    #: 0 or 1 (:func:`mtp_weight_shapes`); a larger count leaves the main model usable.
    num_nextn_predict_layers: int = 1

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen3NextConfig":
        """Build from a parsed config.json.

        Raises:
            ConfigError: mistyped or out-of-range fields (a null where transformers'
                strict config wants an integer included); heads that do not divide (H by
                Hkv, Hv by Hk); a top-k outside ``1..num_experts``; bad ``layer_types``,
                ``full_attention_interval`` or ``mlp_only_layers``; an activation other
                than silu; an unsupported RoPE type or rotary width; ``attn_output_gate``
                false (see :func:`_check_output_gate_flag`).
        """
        layers = get_positive_int(raw, "num_hidden_layers", 48)
        interval = get_positive_int(raw, "full_attention_interval", 4)
        experts = get_field(raw, "num_experts", int, 512)
        step = get_positive_int(raw, "decoder_sparse_step", 1)
        mlp_only = _mlp_only_layers(raw)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", 151936),
            hidden_size=get_positive_int(raw, "hidden_size", 2048),
            intermediate_size=get_positive_int(raw, "intermediate_size", 5632),
            num_hidden_layers=layers,
            num_attention_heads=get_positive_int(raw, "num_attention_heads", 16),
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 2),
            head_dim=get_positive_int(raw, "head_dim", 256),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 32768),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            rope_parameters=resolve_rope_parameters(raw),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            **{key: get_positive_int(raw, key, default) for key, default in zip(GDN_KEYS, (16, 32, 128, 128, 4))},
            num_experts=experts,
            num_experts_per_tok=get_positive_int(raw, "num_experts_per_tok", 10),
            moe_intermediate_size=get_positive_int(raw, "moe_intermediate_size", 512),
            shared_expert_intermediate_size=get_positive_int(raw, "shared_expert_intermediate_size", 512),
            norm_topk_prob=get_field(raw, "norm_topk_prob", bool, True),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(mlp_only),
            full_attention_interval=interval,
            layer_types=_layer_types(raw, layers, interval),
            is_moe=sparse_step_schedule(layers, step, mlp_only, max(experts, 0)),
            num_nextn_predict_layers=_mtp_depths(raw),
        )
        config._validate()
        _check_output_gate_flag(raw)
        used = set(cls.__dataclass_fields__) - {"is_moe"} | _ROPE_KEYS | {"attn_output_gate"}
        check_known_keys(raw, used, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"{NAME}: linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                              f"linear_num_key_heads ({self.linear_num_key_heads})")
        if not np.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ConfigError(f"{NAME}: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        if self.num_experts < 0:
            raise ConfigError(f"{NAME}: num_experts must be >= 0, got {self.num_experts}")
        if any(self.is_moe) and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        # The Gated DeltaNet's conv and gated norm are SiLU whatever the config says; so must the MLPs be.
        if self.hidden_act != "silu":
            raise ConfigError(f"{NAME}: hidden_act={self.hidden_act!r} is not supported (Qwen3-Next uses 'silu')")
        # Refuses an unsupported RoPE type or rotary width at load time, naming the key.
        rope_frequencies(self.rope_parameters, self.head_dim, max_position_embeddings=self.max_position_embeddings)

    @property
    def gated_deltanet_dims(self) -> dict[str, int]:
        """The Gated DeltaNet head parameters, by the keyword names of :func:`gated_deltanet_step`."""
        return {key: getattr(self, key) for key in GDN_KEYS}


def resolve_rope_parameters(raw: dict) -> dict:
    """The flat ``rope_parameters`` transformers ends up with for Qwen3-Next.

    A non-empty legacy ``rope_scaling`` replaces ``rope_parameters``; ``rope_theta``,
    ``rope_type`` and ``partial_rotary_factor`` inside the dict win over the top-level
    keys (``convert_rope_params_to_dict`` only ``setdefault``s them); the top-level
    factor defaults to 0.25, and an explicit null there adds none (full rotary).

    Raises:
        ConfigError: the fields are not objects / numbers; the RoPE type and the rotary
            width are refused later by :func:`refimpl.rope.rope_frequencies`.
    """
    for key in ("rope_parameters", "rope_scaling"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json field '{key}' must be an object or null, got {value!r}")
    chosen = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    chosen.setdefault("rope_theta", get_field(raw, "rope_theta", float, DEFAULT_ROPE_THETA))
    chosen.setdefault("rope_type", chosen.get("type", "default"))
    factor = get_field(raw, "partial_rotary_factor", float, DEFAULT_PARTIAL_ROTARY_FACTOR, nullable=True)
    if factor is not None:
        chosen.setdefault("partial_rotary_factor", factor)
    return chosen


def _layer_types(raw: dict, layers: int, interval: int) -> tuple[str, ...]:
    """One token-mixer type per layer: ``layer_types``, else full attention iff ``(l + 1) % interval == 0``.

    Raises:
        ConfigError: ``layer_types`` of the wrong length or with entries other than
            linear_attention / full_attention.
    """
    types = raw.get("layer_types")
    if types is None:
        return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    return tuple(types)


def _mlp_only_layers(raw: dict) -> list[int]:
    """``mlp_only_layers`` as a list (null or absent means none); entries checked by the schedule."""
    value = raw.get("mlp_only_layers")
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"config.json field 'mlp_only_layers' must be a list of layer indices, got {value!r}")
    return value


def _check_output_gate_flag(raw: dict) -> None:
    """Refuse ``"attn_output_gate": false``.

    transformers' Qwen3-Next has no such field (it always gates; the key would be kept as
    an unread attribute), while vLLM's reads it (default true) and drops the gate when
    false: the two disagree, so the config is refused rather than guessed.
    """
    flag = get_field(raw, "attn_output_gate", bool, True)
    if not flag:
        raise ConfigError(f"{NAME}: attn_output_gate=false is not supported (transformers ignores the key and "
                          "always gates the attention output; vLLM drops the gate)")


def moe_module_shapes(config: Qwen3NextConfig) -> dict[str, tuple[int, ...]]:
    """``Qwen3NextSparseMoeBlock``'s state dict (module-relative names) with shapes."""
    e, m = config.num_experts, config.hidden_size
    i, s = config.moe_intermediate_size, config.shared_expert_intermediate_size
    return {
        "gate.weight": (e, m), "experts.gate_up_proj": (e, 2 * i, m), "experts.down_proj": (e, m, i),
        "shared_expert.gate_proj.weight": (s, m), "shared_expert.up_proj.weight": (s, m),
        "shared_expert.down_proj.weight": (m, s), "shared_expert_gate.weight": (1, m),
    }


def layer_shapes(config: Qwen3NextConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of decoder layer ``layer`` (names relative to ``model.layers.{layer}.``)."""
    m = config.hidden_size
    if config.layer_types[layer] == "linear_attention":
        gdn = gated_deltanet_weight_shapes(m, **config.gated_deltanet_dims)
        mixer = {f"linear_attn.{k}": s for k, s in gdn.items()}
    else:
        mixer = {f"self_attn.{k}": s for k, s in gated_attention_weight_shapes(
            m, num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, attention_bias=config.attention_bias).items()}
    if config.is_moe[layer]:
        s = config.shared_expert_intermediate_size
        ffn = {**expert_weight_shapes(m, config.moe_intermediate_size, config.num_experts),
               "mlp.shared_expert.gate_proj.weight": (s, m), "mlp.shared_expert.up_proj.weight": (s, m),
               "mlp.shared_expert.down_proj.weight": (m, s), "mlp.shared_expert_gate.weight": (1, m)}
    else:
        ffn = mlp_weight_shapes(m, config.intermediate_size, bias=False)
    return {"input_layernorm.weight": (m,), **mixer, "post_attention_layernorm.weight": (m,), **ffn}


def weight_shapes(config: Qwen3NextConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape (``lm_head.weight`` absent when tied)."""
    shapes = decoder_weight_shapes(config, {})
    for layer in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in layer_shapes(config, layer).items()})
    return shapes


def ignored_weights(config: Qwen3NextConfig) -> tuple[str, ...]:
    """The multi-token-prediction module ``mtp.*`` of the released checkpoints, unused by the logits
    (transformers: ``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``)."""
    return ("mtp.",)


def convert_weights(config: Qwen3NextConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with MoE layers saved in transformers' fused layout split into per-expert tensors
    (:func:`refimpl.models._expert_layout.split_fused_experts`; CheckpointError for a mixed layer)."""
    layers = [layer for layer, moe in enumerate(config.is_moe) if moe]
    shape = (config.num_experts, config.moe_intermediate_size, config.hidden_size)
    return split_fused_experts(weights, layers, MLP_EXPERTS, shape)


#: Zero-centred (1 + w) norms, whose stored weight is an offset from 1.
_OFFSET_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight", "model.norm.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight",
                 "mtp.pre_fc_norm_hidden.weight")


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-generator draws for what the default rule draws badly.

    * The ``1 + w`` norms: ``0.2 N``, small offsets around transformers' zero init (the
      default ``1 + 0.2 N`` would make the gain about 2, and a backend using w alone
      would still see a gain near 1).
    * ``A_log``: ``log U(0.02, 0.2)``, so that the per-step decay ``exp(-A softplus(.))``
      is 0.6 .. 0.99 and the delta-rule state carries across 64-token chunk boundaries
      (the default ``1 + 0.2 N`` gives A near e and forgets within a few tokens).
    """
    if name.endswith(_OFFSET_NORMS):
        return 0.2 * rng.standard_normal(shape)
    if name.endswith("linear_attn.A_log"):
        return np.log(rng.uniform(0.02, 0.2, shape))
    return None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` in the dtype of ``z`` (float16 / bfloat16: in float32, rounded once)."""
    wide = to_compute(z)
    with np.errstate(over="ignore"):
        return to_storage(1 / (1 + np.exp(-wide)), z.dtype)


def shared_expert(rows: np.ndarray, w: dict[str, np.ndarray], hidden_act: str) -> np.ndarray:
    """The always-active shared expert, scaled per token by its sigmoid gate: ``sigmoid(x w_sg) * SwiGLU(x)``.

    Args:
        rows: ``(N, M)``. w: the block's tensors (``shared_expert.*``, ``shared_expert_gate.weight`` (1, M)).

    Returns:
        ``(N, M)`` in the dtype of ``rows``.

    Checked against: transformers 5.24 ``Qwen3NextSparseMoeBlock.forward`` (modeling_qwen3_next.py:857-868).
    """
    mlp = gated_mlp(rows, w["shared_expert.gate_proj.weight"], w["shared_expert.up_proj.weight"],
                    w["shared_expert.down_proj.weight"], hidden_act)
    return _sigmoid(linear(rows, w["shared_expert_gate.weight"])) * mlp


def _mtp_depths(raw: dict) -> int:
    """``num_nextn_predict_layers`` (vLLM's name; absent: 1, vLLM's default), >= 0.

    The main model never reads the MTP module, so any count loads; draft logits are refused
    for more than one (:func:`mtp_weight_shapes`), and only when asked for.

    Raises:
        ConfigError: not an integer, or negative.
    """
    value = get_field(raw, "num_nextn_predict_layers", int, 1)
    if value < 0:
        raise ConfigError(f"{NAME}: num_nextn_predict_layers must be >= 0, got {value}")
    return value


def _as_config(config) -> Qwen3NextConfig:
    return config if isinstance(config, Qwen3NextConfig) else Qwen3NextConfig.from_dict(config)


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """Qwen3-Next sparse block: softmax router, top-k, optional renormalisation, SwiGLU experts,
    plus the sigmoid-gated shared expert.

    Args:
        hidden_states: ``(B, T, M)``, the post-attention-normalised residual stream.
        weights: transformers' ``Qwen3NextSparseMoeBlock`` state dict (:func:`moe_module_shapes`):
            ``"gate.weight"`` (E, M), ``"experts.gate_up_proj"`` (E, 2I, M) (gate rows first),
            ``"experts.down_proj"`` (E, M, I), ``"shared_expert.{gate,up,down}_proj.weight"``,
            ``"shared_expert_gate.weight"`` (1, M); same dtype as ``hidden_states``.
        config: a :class:`Qwen3NextConfig` or the config.json dict.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Dtype: router, softmax, experts and gate in the input dtype (transformers: softmax in float32).

    Raises:
        ConfigError: a bad config. MissingWeightsError, ShapeError, InputError: bad weights or input.

    Checked against: transformers 5.24 ``Qwen3NextSparseMoeBlock.forward``, ``Qwen3NextTopKRouter.forward``,
    ``Qwen3NextExperts.forward``.
    """
    config = _as_config(config)
    x = check_moe_weights("qwen3_next.moe_block", weights, config, hidden_states, moe_module_shapes(config))
    gate_up, down = weights["experts.gate_up_proj"], weights["experts.down_proj"]
    return sparse_moe(x, weights, lambda index: (gate_up[index], down[index]), config)


def sparse_moe(
    x: np.ndarray, weights: dict[str, np.ndarray], expert_weights: Callable[[int], tuple[np.ndarray, np.ndarray]],
    config: Qwen3NextConfig,
) -> np.ndarray:
    """:func:`moe_block` after its checks: ``weights`` holds the router and the shared expert,
    ``expert_weights(e) -> (gate_up_proj (2I, M), down_proj (M, I))`` is asked only of routed experts."""
    rows = x.reshape(-1, config.hidden_size)
    # Router: softmax over all experts, top-k, renormalise only if norm_topk_prob.
    routing, chosen = softmax_top_k(router_logits(rows, weights["gate.weight"]), config.num_experts_per_tok,
                                    norm_topk_prob=config.norm_topk_prob)

    def expert(index: int, routed: np.ndarray) -> np.ndarray:
        return swiglu_expert(routed, *expert_weights(index), config.hidden_act)

    routed = dispatch(rows, routing, chosen, expert, config.num_experts)
    return (routed + shared_expert(rows, weights, config.hidden_act)).reshape(x.shape)


def _sublayer(p: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name[len(prefix):]: w for name, w in p.items() if name.startswith(prefix)}


def rope_tables(config: Qwen3NextConfig, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``(B, T, Dr/2)`` at the tokens' ``positions`` ``(B, T)``, Dr = int(D * partial_rotary_factor)."""
    inv_freq, scaling = rope_frequencies(config.rope_parameters, config.head_dim,
                                         max_position_embeddings=config.max_position_embeddings)
    return rope_cos_sin(positions, inv_freq, dtype, scaling)


def token_mixer(
    x: np.ndarray, p: dict[str, np.ndarray], config: Qwen3NextConfig, layer: int, rope: tuple,
    context: StepContext, chunk_size: int | None,
):
    """The layer's Gated DeltaNet or gated attention on normalised ``x`` ``(B, T, M)``: ``(out, cache)``."""
    if config.layer_types[layer] == "linear_attention":
        return gated_deltanet_step(x, _sublayer(p, "linear_attn."), **config.gated_deltanet_dims,
                                   rms_norm_eps=config.rms_norm_eps, cache=context.layer_cache(layer),
                                   padding=context.valid, chunk_size=chunk_size)
    return gated_attention_step(x, _sublayer(p, "self_attn."), *rope, context, layer, head_dim=config.head_dim,
                                rms_norm_eps=config.rms_norm_eps)


def feed_forward(x: np.ndarray, p: dict[str, np.ndarray], config: Qwen3NextConfig, layer: int) -> np.ndarray:
    """The layer's MoE block, or its dense SwiGLU MLP of width ``intermediate_size``."""
    if config.is_moe[layer]:
        # The checkpoint's per-expert tensors, each routed expert's gate|up joined when it is used.
        router_and_shared = {name[len("mlp."):]: w for name, w in p.items()
                             if name.startswith(("mlp.gate.", "mlp.shared_expert"))}
        return sparse_moe(x, router_and_shared, lambda index: checkpoint_expert(p, index), config)
    return gated_mlp_block(x, p, config.hidden_act)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Qwen3NextConfig, layer: int, rope: tuple,
    context: StepContext, chunk_size: int | None,
):
    """One pre-norm decoder layer: token mixer then feed-forward, each with a residual, (1 + w) norms.

    Returns ``(h (B, T, M), cache)``, the layer's cache for the next call."""
    eps = config.rms_norm_eps
    x = rms_norm(h, p["input_layernorm.weight"], eps, weight_offset=1.0)
    mixed, kept = token_mixer(x, p, config, layer, rope, context, chunk_size)
    h = h + mixed
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps, weight_offset=1.0)
    return h + feed_forward(x, p, config, layer), kept


def decoder_stack_step(
    weights: dict[str, np.ndarray], config: Qwen3NextConfig, input_ids: np.ndarray, context: StepContext, *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """The hidden state after the last decoder layer, *before* the final norm, the taps so far, and the
    layers' caches, for one call's new tokens.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` checked token ids.
        context: the tokens' positions and padding and the caches of the previous call.
        chunk_size: C of the chunked delta rule in the linear-attention layers, or None
            for the recurrent form (:func:`refimpl.linear_attention.gated_deltanet.step_chunk_size`).

    Returns:
        ``(h_L (B, T, M), taps, caches)``; taps ``"embed"``, ``"layers.{l}"`` in that order;
        one cache per layer (KVCache or GatedDeltaNetCache).
    """
    embedding = weights["model.embed_tokens.weight"]
    rope = rope_tables(config, context.positions, embedding.dtype)
    h = embed_tokens(input_ids, embedding)
    taps = {"embed": h}
    caches = []
    for layer in range(config.num_hidden_layers):
        h, kept = decoder_layer(h, layer_weights(weights, layer), config, layer, rope, context, chunk_size)
        caches.append(kept)
        taps[f"layers.{layer}"] = h
    return h, taps, tuple(caches)


def decoder_stack(
    weights: dict[str, np.ndarray], config: Qwen3NextConfig, input_ids: np.ndarray, *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`decoder_stack_step` of a whole sequence (a fresh context): ``(h_L (B, T, M), taps)``."""
    h, taps, _ = decoder_stack_step(weights, config, input_ids, fresh_context(*input_ids.shape),
                                    chunk_size=chunk_size)
    return h, taps


def forward_step(
    weights: dict[str, np.ndarray], config: Qwen3NextConfig, input_ids: np.ndarray, context: StepContext, *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """Logits ``(B, T, V)``, taps ``embed``, ``layers.{l}``, ``norm`` and the layers' caches for one
    call's new tokens ``(B, T)`` (``context``, ``chunk_size`` as :func:`decoder_stack_step`)."""
    h, taps, caches = decoder_stack_step(weights, config, input_ids, context, chunk_size=chunk_size)
    h = rms_norm(h, weights["model.norm.weight"], config.rms_norm_eps, weight_offset=1.0)
    taps["norm"] = h
    embedding = weights["model.embed_tokens.weight"]
    head = embedding if config.tie_word_embeddings else weights["lm_head.weight"]
    return lm_head(h, head), taps, caches


def forward(
    weights: dict[str, np.ndarray], config: Qwen3NextConfig, input_ids: np.ndarray, *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and taps ``embed``, ``layers.{l}``, ``norm`` for checked ids ``(B, T)``:
    :func:`forward_step` from position 0 with no cache.

    ``chunk_size`` as :func:`decoder_stack_step` (the registry's forward uses C = 64).
    """
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape), chunk_size=chunk_size)
    return logits, taps


# --- multi-token prediction (``mtp.*``) ------------------------------------------------------------------------------

#: The MTP module's own tensors (relative to ``mtp.``) and the names :func:`refimpl.mtp.mtp_layer` reads.
MTP_NAMES = {"pre_fc_norm_embedding.weight": "enorm.weight", "pre_fc_norm_hidden.weight": "hnorm.weight",
             "fc.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}


def mtp_config(config: Qwen3NextConfig) -> Qwen3NextConfig:
    """The MTP layer as a one-layer model: full (gated) attention, and MoE iff main layer 0 is
    (vLLM builds ``mtp.layers.0`` as a ``full_attention`` decoder layer whose MLP follows index 0;
    sglang sets ``num_hidden_layers = 1``, ``full_attention_interval = 1``)."""
    return replace(config, num_hidden_layers=1, layer_types=("full_attention",), is_moe=config.is_moe[:1])


def mtp_weight_shapes(config: Qwen3NextConfig) -> dict[str, tuple[int, ...]]:
    """``mtp.fc.weight`` ``(M, 2M)``, ``mtp.pre_fc_norm_{embedding,hidden}.weight``, ``mtp.norm.weight``
    ``(M,)`` (all ``1 + w`` norms) and the decoder layer ``mtp.layers.0.*``; empty without a depth.

    Raises:
        ConfigError: more than one depth. Released checkpoints carry one MTP layer (``mtp.layers.0``);
            with several, vLLM's ``qwen3_next_mtp.py`` would share ``fc`` and the norms and pick
            ``layers[step % n]`` per draft step, a reading no released model settles. The model
            still loads (``refimpl.model.check_mtp_weights``); draft logits are refused with this.
    """
    if not config.num_nextn_predict_layers:
        return {}
    if config.num_nextn_predict_layers > 1:
        raise ConfigError(f"{NAME}: draft logits for num_nextn_predict_layers={config.num_nextn_predict_layers} are "
                          "not supported (Qwen3-Next ships one MTP layer; how several would chain is not specified "
                          "by any release)")
    m = config.hidden_size
    shapes = {f"mtp.{name}": (m, 2 * m) if name == "fc.weight" else (m,) for name in MTP_NAMES}
    shapes.update({f"mtp.layers.0.{k}": s for k, s in layer_shapes(mtp_config(config), 0).items()})
    return shapes


def mtp_block(h: np.ndarray, p: dict[str, np.ndarray], config: Qwen3NextConfig) -> np.ndarray:
    """TRM of the MTP depth: ``mtp.layers.0`` (weights ``p`` relative to it), causal, positions 0..T'-1."""
    one, context = mtp_config(config), fresh_context(*h.shape[:2])
    return decoder_layer(h, p, one, 0, rope_tables(one, context.positions, h.dtype), context, None)[0]


def mtp_depth(
    hidden_states: np.ndarray, next_token_embeddings: np.ndarray, weights: dict[str, np.ndarray], config,
) -> np.ndarray:
    """The MTP depth (:func:`refimpl.mtp.mtp_layer`, ``1 + w`` norms): ``h^1`` ``(B, T', M)``.

    ``h' = fc([pre_fc_norm_embedding(e); pre_fc_norm_hidden(h)])``, then ``mtp.layers.0``, then
    ``mtp.norm`` (vLLM ``qwen3_next_mtp.py`` ``Qwen3NextMultiTokenPredictor.forward``; sglang
    ``qwen3_next_mtp.py``). ``weights`` are relative to ``mtp.`` (``fc.weight``, ``layers.0.*``, ...).

    Raises:
        MissingWeightsError: a tensor is absent. ShapeError, InputError: bad arrays.
    """
    config = _as_config(config)
    block = _sublayer(weights, "layers.0.")
    missing = sorted({n for n in MTP_NAMES if n not in weights} |
                     {f"layers.0.{n}" for n in layer_shapes(mtp_config(config), 0) if n not in block})
    if missing:
        raise MissingWeightsError(f"mtp_layer: weights lack {', '.join(missing[:4])}"
                                  f"{' and more' if len(missing) > 4 else ''}")
    own = {MTP_NAMES[name]: w for name, w in weights.items() if name in MTP_NAMES}
    return mtp_layer(hidden_states, next_token_embeddings, own, rms_norm_eps=config.rms_norm_eps,
                     block=lambda x: mtp_block(x, block, config), norm_weight_offset=1.0)


def mtp_forward(
    weights: dict[str, np.ndarray], config: Qwen3NextConfig, input_ids: np.ndarray, main_hidden: np.ndarray,
) -> list[np.ndarray]:
    """Draft logits of the MTP depth, ``[(B, T-1, V)]`` (:func:`refimpl.mtp.mtp_chain`; the main
    embedding and head: ``mtp_use_dedicated_embeddings`` is false in the release)."""
    embedding = weights["model.embed_tokens.weight"]
    head = embedding if config.tie_word_embeddings else weights["lm_head.weight"]
    depths = [partial(mtp_depth, weights=_sublayer(weights, "mtp."), config=config)] * config.num_nextn_predict_layers
    return [lm_head(h, head) for h in mtp_chain(main_hidden, input_ids, embedding, depths)]


#: Published flagship config (config.json values that carry math). Source: the config.json of
#: Qwen/Qwen3-Next-80B-A3B-Instruct (Base and Thinking share the architecture) as summarised in
#: shared/spec/dense-architectures.md sec. 8.1 (hidden 2048, 48 layers, full_attention_interval 4,
#: 16/2 heads of 256, partial_rotary_factor 0.25, rope_theta 1e7, GDN 16/32 heads of 128, conv 4,
#: 512 experts top-10 of width 512, one shared expert of width 512, intermediate 5120, max positions
#: 262144, rms_norm_eps 1e-6, untied); the layer schedule is left to full_attention_interval, as
#: the release leaves layer_types unset.
PRESETS = {
    "Qwen3-Next-80B-A3B": {
        "architectures": [NAME], "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 256, "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
        "attention_bias": False, "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Qwen3NextConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Qwen3-Next model card and blog (Qwen team, 2025-09): hybrid Gated DeltaNet / gated attention, "
        "512-expert MoE with a shared expert",
        "Gated Delta Networks, arXiv:2412.06464",
        "Gated Attention for Large Language Models, arXiv:2505.06708",
        "transformers 5.24 models/qwen3_next/modeling_qwen3_next.py",
    ),
    weight_init=weight_init,
    ignored_weights=ignored_weights,
    convert_weights=convert_weights,
    mtp=MtpHook(weight_shapes=mtp_weight_shapes, prefixes=ignored_weights, copies=lambda config: {},
                forward=mtp_forward),
)
