"""Tests of refimpl.attention and refimpl.masks (NumPy only).

Probes named after bug classes (SWA-01, KV-02, SINK-01, ...) follow
docs/bug-classes.md; most use the uniform-attention probe: q = k = 0 so
the weights are uniform over the visible keys, and v[j] = one-hot(j), so each
output row shows exactly which keys were visible.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.attention import attention, grouped_query_attention, masked_softmax, masked_softmax_with_sink
from refimpl.errors import RefimplError, ShapeError
from refimpl.masks import causal_mask, chunked_attention_mask, combine, padding_mask, sliding_window_mask

LN4 = float(np.log(4.0))
small = settings(max_examples=25, deadline=None)


def naive_attention(q, k, v, mask, scale, sinks=None, softcap=None):
    """Loop form, one (batch, head, query) at a time, straight from the formulas."""
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    mask = np.broadcast_to(mask, (b,) + mask.shape[-2:])
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // g] * scale for j in range(k.shape[1])])
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                visible = mask[bi, i]
                logits = s[visible]
                sink = -np.inf if sinks is None else sinks[hi]
                if logits.size == 0:
                    continue
                m = max(logits.max(), sink)
                w = np.exp(logits - m)
                out[bi, i, hi] = w @ v[bi, visible, hi // g] / (np.exp(sink - m) + w.sum())
    return out


def uniform_probe(t, s, h=1, hkv=1):
    """q = k = 0 and v[j] = one-hot(j): output row i lists the weight of each key."""
    q = np.zeros((1, t, h, 2))
    k = np.zeros((1, s, hkv, 2))
    v = np.broadcast_to(np.eye(s)[None, :, None, :], (1, s, hkv, s)).copy()
    return q, k, v


def averaging(s, keys):
    row = np.zeros(s)
    row[list(keys)] = 1.0 / len(keys)
    return row


def random_qkv(rng, b, t, s, h, hkv, d=4, dv=3, dtype=np.float64):
    q = rng.standard_normal((b, t, h, d)).astype(dtype)
    k = rng.standard_normal((b, s, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, s, hkv, dv)).astype(dtype)
    return q, k, v


# --- the core against the loop form

@pytest.mark.parametrize("h,hkv,t", [(4, 2, 7), (4, 4, 1), (6, 1, 5), (3, 3, 11)])
def test_grouped_query_attention_matches_loop_form(h, hkv, t):
    rng = np.random.default_rng(h * 100 + t)
    q, k, v = random_qkv(rng, 2, t, t, h, hkv, d=8, dv=5)
    mask = causal_mask(t, t)
    np.testing.assert_allclose(
        grouped_query_attention(q, k, v, mask, 8**-0.5), naive_attention(q, k, v, mask, 8**-0.5), rtol=1e-12, atol=1e-13
    )


@pytest.mark.parametrize("h,hkv,t,s", [(4, 2, 5, 9), (6, 3, 1, 7), (2, 1, 13, 13), (5, 5, 3, 4)])
def test_grouped_query_attention_with_sinks_and_softcap_matches_loop_form(h, hkv, t, s):
    rng = np.random.default_rng(7 * h + t)
    q, k, v = random_qkv(rng, 2, t, s, h, hkv)
    q *= 4.0  # scores well past the cap, so the cap changes the result
    sinks = rng.standard_normal(h) * 2
    mask = combine(sliding_window_mask(t, s, 3, s - t), padding_mask(np.array([[True] * s, [False] + [True] * (s - 1)])))
    got = grouped_query_attention(q, k, v, mask, 0.5, sinks=sinks, softcap=2.0)
    np.testing.assert_allclose(got, naive_attention(q, k, v, mask, 0.5, sinks, 2.0), rtol=1e-12, atol=1e-13)
    assert np.abs(got - grouped_query_attention(q, k, v, mask, 0.5, sinks=sinks)).max() > 1e-3
    assert np.abs(got - grouped_query_attention(q, k, v, mask, 0.5, softcap=2.0)).max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 9, 9, 6, 2, d=4, dv=4)
    sinks = rng.standard_normal(6)
    mask = causal_mask(9, 9)
    repeated = grouped_query_attention(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), mask, 0.5, sinks=sinks)
    np.testing.assert_allclose(grouped_query_attention(q, k, v, mask, 0.5, sinks=sinks), repeated, rtol=1e-13)


# --- masks

def test_causal_mask_with_past_length():
    m = causal_mask(2, 5, past_length=3)
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@given(st.integers(1, 12), st.integers(1, 14), st.integers(0, 5))
def test_sliding_window_mask_definition(t, w, past):
    m = sliding_window_mask(t, past + t, w, past_length=past)
    for i in range(t):
        for j in range(past + t):
            assert m[i, j] == (past + i - w < j <= past + i)
    # window >= number of keys: the same as plain causal
    np.testing.assert_array_equal(sliding_window_mask(t, past + t, past + t, past), causal_mask(t, past + t, past))


@given(st.integers(1, 12), st.integers(1, 14), st.integers(0, 9))
def test_chunked_attention_mask_definition(t, c, past):
    m = chunked_attention_mask(t, past + t, c, past_length=past)
    for i in range(t):
        p = past + i
        for j in range(past + t):
            assert m[i, j] == (j <= p and j // c == p // c)
    # one chunk covering every position: plain causal
    np.testing.assert_array_equal(chunked_attention_mask(t, past + t, past + t, past), causal_mask(t, past + t, past))


def test_chunked_attention_mask_diagram():
    # the docstring table, C = 3, T = S = 8
    rows = ["x.......", "xx......", "xxx.....", "...x....", "...xx...", "...xxx..", "......x.", "......xx"]
    expected = np.array([[ch == "x" for ch in r] for r in rows])
    np.testing.assert_array_equal(chunked_attention_mask(8, 8, 3), expected)


def test_chunk_of_one_is_the_diagonal_and_window_of_one_too():
    np.testing.assert_array_equal(chunked_attention_mask(4, 6, 1, 2), np.eye(4, 6, k=2, dtype=bool))
    np.testing.assert_array_equal(sliding_window_mask(4, 6, 1, 2), np.eye(4, 6, k=2, dtype=bool))


@pytest.mark.parametrize("make", [sliding_window_mask, chunked_attention_mask])
@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_local_masks_reject_non_positive_sizes(make, bad):
    with pytest.raises(RefimplError, match=">= 1"):
        make(3, 3, bad)


def test_sliding_window_rejects_zero_as_value_error():
    with pytest.raises(ValueError, match=">= 1"):
        sliding_window_mask(3, 3, 0)


def test_padding_mask_and_combine():
    valid = np.array([[False, True, True], [True, True, True]])
    m = combine(causal_mask(3, 3), padding_mask(valid))
    assert m.shape == (2, 3, 3)
    np.testing.assert_array_equal(m[0], [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(m[1], causal_mask(3, 3))
    with pytest.raises(ShapeError):
        padding_mask(valid.astype(int))
    with pytest.raises(ShapeError):
        combine(causal_mask(3, 3), causal_mask(3, 4))
    with pytest.raises(ShapeError):
        combine()


def test_combine_window_and_chunk_diagram():
    m = combine(causal_mask(8, 8), sliding_window_mask(8, 8, 4), chunked_attention_mask(8, 8, 3))
    assert [list(np.flatnonzero(r)) for r in m[5:]] == [[3, 4, 5], [6], [6, 7]]


# --- fully masked rows

def test_fully_masked_row_gives_zeros():
    p = masked_softmax(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[True, False], [False, False]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("sinks", [None, np.array([0.0, LN4]), np.array([-np.inf, 3.0])])
def test_fully_masked_row_outputs_zeros_with_or_without_sink(sinks):
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 2, 3, 3, 2, 1)
    mask = combine(causal_mask(3, 3), padding_mask(np.array([[False, True, True], [True, True, True]])))
    out = grouped_query_attention(q, k, v, mask, 0.5, sinks=sinks)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 0], 0.0)
    assert np.abs(out[0, 1:]).min() > 0 and np.abs(out[1]).min() > 0


def test_no_keys_at_all_gives_zeros():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 0, 0, 2, 2)
    assert attention(q, k, v, scaling=1.0).shape == (1, 0, 2, 3)
    out = grouped_query_attention(np.ones((1, 2, 2, 4)), k, v, np.zeros((2, 0), bool), 1.0, sinks=np.zeros(2))
    np.testing.assert_array_equal(out, np.zeros((1, 2, 2, 3)))


# --- bug-class probes with the uniform-attention probe

def test_causal_probe_sees_the_prefix():
    t = 6
    out = attention(*uniform_probe(t, t), scaling=1.0)[0, :, 0]
    expected = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-15)


def test_swa01_window_sees_exactly_w_keys():
    # T = 8, W = 4: query 7 averages v[4..7]; a W + 1 implementation averages v[3..7].
    out = attention(*uniform_probe(8, 8), scaling=1.0, sliding_window=4)[0, :, 0]
    np.testing.assert_allclose(out[7], averaging(8, range(4, 8)), rtol=1e-15)
    np.testing.assert_allclose(out[1], averaging(8, range(0, 2)), rtol=1e-15)
    # the core with the mask built by hand agrees
    core = grouped_query_attention(*uniform_probe(8, 8), sliding_window_mask(8, 8, 4), 1.0)[0, :, 0]
    np.testing.assert_array_equal(core, out)


def test_kv02_window_with_cached_prefix():
    # W = 4, 6 cached + 3 new: new row at position p sees p-3..p only.
    out = attention(*uniform_probe(3, 9), scaling=1.0, sliding_window=4)[0, :, 0]
    for i, p in enumerate(range(6, 9)):
        np.testing.assert_allclose(out[i], averaging(9, range(p - 3, p + 1)), rtol=1e-15)


def test_swa04_decode_after_window_sees_w_keys():
    # prefill positions 0..6, decode position 7 with W = 4: v[4..7], not v[5..7].
    out = attention(*uniform_probe(1, 8), scaling=1.0, sliding_window=4)[0, 0, 0]
    np.testing.assert_allclose(out, averaging(8, range(4, 8)), rtol=1e-15)


def test_chunked_probe_c3_t8():
    out = attention(*uniform_probe(8, 8), scaling=1.0, attention_chunk_size=3)[0, :, 0]
    for p in range(8):
        np.testing.assert_allclose(out[p], averaging(8, range(p // 3 * 3, p + 1)), rtol=1e-15)


def test_chunked_decode_uses_absolute_positions():
    # 7 cached + 1 new at position 7, C = 3: chunk [6, 9) -> keys 6 and 7.
    out = attention(*uniform_probe(1, 8), scaling=1.0, attention_chunk_size=3)[0, 0, 0]
    np.testing.assert_allclose(out, averaging(8, [6, 7]), rtol=1e-15)


def test_window_and_chunk_intersect():
    # W = 4 and C = 3: query 5 sees 3..5 (chunk), query 7 sees 6, 7.
    out = attention(*uniform_probe(8, 8), scaling=1.0, sliding_window=4, attention_chunk_size=3)[0, :, 0]
    np.testing.assert_allclose(out[5], averaging(8, [3, 4, 5]), rtol=1e-15)
    np.testing.assert_allclose(out[7], averaging(8, [6, 7]), rtol=1e-15)
    # window 2 inside chunk 8: the window bites
    out = attention(*uniform_probe(8, 8), scaling=1.0, sliding_window=2, attention_chunk_size=8)[0, :, 0]
    np.testing.assert_allclose(out[7], averaging(8, [6, 7]), rtol=1e-15)


def sink_probe(t, s, h, hkv=1):
    """All scores 0 over the visible keys, v = 1: output = n / (n + e^sink)."""
    return np.zeros((1, t, h, 2)), np.zeros((1, s, hkv, 2)), np.ones((1, s, hkv, 1))


def test_sink01_sink_logit_in_denominator():
    # decode over n = 4 keys with sink ln 4 -> 4 / (4 + 4) = 0.5
    out = attention(*sink_probe(1, 4, 1), scaling=1.0, sinks=np.array([LN4]))
    np.testing.assert_allclose(out, 0.5, rtol=1e-15)
    # with a window: every row that sees 4 keys gives 0.5, earlier rows n / (n + 4)
    out = attention(*sink_probe(8, 8, 1), scaling=1.0, sliding_window=4, sinks=np.array([LN4]))[0, :, 0, 0]
    n = np.minimum(np.arange(1, 9), 4)
    np.testing.assert_allclose(out, n / (n + 4.0), rtol=1e-15)


@pytest.mark.parametrize("hkv", [1, 2])
def test_sink02_sink_indexed_by_query_head_for_every_row(hkv):
    # 2 heads, sinks [0, ln 4], 3 query rows over the same 4 keys: 4/5 and 1/2 in every row.
    q, k, v = sink_probe(3, 4, 2, hkv)
    out = grouped_query_attention(q, k, v, np.ones((3, 4), bool), 1.0, sinks=np.array([0.0, LN4]))[0, :, :, 0]
    np.testing.assert_allclose(out, [[0.8, 0.5]] * 3, rtol=1e-15)


def test_sinks_follow_query_heads_not_kv_heads():
    # H = 4, Hkv = 2: head h has sink ln(h + 1); reading sinks by kv head or by h % Hkv fails.
    sinks = np.log(np.arange(1.0, 5.0))
    out = grouped_query_attention(*sink_probe(1, 4, 4, 2), np.ones((1, 4), bool), 1.0, sinks=sinks)[0, 0, :, 0]
    np.testing.assert_allclose(out, 4 / (4 + np.arange(1.0, 5.0)), rtol=1e-15)


def test_sink04_extend_with_window_and_sink_equals_full_sequence():
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 1, 8, 8, 2, 1)
    params = dict(scaling=0.5, sliding_window=4, sinks=np.array([LN4, -1.0]))
    full = attention(q, k, v, **params)
    np.testing.assert_allclose(attention(q[:, 5:], k, v, **params), full[:, 5:], rtol=1e-14, atol=1e-15)


def test_cap03_attention_softcap_applies_to_the_scaled_score():
    # one head, raw score 120 against a key scoring 0: softmax over [50 tanh(2.4), 0], not [120, 0].
    q = np.full((1, 1, 1, 1), 120.0)
    k = np.array([1.0, 0.0]).reshape(1, 2, 1, 1)
    v = np.eye(2).reshape(1, 2, 1, 2)
    capped = 50 * np.tanh(2.4)
    out = attention(q, k, v, scaling=1.0, attn_logit_softcapping=50.0)[0, 0, 0]
    np.testing.assert_allclose(out, [1 / (1 + np.exp(-capped)), 1 / (1 + np.exp(capped))], rtol=1e-13, atol=0)
    # scale before cap: scaling 0.5 caps 60, not 120
    out = attention(q, k, v, scaling=0.5, attn_logit_softcapping=50.0)[0, 0, 0]
    np.testing.assert_allclose(out[1], 1 / (1 + np.exp(50 * np.tanh(1.2))), rtol=1e-13, atol=0)


def test_scl01_query_pre_attn_scalar_scale_is_honoured():
    # Gemma 2 9B: query_pre_attn_scalar 256 (head_dim), not 3584 / 16 = 224.
    q = np.full((1, 1, 1, 1), 16.0)
    k = np.array([1.0, 0.0]).reshape(1, 2, 1, 1)
    v = np.eye(2).reshape(1, 2, 1, 2)
    out = attention(q, k, v, scaling=256**-0.5)[0, 0, 0]
    np.testing.assert_allclose(out[0], 1 / (1 + np.exp(-1.0)), rtol=1e-15)
    wrong = attention(q, k, v, scaling=224**-0.5)[0, 0, 0]
    assert abs(wrong[0] - out[0]) > 5e-3


# --- properties

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(0, 4))  # Hkv, G, T, past
options = st.fixed_dictionaries({
    "sliding_window": st.none() | st.integers(1, 6),
    "attention_chunk_size": st.none() | st.integers(1, 6),
    "attn_logit_softcapping": st.none() | st.sampled_from([0.5, 3.0]),
    "with_sinks": st.booleans(),
})


def _case(seed, hkv, g, t, past, opts, b=2):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, b, t, t + past, hkv * g, hkv)
    opts = dict(opts)
    sinks = rng.standard_normal(hkv * g) if opts.pop("with_sinks") else None
    return q, k, v, dict(opts, sinks=sinks, scaling=0.7)


@small
@given(shapes, options, st.integers(0, 10), st.integers(0, 2**16))
def test_changing_future_keys_leaves_earlier_outputs_unchanged(shape, opts, cut, seed):
    q, k, v, params = _case(seed, *shape, opts)
    t, s = q.shape[1], k.shape[1]
    cut = cut % t
    k2, v2 = k.copy(), v.copy()
    k2[:, s - t + cut + 1:] += 5.0
    v2[:, s - t + cut + 1:] -= 3.0
    a = attention(q, k, v, **params)
    b = attention(q, k2, v2, **params)
    np.testing.assert_array_equal(a[:, : cut + 1], b[:, : cut + 1])
    if cut + 1 < t:
        assert not np.array_equal(a[:, cut + 1:], b[:, cut + 1:])


@small
@given(shapes, options, st.integers(0, 2**16))
def test_gqa_with_hkv_equal_h_equals_a_loop_over_heads(shape, opts, seed):
    hkv, g, t, past = shape
    q, k, v, params = _case(seed, hkv * g, 1, t, past, opts)
    whole = attention(q, k, v, **params)
    for h in range(q.shape[2]):
        one = dict(params, sinks=None if params["sinks"] is None else params["sinks"][h:h + 1])
        np.testing.assert_array_equal(attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], **one),
                                      whole[:, :, h:h + 1])


@small
@given(shapes, st.integers(0, 3), st.integers(0, 2**16))
def test_window_at_least_the_keys_equals_full_causal(shape, extra, seed):
    q, k, v, params = _case(seed, *shape, {"sliding_window": None, "attention_chunk_size": None,
                                           "attn_logit_softcapping": None, "with_sinks": True})
    s = k.shape[1]
    full = attention(q, k, v, **params)
    np.testing.assert_array_equal(attention(q, k, v, **dict(params, sliding_window=s + extra)), full)
    np.testing.assert_array_equal(attention(q, k, v, **dict(params, attention_chunk_size=s + extra)), full)


@small
@given(shapes, options, st.integers(0, 2**16))
def test_sink_minus_infinity_equals_no_sink(shape, opts, seed):
    q, k, v, params = _case(seed, *shape, dict(opts, with_sinks=False))
    with_inf = attention(q, k, v, **dict(params, sinks=np.full(q.shape[2], -np.inf)))
    np.testing.assert_array_equal(with_inf, attention(q, k, v, **params))


@small
@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**16))
def test_masked_softmax_with_minus_infinity_sink_is_masked_softmax(rows, n, seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, n)) * 10
    mask = rng.random((rows, n)) < 0.6
    np.testing.assert_array_equal(masked_softmax_with_sink(scores, mask, np.full((rows, 1), -np.inf)),
                                  masked_softmax(scores, mask))


@small
@given(shapes, options, st.integers(0, 2**16))
def test_batch_rows_are_independent(shape, opts, seed):
    q, k, v, params = _case(seed, *shape, opts, b=3)
    whole = attention(q, k, v, **params)
    for bi in range(3):
        np.testing.assert_array_equal(attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], **params), whole[bi:bi + 1])


@small
@given(shapes, options, st.integers(0, 2**16))
def test_single_query_equals_last_row_of_prefill(shape, opts, seed):
    q, k, v, params = _case(seed, *shape, opts)
    full = attention(q, k, v, **params)
    np.testing.assert_allclose(attention(q[:, -1:], k, v, **params), full[:, -1:], rtol=1e-14, atol=1e-15)


@small
@given(shapes, st.sampled_from(["sliding_window", "attention_chunk_size"]), st.integers(0, 2**16))
def test_window_of_one_returns_own_value(shape, which, seed):
    hkv, g, t, past = shape
    q, k, v, params = _case(seed, hkv, g, t, past, {"sliding_window": None, "attention_chunk_size": None,
                                                    "attn_logit_softcapping": 3.0, "with_sinks": False})
    out = attention(q, k, v, **dict(params, **{which: 1}))
    own = np.repeat(v[:, past:], g, axis=2)  # query head h reads kv head h // G
    np.testing.assert_allclose(out, own, rtol=1e-15)


# --- dtype and errors

def test_float32_stays_float32():
    q, k, v = random_qkv(np.random.default_rng(1), 1, 3, 5, 4, 2, dtype=np.float32)
    out = attention(q, k, v, scaling=0.5, sliding_window=2, attention_chunk_size=4,
                    sinks=np.zeros(4, np.float32), attn_logit_softcapping=20.0)
    assert out.dtype == np.float32
    ref = attention(*(a.astype(np.float64) for a in (q, k, v)), scaling=0.5, sliding_window=2,
                    attention_chunk_size=4, sinks=np.zeros(4), attn_logit_softcapping=20.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_rejects_bad_shapes():
    q = np.zeros((1, 3, 4, 8))
    with pytest.raises(ShapeError, match="multiple"):
        grouped_query_attention(q, np.zeros((1, 3, 3, 8)), np.zeros((1, 3, 3, 8)), causal_mask(3, 3), 1.0)
    with pytest.raises(ShapeError, match="mask"):
        grouped_query_attention(q, np.zeros((1, 3, 2, 8)), np.zeros((1, 3, 2, 8)), causal_mask(3, 4), 1.0)
    with pytest.raises(ShapeError, match="mask"):
        grouped_query_attention(q, np.zeros((1, 3, 2, 8)), np.zeros((1, 3, 2, 8)), causal_mask(3, 3).astype(int), 1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"sinks": np.zeros(2)}, ShapeError, "sinks"),
    ({"sinks": np.zeros((4, 1))}, ShapeError, "sinks"),
    ({"sinks": np.zeros(4, np.float32)}, RefimplError, "dtype"),
    ({"sliding_window": 0}, RefimplError, "sliding window"),
    ({"attention_chunk_size": -3}, RefimplError, "attention_chunk_size"),
    ({"attn_logit_softcapping": 0.0}, RefimplError, "attn_logit_softcapping"),
    ({"attn_logit_softcapping": -50.0}, RefimplError, "attn_logit_softcapping"),
    ({"scaling": 0.0}, RefimplError, "scaling"),
    ({"scaling": -0.125}, RefimplError, "scaling"),
    ({"scaling": float("nan")}, RefimplError, "scaling"),
])
def test_attention_op_rejects_bad_arguments(kwargs, error, match):
    q, k, v = random_qkv(np.random.default_rng(0), 1, 3, 5, 4, 2)
    with pytest.raises(error, match=match):
        attention(q, k, v, **dict({"scaling": 0.5}, **kwargs))


def test_attention_op_needs_at_least_as_many_keys_as_queries():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 4, 3, 2, 2)
    with pytest.raises(ShapeError, match="S >= T"):
        attention(q, k, v, scaling=1.0)
    with pytest.raises(ShapeError):
        attention(q[0], k, v, scaling=1.0)
