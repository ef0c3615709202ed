"""Rotary position embedding (RoPE), rotate-half ("NeoX") pairing.

For a head vector x of width D (even), channel j is paired with channel j + D/2.
For pair i (0 <= i < D/2) at position p the angle is p * inv_freq[i] with

    inv_freq[i] = 1 / rope_theta ** (2 i / D)

and the pair (x1, x2) = (x[i], x[i + D/2]) is rotated:

    out[i]       = x1 cos(p inv_freq[i]) - x2 sin(p inv_freq[i])
    out[i + D/2] = x2 cos(p inv_freq[i]) + x1 sin(p inv_freq[i])

Notation:
    theta      rope_theta, base of the frequencies
    D          head_dim (rotary width; partial rotary comes later)
    p          absolute token position (0 for the first prompt token)

Paper: Su et al., "RoFormer", arXiv:2104.09864, sec. 3.4.2 (eq. 34), in the
half-split pairing that GPT-NeoX and Llama checkpoints use.
Checked against: transformers ``models/qwen3/modeling_qwen3.py``
(``Qwen3RotaryEmbedding.compute_default_rope_parameters``, ``rotate_half``,
``apply_rotary_pos_emb``).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, ShapeError


def default_inv_freq(head_dim: int, rope_theta: float) -> np.ndarray:
    """Inverse frequencies ``1 / rope_theta ** (arange(0, D, 2) / D)``.

    Args:
        head_dim: rotary width D (even).
        rope_theta: frequency base.

    Returns:
        ``(D/2,)`` float64. Always float64: the angles are computed exactly and
        rounded to the compute dtype once, in :func:`rope_cos_sin`.

    Raises:
        ShapeError: ``head_dim`` is odd or not positive.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ShapeError(f"RoPE needs a positive even rotary width, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 1.0 / (float(rope_theta) ** exponent)


def rope_frequencies(rope_parameters: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin magnitude for one ``rope_parameters`` dict.

    Args:
        rope_parameters: transformers v5 form, e.g. ``{"rope_type": "linear",
            "rope_theta": 1e6, "factor": 8.0}``.
        head_dim: rotary width D.

    Returns:
        ``(inv_freq (D/2,) float64, attention_scaling)``; ``attention_scaling``
        multiplies cos and sin (1.0 except for YaRN).

    Raises:
        ConfigError: unknown ``rope_type`` or a missing / non-positive parameter.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    theta = rope_parameters.get("rope_theta")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"rope_parameters needs a positive rope_theta, got {theta!r}")
    inv_freq = default_inv_freq(head_dim, theta)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        factor = rope_parameters.get("factor")
        if not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"linear RoPE scaling needs a positive 'factor', got {factor!r}")
        return inv_freq / float(factor), 1.0
    raise ConfigError(f"RoPE type {rope_type!r} is not supported (known: default, linear)")


def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, dtype, attention_scaling: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables for the given positions.

    Args:
        positions: ``(..., T)`` integer absolute positions.
        inv_freq: ``(D/2,)`` float64 inverse frequencies.
        dtype: compute dtype of the result.
        attention_scaling: multiplier of both tables (YaRN's magnitude factor; 1 otherwise).

    Returns:
        ``(cos, sin)``, each ``(..., T, D/2)`` in ``dtype``. Angles are formed and
        the trigonometric functions evaluated in float64, then rounded once.
    """
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    scale = float(attention_scaling)
    return (np.cos(angles) * scale).astype(dtype), (np.sin(angles) * scale).astype(dtype)


def apply_rope_rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate channel pairs (j, j + D/2) of every head by the position's angles.

    Args:
        x: ``(B, T, H, D)`` queries or keys (any number of heads).
        cos, sin: ``(T, D/2)`` or ``(B, T, D/2)`` from :func:`rope_cos_sin`.

    Returns:
        ``(B, T, H, D)`` in the dtype of ``x``.

    Raises:
        ShapeError: the tables do not have ``D/2`` columns or ``T`` rows.
    """
    half = x.shape[-1] // 2
    if cos.shape[-1] != half or cos.shape[-2] != x.shape[1] or cos.shape != sin.shape:
        raise ShapeError(f"RoPE tables {cos.shape} do not fit input {x.shape} (need (..., T, D/2))")
    # Broadcast the tables over heads: (..., T, 1, D/2).
    c, s = cos[..., None, :], sin[..., None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
