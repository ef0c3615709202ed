"""refimpl.rope without transformers: pairings, partial rotary, scaling rules, errors.

Agreement with transformers' own functions is in ``test_rope_hf.py``.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.rope import (
    RopeLayout,
    apply_rope,
    apply_rope_interleaved,
    apply_rope_rotate_half,
    default_inv_freq,
    linear_inv_freq,
    llama3_inv_freq,
    rope_cos_sin,
    rope_frequencies,
    rotary_dim,
    yarn_attention_scaling,
    yarn_correction_range,
    yarn_inv_freq,
    yarn_mscale,
)

LAYOUTS = list(RopeLayout)
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope(x, positions, theta=10000.0, layout=RopeLayout.ROTATE_HALF, params=None, partial=1.0):
    params = params or {"rope_type": "default", "rope_theta": theta}
    inv, scale = rope_frequencies(params, x.shape[-1], partial_rotary_factor=partial)
    cos, sin = rope_cos_sin(positions, inv, x.dtype, scale)
    return apply_rope(x, cos, sin, layout)


def pair_loop(x, inv_freq, positions, layout, scale=1.0):
    """The literal definition: rotate each (channel a, channel b) pair of every head, one at a time."""
    out = x.copy()
    b, t, h, d = x.shape
    half = len(inv_freq)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                for i in range(half):
                    a, c = (i, i + half) if layout is RopeLayout.ROTATE_HALF else (2 * i, 2 * i + 1)
                    angle = positions[ti] * inv_freq[i]
                    x1, x2 = x[bi, ti, hi, a], x[bi, ti, hi, c]
                    out[bi, ti, hi, a] = scale * (x1 * math.cos(angle) - x2 * math.sin(angle))
                    out[bi, ti, hi, c] = scale * (x2 * math.cos(angle) + x1 * math.sin(angle))
    return out


# frequencies

def test_inv_freq_values():
    # D = 4, theta = 100: exponents 0 and 0.5 -> 1 and 1/10
    np.testing.assert_allclose(default_inv_freq(4, 100.0), [1.0, 0.1], rtol=0, atol=1e-16)


def test_linear_divides_every_frequency_by_factor():
    inv, scale = rope_frequencies({"rope_type": "linear", "rope_theta": 100.0, "factor": 4}, 4)
    np.testing.assert_allclose(inv, [0.25, 0.025], rtol=1e-15)
    np.testing.assert_array_equal(linear_inv_freq(4, 100.0, 4.0), inv)
    assert scale == 1.0


def test_llama3_rsc01_bands_and_difference_from_plain():
    # RSC-01: head_dim 128, theta 5e5, factor 8, low 1, high 4, original 8192.
    inv, scale = rope_frequencies(LLAMA31, 128)
    plain = default_inv_freq(128, 500000.0)
    wavelen = 2 * np.pi / plain
    high_band, low_band = wavelen < 8192 / 4, wavelen > 8192 / 1
    middle = ~high_band & ~low_band
    assert high_band.sum() > 0 and low_band.sum() > 0 and middle.sum() > 0
    assert scale == 1.0
    np.testing.assert_array_equal(inv[high_band], plain[high_band])
    np.testing.assert_allclose(inv[low_band], plain[low_band] / 8, rtol=1e-15)
    # middle band: strictly between plain / 8 and plain, blend weight (8192 / w - 1) / 3
    a = (8192 / wavelen[middle] - 1) / 3
    np.testing.assert_allclose(inv[middle], (1 - a) * plain[middle] / 8 + a * plain[middle], rtol=1e-14)
    assert np.all(inv[middle] < plain[middle]) and np.all(inv[middle] > plain[middle] / 8)
    # a vector rotated at position 20000 differs from the plain-RoPE rotation
    x = np.random.default_rng(1).standard_normal((1, 1, 1, 128))
    plain_out = rope(x, np.array([20000]), theta=500000.0)
    assert np.abs(rope(x, np.array([20000]), params=LLAMA31) - plain_out).max() > 1e-2


def test_llama3_rsc03_rsc04_type_key_and_factor_are_read():
    # RSC-03: only rope_type (no legacy "type"); the legacy key alone also works.
    legacy = {k: v for k, v in LLAMA31.items() if k != "rope_type"} | {"type": "llama3"}
    np.testing.assert_array_equal(rope_frequencies(legacy, 128)[0], rope_frequencies(LLAMA31, 128)[0])
    # RSC-04: factor 32 (Llama 3.2 1B/3B) is read, not a constant 8.
    inv8 = rope_frequencies(LLAMA31, 128)[0]
    inv32 = rope_frequencies(LLAMA31 | {"factor": 32.0}, 128)[0]
    plain = default_inv_freq(128, 500000.0)
    low_band = 2 * np.pi / plain > 8192
    np.testing.assert_allclose(inv32[low_band], plain[low_band] / 32, rtol=1e-15)
    np.testing.assert_array_equal(inv32[:10], inv8[:10])
    assert not np.allclose(inv32, inv8)


def test_yarn_structure_and_default_magnitude():
    # Qwen3-style YaRN: keep below `low`, divide by factor above `high`, ramp between.
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    inv, scale = rope_frequencies(params, 128)
    plain = default_inv_freq(128, 1e6)
    low, high = yarn_correction_range(128, 1e6, 32768)
    # corr(r) = 128 ln(32768 / (2 pi r)) / (2 ln 1e6), floored / ceiled
    assert (low, high) == (math.floor(128 * math.log(32768 / (64 * math.pi)) / (2 * math.log(1e6))),
                           math.ceil(128 * math.log(32768 / (2 * math.pi)) / (2 * math.log(1e6))))
    i = np.arange(64)
    np.testing.assert_allclose(inv[i <= low], plain[i <= low], rtol=1e-15)
    np.testing.assert_allclose(inv[i >= high], plain[i >= high] / 4, rtol=1e-15)
    ratio = inv / plain
    assert np.all(np.diff(ratio) <= 1e-15) and ratio[low + 1] < 1 and ratio[high - 1] > 0.25
    # spec A.3 example: f = 4 gives 1.1386294
    assert scale == pytest.approx(1.1386294, abs=1e-7)
    assert scale == pytest.approx(0.1 * math.log(4) + 1, rel=1e-15)


def test_yarn_high_bound_clips_at_rotary_dim_minus_one():
    # corr(32) = 22.5 -> floor 22; corr(1) = 64 ln(131072 / 2 pi) / (2 ln 1e4) = 34.6 -> ceil 35,
    # beyond the last pair (31). transformers clips at Dr - 1 = 63, not Dr/2 - 1, so the ramp
    # never reaches 1 and even the lowest frequency is only partly interpolated.
    low, high = yarn_correction_range(64, 10000.0, 131072)
    assert (low, high) == (22, 35)
    inv = yarn_inv_freq(64, 10000.0, 4.0, 131072)
    ramp_last = (31 - 22) / (35 - 22)
    plain = default_inv_freq(64, 10000.0)
    np.testing.assert_allclose(inv[31], plain[31] * (ramp_last / 4 + 1 - ramp_last), rtol=1e-15)


def test_yarn_truncate_false_keeps_fractional_bounds():
    low, high = yarn_correction_range(64, 150000.0, 4096, 32.0, 1.0, truncate=False)
    assert low == pytest.approx(64 * math.log(4096 / (64 * math.pi)) / (2 * math.log(150000.0)), rel=1e-15)
    assert low != math.floor(low) and high != math.ceil(high)
    trunc = yarn_inv_freq(64, 150000.0, 32.0, 4096, truncate=True)
    no_trunc = rope_frequencies({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                 "original_max_position_embeddings": 4096, "truncate": False}, 64)[0]
    assert not np.allclose(trunc, no_trunc)


def test_yarn_rsc12_magnitude_is_mscale_ratio():
    # RSC-12: factor 16, mscale 1; mscale_all_dim 1 vs 0.707.
    base = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0}
    m = lambda k: 0.1 * k * math.log(16) + 1
    for all_dim, expected in [(1.0, 1.0), (0.707, m(1.0) / m(0.707))]:
        inv, scale = rope_frequencies(base | {"mscale_all_dim": all_dim}, 64)
        cos, sin = rope_cos_sin(np.array([0, 5, 40000]), inv, np.float64, scale)
        np.testing.assert_allclose(np.hypot(cos, sin), expected, rtol=1e-14)
    assert m(1.0) / m(0.707) == pytest.approx(1.0679, abs=1e-4)
    # only one of the two given (or a zero) falls back to 0.1 ln f + 1
    assert rope_frequencies(base, 64)[1] == pytest.approx(m(1.0), rel=1e-15)
    assert rope_frequencies(base | {"mscale": 0, "mscale_all_dim": 0.707}, 64)[1] == pytest.approx(m(1.0))


def test_yarn_attention_factor_wins_and_small_factors():
    params = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256,
              "attention_factor": 1.5, "mscale": 1.0, "mscale_all_dim": 0.707}
    assert rope_frequencies(params, 32)[1] == 1.5
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5, 3.0) == 1.0
    assert yarn_attention_scaling(1.0) == 1.0


def test_yarn_original_context_defaults_and_null_factor():
    explicit = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512}
    implicit = {k: v for k, v in explicit.items() if k != "original_max_position_embeddings"}
    a = rope_frequencies(explicit, 32)
    b = rope_frequencies(implicit, 32, max_position_embeddings=512)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    # factor null: max_position_embeddings / original (DeepSeek-V3 style)
    c = rope_frequencies(explicit | {"factor": None}, 32, max_position_embeddings=2048)
    np.testing.assert_array_equal(c[0], a[0])
    assert c[1] == a[1]


def test_partial_rotary_factor_width_and_precedence():
    assert rotary_dim(128, 0.5) == 64 and rotary_dim(12, 0.5) == 6 and rotary_dim(256, 0.25) == 64
    params = {"rope_type": "default", "rope_theta": 1e4}
    inv, _ = rope_frequencies(params, 12, partial_rotary_factor=0.5)
    np.testing.assert_allclose(inv, default_inv_freq(6, 1e4), rtol=1e-15)
    # a value inside rope_parameters wins over the keyword (transformers' setdefault)
    inside = rope_frequencies(params | {"partial_rotary_factor": 0.5}, 128, partial_rotary_factor=0.25)[0]
    assert inside.shape == (32,)
    np.testing.assert_allclose(inside, default_inv_freq(64, 1e4), rtol=1e-15)


@pytest.mark.parametrize("params, head_dim, kwargs, key", [
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 8, {}, "dynamic"),
    ({"rope_type": ["yarn"], "rope_theta": 1e4}, 8, {}, "yarn"),
    ({"rope_type": "linear", "rope_theta": 1e4}, 8, {}, "'factor'"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": "8"}, 8, {}, "'factor'"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": True}, 8, {}, "'factor'"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}, 8, {}, "'factor'"),
    ({"rope_type": "default"}, 8, {}, "rope_theta"),
    (LLAMA31 | {"low_freq_factor": None}, 128, {}, "'low_freq_factor'"),
    (LLAMA31 | {"high_freq_factor": 1.0}, 128, {}, "high_freq_factor"),
    ({k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"}, 128, {},
     "'original_max_position_embeddings'"),
    (LLAMA31 | {"original_max_position_embeddings": 8192.5}, 128, {}, "'original_max_position_embeddings'"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 64}, 8, {}, "'factor'"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": None, "original_max_position_embeddings": 64}, 8, {},
     "max_position_embeddings"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64,
      "truncate": "no"}, 8, {}, "'truncate'"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64,
      "beta_fast": "32"}, 8, {}, "'beta_fast'"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64,
      "mscale": "1"}, 8, {}, "'mscale'"),
    ({"rope_type": "default", "rope_theta": 1e4}, 12, {"partial_rotary_factor": 0.25}, "= 3"),
    ({"rope_type": "default", "rope_theta": 1e4}, 8, {"partial_rotary_factor": 1.5}, "= 12"),
    ({"rope_type": "default", "rope_theta": 1e4}, 8, {"partial_rotary_factor": 0.1}, "= 0"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": None}, 8, {}, "partial_rotary_factor"),
    ({"rope_type": "default", "rope_theta": 1e4}, 7, {}, "= 7"),
    ({"rope_type": "default", "rope_theta": 1e4}, 8.0, {}, "head_dim"),
])
def test_bad_rope_parameters_raise_config_error_naming_the_key(params, head_dim, kwargs, key):
    with pytest.raises(ConfigError, match=f"^[^\n]*{key}"):
        rope_frequencies(params, head_dim, **kwargs)


# cos / sin tables

def test_cos_sin_accepts_batched_positions():
    inv = default_inv_freq(6, 1e4)
    rows = np.array([[0, 1, 2, 3], [7, 40000, 131000, 5]])
    cos, sin = rope_cos_sin(rows, inv, np.float32, 1.25)
    assert cos.shape == sin.shape == (2, 4, 3) and cos.dtype == sin.dtype == np.float32
    for b in range(2):
        c, s = rope_cos_sin(rows[b], inv, np.float32, 1.25)
        np.testing.assert_array_equal(cos[b], c)
        np.testing.assert_array_equal(sin[b], s)
    np.testing.assert_allclose(cos[1, 2], 1.25 * np.cos(131000 * inv), rtol=1e-7)


def test_large_positions_keep_exact_angles():
    # Rotating twice by 65500 must equal rotating once by 131000 (angle additivity);
    # float32 angles would miss by ~8e-3 rad at this position.
    x = np.random.default_rng(3).standard_normal((1, 1, 2, 16))
    for layout in LAYOUTS:
        twice = rope(rope(x, np.array([65500]), layout=layout), np.array([65500]), layout=layout)
        np.testing.assert_allclose(twice, rope(x, np.array([131000]), layout=layout), rtol=0, atol=1e-10)
    # relative property at 40000 / 131000 with int32 positions
    q, k = np.random.default_rng(4).standard_normal((2, 1, 1, 1, 16))
    dot = lambda a, b: float(np.sum(rope(q, np.array([a], np.int32)) * rope(k, np.array([b], np.int32))))
    assert dot(131000, 40000) == pytest.approx(dot(91000, 0), abs=1e-10)


def test_cos_sin_rejects_bad_positions():
    inv = default_inv_freq(4, 1e4)
    with pytest.raises(InputError, match="integers"):
        rope_cos_sin(np.array([0.0, 1.0]), inv, np.float64)
    with pytest.raises(ShapeError, match="positions"):
        rope_cos_sin(np.zeros((1, 2, 3), np.int64), inv, np.float64)


# rotation

def test_rotate_half_pairs_j_with_j_plus_half():
    # D = 4, pair 0 = channels (0, 2), pair 1 = channels (1, 3); theta 100 -> freqs 1, 0.1
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    p = 2
    out = rope(x, np.array([p]), theta=100.0).ravel()
    a0, a1 = p * 1.0, p * 0.1
    expected = [
        1 * np.cos(a0) - 3 * np.sin(a0),
        2 * np.cos(a1) - 4 * np.sin(a1),
        3 * np.cos(a0) + 1 * np.sin(a0),
        4 * np.cos(a1) + 2 * np.sin(a1),
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=1e-15)


def test_interleaved_pairs_2i_with_2i_plus_1():
    # D = 4, pair 0 = channels (0, 1), pair 1 = channels (2, 3); theta 100 -> freqs 1, 0.1
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    p = 2
    out = rope(x, np.array([p]), theta=100.0, layout=RopeLayout.INTERLEAVED).ravel()
    a0, a1 = p * 1.0, p * 0.1
    expected = [
        1 * np.cos(a0) - 2 * np.sin(a0),
        2 * np.cos(a0) + 1 * np.sin(a0),
        3 * np.cos(a1) - 4 * np.sin(a1),
        4 * np.cos(a1) + 3 * np.sin(a1),
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d, partial", [(8, 1.0), (12, 0.5), (10, 0.4), (7, 0.9)])
def test_matches_literal_pair_loop(layout, d, partial):
    # (12, 0.5): Dr = 6, an odd number (3) of pairs; (7, 0.9): odd D with Dr = 6.
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2, 5, 3, d))
    positions = np.array([0, 1, 7, 40000, 131000])
    params = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
    inv, scale = rope_frequencies(params, d, partial_rotary_factor=partial)
    cos, sin = rope_cos_sin(positions, inv, np.float64, scale)
    expected = pair_loop(x, inv, positions, layout, scale)
    np.testing.assert_allclose(apply_rope(x, cos, sin, layout), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope02_partial_rotary_leaves_tail_unchanged(layout):
    # ROPE-02 probe: head_dim 8, factor 0.5, position 3: dims 4..7 unchanged, 0..3 rotated.
    x = np.arange(1.0, 9.0).reshape(1, 1, 1, 8)
    out = rope(x, np.array([3]), layout=layout, partial=0.5)
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    assert np.all(np.abs(out[..., :4] - x[..., :4]) > 1e-3)
    # 3 pairs (D = 12, Dr = 6): tail 6..11 untouched, every head channel moved
    x = np.random.default_rng(5).standard_normal((2, 3, 2, 12))
    out = rope(x, np.array([3, 11, 29]), layout=layout, partial=0.5)
    np.testing.assert_array_equal(out[..., 6:], x[..., 6:])
    assert np.all(np.abs(out[..., :6] - x[..., :6]) > 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200000), st.sampled_from([(2, 1.0), (8, 1.0), (12, 0.5), (64, 0.25), (10, 0.6)]),
       st.sampled_from(LAYOUTS))
def test_rope_preserves_norms(p, shape, layout):
    d, partial = shape
    x = np.random.default_rng(p).standard_normal((1, 1, 2, d))
    out = rope(x, np.array([p]), layout=layout, partial=partial)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    # and the rotated part's norm on its own (the tail is not used to compensate)
    dr = int(d * partial)
    np.testing.assert_allclose(np.linalg.norm(out[..., :dr], axis=-1), np.linalg.norm(x[..., :dr], axis=-1),
                               rtol=1e-13)


SCALINGS = [
    {"rope_type": "default", "rope_theta": 10000.0},
    LLAMA31,
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "original_max_position_embeddings": 128,
     "mscale": 1.0, "mscale_all_dim": 0.707},
]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 100000), st.integers(0, 100000), st.integers(0, 50000), st.sampled_from(LAYOUTS),
       st.sampled_from([(16, 1.0), (12, 0.5)]), st.sampled_from(SCALINGS))
def test_qk_depends_only_on_position_difference(m, n, shift, layout, shape, params):
    d, partial = shape
    rng = np.random.default_rng(m * 7 + n)
    q, k = rng.standard_normal((2, 1, 1, 1, d))
    r = lambda v, p: rope(v, np.array([p]), layout=layout, params=params, partial=partial)
    dot = lambda a, b: float(np.sum(r(q, a) * r(k, b)))
    assert dot(m, n) == pytest.approx(dot(m + shift, n + shift), rel=1e-9, abs=1e-9)


def test_apply_rope_dispatches_on_layout():
    x = np.random.default_rng(6).standard_normal((1, 2, 1, 8))
    cos, sin = rope_cos_sin(np.array([3, 9]), default_inv_freq(8, 1e4), np.float64)
    half, inter = apply_rope_rotate_half(x, cos, sin), apply_rope_interleaved(x, cos, sin)
    assert not np.allclose(half, inter)
    np.testing.assert_array_equal(apply_rope(x, cos, sin, RopeLayout.ROTATE_HALF), half)
    np.testing.assert_array_equal(apply_rope(x, cos, sin, "interleaved"), inter)
    assert [m.value for m in RopeLayout] == ["rotate_half", "interleaved"]
    with pytest.raises(ConfigError, match="layout"):
        apply_rope(x, cos, sin, "neox")


def test_position_zero_is_identity():
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 8))
    for layout in LAYOUTS:
        np.testing.assert_array_equal(rope(x, np.array([0]), layout=layout), x)


@pytest.mark.parametrize("apply", [apply_rope_rotate_half, apply_rope_interleaved])
def test_rejects_tables_that_do_not_fit(apply):
    x = np.zeros((2, 3, 2, 8))
    table = lambda positions, dr: rope_cos_sin(positions, default_inv_freq(dr, 1e4), np.float64)
    with pytest.raises(ShapeError, match="do not fit"):
        apply(x, *table(np.arange(3), 10))  # Dr > D
    with pytest.raises(ShapeError, match="do not fit"):
        apply(x, *table(np.arange(4), 8))  # wrong T
    with pytest.raises(ShapeError, match="do not fit"):
        apply(x, *table(np.zeros((3, 3), np.int64), 8))  # wrong B
    cos, sin = table(np.arange(3), 8)
    with pytest.raises(ShapeError, match="do not fit"):
        apply(x, cos, sin[:, :2])
    with pytest.raises(RefimplError, match="dtype"):
        apply(x.astype(np.float32), cos, sin)
    with pytest.raises(ShapeError, match="even"):
        default_inv_freq(7, 1e4)
