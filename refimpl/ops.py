"""The named ops of the op-level conformance suite, with their reference signatures.

A kernel author tests one component at a time: the suite calls a backend's op
with exactly the arguments the reference function below takes (array inputs by
name, then keyword parameters) and compares the result with the golden output.
Each op is a thin adapter over the component modules; the math lives there.

=================  ===========================================================  ==============
op                 arguments                                                    returns
=================  ===========================================================  ==============
attention          q (B,T,H,D), k (B,S,Hkv,D), v (B,S,Hkv,Dv); scaling,         (B,T,H,Dv)
                   sliding_window, attention_chunk_size, sinks (H,),
                   attn_logit_softcapping
rope               x (B,T,H,D), positions (B,T) int64; rope_parameters,         (B,T,H,D)
                   partial_rotary_factor, max_position_embeddings, layout
rope_frequencies   rope_parameters, head_dim, partial_rotary_factor,            {"inv_freq" (Dr/2,),
                   max_position_embeddings                                       "attention_scaling" ()}
rms_norm           x (..., M), weight (M,); eps, weight_offset, cast_order      (..., M)
gated_mlp          x (..., M), gate_proj (F,M), up_proj (F,M), down_proj (M,F);  (..., M)
                   hidden_act
embedding          input_ids (B,T) int64, weight (V,M); embed_scale             (B,T,M)
soft_cap           x (any); cap                                                 same shape
=================  ===========================================================  ==============

Array inputs arrive in the run's dtype (float64, float32, or float16 / bfloat16 as
NumPy or ``ml_dtypes`` arrays); integer inputs stay int64. An op returns one array,
or a dict of arrays named as in the table.

Every op checks its arguments before computing (:mod:`refimpl.numerics`): an array
of the wrong dtype (integers, bools, complex), a NaN, infinite or out-of-range
parameter (eps, scaling, caps, sinks, embed scale, RoPE theta and factors) or an
unknown name (layout, cast order, activation) raises a one-line ``RefimplError``
(``InputError``, ``ShapeError``, ``ConfigError``) naming the argument. NaN and inf
inside the data arrays (x, q, k, v, weights) are not checked: they propagate.

A case may also carry the reference's result in a low-precision dtype, rounded as
its named variant rounds (``outputs.<name>@bfloat16``; RMSNorm cast orders): a run
in that dtype must then match it element for element, not only within the
dtype's tolerance, because the two cast orders differ by one unit in the last
place on about a quarter of the elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .attention import attention
from .embedding import scaled_embed_tokens
from .errors import ShapeError
from .mlp import gated_mlp
from .numerics import COMPUTE_DTYPES, FLOAT_DTYPES, as_float_array, as_integer_array
from .rmsnorm import check_cast_order, rms_norm, rms_norm_low_precision
from .rope import apply_rope, rope_cos_sin, rope_frequencies, rope_layout
from .softcap import soft_cap


def rope(
    x: np.ndarray, positions: np.ndarray, *, rope_parameters: dict, partial_rotary_factor: float = 1.0,
    max_position_embeddings: int | None = None, layout: str = "rotate_half",
) -> np.ndarray:
    """Rotate queries or keys ``x`` ``(B, T, H, D)`` at integer ``positions`` ``(B, T)``.

    Frequencies from :func:`refimpl.rope.rope_frequencies` (any supported ``rope_type``),
    angles in float64, cos/sin rounded once to the dtype of ``x`` and multiplied by the
    YaRN magnitude; ``layout`` is ``"rotate_half"`` or ``"interleaved"``; channels
    beyond the rotary width pass through.

    Raises:
        InputError: ``x`` not a float64 / float32 array, ``positions`` not integers.
        ShapeError: ``x`` not 4-D, ``positions`` is not ``(B, T)`` of ``x``.
        ConfigError: bad ``rope_parameters``, ``partial_rotary_factor``,
            ``max_position_embeddings`` or ``layout``.
    """
    x = as_float_array("rope: x", x, ndim=4)
    positions = as_integer_array("rope: positions", positions)
    layout = rope_layout(layout)
    if positions.shape != x.shape[:2]:
        raise ShapeError(f"rope: positions {positions.shape} must be (B, T) of x {x.shape}")
    inv_freq, scaling = rope_frequencies(
        rope_parameters, x.shape[-1], partial_rotary_factor=partial_rotary_factor,
        max_position_embeddings=max_position_embeddings,
    )
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype, scaling)
    return apply_rope(x, cos, sin, layout)


def frequencies(
    *, rope_parameters: dict, head_dim: int, partial_rotary_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"inv_freq": (Dr/2,) float64, "attention_scaling": () float64}`` for a RoPE configuration."""
    inv_freq, scaling = rope_frequencies(
        rope_parameters, head_dim, partial_rotary_factor=partial_rotary_factor,
        max_position_embeddings=max_position_embeddings,
    )
    return {"inv_freq": inv_freq, "attention_scaling": np.asarray(scaling, dtype=np.float64)}


def norm(
    x: np.ndarray, weight: np.ndarray, *, eps: float, weight_offset: float = 0.0,
    cast_order: str = "cast_then_multiply",
) -> np.ndarray:
    """RMSNorm (``weight_offset`` 1 is Gemma's 1 + w).

    float64 / float32 inputs: :func:`refimpl.rmsnorm.rms_norm` in that dtype (the
    cast order is then immaterial). bfloat16 / float16 inputs:
    :func:`refimpl.rmsnorm.rms_norm_low_precision`, normalised in float32 with the
    named ``cast_order`` (``"cast_then_multiply"``: Llama, Qwen3, Mistral, SmolLM3;
    ``"multiply_then_cast"``: OLMo 2, Gemma 3).

    Raises:
        InputError: ``x`` not float64, float32, float16 or bfloat16; ``cast_order``
            unknown (checked in every dtype); ``eps`` not a finite number >= 0;
            ``weight_offset`` not 0 or 1.
        ShapeError, RefimplError: as :func:`refimpl.rmsnorm.rms_norm`.
    """
    x = as_float_array("rms_norm: x", x, dtypes=FLOAT_DTYPES)
    check_cast_order(cast_order)
    if x.dtype.name in COMPUTE_DTYPES:
        return rms_norm(x, weight, eps, weight_offset=weight_offset)
    return rms_norm_low_precision(x, weight, eps, weight_offset=weight_offset, cast_order=cast_order)


def mlp(x, gate_proj, up_proj, down_proj, *, hidden_act: str) -> np.ndarray:
    """:func:`refimpl.mlp.gated_mlp`: SwiGLU (``"silu"``) or GeGLU (``"gelu_pytorch_tanh"``)."""
    return gated_mlp(x, gate_proj, up_proj, down_proj, hidden_act)


def embedding(input_ids: np.ndarray, weight: np.ndarray, *, embed_scale: float = 1.0) -> np.ndarray:
    """Rows of ``weight`` times ``embed_scale`` rounded to the weight's dtype (Gemma: sqrt(M)).

    Raises:
        InputError: ids not a (B, T) integer array inside ``[0, V)``; ``weight`` not a
            float array; ``embed_scale`` not a positive finite number in its dtype.
        ShapeError: ``weight`` is not 2-D.
    """
    return scaled_embed_tokens(input_ids, weight, embed_scale)


def softcap(x: np.ndarray, *, cap: float) -> np.ndarray:
    """:func:`refimpl.softcap.soft_cap`: ``cap * tanh(x / cap)``."""
    return soft_cap(x, cap)


@dataclass(frozen=True)
class Op:
    """One named op.

    Attributes:
        name: the op's name in cases and backends.
        function: the reference implementation (the signature backends implement).
        integer_inputs: array inputs that are integer (not cast to the run dtype).
        outputs: names of the outputs; ``("output",)`` for a single array.
    """

    name: str
    function: Callable
    integer_inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("output",)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("attention", attention),
        Op("rope", rope, integer_inputs=("positions",)),
        Op("rope_frequencies", frequencies, outputs=("inv_freq", "attention_scaling")),
        Op("rms_norm", norm),
        Op("gated_mlp", mlp),
        Op("embedding", embedding, integer_inputs=("input_ids",)),
        Op("soft_cap", softcap),
    )
}
