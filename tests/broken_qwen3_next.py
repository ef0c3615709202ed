"""Deliberately wrong Qwen3-Next backends: each makes one mistake an engine could ship.

Each is the reference with one component swapped for a wrong variant (see
``tests/broken_backends.py`` for the pattern). Used as
``--backend broken_qwen3_next:<factory>`` with ``tests/`` on the import path. The
patches act on the Qwen3-Next model (its gated attention, MoE block and config); the
other architectures run unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit
from refimpl import gated_attention
from refimpl.model import check_weights
from refimpl.models import qwen3_next
from refimpl.rmsnorm import rms_norm
from refimpl.rope import apply_rope_rotate_half
from refimpl.routers import softmax_top_k

# --- gated attention ---------------------------------------------------------------------------------------------


def split_into_halves(query_and_gate, head_dim):
    """QN1: queries from the first half of q_proj's output, the gate from the second half (instead of
    ``[q_h | g_h]`` per head)."""
    q, gate = np.split(query_and_gate, 2, axis=-1)
    return q.reshape(*q.shape[:-1], -1, head_dim), gate


def gate_split_halves() -> _BrokenBackend:
    return _BrokenBackend("broken:QN1-gate-halves",
                          lambda: mock.patch.object(gated_attention, "split_query_and_gate", split_into_halves))


def gate_without_sigmoid() -> _BrokenBackend:
    """The raw gate multiplies the attention output (the sigmoid forgotten)."""
    return _BrokenBackend("broken:gate-no-sigmoid", lambda: mock.patch.object(
        gated_attention, "apply_output_gate", lambda attended, gate: attended * gate))


def gate_silu() -> _BrokenBackend:
    """``silu(gate)`` instead of ``sigmoid(gate)`` (the activation of the MLPs and of the GDN's output gate)."""
    return _BrokenBackend("broken:gate-silu", lambda: mock.patch.object(
        gated_attention, "apply_output_gate", lambda attended, gate: attended * gate / (1 + np.exp(-gate))))


def qk_norm_plain_weight() -> _BrokenBackend:
    """QN2 / NRM-02: the q and k norms computed as ``w * n(x)`` instead of ``(1 + w) * n(x)`` (the only
    norms computed inside :mod:`refimpl.gated_attention`)."""
    def plain(x, weight, eps, weight_offset=0.0):
        return rms_norm(x, weight, eps)

    return _BrokenBackend("broken:QN2-qk-norm-w", lambda: mock.patch.object(gated_attention, "rms_norm", plain))


def full_rotary() -> _BrokenBackend:
    """Partial RoPE lost: ``partial_rotary_factor`` never read, all D channels of each head rotated."""
    def edit(c):
        if not isinstance(c, qwen3_next.Qwen3NextConfig):
            return c
        return dataclasses.replace(c, rope_parameters={k: v for k, v in c.rope_parameters.items()
                                                       if k != "partial_rotary_factor"})

    return _ConfigEdit("broken:full-rotary", edit)


def rotate_last_channels(x, cos, sin):
    """QN8: the partial rotation applied to the LAST Dr channels of each head instead of the first."""
    dr = 2 * cos.shape[-1]
    d = x.shape[-1]
    moved = np.concatenate([x[..., d - dr:], x[..., :d - dr]], axis=-1)
    rotated = apply_rope_rotate_half(moved, cos, sin)
    return np.concatenate([rotated[..., dr:], rotated[..., :dr]], axis=-1)


def partial_rotary_last_dims() -> _BrokenBackend:
    return _BrokenBackend("broken:QN8-rotary-last-dims",
                          lambda: mock.patch.object(gated_attention, "apply_rope_rotate_half", rotate_last_channels))


def rotate_pairs_across_head(x, cos, sin):
    """QN8: the Dr/2 frequencies applied to pairs (i, i + D/2) of the whole head (rotate-half over D)
    instead of (i, i + Dr/2) within the first Dr channels."""
    half, d = cos.shape[-1], x.shape[-1]
    c, s = cos[..., None, :], sin[..., None, :]
    out = x.copy()
    x1, x2 = x[..., :half], x[..., d // 2:d // 2 + half]
    out[..., :half] = x1 * c - x2 * s
    out[..., d // 2:d // 2 + half] = x2 * c + x1 * s
    return out


def partial_rotary_pairs_across_head() -> _BrokenBackend:
    return _BrokenBackend("broken:QN8-pairs-across-head", lambda: mock.patch.object(
        gated_attention, "apply_rope_rotate_half", rotate_pairs_across_head))


def partial_factor_top_level_first() -> _BrokenBackend:
    """A top-level ``partial_rotary_factor`` read in preference to the one inside ``rope_parameters``
    (transformers only ``setdefault``s the top-level value into the dict)."""
    class TopLevelFirst(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            raw = json.loads((checkpoint_dir / "config.json").read_text())
            config = model.model.config
            if isinstance(config, qwen3_next.Qwen3NextConfig) and raw.get("partial_rotary_factor") is not None:
                params = {**config.rope_parameters, "partial_rotary_factor": raw["partial_rotary_factor"]}
                model.model.config = dataclasses.replace(config, rope_parameters=params)
            return model

    return TopLevelFirst("broken:partial-factor-top-level-first")


# --- layer schedule ----------------------------------------------------------------------------------------------


class _ScheduleEdit(_BrokenBackend):
    """A schedule an engine would build its layers from: the checkpoint is then checked against the
    layers it built, as loading it would (a wrong schedule meets missing weights)."""

    def __init__(self, name, edit):
        super().__init__(name)
        self._edit = edit

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        raw = json.loads((checkpoint_dir / "config.json").read_text())
        inner = model.model
        if isinstance(inner.config, qwen3_next.Qwen3NextConfig):
            inner.config = self._edit(inner.config, raw)
            check_weights(inner.architecture, inner.config, inner.weights)
        return model


def _from_interval(config, full):
    types = tuple("full_attention" if full(i, config.full_attention_interval) else "linear_attention"
                  for i in range(config.num_hidden_layers))
    return dataclasses.replace(config, layer_types=types)


def schedule_off_by_one() -> _BrokenBackend:
    """Full attention on layers ``l % interval == 0`` (0, 4, 8, ...) instead of ``(l + 1) % interval == 0``
    (3, 7, 11, ...), where config.json gives only ``full_attention_interval``."""
    def edit(config, raw):
        if raw.get("layer_types") is not None:
            return config
        return _from_interval(config, lambda i, n: i % n == 0)

    return _ScheduleEdit("broken:schedule-off-by-one", edit)


def layer_types_ignored() -> _BrokenBackend:
    """``layer_types`` never read: the schedule always derived from ``full_attention_interval``."""
    return _ScheduleEdit("broken:layer-types-ignored",
                         lambda config, raw: _from_interval(config, lambda i, n: (i + 1) % n == 0))


# --- MoE ---------------------------------------------------------------------------------------------------------


def shared_expert_ungated() -> _BrokenBackend:
    """QN9: the shared expert added without its per-token ``sigmoid(shared_expert_gate(x))`` scale."""
    def ungated(rows, w, hidden_act):
        from refimpl.mlp import gated_mlp

        return gated_mlp(rows, w["shared_expert.gate_proj.weight"], w["shared_expert.up_proj.weight"],
                         w["shared_expert.down_proj.weight"], hidden_act)

    return _BrokenBackend("broken:QN9-shared-expert-ungated",
                          lambda: mock.patch.object(qwen3_next, "shared_expert", ungated))


def _norm_topk_forced(value: bool):
    def router(router_logits, top_k, *, norm_topk_prob):
        return softmax_top_k(router_logits, top_k, norm_topk_prob=value)

    return router


def norm_topk_ignored() -> _BrokenBackend:
    """``norm_topk_prob`` never read; the top-k probabilities always renormalised (Qwen3-Next's default)."""
    return _BrokenBackend("broken:norm-topk-ignored",
                          lambda: mock.patch.object(qwen3_next, "softmax_top_k", _norm_topk_forced(True)))


def norm_topk_default_false() -> _BrokenBackend:
    """An absent ``norm_topk_prob`` read as false, Qwen3-MoE's class default (Qwen3-Next's is true)."""
    class DefaultFalse(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            raw = json.loads((checkpoint_dir / "config.json").read_text())
            config = model.model.config
            if isinstance(config, qwen3_next.Qwen3NextConfig) and "norm_topk_prob" not in raw:
                model.model.config = dataclasses.replace(config, norm_topk_prob=False)
            return model

    return DefaultFalse("broken:norm-topk-default-false")


# --- Gated DeltaNet numerics and eps (the op-level mistakes of tests/broken_gdn_op_backends.py in the model) ------


def ratio_decay() -> _BrokenBackend:
    """The delta rule's pairwise decay as exp(gamma_r) * exp(-gamma_s): NaN once a chunk's cumulative
    log-decay passes float32's exp range, as it does under transformers' A ~ U(0.01, 16) init."""
    from broken_gdn_op_backends import _ratio_decay_chunk
    from refimpl.linear_attention import delta_rule

    return _BrokenBackend("broken:GDN-ratio-decay",
                          lambda: mock.patch.object(delta_rule, "_chunk", _ratio_decay_chunk))


def gated_norm_eps_fixed() -> _BrokenBackend:
    """The Gated DeltaNet's gated output norm with eps hard-coded 1e-6 instead of ``rms_norm_eps``."""
    from broken_gdn_op_backends import _gated_norm_eps_1e6, layer_module

    return _BrokenBackend("broken:GDN-gated-norm-eps-1e-6",
                          lambda: mock.patch.object(layer_module, "gated_rms_norm", _gated_norm_eps_1e6))


def l2_norm_eps_from_rms_norm_eps() -> _BrokenBackend:
    """The Gated DeltaNet's q / k L2 norm with eps = ``rms_norm_eps`` instead of its own 1e-6."""
    from broken_gdn_op_backends import l2_eps_from_config

    return _BrokenBackend("broken:GDN-l2-eps-is-rms-norm-eps", lambda: mock.patch.object(
        qwen3_next, "gated_deltanet_step", l2_eps_from_config(qwen3_next.gated_deltanet_step)))
