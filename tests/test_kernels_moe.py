"""refimpl.kernels.moe against refimpl.moe.dispatch and the model blocks, in numba's CUDA simulator.

Inputs are drawn in float32 and the reference runs in float64 on the same values. Bound:
conformance's ``op_moe`` float32 row (rel RMS 1e-6, max abs 5e-6 of max |ref|): the kernel rounds
each product and sum in float32 (u = 6e-8), sums here run over at most 70 terms, so the
expected error is a few u times sqrt(K), 1e-7 .. 4e-7 (measured), while a wrong row, slot,
tile edge or weight moves the output by O(1).

Launch-level cases call :func:`launch_moe` with a NaN-filled ``out`` and with every scratch
array from ``cuda.device_array`` poisoned (NaN, or -7 for int32), so an element that is not
written, or a table read before it is filled, shows. They use tiny tiles (the GEMMs are built
for any tile shape) that the shapes straddle: one tile, several, a partial last tile, rows of
one expert over several row tiles, experts with no tokens, chunks of the expert scan.
The public launchers run with ``moe.TILES`` set to tiny tiles, and one case with the real ones.

Speed: the simulator's block manager polls its threads in a loop that holds the GIL, so each
``syncthreads`` waits out Python's thread switch interval (5 ms); the module shortens it while
these tests run (10x faster).
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

from conformance.compare import compare
from conformance.tolerances import get_tolerance, violations
from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.experts import clamped_swiglu, swiglu_expert
from refimpl.kernels import moe
from refimpl.kernels._numba import SIMULATOR, cuda
from refimpl.mlp import ACTIVATIONS
from refimpl.models import gpt_oss, qwen3_moe, qwen3_next
from refimpl.moe import dispatch

TOL = get_tolerance("op_moe", "float32")
#: 2 threads per GEMM block, one group.
TINY = moe.MoeTiles(rows=2, feats=2, groups=1, k_tile=4, route_threads=4, scan_threads=2, combine_threads=4)
#: 4 threads per GEMM block in 2 groups (each half of a K step; 2 rows each in the epilogue).
GROUPED = moe.MoeTiles(rows=4, feats=2, groups=2, k_tile=4, route_threads=8, scan_threads=4, combine_threads=4)

pytestmark = pytest.mark.skipif(not (SIMULATOR or cuda.is_available()), reason="needs the CUDA simulator or a GPU")


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_threads():
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """``cuda.device_array`` returns NaN-filled (float) or -7-filled (int) arrays."""
    def device_array(shape, dtype):
        return cuda.to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype))

    monkeypatch.setattr(cuda, "device_array", device_array)


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(moe, "TILES", TINY)


def assert_matches(actual, expected):
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    c = compare(actual, expected)
    bad = violations(c, TOL)
    assert not bad, f"{bad}; max abs {c.max_abs:.3g} at {c.max_abs_index}, rel RMS {c.rel_rms:.3g}"


def make_case(seed, n, k, e, m, i, *, crowd_expert_0=False, scale=1.0):
    """float32 ``x (n, m), weights (n, k), indices (n, k), gate_up (e, 2i, m), down (e, m, i)``.

    ``crowd_expert_0``: every token's slot 0 is expert 0 and no token picks expert 1 (one expert
    over several row tiles, one with no rows).
    """
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    if crowd_expert_0:
        others = 2 + np.argsort(rng.random((n, e - 2)), axis=1)[:, :k - 1]
        indices = np.concatenate([np.zeros((n, 1), np.int64), others], axis=1)
    else:
        indices = np.argsort(rng.random((n, e)), axis=1)[:, :k]
    return (
        np.float32(scale) * normal(n, m),
        (0.1 + rng.random((n, k))).astype(np.float32),
        indices,
        normal(e, 2 * i, m) / np.float32(np.sqrt(m)),
        normal(e, m, i) / np.float32(np.sqrt(i)),
    )


def reference(x, weights, indices, gate_up, down, *, activation="silu", weight_on="output", swiglu_limit=None,
              alpha=1.702, gate_up_bias=None, down_bias=None):
    """refimpl.moe.dispatch in float64 over the kernel's expert layout."""
    x, weights, b1, b2 = (None if a is None else np.asarray(a, np.float64) for a in (x, weights, gate_up_bias,
                                                                                     down_bias))
    inter = gate_up.shape[1] // 2

    def expert(e, rows):
        # Only the routed experts, widened one at a time (the GPU case holds 1.6 GB of float32 experts).
        gu, dn = np.asarray(gate_up[e], np.float64), np.asarray(down[e], np.float64)
        if swiglu_limit is None and b1 is None and b2 is None:
            return swiglu_expert(rows, gu, dn, activation)
        h = rows @ gu.T + (0 if b1 is None else b1[e])
        gate, up = h[:, :inter], h[:, inter:]
        if swiglu_limit is None:
            act = ACTIVATIONS[activation](gate) * up
        else:
            act = clamped_swiglu(gate, up, swiglu_limit=swiglu_limit, alpha=alpha)
        return act @ dn.T + (0 if b2 is None else b2[e])

    return dispatch(x, weights, indices, expert, gate_up.shape[0], weight_on=weight_on)


def run_launch(tiles, x, weights, indices, gate_up, down, *, activation="silu", weight_on="output",
               swiglu_limit=None, alpha=1.702, gate_up_bias=None, down_bias=None):
    """launch_moe into a NaN-filled out (NumPy arrays straight into the launch layer)."""
    out = np.full(x.shape, np.nan, np.float32)
    moe.launch_moe(x, weights, indices.astype(np.int32), gate_up, down, out, activation=activation,
                   weight_on=weight_on, swiglu_limit=swiglu_limit, alpha=alpha, gate_up_bias=gate_up_bias,
                   down_bias=down_bias, tiles=tiles)
    assert np.isfinite(out).all(), f"{np.count_nonzero(~np.isfinite(out))} output elements not written"
    return out


# --- launch layer ---------------------------------------------------------------------------------------------

LAUNCH_CASES = {
    # I = FEATS, M = K_TILE = 2 FEATS: exactly one tile of each kind; one pair.
    "one-tile-T1-k1": (TINY, dict(n=1, k=1, e=3, m=4, i=2)),
    # M = 9: K tiles 4+4+1 and output tiles 4+4+1; I = 5: feature tiles 2+2+1, K tiles 4+1; expert 0
    # holds 5 rows (row tiles 2+2+1), expert 1 none; P = 10: route tiles 4+4+2; E = 5: scan chunks 2+2+1.
    "straddle-every-tile": (TINY, dict(n=5, k=2, e=5, m=9, i=5, crowd_expert_0=True)),
    # Two thread groups: expert 0's 6 rows are a full row tile and a half one (group 1 finishes no row).
    "groups-k3": (GROUPED, dict(n=6, k=3, e=6, m=7, i=3, crowd_expert_0=True)),
    "k-equals-E": (TINY, dict(n=3, k=3, e=3, m=5, i=3)),
    "decode-T1-k2-groups": (GROUPED, dict(n=1, k=2, e=4, m=5, i=3)),
}


@pytest.mark.parametrize("weight_on", ["output", "input"])
@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_launch_moe_equals_dispatch(case, weight_on, poisoned_scratch):
    tiles, shape = LAUNCH_CASES[case]
    data = make_case(sum(map(ord, case)), **shape)
    assert_matches(run_launch(tiles, *data, weight_on=weight_on), reference(*data, weight_on=weight_on))


def _random_shapes(count):
    rng = np.random.default_rng(99)
    for _ in range(count):
        e = int(rng.integers(1, 7))
        tiles, name = (TINY, "tiny") if rng.random() < 0.5 else (GROUPED, "grouped")
        shape = dict(n=int(rng.integers(1, 9)), k=int(rng.integers(1, e + 1)), e=e, m=int(rng.integers(1, 10)),
                     i=int(rng.integers(1, 7)))
        weight_on = "input" if rng.random() < 0.5 else "output"
        case_id = "-".join([name, *(f"{k}{v}" for k, v in shape.items()), weight_on])
        yield pytest.param(tiles, shape, weight_on, id=case_id)


@pytest.mark.parametrize("tiles, shape, weight_on", list(_random_shapes(8)))
def test_launch_moe_random_shapes(tiles, shape, weight_on, poisoned_scratch):
    """Sizes 1 .. 9 on both tile sets, E = 1 and M = 1 / I = 1 among them."""
    data = make_case(shape["n"] * 100 + shape["m"], **shape)
    assert_matches(run_launch(tiles, *data, weight_on=weight_on), reference(*data, weight_on=weight_on))


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_other_activations(activation, poisoned_scratch):
    data = make_case(7, n=3, k=2, e=3, m=5, i=3, scale=2.0)
    assert_matches(run_launch(TINY, *data, activation=activation), reference(*data, activation=activation))


@pytest.mark.parametrize("swiglu_limit, weight_on, down_bias", [
    (None, "output", False), (0.7, "output", True), (0.7, "input", True),
], ids=["silu-gate-up-bias-only", "clamped-biases", "clamped-biases-weight-on-input"])
def test_biases_and_clamped_swiglu(swiglu_limit, weight_on, down_bias, poisoned_scratch):
    x, weights, indices, gate_up, down = make_case(11, n=4, k=2, e=4, m=6, i=3, scale=3.0)
    rng = np.random.default_rng(12)
    b1 = rng.standard_normal((4, 6)).astype(np.float32)
    b2 = rng.standard_normal((4, 6)).astype(np.float32) if down_bias else None
    options = dict(weight_on=weight_on, swiglu_limit=swiglu_limit, alpha=1.5, gate_up_bias=b1, down_bias=b2)
    if swiglu_limit is not None:
        # Both clamps engage: some gate pre-activations above L, some up pre-activations outside [-L, L].
        h = np.einsum("nm,nkim->nki", x, gate_up[indices]) + b1[indices]
        assert (h[..., :3] > swiglu_limit).any() and (h[..., :3] < swiglu_limit).any()
        assert (np.abs(h[..., 3:]) > swiglu_limit).any()
    assert_matches(run_launch(TINY, x, weights, indices, gate_up, down, **options),
                   reference(x, weights, indices, gate_up, down, **options))


def test_two_runs_are_bit_identical(poisoned_scratch):
    data = make_case(5, n=7, k=3, e=4, m=5, i=3, crowd_expert_0=True)
    first, second = run_launch(GROUPED, *data), run_launch(GROUPED, *data)
    assert first.tobytes() == second.tobytes()


def test_routing_is_a_stable_counting_sort(poisoned_scratch):
    """sorted_pairs = stable argsort of the flat indices; offsets, work list and its count."""
    rng = np.random.default_rng(3)
    n, k, e, rows, threads = 7, 3, 5, 2, 4
    # Expert 2 gets no pair; route tiles of 4 pairs straddle rows of 3 slots.
    pool = np.array([0, 1, 3, 4], np.int32)
    indices = pool[np.argsort(rng.random((n, 4)), axis=1)[:, :k]]
    p = n * k
    tiles = -(-p // threads)
    rank, sorted_pairs = cuda.device_array(p, np.int32), cuda.device_array(p, np.int32)
    counts, base = cuda.device_array((tiles, e), np.int32), cuda.device_array((tiles, e), np.int32)
    offsets, num_work = cuda.device_array(e + 1, np.int32), cuda.device_array(1, np.int32)
    max_work = p // rows + min(e, p)
    work_expert, work_start = cuda.device_array(max_work, np.int32), cuda.device_array(max_work, np.int32)
    moe.route_count_kernel[tiles, threads, 0, 4 * threads](indices, rank, counts)
    moe.route_scan_kernel[1, 2, 0, 16](counts, base, offsets, work_expert, work_start, num_work, np.int32(rows))
    moe.route_scatter_kernel[tiles, threads](indices, rank, base, sorted_pairs)

    hist = np.bincount(indices.ravel(), minlength=e)
    assert hist[2] == 0
    np.testing.assert_array_equal(sorted_pairs.copy_to_host(), np.argsort(indices.ravel(), kind="stable"))
    np.testing.assert_array_equal(offsets.copy_to_host(), np.concatenate([[0], np.cumsum(hist)]))
    ends = np.cumsum(hist).tolist()
    work = [(x, start) for x in range(e) for start in range(ends[x] - hist[x], ends[x], rows)]
    assert num_work.copy_to_host()[0] == len(work)
    got = list(zip(work_expert.copy_to_host()[:len(work)].tolist(), work_start.copy_to_host()[:len(work)].tolist()))
    assert got == work


# --- public launchers -----------------------------------------------------------------------------------------


def test_moe_experts_with_the_default_tiles(monkeypatch):
    """The module's tile constants (the GPU build): M = 130 straddles K_TILE = 128 and the 64 down features,
    I = 33 FEATS = 32."""
    monkeypatch.setattr(moe, "TILES", moe.GPU_TILES)
    data = make_case(21, n=1, k=2, e=2, m=130, i=33)
    assert_matches(moe.moe_experts(*data), reference(*data))


def test_the_public_launchers_use_small_tiles_in_the_simulator():
    assert moe.SIMULATOR and moe.TILES == moe.SIMULATOR_TILES and moe.GPU_TILES == moe.MoeTiles()
    data = make_case(22, n=5, k=2, e=3, m=9, i=5)
    assert_matches(moe.moe_experts(*data), reference(*data))


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_moe_experts_input_dtypes(dtype, tiny_tiles):
    as_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x, weights, indices, gate_up, down = (a.astype(as_dtype) if a.dtype.kind == "f" else a
                                          for a in make_case(8, n=3, k=2, e=3, m=5, i=3))
    out = moe.moe_experts(x, weights, indices, gate_up, down, weight_on="input")
    assert_matches(out, reference(x, weights, indices, gate_up, down, weight_on="input"))


def test_moe_experts_without_rows_or_slots():
    x, weights, indices, gate_up, down = make_case(9, n=2, k=1, e=2, m=3, i=2)
    assert moe.moe_experts(x[:0], weights[:0], indices[:0], gate_up, down).shape == (0, 3)
    out = moe.moe_experts(x, weights[:, :0], indices[:, :0], gate_up, down)
    assert out.dtype == np.float32 and not out.any()


@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_swiglu_mlp_equals_swiglu_expert(hidden_act, tiny_tiles):
    x, _, _, gate_up, down = make_case(13, n=5, k=1, e=1, m=6, i=3)
    expected = swiglu_expert(x.astype(np.float64), gate_up[0].astype(np.float64), down[0].astype(np.float64),
                             hidden_act)
    assert_matches(moe.swiglu_mlp(x, gate_up[0], down[0], hidden_act), expected)


def _f64(tree):
    return {k: v.astype(np.float64) for k, v in tree.items()}


def test_sparse_moe_equals_qwen3_moe(tiny_tiles):
    config = qwen3_moe.Qwen3MoeConfig.from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16, "hidden_size": 6, "intermediate_size": 8,
        "moe_intermediate_size": 3, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True})
    rng = np.random.default_rng(14)
    w = {"x": rng.standard_normal((2, 1, 6)), "router": rng.standard_normal((6, 6)),
         "gate_up": rng.standard_normal((6, 6, 6)) / 2, "down": rng.standard_normal((6, 6, 3)) / 2}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    asked = []

    def expert_weights(e):
        asked.append(e)
        return w["gate_up"][e], w["down"][e]

    out = moe.sparse_moe(w["x"], w["router"], expert_weights, config)
    r = _f64(w)
    expected = qwen3_moe.sparse_moe(r["x"], r["router"], lambda e: (r["gate_up"][e], r["down"][e]), config)
    assert_matches(out, expected)
    logits = w["x"].reshape(-1, 6).astype(np.float64) @ r["router"].T
    routed = np.unique(np.argsort(-logits, axis=1)[:, :2])
    assert asked == routed.tolist() and len(routed) < 6, "asks each routed expert once, no other"


def test_sparse_moe_equals_qwen3_next_with_its_gated_shared_expert(tiny_tiles):
    config = qwen3_next.Qwen3NextConfig.from_dict({
        "architectures": ["Qwen3NextForCausalLM"], "vocab_size": 16, "hidden_size": 6, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 4, "linear_value_head_dim": 4, "linear_num_key_heads": 1,
        "linear_num_value_heads": 1, "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 3,
        "shared_expert_intermediate_size": 4, "norm_topk_prob": False})
    rng = np.random.default_rng(15)
    block = {"gate.weight": rng.standard_normal((5, 6)), "shared_expert.gate_proj.weight": rng.standard_normal((4, 6)),
             "shared_expert.up_proj.weight": rng.standard_normal((4, 6)) / 2,
             "shared_expert.down_proj.weight": rng.standard_normal((6, 4)) / 2,
             "shared_expert_gate.weight": rng.standard_normal((1, 6))}
    block = {k: v.astype(np.float32) for k, v in block.items()}
    x = rng.standard_normal((1, 4, 6)).astype(np.float32)
    gate_up = (rng.standard_normal((5, 6, 6)) / 2).astype(np.float32)
    down = (rng.standard_normal((5, 6, 3)) / 2).astype(np.float32)
    out = moe.sparse_moe(x, block, lambda e: (gate_up[e], down[e]), config)
    g64, d64 = gate_up.astype(np.float64), down.astype(np.float64)
    expected = qwen3_next.sparse_moe(x.astype(np.float64), _f64(block), lambda e: (g64[e], d64[e]), config)
    assert_matches(out, expected)


def test_moe_block_equals_gpt_oss(tiny_tiles):
    config = {"architectures": ["GptOssForCausalLM"], "vocab_size": 16, "hidden_size": 6, "intermediate_size": 3,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
              "num_local_experts": 5, "num_experts_per_tok": 2, "swiglu_limit": 0.8}
    rng = np.random.default_rng(16)
    # E = 5, M = 6, I = 3; input-major, gate and up interleaved (refimpl.models.gpt_oss).
    weights = {"router.weight": rng.standard_normal((5, 6)), "router.bias": rng.standard_normal(5),
               "experts.gate_up_proj": rng.standard_normal((5, 6, 6)),
               "experts.gate_up_proj_bias": rng.standard_normal((5, 6)),
               "experts.down_proj": rng.standard_normal((5, 3, 6)) / 2,
               "experts.down_proj_bias": rng.standard_normal((5, 6))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    x = rng.standard_normal((2, 2, 6)).astype(np.float32)
    assert_matches(moe.moe_block(x, weights, config), gpt_oss.moe_block(x.astype(np.float64), _f64(weights), config))


# --- the launch types are the declared PTX signatures ---------------------------------------------------------


def _type_name(arg) -> str:
    if isinstance(arg, (np.int32, np.float32)):
        return type(arg).__name__
    assert arg.is_c_contiguous() if hasattr(arg, "is_c_contiguous") else arg.flags.c_contiguous
    return f"{np.dtype(arg.dtype).name}[{', '.join([':'] * (arg.ndim - 1) + ['::1'])}]"


def test_launches_use_the_declared_signatures(monkeypatch, tiny_tiles):
    launched = {}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, config):
            def launch(*args):
                launched[self.name] = f"void({', '.join(_type_name(a) for a in args)})"
                return self.kernel[config](*args)
            return launch

    for name in ("route_count_kernel", "route_scan_kernel", "route_scatter_kernel", "combine_kernel"):
        monkeypatch.setattr(moe, name, Recorder(name, getattr(moe, name)))
    gemms = moe.gemm_kernels
    monkeypatch.setattr(moe, "gemm_kernels", lambda *tiles: tuple(
        Recorder(n, k) for n, k in zip(("gate_up_kernel", "down_kernel"), gemms(*tiles))))
    x, weights, indices, gate_up, down = make_case(17, n=2, k=2, e=3, m=3, i=2)
    moe.moe_experts(x, weights, indices, gate_up, down, swiglu_limit=1.0, gate_up_bias=np.zeros((3, 4), np.float32))
    declared = {name: signatures[0].replace(" ", "") for name, (_, signatures) in moe.KERNELS.items()}
    assert {name: sig.replace(" ", "") for name, sig in launched.items()} == declared


# --- errors of the public launchers ---------------------------------------------------------------------------

_X, _W, _I, _GU, _DN = make_case(18, n=2, k=2, e=3, m=4, i=2)

#: Bad arguments of dispatch itself: the kernel launcher must raise what refimpl.moe.dispatch raises.
DISPATCH_ERRORS = {
    "x-integers": dict(x=_X.astype(np.int64)),
    "x-1d": dict(x=_X[0]),
    "weights-shape": dict(weights=_W[:, :1]),
    "indices-float": dict(indices=_I.astype(np.float32)),
    "index-out-of-range": dict(indices=_I + 3),
    "index-negative": dict(indices=_I - 3),
    "expert-twice-in-a-row": dict(indices=np.zeros_like(_I)),
    "weight-on": dict(weight_on="inputs"),
    "weights-dtype": dict(weights=_W.astype(np.float64)),
}


@pytest.mark.parametrize("case", sorted(DISPATCH_ERRORS))
def test_dispatch_errors_are_the_references(case):
    args = {"x": _X, "weights": _W, "indices": _I, "weight_on": "output", **DISPATCH_ERRORS[case]}
    with pytest.raises(RefimplError) as expected:
        dispatch(args["x"], args["weights"], args["indices"], lambda e, rows: rows, 3, weight_on=args["weight_on"])
    with pytest.raises(type(expected.value)) as got:
        moe.moe_experts(args["x"], args["weights"], args["indices"], _GU, _DN, weight_on=args["weight_on"])
    assert "\n" not in str(got.value) and str(got.value).startswith("moe_experts")


EXPERT_ERRORS = [
    ("gate-up-2d", dict(gate_up_proj=_GU[0]), ShapeError, "3-D expert stack"),
    ("down-shape", dict(down_proj=_DN[:, :, :1]), ShapeError, "do not fit"),
    ("odd-2I", dict(gate_up_proj=_GU[:, :3]), ShapeError, "do not fit"),
    ("I-zero", dict(gate_up_proj=_GU[:, :0], down_proj=_DN[:, :, :0]), ShapeError, "I = 0"),
    ("expert-dtype", dict(gate_up_proj=_GU.astype(np.float64)), RefimplError, "one compute dtype"),
    ("gate-up-integers", dict(gate_up_proj=_GU.astype(np.int32)), InputError, "gate_up_proj"),
    ("bias-shape", dict(gate_up_bias=np.zeros((3, 3), np.float32)), ShapeError, "gate_up_bias"),
    ("down-bias-shape", dict(down_bias=np.zeros((3,), np.float32)), ShapeError, "down_bias"),
    ("activation", dict(hidden_act="relu"), ConfigError, "activation 'relu'"),
    ("clamp-with-gelu", dict(hidden_act="gelu", swiglu_limit=7.0), ConfigError, "hidden_act must be 'silu'"),
    ("limit-negative", dict(swiglu_limit=-1.0), ConfigError, "swiglu_limit"),
    ("limit-nan", dict(swiglu_limit=float("nan")), ConfigError, "swiglu_limit"),
    ("alpha-zero", dict(swiglu_limit=7.0, alpha=0.0), ConfigError, "alpha"),
]


@pytest.mark.parametrize("case, change, error, match", EXPERT_ERRORS, ids=[c[0] for c in EXPERT_ERRORS])
def test_expert_errors(case, change, error, match):
    args = {"gate_up_proj": _GU, "down_proj": _DN, **change}
    with pytest.raises(error, match=match) as got:
        moe.moe_experts(_X, _W, _I, **args)
    assert "\n" not in str(got.value)


def test_swiglu_mlp_and_sparse_moe_errors():
    with pytest.raises(ShapeError, match="swiglu_mlp: x") as got:
        moe.swiglu_mlp(_X[None], _GU[0], _DN[0])
    assert "\n" not in str(got.value)
    with pytest.raises(ShapeError, match="swiglu_mlp: x .* do not fit"):
        moe.swiglu_mlp(_X, _GU[0], _DN[0].T)
    config = qwen3_moe.Qwen3MoeConfig.from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16, "hidden_size": 4, "intermediate_size": 8,
        "moe_intermediate_size": 2, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "num_experts": 3, "num_experts_per_tok": 2})
    ragged = lambda e: (_GU[e], _DN[e]) if e else (_GU[e, :2], _DN[e, :, :1])  # noqa: E731
    # One token, router logits 3, 2, 1: experts 0 (ragged) and 1 are routed.
    router = np.array([[3, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    with pytest.raises(ShapeError, match="sparse_moe: routed experts .* different weight shapes"):
        moe.sparse_moe(np.array([[[1, 0, 0, 0]]], np.float32), router, ragged, config)


# --- real GPU, real sizes -------------------------------------------------------------------------------------

#: Qwen3-30B-A3B: M, I, E, k. Sums over K = 2048 in float32: a NumPy emulation of the kernel's
#: sequential accumulation (products rounded, no FMA) measures 1.3e-6 rel RMS / 1.9e-6 max abs
#: against float64; the bound is 3x that (op_moe's 1e-6 is set for K <= a few hundred).
QWEN3_30B = (2048, 768, 128, 8)
GPU_BOUNDS = (4e-6, 6e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_qwen3_30b_a3b_sizes(tokens):
    m, i, e, k = QWEN3_30B
    data = make_case(tokens, n=tokens, k=k, e=e, m=m, i=i)
    first = moe.moe_experts(*data)
    c = compare(first, reference(*data))
    assert c.nonfinite == 0 and c.rel_rms < GPU_BOUNDS[0] and c.max_abs < GPU_BOUNDS[1] * c.max_abs_expected, c
    assert moe.moe_experts(*data).tobytes() == first.tobytes()
