"""Tanh soft-capping of logits.

    softcap(s; c) = c * tanh(s / c)

Smoothly bounds ``s`` to ``(-c, c)``. Gemma 2 applies it to attention scores
(``attn_logit_softcapping``, before the mask and softmax) and to the final logits
(``final_logit_softcapping``); Gemma 3 keeps the final cap field (null in every
release) and transformers never applies the attention cap for Gemma 3.

Paper: Gemma 2 report, arXiv:2408.00118, sec. 2 ("Logit soft-capping").
Checked against: transformers 5.24 ``Gemma3ForCausalLM.forward`` (final cap) and
``models/gemma2/modeling_gemma2.py`` ``eager_attention_forward`` (score cap).
"""

from __future__ import annotations

import numpy as np

from .errors import RefimplError


def soft_cap(x: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(x / cap)`` elementwise, in the dtype of ``x``.

    Args:
        x: any shape, float.
        cap: c > 0.

    Raises:
        RefimplError: ``cap`` is not a positive finite number.
    """
    if not (isinstance(cap, (int, float)) and np.isfinite(cap) and cap > 0):
        raise RefimplError(f"soft-cap must be a positive finite number, got {cap!r}")
    c = x.dtype.type(cap)
    return c * np.tanh(x / c)
