"""What the Qwen3-Next and Gemma 3n layers keep between incremental calls, and how they roll back.

tests/test_incremental_properties.py checks the logits of any schedule against one forward;
these tests look inside the caches: the Gated DeltaNet layer carries only S and the conv
history (plus the last call's replay), picks transformers' delta-rule form per call,
rolls back to exactly the state of the accepted tokens (MTP-03), zeroes left pads; a
Gemma 3n sliding layer keeps W slots, a full one every slot, a KV-sharing layer nothing.
Float64 throughout, on the golden checkpoints.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from refimpl.errors import InputError, ShapeError
from refimpl.kv_cache import KVCache
from refimpl.linear_attention.gated_deltanet import (
    GatedDeltaNetCache, gated_deltanet, gated_deltanet_step, gated_deltanet_weight_shapes, step_chunk_size,
)
from refimpl.model import from_pretrained

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
gdn_module = importlib.import_module("refimpl.linear_attention.gated_deltanet")

INTERVAL2 = "qwen3_next/interval-2-gqa/checkpoint"          # layers: linear, full, linear, full
LONG = "qwen3_next/long-150-three-chunks/checkpoint"        # layers: linear, full
STRONG = "qwen3_next/strong-decay-transformers-a-init/checkpoint"
KV_SHARING = "gemma3n/spec-tiny-kv-sharing/checkpoint"      # W = 3, layers 4, 5 share 2, 3
WINDOW1 = "gemma3n/soft-cap-12-window-1/checkpoint"         # W = 1, four sliding layers then a full one
CONDITIONAL = "gemma3n/conditional-generation-special-ids/checkpoint"


@lru_cache(maxsize=6)
def model(checkpoint: str):
    return from_pretrained(GOLDEN / checkpoint, np.float64)


def ids(m, shape, seed):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, shape)


def relative(got, expected) -> float:
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def gdn_layers(m):
    return [l for l, tau in enumerate(m.config.layer_types) if tau == "linear_attention"]


# --- Gated DeltaNet cache: what it holds ---------------------------------------------------------------------------


def test_gated_deltanet_layers_keep_the_state_and_k_minus_1_conv_inputs_whatever_the_length():
    m = model(INTERVAL2)
    c = m.config
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    _, cache = m.prefill(ids(m, (2, 23), 1))
    for _ in range(3):
        _, cache = m.decode(ids(m, (2, 1), 2), cache)
    for layer, entry in enumerate(cache.layers):
        if layer in gdn_layers(m):
            assert isinstance(entry, GatedDeltaNetCache)
            assert entry.recurrent_state.shape == (2, c.linear_num_value_heads, c.linear_key_head_dim,
                                                   c.linear_value_head_dim)
            assert entry.conv_state.shape == (2, conv_dim, c.linear_conv_kernel_dim - 1)
            # only the last call (one token) is kept for a rollback, not the sequence
            assert entry.last_added == 1 and entry.replay.conv_inputs.shape == (2, 1, conv_dim)
            assert entry.replay.inputs.q.shape[1] == 1
        else:
            # gated attention: every key (all D channels, after k_norm and partial RoPE) and value
            assert isinstance(entry, KVCache) and entry.span is None
            assert entry.keys.shape == (2, 26, c.num_key_value_heads, c.head_dim) == entry.values.shape


def test_conv_state_is_the_last_conv_inputs_channel_major():
    # GDN-06: the state after a call holds that call's last K-1 raw [q | k | v] inputs, oldest first.
    m = model(INTERVAL2)
    _, cache = m.prefill(ids(m, (1, 9), 3))
    entry = cache.layers[0]
    raw = entry.replay.conv_inputs                      # (B, T, conv_dim)
    k = m.config.linear_conv_kernel_dim
    np.testing.assert_array_equal(entry.conv_state, np.swapaxes(raw[:, -(k - 1):], 1, 2))


def test_step_chunk_size_is_transformers_rule():
    assert step_chunk_size(64, continuing=False, num_tokens=1) == 64
    assert step_chunk_size(64, continuing=True, num_tokens=1) is None
    assert step_chunk_size(64, continuing=True, num_tokens=2) == 64
    assert step_chunk_size(None, continuing=False, num_tokens=7) is None


def test_a_single_token_after_a_cache_runs_the_recurrent_form_and_a_piece_the_chunked_form():
    m = model(INTERVAL2)
    _, cache = m.prefill(ids(m, (1, 5), 4))
    calls = []
    real_r, real_c = gdn_module.gated_delta_rule_recurrent, gdn_module.gated_delta_rule_chunked

    def spy(name, real):
        def run(*args, **kwargs):
            calls.append((name, args[0].shape[1], kwargs.get("initial_state") is not None))
            return real(*args, **kwargs)
        return run

    with mock.patch.object(gdn_module, "gated_delta_rule_recurrent", spy("recurrent", real_r)), \
            mock.patch.object(gdn_module, "gated_delta_rule_chunked", spy("chunked", real_c)):
        _, cache = m.decode(ids(m, (1, 1), 5), cache)
        _, cache = m.decode(ids(m, (1, 3), 6), cache)
    per_call = len(gdn_layers(m))
    assert calls == [("recurrent", 1, True)] * per_call + [("chunked", 3, True)] * per_call


def test_decoding_across_the_chunk_boundary_of_a_long_prompt():
    # GDN-04: a 70-token prefill (chunks of 64 and 6) hands its state to a recurrent step and a chunked piece.
    m = model(LONG)
    tokens = ids(m, (1, 76), 7)
    full = m(tokens)
    logits, cache = m.prefill(tokens[:, :70])
    assert relative(logits, full[:, :70]) < 1e-10
    logits, cache = m.decode(tokens[:, 70:71], cache)
    assert relative(logits, full[:, 70:71]) < 1e-10
    logits, cache = m.decode(tokens[:, 71:], cache)
    assert relative(logits, full[:, 71:]) < 1e-10


# --- rollback: the state of the accepted tokens only (MTP-03) -------------------------------------------------------


def states(cache, layers):
    return [(cache.layers[l].recurrent_state, cache.layers[l].conv_state) for l in layers]


@pytest.mark.parametrize("checkpoint", [INTERVAL2, STRONG])
@pytest.mark.parametrize("accepted", [0, 1, 2])
def test_verify_three_drafts_accept_a_prefix_equals_feeding_only_the_accepted(checkpoint, accepted):
    m = model(checkpoint)
    prompt, drafts = ids(m, (2, 6), 8), ids(m, (2, 3), 9)
    _, cache = m.prefill(prompt)
    _, verified = m.decode(drafts, cache)
    rolled = m.rollback(verified, 3 - accepted)
    if accepted:
        _, direct = m.decode(drafts[:, :accepted], cache)
    else:
        direct = cache
    layers = gdn_layers(m)
    for (s_got, c_got), (s_want, c_want), (s_all, _) in zip(states(rolled, layers), states(direct, layers),
                                                            states(verified, layers)):
        assert relative(s_got, s_want) < 1e-12 and relative(c_got, c_want) < 1e-12
        # the rejected drafts did move the state: a rollback that kept it would fail above
        assert relative(s_all, s_want) > 1e-6
    nxt = ids(m, (2, 1), 10)
    assert relative(m.decode(nxt, rolled)[0], m.decode(nxt, direct)[0]) < 1e-10


def test_rollback_inside_the_prefill_equals_a_shorter_prefill():
    m = model(INTERVAL2)
    prompt = ids(m, (1, 11), 11)
    _, cache = m.prefill(prompt)
    rolled = m.rollback(cache, 4)
    _, shorter = m.prefill(prompt[:, :7])
    for (s_got, c_got), (s_want, c_want) in zip(states(rolled, gdn_layers(m)), states(shorter, gdn_layers(m))):
        assert relative(s_got, s_want) < 1e-13 and relative(c_got, c_want) < 1e-13


def test_a_rolled_back_gated_deltanet_cache_cannot_roll_back_again():
    m = model(INTERVAL2)
    _, cache = m.prefill(ids(m, (1, 4), 12))
    _, cache = m.decode(ids(m, (1, 3), 13), cache)
    entry = cache.layers[0]
    with pytest.raises(InputError, match="added 3"):
        entry.rollback(4)
    rolled = entry.rollback(1)
    assert rolled.last_added == 0 and rolled.replay is None
    with pytest.raises(InputError, match="added 0"):
        rolled.rollback(1)


# --- padding -----------------------------------------------------------------------------------------------------


def test_a_left_padded_row_carries_the_state_of_the_row_alone():
    m = model(INTERVAL2)
    prompt = ids(m, (2, 8), 14)
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, :3] = 0
    _, padded = m.prefill(prompt, mask)
    _, alone = m.prefill(prompt[1:, 3:])
    for l in gdn_layers(m):
        assert relative(padded.layers[l].recurrent_state[1], alone.layers[l].recurrent_state[0]) < 1e-12
        assert relative(padded.layers[l].conv_state[1], alone.layers[l].conv_state[0]) < 1e-12


def test_gated_deltanet_step_refuses_a_bad_cache_or_padding():
    heads = dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=3,
                 linear_conv_kernel_dim=3)
    rng = np.random.default_rng(15)
    weights = {n: rng.standard_normal(s) * 0.3 for n, s in gated_deltanet_weight_shapes(8, **heads).items()}
    x = rng.standard_normal((2, 5, 8))
    out, cache = gated_deltanet_step(x, weights, **heads, rms_norm_eps=1e-6)
    # without padding and cache, the step is the layer
    np.testing.assert_array_equal(out, gated_deltanet(x, weights, **heads, rms_norm_eps=1e-6)[0])
    with pytest.raises(ShapeError, match="GatedDeltaNetCache"):
        gated_deltanet_step(x, weights, **heads, rms_norm_eps=1e-6, cache=cache.state)
    with pytest.raises(ShapeError, match="recurrent_state"):
        gated_deltanet_step(x[:1], weights, **heads, rms_norm_eps=1e-6, cache=cache)
    with pytest.raises(ShapeError, match="padding"):
        gated_deltanet_step(x, weights, **heads, rms_norm_eps=1e-6, padding=np.ones((2, 4), dtype=bool))


# --- Gemma 3n -------------------------------------------------------------------------------------------------------


def test_gemma3n_sliding_layers_keep_w_slots_full_layers_all_and_kv_sharing_layers_none():
    m = model(KV_SHARING)
    c = m.config
    _, cache = m.prefill(ids(m, (2, 5), 16))
    for _ in range(4):
        _, cache = m.decode(ids(m, (2, 1), 17), cache)
    for layer, entry in enumerate(cache.layers):
        if c.kv_source_layers[layer] != layer:
            assert entry is None
        elif c.layer_types[layer] == "sliding_attention":
            assert entry.span == c.sliding_window == 3 and entry.length == 3
            np.testing.assert_array_equal(entry.positions, [[6, 7, 8]] * 2)
        else:
            assert entry.span is None and entry.length == 9
            assert entry.keys.shape == (2, 9, c.num_key_value_heads, c.head_dim)


def test_gemma3n_window_one_keeps_one_slot_and_rolls_back_to_the_previous_token():
    m = model(WINDOW1)
    _, cache = m.prefill(ids(m, (1, 4), 18))
    _, verified = m.decode(ids(m, (1, 3), 19), cache)
    rolled = m.rollback(verified, 2)
    for layer in range(4):
        assert verified.layers[layer].length == 1 and int(verified.layers[layer].positions[0, 0]) == 6
        assert rolled.layers[layer].length == 1 and int(rolled.layers[layer].positions[0, 0]) == 4
    assert rolled.layers[4].length == 5


def test_gemma3n_kv_sharing_layers_attend_over_their_producer_cache_and_new_keys():
    m = model(KV_SHARING)
    c = m.config
    gemma3n = importlib.import_module("refimpl.models.gemma3n")
    _, cache = m.prefill(ids(m, (1, 6), 20))
    seen = []
    real = gemma3n.grouped_query_attention

    def spy(q, k, v, mask, scale, **kwargs):
        seen.append((k, v, mask))
        return real(q, k, v, mask, scale, **kwargs)

    with mock.patch.object(gemma3n, "grouped_query_attention", spy):
        m.decode(ids(m, (1, 2), 21), cache)
    for layer in range(c.num_hidden_layers):
        source = c.kv_source_layers[layer]
        k, v, mask = seen[layer]
        # the producer's cache (all 6 slots, or its window of 3) followed by the 2 new tokens
        assert k.shape[1] == cache.layers[source].length + 2
        assert k is seen[source][0] and v is seen[source][1]
        # the layer's own mask: W = 3 keys on sliding layers, everything up to the query on full ones
        assert mask.sum(axis=-1).tolist() == ([[3, 3]] if c.layer_types[layer] == "sliding_attention" else [[7, 8]])
    assert [c.kv_source_layers[l] != l for l in range(c.num_hidden_layers)] == [False] * 4 + [True] * 2


def test_gemma3n_conditional_decodes_vision_and_audio_ids_through_their_embedders():
    m = model(CONDITIONAL)
    vision, audio = m.config.embed_vision.vocab_offset, m.config.embed_audio.vocab_offset
    tokens = np.array([[3, 40, vision + 2, vision + 5, 7, audio + 1, audio + 9, 11]])
    full = m(tokens)
    logits, cache = m.prefill(tokens[:, :3])
    assert relative(logits, full[:, :3]) < 1e-10
    for t in range(3, 8):
        logits, cache = m.decode(tokens[:, t:t + 1], cache)
        assert relative(logits, full[:, t:t + 1]) < 1e-10, t
