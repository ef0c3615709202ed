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
