"""Token embedding lookup and the language-model head.

    h_0 = E[input_ids]            E: (V, M) ``model.embed_tokens.weight``
    logits = h_L W_lm^T           W_lm: (V, M) ``lm_head.weight``, or E when tied

Gemma multiplies the rows by ``sqrt(hidden_size)`` (:func:`scaled_embed_tokens`).

Checked against: transformers ``torch.nn.Embedding`` and ``Qwen3ForCausalLM.lm_head``
(``tie_word_embeddings``).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError
from .linear import linear
from .numerics import FLOAT_DTYPES, as_float_array, check_finite_positive


def _integer_array(input_ids, what: str) -> np.ndarray:
    """``input_ids`` as a signed or unsigned integer array of any shape.

    Raises:
        InputError: a masked array with masked entries (the mask would be ignored), an
            object that does not convert to a rectangular array, or a dtype that is not an
            integer one (bool, float, complex, object, str, timedelta64 ...).
    """
    if np.ma.is_masked(input_ids):
        raise InputError(f"{what} must not be a masked array with masked entries (the mask would be ignored)")
    try:
        ids = np.asarray(input_ids)
    except Exception as exc:  # whatever the object's own conversion raises
        raise InputError(f"{what} must be a rectangular integer array ({type(exc).__name__}: {exc})") from None
    # dtype kinds: signed and unsigned integers only (NumPy counts timedelta64 as an integer type).
    if ids.size and ids.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {ids.dtype}")
    return ids


def check_token_ids(input_ids, vocab_size: int) -> np.ndarray:
    """Validate token ids and return them as an int64 array ``(B, T)``.

    Raises:
        InputError: not convertible to an integer array (see :func:`_integer_array`), not
            2-D, empty, or an id outside ``[0, vocab_size)`` (the first offending id and its
            position are named).
    """
    ids = _integer_array(input_ids, "token ids")
    if ids.size == 0 or ids.ndim != 2:
        raise InputError(f"token ids must have shape (batch, seq) with batch, seq >= 1, got {ids.shape}")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise InputError(
            f"token id {int(ids[where])} at position {where} is outside the vocabulary [0, {vocab_size})"
        )
    return ids.astype(np.int64)


def check_prompt_ids(prompt_ids) -> np.ndarray:
    """Validate a prompt ``(T0,)`` of token ids (the vocabulary bound is the model's to check).

    Returns:
        The ids as int64 ``(T0,)``.

    Raises:
        InputError: not convertible to an integer array (see :func:`_integer_array`), not
            1-D, empty, or an id that is negative or beyond int64.
    """
    ids = _integer_array(prompt_ids, "prompt ids")
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"the prompt must be a non-empty 1-D id sequence, got shape {ids.shape}")
    bad = np.flatnonzero((ids < 0) | (ids > np.iinfo(np.int64).max))
    if bad.size:
        raise InputError(f"prompt id {int(ids[bad[0]])} at position {int(bad[0])} is not a token id (negative or "
                         "beyond int64)")
    return ids.astype(np.int64)


def _check_table(embedding, where: str) -> np.ndarray:
    """The embedding table as a 2-D float array (float64, float32, float16 or bfloat16)."""
    table = as_float_array(f"{where}: weight", embedding, dtypes=FLOAT_DTYPES)
    if table.ndim != 2:
        raise ShapeError(f"{where}: weight must be (V, M), got shape {table.shape}")
    return table


def embed_tokens(input_ids: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """Rows of the embedding table for each token.

    Args:
        input_ids: ``(B, T)`` integer ids in ``[0, V)`` (checked by :func:`check_token_ids`).
        embedding: ``(V, M)`` float64, float32, float16 or bfloat16.

    Returns:
        ``(B, T, M)`` in the dtype of ``embedding``.

    Raises:
        InputError: bad ids (see :func:`check_token_ids`), or a non-float table.
        ShapeError: the table is not 2-D.
    """
    table = _check_table(embedding, "embed_tokens")
    return table[check_token_ids(input_ids, table.shape[0])]


def scaled_embed_tokens(input_ids: np.ndarray, embedding: np.ndarray, embed_scale: float) -> np.ndarray:
    """Embedding rows times a scale rounded to the table's dtype (Gemma: ``sqrt(hidden_size)``).

    The scale is rounded to the dtype of ``embedding`` *before* multiplying, as
    the reference does: sqrt(3072) = 55.4256 becomes 55.5 in bfloat16, 55.4375 in
    float16 and 55.425625 in float32 (bug class NRM-06).

    Args:
        input_ids: ``(B, T)`` integer ids in ``[0, V)`` (checked again here).
        embedding: ``(V, M)`` float64, float32, float16 or bfloat16.
        embed_scale: the multiplier, e.g. ``hidden_size ** 0.5``.

    Returns:
        ``(B, T, M)`` in the dtype of ``embedding``.

    Raises:
        InputError: bad ids (see :func:`check_token_ids`); a non-float table;
            ``embed_scale`` not a positive finite number, or one that overflows or
            rounds to 0 in the table's dtype.
        ShapeError: the table is not 2-D.

    Checked against: transformers 5.24 ``Gemma3TextScaledWordEmbedding``
    (``embed_scale`` buffer cast to the weight dtype).
    """
    table = _check_table(embedding, "embedding")
    scale = check_finite_positive("embedding: embed_scale", embed_scale, dtype=table.dtype)
    return table[check_token_ids(input_ids, table.shape[0])] * scale


def lm_head(hidden: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Logits ``hidden @ weight.T``.

    Args:
        hidden: ``(B, T, M)`` final-normalised hidden states.
        weight: ``(V, M)``: ``lm_head.weight``, or the embedding table when
            ``tie_word_embeddings`` is true.

    Returns:
        ``(B, T, V)`` in the dtype of ``hidden``.
    """
    return linear(hidden, weight)
