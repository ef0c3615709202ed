"""The named ops of the op-level conformance suite, with their reference signatures.

A kernel author tests one component at a time: the suite calls a backend's op
with exactly the arguments the reference function below takes (array inputs by
name, then keyword parameters) and compares the result with the golden output.
Each op is a thin adapter over the component modules; the math lives there.

=========================  ==============================================================  ========================
op                         arguments                                                       returns
=========================  ==============================================================  ========================
attention                  q (B,T,H,D), k (B,S,Hkv,D), v (B,S,Hkv,Dv); scaling,            (B,T,H,Dv)
                           sliding_window, attention_chunk_size, sinks (H,),
                           attn_logit_softcapping
rope                       x (B,T,H,D), positions (B,T) int64; rope_parameters,            (B,T,H,D)
                           partial_rotary_factor, max_position_embeddings, layout
rope_frequencies           rope_parameters, head_dim, partial_rotary_factor,               {"inv_freq" (Dr/2,),
                           max_position_embeddings                                          "attention_scaling" ()}
rms_norm                   x (..., M), weight (M,); eps, weight_offset, cast_order         (..., M)
gated_mlp                  x (..., M), gate_proj (F,M), up_proj (F,M), down_proj (M,F);    (..., M)
                           hidden_act
embedding                  input_ids (B,T) int64, weight (V,M); embed_scale                (B,T,M)
soft_cap                   x (any); cap                                                    same shape
softmax_top_k              router_logits (N,E); top_k, norm_topk_prob                      routing (below)
top_k_softmax              router_logits (N,E); top_k                                      routing
sigmoid_group_top_k        router_logits (N,E), e_score_correction_bias (E,); top_k,       routing
                           n_group, topk_group, norm_topk_prob, routed_scaling_factor
sigmoid_bias_top_k         router_logits (N,E), e_score_correction_bias (E,); top_k        routing
llama4_top_k_sigmoid       router_logits (N,E); top_k                                      routing
soft_capped_softmax_top_k  router_logits (N,E); top_k, router_logit_softcapping            routing
swiglu_expert              x (n,M), gate_up_proj (2I,M), down_proj (M,I); hidden_act       (n,M)
input_major_swiglu_expert  x (n,M), gate_up_proj (M,2I), down_proj (I,M)                   (n,M)
clamped_swiglu_expert      x (n,M), gate_up_proj (M,2I) gate/up interleaved,               (n,M)
                           gate_up_proj_bias (2I,), down_proj (I,M), down_proj_bias (M,);
                           swiglu_limit, alpha
moe_dispatch               x (N,M), routing_weights (N,k), indices (N,k) int64,            (N,M)
                           gate_up_proj (E,2I,M), down_proj (E,M,I); weight_on
mla                        hidden_states (B,T,M), positions (B,T) int64, the attention     (B,T,M)
                           weights by name; form, num_attention_heads, q_lora_rank,
                           kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                           rope_parameters, rope_interleave, rms_norm_eps,
                           max_position_embeddings, attention_bias
moe_block                  hidden_states (B,T,M), the MoE block's weights by name;         (B,T,M)
                           config (a complete config.json dict)
gated_attention            hidden_states (B,T,M), positions (B,T) int64, the attention     (B,T,M)
                           weights by name; num_attention_heads, num_key_value_heads,
                           head_dim, rope_parameters, partial_rotary_factor,
                           rms_norm_eps, max_position_embeddings, attention_bias
gated_delta_rule           q (B,T,Hk,Dk), k (B,T,Hk,Dk), v (B,T,Hv,Dv), g (B,T,Hv),       {"o" (B,T,Hv,Dv),
                           beta (B,T,Hv), initial_state (B,Hv,Dk,Dv) optional; form      "final_state" (B,Hv,Dk,Dv)}
                           ("recurrent" | "chunked"), chunk_size
causal_conv1d              x (B,T,C), weight (C,K), conv_state (B,C,K-1) optional;        {"out" (B,T,C),
                           activation ("silu" | null)                                      "conv_state" (B,C,K-1)}
gated_rms_norm             x (..., D), weight (D,), z (..., D); eps                        (..., D)
gated_deltanet             hidden_states (B,T,M), recurrent_state and conv_state           {"output" (B,T,M),
                           optional, the layer's weights by name; linear_num_key_heads,    "recurrent_state",
                           linear_num_value_heads, linear_key_head_dim,                    "conv_state"}
                           linear_value_head_dim, linear_conv_kernel_dim, rms_norm_eps,
                           chunk_size (null: recurrent form)
mtp_layer                  hidden_states (B,T,M) (h^{k-1}), next_token_embeddings (B,T,M)  (B,T,M) h^k
                           (E[t_{i+k}]), the depth's tensors by checkpoint name; config
                           (a complete config.json dict)
=========================  ==============================================================  ========================

Routing ops return ``{"routing_weights": (N,E), "selected": (N,E) int64}``: the
dense routing matrix (the weight of each chosen expert, 0 elsewhere) and the
0/1 choice, so neither depends on the order of the k slots. ``selected`` is an
integer output and is compared exactly: a backend must choose the same experts
for every token. Among exactly equal scores the reference picks the lower
expert index (:mod:`refimpl.routers`); a tie *at the selection boundary* (the
k-th and (k+1)-th scores equal) is implementation-defined -- ``torch.topk`` on
the CPU returns indices [1, 2] for ``topk([1, 1, 1, 0], 2)`` -- so the corpus
holds ties only entirely inside or entirely outside the chosen set.

Weights by name (``mla``, ``moe_block``) use the module-relative names of the
transformers module's state dict: ``DeepseekV3Attention`` (``q_a_proj.weight``,
``kv_b_proj.weight``, ...) and each model's MoE block (``gate.weight``,
``experts.gate_up_proj``, ``shared_experts.up_proj.weight``, ...).

Array inputs arrive in the run's dtype (float64, float32, or float16 / bfloat16 as
NumPy or ``ml_dtypes`` arrays); integer inputs stay int64. An op returns one array,
or a dict of arrays named as in the table, in the run's dtype. In float16 / bfloat16
every op is the reference's low-precision definition (``docs/low-precision.md``):
storage dtype in and out, float32 compute inside each component, one rounding per
component output. Two exceptions: the delta rule's ``final_state`` and Gated
DeltaNet's ``recurrent_state`` come back in float32 (the recurrent state engines keep
in float32 whatever the model dtype); ``rms_norm`` keeps its named ``cast_order``.

Every op checks its arguments before computing (:mod:`refimpl.numerics`): an array
of the wrong dtype (integers, bools, complex), a NaN, infinite or out-of-range
parameter (eps, scaling, caps, sinks, embed scale, RoPE theta and factors) or an
unknown name (layout, cast order, activation) raises a one-line ``RefimplError``
(``InputError``, ``ShapeError``, ``ConfigError``) naming the argument. NaN and inf
inside the data arrays (x, q, k, v, weights) are not checked: they propagate. The
one exception is routing: NaN router logits or correction biases are refused
(``InputError``), because which expert a NaN score selects is undefined.
The gated delta rule (``gated_delta_rule``, and the core of ``gated_deltanet``) also
refuses NaN or inf in q, k, v, g, beta and the initial state (``InputError``).

A case may also carry the reference's result in a low-precision dtype, rounded as
its named variant rounds (``outputs.<name>@bfloat16``; RMSNorm cast orders): a run
in that dtype must then match it element for element, not only within the
dtype's tolerance, because the two cast orders differ by one unit in the last
place on about a quarter of the elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import routers
from .attention import attention
from .embedding import scaled_embed_tokens
from .errors import ConfigError, ShapeError
from .experts import clamped_swiglu_expert, input_major_swiglu_expert, swiglu_expert
from .mlp import gated_mlp
from .moe import dispatch
from .numerics import COMPUTE_DTYPES, FLOAT_DTYPES, as_float_array, as_integer_array
from .rmsnorm import check_cast_order, rms_norm, rms_norm_low_precision
from .rope import apply_rope, rope_cos_sin, rope_frequencies, rope_layout
from .softcap import soft_cap


def rope(
    x: np.ndarray, positions: np.ndarray, *, rope_parameters: dict, partial_rotary_factor: float = 1.0,
    max_position_embeddings: int | None = None, layout: str = "rotate_half",
) -> np.ndarray:
    """Rotate queries or keys ``x`` ``(B, T, H, D)`` at integer ``positions`` ``(B, T)``.

    Frequencies from :func:`refimpl.rope.rope_frequencies` (any supported ``rope_type``),
    angles in float64, cos/sin rounded once to the dtype of ``x`` and multiplied by the
    YaRN magnitude; ``layout`` is ``"rotate_half"`` or ``"interleaved"``; channels
    beyond the rotary width pass through.

    Raises:
        InputError: ``x`` not a float array, ``positions`` not integers.
        ShapeError: ``x`` not 4-D, ``positions`` is not ``(B, T)`` of ``x``.
        ConfigError: bad ``rope_parameters``, ``partial_rotary_factor``,
            ``max_position_embeddings`` or ``layout``.
    """
    x = as_float_array("rope: x", x, ndim=4)
    positions = as_integer_array("rope: positions", positions)
    layout = rope_layout(layout)
    if positions.shape != x.shape[:2]:
        raise ShapeError(f"rope: positions {positions.shape} must be (B, T) of x {x.shape}")
    inv_freq, scaling = rope_frequencies(
        rope_parameters, x.shape[-1], partial_rotary_factor=partial_rotary_factor,
        max_position_embeddings=max_position_embeddings,
    )
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype, scaling)
    return apply_rope(x, cos, sin, layout)


def frequencies(
    *, rope_parameters: dict, head_dim: int, partial_rotary_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"inv_freq": (Dr/2,) float64, "attention_scaling": () float64}`` for a RoPE configuration."""
    inv_freq, scaling = rope_frequencies(
        rope_parameters, head_dim, partial_rotary_factor=partial_rotary_factor,
        max_position_embeddings=max_position_embeddings,
    )
    return {"inv_freq": inv_freq, "attention_scaling": np.asarray(scaling, dtype=np.float64)}


def norm(
    x: np.ndarray, weight: np.ndarray, *, eps: float, weight_offset: float = 0.0,
    cast_order: str = "cast_then_multiply",
) -> np.ndarray:
    """RMSNorm (``weight_offset`` 1 is Gemma's 1 + w).

    float64 / float32 inputs: :func:`refimpl.rmsnorm.rms_norm` in that dtype (the
    cast order is then immaterial). bfloat16 / float16 inputs:
    :func:`refimpl.rmsnorm.rms_norm_low_precision`, normalised in float32 with the
    named ``cast_order`` (``"cast_then_multiply"``: Llama, Qwen3, Mistral, SmolLM3;
    ``"multiply_then_cast"``: OLMo 2, Gemma 3).

    Raises:
        InputError: ``x`` not float64, float32, float16 or bfloat16; ``cast_order``
            unknown (checked in every dtype); ``eps`` not a finite number >= 0;
            ``weight_offset`` not 0 or 1.
        ShapeError, RefimplError: as :func:`refimpl.rmsnorm.rms_norm`.
    """
    x = as_float_array("rms_norm: x", x, dtypes=FLOAT_DTYPES)
    check_cast_order(cast_order)
    if x.dtype.name in COMPUTE_DTYPES:
        return rms_norm(x, weight, eps, weight_offset=weight_offset)
    return rms_norm_low_precision(x, weight, eps, weight_offset=weight_offset, cast_order=cast_order)


def mlp(x, gate_proj, up_proj, down_proj, *, hidden_act: str) -> np.ndarray:
    """:func:`refimpl.mlp.gated_mlp`: SwiGLU (``"silu"``) or GeGLU (``"gelu_pytorch_tanh"``)."""
    return gated_mlp(x, gate_proj, up_proj, down_proj, hidden_act)


def embedding(input_ids: np.ndarray, weight: np.ndarray, *, embed_scale: float = 1.0) -> np.ndarray:
    """Rows of ``weight`` times ``embed_scale`` rounded to the weight's dtype (Gemma: sqrt(M)).

    Raises:
        InputError: ids not a (B, T) integer array inside ``[0, V)``; ``weight`` not a
            float array; ``embed_scale`` not a positive finite number in its dtype.
        ShapeError: ``weight`` is not 2-D.
    """
    return scaled_embed_tokens(input_ids, weight, embed_scale)


def softcap(x: np.ndarray, *, cap: float) -> np.ndarray:
    """:func:`refimpl.softcap.soft_cap`: ``cap * tanh(x / cap)``."""
    return soft_cap(x, cap)


def _routing(weights: np.ndarray, indices: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """A router's ``(weights, indices)`` as the order-free routing outputs of the table above."""
    return {
        "routing_weights": routers.dense_routing(weights, indices, num_experts),
        "selected": routers.dense_routing(np.ones(indices.shape, dtype=np.int64), indices, num_experts),
    }


def route_softmax_top_k(router_logits: np.ndarray, *, top_k: int, norm_topk_prob: bool) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.softmax_top_k` (Qwen3-MoE) as dense routing outputs."""
    weights, indices = routers.softmax_top_k(router_logits, top_k, norm_topk_prob=norm_topk_prob)
    return _routing(weights, indices, np.shape(router_logits)[1])


def route_top_k_softmax(router_logits: np.ndarray, *, top_k: int) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.top_k_softmax` (gpt-oss) as dense routing outputs."""
    weights, indices = routers.top_k_softmax(router_logits, top_k)
    return _routing(weights, indices, np.shape(router_logits)[1])


def route_sigmoid_group_top_k(
    router_logits: np.ndarray, e_score_correction_bias: np.ndarray, *, top_k: int, n_group: int, topk_group: int,
    norm_topk_prob: bool, routed_scaling_factor: float,
) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.sigmoid_group_top_k` (DeepSeek-V3, Kimi K2, GLM-4.5) as dense routing outputs."""
    weights, indices = routers.sigmoid_group_top_k(
        router_logits, e_score_correction_bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor,
    )
    return _routing(weights, indices, np.shape(router_logits)[1])


def route_sigmoid_bias_top_k(
    router_logits: np.ndarray, e_score_correction_bias: np.ndarray, *, top_k: int
) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.sigmoid_bias_top_k` (MiniMax-M2) as dense routing outputs."""
    weights, indices = routers.sigmoid_bias_top_k(router_logits, e_score_correction_bias, top_k)
    return _routing(weights, indices, np.shape(router_logits)[1])


def route_llama4_top_k_sigmoid(router_logits: np.ndarray, *, top_k: int) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.llama4_top_k_sigmoid` as dense routing outputs (the weights scale expert inputs)."""
    weights, indices = routers.llama4_top_k_sigmoid(router_logits, top_k)
    return _routing(weights, indices, np.shape(router_logits)[1])


def route_soft_capped_softmax_top_k(
    router_logits: np.ndarray, *, top_k: int, router_logit_softcapping: float | None
) -> dict[str, np.ndarray]:
    """:func:`refimpl.routers.soft_capped_softmax_top_k` (Grok 2.5) as dense routing outputs."""
    weights, indices = routers.soft_capped_softmax_top_k(
        router_logits, top_k, router_logit_softcapping=router_logit_softcapping
    )
    return _routing(weights, indices, np.shape(router_logits)[1])


def moe_dispatch(
    x: np.ndarray, routing_weights: np.ndarray, indices: np.ndarray, gate_up_proj: np.ndarray,
    down_proj: np.ndarray, *, weight_on: str = "output",
) -> np.ndarray:
    """:func:`refimpl.moe.dispatch` over SwiGLU experts with concatenated gate|up rows.

    Args:
        x: ``(N, M)``. routing_weights, indices: ``(N, k)`` (indices int64, distinct per row).
        gate_up_proj: ``(E, 2I, M)``; down_proj: ``(E, M, I)`` (expert e is
            :func:`refimpl.experts.swiglu_expert` on ``gate_up_proj[e]``, ``down_proj[e]``).
        weight_on: ``"output"`` (``w * Expert(x)``) or ``"input"`` (``Expert(w * x)``, Llama 4).

    Raises:
        ShapeError: the expert stacks are not 3-D with one expert count; else as
            :func:`refimpl.moe.dispatch` and :func:`refimpl.experts.swiglu_expert`.
    """
    indices = as_integer_array("moe_dispatch: indices", indices, ndim=2)
    gate_up = as_float_array("moe_dispatch: gate_up_proj", gate_up_proj, ndim=3)
    down = as_float_array("moe_dispatch: down_proj", down_proj, ndim=3)
    if gate_up.shape[0] != down.shape[0]:
        raise ShapeError(f"moe_dispatch: gate_up_proj {gate_up.shape} and down_proj {down.shape} hold different "
                         "numbers of experts")

    def expert(e: int, rows: np.ndarray) -> np.ndarray:
        return swiglu_expert(rows, gate_up[e], down[e])

    return dispatch(x, routing_weights, indices, expert, gate_up.shape[0], weight_on=weight_on)


_MLA_FORMS = ("literal", "absorbed")


def mla(
    hidden_states: np.ndarray, positions: np.ndarray, *, form: str, num_attention_heads: int,
    q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
    rope_parameters: dict, rope_interleave: bool, rms_norm_eps: float, max_position_embeddings: int | None,
    attention_bias: bool, **weights: np.ndarray,
) -> np.ndarray:
    """DeepSeek-V3 multi-head latent attention, causal, no cache: :func:`refimpl.mla.mla_literal`
    (``form="literal"``, the expansion transformers runs) or :func:`refimpl.mla.mla_absorbed`
    (``form="absorbed"``, ``W_UK`` folded into the query and ``W_UV`` applied after the attention).

    The two forms compute one function; ``form`` only chooses which reference code
    produces the result. The attention weights arrive as further keywords named as in
    ``DeepseekV3Attention``'s state dict (``q_a_proj.weight``, ``kv_b_proj.weight``, ...).

    Raises:
        ConfigError: unknown ``form``; else as ``mla_literal`` / ``mla_absorbed``.
    """
    from . import mla as mla_module

    if form not in _MLA_FORMS:
        raise ConfigError(f"mla: form must be one of {_MLA_FORMS}, got {form!r}")
    function = mla_module.mla_literal if form == "literal" else mla_module.mla_absorbed
    return function(
        hidden_states, positions, weights, num_attention_heads=num_attention_heads, q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim, rope_parameters=rope_parameters, rope_interleave=rope_interleave,
        rms_norm_eps=rms_norm_eps, max_position_embeddings=max_position_embeddings, attention_bias=attention_bias,
    )


def gated_attention(
    hidden_states: np.ndarray, positions: np.ndarray, *, num_attention_heads: int, num_key_value_heads: int,
    head_dim: int, rope_parameters: dict, partial_rotary_factor: float = 0.25, rms_norm_eps: float = 1e-6,
    max_position_embeddings: int | None = None, attention_bias: bool = False, **weights: np.ndarray,
) -> np.ndarray:
    """Qwen3-Next's causal gated attention (:func:`refimpl.gated_attention.gated_attention`): q_proj
    split per head into query and output gate, (1 + w) q/k norms, partial rotate-half RoPE, GQA,
    ``sigmoid(gate)`` on the attention output before o_proj. The weights arrive as further keywords
    named as in ``Qwen3NextAttention``'s state dict (``q_proj.weight``, ``q_norm.weight``, ...).

    Raises:
        As :func:`refimpl.gated_attention.gated_attention`.
    """
    from .gated_attention import gated_attention as gated

    return gated(hidden_states, positions, weights, num_attention_heads=num_attention_heads,
                 num_key_value_heads=num_key_value_heads, head_dim=head_dim, rope_parameters=rope_parameters,
                 partial_rotary_factor=partial_rotary_factor, rms_norm_eps=rms_norm_eps,
                 max_position_embeddings=max_position_embeddings, attention_bias=attention_bias)


def moe_block(hidden_states: np.ndarray, *, config: dict, **weights: np.ndarray) -> np.ndarray:
    """One MoE layer's sparse block (router, routed experts, shared expert or dense MLP where
    the model has one) of the architecture named by ``config["architectures"][0]``.

    Dispatches through :mod:`refimpl.registry` to ``moe_block(hidden_states, weights, config)``
    of that architecture's model module, the function its decoder layers use.

    Raises:
        UnknownArchitectureError: the config names no registered architecture.
        ConfigError: the architecture has no MoE block; else as that ``moe_block``.
    """
    return moe_block_function(config)(hidden_states, weights, config)


def moe_block_function(config: dict) -> Callable:
    """``moe_block`` of the model module registered for ``config["architectures"][0]``."""
    import importlib

    from . import registry

    if not isinstance(config, dict):
        raise ConfigError(f"moe_block: config must be a config.json dict, got {type(config).__name__}")
    arch = registry.get_architecture(config)
    module = importlib.import_module(arch.forward.__module__)
    if not callable(getattr(module, "moe_block", None)):
        raise ConfigError(f"moe_block: architecture {arch.name} has no MoE block")
    return module.moe_block


def mtp_layer(hidden_states: np.ndarray, next_token_embeddings: np.ndarray, *, config: dict,
              **weights: np.ndarray) -> np.ndarray:
    """One multi-token-prediction depth of the architecture ``config["architectures"][0]`` names:
    ``h^k = shared_head.norm(TRM_k(eh_proj([enorm(e); hnorm(h)])))`` at positions ``0 .. T-1``
    (:func:`refimpl.mtp.mtp_layer`; the block is the model's MoE decoder layer).

    The tensors arrive as keywords under their checkpoint names relative to the depth's
    ``model.layers.{L + k - 1}.`` (``enorm.weight``, ``hnorm.weight``, ``eh_proj.weight``,
    ``shared_head.norm.weight``, ``self_attn.*``, ``mlp.experts.{e}.gate_proj.weight``, ...).

    Raises:
        UnknownArchitectureError: the config names no registered architecture.
        ConfigError: the architecture has no MTP depth; else as that model's ``mtp_depth``.
    """
    return mtp_depth_function(config)(hidden_states, next_token_embeddings, weights, config)


def mtp_depth_function(config: dict) -> Callable:
    """``mtp_depth`` of the model module registered for ``config["architectures"][0]``."""
    import importlib

    from . import registry

    if not isinstance(config, dict):
        raise ConfigError(f"mtp_layer: config must be a config.json dict, got {type(config).__name__}")
    arch = registry.get_architecture(config)
    module = importlib.import_module(arch.forward.__module__)
    if arch.mtp is None or not callable(getattr(module, "mtp_depth", None)):
        raise ConfigError(f"mtp_layer: architecture {arch.name} has no multi-token-prediction depth")
    return module.mtp_depth


_DELTA_RULE_FORMS = ("recurrent", "chunked")


def delta_rule(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
    initial_state: np.ndarray | None = None, *, form: str = "chunked", chunk_size: int = 64,
) -> dict[str, np.ndarray]:
    """The gated delta rule, ``{"o": (B,T,Hv,Dv), "final_state": (B,Hv,Dk,Dv)}``:
    :func:`refimpl.linear_attention.delta_rule.gated_delta_rule_recurrent` (``form="recurrent"``,
    the definition) or ``gated_delta_rule_chunked`` (``form="chunked"``, chunks of ``chunk_size``).

    q and k are used as given (no L2 norm), q is scaled by ``Dk ** -0.5``; value head h reads
    key head ``h // (Hv / Hk)``. The two forms compute one function.

    Raises:
        ConfigError: unknown ``form``; else as the delta-rule functions.
    """
    from .linear_attention import delta_rule as rule

    if form not in _DELTA_RULE_FORMS:
        raise ConfigError(f"gated_delta_rule: form must be one of {_DELTA_RULE_FORMS}, got {form!r}")
    if form == "recurrent":
        o, state = rule.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=initial_state)
    else:
        o, state = rule.gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state)
    return {"o": o, "final_state": state}


def short_conv(
    x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray | None = None, *, activation: str | None = "silu",
) -> dict[str, np.ndarray]:
    """:func:`refimpl.linear_attention.short_conv.causal_conv1d` as ``{"out": (B,T,C), "conv_state": (B,C,K-1)}``."""
    from .linear_attention.short_conv import causal_conv1d

    out, state = causal_conv1d(x, weight, conv_state=conv_state, activation=activation)
    return {"out": out, "conv_state": state}


def gated_norm(x: np.ndarray, weight: np.ndarray, z: np.ndarray, *, eps: float) -> np.ndarray:
    """:func:`refimpl.rmsnorm.gated_rms_norm`: ``(w * x / sqrt(mean(x**2) + eps)) * silu(z)``, plain w."""
    from .rmsnorm import gated_rms_norm

    return gated_rms_norm(x, weight, z, eps)


def gated_deltanet_layer(
    hidden_states: np.ndarray, recurrent_state: np.ndarray | None = None, conv_state: np.ndarray | None = None, *,
    linear_num_key_heads: int, linear_num_value_heads: int, linear_key_head_dim: int, linear_value_head_dim: int,
    linear_conv_kernel_dim: int, rms_norm_eps: float, chunk_size: int | None = 64, **weights: np.ndarray,
) -> dict[str, np.ndarray]:
    """One Gated DeltaNet layer (:func:`refimpl.linear_attention.gated_deltanet.gated_deltanet`),
    ``{"output": (B,T,M), "recurrent_state": (B,Hv,Dk,Dv), "conv_state": (B,conv_dim,K-1)}``.

    The weights arrive as further keywords named as in ``Qwen3NextGatedDeltaNet``'s state
    dict (``in_proj_qkvz.weight``, ``conv1d.weight``, ``A_log``, ...). ``recurrent_state``
    and ``conv_state`` are given together (a later piece of a sequence) or not at all.

    Raises:
        InputError: only one of the two states given; else as ``gated_deltanet``.
    """
    from .errors import InputError
    from .linear_attention.gated_deltanet import GatedDeltaNetState, gated_deltanet

    if (recurrent_state is None) != (conv_state is None):
        raise InputError("gated_deltanet: recurrent_state and conv_state must be given together or not at all")
    state = None if conv_state is None else GatedDeltaNetState(recurrent_state, conv_state)
    out, new = gated_deltanet(
        hidden_states, weights, linear_num_key_heads=linear_num_key_heads,
        linear_num_value_heads=linear_num_value_heads, linear_key_head_dim=linear_key_head_dim,
        linear_value_head_dim=linear_value_head_dim, linear_conv_kernel_dim=linear_conv_kernel_dim,
        rms_norm_eps=rms_norm_eps, chunk_size=chunk_size, state=state)
    return {"output": out, "recurrent_state": new.recurrent_state, "conv_state": new.conv_state}


@dataclass(frozen=True)
class Op:
    """One named op.

    Attributes:
        name: the op's name in cases and backends.
        function: the reference implementation (the signature backends implement).
        integer_inputs: array inputs that are integer (not cast to the run dtype).
        outputs: names of the outputs; ``("output",)`` for a single array.
        integer_outputs: outputs that are integer (stored as int64, compared exactly).
    """

    name: str
    function: Callable
    integer_inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("output",)
    integer_outputs: tuple[str, ...] = ()


_ROUTING = {"outputs": ("routing_weights", "selected"), "integer_outputs": ("selected",)}


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("attention", attention),
        Op("rope", rope, integer_inputs=("positions",)),
        Op("rope_frequencies", frequencies, outputs=("inv_freq", "attention_scaling")),
        Op("rms_norm", norm),
        Op("gated_mlp", mlp),
        Op("embedding", embedding, integer_inputs=("input_ids",)),
        Op("soft_cap", softcap),
        Op("softmax_top_k", route_softmax_top_k, **_ROUTING),
        Op("top_k_softmax", route_top_k_softmax, **_ROUTING),
        Op("sigmoid_group_top_k", route_sigmoid_group_top_k, **_ROUTING),
        Op("sigmoid_bias_top_k", route_sigmoid_bias_top_k, **_ROUTING),
        Op("llama4_top_k_sigmoid", route_llama4_top_k_sigmoid, **_ROUTING),
        Op("soft_capped_softmax_top_k", route_soft_capped_softmax_top_k, **_ROUTING),
        Op("swiglu_expert", swiglu_expert),
        Op("input_major_swiglu_expert", input_major_swiglu_expert),
        Op("clamped_swiglu_expert", clamped_swiglu_expert),
        Op("moe_dispatch", moe_dispatch, integer_inputs=("indices",)),
        Op("mla", mla, integer_inputs=("positions",)),
        Op("moe_block", moe_block),
        Op("mtp_layer", mtp_layer),
        Op("gated_delta_rule", delta_rule, outputs=("o", "final_state")),
        Op("causal_conv1d", short_conv, outputs=("out", "conv_state")),
        Op("gated_rms_norm", gated_norm),
        Op("gated_deltanet", gated_deltanet_layer, outputs=("output", "recurrent_state", "conv_state")),
        Op("gated_attention", gated_attention, integer_inputs=("positions",)),
    )
}
