"""Numba CUDA gated delta rule kernels (refimpl.kernels.delta_rule) against the NumPy reference.

Every kernel result is compared with the reference run in float64 on the same float32-rounded
inputs, with the suite's float32 bound for attention-like ops (``op_attention``: 2e-6 relative
RMS, max abs 2e-5 of max |expected|). Why that bound holds for a float32 kernel: with unit keys
and beta in (0, 1) the recurrence is a contraction, so rounding does not grow along the
sequence (``delta_rule.md``, Numerics); each output is a sum of d_k + C products of O(1)
numbers (a few 2^-24 relative); the chunked form adds ``|gamma| 2^-24`` on the pairwise decays,
under 2e-6 for the log-decays drawn here (|gamma| <= 20 over a chunk of 64). Measured: 1e-7 ..
3e-7 relative RMS, the same as the reference itself run in float32.

The launch layer runs with its default bundles (in the simulator: :data:`SIMULATOR_TILES`,
recurrent blocks of 16 x 2 threads, chunked blocks of 4 x 4 with micro-tiles of chunk_max / 4
tokens, chunk_max picked from 8, 16, 32, 64) and, once per kernel, with :data:`GPU_TILES`
(256 threads). Shapes straddle both: d_v = 36 over 16- and 32-column tiles, d_k = 40 over the
32-thread staging of k_t (two passes) and 2 / 8 row groups; chunked d_v = 18 and d_k = 10 over
4- and 16-wide tiles; chunks of 6 (6, 6, 1) across the second micro-tile row of a chunk_max = 8
bundle; chunk 64 with T = 70 (every micro-tile row and column of the chunk_max = 64 bundle and
its four strided gamma passes, then a 6-token chunk) and T = 21 (the chunk_max = 32 bundle); T = 1.
Outputs are NaN-poisoned before the launch and must come back finite.

The tests run in numba's CUDA simulator (tests/conftest.py); ``gpu``-marked tests need a real GPU.
"""

import sys

import ml_dtypes
import numpy as np
import pytest

from conformance.compare import compare
from conformance.tolerances import get_tolerance, violations
from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.kernels import delta_rule as kernels
from refimpl.kernels._numba import SIMULATOR, cuda
from refimpl.linear_attention import delta_rule as reference

FLOAT32 = get_tolerance("op_attention", "float32")
#: The launch layer's default bundles, and the GPU's run once in the simulator.
TILE_BUNDLES = pytest.mark.parametrize("tiles", [None, kernels.GPU_TILES], ids=["default tiles", "GPU tiles"])


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_threads():
    """The simulator busy-waits at barriers under the GIL: a short switch interval runs its few
    threads per block several times faster (as the numba conformance backend does)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)


def assert_close(actual, expected, what):
    found = violations(compare(actual, expected), FLOAT32)
    assert not found, f"{what}: {'; '.join(found)}"


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def draw(seed, b, t, hk, hv, dk, dv, zero_state_rows=()):
    """float32 inputs as the layer feeds them: q, k unit vectors, g = -0.2 softplus(N(0, 1)) <= 0,
    beta in (0.05, 0.95), an initial state of scale 0.5 (rows in ``zero_state_rows`` all zero)."""
    rng = np.random.default_rng(seed)
    state = 0.5 * rng.standard_normal((b, hv, dk, dv))
    state[list(zero_state_rows)] = 0.0
    arrays = {"q": unit(rng, b, t, hk, dk), "k": unit(rng, b, t, hk, dk), "v": rng.standard_normal((b, t, hv, dv)),
              "g": -0.2 * np.logaddexp(0.0, rng.standard_normal((b, t, hv))),
              "beta": rng.uniform(0.05, 0.95, (b, t, hv)), "initial_state": state}
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def in_float64(x):
    return {name: a.astype(np.float64) for name, a in x.items()}


def launch_args(x):
    """The launch layer's arguments: the inputs, a state buffer (a copy: it is overwritten) and a NaN output."""
    args = {name: x[name].copy() for name in ("q", "k", "v", "g", "beta")}
    return args, x["initial_state"].copy(), np.full(x["v"].shape, np.nan, np.float32)


# -- recurrent kernel


@TILE_BUNDLES
def test_launch_recurrent_decode_step_updates_the_state_in_place(tiles):
    # T = 1 from a state, d_v = 36 over 16- / 32-column tiles (the last partial), d_k = 40 over
    # the row groups and the staging passes; batch row 0 starts a sequence (zero state) beside
    # row 1, which continues
    x = draw(1, b=2, t=1, hk=1, hv=1, dk=40, dv=36, zero_state_rows=[0])
    args, state, out = launch_args(x)
    kernels.launch_recurrent(**args, state=state, out=out, scale=np.float32(40 ** -0.5), tiles=tiles)
    o_ref, s_ref = reference.gated_delta_rule_recurrent(**in_float64(x))
    assert np.isfinite(out).all() and np.isfinite(state).all()
    assert_close(out, o_ref, "o")
    assert_close(state, s_ref, "state (the buffer passed in)")


@pytest.fixture(scope="module")
def grouped_heads():
    """Hk = 2 key heads for Hv = 4 value heads (h reads h // 2, not h % 2), d_k != d_v, T = 3, a
    scale that is not d_k ** -0.5, float64 arrays holding float32 values: both public launchers
    (chunks of 2: 2, 1) and the reference on the same inputs."""
    x = in_float64(draw(2, b=1, t=3, hk=2, hv=4, dk=6, dv=5))
    before = x["initial_state"].copy()
    results = {"recurrent": kernels.gated_delta_rule_recurrent(**x, scale=0.7),
               "chunked": kernels.gated_delta_rule_chunked(**x, chunk_size=2, scale=0.7),
               "reference": reference.gated_delta_rule_recurrent(**x, scale=0.7)}
    return results, x["initial_state"], before


def test_recurrent_kernel_with_grouped_heads(grouped_heads):
    results, initial_state, before = grouped_heads
    (o, s), (o_ref, s_ref) = results["recurrent"], results["reference"]
    assert o.dtype == s.dtype == np.float64 and o.shape == (1, 3, 4, 5) and s.shape == (1, 4, 6, 5)
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")
    np.testing.assert_array_equal(initial_state, before)


# -- chunked kernel


@TILE_BUNDLES
def test_launch_chunked_partial_last_chunk_and_partial_tiles(tiles):
    # T = 13 in chunks of 6 (6, 6, 1), d_k = 10 over 4- / 16-channel key tiles, d_v = 18 over
    # 4- / 16-column tiles: partial last tiles everywhere
    x = draw(3, b=1, t=13, hk=1, hv=1, dk=10, dv=18)
    args, state, out = launch_args(x)
    kernels.launch_chunked(**args, state=state, out=out, chunk_size=6, scale=np.float32(10 ** -0.5), tiles=tiles)
    o_ref, s_ref = reference.gated_delta_rule_chunked(**in_float64(x), chunk_size=6)
    assert np.isfinite(out).all() and np.isfinite(state).all()
    assert_close(out, o_ref, "o")
    assert_close(state, s_ref, "state (the buffer passed in)")


@pytest.mark.parametrize("length", [70, 21])
def test_chunked_kernel_at_the_default_chunk_size(length):
    # 70: a full chunk of 64 (every row and column of the register micro-tiles), then 6 tokens;
    # 21: one chunk, in the launch layer's chunk_max = 32 bundle under the simulator
    x = draw(4 + length, b=1, t=length, hk=1, hv=1, dk=8, dv=8)
    before = x["initial_state"].copy()
    o, s = kernels.gated_delta_rule_chunked(**x)
    o_ref, s_ref = reference.gated_delta_rule_chunked(**in_float64(x))
    assert o.dtype == s.dtype == np.float32
    np.testing.assert_array_equal(x["initial_state"], before)
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")


def test_chunked_kernel_single_token_with_a_fresh_and_a_continuing_row():
    x = draw(5, b=2, t=1, hk=1, hv=2, dk=6, dv=7, zero_state_rows=[1])
    o, s = kernels.gated_delta_rule_chunked(**x)
    o_ref, s_ref = reference.gated_delta_rule_chunked(**in_float64(x))
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")
    # the row that starts here equals a call without a state
    del x["initial_state"]
    o_fresh, _ = reference.gated_delta_rule_chunked(**{k: v[1:] for k, v in in_float64(x).items()})
    assert_close(o[1:], o_fresh, "o of the fresh row")


def test_chunked_kernel_with_grouped_heads(grouped_heads):
    results, initial_state, before = grouped_heads
    (o, s), (o_ref, s_ref) = results["chunked"], results["reference"]
    assert o.dtype == s.dtype == np.float64
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")
    np.testing.assert_array_equal(initial_state, before)


def test_recurrent_and_chunked_kernels_agree(grouped_heads):
    results, _, _ = grouped_heads
    assert_close(results["chunked"][0], results["recurrent"][0], "o, chunked vs recurrent kernel")
    assert_close(results["chunked"][1], results["recurrent"][1], "state, chunked vs recurrent kernel")


@pytest.mark.parametrize("function, storage", [("gated_delta_rule_recurrent", np.float16),
                                               ("gated_delta_rule_chunked", ml_dtypes.bfloat16)])
def test_low_precision_storage_as_the_reference(function, storage):
    # q, k, v, beta in the storage dtype, g and the state float32 (the layer's form): o comes back
    # rounded to the storage dtype, the final state float32, as the reference returns them
    x = draw(8, b=1, t=3, hk=1, hv=1, dk=4, dv=3)
    for name in ("q", "k", "v", "beta"):
        x[name] = x[name].astype(storage)
    before = x["initial_state"].copy()
    o, s = getattr(kernels, function)(**x)
    np.testing.assert_array_equal(x["initial_state"], before)
    o_ref, s_ref = getattr(reference, function)(**{name: a.astype(np.float64) for name, a in x.items()})
    assert o.dtype == np.dtype(storage) and s.dtype == np.float32
    found = violations(compare(o, o_ref), get_tolerance("op_attention", np.dtype(storage).name))
    assert not found, f"o: {'; '.join(found)}"
    assert_close(s, s_ref, "final state")


def test_tile_bundles():
    # the GPU bundle is the module's constants: 256-thread blocks, static shared memory < 48 KiB
    gpu = kernels.GPU_TILES
    assert (gpu.rec_tv, gpu.rec_row_groups, gpu.tv, gpu.dk_max, gpu.chunk_max) == (
        kernels.REC_TV, kernels.REC_ROW_GROUPS, kernels.TV, kernels.DK_MAX, kernels.CHUNK_MAX)
    assert gpu.rec_tv * gpu.rec_row_groups == gpu.tv ** 2 == 256
    floats = (gpu.dk_max * gpu.tv + gpu.chunk_max * (gpu.chunk_max + 1) + gpu.chunk_max * gpu.tv
              + 2 * gpu.chunk_max * (gpu.tv + 1) + 2 * gpu.chunk_max)
    assert 4 * floats <= 48 * 1024
    # every chunk length picks a bundle that holds it, within the public limits
    for chunk in range(1, kernels.CHUNK_MAX + 1):
        tiles = kernels.pick_tiles(chunk)
        assert chunk <= tiles.chunk_max and tiles.dk_max == kernels.DK_MAX
    assert kernels.pick_tiles(kernels.CHUNK_MAX + 1) == kernels.TILES[-1]
    assert kernels.TILES[-1].chunk_max == kernels.CHUNK_MAX
    with pytest.raises(ConfigError, match="tv must divide chunk_max"):
        kernels.DeltaTiles(tv=6)
    with pytest.raises(ConfigError):
        kernels.DeltaTiles(rec_row_groups=0)


# -- errors: the reference's checks, then the kernels' own limits


def _args(b=1, t=2, hk=1, hv=1, dk=4, dv=3, dtype=np.float32):
    return {name: a.astype(dtype) for name, a in draw(6, b, t, hk, hv, dk, dv).items()}


def _bad(case):
    x = _args()
    if case == "q and k of different shapes":
        x["q"] = x["q"][:, :, :, :3]
    elif case == "Hv not a multiple of Hk":
        x = _args(hk=2, hv=3)
    elif case == "mixed dtypes":
        x["v"] = x["v"].astype(np.float64)
    elif case == "NaN in v":
        x["v"][0, 1, 0, 2] = np.nan
    elif case == "state of the wrong shape":
        x["initial_state"] = x["initial_state"][:, :, :3]
    elif case == "integer inputs":
        x["q"] = x["q"].astype(np.int32)
    elif case == "g in float16 beside float32":
        x["g"] = x["g"].astype(np.float16)
    elif case == "g of the wrong shape":
        x["g"] = x["g"][:, :1]
    return x


@pytest.mark.parametrize("function", ["gated_delta_rule_recurrent", "gated_delta_rule_chunked"])
@pytest.mark.parametrize("case", ["q and k of different shapes", "Hv not a multiple of Hk", "mixed dtypes",
                                  "NaN in v", "state of the wrong shape", "integer inputs",
                                  "g in float16 beside float32", "g of the wrong shape"])
def test_errors_are_the_references(function, case):
    x = _bad(case)
    with pytest.raises(RefimplError) as ours:
        getattr(kernels, function)(**x)
    with pytest.raises(RefimplError) as theirs:
        getattr(reference, function)(**x)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert "\n" not in str(ours.value)


@pytest.mark.parametrize("function", ["gated_delta_rule_recurrent", "gated_delta_rule_chunked"])
@pytest.mark.parametrize("case, error", [("d_k above DK_MAX", ShapeError), ("scale 0 in float32", InputError),
                                         ("float64 values beyond float32", InputError)])
def test_kernel_limits_raise_one_line_errors(function, case, error):
    if case == "d_k above DK_MAX":
        x, options = _args(dk=kernels.DK_MAX + 1), {}
    elif case == "scale 0 in float32":
        x, options = _args(dtype=np.float64), {"scale": 1e-50}
    else:
        x, options = _args(dtype=np.float64), {}
        x["v"][0, 0, 0, 0] = 1e39
    with pytest.raises(error) as caught:
        getattr(kernels, function)(**x, **options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("chunk_size, message", [(0, "integer >= 1"), (True, "integer >= 1"), (2.0, "integer >= 1"),
                                                 (kernels.CHUNK_MAX + 1, "CHUNK_MAX")])
def test_chunk_size_errors(chunk_size, message):
    with pytest.raises(InputError, match=message) as caught:
        kernels.gated_delta_rule_chunked(**_args(), chunk_size=chunk_size)
    assert "\n" not in str(caught.value)


# -- real GPU only: Qwen3-Next sizes


def _real_gpu() -> bool:
    return not SIMULATOR and cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="needs a real CUDA GPU")
def test_qwen3_next_sizes_prefill_then_decode_on_gpu():
    # Hk = 16, Hv = 32, d_k = d_v = 128, chunk 64, T = 300 (a partial last chunk), then one decode
    # step through the launch layer on device arrays: the device state buffer is the state
    x = draw(7, b=2, t=301, hk=16, hv=32, dk=128, dv=128, zero_state_rows=[0])
    prompt = {name: a[:, :300] if name != "initial_state" else a for name, a in x.items()}
    step = {name: np.ascontiguousarray(a[:, 300:]) for name, a in x.items() if name != "initial_state"}
    o, s = kernels.gated_delta_rule_chunked(**prompt)
    o_ref, s_ref = reference.gated_delta_rule_chunked(**in_float64(prompt))
    assert_close(o, o_ref, "prefill o")
    assert_close(s, s_ref, "prefill state")
    state = cuda.to_device(s)
    out = cuda.to_device(np.full(step["v"].shape, np.nan, np.float32))
    kernels.launch_recurrent(**{name: cuda.to_device(a) for name, a in step.items()}, state=state, out=out,
                             scale=128 ** -0.5)
    o_step_ref, s_step_ref = reference.gated_delta_rule_recurrent(**in_float64(step), initial_state=s_ref)
    assert_close(out.copy_to_host(), o_step_ref, "decode o")
    assert_close(state.copy_to_host(), s_step_ref, "decode state (the device buffer passed in)")
