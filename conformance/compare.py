"""The one comparison helper of the suite, and the argmax check on logits.

Errors are measured in float64 whatever the dtypes of the inputs. With ``a`` the
actual and ``e`` the expected array, over the positions where both are finite::

    max_abs = max |a - e|              (with the index where it occurs)
    rel_rms = ||a - e||_2 / ||e||_2    (0 when both norms are 0, inf when only ||e|| is 0)

Non-finite values are not folded into these numbers: a NaN or Inf where the
expected value is finite (or a non-finite expected value not reproduced exactly)
is counted in ``nonfinite``, a failure of its own kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConformanceError, OutputError

#: NumPy dtype kinds that are not real numbers: complex, object, strings, dates.
_NON_REAL_KINDS = {"c": "complex", "O": "Python objects", "U": "strings", "S": "bytes", "M": "dates", "m": "time deltas"}


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare`.

    Attributes:
        actual_shape, expected_shape: the two shapes; when they differ ``max_abs``
            and ``rel_rms`` are ``inf`` and ``max_abs_index`` is ``None``.
        max_abs: largest ``|a - e|`` over finite pairs.
        max_abs_index: index of ``max_abs`` in the arrays (``None`` if no finite pair).
        rel_rms: ``||a - e|| / ||e||`` over finite pairs.
        max_abs_expected: ``max |e|`` over finite expected values (scale for
            relative tolerances).
        nonfinite: count of positions whose non-finite value is unmatched.
    """

    actual_shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    max_abs: float
    max_abs_index: tuple[int, ...] | None
    rel_rms: float
    max_abs_expected: float
    nonfinite: int

    @property
    def shape_mismatch(self) -> bool:
        return self.actual_shape != self.expected_shape


def to_float64(value, what: str) -> np.ndarray:
    """A backend's output as a float64 NumPy array.

    Accepts NumPy arrays of any real dtype (ml_dtypes bfloat16 included), nested
    lists, and tensors with ``detach``/``cpu``/``double``/``numpy`` methods (torch),
    which are detached and widened first (NumPy cannot hold torch's bfloat16).

    Raises:
        OutputError: the value is ragged, complex, or not numeric (``what`` names it).
    """
    if all(hasattr(value, m) for m in ("detach", "cpu", "double", "numpy")):
        tensor = value.detach().cpu()
        if getattr(tensor, "is_complex", lambda: False)():
            raise OutputError(f"{what} is complex ({tensor.dtype})")
        value = tensor.double().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise OutputError(f"{what} is not a rectangular array ({exc})") from None
    if array.dtype.kind in _NON_REAL_KINDS:
        raise OutputError(f"{what} holds {_NON_REAL_KINDS[array.dtype.kind]} (dtype {array.dtype}), not real numbers")
    try:
        return array.astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise OutputError(f"{what} cannot be read as real numbers (dtype {array.dtype}: {exc})") from None


def compare(actual, expected) -> Comparison:
    """Compare ``actual`` with ``expected`` (any shapes, any real dtypes).

    Returns:
        A :class:`Comparison`; a shape mismatch is reported in it, not raised.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(e[np.isfinite(e)]).max(initial=0.0))
    if a.shape != e.shape:
        return Comparison(a.shape, e.shape, math.inf, None, math.inf, scale, 0)
    finite = np.isfinite(a) & np.isfinite(e)
    # A non-finite expected value is matched only by the same value (NaN by NaN).
    matched = (a == e) | (np.isnan(a) & np.isnan(e))
    nonfinite = int(np.count_nonzero(~finite & ~matched))
    # inf - inf at unmatched positions is masked out just below; do not warn about it.
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - e), 0.0)
    if not finite.any():
        return Comparison(a.shape, e.shape, 0.0, None, 0.0, scale, nonfinite)
    flat = int(np.argmax(diff))
    err_norm = float(np.linalg.norm(diff))
    ref_norm = float(np.linalg.norm(np.where(finite, e, 0.0)))
    if ref_norm > 0:
        rel_rms = err_norm / ref_norm
    else:
        rel_rms = 0.0 if err_norm == 0 else math.inf
    return Comparison(
        actual_shape=a.shape,
        expected_shape=e.shape,
        max_abs=float(diff.flat[flat]),
        max_abs_index=tuple(int(i) for i in np.unravel_index(flat, a.shape)),
        rel_rms=rel_rms,
        max_abs_expected=scale,
        nonfinite=nonfinite,
    )


@dataclass(frozen=True)
class ArgmaxAgreement:
    """Result of :func:`argmax_agreement`.

    Attributes:
        fraction: share of positions whose argmax over the vocabulary agrees.
        positions: number of positions ``B * T``.
        confident: positions whose expected top-1 minus top-2 logit exceeds the margin.
        confident_disagreements: confident positions whose argmax differs.
    """

    fraction: float
    positions: int
    confident: int
    confident_disagreements: int

    @property
    def confident_agree(self) -> bool:
        """True when every confident position agrees."""
        return self.confident_disagreements == 0


def argmax_agreement(actual_logits, expected_logits, margin: float) -> ArgmaxAgreement:
    """How often the top token of ``actual_logits`` matches that of ``expected_logits``.

    Args:
        actual_logits, expected_logits: ``(..., V)`` of the same shape.
        margin: absolute logit gap; a position is *confident* when the expected
            top-1 logit exceeds the expected top-2 logit by more than this.

    Raises:
        ConformanceError: the shapes differ or ``V`` is 0.
    """
    a = np.asarray(actual_logits, dtype=np.float64)
    e = np.asarray(expected_logits, dtype=np.float64)
    if a.shape != e.shape or a.ndim == 0 or a.shape[-1] == 0:
        raise ConformanceError(f"argmax_agreement needs equal (..., V>0) shapes, got {a.shape} and {e.shape}")
    agree = np.argmax(a, axis=-1) == np.argmax(e, axis=-1)
    if e.shape[-1] == 1:
        gap = np.full(e.shape[:-1], np.inf)
    else:
        top2 = np.partition(e, -2, axis=-1)[..., -2:]
        gap = top2[..., 1] - top2[..., 0]
    confident = gap > margin
    return ArgmaxAgreement(
        fraction=float(agree.mean()) if agree.size else 1.0,
        positions=int(agree.size),
        confident=int(np.count_nonzero(confident)),
        confident_disagreements=int(np.count_nonzero(confident & ~agree)),
    )
