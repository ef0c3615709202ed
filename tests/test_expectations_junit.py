"""Skip and xfail files (conformance/expectations.py) and the JUnit XML report, on the
committed corpus's RMSNorm op cases with the reference and a deliberately wrong backend.

``broken_op_backends:nrm_offset_ignored`` fails exactly the three cases below in
float32 and passes the other four RMSNorm cases.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from broken_op_backends import _BrokenOps
from conformance.cli import cli
from conformance.expectations import Entry, ExpectationError, Expectations, load_expectations, parse_file

BROKEN = "broken_op_backends:nrm_offset_ignored"
FAILING = {"op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight", "op/rms_norm/multiply-then-cast"}
PASSING = {"op/rms_norm/plain", "op/rms_norm/per-head", "op/rms_norm/cast-then-multiply", "op/rms_norm/eps-dominant"}
MODEL_CASE = "qwen3/untied-gqa-odd-len"


def raising_rms_norm():
    """The reference with an RMSNorm that raises: every RMSNorm case errors."""

    def rms_norm(x, weight, **kwargs):
        raise ValueError("kernel exploded")

    return _BrokenOps("broken:raises", rms_norm=rms_norm)


def run(golden_dir, tmp_path, backend, *extra, cases=("op/rms_norm/*",)):
    """Invoke ``run`` with a JSON report; returns the click result and ``{case id: JSON entry}``."""
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--golden-dir", str(golden_dir), "--report", str(report)]
    for glob in cases:
        args += ["--case", glob]
    result = CliRunner().invoke(cli, args + list(extra))
    by_case = {r["case_id"]: r for r in json.loads(report.read_text())["results"]} if report.exists() else {}
    return result, by_case


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parse_file_keeps_globs_reasons_and_line_numbers(tmp_path):
    path = write(tmp_path, "x.txt", "# header\n\nop/rms_norm/*   # NRM-02 offset ignored\n  qwen3/x#tight\n")
    assert parse_file(path, reason_required=True) == (
        Entry("op/rms_norm/*", "NRM-02 offset ignored", str(path), 3), Entry("qwen3/x", "tight", str(path), 4))
    skip = write(tmp_path, "s.txt", "op/mla/*\n")
    assert parse_file(skip, reason_required=False) == (Entry("op/mla/*", "", str(skip), 1),)


@pytest.mark.parametrize("text, required, words", [
    ("ok/*  # fine\nop/a op/b  # two globs\n", False, ":2: expected '<case-id glob>  # reason'"),
    ("\nop/rms_norm/plain\n", True, ":2: xfail entry 'op/rms_norm/plain' has no reason"),
    ("op/rms_norm/plain   #   \n", True, ":1: xfail entry"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, required, words):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(ExpectationError, match=str(path) + words.replace("*", r"\*")):
        parse_file(path, reason_required=required)


def test_expectations_match_first_entry_and_report_unmatched():
    skip, xfail, stale = (Entry("op/a/*", "", "s", 1), Entry("op/*", "r", "x", 1), Entry("nope/*", "r", "x", 2))
    expectations = Expectations(skips=(skip,), xfails=(xfail, stale))
    assert expectations.skip_for("op/a/1") is skip and expectations.skip_for("op/b/1") is None
    assert expectations.xfail_for("op/a/1") is xfail
    assert expectations.unmatched(["op/a/1"]) == [stale]
    assert load_expectations() == Expectations()


def test_skip_and_xfail_files_turn_failures_into_expected_outcomes(golden_dir, tmp_path):
    skip = write(tmp_path, "skip.txt", "# not ported\nop/rms_norm/plain\nop/rms_norm/per-head  # no per-head norm\n")
    xfail = write(tmp_path, "xfail.txt", "op/rms_norm/one-plus-w  # NRM-02\nop/rms_norm/zero-*  # NRM-02 again\n"
                   "op/rms_norm/multiply-*  # NRM-02 again\n")
    result, by_case = run(golden_dir, tmp_path, BROKEN, "--skip-file", str(skip), "--xfail-file", str(xfail))
    assert result.exit_code == 0, result.output
    status = {case: entry["status"] for case, entry in by_case.items()}
    assert status == {"op/rms_norm/plain": "skipped", "op/rms_norm/per-head": "skipped",
                      **dict.fromkeys(FAILING, "xfailed"),
                      "op/rms_norm/cast-then-multiply": "passed", "op/rms_norm/eps-dominant": "passed"}
    assert by_case["op/rms_norm/per-head"]["message"] == "no per-head norm"
    assert by_case["op/rms_norm/per-head"]["expectation"] == f"{skip}:3: no per-head norm"
    assert by_case["op/rms_norm/one-plus-w"]["expectation"] == f"{xfail}:1: NRM-02"
    assert by_case["op/rms_norm/zero-offset-weight"]["expectation"] == f"{xfail}:2: NRM-02 again"
    # RMSNorm is judged within a ULP window of the reference's own float32 result (docs/tolerances.md).
    assert by_case["op/rms_norm/one-plus-w"]["message"].startswith("failed: output: ")
    assert "ULP from the reference's float32 result" in by_case["op/rms_norm/one-plus-w"]["message"]
    assert "repro" not in by_case["op/rms_norm/one-plus-w"]
    assert "2 passed, 0 failed, 0 not implemented, 2 skipped, 3 xfailed" in result.output
    assert "repro:" not in result.output


def test_an_xpass_is_strict(golden_dir, tmp_path):
    xfail = write(tmp_path, "xfail.txt", "op/rms_norm/plain  # stale entry\n")
    result, by_case = run(golden_dir, tmp_path, "refimpl", "--xfail-file", str(xfail))
    assert result.exit_code == 1, result.output
    assert by_case["op/rms_norm/plain"]["status"] == "xpassed"
    assert "remove the xfail entry" in by_case["op/rms_norm/plain"]["message"]
    assert "6 passed, 0 failed, 0 not implemented, 1 xpassed" in result.output


def test_an_xfailed_error_and_a_still_failing_case(golden_dir, tmp_path):
    xfail = write(tmp_path, "xfail.txt", "op/rms_norm/plain  # raises on purpose\n")
    result, by_case = run(golden_dir, tmp_path, f"{__name__}:raising_rms_norm", "--xfail-file", str(xfail))
    assert result.exit_code == 1, result.output
    assert by_case["op/rms_norm/plain"]["status"] == "xfailed"
    assert by_case["op/rms_norm/plain"]["message"] == "error: ValueError: kernel exploded"
    assert {e["status"] for case, e in by_case.items() if case != "op/rms_norm/plain"} == {"error"}


def test_skipping_every_selected_case_checks_nothing(golden_dir, tmp_path):
    skip = write(tmp_path, "skip.txt", "op/rms_norm/*\n")
    result, by_case = run(golden_dir, tmp_path, "refimpl", "--skip-file", str(skip))
    assert result.exit_code == 1
    assert "no case was checked" in result.stderr
    assert {e["status"] for e in by_case.values()} == {"skipped"}


def test_entries_matching_no_corpus_case_warn_with_file_and_line(golden_dir, tmp_path):
    skip = write(tmp_path, "skip.txt", "op/rms_norm/plain\nnope/*  # gone\n")
    # A corpus case outside the selection is no warning.
    xfail = write(tmp_path, "xfail.txt", "\n\nop/attention/*  # not selected\nop/rms_norm/typo  # typo\n")
    result, _ = run(golden_dir, tmp_path, "refimpl", "--skip-file", str(skip), "--xfail-file", str(xfail))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {skip}:2: 'nope/*' matches no case in the corpus",
                        f"warning: {xfail}:4: 'op/rms_norm/typo' matches no case in the corpus"]


@pytest.mark.parametrize("option, text, words", [
    ("--xfail-file", "op/rms_norm/plain\n", "xfail.txt:1: xfail entry 'op/rms_norm/plain' has no reason"),
    ("--skip-file", "# ok\nop/rms_norm/plain op/rms_norm/per-head\n", "xfail.txt:2: expected '<case-id glob>"),
])
def test_a_malformed_line_is_one_error_line_and_exit_2(golden_dir, tmp_path, option, text, words):
    path = write(tmp_path, "xfail.txt", text)
    result, by_case = run(golden_dir, tmp_path, "refimpl", option, str(path))
    assert result.exit_code == 2 and not by_case
    assert result.stderr.startswith("error: ") and words in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_a_missing_expectation_file_is_an_input_error(golden_dir, tmp_path):
    result, _ = run(golden_dir, tmp_path, "refimpl", "--skip-file", str(tmp_path / "absent.txt"))
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot read")


def junit_cases(path):
    """``{case id: (testcase element, its outcome child or None)}`` and the testsuite element."""
    suite = ET.parse(path).getroot().find("testsuite")
    cases = {}
    for testcase in suite.findall("testcase"):
        outcome = [child for child in testcase if child.tag in ("failure", "error", "skipped")]
        assert len(outcome) <= 1
        cases[testcase.get("name").rsplit(" [", 1)[0]] = (testcase, outcome[0] if outcome else None)
    return suite, cases


def test_junit_report_is_written_when_cases_fail(golden_dir, tmp_path):
    junit = tmp_path / "out.xml"
    result, by_case = run(golden_dir, tmp_path, BROKEN, "--junit", str(junit), cases=("op/rms_norm/*", MODEL_CASE))
    assert result.exit_code == 1
    suite, cases = junit_cases(junit)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("8", "3", "0", "1")
    assert {p.get("name"): p.get("value") for p in suite.find("properties")}["backend_spec"] == BROKEN
    assert set(cases) == FAILING | PASSING | {MODEL_CASE}
    for case_id in FAILING:
        testcase, failure = cases[case_id]
        assert testcase.get("classname") == "op.rms_norm" and testcase.get("name") == f"{case_id} [float32]"
        assert testcase.find("properties/property[@name='dtype']").get("value") == "float32"
        assert failure.tag == "failure" and failure.get("message") == by_case[case_id]["message"]
        assert f"--case {case_id}" in failure.text
    assert all(cases[case_id][1] is None for case_id in PASSING)
    model, not_implemented = cases[MODEL_CASE]
    assert model.get("classname") == "qwen3" and not_implemented.tag == "skipped"
    assert not_implemented.get("type") == "not implemented"
    assert not_implemented.get("message") == "not implemented: op-level broken backend"


def test_junit_report_of_errors_skips_xfails_and_xpasses(golden_dir, tmp_path):
    junit = tmp_path / "out.xml"
    skip = write(tmp_path, "skip.txt", "op/rms_norm/per-head  # later\n")
    xfail = write(tmp_path, "xfail.txt", "op/rms_norm/one-plus-w  # known\n")
    result, _ = run(golden_dir, tmp_path, f"{__name__}:raising_rms_norm", "--junit", str(junit),
                    "--skip-file", str(skip), "--xfail-file", str(xfail))
    assert result.exit_code == 1
    suite, cases = junit_cases(junit)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("7", "0", "5", "2")
    error = cases["op/rms_norm/plain"][1]
    assert error.tag == "error" and error.get("message") == "ValueError: kernel exploded"
    skipped, xfailed = cases["op/rms_norm/per-head"][1], cases["op/rms_norm/one-plus-w"][1]
    assert (skipped.tag, skipped.get("type"), skipped.get("message")) == ("skipped", "skipped", "skipped: later")
    assert (xfailed.tag, xfailed.get("type")) == ("skipped", "xfailed")
    assert xfailed.get("message") == f"xfail ({xfail}:1: known): error: ValueError: kernel exploded"

    stale = write(tmp_path, "stale.txt", "op/rms_norm/plain  # fixed since\n")
    result, _ = run(golden_dir, tmp_path, "refimpl", "--junit", str(junit), "--xfail-file", str(stale))
    assert result.exit_code == 1
    suite, cases = junit_cases(junit)
    xpassed = cases["op/rms_norm/plain"][1]
    assert suite.get("failures") == "1" and (xpassed.tag, xpassed.get("type")) == ("failure", "xpassed")
    assert "fixed since" in xpassed.get("message")


def test_an_unwritable_junit_path_fails_before_running(golden_dir, tmp_path):
    result, _ = run(golden_dir, tmp_path, "refimpl", "--junit", str(tmp_path / "no" / "such" / "dir.xml"))
    assert result.exit_code == 2 and "cannot write report" in result.stderr
