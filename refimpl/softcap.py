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

from .numerics import as_float_array, check_finite_positive, compute_dtype, to_compute, to_storage


def soft_cap(x: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(x / cap)`` elementwise, in the dtype of ``x``.

    Args:
        x: any shape, a float array (NaN and inf propagate as tanh takes them).
        cap: c > 0, rounded to the dtype of ``x`` first (float16 / bfloat16: to float32).

    Dtype: float16 / bfloat16 computed in float32 and rounded once (transformers rounds
    the quotient, the tanh and the product).

    Raises:
        InputError: ``x`` is not a float array; ``cap`` is not a positive finite number
            (in that dtype).
    """
    x = as_float_array("soft_cap: x", x)
    c = check_finite_positive("soft_cap: cap", cap, dtype=compute_dtype(x.dtype))
    wide = to_compute(x)
    return to_storage(c * np.tanh(wide / c), x.dtype)
