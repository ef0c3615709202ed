"""``llm-conformance matrix`` (support per backend, nothing run) and ``run --compare-to``
(drift against a previous JSON report), on the committed corpus.

The drift tests use the RMSNorm op cases: the reference passes all seven and
``broken_op_backends:nrm_offset_ignored`` fails exactly three of them in float32.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from broken_op_backends import _BrokenOps
from conformance.cli import cli
from conformance.drift import OldReport, compute_drift
from conformance.manifest import read_manifest
from conformance.runner import CaseResult, Status

BROKEN = "broken_op_backends:nrm_offset_ignored"
FAILING = {"op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight", "op/rms_norm/multiply-then-cast"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def matrix_rows(text: str) -> dict[str, list[str]]:
    """``{family / op label: [cases, backend cells...]}`` from the markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("model", "op", "scenario"):
            rows[cells[1].strip("`")] = cells[2:]
    return rows


def test_matrix_of_the_three_builtin_backends(golden_dir, tmp_path):
    out = tmp_path / "matrix.md"
    result = invoke("matrix", "--backend", "refimpl", "--backend", "torch", "--backend", "transformers",
                    "--golden-dir", golden_dir, "--output", out)
    assert result.exit_code == 0, result.output
    assert out.read_text() == result.stdout
    assert "| kind | family / op | cases | refimpl | torch | transformers |" in result.stdout
    rows = matrix_rows(result.stdout)
    cases = read_manifest(golden_dir).cases
    ops = {c.op for c in cases if c.level == "op"}
    families = {f"{c.id.rsplit('/', 1)[0]} ({c.architecture})" for c in cases if c.level in ("model", "scenario")}
    assert set(rows) == ops | families
    assert sum(int(cells[0]) for cells in rows.values()) == len(cases)
    for label, (n, ref, torch, hf) in rows.items():
        assert ref == f"{n}/{n}"                                   # the reference offers everything
        assert torch == (f"{n}/{n}" if label == "attention" else f"0/{n}")
        lacking = label.startswith(("grok2 ", "scenario/grok2 ")) or label == "mtp (Qwen3NextForCausalLM)"
        assert hf == (f"0/{n}" if lacking else f"{n}/{n}")
    assert rows["grok2 (Grok1ForCausalLM)"][0] == "4"


class _Probing(_BrokenOps):
    """Reference ops without RoPE, whose ``supports`` raises on RMSNorm and refuses soft-cap."""

    def __init__(self):
        super().__init__("probing")

    @property
    def ops(self):
        return {k: v for k, v in super().ops.items() if k != "rope"}

    def supports(self, case, dtype):
        if case.level == "op" and case.op == "rms_norm":
            raise RuntimeError("probe exploded")
        return "no soft-cap" if case.level == "op" and case.op == "soft_cap" else super().supports(case, dtype)


def test_matrix_counts_missing_ops_refusals_and_raising_probes_as_unsupported(golden_dir, monkeypatch):
    import broken_op_backends

    monkeypatch.setattr(broken_op_backends, "probing", _Probing, raising=False)
    result = invoke("matrix", "--backend", "broken_op_backends:probing", "--backend", "refimpl",
                    "--golden-dir", golden_dir, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    rows = matrix_rows(result.stdout)
    assert rows["rope"] == ["12", "0/12", "12/12"]
    assert rows["soft_cap"] == ["2", "0/2", "2/2"]
    assert rows["rms_norm"] == ["7", "0/7", "7/7"]
    assert rows["attention"] == ["20", "20/20", "20/20"]
    assert rows["qwen3 (Qwen3ForCausalLM)"] == ["11", "0/11", "11/11"]   # op-level only
    warnings = result.stderr.splitlines()
    assert len(warnings) == 7 and all(w.startswith("warning: probing: supports() raised on op/rms_norm/")
                                      and "RuntimeError: probe exploded" in w for w in warnings)


@pytest.mark.parametrize("args, words", [
    (("--backend", "nosuch"), "nosuch"),
    (("--backend", "refimpl", "-o", "device=cpu"), "rejected options"),
    (("--backend", "refimpl", "--output", "/nonexistent/dir/m.md"), "cannot write"),
])
def test_matrix_input_errors_are_one_line(golden_dir, args, words):
    result = invoke("matrix", "--golden-dir", golden_dir, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and words in result.stderr and result.stderr.count("\n") == 1


def run(golden_dir, tmp_path, backend, name, *extra):
    """``run`` on the RMSNorm cases with a JSON report; returns the click result and the report."""
    report = tmp_path / name
    result = invoke("run", "--backend", backend, "--golden-dir", golden_dir, "--case", "op/rms_norm/*",
                    "--report", report, *extra)
    return result, (json.loads(report.read_text()) if report.exists() else None)


@pytest.fixture
def old_report(golden_dir, tmp_path):
    result, document = run(golden_dir, tmp_path, "refimpl", "old.json")
    assert result.exit_code == 0 and all(r["status"] == "passed" for r in document["results"])
    return tmp_path / "old.json", document


def drift_section(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("drift against "))
    return lines[start:]


def test_broken_backend_is_flagged_for_newly_failing_cases(golden_dir, tmp_path, old_report):
    old, _ = old_report
    result, document = run(golden_dir, tmp_path, BROKEN, "new.json", "--compare-to", old)
    assert result.exit_code == 1  # for the failures; drift itself never changes it
    section = drift_section(result.stdout)
    assert section[0] == f"drift against {old} (factor 2; 7 case(s) compared): 3 flagged"
    assert {line.split(":")[0].strip() for line in section[1:]} == FAILING
    assert all("passed before, failed now; rel RMS grew more than 2x" in line for line in section[1:])
    assert document["meta"]["compare_to"] == str(old) and document["meta"]["drift_factor"] == 2.0
    for entry in document["results"]:
        drift = entry["drift"]
        assert drift["flagged"] == (entry["case_id"] in FAILING)
        assert drift["old_status"] == "passed" and drift["status"] == entry["status"]
        if not drift["flagged"]:
            assert drift["reasons"] == [] and drift["factor"] == pytest.approx(1.0)
    assert "warning:" not in result.stderr


def test_error_growth_while_passing_is_flagged_and_exit_status_unchanged(golden_dir, tmp_path, old_report):
    old, document = old_report
    by_case = {r["case_id"]: r for r in document["results"]}
    plain, per_head = by_case["op/rms_norm/plain"], by_case["op/rms_norm/per-head"]
    true_error = plain["comparisons"]["output"]["rel_rms"]
    plain["comparisons"]["output"]["rel_rms"] = true_error / 10          # it "was" 10x better
    per_head["comparisons"]["output"]["rel_rms"] *= 0.6                 # 1.67x: under the factor
    del document["results"][-1]                                         # absent from OLD: ignored
    old.write_text(json.dumps(document))
    result, new = run(golden_dir, tmp_path, "refimpl", "new.json", "--compare-to", old)
    assert result.exit_code == 0, result.output
    section = drift_section(result.stdout)
    assert section[0].endswith("(factor 2; 6 case(s) compared): 1 flagged")
    assert section[1].startswith("  op/rms_norm/plain: rel RMS grew more than 2x (")
    drift = {r["case_id"]: r["drift"] for r in new["results"]}
    assert drift["op/rms_norm/plain"]["factor"] == pytest.approx(10.0)
    assert drift["op/rms_norm/plain"]["rel_rms"] == pytest.approx(true_error)
    assert not drift["op/rms_norm/per-head"]["flagged"]
    assert drift[document["results"][-1]["case_id"]] is not None and drift[new["results"][-1]["case_id"]] is None
    # A larger factor lets the 10x growth through.
    result, _ = run(golden_dir, tmp_path, "refimpl", "new2.json", "--compare-to", old, "--drift-factor", "20")
    assert drift_section(result.stdout)[0].endswith(": 0 flagged")


def test_dtype_and_corpus_version_mismatch_warn(golden_dir, tmp_path, old_report):
    old, document = old_report
    document["meta"].update(dtype="float64", corpus_version="0.0.1")
    old.write_text(json.dumps(document))
    result, _ = run(golden_dir, tmp_path, "refimpl", "new.json", "--compare-to", old)
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("warning")] == [
        f"warning: --compare-to {old}: dtype float64 there, float32 in this run; the numbers may not be comparable",
        f"warning: --compare-to {old}: corpus version 0.0.1 there, "
        f"{read_manifest(golden_dir).corpus_version} in this run; "
        "the numbers may not be comparable"]


@pytest.mark.parametrize("content, words", [
    (None, "cannot read it"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not an llm-conformance JSON report"),
    ('{"meta": {}, "results": [{"case_id": "x"}]}', "not an llm-conformance JSON report"),
])
def test_bad_compare_to_file_is_a_one_line_error(golden_dir, tmp_path, content, words):
    old = tmp_path / "old.json"
    if content is not None:
        old.write_text(content)
    result, document = run(golden_dir, tmp_path, "refimpl", "new.json", "--compare-to", old)
    assert result.exit_code == 2 and document is None and result.stdout == ""
    assert result.stderr.startswith(f"error: --compare-to {old}: {words}") and result.stderr.count("\n") == 1


def test_bad_drift_factor_is_a_usage_error(golden_dir, tmp_path, old_report):
    result, _ = run(golden_dir, tmp_path, "refimpl", "new.json", "--compare-to", old_report[0],
                    "--drift-factor", "0.5")
    assert result.exit_code == 2


def test_compute_drift_edge_cases():
    from conformance.compare import Comparison

    def result(case_id, status, rel_rms, nonfinite=0):
        comparison = Comparison((2,), (2,), 0.0, None, rel_rms, 1.0, nonfinite)
        return CaseResult(case_id=case_id, dtype="float32", status=status, comparisons={"logits": comparison})

    def old(status, rel_rms, nonfinite=0):
        return {"case_id": "-", "status": status, "comparisons": {"logits": {"rel_rms": rel_rms, "nonfinite": nonfinite}}}

    report = OldReport("old.json", {}, {
        "zero": old("passed", 0.0), "zero-same": old("passed", 0.0), "was-nan": old("failed", "nan", 3),
        "now-nan": old("passed", 1e-6), "was-failing": old("failed", 1e-1), "skipped": old("xpassed", 1e-6),
    })
    drift = compute_drift([
        result("zero", Status.PASSED, 1e-9), result("zero-same", Status.PASSED, 0.0),
        result("was-nan", Status.FAILED, 1.0), result("now-nan", Status.FAILED, 0.0, nonfinite=1),
        result("was-failing", Status.ERROR, 0.1), CaseResult("skipped", "float32", Status.SKIPPED),
        result("new-case", Status.PASSED, 1.0),
    ], report)
    assert "new-case" not in drift
    assert drift["zero"]["flagged"] and drift["zero"]["factor"] == math.inf
    assert not drift["zero-same"]["flagged"] and drift["zero-same"]["factor"] == 1.0
    assert not drift["was-nan"]["flagged"] and drift["was-nan"]["old_rel_rms"] == math.inf
    assert drift["now-nan"]["reasons"] == ["passed before, failed now",
                                           "rel RMS grew more than 2x (now NaN/Inf or mismatched)"]
    assert not drift["was-failing"]["flagged"]
    assert drift["skipped"]["reasons"] == ["passed before, skipped now"] and drift["skipped"]["rel_rms"] is None


def test_matrix_says_scenario_support_is_an_upper_bound(golden_dir):
    """A backend whose loaded model lacks prefill / decode / rollback still counts scenarios as supported:
    only loading shows that, so the table says it under scenario rows (and only then)."""
    from conformance.backends.refimpl_backend import RefimplBackend
    from conformance.matrix import SCENARIO_NOTE, support_matrix

    class ForwardOnly(RefimplBackend):
        def load_model(self, checkpoint_dir, dtype):
            model = super().load_model(checkpoint_dir, dtype)
            return type("Model", (), {"run": model.run})()

    cases = read_manifest(golden_dir).cases
    text, _ = support_matrix([("forward-only", ForwardOnly())], cases, "float64", "title")
    assert "| scenario | scenario/qwen3 (Qwen3ForCausalLM) | 3 | 3/3 |" in text
    assert text.rstrip().endswith(SCENARIO_NOTE) and "only once a checkpoint is loaded" in SCENARIO_NOTE
    ops_only, _ = support_matrix([("forward-only", ForwardOnly())], [c for c in cases if c.level == "op"],
                                 "float64", "title")
    assert SCENARIO_NOTE not in ops_only
