"""Deliberately wrong op-level backends, one per mistake of ``docs/bug-classes.md``.

Each is the reference's op table with one op replaced by a wrong variant that an
engine has shipped (the class is in the name), so the only difference from a
correct backend is that mistake. Used as ``--backend broken_op_backends:<factory>``
with ``tests/`` on the import path.
"""

from __future__ import annotations

import math

import numpy as np

from conformance.backends.refimpl_backend import RefimplBackend
from refimpl import ops as ref
from refimpl.attention import attention
from refimpl.mlp import gated_mlp


class _BrokenOps(RefimplBackend):
    """The reference with ``ops[name]`` replaced; no model cases."""

    def __init__(self, name: str, **replaced):
        self.name = name
        self._replaced = replaced

    @property
    def ops(self) -> dict:
        return {**super().ops, **self._replaced}

    def supports(self, case, dtype):
        if case.level == "model":
            return "op-level broken backend"
        # RMSNorm and the embedding have a low-precision reference; other ops do not.
        return True if case.op in ("rms_norm", "embedding") else super().supports(case, dtype)


def _attention_with(**overrides):
    """Attention whose keyword parameters are rewritten by ``overrides`` (callables of the kwargs)."""

    def wrong(q, k, v, **kwargs):
        for key, rewrite in overrides.items():
            kwargs[key] = rewrite(kwargs, q)
        return attention(q, k, v, **kwargs)

    return wrong


def swa_window_plus_one():
    """SWA-01/02/05: the window taken as a radius, W + 1 visible keys."""
    return _BrokenOps("broken:SWA-window+1", attention=_attention_with(
        sliding_window=lambda kw, q: None if kw.get("sliding_window") is None else kw["sliding_window"] + 1))


def swa_window_plus_one_at_decode():
    """SWA-04: the window one key too wide only for a single decode query (prefill is right)."""

    def wrong(q, k, v, **kw):
        if q.shape[1] == 1 and kw.get("sliding_window") is not None:
            kw = {**kw, "sliding_window": kw["sliding_window"] + 1}
        return attention(q, k, v, **kw)

    return _BrokenOps("broken:SWA-window+1-at-decode", attention=wrong)


def mla05_value_rows_stepped_by_key_width():
    """MLA-05: a kernel that walks the cached keys in blocks of 64 rows and steps its value pointer by
    the *key* row width Dk over a value buffer whose rows are Dv wide: from the second block on it reads
    value rows that belong to other keys (rows past the end read as 0). Only visible when Dk != Dv."""

    def wrong(q, k, v, **kwargs):
        dk, dv, s = k.shape[-1], v.shape[-1], v.shape[1]
        if dk == dv:
            return attention(q, k, v, **kwargs)
        flat = np.moveaxis(v, 1, -2).reshape(*v.shape[:1], v.shape[2], s * dv)  # (B, Hkv, S*Dv) per head
        read = np.zeros_like(np.moveaxis(v, 1, -2))
        block = 64
        for j in range(s):
            start = j * dv if j < block else (j // block) * block * dk + (j % block) * dv
            if start + dv <= s * dv:
                read[..., j, :] = flat[..., start:start + dv]
        return attention(q, k, np.moveaxis(read, -2, 1), **kwargs)

    return _BrokenOps("broken:MLA-05-value-stride", attention=wrong)


def swa_ignored():
    """PAT-05 / SWA: window dropped (sliding layers run as full attention)."""
    return _BrokenOps("broken:SWA-ignored", attention=_attention_with(sliding_window=lambda kw, q: None))


def sink_ignored():
    """SINK-01: no sink term in the softmax denominator."""
    return _BrokenOps("broken:SINK-ignored", attention=_attention_with(sinks=lambda kw, q: None))


def sink_by_row():
    """SINK-02: the sink picked as ``row % num_heads`` instead of by head (right only for one query)."""

    def wrong(q, k, v, sinks=None, **kwargs):
        if sinks is None:
            return attention(q, k, v, **kwargs)
        rows = [attention(q[:, i:i + 1], k[:, :k.shape[1] - q.shape[1] + i + 1], v[:, :k.shape[1] - q.shape[1] + i + 1],
                          sinks=np.full_like(sinks, sinks[i % len(sinks)]), **kwargs)
                for i in range(q.shape[1])]
        return np.concatenate(rows, axis=1)

    return _BrokenOps("broken:SINK-by-row", attention=wrong)


def softcap_ignored():
    """CAP-03: attention logit soft-cap passed as 0 (disabled)."""
    return _BrokenOps("broken:CAP-attention-ignored", attention=_attention_with(attn_logit_softcapping=lambda kw, q: None))


def final_softcap_hardcoded():
    """CAP-02: final soft-cap hard-coded to 30 whatever the config says."""
    return _BrokenOps("broken:CAP-hardcoded-30", soft_cap=lambda x, *, cap: ref.softcap(x, cap=30.0))


def scale_from_head_dim():
    """SCL-01: scaling 1/sqrt(head_dim) instead of the configured value (query_pre_attn_scalar)."""
    return _BrokenOps("broken:SCL-head-dim", attention=_attention_with(scaling=lambda kw, q: q.shape[-1] ** -0.5))


def rope_interleaved_for_rotate_half():
    """ROPE: every RoPE applied with interleaved pairs (GPT-J layout)."""
    return _BrokenOps("broken:ROPE-always-interleaved",
                      rope=lambda x, positions, **kw: ref.rope(x, positions, **{**kw, "layout": "interleaved"}))


def rope_full_width():
    """ROPE-02: partial_rotary_factor ignored, the whole head rotated."""
    return _BrokenOps("broken:ROPE-full-width",
                      rope=lambda x, positions, **kw: ref.rope(x, positions, **{**kw, "partial_rotary_factor": 1.0}))


def _plain_parameters(params: dict) -> dict:
    return {"rope_type": "default", "rope_theta": params["rope_theta"]}


def rsc_scaling_ignored():
    """RSC-01/02/03: rope_scaling not consumed; plain frequencies at rope_theta."""

    def wrong_rope(x, positions, *, rope_parameters, **kw):
        return ref.rope(x, positions, rope_parameters=_plain_parameters(rope_parameters), **kw)

    def wrong_freq(*, rope_parameters, **kw):
        return ref.frequencies(rope_parameters=_plain_parameters(rope_parameters), **kw)

    return _BrokenOps("broken:RSC-scaling-ignored", rope=wrong_rope, rope_frequencies=wrong_freq)


def rsc_yarn_ramp_clipped_at_half():
    """RSC: YaRN's ramp bound clipped at Dr/2 - 1 instead of Dr - 1 (transformers' rule)."""
    from unittest import mock

    from refimpl import rope as rope_module

    original = rope_module.yarn_correction_range

    def clipped(rotary_dim, *args, **kwargs):
        low, high = original(rotary_dim, *args, **kwargs)
        return low, min(high, rotary_dim // 2 - 1)

    def wrong_freq(**kw):
        with mock.patch.object(rope_module, "yarn_correction_range", clipped):
            return ref.frequencies(**kw)

    def wrong_rope(x, positions, **kw):
        with mock.patch.object(rope_module, "yarn_correction_range", clipped):
            return ref.rope(x, positions, **kw)

    return _BrokenOps("broken:RSC-yarn-ramp-half", rope=wrong_rope, rope_frequencies=wrong_freq)


def rsc_llama3_factor_8():
    """RSC-04: llama3 scale factor hard-coded to 8."""

    def wrong(x, positions, *, rope_parameters, **kw):
        if rope_parameters.get("rope_type") == "llama3":
            rope_parameters = {**rope_parameters, "factor": 8.0}
        return ref.rope(x, positions, rope_parameters=rope_parameters, **kw)

    return _BrokenOps("broken:RSC-llama3-factor-8", rope=wrong)


def rsc_yarn_magnitude_ignored():
    """RSC-12: YaRN frequencies right, but cos/sin not multiplied by the attention factor."""

    def wrong(x, positions, *, rope_parameters, **kw):
        if rope_parameters.get("rope_type") == "yarn":
            rope_parameters = {**rope_parameters, "attention_factor": 1.0}
        return ref.rope(x, positions, rope_parameters=rope_parameters, **kw)

    return _BrokenOps("broken:RSC-yarn-magnitude", rope=wrong)


def nrm_offset_ignored():
    """NRM-02: Gemma norm computed as w * x instead of (1 + w) * x."""
    return _BrokenOps("broken:NRM-offset-ignored",
                      rms_norm=lambda x, weight, *, eps, weight_offset=0.0, **kw: ref.norm(x, weight, eps=eps, **kw))


def nrm_offset_twice():
    """NRM-03: 1 added at load time and again at run time: (2 + w) * x."""
    return _BrokenOps("broken:NRM-offset-twice",
                      rms_norm=lambda x, weight, *, eps, weight_offset=0.0, **kw: ref.norm(
                          x, weight + weight_offset, eps=eps, weight_offset=weight_offset, **kw))


def nrm_cast_order_swapped():
    """NRM-07/08: the other cast order in low precision (Llama's where OLMo 2 / Gemma multiply
    in float32 first, and vice versa); identical at float32 and float64."""
    swap = {"cast_then_multiply": "multiply_then_cast", "multiply_then_cast": "cast_then_multiply"}

    def wrong(x, weight, *, eps, weight_offset=0.0, cast_order="cast_then_multiply"):
        return ref.norm(x, weight, eps=eps, weight_offset=weight_offset, cast_order=swap[cast_order])

    return _BrokenOps("broken:NRM-cast-order", rms_norm=wrong)


def nrm_gelu_erf():
    """NRM-06: exact (erf) GELU where the model uses the tanh approximation."""
    erf = np.vectorize(math.erf)

    def erf_gelu(z):
        return 0.5 * z * (1 + erf(z / math.sqrt(2)))

    def wrong(x, gate_proj, up_proj, down_proj, *, hidden_act):
        if hidden_act != "gelu_pytorch_tanh":
            return gated_mlp(x, gate_proj, up_proj, down_proj, hidden_act)
        return (erf_gelu(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T

    return _BrokenOps("broken:NRM-gelu-erf", gated_mlp=wrong)


def nrm_embed_scale_ignored():
    """NRM-06: Gemma embedding not multiplied by sqrt(hidden_size)."""
    return _BrokenOps("broken:NRM-embed-unscaled",
                      embedding=lambda input_ids, weight, *, embed_scale=1.0: ref.embedding(input_ids, weight))


def nrm_embed_scale_unrounded():
    """NRM-06: the embedding scale applied in float64 and the product rounded once, instead of
    the scale rounded to the run dtype first (55.4256 instead of 55.5 for sqrt(3072) in bfloat16)."""

    def wrong(input_ids, weight, *, embed_scale=1.0):
        rows = ref.embedding(input_ids, weight.astype(np.float64) if weight.dtype != np.float64 else weight)
        return (rows * embed_scale).astype(weight.dtype)

    return _BrokenOps("broken:NRM-embed-scale-unrounded", embedding=wrong)


def qkn_norm_over_all_heads():
    """QKN-01/03: a per-head QK-norm's statistics taken over every head of the token."""

    def wrong(x, weight, *, eps, weight_offset=0.0, **kw):
        if x.ndim == 4 and weight.shape[0] == x.shape[-1]:
            flat = x.reshape(*x.shape[:2], -1)
            scale = np.sqrt(np.mean(flat * flat, axis=-1, keepdims=True) + eps)[..., None]
            return (weight + weight_offset) * x / scale
        return ref.norm(x, weight, eps=eps, weight_offset=weight_offset, **kw)

    return _BrokenOps("broken:QKN-over-all-heads", rms_norm=wrong)


def swiglu_gate_up_swapped():
    """ACT-04-like: silu applied to the up projection instead of the gate."""

    def wrong(x, gate_proj, up_proj, down_proj, *, hidden_act):
        return gated_mlp(x, up_proj, gate_proj, down_proj, hidden_act)

    return _BrokenOps("broken:MLP-gate-up-swapped", gated_mlp=wrong)

