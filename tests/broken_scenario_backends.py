"""Deliberately wrong backends for the stateful bug classes: positions, windows, rings, rollback,
MLA context merging, Gated DeltaNet state handoff.

Each factory returns the reference backend (``conformance.backends.refimpl_backend``) with one
cache mistake that an inference engine has shipped (the codes of ``shared/bug-classes.md``;
``docs/bug-classes.md``). The mistake is emulated inside the NumPy reference: one function is
replaced (its original captured at import, before any patch) for the duration of every prefill,
decode and rollback call, or the loaded model's ``decode`` / ``rollback`` edits the state it is
given, so the only difference from a correct backend is that mistake. Where the mistake lives in a
structure the reference does not have (a ring with a write index, a context split into workspace
chunks whose partial attentions are merged by log-sum-exp, a kernel's state layout), the backend
builds that structure from the reference's pieces, and its mistake-free version is a factory too
(``mla_chunked_context``, ``gdn_layouts_agree``) that passes every case, so a failure is the
mistake's, not the emulation's.

The scenario cases built to expose them are ``tools/golden_cases/scenario_classes.py``;
``tests/test_broken_scenarios.py`` checks which cases each backend fails and at which step.
Used as ``--backend broken_scenario_backends:<factory>`` with ``tests/`` on the import path.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from contextlib import ExitStack
from unittest import mock

import numpy as np

import refimpl.models
from conformance.backends.refimpl_backend import RefimplBackend, RefimplModel
from refimpl import kv_cache
from refimpl import model as refimpl_model
from refimpl.attention import grouped_query_attention
from refimpl.kv_cache import KVCache, StepContext
from refimpl.linear import linear
from refimpl.linear_attention.delta_rule import heads_first
from refimpl.linear_attention.gated_deltanet import GatedDeltaNetCache, GatedDeltaNetState
from refimpl.mla import split_kv_b_proj
from refimpl.rope import rope_cos_sin
from refimpl.models import deepseek_v3, qwen3_next

# The module (the package's attribute of that name is the op function ``gated_deltanet``).
gated_deltanet = importlib.import_module("refimpl.linear_attention.gated_deltanet")

# The originals, captured before any patch (a replacement calls these, never the patched names).
_extend_kv = kv_cache.extend_kv
_visibility = kv_cache.visibility
_rollback_kv = kv_cache.rollback_kv
_fresh_context = refimpl_model.fresh_context
_mla_attend_absorbed = deepseek_v3.mla_attend_absorbed
_mla_visibility = deepseek_v3.visibility
_gdn_step = qwen3_next.gated_deltanet_step
_recurrent = gated_deltanet.gated_delta_rule_recurrent
_chunked = gated_deltanet.gated_delta_rule_chunked
_conv = gated_deltanet.causal_conv1d
_rope_cos_sin = rope_cos_sin


def _rope_modules() -> list:
    """The reference modules that build RoPE tables with their own name ``rope_cos_sin``."""
    names = [f"refimpl.models.{m.name}" for m in pkgutil.iter_modules(refimpl.models.__path__)]
    modules = [importlib.import_module(name) for name in names + ["refimpl.gated_attention", "refimpl.mla"]]
    return [m for m in modules if hasattr(m, "rope_cos_sin")]


# --- the backend ---------------------------------------------------------------------------------------------------

class ScenarioModel(RefimplModel):
    """A loaded reference model whose calls run with ``patches`` applied: a list of
    ``(object, attribute, replacement)``, the same objects for the whole scenario (a replacement may
    keep state across calls, e.g. which kernel wrote a state array)."""

    def __init__(self, model, patches):
        super().__init__(model)
        self._patches = patches

    def _patched(self):
        stack = ExitStack()
        for target, attribute, replacement in self._patches:
            stack.enter_context(mock.patch.object(target, attribute, replacement))
        return stack

    def run(self, input_ids):
        with self._patched():
            return super().run(input_ids)

    def prefill(self, input_ids, attention_mask):
        with self._patched():
            return super().prefill(input_ids, attention_mask)

    def decode(self, input_ids, state):
        with self._patched():
            return super().decode(input_ids, state)

    def rollback(self, state, num_tokens):
        with self._patched():
            return super().rollback(state, num_tokens)


class BrokenScenarioBackend(RefimplBackend):
    """The refimpl backend whose models are ``model_class(model, make_patches())`` (a fresh list per
    loaded model)."""

    def __init__(self, name, make_patches=list, model_class=ScenarioModel):
        super().__init__()
        self.name = name
        self._make_patches = make_patches
        self._model_class = model_class

    def load_model(self, checkpoint_dir, dtype):
        return self._model_class(super().load_model(checkpoint_dir, dtype).model, self._make_patches())


def _backend(name, *patches, model_class=ScenarioModel) -> BrokenScenarioBackend:
    return BrokenScenarioBackend(f"broken:{name}", lambda: list(patches), model_class)


def _continuing(context: StepContext, visible: KVCache) -> bool:
    """Whether the call continues a cache (some visible slot is not one of the call's own)."""
    return visible.length > context.num_tokens


# --- KV-01: positions of a chunk -----------------------------------------------------------------------------------

def positions_restart_each_call() -> BrokenScenarioBackend:
    """KV-01: every call's RoPE tables built from positions counted from the call's first token
    (0, 1, ... again in each chunk or decode); masks still read the true positions."""

    def restarted(positions, *args, **kwargs):
        positions = np.asarray(positions)
        if positions.ndim == 2:
            positions = positions - positions[:, :1]
        return _rope_cos_sin(positions, *args, **kwargs)

    return _backend("KV-01-positions-restart", *[(m, "rope_cos_sin", restarted) for m in _rope_modules()])


class _DecodeFromSlotCount(ScenarioModel):
    def decode(self, input_ids, state):
        # The next position taken from the number of slots so far (pads included), the same for every row.
        state = dataclasses.replace(state, next_position=np.full_like(state.next_position, state.length))
        return super().decode(input_ids, state)


def decode_positions_from_slot_count() -> BrokenScenarioBackend:
    """KV-01: after a left-padded prompt (positions ``cumsum(mask) - 1``, right), each decode's
    positions continue from the slot count, so a padded row jumps by its pad count."""
    return _backend("KV-01-decode-slot-count", model_class=_DecodeFromSlotCount)


def slot_index_positions() -> BrokenScenarioBackend:
    """KV-01: positions are slot indices in the prompt (pads counted) and continue from there.
    Invisible under RoPE alone (a whole row shifts); visible where absolute positions enter the
    math (Llama 4's chunk boundaries, its NoPE temperature)."""

    def slots(batch, num_tokens, attention_mask=None):
        right = _fresh_context(batch, num_tokens, attention_mask)
        positions = np.broadcast_to(np.arange(num_tokens, dtype=np.int64), (batch, num_tokens)).copy()
        return StepContext(positions=positions, valid=right.valid, caches=right.caches)

    return _backend("KV-01-slot-positions", (refimpl_model, "fresh_context", slots))


# --- KV-02, SWA-04: which keys a query sees -------------------------------------------------------------------------

def _keep_everything(cache, keys, values, context, span=None):
    """A prefix cache that keeps every slot of a sliding layer (the window is left to the mask)."""
    return _extend_kv(cache, keys, values, context, span=None)


def _cached_slots_unwindowed(extend_path: bool, decode_path: bool):
    def visibility(context, visible, *, sliding_window=None, attention_chunk_size=None):
        right = _visibility(context, visible, sliding_window=sliding_window, attention_chunk_size=attention_chunk_size)
        single = context.num_tokens == 1
        if sliding_window is None or not _continuing(context, visible) or not (decode_path if single else extend_path):
            return right
        cached = visible.length - context.num_tokens
        unwindowed = _visibility(context, visible, attention_chunk_size=attention_chunk_size)
        return np.concatenate([unwindowed[..., :cached], right[..., cached:]], axis=-1)

    return visibility


def window_among_new_tokens_only() -> BrokenScenarioBackend:
    """KV-02: a multi-token continuation applies the sliding window among its own tokens only:
    cached keys W or more positions back stay visible (the single-token decode path is right)."""
    return _backend("KV-02-extend-cached-unwindowed", (kv_cache, "extend_kv", _keep_everything),
                    (kv_cache, "visibility", _cached_slots_unwindowed(extend_path=True, decode_path=False)))


def cached_keys_never_windowed() -> BrokenScenarioBackend:
    """KV-02: cached keys are never windowed, in decode and continuation calls alike."""
    return _backend("KV-02-cached-unwindowed", (kv_cache, "extend_kv", _keep_everything),
                    (kv_cache, "visibility", _cached_slots_unwindowed(extend_path=True, decode_path=True)))


def _window_changed_by(delta: int, extend_path: bool, decode_path: bool):
    def visibility(context, visible, *, sliding_window=None, attention_chunk_size=None):
        single = context.num_tokens == 1
        if sliding_window is not None and _continuing(context, visible) and (decode_path if single else extend_path):
            sliding_window += delta
        return _visibility(context, visible, sliding_window=sliding_window, attention_chunk_size=attention_chunk_size)

    return visibility


def decode_window_short_by_one() -> BrokenScenarioBackend:
    """SWA-04: the decode buffer sized by the radius W - 1 with the new token in it: a decode
    step past the window sees W - 1 keys, dropping the oldest one still inside the window."""
    return _backend("SWA-04-decode-W-1", (kv_cache, "visibility", _window_changed_by(-1, False, True)))


def extend_window_short_by_one() -> BrokenScenarioBackend:
    """SWA-04: the same in the continuation (extend) path only: its queries see W - 1 keys."""
    return _backend("SWA-04-extend-W-1", (kv_cache, "visibility", _window_changed_by(-1, True, False)))


def decode_window_long_by_one() -> BrokenScenarioBackend:
    """SWA-04, mirror: a decode step sees W + 1 keys (the radius taken as the size, plus the new token)."""
    return _backend("SWA-04-decode-W+1", (kv_cache, "visibility", _window_changed_by(+1, False, True)))


# --- KV-05, KV-08: how much a bounded cache keeps --------------------------------------------------------------------

def _ring_of_twice_the_span(cache, keys, values, context, span=None):
    visible, kept = _extend_kv(cache, keys, values, context, span=span)
    if span is None or visible.length <= 2 * span:
        return visible, kept
    # The call's keys are written into a ring of 2W before attention: a piece of n > W overwrites
    # the previous piece's last keys, which its first queries still need.
    return visible._slots(slice(visible.length - 2 * span, None)), kept


def ring_of_twice_the_window() -> BrokenScenarioBackend:
    """KV-05: a ring of 2W slots written before attention; pieces longer than W overflow it."""
    return _backend("KV-05-ring-2W", (kv_cache, "extend_kv", _ring_of_twice_the_span))


def _evicting_to(size):
    def extend(cache, keys, values, context, span=None):
        visible, kept = _extend_kv(cache, keys, values, context, span=span)
        if span is None:
            return visible, kept
        keep = min(span, size(context), kept.length)
        return visible, dataclasses.replace(kept._slots(slice(kept.length - keep, None)),
                                            last_added=kept.last_added, evicted=None)

    return extend


def evict_to_attention_chunk() -> BrokenScenarioBackend:
    """KV-08: every bounded cache (sliding window W, attention chunk C) evicted to 2 slots, the
    eviction size of chunked layers with an attention chunk of 2, instead of its own W or C."""
    return _backend("KV-08-evict-to-chunk-2", (kv_cache, "extend_kv", _evicting_to(lambda context: 2)))


def evict_to_last_piece() -> BrokenScenarioBackend:
    """KV-08: a bounded cache evicted to the size of the last call (a decode keeps one slot)."""
    return _backend("KV-08-evict-to-last-piece", (kv_cache, "extend_kv",
                                                 _evicting_to(lambda context: context.num_tokens)))


# --- KV-03, KV-07: rolling back a ring that has slid -----------------------------------------------------------------

def _wrapped(cache: KVCache) -> bool:
    return cache.span is not None and cache.evicted is not None and cache.evicted.length > 0


def _rollback_not_restored(cache, num_tokens):
    if not _wrapped(cache):
        return _rollback_kv(cache, num_tokens)
    # The ring's overwritten slots are gone: only its own slots minus the rolled-back ones remain.
    return _rollback_kv(dataclasses.replace(cache, evicted=None), num_tokens)


def rollback_without_restoring_ring() -> BrokenScenarioBackend:
    """KV-03: a rollback (or prefix reuse) on a ring that has slid drops the rejected slots but
    cannot give back the slots they overwrote: the shortened sequence misses up to r - 1 keys
    the next token's window needs (a rollback of 1 is invisible: the ring keeps one key more
    than the next token reads)."""
    return _backend("KV-03-ring-not-restored", (kv_cache, "rollback_kv", _rollback_not_restored))


def _rollback_raw_trim(cache, num_tokens):
    if not _wrapped(cache) or num_tokens == 0 or num_tokens > cache.length:
        return _rollback_not_restored(cache, num_tokens)
    # Ring slots are physical; the write index moves back by r. The slots the rejected drafts
    # overwrote still hold the drafts' keys and values, and the engine reads them as the tokens
    # that were there (the last e drafts of the call overwrote the e evicted slots, in order).
    n, e = cache.length, cache.evicted.length
    stale = min(num_tokens, e)
    drafts = cache._slots(slice(n - stale, n))
    overwritten = cache.evicted._slots(slice(e - stale, e))
    substituted = KVCache(drafts.keys, drafts.values, overwritten.positions, overwritten.valid, cache.span)
    kept = kv_cache._concat(substituted, cache._slots(slice(0, n - num_tokens)))
    return dataclasses.replace(kept, span=cache.span, last_added=0, evicted=None)


def rollback_raw_ring_trim() -> BrokenScenarioBackend:
    """KV-07: a rotating cache trimmed by moving its write index back (the flat-cache trim): the
    slots the rejected drafts overwrote keep the drafts' keys, read as the older tokens that were
    there (silently scrambled context)."""
    return _backend("KV-07-raw-ring-trim", (kv_cache, "rollback_kv", _rollback_raw_trim))


def _rollback_skipped_when_bounded(cache, num_tokens):
    if cache.span is None:
        return _rollback_kv(cache, num_tokens)
    return dataclasses.replace(cache, last_added=0, evicted=None)


def rollback_ignored_on_rotating_caches() -> BrokenScenarioBackend:
    """KV-07: full-attention caches are trimmed, rotating (window / chunk) caches are left as they are:
    the rejected drafts stay, and the next tokens see them at their old positions."""
    return _backend("KV-07-rotating-not-trimmed", (kv_cache, "rollback_kv", _rollback_skipped_when_bounded))


# --- MLA-05 .. MLA-09: engine paths of MLA attention over a latent cache ----------------------------------------------

#: Key rows per block of the absorbed decode kernel (MLA-05).
DECODE_BLOCK = 16
#: Slots per context chunk (the workspace) of the chunked-context prefill (MLA-06, -07, -09).
CONTEXT_CHUNK = 16


def _o_proj(step, out: np.ndarray) -> np.ndarray:
    b, t, h, dv = out.shape
    return linear(out.reshape(b, t, h * dv), step.weights["o_proj.weight"], step.weights.get("o_proj.bias"))


def _absorbed_decode_value_rows_strided(step, c_kv, k_rope, mask):
    """The absorbed decode with the value pointer of key block n at ``n * block * Dv`` of the
    ``(S, Dk)`` cache instead of ``n * block * Dk`` (MLA-05); multi-token calls are right."""
    if step.q_nope.shape[1] != 1:
        return _mla_attend_absorbed(step, c_kv, k_rope, mask)
    w_uk, w_uv = split_kv_b_proj(step.weights["kv_b_proj.weight"], step.dims)
    q = np.concatenate([np.einsum("bthn,hnc->bthc", step.q_nope, w_uk), step.q_rope], axis=-1)
    rows = np.concatenate([c_kv, k_rope], axis=-1)                        # (B, S, Dk), V = the first Dv columns
    b, s, dk = rows.shape
    dv = c_kv.shape[-1]
    flat = rows.reshape(b, s * dk)
    starts = [(j // DECODE_BLOCK) * DECODE_BLOCK * dv + (j % DECODE_BLOCK) * dk for j in range(s)]
    values = np.stack([flat[:, start:start + dv] for start in starts], axis=1)
    latent = grouped_query_attention(q, rows[:, :, None, :], values[:, :, None, :], mask, step.scale)
    return _o_proj(step, np.einsum("bthc,hvc->bthv", latent, w_uv))


def mla_decode_value_rows_strided_by_dv() -> BrokenScenarioBackend:
    """MLA-05: the absorbed decode kernel steps key rows by Dk but value rows by Dv: past the first
    block of 16 cached slots the values come from the wrong rows."""
    return _backend("MLA-05-value-stride", (deepseek_v3, "mla_attend_absorbed", _absorbed_decode_value_rows_strided))


def _partial(q, k, v, mask, scale):
    """Softmax attention of ``q`` (B, T, H, D) over per-head ``k`` (B, S, H, D), ``v`` (B, S, H, Dv)
    under ``mask`` (B, T, S): ``(out (B, T, H, Dv), row max m, exp-sum l)``, m and l (B, T, H);
    a row with no visible key gives out 0, m -inf, l 0."""
    scores = np.einsum("bthd,bshd->bths", q, k) * q.dtype.type(scale)
    visible = np.broadcast_to(mask[:, :, None, :], scores.shape)
    scores = np.where(visible, scores, -np.inf)
    m = scores.max(axis=-1)
    safe = np.where(np.isfinite(m), m, 0)
    p = np.where(visible, np.exp(scores - safe[..., None]), 0)
    l = p.sum(axis=-1)
    out = np.einsum("bths,bshd->bthd", p, v) / np.where(l > 0, l, 1)[..., None]
    return out, m, l


def _lse(m, l):
    with np.errstate(divide="ignore"):
        return np.where(l > 0, np.where(np.isfinite(m), m, 0) + np.log(l), -np.inf)


def _merge(parts):
    """Log-sum-exp merge of partial attentions ``[(out, lse)]`` (an lse of -inf weighs nothing)."""
    total = np.logaddexp.reduce(np.stack([lse for _, lse in parts]), axis=0)
    safe = np.where(np.isfinite(total), total, 0)
    out = sum(np.exp(lse - safe)[..., None] * o for o, lse in parts)
    return out, total


def _expanded(step, c_kv, k_rope):
    """Per-head keys ``(B, S, H, Dn + Dr)`` and values ``(B, S, H, Dv)`` from latent slots (the literal form)."""
    dims = step.dims
    b, s = c_kv.shape[:2]
    h = step.q_nope.shape[2]
    kv = linear(c_kv, step.weights["kv_b_proj.weight"]).reshape(b, s, h, -1)
    k_rope = np.broadcast_to(k_rope[:, :, None, :], (b, s, h, dims.qk_rope_head_dim))
    return np.concatenate([kv[..., :dims.qk_nope_head_dim], k_rope], axis=-1), kv[..., dims.qk_nope_head_dim:]


def _chunked_context(mistake):
    """MLA attention of a multi-token continuation as engines run it: the cached context in
    chunks of :data:`CONTEXT_CHUNK` slots (each attended by every new query) and the new tokens
    (causal among themselves), each part in the expanded form, merged by log-sum-exp.
    ``mistake``: None (right), ``"maxima"`` (parts weighed by their row maxima, not their
    log-sum-exp), ``"lse-without-max"`` (log-sum-exp without the max offset), ``"empty-lse-zero"``
    (a part with no visible key gets lse 0, not -inf), ``"suffix-stride"`` (with two or more
    context chunks the final merge reads the new tokens' padded output at the merged buffer's
    head stride Dv instead of its own Dn + Dr)."""

    def attend(step, c_kv, k_rope, mask):
        t = step.q_nope.shape[1]
        if t == 1:
            return _mla_attend_absorbed(step, c_kv, k_rope, mask)
        k, v = _expanded(step, c_kv, k_rope)
        q = np.concatenate([step.q_nope, step.q_rope], axis=-1)
        cached = c_kv.shape[1] - t
        chunks = [slice(start, min(start + CONTEXT_CHUNK, cached)) for start in range(0, cached, CONTEXT_CHUNK)]
        parts = [_partial(q, k[:, c], v[:, c], mask[..., c], step.scale) for c in chunks]
        suffix = _partial(q, k[:, cached:], v[:, cached:], mask[..., cached:], step.scale)
        out = _merge_parts(parts, suffix, mistake, step.dims)
        return _o_proj(step, out.astype(q.dtype))

    return attend


def _merge_parts(parts, suffix, mistake, dims):
    if mistake == "maxima":
        everything = parts + [suffix]
        top = np.max(np.stack([m for _, m, _ in everything]), axis=0)
        weights = [np.where(np.isfinite(m), np.exp(m - top), 0) for _, m, _ in everything]
        return sum(w[..., None] * o for w, (o, _, _) in zip(weights, everything)) / sum(weights)[..., None]
    if mistake == "lse-without-max":
        return _merge([(o, _lse(np.zeros_like(m), l)) for o, m, l in parts + [suffix]])[0]
    if mistake == "empty-lse-zero":
        return _merge([(o, np.where(l > 0, _lse(m, l), 0.0)) for o, m, l in parts + [suffix]])[0]
    prefix = _merge([(o, _lse(m, l)) for o, m, l in parts])
    out, m, l = suffix
    if mistake == "suffix-stride" and len(parts) >= 2:
        # The suffix comes padded to Dn + Dr per head; the merged prefix is contiguous (Dv per head).
        b, t, h, dv = out.shape
        padded = np.zeros((b, t, h, dims.qk_head_dim), dtype=out.dtype)
        padded[..., :dv] = out
        flat = padded.reshape(b, t, h * dims.qk_head_dim)
        out = np.stack([flat[..., i * dv:(i + 1) * dv] for i in range(h)], axis=2)
    return _merge([prefix, (out, _lse(m, l))])[0]


def mla_chunked_context() -> BrokenScenarioBackend:
    """No mistake: the chunked-context path of MLA-06/07/09 with the right merge (a control)."""
    return _backend("MLA-chunked-context-right", (deepseek_v3, "mla_attend_absorbed", _chunked_context(None)))


def mla_chunked_context_merge_by_maxima() -> BrokenScenarioBackend:
    """MLA-06: context chunks and new tokens merged by their row maxima (their exp-sums left out)."""
    return _backend("MLA-06-merge-by-maxima", (deepseek_v3, "mla_attend_absorbed", _chunked_context("maxima")))


def mla_chunked_context_lse_without_max() -> BrokenScenarioBackend:
    """MLA-06: each part's log-sum-exp returned without its max offset (log of the shifted sum)."""
    return _backend("MLA-06-lse-without-max",
                    (deepseek_v3, "mla_attend_absorbed", _chunked_context("lse-without-max")))


def mla_empty_context_chunk_lse_zero() -> BrokenScenarioBackend:
    """MLA-07: a context chunk with no key for a row (all pads) merged with lse 0 and output 0
    instead of lse -inf: that row's output is pulled towards zero."""
    return _backend("MLA-07-empty-chunk-lse-0",
                    (deepseek_v3, "mla_attend_absorbed", _chunked_context("empty-lse-zero")))


def mla_merge_suffix_read_at_prefix_stride() -> BrokenScenarioBackend:
    """MLA-09: with two or more context chunks, the final merge reads the new tokens' padded
    output (head stride Dn + Dr) at the merged prefix's stride Dv."""
    return _backend("MLA-09-suffix-stride", (deepseek_v3, "mla_attend_absorbed", _chunked_context("suffix-stride")))


def _mla_new_tokens_seeing(pattern):
    def visibility(context, visible, *, sliding_window=None, attention_chunk_size=None):
        right = _mla_visibility(context, visible, sliding_window=sliding_window,
                                attention_chunk_size=attention_chunk_size)
        t = context.num_tokens
        if t == 1 or not _continuing(context, visible):
            return right
        new = pattern(t) & visible.valid[:, None, visible.length - t:]
        return np.concatenate([right[..., :visible.length - t], new], axis=-1)

    return visibility


def mla_continuation_not_causal() -> BrokenScenarioBackend:
    """MLA-08: a decode kernel run on a multi-token continuation: its new tokens all see each other."""
    return _backend("MLA-08-not-causal", (deepseek_v3, "visibility",
                                          _mla_new_tokens_seeing(lambda t: np.ones((t, t), dtype=bool))))


def mla_continuation_as_separate_decodes() -> BrokenScenarioBackend:
    """MLA-08: a multi-token continuation run as independent decodes: each new token sees the cache
    and itself, not the new tokens before it."""
    return _backend("MLA-08-separate-decodes", (deepseek_v3, "visibility",
                                                _mla_new_tokens_seeing(lambda t: np.eye(t, dtype=bool))))


# --- GDN-04, GDN-06: which kernel wrote a state, and in which layout --------------------------------------------------

class _Writers:
    """Which kernel wrote each state array (by identity; the arrays are held so ids stay unique)."""

    def __init__(self):
        self._by_id = {}

    def wrote(self, array, kernel):
        self._by_id[id(array)] = (array, kernel)
        return array

    def writer(self, array, default):
        entry = self._by_id.get(id(array))
        return default if entry is None or entry[0] is not array else entry[1]


def _recurrent_state_as(reader, writer, state):
    """``state`` (B, Hv, d_k, d_v) as a kernel keeping it transposed (d_v, d_k) reads it, or the reverse."""
    if reader == writer:
        return state
    b, h, dk, dv = state.shape
    if reader == "recurrent":
        return np.ascontiguousarray(state).reshape(b, h, dv, dk).swapaxes(2, 3)
    return np.ascontiguousarray(state.swapaxes(2, 3)).reshape(b, h, dk, dv)


def _state_layouts(mistake: bool):
    """The chunked kernel keeps S as (d_k, d_v), the recurrent one (``mistake``) as (d_v, d_k):
    a state handed from one to the other is read with the wrong layout."""
    writers = _Writers()

    def recurrent(q, k, v, g, beta, *, initial_state=None, scale=None):
        if initial_state is not None and mistake:
            initial_state = _recurrent_state_as("recurrent", writers.writer(initial_state, "chunked"), initial_state)
        out, state = _recurrent(q, k, v, g, beta, initial_state=initial_state, scale=scale)
        return out, writers.wrote(state, "recurrent" if mistake else "chunked")

    def chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
        if initial_state is not None:
            initial_state = _recurrent_state_as("chunked", writers.writer(initial_state, "chunked"), initial_state)
        out, state = _chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state, scale=scale)
        return out, writers.wrote(state, "chunked")

    return [(gated_deltanet, "gated_delta_rule_recurrent", recurrent),
            (gated_deltanet, "gated_delta_rule_chunked", chunked)]


def _conv_state_as(reader, writer, state):
    """``state`` (B, C, K-1) as a kernel keeping it time-major (B, K-1, C) reads it, or the reverse."""
    if reader == writer:
        return state
    b, c, history = state.shape
    if reader == "time-major":
        return np.ascontiguousarray(state).reshape(b, history, c).swapaxes(1, 2)
    return np.ascontiguousarray(state.swapaxes(1, 2)).reshape(b, c, history)


def _conv_layouts(time_major_in):
    """The conv state written and read channel-major, except by the kernels named in
    ``time_major_in`` (``"decode"``: one token after a state; ``"extend"``: several after a state)."""
    writers = _Writers()

    def conv(x, weight, *, conv_state=None, activation="silu"):
        kernel = "prefill" if conv_state is None else "decode" if x.shape[1] == 1 else "extend"
        layout = "time-major" if kernel in time_major_in else "channel-major"
        if conv_state is not None:
            conv_state = _conv_state_as(layout, writers.writer(conv_state, "channel-major"), conv_state)
        out, state = _conv(x, weight, conv_state=conv_state, activation=activation)
        return out, writers.wrote(state, layout)

    return [(gated_deltanet, "causal_conv1d", conv)]


def gdn_layouts_agree() -> BrokenScenarioBackend:
    """No mistake: the layout-tracking kernels of GDN-04 / GDN-06 with every layout the same (a control)."""
    return BrokenScenarioBackend("broken:GDN-layouts-agree",
                                 lambda: _state_layouts(mistake=False) + _conv_layouts(time_major_in=()))


def gdn_decode_reads_state_transposed() -> BrokenScenarioBackend:
    """GDN-04: the recurrent (decode) kernel keeps S as (d_v, d_k), the chunked (prefill) kernel as
    (d_k, d_v): every handoff between them reads the other's memory in its own layout."""
    return BrokenScenarioBackend("broken:GDN-04-state-layout", lambda: _state_layouts(mistake=True))


def gdn_decode_from_zero_state() -> BrokenScenarioBackend:
    """GDN-04: the recurrent decode kernel is not given the prefill's state: it starts from zeros."""

    def recurrent(q, k, v, g, beta, *, initial_state=None, scale=None):
        return _recurrent(q, k, v, g, beta, initial_state=None, scale=scale)

    return _backend("GDN-04-decode-zero-state", (gated_deltanet, "gated_delta_rule_recurrent", recurrent))


def _recurrent_decay_after_update(q, k, v, g, beta, *, initial_state=None, scale=None):
    """The recurrent form with the decay applied after the delta-rule write (right: before it)."""
    qh, kh, vh, gh, bh = heads_first(q, k, v, g, beta, q.shape[-1] ** -0.5 if scale is None else scale)
    state = np.zeros((*vh.shape[:2], kh.shape[-1], vh.shape[-1]), dtype=v.dtype) if initial_state is None \
        else initial_state
    out = np.empty(vh.shape, dtype=vh.dtype)
    for t in range(vh.shape[2]):
        k_t, v_t = kh[:, :, t], vh[:, :, t]
        correction = bh[:, :, t, None] * (v_t - np.einsum("bhk,bhkv->bhv", k_t, state))
        state = np.exp(gh[:, :, t])[..., None, None] * (state + k_t[..., :, None] * correction[..., None, :])
        out[:, :, t] = np.einsum("bhk,bhkv->bhv", qh[:, :, t], state)
    return np.moveaxis(out, 1, 2), state


def gdn_decode_decay_after_update() -> BrokenScenarioBackend:
    """GDN-04: the recurrent decode kernel decays the state after the write instead of before it
    (the chunked prefill is right, so prefill and decode disagree)."""
    return _backend("GDN-04-decode-decay-after", (gated_deltanet, "gated_delta_rule_recurrent",
                                                  _recurrent_decay_after_update))


def gdn_padded_chunk_decays_state() -> BrokenScenarioBackend:
    """GDN-04: the chunked kernel pads the last chunk by repeating its last gate: the outputs are
    right, but the state handed on is decayed once more per padded position."""

    def chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
        out, state = _chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state, scale=scale)
        pads = (-q.shape[1]) % chunk_size
        return out, state * np.exp(pads * g[:, -1, :])[:, :, None, None]

    return _backend("GDN-04-padded-chunk-decay", (gated_deltanet, "gated_delta_rule_chunked", chunked))


def gdn_conv_state_time_major_in_decode() -> BrokenScenarioBackend:
    """GDN-06: the prefill writes the conv history channel-major, the decode kernel reads and writes
    it time-major: the first K - 1 decodes after a prefill read the wrong entries."""
    return BrokenScenarioBackend("broken:GDN-06-decode-time-major", lambda: _conv_layouts(("decode",)))


def gdn_conv_state_time_major_in_extend() -> BrokenScenarioBackend:
    """GDN-06: a multi-token continuation's kernel keeps the conv history time-major while prefill
    and decode keep it channel-major: wrong at every continuation after a cached state."""
    return BrokenScenarioBackend("broken:GDN-06-extend-time-major", lambda: _conv_layouts(("extend",)))


# --- GDN-07: what a continuation starts from, and in which precision the state is kept -------------------------------

def gdn_continuation_without_initial_state() -> BrokenScenarioBackend:
    """GDN-07: a multi-token continuation runs as a fresh prefill (has_initial_state false): its
    recurrent and conv state restart from zeros."""

    def step(hidden_states, weights, *, cache=None, **kwargs):
        fresh = cache is not None and hidden_states.shape[1] > 1
        return _gdn_step(hidden_states, weights, cache=None if fresh else cache, **kwargs)

    return _backend("GDN-07-no-initial-state", (qwen3_next, "gated_deltanet_step", step))


def gdn_continuation_without_recurrent_state() -> BrokenScenarioBackend:
    """GDN-07: the chunked kernel of a multi-token continuation is not given the initial recurrent
    state (the conv state is carried)."""

    def chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
        return _chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=None, scale=scale)

    return _backend("GDN-07-no-initial-recurrent-state", (gated_deltanet, "gated_delta_rule_chunked", chunked))


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (nearest, ties to even) and back to its dtype."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32).astype(x.dtype)


def _state_kept_in(rounding):
    def step(hidden_states, weights, **kwargs):
        out, cache = _gdn_step(hidden_states, weights, **kwargs)
        state = GatedDeltaNetState(rounding(cache.state.recurrent_state), rounding(cache.state.conv_state))
        return out, dataclasses.replace(cache, state=state)

    return step


def gdn_state_kept_in_bfloat16() -> BrokenScenarioBackend:
    """GDN-07: the recurrent and conv state stored in bfloat16 between calls (a float32 model)."""
    return _backend("GDN-07-state-bf16", (qwen3_next, "gated_deltanet_step", _state_kept_in(round_to_bfloat16)))


def gdn_state_kept_in_float16() -> BrokenScenarioBackend:
    """GDN-07: the recurrent and conv state stored in float16 between calls (a float32 model)."""
    return _backend("GDN-07-state-f16", (qwen3_next, "gated_deltanet_step",
                                         _state_kept_in(lambda x: x.astype(np.float16).astype(x.dtype))))


# --- MTP-03: what a rollback does to the Gated DeltaNet state ---------------------------------------------------------

class _GdnRollback(ScenarioModel):
    """The reference rollback, then each Gated DeltaNet layer's cache replaced by
    ``edit(verified, rolled_back, index among GDN layers)``."""

    edit = None

    def rollback(self, state, num_tokens):
        right = super().rollback(state, num_tokens)
        if num_tokens == 0:
            return right
        layers, index = list(right.layers), 0
        for layer, verified in enumerate(state.layers):
            if isinstance(verified, GatedDeltaNetCache):
                layers[layer] = type(self).edit(verified, right.layers[layer], index)
                index += 1
        return dataclasses.replace(right, layers=tuple(layers))


def _gdn_rollback_backend(name, edit) -> BrokenScenarioBackend:
    model_class = type(f"_GdnRollback_{name}", (_GdnRollback,), {"edit": staticmethod(edit)})
    return BrokenScenarioBackend(f"broken:{name}", list, model_class)


def _before_verify(verified):
    before = verified.replay.before
    if before is None:
        zero = GatedDeltaNetState(np.zeros_like(verified.state.recurrent_state),
                                  np.zeros_like(verified.state.conv_state))
        return zero
    return before


def verify_commits_gdn_state() -> BrokenScenarioBackend:
    """MTP-03: verification writes the state back for every draft; a rollback trims the KV caches
    only, so the Gated DeltaNet layers keep the state after the rejected drafts."""
    return _gdn_rollback_backend("MTP-03-state-committed", lambda verified, right, index: GatedDeltaNetCache(
        verified.state))


def rollback_restores_recurrent_state_only() -> BrokenScenarioBackend:
    """MTP-03: the rollback restores the recurrent state, but the conv state keeps the rejected drafts' inputs."""
    return _gdn_rollback_backend("MTP-03-conv-committed", lambda verified, right, index: GatedDeltaNetCache(
        GatedDeltaNetState(right.state.recurrent_state, verified.state.conv_state)))


def rollback_restores_conv_state_only() -> BrokenScenarioBackend:
    """MTP-03: the rollback restores the conv state, but the recurrent state is the post-verify one."""
    return _gdn_rollback_backend("MTP-03-recurrent-committed", lambda verified, right, index: GatedDeltaNetCache(
        GatedDeltaNetState(verified.state.recurrent_state, right.state.conv_state)))


def rollback_restores_first_gdn_layer_only() -> BrokenScenarioBackend:
    """MTP-03: the rollback restores the state of the first Gated DeltaNet layer only; the later ones
    keep the post-verify state."""
    return _gdn_rollback_backend("MTP-03-first-layer-only", lambda verified, right, index: right if index == 0
                                 else GatedDeltaNetCache(verified.state))


def rollback_to_state_before_verify() -> BrokenScenarioBackend:
    """MTP-03: the rollback restores the snapshot taken before the verification, losing the
    accepted drafts' updates (right only when no draft is accepted)."""
    return _gdn_rollback_backend("MTP-03-pre-verify-snapshot", lambda verified, right, index: GatedDeltaNetCache(
        _before_verify(verified)))
