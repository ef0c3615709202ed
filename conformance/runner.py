"""Run one backend over golden cases and judge each against the tolerance table.

Model cases: check ``supports``, load the checkpoint, run the inputs, compare every
tap the backend returns and the logits with the golden tensors, then check the
argmax of the logits. Op cases: look the op up in the backend's ``ops`` mapping
(absent: "not implemented"), check ``supports``, call it with the case's inputs
cast to the run dtype and its keyword parameters, and compare every output. File
hashes of all selected cases are verified before the first case runs; a mismatch
stops the whole run.

Each compared tensor is judged by :func:`conformance.tolerances.judge_tensor` (the error
model): at float32, float16 and bfloat16 against the reference's own error in that dtype,
which the corpus records per case and output (``Case.reference_error``); elementwise ops
against the reference's own rounded result (``outputs.<name>@<dtype>``); at float64 by
absolute bounds. ``CaseResult.judgements`` keeps, per tensor, the rule, the bounds, the
reference's error and the backend's ratio to it: the three numbers every report shows.

Integer outputs of an op (``refimpl.ops.Op.integer_outputs``: the experts a router
selected) are compared exactly, in every dtype; the tolerance applies to the rest.

Model cases with multi-token-prediction outputs (``Case.mtp_depths`` D > 0) also compare
the backend's ``mtp_logits`` as ``mtp_logits.1`` .. ``mtp_logits.{D}``, after the logits
and with the same tolerance; a backend that returns none for such a case is "not
implemented", one that returns fewer depths than the case has fails at the first missing one.

Scenario cases (``Case.schedule``; ``docs/scenarios.md``): the backend's loaded model must
offer the optional capability ``prefill`` / ``decode`` / ``rollback`` (else "not implemented").
The runner replays the schedule, feeding each step's ids (the prompt with its attention mask,
or None when it is not padded) and the state the previous call returned, and compares every
prefill and decode step's logits at the real (non-pad) positions with the case's tolerance,
like a model case's logits (argmax check included). ``first_divergence`` names the first
failing step, e.g. ``steps.3 (decode 1 after 12 tokens)``; every step's comparison is kept, as a
:class:`StepComparison` that also says in which row and position its max abs error is (the failure
message names them for the first failing step). Extra outputs a loaded model lists with an optional
``uncompared_outputs()`` (the file contract's backend does) are reported as not compared.
A step that raises makes the case "error", its message naming the step (a step that failed
before it keeps the case "failed" there); ``NotImplementedError`` makes it "not implemented".

Statuses:
    passed           every compared tensor is within its tolerance (integer outputs: equal)
    failed           some tensor is not; ``first_divergence`` names the first one in
                     forward order (embed, layers.0, ..., norm, logits)
    not implemented  ``supports`` returned a reason, the backend has no such op, or
                     the op raised ``NotImplementedError`` (a parameter combination
                     it does not offer)
    nan              like failed, but a compared tensor holds NaN or Inf where the
                     expected value is finite
    error            the backend raised; its one-line message is kept
    crashed          the backend's worker process died on this case (isolated runs,
                     ``conformance.isolation``); the run goes on in a new worker
    timed out        no result within the per-case timeout (isolated runs); the worker
                     was killed and the run goes on
    skipped          a skip file lists the case; it is not run
    xfailed          an xfail file lists the case and it failed or errored (not a failure)
    xpassed          an xfail file lists the case and it passed (strict: the run exits 1)

Skip and xfail files are described in ``conformance.expectations``; a case an xfail
file lists that is "not implemented" stays "not implemented".

Ctrl-C during :func:`run_suite` raises :class:`RunInterrupted`, which carries the
results of the cases that finished, so that reports can still be written (marked partial).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from .backends.base import Backend
from .compare import ArgmaxAgreement, Comparison, argmax_agreement, compare, to_float64
from .errors import BackendError, ConformanceError, ManifestError, OutputError
from .expectations import Entry, Expectations
from .manifest import (
    MTP_PREFIX, Case, ScenarioStep, inside, load_case_data, load_case_mtp_logits, load_op_data, load_scenario_data,
    verify_case_files,
)
from .tolerances import (
    Judgement, RecordedError, Tolerance, argmax_margin, exact_judgement, get_tolerance, judge_tensor,
)


class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_IMPLEMENTED = "not implemented"
    ERROR = "error"
    SKIPPED = "skipped"
    XFAILED = "xfailed"
    XPASSED = "xpassed"
    NAN = "nan"
    CRASHED = "crashed"
    TIMED_OUT = "timed out"


#: Statuses that mean the backend got the case wrong (an xfail entry turns them into "xfailed").
BROKEN = (Status.FAILED, Status.NAN, Status.ERROR, Status.CRASHED, Status.TIMED_OUT)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_suite`; ``results`` holds the cases that finished, in order."""

    def __init__(self, results: list):
        super().__init__("interrupted")
        self.results = results


@dataclass
class CaseResult:
    """Outcome of one case.

    Attributes:
        case_id, dtype, status: what ran, in which dtype, and how it went.
        message: the reason for "not implemented", the exception for "error", or
            the broken bounds of the first diverging tensor for "failed".
        tolerance: the bounds applied.
        comparisons: ``{tensor name: Comparison}`` in forward order, logits last.
        argmax: agreement of the logits' argmax (``None`` if the logits' shape is wrong).
        first_divergence: on failure, the first tensor in forward order that fails.
        uncompared: taps the backend returned that the golden data lacks.
        rounding: op cases with a recorded low-precision result: ``{output: fraction of
            elements that differ from the reference's rounding in the run dtype}``.
        judgements: ``{tensor name: Judgement}`` for every compared tensor (keys as in
            ``comparisons``, plus missing outputs): the rule, the bounds, the reference's own
            error in the run dtype and the backend's ratio to it.
        seconds: wall time of load + run + compare.
        expectation: for skipped, xfailed and xpassed cases, the skip or xfail entry
            as ``FILE:LINE: reason``.
        steps: scenario cases: ``{"steps.{i}": label}`` of every prefill and decode step the
            backend ran (``"decode 1 after 12 tokens"``), keys as in ``comparisons``.
    """

    case_id: str
    dtype: str
    status: Status
    message: str = ""
    tolerance: Tolerance | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    argmax: ArgmaxAgreement | None = None
    first_divergence: str | None = None
    uncompared: list[str] = field(default_factory=list)
    rounding: dict[str, float] = field(default_factory=dict)
    judgements: dict[str, Judgement] = field(default_factory=dict)
    seconds: float = 0.0
    expectation: str = ""
    steps: dict[str, str] = field(default_factory=dict)


def one_line(text: str) -> str:
    """``text`` with its lines joined, for messages that must fit one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _is_mtp(name: str) -> bool:
    return name.startswith(MTP_PREFIX)


def tap_order(names) -> list[str]:
    """Tap names in forward order: embed, layers.0, layers.1, ..., norm, then others by name
    (a scenario's ``steps.{i}`` sort by i, like layers)."""

    def key(name: str):
        match = re.fullmatch(r"(?:layers|steps)\.(\d+)", name)
        rank = 0 if name == "embed" else 1 if match else 2 if name == "norm" else 3
        return (rank, int(match.group(1)) if match else 0, name)

    return sorted(names, key=key)


def _mark_nan(result: CaseResult) -> None:
    """A failed result whose compared tensors hold unmatched NaN/Inf becomes status "nan"."""
    poisoned = [name for name, c in result.comparisons.items() if c.nonfinite]
    if poisoned:
        result.status = Status.NAN
        result.message = f"NaN/Inf in {', '.join(poisoned)}; first divergence {result.message}"


def _judge_all(result: CaseResult, tolerance: Tolerance, reference: dict[str, RecordedError] | None,
               actual: dict | None = None, rounded: dict | None = None) -> dict[str, list[str]]:
    """Judge every tensor of ``result.comparisons`` (:func:`~conformance.tolerances.judge_tensor`),
    keep the judgements and return ``{name: failures}``. ``reference`` is the corpus's record
    for the run dtype (None when it has none)."""
    for name, comparison in result.comparisons.items():
        own = None if reference is None else reference.get(name)
        low = (rounded or {}).get(name)
        result.judgements[name] = judge_tensor(comparison, tolerance, result.dtype, own,
                                               actual=None if low is None else actual[name], rounded=low)
    return {name: list(j.failures) for name, j in result.judgements.items()}


def _add_failure(result: CaseResult, failures: dict[str, list[str]], name: str, failure: str) -> None:
    """Record a failure found after a tensor's judgement (the argmax check) in both places."""
    failures[name].append(failure)
    judgement = result.judgements[name]
    result.judgements[name] = dataclasses.replace(judgement, failures=(*judgement.failures, failure))


def judge(
    result: CaseResult, actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: Tolerance,
    reference: dict[str, RecordedError] | None = None,
) -> CaseResult:
    """Fill ``result`` from the tensors of one case (``actual`` and ``expected`` include ``"logits"``;
    draft logits ``mtp_logits.{k}`` come after the logits, in depth order). ``reference`` holds the
    reference's own error in the run dtype per tensor (None: the corpus records none)."""
    shared = set(actual) & set(expected)
    drafts = sorted((n for n in shared if _is_mtp(n)), key=lambda n: int(n[len(MTP_PREFIX):]))
    order = tap_order(shared - {"logits"} - set(drafts)) + ["logits"] + drafts
    result.comparisons = {name: compare(actual[name], expected[name]) for name in order}
    result.uncompared = tap_order(set(actual) - set(expected))
    failures = _judge_all(result, tolerance, reference)
    logits = result.comparisons["logits"]
    if not logits.shape_mismatch:
        margin = argmax_margin(tolerance, logits, result.judgements["logits"])
        result.argmax = argmax_agreement(actual["logits"], expected["logits"], margin)
        if not result.argmax.confident_agree:
            count = result.argmax.confident_disagreements
            _add_failure(result, failures, "logits", f"argmax differs at {count} confident position(s)")
    # Every draft depth the case records is required once the backend returns any:
    # returning depth 1 of 2 must not pass as if depth 2 had been checked.
    missing = sorted((n for n in expected if _is_mtp(n) and n not in actual), key=lambda n: int(n[len(MTP_PREFIX):]))
    returned = sum(1 for n in actual if _is_mtp(n))
    for name in missing:
        failures[name] = [f"missing: the backend returned {returned} MTP depth(s), the case has "
                          f"{sum(1 for n in expected if _is_mtp(n))}"]
        result.judgements[name] = Judgement("missing", failures=tuple(failures[name]))
    order += missing
    diverging = [name for name in order if failures[name]]
    if diverging:
        result.status, result.first_divergence = Status.FAILED, diverging[0]
        result.message = f"{diverging[0]}: " + "; ".join(failures[diverging[0]])
        _mark_nan(result)
    else:
        result.status = Status.PASSED
        if result.uncompared:
            result.message = f"not compared (no golden tensor): {', '.join(result.uncompared)}"
    return result


def extra_outputs(model) -> list[str]:
    """Outputs a loaded model holds that the runner does not read, as its optional
    ``uncompared_outputs()`` lists them (the file contract's ``outputs.safetensors`` tensors beyond
    the case's: ``steps.7.logits`` of a 6-step scenario, say); empty when the model has no such
    method or it raises (the outputs themselves are judged as usual)."""
    probe = getattr(model, "uncompared_outputs", None)
    if not callable(probe):
        return []
    try:
        return [str(name) for name in probe()]
    except Exception:  # noqa: BLE001 - only a listing; reading the outputs reports their own problems
        return []


def _note_uncompared(result: "CaseResult", extra: list[str]) -> None:
    """Add ``extra`` to ``result.uncompared``; a passed case's message lists them all."""
    if not extra:
        return
    result.uncompared = result.uncompared + [name for name in extra if name not in result.uncompared]
    if result.status is Status.PASSED:
        result.message = f"not compared (no golden tensor): {', '.join(result.uncompared)}"


def backend_tensors(output) -> dict[str, np.ndarray]:
    """The logits and taps of a :class:`BackendOutput` as float64 arrays, keyed by tap name.

    Raises:
        OutputError: no logits, hidden states not a dict with string keys, or a value
            that is not a real numeric array.
    """
    logits = getattr(output, "logits", None)
    if logits is None:
        raise OutputError(f"run() must return a BackendOutput with logits, got {type(output).__name__}")
    hidden = getattr(output, "hidden_states", None) or {}
    if not isinstance(hidden, dict):
        raise OutputError(f"hidden_states must be a dict of tap name to array, got {type(hidden).__name__}")
    tensors = {}
    for name, value in hidden.items():
        if not isinstance(name, str):
            raise OutputError(f"hidden state names must be strings, got {name!r}")
        tensors[name] = to_float64(value, f"hidden state '{name}'")
    tensors["logits"] = to_float64(logits, "logits")
    drafts = getattr(output, "mtp_logits", None)
    if drafts is not None:
        if isinstance(drafts, dict) or not hasattr(drafts, "__len__"):
            raise OutputError(f"mtp_logits must be a list of arrays (depth 1 first), got {type(drafts).__name__}")
        for k, value in enumerate(drafts, start=1):
            tensors[f"{MTP_PREFIX}{k}"] = to_float64(value, f"mtp_logits[{k - 1}]")
    return tensors


def backend_ops(backend: Backend) -> dict:
    """The backend's ``ops`` mapping (op name to callable), or ``{}`` if it has none.

    Raises:
        BackendError: ``ops`` exists but is not a mapping of names to callables.
    """
    try:
        ops = getattr(backend, "ops", None)
    except Exception as exc:
        raise BackendError(f"backend {backend.name}: reading its ops failed ({type(exc).__name__}: {exc})") from None
    if ops is None:
        return {}
    try:
        ops = dict(ops)
    except (TypeError, ValueError):
        raise BackendError(f"backend {backend.name}: 'ops' must be a mapping of op name to callable") from None
    for name, fn in ops.items():
        if not callable(fn):
            raise BackendError(f"backend {backend.name}: ops['{name}'] is not callable")
    return ops


def cast_input(array: np.ndarray, dtype: str) -> np.ndarray:
    """A floating golden input in the run dtype (bfloat16 as ``ml_dtypes.bfloat16``); integers unchanged."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


def op_outputs(value, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """An op's return value as ``{output name: float64 array}``.

    A single array is the output when the case has one; a dict must name the
    case's outputs.

    Raises:
        OutputError: a dict where one array is expected or vice versa, or a value
            that is not a real numeric array.
    """
    if isinstance(value, dict):
        return {str(k): to_float64(v, f"output '{k}'") for k, v in value.items()}
    if len(names) != 1:
        raise OutputError(f"op must return a dict with outputs {', '.join(names)}, got {type(value).__name__}")
    return {names[0]: to_float64(value, "output")}


def exact_violations(actual: np.ndarray, expected: np.ndarray) -> list[str]:
    """Why an integer output (e.g. the experts a router selected) is not equal to the expected one; empty if equal."""
    if actual.shape != expected.shape:
        return [f"shape {actual.shape} != expected {expected.shape}"]
    differ = int(np.count_nonzero(actual != expected))
    if not differ:
        return []
    first = tuple(int(i) for i in np.argwhere(actual != expected)[0])
    return [f"{differ} of {actual.size} elements differ (integer output, compared exactly; first at {first}: "
            f"{actual[first]:g} != expected {expected[first]:g})"]


def judge_op(
    result: CaseResult, actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: Tolerance,
    rounded: dict[str, np.ndarray] | None = None, exact: tuple[str, ...] = (),
    reference: dict[str, RecordedError] | None = None,
) -> CaseResult:
    """Fill ``result`` from an op's outputs; a missing output fails the case.

    ``rounded`` holds the reference's result in the run dtype for outputs that have one:
    the ULP rule of an elementwise kind judges against it (``result.rounding`` keeps the
    fraction of elements that differ from it). ``reference`` holds the reference's own error
    in the run dtype per output (None: the corpus records none). Outputs named in ``exact``
    (integer outputs, such as a router's ``selected``) must equal the expected values element
    for element, whatever the dtype.
    """
    missing = sorted(set(expected) - set(actual))
    got = f" (the op returned {', '.join(sorted(actual)) or 'nothing'})"
    result.comparisons = {name: compare(actual[name], expected[name]) for name in expected if name in actual}
    result.uncompared = sorted(set(actual) - set(expected))
    failures = _judge_all(result, tolerance, reference, actual,
                          {name: r for name, r in (rounded or {}).items() if name in actual and name not in exact})
    for name in result.comparisons:
        if name in exact:
            failures[name] = exact_violations(actual[name], expected[name])
            result.judgements[name] = exact_judgement(failures[name])
    for name in missing:
        failures[name] = ["output missing" + got]
        result.judgements[name] = Judgement("missing", failures=tuple(failures[name]))
    result.rounding = {name: j.mismatch for name, j in result.judgements.items() if j.mismatch is not None}
    diverging = [name for name in expected if failures.get(name)]
    if diverging:
        result.status, result.first_divergence = Status.FAILED, diverging[0]
        result.message = f"{diverging[0]}: " + "; ".join(failures[diverging[0]])
        _mark_nan(result)
    else:
        result.status = Status.PASSED
    return result


def check_op_case(golden_dir: Path, case: Case) -> None:
    """Refuse an op case the suite cannot pose: unknown op, a model tolerance class, or
    inputs and params that do not fit the op's reference signature.

    Raises:
        ManifestError: naming the case and the problem (a corpus fault, not the backend's).
    """
    from refimpl.ops import OPS

    if case.op not in OPS:
        raise ManifestError(f"case {case.id}: unknown op '{case.op}'; this version knows {', '.join(OPS)}")
    if not case.tolerance_class.startswith("op_"):
        raise ManifestError(f"case {case.id}: op case with model tolerance class '{case.tolerance_class}'")
    op, data = OPS[case.op], load_op_data(golden_dir, case)
    try:
        inspect.signature(op.function).bind(**data.inputs, **data.params)
    except TypeError as exc:
        raise ManifestError(f"case {case.id}: inputs {sorted(data.inputs)} and params {sorted(data.params)} "
                            f"do not fit op '{case.op}' ({exc})") from None
    for name, array in data.inputs.items():
        integer = np.issubdtype(array.dtype, np.integer)
        if integer != (name in op.integer_inputs):
            kind = "integer" if name in op.integer_inputs else "floating"
            raise ManifestError(f"case {case.id}: input '{name}' must be {kind}, the file stores {array.dtype}")


def run_op_case(backend: Backend, case: Case, golden_dir: Path, dtype: str) -> CaseResult:
    """Run and judge one op case (see :func:`run_case`)."""
    result = CaseResult(case_id=case.id, dtype=dtype, status=Status.ERROR)
    result.tolerance = get_tolerance(case.tolerance_class, dtype)
    data = load_op_data(golden_dir, case)
    start = time.perf_counter()
    try:
        ops = backend_ops(backend)
        reason = unsupported_reason(backend, case, dtype, ops)
        if reason is not None:
            result.status, result.message = Status.NOT_IMPLEMENTED, one_line(reason)
            return result
        fn = ops[case.op]
        inputs = {name: cast_input(array, dtype) for name, array in data.inputs.items()}
        expected = {k: v for k, v in data.expected.items() if "@" not in k}
        rounded = {k.split("@")[0]: v for k, v in data.expected.items() if k.endswith(f"@{dtype}")}
        actual = op_outputs(fn(**inputs, **data.params), tuple(expected))
        judge_op(result, actual, expected, result.tolerance, rounded, exact=_integer_outputs(case.op),
                 reference=reference_for(case, dtype))
    except NotImplementedError as exc:
        result.status = Status.NOT_IMPLEMENTED
        result.message = one_line(str(exc) or f"backend {backend.name} does not implement these parameters")
    except BackendError as exc:
        raise BackendError(f"case {case.id}: {exc}") from None
    except (Exception, SystemExit) as exc:
        result.status, result.message = Status.ERROR, one_line(f"{type(exc).__name__}: {exc}")
    finally:
        result.seconds = time.perf_counter() - start
    return result


def reference_for(case: Case, dtype: str) -> dict[str, RecordedError] | None:
    """The reference's own error in ``dtype`` per compared tensor, as the corpus records it for
    ``case``; None at float64 (the specification) and where the corpus records none."""
    return case.reference_error.get(dtype)


def compared_names(golden_dir: Path, case: Case) -> set[str]:
    """The tensors of ``case`` the runner compares by tolerance (and so those the corpus's
    ``reference_error`` must name): a model case's taps, logits and MTP drafts, a scenario's
    prefill and decode steps, an op case's outputs but its integer ones."""
    if case.level == "op":
        outputs = {name for name in load_op_data(golden_dir, case).expected if "@" not in name}
        return outputs - set(_integer_outputs(case.op))
    if case.level == "scenario":
        return {step.name for step in load_scenario_data(golden_dir, case) if step.op != "rollback"}
    _, _, hidden = load_case_data(golden_dir, case)
    return {*hidden, "logits", *load_case_mtp_logits(golden_dir, case)}


def check_reference_error(golden_dir: Path, case: Case) -> None:
    """Refuse a ``reference_error`` record that does not name exactly the case's compared tensors.

    Raises:
        ManifestError: naming the case, the dtype and the first missing or extra tensor.
    """
    if not case.reference_error:
        return
    names = compared_names(golden_dir, case)
    for dtype, recorded in case.reference_error.items():
        missing, extra = sorted(names - set(recorded)), sorted(set(recorded) - names)
        if missing:
            raise ManifestError(f"case {case.id}: reference_error.{dtype} lacks '{missing[0]}' "
                                f"({len(missing)} compared tensor(s) without the reference's error)")
        if extra:
            raise ManifestError(f"case {case.id}: reference_error.{dtype} names '{extra[0]}', which the case "
                                "does not compare")


def _integer_outputs(op_name: str) -> tuple[str, ...]:
    """The outputs of op ``op_name`` that are integers and so compared exactly (``refimpl.ops.OPS``)."""
    from refimpl.ops import OPS

    return OPS[op_name].integer_outputs


def _not_implemented_reason(backend: Backend, case: Case, dtype: str) -> str | None:
    """None when ``backend.supports`` accepts the case, else the reason to show."""
    supported = backend.supports(case, dtype)
    if isinstance(supported, str):
        return supported or f"backend {backend.name} does not support this case"
    return None if supported else f"backend {backend.name} does not support this case"


def unsupported_reason(backend: Backend, case: Case, dtype: str, ops: dict | None = None) -> str | None:
    """Why ``backend`` would report ``case`` as "not implemented" at ``dtype``, or None if it
    offers it; probes without running anything (also used by ``llm-conformance matrix``).

    An op case needs the op in the backend's ``ops`` mapping (``ops``, when given, is that
    mapping already read); a model case needs ``load_model``; both need ``supports`` to
    accept the case. A parameter combination an op refuses only when called
    (``NotImplementedError``) is not seen here.

    Raises:
        BackendError: ``ops`` is not a mapping of names to callables.
        Exception: whatever ``supports`` raises.
    """
    if case.level == "op":
        if case.op not in (backend_ops(backend) if ops is None else ops):
            return f"backend {backend.name} does not implement op '{case.op}'"
    elif not hasattr(backend, "load_model"):
        return f"backend {backend.name} runs single ops only"
    return _not_implemented_reason(backend, case, dtype)


#: The optional methods of a loaded model that scenario cases call (``docs/backends.md``).
SCENARIO_METHODS = ("prefill", "decode", "rollback")


def missing_scenario_methods(model, steps: list[ScenarioStep]) -> list[str]:
    """The capability methods the schedule needs that ``model`` lacks (rollback only if it rolls back)."""
    needed = [m for m in SCENARIO_METHODS if m != "rollback" or any(s.op == "rollback" for s in steps)]
    return [m for m in needed if not callable(getattr(model, m, None))]


def _logits_and_state(value, step: ScenarioStep):
    """A prefill or decode call's ``(logits, state)`` as ``(float64 logits, state)``.

    Raises:
        OutputError: not a pair, or logits that are not a real numeric array.
    """
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise OutputError(f"{step.op} must return (logits, state), got {type(value).__name__}")
    return to_float64(value[0], f"{step.name} logits"), value[1]


def replay(model, steps: list[ScenarioStep], progress=None) -> tuple[dict[str, np.ndarray], BaseException | None,
                                                                    ScenarioStep | None]:
    """Run a schedule on a loaded model: ``(logits by step name, exception or None, step that raised)``.

    The logits of the steps before an exception are kept, so that an earlier divergence
    is still reported as such. ``progress(text)``, when given, hears each step before it runs
    (``"steps.5 (decode 1 after 15 tokens)"``).
    """
    actual, state = {}, None
    for step in steps:
        if progress is not None:
            progress(f"{step.name} ({step.label})")
        try:
            if step.op == "rollback":
                state = model.rollback(state, step.num_tokens)
                continue
            if step.op == "prefill":
                value = model.prefill(step.input_ids.copy(), None if step.attention_mask is None
                                      else step.attention_mask.copy())
            else:
                value = model.decode(step.input_ids.copy(), state)
            actual[step.name], state = _logits_and_state(value, step)
        except (Exception, SystemExit) as exc:
            return actual, exc, step
    return actual, None, None


@dataclass(frozen=True)
class StepComparison(Comparison):
    """A scenario step's :class:`~conformance.compare.Comparison`, made over its real (non-pad)
    slots flattened to ``(P, V)``: ``actual_shape`` and ``expected_shape`` are ``(P, V)`` and
    ``max_abs_index`` is ``(p, vocab index)`` in it (on a shape mismatch, the raw ``(B, n, V)``
    shapes and no index). Where the max abs error sits in the step's ``(B, n, V)`` logits:

    Attributes:
        max_abs_row: the batch row b.
        max_abs_slot: the slot t among the step's n new tokens (``logits[b, t]``; pad slots counted).
        max_abs_position: the token's position in its row (``cumsum(attention_mask) - 1`` of the
            whole sequence so far: real tokens before it, rolled-back ones not counted).
    """

    max_abs_row: int | None = None
    max_abs_slot: int | None = None
    max_abs_position: int | None = None

    @property
    def location(self) -> str:
        """``"row 1, position 14 (slot 0), vocab 37"``, or ``""`` without an index."""
        if self.max_abs_row is None:
            return ""
        return (f"row {self.max_abs_row}, position {self.max_abs_position} (slot {self.max_abs_slot}), "
                f"vocab {self.max_abs_index[-1]}")


def _step_comparison(got: np.ndarray, step: ScenarioStep, pads: np.ndarray) -> StepComparison:
    """:func:`compare` of a step's returned logits with its expected ones at the real slots, located."""
    want = step.logits
    if got.shape != want.shape:
        return StepComparison(**vars(compare(got, want)))
    real = step.real()
    comparison = compare(got[real], want[real])
    if comparison.max_abs_index is None:
        return StepComparison(**vars(comparison))
    rows, slots = np.nonzero(real)
    row, slot = int(rows[comparison.max_abs_index[0]]), int(slots[comparison.max_abs_index[0]])
    return StepComparison(**vars(comparison), max_abs_row=row, max_abs_slot=slot,
                          max_abs_position=int(step.tokens_before + slot - pads[row]))


def judge_scenario(result: CaseResult, actual: dict[str, np.ndarray], steps: list[ScenarioStep],
                   tolerance: Tolerance, reference: dict[str, RecordedError] | None = None) -> CaseResult:
    """Fill ``result`` from the logits a backend returned for the prefill and decode ``steps``
    (``actual`` may stop early: the steps it lacks are not judged). Only real (non-pad)
    positions are compared, as ``(positions, V)`` arrays; each step's :class:`StepComparison`
    says in which row and position its max abs error is, and the failure message of the first
    failing step names them. ``reference`` holds the reference's own error in the run dtype per
    step (None: the corpus records none)."""
    failures, agreements = {}, []
    # Pad slots per row: all in the prompt (steps[0]), so a slot's position is its index in the
    # sequence so far minus its row's pads.
    prompt = steps[0].attention_mask if steps else None
    pads = None if prompt is None else (prompt == 0).sum(axis=1)
    for step in steps:
        if step.op == "rollback" or step.name not in actual:
            continue
        if pads is None:
            pads = np.zeros(step.logits.shape[0], dtype=np.int64)
        comparison = _step_comparison(actual[step.name], step, pads)
        result.comparisons[step.name] = comparison
        result.steps[step.name] = step.label
        own = None if reference is None else reference.get(step.name)
        result.judgements[step.name] = judge_tensor(comparison, tolerance, result.dtype, own)
        failures[step.name] = list(result.judgements[step.name].failures)
        if not comparison.shape_mismatch:
            real = step.real()
            got, want = actual[step.name][real], step.logits[real]
            agreement = argmax_agreement(got, want, argmax_margin(tolerance, comparison, result.judgements[step.name]))
            agreements.append(agreement)
            if not agreement.confident_agree:
                _add_failure(result, failures, step.name,
                             f"argmax differs at {agreement.confident_disagreements} confident position(s)")
    if agreements:
        positions = sum(a.positions for a in agreements)
        result.argmax = ArgmaxAgreement(
            fraction=sum(a.fraction * a.positions for a in agreements) / max(positions, 1), positions=positions,
            confident=sum(a.confident for a in agreements),
            confident_disagreements=sum(a.confident_disagreements for a in agreements))
    diverging = [name for name in result.comparisons if failures[name]]
    if diverging:
        name = diverging[0]
        result.status, result.first_divergence = Status.FAILED, f"{name} ({result.steps[name]})"
        where = result.comparisons[name].location
        result.message = f"{result.first_divergence}: " + "; ".join(failures[name]) + (
            f"; max abs error at {where}" if where else "")
        _mark_nan(result)
    else:
        result.status = Status.PASSED
    return result


def run_scenario_case(backend: Backend, case: Case, golden_dir: Path, dtype: str, progress=None) -> CaseResult:
    """Run and judge one scenario case (see the module docstring and :func:`run_case`)."""
    result = CaseResult(case_id=case.id, dtype=dtype, status=Status.ERROR)
    result.tolerance = get_tolerance(case.tolerance_class, dtype)
    steps = load_scenario_data(golden_dir, case)
    start = time.perf_counter()
    try:
        reason = unsupported_reason(backend, case, dtype)
        if reason is not None:
            result.status, result.message = Status.NOT_IMPLEMENTED, one_line(reason)
            return result
        if progress is not None:
            progress("loading the checkpoint")
        model = backend.load_model(inside(golden_dir, case.checkpoint, f"case {case.id}"), dtype)
        missing = missing_scenario_methods(model, steps)
        if missing:
            result.status = Status.NOT_IMPLEMENTED
            result.message = (f"backend {backend.name}: its loaded model has no {', '.join(missing)} (the optional "
                              "incremental capability that scenario cases need; docs/backends.md)")
            return result
        actual, exc, at = replay(model, steps, progress)
        if isinstance(exc, BackendError):
            raise exc
        judge_scenario(result, actual, steps, result.tolerance, reference_for(case, dtype))
        if exc is not None and result.status is Status.PASSED:
            where = f"{at.name} ({at.label})"
            if isinstance(exc, NotImplementedError):
                result.status = Status.NOT_IMPLEMENTED
                result.message = one_line(f"{where}: {exc}" if str(exc) else
                                          f"{where}: backend {backend.name} does not implement this step")
            else:
                result.status, result.first_divergence = Status.ERROR, where
                result.message = one_line(f"{where}: {type(exc).__name__}: {exc}")
        elif exc is not None:
            result.message += one_line(f"; then {at.name} ({at.label}) raised {type(exc).__name__}: {exc}")
        _note_uncompared(result, extra_outputs(model))
    except BackendError as exc:
        raise BackendError(f"case {case.id}: {exc}") from None
    except (Exception, SystemExit) as exc:
        result.status, result.message = Status.ERROR, one_line(f"{type(exc).__name__}: {exc}")
    finally:
        result.seconds = time.perf_counter() - start
    return result


def run_case(backend: Backend, case: Case, golden_dir: Path, dtype: str, progress=None) -> CaseResult:
    """Run and judge one case (model, op or scenario) whose files and tolerance are already verified.

    Anything the backend raises (or exits with) marks the case "error" with a
    one-line message, and the run goes on; only a :class:`BackendError` stops it.
    ``progress(text)``, when given, hears what a scenario case is doing before it does it
    (``"loading the checkpoint"``, then each step: ``"steps.5 (decode 1 after 15 tokens)"``), so
    that an isolated run can name the step a case hung or crashed in (``conformance.isolation``).

    Raises:
        BackendError: the backend cannot work at all (the case is named).
        ConformanceError: the golden data is malformed.
    """
    if case.level == "op":
        return run_op_case(backend, case, golden_dir, dtype)
    if case.level == "scenario":
        return run_scenario_case(backend, case, golden_dir, dtype, progress)
    result = CaseResult(case_id=case.id, dtype=dtype, status=Status.ERROR)
    result.tolerance = get_tolerance(case.tolerance_class, dtype)
    input_ids, logits, hidden = load_case_data(golden_dir, case)
    drafts = load_case_mtp_logits(golden_dir, case)
    start = time.perf_counter()
    try:
        reason = unsupported_reason(backend, case, dtype)
        if reason is not None:
            result.status, result.message = Status.NOT_IMPLEMENTED, one_line(reason)
            return result
        model = backend.load_model(inside(golden_dir, case.checkpoint, f"case {case.id}"), dtype)
        actual = backend_tensors(model.run(input_ids))
        if drafts and not any(_is_mtp(name) for name in actual):
            result.status = Status.NOT_IMPLEMENTED
            result.message = (f"backend {backend.name} returned no MTP draft logits "
                              f"(the case has {case.mtp_depths} depth(s))")
            return result
        judge(result, actual, {**hidden, "logits": logits, **drafts}, result.tolerance, reference_for(case, dtype))
        _note_uncompared(result, extra_outputs(model))
    except BackendError as exc:
        raise BackendError(f"case {case.id}: {exc}") from None
    except (Exception, SystemExit) as exc:
        result.status, result.message = Status.ERROR, one_line(f"{type(exc).__name__}: {exc}")
    finally:
        result.seconds = time.perf_counter() - start
    return result


def skipped_result(case: Case, dtype: str, entry: Entry) -> CaseResult:
    """The result of a case a skip file lists: not run, its reason as the message."""
    return CaseResult(case_id=case.id, dtype=dtype, status=Status.SKIPPED,
                      message=entry.reason or f"skipped by {entry.where}", expectation=entry.describe())


def apply_xfail(result: CaseResult, entry: Entry) -> CaseResult:
    """Turn a failed, nan, errored, crashed or timed-out result into "xfailed" and a passed
    one into "xpassed"; "not implemented" stays as it is (the case was not checked)."""
    if result.status in BROKEN:
        result.message = f"{result.status.value}: {result.message}"
        result.status, result.expectation = Status.XFAILED, entry.describe()
    elif result.status is Status.PASSED:
        result.message = "passed; remove the xfail entry"
        result.status, result.expectation = Status.XPASSED, entry.describe()
    return result


def run_suite(backend: Backend | None, cases: list[Case], golden_dir, dtype: str, progress: bool = True,
              expectations: Expectations = Expectations(), isolated=None) -> list[CaseResult]:
    """Run ``backend`` over ``cases`` at ``dtype``; one :class:`CaseResult` per case, in order.

    Args:
        progress: show progress on stderr (a bar on a terminal, else a line per case).
        expectations: skip and xfail entries; skipped cases are not run.
        isolated: a started :class:`conformance.isolation.IsolatedRunner`; the cases then
            run in its worker process (``backend`` is not used and may be None), with
            statuses "crashed" and "timed out".

    Raises:
        HashMismatchError / ManifestError: a case's files are missing or altered
            (checked for every case before any runs).
        BackendError: the backend cannot work at all.
        ManifestError: an op case the suite cannot pose (unknown op, inputs or params
            that do not fit it), a tolerance class of the wrong level, malformed golden
            data, a scenario's included, or a ``reference_error`` record that does not name the
            case's compared tensors (all checked before any case runs).
        ConformanceError: no tolerance for a case at ``dtype``.
        RunInterrupted: Ctrl-C; it carries the results so far.
    """
    golden_dir = Path(golden_dir)
    for case in cases:
        verify_case_files(golden_dir, case)
        if case.level == "op":
            check_op_case(golden_dir, case)
        elif case.tolerance_class.startswith("op_"):
            raise ManifestError(f"case {case.id}: {case.level} case with op tolerance class '{case.tolerance_class}'")
        elif case.level == "scenario":
            load_scenario_data(golden_dir, case)
        else:
            # Malformed golden data is an input error, reported before the first case runs.
            load_case_data(golden_dir, case)
            load_case_mtp_logits(golden_dir, case)
        check_reference_error(golden_dir, case)
        try:
            get_tolerance(case.tolerance_class, dtype)
        except ConformanceError as exc:
            raise ConformanceError(f"case {case.id}: {exc}") from None
    results = []
    err = Console(stderr=True)
    # A live bar on a terminal; one plain line per case in logs (CI, pipes).
    live = progress and err.is_terminal
    try:
        with Progress(console=err, transient=True, disable=not live) as bar:
            task = bar.add_task("cases", total=len(cases))
            for number, case in enumerate(cases, 1):
                bar.update(task, description=f"{case.id} ({dtype})")
                if progress and not live:
                    err.print(f"[{number}/{len(cases)}] {case.id} ({dtype})", markup=False, highlight=False)
                skip, xfail = expectations.skip_for(case.id, dtype), expectations.xfail_for(case.id, dtype)
                if skip is not None:
                    results.append(skipped_result(case, dtype, skip))
                else:
                    if isolated is not None:
                        result = isolated.run(case)
                    else:
                        result = run_case(backend, case, golden_dir, dtype)
                    results.append(result if xfail is None else apply_xfail(result, xfail))
                bar.advance(task)
    except KeyboardInterrupt:
        raise RunInterrupted(results) from None
    return results
