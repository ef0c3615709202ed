"""refimpl.routers: hand-computed probes of the MoE bug classes, the tie rule, errors, and transformers' routers.

Expected values are worked out by hand (or with ``math`` from the formula in the
comment), never taken from the code under test. The bug-class probes are those of
``docs/bug-classes.md`` / the shared bug-class list (MOE-01 .. MOE-05). The
transformers comparisons build each router module of transformers 5.24 with random
weights, run it in float64 inside ``exact_float64()`` (its float32 router islands
lifted) and compare the chosen expert *sets* and their weights through the dense
``(N, E)`` routing matrix, so the order of the k slots never matters.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from refimpl.errors import ConfigError, InputError, RefimplError, RoutingTieWarning, ShapeError
from refimpl.routers import (
    dense_routing, llama4_top_k_sigmoid, sigmoid_bias_top_k, sigmoid_group_top_k, soft_capped_softmax_top_k,
    softmax_top_k, top_k_indices, top_k_softmax,
)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def as_sets(indices) -> list[set[int]]:
    return [set(int(i) for i in row) for row in np.asarray(indices)]


def group_route(logits, bias, **kw):
    kw = {"n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0, **kw}
    return sigmoid_group_top_k(np.asarray(logits, float), np.asarray(bias, float), **kw)


# MOE-01: the correction bias steers selection only

def test_moe01_bias_selects_but_weights_come_from_unbiased_scores():
    # logits 0 -> sigmoid 0.5 each; scores + bias = [2.5, 0.6, 0.5, -1.5]: experts {0, 1}.
    weights, indices = group_route([[0.0, 0.0, 0.0, 0.0]], [2.0, 0.1, 0.0, -2.0], top_k=2)
    assert as_sets(indices) == [{0, 1}]
    # 0.5 / (0.5 + 0.5) each; the biased scores would give 2.5 / 3.1 = 0.806 and 0.6 / 3.1 = 0.194.
    np.testing.assert_allclose(weights, [[0.5, 0.5]], rtol=0, atol=1e-15)


def test_moe01_minimax_router_bias_selects_only():
    weights, indices = sigmoid_bias_top_k(np.zeros((1, 4)), np.array([2.0, 0.1, 0.0, -2.0]), top_k=2)
    assert as_sets(indices) == [{0, 1}]
    np.testing.assert_allclose(weights, [[0.5, 0.5]], rtol=0, atol=1e-15)


def test_minimax_router_renormalises_unbiased_sigmoids_without_scaling():
    # sigmoid(1) = 0.7310585786, sigmoid(-1) = 0.2689414214; bias pushes expert 2 (logit -1) into the top 2.
    logits = np.array([[1.0, 0.5, -1.0]])
    weights, indices = sigmoid_bias_top_k(logits, np.array([0.0, -1.0, 1.0]), top_k=2)
    assert as_sets(indices) == [{0, 2}]
    dense = dense_routing(weights, indices, 3)
    total = sigmoid(1.0) + sigmoid(-1.0)  # = 1 exactly: sigmoid(z) + sigmoid(-z) = 1
    np.testing.assert_allclose(dense, [[sigmoid(1.0) / total, 0.0, sigmoid(-1.0) / total]], rtol=1e-14)


# MOE-02 / MOE-03: experts of excluded groups get -inf, not 0

def test_moe03_group_mask_is_minus_inf_with_all_negative_scores():
    # sigmoid 0.5 + bias [-3, -3, -1, -1] = [-2.5, -2.5, -0.5, -0.5]; groups {0,1} (sum -5) and {2,3} (sum -1):
    # group 1 is kept. A 0 fill for group 0 would beat -0.5 and pick {0, 1}.
    weights, indices = group_route(np.zeros((1, 4)), [-3.0, -3.0, -1.0, -1.0], top_k=2, n_group=2,
                                   routed_scaling_factor=2.5)
    assert as_sets(indices) == [{2, 3}]
    np.testing.assert_allclose(weights, [[1.25, 1.25]], rtol=1e-15)


def test_expert_of_an_excluded_group_is_never_chosen_even_with_the_top_score():
    # scores + bias = [0.99, 0.0 | 0.6, 0.6]: expert 0 has the top score, but group 0's top-2 sum 0.99 < 1.2.
    # (A "max of the group" group score would keep group 0.)
    weights, indices = group_route(np.zeros((1, 4)), [0.49, -0.5, 0.1, 0.1], top_k=2, n_group=2)
    assert as_sets(indices) == [{2, 3}]
    np.testing.assert_allclose(weights, [[0.5, 0.5]], rtol=1e-15)


def test_group_score_is_the_sum_of_the_two_best_not_of_all_members():
    # Groups of 3: scores + bias = [0.9, 0.9, -4.5 | 0.7, 0.7, 0.7]: top-2 sums 1.8 > 1.4 keep group 0;
    # sums of all members (-2.7 < 2.1) would keep group 1.
    weights, indices = group_route(np.zeros((1, 6)), [0.4, 0.4, -5.0, 0.2, 0.2, 0.2], top_k=2, n_group=2)
    assert as_sets(indices) == [{0, 1}]


def test_topk_group_two_of_four_groups():
    # 8 experts in 4 groups of 2; scores + bias per group: [1.9, 0] [1.0, 1.0] [0.4, 0.4] [1.2, 1.2]:
    # group sums 1.9, 2.0, 0.8, 2.4 keep groups 3 and 1; top-3 there: 6, 7 (1.2) then 2 or 3 (1.0, tie -> 2).
    bias = np.array([1.4, -0.5, 0.5, 0.5, -0.1, -0.1, 0.7, 0.7])
    with pytest.warns(RoutingTieWarning, match="1 of 1 token"):
        weights, indices = group_route(np.zeros((1, 8)), bias, top_k=3, n_group=4, topk_group=2)
    assert as_sets(indices) == [{6, 7, 2}]
    chosen_groups = {int(i) // 2 for i in indices[0]}
    assert chosen_groups == {1, 3}


# MOE-04: without renormalisation the weights are probabilities, not logits

def test_moe04_softmax_top_k_without_renormalisation():
    weights, indices = softmax_top_k(np.array([[2.0, 1.0, 0.0, -1.0]]), top_k=2, norm_topk_prob=False)
    total = math.exp(2) + math.exp(1) + math.exp(0) + math.exp(-1)
    assert indices.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights, [[math.exp(2) / total, math.exp(1) / total]], rtol=1e-14)
    np.testing.assert_allclose(weights, [[0.644, 0.237]], atol=5e-4)  # the probe's rounded values, not [2, 1]


def test_softmax_top_k_with_renormalisation():
    weights, _ = softmax_top_k(np.array([[2.0, 1.0, 0.0, -1.0]]), top_k=2, norm_topk_prob=True)
    # e^2 / (e^2 + e) = 1 / (1 + e^-1)
    np.testing.assert_allclose(weights, [[sigmoid(1.0), sigmoid(-1.0)]], rtol=1e-14)


# MOE-05: routed_scaling_factor applies whether or not the weights are renormalised

def test_moe05_scaling_without_renormalisation():
    # One chosen expert with sigmoid 0.3 and rsf 2.5: 0.75 (not 0.3).
    weights, indices = group_route([[logit(0.3), -5.0]], [0.0, 0.0], top_k=1, norm_topk_prob=False,
                                   routed_scaling_factor=2.5)
    assert indices.tolist() == [[0]]
    np.testing.assert_allclose(weights, [[0.75]], rtol=1e-14)


def test_moe05_scaling_with_renormalisation_sums_to_the_factor():
    rng = np.random.default_rng(5)
    weights, _ = group_route(rng.standard_normal((7, 8)), 0.1 * rng.standard_normal(8), top_k=3, n_group=4,
                             topk_group=2, routed_scaling_factor=2.827)
    np.testing.assert_allclose(weights.sum(axis=-1), np.full(7, 2.827), rtol=1e-14)


def test_group_router_renormalisation_epsilon_is_1e_20():
    # sigmoid(-800) underflows to 0: the weights are 0 / (0 + 1e-20) = 0, not NaN.
    with pytest.warns(RoutingTieWarning):  # every score is exactly 0
        weights, _ = group_route(np.full((1, 4), -800.0), np.zeros(4), top_k=2)
    np.testing.assert_array_equal(weights, [[0.0, 0.0]])


# gpt-oss, Llama 4 and Grok 2.5 routers

def test_top_k_softmax_is_a_softmax_over_the_chosen_logits():
    weights, indices = top_k_softmax(np.array([[3.0, 1.0, 2.0, 0.0]]), top_k=2)
    assert indices.tolist() == [[0, 2]]
    # softmax([3, 2]) = [sigmoid(1), sigmoid(-1)] = [0.731, 0.269]
    np.testing.assert_allclose(weights, [[sigmoid(1.0), sigmoid(-1.0)]], rtol=1e-14)


def test_llama4_weight_is_the_sigmoid_of_the_chosen_logit_unnormalised():
    weights, indices = llama4_top_k_sigmoid(np.array([[1.0, 3.0, -2.0], [-1.0, -3.0, -2.0]]), top_k=1)
    assert indices.tolist() == [[1], [0]]
    np.testing.assert_allclose(weights, [[sigmoid(3.0)], [sigmoid(-1.0)]], rtol=1e-14)  # 0.953, 0.269


def test_soft_capped_router_caps_then_softmax_over_all_without_renormalisation():
    # cap 1: capped logits tanh([2, 0, -2]); softmax over all three, top-2, not renormalised.
    t = math.tanh(2.0)
    total = math.exp(t) + 1 + math.exp(-t)
    weights, indices = soft_capped_softmax_top_k(np.array([[2.0, 0.0, -2.0]]), top_k=2, router_logit_softcapping=1.0)
    assert indices.tolist() == [[0, 1]]
    np.testing.assert_allclose(weights, [[math.exp(t) / total, 1 / total]], rtol=1e-14)  # [0.657, 0.250]


@pytest.mark.parametrize("cap", [None, 0.0])
def test_soft_capped_router_without_cap_is_softmax_top_k_unnormalised(cap):
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    weights, _ = soft_capped_softmax_top_k(logits, top_k=2, router_logit_softcapping=cap)
    np.testing.assert_allclose(weights, [[0.644, 0.237]], atol=5e-4)


# The tie rule: among equal scores the lower expert index wins

TIE_ROUTERS = {
    "softmax_top_k": lambda z, k: softmax_top_k(z, k, norm_topk_prob=True),
    "top_k_softmax": top_k_softmax,
    "llama4_top_k_sigmoid": llama4_top_k_sigmoid,
    "soft_capped_softmax_top_k": lambda z, k: soft_capped_softmax_top_k(z, k, router_logit_softcapping=30.0),
    "sigmoid_bias_top_k": lambda z, k: sigmoid_bias_top_k(z, np.zeros(z.shape[1]), k),
    "sigmoid_group_top_k": lambda z, k: sigmoid_group_top_k(z, np.zeros(z.shape[1]), top_k=k),
}


@pytest.mark.parametrize("name", TIE_ROUTERS)
def test_ties_go_to_the_lowest_index(name):
    with pytest.warns(RoutingTieWarning, match="2 of 2 token"):
        _, indices = TIE_ROUTERS[name](np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 2)
    assert indices.tolist() == [[0, 1], [0, 1]]


def test_ties_inside_or_outside_the_chosen_set_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, indices = softmax_top_k(np.array([[1.0, 1.0, 0.0, 0.0]]), 2, norm_topk_prob=True)
        top_k_indices(np.array([[3.0, 1.0, 1.0, -np.inf, -np.inf]]), 3)
    assert indices.tolist() == [[0, 1]]


def test_top_k_indices_descending_then_by_index():
    scores = np.array([[0.5, 2.0, 0.5, 2.0, -np.inf, 1.0]])
    assert top_k_indices(scores, 6).tolist() == [[1, 3, 5, 0, 2, 4]]


def test_group_ties_go_to_the_lowest_group():
    # Four groups with equal scores, keep one: group 0.
    with pytest.warns(RoutingTieWarning):
        _, indices = group_route(np.zeros((1, 8)), np.zeros(8), top_k=2, n_group=4)
    assert indices.tolist() == [[0, 1]]


def test_torch_topk_breaks_ties_otherwise():
    """Evidence for why the tie rule is ours: torch 2.x on CPU returns [1, 2] for topk([1, 1, 1, 0], 2).

    If this starts failing, torch changed its tie order; the reference's rule stays.
    """
    torch = pytest.importorskip("torch")
    assert torch.topk(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).indices.tolist() == [1, 2]
    with pytest.warns(RoutingTieWarning):
        assert top_k_indices(np.array([[1.0, 1.0, 1.0, 0.0]]), 2).tolist() == [[0, 1]]


# Awkward sizes: k = 1 and k = E, one token, float32

@pytest.mark.parametrize("k", [1, 5])
def test_k_one_and_k_all_experts(k):
    rng = np.random.default_rng(k)
    logits = rng.standard_normal((1, 5))
    weights, indices = softmax_top_k(logits, k, norm_topk_prob=True)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-15)
    assert sorted(indices[0].tolist()) == sorted(np.argsort(-logits[0])[:k].tolist())
    if k == 5:
        p = np.exp(logits[0]) / np.exp(logits[0]).sum()
        np.testing.assert_allclose(dense_routing(weights, indices, 5)[0], p, rtol=1e-14)


def test_routers_compute_in_float32_for_float32_logits():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    for weights, indices in (softmax_top_k(z, 2, norm_topk_prob=False), top_k_softmax(z, 2),
                             sigmoid_group_top_k(z, b, top_k=2, n_group=2, topk_group=1,
                                                 routed_scaling_factor=2.5),
                             sigmoid_bias_top_k(z, b, 2), llama4_top_k_sigmoid(z, 1),
                             soft_capped_softmax_top_k(z, 2, router_logit_softcapping=30.0)):
        assert weights.dtype == np.float32 and indices.dtype == np.int64


# dense_routing

def test_dense_routing_is_order_free():
    a = dense_routing(np.array([[0.7, 0.3]]), np.array([[2, 0]]), 4)
    b = dense_routing(np.array([[0.3, 0.7]]), np.array([[0, 2]]), 4)
    np.testing.assert_array_equal(a, [[0.3, 0.0, 0.7, 0.0]])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("weights, indices, match", [
    (np.ones((2, 2)), np.zeros((2, 3), np.int64), "must be equal"),
    (np.ones((1, 2)), np.array([[0, 4]]), r"\[0, 4\)"),
    (np.ones((1, 2)), np.array([[-1, 0]]), r"\[0, 4\)"),
    (np.ones((1, 2)), np.array([[1, 1]]), "same expert twice"),
])
def test_dense_routing_errors(weights, indices, match):
    with pytest.raises(ShapeError, match=match):
        dense_routing(weights, indices, 4)


# Errors: one line, the right class, naming the problem

Z = np.zeros((2, 4))
B = np.zeros(4)

ERRORS = [
    (lambda: softmax_top_k(Z, 0, norm_topk_prob=True), ConfigError, r"top_k must be an integer in \[1, 4\]"),
    (lambda: softmax_top_k(Z, 5, norm_topk_prob=True), ConfigError, "got 5"),
    (lambda: softmax_top_k(Z, 1.5, norm_topk_prob=True), ConfigError, "got 1.5"),
    (lambda: softmax_top_k(Z, True, norm_topk_prob=True), ConfigError, "got True"),
    (lambda: softmax_top_k(Z, 2, norm_topk_prob="yes"), ConfigError, "norm_topk_prob must be a bool"),
    (lambda: softmax_top_k(np.zeros(4), 2, norm_topk_prob=True), ShapeError, "router_logits"),
    (lambda: softmax_top_k(np.zeros((2, 0)), 1, norm_topk_prob=True), ShapeError, "no experts"),
    (lambda: softmax_top_k(np.zeros((2, 4), np.int64), 1, norm_topk_prob=True), InputError, "router_logits"),
    (lambda: top_k_softmax(Z, 7), ConfigError, "top_k"),
    (lambda: llama4_top_k_sigmoid(Z, 0), ConfigError, "top_k"),
    (lambda: sigmoid_bias_top_k(Z, np.zeros(3), 2), ShapeError, r"e_score_correction_bias must have shape \(4,\)"),
    (lambda: sigmoid_bias_top_k(Z, np.zeros((1, 4)), 2), ShapeError, "e_score_correction_bias"),
    (lambda: sigmoid_bias_top_k(Z, B.astype(np.float32), 2), InputError, "float32"),
    (lambda: sigmoid_group_top_k(Z, np.zeros(5), top_k=2), ShapeError, "e_score_correction_bias"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, n_group=3), ConfigError, "n_group 3 must divide the 4 experts"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, n_group=4), ConfigError, "groups of at least 2"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, n_group=0), ConfigError, "n_group must be a positive integer"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, n_group=2, topk_group=3), ConfigError, "topk_group 3 exceeds"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, n_group=2, topk_group=0), ConfigError, "topk_group"),
    # top_k larger than the experts of the kept groups would pick -inf-masked experts.
    (lambda: sigmoid_group_top_k(Z, B, top_k=3, n_group=2, topk_group=1), ConfigError, r"\[1, 2\]"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, routed_scaling_factor=0.0), ConfigError, "routed_scaling_factor"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, routed_scaling_factor=float("nan")), ConfigError,
     "routed_scaling_factor"),
    (lambda: sigmoid_group_top_k(Z, B, top_k=2, norm_topk_prob=1), ConfigError, "norm_topk_prob"),
    (lambda: soft_capped_softmax_top_k(Z, 2, router_logit_softcapping=-30.0), ConfigError,
     "router_logit_softcapping"),
    (lambda: soft_capped_softmax_top_k(Z, 2, router_logit_softcapping=float("inf")), ConfigError,
     "router_logit_softcapping"),
]


@pytest.mark.parametrize("call, error, match", ERRORS, ids=[f"{i}-{e[2][:30]}" for i, e in enumerate(ERRORS)])
def test_bad_input_raises_one_line_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, RefimplError) and "\n" not in str(info.value)


# Agreement with transformers' router modules (float64, float32 islands lifted)

SEEDS = (0, 1, 2)


def _hf_dense(torch, weights, indices, num_experts):
    dense = torch.zeros(indices.shape[0], num_experts, dtype=weights.dtype)
    return dense.scatter(1, indices, weights).numpy()


def _assert_same_routing(ours_dense, hf_dense):
    np.testing.assert_array_equal(ours_dense != 0, hf_dense != 0, err_msg="chosen expert sets differ")
    np.testing.assert_allclose(ours_dense, hf_dense, rtol=1e-13, atol=1e-15)


def _draw(seed, tokens, experts, hidden=12):
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((tokens, hidden)), rng.standard_normal((experts, hidden)) / math.sqrt(hidden)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_group, topk_group, top_k, norm, rsf", [
    (4, 2, 3, True, 2.5),      # DeepSeek-V3-like: group limit active
    (1, 1, 2, True, 2.827),    # Kimi K2 / GLM-4.5: no groups
    (2, 1, 2, False, 2.5),     # no renormalisation, scaled
    (4, 4, 8, True, 1.0),      # k = E
])
def test_sigmoid_group_top_k_agrees_with_deepseek_v3_router(seed, n_group, topk_group, top_k, norm, rsf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from conformance.backends.hf_exact import exact_float64

    rng, x, w = _draw(seed, 13, 8)
    # A bias of the size of the score spread, so that it changes selections.
    bias = 0.3 * rng.standard_normal(8)
    config = transformers.DeepseekV3Config(hidden_size=12, n_routed_experts=8, num_experts_per_tok=top_k,
                                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                           routed_scaling_factor=rsf)
    with exact_float64(), torch.no_grad():
        router = DeepseekV3TopkRouter(config).double()
        router.weight.copy_(torch.from_numpy(w))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, hf_w, hf_i = router(torch.from_numpy(x))
    ours = sigmoid_group_top_k(x @ w.T, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                               norm_topk_prob=norm, routed_scaling_factor=rsf)
    _assert_same_routing(dense_routing(*ours, 8), _hf_dense(torch, hf_w, hf_i, 8))
    # The bias did change some selections (else this test could not see MOE-01).
    unbiased = sigmoid_group_top_k(x @ w.T, np.zeros(8), top_k=top_k, n_group=n_group, topk_group=topk_group,
                                   norm_topk_prob=norm, routed_scaling_factor=rsf)
    if top_k < 8:
        assert as_sets(unbiased[1]) != as_sets(ours[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k, norm", [(2, True), (2, False), (1, True), (6, False)])
def test_softmax_top_k_agrees_with_qwen3_moe_router(seed, top_k, norm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from conformance.backends.hf_exact import exact_float64

    _, x, w = _draw(seed, 11, 6)
    config = transformers.Qwen3MoeConfig(hidden_size=12, num_experts=6, num_experts_per_tok=top_k,
                                         norm_topk_prob=norm)
    with exact_float64(), torch.no_grad():
        router = Qwen3MoeTopKRouter(config).double()
        router.weight.copy_(torch.from_numpy(w))
        _, hf_w, hf_i = router(torch.from_numpy(x))
    assert hf_w.dtype == torch.float64
    _assert_same_routing(dense_routing(*softmax_top_k(x @ w.T, top_k, norm_topk_prob=norm), 6),
                         _hf_dense(torch, hf_w, hf_i, 6))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_softmax_agrees_with_gpt_oss_router(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    rng, x, w = _draw(seed, 9, 4)
    bias = 0.5 * rng.standard_normal(4)
    config = transformers.GptOssConfig(hidden_size=12, num_local_experts=4, num_experts_per_tok=top_k)
    with torch.no_grad():
        router = GptOssTopKRouter(config).double()
        router.weight.copy_(torch.from_numpy(w))
        router.bias.copy_(torch.from_numpy(bias))
        _, hf_w, hf_i = router(torch.from_numpy(x))
    _assert_same_routing(dense_routing(*top_k_softmax(x @ w.T + bias, top_k), 4), _hf_dense(torch, hf_w, hf_i, 4))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_top_k_sigmoid_agrees_with_llama4_router(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    from conformance.backends.hf_exact import exact_float64

    _, x, w = _draw(seed, 7, 5)
    config = transformers.Llama4TextConfig(hidden_size=12, num_local_experts=5, num_experts_per_tok=top_k)
    with exact_float64(), torch.no_grad():
        router = Llama4Router(config).double()
        router.weight.copy_(torch.from_numpy(w))
        hf_scores, _ = router(torch.from_numpy(x))  # (N, E): sigmoid(-inf) = 0 where not chosen
    _assert_same_routing(dense_routing(*llama4_top_k_sigmoid(x @ w.T, top_k), 5), hf_scores.numpy())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_sigmoid_bias_top_k_agrees_with_minimax_m2_router(seed, top_k):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    from conformance.backends.hf_exact import exact_float64

    rng, x, w = _draw(seed, 13, 8)
    bias = 0.3 * rng.standard_normal(8)
    config = transformers.MiniMaxM2Config(hidden_size=12, num_local_experts=8, num_experts_per_tok=top_k)
    with exact_float64(), torch.no_grad():
        router = MiniMaxM2TopKRouter(config).double()
        router.weight.copy_(torch.from_numpy(w))
        _, hf_w, hf_i = router(torch.from_numpy(x), torch.from_numpy(bias))
    assert hf_w.dtype == torch.float64
    _assert_same_routing(dense_routing(*sigmoid_bias_top_k(x @ w.T, bias, top_k), 8), _hf_dense(torch, hf_w, hf_i, 8))
