"""Attention masks as boolean visibility arrays (True = the key is visible).

Each mask is built by one small named function; attention takes the result.
Positions are absolute: a query block that starts after ``past_length`` cached
keys has query i at position ``past_length + i``.

Causal mask, T = 3 queries after 2 cached keys (S = 5 keys)::

    key      0 1 2 3 4
    query 0  x x x . .      (position 2)
    query 1  x x x x .      (position 3)
    query 2  x x x x x      (position 4)

Checked against: transformers ``masking_utils.py`` (``causal_mask_function``).
"""

from __future__ import annotations

import numpy as np


def causal_mask(num_queries: int, num_keys: int, past_length: int = 0) -> np.ndarray:
    """Key j is visible to query i iff ``j <= past_length + i``.

    Args:
        num_queries: T.
        num_keys: S (usually ``past_length + T``).
        past_length: number of keys before the first query's position.

    Returns:
        ``(T, S)`` bool.
    """
    query_pos = past_length + np.arange(num_queries)[:, None]
    key_pos = np.arange(num_keys)[None, :]
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
        ValueError: ``window`` < 1.

    Checked against: transformers ``masking_utils.py`` (``sliding_window_overlay``).
    """
    if window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    query_pos = past_length + np.arange(num_queries)[:, None]
    key_pos = np.arange(num_keys)[None, :]
    return (key_pos <= query_pos) & (key_pos > query_pos - window)
