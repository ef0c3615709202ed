"""Deliberately wrong Qwen3-MoE and MiniMax-M2 backends: each makes one mistake engines have shipped.

Each is the reference with one component swapped for a wrong variant (see
``tests/broken_backends.py`` for the pattern). Used as
``--backend broken_qwen3_moe_minimax:<factory>`` with ``tests/`` on the import path.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit, _DefaultEps, _FinalNormEps
from refimpl.model import check_weights
from refimpl.models import _llama_like, minimax_m2, qwen3_moe
from refimpl.moe import sparse_step_schedule
from refimpl.routers import _sigmoid, _softmax, sigmoid_bias_top_k, softmax_top_k, top_k_indices


# --- Qwen3-MoE router ------------------------------------------------------------------------------------------


def raw_logits_unless_renormalised(router_logits, top_k, *, norm_topk_prob):
    """MOE-04: the softmax sits inside the renormalise branch, so without it the gathered raw
    logits become the combine weights."""
    indices = top_k_indices(router_logits, top_k)
    picked = np.take_along_axis(router_logits, indices, axis=-1)
    if norm_topk_prob:
        probs = _softmax(picked)
        return probs, indices
    return picked, indices


def qwen3_moe_raw_logits_without_renorm() -> _BrokenBackend:
    return _BrokenBackend("broken:MOE-04-raw-logits",
                          lambda: mock.patch.object(qwen3_moe, "softmax_top_k", raw_logits_unless_renormalised))


def _norm_topk_forced(value: bool):
    def router(router_logits, top_k, *, norm_topk_prob):
        return softmax_top_k(router_logits, top_k, norm_topk_prob=value)

    return router


def qwen3_moe_always_renormalise() -> _BrokenBackend:
    """``norm_topk_prob`` never read; the top-k probabilities always renormalised (the Mixtral code path)."""
    return _BrokenBackend("broken:norm-topk-always",
                          lambda: mock.patch.object(qwen3_moe, "softmax_top_k", _norm_topk_forced(True)))


def qwen3_moe_never_renormalise() -> _BrokenBackend:
    """``norm_topk_prob`` never read; transformers' default (False) used for every model."""
    return _BrokenBackend("broken:norm-topk-never",
                          lambda: mock.patch.object(qwen3_moe, "softmax_top_k", _norm_topk_forced(False)))


class _ScheduleEdit(_ConfigEdit):
    """A config edit an engine would make while building its layers: the checkpoint is
    then checked against the layers it built, as loading it would."""

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        inner = model.model
        check_weights(inner.architecture, inner.config, inner.weights)
        return model


def qwen3_moe_sparse_step_ignored() -> _BrokenBackend:
    """``decoder_sparse_step`` never read: every layer not in ``mlp_only_layers`` built as MoE."""
    def edit(c):
        if not hasattr(c, "decoder_sparse_step"):
            return c
        return dataclasses.replace(c, is_moe=sparse_step_schedule(c.num_hidden_layers, 1, list(c.mlp_only_layers),
                                                                   c.num_experts))

    return _ScheduleEdit("broken:sparse-step-ignored", edit)


# --- MiniMax-M2 QK-norm ---------------------------------------------------------------------------------------


def _patched_attention(norm_for):
    """``minimax_m2.attention_block`` with its ``rms_norm`` (only the q and k norms run inside) replaced
    by ``norm_for(config)``."""
    original = minimax_m2.attention_block

    def block(x, p, config, *args, **kwargs):
        with mock.patch.object(minimax_m2, "rms_norm", norm_for(config)):
            return original(x, p, config, *args, **kwargs)

    return lambda: mock.patch.object(minimax_m2, "attention_block", block)


def minimax_qk_norm_per_head() -> _BrokenBackend:
    """QKN-03: the q/k norm statistics taken per head over D (as Qwen3 / GLM do) instead of over all heads."""
    def norm_for(config):
        def per_head(x, weight, eps):
            heads = x.reshape(*x.shape[:-1], -1, config.head_dim)
            normed = heads / np.sqrt(np.mean(heads * heads, axis=-1, keepdims=True) + x.dtype.type(eps))
            return weight * normed.reshape(x.shape)

        return per_head

    return _BrokenBackend("broken:QKN-03-per-head", _patched_attention(norm_for))


def minimax_k_norm_query_width() -> _BrokenBackend:
    """QKN-07: k's mean of squares divided by the query width H*D instead of its own Hkv*D
    (one "global width" for both norms; wrong only with GQA / MQA)."""
    def norm_for(config):
        q_width = config.num_attention_heads * config.head_dim

        def norm(x, weight, eps):
            mean_square = np.sum(x * x, axis=-1, keepdims=True) / x.dtype.type(q_width)
            return weight * x / np.sqrt(mean_square + x.dtype.type(eps))

        return norm

    return _BrokenBackend("broken:QKN-07-k-width", _patched_attention(norm_for))


# --- MiniMax-M2 router and RoPE --------------------------------------------------------------------------------


def biased_weights(router_logits, e_score_correction_bias, top_k):
    """MOE-01: the combine weights gathered from the biased scores sigmoid(z) + b, then renormalised."""
    choice = _sigmoid(router_logits) + e_score_correction_bias
    indices = top_k_indices(choice, top_k)
    weights = np.take_along_axis(choice, indices, axis=-1)
    return weights / weights.sum(axis=-1, keepdims=True), indices


def minimax_bias_in_weights() -> _BrokenBackend:
    return _BrokenBackend("broken:MOE-01-biased-weights",
                          lambda: mock.patch.object(minimax_m2, "sigmoid_bias_top_k", biased_weights))


def minimax_bias_ignored() -> _BrokenBackend:
    """``e_score_correction_bias`` loaded but never used: experts chosen by sigmoid(z) alone."""
    def unbiased(router_logits, e_score_correction_bias, top_k):
        return sigmoid_bias_top_k(router_logits, np.zeros_like(e_score_correction_bias), top_k)

    return _BrokenBackend("broken:bias-ignored",
                          lambda: mock.patch.object(minimax_m2, "sigmoid_bias_top_k", unbiased))


def minimax_full_rotary() -> _BrokenBackend:
    """Partial RoPE lost: all D channels of each head rotated (``rotary_dim`` / ``partial_rotary_factor`` unread)."""
    def edit(c):
        if not isinstance(c, minimax_m2.MiniMaxM2Config):
            return c
        return dataclasses.replace(c, rope_parameters={k: v for k, v in c.rope_parameters.items()
                                                       if k != "partial_rotary_factor"})

    return _ConfigEdit("broken:full-rotary", edit)


def minimax_rotary_dim_first() -> _BrokenBackend:
    """``rotary_dim`` read in preference to a top-level ``partial_rotary_factor`` (transformers takes the factor)."""
    class RotaryDimFirst(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            raw = json.loads((checkpoint_dir / "config.json").read_text())
            config = model.model.config
            if isinstance(config, minimax_m2.MiniMaxM2Config) and raw.get("rotary_dim"):
                params = {**config.rope_parameters, "partial_rotary_factor": raw["rotary_dim"] / config.head_dim}
                model.model.config = dataclasses.replace(config, rope_parameters=params)
            return model

    return RotaryDimFirst("broken:rotary-dim-first")


def qwen3_moe_norm_topk_default_true() -> _BrokenBackend:
    """``config.get("norm_topk_prob", True)``: an absent key read as true (every released Qwen3-MoE sets it),
    where transformers' Qwen3MoeConfig defaults to false."""
    class DefaultTrue(_BrokenBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            raw = json.loads((checkpoint_dir / "config.json").read_text())
            config = model.model.config
            if isinstance(config, qwen3_moe.Qwen3MoeConfig) and "norm_topk_prob" not in raw:
                model.model.config = dataclasses.replace(config, norm_topk_prob=True)
            return model

    return DefaultTrue("broken:norm-topk-default-true")


# --- both: expert order and norm eps ---------------------------------------------------------------------------

_EXPERT_TENSOR = re.compile(r"^(?P<head>.*\.experts\.)(?P<index>\d+)(?P<tail>\..+)$")


def _stack_experts_in_string_order(weights):
    """A loader that lists a layer's ``experts.{e}.*`` tensors sorted by name and stacks them in that
    order: slot j holds the expert whose index is j-th in string order (0, 1, 10, 11, 2, ..., 9), so
    with E > 10 slot 2 runs expert 10's matrices (E <= 10 sorts as numbers)."""
    groups = defaultdict(dict)
    for name, w in weights.items():
        match = _EXPERT_TENSOR.match(name)
        if match:
            groups[match["head"], match["tail"]][int(match["index"])] = w
    for (head, tail), by_index in groups.items():
        for slot, index in enumerate(sorted(by_index, key=str)):
            weights[f"{head}{slot}{tail}"] = by_index[index]


def experts_in_string_order() -> _BrokenBackend:
    return _BrokenBackend("broken:experts-string-order", edit_weights=_stack_experts_in_string_order)


def qwen3_moe_eps_default() -> _BrokenBackend:
    """``rms_norm_eps`` never read: transformers' Qwen3-MoE default 1e-6 in every norm."""
    return _DefaultEps("broken:eps-default-1e-6", qwen3_moe.Qwen3MoeConfig, 1e-6)


def minimax_eps_default() -> _BrokenBackend:
    """``rms_norm_eps`` never read: transformers' MiniMax-M2 default 1e-6 in every norm."""
    return _DefaultEps("broken:eps-default-1e-6", minimax_m2.MiniMaxM2Config, 1e-6)


def final_norm_eps_default() -> _BrokenBackend:
    """The final norm at a fixed 1e-6 (both architectures' default), the layer and QK norms at ``rms_norm_eps``
    (both run the final norm in ``_llama_like.run_decoder``)."""
    return _FinalNormEps("broken:final-norm-eps-1e-6", (qwen3_moe.Qwen3MoeConfig, minimax_m2.MiniMaxM2Config),
                         _llama_like, 1e-6)
