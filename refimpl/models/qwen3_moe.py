"""Qwen3 mixture-of-experts decoder (``Qwen3MoeForCausalLM``).

Forward pass, pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]
    x   = RMSNorm(h; input_layernorm)
    q   = RMSNorm_per_head(x Wq^T + bq; q_norm)   (B, T, H, D)   QK-norm over D, before RoPE
    k   = RMSNorm_per_head(x Wk^T + bk; k_norm)   (B, T, Hkv, D)
    v   = x Wv^T + bv                             (B, T, Hkv, D)
    q, k = RoPE_rotate_half(q, k; rope_parameters, positions 0..T-1)
    h   = h + o_proj( GQA(q, k, v; scale = D^-0.5, mask) ) (+ bo)
    mask: causal, or causal within sliding_window W on EVERY layer when use_sliding_window
    x   = RMSNorm(h; post_attention_layernorm)
    h   = h + MoE(x)        if is_moe[l]   (sparse MoE block, below)
    h   = h + SwiGLU_F(x)   otherwise      (dense MLP of width intermediate_size)
    logits = RMSNorm(h_L; norm) W_lm^T        (W_lm = E when tie_word_embeddings)

Sparse MoE block (:func:`moe_block`), on the N = B*T rows of x::

    z  = x W_g^T                               (N, E)   router logits, no bias
    p  = softmax(z)                            (N, E)   over all E experts
    i  = top-k(p)                              (N, k)   k = num_experts_per_tok
    w  = p[i] / sum(p[i]) if norm_topk_prob else p[i]   (never the raw logits: MOE-04)
    y  = sum_j w_j * down_e( silu(gate_e x) * up_e x ),  e = i_j,  experts of width moe_intermediate_size

Schedule: ``is_moe[l] = l not in mlp_only_layers and num_experts > 0 and (l + 1) %
decoder_sparse_step == 0`` (:func:`refimpl.moe.sparse_step_schedule`).

Notation: M hidden_size, F intermediate_size (dense layers), I moe_intermediate_size,
E num_experts, k num_experts_per_tok, H / Hkv / D as in ``refimpl/NOTATION.md``.
``head_dim`` is not a field of transformers' ``Qwen3MoeConfig``: the attention reads
``getattr(config, "head_dim", M // H)``, so D is config.json's ``head_dim`` when present
(released models: 128 with M / H = 64) and ``M // H`` otherwise.

Checkpoint layout: the published checkpoints and transformers' ``save_pretrained``
store one matrix per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (I, M),
(I, M), (M, I); transformers fuses them on load into ``experts.gate_up_proj`` (E, 2I, M)
(gate rows first) and ``experts.down_proj`` (E, M, I), the names :func:`moe_block`
takes. The router is ``mlp.gate.weight`` (E, M). ``save_pretrained(dir,
save_original_format=False)`` writes the fused stacks as ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj``; :func:`convert_weights` splits them back (exactly) into the
per-expert names of :func:`weight_shapes`, layer by layer.

Attention is :func:`refimpl.models.qwen3.attention_block` (it reads only ``head_dim`` and
``rms_norm_eps`` from the config).

Dtype: computed in the dtype of the weights (float64 or float32). transformers takes
the router softmax in float32 and casts the weights back (a float32 island at float64).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Qwen3 Technical Report, arXiv:2505.09388, sec. 2 (architecture: QK-Norm, GQA,
128 experts with 8 active, no shared experts, global-batch load balancing).
Checked against: transformers 5.24 ``models/qwen3_moe/modeling_qwen3_moe.py``
(``Qwen3MoeTopKRouter``, ``Qwen3MoeExperts``, ``Qwen3MoeSparseMoeBlock``,
``Qwen3MoeDecoderLayer.__init__``, ``Qwen3MoeModel.forward`` mask choice) and
``configuration_qwen3_moe.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import ConfigError, MissingWeightsError, ShapeError
from ..kv_cache import KVCache, StepContext, fresh_context
from ..experts import swiglu_expert
from ..masks import causal_mask, sliding_window_mask
from ..moe import dispatch, sparse_step_schedule
from ..numerics import as_float_array
from ..rmsnorm import rms_norm
from ..routers import router_logits, softmax_top_k
from . import qwen3
from ._expert_layout import MLP_EXPERTS, split_fused_experts
from ._llama_like import (
    ROPE_KEYS, attention_weight_shapes, decoder_weight_shapes, gated_mlp_block, implicit_head_dim,
    mlp_weight_shapes, resolve_rope_parameters, rope_tables_at, run_decoder_step, tied_head, validate_common,
)

NAME = "Qwen3MoeForCausalLM"

#: config.json keys deliberately without effect here, and why.
IGNORED_KEYS = frozenset({
    # Qwen2/Qwen3-dense leftover copied into the released configs; Qwen3MoeConfig has no
    # such field and the window, when on, applies to every layer.
    "max_window_layers",
    # training-only: the load-balancing loss
    "output_router_logits", "router_aux_loss_coef",
})
#: ``Qwen3MoeConfig`` declares no ``default_theta``: the mixin's 10000 applies.
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Qwen3MoeConfig:
    """Qwen3-MoE hyper-parameters; field names are the config.json keys.

    Defaults are transformers' ``Qwen3MoeConfig`` defaults where config.json may omit
    a key. Resolved here: ``head_dim`` (``M // H`` when absent), ``num_experts``
    (config.json spells it ``num_experts`` or, as ``save_pretrained`` writes it through
    the config's ``attribute_map``, ``num_local_experts``), ``sliding_window`` (None
    unless ``use_sliding_window``) and ``is_moe``, one entry per layer.
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
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    is_moe: tuple[bool, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen3MoeConfig":
        """Build from a parsed config.json.

        Raises:
            ConfigError: missing, mistyped or out-of-range fields; heads that do not
                divide; ``num_experts`` and ``num_local_experts`` that disagree; a top-k
                outside ``1..num_experts``; bad ``mlp_only_layers``; an unsupported RoPE
                type or ``partial_rotary_factor`` (refused, not guessed).
        """
        heads = get_positive_int(raw, "num_attention_heads")
        hidden = get_positive_int(raw, "hidden_size")
        layers = get_positive_int(raw, "num_hidden_layers")
        use_sliding = get_field(raw, "use_sliding_window", bool, False)
        experts = _num_experts(raw)
        step = get_field(raw, "decoder_sparse_step", int, 1)
        mlp_only = _mlp_only_layers(raw)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=get_positive_int(raw, "num_key_value_heads", 4),
            head_dim=implicit_head_dim(raw, hidden, heads, null_means_default=False),
            rope_parameters=resolve_rope_parameters(raw, DEFAULT_ROPE_THETA, NAME),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 32768),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            use_sliding_window=use_sliding,
            sliding_window=get_field(raw, "sliding_window", int, 4096, nullable=True) if use_sliding else None,
            num_experts=experts,
            num_experts_per_tok=get_positive_int(raw, "num_experts_per_tok", 8),
            moe_intermediate_size=get_positive_int(raw, "moe_intermediate_size", 768),
            norm_topk_prob=get_field(raw, "norm_topk_prob", bool, False),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(mlp_only),
            is_moe=sparse_step_schedule(layers, step, mlp_only, experts),
        )
        config._validate()
        used = {f for f in cls.__dataclass_fields__} - {"is_moe"} | ROPE_KEYS | {"num_local_experts"}
        check_known_keys(raw, used, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        validate_common(NAME, self)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"{NAME}: sliding_window must be >= 1, got {self.sliding_window}")
        if any(self.is_moe) and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")


def _num_experts(raw: dict) -> int:
    """E from ``num_experts`` or its alias ``num_local_experts`` (0 allowed: every layer dense).

    Raises:
        ConfigError: not a non-negative integer, or both keys given with different values.
    """
    values = {key: get_field(raw, key, int) for key in ("num_experts", "num_local_experts") if key in raw}
    if len(set(values.values())) > 1:
        raise ConfigError(f"{NAME}: num_experts and num_local_experts disagree: {values}")
    experts = next(iter(values.values()), 128)
    if experts < 0:
        raise ConfigError(f"config.json field 'num_experts' must be >= 0, got {experts}")
    return experts


def _mlp_only_layers(raw: dict) -> list[int]:
    """``mlp_only_layers`` as a list (null or absent means none)."""
    value = raw.get("mlp_only_layers")
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"config.json field 'mlp_only_layers' must be a list of layer indices, got {value!r}")
    return value


def layer_mask(config: Qwen3MoeConfig, num_tokens: int) -> np.ndarray:
    """The ``(T, T)`` visibility mask shared by every layer: causal, or sliding-window causal."""
    if config.sliding_window is not None:
        return sliding_window_mask(num_tokens, num_tokens, config.sliding_window)
    return causal_mask(num_tokens, num_tokens)


def expert_weight_shapes(m: int, i: int, num_experts: int, prefix: str = "mlp.") -> dict:
    """The router and the per-expert matrices of one MoE layer, as the checkpoint stores them."""
    shapes = {f"{prefix}gate.weight": (num_experts, m)}
    for e in range(num_experts):
        shapes.update({f"{prefix}experts.{e}.gate_proj.weight": (i, m), f"{prefix}experts.{e}.up_proj.weight": (i, m),
                       f"{prefix}experts.{e}.down_proj.weight": (m, i)})
    return shapes


def weight_shapes(config: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape (MoE and dense layers differ)."""
    m, d = config.hidden_size, config.head_dim
    shapes = decoder_weight_shapes(config, {})
    for layer, moe in enumerate(config.is_moe):
        per_layer = {
            "input_layernorm.weight": (m,),
            **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, d,
                                      bias=config.attention_bias),
            "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,),
            "post_attention_layernorm.weight": (m,),
            **(expert_weight_shapes(m, config.moe_intermediate_size, config.num_experts) if moe
               else mlp_weight_shapes(m, config.intermediate_size, bias=False)),
        }
        shapes.update({f"model.layers.{layer}.{name}": s for name, s in per_layer.items()})
    return shapes


def convert_weights(config: Qwen3MoeConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with MoE layers saved in transformers' fused layout split into per-expert tensors
    (:func:`refimpl.models._expert_layout.split_fused_experts`; CheckpointError for a mixed layer)."""
    layers = [layer for layer, moe in enumerate(config.is_moe) if moe]
    shape = (config.num_experts, config.moe_intermediate_size, config.hidden_size)
    return split_fused_experts(weights, layers, MLP_EXPERTS, shape)


def check_moe_weights(name: str, weights: dict, config, hidden_states: np.ndarray, shapes: dict) -> np.ndarray:
    """``hidden_states`` ``(B, T, M)`` as an array, after checking the block's weights.

    Raises:
        InputError: a non-float array. MissingWeightsError: a tensor of ``shapes`` is absent.
        ShapeError: a wrong shape, an unknown tensor, or ``hidden_states`` not ``(B, T, M)``.
    """
    x = as_float_array(f"{name}: hidden_states", hidden_states, ndim=3)
    if x.shape[-1] != config.hidden_size:
        raise ShapeError(f"{name}: hidden_states {x.shape} must end in hidden_size {config.hidden_size}")
    missing, unknown = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing:
        raise MissingWeightsError(f"{name}: weights lack {missing}")
    if unknown:
        raise ShapeError(f"{name}: unknown weights {unknown}; the block takes {sorted(shapes)}")
    for key, shape in shapes.items():
        if tuple(np.shape(weights[key])) != shape:
            raise ShapeError(f"{name}: weight '{key}' has shape {tuple(np.shape(weights[key]))}, config needs {shape}")
    return x


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """Qwen3-MoE sparse block: softmax router, top-k, optional renormalisation, SwiGLU experts.

    Args:
        hidden_states: ``(B, T, M)``, the post-attention-normalised residual stream.
        weights: transformers' ``Qwen3MoeSparseMoeBlock`` state dict: ``"gate.weight"``
            (E, M), ``"experts.gate_up_proj"`` (E, 2I, M) (gate rows first),
            ``"experts.down_proj"`` (E, M, I); same dtype as ``hidden_states``.
        config: a :class:`Qwen3MoeConfig` or the config.json dict.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Dtype: router, softmax and experts in the input dtype (transformers: softmax in float32).

    Raises:
        ConfigError: a bad config. MissingWeightsError, ShapeError, InputError: bad weights or input.

    Checked against: transformers 5.24 ``Qwen3MoeSparseMoeBlock.forward``, ``Qwen3MoeTopKRouter.forward``,
    ``Qwen3MoeExperts.forward``.
    """
    if not isinstance(config, Qwen3MoeConfig):
        config = Qwen3MoeConfig.from_dict(config)
    e, m, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    shapes = {"gate.weight": (e, m), "experts.gate_up_proj": (e, 2 * i, m), "experts.down_proj": (e, m, i)}
    x = check_moe_weights("qwen3_moe.moe_block", weights, config, hidden_states, shapes)
    gate_up, down = weights["experts.gate_up_proj"], weights["experts.down_proj"]
    return sparse_moe(x, weights["gate.weight"], lambda index: (gate_up[index], down[index]), config)


def sparse_moe(
    x: np.ndarray, router: np.ndarray, expert_weights: Callable[[int], tuple[np.ndarray, np.ndarray]], config
) -> np.ndarray:
    """:func:`moe_block` after its checks: ``x`` ``(B, T, M)``, the router ``(E, M)``, and
    ``expert_weights(e) -> (gate_up_proj (2I, M), down_proj (M, I))``, asked only of routed experts."""
    rows = x.reshape(-1, config.hidden_size)
    # Router: softmax over all experts, top-k, renormalise only if norm_topk_prob.
    routing, chosen = softmax_top_k(router_logits(rows, router), config.num_experts_per_tok,
                                    norm_topk_prob=config.norm_topk_prob)

    def expert(index: int, routed: np.ndarray) -> np.ndarray:
        return swiglu_expert(routed, *expert_weights(index), config.hidden_act)

    return dispatch(rows, routing, chosen, expert, config.num_experts).reshape(x.shape)


def checkpoint_expert(p: dict[str, np.ndarray], index: int, prefix: str = "mlp.") -> tuple[np.ndarray, np.ndarray]:
    """Expert ``index``'s ``(gate_up_proj (2I, M), down_proj (M, I))`` from the per-expert checkpoint
    tensors: gate rows first, as transformers' checkpoint conversion stacks them into
    ``experts.gate_up_proj[index]``."""
    expert = f"{prefix}experts.{index}."
    return (np.concatenate([p[expert + "gate_proj.weight"], p[expert + "up_proj.weight"]]),
            p[expert + "down_proj.weight"])


def feed_forward(x: np.ndarray, p: dict[str, np.ndarray], config: Qwen3MoeConfig, layer: int) -> np.ndarray:
    """The layer's MoE block, or its dense SwiGLU MLP of width ``intermediate_size``.

    The MoE block reads the checkpoint's per-expert tensors directly: only the experts a
    token is routed to are joined into their gate|up layout, not all E at every call."""
    if config.is_moe[layer]:
        return sparse_moe(x, p["mlp.gate.weight"], lambda index: checkpoint_expert(p, index), config)
    return gated_mlp_block(x, p, config.hidden_act)


def forward_step(
    weights: dict[str, np.ndarray], config: Qwen3MoeConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """Logits ``(B, T, V)``, taps ``embed``, ``layers.{l}``, ``norm`` and one KV cache per layer for
    one call's new tokens ``(B, T)`` (:mod:`refimpl.kv_cache`)."""
    cos, sin = rope_tables_at(config, context.positions, weights["model.embed_tokens.weight"].dtype)
    eps = config.rms_norm_eps

    def layer(h: np.ndarray, p: dict[str, np.ndarray], index: int) -> tuple[np.ndarray, KVCache]:
        # Qwen3's attention (per-head QK-norm before RoPE); every layer slides when a window is set.
        attended, kept = qwen3.attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, cos, sin,
                                               context, index, config.sliding_window)
        h = h + attended
        return h + feed_forward(rms_norm(h, p["post_attention_layernorm.weight"], eps), p, config, index), kept

    return run_decoder_step(weights, config, input_ids, context, layer)


def forward(
    weights: dict[str, np.ndarray], config: Qwen3MoeConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and taps ``embed``, ``layers.{l}``, ``norm`` for checked ids ``(B, T)``."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _qwen3_moe(**sizes) -> dict:
    return {
        "architectures": [NAME], "model_type": "qwen3_moe", "vocab_size": 151936, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
        **sizes,
    }


#: Published flagship configs (config.json values that carry math). Sources: copies of the
#: Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json files in public repositories
#: (found with the project's code search; the 235B values agree across two independent
#: copies), and the Qwen3 report (arXiv:2505.09388, Table 2: 48 / 94 layers, 32/4 and
#: 64/4 heads, 128 experts, 8 active).
PRESETS = {
    "Qwen3-30B-A3B": _qwen3_moe(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4),
    "Qwen3-235B-A22B": _qwen3_moe(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                                  num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Qwen3MoeConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    convert_weights=convert_weights,
    presets=PRESETS,
    citations=(
        "Qwen3 Technical Report, arXiv:2505.09388",
        "transformers 5.24 models/qwen3_moe/modeling_qwen3_moe.py",
    ),
)
