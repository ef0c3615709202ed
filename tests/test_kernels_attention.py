"""refimpl.kernels.attention against the reference attention, in numba's CUDA simulator.

Inputs are drawn in float32 and the reference (:func:`refimpl.attention.grouped_query_attention`
under the mask of :func:`refimpl.kv_cache.visibility`, or :func:`refimpl.attention.attention`)
runs in float64 on the same values. Bound: conformance's ``op_attention`` float32 row (rel RMS
2e-6, max abs 2e-5 of max |ref|): the kernel rounds each score (a D-term dot product), exp and
running sum in float32 (u = 6e-8); with D, S < 40 here the expected error is a few u times
sqrt(S), 1e-7 .. 5e-7, while a key seen or missed at a window, chunk, causal or tile edge moves
an output row by O(1 / S).

Launch-level cases call :func:`launch_prefill` / :func:`launch_decode` with a NaN-filled ``out``
and every scratch array from ``cuda.device_array`` poisoned (NaN, or -7 for int32), so an
element that is not written, or a partial read before it is written, shows. Under the simulator
the launchers use :data:`SIMULATOR_PREFILL_TILES` / :data:`SIMULATOR_DECODE_TILES` (8-row x
8-key tiles, 2 x 2 threads; 4-row decode tiles): the shapes below straddle them (one tile,
several, a partial last row / key / D-chunk / Dv tile, windows and chunks ending inside a tile,
partitions without a valid key). The GPU bundles are the same kernels with other constants; they
run in the ``gpu`` group (far too slow for the simulator: 128 Python threads per block).

Speed: the simulator's block manager polls its threads in a loop that holds the GIL, so each
``syncthreads`` waits out Python's thread switch interval; the module shortens it while these
tests run.
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

from conformance.compare import compare
from conformance.tolerances import get_tolerance, violations
from refimpl.attention import attention as reference_attention
from refimpl.attention import grouped_query_attention
from refimpl.errors import InputError, RefimplError, ShapeError
from refimpl.kernels import attention as ka
from refimpl.kernels._numba import SIMULATOR, cuda
from refimpl.kv_cache import KVCache, StepContext, attend_with_cache, fresh_context, next_context, visibility

TOL = get_tolerance("op_attention", "float32")

pytestmark = pytest.mark.skipif(not (SIMULATOR or cuda.is_available()), reason="needs the CUDA simulator or a GPU")


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_threads():
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """``cuda.device_array`` returns NaN-filled (float) or -7-filled (int) arrays."""
    def device_array(shape, dtype):
        return cuda.to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype))

    monkeypatch.setattr(cuda, "device_array", device_array)


def assert_matches(actual, expected):
    assert actual.shape == expected.shape
    c = compare(actual, expected)
    bad = violations(c, TOL)
    assert not bad, f"{bad}; max abs {c.max_abs:.3g} at {c.max_abs_index}, rel RMS {c.rel_rms:.3g}"


def draw(seed, b, t, s, h, hkv, d, dv, *, spread=1.0):
    """float32 q (b, t, h, d), k (b, s, hkv, d), v (b, s, hkv, dv); ``spread`` scales q (peakier softmax)."""
    rng = np.random.default_rng(seed)
    q = (spread * rng.standard_normal((b, t, h, d))).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, dv)).astype(np.float32)
    return q, k, v


def expected(q, k, v, q_positions, k_positions, *, scale, window=None, chunk=None, sinks=None, softcap=None):
    """The reference in float64: visibility() of the positions (negative key position = empty slot)."""
    context = StepContext(positions=np.asarray(q_positions), valid=np.ones(np.shape(q_positions), bool))
    slots = KVCache(k, v, np.asarray(k_positions), np.asarray(k_positions) >= 0)
    mask = visibility(context, slots, sliding_window=window, attention_chunk_size=chunk)
    f64 = (lambda a: None if a is None else np.asarray(a, np.float64))
    return grouped_query_attention(f64(q), f64(k), f64(v), mask, scale, sinks=f64(sinks), softcap=softcap)


def causal_positions(b, t, s):
    return (np.broadcast_to(np.arange(s - t, s, dtype=np.int32), (b, t)).copy(),
            np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())


def launch(path, q, k, v, q_positions, k_positions, *, scale, window=0, chunk=0, sinks=None, softcap=0.0, **kw):
    """launch_prefill / launch_decode on NumPy arrays with a NaN-filled out; returns out."""
    out = np.full(q.shape[:3] + v.shape[3:], np.nan, np.float32)
    sinks = np.zeros(0, np.float32) if sinks is None else np.asarray(sinks, np.float32)
    fn = ka.launch_prefill if path == "prefill" else ka.launch_decode
    fn(q, k, v, q_positions, k_positions, sinks, out, scale=scale, sliding_window=window,
       attention_chunk_size=chunk, softcap=softcap, **kw)
    return out


# Launch layer: every output and scratch element written; tiles straddled.


def test_launch_prefill_straddles_row_key_and_dim_tiles(poisoned_scratch):
    # 22 rows (T 11 x G 2) over 8-row tiles, 19 keys over 8-key tiles, D 11 over 8-dim chunks,
    # Dv 9 over the Dv-16 bundle; an extend: queries at positions 8..18.
    q, k, v = draw(0, 2, 11, 19, 4, 2, 11, 9)
    qp, kp = causal_positions(2, 11, 19)
    out = launch("prefill", q, k, v, qp, kp, scale=0.3)
    assert_matches(out, expected(q, k, v, qp, kp, scale=0.3))


def test_launch_decode_partitions_straddle_the_keys(poisoned_scratch):
    # T 1, S 37: five 8-key tiles in partitions of two (the last one short); G 3 rows over 4-row tiles.
    q, k, v = draw(1, 2, 1, 37, 6, 2, 5, 7, spread=2.0)
    qp, kp = causal_positions(2, 1, 37)
    want = expected(q, k, v, qp, kp, scale=0.5)
    assert_matches(launch("decode", q, k, v, qp, kp, scale=0.5, tiles_per_partition=2), want)
    assert_matches(launch("decode", q, k, v, qp, kp, scale=0.5), want)  # the default: one tile each


def test_launch_decode_partition_without_a_valid_key_and_rows_that_see_nothing(poisoned_scratch):
    # Row 0 is left-padded: its first 17 slots are empty, so partition 0 (slots 0..15) has no
    # valid key (m = -inf there). Row 1's second query sits before every key: a zero row.
    q, k, v = draw(2, 2, 2, 24, 2, 1, 4, 3)
    kp = np.broadcast_to(np.arange(24, dtype=np.int32), (2, 24)).copy()
    kp[0, :17] = -1
    kp[0, 17:] = np.arange(7)
    qp = np.array([[5, 6], [23, -3]], np.int32)
    sinks = np.array([0.5, -np.inf], np.float32)
    want = expected(q, k, v, qp, kp, scale=0.4, sinks=sinks)
    for out in (launch("decode", q, k, v, qp, kp, scale=0.4, sinks=sinks, tiles_per_partition=2),
                launch("prefill", q, k, v, qp, kp, scale=0.4, sinks=sinks)):
        assert_matches(out, want)
        assert np.array_equal(out[1, 1], np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("path,tiles", [
    # 32 threads, 8 per row (the row reductions over more than two threads), 2 x 2 per thread.
    ("prefill", ka.FlashTiles(block_m=8, block_n=16, threads_y=4, threads_x=8, chunk_d=4, block_nv=8, dv_max=16)),
    # The GPU decode geometry for 4 rows: one row group (TY = 1), one key and one column per thread.
    ("decode", ka.FlashTiles(block_m=4, block_n=8, threads_y=1, threads_x=8, chunk_d=4, block_nv=2, dv_max=8)),
], ids=["prefill-8x16", "decode-1x8"])
def test_launch_with_other_thread_geometries(path, tiles, poisoned_scratch):
    q, k, v = draw(14, 1, 3, 21, 4, 2, 6, 7)
    qp, kp = causal_positions(1, 3, 21)
    out = launch(path, q, k, v, qp, kp, scale=0.5, window=9, tiles=tiles)
    assert_matches(out, expected(q, k, v, qp, kp, scale=0.5, window=9))


# The public launchers against the reference.


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("heads", [(3, 3), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_grouped_heads_read_their_own_kv_head(heads, path):
    h, hkv = heads
    q, k, v = draw(3, 1, 5, 9, h, hkv, 6, 4)
    qp, kp = causal_positions(1, 5, 9)
    out = ka.attend_positions(q, k, v, qp, kp, scale=0.4, path=path)
    assert out.dtype == np.float32
    assert_matches(out, expected(q, k, v, qp, kp, scale=0.4))


@pytest.mark.parametrize("window", [1, 3, 8, 9, 40])
def test_sliding_window_edges_inside_and_on_tiles(window):
    # Prefill T = S = 13 and a two-token decode after it: window edges land inside 8-key tiles,
    # on a tile boundary (8) and beyond S (40 = no window in effect).
    q, k, v = draw(4, 1, 13, 13, 2, 1, 5, 3, spread=2.0)
    want = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), scaling=0.5, sliding_window=window)
    assert_matches(ka.attention(q, k, v, scaling=0.5, sliding_window=window), want)
    qp, kp = causal_positions(1, 2, 13)
    got = ka.attend_positions(q[:, -2:], k, v, qp, kp, scale=0.5, sliding_window=window, path="decode")
    assert_matches(got, want[:, -2:])


@pytest.mark.parametrize("chunk,window", [(1, None), (3, None), (8, None), (5, 3)])
def test_chunked_attention_edges(chunk, window):
    # Chunks of absolute positions: queries at 4..16 after 4 cached keys; chunk 5 with window 3 intersect.
    q, k, v = draw(5, 2, 13, 17, 2, 2, 4, 5)
    want = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), scaling=0.5,
                               attention_chunk_size=chunk, sliding_window=window)
    assert_matches(ka.attention(q, k, v, scaling=0.5, attention_chunk_size=chunk, sliding_window=window), want)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_sinks_and_softcap(path):
    # Per-head sinks (one of them -inf: no sink), a cap of 2 on peaky scores (|s| up to ~10).
    q, k, v = draw(6, 1, 3, 11, 4, 2, 8, 4, spread=3.0)
    sinks = np.array([0.7, -np.inf, 2.5, -1.0], np.float32)
    want = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), scaling=0.5,
                               sinks=sinks.astype(np.float64), attn_logit_softcapping=2.0)
    qp, kp = causal_positions(1, 3, 11)
    got = ka.attend_positions(q, k, v, qp, kp, scale=0.5, sinks=sinks, softcap=2.0, path=path)
    assert_matches(got, want)
    assert not np.allclose(got, ka.attend_positions(q, k, v, qp, kp, scale=0.5, sinks=sinks, path=path))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_storage_dtypes_widen_compute_in_float32_and_round_once(dtype):
    # As the reference: q, k, v widened to float32 (exact), the output rounded once to the storage dtype.
    q, k, v = (a.astype(dtype) for a in draw(7, 1, 6, 6, 2, 1, 4, 4))
    got = ka.attention(q, k, v, scaling=0.5)
    assert got.dtype == dtype
    want = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), scaling=0.5)
    assert not violations(compare(got, want), get_tolerance("op_attention", np.dtype(dtype).name))
    assert ka.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scaling=0.5).dtype \
        == np.float32


def test_attention_with_no_keys_or_no_queries():
    q, k, v = draw(8, 1, 0, 3, 2, 1, 4, 4)
    assert ka.attention(q, k, v, scaling=1.0).shape == (1, 0, 2, 4)
    empty = ka.attend_positions(q[:, :0], k[:, :0], v[:, :0], np.zeros((1, 0), int), np.zeros((1, 0), int), scale=1.0)
    assert empty.shape == (1, 0, 2, 4)


# A model's cache path: attend_with_cache against the reference, outputs and kept caches.


def assert_same_cache(got, want):
    for name in ("keys", "values", "positions", "valid"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert (got.span, got.last_added) == (want.span, want.last_added)
    assert (got.evicted is None) == (want.evicted is None)
    if want.evicted is not None:
        assert_same_cache(got.evicted, want.evicted)


@pytest.mark.parametrize("layer_kind", [{}, {"sliding_window": 4}, {"attention_chunk_size": 3}],
                         ids=["full", "window-4", "chunk-3"])
def test_attend_with_cache_prefill_then_decodes(layer_kind):
    # Two rows, row 0 left-padded by 2; prefill 5 tokens, then a decode of 3 and one of 1. The
    # model runs in float64 (out comes back float64, float32-accurate).
    rng = np.random.default_rng(9)
    h, hkv, d = 2, 1, 4

    def qkv(t):
        return (rng.standard_normal((2, t, h, d)), rng.standard_normal((2, t, hkv, d)),
                rng.standard_normal((2, t, hkv, d)))

    context = fresh_context(2, 5, np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    cache = ()
    for step, t in enumerate((5, 3, 1)):
        if step:
            context = next_context(context.positions[:, -1] + 1, t, cache)
        q, k, v = (a.astype(np.float32).astype(np.float64) for a in qkv(t))
        got, kept = ka.attend_with_cache(q, k, v, context, 0, scale=0.5, **layer_kind)
        want, want_kept = attend_with_cache(q, k, v, context, 0, scale=0.5, **layer_kind)
        assert got.dtype == np.float64
        assert_matches(got, want)
        assert_same_cache(kept, want_kept)
        cache = (kept,)


# Errors: the reference's checks, one line each.


def one_line_error(kind, fn, *args, **kwargs):
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, RefimplError) and "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_errors_are_the_references():
    q, k, v = draw(10, 1, 2, 4, 2, 1, 4, 3)
    qp, kp = causal_positions(1, 2, 4)
    one_line_error(ShapeError, ka.attention, q, k[:, :1], v[:, :1], scaling=1.0)  # S < T
    one_line_error(ShapeError, ka.attention, q, k, v[:, :3], scaling=1.0)
    one_line_error(ShapeError, ka.attention, q[:, :, :1].repeat(3, 2), k.repeat(2, 2), v.repeat(2, 2), scaling=1.0)
    one_line_error(InputError, ka.attention, q.astype(np.int32), k, v, scaling=1.0)
    one_line_error(InputError, ka.attention, q.astype(np.complex64), k, v, scaling=1.0)
    one_line_error(RefimplError, ka.attention, q.astype(np.float64), k, v, scaling=1.0)
    one_line_error(InputError, ka.attention, q, k, v, scaling=0.0)
    one_line_error(InputError, ka.attention, q, k, v, scaling=1.0, attn_logit_softcapping=-1.0)
    one_line_error(RefimplError, ka.attention, q, k, v, scaling=1.0, sliding_window=0)
    assert np.array_equal(ka.attention(q, k, v, scaling=1.0, sliding_window=2**40), ka.attention(q, k, v, scaling=1.0))
    one_line_error(RefimplError, ka.attention, q, k, v, scaling=1.0, attention_chunk_size=2.5)
    one_line_error(ShapeError, ka.attention, q, k, v, scaling=1.0, sinks=np.zeros(3, np.float32))
    one_line_error(InputError, ka.attention, q, k, v, scaling=1.0, sinks=np.array([0.0, np.nan], np.float32))
    message = one_line_error(ShapeError, ka.attention, q, k, np.zeros((1, 4, 1, 257), np.float32), scaling=1.0)
    assert "257" in message
    one_line_error(ShapeError, ka.attend_positions, q, k, v, qp[:, :1], kp, scale=1.0)
    one_line_error(InputError, ka.attend_positions, q, k, v, qp.astype(np.float32), kp, scale=1.0)
    one_line_error(InputError, ka.attend_positions, q, k, v, qp, kp.astype(np.int64) + 2**40, scale=1.0)
    one_line_error(RefimplError, ka.attend_positions, q, k, v, qp, kp, scale=1.0, path="fast")
    one_line_error(ShapeError, ka.attend_positions, q[..., :0], k[..., :0], v, qp, kp, scale=1.0)


def test_gpu_bundles_fit_the_hardware():
    # Static shared memory <= 48 KB; register outputs RM x NCOL <= 64; 8-byte aligned sizes.
    for tiles in ka.GPU_PREFILL_TILES + ka.GPU_DECODE_TILES:
        rm, ncol = tiles.block_m // tiles.threads_y, tiles.dv_max // tiles.threads_x
        stage = max((tiles.block_m + tiles.block_n) * (tiles.chunk_d + 1), tiles.block_nv * tiles.dv_max)
        floats = stage + tiles.block_m * (tiles.block_n + 1) + 2 * tiles.block_m * tiles.threads_x + 3 * tiles.block_m
        ints = 4 * tiles.block_m + tiles.block_n
        assert 4 * (floats + ints) <= 48 * 1024, tiles
        assert rm * ncol <= 64 and tiles.threads <= 256, tiles
    for dv in (64, 128, 256):
        assert ka._pick(ka.GPU_PREFILL_TILES, dv).dv_max == dv
        for rows in (1, 4, 8, 16, 64):
            picked = ka._pick(ka.GPU_DECODE_TILES, dv, rows)
            assert picked.dv_max >= dv and picked.block_m == min(max(rows, 4), 16)


# Real GPU only: realistic sizes.


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["prefill-gqa-window", "decode-long", "prefill-d256-sinks-cap"])
def test_gpu_realistic_sizes(case):
    if case == "prefill-gqa-window":
        q, k, v = draw(11, 2, 700, 700, 16, 4, 128, 128)
        kw = dict(sliding_window=256)
        qp, kp = causal_positions(2, 700, 700)
    elif case == "decode-long":
        q, k, v = draw(12, 4, 1, 8000, 32, 8, 128, 128)
        kw = {}
        qp, kp = causal_positions(4, 1, 8000)
    else:
        q, k, v = draw(13, 1, 300, 300, 8, 4, 256, 256)
        kw = dict(sinks=np.linspace(-1, 1, 8).astype(np.float32), softcap=30.0)
        qp, kp = causal_positions(1, 300, 300)
    scale = q.shape[-1] ** -0.5
    got = ka.attend_positions(q, k, v, qp, kp, scale=scale, **kw)
    window = kw.get("sliding_window")
    assert_matches(got, expected(q, k, v, qp, kp, scale=scale, window=window, sinks=kw.get("sinks"),
                                 softcap=kw.get("softcap")))


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_the_gpu_tile_bundles_in_the_simulator(path, poisoned_scratch):
    # The bundles a GPU launches (128 threads, 64-row / 128-key tiles), once each, on a small
    # shape: 70 keys (a partial key tile), a window edge inside it, G = 2 rows per token.
    tiles = ka.GPU_PREFILL_TILES[0] if path == "prefill" else ka.GPU_DECODE_TILES[0]
    q, k, v = draw(3, 1, 3, 70, 2, 1, 8, 8)
    qp, kp = causal_positions(1, 3, 70)
    out = launch(path, q, k, v, qp, kp, scale=0.5, window=40, tiles=tiles)
    assert_matches(out, expected(q, k, v, qp, kp, scale=0.5, window=40))


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_nan_and_inf_reach_the_output_as_in_the_reference(path):
    # A NaN / inf in a visible key or in a query makes the reference's row NaN; the split-K merge
    # once returned zeros there (a corrupted cache would have hidden). A NaN key no query sees
    # (outside the window) changes nothing.
    q, k, v = draw(31, 1, 2, 9, 2, 1, 4, 4)
    qp, kp = causal_positions(1, 2, 9)
    for poison in ("key", "query", "inf key", "unseen key"):
        qq, kk = q.copy(), k.copy()
        if poison == "key":
            kk[0, 7, 0, 1] = np.nan
        elif poison == "query":
            qq[0, 1, 1, 0] = np.nan
        elif poison == "inf key":
            kk[0, 8, 0, 2] = np.inf
        else:
            kk[0, 0, 0, 0] = np.nan  # window 4: positions 7, 8 see keys 4..8 only
        got = ka.attend_positions(qq, kk, v, qp, kp, scale=0.5, sliding_window=4, path=path)
        want = expected(qq, kk, v, qp, kp, scale=0.5, window=4)
        assert np.array_equal(np.isnan(got), np.isnan(want)), (poison, got, want)
        finite = ~np.isnan(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
