"""Deliberately wrong Grok 2.5 backends: each is the reference with one Grok quirk done wrong.

Used as ``--backend broken_grok2:<factory>`` (with ``tests/`` on the import path),
like ``tests/broken_backends.py``. Every mistake is one that a port of Grok has made
or could plausibly make: vLLM's Grok-1 router renormalises, a unified triton kernel
applies the temperature before the cap, NPU/JAX paths use the tanh GELU, Llama-style
ports keep only the pre-norms, and so on (``docs/architectures/grok2.md``).
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit
from refimpl.models import grok2
from refimpl.rmsnorm import rms_norm
from refimpl.routers import soft_capped_softmax_top_k


def _patch(name, replacement):
    return lambda: mock.patch.object(grok2, name, replacement)


def router_renormalised() -> _BrokenBackend:
    """MOE-04 (vLLM ``grok1.py``, ``renormalize=True``): the top-k probabilities rescaled to sum to 1."""

    def renormalised(logits, top_k, *, router_logit_softcapping):
        weights, indices = soft_capped_softmax_top_k(logits, top_k, router_logit_softcapping=router_logit_softcapping)
        return weights / weights.sum(axis=-1, keepdims=True), indices

    return _BrokenBackend("broken:grok-router-renormalised", _patch("soft_capped_softmax_top_k", renormalised))


def router_cap_dropped() -> _BrokenBackend:
    """CAP: the router soft-cap never applied (softmax over the raw router logits)."""

    def uncapped(logits, top_k, *, router_logit_softcapping):
        return soft_capped_softmax_top_k(logits, top_k, router_logit_softcapping=None)

    return _BrokenBackend("broken:grok-router-cap-dropped", _patch("soft_capped_softmax_top_k", uncapped))


def temperature_before_cap() -> _BrokenBackend:
    """Scores scaled by the temperature first, then capped: ``c tanh(tau s / c)`` instead of ``tau c tanh(s / c)``."""
    original = grok2.capped_tempered_attention

    def wrong(q, k, v, mask, *, scale, softcap, temperature):
        # tau * s inside the cap, then a plain capped attention (temperature 1 afterwards).
        tau = np.asarray(temperature, dtype=q.dtype)
        scaled_q = q * (tau[None, :] if tau.ndim == 1 else tau)[..., None, None]
        return original(scaled_q, k, v, mask, scale=scale, softcap=softcap, temperature=np.ones(tau.shape))

    return _BrokenBackend("broken:grok-temperature-before-cap", _patch("capped_tempered_attention", wrong))


def temperature_threshold_inclusive() -> _BrokenBackend:
    """Temperature applied from ``p >= L`` instead of ``p > L``. Invisible under the log2 law: tau(L) = 1."""

    def inclusive(positions, attn_temperature_len):
        p = np.asarray(positions)
        if attn_temperature_len <= 0:
            return np.ones(p.shape)
        return np.where(p >= attn_temperature_len, np.log2(np.maximum(p, 1)) / math.log2(attn_temperature_len), 1.0)

    return _BrokenBackend("broken:grok-temperature-p>=L", _patch("attention_temperature", inclusive))


def temperature_one_based_positions() -> _BrokenBackend:
    """Temperature from 1-based positions (``seq_len`` where the kernel uses ``seq_len - 1``): tau(p + 1)."""
    original = grok2.attention_temperature

    def shifted(positions, attn_temperature_len):
        return original(np.asarray(positions) + 1, attn_temperature_len)

    return _BrokenBackend("broken:grok-temperature-1-based", _patch("attention_temperature", shifted))


def gelu_tanh() -> _BrokenBackend:
    """ACT: experts and dense MLP with the tanh-approximated GELU (sglang's NPU path, Grok-1's JAX) instead of erf."""
    return _BrokenBackend("broken:grok-gelu-tanh", _patch("HIDDEN_ACT", "gelu_pytorch_tanh"))


def pre_norm_only() -> _BrokenBackend:
    """NRM: a Llama-style block, ``x + f(RMSNorm(x))``; post_attn_norm and post_moe_norm dropped."""

    def pre_only(x, sublayer, pre_norm, post_norm, eps):
        return x + sublayer(rms_norm(x, pre_norm, eps))

    return _BrokenBackend("broken:grok-pre-norm-only", _patch("sandwich_residual", pre_only))


def dense_mlp_dropped() -> _BrokenBackend:
    """residual_moe ignored: only the routed experts, no dense MLP and no 1/sqrt(2)."""
    return _BrokenBackend("broken:grok-dense-mlp-dropped", _patch("residual_moe_combine", lambda mlp, moe: moe))


def dense_mlp_unscaled() -> _BrokenBackend:
    """``mlp + moe`` without the 1/sqrt(2)."""
    return _BrokenBackend("broken:grok-dense-mlp-unscaled", _patch("residual_moe_combine", lambda mlp, moe: mlp + moe))


def embedding_scale_dropped() -> _BrokenBackend:
    """embedding_multiplier_scale never applied (read as 1)."""
    return _ConfigEdit("broken:grok-embedding-scale-dropped", lambda c: dataclasses.replace(
        c, embedding_multiplier_scale=1.0) if isinstance(c, grok2.Grok2Config) else c)


def output_multiplier_dropped() -> _BrokenBackend:
    """output_multiplier_scale never applied to the lm_head (read as 1)."""
    return _ConfigEdit("broken:grok-output-multiplier-dropped", lambda c: dataclasses.replace(
        c, output_multiplier_scale=1.0) if isinstance(c, grok2.Grok2Config) else c)


def final_cap_dropped() -> _BrokenBackend:
    """CAP: final_logit_softcapping read but never applied."""
    return _ConfigEdit("broken:grok-final-cap-dropped", lambda c: dataclasses.replace(
        c, final_logit_softcapping=None) if isinstance(c, grok2.Grok2Config) else c)

