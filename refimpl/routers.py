"""Mixture-of-Experts routers: router logits ``(N, E)`` to the chosen experts and their weights.

Every router returns ``(weights, indices)``, both ``(N, k)``: row ``n`` sends token
``n`` to experts ``indices[n, j]`` with combine weights ``weights[n, j]`` (for Llama 4
the weight scales the expert *input*, see :func:`llama4_top_k_sigmoid`). The
router linear itself (``logits = x W_router^T (+ b)``) is :func:`router_logits`.

Notation: N tokens, E routed experts (``n_routed_experts`` / ``num_local_experts`` /
``num_experts``), k experts per token (``num_experts_per_tok``).

Tie rule
    Experts are chosen by :func:`top_k_indices`: the k largest scores, in descending
    order; among exactly equal scores the lower expert index comes first (a stable
    sort). Group selection in :func:`sigmoid_group_top_k` follows the same rule over
    group indices. Which expert wins a tie is this rule, not the paper's (the papers
    leave it open) and not torch's (``torch.topk`` documents no tie order; on the
    CPU ``torch.topk([1, 1, 1, 0], 2)`` returns indices [1, 2], not [0, 1]). When
    such a tie decides the chosen set, a :class:`refimpl.errors.RoutingTieWarning`
    says so (an all-zero router, duplicated router rows). The conformance suite compares the chosen *set* of experts per token and its weights;
    the order of the k slots is never part of the spec. A tie *at the selection
    boundary* (the k-th and (k+1)-th scores equal) is therefore implementation-defined
    and not tested: the golden corpus holds only ties entirely inside or entirely
    outside the chosen set.

NaN in the logits or the correction bias is refused (``InputError``): which expert
a NaN score selects is undefined, and engines differ (NumPy's sort puts NaN last,
``torch.topk`` treats it as the largest). Infinite logits are not special-cased.

Dtype: float64 or float32 logits; every router computes in the dtype of its logits
(transformers' routers that compute in float32 for a float64 model are float32
islands, see ``docs/transformers-differences.md``). float16 / bfloat16 logits (and
correction bias) are widened to float32: scores, selection and weights are computed
in float32 (the experts are chosen from the float32 scores) and the weights rounded
once to the logits' dtype; the indices are int64 in every dtype.

Sources: Qwen3-MoE / Qwen3-Next ``*TopKRouter`` (softmax, top-k, optional
renormalisation); gpt-oss ``GptOssTopKRouter`` (top-k on logits, softmax over the
chosen); DeepSeek-V3 ``DeepseekV3TopkRouter`` and GLM-4.5 ``Glm4MoeTopkRouter``
(DeepSeek-V3 report, arXiv:2412.19437, sec. 2.1.2 eqs. 12-16 and "auxiliary-loss-free
load balancing"); MiniMax-M2 ``MiniMaxM2TopKRouter``-equivalent code in
``modeling_minimax_m2.py``; Llama 4 ``Llama4Router``; Grok 2.5 in sglang
``models/grok.py`` (router soft-cap, softmax, top-k, no renormalisation). All files
from transformers 5.24 unless named otherwise.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import ConfigError, InputError, RoutingTieWarning, ShapeError
from .linear import linear
from .numerics import as_float_array, check_finite, check_finite_positive, to_compute, to_storage
from .softcap import soft_cap


def router_logits(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The router projection ``x W^T (+ b)``, ``(N, E)`` for rows ``x`` ``(N, M)`` and ``W`` ``(E, M)``.

    :func:`refimpl.linear.linear` in float64 and float32. For float16 / bfloat16 ``x`` and
    weights the logits are the float32 product, *not* rounded to the storage dtype: the
    router is one component from the hidden state to the routing weights, and the experts
    are chosen from float32 scores (transformers computes DeepSeek-V3's and GLM-4.5's router
    linear in float32 too; rounding the logits to bfloat16 first flips near-tied choices).

    Raises:
        As :func:`refimpl.linear.linear`.
    """
    return linear(to_compute(x), to_compute(weight), to_compute(bias))


def _check_top_k(name: str, top_k, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
        raise ConfigError(f"{name}: top_k must be an integer in [1, {num_experts}] (num experts), got {top_k!r}")
    return int(top_k)


def _logits(name: str, router_logits) -> np.ndarray:
    logits = as_float_array(f"{name}: router_logits", router_logits, ndim=2)
    if logits.shape[1] == 0:
        raise ShapeError(f"{name}: router_logits has no experts (shape {logits.shape})")
    if np.isnan(logits).any():
        raise InputError(f"{name}: router_logits contain NaN; top-k selection over NaN is undefined "
                         "(a sort puts it last, torch.topk first), so it is refused instead of guessed")
    return logits


def _bias(name: str, bias, logits: np.ndarray) -> np.ndarray:
    bias = as_float_array(f"{name}: e_score_correction_bias", bias, ndim=1)
    if bias.shape != (logits.shape[1],):
        raise ShapeError(
            f"{name}: e_score_correction_bias must have shape ({logits.shape[1]},) (one per expert), got {bias.shape}"
        )
    if np.isnan(bias).any():
        raise InputError(f"{name}: e_score_correction_bias contains NaN")
    if bias.dtype != logits.dtype:
        raise InputError(f"{name}: e_score_correction_bias is {bias.dtype}, router_logits {logits.dtype}")
    return bias


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_indices(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices ``(N, k)`` int64 of the ``top_k`` largest entries of each row of ``scores`` ``(N, E)``.

    Descending by score; exactly equal scores keep ascending index order (the
    module's tie rule). ``-inf`` entries sort last. When the k-th and (k+1)-th
    scores of a row are exactly equal (and finite) the chosen *set* depends on the
    tie rule, so a :class:`refimpl.errors.RoutingTieWarning` names how many rows.
    """
    order = np.argsort(-scores, axis=-1, kind="stable")
    if top_k < scores.shape[-1]:
        kth = np.take_along_axis(scores, order[:, top_k - 1:top_k + 1], axis=-1)
        tied = (kth[:, 0] == kth[:, 1]) & np.isfinite(kth[:, 0])
        if tied.any():
            warnings.warn(
                f"{int(tied.sum())} of {len(tied)} token(s) have exactly equal scores at the top-{top_k} boundary; "
                "the lower expert index was chosen (refimpl's tie rule; torch.topk and engines may choose "
                "another)", RoutingTieWarning, stacklevel=3)
    return order[:, :top_k].astype(np.int64)


def softmax_top_k(router_logits: np.ndarray, top_k: int, *, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, keep the top ``top_k`` probabilities, optionally renormalise.

    ``p = softmax(logits)``; ``w = p[top-k]``; if ``norm_topk_prob``: ``w /= sum(w)``.
    Without renormalisation the weights are the *probabilities* (they sum to less than
    1), never the raw logits (bug class MOE-04).

    Used by Qwen3-MoE and Qwen3-Next (``Qwen3MoeTopKRouter``).

    Args:
        router_logits: ``(N, E)``, a float array (float16 / bfloat16: computed in float32).
        top_k: ``num_experts_per_tok``, 1 <= k <= E.
        norm_topk_prob: renormalise the chosen probabilities to sum to 1.

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError, ShapeError: logits not a 2-D float array.
        ConfigError: ``top_k`` out of range, ``norm_topk_prob`` not a bool.
    """
    logits = _logits("softmax_top_k", router_logits)
    k = _check_top_k("softmax_top_k", top_k, logits.shape[1])
    if not isinstance(norm_topk_prob, (bool, np.bool_)):
        raise ConfigError(f"softmax_top_k: norm_topk_prob must be a bool, got {norm_topk_prob!r}")
    storage = logits.dtype
    probs = _softmax(to_compute(logits))
    indices = top_k_indices(probs, k)
    weights = np.take_along_axis(probs, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return to_storage(weights, storage), indices


def top_k_softmax(router_logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``top_k`` of the raw logits, then a softmax over the chosen logits only.

    ``i = top-k(logits)``; ``w = softmax(logits[i])`` (weights sum to 1). The router
    bias of gpt-oss is part of the logits (``router.bias`` in the linear).

    Used by gpt-oss (``GptOssTopKRouter``).

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError, ShapeError: logits not a 2-D float array.
        ConfigError: ``top_k`` out of range.
    """
    logits = _logits("top_k_softmax", router_logits)
    k = _check_top_k("top_k_softmax", top_k, logits.shape[1])
    storage, logits = logits.dtype, to_compute(logits)
    indices = top_k_indices(logits, k)
    return to_storage(_softmax(np.take_along_axis(logits, indices, axis=-1)), storage), indices


def sigmoid_group_top_k(
    router_logits: np.ndarray, e_score_correction_bias: np.ndarray, *, top_k: int, n_group: int = 1,
    topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's auxiliary-loss-free router with group-limited selection ("noaux_tc").

    1. ``s = sigmoid(logits)`` (the affinities, eq. 15 of the DeepSeek-V3 report).
    2. Selection scores ``c = s + b`` with ``b = e_score_correction_bias``; the bias
       steers selection only and never enters the weights (bug class MOE-01).
    3. The E experts form ``n_group`` consecutive groups of E / n_group; a group's score
       is the sum of its two largest ``c``; the ``topk_group`` best groups are kept and
       every expert of another group gets ``c = -inf`` (not 0: with negative ``c`` a
       0 fill would let excluded experts win, bug classes MOE-02/03).
    4. ``i = top-k(c)``; ``w = s[i]``; if ``norm_topk_prob``: ``w /= (sum(w) + 1e-20)``.
    5. ``w *= routed_scaling_factor``, whether or not renormalised (bug class MOE-05).

    Used by DeepSeek-V3, Kimi K2 (``n_group`` 1) and GLM-4.5 (``n_group`` 1).

    Args:
        router_logits: ``(N, E)``, a float array (float16 / bfloat16: computed in float32).
        e_score_correction_bias: ``(E,)`` same dtype.
        top_k: ``num_experts_per_tok``; must not exceed the experts in the kept groups.
        n_group: number of expert groups; divides E, at least 2 experts per group.
        topk_group: groups kept per token, 1 <= topk_group <= n_group.
        norm_topk_prob: renormalise the chosen affinities.
        routed_scaling_factor: finite, > 0.

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError: not float arrays, or the bias dtype differs from the logits'.
        ShapeError: logits not (N, E), bias not (E,). ConfigError: inconsistent group settings.
    """
    name = "sigmoid_group_top_k"
    logits = _logits(name, router_logits)
    bias = _bias(name, e_score_correction_bias, logits)
    num_experts = logits.shape[1]
    for label, value in (("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}: {label} must be a positive integer, got {value!r}")
    if num_experts % n_group or num_experts // n_group < 2:
        raise ConfigError(
            f"{name}: n_group {n_group} must divide the {num_experts} experts into groups of at least 2"
        )
    if topk_group > n_group:
        raise ConfigError(f"{name}: topk_group {topk_group} exceeds n_group {n_group}")
    per_group = num_experts // n_group
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= topk_group * per_group:
        raise ConfigError(f"{name}: top_k must be an integer in [1, {topk_group * per_group}] (the experts in the "
                          f"{topk_group} kept group(s) of {per_group}), got {top_k!r}")
    k = int(top_k)
    if not isinstance(norm_topk_prob, (bool, np.bool_)):
        raise ConfigError(f"{name}: norm_topk_prob must be a bool, got {norm_topk_prob!r}")
    check_finite_positive(f"{name}: routed_scaling_factor", routed_scaling_factor, error=ConfigError)

    storage, logits, bias = logits.dtype, to_compute(logits), to_compute(bias)
    scores = _sigmoid(logits)
    choice = scores + bias
    grouped = choice.reshape(len(choice), n_group, per_group)
    group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)
    kept_groups = top_k_indices(group_scores, topk_group)
    kept = np.zeros((len(choice), n_group), dtype=bool)
    np.put_along_axis(kept, kept_groups, True, axis=-1)
    choice = np.where(np.repeat(kept, per_group, axis=-1), choice, -np.inf)
    indices = top_k_indices(choice, k)
    weights = np.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + logits.dtype.type(1e-20))
    return to_storage(weights * logits.dtype.type(routed_scaling_factor), storage), indices


def sigmoid_bias_top_k(
    router_logits: np.ndarray, e_score_correction_bias: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """MiniMax-M2's router: sigmoid affinities, biased selection, always renormalised.

    ``s = sigmoid(logits)``; ``i = top-k(s + b)``; ``w = s[i] / sum(s[i])`` (no epsilon,
    no group limit, no scaling factor). The bias steers selection only (bug class MOE-01).

    Source: ``modeling_minimax_m2.py`` (``MiniMaxM2SparseMoeBlock.route_tokens_to_experts``).

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError, ShapeError: bad arrays. ConfigError: ``top_k`` out of range.
    """
    name = "sigmoid_bias_top_k"
    logits = _logits(name, router_logits)
    bias = _bias(name, e_score_correction_bias, logits)
    k = _check_top_k(name, top_k, logits.shape[1])
    storage, logits, bias = logits.dtype, to_compute(logits), to_compute(bias)
    scores = _sigmoid(logits)
    indices = top_k_indices(scores + bias, k)
    weights = np.take_along_axis(scores, indices, axis=-1)
    return to_storage(weights / weights.sum(axis=-1, keepdims=True), storage), indices


def llama4_top_k_sigmoid(router_logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Llama 4's router: top-k of the raw logits, weight ``sigmoid(logit)`` of each chosen expert.

    ``i = top-k(logits)``; ``w = sigmoid(logits[i])`` (not normalised; Llama 4 ships
    ``num_experts_per_tok`` 1). The weight multiplies the expert's **input**,
    ``y = Expert_i(w * x)``, not its output (bug classes ACT-06/07/08); see
    :func:`refimpl.moe.dispatch` with ``weight_on="input"``.

    Source: ``Llama4Router`` and ``Llama4TextMoe`` in ``modeling_llama4.py``.

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError, ShapeError: bad arrays. ConfigError: ``top_k`` out of range.
    """
    logits = _logits("llama4_top_k_sigmoid", router_logits)
    k = _check_top_k("llama4_top_k_sigmoid", top_k, logits.shape[1])
    storage, logits = logits.dtype, to_compute(logits)
    indices = top_k_indices(logits, k)
    return to_storage(_sigmoid(np.take_along_axis(logits, indices, axis=-1)), storage), indices


def soft_capped_softmax_top_k(
    router_logits: np.ndarray, top_k: int, *, router_logit_softcapping: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Grok 2.5's router: soft-cap the logits, softmax over all experts, top-k, no renormalisation.

    ``p = softmax(cap * tanh(logits / cap))``; ``w = p[top-k]`` (sums to less than 1).
    ``router_logit_softcapping`` None or 0 means no cap.

    Source: sglang ``python/sglang/srt/models/grok.py`` (``fused_moe_router_shim`` with
    ``renormalize=False``) and xai-org/grok-1 ``model.py`` (un-renormalised top-k gates).

    Returns:
        ``(weights (N, k), indices (N, k) int64)``.

    Raises:
        InputError, ShapeError: bad arrays. ConfigError: ``top_k`` out of range or a
        negative / non-finite cap.
    """
    logits = _logits("soft_capped_softmax_top_k", router_logits)
    # The cap, the softmax and the choice all in float32 for float16 / bfloat16 logits.
    storage, logits = logits.dtype, to_compute(logits)
    if router_logit_softcapping:
        check_finite_positive(
            "soft_capped_softmax_top_k: router_logit_softcapping", router_logit_softcapping, error=ConfigError
        )
        logits = soft_cap(logits, router_logit_softcapping)
    elif router_logit_softcapping is not None:
        check_finite("soft_capped_softmax_top_k: router_logit_softcapping", router_logit_softcapping, error=ConfigError)
    weights, indices = softmax_top_k(logits, top_k, norm_topk_prob=False)
    return to_storage(weights, storage), indices


def dense_routing(weights: np.ndarray, indices: np.ndarray, num_experts: int) -> np.ndarray:
    """The routing as a dense ``(N, E)`` matrix: ``weights`` at the chosen experts, 0 elsewhere.

    Order-free: two routers that choose the same experts with the same weights in a
    different slot order give the same matrix.

    Raises:
        InputError: ``indices`` not integers.
        ShapeError: ``weights`` and ``indices`` differ in shape, an index is outside
            ``[0, num_experts)``, or a row names an expert twice.
    """
    weights = np.asarray(weights)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise InputError(f"dense_routing: indices must be integers, got {indices.dtype}")
    if weights.shape != indices.shape or weights.ndim != 2:
        raise ShapeError(f"dense_routing: weights {weights.shape} and indices {indices.shape} must be equal (N, k)")
    if indices.size and (indices.min() < 0 or indices.max() >= num_experts):
        raise ShapeError(f"dense_routing: expert indices must lie in [0, {num_experts}), got {indices.min()}..{indices.max()}")
    if indices.size and (np.sort(indices, axis=-1)[:, 1:] == np.sort(indices, axis=-1)[:, :-1]).any():
        raise ShapeError("dense_routing: a token names the same expert twice")
    dense = np.zeros((weights.shape[0], num_experts), dtype=weights.dtype)
    np.put_along_axis(dense, indices, weights, axis=-1)
    return dense
