"""The one tolerance table of the suite, keyed by (kind of output, dtype), and the rules that apply it.

A backend's output is judged against the float64 expected output by one of four rules
(the rationale and the calibration numbers are in ``docs/tolerances.md``):

========  ==================================================================================
rule      pass when
========  ==================================================================================
ratio     ``err <= k * reference_err + floor``, on rel RMS and on max abs, where
          ``reference_err`` is the error of the reference's own run in the backend's dtype
          against the same expected output (recorded in the corpus, ``reference_error`` of
          the manifest entry): reductions, attention, recurrences, MoE, MLA, routing weights,
          RoPE rotations, model logits, taps, MTP drafts and scenario steps
ulp       every element within ``ulp`` units in the last place (of the run dtype) of the
          reference's own result in that dtype (``outputs.<name>@<dtype>`` of the case):
          elementwise ops (``op_elementwise``: soft-cap); and where the architecture pins the
          rounding points (``op_rounding``: RMSNorm's cast order, the embedding scale rounded
          to the dtype first), at most ``mismatch`` of the elements different from it at all
exact     equal element for element, in every dtype: integer outputs (a router's
          ``selected``, ``refimpl.ops.Op.integer_outputs``), a 0/1 matrix and so
          independent of the order in which an engine lists the k experts
absolute  ``rel_rms`` and ``max_abs_rel * max |e|``: float64, where the reference *is* the
          expected output (no reference error); and, labelled ``interim``, a float32 / float16
          / bfloat16 run of a case whose reference error (or rounded result) the corpus does
          not record (a corpus made before the error model, or a dtype the reference could not
          run in when it was generated)
========  ==================================================================================

Floors are fractions of the expected tensor's scale: ``floor_rel_rms`` is a relative RMS,
``floor_max_abs_rel`` multiplies ``max |e|``. They are written in units of the dtype's machine
epsilon (:data:`EPSILON`), except RoPE's at float32, which are the float32-angle allowance (an
engine forms ``p * inv_freq`` in float32: an angle error up to ``p * 2^-24`` radians, which the
reference's float32 run, angles in float64, does not make; in float16 / bfloat16 the reference's
own rounding of the tables and the output covers it). The argmax check on logits (``argmax_margin``, a fraction of ``max |e|``, and
at least twice the reference's own max abs error where the corpus records it:
:func:`argmax_margin`) applies under every rule. Non-finite values where the expected value is
finite and shape mismatches always fail.

No entry depends on the backend: a backend's accepted deviations live in its own xfail file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .compare import Comparison
from .errors import ConformanceError

#: Machine epsilon (spacing of 1.0) of the dtypes the reference's own error is recorded in.
EPSILON = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
#: Explicit mantissa bits and smallest normal exponent, for ULP distances.
_MANTISSA = {"float32": (23, -126), "float16": (10, -14), "bfloat16": (7, -126)}
#: Dtypes whose reference error the corpus records (float64 is the specification itself).
REFERENCE_DTYPES = tuple(EPSILON)
#: Largest fraction of elements allowed to differ from the reference's own rounding in float16
#: and bfloat16 (the ``mismatch`` of ``op_rounding``, and the check applied to a recorded
#: rounded result of a kind without a ULP window).
MAX_ROUNDING_MISMATCH = 0.01


@dataclass(frozen=True)
class Tolerance:
    """One row of :data:`TOLERANCES`.

    Attributes:
        rel_rms, max_abs_rel: absolute bounds (rel RMS; max abs as a fraction of ``max |e|``):
            the rule at float64, and the interim rule at a lower dtype without a recorded
            reference error.
        argmax_margin: logits only: positions whose expected top-1/top-2 gap exceeds
            ``argmax_margin * max |e|`` must keep their argmax.
        k, floor_rel_rms, floor_max_abs_rel: the ratio rule (``k`` None: the row has none).
        ulp, mismatch: the ULP rule (``ulp`` None: the row has none; ``mismatch`` None: no limit
            on the fraction of elements that differ from the reference's rounding).
    """

    rel_rms: float
    max_abs_rel: float
    argmax_margin: float
    k: float | None = None
    floor_rel_rms: float = 0.0
    floor_max_abs_rel: float = 0.0
    ulp: float | None = None
    mismatch: float | None = None


#: The ratio of every ratio kind and dtype, as FlashAttention's tests (docs/tolerances.md).
K = 2.0

#: The interim absolute bounds (rel RMS, max abs rel) of each kind at float32, float16, bfloat16:
#: corpus 0.10.0's provisional bounds, applied only where the corpus records no reference error.
_INTERIM = {
    "model_logits": {"float32": (2e-5, 2e-4), "float16": (4e-3, 6e-3), "bfloat16": (2.5e-2, 5e-2)},
    "op_exact": {"float32": (1e-6, 1e-5), "float16": (2e-3, 4e-3), "bfloat16": (1.6e-2, 3e-2)},
    "op_elementwise": {"float32": (1e-6, 1e-5), "float16": (2e-3, 4e-3), "bfloat16": (1.6e-2, 3e-2)},
    "op_rounding": {"float32": (1e-6, 1e-5), "float16": (2e-3, 4e-3), "bfloat16": (1.6e-2, 3e-2)},
    "op_attention": {"float32": (2e-6, 2e-5), "float16": (3e-3, 6e-3), "bfloat16": (2.5e-2, 5e-2)},
    "op_rope": {"float32": (2e-5, 1e-4), "float16": (3e-3, 6e-3), "bfloat16": (2.5e-2, 5e-2)},
    "op_rope_long": {"float32": (2e-3, 1e-2), "float16": (3e-3, 6e-3), "bfloat16": (2.5e-2, 5e-2)},
    "op_routing": {"float32": (1e-6, 1e-5), "float16": (2e-3, 4e-3), "bfloat16": (1.6e-2, 3e-2)},
    "op_moe": {"float32": (1e-6, 5e-6), "float16": (4e-3, 6e-3), "bfloat16": (3e-2, 2.5e-2)},
    "op_mla": {"float32": (1e-6, 5e-6), "float16": (3e-3, 4e-3), "bfloat16": (2.5e-2, 3e-2)},
    "op_mtp": {"float32": (1.5e-6, 2e-6), "float16": (4e-3, 5e-3), "bfloat16": (3e-2, 4e-2)},
}
#: argmax margins, as a fraction of max |logit|.
_ARGMAX = {"float64": 1e-8, "float32": 1e-3, "float16": 5e-3, "bfloat16": 3e-2}
#: Single-op kinds judged by the ratio rule with the ops' floors (RoPE's are below).
_RATIO_OPS = ("op_exact", "op_attention", "op_routing", "op_moe", "op_mla", "op_mtp")
#: Floors (rel RMS, max abs) in units of epsilon, set from transformers' errors on corpus 0.11.0
#: with 1.5-2x headroom: float32, where reordered float32 sums scatter the ratio of noise-level
#: errors; float16 / bfloat16, where both round at the same storage points.
_OP_FLOORS = {"float32": (2.0, 2.0), "float16": (0.25, 1.0), "bfloat16": (0.25, 1.0)}
_MODEL_FLOORS = {"float32": (3.0, 8.0), "float16": (0.25, 1.0), "bfloat16": (0.25, 1.0)}
#: The float32-angle allowance (rel RMS, max abs rel) of RoPE at positions below 1024 and up to 131071:
#: the float32 floors, where the reference's own float32 run (angles in float64) has no angle error.
_ROPE_ANGLE = {"op_rope": (2e-5, 1e-4), "op_rope_long": (2e-3, 6e-3)}
#: RoPE's float16 / bfloat16 floors (rel RMS, max abs) in units of epsilon: there the reference's own
#: error (cos / sin tables and the rotated output rounded to the dtype) covers an engine's float32
#: angle error on rel RMS; the max abs floor is 2 eps, not 1, for long positions (transformers in
#: float16 needs 1.43 eps).
_ROPE_HALF_FLOORS = (0.25, 2.0)


def _in_eps(dtype: str, floors: tuple[float, float]) -> tuple[float, float]:
    return floors[0] * EPSILON[dtype], floors[1] * EPSILON[dtype]


def _ratio(kind: str, dtype: str, floors: tuple[float, float], argmax: float = 0.0) -> Tolerance:
    """A ratio row: ``k = K`` over ``floors`` (absolute), with the kind's interim bounds."""
    rel, mx = _INTERIM[kind][dtype]
    return Tolerance(rel_rms=rel, max_abs_rel=mx, argmax_margin=argmax, k=K, floor_rel_rms=floors[0],
                     floor_max_abs_rel=floors[1])


def _rope_floors(kind: str, dtype: str) -> tuple[float, float]:
    """float32: the float32-angle allowance; float16 / bfloat16: :data:`_ROPE_HALF_FLOORS`."""
    return _ROPE_ANGLE[kind] if dtype == "float32" else _in_eps(dtype, _ROPE_HALF_FLOORS)


def _ulp(kind: str, dtype: str, window: float, mismatch: float | None = None) -> Tolerance:
    return Tolerance(*_INTERIM[kind][dtype], argmax_margin=0.0, ulp=window, mismatch=mismatch)


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # float64: the expected output is the reference itself; absolute bounds.
    ("model_logits", "float64"): Tolerance(rel_rms=1e-10, max_abs_rel=1e-9, argmax_margin=_ARGMAX["float64"]),
    **{(kind, "float64"): Tolerance(rel_rms=1e-12, max_abs_rel=1e-11, argmax_margin=0.0)
       for kind in (*_RATIO_OPS, "op_elementwise", "op_rounding", "op_rope")},
    ("op_rope_long", "float64"): Tolerance(rel_rms=1e-10, max_abs_rel=1e-9, argmax_margin=0.0),
    # Ratio kinds: at most K times the reference's own error in the dtype, over a floor.
    **{("model_logits", d): _ratio("model_logits", d, _in_eps(d, _MODEL_FLOORS[d]), _ARGMAX[d])
       for d in REFERENCE_DTYPES},
    **{(kind, d): _ratio(kind, d, _in_eps(d, _OP_FLOORS[d])) for kind in _RATIO_OPS for d in REFERENCE_DTYPES},
    **{(kind, d): _ratio(kind, d, _rope_floors(kind, d)) for kind in _ROPE_ANGLE for d in REFERENCE_DTYPES},
    # Elementwise ops: a ULP window around the reference's own result in the dtype; where the
    # architecture pins the rounding points, float16 / bfloat16 must also reproduce them.
    **{("op_elementwise", d): _ulp("op_elementwise", d, 4) for d in REFERENCE_DTYPES},
    ("op_rounding", "float32"): _ulp("op_rounding", "float32", 4),
    **{("op_rounding", d): _ulp("op_rounding", d, 1, MAX_ROUNDING_MISMATCH) for d in ("float16", "bfloat16")},
}


def get_tolerance(tolerance_class: str, dtype: str) -> Tolerance:
    """The tolerance for ``tolerance_class`` at ``dtype``.

    Raises:
        ConformanceError: the pair is not in :data:`TOLERANCES` (the known pairs are listed).
    """
    try:
        return TOLERANCES[(tolerance_class, dtype)]
    except KeyError:
        known = ", ".join(f"{c}/{d}" for c, d in TOLERANCES)
        raise ConformanceError(f"no tolerance for class '{tolerance_class}' at dtype {dtype}; known: {known}") from None


@dataclass(frozen=True)
class RecordedError:
    """The reference's own error in one dtype against the float64 expected output, for one tensor
    (``max_abs`` in the tensor's units, as :class:`~conformance.compare.Comparison`)."""

    rel_rms: float
    max_abs: float


@dataclass(frozen=True)
class Judgement:
    """How one compared tensor was judged: the rule, the bounds it had to meet, the reference's own
    error in the run dtype and the backend's ratio to it, and what it broke.

    Attributes:
        rule: ``"ratio"``, ``"ulp"``, ``"exact"``, ``"absolute"`` (float64), ``"interim"``
            (a lower dtype whose reference error the corpus does not record: absolute bounds),
            or ``"missing"`` (an output or MTP depth the backend did not return).
        bound_rel_rms, bound_max_abs: the bounds on rel RMS and on max abs (in the tensor's
            units); None under the ulp and exact rules.
        reference_rel_rms, reference_max_abs: the reference's own error in the run dtype
            (None at float64 and where the corpus records none).
        ratio_rel_rms, ratio_max_abs: the backend's error over the reference's (inf when the
            reference's error is 0 and the backend's is not; None without a reference error).
        max_ulp, ulp_window: the ulp rule: the largest distance from the reference's rounded
            result, in units in the last place of the run dtype, and the window.
        mismatch, mismatch_allowed: the fraction of elements that differ from the reference's
            rounded result at all, and the fraction allowed.
        failures: one short description per broken bound; empty when the tensor passes.
    """

    rule: str
    bound_rel_rms: float | None = None
    bound_max_abs: float | None = None
    reference_rel_rms: float | None = None
    reference_max_abs: float | None = None
    ratio_rel_rms: float | None = None
    ratio_max_abs: float | None = None
    max_ulp: float | None = None
    ulp_window: float | None = None
    mismatch: float | None = None
    mismatch_allowed: float | None = None
    failures: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures


def ratio(backend: float, reference: float) -> float:
    """``backend / reference``; inf when only the reference's error is 0, 0 when both are."""
    if reference > 0:
        return backend / reference
    return 0.0 if backend == 0 else math.inf


def ulp_distance(actual: np.ndarray, rounded: np.ndarray, dtype: str) -> np.ndarray:
    """``|actual - rounded|`` in units in the last place of ``dtype`` at ``rounded`` (float64;
    below the smallest normal number, the spacing there)."""
    mantissa, min_exponent = _MANTISSA[dtype]
    magnitude = np.abs(np.asarray(rounded, dtype=np.float64))
    magnitude = np.where(np.isfinite(magnitude), magnitude, 0.0)
    # frexp gives |r| = m 2^e with m in [0.5, 1): the leading bit is 2^(e - 1); 0 has none.
    _, exponent = np.frexp(magnitude)
    leading = np.where(magnitude > 0, exponent - 1, min_exponent)
    ulp = np.exp2(np.maximum(leading, min_exponent) - mantissa)
    with np.errstate(invalid="ignore"):
        return np.abs(np.asarray(actual, dtype=np.float64) - rounded) / ulp


def _structural(comparison: Comparison) -> list[str]:
    """Failures of any rule: a shape mismatch (alone), or unmatched NaN/Inf."""
    if comparison.shape_mismatch:
        return [f"shape {comparison.actual_shape} != expected {comparison.expected_shape}"]
    return [f"{comparison.nonfinite} unmatched NaN/Inf"] if comparison.nonfinite else []


def violations(comparison: Comparison, tolerance: Tolerance) -> list[str]:
    """Short descriptions of every absolute bound ``comparison`` breaks (``rel_rms``,
    ``max_abs_rel``); empty when it passes. Without a reference error this is the whole rule;
    :func:`judge_tensor` applies the error model."""
    found = _structural(comparison)
    if comparison.shape_mismatch:
        return found
    if comparison.rel_rms > tolerance.rel_rms:
        found.append(f"rel RMS {comparison.rel_rms:.3g} > {tolerance.rel_rms:g}")
    max_abs_bound = tolerance.max_abs_rel * comparison.max_abs_expected
    if comparison.max_abs > max_abs_bound:
        found.append(f"max abs {comparison.max_abs:.3g} > {max_abs_bound:.3g}")
    return found


def judge_tensor(comparison: Comparison, tolerance: Tolerance, dtype: str, reference: RecordedError | None = None,
                 actual: np.ndarray | None = None, rounded: np.ndarray | None = None) -> Judgement:
    """Judge one compared tensor by the rule its row and the corpus's records call for.

    Args:
        comparison: the backend's output against the float64 expected output.
        tolerance: the row of :data:`TOLERANCES` for the case's kind and ``dtype``.
        reference: the reference's own error in ``dtype`` (None: not recorded).
        actual, rounded: the backend's output and the reference's own result in ``dtype``,
            when the corpus records the latter (``outputs.<name>@<dtype>``).
    """
    recorded = {} if reference is None else {
        "reference_rel_rms": reference.rel_rms, "reference_max_abs": reference.max_abs,
        "ratio_rel_rms": ratio(comparison.rel_rms, reference.rel_rms),
        "ratio_max_abs": ratio(comparison.max_abs, reference.max_abs)}
    if rounded is not None and actual is not None and tolerance.ulp is not None:
        return _judge_ulp(comparison, tolerance, dtype, actual, rounded, recorded)
    if dtype == "float64" or tolerance.k is None or reference is None:
        rule = "absolute" if dtype == "float64" else "interim"
        failures = violations(comparison, tolerance)
        judgement = Judgement(rule, tolerance.rel_rms, tolerance.max_abs_rel * comparison.max_abs_expected,
                              failures=tuple(failures), **recorded)
    else:
        judgement = _judge_ratio(comparison, tolerance, reference, recorded)
    if rounded is not None and actual is not None:
        judgement = _with_rounding_check(judgement, actual, rounded, dtype)
    return judgement


def _judge_ratio(comparison: Comparison, tolerance: Tolerance, reference: RecordedError, recorded: dict) -> Judgement:
    """``err <= k * reference_err + floor`` on rel RMS and on max abs."""
    k = tolerance.k
    floor_max = tolerance.floor_max_abs_rel * comparison.max_abs_expected
    bound_rel = k * reference.rel_rms + tolerance.floor_rel_rms
    bound_max = k * reference.max_abs + floor_max
    failures = _structural(comparison)
    if not comparison.shape_mismatch:
        if comparison.rel_rms > bound_rel:
            failures.append(f"rel RMS {comparison.rel_rms:.3g} > {bound_rel:.3g} = {k:g} x reference "
                            f"{reference.rel_rms:.3g} + floor {tolerance.floor_rel_rms:.3g} "
                            f"(ratio {recorded['ratio_rel_rms']:.3g})")
        if comparison.max_abs > bound_max:
            failures.append(f"max abs {comparison.max_abs:.3g} > {bound_max:.3g} = {k:g} x reference "
                            f"{reference.max_abs:.3g} + floor {floor_max:.3g} (ratio {recorded['ratio_max_abs']:.3g})")
    return Judgement("ratio", bound_rel, bound_max, failures=tuple(failures), **recorded)


def _judge_ulp(comparison: Comparison, tolerance: Tolerance, dtype: str, actual: np.ndarray, rounded: np.ndarray,
               recorded: dict) -> Judgement:
    """Every element within ``ulp`` of the reference's rounded result, at most ``mismatch`` differing
    (when the row sets it)."""
    failures = _structural(comparison)
    distance = mismatch = None
    if actual.shape == rounded.shape:
        finite = np.isfinite(actual) & np.isfinite(rounded)
        distance = float(ulp_distance(actual[finite], rounded[finite], dtype).max(initial=0.0))
        mismatch = float(np.mean(actual != rounded)) if actual.size else 0.0
        if distance > tolerance.ulp:
            failures.append(f"{distance:.3g} ULP from the reference's {dtype} result (> {tolerance.ulp:g} ULP)")
        if tolerance.mismatch is not None and mismatch > tolerance.mismatch:
            failures.append(f"{mismatch:.1%} of elements differ from the reference's {dtype} rounding "
                            f"(> {tolerance.mismatch:.0%}; the output must be rounded to {dtype} as the case's "
                            "cast order rounds)")
    elif not failures:
        failures.append(f"shape {actual.shape} != the reference's {dtype} result {rounded.shape}")
    return Judgement("ulp", max_ulp=distance, ulp_window=tolerance.ulp, mismatch=mismatch,
                     mismatch_allowed=tolerance.mismatch, failures=tuple(failures), **recorded)


def _with_rounding_check(judgement: Judgement, actual: np.ndarray, rounded: np.ndarray, dtype: str) -> Judgement:
    """A rule without a ULP window, on a tensor whose rounded result the corpus records (a corpus
    before the error model pinned RMSNorm cast orders so): at most :data:`MAX_ROUNDING_MISMATCH`
    of the elements may differ from it."""
    mismatch = float(np.mean(actual != rounded)) if actual.shape == rounded.shape and actual.size else 1.0
    failures = list(judgement.failures)
    if mismatch > MAX_ROUNDING_MISMATCH:
        failures.append(f"{mismatch:.1%} of elements differ from the reference's {dtype} rounding "
                        f"(> {MAX_ROUNDING_MISMATCH:.0%}; the output must be rounded to {dtype} as the case's "
                        "cast order rounds)")
    return Judgement(**{**vars(judgement), "mismatch": mismatch, "mismatch_allowed": MAX_ROUNDING_MISMATCH,
                        "failures": tuple(failures)})


def argmax_margin(tolerance: Tolerance, comparison: Comparison, judgement: Judgement) -> float:
    """The absolute top-1/top-2 gap above which a position's argmax must not change: the row's
    ``argmax_margin * max |e|``, and where the corpus records the reference's own error at least
    twice its max abs error. A gap below that may flip in the reference's own run in the dtype
    (it does at bfloat16 where a routing decision flips), so it cannot be required of a backend;
    above it, a flip is a discrete error the reference does not make, even where the backend's
    max abs error is within its bound (up to k times the reference's)."""
    margin = tolerance.argmax_margin * comparison.max_abs_expected
    if judgement.reference_max_abs is not None:
        margin = max(margin, 2 * judgement.reference_max_abs)
    return margin


def exact_judgement(failures: list[str]) -> Judgement:
    """The judgement of an integer output compared exactly (``failures`` from the runner)."""
    return Judgement("exact", failures=tuple(failures))
