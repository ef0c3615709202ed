"""refimpl.kernels.mla against refimpl.mla's absorbed and literal forms, in numba's CUDA simulator.

A step is built with :func:`refimpl.mla.mla_project` from random weights (drawn as in
``tests/test_mla.py``) in float64; the kernel's host side rounds the absorbed query and the
latent cache to float32, so the comparison is with the float64 reference at conformance's
``op_mla`` float32 bound (rel RMS 1e-6, max abs 5e-6 of max |ref|): the float32 attention
(Dc + Dr <= 24 term scores, S <= 21 slots) errs by a few u = 6e-8, while a slot seen or
missed, a wrong head or a dropped partition moves the output by O(1 / S).

Launch-level cases call :func:`launch_mla_decode` with a NaN-filled ``out`` and poisoned scratch.
The simulator uses :data:`SIMULATOR_MLA_TILES` (8 heads x 8 slots, 2 x 2 threads); the shapes
straddle them: T H = 12 rows over 8-row tiles, 21 slots over 8-slot tiles, Dc + Dr = 24 dims
over 8-dim chunks, partitions of one and two key tiles, a partition with no visible slot.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conformance.compare import compare
from conformance.tolerances import get_tolerance, violations
from refimpl.attention import grouped_query_attention
from refimpl.errors import InputError, RefimplError, ShapeError
from refimpl.kernels import mla as km
from refimpl.kernels._numba import SIMULATOR, cuda
from refimpl.masks import causal_mask
from refimpl.mla import mla_attend_absorbed, mla_attend_literal, mla_dims, mla_project, mla_weight_shapes

TOL = get_tolerance("op_mla", "float32")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}

pytestmark = pytest.mark.skipif(not (SIMULATOR or cuda.is_available()), reason="needs the CUDA simulator or a GPU")


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_threads():
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def poisoned_scratch(monkeypatch):
    def device_array(shape, dtype):
        return cuda.to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype))

    monkeypatch.setattr(cuda, "device_array", device_array)


def assert_matches(actual, expected):
    assert actual.shape == expected.shape
    c = compare(actual, expected)
    bad = violations(c, TOL)
    assert not bad, f"{bad}; max abs {c.max_abs:.3g} at {c.max_abs_index}, rel RMS {c.rel_rms:.3g}"


def params_of(h, dq, dc, dn, dr, dv):
    return dict(num_attention_heads=h, q_lora_rank=dq, kv_lora_rank=dc, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                v_head_dim=dv, rope_parameters=YARN, rope_interleave=True, rms_norm_eps=1e-6,
                max_position_embeddings=64, attention_bias=False)


def random_weights(rng, m, params):
    dims = mla_dims(**{k: params[k] for k in ("num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")})
    weights = {}
    for name, shape in mla_weight_shapes(m, dims, params["attention_bias"]).items():
        w = 1 + 0.2 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w
    return weights


def case(seed, *, b=2, t=3, s=21, h=4, dq=24, dc=16, dn=8, dr=8, dv=12, m=32, dtype=np.float64):
    """A step of the last t tokens over s cached slots: (step, c_kv, k_rope) in ``dtype``, from
    weights and hidden states drawn in float32 (so float64 and float32 runs start from the same values)."""
    rng = np.random.default_rng(seed)
    params = params_of(h, dq, dc, dn, dr, dv)
    weights = {k: w.astype(np.float32).astype(dtype) for k, w in random_weights(rng, m, params).items()}
    x = rng.standard_normal((b, s, m)).astype(np.float32).astype(dtype)
    positions = np.broadcast_to(np.arange(s), (b, s))
    cache = mla_project(x, positions, weights, **params)
    step = mla_project(x[:, s - t:], positions[:, s - t:], weights, **params)
    return step, cache.c_kv, cache.k_rope


@pytest.mark.parametrize("t", [1, 3])
def test_matches_the_absorbed_and_literal_forms(t):
    # Causal over 21 slots (the last t are the step's own); row 1 also has 9 masked (padding) slots.
    step, c_kv, k_rope = case(0, t=t)
    mask = np.broadcast_to(causal_mask(t, 21, 21 - t), (2, t, 21)).copy()
    mask[1, :, :9] = False
    got = km.mla_attend_absorbed(step, c_kv, k_rope, mask)
    assert got.dtype == np.float64
    assert_matches(got, mla_attend_absorbed(step, c_kv, k_rope, mask))
    assert_matches(got, mla_attend_literal(step, c_kv, k_rope, mask))


def test_launch_partitions_rows_and_fully_masked_rows(poisoned_scratch):
    # Launch level: 12 rows over 8-row tiles, 21 slots in partitions of two 8-slot tiles (the
    # last short). Token 0 sees slots 16..20 only, so partition 0 (slots 0..15) has no visible
    # slot for it; token 2 of batch row 1 sees nothing (zeros).
    step, c_kv, k_rope = case(1, t=3, h=4, dc=16, dr=8)
    w_uk = step.weights["kv_b_proj.weight"].reshape(4, 8 + 12, 16)[:, :8]
    q = np.concatenate([np.einsum("bthn,hnc->bthc", step.q_nope, w_uk), step.q_rope], axis=-1).astype(np.float32)
    mask = np.ones((2, 3, 21), bool)
    mask[:, 0, :16] = False
    mask[1, 2] = False
    c32, r32 = c_kv.astype(np.float32), k_rope.astype(np.float32)
    for per_partition in (1, 2):
        out = np.full((2, 3, 4, 16), np.nan, np.float32)
        km.launch_mla_decode(q, c32, r32, mask.astype(np.uint8), out, scale=step.scale,
                             tiles_per_partition=per_partition)
        k = np.concatenate([c32, r32], axis=-1)[:, :, None].astype(np.float64)
        want = grouped_query_attention(q.astype(np.float64), k, c32[:, :, None].astype(np.float64), mask, step.scale)
        assert_matches(out, want)
        assert np.array_equal(out[1, 2], np.zeros((4, 16), np.float32))


def test_float32_step_one_head_and_odd_widths():
    # H 1, Dc 5 (< one chunk), Dr 2, T 2 over 9 slots; a float32 step stays float32.
    widths = dict(b=1, t=2, s=9, h=1, dq=8, dc=5, dn=3, dr=2, dv=7, m=24)
    mask = causal_mask(2, 9, 7)
    want = mla_attend_absorbed(*case(2, **widths), mask)
    got = km.mla_attend_absorbed(*case(2, **widths, dtype=np.float32), mask)
    assert got.dtype == np.float32
    assert_matches(got, want)


def one_line_error(kind, fn, *args):
    with pytest.raises(kind) as info:
        fn(*args)
    assert isinstance(info.value, RefimplError) and "\n" not in str(info.value), str(info.value)


def test_errors():
    step, c_kv, k_rope = case(3, b=1, t=1, s=4, h=2, m=16)
    mask = np.ones((1, 4), bool)
    one_line_error(ShapeError, km.mla_attend_absorbed, step, c_kv[..., :-1], k_rope, mask)
    one_line_error(ShapeError, km.mla_attend_absorbed, step, c_kv, k_rope[:, :3], mask)
    one_line_error(ShapeError, km.mla_attend_absorbed, step, c_kv, k_rope, mask[:, :3])
    one_line_error(ShapeError, km.mla_attend_absorbed, step, c_kv, k_rope, mask.astype(np.uint8))
    one_line_error(InputError, km.mla_attend_absorbed, step, c_kv.astype(np.int64), k_rope, mask)
    one_line_error(RefimplError, km.mla_attend_absorbed, step, c_kv.astype(np.float32), k_rope, mask)


@pytest.mark.gpu
def test_gpu_deepseek_v3_sizes():
    # H 128, Dc 512, Dr 64, Dn 128, Dv 128: one decode token over 3000 slots, and 2 tokens of an extend.
    for t in (1, 2):
        step, c_kv, k_rope = case(4, b=2, t=t, s=3000, h=128, dq=96, dc=512, dn=128, dr=64, dv=128, m=64)
        mask = causal_mask(t, 3000, 3000 - t)
        assert_matches(km.mla_attend_absorbed(step, c_kv, k_rope, mask), mla_attend_absorbed(step, c_kv, k_rope, mask))


def test_the_gpu_tile_bundle_in_the_simulator(poisoned_scratch):
    # MLA_TILES (256 threads, 32 heads x 128 slots) once, on 2 tokens x 4 heads over 130 slots
    # (a partial slot tile) with Dc = 16, Dr = 8.
    step, c_kv, k_rope = case(2, b=1, t=2, s=130, h=4, dc=16, dr=8)
    w_uk = step.weights["kv_b_proj.weight"].reshape(4, 8 + 12, 16)[:, :8]
    q = np.concatenate([np.einsum("bthn,hnc->bthc", step.q_nope, w_uk), step.q_rope], axis=-1).astype(np.float32)
    mask = np.tril(np.ones((2, 130), bool), k=128)[None]
    c32, r32 = c_kv.astype(np.float32), k_rope.astype(np.float32)
    out = np.full((1, 2, 4, 16), np.nan, np.float32)
    km.launch_mla_decode(q, c32, r32, mask.astype(np.uint8), out, scale=step.scale, tiles=km.MLA_TILES)
    k = np.concatenate([c32, r32], axis=-1)[:, :, None].astype(np.float64)
    assert_matches(out, grouped_query_attention(q.astype(np.float64), k, c32[:, :, None].astype(np.float64), mask,
                                                step.scale))
