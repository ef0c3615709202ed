"""The reference in float16 and bfloat16: storage dtype d, float32 compute per component.

The definition is in ``refimpl/numerics.py`` and ``docs/low-precision.md``. These tests
check that models and ops run in d and return d, that each component rounds its output
once (equal to its float32 computation rounded to d), that the elementwise operations
the model code runs on d arrays round once, that the incremental API rounds where the
forward does, and that the reference's own error against the float64 golden output is
non-zero and inside the suite's bounds. float64 and float32 unchanged bit for bit is
``python tools/make_goldens.py --check``.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import refimpl
from conformance.manifest import load_manifest, load_op_data
from conformance.runner import cast_input
from conformance.tolerances import TOLERANCES
from refimpl.attention import attention, grouped_query_attention
from refimpl.errors import InputError, RefimplError
from refimpl.linear import linear
from refimpl.linear_attention.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from refimpl.linear_attention.gated_deltanet import GatedDeltaNetCache
from refimpl.mlp import gelu, gelu_tanh, silu
from refimpl.moe import dispatch
from refimpl.numerics import to_compute, to_storage
from refimpl.ops import OPS
from refimpl.rmsnorm import gated_rms_norm, rms_norm, rms_norm_low_precision
from refimpl.rope import apply_rope_interleaved, apply_rope_rotate_half, rope_cos_sin
from refimpl.routers import sigmoid_group_top_k, softmax_top_k
from refimpl.softcap import soft_cap

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOW = (BF16, F16)
RNG = np.random.default_rng(8)

#: One case per family: dense, sliding window, sinks + sliding + MoE (gpt-oss), MoE, MLA,
#: Gated DeltaNet (three chunks), Gemma 3 (1 + w norms, sqrt(M) embedding, local/global).
MODEL_CASES = (
    "qwen3/untied-gqa-odd-len", "mistral/sliding-w4-len11", "gpt_oss/released-style-config",
    "qwen3_moe/renorm-top2-of-6", "deepseek_v3/mla-widths-distinct", "qwen3_next/long-150-three-chunks",
    "gemma3/default-pattern-6-layers",
)


def _case(case_id: str) -> dict:
    manifest = json.loads((GOLDEN / "MANIFEST.json").read_text())
    return next(c for c in manifest["cases"] if c["id"] == case_id)


def _low(shape, dtype, scale=1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(dtype)


def _rel_rms(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


# Models

@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case_id", MODEL_CASES)
def test_model_runs_in_the_dtype_with_an_error_inside_the_suite_bounds(case_id, dtype):
    case = _case(case_id)
    model = refimpl.from_pretrained(GOLDEN / case["checkpoint"], dtype=dtype.name)
    io = load_file(GOLDEN / case["data"])
    out = model.forward(io["input_ids"], return_hidden_states=True)
    assert model.dtype == dtype and out.logits.dtype == dtype
    assert {tap.dtype for tap in out.hidden_states.values()} == {dtype}
    expected = io["logits"]
    rel = _rel_rms(out.logits, expected)
    max_abs_rel = np.abs(out.logits.astype(np.float64) - expected).max() / np.abs(expected).max()
    bound = TOLERANCES[("model_logits", dtype.name)]
    # Non-zero (the dtype is really used), and a few units of its epsilon: far below the bound
    # of a float32 error, inside the suite's bound for the dtype.
    assert 1e-2 * float(ml_dtypes.finfo(dtype).eps) < rel <= bound.rel_rms, rel
    assert max_abs_rel <= bound.max_abs_rel, max_abs_rel


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case_id", ["qwen3/untied-gqa-odd-len", "gpt_oss/released-style-config",
                                     "deepseek_v3/mla-widths-distinct", "qwen3_next/interval-2-gqa"])
def test_prefill_decode_round_where_forward_does(case_id, dtype):
    """The incremental API's logits equal the forward's to a few units in the last place of the
    row's largest logit: the same components, a 1-row matrix product summing in another order
    (and MLA's absorbed form in a cached decode, with its own rounding points)."""
    case = _case(case_id)
    model = refimpl.from_pretrained(GOLDEN / case["checkpoint"], dtype=dtype)
    ids = load_file(GOLDEN / case["data"])["input_ids"]
    whole = model.forward(ids).logits
    half = ids.shape[1] // 2
    first, cache = model.prefill(ids[:, :half])
    one, cache = model.decode(ids[:, half:half + 1], cache)
    rest, cache = model.decode(ids[:, half + 1:], cache)
    pieces = np.concatenate([first, one, rest], axis=1)
    assert pieces.dtype == dtype
    mantissa = ml_dtypes.finfo(dtype).nmant
    row_ulp = 2.0 ** (np.floor(np.log2(np.abs(whole.astype(np.float64)).max(-1, keepdims=True))) - mantissa)
    assert (np.abs(pieces.astype(np.float64) - whole.astype(np.float64)) / row_ulp).max() <= 6


def test_caches_hold_the_storage_dtype_and_the_recurrent_state_float32():
    case = _case("qwen3_next/interval-2-gqa")
    model = refimpl.from_pretrained(GOLDEN / case["checkpoint"], dtype="bfloat16")
    ids = load_file(GOLDEN / case["data"])["input_ids"]
    _, cache = model.prefill(ids[:, :3])
    _, cache = model.decode(ids[:, 3:5], cache)
    kinds = set()
    for layer in cache.layers:
        if isinstance(layer, GatedDeltaNetCache):
            assert layer.recurrent_state.dtype == np.float32 and layer.conv_state.dtype == BF16
            kinds.add("gdn")
        else:
            assert layer.keys.dtype == BF16 and layer.values.dtype == BF16
            kinds.add("kv")
    assert kinds == {"gdn", "kv"}
    rolled = model.rollback(cache, 1)
    logits, _ = model.decode(ids[:, 4:5], rolled)
    assert logits.dtype == BF16


def test_router_tensors_engines_keep_in_float32_stay_float32():
    case = _case("deepseek_v3/mla-widths-distinct")
    model = refimpl.from_pretrained(GOLDEN / case["checkpoint"], dtype="bfloat16")
    router = {n: w.dtype for n, w in model.weights.items() if ".mlp.gate." in n}
    assert router and set(router.values()) == {np.dtype(np.float32)}
    assert model.weights["model.embed_tokens.weight"].dtype == BF16
    lazy = refimpl.from_pretrained(GOLDEN / case["checkpoint"], dtype="bfloat16", lazy=True)
    np.testing.assert_array_equal(lazy.forward(np.array([[1, 2, 3]])).logits,
                                  model.forward(np.array([[1, 2, 3]])).logits)


# Components: float32 inside, one rounding at the output

def _rounded_once(function, *arrays, **kwargs):
    """``function`` on the arrays widened to float32, its output rounded to their dtype."""
    return to_storage(function(*(to_compute(a) for a in arrays), **kwargs), arrays[0].dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name, call, shapes", [
    ("rms_norm", lambda x, w: rms_norm(x, w, 1e-6), [(3, 5, 33), (33,)]),
    ("rms_norm 1+w", lambda x, w: rms_norm(x, w, 1e-6, weight_offset=1.0), [(3, 5, 33), (33,)]),
    ("linear", linear, [(2, 7, 33), (19, 33), (19,)]),
    ("silu", silu, [(4, 63)]),
    ("gelu_tanh", gelu_tanh, [(4, 63)]),
    ("soft_cap", lambda x: soft_cap(x, 5.0), [(4, 63)]),
    ("gated_rms_norm", lambda x, w, z: gated_rms_norm(x, w, z, 1e-6), [(2, 5, 3, 16), (16,), (2, 5, 3, 16)]),
    ("attention", lambda q, k, v: attention(q, k, v, scaling=0.25, sliding_window=3), [(2, 5, 4, 16), (2, 7, 2, 16),
                                                                                       (2, 7, 2, 8)]),
])
def test_a_component_equals_its_float32_computation_rounded_once(name, call, shapes, dtype):
    arrays = [_low(s, dtype) for s in shapes]
    out = call(*arrays)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.view(np.uint16), _rounded_once(call, *arrays).view(np.uint16))


def test_rms_norm_in_bfloat16_is_the_multiply_then_cast_order():
    x, w = _low((6, 64), BF16, 3.0), _low((64,), BF16)
    out = rms_norm(x, w, 1e-6)
    np.testing.assert_array_equal(out, rms_norm_low_precision(x, w, 1e-6, cast_order="multiply_then_cast"))
    assert not np.array_equal(out, rms_norm_low_precision(x, w, 1e-6, cast_order="cast_then_multiply"))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("rotate", [apply_rope_rotate_half, apply_rope_interleaved])
def test_rope_rounds_its_rotation_once_with_tables_in_the_storage_dtype(rotate, dtype):
    cos, sin = rope_cos_sin(np.arange(5), 1.0 / 10000 ** (np.arange(0, 12, 2) / 12), dtype)
    assert cos.dtype == dtype
    np.testing.assert_array_equal(cos, to_storage(np.cos(np.arange(5)[:, None] / 10000 ** (np.arange(0, 12, 2) / 12)),
                                                  dtype))
    x = _low((2, 5, 3, 16), dtype)
    out = rotate(x, cos, sin)
    np.testing.assert_array_equal(out, to_storage(rotate(to_compute(x), to_compute(cos), to_compute(sin)), dtype))


def test_gelu_in_low_precision_is_the_float64_erf_rounded_once():
    z = _low((4, 63), BF16, 3.0)
    np.testing.assert_array_equal(gelu(z), to_storage(gelu(z.astype(np.float64)), BF16))


def test_routers_choose_from_float32_scores_and_round_the_weights():
    logits = _low((9, 8), BF16, 2.0)
    weights, chosen = softmax_top_k(logits, 2, norm_topk_prob=True)
    wide_weights, wide_chosen = softmax_top_k(to_compute(logits), 2, norm_topk_prob=True)
    assert weights.dtype == BF16 and chosen.dtype == np.int64
    np.testing.assert_array_equal(chosen, wide_chosen)
    np.testing.assert_array_equal(weights, to_storage(wide_weights, BF16))
    bias = _low((8,), BF16, 0.1)
    grouped, _ = sigmoid_group_top_k(logits, bias, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    assert grouped.dtype == BF16


def test_moe_combine_sums_the_experts_in_float32_and_rounds_once():
    x = _low((7, 16), BF16)
    weights = RNG.uniform(0.1, 1.0, (7, 2)).astype(np.float32)
    indices = np.array([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0], [0, 2]])
    mats = [_low((16, 16), BF16, 0.3) for _ in range(3)]

    def expert(e, rows):
        return linear(rows, mats[e])

    out = dispatch(x, weights, indices, expert, 3)
    wide = sum(weights[:, j:j + 1] * np.stack([to_compute(expert(e, x[n:n + 1]))[0] for n, e in
                                               enumerate(indices[:, j])]) for j in range(2))
    assert out.dtype == BF16
    np.testing.assert_array_equal(out, to_storage(wide, BF16))
    with pytest.raises(RefimplError, match="share one compute dtype"):
        dispatch(x, weights.astype(np.float64), indices, expert, 3)


@pytest.mark.parametrize("rule", [gated_delta_rule_recurrent, gated_delta_rule_chunked])
def test_delta_rule_returns_o_in_the_storage_dtype_and_a_float32_state(rule):
    q, k = _low((2, 9, 2, 8), BF16, 0.3), _low((2, 9, 2, 8), BF16, 0.3)
    v, beta = _low((2, 9, 4, 6), BF16), RNG.uniform(0.1, 0.9, (2, 9, 4)).astype(BF16)
    g = -RNG.uniform(0.01, 0.5, (2, 9, 4)).astype(np.float32)
    state = _low((2, 4, 8, 6), BF16).astype(np.float32)
    o, final = rule(q, k, v, g, beta, initial_state=state)
    assert o.dtype == BF16 and final.dtype == np.float32
    wide_o, wide_final = rule(*(to_compute(a) for a in (q, k, v)), g, to_compute(beta), initial_state=state)
    np.testing.assert_array_equal(o, to_storage(wide_o, BF16))
    np.testing.assert_array_equal(final, wide_final)


# Every op, in both dtypes

@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_every_op_returns_its_outputs_in_the_dtype(dtype):
    """The first golden case of every op, its inputs cast as the suite casts them."""
    float32_outputs = {("gated_delta_rule", "final_state"), ("gated_deltanet", "recurrent_state")}
    firsts = {}
    for case in load_manifest(GOLDEN):
        if case.level == "op":
            firsts.setdefault(case.op, case)
    assert set(firsts) == set(OPS)
    for name, case in firsts.items():
        op, data = OPS[name], load_op_data(GOLDEN, case)
        result = op.function(**{k: cast_input(v, dtype.name) for k, v in data.inputs.items()}, **data.params)
        outputs = result if isinstance(result, dict) else {"output": result}
        for output, value in outputs.items():
            value = np.asarray(value)
            if output in op.integer_outputs:
                assert value.dtype == np.int64, (name, output)
            elif name == "rope_frequencies":
                assert value.dtype == np.float64
            else:
                want = np.float32 if (name, output) in float32_outputs else dtype
                assert value.dtype == want, (name, output, value.dtype)


# NumPy on d arrays, and the one rounding from float64

@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op", [np.add, np.subtract, np.multiply, np.divide])
def test_elementwise_numpy_on_two_storage_arrays_rounds_once(op, dtype):
    a = (RNG.standard_normal(200_000) * np.exp(RNG.uniform(-8, 8, 200_000))).astype(dtype)
    b = RNG.standard_normal(200_000).astype(dtype)
    with np.errstate(over="ignore", divide="ignore"):
        np.testing.assert_array_equal(op(a, b), to_storage(op(a.astype(np.float64), b.astype(np.float64)), dtype))


def test_to_storage_rounds_float64_once_where_ml_dtypes_rounds_twice():
    # Just above the midpoint of 1 and 1 + 2**-7: float32 makes it the midpoint, which ties to 1.
    above = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)])
    assert above.astype(BF16)[0] == 1
    np.testing.assert_array_equal(to_storage(above, BF16).astype(np.float64), [1 + 2**-7, -(1 + 2**-7)])
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e300, 1e-300, 0.1])
    with np.errstate(over="ignore"):
        assert np.array_equal(to_storage(x, BF16), x.astype(BF16), equal_nan=True)
    f32 = RNG.standard_normal(64).astype(np.float32)
    assert to_storage(f32, np.float32) is f32 and to_compute(f32) is f32


# Refusals

@pytest.mark.parametrize("bad, dtype", [
    (np.ones(3, np.longdouble), str(np.dtype(np.longdouble))), (np.ones(3, np.int32), "int32"),
    (np.ones(3, np.complex64), "complex64"), (np.ones(3, bool), "bool"),
])
def test_other_dtypes_are_refused_with_the_accepted_ones_named(bad, dtype):
    with pytest.raises(InputError, match=f"^linear: x must be a float64, float32, bfloat16 or float16 array, got "
                                         f"dtype {dtype}$"):
        linear(bad, np.ones((2, 3)))


@pytest.mark.parametrize("dtype", ["float128", "int32", "complex64", "float8_e4m3fn"])
def test_from_pretrained_refuses_other_dtypes(dtype):
    with pytest.raises(RefimplError, match="float64, float32, bfloat16 or float16"):
        refimpl.from_pretrained(GOLDEN / _case("qwen3/untied-gqa-odd-len")["checkpoint"], dtype=dtype)


def test_mixed_storage_dtypes_are_refused():
    with pytest.raises(RefimplError, match="share one compute dtype"):
        linear(_low((2, 3), BF16), _low((4, 3), F16))
    with pytest.raises(RefimplError, match="share one compute dtype"):
        grouped_query_attention(_low((1, 2, 2, 4), BF16), _low((1, 2, 2, 4), BF16), _low((1, 2, 2, 4), np.float32),
                                np.ones((2, 2), bool), 0.5)
