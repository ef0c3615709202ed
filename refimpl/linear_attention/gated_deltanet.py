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
attention_mask) before the projections (``apply_mask_to_padding_states``);
:func:`gated_deltanet_step` does the same with its ``padding`` argument. A zero input
projects to q = k = v = 0, so a left pad writes nothing into S (its decay multiplies a
zero state) and leaves zeros in the conv history: a left-padded row equals the row alone.
:func:`gated_deltanet` takes no mask (every position is a real token).

Incremental decoding (:func:`gated_deltanet_step`, :class:`GatedDeltaNetCache`): the layer
carries S ``(B, Hv, d_k, d_v)`` and the last K-1 conv inputs ``(B, conv_dim, K-1)`` from one
call to the next. Which form of the delta rule a call runs is transformers' rule
(:func:`step_chunk_size`): the chunked form for the first call of a sequence and for a
call of several tokens after a cached state (from that state), the recurrent form for
one token after a cached state. Rolling back (speculative verification, bug class
MTP-03): the cache keeps the state from before its last call, that call's raw conv
inputs and its per-token delta-rule inputs (q, k, v, g, beta after the conv, gates and L2
norm), and :meth:`GatedDeltaNetCache.rollback` recomputes the state over the accepted
prefix only, with the form a call of just those tokens would have used: the rejected
tokens never touch the state it returns. (Keeping the state after every token instead
would cost ``T * Hv * d_k * d_v`` per row and call; the replay costs one call's inputs.)

Dtype: computed in the dtype of ``hidden_states`` (float64 or float32); weights and
state share it. transformers forms g from ``A_log.float()`` and ``a.float()``, runs the
delta rule in float32 and keeps the recurrent state in float32, whatever the model
dtype (lifted by ``conformance.backends.hf_exact.exact_float64``). float16 / bfloat16
hidden states (:mod:`refimpl.numerics`): projections, conv, ``beta``, the L2 norms, the
gated norm each rounded to the storage dtype (computed in float32), as is the conv
state; ``g`` and the recurrent state stay float32, as in transformers and
flash-linear-attention (a recurrent state given in the storage dtype is widened).

Paper: Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv:2412.06464, section 3
(block design: short conv, L2-normalised q/k, output gate and norm).
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
``Qwen3NextGatedDeltaNet`` (lines 583-769), in float64 with its float32 islands lifted.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError, MissingWeightsError, ShapeError, UnexpectedWeightsError
from ..linear import linear
from ..numerics import as_float_array, check_finite_nonnegative, check_same_dtype, compute_dtype, to_compute, to_storage
from ..rmsnorm import gated_rms_norm
from .delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from .short_conv import causal_conv1d, conv_state_after

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
class DeltaRuleInputs:
    """One call's per-token inputs of the delta rule: after the conv, the gates and the L2 norm.

    Attributes:
        q, k: ``(B, T, Hk, d_k)``; v: ``(B, T, Hv, d_v)``; g, beta: ``(B, T, Hv)``.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    g: np.ndarray
    beta: np.ndarray

    def first(self, num_tokens: int) -> "DeltaRuleInputs":
        """The inputs of the first ``num_tokens`` tokens."""
        part = slice(0, num_tokens)
        return DeltaRuleInputs(self.q[:, part], self.k[:, part], self.v[:, part], self.g[:, part], self.beta[:, part])


@dataclass(frozen=True)
class GatedDeltaNetReplay:
    """What undoing part of a layer's last call needs (module docstring, Incremental decoding).

    Attributes:
        before: the state before the call, or None when the call started the sequence.
        conv_inputs: ``(B, T, conv_dim)`` the call's raw ``[q | k | v]`` conv inputs.
        inputs: the call's delta-rule inputs.
        chunk_size: the C the model runs the chunked form with (None: always recurrent).
    """

    before: GatedDeltaNetState | None
    conv_inputs: np.ndarray
    inputs: DeltaRuleInputs
    chunk_size: int | None


@dataclass(frozen=True)
class GatedDeltaNetCache:
    """What one Gated DeltaNet layer keeps between incremental calls.

    Attributes:
        state: S ``(B, Hv, d_k, d_v)`` and the conv state ``(B, conv_dim, K-1)`` after the
            last call (:class:`GatedDeltaNetState`).
        last_added: the tokens of the last call (the most :meth:`rollback` undoes).
        replay: what :meth:`rollback` recomputes from, or None once nothing can be undone.
    """

    state: GatedDeltaNetState
    last_added: int = 0
    replay: GatedDeltaNetReplay | None = None

    @property
    def recurrent_state(self) -> np.ndarray:
        return self.state.recurrent_state

    @property
    def conv_state(self) -> np.ndarray:
        return self.state.conv_state

    def rollback(self, num_tokens: int) -> "GatedDeltaNetCache":
        """The cache as if only the first ``last_added - num_tokens`` tokens of the last call had been fed.

        The state is recomputed over those tokens from the state before the call, with the
        form of the delta rule a call of only them would have run (:func:`step_chunk_size`);
        the conv state is the last K-1 conv inputs of the shortened sequence (bug class MTP-03).

        Raises:
            InputError: ``num_tokens`` negative or more than the last call fed.
        """
        if num_tokens < 0 or num_tokens > self.last_added:
            raise InputError(f"rollback of {num_tokens} token(s): the last call added {self.last_added}, "
                             "and only its tokens can be rolled back")
        if num_tokens == 0:
            return GatedDeltaNetCache(self.state)
        replay, kept = self.replay, self.last_added - num_tokens
        before = replay.before
        if before is None:
            before = GatedDeltaNetState(np.zeros_like(self.state.recurrent_state), np.zeros_like(self.state.conv_state))
        if kept == 0:
            return GatedDeltaNetCache(before)
        initial = None if replay.before is None else replay.before.recurrent_state
        _, recurrent = _delta_rule(replay.inputs.first(kept), initial,
                                   step_chunk_size(replay.chunk_size, replay.before is not None, kept))
        conv = conv_state_after(before.conv_state, replay.conv_inputs[:, :kept])
        return GatedDeltaNetCache(GatedDeltaNetState(recurrent, conv))


def step_chunk_size(chunk_size: int | None, continuing: bool, num_tokens: int) -> int | None:
    """The delta-rule form of one incremental call: C (chunked) or None (recurrent).

    transformers 5.24 (``Qwen3NextGatedDeltaNet.forward``): the recurrent form for a single
    token after a cached state, the chunked form otherwise (a first call, or several tokens
    after a cached state, starting from it). ``chunk_size`` None runs every call recurrent.
    """
    return None if chunk_size is None or (continuing and num_tokens == 1) else chunk_size


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
        # The recurrent state may be float32 beside float16 / bfloat16 hidden states (kept so).
        if name != "recurrent_state" or array.dtype != compute_dtype(x.dtype):
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
    """``x / sqrt(sum(x**2, -1) + eps)`` over the last axis, in the dtype of ``x`` (float16 /
    bfloat16: in float32, rounded once)."""
    wide = to_compute(x)
    return to_storage(wide / np.sqrt(np.sum(wide * wide, axis=-1, keepdims=True) + wide.dtype.type(eps)), x.dtype)


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` computed stably (torch's threshold 20, above which it returns x, differs by < 2.1e-9)."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in the dtype of ``x`` (float16 / bfloat16: in float32, rounded once)."""
    wide = to_compute(x)
    with np.errstate(over="ignore"):
        return to_storage(1 / (1 + np.exp(-wide)), x.dtype)


def log_decay(a: np.ndarray, a_log: np.ndarray, dt_bias: np.ndarray) -> np.ndarray:
    """``g = -exp(A_log) * softplus(a + dt_bias)``, the log-decay (<= 0) ``(B, T, Hv)``.

    Dtype: that of ``a``; float16 / bfloat16 computed in float32 and *kept* in float32, as
    transformers (``A_log.float()``, ``a.float()``) and flash-linear-attention keep it.
    """
    return -np.exp(to_compute(a_log)) * softplus(to_compute(a) + to_compute(dt_bias))


def conv_inputs(q, k, v) -> np.ndarray:
    """``[all q | all k | all v]`` ``(B, T, conv_dim)``, the channel order of ``conv1d.weight``."""
    batch, length = q.shape[:2]
    return np.concatenate([q.reshape(batch, length, -1), k.reshape(batch, length, -1),
                           v.reshape(batch, length, -1)], axis=-1)


def _short_conv(q, k, v, weight, conv_state, d: _Dims):
    """Step 2: conv + SiLU over ``[q | k | v]``; returns q, k, v split back and the new conv state."""
    batch, length = q.shape[:2]
    mixed = conv_inputs(q, k, v)
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

    Dtype: that of ``hidden_states``; weights and the conv state share it. float16 /
    bfloat16: the recurrent state is float32 (module docstring).

    Raises:
        ConfigError: a head parameter not an integer >= 1, Hv not a multiple of Hk.
        MissingWeightsError / UnexpectedWeightsError: a weight name missing or unknown.
        ShapeError: ``hidden_states`` not 3-D or with an empty axis (B = 0 or T = 0), a weight or
            state of the wrong shape.
        InputError: an array not a float array, ``rms_norm_eps`` not finite >= 0,
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
    eps = check_finite_nonnegative("gated_deltanet: rms_norm_eps", rms_norm_eps, dtype=compute_dtype(x.dtype))
    # 1) fused projections, grouped per key head
    q, k, v, z, b, a = split_projections(linear(x, w["in_proj_qkvz.weight"]), linear(x, w["in_proj_ba.weight"]), d)
    # 2) - 4) conv, gates, L2 norm
    inputs, conv_state = _recurrence_inputs(q, k, v, b, a, w, None if state is None else state.conv_state, d)
    # 5) gated delta rule
    core, recurrent = _delta_rule(inputs, None if state is None else state.recurrent_state, chunk_size)
    # 6) - 7) gated norm, output projection
    return _output(core, z, w, eps, d), GatedDeltaNetState(recurrent_state=recurrent, conv_state=conv_state)


def _recurrence_inputs(q, k, v, b, a, w: dict, conv_state, d: _Dims) -> tuple[DeltaRuleInputs, np.ndarray]:
    """Steps 2-4 on the split projections: the delta-rule inputs and the new conv state."""
    # 2) causal short conv + SiLU over [q | k | v]
    q, k, v, conv_state = _short_conv(q, k, v, w["conv1d.weight"], conv_state, d)
    # 3) gates: beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)
    beta = _sigmoid(b)
    g = log_decay(a, w["A_log"], w["dt_bias"])
    # 4) L2-normalised q and k (the core scales q by d_k^-1/2)
    q, k = l2_normalize(q), l2_normalize(k)
    return DeltaRuleInputs(q, k, v, g, beta), conv_state


def _delta_rule(inputs: DeltaRuleInputs, initial_state, chunk_size: int | None):
    """Step 5: the chunked form with chunk ``chunk_size``, or the recurrent form when it is None."""
    q, k, v, g, beta = inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta
    if chunk_size is None:
        return gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=initial_state)
    return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state)


def _output(core: np.ndarray, z: np.ndarray, w: dict, eps, d: _Dims) -> np.ndarray:
    """Steps 6-7: gated RMSNorm per value head, then the output projection, ``(B, T, M)``."""
    normed = gated_rms_norm(core, w["norm.weight"], z, eps)
    return linear(normed.reshape(*core.shape[:2], d.hv * d.dv), w["out_proj.weight"])


def gated_deltanet_step(
    hidden_states: np.ndarray, weights: dict, *, linear_num_key_heads: int, linear_num_value_heads: int,
    linear_key_head_dim: int, linear_value_head_dim: int, linear_conv_kernel_dim: int, rms_norm_eps: float,
    cache: GatedDeltaNetCache | None = None, padding: np.ndarray | None = None, chunk_size: int | None = 64,
) -> tuple[np.ndarray, GatedDeltaNetCache]:
    """One incremental call of a Gated DeltaNet layer: :func:`gated_deltanet` with a cache.

    Args:
        hidden_states: ``(B, T, M)``, the call's new tokens after the layer's input norm.
        weights, linear_*, rms_norm_eps: as :func:`gated_deltanet`.
        cache: what the layer's previous call returned, or None at the start of a sequence.
        padding: None, or ``(B, T)`` bool, False on left-padding slots, whose hidden
            states are zeroed first (transformers' ``apply_mask_to_padding_states``).
        chunk_size: C of the chunked form, or None for the recurrent form in every call;
            which form a call runs: :func:`step_chunk_size`.

    Returns:
        ``(out (B, T, M), cache)``: the cache holds the state after the call and what
        :meth:`GatedDeltaNetCache.rollback` needs to undo any suffix of it.

    Dtype: that of ``hidden_states``; weights and the cache share it.

    Raises:
        ShapeError: a cache that is not a GatedDeltaNetCache of this layer's shapes, or
            ``padding`` not ``(B, T)`` bool; else as :func:`gated_deltanet`.

    Checked against: transformers 5.24 ``Qwen3NextGatedDeltaNet.forward`` with a
    ``DynamicCache`` (``modeling_qwen3_next.py:660-769``; ``cache_utils.LinearAttentionLayer``).
    """
    d = _dims({"linear_num_key_heads": linear_num_key_heads, "linear_num_value_heads": linear_num_value_heads,
               "linear_key_head_dim": linear_key_head_dim, "linear_value_head_dim": linear_value_head_dim,
               "linear_conv_kernel_dim": linear_conv_kernel_dim})
    x = as_float_array("gated_deltanet: hidden_states", hidden_states, ndim=3)
    if min(x.shape) < 1:
        raise ShapeError(f"gated_deltanet: hidden_states {x.shape} must be (B, T, M) with no empty axis")
    w = _check_weights(weights, x, d)
    if cache is not None and not isinstance(cache, GatedDeltaNetCache):
        raise ShapeError(f"gated_deltanet: cache must be a GatedDeltaNetCache or None, got {type(cache).__name__}")
    before = None if cache is None else _check_state(cache.state, x, d)
    eps = check_finite_nonnegative("gated_deltanet: rms_norm_eps", rms_norm_eps, dtype=compute_dtype(x.dtype))
    if padding is not None:
        padding = np.asarray(padding)
        if padding.shape != x.shape[:2] or padding.dtype != np.bool_:
            raise ShapeError(f"gated_deltanet: padding must be bool {x.shape[:2]}, got {padding.dtype} {padding.shape}")
        # Pads project to zero: they write nothing into S and leave zeros in the conv history.
        x = np.where(padding[..., None], x, x.dtype.type(0))
    # 1) fused projections, grouped per key head; the raw conv inputs are kept for a rollback
    q, k, v, z, b, a = split_projections(linear(x, w["in_proj_qkvz.weight"]), linear(x, w["in_proj_ba.weight"]), d)
    raw = conv_inputs(q, k, v)
    # 2) - 4) conv, gates, L2 norm
    inputs, conv_state = _recurrence_inputs(q, k, v, b, a, w, None if before is None else before.conv_state, d)
    # 5) gated delta rule, in the form transformers picks for this call
    initial = None if before is None else before.recurrent_state
    core, recurrent = _delta_rule(inputs, initial, step_chunk_size(chunk_size, before is not None, x.shape[1]))
    # 6) - 7) gated norm, output projection
    kept = GatedDeltaNetCache(GatedDeltaNetState(recurrent, conv_state), last_added=x.shape[1],
                              replay=GatedDeltaNetReplay(before, raw, inputs, chunk_size))
    return _output(core, z, w, eps, d), kept
