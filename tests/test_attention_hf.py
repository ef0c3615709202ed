"""refimpl.attention and refimpl.masks against transformers 5.24's own functions, in float64.

* masks: ``masking_utils`` mask functions evaluated by ``sdpa_mask`` into boolean
  (T, S) tables, with cache offsets, compared bitwise;
* sinks: ``models/gpt_oss/modeling_gpt_oss.py`` ``eager_attention_forward``;
* soft-cap: ``models/gemma2/modeling_gemma2.py`` ``eager_attention_forward``;
* fully masked rows: what eager and sdpa return, pinned so that the notes in
  ``refimpl/masks.py`` fail loudly when torch or transformers change.
"""

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

from refimpl.attention import grouped_query_attention  # noqa: E402
from refimpl.masks import (  # noqa: E402
    causal_mask, chunked_attention_mask, combine, padding_mask, sliding_window_mask,
)

F64 = torch.float64


def hf_table(mask_function, t, s, past, key_valid=None):
    """``sdpa_mask`` as a (B, T, S) NumPy bool array; query i sits at position past + i."""
    padding = None if key_valid is None else torch.from_numpy(key_valid)
    b = 1 if key_valid is None else key_valid.shape[0]
    m = mu.sdpa_mask(batch_size=b, q_length=t, kv_length=s, q_offset=past, kv_offset=0,
                     mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False)
    return m[:, 0].numpy()


CASES = [(1, 1), (5, 0), (3, 4), (1, 9), (7, 6), (11, 0)]  # (T, past)


@pytest.mark.parametrize("t,past", CASES)
def test_causal_mask_equals_causal_mask_function(t, past):
    np.testing.assert_array_equal(hf_table(mu.causal_mask_function, t, past + t, past)[0],
                                  causal_mask(t, past + t, past))


@pytest.mark.parametrize("t,past", CASES)
@pytest.mark.parametrize("w", [1, 2, 4, 7, 30])
def test_sliding_window_mask_equals_hf(t, past, w):
    ours = sliding_window_mask(t, past + t, w, past)
    np.testing.assert_array_equal(hf_table(mu.sliding_window_causal_mask_function(w), t, past + t, past)[0], ours)
    overlay = mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(w))
    np.testing.assert_array_equal(hf_table(overlay, t, past + t, past)[0], ours)


@pytest.mark.parametrize("t,past", CASES)
@pytest.mark.parametrize("c", [1, 2, 3, 5, 30])
def test_chunked_attention_mask_equals_hf(t, past, c):
    no_left_padding = torch.zeros(1, dtype=torch.long)
    ours = chunked_attention_mask(t, past + t, c, past)
    np.testing.assert_array_equal(hf_table(mu.chunked_causal_mask_function(c, no_left_padding), t, past + t, past)[0],
                                  ours)
    overlay = mu.and_masks(mu.causal_mask_function, mu.chunked_overlay(c, no_left_padding))
    np.testing.assert_array_equal(hf_table(overlay, t, past + t, past)[0], ours)


@pytest.mark.parametrize("left_pad,n,c", [(1, 7, 3), (2, 9, 4), (3, 6, 2)])
def test_chunks_start_after_left_padding_in_hf(left_pad, n, c):
    # transformers counts chunks from the first real token: the padded row is our
    # unpadded mask shifted by left_pad, with the padded keys hidden.
    key_valid = np.arange(n)[None, :] >= left_pad
    fn = mu.chunked_causal_mask_function(c, torch.tensor([left_pad]))
    table = hf_table(fn, n, n, 0, key_valid)[0]
    np.testing.assert_array_equal(table[left_pad:, left_pad:], chunked_attention_mask(n - left_pad, n - left_pad, c))
    assert not table[:, :left_pad].any()


def test_padding_mask_equals_hf():
    key_valid = np.array([[False, False, True, True, True], [True, True, True, True, True]])
    table = hf_table(mu.causal_mask_function, 3, 5, 2, key_valid)
    np.testing.assert_array_equal(table, combine(causal_mask(3, 5, 2), padding_mask(key_valid)))


def module(h, hkv, sinks=None):
    return SimpleNamespace(num_key_value_groups=h // hkv, training=False, head_dim=None,
                           sinks=None if sinks is None else torch.from_numpy(sinks))


def to_torch(q, k, v):
    """(B, T, H, D) NumPy -> (B, H, T, D) torch, as transformers' attention functions take them."""
    return (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v))


def additive(mask_function, t, s, past, b):
    return mu.eager_mask(batch_size=b, q_length=t, kv_length=s, q_offset=past, kv_offset=0,
                         mask_function=mask_function, dtype=F64)


@pytest.mark.parametrize("b,h,hkv,t,past,w", [
    (2, 4, 2, 7, 0, None), (1, 4, 1, 3, 5, None), (2, 6, 3, 9, 0, 4), (1, 2, 2, 3, 6, 4), (1, 4, 2, 1, 10, 3),
])
def test_sinks_match_gpt_oss_eager(b, h, hkv, t, past, w):
    rng = np.random.default_rng(100 * t + past)
    s = past + t
    q, k, v = rng.standard_normal((b, t, h, 8)), rng.standard_normal((b, s, hkv, 8)), rng.standard_normal((b, s, hkv, 5))
    sinks = rng.standard_normal(h) * 2
    fn = mu.causal_mask_function if w is None else mu.sliding_window_causal_mask_function(w)
    mask = causal_mask(t, s, past) if w is None else sliding_window_mask(t, s, w, past)
    want, _ = modeling_gpt_oss.eager_attention_forward(module(h, hkv, sinks), *to_torch(q, k, v),
                                                       additive(fn, t, s, past, b), scaling=8**-0.5)
    got = grouped_query_attention(q, k, v, mask, 8**-0.5, sinks=sinks)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-13, atol=1e-14)
    # the sinks matter: without them the outputs differ
    assert np.abs(got - grouped_query_attention(q, k, v, mask, 8**-0.5)).max() > 1e-3


@pytest.fixture
def float64_softmax(monkeypatch):
    """Gemma 2 eager takes its softmax in float32 (modeling_gemma2.py:203); keep float64."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, dtype=None, **kwargs):
        return original(x, dim=dim, dtype=F64 if dtype == torch.float32 else dtype, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@pytest.mark.parametrize("b,h,hkv,t,past,w,cap,scale", [
    (2, 4, 2, 7, 0, None, 50.0, 256**-0.5), (1, 4, 4, 3, 4, 4, 2.0, 0.5), (2, 2, 1, 8, 0, 3, 1.0, 0.25),
])
def test_softcap_matches_gemma2_eager(float64_softmax, b, h, hkv, t, past, w, cap, scale):
    rng = np.random.default_rng(t + past)
    s = past + t
    q = rng.standard_normal((b, t, h, 8)) * 6
    k, v = rng.standard_normal((b, s, hkv, 8)), rng.standard_normal((b, s, hkv, 5))
    fn = mu.causal_mask_function if w is None else mu.sliding_window_causal_mask_function(w)
    mask = causal_mask(t, s, past) if w is None else sliding_window_mask(t, s, w, past)
    want, _ = modeling_gemma2.eager_attention_forward(module(h, hkv), *to_torch(q, k, v),
                                                      additive(fn, t, s, past, b), scaling=scale, softcap=cap)
    got = grouped_query_attention(q, k, v, mask, scale, softcap=cap)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-13, atol=1e-14)
    assert np.abs(got - grouped_query_attention(q, k, v, mask, scale)).max() > 1e-3


# --- fully masked rows: the measured transformers behaviours recorded in refimpl/masks.py

def fully_masked_case(dtype):
    """T = S = 3, key padding [0, 1, 1] under causal: query row 0 sees no key."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 3, 1, 4))
    v = np.arange(12.0).reshape(1, 3, 1, 4)
    key_valid = np.array([[False, True, True]])
    tq, tk, tv = (x.to(dtype) for x in to_torch(q, k, v))
    boolean = mu.sdpa_mask(batch_size=1, q_length=3, kv_length=3, mask_function=mu.causal_mask_function,
                           attention_mask=torch.from_numpy(key_valid), allow_is_causal_skip=False)
    floating = mu.eager_mask(batch_size=1, q_length=3, kv_length=3, mask_function=mu.causal_mask_function,
                             attention_mask=torch.from_numpy(key_valid), dtype=dtype)
    return (q, k, v, combine(causal_mask(3, 3), padding_mask(key_valid))), (tq, tk, tv), boolean, floating


def test_reference_fully_masked_row_is_zero():
    (q, k, v, mask), *_ = fully_masked_case(F64)
    np.testing.assert_array_equal(grouped_query_attention(q, k, v, mask, 0.5)[0, 0, 0], 0.0)
    np.testing.assert_array_equal(grouped_query_attention(q, k, v, mask, 0.5, sinks=np.zeros(1))[0, 0, 0], 0.0)


def test_hf_eager_fully_masked_row_float32_is_uniform_average_float64_is_nan():
    _, args32, _, mask32 = fully_masked_case(torch.float32)
    out32, w32 = modeling_qwen3.eager_attention_forward(module(1, 1), *args32, mask32, scaling=0.5)
    np.testing.assert_array_equal(w32[0, 0, 0].numpy(), np.full(3, 1 / 3, np.float32))
    np.testing.assert_allclose(out32[0, 0, 0].numpy(), [4, 5, 6, 7], rtol=1e-6)
    _, args64, _, mask64 = fully_masked_case(F64)
    out64, _ = modeling_qwen3.eager_attention_forward(module(1, 1), *args64, mask64, scaling=0.5)
    assert np.isnan(out64[0, 0, 0].numpy()).all()
    assert np.isfinite(out64[0, 1:].numpy()).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_hf_gpt_oss_eager_fully_masked_row_is_zero_with_a_sink(dtype):
    _, args, _, mask = fully_masked_case(dtype)
    for sink, expected in ((0.0, [0, 0, 0, 0]), (-np.inf, [4, 5, 6, 7])):
        with_sink = SimpleNamespace(num_key_value_groups=1, training=False, sinks=torch.full((1,), sink, dtype=dtype))
        out, _ = modeling_gpt_oss.eager_attention_forward(with_sink, *args, mask, scaling=0.5)
        np.testing.assert_allclose(out[0, 0, 0].numpy(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sdpa_fully_masked_row_is_zero_on_this_torch(dtype):
    _, (q, k, v), boolean, _ = fully_masked_case(dtype)
    for mask in (boolean, torch.where(boolean, 0.0, -torch.inf).to(dtype)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
        np.testing.assert_array_equal(out[0, 0, 0].numpy(), 0.0)
        assert np.abs(out[0, 0, 1:].numpy()).min() > 0
