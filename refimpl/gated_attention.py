"""Gated attention: Qwen3-Next's full-attention layer, softmax attention with a sigmoid output gate.

Per token (normalised hidden state x, width M), H query heads over Hkv key/value heads::

    [q_h ; g_h] = (W_Q x + b_Q)[h]                (2D,) per head h   q_proj, PER HEAD (below)
    q_h = RMSNorm1p(q_h; q_norm)                  (D,)   1 + w, statistics over D, before RoPE
    k_j = RMSNorm1p((W_K x + b_K)[j]; k_norm)     (D,)   j < Hkv
    v_j = (W_V x + b_V)[j]                        (D,)
    q_h, k_j <- partial RoPE: rotate-half on channels [0, Dr), Dr = int(D * partial_rotary_factor),
                pairs (i, i + Dr/2); channels [Dr, D) pass through
    o_h = sum_{s <= t} softmax_s(D^-1/2 q_h . k_{h // G, s}) v_{h // G, s}      causal, G = H / Hkv
    out = W_O (o * sigmoid(g)) + b_O              the gate multiplies channel by channel BEFORE o_proj

The query/gate split is per head. ``q_proj`` has 2 H D output rows; transformers views
them as ``(H, 2D)`` and takes the first D of each head as the query and the last D as
the gate::

    rows of q_proj:  | q_0 (D) | g_0 (D) | q_1 (D) | g_1 (D) | ... | q_{H-1} | g_{H-1} |

It is not ``[all queries (H D) | all gates (H D)]`` (the first and second halves of
the projection): with H > 1 the two readings pair different rows with each head
(:func:`split_query_and_gate`; ``tests/test_gated_attention.py`` shows they differ).

Norms are the zero-centred ``1 + w`` RMSNorm (the checkpoint stores the offset w,
initialised to 0), eps = ``rms_norm_eps``, over each head's D channels. RoPE is the
half-split pairing *within* the first Dr channels (pairs (i, i + Dr/2), not
(i, i + D/2)); Qwen3-Next-80B has D = 256, ``partial_rotary_factor`` 0.25, Dr = 64.
:func:`gated_attention` and :func:`gated_attention_block` attend causally over the T
tokens of the call (no cache, no padding; ``positions`` only feed RoPE);
:func:`gated_attention_step` attends over a layer's :class:`refimpl.kv_cache.KVCache` and
the new tokens, masked from positions (incremental decoding, left padding). The cache
holds the keys after k_norm and partial RoPE and the values, all D channels; the
output gate is per token and is never cached.

Notation:

    ===================  ===============================  ==================
    paper / spec         code                             shape
    ===================  ===============================  ==================
    x                    ``hidden_states``                (B, T, M)
    W_Q | gate           ``q_proj.weight``                (2 H D, M)
    W_K, W_V             ``k_proj.weight``, ``v_proj``    (Hkv D, M)
    W_O                  ``o_proj.weight``                (M, H D)
    q_norm, k_norm       ``q_norm.weight``, ``k_norm``    (D,) offsets w, gain 1 + w
    g (output gate)      ``gate``                         (B, T, H D)
    Dr                   ``int(D * partial_rotary_factor)``  rotary width
    ===================  ===============================  ==================

Biases (``q_proj.bias`` (2 H D,), ``k_proj.bias``, ``v_proj.bias`` (Hkv D,),
``o_proj.bias`` (M,)) exist only with ``attention_bias`` (no released model has them).

Dtype: float64 or float32, computed in the dtype of ``hidden_states`` (weights must
share it). transformers computes the RMSNorm core, cos/sin and the eager softmax in
float32 islands. float16 / bfloat16: each projection, norm, rotation, the attention
core and the output gate rounded to the storage dtype, each computed in float32.

Paper: Qiu et al., "Gated Attention for Large Language Models: Non-linearity, Sparsity,
and Attention-Sink-Free", arXiv:2505.06708, sec. 2-3 (elementwise, head-specific sigmoid
gate on the attention output, computed from the layer input, before the output
projection); Qwen3-Next model card (gated attention; zero-centred, weight-decayed
layernorm).
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
(``Qwen3NextRMSNorm`` 126-143, ``apply_rotary_pos_emb`` 154-189, ``Qwen3NextAttention``
229-304: the ``view(..., -1, head_dim * 2)`` then ``chunk(2)`` split at 270-273, the
gate at 301); vLLM ``model_executor/models/qwen3_next.py`` (``Qwen3NextAttention``: the
same per-head split, sigmoid gate before o_proj, GemmaRMSNorm q/k norms).
"""

from __future__ import annotations

import numpy as np

from .attention import grouped_query_attention
from .errors import ConfigError, MissingWeightsError, RefimplError, ShapeError, UnexpectedWeightsError
from .kv_cache import KVCache, StepContext, attend_with_cache
from .linear import linear
from .masks import causal_mask
from .numerics import as_float_array, as_integer_array, check_finite_nonnegative, to_compute, to_storage
from .rmsnorm import rms_norm
from .rope import apply_rope_rotate_half, rope_cos_sin, rope_frequencies


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"gated_attention: {name} must be a positive integer, got {value!r}")
    return int(value)


def gated_attention_weight_shapes(
    hidden_size: int, *, num_attention_heads: int, num_key_value_heads: int, head_dim: int, attention_bias: bool,
) -> dict[str, tuple[int, ...]]:
    """Every tensor of one gated-attention layer (names relative to ``self_attn.``) with its shape.

    ``q_proj`` is twice as tall as the query: it also produces the output gate.
    """
    m, h, hkv, d = hidden_size, num_attention_heads, num_key_value_heads, head_dim
    shapes = {
        "q_proj.weight": (2 * h * d, m), "k_proj.weight": (hkv * d, m), "v_proj.weight": (hkv * d, m),
        "o_proj.weight": (m, h * d), "q_norm.weight": (d,), "k_norm.weight": (d,),
    }
    if attention_bias:
        shapes.update({"q_proj.bias": (2 * h * d,), "k_proj.bias": (hkv * d,), "v_proj.bias": (hkv * d,),
                       "o_proj.bias": (m,)})
    return shapes


def split_query_and_gate(query_and_gate: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``q_proj``'s output into queries and the output gate, head by head.

    Args:
        query_and_gate: ``(B, T, 2 H D)``, the output of ``q_proj``.
        head_dim: D.

    Returns:
        ``(q (B, T, H, D), gate (B, T, H D))``: head h's query is channels
        ``[2hD, 2hD + D)`` and its gate channels ``[2hD + D, 2(h+1)D)``; the gate is
        flattened head-major, channel-aligned with the attention output.

    Checked against: transformers 5.24 ``Qwen3NextAttention.forward`` (modeling_qwen3_next.py:270-273).
    """
    per_head = query_and_gate.reshape(*query_and_gate.shape[:-1], -1, 2 * head_dim)
    q, gate = per_head[..., :head_dim], per_head[..., head_dim:]
    return q, gate.reshape(*query_and_gate.shape[:-1], -1)


def apply_output_gate(attended: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """``attended * sigmoid(gate)``, elementwise; both ``(B, T, H D)`` in one dtype.

    The logistic function is evaluated as ``1 / (1 + exp(-g))`` (exp overflow to inf
    gives the exact limit 0). float16 / bfloat16: in float32, rounded once (transformers
    rounds the sigmoid and the product).
    """
    storage, attended, gate = attended.dtype, to_compute(attended), to_compute(gate)
    with np.errstate(over="ignore"):
        return to_storage(attended * (1 / (1 + np.exp(-gate))), storage)


def _project(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def gated_attention_block(
    x: np.ndarray, w: dict[str, np.ndarray], cos: np.ndarray, sin: np.ndarray, mask: np.ndarray, *,
    head_dim: int, rms_norm_eps: float,
) -> np.ndarray:
    """Gated attention on checked inputs (the form a decoder layer calls).

    Args:
        x: ``(B, T, M)``, the layer's normalised input.
        w: the tensors of :func:`gated_attention_weight_shapes`, same dtype as ``x``;
            H and Hkv are read from their shapes.
        cos, sin: ``(T, Dr/2)`` or ``(B, T, Dr/2)`` RoPE tables (Dr <= D).
        mask: bool ``(T, T)`` visibility (causal for Qwen3-Next).
        head_dim: D.
        rms_norm_eps: eps of the q and k norms.

    Returns:
        ``(B, T, M)`` in the dtype of ``x``.
    """
    b, t, _ = x.shape
    q, gate, k, v = _queries_gate_keys_values(x, w, cos, sin, head_dim, rms_norm_eps)
    attended = grouped_query_attention(q, k, v, mask, scale=head_dim ** -0.5).reshape(b, t, -1)
    # The sigmoid gate acts on the attention output, before o_proj.
    return _project(apply_output_gate(attended, gate), w, "o_proj")


def _queries_gate_keys_values(x: np.ndarray, w: dict, cos: np.ndarray, sin: np.ndarray, head_dim: int, eps):
    """``(q (B, T, H, D), gate (B, T, H D), k, v (B, T, Hkv, D))``: q and k normed and rotated."""
    b, t, _ = x.shape
    # Per-head split of the doubled query projection into query and output gate.
    q, gate = split_query_and_gate(_project(x, w, "q_proj"), head_dim)
    # Zero-centred (1 + w) QK-norm per head over D, before RoPE.
    q = rms_norm(q, w["q_norm.weight"], eps, weight_offset=1.0)
    k = rms_norm(_project(x, w, "k_proj").reshape(b, t, -1, head_dim), w["k_norm.weight"], eps, weight_offset=1.0)
    v = _project(x, w, "v_proj").reshape(b, t, -1, head_dim)
    # Partial RoPE: the tables cover channels [0, Dr) of every head; the rest pass through.
    q, k = apply_rope_rotate_half(q, cos, sin), apply_rope_rotate_half(k, cos, sin)
    return q, gate, k, v


def gated_attention_step(
    x: np.ndarray, w: dict[str, np.ndarray], cos: np.ndarray, sin: np.ndarray, context: StepContext, layer: int,
    *, head_dim: int, rms_norm_eps: float,
) -> tuple[np.ndarray, KVCache]:
    """Gated attention of one incremental call over layer ``layer``'s cache and the new tokens.

    Args:
        x, w, head_dim, rms_norm_eps: as :func:`gated_attention_block`.
        cos, sin: ``(B, T, Dr/2)`` RoPE tables at the tokens' positions.
        context: the call's positions, padding and the caches of the previous call.
        layer: the layer's index in ``context.caches``.

    Returns:
        ``(out (B, T, M), kept)``: the output and the layer's :class:`refimpl.kv_cache.KVCache`
        for the next call (keys after k_norm and RoPE; full attention, nothing dropped).
    """
    b, t, _ = x.shape
    q, gate, k, v = _queries_gate_keys_values(x, w, cos, sin, head_dim, rms_norm_eps)
    attended, kept = attend_with_cache(q, k, v, context, layer, scale=head_dim ** -0.5)
    # The sigmoid gate acts on the attention output, before o_proj.
    return _project(apply_output_gate(attended.reshape(b, t, -1), gate), w, "o_proj"), kept


def check_gated_attention_weights(weights: dict, shapes: dict, dtype) -> dict[str, np.ndarray]:
    """The tensors of ``shapes``, checked: present, no others, right shapes, one float dtype.

    Raises:
        MissingWeightsError / UnexpectedWeightsError: names missing or not used (a bias
            without ``attention_bias``). ShapeError: a wrong shape (named).
        InputError: not float arrays. RefimplError: a dtype other than ``dtype``.
    """
    if not isinstance(weights, dict):
        raise ShapeError(f"gated_attention: weights must be a dict of arrays, got {type(weights).__name__}")
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing:
        raise MissingWeightsError(f"gated_attention: weights lack {', '.join(missing)}")
    if unexpected:
        raise UnexpectedWeightsError(f"gated_attention: unexpected weights {', '.join(unexpected)}")
    checked = {name: as_float_array(f"gated_attention: {name}", weights[name]) for name in shapes}
    for name, shape in shapes.items():
        if checked[name].shape != shape:
            raise ShapeError(f"gated_attention: {name} has shape {checked[name].shape}, the config needs {shape}")
        if checked[name].dtype != dtype:
            raise RefimplError(f"gated_attention: {name} is {checked[name].dtype} but hidden_states are "
                               f"{np.dtype(dtype)}; use one compute dtype")
    return checked


def gated_attention(
    hidden_states: np.ndarray, positions: np.ndarray, weights: dict, *, num_attention_heads: int,
    num_key_value_heads: int, head_dim: int, rope_parameters: dict, partial_rotary_factor: float = 0.25,
    rms_norm_eps: float = 1e-6, max_position_embeddings: int | None = None, attention_bias: bool = False,
) -> np.ndarray:
    """Causal gated attention of Qwen3-Next from its hidden states (checked entry point).

    Args:
        hidden_states: ``(B, T, M)`` (after the layer's input norm), a float array.
        positions: ``(B, T)`` or ``(T,)`` integer positions for RoPE.
        weights: the module-relative tensors of :func:`gated_attention_weight_shapes`
            (``"q_proj.weight"``, ..., ``"k_norm.weight"``), named as in transformers'
            ``Qwen3NextAttention`` state dict.
        num_attention_heads, num_key_value_heads, head_dim: H, Hkv (H a multiple), D.
        rope_parameters: resolved transformers-v5 RoPE dict (``rope_type``, ``rope_theta``,
            scaling keys); a ``partial_rotary_factor`` key in it wins over the argument.
        partial_rotary_factor: fraction of D rotated when the dict has none (Qwen3-Next's
            default 0.25); Dr = int(D * factor) must be even and >= 2.
        rms_norm_eps: eps of the q and k norms.
        max_position_embeddings: default ``original_max_position_embeddings`` of YaRN / llama3.
        attention_bias: the four projections carry biases.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Raises:
        ConfigError: non-positive or non-integer head counts or D, H not a multiple of
            Hkv, a non-boolean ``attention_bias``, a bad eps, an unsupported RoPE type or
            a rotary width that is odd, zero or above D.
        InputError: non-float arrays or non-integer positions.
        ShapeError: shapes that do not fit (an empty batch or sequence included).
        MissingWeightsError / UnexpectedWeightsError: weight names do not match the config.
        RefimplError: a weight in another dtype than ``hidden_states``.

    Paper: arXiv:2505.06708 (gated attention, head-specific elementwise sigmoid gate).
    Checked against: transformers 5.24 ``Qwen3NextAttention.forward`` with
    ``Qwen3NextRotaryEmbedding`` (modeling_qwen3_next.py:78-123, 229-304).
    """
    h, hkv = _positive_int("num_attention_heads", num_attention_heads), _positive_int(
        "num_key_value_heads", num_key_value_heads)
    d = _positive_int("head_dim", head_dim)
    if h % hkv:
        raise ConfigError(f"gated_attention: num_attention_heads ({h}) must be a multiple of num_key_value_heads "
                          f"({hkv})")
    if not isinstance(attention_bias, (bool, np.bool_)):
        raise ConfigError(f"gated_attention: attention_bias must be true or false, got {attention_bias!r}")
    eps = check_finite_nonnegative("gated_attention: rms_norm_eps", rms_norm_eps, error=ConfigError)
    x = as_float_array("gated_attention: hidden_states", hidden_states, ndim=3)
    if 0 in x.shape:
        raise ShapeError(f"gated_attention: hidden_states {x.shape} is empty (need at least one row, token and "
                         "channel)")
    positions = as_integer_array("gated_attention: positions", positions)
    if positions.shape not in (x.shape[:2], x.shape[1:2]):
        raise ShapeError(f"gated_attention: positions {positions.shape} must be (B, T) or (T,) of hidden_states "
                         f"{x.shape}")
    shapes = gated_attention_weight_shapes(x.shape[2], num_attention_heads=h, num_key_value_heads=hkv, head_dim=d,
                                           attention_bias=bool(attention_bias))
    w = check_gated_attention_weights(weights, shapes, x.dtype)
    inv_freq, scaling = rope_frequencies(rope_parameters, d, partial_rotary_factor=partial_rotary_factor,
                                         max_position_embeddings=max_position_embeddings)
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype, scaling)
    t = x.shape[1]
    return gated_attention_block(x, w, cos, sin, causal_mask(t, t), head_dim=d, rms_norm_eps=eps)
