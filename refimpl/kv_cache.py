"""Caches for incremental decoding: what each layer keeps between calls.

A model run in pieces, ``prefill(prompt)`` then ``decode(new tokens)`` any number of
times, must give the logits of one forward over the whole sequence. Between calls
each layer keeps exactly what later tokens will read:

========================  ===========================================  ====================
layer                     kept per sequence                            class
========================  ===========================================  ====================
full attention            every key and value (after RoPE / QK-norm)   :class:`KVCache`, span None
sliding window W          the last W keys and values (a ring of W)     :class:`KVCache`, span W
chunked attention C       the last C keys and values (Llama 4 local)   :class:`KVCache`, span C
MLA                       ``c_kv`` (after kv_a_layernorm) and roped    :class:`KVCache`, keys = c_kv,
                          ``k_rope``: no per-head key or value         values = k_rope
Gated DeltaNet            the state S and the last K-1 conv inputs     :class:`GatedDeltaNetCache`
Gemma 3n KV-sharing       nothing: reads its source layer's cache      None
========================  ===========================================  ====================

Positions and padding
---------------------
Every token has an absolute position within its own sequence. A batch of prompts of
different lengths is left-padded: ``attention_mask`` ``(B, T)`` is 0 on the leading
pad slots and 1 on the tokens, and a token's position is the number of tokens before
it in its row, ``cumsum(attention_mask) - 1`` (the rule of transformers'
``GenerationMixin``, ``generation/utils.py:907-921``, ``_prepare_position_ids_for_generation``). Pad slots get position 0 and are never
visible as keys; their own outputs are undefined and must not be compared. Masks are
built from positions, never from slot indices (:func:`visibility`), so a left-padded row
sees exactly what the same row alone would see. Slots are shared by the batch: every
row holds the same number of cache slots (its pads included), and a decode call
appends the same number of tokens to every row.

Windows keep slots, not positions: a sliding-window layer keeps the last W slots of
every row, which holds every key a later query of that row can see (pads are only
ever at the left, before all of a row's tokens). W - 1 would do between calls
(transformers keeps W - 1); W is the ring a decode step reads, the W - 1 previous
keys and the new one (bug class SWA-04).

Every layer cache class has ``rollback(num_tokens) -> cache``; a decode call with
several tokens attends causally among them (a verification step is an ordinary call).

Rolling back
------------
:func:`rollback_kv` undoes up to the tokens of the last call (speculative
verification: feed k drafts, accept a prefix, drop the rest). A bounded cache (span
W or C) keeps the entries its last call pushed out, so that after a rollback it again
holds exactly the last ``span`` entries of the shortened sequence: a ring that lost
them could not be rolled back (bug classes KV-03 and KV-07 in
``shared/bug-classes.md``).

Checked against: transformers 5.24 ``cache_utils.py`` (``DynamicLayer``,
``DynamicSlidingWindowLayer``: keeps ``sliding_window - 1`` past entries and attends
over those plus the new ones), ``masking_utils.py`` (masks from cache positions) and
``generation/utils.py`` (position ids from the attention mask).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .attention import grouped_query_attention
from .errors import InputError, ShapeError


@dataclass(frozen=True)
class StepContext:
    """The new tokens of one call, as every layer sees them.

    Attributes:
        positions: ``(B, T)`` int64 absolute position of each new token in its sequence
            (pad slots: 0).
        valid: ``(B, T)`` bool, False on left-padding slots.
        caches: one entry per layer as the previous call left it (None: empty, or a
            layer that keeps nothing); ``()`` for a fresh sequence.
    """

    positions: np.ndarray
    valid: np.ndarray
    caches: tuple = ()

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    def layer_cache(self, layer: int):
        """The cache layer ``layer`` left at the previous call, or None."""
        return self.caches[layer] if layer < len(self.caches) else None


def fresh_context(batch: int, num_tokens: int, attention_mask: np.ndarray | None = None) -> StepContext:
    """The context of a first call (prefill) over ``(batch, num_tokens)`` ids.

    Args:
        attention_mask: None (no padding) or ``(B, T)`` of 0/1 (or bool): 0 on leading pad
            slots only.

    Raises:
        ShapeError: the mask's shape differs from the ids'.
        InputError: values other than 0/1, a 0 after a 1 in a row (only left padding is
            defined), or a row without any token.
    """
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(num_tokens, dtype=np.int64), (batch, num_tokens)).copy()
        return StepContext(positions=positions, valid=np.ones((batch, num_tokens), dtype=bool))
    mask = np.asarray(attention_mask)
    if mask.shape != (batch, num_tokens):
        raise ShapeError(f"attention_mask has shape {mask.shape}, input_ids ({batch}, {num_tokens})")
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iu":
            raise InputError(f"attention_mask must be integers 0 and 1 (or bool), got dtype {mask.dtype}")
        if not np.isin(mask, (0, 1)).all():
            others = sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]
            raise InputError(f"attention_mask must hold only 0 and 1, got also {others}")
        mask = mask.astype(bool)
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise InputError("attention_mask: only left padding is supported (a 0 follows a 1 in some row)")
    if not mask.any(axis=1).all():
        raise InputError("attention_mask: a row has no token (all zeros)")
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
    return StepContext(positions=positions, valid=mask)


def next_context(positions: np.ndarray, num_tokens: int, caches: tuple) -> StepContext:
    """The context of a decode call adding ``num_tokens`` tokens after ``positions`` ``(B,)``,
    the next free position of each row."""
    new = positions[:, None] + np.arange(num_tokens, dtype=np.int64)[None, :]
    return StepContext(positions=new, valid=np.ones(new.shape, dtype=bool), caches=caches)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of one attention layer, oldest slot first.

    Attributes:
        keys: ``(B, S, ...)`` what the layer's keys are made of (MLA: ``c_kv`` ``(B, S, Dc)``).
        values: ``(B, S, ...)`` (MLA: ``k_rope`` ``(B, S, Dr)``).
        positions: ``(B, S)`` int64 position of each slot's token.
        valid: ``(B, S)`` bool, False on pad slots.
        span: None (keep all), or how many of the newest slots are kept (sliding window W,
            attention chunk C).
        last_added: how many slots the last call appended (the most :func:`rollback_kv` undoes).
        evicted: the slots the last call pushed out of a bounded cache (at most
            ``last_added`` of them, oldest first), or None.
    """

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    valid: np.ndarray
    span: int | None = None
    last_added: int = 0
    evicted: "KVCache | None" = None

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    def rollback(self, num_tokens: int) -> "KVCache":
        """:func:`rollback_kv`."""
        return rollback_kv(self, num_tokens)

    def _slots(self, index) -> "KVCache":
        return KVCache(self.keys[:, index], self.values[:, index], self.positions[:, index], self.valid[:, index],
                       self.span)


def _concat(a: KVCache, b: KVCache) -> KVCache:
    return KVCache(np.concatenate([a.keys, b.keys], axis=1), np.concatenate([a.values, b.values], axis=1),
                   np.concatenate([a.positions, b.positions], axis=1), np.concatenate([a.valid, b.valid], axis=1),
                   b.span)


def extend_kv(cache: KVCache | None, keys: np.ndarray, values: np.ndarray, context: StepContext,
              span: int | None = None) -> tuple[KVCache, KVCache]:
    """Append one call's keys and values to a layer's cache.

    Args:
        cache: the layer's cache from the previous call, or None (fresh).
        keys: ``(B, T, ...)`` the new tokens' keys; values: ``(B, T, ...)``.
        context: the call's positions and padding.
        span: None (full attention) or the number of newest slots to keep (W or C).

    Returns:
        ``(visible, kept)``: ``visible`` holds the old slots followed by the new ones (what
        this call's queries attend over, masked by :func:`visibility`); ``kept`` is the
        cache for the next call: the last ``span`` slots of ``visible`` (all of them when
        span is None), with the pushed-out slots of this call remembered for a rollback.

    Raises:
        ShapeError: keys or values do not match the context's ``(B, T)`` or the cache's
            trailing shape.
    """
    b, t = context.positions.shape
    if keys.shape[:2] != (b, t) or values.shape[:2] != (b, t):
        raise ShapeError(f"KV cache: keys {keys.shape} / values {values.shape} do not start with ({b}, {t})")
    new = KVCache(keys, values, context.positions, context.valid, span)
    if cache is None:
        visible = new
    else:
        if cache.keys.shape[2:] != keys.shape[2:] or cache.values.shape[2:] != values.shape[2:]:
            raise ShapeError(f"KV cache holds keys {cache.keys.shape[2:]} / values {cache.values.shape[2:]} "
                             f"per slot, the new ones are {keys.shape[2:]} / {values.shape[2:]}")
        visible = _concat(cache._slots(slice(None)), new)
    if span is None or visible.length <= span:
        return visible, replace(visible, last_added=t, evicted=None)
    kept = visible._slots(slice(visible.length - span, None))
    dropped = visible._slots(slice(max(visible.length - span - t, 0), visible.length - span))
    return visible, replace(kept, last_added=t, evicted=dropped)


def rollback_kv(cache: KVCache, num_tokens: int) -> KVCache:
    """The cache as it would be had the last ``num_tokens`` tokens never been fed.

    A bounded cache gets back the slots those tokens pushed out, so it again holds the
    last ``span`` slots of the shortened sequence.

    Raises:
        InputError: ``num_tokens`` is negative or more than the last call appended.
    """
    if num_tokens < 0 or num_tokens > cache.last_added:
        raise InputError(f"rollback of {num_tokens} token(s): the last call added {cache.last_added}, "
                         "and only its tokens can be rolled back")
    if num_tokens == 0:
        return replace(cache, last_added=0, evicted=None)
    # The tail of what the last call saw (evicted slots, then kept ones), minus the rolled-back
    # tokens; some of those may have been evicted themselves when the call added more than span.
    seen = cache if cache.evicted is None or not cache.evicted.length else _concat(cache.evicted, cache)
    kept = seen._slots(slice(0, seen.length - num_tokens))
    if cache.span is not None and kept.length > cache.span:
        kept = kept._slots(slice(kept.length - cache.span, None))
    return replace(kept, span=cache.span, last_added=0, evicted=None)


def visibility(context: StepContext, visible: KVCache, *, sliding_window: int | None = None,
               attention_chunk_size: int | None = None) -> np.ndarray:
    """Which slots each new token attends to: ``(B, T, S)`` bool.

    Query at position p sees a slot holding a token (not a pad) at position j iff
    ``j <= p``, and also ``p - j < sliding_window`` on a sliding-window layer (W keys,
    itself included), and ``j // C == p // C`` on a chunked layer. Same rules as
    :mod:`refimpl.masks`, from positions instead of slot indices.
    """
    qpos = context.positions[:, :, None]
    kpos = visible.positions[:, None, :]
    seen = visible.valid[:, None, :] & (kpos <= qpos)
    if sliding_window is not None:
        seen &= qpos - kpos < sliding_window
    if attention_chunk_size is not None:
        seen &= kpos // attention_chunk_size == qpos // attention_chunk_size
    return seen


def attend_with_cache(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, context: StepContext, layer: int, *, scale: float,
    sliding_window: int | None = None, attention_chunk_size: int | None = None, sinks: np.ndarray | None = None,
    softcap: float | None = None,
) -> tuple[np.ndarray, KVCache]:
    """Attention of one call's queries over layer ``layer``'s cache and the new keys.

    Args:
        q: ``(B, T, H, D)`` new queries (after RoPE); k: ``(B, T, Hkv, D)``; v: ``(B, T, Hkv, Dv)``.
        context: positions, padding and the caches of the previous call.
        layer: index of the layer's entry in ``context.caches``.
        scale, sinks, softcap: as :func:`refimpl.attention.grouped_query_attention`.
        sliding_window: W of a sliding-window layer (keeps W slots), else None.
        attention_chunk_size: C of a chunked layer (keeps C slots), else None.

    Returns:
        ``(out (B, T, H, Dv), kept)``: the attention output and the layer's cache for the next call.
    """
    span = sliding_window if sliding_window is not None else attention_chunk_size
    visible, kept = extend_kv(context.layer_cache(layer), k, v, context, span=span)
    mask = visibility(context, visible, sliding_window=sliding_window, attention_chunk_size=attention_chunk_size)
    out = grouped_query_attention(q, visible.keys, visible.values, mask, scale, sinks=sinks, softcap=softcap)
    return out, kept
