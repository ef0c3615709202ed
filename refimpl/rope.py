"""Rotary position embedding (RoPE): frequencies, scaling variants and the two pair layouts.

For a head vector x of width D, the first Dr = int(D * partial_rotary_factor)
channels are rotated in Dr/2 pairs; channels >= Dr pass through unchanged. Pair
i (0 <= i < Dr/2) at position p turns by the angle p * inv_freq[i], with the
unscaled ("default") frequencies

    inv_freq[i] = 1 / theta ** (2 i / Dr)

and a pair (x1, x2) becomes

    (x1 cos(p inv_freq[i]) - x2 sin(p inv_freq[i]),  x2 cos(p inv_freq[i]) + x1 sin(p inv_freq[i])).

Which channels form pair i is the layout (:class:`RopeLayout`):

    ROTATE_HALF (GPT-NeoX, Llama, Qwen)   pair i = channels (i, i + Dr/2)
    INTERLEAVED (GPT-J, GLM, DeepSeek)    pair i = channels (2i, 2i + 1)

Context-extension variants change only ``inv_freq`` and a magnitude
``attention_scaling`` that multiplies both cos and sin (so q.k scales by its square):

    linear   inv_freq / factor
    llama3   per-frequency rule on the wavelength 2 pi / inv_freq (:func:`llama3_inv_freq`)
    yarn     ramp between inv_freq and inv_freq / factor, plus a magnitude (:func:`yarn_inv_freq`)

Notation:
    paper symbol     code name                              shape
    theta (base)     ``rope_theta``                         scalar
    theta_i          ``inv_freq``                           (Dr/2,) float64
    m (position)     ``positions``                          (T,) or (B, T) integers
    m theta_i        ``angles``                             (..., T, Dr/2) float64
    s (scale)        ``factor``                             scalar
    sqrt(1/t)        ``attention_scaling`` (YaRN mscale)    scalar
    L (orig. ctx)    ``original_max_position_embeddings``   scalar
    Dr               ``int(D * partial_rotary_factor)``     rotary width (even, <= D)

Paper: Su et al., "RoFormer", arXiv:2104.09864, sec. 3.4.2 (eq. 34); Peng et al.,
"YaRN", arXiv:2309.00071, sec. 3.2 ("NTK-by-parts": r(d), the ramp gamma, h(theta_d)) and
sec. 3.4 (the magnitude sqrt(1/t) = 0.1 ln s + 1);
Llama Team, "The Llama 3 Herd of Models", arXiv:2407.21783 (theta 500000 and the 128K
context; the llama3 frequency rule itself ships as ``apply_scaling`` in Meta's
llama-models code, not in the paper).
Checked against: transformers 5.24 ``modeling_rope_utils.py``
(``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``,
``_compute_yarn_parameters``, ``RotaryEmbeddingConfigMixin.standardize_rope_params``),
``models/llama/modeling_llama.py`` (``rotate_half``, ``apply_rotary_pos_emb``),
``models/glm/modeling_glm.py`` (interleaved and partial ``apply_rotary_pos_emb``).
"""

from __future__ import annotations

import math
import numbers
from enum import Enum

import numpy as np

from .config import MAX_SIZE
from .errors import ConfigError, InputError, ShapeError
from .numerics import (
    FLOAT_DTYPES, as_float_array, as_integer_array, check_finite, check_finite_positive, check_same_dtype,
    is_low_precision, to_compute, to_storage,
)


class RopeLayout(Enum):
    """Which channels of a head form a rotated pair (the value is the ops-level name)."""

    #: pair i = channels (i, i + Dr/2): GPT-NeoX, Llama, Qwen, Mistral, Gemma.
    ROTATE_HALF = "rotate_half"
    #: pair i = channels (2i, 2i + 1): GPT-J, GLM, DeepSeek (``rope_interleave``).
    INTERLEAVED = "interleaved"


def rope_layout(layout) -> RopeLayout:
    """``layout`` as a :class:`RopeLayout` (a member, or its value ``"rotate_half"`` / ``"interleaved"``).

    Raises:
        ConfigError: any other value.
    """
    try:
        return RopeLayout(layout)
    except (ValueError, TypeError):
        raise ConfigError(
            f"RoPE layout {layout!r} is not known (use {', '.join(m.value for m in RopeLayout)})") from None


# Checks of the scalar parameters (ConfigError: they come from config.json)

def _check_theta(rope_theta) -> float:
    """``rope_theta`` as a float > 1.

    theta <= 1 is refused: the frequencies theta ** (-2i / Dr) would not decrease (at
    theta = 1 every pair turns at 1 rad per position), and YaRN's correction range
    divides by ln theta. transformers does not check; no released model is near 1.
    """
    theta = check_finite("rope_parameters: rope_theta", rope_theta, error=ConfigError)
    if not theta > 1:
        raise ConfigError(f"rope_parameters: rope_theta must be a finite number > 1, got {rope_theta!r}")
    return theta


def _check_factor(rope_type: str, factor) -> float:
    """A context-extension ``factor`` as a float >= 1.

    transformers' ``_validate_{linear,llama3,yarn}_rope_parameters`` warn ("factor field
    must be a float or int >= 1"); below 1 the frequencies would be *raised*, which
    shortens the context instead of extending it (YaRN's magnitude 0.1 ln s + 1 also
    assumes s >= 1). The reference refuses. 1 is allowed (no scaling).
    """
    number = check_finite(f"{rope_type} RoPE: factor", factor, error=ConfigError)
    if not number >= 1:
        raise ConfigError(f"{rope_type} RoPE: factor must be a finite number >= 1 (the context extension "
                          f"ratio), got {factor!r}")
    return number


def _check_positive_int(what: str, value) -> int:
    """A context length: an integer in ``1..MAX_SIZE`` (:data:`refimpl.config.MAX_SIZE`, far
    above any published context; a larger int would overflow the float formulas)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= MAX_SIZE:
        raise ConfigError(f"{what} must be a positive integer <= {MAX_SIZE}, got {value!r}")
    return int(value)


# Frequencies: one pure function per scaling type

def default_inv_freq(head_dim: int, rope_theta: float) -> np.ndarray:
    """Inverse frequencies ``1 / rope_theta ** (arange(0, Dr, 2) / Dr)``.

    Args:
        head_dim: rotary width Dr (even; D itself unless rotary is partial).
        rope_theta: frequency base.

    Returns:
        ``(Dr/2,)`` float64. Always float64: the angles are computed exactly and
        rounded to the compute dtype once, in :func:`rope_cos_sin`.

    Raises:
        ShapeError: ``head_dim`` is odd or not positive.
        ConfigError: ``head_dim`` is not an integer; ``rope_theta`` is not a finite number > 1.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral):
        raise ConfigError(f"RoPE needs an integer rotary width, got {head_dim!r}")
    if head_dim <= 0 or head_dim % 2:
        raise ShapeError(f"RoPE needs a positive even rotary width, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 1.0 / (_check_theta(rope_theta) ** exponent)


def linear_inv_freq(rotary_dim: int, rope_theta: float, factor: float) -> np.ndarray:
    """Position interpolation: ``default_inv_freq / factor`` (positions divided by ``factor``).

    Returns:
        ``(Dr/2,)`` float64.

    Raises:
        ConfigError: ``factor`` is not a finite number >= 1 (as :func:`default_inv_freq` otherwise).

    Checked against: transformers 5.24 ``modeling_rope_utils._compute_linear_scaling_rope_parameters``.
    """
    factor = _check_factor("linear", factor)
    return default_inv_freq(rotary_dim, rope_theta) / factor


def llama3_inv_freq(
    rotary_dim: int, rope_theta: float, factor: float, low_freq_factor: float,
    high_freq_factor: float, original_max_position_embeddings: int,
) -> np.ndarray:
    """Llama 3.1 frequency rule, decided per frequency by its wavelength ``w = 2 pi / inv_freq``.

    With ``L = original_max_position_embeddings``::

        w < L / high_freq_factor   keep inv_freq                 (high frequencies)
        w > L / low_freq_factor    inv_freq / factor             (low frequencies)
        otherwise                  (1 - a) inv_freq / factor + a inv_freq,
                                   a = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)

    Args:
        rotary_dim: Dr (even).
        rope_theta: base of the unscaled frequencies (500000 for Llama 3.1).
        factor, low_freq_factor, high_freq_factor: 8, 1, 4 for Llama 3.1 (factor 32 for 3.2 1B/3B).
        original_max_position_embeddings: L, 8192 for Llama 3.1.

    Returns:
        ``(Dr/2,)`` float64.

    Raises:
        ConfigError: ``factor`` below 1; ``low_freq_factor`` not positive or not below
            ``high_freq_factor``; ``original_max_position_embeddings`` not a positive integer.

    Paper: arXiv:2407.21783 (Llama 3 herd; the rule ships as ``apply_scaling`` in Meta's
    llama-models reference code).
    Checked against: transformers 5.24 ``modeling_rope_utils._compute_llama3_parameters`` (lines 643-662).
    """
    factor = _check_factor("llama3", factor)
    low_freq_factor = check_finite_positive("llama3 RoPE: low_freq_factor", low_freq_factor, error=ConfigError)
    high_freq_factor = check_finite_positive("llama3 RoPE: high_freq_factor", high_freq_factor, error=ConfigError)
    if not high_freq_factor > low_freq_factor:
        raise ConfigError(f"llama3 RoPE: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor "
                          f"({low_freq_factor})")
    inv_freq = default_inv_freq(rotary_dim, rope_theta)
    context = float(_check_positive_int("llama3 RoPE: original_max_position_embeddings",
                                        original_max_position_embeddings))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = context / low_freq_factor, context / high_freq_factor
    # Blend weight a of the middle band (0 at the low-frequency edge, 1 at the high one).
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    return np.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def yarn_correction_range(
    rotary_dim: int, rope_theta: float, original_max_position_embeddings: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
) -> tuple[float, float]:
    """Pair indices ``(low, high)`` between which YaRN ramps from extrapolation to interpolation.

    ``corr(r) = Dr ln(L / (2 pi r)) / (2 ln theta)`` is the pair index whose frequency
    turns ``r`` times over the original context L. ``low = corr(beta_fast)``,
    ``high = corr(beta_slow)``, floored / ceiled when ``truncate``, then clipped to
    ``[0, Dr - 1]`` (the upper clip uses Dr - 1, not Dr/2 - 1, as transformers does).

    Returns:
        ``(low, high)`` Python floats (integers when ``truncate``).

    Raises:
        ConfigError: ``rope_theta`` not > 1; a beta not positive, or ``beta_fast < beta_slow``
            (the ramp would run backwards; transformers warns); a beta for which
            ``L / (2 pi beta)`` is not a positive finite float (``beta_fast = 1e308``
            overflows to 0, ``beta_slow = 5e-324`` to inf: ``corr`` has no value); L not an
            integer in ``1..MAX_SIZE``.

    Paper: arXiv:2309.00071, sec. 3.2 (r(d) = L / lambda_d; alpha = beta_slow, beta = beta_fast).
    Checked against: transformers 5.24 ``modeling_rope_utils._compute_yarn_parameters``
    (``find_correction_dim``, ``find_correction_range``, lines 447-458).
    """
    theta = _check_theta(rope_theta)
    beta_fast = check_finite_positive("yarn RoPE: beta_fast", beta_fast, error=ConfigError)
    beta_slow = check_finite_positive("yarn RoPE: beta_slow", beta_slow, error=ConfigError)
    if beta_fast < beta_slow:
        raise ConfigError(f"yarn RoPE: beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow}); "
                          "the ramp would run backwards (transformers warns)")
    original = _check_positive_int("yarn RoPE: original_max_position_embeddings", original_max_position_embeddings)
    for key, beta in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
        ratio = original / (beta * 2 * math.pi)
        if not (math.isfinite(ratio) and ratio > 0):
            raise ConfigError(f"yarn RoPE: {key} = {beta!r} is out of range: original_max_position_embeddings / "
                              f"(2 pi {key}) = {ratio!r} is not a positive finite number")

    def corr(num_rotations: float) -> float:
        return rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_ramp(low: float, high: float, num_pairs: int) -> np.ndarray:
    """``clip((i - low) / (high - low), 0, 1)`` for pair i; 0 = keep, 1 = fully interpolated.

    ``high`` is nudged by 0.001 when ``low == high`` to avoid 0 / 0 (as transformers does).

    Returns:
        ``(num_pairs,)`` float64.
    """
    # As floats: a truncated bound is a Python int, possibly beyond int64 for rope_theta near 1.
    low, high = float(low), float(high)
    if low == high:
        high += 0.001
    return np.clip((np.arange(num_pairs, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def yarn_inv_freq(
    rotary_dim: int, rope_theta: float, factor: float, original_max_position_embeddings: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
) -> np.ndarray:
    """YaRN "NTK-by-parts" frequencies: ``inv_freq / factor * ramp + inv_freq * (1 - ramp)``.

    High-frequency pairs (i below ``low``) keep their frequency, low-frequency pairs
    (above ``high``) are divided by ``factor``, with a linear ramp in between
    (:func:`yarn_correction_range`, :func:`yarn_ramp`). The magnitude is separate:
    :func:`yarn_attention_scaling`.

    Returns:
        ``(Dr/2,)`` float64.

    Raises:
        ConfigError: ``factor`` is not a finite number >= 1; otherwise as
            :func:`yarn_correction_range`.

    Paper: arXiv:2309.00071, sec. 3.2 (h(theta_d) with the paper's gamma = 1 - ramp).
    Checked against: transformers 5.24 ``modeling_rope_utils._compute_yarn_parameters`` (lines 469-484).
    """
    factor = _check_factor("yarn", factor)
    inv_freq_extrapolation = default_inv_freq(rotary_dim, rope_theta)
    inv_freq_interpolation = inv_freq_extrapolation / factor
    low, high = yarn_correction_range(
        rotary_dim, rope_theta, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    ramp = yarn_ramp(low, high, rotary_dim // 2)
    return inv_freq_interpolation * ramp + inv_freq_extrapolation * (1 - ramp)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``, else 1 (YaRN's sqrt(1/t), sec. 3.4)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_scaling(
    factor: float, attention_factor: float | None = None, mscale: float | None = None,
    mscale_all_dim: float | None = None,
) -> float:
    """Magnitude YaRN puts on cos and sin.

    In order: ``attention_factor`` if given; else, if ``mscale`` and ``mscale_all_dim``
    are both truthy (non-zero), ``yarn_mscale(factor, mscale) / yarn_mscale(factor,
    mscale_all_dim)`` (DeepSeek-V2/V3 style, which moves the rest into the softmax
    scale); else ``yarn_mscale(factor)``.

    Raises:
        ConfigError: the magnitude is not a positive finite number (a negative
            ``mscale``, or an ``mscale_all_dim`` that makes the denominator 0 or negative).

    Paper: arXiv:2309.00071, sec. 3.4 (sqrt(1/t) = 0.1 ln s + 1).
    Checked against: transformers 5.24 ``modeling_rope_utils._compute_yarn_parameters`` (lines 430-441).
    """
    if attention_factor is not None:
        scaling = attention_factor
    elif mscale and mscale_all_dim:
        denominator = yarn_mscale(factor, mscale_all_dim)
        scaling = yarn_mscale(factor, mscale) / denominator if denominator else math.inf
    else:
        scaling = yarn_mscale(factor)
    return check_finite_positive("yarn RoPE: attention scaling (from attention_factor, mscale, mscale_all_dim)",
                                 scaling, error=ConfigError)


# Reading rope_parameters

_REQUIRED = object()


def _number(params: dict, key: str, rope_type: str, default=_REQUIRED, *, positive: bool = True,
            at_least: float | None = None):
    """``params[key]`` as a float; a missing or null key gives ``default``; ConfigError naming the key.

    ``positive`` requires > 0, ``at_least`` requires >= that bound (``factor``: 1).
    """
    value = params.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{rope_type} RoPE needs rope_parameters[{key!r}] (a number)")
        return default
    check = check_finite_positive if positive else check_finite
    number = check(f"{rope_type} RoPE: rope_parameters[{key!r}]", value, error=ConfigError)
    if at_least is not None and number < at_least:
        raise ConfigError(f"{rope_type} RoPE: rope_parameters[{key!r}] must be a number >= {at_least:g}, "
                          f"got {value!r}")
    return number


def _original_context(params: dict, rope_type: str, max_position_embeddings: int | None) -> int:
    """``original_max_position_embeddings``, defaulting to ``max_position_embeddings`` as
    transformers' ``standardize_rope_params`` does for llama3 / yarn / longrope."""
    key = "original_max_position_embeddings"
    value = params.get(key, max_position_embeddings)
    if value is None:
        raise ConfigError(f"{rope_type} RoPE needs rope_parameters[{key!r}] (or max_position_embeddings)")
    return _check_positive_int(f"{rope_type} RoPE: rope_parameters[{key!r}]", value)


def _default_from(params, rope_type, rotary_dim, theta, max_position_embeddings):
    return default_inv_freq(rotary_dim, theta), 1.0


def _linear_from(params, rope_type, rotary_dim, theta, max_position_embeddings):
    return linear_inv_freq(rotary_dim, theta, _number(params, "factor", rope_type, at_least=1.0)), 1.0


def _llama3_from(params, rope_type, rotary_dim, theta, max_position_embeddings):
    factor = _number(params, "factor", rope_type, at_least=1.0)
    low = _number(params, "low_freq_factor", rope_type)
    high = _number(params, "high_freq_factor", rope_type)
    if not high > low:
        raise ConfigError(
            f"llama3 RoPE: rope_parameters['high_freq_factor'] ({high}) must exceed 'low_freq_factor' ({low})")
    original = _original_context(params, rope_type, max_position_embeddings)
    return llama3_inv_freq(rotary_dim, theta, factor, low, high, original), 1.0


def _yarn_from(params, rope_type, rotary_dim, theta, max_position_embeddings):
    original = _original_context(params, rope_type, max_position_embeddings)
    if "factor" not in params:
        raise ConfigError("yarn RoPE needs rope_parameters['factor'] (a number, or null for "
                          "max_position_embeddings / original_max_position_embeddings)")
    factor = _number(params, "factor", rope_type, None, at_least=1.0)
    # A null factor means the context ratio (DeepSeek-V3 style), as in transformers.
    if factor is None:
        if max_position_embeddings is None:
            raise ConfigError("yarn RoPE: rope_parameters['factor'] is null and max_position_embeddings is not given")
        factor = max_position_embeddings / original
        if factor < 1:
            raise ConfigError(f"yarn RoPE: rope_parameters['factor'] is null and max_position_embeddings / "
                              f"original_max_position_embeddings = {max_position_embeddings} / {original} is below 1")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"yarn RoPE: rope_parameters['truncate'] must be true or false, got {truncate!r}")
    inv_freq = yarn_inv_freq(
        rotary_dim, theta, factor, original, _number(params, "beta_fast", rope_type, 32.0),
        _number(params, "beta_slow", rope_type, 1.0), truncate)
    scaling = yarn_attention_scaling(
        factor, _number(params, "attention_factor", rope_type, None),
        _number(params, "mscale", rope_type, None, positive=False),
        _number(params, "mscale_all_dim", rope_type, None, positive=False))
    return inv_freq, scaling


#: rope_type -> reader of its parameters; each returns ``(inv_freq, attention_scaling)``.
_FREQUENCIES = {
    "default": _default_from,
    "linear": _linear_from,
    "llama3": _llama3_from,
    "yarn": _yarn_from,
}


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Rotary width ``Dr = int(head_dim * partial_rotary_factor)`` (truncated, as transformers does).

    Raises:
        ConfigError: ``head_dim`` is not an integer in ``1..MAX_SIZE``, the factor is not a
            number in ``(0, 1]`` (for 1e308 the product is inf, which ``int`` cannot take;
            the message shows it as is), or Dr is odd or zero.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or not 0 < head_dim <= MAX_SIZE:
        raise ConfigError(f"RoPE needs a positive integer head_dim (at most {MAX_SIZE}), got {head_dim!r}")
    factor = partial_rotary_factor
    number = check_finite("partial_rotary_factor", factor, error=ConfigError)
    # The product is inf for a factor such as 1e308, which int() cannot take: shown as it is.
    product = head_dim * number
    dr = int(product) if math.isfinite(product) else product
    if not 0 < number <= 1 or dr <= 0 or dr % 2:
        raise ConfigError(
            f"partial_rotary_factor {factor} gives rotary width int({head_dim} * {factor}) = {dr}; "
            f"it must be even and in 2..{head_dim} (a factor in (0, 1])")
    return dr


def rope_frequencies(
    rope_parameters: dict, head_dim: int, *, partial_rotary_factor: float = 1.0,
    max_position_embeddings: int | None = None,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin magnitude for one ``rope_parameters`` dict.

    Args:
        rope_parameters: transformers v5 form, e.g. ``{"rope_type": "yarn", "rope_theta": 1e6,
            "factor": 4.0, "original_max_position_embeddings": 32768}``. ``rope_type``
            (legacy key ``type``; default ``"default"``) is one of default, linear, llama3,
            yarn. A ``partial_rotary_factor`` key here **wins over** the keyword argument,
            as in transformers: its config code only ``setdefault``s the top-level value
            into the dict (``modeling_rope_utils.py:796, 828``) and the init functions
            read only the dict.
        head_dim: D, the width of a query / key head.
        partial_rotary_factor: fraction of D that is rotated, used when the dict has none.
        max_position_embeddings: the default of ``original_max_position_embeddings``
            (llama3, yarn), and the numerator of a null yarn ``factor``.

    Returns:
        ``(inv_freq (Dr/2,) float64, attention_scaling)`` with ``Dr = int(D *
        partial_rotary_factor)``; ``attention_scaling`` multiplies cos and sin (1.0
        except for YaRN).

    Dtype: float64 throughout. transformers builds these in float32
    (``torch.arange(...).to(dtype=torch.float)``); the two differ by about 1e-7 relative.

    Raises:
        ConfigError: unknown ``rope_type``; a missing, non-numeric, NaN, infinite or
            non-positive parameter (the message names the key); ``rope_theta <= 1``;
            a ``factor`` below 1, or a null yarn factor whose context ratio is below 1;
            ``high_freq_factor <= low_freq_factor`` or ``beta_fast < beta_slow``
            (transformers only warns on these three); ``max_position_embeddings``
            not a positive integer; a rotary width that is odd, zero or above D.

    Checked against: transformers 5.24 ``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` and
    ``LlamaRotaryEmbedding`` / ``GlmRotaryEmbedding.compute_default_rope_parameters``.
    """
    if not isinstance(rope_parameters, dict):
        raise ConfigError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _FREQUENCIES:
        raise ConfigError(f"RoPE type {rope_type!r} is not supported (known: {', '.join(_FREQUENCIES)})")
    theta = _check_theta(rope_parameters.get("rope_theta"))
    if max_position_embeddings is not None:
        _check_positive_int("max_position_embeddings", max_position_embeddings)
    dr = rotary_dim(head_dim, rope_parameters.get("partial_rotary_factor", partial_rotary_factor))
    return _FREQUENCIES[rope_type](rope_parameters, rope_type, dr, theta, max_position_embeddings)


# Tables and rotation

def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, dtype, attention_scaling: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables ``attention_scaling * cos(p inv_freq)`` (and sin) for the given positions.

    Args:
        positions: ``(T,)`` or ``(B, T)`` integer absolute positions (any size; 131072
            and beyond are fine).
        inv_freq: ``(Dr/2,)`` float64 inverse frequencies.
        dtype: dtype of the result: float64, float32, or a storage dtype (float16,
            bfloat16) whose tables :func:`apply_rope_rotate_half` widens to float32.
        attention_scaling: multiplier of both tables (YaRN's magnitude factor; 1 otherwise).

    Returns:
        ``(cos, sin)``, each ``(T, Dr/2)`` or ``(B, T, Dr/2)`` in ``dtype``. Angles are
        formed and the trigonometric functions evaluated in float64, then rounded once
        (to float16 / bfloat16 too, as transformers rounds its float32 tables to the
        model dtype). (transformers forms the angles in float32: at position 131000 that
        alone moves an angle by up to ~4e-3 rad.)

    Raises:
        InputError: ``positions`` is not an integer array; ``inv_freq`` is not a float
            array of finite values; ``dtype`` is not float64, float32, bfloat16 or float16;
            ``attention_scaling`` is not a positive finite number.
        ShapeError: ``positions`` is not 1-D or 2-D, or ``inv_freq`` is not 1-D.
    """
    positions = as_integer_array("RoPE positions", positions)
    inv_freq = as_float_array("RoPE inv_freq", inv_freq)
    if positions.ndim not in (1, 2) or inv_freq.ndim != 1:
        raise ShapeError(f"RoPE needs positions (T,) or (B, T) and inv_freq (Dr/2,), got {positions.shape} "
                         f"and {inv_freq.shape}")
    if not np.isfinite(inv_freq).all():
        raise InputError(f"RoPE inv_freq must be finite, got {inv_freq.tolist()}")
    dtype = _compute_dtype(dtype)
    scale = check_finite_positive("RoPE attention_scaling", attention_scaling)
    # m * theta_i, exact in float64 for any realistic position.
    angles = positions.astype(np.float64)[..., None] * inv_freq.astype(np.float64)
    if is_low_precision(dtype):
        return to_storage(np.cos(angles) * scale, dtype), to_storage(np.sin(angles) * scale, dtype)
    return (np.cos(angles) * scale).astype(dtype), (np.sin(angles) * scale).astype(dtype)


def _compute_dtype(dtype) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in FLOAT_DTYPES:
        raise InputError(f"RoPE dtype must be float64, float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def _check_tables(x, cos, sin) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(x, cos, sin, Dr/2)`` after checking that they are float arrays of one dtype and that
    ``(T, Dr/2)`` or ``(B, T, Dr/2)`` tables fit ``x`` ``(B, T, H, D)``."""
    x, cos, sin = (as_float_array(f"RoPE {name}", a) for name, a in (("x", x), ("cos", cos), ("sin", sin)))
    half = cos.shape[-1] if cos.ndim else 0
    fits = (
        x.ndim == 4 and cos.shape == sin.shape and cos.ndim in (2, 3) and cos.shape[-2] == x.shape[1]
        and 0 < 2 * half <= x.shape[-1] and (cos.ndim == 2 or cos.shape[0] in (1, x.shape[0]))
    )
    if not fits:
        raise ShapeError(f"RoPE tables {cos.shape} do not fit input {x.shape} "
                         "(need x (B, T, H, D) and tables (T, Dr/2) or (B, T, Dr/2) with 0 < Dr <= D)")
    check_same_dtype(x=x, cos=cos, sin=sin)
    return x, cos, sin, half


def apply_rope_rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate channel pairs (j, j + Dr/2), j < Dr/2, of every head; channels >= Dr pass through.

    Args:
        x: ``(B, T, H, D)`` queries or keys (any number of heads).
        cos, sin: ``(T, Dr/2)`` or ``(B, T, Dr/2)`` from :func:`rope_cos_sin`, Dr <= D
            (Dr < D is partial rotary).

    Returns:
        ``(B, T, H, D)`` in the dtype of ``x``.

    Dtype: each product and sum in the dtype of ``x`` (the tables must share it), in
    transformers' order ``x1 cos - x2 sin``, ``x2 cos + x1 sin``. float16 / bfloat16: in
    float32, each rotated channel rounded once (transformers rounds ``x cos``,
    ``rotate_half(x) sin`` and their sum).

    Raises:
        ShapeError: the tables do not fit ``x`` (wrong T, B, Dr/2 = 0 or Dr > D).
        InputError: ``x`` or a table is not a float array.
        RefimplError: ``x`` and the tables differ in dtype.

    Paper: arXiv:2104.09864, sec. 3.4.2, eq. 34 (in the half-split pairing).
    Checked against: transformers 5.24 ``models/llama/modeling_llama.py`` (``rotate_half``,
    ``apply_rotary_pos_emb``) and, for Dr < D, ``models/qwen3_next/modeling_qwen3_next.py``
    ``apply_rotary_pos_emb`` (lines 154-188).
    """
    x, cos, sin, half = _check_tables(x, cos, sin)
    storage, x = x.dtype, to_compute(x)
    # Broadcast the tables over heads: (..., T, 1, Dr/2).
    c, s = to_compute(cos)[..., None, :], to_compute(sin)[..., None, :]
    x1, x2, passed = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return to_storage(np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, passed], axis=-1), storage)


def apply_rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate channel pairs (2i, 2i + 1), i < Dr/2, of every head; channels >= Dr pass through.

    The output keeps the input's channel order: ``out[2i] = x[2i] cos_i - x[2i+1] sin_i``,
    ``out[2i+1] = x[2i+1] cos_i + x[2i] sin_i``. This is exactly GLM's
    ``apply_rotary_pos_emb`` (transformers 5.24 ``models/glm/modeling_glm.py:151-195``,
    also partial). DeepSeek-V3's ``apply_rotary_pos_emb_interleave``
    (``models/deepseek_v3/modeling_deepseek_v3.py:310-346``) computes the same pairs but
    returns them de-interleaved, ``[out[0::2], out[1::2]]``: a fixed permutation applied to
    both q and k, so attention scores agree while the vectors differ in channel order.

    Args:
        x: ``(B, T, H, D)`` queries or keys.
        cos, sin: ``(T, Dr/2)`` or ``(B, T, Dr/2)`` from :func:`rope_cos_sin`, Dr <= D.

    Returns:
        ``(B, T, H, D)`` in the dtype of ``x`` (float16 / bfloat16: computed in float32,
        rounded once).

    Raises:
        ShapeError: the tables do not fit ``x``.
        InputError: ``x`` or a table is not a float array.
        RefimplError: ``x`` and the tables differ in dtype.

    Paper: arXiv:2104.09864, sec. 3.4.2, eq. 34 (the paper's own pairing).
    """
    x, cos, sin, half = _check_tables(x, cos, sin)
    storage, x = x.dtype, to_compute(x)
    c, s = to_compute(cos)[..., None, :], to_compute(sin)[..., None, :]
    x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    # Re-interleave (even, odd) results: (..., Dr/2, 2) -> (..., Dr).
    rotated = np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(*x.shape[:-1], 2 * half)
    return to_storage(np.concatenate([rotated, x[..., 2 * half:]], axis=-1), storage)


_APPLY = {RopeLayout.ROTATE_HALF: apply_rope_rotate_half, RopeLayout.INTERLEAVED: apply_rope_interleaved}


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: RopeLayout) -> np.ndarray:
    """Rotate ``x`` ``(B, T, H, D)`` with the tables in the given pair ``layout``.

    ``layout`` is a :class:`RopeLayout` (or its value, ``"rotate_half"`` / ``"interleaved"``).

    Raises:
        ConfigError: unknown layout. Otherwise as the layout's function.
    """
    return _APPLY[rope_layout(layout)](x, cos, sin)
