"""Causal depthwise short convolution over time, with the rolling state that decoding carries.

Each channel c has its own K taps; output t sees inputs t-K+1 .. t of that channel:

    out[t, c] = act( sum_{j=0..K-1} w[c, j] * x[t - K + 1 + j, c] )      x[< 0] = history (zeros if none)

Notation:

======  ==============  ===============  ===================================================
paper   code            shape            meaning
======  ==============  ===============  ===================================================
x       ``x``           (B, T, C)        inputs, time-major (C = conv_dim for Gated DeltaNet)
w       ``weight``      (C, K)           taps, oldest input first (``conv1d.weight[:, 0, :]``)
        ``conv_state``  (B, C, K-1)      the K-1 inputs before ``x``, channel-major, oldest first
======  ==============  ===============  ===================================================

State layout (GDN-06): ``conv_state[b, c, i]`` is input ``T0 - (K-1) + i`` of channel c,
where T0 is the first position of ``x``, i.e. the state is ``x_history.transpose(0, 2, 1)``
of the last K-1 time steps, oldest in column 0. transformers' cache holds the same
layout one column longer, ``(B, C, K)``; its oldest column is never read (the window of
the first new token starts one step later). Prefill then decode equals one pass.

Dtype: computed in the dtype of ``x`` (float64 or float32); the sum over the K taps
accumulates in that dtype. float16 / bfloat16: in float32, the output rounded once
(:func:`causal_conv1d`).

Paper: the short convolution of Mamba / Gated DeltaNet (arXiv:2412.06464, block design).
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
``causal_conv1d_fn`` (no state, left zero padding of K-1) and ``causal_conv1d_update``
(with state), lines 319-361; ``cache_utils.LinearAttentionLayer.update_conv_state``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, ShapeError
from ..mlp import silu
from ..numerics import as_float_array, check_same_dtype, to_compute, to_storage

#: Activations applied after the convolution (Qwen3-Next: ``hidden_act`` "silu").
CONV_ACTIVATIONS = ("silu", None)


def _check(x, weight, conv_state, activation):
    x = as_float_array("causal_conv1d: x", x, ndim=3)
    weight = as_float_array("causal_conv1d: weight", weight, ndim=2)
    batch, length, channels = x.shape
    if min(x.shape) < 1 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ShapeError(f"causal_conv1d: weight {weight.shape} must be (C, K) with C = {channels} of x {x.shape}, "
                         "K >= 1, and x must not be empty")
    if activation not in CONV_ACTIVATIONS:
        raise InputError(f"causal_conv1d: activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    dtype = check_same_dtype(x=x, weight=weight)
    history = (batch, channels, weight.shape[1] - 1)
    if conv_state is None:
        return x, weight, np.zeros(history, dtype=dtype)
    conv_state = as_float_array("causal_conv1d: conv_state", conv_state, ndim=3)
    if conv_state.shape != history:
        raise ShapeError(f"causal_conv1d: conv_state {conv_state.shape} must be (B, C, K-1) = {history}")
    check_same_dtype(x=x, conv_state=conv_state)
    return x, weight, conv_state


def causal_conv1d(x, weight, *, conv_state=None, activation="silu"):
    """Depthwise causal convolution of ``x`` ``(B, T, C)`` with taps ``weight`` ``(C, K)``.

    Args:
        x: ``(B, T, C)`` inputs.
        weight: ``(C, K)``; ``weight[c, K-1]`` multiplies the current input.
        conv_state: ``(B, C, K-1)`` the previous K-1 inputs (module docstring), or None
            for zero history (the start of a sequence).
        activation: ``"silu"`` or None (identity), applied to the convolution's output.

    Returns:
        ``(out (B, T, C), new_conv_state (B, C, K-1))``: the new state holds the last
        K-1 inputs of history followed by ``x``, in the same layout.

    Dtype: that of ``x``; all arrays must share it. float16 / bfloat16: the convolution and
    the activation in float32, the output rounded once (a fused conv kernel); the new
    state holds the inputs themselves, in the storage dtype.

    Raises:
        InputError: an array not a float array; unknown ``activation``.
        ShapeError: wrong number of axes, an empty ``x``, ``weight`` not ``(C, K)``,
            ``conv_state`` not ``(B, C, K-1)``.
        RefimplError: the arrays differ in dtype.

    Checked against: transformers 5.24 ``causal_conv1d_fn`` / ``causal_conv1d_update``
    (``modeling_qwen3_next.py:319-361``).
    """
    x, weight, conv_state = _check(x, weight, conv_state, activation)
    storage, taps = x.dtype, weight.shape[1]
    # x_ext[b, i, c]: the K-1 history inputs, then x (time-major)
    extended = np.concatenate([np.swapaxes(conv_state, 1, 2), x], axis=1)
    length = x.shape[1]
    wide, weight = to_compute(extended), to_compute(weight)
    out = np.zeros(x.shape, dtype=wide.dtype)
    for j in range(taps):
        out = out + weight[:, j] * wide[:, j:j + length]
    new_state = np.swapaxes(extended[:, extended.shape[1] - (taps - 1):], 1, 2)
    return to_storage(silu(out) if activation == "silu" else out, storage), np.ascontiguousarray(new_state)


def conv_state_after(conv_state: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The conv state once inputs ``x`` ``(B, T, C)`` have followed ``conv_state`` ``(B, C, K-1)``.

    The last K-1 inputs of the history followed by ``x``, in the layout of the module
    docstring: the state :func:`causal_conv1d` returns, without the convolution (what a
    rollback needs to rebuild the state after an accepted prefix of a call's inputs).

    Raises:
        ShapeError: ``x`` and ``conv_state`` differ in batch or channels.
    """
    if x.ndim != 3 or conv_state.ndim != 3 or x.shape[0] != conv_state.shape[0] or x.shape[2] != conv_state.shape[1]:
        raise ShapeError(f"conv_state_after: x {x.shape} must be (B, T, C) of conv_state {conv_state.shape} "
                         "(B, C, K-1)")
    history = conv_state.shape[2]
    extended = np.concatenate([conv_state, np.swapaxes(x, 1, 2)], axis=2)
    return np.ascontiguousarray(extended[:, :, extended.shape[2] - history:])
