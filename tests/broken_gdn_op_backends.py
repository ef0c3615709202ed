"""Deliberately wrong Gated DeltaNet op backends, one per mistake (bug classes GDN-02 .. GDN-07 and the
layer's own pitfalls).

Each is the reference's op table in which one piece of the Gated DeltaNet math is
replaced by a wrong variant, everywhere it is used: the ``gated_delta_rule`` /
``causal_conv1d`` / ``gated_rms_norm`` op and, through the same replacement, the
``gated_deltanet`` layer op. Used as ``--backend broken_gdn_op_backends:<factory>``
with ``tests/`` on the import path; ``tests/test_broken_gdn_op_backends.py`` shows
each failing the cases built to catch it, at float32 and float64.
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import numpy as np

from broken_op_backends import _BrokenOps
from refimpl import ops as ref
from refimpl import rmsnorm
from refimpl.linear_attention import delta_rule as dr
from refimpl.linear_attention import short_conv as conv_module
from refimpl.mlp import silu

# the module, not the function the package re-exports under the same name
layer_module = importlib.import_module("refimpl.linear_attention.gated_deltanet")

_CHUNKED, _RECURRENT = dr.gated_delta_rule_chunked, dr.gated_delta_rule_recurrent
_CONV, _NORM = conv_module.causal_conv1d, rmsnorm.gated_rms_norm
_HEADS_FIRST = dr.heads_first


def _patched(function, *replacements):
    """``function`` run with ``(module, attribute, value)`` replacements in place."""

    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for module, name, value in replacements:
                stack.enter_context(mock.patch.object(module, name, value))
            return function(*args, **kwargs)

    return run


def _everywhere(name: str, *replacements):
    """A broken backend whose delta-rule, conv, norm and layer ops all run under ``replacements``."""
    ops = {op: _patched(fn, *replacements) for op, fn in (
        ("gated_delta_rule", ref.delta_rule), ("causal_conv1d", ref.short_conv),
        ("gated_rms_norm", ref.gated_norm), ("gated_deltanet", ref.gated_deltanet_layer))}
    return _BrokenOps(name, **ops)


def _core(rule):
    """Both delta-rule forms replaced by ``rule`` (in the module and where the layer imported them)."""
    return ((dr, "gated_delta_rule_recurrent", rule), (dr, "gated_delta_rule_chunked", rule),
            (layer_module, "gated_delta_rule_recurrent", rule), (layer_module, "gated_delta_rule_chunked", rule))


def _recurrence(step, *, dtype=None):
    """A delta rule (both forms) that runs ``step`` token by token, optionally in ``dtype``."""

    def rule(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=None):
        q, k, v, g, beta, state, scale, _ = dr._check_inputs(q, k, v, g, beta, initial_state, scale)
        out_dtype = v.dtype
        arrays = dr.heads_first(q, k, v, g, beta, scale)
        if dtype is not None:
            arrays, state = [a.astype(dtype) for a in arrays], state.astype(dtype)
        qh, kh, vh, gh, bh = arrays
        out = np.empty(vh.shape, dtype=vh.dtype)
        for t in range(vh.shape[2]):
            out[:, :, t], state = step(state, qh[:, :, t], kh[:, :, t], vh[:, :, t], gh[:, :, t], bh[:, :, t])
        return np.moveaxis(out, 1, 2).astype(out_dtype), state.astype(out_dtype)

    return rule


# -- the recurrence


def _decay_after_step(state, q_t, k_t, v_t, g_t, beta_t):
    predicted = np.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + k_t[..., :, None] * (beta_t[..., None] * (v_t - predicted))[..., None, :]
    state = np.exp(g_t)[..., None, None] * state
    return np.einsum("bhk,bhkv->bhv", q_t, state), state


def decay_after_update():
    """The delta-rule decay at the wrong step: S <- alpha (S + k (beta (v - S^T k))^T) instead of
    decaying S before the prediction and the write."""
    return _everywhere("broken:GDN-decay-after-update", *_core(_recurrence(_decay_after_step)))


def _beta_write_only_step(state, q_t, k_t, v_t, g_t, beta_t):
    state = np.exp(g_t)[..., None, None] * state
    predicted = np.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + k_t[..., :, None] * (beta_t[..., None] * v_t - predicted)[..., None, :]
    return np.einsum("bhk,bhkv->bhv", q_t, state), state


def beta_missing_from_erase():
    """beta omitted from the erase term: S (I - k k^T) + beta k v^T instead of S (I - beta k k^T) + beta k v^T."""
    return _everywhere("broken:GDN-beta-not-in-erase", *_core(_recurrence(_beta_write_only_step)))


def gdn07_recurrence_in_float16():
    """GDN-07: the recurrent state and every step of the recurrence held in float16."""
    return _everywhere("broken:GDN-07-float16-recurrence", *_core(_recurrence(dr._step, dtype=np.float16)))


def _tiled_heads_first(q, k, v, g, beta, scale):
    r = v.shape[2] // k.shape[2]
    tiled = (np.tile(q, (1, 1, r, 1)) * scale, np.tile(k, (1, 1, r, 1)))
    return (*(np.moveaxis(a, 1, 2) for a in tiled), np.moveaxis(v, 1, 2), np.moveaxis(g, 1, 2),
            np.moveaxis(beta, 1, 2))


def key_heads_tiled():
    """Value head h reads key head h % Hk (tiling) instead of h // (Hv / Hk) (repeat-interleave)."""
    return _everywhere("broken:GDN-key-heads-tiled", (dr, "heads_first", _tiled_heads_first))


def _unscaled_heads_first(q, k, v, g, beta, scale):
    return _HEADS_FIRST(q, k, v, g, beta, q.dtype.type(1))


def query_not_scaled():
    """q not multiplied by d_k ** -0.5 before the read-out."""
    return _everywhere("broken:GDN-q-not-scaled", (dr, "heads_first", _unscaled_heads_first))


def _padded_chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
    length = np.shape(q)[1]
    pad = (-length) % chunk_size

    def edge(a):
        return np.concatenate([a, np.repeat(a[:, -1:], pad, axis=1)], axis=1)

    o, state = _CHUNKED(*(edge(a) for a in (q, k, v, g, beta)), chunk_size=chunk_size, initial_state=initial_state,
                        scale=scale)
    return o[:, :length], state


def gdn04_padding_updates_state():
    """GDN-04: the last partial chunk padded with copies of the last token, whose writes and decays
    reach the final state (outputs of real tokens stay right: they never see later positions)."""
    return _everywhere("broken:GDN-04-padded-chunk-updates-state", (dr, "gated_delta_rule_chunked", _padded_chunked),
                       (layer_module, "gated_delta_rule_chunked", _padded_chunked))


def _state_sized_by_length(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=None):
    q, k, v, g, beta, _, scale, _ = dr._check_inputs(q, k, v, g, beta, None, scale)
    qh, kh, vh, gh, bh = dr.heads_first(q, k, v, g, beta, scale)
    # shapes unpacked as (B, T, H, D) after the transpose to (B, H, T, D): "length" is H, "heads" is T
    batch, length, heads, _ = qh.shape
    state = np.zeros((batch, heads, k.shape[-1], v.shape[-1])) if initial_state is None else initial_state
    out = np.zeros(vh.shape, dtype=vh.dtype)
    for t in range(length):
        out[:, :, t], state = dr._step(state, qh[:, :, t], kh[:, :, t], vh[:, :, t], gh[:, :, t], bh[:, :, t])
    return np.moveaxis(out, 1, 2), state


def gdn03_state_sized_by_length():
    """GDN-03: (B, T, H, D) unpacked from a (B, H, T, D) tensor: the zero state is sized by T (a
    broadcast error when T != H) and the loop runs over H tokens."""
    return _everywhere("broken:GDN-03-state-sized-by-T", *_core(_state_sized_by_length))


# -- the layer's gates and normalisation


def decay_without_softplus():
    """g = -exp(A_log) (a + dt_bias): softplus left out of the decay."""
    return _everywhere("broken:GDN-decay-without-softplus", (layer_module, "softplus", lambda x: x))


def decay_without_dt_bias():
    """g = -exp(A_log) softplus(a): dt_bias left out of the decay."""

    def layer(hidden_states, recurrent_state=None, conv_state=None, **kwargs):
        kwargs["dt_bias"] = np.zeros_like(kwargs["dt_bias"])
        return ref.gated_deltanet_layer(hidden_states, recurrent_state, conv_state, **kwargs)

    return _BrokenOps("broken:GDN-decay-without-dt-bias", gated_deltanet=layer)


def no_l2_norm():
    """q and k not L2-normalised before the delta rule."""
    return _everywhere("broken:GDN-no-l2-norm", (layer_module, "l2_normalize", lambda x: x))


# -- the short conv


def _time_major_state(x, weight, *, conv_state=None, activation="silu"):
    if conv_state is not None:
        b, c, history = conv_state.shape
        conv_state = np.ascontiguousarray(conv_state).reshape(b, history, c).transpose(0, 2, 1)
    return _CONV(x, weight, conv_state=conv_state, activation=activation)


def gdn06_conv_state_time_major():
    """GDN-06: the decode path reads the channel-major (B, C, K-1) conv state as if it were time-major
    (B, K-1, C), so the history tokens come back scrambled (invisible when K = 2)."""
    return _everywhere("broken:GDN-06-conv-state-time-major", (conv_module, "causal_conv1d", _time_major_state),
                       (layer_module, "causal_conv1d", _time_major_state))


def _shifted_conv(x, weight, *, conv_state=None, activation="silu"):
    padded = np.concatenate([x, np.zeros_like(x[:, :1])], axis=1)
    out, _ = _CONV(padded, weight, conv_state=conv_state, activation=activation)
    _, state = _CONV(x, weight, conv_state=conv_state, activation=activation)
    return out[:, 1:], state


def conv_off_by_one():
    """The conv window one step late: output t sees inputs t-K+2 .. t+1 (one future input), not t-K+1 .. t."""
    return _everywhere("broken:GDN-conv-off-by-one", (conv_module, "causal_conv1d", _shifted_conv),
                       (layer_module, "causal_conv1d", _shifted_conv))


# -- the gated norm


def gated_norm_one_plus_w():
    """The gated norm weight read as Gemma's 1 + w (it is a plain w, initialised to ones)."""
    wrong = lambda x, weight, z, eps: _NORM(x, weight + 1, z, eps)  # noqa: E731
    return _everywhere("broken:GDN-gated-norm-1+w", (rmsnorm, "gated_rms_norm", wrong),
                       (layer_module, "gated_rms_norm", wrong))


def _gate_before_norm(x, weight, z, eps):
    gated = x * silu(z)
    return weight * gated / np.sqrt(np.mean(gated * gated, axis=-1, keepdims=True) + eps)


def gated_norm_silu_before_norm():
    """silu(z) applied to x before normalising (the gate inside the statistics) instead of after."""
    return _everywhere("broken:GDN-gate-before-norm", (rmsnorm, "gated_rms_norm", _gate_before_norm),
                       (layer_module, "gated_rms_norm", _gate_before_norm))


def _ratio_decay_chunk(state, q, k, v, g, beta):
    """``delta_rule._chunk`` with the pairwise decay formed as the ratio exp(gamma_r) * exp(-gamma_s)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _ratio_decay_chunk_body(state, q, k, v, g, beta)


def _ratio_decay_chunk_body(state, q, k, v, g, beta):
    n = g.shape[-1]
    gamma = np.cumsum(g, axis=-1)
    causal = np.tril(np.ones((n, n), dtype=bool))
    # the mistake: exp(-gamma_s) overflows once the chunk's cumulative log-decay passes -88 (float32) or -709
    # (float64), and inf * 0 is NaN
    decay = np.where(causal, np.exp(gamma)[..., :, None] * np.exp(-gamma)[..., None, :], 0)
    to_end = (np.exp(gamma[..., -1:]) * np.exp(-gamma))[..., None] * k
    system = np.tril(beta[..., :, None] * (k @ np.swapaxes(k, -1, -2)) * decay, -1)
    dv = v.shape[-1]
    rhs = np.concatenate([beta[..., None] * v, (beta * np.exp(gamma))[..., None] * k], -1)
    solved = dr.solve_unit_lower(system, rhs)
    corrected = solved[..., :dv] - solved[..., dv:] @ state
    out = np.exp(gamma)[..., None] * (q @ state) + ((q @ np.swapaxes(k, -1, -2)) * decay) @ corrected
    state = np.exp(gamma[..., -1])[..., None, None] * state + np.swapaxes(to_end, -1, -2) @ corrected
    return out, state


def ratio_decay():
    """The chunked form's pairwise decay Gamma[r, s] as exp(gamma_r) * exp(-gamma_s) (and the decay to the
    chunk's end likewise) instead of exp(gamma_r - gamma_s): equal in exact arithmetic, inf * 0 = NaN once
    a chunk's cumulative log-decay passes float32's exp range (strong decays: trained weights, or
    transformers' own A ~ U(0.01, 16) init)."""
    return _everywhere("broken:GDN-ratio-decay", (dr, "_chunk", _ratio_decay_chunk))


def _fresh_if_row0_fresh(function, state_name):
    """``function`` that drops the whole batch's ``state_name`` when row 0's is all zero."""

    def run(*args, **kwargs):
        state = kwargs.get(state_name)
        # the mistake: one "has initial state" flag for the batch, read from its first sequence
        if state is not None and not np.any(state[0]):
            kwargs[state_name] = None
        return function(*args, **kwargs)

    return run


def has_initial_state_from_row0():
    """vLLM-style ``has_initial_state`` decided once for the batch from row 0: a batch whose first sequence
    starts fresh (zero states) runs every row from zero states, dropping the other rows' recurrent and
    conv states."""
    rule_c = _fresh_if_row0_fresh(_CHUNKED, "initial_state")
    rule_r = _fresh_if_row0_fresh(_RECURRENT, "initial_state")
    conv = _fresh_if_row0_fresh(_CONV, "conv_state")
    return _everywhere("broken:GDN-has-initial-state-from-row0",
                       (dr, "gated_delta_rule_chunked", rule_c), (dr, "gated_delta_rule_recurrent", rule_r),
                       (layer_module, "gated_delta_rule_chunked", rule_c),
                       (layer_module, "gated_delta_rule_recurrent", rule_r),
                       (conv_module, "causal_conv1d", conv), (layer_module, "causal_conv1d", conv))


# -- eps of the layer's two norms


def _gated_norm_eps_1e6(x, weight, z, eps):
    return _NORM(x, weight, z, 1e-6)


def gated_norm_eps_fixed():
    """The layer's gated output norm with eps hard-coded 1e-6 instead of ``rms_norm_eps`` (the
    ``gated_rms_norm`` op itself is right: the mistake sits where the layer calls it)."""
    return _everywhere("broken:GDN-gated-norm-eps-1e-6", (layer_module, "gated_rms_norm", _gated_norm_eps_1e6))


_L2 = layer_module.l2_normalize


def l2_eps_from_config(run_layer):
    """``run_layer(hidden_states, *args, rms_norm_eps=..., **kwargs)`` whose q / k L2 norm takes
    ``rms_norm_eps`` instead of its own 1e-6."""

    def run(*args, rms_norm_eps, **kwargs):
        with mock.patch.object(layer_module, "l2_normalize", lambda x: _L2(x, rms_norm_eps)):
            return run_layer(*args, rms_norm_eps=rms_norm_eps, **kwargs)

    return run


def l2_norm_eps_from_rms_norm_eps():
    """The q / k L2 norm with eps = ``rms_norm_eps`` instead of its own fixed 1e-6 (transformers' and fla's
    ``l2norm`` default)."""
    return _BrokenOps("broken:GDN-l2-eps-is-rms-norm-eps", gated_deltanet=l2_eps_from_config(ref.gated_deltanet_layer))


# -- projection grouping and conv channel order


_SPLIT = layer_module.split_projections


def _split_contiguous(qkvz, ba, d):
    batch, length = qkvz.shape[:2]
    # the mistake: [all q | all k | all v | all z] and [all b | all a] instead of groups per key head
    q, k, v, z = np.split(qkvz, np.cumsum([d.hk * d.dk, d.hk * d.dk, d.hv * d.dv]), axis=-1)
    b, a = np.split(ba, 2, axis=-1)
    return (q.reshape(batch, length, d.hk, d.dk), k.reshape(batch, length, d.hk, d.dk),
            v.reshape(batch, length, d.hv, d.dv), z.reshape(batch, length, d.hv, d.dv), b, a)


def split_contiguous():
    """The fused projections read as four (two) contiguous blocks of the whole output, not grouped per key
    head as ``fix_query_key_value_ordering`` reads them (identical only when Hk = 1)."""
    return _everywhere("broken:GDN-split-contiguous", (layer_module, "split_projections", _split_contiguous))


def _split_ba_contiguous(qkvz, ba, d):
    q, k, v, z, _, _ = _SPLIT(qkvz, ba, d)
    b, a = np.split(ba, 2, axis=-1)
    return q, k, v, z, b, a


def split_ba_contiguous():
    """Only ``in_proj_ba`` misread, as [all b | all a] instead of [b_g | a_g] per key head (q, k, v, z right)."""
    return _everywhere("broken:GDN-split-ba-contiguous", (layer_module, "split_projections", _split_ba_contiguous))


def _conv_channels_grouped(q, k, v, weight, conv_state, d):
    batch, length = q.shape[:2]
    # the mistake: conv channels in the per-key-head order [q_g | k_g | v_g] of the raw projection
    grouped = np.concatenate([q, k, v.reshape(batch, length, d.hk, d.r * d.dv)], axis=-1).reshape(batch, length, -1)
    out, conv_state = _CONV(grouped, weight[:, 0, :], conv_state=conv_state, activation="silu")
    out = out.reshape(batch, length, d.hk, -1)
    return (out[..., :d.dk], out[..., d.dk:2 * d.dk], out[..., 2 * d.dk:].reshape(batch, length, d.hv, d.dv),
            conv_state)


def conv_channels_grouped():
    """The conv taps applied to the channels in per-key-head order [q_g | k_g | v_g] instead of
    [all q | all k | all v], the channel order of ``conv1d.weight`` (identical only when Hk = 1)."""
    return _everywhere("broken:GDN-conv-channels-grouped", (layer_module, "_short_conv", _conv_channels_grouped))
