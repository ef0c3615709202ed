"""What the caches of the dense decoders (OLMo 2, Mistral, SmolLM3, Gemma 3) hold.

The schedule property (``test_incremental_properties.py``) checks the logits; these check
the caches themselves, on the golden checkpoints at float64:

* a sliding-window layer keeps exactly the last ``min(W, length)`` slots and a full layer
  every slot, keys and values ``(B, S, Hkv, D)`` (nothing per query head);
* a rollback after a call longer than the window restores the ring the shorter run has;
* each layer's keys are rotated at the tokens' absolute positions (``cumsum(mask) - 1``)
  with its own RoPE: Gemma 3's local and global tables, none on SmolLM3's NoPE layers;
* OLMo 2 caches its keys after the whole-projection QK-norm and RoPE, and raw values.

The expected windows, RoPE bases and layer schedules are written out below from each
checkpoint's config.json, not read from the reference.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from refimpl.model import from_pretrained

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

#: case: (window W or None, layers that slide, number of layers)
WINDOWS = {
    # Mistral: one window on every layer; null means full attention everywhere
    "mistral/sliding-w4-len11": (4, {0, 1}, 2),
    "mistral/tied-mqa-window1": (1, {0, 1}, 2),
    "mistral/window-explicit-null": (None, set(), 2),
    # Gemma 3: default pattern 6 (layer 5 global); pattern 2 (layers 1 and 3 global)
    "gemma3/default-pattern-6-layers": (4, {0, 1, 2, 3, 4}, 6),
    "gemma3/window-1-mqa": (1, {0, 2}, 4),
    # SmolLM3: interval 2 with use_sliding_window: the NoPE layers 1 and 3 slide
    "smollm3/nope-layers-slide": (3, {1, 3}, 4),
    "olmo2/four-layers-len37": (None, set(), 4),
}

#: case: per layer, None (NoPE) or (rope_theta, linear factor), and head_dim
ROTATIONS = {
    # local layers rope_local_base_freq 1e4, the global layer 5 rope_theta 1e6 with linear factor 8
    "gemma3/default-pattern-6-layers": ([(1e4, 1.0)] * 5 + [(1e6, 8.0)], 16),
    # no_rope_layers [0, 1, 1, 0] (1 = RoPE), theta 5e6
    "smollm3/explicit-list-overrides-interval": ([None, (5e6, 1.0), (5e6, 1.0), None], 16),
    "smollm3/nope-layers-slide": ([(5e6, 1.0), None, (5e6, 1.0), None], 16),
    "mistral/sliding-w4-len11": ([(1e9, 1.0)] * 2, 32),
    "olmo2/four-layers-len37": ([(5e5, 1.0)] * 4, 8),
}


@lru_cache(maxsize=4)
def model(case: str):
    return from_pretrained(GOLDEN / case / "checkpoint", np.float64)


def _tokens(m, shape, seed):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, shape)


@pytest.mark.parametrize("case", sorted(WINDOWS))
def test_sliding_layers_keep_the_last_window_and_full_layers_everything(case):
    window, sliding, layers = WINDOWS[case]
    m = model(case)
    ids = _tokens(m, (2, 15), seed=1)
    _, cache = m.prefill(ids[:, :6])
    for t in range(6, 15):
        _, cache = m.decode(ids[:, t:t + 1], cache)
    assert len(cache.layers) == layers
    kv_heads, head_dim = m.config.num_key_value_heads, m.config.head_dim
    for layer, kept in enumerate(cache.layers):
        slots = min(window, 15) if layer in sliding else 15
        assert kept.keys.shape == (2, slots, kv_heads, head_dim), f"layer {layer}"
        assert kept.values.shape == (2, slots, kv_heads, head_dim), f"layer {layer}"
        np.testing.assert_array_equal(kept.positions, np.broadcast_to(np.arange(15 - slots, 15), (2, slots)))
        assert kept.valid.all()


def _same_cache(got, expected, where):
    assert got.length == expected.length, f"{where}: {got.length} slots, expected {expected.length}"
    np.testing.assert_array_equal(got.positions, expected.positions, err_msg=where)
    np.testing.assert_array_equal(got.valid, expected.valid, err_msg=where)
    np.testing.assert_allclose(got.keys, expected.keys, rtol=1e-12, atol=1e-12, err_msg=where)
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-12, atol=1e-12, err_msg=where)


@pytest.mark.parametrize("case", [c for c, (w, _, _) in sorted(WINDOWS.items()) if w is not None])
@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_rollback_of_more_drafts_than_the_window_restores_the_ring(case, accepted):
    # W + 2 drafts push every older slot out of a sliding layer; rejecting all but `accepted`
    # of them must bring back exactly the slots of a run that only ever saw the accepted ones.
    window = WINDOWS[case][0]
    m = model(case)
    ids = _tokens(m, (2, 7 + window + 2), seed=2)
    _, prompt_cache = m.prefill(ids[:, :7])
    _, verified = m.decode(ids[:, 7:], prompt_cache)
    rolled = m.rollback(verified, window + 2 - accepted)
    expected = prompt_cache if accepted == 0 else m.decode(ids[:, 7:7 + accepted], prompt_cache)[1]
    for layer, (got, want) in enumerate(zip(rolled.layers, expected.layers)):
        _same_cache(got, want, f"layer {layer}")
    np.testing.assert_array_equal(rolled.next_position, expected.next_position)


def _rotate(keys, angles):
    """Rotate-half RoPE of ``keys`` ``(S, Hkv, D)`` by ``angles`` ``(S, D/2)``."""
    half = keys.shape[-1] // 2
    c, s = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = keys[..., :half], keys[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@pytest.mark.parametrize("case", sorted(ROTATIONS))
def test_each_layer_caches_keys_rotated_at_absolute_positions_with_its_own_rope(case):
    # One token repeated: every position of every layer has the same hidden state (each query
    # averages identical values), so all of a layer's cached keys are one key rotated by its
    # position. Row 1 is left-padded by 2: its positions start at 0 on its first real slot.
    rotations, head_dim = ROTATIONS[case]
    m = model(case)
    pad, token = 2, 5
    ids = np.full((2, 8), token)
    ids[1, :pad] = 0
    mask = np.ones((2, 8), dtype=np.int64)
    mask[1, :pad] = 0
    _, cache = m.prefill(ids, mask)
    _, cache = m.decode(np.full((2, 2), token), cache)
    for layer, (kept, rope) in enumerate(zip(cache.layers, rotations)):
        expected_positions = np.arange(kept.length) + 10 - kept.length - np.array([[0], [pad]])
        valid = expected_positions >= 0
        np.testing.assert_array_equal(kept.valid, valid, err_msg=f"layer {layer}")
        np.testing.assert_array_equal(kept.positions[valid], expected_positions[valid], err_msg=f"layer {layer}")
        keys = kept.keys[valid]
        if rope is not None:
            theta, factor = rope
            inv_freq = theta ** -(np.arange(0, head_dim, 2) / head_dim) / factor
            keys = _rotate(keys, -kept.positions[valid][:, None] * inv_freq)
        # Unrotated, every slot of both rows holds the same key.
        np.testing.assert_allclose(keys, np.broadcast_to(keys[:1], keys.shape), rtol=1e-10, atol=1e-12,
                                   err_msg=f"layer {layer}")


def test_olmo2_caches_keys_after_the_whole_projection_qk_norm_and_rope():
    case = "olmo2/gqa-whole-qk-norm"
    m = model(case)
    w = {k: v.astype(np.float64) for k, v in load_file(GOLDEN / case / "checkpoint" / "model.safetensors").items()}
    ids = _tokens(m, (1, 5), seed=3)
    _, cache = m.prefill(ids)
    # Layer 0 reads the raw embedding (OLMo 2 has no input norm).
    h = w["model.embed_tokens.weight"][ids[0]]
    k = h @ w["model.layers.0.self_attn.k_proj.weight"].T
    eps = 1e-6
    k = k / np.sqrt(np.mean(k * k, axis=-1, keepdims=True) + eps) * w["model.layers.0.self_attn.k_norm.weight"]
    d = m.config.head_dim
    theta = 500000.0
    angles = np.arange(5)[:, None] * theta ** -(np.arange(0, d, 2) / d)
    k = _rotate(k.reshape(5, -1, d), angles)
    v = (h @ w["model.layers.0.self_attn.v_proj.weight"].T).reshape(5, -1, d)
    np.testing.assert_allclose(cache.layers[0].keys[0], k, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.layers[0].values[0], v, rtol=1e-12, atol=1e-12)
