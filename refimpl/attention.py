"""Scaled dot-product attention with grouped key/value heads (MHA, GQA, MQA).

    scores[h, i, j] = scale * q[i, h] . k[j, h // G]      (G = H / Hkv)
    p[h, i, :]      = softmax over visible j of scores[h, i, :]
    out[i, h]       = sum_j p[h, i, j] v[j, h // G]

Query head h reads key/value head h // G: consecutive query heads share a
key/value head (the ``repeat_interleave`` order of transformers' ``repeat_kv``).
Hkv = H is multi-head attention, Hkv = 1 multi-query attention.

Fully masked rows (a query that sees no key) produce a zero output vector. No
model in this version produces one with a causal mask; the rule is stated so that
a backend has something to agree with.

Notation:
    B batch, T queries, S keys, H query heads, Hkv key/value heads, G = H / Hkv,
    D head_dim (queries and keys), Dv value head dim.

Paper: Vaswani et al., arXiv:1706.03762, eq. 1; Ainslie et al. (GQA), arXiv:2305.13245.
Checked against: transformers ``models/qwen3/modeling_qwen3.py``
(``eager_attention_forward``, ``repeat_kv``) and ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .numerics import check_same_dtype


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention wants (B, T, H, D) arrays, got q{q.shape} k{k.shape} v{v.shape}")
    (b, t, h, d), (bk, s, hkv, dk) = q.shape, k.shape
    if (bk, s, hkv) != v.shape[:3] or bk != b or dk != d:
        raise ShapeError(f"attention: q{q.shape}, k{k.shape}, v{v.shape} do not fit together")
    if h % hkv:
        raise ShapeError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if mask.shape[-2:] != (t, s) or mask.dtype != np.bool_:
        raise ShapeError(f"attention: mask must be bool (..., {t}, {s}), got {mask.dtype} {mask.shape}")


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to visible entries.

    Args:
        scores: ``(..., S)`` floating.
        mask: bool, broadcastable to ``scores``; False entries get probability 0.

    Returns:
        Probabilities, same shape and dtype as ``scores``; a row with no visible
        entry is all zeros.
    """
    masked = np.where(mask, scores, -np.inf)
    row_max = np.max(masked, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shift by 0 so it yields exp(-inf) = 0, not NaN.
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    e = np.exp(masked - row_max)
    denom = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(denom > 0, denom, 1)


def grouped_query_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> np.ndarray:
    """Attention of H query heads over Hkv shared key/value heads.

    Args:
        q: ``(B, T, H, D)`` queries (after RoPE).
        k: ``(B, S, Hkv, D)`` keys (after RoPE).
        v: ``(B, S, Hkv, Dv)`` values.
        mask: bool ``(T, S)`` or ``(B, T, S)``; True where the key is visible.
        scale: multiplier of q.k (``head_dim ** -0.5`` for Qwen3).

    Returns:
        ``(B, T, H, Dv)`` in the dtype of ``q``.

    Dtype: scores, softmax and the weighted sum are computed in the dtype of q.

    Raises:
        ShapeError: shapes do not fit (batch, head_dim, H not a multiple of Hkv, mask).
        RefimplError: q, k, v differ in dtype.
    """
    _check_shapes(q, k, v, mask)
    dtype = check_same_dtype(q=q, k=k, v=v)
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    # (B, Hkv, G, T, D): query heads grouped under the key/value head they read.
    qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kt = k.transpose(0, 2, 3, 1)[:, :, None]  # (B, Hkv, 1, D, S)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, S, Dv)
    scores = (qg @ kt) * dtype.type(scale)  # (B, Hkv, G, T, S)
    visible = mask[:, None, None] if mask.ndim == 3 else mask
    p = masked_softmax(scores, visible)
    out = p @ vt  # (B, Hkv, G, T, Dv)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1])
