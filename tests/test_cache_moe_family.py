"""What the decoding caches of gpt-oss, Llama 4, MiniMax-M2, GLM-4.5 and Grok 2.5 hold.

The schedule property test (tests/test_incremental_properties.py) checks their logits; these
check the caches themselves: a sliding layer keeps exactly its window W and a Llama 4 chunked
layer its chunk C (the newest slots), full layers keep everything, per head after the head
split, and a rollback gives back the cache of a run that never saw the rolled-back tokens,
also when the rolled-back call was longer than the window. Two targeted checks pin the
positions the attention temperatures read (Llama 4 NoPE layers, Grok): a left-padded row's
own positions, not its slot indices.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from refimpl.kv_cache import KVCache
from refimpl.model import from_pretrained

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@lru_cache(maxsize=8)
def model(case: str):
    return from_pretrained(GOLDEN / case / "checkpoint", np.float64)


def tokens(m, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, (2, length))


def decode_one_by_one(m, ids: np.ndarray, prompt: int):
    """Prefill ``prompt`` tokens, then decode the rest one token per call; returns the last cache."""
    _, cache = m.prefill(ids[:, :prompt])
    for i in range(prompt, ids.shape[1]):
        _, cache = m.decode(ids[:, i:i + 1], cache)
    return cache


def test_gpt_oss_sliding_layers_keep_exactly_the_last_window():
    # Layers: full, sliding (W = 3), full; MQA (one key/value head of D = 16).
    m = model("gpt_oss/top-1-full-first-mqa")
    assert m.config.layer_types == ("full_attention", "sliding_attention", "full_attention")
    cache = decode_one_by_one(m, tokens(m, 11), prompt=2)
    full, sliding = cache.layers[0], cache.layers[1]
    assert isinstance(sliding, KVCache) and sliding.span == 3
    assert sliding.keys.shape == sliding.values.shape == (2, 3, 1, 16)
    np.testing.assert_array_equal(sliding.positions, [[8, 9, 10]] * 2)
    assert full.span is None and full.keys.shape == (2, 11, 1, 16)
    np.testing.assert_array_equal(full.positions, [list(range(11))] * 2)
    assert sliding.valid.all() and full.valid.all()


def test_gpt_oss_sliding_window_grows_to_w_and_no_further():
    m = model("gpt_oss/top-1-full-first-mqa")
    ids = tokens(m, 6, seed=3)
    _, cache = m.prefill(ids[:, :1])
    lengths = [cache.layers[1].length]
    for i in range(1, 6):
        _, cache = m.decode(ids[:, i:i + 1], cache)
        lengths.append(cache.layers[1].length)
    assert lengths == [1, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("prompt", [1, 4])
def test_gpt_oss_rollback_of_a_call_longer_than_the_window(prompt):
    # W = 2 on the sliding layers; 3 drafts push out more than the window, the first draft included.
    m = model("gpt_oss/top-k-all-experts-tied")
    assert m.config.sliding_window == 2
    ids = tokens(m, prompt + 4, seed=1)
    _, base = m.prefill(ids[:, :prompt])
    _, drafted = m.decode(ids[:, prompt:prompt + 3], base)
    rolled = m.rollback(drafted, 3)
    for layer, (got, want) in enumerate(zip(rolled.layers, base.layers)):
        np.testing.assert_array_equal(got.positions, want.positions, err_msg=f"layer {layer}")
        np.testing.assert_allclose(got.keys, want.keys, rtol=1e-13, atol=0, err_msg=f"layer {layer}")
        np.testing.assert_allclose(got.values, want.values, rtol=1e-13, atol=0, err_msg=f"layer {layer}")
    # And the next token sees what it would have seen without the drafts.
    after_rollback, _ = m.decode(ids[:, prompt + 3:], rolled)
    direct, _ = m.decode(ids[:, prompt + 3:], base)
    np.testing.assert_allclose(after_rollback, direct, rtol=1e-12, atol=1e-12)


def test_llama4_chunked_layers_keep_c_slots_and_nope_layers_everything():
    # C = 5 on the RoPE layers 0-2; layer 3 is a NoPE full-attention layer.
    m = model("llama4/scout-chunked-nope-temperature")
    c = m.config.attention_chunk_size
    assert c == 5 and m.config.layer_types[3] == "full_attention"
    cache = decode_one_by_one(m, tokens(m, 12), prompt=3)
    d, hkv = m.config.head_dim, m.config.num_key_value_heads
    for layer in range(3):
        chunked = cache.layers[layer]
        assert chunked.span == c and chunked.keys.shape == (2, c, hkv, d)
        np.testing.assert_array_equal(chunked.positions, [list(range(7, 12))] * 2)
    nope = cache.layers[3]
    assert nope.span is None and nope.keys.shape == (2, 12, hkv, d)


def _padded_row_matches_alone(m, pad: int, length: int, seed: int) -> None:
    """Row 1 left-padded by ``pad`` slots gives, at every real token, the logits of that row alone."""
    ids = tokens(m, length, seed)
    mask = np.ones((2, length), dtype=np.int64)
    mask[1, :pad] = 0
    padded = ids.copy()
    padded[1, :pad] = 0
    logits, cache = m.prefill(padded, mask)
    alone = m(ids[1:, pad:])
    np.testing.assert_allclose(logits[1, pad:], alone[0], rtol=1e-10, atol=1e-10 * np.abs(alone).max())
    # A decode step after the padded prompt: the query is at position length - pad in row 1.
    step = tokens(m, 1, seed + 1)
    decoded, _ = m.decode(step, cache)
    expected = m(np.concatenate([ids[1:, pad:], step[1:]], axis=1))[0, -1]
    np.testing.assert_allclose(decoded[1, 0], expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_llama4_temperature_reads_the_rows_own_positions():
    # floor_scale 3: tau(p) steps up at p = 2, 5, 8, ...; with 2 pad slots a slot-index temperature
    # would step up two tokens early in row 1 (transformers does that: it counts cache slots).
    m = model("llama4/scout-chunked-nope-temperature")
    assert m.config.attn_temperature_tuning and m.config.floor_scale == 3
    _padded_row_matches_alone(m, pad=2, length=9, seed=5)


def test_grok_temperature_reads_the_rows_own_positions():
    # attn_temperature_len L = 4: tau engages from position 5; slot indices would engage it early.
    m = model("grok2/temperature-caps-dense-mlp")
    assert m.config.attn_temperature_len == 4
    _padded_row_matches_alone(m, pad=3, length=10, seed=7)


@pytest.mark.parametrize("case", ["minimax_m2/gqa-partial-rotary", "glm4_moe/glm45-style",
                                  "grok2/temperature-caps-dense-mlp", "llama4/scout-chunked-nope-temperature"])
def test_full_attention_caches_hold_every_key_per_head(case):
    """Every full-attention layer keeps all S slots as (B, S, Hkv, D) keys and values (after the head
    split: MiniMax-M2's QK-norm spans the whole projection, but the cache is per head)."""
    m = model(case)
    ids = tokens(m, 9, seed=2)
    _, cache = m.prefill(ids[:, :3])
    _, cache = m.decode(ids[:, 3:5], cache)
    _, drafted = m.decode(ids[:, 5:9], cache)
    cache = m.rollback(drafted, 2)
    d, hkv = m.config.head_dim, m.config.num_key_value_heads
    types = getattr(m.config, "layer_types", None) or ("full_attention",) * m.config.num_hidden_layers
    assert len(cache.layers) == m.config.num_hidden_layers
    for layer, kind in enumerate(types):
        if kind != "full_attention":
            continue
        kept = cache.layers[layer]
        assert kept.span is None and kept.last_added == 0 and kept.evicted is None
        assert kept.keys.shape == kept.values.shape == (2, 7, hkv, d), f"layer {layer}"
        np.testing.assert_array_equal(kept.positions, [list(range(7))] * 2)
    assert cache.length == 7 and cache.next_position.tolist() == [7, 7]
