"""Reports of a run: a rich table for people, a JSON file and a JUnit XML file for machines.

The table has one row per case, failures and errors first, with one tensor's error model
(the first tensor that failed; on a passing case the headline: the logits of a model case, the
worst output of an op case): the backend's relative RMS error, the reference's own error in
the run dtype, their ratio and the bound, or the same on max abs when only max abs failed
(:func:`error_model_numbers`), then the max abs error, the argmax agreement and, on failure,
the first diverging tensor; a repro command per failing case; and a summary line. The JSON
report keeps every number of every compared tensor (``comparisons``) and how each was judged
(``judgements``: rule, bounds, reference error, ratios), the numbers of the table's
tensor (``headline``), plus the run's metadata (backend, package versions, dtype, corpus version,
timestamps). The JUnit XML report has one testcase per case for CI dashboards (see
:func:`write_junit_report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import ConformanceError
from .runner import CaseResult, Status

_ROW_ORDER = [Status.CRASHED, Status.TIMED_OUT, Status.NAN, Status.FAILED, Status.ERROR, Status.XPASSED, Status.XFAILED,
              Status.NOT_IMPLEMENTED, Status.SKIPPED, Status.PASSED]
_STATUS_STYLE = {
    Status.FAILED: "bold red", Status.ERROR: "bold red", Status.NOT_IMPLEMENTED: "yellow", Status.PASSED: "green",
    Status.SKIPPED: "yellow", Status.XFAILED: "yellow", Status.XPASSED: "bold red",
    Status.NAN: "bold red", Status.CRASHED: "bold red", Status.TIMED_OUT: "bold red",
}
#: Statuses that make ``run`` exit 1 (an xpass is strict: the stale xfail entry must go).
FAILING = (Status.FAILED, Status.NAN, Status.ERROR, Status.CRASHED, Status.TIMED_OUT, Status.XPASSED)
#: Statuses that get a repro command.
REPRO = (Status.FAILED, Status.NAN, Status.ERROR, Status.CRASHED, Status.TIMED_OUT)
_COLUMNS = ("case", "dtype", "status", "rel RMS", "ref rel RMS", "ratio", "bound", "max abs", "argmax agree",
            "first divergence / note")


def summary_line(results: list[CaseResult]) -> str:
    """``"N passed, M failed, K not implemented"``, plus ``", E error(s)"``, ``", A nan"``,
    ``", C crashed"``, ``", T timed out"``, ``", S skipped"``, ``", X xfailed"`` and
    ``", Y xpassed"`` for those that occur."""
    count = {status: sum(r.status is status for r in results) for status in Status}
    passed, failed, not_implemented = (count[s] for s in (Status.PASSED, Status.FAILED, Status.NOT_IMPLEMENTED))
    line = f"{passed} passed, {failed} failed, {not_implemented} not implemented"
    errors = count[Status.ERROR]
    line += f", {errors} error{'s' if errors > 1 else ''}" if errors else ""
    for status in (Status.NAN, Status.CRASHED, Status.TIMED_OUT, Status.SKIPPED, Status.XFAILED, Status.XPASSED):
        line += f", {count[status]} {status.value}" if count[status] else ""
    return line


def repro_command(meta: dict, case_id: str) -> str:
    """The command line that reruns one case with the same backend, options, dtype and corpus
    (for ``check``: the same engine outputs directory)."""
    if meta.get("outputs_dir"):
        words = ["llm-conformance", "check", "--outputs", meta["outputs_dir"]]
        words += ["--exported", meta["exported_dir"]] if meta.get("exported_dir") else ["--dtype", meta["dtype"]]
        words += ["--golden-dir", meta["golden_dir"], "--case", case_id]
        return shlex.join(words)
    words = ["llm-conformance", "run", "--backend", meta["backend_spec"]]
    for key, value in meta.get("backend_options", {}).items():
        words += ["-o", f"{key}={value}"]
    words += ["--dtype", meta["dtype"], "--golden-dir", meta["golden_dir"], "--case", case_id]
    return shlex.join(words)


#: Longest note shown in a table cell; the JSON report keeps the whole message.
MAX_NOTE = 200


def _note(result: CaseResult) -> str:
    """The message, after the xfail entry (``FILE:LINE: reason``) for xfailed and xpassed cases."""
    if result.status in (Status.XFAILED, Status.XPASSED):
        return f"xfail ({result.expectation}): {result.message}"
    return result.message


def headline(comparisons: dict):
    """The headline comparison of a case: the logits of a model case; for an op case the
    output with the largest relative error (so a router's weights, not its exactly-equal
    expert set), an output with NaN/Inf first. ``None`` when nothing was compared.

    ``comparisons`` maps names to :class:`~conformance.compare.Comparison` objects or to
    their JSON form (dicts with ``rel_rms`` and ``nonfinite``, as ``--report`` writes them).
    """
    def field(c, name):
        return c.get(name) if isinstance(c, dict) else getattr(c, name)

    def rank(c):
        rel = field(c, "rel_rms")
        rel = float(rel) if isinstance(rel, (int, float, str)) else math.nan
        return (bool(field(c, "nonfinite")), -math.inf if math.isnan(rel) else rel)

    return comparisons.get("logits") or max(comparisons.values(), key=rank, default=None)


def headline_name(comparisons: dict) -> str | None:
    """The name of :func:`headline`'s tensor (None when nothing was compared)."""
    top = headline(comparisons)
    return next((name for name, c in comparisons.items() if c is top), None)


def judged_name(result: CaseResult) -> str | None:
    """The tensor a result's numbers describe: the first that broke a bound, in the order the case
    was judged (taps, logits, MTP drafts; scenario steps), else :func:`headline_name`'s."""
    for name, judgement in (result.judgements or {}).items():
        if judgement.failures and name in result.comparisons:
            return name
    return headline_name(result.comparisons)


def _max_abs_only(comparison, judgement) -> bool:
    """Whether ``judgement`` failed on max abs while rel RMS was within its bound."""
    if not judgement.failures or judgement.bound_max_abs is None or judgement.bound_rel_rms is None:
        return False
    return comparison.max_abs > judgement.bound_max_abs and not comparison.rel_rms > judgement.bound_rel_rms


def _number(value) -> float | None:
    """A float from a number or its JSON text form ("inf"); None otherwise."""
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def error_model_numbers(result: CaseResult, tensor: str | None = None) -> dict:
    """The error model of one tensor (``tensor``, or :func:`judged_name`'s: the first that failed,
    else the headline): ``{"tensor", "metric", "rule", "error", "reference_error", "ratio",
    "bound"}``, plus ``"max_ulp"`` under the ulp rule; ``{}`` when nothing was compared.

    ``metric`` is ``"rel_rms"``, or ``"max_abs"`` when the tensor failed on max abs alone; the
    numbers are then the max abs error, the reference's max abs error, their ratio and the max
    abs bound. ``bound`` is ``"N ULP"`` / ``"exact"`` under those rules. ``reference_error`` and
    ``ratio`` are None at float64 and where the corpus records no reference error."""
    name = tensor if tensor is not None else judged_name(result)
    if name is None or name not in result.comparisons:
        return {}
    comparison, judgement = result.comparisons[name], result.judgements.get(name)
    numbers = {"tensor": name, "metric": "rel_rms", "rule": None, "error": comparison.rel_rms,
               "reference_error": None, "ratio": None, "bound": None}
    if judgement is None:
        return numbers
    if _max_abs_only(comparison, judgement):
        numbers.update(metric="max_abs", rule=judgement.rule, error=comparison.max_abs,
                       reference_error=judgement.reference_max_abs, ratio=judgement.ratio_max_abs,
                       bound=judgement.bound_max_abs)
        return numbers
    numbers.update(rule=judgement.rule, reference_error=judgement.reference_rel_rms, ratio=judgement.ratio_rel_rms)
    if judgement.rule == "ulp":
        numbers.update(bound=f"{judgement.ulp_window:g} ULP", max_ulp=judgement.max_ulp)
    elif judgement.rule == "exact":
        numbers["bound"] = "exact"
    else:
        numbers["bound"] = judgement.bound_rel_rms
    return numbers


def error_model_cells(result: CaseResult) -> list[str]:
    """The table cells ``ref rel RMS``, ``ratio``, ``bound`` of a result (``""`` where nothing was
    compared; ``-`` at float64, ``not recorded`` where the corpus has no reference error), each
    marked ``(max abs)`` when the tensor failed on max abs alone."""
    numbers = error_model_numbers(result)
    if not numbers or numbers["rule"] is None:
        return ["", "", ""]
    rule, reference, ratio, bound = (numbers[k] for k in ("rule", "reference_error", "ratio", "bound"))
    if reference is None:
        reference_cell = "-" if rule in ("absolute", "exact") else "not recorded"
    else:
        reference_cell = f"{reference:.2e}"
    ratio_cell = "-" if ratio is None else "inf" if math.isinf(ratio) else f"{ratio:.2f}"
    if rule == "ulp":
        got = numbers.get("max_ulp")
        bound_cell = f"{bound} (max {got:g})" if got is not None else bound
    elif isinstance(bound, float):
        bound_cell = f"{bound:.2e}" + (" interim" if rule == "interim" else "")
    else:
        bound_cell = str(bound or "")
    if numbers["metric"] == "max_abs":
        return [f"{cell} (max abs)" for cell in (reference_cell, ratio_cell, bound_cell)]
    return [reference_cell, ratio_cell, bound_cell]


def _row(result: CaseResult) -> list[Text]:
    """Table cells as Text, so that brackets in messages are not read as rich markup."""
    name = judged_name(result)
    logits = None if name is None else result.comparisons[name]
    if logits is None:
        numbers = ["", ""]
    elif logits.nonfinite:
        numbers = [f"{logits.nonfinite} NaN/Inf", f"{logits.max_abs:.2e} (finite)"]
    else:
        numbers = [f"{logits.rel_rms:.2e}", f"{logits.max_abs:.2e}"]
    argmax = "" if result.argmax is None else f"{result.argmax.fraction:.1%}"
    note = _note(result)
    note = note if len(note) <= MAX_NOTE else note[: MAX_NOTE - 1] + "…"
    cells = [Text(result.case_id), Text(result.dtype), Text(result.status.value, style=_STATUS_STYLE[result.status])]
    reference, ratio, bound = error_model_cells(result)
    return cells + [Text(cell) for cell in (numbers[0], reference, ratio, bound, numbers[1], argmax, note)]


def id_column_options(console: Console) -> dict:
    """``add_column`` options of a table's case-id column: folded like the others on a terminal,
    never wrapped otherwise (CI logs, pipes), so that ``grep`` finds every id whole on its row."""
    return {"overflow": "fold"} if console.is_terminal else {"no_wrap": True, "overflow": "ignore"}


def print_report(results: list[CaseResult], meta: dict, console: Console) -> None:
    """Print the table, a repro command per failing case, and the summary line. The case ids
    are never wrapped when ``console`` is not a terminal (:func:`id_column_options`)."""
    table = Table(title=f"{meta['backend']} on golden corpus {meta['corpus_version']}")
    for name in _COLUMNS:
        table.add_column(name, **(id_column_options(console) if name == "case" else {"overflow": "fold"}))
    ordered = sorted(results, key=lambda r: _ROW_ORDER.index(r.status))
    for result in ordered:
        table.add_row(*_row(result))
    console.print(table)
    for result in ordered:
        if result.status in REPRO:
            console.print(f"repro: {repro_command(meta, result.case_id)}", soft_wrap=True, markup=False)
    console.print(summary_line(results), markup=False, highlight=False)


def _finite_or_text(value):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def _jsonable(obj):
    """Dataclasses, enums, tuples and floats turned into strict-JSON values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Status):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _finite_or_text(obj)


def write_json_report(path, results: list[CaseResult], meta: dict, extra: dict | None = None) -> None:
    """Write ``{"meta": meta, "summary": ..., "results": [...]}`` to ``path`` as JSON.

    Each result carries every number of :class:`~conformance.runner.CaseResult`
    (all comparisons and judgements, argmax agreement, tolerance), the error model of the
    first failing tensor, else the headline's (``headline``: :func:`error_model_numbers`) and, when it failed or errored,
    its repro command. ``extra`` maps a case id to further keys for its entry
    (``--compare-to`` adds ``drift``).

    Raises:
        ConformanceError: the file cannot be written.
    """
    entries = []
    for result in results:
        entry = _jsonable(result)
        entry["headline"] = _jsonable(error_model_numbers(result))
        if result.status in REPRO:
            entry["repro"] = repro_command(meta, result.case_id)
        entry.update(_jsonable((extra or {}).get(result.case_id, {})))
        entries.append(entry)
    document = {"meta": _jsonable(meta), "summary": summary_line(results), "results": entries}
    try:
        Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConformanceError(f"cannot write report {path} ({exc})") from None


def _junit_outcome(result: CaseResult, meta: dict) -> ET.Element | None:
    """The child element of a testcase: failure, error or skipped; None for a pass."""
    note = _note(result)
    if result.status in (Status.FAILED, Status.NAN):
        element = ET.Element("failure", message=note, type=result.status.value)
        element.text = f"{note}\nrepro: {repro_command(meta, result.case_id)}"
    elif result.status is Status.XPASSED:
        element = ET.Element("failure", message=note, type="xpassed")
    elif result.status in (Status.ERROR, Status.CRASHED, Status.TIMED_OUT):
        element = ET.Element("error", message=note, type=result.status.value)
        element.text = f"{note}\nrepro: {repro_command(meta, result.case_id)}"
    elif result.status is Status.XFAILED:
        element = ET.Element("skipped", message=note, type="xfailed")
    elif result.status in (Status.NOT_IMPLEMENTED, Status.SKIPPED):
        element = ET.Element("skipped", message=f"{result.status.value}: {note}", type=result.status.value)
    else:
        return None
    return element


def write_junit_report(path, results: list[CaseResult], meta: dict) -> None:
    """Write a JUnit XML report to ``path``: one ``testsuite`` with one ``testcase`` per case.

    A testcase's classname is the case family with ``/`` as ``.`` (``op/rms_norm/plain``
    is in ``op.rms_norm``), its name ``<case id> [<dtype>]``, and a ``dtype`` property, plus
    the error model of the first failing tensor, else the headline's, as properties ``tensor``,
    ``metric``, ``rule``, ``error``, ``reference_error``, ``ratio`` and ``bound``
    (:func:`error_model_numbers`; absent values left out).
    Failed, nan and xpassed cases carry ``<failure>``, errored, crashed and timed-out ones
    ``<error>`` (the ``type`` is the status; the text has the repro command except for xpassed), not implemented, skipped and
    xfailed ones ``<skipped>`` whose ``type`` is the status. The suite's properties
    are the run's metadata.

    Raises:
        ConformanceError: the file cannot be written.
    """
    count = {status: sum(r.status is status for r in results) for status in Status}
    suite = ET.Element("testsuite", {
        "name": f"llm-conformance {meta['backend']} {meta['dtype']}", "tests": str(len(results)),
        "failures": str(count[Status.FAILED] + count[Status.NAN] + count[Status.XPASSED]),
        "errors": str(count[Status.ERROR] + count[Status.CRASHED] + count[Status.TIMED_OUT]),
        "skipped": str(count[Status.NOT_IMPLEMENTED] + count[Status.SKIPPED] + count[Status.XFAILED]),
        "time": f"{sum(r.seconds for r in results):.3f}", "timestamp": str(meta.get("started_at", "")),
    })
    properties = ET.SubElement(suite, "properties")
    for key in ("backend", "backend_spec", "dtype", "corpus_version", "golden_dir", "conformance_version", "partial"):
        if key in meta:
            ET.SubElement(properties, "property", name=key, value=str(meta[key]))
    if meta.get("partial"):
        # An interrupted run must not read as green: one errored testcase says so.
        suite.set("tests", str(len(results) + 1))
        suite.set("errors", str(int(suite.get("errors")) + 1))
        interrupted = ET.SubElement(suite, "testcase", {"classname": "llm-conformance", "name": "run interrupted",
                                                        "time": "0.000"})
        ET.SubElement(interrupted, "error", message="the run was interrupted (Ctrl-C); cases after the last one "
                      "listed did not run", type="interrupted")
    for result in results:
        testcase = ET.SubElement(suite, "testcase", {
            "classname": result.case_id.rsplit("/", 1)[0].replace("/", "."),
            "name": f"{result.case_id} [{result.dtype}]", "time": f"{result.seconds:.3f}",
        })
        case_properties = ET.SubElement(testcase, "properties")
        ET.SubElement(case_properties, "property", name="dtype", value=result.dtype)
        for key, value in error_model_numbers(result).items():
            if value is not None:
                ET.SubElement(case_properties, "property", name=key,
                              value=f"{value:.6g}" if isinstance(value, float) else str(value))
        outcome = _junit_outcome(result, meta)
        if outcome is not None:
            testcase.append(outcome)
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(suite)
    ET.indent(tree)
    try:
        tree.write(path, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise ConformanceError(f"cannot write JUnit report {path} ({exc})") from None
