"""Attention masks as boolean visibility arrays (True = the key is visible).

Each mask is built by one small named function; attention takes the result, and
:func:`combine` intersects several (causal and window and chunk and padding).
Positions are absolute: a query block that starts after ``past_length`` cached
keys has query i at position ``past_length + i``, and key j sits at position j.
transformers does the same: its mask functions receive cache indices
(``q_offset + i``, ``kv_offset + j``), not ``position_ids``, except for packed
sequences (``masking_utils.py:195-207``) and for the chunk origin under left
padding (:func:`chunked_attention_mask`).

Causal mask, T = 3 queries after 2 cached keys (S = 5 keys)::

    key      0 1 2 3 4
    query 0  x x x . .      (position 2)
    query 1  x x x x .      (position 3)
    query 2  x x x x x      (position 4)

Notation:
    T ``num_queries``, S ``num_keys``, W ``window`` (``sliding_window``),
    C ``attention_chunk_size``, B batch, p = ``past_length`` + i (query position).

Fully masked rows
-----------------
A query row with no visible key (left-padding rows, or a combined mask that
hides everything) has a defined output in this reference: **zeros**. A softmax
over an empty set contributes nothing, the convention of FlashAttention's
log-sum-exp = -inf. With a sink logit the row's probabilities are all 0 too (the
sink takes the whole mass), so the output is again zeros.

transformers does not agree with itself here; measured with transformers 5.24,
torch 2.13 CPU, one head, T = S = 3, a key padding ``[0, 1, 1]`` under a causal
mask (row 0 fully masked), ``v[j] = [4j, 4j+1, 4j+2, 4j+3]``:

* eager attention (``models/qwen3/modeling_qwen3.py:194``, the same in Gemma 2
  and every decoder with the float32 softmax island) adds
  ``finfo(dtype).min`` (``masking_utils.py:614-617``):
  float32 model: the score is absorbed into ``finfo.min``, every key gets equal
  weight, and the row is the **uniform average of all S values** ``[4, 5, 6, 7]``
  (weights 1/3 each), masked keys included;
  float64 model: ``finfo(float64).min`` overflows to -inf when the softmax casts
  to float32, and the row is **NaN**.
* gpt-oss eager (``models/gpt_oss/modeling_gpt_oss.py:243-252``, softmax in the
  model dtype, sink appended): **zeros** for a finite sink (float32 and float64);
  with sink = -inf the uniform average ``[4, 5, 6, 7]`` again.
* sdpa (``torch.nn.functional.scaled_dot_product_attention`` via
  ``integrations/sdpa_attention.py``), boolean mask or additive -inf mask:
  **zeros** on torch 2.13 CPU, float32 and float64. It is *not* NaN there.
  transformers once un-masked such rows to dodge "a bug in torch's older
  versions" (``allow_torch_fix``, now documented as a no-op, ``masking_utils.py:438``);
  we did not run an older torch, nor any GPU kernel.

Checked against: transformers 5.24 ``masking_utils.py`` (``causal_mask_function``,
``sliding_window_overlay``, ``chunked_overlay``, ``padding_mask_function``,
``and_masks``, ``sdpa_mask``, ``eager_mask``).
"""

from __future__ import annotations

import numpy as np

from .errors import RefimplError, ShapeError


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RefimplError(f"{name} must be an integer >= 1, got {value!r}")


def _positions(num_queries: int, num_keys: int, past_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Query positions ``(T, 1)`` and key positions ``(1, S)``."""
    return past_length + np.arange(num_queries)[:, None], np.arange(num_keys)[None, :]


def causal_mask(num_queries: int, num_keys: int, past_length: int = 0) -> np.ndarray:
    """Key j is visible to query i iff ``j <= past_length + i``.

    Args:
        num_queries: T.
        num_keys: S (usually ``past_length + T``).
        past_length: number of keys before the first query's position.

    Returns:
        ``(T, S)`` bool.

    Checked against: transformers ``masking_utils.py:74`` (``causal_mask_function``).
    """
    query_pos, key_pos = _positions(num_queries, num_keys, past_length)
    return key_pos <= query_pos


def sliding_window_mask(num_queries: int, num_keys: int, window: int, past_length: int = 0) -> np.ndarray:
    """Causal mask limited to the last ``window`` keys (the Hugging Face meaning).

    Query i at position ``p = past_length + i`` sees key j iff ``p - window < j <= p``:
    itself and the ``window - 1`` keys before it, ``window`` keys in all.

    Window W = 3, T = S = 5::

        key      0 1 2 3 4
        query 0  x . . . .
        query 1  x x . . .
        query 2  x x x . .
        query 3  . x x x .
        query 4  . . x x x

    Args:
        num_queries: T.
        num_keys: S.
        window: W >= 1 (``sliding_window``).
        past_length: number of keys before the first query's position.

    Returns:
        ``(T, S)`` bool.

    Raises:
        RefimplError (a ValueError): ``window`` is not an integer >= 1.

    Paper: Mistral 7B, arXiv:2310.06825, sec. 2 ("Sliding Window Attention").
    Checked against: transformers ``masking_utils.py:90-98`` (``sliding_window_overlay``)
    and ``:132-136`` (``sliding_window_causal_mask_function``).
    """
    _check_positive_int("sliding window", window)
    query_pos, key_pos = _positions(num_queries, num_keys, past_length)
    return (key_pos <= query_pos) & (key_pos > query_pos - window)


def chunked_attention_mask(
    num_queries: int, num_keys: int, attention_chunk_size: int, past_length: int = 0
) -> np.ndarray:
    """Causal mask limited to the query's own chunk of C positions (Llama 4 local layers).

    Query i at position ``p = past_length + i`` sees key j iff ``j <= p`` and
    ``j // C == p // C``. Chunks are fixed blocks ``[0, C), [C, 2C), ...`` of
    absolute positions, so unlike a sliding window the first query of a chunk
    sees only itself.

    C = 3, T = S = 8::

        key      0 1 2 3 4 5 6 7
        query 0  x . . . . . . .
        query 1  x x . . . . . .
        query 2  x x x . . . . .
        query 3  . . . x . . . .
        query 4  . . . x x . . .
        query 5  . . . x x x . .
        query 6  . . . . . . x .
        query 7  . . . . . . x x

    Positions: transformers counts chunks from the first non-padding token of
    each row, ``(j - L_b) // C == (p - L_b) // C`` with ``L_b`` the row's number
    of left-padding tokens (``masking_utils.py:102-111``, ``:1432-1437``); its
    indices are cache positions, not ``position_ids``. This function is the
    ``L_b = 0`` case; a left-padded row equals this mask on the unpadded
    sequence, shifted by ``L_b``.

    Args:
        num_queries: T.
        num_keys: S.
        attention_chunk_size: C >= 1.
        past_length: number of keys before the first query's position.

    Returns:
        ``(T, S)`` bool.

    Raises:
        RefimplError (a ValueError): ``attention_chunk_size`` is not an integer >= 1.

    Checked against: transformers ``masking_utils.py:102-111`` (``chunked_overlay``),
    ``:159-163`` (``chunked_causal_mask_function``), ``:1355`` (``create_chunked_causal_mask``,
    used by ``models/llama4/modeling_llama4.py:543``).
    """
    _check_positive_int("attention_chunk_size", attention_chunk_size)
    query_pos, key_pos = _positions(num_queries, num_keys, past_length)
    chunk = attention_chunk_size
    return (key_pos <= query_pos) & (key_pos // chunk == query_pos // chunk)


def padding_mask(key_valid: np.ndarray) -> np.ndarray:
    """Hide padded keys: ``(B, S)`` validity flags as a ``(B, 1, S)`` mask.

    The middle axis broadcasts over queries, so ``combine(causal, padding_mask(m))``
    is ``(B, T, S)``. Key padding ``[0, 1, 1]`` (one left pad) under causal, T = S = 3::

        key      0 1 2
        query 0  . . .      (fully masked: output zeros, see the module docstring)
        query 1  . x .
        query 2  . x x

    Args:
        key_valid: ``(B, S)`` bool, True for real tokens (the 2-D ``attention_mask``).

    Returns:
        ``(B, 1, S)`` bool.

    Raises:
        ShapeError: ``key_valid`` is not a 2-D bool array.

    Checked against: transformers ``masking_utils.py:166-177`` (``padding_mask_function``).
    """
    key_valid = np.asarray(key_valid)
    if key_valid.ndim != 2 or key_valid.dtype != np.bool_:
        raise ShapeError(f"padding_mask wants (B, S) bool, got {key_valid.dtype} {key_valid.shape}")
    return key_valid[:, None, :]


def combine(*masks: np.ndarray) -> np.ndarray:
    """Logical AND of boolean masks, broadcast together (a key must pass every mask).

    Causal and window W = 4 and chunk C = 3, T = S = 8 (query 7 sees keys 6, 7)::

        key      0 1 2 3 4 5 6 7
        query 5  . . . x x x . .
        query 6  . . . . . . x .
        query 7  . . . . . . x x

    Args:
        masks: one or more bool arrays with broadcastable shapes.

    Returns:
        bool, the broadcast shape.

    Raises:
        ShapeError: no mask, a non-bool mask, or shapes that do not broadcast.

    Checked against: transformers ``masking_utils.py:46-57`` (``and_masks``).
    """
    if not masks or any(np.asarray(m).dtype != np.bool_ for m in masks):
        raise ShapeError("combine wants one or more bool masks")
    try:
        return np.logical_and.reduce(np.broadcast_arrays(*masks))
    except ValueError as exc:
        raise ShapeError(f"combine: mask shapes {[np.shape(m) for m in masks]} do not broadcast") from exc
