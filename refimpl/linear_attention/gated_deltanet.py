"""The Gated DeltaNet layer as Qwen3-Next ships it: projections, short conv, gates, delta rule, gated norm.

Steps, in equation order (r = Hv / Hk value heads per key head):

1. ``P = x W_qkvz^T`` and ``BA = x W_ba^T``, both grouped by KEY head g = 0..Hk-1:
   ``P`` viewed ``(B, T, Hk, 2 d_k + 2 r d_v)`` is ``[q_g (d_k) | k_g (d_k) | v_g (r d_v) | z_g (r d_v)]``
   per group, ``BA`` viewed ``(B, T, Hk, 2 r)`` is ``[b_g (r) | a_g (r)]``. ``v_g``, ``z_g``, ``b_g``,
   ``a_g`` split into r value heads; value head ``h = g r + j``. (transformers'
   ``fix_query_key_value_ordering``; four contiguous blocks of the whole projection would be wrong.)
2. ``[q | k | v]`` (all q heads, then all k, then all v: ``conv_dim = 2 Hk d_k + Hv d_v``
   channels, the channel order of ``conv1d.weight``) goes through the causal depthwise
   conv of width K and SiLU (:func:`refimpl.linear_attention.short_conv.causal_conv1d`);
   z, b and a do not.
3. ``beta = sigmoid(b)``, ``g = -exp(A_log) * softplus(a + dt_bias)`` (log-decay <= 0).
4. q and k L2-normalised per head, ``x / sqrt(sum(x**2) + 1e-6)`` (eps fixed at 1e-6,
   inside the root, not ``rms_norm_eps``); q scaled by ``d_k ** -0.5`` inside the core.
5. The gated delta rule (:mod:`refimpl.linear_attention.delta_rule`); value head h reads
   key head ``h // r`` (repeat-interleave).
6. Gated RMSNorm per value head over d_v (plain weight, ``rms_norm_eps``):
   ``(w * n(o)) * silu(z)`` (:func:`refimpl.rmsnorm.gated_rms_norm`).
7. ``out = o.reshape(B, T, Hv d_v) W_out^T``.

Notation (weights by ``Qwen3NextGatedDeltaNet`` state-dict name; Hk, Hv, d_k, d_v, K are
``linear_num_key_heads``, ``linear_num_value_heads``, ``linear_key_head_dim``,
``linear_value_head_dim``, ``linear_conv_kernel_dim``):

=================  =======================  ==============================
paper              code                     shape
=================  =======================  ==============================
x                  ``hidden_states``        (B, T, M)
W_qkvz             ``in_proj_qkvz.weight``  (2 Hk d_k + 2 Hv d_v, M)
W_ba               ``in_proj_ba.weight``    (2 Hv, M)
conv taps          ``conv1d.weight``        (conv_dim, 1, K)
dt bias            ``dt_bias``              (Hv,)
log A              ``A_log``                (Hv,)
w (gated norm)     ``norm.weight``          (d_v,)
W_out              ``out_proj.weight``      (M, Hv d_v)
=================  =======================  ==============================

Padding: transformers zeroes the hidden states of padded positions (a 2-D
attention_mask) before the projections (``apply_mask_to_padding_states``); this
layer takes no mask yet (issue 6), so every position is a real token.

Dtype: computed in the dtype of ``hidden_states`` (float64 or float32); weights and
state share it. transformers forms g from ``A_log.float()`` and ``a.float()``, runs the
delta rule in float32 and keeps the recurrent state in float32, whatever the model
dtype (lifted by ``conformance.backends.hf_exact.exact_float64``).

Paper: Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv:2412.06464, section 3
(block design: short conv, L2-normalised q/k, output gate and norm).
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
``Qwen3NextGatedDeltaNet`` (lines 583-769), in float64 with its float32 islands lifted.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError
from ..linear import linear
from ..numerics import as_float_array, check_finite_nonnegative, check_same_dtype
from ..rmsnorm import gated_rms_norm
from .delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from .short_conv import causal_conv1d

#: eps of the q / k L2 norm (transformers' ``l2norm`` default, as in flash-linear-attention).
L2_NORM_EPS = 1e-6

_HEAD_PARAMS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim")


@dataclass(frozen=True)
class GatedDeltaNetState:
    """What one Gated DeltaNet layer carries from one call to the next.

    Attributes:
        recurrent_state: ``(B, Hv, d_k, d_v)`` the delta-rule state S.
        conv_state: ``(B, conv_dim, K-1)`` the last K-1 conv inputs ``[q | k | v]``,
            channel-major, oldest first (:mod:`refimpl.linear_attention.short_conv`).
    """

    recurrent_state: np.ndarray
    conv_state: np.ndarray


@dataclass(frozen=True)
class _Dims:
    hk: int
    hv: int
    dk: int
    dv: int
    kernel: int

    @property
    def r(self) -> int:
        return self.hv // self.hk

    @property
    def conv_dim(self) -> int:
        return 2 * self.hk * self.dk + self.hv * self.dv


def _dims(params: dict) -> _Dims:
    for name in _HEAD_PARAMS:
        value = params[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"gated_deltanet: {name} must be an integer >= 1, got {value!r}")
    dims = _Dims(*(int(params[name]) for name in _HEAD_PARAMS))
    if dims.hv % dims.hk:
        raise ConfigError(f"gated_deltanet: linear_num_value_heads {dims.hv} must be a multiple of "
                          f"linear_num_key_heads {dims.hk}")
    return dims


def _shapes(hidden_size: int, d: _Dims) -> dict[str, tuple[int, ...]]:
    return {
        "in_proj_qkvz.weight": (2 * d.hk * d.dk + 2 * d.hv * d.dv, hidden_size),
        "in_proj_ba.weight": (2 * d.hv, hidden_size),
        "conv1d.weight": (d.conv_dim, 1, d.kernel),
        "dt_bias": (d.hv,),
        "A_log": (d.hv,),
        "norm.weight": (d.dv,),
        "out_proj.weight": (hidden_size, d.hv * d.dv),
    }


def gated_deltanet_weight_shapes(
    hidden_size: int, *, linear_num_key_heads: int, linear_num_value_heads: int, linear_key_head_dim: int,
    linear_value_head_dim: int, linear_conv_kernel_dim: int,
) -> dict[str, tuple[int, ...]]:
    """``{module-relative weight name: shape}`` of one ``Qwen3NextGatedDeltaNet`` (table above).

    Raises:
        ConfigError: a head parameter not an integer >= 1, or Hv not a multiple of Hk.
    """
    dims = _dims({"linear_num_key_heads": linear_num_key_heads, "linear_num_value_heads": linear_num_value_heads,
                  "linear_key_head_dim": linear_key_head_dim, "linear_value_head_dim": linear_value_head_dim,
                  "linear_conv_kernel_dim": linear_conv_kernel_dim})
    return _shapes(hidden_size, dims)


def _check_weights(weights: dict, x: np.ndarray, d: _Dims) -> dict[str, np.ndarray]:
    shapes = _shapes(x.shape[-1], d)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise MissingWeightsError(f"gated_deltanet: weights missing: {', '.join(missing)}")
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected:
        raise UnexpectedWeightsError(f"gated_deltanet: unexpected weights: {', '.join(unexpected)}")
    checked = {name: as_float_array(f"gated_deltanet: {name}", weights[name]) for name in sorted(shapes)}
    for name, array in checked.items():
        if array.shape != shapes[name]:
            raise ShapeError(f"gated_deltanet: {name} has shape {array.shape}, expected {shapes[name]}")
    check_same_dtype(hidden_states=x, **{name.replace(".", "_"): a for name, a in checked.items()})
    return checked


def _check_state(state, x: np.ndarray, d: _Dims) -> GatedDeltaNetState | None:
    if state is None:
        return None
    if not isinstance(state, GatedDeltaNetState):
        raise ShapeError(f"gated_deltanet: state must be a GatedDeltaNetState or None, got {type(state).__name__}")
    batch = x.shape[0]
    expected = {"recurrent_state": (batch, d.hv, d.dk, d.dv), "conv_state": (batch, d.conv_dim, d.kernel - 1)}
    for name, shape in expected.items():
        array = as_float_array(f"gated_deltanet: state.{name}", getattr(state, name))
        if array.shape != shape:
            raise ShapeError(f"gated_deltanet: state.{name} has shape {array.shape}, expected {shape}")
        check_same_dtype(hidden_states=x, **{name: array})
    return state


def split_projections(qkvz: np.ndarray, ba: np.ndarray, d: _Dims):
    """``(q, k, v, z, b, a)`` from the fused projections, grouped per key head (step 1).

    Args:
        qkvz: ``(B, T, 2 Hk d_k + 2 Hv d_v)``; ba: ``(B, T, 2 Hv)``.

    Returns:
        q, k ``(B, T, Hk, d_k)``; v, z ``(B, T, Hv, d_v)``; b, a ``(B, T, Hv)``.

    Checked against: transformers 5.24 ``Qwen3NextGatedDeltaNet.fix_query_key_value_ordering``
    (``modeling_qwen3_next.py:629-658``), element for element.
    """
    batch, length = qkvz.shape[:2]
    groups = qkvz.reshape(batch, length, d.hk, 2 * d.dk + 2 * d.r * d.dv)
    edges = np.cumsum([d.dk, d.dk, d.r * d.dv])
    q, k, v, z = np.split(groups, edges, axis=-1)
    gates = ba.reshape(batch, length, d.hk, 2 * d.r)
    b, a = gates[..., :d.r], gates[..., d.r:]
    return (q, k, v.reshape(batch, length, d.hv, d.dv), z.reshape(batch, length, d.hv, d.dv),
            b.reshape(batch, length, d.hv), a.reshape(batch, length, d.hv))


def l2_normalize(x: np.ndarray, eps: float = L2_NORM_EPS) -> np.ndarray:
    """``x / sqrt(sum(x**2, -1) + eps)`` over the last axis, in the dtype of ``x``."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` computed stably (torch's threshold 20, above which it returns x, differs by < 2.1e-9)."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-x))


def _short_conv(q, k, v, weight, conv_state, d: _Dims):
    """Step 2: conv + SiLU over ``[q | k | v]``; returns q, k, v split back and the new conv state."""
    batch, length = q.shape[:2]
    mixed = np.concatenate([q.reshape(batch, length, -1), k.reshape(batch, length, -1),
                            v.reshape(batch, length, -1)], axis=-1)
    mixed, conv_state = causal_conv1d(mixed, weight[:, 0, :], conv_state=conv_state, activation="silu")
    q, k, v = np.split(mixed, [d.hk * d.dk, 2 * d.hk * d.dk], axis=-1)
    return (q.reshape(batch, length, d.hk, d.dk), k.reshape(batch, length, d.hk, d.dk),
            v.reshape(batch, length, d.hv, d.dv), conv_state)


def gated_deltanet(
    hidden_states: np.ndarray, weights: dict, *, linear_num_key_heads: int, linear_num_value_heads: int,
    linear_key_head_dim: int, linear_value_head_dim: int, linear_conv_kernel_dim: int, rms_norm_eps: float,
    chunk_size: int | None = 64, state: GatedDeltaNetState | None = None,
) -> tuple[np.ndarray, GatedDeltaNetState]:
    """One Gated DeltaNet layer (Qwen3-Next's ``linear_attention`` token mixer), module docstring steps 1-7.

    Args:
        hidden_states: ``(B, T, M)``, the output of the layer's input norm.
        weights: the seven tensors of the table, by ``Qwen3NextGatedDeltaNet`` state-dict name.
        linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
            linear_value_head_dim, linear_conv_kernel_dim: Hk, Hv, d_k, d_v, K.
        rms_norm_eps: eps of the gated output norm.
        chunk_size: C of the chunked delta rule, or None for the recurrent form (equal results).
        state: the state a previous call returned, or None at the start of a sequence.

    Returns:
        ``(out (B, T, M), new_state)``; processing a sequence in pieces, passing the
        state along, equals one pass.

    Dtype: that of ``hidden_states`` (float64 or float32); weights and state share it.

    Raises:
        ConfigError: a head parameter not an integer >= 1, Hv not a multiple of Hk.
        MissingWeightsError / UnexpectedWeightsError: a weight name missing or unknown.
        ShapeError: ``hidden_states`` not 3-D or with an empty axis (B = 0 or T = 0), a weight or
            state of the wrong shape.
        InputError: an array not float64 / float32, ``rms_norm_eps`` not finite >= 0,
            ``chunk_size`` not an integer >= 1; NaN / inf reaching the delta rule.
        RefimplError: arrays of different dtypes.

    Checked against: transformers 5.24 ``Qwen3NextGatedDeltaNet.forward``
    (``modeling_qwen3_next.py:660-769``).
    """
    d = _dims({"linear_num_key_heads": linear_num_key_heads, "linear_num_value_heads": linear_num_value_heads,
               "linear_key_head_dim": linear_key_head_dim, "linear_value_head_dim": linear_value_head_dim,
               "linear_conv_kernel_dim": linear_conv_kernel_dim})
    x = as_float_array("gated_deltanet: hidden_states", hidden_states, ndim=3)
    if min(x.shape) < 1:
        raise ShapeError(f"gated_deltanet: hidden_states {x.shape} must be (B, T, M) with no empty axis")
    w = _check_weights(weights, x, d)
    state = _check_state(state, x, d)
    eps = check_finite_nonnegative("gated_deltanet: rms_norm_eps", rms_norm_eps, dtype=x.dtype)
    # 1) fused projections, grouped per key head
    q, k, v, z, b, a = split_projections(linear(x, w["in_proj_qkvz.weight"]), linear(x, w["in_proj_ba.weight"]), d)
    # 2) causal short conv + SiLU over [q | k | v]
    q, k, v, conv_state = _short_conv(q, k, v, w["conv1d.weight"], None if state is None else state.conv_state, d)
    # 3) gates: beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)
    beta = _sigmoid(b)
    g = -np.exp(w["A_log"]) * softplus(a + w["dt_bias"])
    # 4) L2-normalised q and k (the core scales q by d_k^-1/2)
    q, k = l2_normalize(q), l2_normalize(k)
    # 5) gated delta rule
    initial = None if state is None else state.recurrent_state
    if chunk_size is None:
        core, recurrent = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=initial)
    else:
        core, recurrent = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial)
    # 6) gated RMSNorm per value head, 7) output projection
    normed = gated_rms_norm(core, w["norm.weight"], z, eps)
    out = linear(normed.reshape(*x.shape[:2], d.hv * d.dv), w["out_proj.weight"])
    return out, GatedDeltaNetState(recurrent_state=recurrent, conv_state=conv_state)
