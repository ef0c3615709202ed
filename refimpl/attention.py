"""Scaled dot-product attention with grouped key/value heads, sinks and soft-capping.

    s[h, i, j] = scale * q[i, h] . k[j, h // G]                   (G = H / Hkv)
    s[h, i, j] = c * tanh(s[h, i, j] / c)                         (optional soft-cap c)
    p[h, i, j] = exp(s[h, i, j] - m) / (exp(z_h - m) + sum_j' exp(s[h, i, j'] - m))
    out[i, h]  = sum_j p[h, i, j] v[j, h // G]

Sums and the max m run over the keys j visible to query i (and m also over z_h).
The sink logit z_h (one learned scalar per query head, gpt-oss) enters the
denominator only: it carries no value, so a row's probabilities sum to less
than 1. Without sinks z_h = -inf and p is the ordinary masked softmax.

Query head h reads key/value head h // G: consecutive query heads share a
key/value head (the ``repeat_interleave`` order of transformers' ``repeat_kv``).
Hkv = H is multi-head attention, Hkv = 1 multi-query attention.

Order (Gemma 2): scale, then soft-cap, then mask, then softmax. The scale is an
explicit argument: ``head_dim ** -0.5`` (Qwen3, gpt-oss), ``query_pre_attn_scalar
** -0.5`` (Gemma 2/3), or a model's fixed value.

Fully masked rows (a query that sees no key) produce a zero output vector, with or
without a sink; :mod:`refimpl.masks` records what transformers does instead.

Notation:
    B batch, T queries, S keys, H query heads, Hkv key/value heads, G = H / Hkv,
    D head_dim (queries and keys), Dv value head dim.

    ========  ==========  ===============
    paper     code        shape
    ========  ==========  ===============
    Q, K, V   q, k, v     (B,T,H,D), (B,S,Hkv,D), (B,S,Hkv,Dv)
    1/sqrt(d) scale       scalar
    s_ij      scores      (B,Hkv,G,T,S)
    z_h       sinks       (H,)
    c         softcap     scalar
    ========  ==========  ===============

Paper: Vaswani et al., arXiv:1706.03762, eq. 1; Ainslie et al. (GQA), arXiv:2305.13245;
Xiao et al. (StreamingLLM, attention sinks), arXiv:2309.17453, and the gpt-oss model
card, arXiv:2508.10925, sec. 2 (learned per-head sink logits in the denominator);
Gemma 2 report, arXiv:2408.00118, sec. 2 (logit soft-capping); Mistral 7B,
arXiv:2310.06825, sec. 2 (sliding window).
Checked against: transformers 5.24 ``models/qwen3/modeling_qwen3.py``
(``eager_attention_forward``, ``repeat_kv``), ``models/gpt_oss/modeling_gpt_oss.py:227-255``
(``eager_attention_forward``, sinks), ``models/gemma2/modeling_gemma2.py:176-207``
(``eager_attention_forward``, softcap) and ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError
from .masks import causal_mask, chunked_attention_mask, combine, sliding_window_mask
from .numerics import (
    as_array, as_float_array, check_finite_positive, check_same_dtype, compute_dtype, to_compute, to_storage,
)
from .softcap import soft_cap


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention wants (B, T, H, D) arrays, got q{q.shape} k{k.shape} v{v.shape}")
    (b, t, h, d), (bk, s, hkv, dk) = q.shape, k.shape
    if (bk, s, hkv) != v.shape[:3] or bk != b or dk != d:
        raise ShapeError(f"attention: q{q.shape}, k{k.shape}, v{v.shape} do not fit together")
    if hkv == 0 or h % hkv:
        raise ShapeError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if mask.shape[-2:] != (t, s) or mask.ndim not in (2, 3) or mask.shape[:-2] not in ((), (b,)):
        raise ShapeError(f"attention: mask must be bool ({t}, {s}) or ({b}, {t}, {s}), got {mask.shape}")
    if mask.dtype != np.bool_:
        raise ShapeError(f"attention: mask must be bool ({t}, {s}) or ({b}, {t}, {s}), got {mask.dtype}")


def _float_qkv(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v as float arrays (InputError naming the one that is not)."""
    return tuple(as_float_array(f"attention: {name}", a) for name, a in (("q", q), ("k", k), ("v", v)))


def _check_sinks(sinks, num_heads: int) -> np.ndarray:
    """``(H,)`` float sink logits, each finite or -inf (the exact "no sink")."""
    sinks = as_float_array("attention: sinks", sinks)
    if sinks.shape != (num_heads,):
        raise ShapeError(f"attention: sinks must be ({num_heads},), one per query head, got {sinks.shape}")
    if np.isnan(sinks).any() or np.isposinf(sinks).any():
        raise InputError(f"attention: sinks must be finite or -inf (no sink), got {sinks.tolist()}")
    return sinks


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to visible entries.

    Args:
        scores: ``(..., S)`` floating.
        mask: bool, broadcastable to ``scores``; False entries get probability 0.

    Returns:
        Probabilities, same shape and dtype as ``scores``; a row with no visible
        entry is all zeros.
    """
    p = np.where(mask, scores, -np.inf)
    row_max = np.max(p, axis=-1, keepdims=True, initial=-np.inf)
    # A fully masked row has max -inf; shift by 0 so it yields exp(-inf) = 0, not NaN.
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    # In place: one (..., S) buffer holds the shifted scores, their exponentials, then p.
    p -= row_max
    np.exp(p, out=p)
    denom = np.sum(p, axis=-1, keepdims=True)
    p /= np.where(denom > 0, denom, 1)
    return p


def masked_softmax_with_sink(scores: np.ndarray, mask: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """Softmax over visible entries plus one extra logit that takes mass but is dropped.

    ``p_j = exp(s_j - m) / (exp(z - m) + sum_j' exp(s_j' - m))`` with
    ``m = max(z, max_j s_j)`` over visible j: the softmax of ``[s, z]`` with its
    last column removed (gpt-oss concatenates the sink, subtracts the max of both,
    takes the softmax and drops the sink column).

    Args:
        scores: ``(..., S)`` floating.
        mask: bool, broadcastable to ``scores``.
        sink: sink logit z, broadcastable to ``scores[..., :1]``, same dtype;
            -inf gives :func:`masked_softmax`.

    Returns:
        Probabilities, same shape and dtype as ``scores``; each row sums to
        ``1 - exp(z - m) / denominator`` < 1, and a row with no visible entry is
        all zeros (the sink takes all the mass).

    Paper: gpt-oss model card, arXiv:2508.10925, sec. 2.
    Checked against: transformers ``models/gpt_oss/modeling_gpt_oss.py:243-251``.
    """
    masked = np.where(mask, scores, -np.inf)
    # m runs over the visible scores and the sink logit.
    row_max = np.maximum(np.max(masked, axis=-1, keepdims=True, initial=-np.inf), sink)
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    e = np.exp(masked - row_max)
    denom = np.exp(sink - row_max) + np.sum(e, axis=-1, keepdims=True)
    return e / np.where(denom > 0, denom, 1)


def grouped_query_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
    *, sinks: np.ndarray | None = None, softcap: float | None = None,
) -> np.ndarray:
    """Attention of H query heads over Hkv shared key/value heads, optional sinks and soft-cap.

    Args:
        q: ``(B, T, H, D)`` queries (after RoPE).
        k: ``(B, S, Hkv, D)`` keys (after RoPE).
        v: ``(B, S, Hkv, Dv)`` values.
        mask: bool ``(T, S)`` or ``(B, T, S)``; True where the key is visible.
        scale: multiplier of q.k, > 0 (``head_dim ** -0.5`` for Qwen3).
        sinks: ``(H,)`` one sink logit per query head (gpt-oss), or None.
        softcap: c > 0 for ``c * tanh(s / c)`` on the scaled scores before the
            mask (Gemma 2 ``attn_logit_softcapping``), or None.

    Returns:
        ``(B, T, H, Dv)`` in the dtype of ``q``; a query row with no visible key is zeros.

    Dtype: scores, cap, softmax and the weighted sum are computed in the dtype of q;
    ``scale`` and ``softcap`` are rounded to that dtype first. float16 / bfloat16: q,
    k, v and sinks widened to float32, everything in float32 (scale and cap rounded to
    float32), the output rounded once (a fused attention kernel; transformers' eager
    path rounds the scores and the probabilities to the storage dtype too).

    Raises:
        ShapeError: shapes do not fit (batch, head_dim, H not a multiple of Hkv, mask,
            ``sinks`` not ``(H,)``).
        InputError: q, k, v or sinks not float arrays (integers, complex, ...);
            a NaN or +inf sink; ``scale`` or ``softcap`` not a positive finite
            number (in the compute dtype).
        RefimplError: q, k, v (and sinks) differ in dtype.
    """
    q, k, v = _float_qkv(q, k, v)
    mask = as_array("attention: mask", mask)
    _check_shapes(q, k, v, mask)
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    if sinks is not None:
        sinks = _check_sinks(sinks, h)
    storage = check_same_dtype(q=q, k=k, v=v, **({} if sinks is None else {"sinks": sinks}))
    scale = check_finite_positive("attention: scale", scale, dtype=compute_dtype(storage))
    if softcap is not None:
        check_finite_positive("attention: softcap", softcap, dtype=compute_dtype(storage))
    q, k, v, sinks = to_compute(q), to_compute(k), to_compute(v), to_compute(sinks)
    # (B, Hkv, G, T, D): query heads grouped under the key/value head they read.
    qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kt = k.transpose(0, 2, 3, 1)[:, :, None]  # (B, Hkv, 1, D, S)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, S, Dv)
    # Vaswani eq. 1: scaled scores.
    scores = qg @ kt  # (B, Hkv, G, T, S)
    scores *= scale
    # Gemma 2: soft-cap the scaled scores, before the mask.
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    visible = mask[:, None, None] if mask.ndim == 3 else mask
    if sinks is None:
        p = masked_softmax(scores, visible)
    else:
        p = masked_softmax_with_sink(scores, visible, sinks.reshape(hkv, g, 1, 1))
    out = p @ vt  # (B, Hkv, G, T, Dv)
    return to_storage(out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1]), storage)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scaling: float,
    sliding_window: int | None = None, attention_chunk_size: int | None = None,
    sinks: np.ndarray | None = None, attn_logit_softcapping: float | None = None,
) -> np.ndarray:
    """Causal attention of the last T of S positions, with the optional local masks, sinks and cap.

    The op ``"attention"`` of the conformance suite. Queries are the last T of the
    S key positions: query i sits at position ``S - T + i`` (a prefill when
    S = T, a decode or an extend after ``S - T`` cached keys otherwise). Key j is
    visible to query i iff every given rule holds (logical and):

    * causal: ``j <= p``, always;
    * ``sliding_window`` W: ``p - W < j`` (W keys including the query's own);
    * ``attention_chunk_size`` C: ``j // C == p // C`` (chunks of absolute positions).

    Window and chunk together are allowed and intersect. No key padding: every
    row sees at least its own key, so no row is fully masked.

    Args:
        q: ``(B, T, H, D)`` queries (after RoPE).
        k: ``(B, S, Hkv, D)`` keys (after RoPE), S >= T.
        v: ``(B, S, Hkv, Dv)`` values.
        scaling: multiplier of q.k, > 0 (``head_dim ** -0.5``, ``query_pre_attn_scalar ** -0.5``, ...).
        sliding_window: W >= 1, or None for no window.
        attention_chunk_size: C >= 1, or None for no chunking.
        sinks: ``(H,)`` per-head sink logits (gpt-oss), or None.
        attn_logit_softcapping: c > 0 (Gemma 2: 50.0), or None.

    Returns:
        ``(B, T, H, Dv)`` in the dtype of ``q``.

    Dtype: computed entirely in the dtype of ``q`` (float64 is the specification,
    float32 the measured alternative); k, v and sinks must share it; ``scaling`` and
    the cap are rounded to it. No float32 softmax island as in transformers' eager.
    float16 / bfloat16: computed in float32, the output rounded once
    (:func:`grouped_query_attention`).

    Raises:
        ShapeError: bad shapes (see :func:`grouped_query_attention`), S < T, or
            ``sinks`` not ``(H,)``.
        InputError: q, k, v or sinks not float arrays; a NaN or +inf
            sink; ``scaling`` or ``attn_logit_softcapping`` not a positive finite number.
        RefimplError: dtypes differ; ``sliding_window`` or ``attention_chunk_size``
            not an integer >= 1.

    Paper: as the module (Vaswani; GQA; Mistral SWA; gpt-oss sinks; Gemma 2 cap).
    Checked against: transformers 5.24 ``masking_utils.py`` (``causal_mask_function``,
    ``sliding_window_causal_mask_function``, ``chunked_causal_mask_function``),
    ``models/gpt_oss/modeling_gpt_oss.py`` and ``models/gemma2/modeling_gemma2.py``
    (``eager_attention_forward``).
    """
    q, k, v = _float_qkv(q, k, v)
    check_finite_positive("attention: scaling", scaling, dtype=compute_dtype(q.dtype))
    if attn_logit_softcapping is not None:
        check_finite_positive("attention: attn_logit_softcapping", attn_logit_softcapping,
                              dtype=compute_dtype(q.dtype))
    if q.ndim != 4 or k.ndim != 4:
        raise ShapeError(f"attention wants (B, T, H, D) arrays, got q{q.shape} k{k.shape}")
    t, s = q.shape[1], k.shape[1]
    if s < t:
        raise ShapeError(f"attention: {s} keys cannot hold the positions of {t} queries (need S >= T)")
    masks = [causal_mask(t, s, s - t)]
    if sliding_window is not None:
        masks.append(sliding_window_mask(t, s, sliding_window, s - t))
    if attention_chunk_size is not None:
        masks.append(chunked_attention_mask(t, s, attention_chunk_size, s - t))
    return grouped_query_attention(
        q, k, v, combine(*masks), scaling, sinks=sinks, softcap=attn_logit_softcapping
    )
