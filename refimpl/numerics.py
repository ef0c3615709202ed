"""Compute-dtype policy and the argument checks shared by every component.

The reference runs in one floating dtype per call, float64 by default. Every public
function takes arrays already in that dtype and returns arrays in it; this module
names the dtypes we accept and gives the boundary check that keeps NumPy 2 from
silently promoting a float32 computation to float64 (``x_f32 / np.sqrt(d)`` with a
Python float stays float32, but a float64 NumPy scalar does not).

Dtypes (the definition; ``docs/low-precision.md`` gives the per-component table):

* **float64** (the specification) and **float32**: a component computes in the dtype
  of its arrays, end to end. Nothing below changes these two paths: the helpers
  return the arrays themselves, with no cast.
* **float16** and **bfloat16** (``ml_dtypes.bfloat16``), *storage* dtypes with
  float32 compute per component: weights, activations, KV caches and logits are
  held in the storage dtype d; each component function (a projection, RMSNorm, the
  application of RoPE, attention, an activation, a router, the MoE combine, the delta
  rule, ...) widens its d inputs to float32 (exact), computes in float32 and rounds
  its outputs to d once (:func:`to_compute`, :func:`to_storage`, in that order in
  each component's body). Between components the model code keeps only the
  elementwise arithmetic of its equations (residual adds, products with a gate);
  NumPy and ``ml_dtypes`` run each such operation on two d arrays in float32 and
  round the result to d once, as a PyTorch eager op does. Reductions and matrix
  products never run on d arrays. This is op-granularity low precision as PyTorch
  eager runs it, without transformers' own float32 islands. The dtype travels with
  the arrays: there is no global mode.
  Exceptions, where engines keep float32 whatever the model dtype: Gated DeltaNet's
  log-decay ``g`` and recurrent state stay float32 (transformers, flash-linear-attention);
  router logits are never rounded (the router is one component from the hidden state to
  the routing weights, :func:`refimpl.routers.router_logits`); the tensors an
  architecture lists in ``float32_weights`` are held in float32 (DeepSeek-V3's and
  GLM-4.5's router, as transformers' ``_keep_in_fp32_modules_strict``).

Boundary checks (every public op and component calls them on its arguments):

* :func:`as_float_array`: an array argument as an ndarray of an accepted real
  floating dtype (float64, float32, bfloat16, float16; float128 is refused).
  Integers, bools, complex, strings and objects are refused, never cast: integer
  q/k/v would make ``scale`` an integer 0 and return a wrong answer.
  NaN and inf *inside* an array argument are data and propagate.
* :func:`as_integer_array`: positions and other integer arrays; :func:`as_array` for
  any other array (a boolean mask), refusing only ragged input.
* :func:`check_finite`, :func:`check_finite_positive`, :func:`check_finite_nonnegative`:
  scalar parameters (eps, scale, caps, embed scale). A NaN or infinite *parameter*
  is refused; with ``dtype`` the value is also checked after rounding to that dtype
  (a scale of 1e-50 is 0 in float32).

Each raises :class:`~refimpl.errors.InputError` (or :class:`~refimpl.errors.ShapeError`
for a wrong number of axes) with a one-line message that starts with ``name``, the
argument as the caller spells it (``"attention: q"``, ``"rms_norm: eps"``).
"""

from __future__ import annotations

import functools
import math
import numbers

import ml_dtypes  # noqa: F401  (registers the name "bfloat16" with NumPy)
import numpy as np

from .errors import InputError, RefimplError, ShapeError

#: Dtypes the reference computes in. float64 is the specification; float32 is
#: offered to measure the error a float32 engine should expect.
COMPUTE_DTYPES = {"float64": np.float64, "float32": np.float32}
#: Storage dtypes with float32 compute per component (module docstring). bfloat16 is
#: ``ml_dtypes.bfloat16``, recognised by its name: it is not a ``np.floating`` subtype.
LOW_PRECISION_DTYPES = ("bfloat16", "float16")
#: Every floating dtype the reference runs in: a model, and every op and component.
FLOAT_DTYPES = (*COMPUTE_DTYPES, *LOW_PRECISION_DTYPES)


def _dtype_list(names) -> str:
    """``"float64, float32 or bfloat16"``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_dtype(dtype, dtypes=tuple(COMPUTE_DTYPES)) -> np.dtype:
    """Return the NumPy dtype for ``dtype`` (a name, a NumPy type or dtype), one of ``dtypes``.

    ``"bfloat16"`` names ``ml_dtypes.bfloat16`` (ml_dtypes registers the name with NumPy).

    Raises:
        RefimplError: ``dtype`` is unknown or not one of ``dtypes`` (by default float64 or float32;
            :data:`FLOAT_DTYPES` adds float16 and bfloat16).
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise RefimplError(f"unknown dtype {dtype!r}; use {_dtype_list(dtypes)}") from exc
    if resolved.name not in dtypes:
        raise RefimplError(f"the reference runs in {_dtype_list(dtypes)}, not {resolved.name}")
    return resolved


def is_low_precision(dtype) -> bool:
    """Whether ``dtype`` is a storage dtype computed on in float32 (float16, bfloat16)."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    return dtype in _LOW_PRECISION


def compute_dtype(dtype) -> np.dtype:
    """The dtype a component computes in for arrays held in ``dtype``: float32 for float16
    and bfloat16, ``dtype`` itself for float64 and float32."""
    dtype = np.dtype(dtype)
    return _FLOAT32 if is_low_precision(dtype) else dtype


def to_compute(array):
    """A float16 / bfloat16 array widened to float32 (exact); any other array, or None, as is (no copy).

    The first half of every component's cast pair: its inputs are widened, it computes, and
    :func:`to_storage` rounds its outputs back.
    """
    if array is None or array.dtype not in _LOW_PRECISION:
        return array
    return array.astype(np.float32)


def to_storage(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` rounded once to the storage ``dtype`` when that is float16 or bfloat16;
    ``array`` itself (no cast) when ``dtype`` is float64 or float32.

    A float32 array is rounded directly. A float64 array is rounded correctly too:
    ``ml_dtypes`` casts float64 to bfloat16 through float32, which can round twice (a
    value just above a bfloat16 midpoint becomes the midpoint in float32, then ties to
    even), so float64 is first rounded to float32 *to odd* (truncate, and set the last
    bit when inexact), which makes the second rounding the correct one.
    """
    if not is_low_precision(dtype):
        return array
    if array.dtype == np.float64:
        array = _float32_round_to_odd(array)
    return array.astype(dtype)


def _float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` to float32 rounded to odd: the float32 value toward zero, its last bit
    set when that is inexact (infinities, NaN and values beyond float32 go the ordinary way)."""
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = x.astype(np.float32)
        toward_zero = np.where(np.abs(nearest.astype(np.float64)) > np.abs(x),
                               np.nextafter(nearest, np.float32(0)), nearest)
        inexact = (toward_zero.astype(np.float64) != x) & np.isfinite(nearest)
    bits = toward_zero.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)


_FLOAT32 = np.dtype(np.float32)
_LOW_PRECISION = frozenset(np.dtype(name) for name in LOW_PRECISION_DTYPES)


def check_same_dtype(**arrays: np.ndarray) -> np.dtype:
    """Return the common dtype of ``arrays``; raise if they differ.

    Raises:
        RefimplError: two arrays have different dtypes (naming them).
    """
    dtypes = {name: np.asarray(a).dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise RefimplError(f"arrays must share one compute dtype, got {listed}")
    return next(iter(dtypes.values()))


def as_array(name: str, value) -> np.ndarray:
    """``np.asarray(value)``; InputError naming ``name`` when ``value`` is ragged or not array-like."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name} must be a rectangular array of numbers ({exc})") from None


def _check_ndim(name: str, array: np.ndarray, ndim: int | None) -> None:
    if ndim is not None and array.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} axes, got shape {array.shape}")


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: NumPy derives it in Python at every access, and every
    boundary check asks for it (over a quarter of a small model's decode step went there)."""
    return dtype.name


def as_float_array(name: str, value, *, dtypes=FLOAT_DTYPES, ndim: int | None = None) -> np.ndarray:
    """``value`` as an ndarray of one of the floating ``dtypes``, never cast.

    Args:
        name: the argument as messages name it, e.g. ``"attention: q"``.
        value: an ndarray or array-like (a list of Python floats becomes float64).
        dtypes: accepted dtype names, by default :data:`FLOAT_DTYPES` (float64, float32,
            bfloat16, float16).
        ndim: the required number of axes, or None for any.

    Returns:
        ``np.asarray(value)``: the same array when ``value`` already is one.

    Raises:
        InputError: ``value`` is not a rectangular array, or its dtype is not one of
            ``dtypes`` (integers, bools, complex, strings, objects, other floats).
        ShapeError: ``ndim`` is given and ``value`` has another number of axes.
    """
    array = as_array(name, value)
    if _dtype_name(array.dtype) not in dtypes:
        raise InputError(f"{name} must be a {_dtype_list(dtypes)} array, got dtype {array.dtype}")
    _check_ndim(name, array, ndim)
    return array


def as_integer_array(name: str, value, *, ndim: int | None = None) -> np.ndarray:
    """``value`` as an ndarray of a (signed or unsigned) integer dtype, never cast; bools are refused.

    Raises:
        InputError: not a rectangular array, or not integers.
        ShapeError: ``ndim`` is given and ``value`` has another number of axes.
    """
    array = as_array(name, value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    _check_ndim(name, array, ndim)
    return array


def _scalar(name: str, value, requirement: str, holds, dtype, error: type[RefimplError]):
    """``value`` as a float (or rounded to ``dtype``) if it is a real number for which ``holds``
    is true before and after rounding; ``error`` saying ``requirement`` otherwise."""
    real = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")
    if not real:
        raise error(f"{name} must be {requirement}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and holds(number)):
        raise error(f"{name} must be {requirement}, got {value!r}")
    if dtype is None:
        return number
    with np.errstate(over="ignore", under="ignore"):
        rounded = np.dtype(dtype).type(number)
    if not (math.isfinite(float(rounded)) and holds(float(rounded))):
        raise error(f"{name} must be {requirement} in {np.dtype(dtype).name}, got {value!r}, "
                         f"which rounds to {float(rounded)!r}")
    return rounded


def check_finite(name: str, value, *, dtype=None, error: type[RefimplError] = InputError):
    """A finite real scalar parameter.

    Args:
        name: the argument as messages name it, e.g. ``"rope_cos_sin: attention_scaling"``.
        value: a Python or NumPy real number, or a 0-d real array; bools are refused.
        dtype: if given, the value is rounded to it and must still pass there.
        error: the class raised; :class:`~refimpl.errors.ConfigError` for values read
            from config.json (RoPE parameters).

    Returns:
        ``float(value)``, or the value rounded to ``dtype`` (a NumPy scalar) when given.

    Raises:
        InputError (or ``error``): not a real number, or NaN / infinite (before or after rounding).
    """
    return _scalar(name, value, "a finite number", lambda v: True, dtype, error)


def check_finite_positive(name: str, value, *, dtype=None, error: type[RefimplError] = InputError):
    """A finite scalar parameter > 0 (a scale, a cap), as :func:`check_finite`; a value that
    rounds to 0 or overflows in ``dtype`` is refused too.

    Raises:
        InputError (or ``error``): not a real number, NaN, infinite or not positive.
    """
    return _scalar(name, value, "a positive finite number", lambda v: v > 0, dtype, error)


def check_finite_nonnegative(name: str, value, *, dtype=None, error: type[RefimplError] = InputError):
    """A finite scalar parameter >= 0 (an epsilon), as :func:`check_finite`.

    Raises:
        InputError (or ``error``): not a real number, NaN, infinite or negative.
    """
    return _scalar(name, value, "a finite number >= 0", lambda v: v >= 0, dtype, error)
