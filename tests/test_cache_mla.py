"""DeepSeek-V3 / Kimi K2 decoding caches: what an MLA layer keeps and how a cached call attends.

Every layer keeps ``c^KV`` ``(B, S, kv_lora_rank)`` (after kv_a_layernorm) as its keys and the
roped ``k^R`` ``(B, S, qk_rope_head_dim)`` as its values, nothing per head; a fresh call runs the
literal (expanded) form and a call continuing a cache the absorbed one. Checked on the golden
checkpoints against one full forward (the definition) and against transformers' DynamicCache.
"""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from refimpl.kv_cache import KVCache, visibility
from refimpl.mla import mla_attend_absorbed, mla_attend_literal, mla_project
from refimpl.model import from_pretrained
from refimpl.models import deepseek_v3

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
#: Dc 20, Dn 16, Dr 8, Dv 12, H 4: no per-head width equals a latent width.
WIDTHS = GOLDEN / "deepseek_v3/mla-widths-distinct/checkpoint"
#: rope_interleave false, no q_lora_rank, default RoPE.
ROTATE_HALF = GOLDEN / "deepseek_v3/no-renorm-scaled/checkpoint"


def rel_max(got, expected):
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def widths():
    return from_pretrained(WIDTHS, np.float64)


def tokens(m, shape, seed=0):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, shape)


def test_each_layer_caches_only_the_latent_and_the_roped_key(widths):
    c = widths.config
    ids = tokens(widths, (2, 9))
    _, cache = widths.prefill(ids[:, :5])
    _, cache = widths.decode(ids[:, 5:8], cache)
    _, cache = widths.decode(ids[:, 8:], cache)
    assert len(cache.layers) == c.num_hidden_layers
    for layer in cache.layers:
        assert isinstance(layer, KVCache) and layer.span is None and layer.evicted is None
        assert layer.keys.shape == (2, 9, c.kv_lora_rank)
        assert layer.values.shape == (2, 9, c.qk_rope_head_dim)
        assert layer.keys.dtype == layer.values.dtype == np.float64
        assert np.array_equal(layer.positions, np.broadcast_to(np.arange(9), (2, 9)))


def test_cached_latent_is_normalised_and_the_rope_key_rotated(widths):
    # The cache of layer 0 is a function of the embeddings alone: recompute it from the definition.
    c = widths.config
    ids = tokens(widths, (1, 6), seed=1)
    _, cache = widths.prefill(ids)
    p = {k[len("model.layers.0.self_attn."):]: v for k, v in widths.weights.items()
         if k.startswith("model.layers.0.self_attn.")}
    h = widths.weights["model.embed_tokens.weight"][ids]
    x = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + c.rms_norm_eps) * widths.weights[
        "model.layers.0.input_layernorm.weight"]
    compressed = x @ p["kv_a_proj_with_mqa.weight"].T
    latent = compressed[..., :c.kv_lora_rank]
    c_kv = latent / np.sqrt(np.mean(latent**2, -1, keepdims=True) + 1e-6) * p["kv_a_layernorm.weight"]
    assert rel_max(cache.layers[0].keys, c_kv) < 1e-13
    # Interleaved pairs (2i, 2i+1) rotated by angle i * theta_i, written [even outputs | odd outputs];
    # position 0 is not rotated at all.
    k_raw = compressed[..., c.kv_lora_rank:]
    assert np.allclose(cache.layers[0].values[0, 0], np.concatenate([k_raw[0, 0, 0::2], k_raw[0, 0, 1::2]]),
                       rtol=0, atol=1e-14)
    assert not np.allclose(cache.layers[0].values[0, 3], np.concatenate([k_raw[0, 3, 0::2], k_raw[0, 3, 1::2]]))


def test_fresh_calls_expand_and_cached_calls_absorb(widths):
    calls = []

    def spy(form, function):
        def attend(step, c_kv, k_rope, mask):
            calls.append((form, step.q_nope.shape[1], c_kv.shape[1]))
            return function(step, c_kv, k_rope, mask)
        return attend

    ids = tokens(widths, (1, 7))
    with mock.patch.object(deepseek_v3, "mla_attend_literal", spy("literal", mla_attend_literal)), \
            mock.patch.object(deepseek_v3, "mla_attend_absorbed", spy("absorbed", mla_attend_absorbed)):
        _, cache = widths.prefill(ids[:, :4])
        prefill_calls, calls[:] = list(calls), []
        widths.decode(ids[:, 4:], cache)
    layers = widths.config.num_hidden_layers
    assert prefill_calls == [("literal", 4, 4)] * layers
    assert calls == [("absorbed", 3, 7)] * layers


@pytest.mark.parametrize("checkpoint", [WIDTHS, ROTATE_HALF], ids=["interleaved", "rotate-half-no-q-lora"])
def test_multi_token_continuation_is_causal_among_its_tokens(checkpoint):
    # MLA-08: a 4-token call after 64 cached tokens (chunked-prefill continuation / verification)
    # equals four one-token decodes and the last 4 rows of one forward.
    m = from_pretrained(checkpoint, np.float64)
    ids = tokens(m, (1, 68), seed=2)
    full = m(ids)[0, 64:]
    _, cache = m.prefill(ids[:, :64])
    together, _ = m.decode(ids[:, 64:], cache)
    assert rel_max(together[0], full) < 1e-12
    one_by_one = []
    for t in range(64, 68):
        logits, cache = m.decode(ids[:, t:t + 1], cache)
        one_by_one.append(logits[0, 0])
    assert rel_max(np.array(one_by_one), full) < 1e-12
    # The probe notices a continuation whose new tokens see each other in both directions.
    _, cache = m.prefill(ids[:, :64])

    def no_causality_among_new(context, visible):
        mask = visibility(context, visible)
        mask[:, :, -context.num_tokens:] = True
        return mask
    with mock.patch.object(deepseek_v3, "visibility", no_causality_among_new):
        wrong, _ = m.decode(ids[:, 64:], cache)
    assert rel_max(wrong[0, :3], full[:3]) > 1e-3


@pytest.mark.parametrize("dtype, bound", [(np.float64, 1e-13), (np.float32, 2e-5)])
@pytest.mark.parametrize("new, cached", [(1, 1), (1, 29), (3, 17), (5, 0)])
def test_absorbed_equals_literal_over_cached_slots(dtype, bound, new, cached):
    # Both forms over the same slots (cached latents followed by the new ones), queries at positions
    # cached..cached+new-1, one row left-padded by 2 slots. Dk = Dc + Dr 24 != Dv 12 (MLA-05 shape).
    rng = np.random.default_rng(new * 100 + cached)
    h, dq, dc, dn, dr, dv, hidden = 3, 12, 19, 7, 6, 12, 32
    params = dict(num_attention_heads=h, q_lora_rank=dq, kv_lora_rank=dc, qk_nope_head_dim=dn,
                  qk_rope_head_dim=dr, v_head_dim=dv, rope_interleave=True, rms_norm_eps=1e-6,
                  max_position_embeddings=64, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    shapes = {"q_a_proj.weight": (dq, hidden), "q_a_layernorm.weight": (dq,), "q_b_proj.weight": (h * (dn + dr), dq),
              "kv_a_proj_with_mqa.weight": (dc + dr, hidden), "kv_a_layernorm.weight": (dc,),
              "kv_b_proj.weight": (h * (dn + dv), dc), "o_proj.weight": (hidden, h * dv)}
    weights = {k: (1 + 0.2 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[1]))
               .astype(dtype) for k, s in shapes.items()}
    positions = np.stack([np.arange(cached, cached + new), np.arange(cached, cached + new) - 2])
    step = mla_project(rng.standard_normal((2, new, hidden)).astype(dtype), np.maximum(positions, 0), weights,
                       **params)
    c_kv = np.concatenate([rng.standard_normal((2, cached, dc)).astype(dtype), step.c_kv], axis=1)
    k_rope = np.concatenate([rng.standard_normal((2, cached, dr)).astype(dtype), step.k_rope], axis=1)
    slot_positions = np.stack([np.arange(cached + new), np.arange(cached + new) - 2])
    mask = (slot_positions[:, None, :] <= positions[:, :, None]) & (slot_positions[:, None, :] >= 0)
    literal = mla_attend_literal(step, c_kv, k_rope, mask)
    absorbed = mla_attend_absorbed(step, c_kv, k_rope, mask)
    assert literal.dtype == absorbed.dtype == dtype and literal.shape == (2, new, hidden)
    assert rel_max(absorbed, literal) < bound


def test_rollback_gives_back_the_cache_of_the_shorter_run(widths):
    ids = tokens(widths, (2, 8), seed=3)
    _, before = widths.prefill(ids[:, :5])
    _, after = widths.decode(ids[:, 5:], before)
    rolled = widths.rollback(after, 3)
    for got, expected in zip(rolled.layers, before.layers):
        for field in ("keys", "values", "positions", "valid"):
            assert np.array_equal(getattr(got, field), getattr(expected, field))
    assert rolled.length == 5 and np.array_equal(rolled.next_position, [5, 5])


def test_batch_rows_with_different_cached_prefixes(widths):
    # MLA-07: cached prefixes of 2 and 40 tokens (row 0 left-padded by 38), then a 16-token piece:
    # each row equals that row run alone.
    ids = tokens(widths, (2, 56), seed=4)
    mask = np.ones((2, 40), dtype=np.int64)
    mask[0, :38] = 0
    prompt = np.where(mask == 1, ids[:, :40], 0)
    _, cache = widths.prefill(prompt, mask)
    assert not cache.layers[0].valid[0, :38].any() and cache.layers[0].valid[1].all()
    logits, _ = widths.decode(ids[:, 40:], cache)
    alone_short = widths(ids[:1, 38:])[0, 2:]
    alone_long = widths(ids[1:])[0, 40:]
    assert rel_max(logits[0], alone_short) < 1e-12
    assert rel_max(logits[1], alone_long) < 1e-12


def test_float32_cache_and_decode(widths):
    m32 = from_pretrained(WIDTHS, np.float32)
    ids = tokens(widths, (1, 10), seed=5)
    _, cache = m32.prefill(ids[:, :6])
    logits, cache = m32.decode(ids[:, 6:], cache)
    assert logits.dtype == cache.layers[0].keys.dtype == cache.layers[0].values.dtype == np.float32
    assert rel_max(logits[0], widths(ids)[0, 6:]) < 1e-5


@pytest.mark.parametrize("checkpoint", [WIDTHS, ROTATE_HALF], ids=["interleaved", "rotate-half-no-q-lora"])
def test_cache_and_decode_match_transformers_dynamic_cache(checkpoint):
    # transformers keeps the same two latents per layer ("keys" (B, 1, S, Dc), "values" (B, 1, S, Dr)),
    # in the same layout; with its float32 islands lifted they agree to rounding, and so do the logits
    # of a 3-token call continuing that cache.
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conformance.backends.hf_exact import exact_float64, load_exact_float64

    m = from_pretrained(checkpoint, np.float64)
    ids = tokens(m, (2, 10), seed=6)
    ours_prefill, cache = m.prefill(ids[:, :7])
    ours_decode, cache = m.decode(ids[:, 7:], cache)
    with exact_float64(), torch.no_grad():
        hf = load_exact_float64(checkpoint)
        first = hf(torch.from_numpy(ids[:, :7]), use_cache=True)
        second = hf(torch.from_numpy(ids[:, 7:]), cache=first.past_key_values, use_cache=True)
        hf_cache = [(layer.keys.numpy(), layer.values.numpy()) for layer in second.past_key_values.layers]
        hf_prefill, hf_decode = first.logits.numpy(), second.logits.numpy()
    assert len(hf_cache) == len(cache.layers)
    for (keys, values), ours in zip(hf_cache, cache.layers):
        assert keys.shape == (2, 1, 10, m.config.kv_lora_rank) and values.shape == (2, 1, 10, m.config.qk_rope_head_dim)
        assert rel_max(ours.keys, keys[:, 0]) < 1e-12
        assert rel_max(ours.values, values[:, 0]) < 1e-12
    assert rel_max(ours_prefill, hf_prefill) < 1e-12
    assert rel_max(ours_decode, hf_decode) < 1e-12
