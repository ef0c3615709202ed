"""The gated delta rule (Gated DeltaNet's recurrence): the literal recurrent form and the chunked form.

Per value head the layer carries a state ``S`` of shape ``(d_k, d_v)``: rows are
indexed by the key channel, columns by the value channel (the layout of
transformers' and flash-linear-attention's ``recurrent_state``). Token ``t`` first
decays the state, then writes the correction of its value into it, then reads it:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        alpha_t = exp(g_t)
    o_t = S_t^T q_t                                                       (includes token t)

The paper writes the transpose, ``S`` of shape ``(d_v, d_k)``:
``S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T`` and ``o_t = S_t q_t``.
Written as three steps (the order the recurrent form below follows)::

    S   <- alpha_t S                            decay first
    u_t  = S^T k_t                              what the decayed state predicts for k_t
    S   <- S + k_t (beta_t (v_t - u_t))^T        delta-rule write
    o_t  = S^T q_t

Notation:

==========  ==============  ======================  ==========================================
paper       code            shape                   meaning
==========  ==============  ======================  ==========================================
q_t         ``q``           (B, T, Hk, d_k)         queries, used as given, times ``scale``
k_t         ``k``           (B, T, Hk, d_k)         keys, used as given (callers L2-normalise)
v_t         ``v``           (B, T, Hv, d_v)         values
log alpha   ``g``           (B, T, Hv)              log-decay; alpha_t = exp(g_t) (g <= 0 from the layer)
beta_t      ``beta``        (B, T, Hv)              write strength (sigmoid of a projection)
S           ``state``       (B, Hv, d_k, d_v)       recurrent state, zero when not given
o_t         ``o``           (B, T, Hv, d_v)         output
C           ``chunk_size``  scalar                  chunk length of the chunked form
==========  ==============  ======================  ==========================================

Key-head grouping: ``Hv`` must be a multiple of ``Hk``; with ``r = Hv / Hk``, value
head ``h`` reads query and key head ``h // r`` (repeat-interleave: heads 0..r-1 share
key head 0). Tiling (``h % Hk``) is a different function whenever ``Hk > 1`` and ``r > 1``.

Dtype: computed in the inputs' dtype (float64, the specification, or float32); all
inputs share it. transformers runs this core in float32 whatever the model dtype.
float16 / bfloat16 inputs (q, k, v, beta; g and the initial state in that dtype or in
float32, as the layer keeps them) are widened and the rule runs in float32: ``o`` is
rounded once to the storage dtype, the final state is returned in float32 (the
recurrent state engines keep: transformers, flash-linear-attention).

The chunked form, its derivation and why it equals the recurrent form are written
out in ``delta_rule.md`` beside this module.

Paper: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", arXiv:2412.06464, section 3 (the gated delta rule and its chunkwise form,
WY representation / UT transform); Yang et al., "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length", arXiv:2406.06484, section 3 (UT transform).
Checked against: transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py``
(``torch_recurrent_gated_delta_rule``, ``torch_chunk_gated_delta_rule``, lines
371-575); flash-linear-attention ``fla/ops/gated_delta_rule/fused_recurrent.py`` (read:
the same step order, the same (d_k, d_v) state layout, value head ``i_hv`` reading key
head ``i_hv // (HV // H)``, default scale ``K ** -0.5``).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import InputError, RefimplError, ShapeError
from ..numerics import as_float_array, check_finite_positive, check_same_dtype, compute_dtype, to_compute, to_storage


def _check_inputs(q, k, v, g, beta, initial_state, scale):
    """The arrays widened to the compute dtype, the initial state (zeros when None), the scale
    and the storage dtype of q, k, v and beta, checked."""
    q = as_float_array("gated_delta_rule: q", q, ndim=4)
    k = as_float_array("gated_delta_rule: k", k, ndim=4)
    v = as_float_array("gated_delta_rule: v", v, ndim=4)
    g = as_float_array("gated_delta_rule: g", g, ndim=3)
    beta = as_float_array("gated_delta_rule: beta", beta, ndim=3)
    batch, length, hk, dk = k.shape
    hv, dv = v.shape[2:]
    if q.shape != k.shape:
        raise ShapeError(f"gated_delta_rule: q {q.shape} and k {k.shape} must have one shape (B, T, Hk, d_k)")
    if min(k.shape) < 1 or min(v.shape) < 1:
        raise ShapeError(f"gated_delta_rule: empty axis in k {k.shape} or v {v.shape}")
    if v.shape[:2] != (batch, length):
        raise ShapeError(f"gated_delta_rule: v {v.shape} must be (B, T, Hv, d_v) with (B, T) = {(batch, length)} of k")
    if hv % hk:
        raise ShapeError(f"gated_delta_rule: value heads Hv={hv} must be a multiple of key heads Hk={hk}")
    for name, array in (("g", g), ("beta", beta)):
        if array.shape != (batch, length, hv):
            raise ShapeError(f"gated_delta_rule: {name} {array.shape} must be (B, T, Hv) = {(batch, length, hv)}")
    storage = check_same_dtype(q=q, k=k, v=v, beta=beta)
    _check_float32_companion(storage, g=g)
    dtype = compute_dtype(storage)
    state = _check_state(initial_state, (batch, hv, dk, dv), storage)
    for name, array in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", state)):
        if not np.all(np.isfinite(array)):
            raise InputError(f"gated_delta_rule: {name} holds NaN or infinite values")
    scale = dk ** -0.5 if scale is None else scale
    scale = check_finite_positive("gated_delta_rule: scale", scale, dtype=dtype)
    q, k, v, g, beta, state = (to_compute(a) for a in (q, k, v, g, beta, state))
    return q, k, v, g, beta, state, dtype.type(scale), storage


def _check_float32_companion(storage: np.dtype, **arrays: np.ndarray) -> None:
    """``arrays`` (g, the state) in the ``storage`` dtype of q, k, v and beta, or in float32 beside
    float16 / bfloat16 ones; RefimplError naming the dtypes otherwise."""
    for name, array in arrays.items():
        if array.dtype != storage and array.dtype != compute_dtype(storage):
            raise RefimplError(f"arrays must share one compute dtype, got q={storage}, {name}={array.dtype}")


def _check_state(initial_state, shape, storage) -> np.ndarray:
    """``initial_state`` checked against ``(B, Hv, d_k, d_v)``, or zeros of that shape (compute dtype)."""
    if initial_state is None:
        return np.zeros(shape, dtype=compute_dtype(storage))
    state = as_float_array("gated_delta_rule: initial_state", initial_state, ndim=4)
    if state.shape != shape:
        raise ShapeError(f"gated_delta_rule: initial_state {state.shape} must be (B, Hv, d_k, d_v) = {shape}")
    _check_float32_companion(storage, initial_state=state)
    return state


def check_chunk_size(chunk_size) -> int:
    """``chunk_size`` as an int >= 1; InputError otherwise (bools refused)."""
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise InputError(f"gated_delta_rule: chunk_size must be an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def heads_first(q, k, v, g, beta, scale):
    """Inputs as per-value-head arrays ``(B, Hv, T, d)`` / ``(B, Hv, T)``, q times ``scale``.

    Query and key head ``h // r`` serve value head ``h`` (``np.repeat``: repeat-interleave).
    """
    r = v.shape[2] // k.shape[2]
    q = np.repeat(q, r, axis=2) * scale
    k = np.repeat(k, r, axis=2)
    return (np.moveaxis(q, 1, 2), np.moveaxis(k, 1, 2), np.moveaxis(v, 1, 2),
            np.moveaxis(g, 1, 2), np.moveaxis(beta, 1, 2))


def _step(state, q_t, k_t, v_t, g_t, beta_t):
    """One token of the recurrence for every (batch, head): ``(o_t (B, Hv, d_v), S_t)``."""
    # decay first: S <- alpha_t S
    state = np.exp(g_t)[..., None, None] * state
    # u_t = S^T k_t, then the delta-rule write S <- S + k_t (beta_t (v_t - u_t))^T
    predicted = np.einsum("bhk,bhkv->bhv", k_t, state)
    correction = beta_t[..., None] * (v_t - predicted)
    state = state + k_t[..., :, None] * correction[..., None, :]
    # read-out after the write: o_t = S_t^T q_t
    return np.einsum("bhk,bhkv->bhv", q_t, state), state


def gated_delta_rule_recurrent(q, k, v, g, beta, *, initial_state=None, scale=None):
    """The gated delta rule token by token (the definition).

    Args:
        q, k: ``(B, T, Hk, d_k)``; used as given (no normalisation here).
        v: ``(B, T, Hv, d_v)``, ``Hv`` a multiple of ``Hk``; value head h reads key head ``h // (Hv/Hk)``.
        g: ``(B, T, Hv)`` log-decay, alpha_t = exp(g_t). The layer gives g <= 0; g > 0 (growth) is
            accepted, not refused, and grows the state without bound (overflow to inf / NaN, no error),
            as in transformers and flash-linear-attention (``delta_rule.md``, Numerics).
        beta: ``(B, T, Hv)`` write strength.
        initial_state: ``(B, Hv, d_k, d_v)`` or None (zeros). Each batch row's state is its own: an
            all-zero row is a sequence that starts here, beside rows that continue.
        scale: multiplies q; default ``d_k ** -0.5``.

    Returns:
        ``(o (B, T, Hv, d_v), final_state (B, Hv, d_k, d_v))`` in the inputs' dtype (float16 /
        bfloat16 inputs: ``o`` in it, the final state in float32).

    Dtype: float64 or float32, every product and sum in that dtype; float16 / bfloat16 in
    float32 (module docstring). g and ``initial_state`` may be float32 beside float16 /
    bfloat16 q, k, v, beta.

    Raises:
        InputError: an array not a float array or holding NaN / inf; ``scale`` not a
            positive finite number.
        ShapeError: wrong number of axes, mismatched (B, T), q and k of different shapes,
            ``Hv % Hk != 0``, an empty axis, or ``initial_state`` not ``(B, Hv, d_k, d_v)``
            (GDN-03: the state is sized by heads, never by T).
        RefimplError: the arrays differ in dtype.

    Paper: arXiv:2412.06464, section 3 (the gated delta rule).
    Checked against: transformers 5.24 ``torch_recurrent_gated_delta_rule``
    (``modeling_qwen3_next.py:513-575``) run in float64 with its float32 casts lifted.
    """
    q, k, v, g, beta, state, scale, storage = _check_inputs(q, k, v, g, beta, initial_state, scale)
    qh, kh, vh, gh, bh = heads_first(q, k, v, g, beta, scale)
    out = np.empty(vh.shape, dtype=vh.dtype)
    for t in range(vh.shape[2]):
        out[:, :, t], state = _step(state, qh[:, :, t], kh[:, :, t], vh[:, :, t], gh[:, :, t], bh[:, :, t])
    return to_storage(np.moveaxis(out, 1, 2), storage), state


def solve_unit_lower(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(I + a)^{-1} rhs`` for strictly lower-triangular ``a`` ``(..., n, n)``, by forward substitution.

    Row r: ``y_r = rhs_r - sum_{s<r} a[r, s] y_s`` (the UT transform of arXiv:2406.06484).
    """
    y = np.empty_like(rhs)
    for r in range(rhs.shape[-2]):
        y[..., r, :] = rhs[..., r, :] - np.einsum("...s,...sd->...d", a[..., r, :r], y[..., :r, :])
    return y


def _chunk(state, q, k, v, g, beta):
    """One chunk of n tokens (``(B, Hv, n, d)``, ``(B, Hv, n)``) from incoming state S: ``(o, S_next)``.

    The notation of ``delta_rule.md``: gamma the cumulative log-decay, Gamma the pairwise
    decay, A the strictly lower system, W / U the WY factors, Vn the corrected values.
    """
    n = g.shape[-1]
    gamma = np.cumsum(g, axis=-1)
    causal = np.tril(np.ones((n, n), dtype=bool))
    # Gamma[r, s] = exp(gamma_r - gamma_s) for s <= r, else 0 (masked before exp: no overflow)
    decay = np.where(causal, np.exp(np.where(causal, gamma[..., :, None] - gamma[..., None, :], 0)), 0)
    # A[r, s] = beta_r (k_r . k_s) Gamma[r, s] for s < r
    system = np.tril(beta[..., :, None] * (k @ np.swapaxes(k, -1, -2)) * decay, -1)
    # UT transform: U = (I + A)^-1 (beta v), W = (I + A)^-1 (beta exp(gamma) k)
    dv = v.shape[-1]
    solved = solve_unit_lower(system, np.concatenate([beta[..., None] * v, (beta * np.exp(gamma))[..., None] * k], -1))
    u, w = solved[..., :dv], solved[..., dv:]
    corrected = u - w @ state
    # O_r = exp(gamma_r) q_r^T S + sum_{s<=r} (q_r . k_s) Gamma[r, s] Vn_s
    scores = (q @ np.swapaxes(k, -1, -2)) * decay
    out = np.exp(gamma)[..., None] * (q @ state) + scores @ corrected
    # S_next = exp(gamma_last) S + sum_s exp(gamma_last - gamma_s) k_s Vn_s^T
    to_end = np.exp(gamma[..., -1:] - gamma)[..., None] * k
    state = np.exp(gamma[..., -1])[..., None, None] * state + np.swapaxes(to_end, -1, -2) @ corrected
    return out, state


def gated_delta_rule_chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
    """The gated delta rule in chunks of ``chunk_size`` tokens (WY representation / UT transform).

    Within a chunk every token's write is solved at once (a unit lower-triangular system);
    the state passes from chunk to chunk. A last chunk shorter than ``chunk_size`` is
    processed at its own length: no padded position exists that could touch the state
    (GDN-04). Equal to :func:`gated_delta_rule_recurrent` up to rounding, for every T.

    Args:
        q, k, v, g, beta, initial_state, scale: as :func:`gated_delta_rule_recurrent`.
        chunk_size: C, an integer >= 1 (transformers and fla use 64).

    Returns:
        ``(o (B, T, Hv, d_v), final_state (B, Hv, d_k, d_v))`` as :func:`gated_delta_rule_recurrent`.

    Dtype: as :func:`gated_delta_rule_recurrent`. In float32 the error grows with the depth of a
    chunk's cumulative log-decay (about ``|gamma| 2^-24`` on a pairwise decay of order 1;
    ``delta_rule.md``, Numerics); the pairwise decay itself never overflows.

    Raises:
        InputError: as :func:`gated_delta_rule_recurrent`; ``chunk_size`` not an integer >= 1.
        ShapeError, RefimplError: as :func:`gated_delta_rule_recurrent`.

    Paper: arXiv:2412.06464, section 3 (chunkwise form); arXiv:2406.06484 (WY / UT transform).
    Checked against: transformers 5.24 ``torch_chunk_gated_delta_rule``
    (``modeling_qwen3_next.py:371-510``), which pads T to a multiple of C with zero
    keys, values, beta and g instead.
    """
    q, k, v, g, beta, state, scale, storage = _check_inputs(q, k, v, g, beta, initial_state, scale)
    chunk_size = check_chunk_size(chunk_size)
    qh, kh, vh, gh, bh = heads_first(q, k, v, g, beta, scale)
    out = np.empty(vh.shape, dtype=vh.dtype)
    for start in range(0, vh.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        out[:, :, part], state = _chunk(state, qh[:, :, part], kh[:, :, part], vh[:, :, part], gh[:, :, part],
                                        bh[:, :, part])
    return to_storage(np.moveaxis(out, 1, 2), storage), state
