"""Deliberately wrong DeepSeek-V3 backends: the reference with one MLA or MoE step made wrong.

Each factory is the refimpl backend with one module global of
``refimpl.models.deepseek_v3`` or ``refimpl.mla`` patched for the run, so the only
difference from a correct backend is that mistake (bug class in the docstring). Used
as ``--backend broken_deepseek_v3:<factory>`` with ``tests/`` on the import path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import ExitStack
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend
from refimpl import mla
from refimpl.model import check_weights
from refimpl.models import deepseek_v3
from refimpl.rope import apply_rope_rotate_half

_router = deepseek_v3.sigmoid_group_top_k


def wrong_router(router_logits, bias, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                 bias_in_weights=False, mask_fill=-np.inf, scale_only_when_renormalising=False):
    """DeepSeek-V3's router written again with one of three known mistakes switchable."""
    scores = 1 / (1 + np.exp(-router_logits))
    choice = scores + bias
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
    kept = np.zeros((n, n_group), dtype=bool)
    np.put_along_axis(kept, np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group], True, axis=-1)
    masked = np.where(np.repeat(kept, e // n_group, axis=-1), choice, mask_fill)
    indices = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(choice if bias_in_weights else scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if norm_topk_prob or not scale_only_when_renormalising:
        weights = weights * routed_scaling_factor
    return weights.astype(router_logits.dtype), indices


def _router_with(**mistake):
    def router(router_logits, bias, **kwargs):
        return wrong_router(router_logits, bias, **kwargs, **mistake)
    return lambda: mock.patch.object(deepseek_v3, "sigmoid_group_top_k", router)


def bias_in_weights() -> _BrokenBackend:
    """MOE-01: combine weights gathered from the biased scores s + b."""
    return _BrokenBackend("broken:ds-bias-in-weights", _router_with(bias_in_weights=True))


def group_mask_zero_fill() -> _BrokenBackend:
    """MOE-02/03: experts of dropped groups masked with 0 instead of -inf."""
    return _BrokenBackend("broken:ds-group-mask-zero", _router_with(mask_fill=0.0))


def scale_only_when_renormalising() -> _BrokenBackend:
    """MOE-05: routed_scaling_factor applied only inside the norm_topk_prob branch."""
    return _BrokenBackend("broken:ds-rsf-only-with-renorm", _router_with(scale_only_when_renormalising=True))


def routed_scaling_twice() -> _BrokenBackend:
    """MOE-08: the factor applied by the router and again on the routed output."""
    def router(router_logits, bias, **kwargs):
        weights, indices = _router(router_logits, bias, **kwargs)
        return weights * kwargs["routed_scaling_factor"], indices
    return _BrokenBackend("broken:ds-rsf-twice", lambda: mock.patch.object(deepseek_v3, "sigmoid_group_top_k", router))


def group_limit_ignored() -> _BrokenBackend:
    """Plain top-k over all experts: n_group / topk_group not applied."""
    def router(router_logits, bias, **kwargs):
        return _router(router_logits, bias, **dict(kwargs, n_group=1, topk_group=1))
    return _BrokenBackend("broken:ds-no-group-limit",
                          lambda: mock.patch.object(deepseek_v3, "sigmoid_group_top_k", router))


def shared_expert_scaled() -> _BrokenBackend:
    """MOE-09 / spec quirk 3, reading A: routed_scaling_factor applied to routed + shared output."""
    block = deepseek_v3.moe_block

    def moe_block(hidden_states, weights, config):
        unscaled = dataclasses.replace(config, routed_scaling_factor=1.0)
        return block(hidden_states, weights, unscaled) * config.routed_scaling_factor
    return _BrokenBackend("broken:ds-shared-expert-scaled",
                          lambda: mock.patch.object(deepseek_v3, "moe_block", moe_block))


def softmax_scale_from_mscale() -> _BrokenBackend:
    """MLA-03: the softmax correction m(factor, mscale)^2 instead of m(factor, mscale_all_dim)^2."""
    def scale(qk_head_dim, rope_parameters):
        if rope_parameters.get("rope_type", "default") == "default" or not rope_parameters.get("mscale_all_dim"):
            return qk_head_dim ** -0.5
        m = 0.1 * rope_parameters["mscale"] * math.log(rope_parameters["factor"]) + 1
        return qk_head_dim ** -0.5 * m * m
    return _BrokenBackend("broken:mla-scale-from-mscale", lambda: mock.patch.object(mla, "mla_softmax_scale", scale))


def no_softmax_mscale() -> _BrokenBackend:
    """MLA-02: softmax scale (Dn + Dr)^-1/2 without the YaRN m^2 correction."""
    return _BrokenBackend("broken:mla-no-mscale-squared",
                          lambda: mock.patch.object(mla, "mla_softmax_scale", lambda d, _: d ** -0.5))


def yarn_magnitude_dropped() -> _BrokenBackend:
    """RSC-12: YaRN's cos/sin magnitude m(f, mscale) / m(f, mscale_all_dim) dropped (taken as 1)."""
    frequencies = mla.rope_frequencies

    def without_magnitude(*args, **kwargs):
        return frequencies(*args, **kwargs)[0], 1.0
    return _BrokenBackend("broken:mla-yarn-magnitude-dropped",
                          lambda: mock.patch.object(mla, "rope_frequencies", without_magnitude))


def rope_interleave_ignored() -> _BrokenBackend:
    """Rotate-half pairs (i, i + Dr/2) whatever ``rope_interleave`` says (DeepSeek checkpoints pair (2i, 2i+1))."""
    return _BrokenBackend("broken:mla-rope-interleave-ignored",
                          lambda: mock.patch.object(mla, "rotate", lambda x, c, s, _: apply_rope_rotate_half(x, c, s)))


def latent_norm_eps_from_config() -> _BrokenBackend:
    """q_a/kv_a layernorms with ``rms_norm_eps`` instead of the fixed 1e-6 (differs where the config says 1e-5)."""
    class EpsFromConfig(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            eps = model.model.config.rms_norm_eps
            model._patch = lambda: mock.patch.object(mla, "LATENT_NORM_EPS", eps)
            return model
    return EpsFromConfig("broken:mla-latent-eps-from-config")


def _w_uv_heads_reversed(step, c_kv, k_rope, mask):
    """Absorbed attention applying head h's latent output through W^UV of head H-1-h (W^UK kept)."""
    dims = step.dims
    per_head = step.weights["kv_b_proj.weight"].reshape(dims.num_attention_heads, -1, dims.kv_lora_rank)
    w_uk, w_uv = per_head[:, :dims.qk_nope_head_dim], per_head[:, dims.qk_nope_head_dim:]
    swapped = np.concatenate([w_uk, w_uv[::-1]], axis=1).reshape(-1, dims.kv_lora_rank)
    wrong = dataclasses.replace(step, weights={**step.weights, "kv_b_proj.weight": swapped})
    return mla.mla_attend_absorbed(wrong, c_kv, k_rope, mask)


def absorbed_mla() -> _BrokenBackend:
    """Not broken: the absorbed MLA form (refimpl.mla.mla_attend_absorbed) for fresh calls too."""
    return _BrokenBackend("absorbed-mla",
                          lambda: mock.patch.object(deepseek_v3, "mla_attend_literal", mla.mla_attend_absorbed))


def absorbed_w_uv_wrong_head() -> _BrokenBackend:
    """Absorbed MLA applying head h's latent output through W^UV of head H-1-h (a head-sharding slip),
    in fresh calls and in calls continuing a cache."""
    def patch():
        stack = ExitStack()
        for name in ("mla_attend_literal", "mla_attend_absorbed"):
            stack.enter_context(mock.patch.object(deepseek_v3, name, _w_uv_heads_reversed))
        return stack
    return _BrokenBackend("broken:mla-absorbed-w-uv-wrong-head", patch)


class _RawConfigEdit(_BrokenBackend):
    """The reference with its parsed config rewritten by ``edit(config, raw config.json)``: a
    mistake in reading config.json that depends on which keys the file holds. The checkpoint
    is then checked against the layers that config builds, as loading it would."""

    def __init__(self, name, edit):
        super().__init__(name)
        self._edit = edit

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        raw = json.loads((checkpoint_dir / "config.json").read_text())
        inner = model.model
        if isinstance(inner.config, deepseek_v3.DeepseekV3Config):
            inner.config = self._edit(inner.config, raw)
            check_weights(inner.architecture, inner.config, inner.weights)
        return model


def softmax_scale_from_rope_head_dim() -> _BrokenBackend:
    """MLA softmax scale (2 Dr)^-1/2 (with the YaRN m^2): the qk width taken as twice transformers'
    ``head_dim`` (= qk_rope_head_dim) instead of Dn + Dr; right only where Dn == Dr."""
    scale = mla.mla_softmax_scale

    class ScaleFromRopeDim(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            dr = model.model.config.qk_rope_head_dim
            model._patch = lambda: mock.patch.object(mla, "mla_softmax_scale", lambda _, rope: scale(2 * dr, rope))
            return model
    return ScaleFromRopeDim("broken:mla-scale-from-2-dr")


def q_lora_rank_null_as_default() -> _BrokenBackend:
    """``config.get("q_lora_rank") or 1536``: an explicit null read as the default, so the model is built with
    q_a_proj / q_b_proj and a checkpoint with q_proj cannot load."""
    def edit(config, raw):
        return config if config.q_lora_rank is not None else dataclasses.replace(config, q_lora_rank=1536)
    return _RawConfigEdit("broken:q-lora-null-as-1536", edit)


def mscale_all_dim_defaults_to_one() -> _BrokenBackend:
    """MLA-02: a YaRN config without ``mscale_all_dim`` read as mscale_all_dim 1, so the softmax gets
    m(factor, 1)^2 (and cos/sin keep m(factor, 1) as mscale is absent): the rope scores scaled twice."""
    def edit(config, raw):
        rope = config.rope_parameters
        if rope.get("rope_type") != "yarn" or "mscale_all_dim" in rope:
            return config
        return dataclasses.replace(config, rope_parameters={**rope, "mscale_all_dim": 1.0})
    return _RawConfigEdit("broken:mla-mscale-all-dim-default-1", edit)


def routed_scaling_default_one() -> _BrokenBackend:
    """``config.get("routed_scaling_factor", 1.0)``: an absent factor taken as 1, not DeepSeek-V3's 2.5."""
    return _RawConfigEdit("broken:rsf-default-1", lambda c, raw: c if "routed_scaling_factor" in raw
                          else dataclasses.replace(c, routed_scaling_factor=1.0))


def group_limit_default_off() -> _BrokenBackend:
    """``n_group`` / ``topk_group`` absent read as 1 / 1 (no group limit), not DeepSeek-V3's 8 / 4."""
    return _RawConfigEdit("broken:groups-default-1", lambda c, raw: dataclasses.replace(
        c, n_group=raw.get("n_group", 1), topk_group=raw.get("topk_group", 1)))
