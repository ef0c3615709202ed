"""``run --compare-to OLD.json``: flag cases that got worse since a previous ``--report``.

A case present in both reports is flagged ("drift") when

* it passed before (passed or xpassed) and does not now (any other status), or
* its headline error (rel RMS of the logits; for an op case the largest rel RMS over
  its outputs, as the table shows) grew by more than ``factor``: new > factor * old.
  An old error of exactly 0 flags any nonzero new one; a headline that turned
  NaN/Inf (or a shape mismatch) is flagged; one that was already NaN/Inf is not
  compared.

Each entry also carries the headline's error model in both runs (``old_reference_error``,
``reference_error``, ``old_ratio``, ``ratio``: the reference's own error in the dtype and the
backend's ratio to it; None where a report has none), and a flagged growth names them.

Cases absent from OLD.json are ignored. Drift is reported, never judged: it does
not change the exit status.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConformanceError
from .report import _jsonable, _number, error_model_numbers, headline, headline_name
from .runner import CaseResult, Status

DEFAULT_FACTOR = 2.0
_PASSING = (Status.PASSED.value, Status.XPASSED.value)


@dataclass(frozen=True)
class OldReport:
    """A previous JSON report: its metadata and ``{case id: result entry}``."""

    path: str
    meta: dict
    results: dict[str, dict]


def load_old_report(path) -> OldReport:
    """Read and check a previous ``--report`` file.

    Raises:
        ConformanceError: the file is missing, not a regular file, unreadable, not JSON, or
            not a report (an object with a ``results`` list of objects carrying ``case_id``
            and ``status``).
    """
    # A FIFO or device would block the read (or never end).
    if Path(path).exists() and not Path(path).is_file():
        raise ConformanceError(f"--compare-to {path}: cannot read it (not a regular file)")
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConformanceError(f"--compare-to {path}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConformanceError(f"--compare-to {path}: not a JSON file ({exc})") from None
    results = document.get("results") if isinstance(document, dict) else None
    meta = document.get("meta", {}) if isinstance(document, dict) else None
    if not isinstance(results, list) or not isinstance(meta, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("case_id"), str) and isinstance(r.get("status"), str)
            for r in results):
        raise ConformanceError(f"--compare-to {path}: not an llm-conformance JSON report "
                               "(expected an object with 'meta' and a 'results' list of cases)")
    return OldReport(str(path), meta, {r["case_id"]: r for r in results})


def mismatch_warnings(old: OldReport, meta: dict) -> list[str]:
    """``warning: ...`` lines for a dtype or corpus version that differs between the two runs."""
    lines = []
    for key, what in (("dtype", "dtype"), ("corpus_version", "corpus version")):
        if old.meta.get(key) != meta.get(key):
            lines.append(f"warning: --compare-to {old.path}: {what} {old.meta.get(key)} there, "
                         f"{meta.get(key)} in this run; the numbers may not be comparable")
    return lines


def _headline_rel_rms(comparisons) -> float | None:
    """The headline rel RMS of JSON-form comparisons (inf for NaN/Inf outputs); None if none."""
    if not isinstance(comparisons, dict) or not comparisons:
        return None
    try:
        top = headline(comparisons)
        if top.get("nonfinite"):
            return math.inf
        value = float(top["rel_rms"])
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return None
    return math.inf if math.isnan(value) else value


def compute_drift(results: list[CaseResult], old: OldReport, factor: float = DEFAULT_FACTOR) -> dict[str, dict]:
    """``{case id: drift entry}`` for the cases of ``results`` that OLD.json has.

    Each entry: ``tensor`` (the headline tensor the numbers are of), ``old_status``, ``status``, ``old_rel_rms``, ``rel_rms`` (headline errors,
    None if not compared), ``factor`` (new / old, None if not computable), ``old_reference_error``,
    ``reference_error``, ``old_ratio``, ``ratio`` (the headline's error model), ``flagged`` and
    ``reasons`` (why it is flagged; empty when not).
    """
    drift = {}
    for result in results:
        before = old.results.get(result.case_id)
        if before is None:
            continue
        now = _headline_rel_rms(_jsonable(result.comparisons))
        then = _headline_rel_rms(before.get("comparisons"))
        reasons = []
        if before["status"] in _PASSING and result.status.value not in _PASSING:
            reasons.append(f"passed before, {result.status.value} now")
        # The headline tensor's numbers on both sides (a failing case's report shows its failing tensor).
        model = error_model_numbers(result, headline_name(result.comparisons))
        old_model = before.get("headline") if isinstance(before.get("headline"), dict) else {}
        if old_model.get("tensor") != model.get("tensor") or old_model.get("metric", "rel_rms") != "rel_rms":
            old_model = {}
        reference, ratio = _number(model.get("reference_error")), _number(model.get("ratio"))
        old_reference, old_ratio = _number(old_model.get("reference_error")), _number(old_model.get("ratio"))
        grew = None
        if now is not None and then is not None and math.isfinite(then):
            grew = now / then if then > 0 else (math.inf if now > 0 else 1.0)
            if now > factor * then:
                grown = "now NaN/Inf or mismatched" if math.isinf(now) else f"{then:.2e} -> {now:.2e}"
                if ratio is not None and not math.isinf(now):
                    grown += f"; reference {reference:.2e}, ratio {_ratio_text(old_ratio)} -> {_ratio_text(ratio)}"
                reasons.append(f"rel RMS grew more than {factor:g}x ({grown})")
        drift[result.case_id] = {
            "tensor": model.get("tensor"),
            "old_status": before["status"], "status": result.status.value, "old_rel_rms": then, "rel_rms": now,
            "factor": grew, "old_reference_error": old_reference, "reference_error": reference,
            "old_ratio": old_ratio, "ratio": ratio, "flagged": bool(reasons), "reasons": reasons,
        }
    return drift


def _ratio_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def drift_lines(drift: dict[str, dict], old: OldReport, factor: float) -> list[str]:
    """The ``drift`` section printed after the table: a header line and one line per flagged case."""
    flagged = {case: d for case, d in drift.items() if d["flagged"]}
    lines = [f"drift against {old.path} (factor {factor:g}; {len(drift)} case(s) compared): "
             f"{len(flagged)} flagged"]
    lines += [f"  {case}: {'; '.join(d['reasons'])}" for case, d in flagged.items()]
    return lines
