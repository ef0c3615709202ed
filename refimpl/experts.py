"""One routed expert, in each of the fused weight layouts the 2025 MoE checkpoints use.

Each function applies **one** expert ``e`` to the rows routed to it: ``x`` ``(n, M)``
and that expert's slice of the fused tensors (``gate_up_proj[e]``, ``down_proj[e]``,
...). :mod:`refimpl.moe` loops over experts and combines.

=============================  ===================  ===================  ========================================
function                       gate_up_proj[e]      down_proj[e]         used by
=============================  ===================  ===================  ========================================
swiglu_expert                  (2I, M) gate rows    (M, I)               DeepSeek-V3, Kimi K2, GLM-4.5,
                               0..I-1, up I..2I-1                        MiniMax-M2, Qwen3-MoE, Qwen3-Next
input_major_swiglu_expert      (M, 2I) gate cols    (I, M)               Llama 4
                               0..I-1, up I..2I-1
clamped_swiglu_expert          (M, 2I) interleaved: (I, M) + bias (M,)   gpt-oss
                               gate even, up odd;
                               + bias (2I,)
=============================  ===================  ===================  ========================================

Grok 2.5's experts are separate ``w1``/``w3``/``w2`` matrices with erf-GELU; they are
:func:`refimpl.mlp.gated_mlp` with ``hidden_act="gelu"``.

Dtype: float64 or float32, computed in the dtype of ``x`` (the weights must share it).
float16 / bfloat16: each projection (with its bias), the activation (:func:`clamped_swiglu`
for gpt-oss) and the gating product rounded to the storage dtype, each computed in float32.

Sources: Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202 (SwiGLU);
transformers 5.24 ``DeepseekV3Experts`` / ``Qwen3MoeExperts`` (concatenated gate|up),
``Llama4TextExperts`` (input-major ``bmm``), ``GptOssExperts._apply_gate`` (clamp,
alpha, ``+1``); OpenAI's gpt-oss reference ``gpt_oss/torch/model.py`` ``swiglu``.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .linear import linear
from .mlp import activation, silu
from .numerics import as_float_array, check_finite_positive, check_same_dtype, to_compute, to_storage
from .errors import ConfigError


def _check(name: str, x, **weights) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = as_float_array(f"{name}: x", x, ndim=2)
    checked = {k: as_float_array(f"{name}: {k}", v) for k, v in weights.items()}
    check_same_dtype(x=x, **checked)
    return x, checked


def _input_major(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight (+ bias)`` for an input-major ``(in, out)`` weight, with the dtype rule of
    :func:`refimpl.linear.linear` (float16 / bfloat16: in float32, rounded once)."""
    y = to_compute(x) @ to_compute(weight)
    if bias is not None:
        y = y + to_compute(bias)
    return to_storage(y, x.dtype)


def swiglu_expert(
    x: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray, hidden_act: str = "silu"
) -> np.ndarray:
    """``down( act(gate x) * up x )`` with gate and up stacked as rows of one ``(2I, M)`` tensor.

    Args:
        x: ``(n, M)`` rows routed to this expert.
        gate_up_proj: ``(2I, M)``: rows ``0..I-1`` are the gate (``w1``), rows ``I..2I-1``
            the up projection (``w3``); used as ``x @ W.T``.
        down_proj: ``(M, I)`` (``w2``).
        hidden_act: ``"silu"`` (SwiGLU, every model here) or another name of
            :data:`refimpl.mlp.ACTIVATIONS`.

    Returns:
        ``(n, M)``.

    Raises:
        InputError: not float arrays. ShapeError: the weights do not fit.
        ConfigError: unknown activation.
    """
    x, w = _check("swiglu_expert", x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    gate_up, down = w["gate_up_proj"], w["down_proj"]
    m = x.shape[1]
    if gate_up.ndim != 2 or gate_up.shape[0] % 2 or gate_up.shape[1] != m or down.shape != (m, gate_up.shape[0] // 2):
        raise ShapeError(f"swiglu_expert: x {x.shape}, gate_up_proj {gate_up.shape} and down_proj {down.shape} do not "
                         "fit (need x (n, M), gate_up_proj (2I, M), down_proj (M, I))")
    i = gate_up.shape[0] // 2
    h = linear(x, gate_up)
    return linear(activation(hidden_act)(h[:, :i]) * h[:, i:], down)


def input_major_swiglu_expert(x: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """SwiGLU with input-major fused weights: ``(silu(x G) * (x U)) D`` (Llama 4).

    Args:
        x: ``(n, M)``.
        gate_up_proj: ``(M, 2I)``: columns ``0..I-1`` gate, ``I..2I-1`` up; used as ``x @ W``.
        down_proj: ``(I, M)``; used as ``h @ W``.

    Returns:
        ``(n, M)``.

    Raises:
        InputError: not float arrays. ShapeError: the weights do not fit.
    """
    x, w = _check("input_major_swiglu_expert", x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    gate_up, down = w["gate_up_proj"], w["down_proj"]
    m = x.shape[1]
    if gate_up.ndim != 2 or gate_up.shape[1] % 2 or gate_up.shape[0] != m or down.shape != (gate_up.shape[1] // 2, m):
        raise ShapeError(f"input_major_swiglu_expert: x {x.shape}, gate_up_proj {gate_up.shape} and down_proj "
                         f"{down.shape} do not fit (need x (n, M), gate_up_proj (M, 2I), down_proj (I, M))")
    i = gate_up.shape[1] // 2
    h = _input_major(x, gate_up)
    return _input_major(silu(h[:, :i]) * h[:, i:], down)


def clamped_swiglu(gate: np.ndarray, up: np.ndarray, *, swiglu_limit: float, alpha: float = 1.702) -> np.ndarray:
    """gpt-oss's activation: ``(clip(up, -L, L) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, L)``.

    The gate is clamped from above only, the linear half on both sides, and the linear
    half gets ``+1``. ``alpha`` = 1.702 (sigmoid approximation of GELU), ``L`` =
    ``swiglu_limit`` (7.0 in gpt-oss). Other clamp forms (DeepSeek-V4's, Ling's) are
    different functions (bug classes ACT-02/03/05).

    Dtype: that of ``gate`` and ``up``; float16 / bfloat16 computed in float32 and rounded once.
    """
    check_finite_positive("clamped_swiglu: swiglu_limit", swiglu_limit, error=ConfigError)
    check_finite_positive("clamped_swiglu: alpha", alpha, error=ConfigError)
    storage, gate, up = gate.dtype, to_compute(gate), to_compute(up)
    g = np.minimum(gate, gate.dtype.type(swiglu_limit))
    u = np.clip(up, up.dtype.type(-swiglu_limit), up.dtype.type(swiglu_limit))
    with np.errstate(over="ignore"):
        glu = g / (1 + np.exp(-gate.dtype.type(alpha) * g))
    return to_storage((u + 1) * glu, storage)


def clamped_swiglu_expert(
    x: np.ndarray, gate_up_proj: np.ndarray, gate_up_proj_bias: np.ndarray, down_proj: np.ndarray,
    down_proj_bias: np.ndarray, *, swiglu_limit: float, alpha: float = 1.702,
) -> np.ndarray:
    """gpt-oss expert: ``(clamped_swiglu(x W + b) ) D + d`` with gate/up **interleaved** in ``W``.

    Args:
        x: ``(n, M)``.
        gate_up_proj: ``(M, 2I)`` input-major; column ``2j`` is gate channel j, column
            ``2j+1`` up channel j (not first half / second half).
        gate_up_proj_bias: ``(2I,)``, interleaved the same way.
        down_proj: ``(I, M)`` input-major. down_proj_bias: ``(M,)``.
        swiglu_limit: ``L`` > 0. alpha: > 0.

    Returns:
        ``(n, M)``; the down bias is part of the expert output (it is scaled by the
        routing weight with the rest).

    Raises:
        InputError: not float arrays. ShapeError: the weights do not fit.
        ConfigError: non-finite or non-positive ``swiglu_limit`` / ``alpha``.
    """
    name = "clamped_swiglu_expert"
    x, w = _check(name, x, gate_up_proj=gate_up_proj, gate_up_proj_bias=gate_up_proj_bias, down_proj=down_proj,
                  down_proj_bias=down_proj_bias)
    check_finite_positive(f"{name}: swiglu_limit", swiglu_limit, error=ConfigError)
    check_finite_positive(f"{name}: alpha", alpha, error=ConfigError)
    gate_up, b1, down, b2 = w["gate_up_proj"], w["gate_up_proj_bias"], w["down_proj"], w["down_proj_bias"]
    m = x.shape[1]
    two_i = gate_up.shape[1] if gate_up.ndim == 2 else -1
    if (gate_up.ndim != 2 or two_i % 2 or gate_up.shape[0] != m or b1.shape != (two_i,)
            or down.shape != (two_i // 2, m) or b2.shape != (m,)):
        raise ShapeError(f"{name}: x {x.shape}, gate_up_proj {gate_up.shape}, gate_up_proj_bias {b1.shape}, down_proj "
                         f"{down.shape}, down_proj_bias {b2.shape} do not fit (need x (n, M), gate_up_proj (M, 2I), "
                         "gate_up_proj_bias (2I,), down_proj (I, M), down_proj_bias (M,))")
    h = _input_major(x, gate_up, b1)
    return _input_major(clamped_swiglu(h[:, 0::2], h[:, 1::2], swiglu_limit=swiglu_limit, alpha=alpha), down, b2)
