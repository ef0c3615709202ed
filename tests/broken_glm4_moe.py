"""Deliberately wrong GLM-4.5 backends: each makes one mistake engines have shipped.

Each is the reference with one GLM-4.5 component swapped for a wrong variant (the
pattern of ``tests/broken_backends.py``), used as ``--backend broken_glm4_moe:<factory>``
with ``tests/`` on the import path. Each wrong variant is written out here in full.

=============================  =========  ===================================================================
factory                        class      mistake
=============================  =========  ===================================================================
qk_norm_over_all_heads         QKN-04     q/k RMS statistics over all heads of a token (the hidden-size-wide
                                          norm), not per head over head_dim
rope_on_whole_head             ROPE-02    partial_rotary_factor ignored: RoPE over all D dims (frequencies
                                          over D, not Dr = D/2)
rope_on_last_dims              ROPE-02    the Dr rotary dims taken from the end of the head, not the start
qkv_bias_dropped               --         attention_bias read but the q/k/v biases never added
routed_scaling_not_applied     MOE-09     routed_scaling_factor applied zero times
routed_scaling_applied_twice   MOE-09     routed_scaling_factor applied in the router and again on the output
shared_expert_dropped          --         the always-on shared expert never added
dense_layers_one_too_many      --         first_k_dense_replace read as "layers <= k are dense"
dense_layers_one_too_few       --         first_k_dense_replace read as "layers < k - 1 are dense"
eps_default                    (EPS)      rms_norm_eps never read: 1e-5 (transformers' default) in every norm
final_norm_eps_default         (EPS)      the final norm at 1e-5, the other norms at rms_norm_eps
=============================  =========  ===================================================================

The two schedule mistakes meet layers whose weights the checkpoint does not hold
(a dense MLP where it stores experts, or the reverse); like a loader that
initialises missing tensors to zero, they run those layers with zero weights.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _ConfigEdit, _DefaultEps, _FinalNormEps
from refimpl.models import _llama_like, glm4_moe
from refimpl.rmsnorm import rms_norm


def _rms_norm_over_all_heads(x, weight, eps):
    """QKN-04: one RMS over a token's H*D (or Hkv*D) projection, the per-D gain repeated per head."""
    if x.ndim != 4:
        return rms_norm(x, weight, eps)
    return weight * x / np.sqrt(np.mean(x * x, axis=(-2, -1), keepdims=True) + x.dtype.type(eps))


def _rope_on_last_dims(x, cos, sin):
    """Rotate-half RoPE on the LAST Dr dims of each head; the first D - Dr pass through."""
    half = cos.shape[-1]
    c, s = cos[..., None, :], sin[..., None, :]
    passed, x1, x2 = x[..., :-2 * half], x[..., -2 * half:-half], x[..., -half:]
    return np.concatenate([passed, x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def qk_norm_over_all_heads() -> _BrokenBackend:
    return _BrokenBackend("broken:QKN-04-all-heads",
                          lambda: mock.patch.object(glm4_moe, "rms_norm", _rms_norm_over_all_heads))


def rope_on_whole_head() -> _BrokenBackend:
    return _ConfigEdit("broken:ROPE-02-whole-head", lambda c: dataclasses.replace(
        c, rope_parameters={**c.rope_parameters, "partial_rotary_factor": 1.0}))


def rope_on_last_dims() -> _BrokenBackend:
    return _BrokenBackend("broken:ROPE-02-last-dims",
                          lambda: mock.patch.object(glm4_moe, "apply_rope_rotate_half", _rope_on_last_dims))


def _drop_qkv_biases(weights):
    for name in [n for n in weights if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]:
        del weights[name]


def qkv_bias_dropped() -> _BrokenBackend:
    return _BrokenBackend("broken:qkv-bias-dropped", edit_weights=_drop_qkv_biases)


def routed_scaling_not_applied() -> _BrokenBackend:
    return _ConfigEdit("broken:MOE-09-rsf-zero-times",
                       lambda c: dataclasses.replace(c, routed_scaling_factor=1.0))


def routed_scaling_applied_twice() -> _BrokenBackend:
    route = glm4_moe.route

    def scaled_again(x, p, config):
        weights, indices = route(x, p, config)
        return weights * config.routed_scaling_factor, indices

    return _BrokenBackend("broken:MOE-09-rsf-twice", lambda: mock.patch.object(glm4_moe, "route", scaled_again))


def shared_expert_dropped() -> _BrokenBackend:
    return _BrokenBackend("broken:shared-expert-dropped", lambda: mock.patch.object(
        glm4_moe, "shared_experts", lambda x, p, config: np.zeros_like(x)))


class _Schedule(_BrokenBackend):
    """The reference with ``mlp_layer_types`` recomputed by a wrong rule; missing tensors zero-filled."""

    def __init__(self, name, is_dense):
        super().__init__(name)
        self._is_dense = is_dense

    def load_model(self, checkpoint_dir, dtype):
        loaded = super().load_model(checkpoint_dir, dtype)
        model = loaded.model
        config = model.config
        types = tuple("dense" if self._is_dense(layer, config.first_k_dense_replace) else "sparse"
                      for layer in range(config.num_hidden_layers))
        model.config = dataclasses.replace(config, mlp_layer_types=types)
        for name, shape in glm4_moe.weight_shapes(model.config).items():
            model.weights.setdefault(name, np.zeros(shape, dtype=model.dtype))
        return loaded


def dense_layers_one_too_many() -> _BrokenBackend:
    return _Schedule("broken:first-k-dense-plus-one", lambda layer, k: layer <= k)


def dense_layers_one_too_few() -> _BrokenBackend:
    return _Schedule("broken:first-k-dense-minus-one", lambda layer, k: layer < k - 1)


def eps_default() -> _BrokenBackend:
    return _DefaultEps("broken:eps-default-1e-5", glm4_moe.Glm4MoeConfig, 1e-5)


def final_norm_eps_default() -> _BrokenBackend:
    # GLM-4.5's final norm runs in _llama_like.run_decoder.
    return _FinalNormEps("broken:final-norm-eps-1e-5", glm4_moe.Glm4MoeConfig, _llama_like, 1e-5)
