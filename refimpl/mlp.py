"""Gated feed-forward blocks: SwiGLU and GeGLU (exact erf or tanh-approximated GELU).

    MLP(x) = W_down ( act(W_gate x) * (W_up x) )
    act = silu(z)              = z * sigmoid(z)                                   hidden_act "silu"
    act = gelu(z)              = 0.5 z (1 + erf(z / sqrt(2)))                      "gelu" (exact, erf form)
    act = gelu_pytorch_tanh(z) = 0.5 z (1 + tanh( sqrt(2/pi) (z + 0.044715 z^3) ))  "gelu_pytorch_tanh"

Notation: M hidden_size, F intermediate_size.

Paper: Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202, eq. 6
(FFN_SwiGLU, FFN_GEGLU); tanh GELU: Hendrycks & Gimpel, arXiv:1606.08415, sec. 2.
Checked against: transformers 5.24 ``Qwen3MLP`` (silu) and ``Gemma3MLP``
(``hidden_activation = "gelu_pytorch_tanh"``, ``activations.PytorchGELUTanh``);
``"gelu"`` is transformers' ``ACT2FN["gelu"]`` (``activations.GELUActivation``,
``torch.nn.functional.gelu`` with ``approximate="none"``) and the activation of
Grok 2.5's experts and dense MLP on sglang's CUDA path (``gelu_and_mul``). The erf
and tanh forms differ by up to about 4.7e-4 absolute (near |z| = 2): two functions,
two names, never substituted for each other.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError, ShapeError
from .linear import linear
from .numerics import as_float_array, check_same_dtype, is_low_precision, to_compute, to_storage


def silu(z: np.ndarray) -> np.ndarray:
    """``z * sigmoid(z)`` elementwise, in the dtype of ``z`` (float16 / bfloat16: in float32,
    rounded once).

    Written as ``z / (1 + exp(-z))``; for very negative z, exp overflows to inf and
    the result is -0.0, the correct limit.
    """
    wide = to_compute(z)
    with np.errstate(over="ignore"):
        return to_storage(wide / (1 + np.exp(-wide)), z.dtype)


def gelu_tanh(z: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU ``0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))``, in the dtype of ``z``
    (float16 / bfloat16: in float32, rounded once)."""
    wide = to_compute(z)
    kind = wide.dtype.type
    c = kind(np.sqrt(2.0 / np.pi))
    return to_storage(kind(0.5) * wide * (1 + np.tanh(c * (wide + kind(0.044715) * wide * wide * wide))), z.dtype)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(z: np.ndarray) -> np.ndarray:
    """Exact GELU ``0.5 z (1 + erf(z / sqrt(2)))`` elementwise, in the dtype of ``z``.

    Dtype: evaluated in float64 with Python's ``math.erf`` (correctly rounded to within
    an ulp or so of float64; no SciPy needed) and rounded once to the dtype of ``z``
    (float16 / bfloat16 included: float64 is at least as accurate as their float32 compute).
    An element-by-element loop: fine for the reference's tiny models, slow for big ones.
    ``-inf`` gives ``-0.0``, the limit (0.5 z (1 + erf) would be ``-inf * 0``).
    """
    wide = np.asarray(z, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = 0.5 * wide * (1.0 + _erf(wide / math.sqrt(2.0)))
    out = np.where(np.isneginf(wide), -0.0, out)
    return to_storage(out, z.dtype) if is_low_precision(z.dtype) else out.astype(z.dtype)


#: ``hidden_act`` / ``hidden_activation`` names to functions.
ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh}


def activation(name: str):
    """The activation function called ``name`` in config.json.

    Raises:
        ConfigError: the name is not one of :data:`ACTIVATIONS`.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated_mlp(
    x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray, hidden_act: str = "silu"
) -> np.ndarray:
    """Gated feed-forward ``down( act(gate x) * up x )``.

    Args:
        x: ``(..., M)``.
        gate_proj: ``(F, M)`` (``mlp.gate_proj.weight``).
        up_proj: ``(F, M)`` (``mlp.up_proj.weight``).
        down_proj: ``(M, F)`` (``mlp.down_proj.weight``).
        hidden_act: ``"silu"`` (SwiGLU), ``"gelu"`` (GeGLU, exact erf GELU) or
            ``"gelu_pytorch_tanh"`` (GeGLU, tanh-approximated GELU).

    Returns:
        ``(..., M)`` in the dtype of ``x``.

    Dtype: computed in the dtype of ``x`` (float64 or float32); the weights must share it.
    float16 / bfloat16: the three projections, the activation and the product each
    rounded to the storage dtype (each computed in float32), as PyTorch eager runs it.

    Raises:
        InputError: an array is not float64, float32, bfloat16 or float16 (integers, complex, ...).
        ShapeError: the weights do not fit ``x`` or each other (the message names them).
        RefimplError: the arrays differ in dtype.
        ConfigError: unknown ``hidden_act``.
    """
    act = activation(hidden_act)
    x, gate_proj, up_proj, down_proj = _check_mlp(x, gate_proj, up_proj, down_proj)
    return linear(act(linear(x, gate_proj)) * linear(x, up_proj), down_proj)


def _check_mlp(x, gate_proj, up_proj, down_proj) -> tuple[np.ndarray, ...]:
    """The four arrays, checked: float arrays of one dtype, gate and up ``(F, M)``, down ``(M, F)``."""
    x = as_float_array("gated_mlp: x", x)
    gate, up, down = (as_float_array(f"gated_mlp: {name}", w, ndim=2) for name, w in
                      (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)))
    m = x.shape[-1] if x.ndim else None
    if gate.shape[1] != m or up.shape != gate.shape or down.shape != gate.shape[::-1]:
        raise ShapeError(f"gated_mlp: x {x.shape}, gate_proj {gate.shape}, up_proj {up.shape} and down_proj "
                         f"{down.shape} do not fit (need x (..., M), gate_proj and up_proj (F, M), down_proj (M, F))")
    check_same_dtype(x=x, gate_proj=gate, up_proj=up, down_proj=down)
    return x, gate, up, down


def swiglu_mlp(
    x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray
) -> np.ndarray:
    """SwiGLU feed-forward: :func:`gated_mlp` with ``hidden_act="silu"``."""
    return gated_mlp(x, gate_proj, up_proj, down_proj, "silu")
