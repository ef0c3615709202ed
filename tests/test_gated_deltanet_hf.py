"""Gated DeltaNet against transformers 5.24 (models/qwen3_next/modeling_qwen3_next.py).

* the whole layer against ``Qwen3NextGatedDeltaNet`` built from a tiny ``Qwen3NextConfig``:
  float32 as shipped (< 1e-5 relative) and float64 with the float32 islands lifted by
  ``conformance.backends.hf_exact.exact_float64`` (< 1e-10), several seeds, r = Hv/Hk 1 and 2,
  T = 150 over three chunks of 64; the lift is needed (shipped float64 is ~1e-7 .. 1e-6 away)
  and sufficient;
* the layer's state: prefill then decode through transformers' ``DynamicCache`` equals our
  two-piece run, and two pieces equal one pass;
* the pieces: ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``,
  ``causal_conv1d_fn`` / ``causal_conv1d_update``, ``Qwen3NextRMSNormGated``,
  ``fix_query_key_value_ordering`` and the weight shapes.
"""

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen3_next import configuration_qwen3_next, modeling_qwen3_next as qn  # noqa: E402

from conformance.backends.hf_exact import exact_float64  # noqa: E402
from refimpl.errors import ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError  # noqa: E402
from refimpl.linear_attention.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent  # noqa: E402
from refimpl.linear_attention.gated_deltanet import (  # noqa: E402
    GatedDeltaNetState, _dims, gated_deltanet, gated_deltanet_weight_shapes, split_projections)
from refimpl.linear_attention.short_conv import causal_conv1d  # noqa: E402
from refimpl.ops import OPS  # noqa: E402
from refimpl.rmsnorm import gated_rms_norm  # noqa: E402

# transformers says once per process that it falls back to its torch delta rule (no fla on CPU).
logging.getLogger("transformers").setLevel(logging.ERROR)

#: spec sheet 8.4's GDN geometry (r = 2) and an r = 1 variant; hidden size 64.
R2 = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
      "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4}
R1 = {"linear_num_key_heads": 3, "linear_num_value_heads": 3, "linear_key_head_dim": 6,
      "linear_value_head_dim": 10, "linear_conv_kernel_dim": 3}
HIDDEN, EPS = 64, 1e-6


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def config(heads):
    return configuration_qwen3_next.Qwen3NextConfig(
        hidden_size=HIDDEN, rms_norm_eps=EPS, hidden_act="silu", num_hidden_layers=1,
        layer_types=["linear_attention"], **heads)


def random_weights(heads, seed, a_range=(0.02, 0.3)):
    """Weights by state-dict name: projections N(0, 1/fan_in), conv taps N(0, 1/K), norm weight and
    dt_bias 1 + 0.2 N, A = exp(A_log) uniform in ``a_range``: by default [0.02, 0.3] (decays that keep the
    state across chunks); (0.01, 16) is transformers' own init (strong decays)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(gated_deltanet_weight_shapes(HIDDEN, **heads).items()):
        if name == "A_log":
            weights[name] = np.log(rng.uniform(*a_range, shape))
        elif len(shape) == 1:
            weights[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            weights[name] = rng.standard_normal(shape) / np.sqrt(shape[2] if len(shape) == 3 else shape[1])
    return weights


def hf_layer(heads, weights, dtype):
    """``Qwen3NextGatedDeltaNet`` holding ``weights`` in ``dtype`` (build it inside exact_float64 for the lift)."""
    layer = qn.Qwen3NextGatedDeltaNet(config(heads), layer_idx=0).eval()
    layer.load_state_dict({n: torch.tensor(a, dtype=dtype) for n, a in weights.items()}, strict=True, assign=True)
    return layer


def ours(x, weights, heads, **kwargs):
    return gated_deltanet(x, weights, **heads, rms_norm_eps=EPS, **kwargs)


def hf_run(heads, weights, x, dtype, lifted=False, cache=None):
    with torch.no_grad():
        if not lifted:
            return hf_layer(heads, weights, dtype)(torch.tensor(x, dtype=dtype), cache=cache).double().numpy()
        with exact_float64():
            return hf_layer(heads, weights, dtype)(torch.tensor(x, dtype=dtype), cache=cache).numpy()


CASES = [(R2, 1), (R2, 2), (R2, 3), (R1, 4), (R1, 5)]


@pytest.mark.parametrize("heads, seed", CASES)
def test_layer_agrees_with_transformers_float64_lifted_and_float32(heads, seed):
    weights = random_weights(heads, seed)
    x = np.random.default_rng(seed + 100).standard_normal((2, 150, HIDDEN))
    out, _ = ours(x, weights, heads)
    assert rel(hf_run(heads, weights, x, torch.float64, lifted=True), out) < 1e-10
    assert rel(hf_run(heads, weights, x, torch.float32), out) < 1e-5
    recurrent, _ = ours(x, weights, heads, chunk_size=None)
    assert rel(recurrent, out) < 1e-13


@pytest.mark.parametrize("seed", [11, 12])
def test_layer_agrees_with_transformers_under_its_own_a_init(seed):
    # A ~ U(0.01, 16) as Qwen3NextGatedDeltaNet initialises it: log-decays to about -60 per token, a chunk's
    # cumulative log-decay far outside float32's and float64's exp range; both forms stay finite and agree.
    weights = random_weights(R2, seed, a_range=(0.01, 16.0))
    x = np.random.default_rng(seed + 100).standard_normal((1, 150, HIDDEN))
    out, state = ours(x, weights, R2)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state.recurrent_state))
    assert rel(hf_run(R2, weights, x, torch.float64, lifted=True), out) < 1e-10
    assert rel(hf_run(R2, weights, x, torch.float32), out) < 1e-5
    assert rel(ours(x, weights, R2, chunk_size=None)[0], out) < 1e-13


def test_float64_lift_is_needed_and_sufficient():
    weights = random_weights(R2, 6)
    x = np.random.default_rng(106).standard_normal((2, 150, HIDDEN))
    out, _ = ours(x, weights, R2)
    shipped = rel(hf_run(R2, weights, x, torch.float64), out)
    lifted = rel(hf_run(R2, weights, x, torch.float64, lifted=True), out)
    # transformers as shipped runs the delta rule, the decay and the gated norm in float32.
    assert 1e-8 < shipped < 1e-5, shipped
    assert lifted < 1e-10, lifted


def test_cached_prefill_then_decode_equals_our_state_handoff():
    # GDN-04 / GDN-06 at the layer: transformers' DynamicCache (chunked prefill of 4, then the
    # recurrent single-token path with causal_conv1d_update) against our two calls.
    heads, weights = R2, random_weights(R2, 7)
    x = np.random.default_rng(107).standard_normal((1, 5, HIDDEN))
    whole, whole_state = ours(x, weights, heads, chunk_size=4)
    first, state = ours(x[:, :4], weights, heads, chunk_size=4)
    second, state = ours(x[:, 4:], weights, heads, state=state)
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=0, atol=1e-14)
    np.testing.assert_allclose(state.recurrent_state, whole_state.recurrent_state, rtol=0, atol=1e-14)
    np.testing.assert_allclose(state.conv_state, whole_state.conv_state, rtol=0, atol=1e-14)
    with torch.no_grad(), exact_float64():
        layer = hf_layer(heads, weights, torch.float64)
        cache = DynamicCache(config=config(heads))
        hf_first = layer(torch.tensor(x[:, :4]), cache=cache).numpy()
        hf_second = layer(torch.tensor(x[:, 4:]), cache=cache).numpy()
        hf_conv = cache.get_conv_state(0).numpy()
        hf_recurrent = cache.get_recurrent_state(0).numpy()
    assert rel(hf_first, first) < 1e-12 and rel(hf_second, second) < 1e-12
    assert rel(hf_recurrent, state.recurrent_state) < 1e-12
    # transformers keeps K conv inputs; ours keeps the K-1 it reads (its oldest column is never used)
    assert hf_conv.shape == (1, state.conv_state.shape[1], 4)
    assert rel(hf_conv[..., 1:], state.conv_state) < 1e-12


@pytest.mark.parametrize("split", [1, 3, 64, 100])
def test_layer_two_pieces_equal_one_pass(split):
    weights = random_weights(R1, 8)
    x = np.random.default_rng(108).standard_normal((2, 130, HIDDEN))
    whole, whole_state = ours(x, weights, R1)
    first, state = ours(x[:, :split], weights, R1)
    second, state = ours(x[:, split:], weights, R1, chunk_size=16, state=state)
    assert rel(np.concatenate([first, second], 1), whole) < 1e-13
    assert rel(state.recurrent_state, whole_state.recurrent_state) < 1e-13


# -- the pieces


def core_inputs(seed, t=150, hk=2, hv=4, dk=8, dv=12):
    rng = np.random.default_rng(seed)
    unit = lambda *s: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(rng.standard_normal(s))  # noqa: E731
    return {"q": unit(1, t, hk, dk), "k": unit(1, t, hk, dk), "v": rng.standard_normal((1, t, hv, dv)),
            "g": -rng.uniform(0.005, 0.2, (1, t, hv)), "beta": rng.uniform(0.05, 0.95, (1, t, hv)),
            "initial_state": 0.5 * rng.standard_normal((1, hv, dk, dv))}


def hf_core(name, x, dtype, lifted):
    fn = getattr(qn, name)
    names = {"q": "query", "k": "key", "v": "value"}
    tensors = {names.get(k, k): torch.tensor(v, dtype=dtype) for k, v in x.items()}
    kwargs = {"chunk_size": 64} if "chunk" in name else {}
    with torch.no_grad():
        if lifted:
            with exact_float64():
                o, s = fn(**tensors, output_final_state=True, use_qk_l2norm_in_kernel=False, **kwargs)
        else:
            o, s = fn(**tensors, output_final_state=True, use_qk_l2norm_in_kernel=False, **kwargs)
    return o.double().numpy(), s.double().numpy()


@pytest.mark.parametrize("name", ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"])
@pytest.mark.parametrize("r", [1, 2])
def test_delta_rule_agrees_with_transformers_functions(name, r):
    x = core_inputs(20 + r, hk=4 // r, hv=4)
    o, s = gated_delta_rule_recurrent(**x)
    o_lift, s_lift = hf_core(name, x, torch.float64, lifted=True)
    assert rel(o_lift, o) < 1e-12 and rel(s_lift, s) < 1e-12
    # shipped: the function computes in float32 whatever its inputs are; the gap is float32 rounding.
    o_ship, s_ship = hf_core(name, x, torch.float64, lifted=False)
    assert 1e-9 < rel(o_ship, o) < 5e-6 and rel(s_ship, s) < 5e-6
    o_f32, _ = hf_core(name, x, torch.float32, lifted=False)
    assert rel(o_f32, o) < 5e-6
    chunked, _ = gated_delta_rule_chunked(**x, chunk_size=64)
    assert rel(chunked, o) < 1e-13


def test_gdn03_transformers_state_shape_is_heads_by_widths():
    x = core_inputs(30, t=3, hk=2, hv=2, dk=4, dv=4)
    x.pop("initial_state")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        _, s = hf_core(name, x, torch.float64, lifted=True)
        assert s.shape == gated_delta_rule_recurrent(**x)[1].shape == (1, 2, 4, 4)


@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_agrees_with_transformers(with_state):
    rng = np.random.default_rng(40)
    x, w, state = rng.standard_normal((2, 9, 10)), rng.standard_normal((10, 4)), rng.standard_normal((2, 10, 3))
    out, new_state = causal_conv1d(x, w, conv_state=state if with_state else None)
    tx, tw = torch.tensor(x).transpose(1, 2), torch.tensor(w)
    if with_state:
        ts = torch.tensor(state)
        hf = qn.causal_conv1d_update(tx, ts, tw, None, "silu")
        np.testing.assert_array_equal(ts.numpy(), new_state)
    else:
        hf = qn.causal_conv1d_fn(tx, tw, None, activation="silu")
    assert rel(hf.transpose(1, 2).numpy(), out) < 1e-14


def test_gated_rms_norm_agrees_with_transformers():
    rng = np.random.default_rng(41)
    x, z, w = rng.standard_normal((30, 12)), 2 * rng.standard_normal((30, 12)), 1 + 0.2 * rng.standard_normal(12)
    ref = gated_rms_norm(x, w, z, 1e-6)
    with torch.no_grad():
        norm = qn.Qwen3NextRMSNormGated(12, eps=1e-6).double()
        norm.weight.copy_(torch.tensor(w))
        with exact_float64():
            lifted = norm(torch.tensor(x), torch.tensor(z)).numpy()
        shipped = norm.float()(torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32)).numpy()
    assert rel(lifted, ref) < 1e-14
    assert rel(shipped, ref) < 1e-6
    # plain w, gate after the norm: transformers' module is far from a 1 + w gain and from a gate inside
    # the statistics (both written out here from their formulas, not through the code under test)
    gate = z / (1 + np.exp(-z))
    normalized = lambda a: a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    assert rel(lifted, (1 + w) * normalized(x) * gate) > 0.3
    assert rel(lifted, w * normalized(x * gate)) > 0.5


def test_projection_split_matches_fix_query_key_value_ordering():
    heads = R2
    layer = qn.Qwen3NextGatedDeltaNet(config(heads), layer_idx=0)
    rng = np.random.default_rng(42)
    d = _dims(heads)
    qkvz, ba = rng.standard_normal((2, 5, 2 * 2 * 8 + 2 * 4 * 12)), rng.standard_normal((2, 5, 8))
    hf = layer.fix_query_key_value_ordering(torch.tensor(qkvz), torch.tensor(ba))
    for name, ours_part, hf_part in zip("qkvzba", split_projections(qkvz, ba, d), hf):
        np.testing.assert_array_equal(ours_part, hf_part.numpy(), err_msg=name)


@pytest.mark.parametrize("heads", [R1, R2])
def test_weight_shapes_are_the_module_state_dict(heads):
    layer = qn.Qwen3NextGatedDeltaNet(config(heads), layer_idx=0)
    assert gated_deltanet_weight_shapes(HIDDEN, **heads) == {n: tuple(p.shape) for n, p in layer.state_dict().items()}


# -- errors of the layer


def test_layer_errors():
    weights = random_weights(R2, 9)
    x = np.zeros((1, 3, HIDDEN))
    with pytest.raises(MissingWeightsError, match="A_log"):
        ours(x, {k: v for k, v in weights.items() if k != "A_log"}, R2)
    with pytest.raises(UnexpectedWeightsError, match="conv1d.bias"):
        ours(x, {**weights, "conv1d.bias": np.zeros(64)}, R2)
    with pytest.raises(ShapeError, match="in_proj_ba.weight has shape"):
        ours(x, {**weights, "in_proj_ba.weight": np.zeros((4, HIDDEN))}, R2)
    with pytest.raises(ConfigError, match="multiple of linear_num_key_heads"):
        ours(x, weights, {**R2, "linear_num_value_heads": 5})
    with pytest.raises(ConfigError, match="linear_conv_kernel_dim must be an integer >= 1"):
        ours(x, weights, {**R2, "linear_conv_kernel_dim": 0})
    bad_state = GatedDeltaNetState(np.zeros((1, 3, 8, 12)), np.zeros((1, 128, 3)))
    with pytest.raises(ShapeError, match=r"state.recurrent_state has shape \(1, 3, 8, 12\), expected \(1, 4, 8, 12\)"):
        ours(x, weights, R2, state=bad_state)


@pytest.mark.parametrize("shape", [(1, 0, HIDDEN), (0, 5, HIDDEN)])
def test_empty_batch_or_length_is_a_shape_error(shape):
    # B = 0 or T = 0: one line naming the problem, from the layer and from its op (no NumPy reshape error)
    weights = random_weights(R2, 9)
    message = r"gated_deltanet: hidden_states \(\d+, \d+, 64\) must be \(B, T, M\) with no empty axis"
    with pytest.raises(ShapeError, match=message):
        ours(np.zeros(shape), weights, R2)
    with pytest.raises(ShapeError, match=message):
        OPS["gated_deltanet"].function(np.zeros(shape), **R2, rms_norm_eps=EPS, **weights)
