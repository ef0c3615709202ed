"""Mixture-of-Experts combination: route, apply the chosen experts, combine; and layer schedules.

Two sibling forms of the same sum, proven equal by ``tests/test_moe.py``:

* :func:`dispatch` -- the reference: for each expert, gather the rows routed to it,
  apply the expert once to that batch, scale by the routing weights and scatter-add
  into the output (what every engine's grouped GEMM does).
* :func:`dense_mixture` -- the definition read off the paper: every expert applied
  to every token and mixed by the dense ``(N, E)`` routing matrix (zero where not
  chosen). Only valid for small models (cost N*E expert evaluations).

With ``weight_on="output"`` (every model except Llama 4) the token's output is
``y = sum_j w_j * Expert_{e_j}(x)``; with ``weight_on="input"`` (Llama 4,
``apply_router_weight_on_input``) it is ``y = sum_j Expert_{e_j}(w_j * x)``. The two
differ because experts are not linear (bug classes ACT-06/07/08).

Shared experts (DeepSeek ``n_shared_experts``, GLM-4.5, Llama 4's ``shared_expert``,
Qwen3-Next's gated one) and Grok 2.5's dense MLP are added by the model code, beside
these functions.

Papers: Shazeer et al., "Outrageously Large Neural Networks", arXiv:1701.06538 (sparse
gating); DeepSeekMoE, arXiv:2401.06066 (shared experts). Checked against transformers 5.24
``DeepseekV3Experts.forward`` (per-expert gather and ``index_add_``) and
``Llama4TextMoe.forward`` (weight on input).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import ConfigError, InputError, ShapeError
from .numerics import as_float_array, check_same_dtype, compute_dtype, to_compute, to_storage
from .routers import dense_routing

#: ``expert(e, rows) -> outputs``: expert ``e`` applied to ``rows`` ``(n, M)``, giving ``(n, M)``.
Expert = Callable[[int, np.ndarray], np.ndarray]

_WEIGHT_ON = ("output", "input")


def _check(name, x, weights, indices, num_experts, weight_on):
    x = as_float_array(f"{name}: x", x, ndim=2)
    weights = as_float_array(f"{name}: weights", weights, ndim=2)
    # Float32 routing weights (from float32 router logits) may combine float16 / bfloat16 rows.
    if weights.dtype != compute_dtype(x.dtype):
        check_same_dtype(x=x, weights=weights)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise InputError(f"{name}: indices must be integers, got {indices.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ConfigError(f"{name}: num_experts must be a positive integer, got {num_experts!r}")
    if weights.shape != indices.shape or weights.shape[0] != x.shape[0]:
        raise ShapeError(f"{name}: x {x.shape}, weights {weights.shape} and indices {indices.shape} do not fit "
                         "(need x (N, M), weights and indices (N, k))")
    if weight_on not in _WEIGHT_ON:
        raise ConfigError(f"{name}: weight_on must be one of {_WEIGHT_ON}, got {weight_on!r}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_experts):
        raise ShapeError(f"{name}: expert indices must lie in [0, {num_experts}), got {indices.min()}..{indices.max()}")
    if indices.shape[1] > 1 and (np.diff(np.sort(indices, axis=-1), axis=-1) == 0).any():
        raise ShapeError(f"{name}: a token names the same expert twice in indices (routers choose distinct experts)")
    return x, weights, indices


def _apply(name: str, expert: Expert, e: int, rows: np.ndarray) -> np.ndarray:
    out = expert(e, rows)
    if not isinstance(out, np.ndarray) or out.shape != rows.shape:
        shape = getattr(out, "shape", type(out).__name__)
        raise ShapeError(f"{name}: expert {e} returned {shape} for rows {rows.shape}; it must return the rows' shape")
    return out


def dispatch(
    x: np.ndarray, weights: np.ndarray, indices: np.ndarray, expert: Expert, num_experts: int, *,
    weight_on: str = "output",
) -> np.ndarray:
    """Sparse MoE combine: gather per expert, apply once, weighted scatter-add.

    Args:
        x: ``(N, M)`` token rows (flatten batch and sequence first).
        weights, indices: ``(N, k)`` from a router in :mod:`refimpl.routers`; ``weights`` in the
            dtype of ``x``, or float32 beside float16 / bfloat16 ``x``.
        expert: ``expert(e, rows)`` applying expert ``e`` to ``rows`` ``(n, M)``.
        num_experts: E.
        weight_on: ``"output"`` or ``"input"`` (Llama 4).

    Returns:
        ``(N, M)`` in the dtype of ``x``; rows of tokens routed nowhere are 0.
        Experts are visited in index order and each adds its contribution.

    Dtype: float16 / bfloat16: each expert runs on rows in the storage dtype (with
    ``weight_on="input"`` the scaled rows ``w * x`` are rounded to it, an expert's input);
    the products with the weights and the sum over the k experts are taken in float32
    and rounded once (a grouped GEMM's combine; transformers' ``index_add_`` rounds each
    addition).

    Raises:
        InputError: ``x`` / ``weights`` not float arrays of one dtype, ``indices`` not integers.
        ShapeError: shapes that do not fit, indices outside ``[0, E)``, an expert named twice
            in one row, or an expert returning a shape other than its rows'.
        ConfigError: unknown ``weight_on``, ``num_experts`` not a positive integer.
    """
    x, weights, indices = _check("dispatch", x, weights, indices, num_experts, weight_on)
    storage, weights = x.dtype, to_compute(weights)
    out = np.zeros(x.shape, dtype=compute_dtype(storage))
    for e in range(num_experts):
        rows, slots = np.nonzero(indices == e)
        if rows.size == 0:
            continue
        w = weights[rows, slots][:, None]
        if weight_on == "output":
            contribution = w * to_compute(_apply("dispatch", expert, e, x[rows]))
        else:
            scaled = to_storage(w * to_compute(x[rows]), storage)
            contribution = to_compute(_apply("dispatch", expert, e, scaled))
        np.add.at(out, rows, contribution)
    return to_storage(out, storage)


def dense_mixture(
    x: np.ndarray, weights: np.ndarray, indices: np.ndarray, expert: Expert, num_experts: int, *,
    weight_on: str = "output",
) -> np.ndarray:
    """The same sum as :func:`dispatch`, with every expert applied to every token.

    ``y = sum_e G[:, e] * Expert_e(x)`` (or ``Expert_e(G[:, e] * x)`` masked to the chosen
    experts for ``weight_on="input"``) with ``G`` the dense routing matrix of
    :func:`refimpl.routers.dense_routing`. Arguments, returns, dtype rule and errors as :func:`dispatch`.
    """
    x, weights, indices = _check("dense_mixture", x, weights, indices, num_experts, weight_on)
    storage = x.dtype
    gates = dense_routing(to_compute(weights), indices, num_experts)
    chosen = dense_routing(np.ones_like(weights), indices, num_experts) > 0
    out = np.zeros(x.shape, dtype=compute_dtype(storage))
    for e in range(num_experts):
        g = gates[:, e:e + 1]
        if weight_on == "output":
            out = out + g * to_compute(_apply("dense_mixture", expert, e, x))
        else:
            scaled = to_storage(g * to_compute(x), storage)
            out = out + np.where(chosen[:, e:e + 1], to_compute(_apply("dense_mixture", expert, e, scaled)), 0)
    return to_storage(out, storage)


# --- per-layer schedules: which decoder layers have a MoE block -----------------------------------------------


def first_k_dense_schedule(num_hidden_layers: int, first_k_dense_replace: int) -> tuple[bool, ...]:
    """``is_moe[l] = l >= first_k_dense_replace`` (DeepSeek-V3, Kimi K2, GLM-4.5).

    Source: ``DeepseekV3DecoderLayer`` / ``Glm4MoeDecoderLayer`` (``layer_idx >= config.first_k_dense_replace``).
    """
    _check_count("first_k_dense_replace", first_k_dense_replace)
    return tuple(layer >= first_k_dense_replace for layer in range(num_hidden_layers))


def interleaved_schedule(
    num_hidden_layers: int, interleave_moe_layer_step: int = 1, moe_layers: list[int] | None = None
) -> tuple[bool, ...]:
    """Llama 4: MoE on layers ``step-1, 2*step-1, ...`` unless ``moe_layers`` lists them explicitly.

    Source: ``Llama4TextConfig`` (``moe_layers`` default
    ``list(range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step))``).
    Scout: step 1 (every layer MoE); Maverick: step 2 (odd layers MoE, even dense).
    """
    if moe_layers is None:
        if isinstance(interleave_moe_layer_step, bool) or not isinstance(interleave_moe_layer_step, int) \
                or interleave_moe_layer_step < 1:
            raise ConfigError(f"interleave_moe_layer_step must be a positive integer, got {interleave_moe_layer_step!r}")
        moe_layers = list(range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step))
    _check_layer_list("moe_layers", moe_layers, num_hidden_layers)
    # A set: membership in the list would make a long schedule quadratic in the layer count.
    chosen = set(moe_layers)
    return tuple(layer in chosen for layer in range(num_hidden_layers))


def sparse_step_schedule(
    num_hidden_layers: int, decoder_sparse_step: int = 1, mlp_only_layers: list[int] | None = None,
    num_experts: int = 1,
) -> tuple[bool, ...]:
    """Qwen3-MoE / Qwen3-Next: MoE where ``l not in mlp_only_layers and E > 0 and (l + 1) % step == 0``.

    Source: ``Qwen3MoeDecoderLayer.__init__``.
    """
    if isinstance(decoder_sparse_step, bool) or not isinstance(decoder_sparse_step, int) or decoder_sparse_step < 1:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {decoder_sparse_step!r}")
    mlp_only_layers = list(mlp_only_layers or [])
    _check_layer_list("mlp_only_layers", mlp_only_layers, num_hidden_layers)
    dense = set(mlp_only_layers)
    return tuple(
        layer not in dense and num_experts > 0 and (layer + 1) % decoder_sparse_step == 0
        for layer in range(num_hidden_layers)
    )


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def _check_layer_list(name, layers, num_hidden_layers):
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_hidden_layers for i in layers
    ):
        raise ConfigError(f"{name} must be a list of layer indices in [0, {num_hidden_layers}), got {layers!r}")
