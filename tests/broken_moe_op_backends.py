"""Deliberately wrong MoE / MLA op backends, one per mistake of ``docs/bug-classes.md``.

Each is the reference's op table with one op (or a few ops sharing the mistake)
replaced by a wrong variant an engine has shipped; the class is in the name.
Used as ``--backend broken_moe_op_backends:<factory>`` with ``tests/`` on the
import path; ``tests/test_broken_moe_op_backends.py`` shows each failing the cases
built to catch it, at float32 and float64.
"""

from __future__ import annotations

from unittest import mock

import numpy as np

from broken_op_backends import _BrokenOps
from refimpl import mla as mla_module
from refimpl import ops as ref
from refimpl import routers
from refimpl.experts import clamped_swiglu_expert, input_major_swiglu_expert, swiglu_expert
from refimpl.models import llama4 as llama4_module
from refimpl.rope import yarn_mscale


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _scaled(weights, norm_topk_prob, routed_scaling_factor):
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor


# -- routers


def moe01_bias_in_weights():
    """MOE-01: the combine weights gathered from sigmoid(logit) + bias instead of the unbiased sigmoid."""

    def group(router_logits, e_score_correction_bias, *, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
        _, indices = routers.sigmoid_group_top_k(router_logits, e_score_correction_bias, top_k=top_k, n_group=n_group,
                                                 topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                                                 routed_scaling_factor=routed_scaling_factor)
        biased = np.take_along_axis(_sigmoid(router_logits) + e_score_correction_bias, indices, axis=-1)
        return ref._routing(_scaled(biased, norm_topk_prob, routed_scaling_factor), indices, router_logits.shape[1])

    def minimax(router_logits, e_score_correction_bias, *, top_k):
        _, indices = routers.sigmoid_bias_top_k(router_logits, e_score_correction_bias, top_k)
        biased = np.take_along_axis(_sigmoid(router_logits) + e_score_correction_bias, indices, axis=-1)
        return ref._routing(biased / biased.sum(axis=-1, keepdims=True), indices, router_logits.shape[1])

    return _BrokenOps("broken:MOE-01-bias-in-weights", sigmoid_group_top_k=group, sigmoid_bias_top_k=minimax)


def moe02_group_mask_zero_fill():
    """MOE-02/03: experts of the dropped groups masked with 0 instead of -inf (wrong once scores go negative)."""

    def group(router_logits, e_score_correction_bias, *, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
        scores = _sigmoid(router_logits)
        choice = scores + e_score_correction_bias
        grouped = choice.reshape(len(choice), n_group, -1)
        group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)
        kept = np.zeros(group_scores.shape, dtype=bool)
        np.put_along_axis(kept, routers.top_k_indices(group_scores, topk_group), True, axis=-1)
        choice = np.where(np.repeat(kept, grouped.shape[-1], axis=-1), choice, 0.0)
        indices = routers.top_k_indices(choice, top_k)
        weights = np.take_along_axis(scores, indices, axis=-1)
        return ref._routing(_scaled(weights, norm_topk_prob, routed_scaling_factor), indices, router_logits.shape[1])

    return _BrokenOps("broken:MOE-02-group-fill-0", sigmoid_group_top_k=group)


def moe04_raw_logits_without_renorm():
    """MOE-04: softmax applied only inside the renormalise branch; without it the raw logits are the weights."""

    def wrong(router_logits, *, top_k, norm_topk_prob):
        if norm_topk_prob:
            return ref.route_softmax_top_k(router_logits, top_k=top_k, norm_topk_prob=True)
        indices = routers.top_k_indices(router_logits, top_k)
        raw = np.take_along_axis(router_logits, indices, axis=-1)
        return ref._routing(raw, indices, router_logits.shape[1])

    return _BrokenOps("broken:MOE-04-raw-logits", softmax_top_k=wrong)


def moe05_scale_only_when_renormalised():
    """MOE-05: routed_scaling_factor nested inside ``if norm_topk_prob``."""

    def wrong(router_logits, e_score_correction_bias, *, routed_scaling_factor, norm_topk_prob, **kw):
        factor = routed_scaling_factor if norm_topk_prob else 1.0
        return ref.route_sigmoid_group_top_k(router_logits, e_score_correction_bias, routed_scaling_factor=factor,
                                             norm_topk_prob=norm_topk_prob, **kw)

    return _BrokenOps("broken:MOE-05-scale-only-renormalised", sigmoid_group_top_k=wrong)


def moe08_scale_applied_twice():
    """MOE-08: routed_scaling_factor applied in the router and again by the caller (rsf^2)."""

    def wrong(router_logits, e_score_correction_bias, *, routed_scaling_factor, **kw):
        out = ref.route_sigmoid_group_top_k(router_logits, e_score_correction_bias,
                                            routed_scaling_factor=routed_scaling_factor, **kw)
        return {**out, "routing_weights": out["routing_weights"] * routed_scaling_factor}

    return _BrokenOps("broken:MOE-08-scale-twice", sigmoid_group_top_k=wrong)


def group_limit_ignored():
    """Group-limited routing dropped: top-k over all experts as if n_group = topk_group = 1."""

    def wrong(router_logits, e_score_correction_bias, *, n_group, topk_group, **kw):
        return ref.route_sigmoid_group_top_k(router_logits, e_score_correction_bias, n_group=1, topk_group=1, **kw)

    return _BrokenOps("broken:MOE-group-limit-ignored", sigmoid_group_top_k=wrong)


# -- experts and dispatch


def act02_clamp_ignored():
    """ACT-02: the expert's swiglu_limit never reaches the kernel: gpt-oss's activation unclamped."""

    def wrong(x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *, swiglu_limit, alpha=1.702):
        h = x @ gate_up_proj + gate_up_proj_bias
        gate, up = h[:, 0::2], h[:, 1::2]
        return ((up + 1) * gate * _sigmoid(alpha * gate)) @ down_proj + down_proj_bias

    return _BrokenOps("broken:ACT-02-clamp-ignored", clamped_swiglu_expert=wrong)


def act05_clamp_after_activation():
    """ACT-05 (clamp form): the limit applied to the activated gate, min(g sigmoid(alpha g), L)
    (the Ling / GLM form), where gpt-oss clamps the gate before the activation."""

    def wrong(x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *, swiglu_limit, alpha=1.702):
        h = x @ gate_up_proj + gate_up_proj_bias
        gate, up = h[:, 0::2], np.clip(h[:, 1::2], -swiglu_limit, swiglu_limit)
        return ((up + 1) * np.minimum(gate * _sigmoid(alpha * gate), swiglu_limit)) @ down_proj + down_proj_bias

    return _BrokenOps("broken:ACT-05-clamp-after-activation", clamped_swiglu_expert=wrong)


def _swap_layout(gate_up: np.ndarray, axis: int) -> np.ndarray:
    """Reorder gate|up halves <-> interleaved pairs along ``axis`` (what reading the other layout does)."""
    half = gate_up.shape[axis] // 2
    first, second = np.split(gate_up, [half], axis=axis)
    return np.stack([first, second], axis=axis + 1).reshape(gate_up.shape)


def act04_wrong_gate_up_layout():
    """ACT-04: every expert kernel reads one fixed gate/up layout: concatenated stacks read as
    interleaved pairs, and gpt-oss's interleaved stack read as halves."""

    def concatenated(x, gate_up_proj, down_proj, *, hidden_act="silu"):
        return swiglu_expert(x, _swap_layout(gate_up_proj, 0), down_proj, hidden_act)

    def input_major(x, gate_up_proj, down_proj):
        return input_major_swiglu_expert(x, _swap_layout(gate_up_proj, 1), down_proj)

    def clamped(x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, **kw):
        # Interleaved columns read as [gate | up] halves: un-interleave, which puts gates first.
        order = np.concatenate([np.arange(0, gate_up_proj.shape[1], 2), np.arange(1, gate_up_proj.shape[1], 2)])
        inverse = np.argsort(order)
        return clamped_swiglu_expert(x, gate_up_proj[:, inverse], gate_up_proj_bias[inverse], down_proj,
                                     down_proj_bias, **kw)

    return _BrokenOps("broken:ACT-04-gate-up-layout", swiglu_expert=concatenated,
                      input_major_swiglu_expert=input_major, clamped_swiglu_expert=clamped)


def act07_weight_on_output():
    """ACT-07: ``apply_router_weight_on_input`` ignored: Llama 4's routing weight scales the expert output."""

    def dispatch_on_output(x, routing_weights, indices, gate_up_proj, down_proj, *, weight_on="output"):
        return ref.moe_dispatch(x, routing_weights, indices, gate_up_proj, down_proj, weight_on="output")

    original = llama4_module.dispatch

    def output_only(*args, weight_on="output", **kwargs):
        return original(*args, weight_on="output", **kwargs)

    def block(hidden_states, *, config, **weights):
        with mock.patch.object(llama4_module, "dispatch", output_only):
            return ref.moe_block(hidden_states, config=config, **weights)

    return _BrokenOps("broken:ACT-07-weight-on-output", moe_dispatch=dispatch_on_output, moe_block=block)


# -- MLA


def _mla_with_scale(scale_for):
    """The reference ``mla`` op with ``mla_softmax_scale`` replaced by ``scale_for(params)(qk_head_dim, rope)``."""

    def wrong(hidden_states, positions, **params):
        with mock.patch.object(mla_module, "mla_softmax_scale", scale_for(params)):
            return ref.mla(hidden_states, positions, **params)

    return wrong


def mla02_mscale_ignored():
    """MLA-02: the YaRN m(factor, mscale_all_dim)^2 softmax adjustment left out: (Dn + Dr)^-1/2 only."""
    return _BrokenOps("broken:MLA-02-no-mscale",
                      mla=_mla_with_scale(lambda params: lambda qk_head_dim, rope_parameters: qk_head_dim ** -0.5))


def mla03_mscale_not_all_dim():
    """MLA-03: the softmax adjustment computed from ``mscale`` instead of ``mscale_all_dim``."""

    def scale(params):
        def wrong(qk_head_dim, rope_parameters):
            if rope_parameters.get("rope_type", "default") == "default" or not rope_parameters.get("mscale_all_dim"):
                return qk_head_dim ** -0.5
            m = yarn_mscale(float(rope_parameters["factor"]), float(rope_parameters.get("mscale", 1.0)))
            return qk_head_dim ** -0.5 * m * m

        return wrong

    return _BrokenOps("broken:MLA-03-mscale", mla=_mla_with_scale(scale))


def mla_absorbed_scale_from_latent_width():
    """Absorbed MLA: the softmax scale taken from the absorbed key width (Dc + Dr)^-1/2 -- the width the
    kernel actually dots over -- instead of the model's qk head dim (Dn + Dr)^-1/2."""
    original = mla_module.mla_softmax_scale

    def scale(params):
        if params["form"] != "absorbed":
            return original
        return lambda qk_head_dim, rope_parameters: original(params["kv_lora_rank"] + params["qk_rope_head_dim"],
                                                             rope_parameters)

    return _BrokenOps("broken:MLA-absorbed-scale-latent-width", mla=_mla_with_scale(scale))



def mla_scale_from_rope_head_dim():
    """The MLA softmax scale (2 Dr)^-1/2 (times the YaRN m^2): the qk width taken as twice transformers'
    ``head_dim`` (which DeepseekV3Config sets to qk_rope_head_dim), right only where Dn == Dr."""
    original = mla_module.mla_softmax_scale

    def scale(params):
        return lambda qk_head_dim, rope_parameters: original(2 * params["qk_rope_head_dim"], rope_parameters)

    return _BrokenOps("broken:MLA-scale-2-Dr", mla=_mla_with_scale(scale))


def mla_mscale_all_dim_defaults_to_one():
    """MLA-02: a YaRN config without ``mscale_all_dim`` read as mscale_all_dim 1: the softmax gets
    m(factor, 1)^2 on top of the cos/sin magnitude m(factor, 1) that transformers applies."""

    def wrong(hidden_states, positions, *, rope_parameters, **params):
        if rope_parameters.get("rope_type") == "yarn" and "mscale_all_dim" not in rope_parameters:
            rope_parameters = {**rope_parameters, "mscale_all_dim": 1.0}
        return ref.mla(hidden_states, positions, rope_parameters=rope_parameters, **params)

    return _BrokenOps("broken:MLA-02-mscale-all-dim-default-1", mla=wrong)


def _square_transposed(w: np.ndarray) -> np.ndarray:
    return w.T if w.shape[0] == w.shape[1] else w


def expert_down_orientation_from_shape():
    """An expert loader that tells down_proj's orientation by its shape: the expected shape is used as is,
    the transposed one is transposed back, and a square matrix (I == M) is taken for the transposed one.
    Right for every non-square expert; wrong for every square one, whatever the layout."""

    def concatenated(x, gate_up_proj, down_proj, *, hidden_act="silu"):
        return swiglu_expert(x, gate_up_proj, _square_transposed(down_proj), hidden_act)

    def input_major(x, gate_up_proj, down_proj):
        return input_major_swiglu_expert(x, gate_up_proj, _square_transposed(down_proj))

    def clamped(x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, **kw):
        return clamped_swiglu_expert(x, gate_up_proj, gate_up_proj_bias, _square_transposed(down_proj),
                                     down_proj_bias, **kw)

    return _BrokenOps("broken:expert-down-orientation-from-shape", swiglu_expert=concatenated,
                      input_major_swiglu_expert=input_major, clamped_swiglu_expert=clamped)
