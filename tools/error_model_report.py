"""Calibration numbers of the error model from ``llm-conformance run --report`` files.

For each report (one backend, one dtype) and each kind of output (tolerance class), print
how many tensors were judged by the ratio rule, the largest ratio of the backend's error to
the reference's own error in that dtype (rel RMS and max abs), and the floor each would need
at the table's k, in units of the dtype's epsilon, beside the table's floor. These are the
numbers ``docs/tolerances.md`` quotes; rerun it after a change of the reference's rounding
points or of a backend::

    python -m conformance run --backend transformers --dtype bfloat16 --report tf-bf16.json
    python tools/error_model_report.py tf-bf16.json [more reports ...] [--golden-dir DIR]

Cases the report marks xfailed, skipped or not implemented are left out (an xfailed case's
evidence is its xfail entry). Exit status 1 when a report cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conformance.manifest import read_manifest  # noqa: E402
from conformance.tolerances import EPSILON, get_tolerance  # noqa: E402

JUDGED = ("passed", "failed", "nan")


def _float(value) -> float:
    return float(value) if value is not None else math.nan


def calibration(report: dict, classes: dict[str, str]) -> dict[str, dict]:
    """``{tolerance class: {"tensors", "ratio_rel", "ratio_max", "need_rel", "need_max", "worst"}}``
    over the ratio-rule tensors of one report (needs in units of epsilon)."""
    dtype = report["meta"]["dtype"]
    eps = EPSILON[dtype]
    rows: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "ratio_rel": 0.0, "ratio_max": 0.0,
                                                  "need_rel": -math.inf, "need_max": -math.inf, "worst": ""})
    for result in report["results"]:
        if result["status"] not in JUDGED or result["case_id"] not in classes:
            continue
        kind = classes[result["case_id"]]
        k = get_tolerance(kind, dtype).k
        for name, judgement in (result.get("judgements") or {}).items():
            if judgement.get("rule") != "ratio":
                continue
            comparison = result["comparisons"][name]
            scale = _float(comparison["max_abs_expected"]) or 1.0
            row = rows[kind]
            row["tensors"] += 1
            row["ratio_rel"] = max(row["ratio_rel"], _float(judgement["ratio_rel_rms"]))
            row["ratio_max"] = max(row["ratio_max"], _float(judgement["ratio_max_abs"]))
            need_rel = (_float(comparison["rel_rms"]) - k * _float(judgement["reference_rel_rms"])) / eps
            need_max = (_float(comparison["max_abs"]) - k * _float(judgement["reference_max_abs"])) / scale / eps
            if need_rel > row["need_rel"] or need_max > row["need_max"]:
                row["worst"] = f"{result['case_id']}:{name}"
            row["need_rel"], row["need_max"] = max(row["need_rel"], need_rel), max(row["need_max"], need_max)
    return dict(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON reports of llm-conformance run --report")
    parser.add_argument("--golden-dir", type=Path, help="the corpus the reports ran on (default: the report's own)")
    args = parser.parse_args(argv)
    for path in args.reports:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            golden = args.golden_dir or Path(report["meta"]["golden_dir"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {path}: not a readable report ({exc})", file=sys.stderr)
            return 1
        classes = {case.id: case.tolerance_class for case in read_manifest(golden).cases}
        dtype = report["meta"]["dtype"]
        print(f"{path}: {report['meta'].get('backend')} at {dtype} on corpus {report['meta'].get('corpus_version')}")
        if dtype not in EPSILON:
            print("  no reference error at this dtype (absolute bounds)")
            continue
        eps = EPSILON[dtype]
        for kind, row in sorted(calibration(report, classes).items()):
            tol = get_tolerance(kind, dtype)
            print(f"  {kind:14s} {row['tensors']:5d} tensors  max ratio rel RMS {row['ratio_rel']:8.3g}  "
                  f"max abs {row['ratio_max']:8.3g}  floor needed at k={tol.k:g}: rel {row['need_rel']:7.3g} eps "
                  f"(table {tol.floor_rel_rms / eps:.3g}), max {row['need_max']:7.3g} eps "
                  f"(table {tol.floor_max_abs_rel / eps:.3g})  [{row['worst']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
