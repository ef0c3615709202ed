"""refimpl.moe: dispatch against dense_mixture, weight on input vs output (ACT-06/07/08), schedules, errors.

:func:`dispatch` (gather per expert, weighted scatter-add) and :func:`dense_mixture`
(every expert on every token, mixed by the dense routing matrix) are siblings and
must agree. Llama 4's weight-on-input form is checked by hand on a non-linear expert
and against ``Llama4TextMoe`` of transformers 5.24. The layer schedules are compared
with the layer lists transformers' own configs and decoder layers derive.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.experts import input_major_swiglu_expert, swiglu_expert
from refimpl.mlp import gated_mlp
from refimpl.moe import dense_mixture, dispatch, first_k_dense_schedule, interleaved_schedule, sparse_step_schedule
from refimpl.routers import llama4_top_k_sigmoid, sigmoid_group_top_k, softmax_top_k

FORMS = (dispatch, dense_mixture)


def _square(e, rows):
    """A non-linear expert: (e + 1) * x^2."""
    return (e + 1) * rows * rows


# Hand-computed combinations

@pytest.mark.parametrize("form", FORMS)
def test_weight_on_output_hand_probe(form):
    # Token 0 -> experts 0 (0.25) and 2 (0.75): 0.25 * 1 * 4 + 0.75 * 3 * 4 = 10 for x = 2.
    # Token 1 -> expert 1 only (k slots: 1 with 0.5, 0 with 0.5): 0.5 * 2 * 9 + 0.5 * 1 * 9 = 13.5 for x = -3.
    x = np.array([[2.0], [-3.0]])
    out = form(x, np.array([[0.25, 0.75], [0.5, 0.5]]), np.array([[0, 2], [1, 0]]), _square, 3)
    np.testing.assert_allclose(out, [[10.0], [13.5]], rtol=1e-15)


@pytest.mark.parametrize("form", FORMS)
def test_act06_weight_on_input_differs_from_weight_on_output(form):
    # Expert 0 is x^2; x = 2, w = 0.5: on the input (0.5 * 2)^2 = 1, on the output 0.5 * 4 = 2.
    x, w, i = np.array([[2.0]]), np.array([[0.5]]), np.array([[0]])
    np.testing.assert_allclose(form(x, w, i, _square, 2, weight_on="input"), [[1.0]], rtol=1e-15)
    np.testing.assert_allclose(form(x, w, i, _square, 2, weight_on="output"), [[2.0]], rtol=1e-15)


@pytest.mark.parametrize("form", FORMS)
def test_tokens_routed_nowhere_give_zero(form):
    x = np.ones((3, 2))
    out = form(x, np.zeros((3, 0)), np.zeros((3, 0), np.int64), _square, 2)
    np.testing.assert_array_equal(out, np.zeros((3, 2)))


def test_dispatch_calls_each_hit_expert_once_with_exactly_its_rows():
    calls = []

    def expert(e, rows):
        calls.append((e, rows[:, 0].tolist()))
        return rows

    x = np.arange(4.0)[:, None]
    dispatch(x, np.ones((4, 2)), np.array([[3, 0], [0, 3], [3, 1], [1, 0]]), expert, 5)
    # Experts in index order; expert 2 and 4 get nothing and are never called.
    assert calls == [(0, [0.0, 1.0, 3.0]), (1, [2.0, 3.0]), (3, [0.0, 1.0, 2.0])]


# dispatch == dense_mixture

def _swiglu_stack(rng, experts, hidden, inter, dtype=np.float64):
    gate_up = (rng.standard_normal((experts, 2 * inter, hidden)) / math.sqrt(hidden)).astype(dtype)
    down = (rng.standard_normal((experts, hidden, inter)) / math.sqrt(inter)).astype(dtype)
    return gate_up, down, (lambda e, rows: swiglu_expert(rows, gate_up[e], down[e]))


@pytest.mark.parametrize("weight_on", ["output", "input"])
@pytest.mark.parametrize("tokens, experts, top_k", [(1, 1, 1), (1, 4, 4), (7, 5, 1), (13, 8, 3), (11, 3, 3)])
def test_dispatch_equals_dense_mixture(weight_on, tokens, experts, top_k):
    rng = np.random.default_rng(tokens * 100 + experts * 10 + top_k)
    x = rng.standard_normal((tokens, 6))
    _, _, expert = _swiglu_stack(rng, experts, 6, 5)
    weights, indices = softmax_top_k(rng.standard_normal((tokens, experts)), top_k, norm_topk_prob=False)
    sparse = dispatch(x, weights, indices, expert, experts, weight_on=weight_on)
    dense = dense_mixture(x, weights, indices, expert, experts, weight_on=weight_on)
    np.testing.assert_allclose(sparse, dense, rtol=1e-13, atol=1e-15)
    assert np.linalg.norm(sparse) > 0.1


@pytest.mark.parametrize("form", FORMS)
def test_float32_stays_float32(form):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    _, _, expert = _swiglu_stack(rng, 3, 4, 2, np.float32)
    weights, indices = softmax_top_k(rng.standard_normal((5, 3)).astype(np.float32), 2, norm_topk_prob=True)
    assert form(x, weights, indices, expert, 3).dtype == np.float32


def test_single_expert_k1_renormalised_is_the_dense_mlp():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 6))
    gate_up, down, expert = _swiglu_stack(rng, 1, 6, 4)
    weights, indices = softmax_top_k(rng.standard_normal((9, 1)), 1, norm_topk_prob=True)
    np.testing.assert_array_equal(weights, np.ones((9, 1)))
    np.testing.assert_allclose(dispatch(x, weights, indices, expert, 1),
                               gated_mlp(x, gate_up[0, :4], gate_up[0, 4:], down[0]), rtol=1e-14)


def test_permuting_experts_with_the_router_changes_nothing():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 6))
    logits, bias = rng.standard_normal((10, 8)), 0.3 * rng.standard_normal(8)
    gate_up, down, expert = _swiglu_stack(rng, 8, 6, 3)
    # Permute groups {0,1},{2,3},{4,5},{6,7} and the experts inside them (the group structure must be kept).
    perm = np.array([5, 4, 0, 1, 7, 6, 3, 2])
    kw = dict(top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    out = dispatch(x, *sigmoid_group_top_k(logits, bias, **kw), expert, 8)
    permuted = dispatch(x, *sigmoid_group_top_k(logits[:, perm], bias[perm], **kw),
                        lambda e, rows: swiglu_expert(rows, gate_up[perm][e], down[perm][e]), 8)
    np.testing.assert_allclose(permuted, out, rtol=1e-13)


# Llama 4: weight on the input, against transformers' Llama4TextMoe

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [1, 2])
def test_weight_on_input_agrees_with_llama4_text_moe(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from conformance.backends.hf_exact import exact_float64

    m, inter, experts, tokens = 12, 5, 4, 9
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, m))
    router = rng.standard_normal((experts, m)) / math.sqrt(m)
    gate_up = rng.standard_normal((experts, m, 2 * inter)) / math.sqrt(m)
    down = rng.standard_normal((experts, inter, m)) / math.sqrt(inter)
    shared = {name: rng.standard_normal(shape) / math.sqrt(shape[1])
              for name, shape in (("gate_proj", (inter, m)), ("up_proj", (inter, m)), ("down_proj", (m, inter)))}
    config = transformers.Llama4TextConfig(hidden_size=m, num_local_experts=experts, num_experts_per_tok=top_k,
                                           intermediate_size=inter)
    with exact_float64(), torch.no_grad():
        moe = Llama4TextMoe(config).double()
        moe.router.weight.copy_(torch.from_numpy(router))
        moe.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        moe.experts.down_proj.copy_(torch.from_numpy(down))
        for name, value in shared.items():
            getattr(moe.shared_expert, name).weight.copy_(torch.from_numpy(value))
        hf, _ = moe(torch.from_numpy(x))
    weights, indices = llama4_top_k_sigmoid(x @ router.T, top_k)

    def expert(e, rows):
        return input_major_swiglu_expert(rows, gate_up[e], down[e])

    routed = dispatch(x, weights, indices, expert, experts, weight_on="input")
    ours = routed + gated_mlp(x, shared["gate_proj"], shared["up_proj"], shared["down_proj"])
    np.testing.assert_allclose(ours, hf.numpy(), rtol=1e-13, atol=1e-14)
    # Weight on the output is a different model (SwiGLU is not linear): clearly apart.
    wrong = dispatch(x, weights, indices, expert, experts, weight_on="output") + (ours - routed)
    assert np.linalg.norm(wrong - hf.numpy()) > 1e-3 * np.linalg.norm(routed)


# Layer schedules against transformers

@pytest.mark.parametrize("layers, step, moe_layers", [(4, 1, None), (4, 2, None), (7, 3, None), (48, 2, None),
                                                      (5, 1, [0, 3]), (3, 2, [])])
def test_interleaved_schedule_matches_llama4_text_config(layers, step, moe_layers):
    transformers = pytest.importorskip("transformers")
    config = transformers.Llama4TextConfig(num_hidden_layers=layers, interleave_moe_layer_step=step,
                                           moe_layers=moe_layers)
    expected = tuple(layer in config.moe_layers for layer in range(layers))
    assert interleaved_schedule(layers, step, moe_layers) == expected


def test_interleaved_schedule_by_hand():
    assert interleaved_schedule(4, 2) == (False, True, False, True)  # Maverick: odd layers MoE
    assert interleaved_schedule(3, 1) == (True, True, True)  # Scout
    assert interleaved_schedule(4, 2, [0]) == (True, False, False, False)  # explicit list wins


@pytest.mark.parametrize("layers, step, mlp_only, experts", [(4, 1, [], 4), (6, 2, [], 4), (6, 3, [2], 4),
                                                             (5, 1, [0, 4], 4), (3, 1, [], 0)])
def test_sparse_step_schedule_matches_qwen3_moe_decoder_layers(layers, step, mlp_only, experts):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=8, intermediate_size=8, moe_intermediate_size=4,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                         num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=1,
                                         decoder_sparse_step=step, mlp_only_layers=mlp_only)
    expected = tuple(isinstance(Qwen3MoeDecoderLayer(config, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(layers))
    assert sparse_step_schedule(layers, step, mlp_only, experts) == expected


@pytest.mark.parametrize("layers, first_k", [(3, 1), (4, 0), (3, 3), (2, 5)])
def test_first_k_dense_schedule_matches_deepseek_v3_decoder_layers(layers, first_k):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3MoE

    config = transformers.DeepseekV3Config(hidden_size=8, intermediate_size=8, moe_intermediate_size=4,
                                           num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4,
                                           kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                                           n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1,
                                           num_hidden_layers=layers, first_k_dense_replace=first_k)
    expected = tuple(isinstance(DeepseekV3DecoderLayer(config, i).mlp, DeepseekV3MoE) for i in range(layers))
    assert first_k_dense_schedule(layers, first_k) == expected


# Errors

X = np.ones((2, 3))
W = np.full((2, 2), 0.5)
IDX = np.array([[0, 1], [1, 2]])

ERRORS = [
    (lambda f: f(np.ones(3), W, IDX, _square, 3), ShapeError, "x"),
    (lambda f: f(X, np.ones((2, 3)), IDX, _square, 3), ShapeError, r"weights \(2, 3\) and indices \(2, 2\)"),
    (lambda f: f(X, np.ones((3, 2)), np.zeros((3, 2), np.int64), _square, 3), ShapeError, "do not fit"),
    (lambda f: f(X, W, IDX.astype(float), _square, 3), InputError, "indices must be integers"),
    (lambda f: f(X, W, np.array([[0, 3], [1, 2]]), _square, 3), ShapeError, r"\[0, 3\)"),
    (lambda f: f(X, W, np.array([[0, -1], [1, 2]]), _square, 3), ShapeError, r"\[0, 3\)"),
    (lambda f: f(X, W, IDX, _square, 3, weight_on="both"), ConfigError, "weight_on must be one of"),
    (lambda f: f(X.astype(np.int64), W, IDX, _square, 3), InputError, "x must be"),
    (lambda f: f(X, W.astype(np.int64), IDX, _square, 3), InputError, "weights must be"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("call, error, match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input_raises_one_line_error(form, call, error, match):
    with pytest.raises(error, match=match) as info:
        call(form)
    assert isinstance(info.value, RefimplError) and "\n" not in str(info.value)


def test_dense_mixture_refuses_an_expert_named_twice():
    with pytest.raises(ShapeError, match="same expert twice"):
        dense_mixture(X, W, np.array([[1, 1], [0, 2]]), _square, 3)


SCHEDULE_ERRORS = [
    (lambda: first_k_dense_schedule(3, -1), "first_k_dense_replace must be a non-negative integer"),
    (lambda: first_k_dense_schedule(3, 1.0), "first_k_dense_replace"),
    (lambda: interleaved_schedule(4, 0), "interleave_moe_layer_step must be a positive integer"),
    (lambda: interleaved_schedule(4, 1, [4]), r"moe_layers must be a list of layer indices in \[0, 4\)"),
    (lambda: interleaved_schedule(4, 1, "1,3"), "moe_layers"),
    (lambda: sparse_step_schedule(4, 0), "decoder_sparse_step must be a positive integer"),
    (lambda: sparse_step_schedule(4, 1, [-1]), "mlp_only_layers"),
]


@pytest.mark.parametrize("call, match", SCHEDULE_ERRORS, ids=[str(i) for i in range(len(SCHEDULE_ERRORS))])
def test_schedule_errors(call, match):
    with pytest.raises(ConfigError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
