"""The error model (issue 8, ``docs/tolerances.md``): the table, the ``reference_error`` manifest
field, the ratio, ULP, exact and interim rules, and the three numbers (backend error, reference
error, ratio, with the bound) in every report.

The small corpus is written by the golden generator into a temporary directory (about 1 s),
so these tests do not depend on the committed ``golden/`` being regenerated.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file

from conformance.backends.base import BackendOutput
from conformance.backends.refimpl_backend import RefimplBackend
from conformance.cli import cli
from conformance.compare import compare
from conformance.expectations import ExpectationError, parse_line
from conformance.manifest import read_manifest
from conformance.runner import CaseResult, Status, backend_tensors, judge, judge_op, run_suite
from conformance.tolerances import (
    MAX_ROUNDING_MISMATCH, REFERENCE_DTYPES, TOLERANCES, RecordedError, argmax_margin, get_tolerance,
    judge_tensor, ulp_distance,
)
from conftest import ROOT

DTYPES = ("float64", *REFERENCE_DTYPES)
MODEL = "qwen3/single-token"
SCENARIO = "scenario/qwen3/speculative"
OPS = ("op/soft_cap/cap-20", "op/rms_norm/cast-then-multiply", "op/softmax_top_k/top-1", "op/gated_mlp/swiglu")
KINDS = sorted({kind for kind, _ in TOLERANCES})
LOW = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens

    out = tmp_path_factory.mktemp("error_model_golden")
    args = [arg for case in (MODEL, SCENARIO, *OPS) for arg in ("--only", case)]
    assert make_goldens.main([*args, "--out", str(out)]) == 0
    return out


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "300"})


# -- the table

@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_row_per_dtype_with_one_rule(kind):
    for dtype in DTYPES:
        row = get_tolerance(kind, dtype)
        if dtype == "float64":
            # The expected output is the reference itself: absolute bounds only.
            assert row.k is None and row.ulp is None
            assert row.rel_rms == (1e-10 if kind in ("model_logits", "op_rope_long") else 1e-12)
        else:
            assert (row.k is None) != (row.ulp is None), (kind, dtype)
            assert row.floor_rel_rms >= 0 and row.floor_max_abs_rel >= 0
            # A floor is never looser than the interim absolute bound it replaces.
            assert row.floor_rel_rms <= row.rel_rms and row.floor_max_abs_rel <= row.max_abs_rel


def test_ratio_kinds_use_one_k_and_pinned_roundings_their_mismatch_limit():
    ks = {row.k for (kind, dtype), row in TOLERANCES.items() if row.k is not None}
    assert ks == {2.0}
    for dtype in ("float16", "bfloat16"):
        assert get_tolerance("op_rounding", dtype).mismatch == MAX_ROUNDING_MISMATCH
        assert get_tolerance("op_elementwise", dtype).mismatch is None
    assert get_tolerance("op_rounding", "float32").mismatch is None


# -- the ratio rule

def _scaled(shape, rel: float, seed: int = 0):
    """``(expected, error vector, its RecordedError)`` with the error's rel RMS equal to ``rel``."""
    rng = np.random.default_rng(seed)
    expected = rng.standard_normal(shape)
    error = rng.standard_normal(shape)
    error *= rel * np.linalg.norm(expected) / np.linalg.norm(error)
    return expected, error, RecordedError(rel_rms=rel, max_abs=float(np.abs(error).max()))


RATIO_ROWS = sorted((kind, dtype) for (kind, dtype), row in TOLERANCES.items() if row.k is not None)


@pytest.mark.parametrize("kind,dtype", RATIO_ROWS)
def test_just_under_k_times_the_reference_passes_just_over_fails(kind, dtype):
    row = get_tolerance(kind, dtype)
    # The reference's error large against the floors, so that k decides (1.9x and 2.1x for k = 2).
    expected, error, reference = _scaled((6, 50), rel=1000 * max(row.floor_rel_rms, row.floor_max_abs_rel, 1e-9))
    under, over = row.k - 0.1, row.k + 0.1
    passed = judge_tensor(compare(expected + under * error, expected), row, dtype, reference)
    assert passed.rule == "ratio" and passed.passed, passed.failures
    assert passed.ratio_rel_rms == pytest.approx(under) and passed.ratio_max_abs == pytest.approx(under)
    failed = judge_tensor(compare(expected + over * error, expected), row, dtype, reference)
    assert [f.split(" ")[0] for f in failed.failures] == ["rel", "max"], failed.failures
    assert f"{row.k:g} x reference" in failed.failures[0]


def test_the_runner_judges_every_tap_against_its_own_reference_error():
    row = get_tolerance("model_logits", "bfloat16")
    logits, logits_error, logits_ref = _scaled((1, 3, 40), 0.05, seed=1)
    tap, tap_error, tap_ref = _scaled((1, 3, 16), 0.01, seed=2)
    # The tap is 3x its own reference error: it fails though its error is below the logits'.
    actual = {"layers.0": tap + 3 * tap_error, "logits": logits + 1.5 * logits_error}
    result = judge(CaseResult("c", "bfloat16", Status.ERROR), actual, {"layers.0": tap, "logits": logits}, row,
                   reference={"layers.0": tap_ref, "logits": logits_ref})
    assert result.status is Status.FAILED and result.first_divergence == "layers.0"
    assert result.judgements["logits"].passed and result.judgements["logits"].ratio_rel_rms == pytest.approx(1.5)
    assert "ratio 3" in result.message


def test_a_zero_reference_error_leaves_the_floor():
    row = get_tolerance("op_exact", "float32")
    expected = np.ones(8)
    exact = RecordedError(0.0, 0.0)
    within = judge_tensor(compare(expected * (1 + row.floor_rel_rms / 2), expected), row, "float32", exact)
    assert within.passed and within.ratio_rel_rms == math.inf and within.bound_rel_rms == row.floor_rel_rms
    beyond = judge_tensor(compare(expected * (1 + 2 * row.floor_rel_rms), expected), row, "float32", exact)
    assert not beyond.passed


def test_without_a_recorded_error_the_interim_bound_applies_and_float64_is_absolute():
    expected, error, _ = _scaled((4, 10), 1e-6)
    comparison = compare(expected + error, expected)
    interim = judge_tensor(comparison, get_tolerance("model_logits", "float32"), "float32")
    assert interim.rule == "interim" and interim.passed and interim.reference_rel_rms is None
    absolute = judge_tensor(comparison, get_tolerance("model_logits", "float64"), "float64")
    assert absolute.rule == "absolute" and absolute.failures[0].startswith("rel RMS")


def test_the_argmax_margin_leaves_out_the_gaps_the_reference_itself_could_flip():
    row = get_tolerance("model_logits", "bfloat16")
    for rel in (1e-4, 0.05):
        expected, error, reference = _scaled((2, 5, 30), rel)
        comparison = compare(expected + error, expected)
        margin = argmax_margin(row, comparison, judge_tensor(comparison, row, "bfloat16", reference))
        assert margin == max(row.argmax_margin * comparison.max_abs_expected, 2 * reference.max_abs)
    interim = judge_tensor(comparison, row, "bfloat16")
    assert argmax_margin(row, comparison, interim) == row.argmax_margin * comparison.max_abs_expected


# -- the ULP rule

def test_ulp_distance_counts_units_of_the_run_dtype():
    one = np.array([1.0, 1.0, 0.0, 2.0 ** -130])
    shifted = one + np.array([2.0 ** -23, -2.0 ** -24, 2.0 ** -149, 2.0 ** -149])
    assert ulp_distance(shifted, one, "float32").tolist() == [1.0, 0.5, 1.0, 1.0]
    assert ulp_distance(np.array([1.0 + 2 ** -7]), np.array([1.0]), "bfloat16").tolist() == [1.0]
    assert ulp_distance(np.array([1.0 + 2 ** -10]), np.array([1.0]), "float16").tolist() == [1.0]


def _bfloat16_next(values):
    """The next bfloat16 above each value (nextafter in float32 would move a unit of float32)."""
    bits = np.asarray(values, dtype=ml_dtypes.bfloat16).view(np.uint16) + 1
    return bits.view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("kind", ["op_elementwise", "op_rounding"])
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES)
def test_elementwise_outputs_stay_within_the_ulp_window(kind, dtype):
    row = get_tolerance(kind, dtype)
    expected = np.random.default_rng(3).uniform(0.5, 4.0, 400)
    rounded = expected.astype(LOW[dtype]).astype(np.float64)

    def moved(steps, share):
        values = rounded.astype(LOW[dtype])
        count = max(1, int(share * values.size))
        for _ in range(steps):
            values[:count] = _bfloat16_next(values[:count]) if dtype == "bfloat16" else \
                np.nextafter(values[:count], LOW[dtype](np.inf))
        return values.astype(np.float64)

    def judged(actual):
        return judge_tensor(compare(actual, expected), row, dtype, actual=actual, rounded=rounded)

    assert judged(rounded).passed and judged(rounded).max_ulp == 0
    inside = judged(moved(int(row.ulp), 0.005))
    assert inside.rule == "ulp" and inside.passed and inside.max_ulp == row.ulp
    assert "ULP" in judged(moved(int(row.ulp) + 1, 0.005)).failures[0]
    # One unit in the last place on a quarter of the elements: a swapped cast order.
    swapped = judged(moved(1, 0.25))
    assert swapped.passed == (row.mismatch is None)
    assert swapped.mismatch == pytest.approx(0.25)


# -- exact indices

def test_selected_experts_are_compared_exactly_as_a_set_in_every_dtype():
    expected = {"routing_weights": np.array([[0.7, 0.0, 0.3, 0.0]]), "selected": np.array([[1, 0, 1, 0]])}
    for dtype in DTYPES:
        tolerance = get_tolerance("op_routing", dtype)
        # Any dtype an engine returns its 0/1 choice in; the matrix has no order of the k slots.
        same = {**expected, "selected": np.array([[True, False, True, False]])}
        result = judge_op(CaseResult("c", dtype, Status.ERROR), {k: np.asarray(v, dtype=np.float64)
                                                                  for k, v in same.items()},
                          expected, tolerance, exact=("selected",))
        assert result.status is Status.PASSED and result.judgements["selected"].rule == "exact"
        flipped = {**same, "selected": np.array([[1.0, 1.0, 0.0, 0.0]])}
        result = judge_op(CaseResult("c", dtype, Status.ERROR), flipped, expected, tolerance, exact=("selected",))
        assert result.status is Status.FAILED and "compared exactly" in result.message


# -- the corpus field

def test_the_generator_records_the_reference_error_of_every_compared_tensor(corpus):
    cases = {case.id: case for case in read_manifest(corpus).cases}
    assert set(cases[MODEL].reference_error) == set(REFERENCE_DTYPES)
    io = load_file(corpus / cases[MODEL].data)
    taps = {name[len("hidden_states."):] for name in io if name.startswith("hidden_states.")}
    assert set(cases[MODEL].reference_error["bfloat16"]) == taps | {"logits"}
    assert set(cases["op/softmax_top_k/top-1"].reference_error["float32"]) == {"routing_weights"}
    steps = cases[SCENARIO].reference_error["float16"]
    assert steps and all(name.startswith("steps.") for name in steps)
    # Elementwise cases carry the reference's own result in each lower dtype.
    stored = load_file(corpus / cases["op/soft_cap/cap-20"].data)
    assert {f"outputs.output@{d}" for d in REFERENCE_DTYPES} <= set(stored)


def test_the_reference_backend_passes_its_own_corpus_at_ratio_one(corpus):
    cases = read_manifest(corpus).cases
    for dtype in DTYPES:
        results = run_suite(RefimplBackend(), cases, corpus, dtype, progress=False)
        assert {r.status for r in results} == {Status.PASSED}, [(r.case_id, r.message) for r in results]
        for result in results:
            for name, judgement in result.judgements.items():
                if judgement.ratio_rel_rms is not None and judgement.reference_rel_rms:
                    assert judgement.ratio_rel_rms == pytest.approx(1.0, rel=6e-3), (result.case_id, name)


MALFORMED = {
    "not an object": ([1, 2], "field 'reference_error' must be an object"),
    "float64": ({"float64": {"logits": {"rel_rms": 0.0, "max_abs": 0.0}}}, "float64 is the specification"),
    "unknown dtype": ({"int8": {}}, "dtype 'int8'"),
    "no outputs": ({"float32": {}}, "reference_error.float32 must be a non-empty object"),
    "wrong keys": ({"float32": {"logits": {"rel_rms": 1e-7}}}, "keys 'rel_rms' and 'max_abs'"),
    "negative": ({"float32": {"logits": {"rel_rms": -1.0, "max_abs": 0.0}}}, "'rel_rms' must be a finite number"),
    "string": ({"float32": {"logits": {"rel_rms": "1e-7", "max_abs": 0.0}}}, "finite number >= 0"),
    "boolean": ({"float32": {"logits": {"rel_rms": 1e-7, "max_abs": True}}}, "'max_abs' must be a finite number"),
    "infinite": ({"float32": {"logits": {"rel_rms": 1e400, "max_abs": 0.0}}}, "finite number"),
}


@pytest.fixture
def corpus_copy(corpus, tmp_path):
    return Path(shutil.copytree(corpus, tmp_path / "golden"))


def _edit(root: Path, case_id: str, edit) -> None:
    manifest = json.loads((root / "MANIFEST.json").read_text())
    edit(next(c for c in manifest["cases"] if c["id"] == case_id))
    (root / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_record_is_a_one_line_manifest_error(corpus_copy, name):
    value, fragment = MALFORMED[name]
    manifest = (corpus_copy / "MANIFEST.json").read_text()
    entry = json.dumps(value).replace("1e+400", "1e400")
    text = manifest.replace('"reference_error": {', f'"reference_error": {entry}, "unused": {{', 1)
    (corpus_copy / "MANIFEST.json").write_text(text)
    result = invoke("list", "--golden-dir", corpus_copy)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "reference_error" in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize("change,fragment", [
    (lambda rec: rec["float32"].pop("logits"), "reference_error.float32 lacks 'logits'"),
    (lambda rec: rec["bfloat16"].update(bogus={"rel_rms": 0.0, "max_abs": 0.0}), "names 'bogus'"),
])
def test_a_record_must_name_exactly_the_compared_tensors(corpus_copy, change, fragment):
    _edit(corpus_copy, MODEL, lambda case: change(case["reference_error"]))
    result = invoke("run", "--backend", "refimpl", "--golden-dir", corpus_copy, "--case", MODEL, "--no-isolate")
    assert result.exit_code == 2 and fragment in result.stderr, result.output


# -- the three numbers in every report

class _Scaled:
    """A loaded model whose every tensor is the expected one plus ``factor`` times the reference's
    own error vector in the run dtype: its error is exactly ``factor`` times the reference's."""

    def __init__(self, model, expected: dict, factor: float):
        self.model, self.expected, self.factor = model, expected, factor

    def run(self, input_ids):
        got = backend_tensors(self.model.run(input_ids))

        def scaled(name):
            want = self.expected["logits" if name == "logits" else f"hidden_states.{name}"]
            return want + self.factor * (got[name] - want)

        return BackendOutput(logits=scaled("logits"), hidden_states={n: scaled(n) for n in got if n != "logits"})


class ScaledReference:
    """Backend ``test_error_model:ScaledReference`` (``-o factor=F``) for model cases."""

    name = "scaled-reference"

    def __init__(self, factor: str = "1.9"):
        self.factor = float(factor)

    def supports(self, case, dtype):
        return case.level == "model" or "model cases only"

    def load_model(self, checkpoint_dir, dtype):
        expected = load_file(str(Path(checkpoint_dir).parent / "io.safetensors"))
        return _Scaled(RefimplBackend().load_model(checkpoint_dir, dtype), expected, self.factor)


def _run(corpus, tmp_path, factor, *extra):
    report = tmp_path / f"report-{factor}.json"
    result = invoke("run", "--backend", "test_error_model:ScaledReference", "-o", f"factor={factor}", "--dtype",
                    "bfloat16", "--golden-dir", corpus, "--case", MODEL, "--no-isolate", "--report", report, *extra)
    return result, json.loads(report.read_text())["results"][0]


def test_the_reports_carry_error_reference_error_ratio_and_bound(corpus, tmp_path):
    ok, entry = _run(corpus, tmp_path, 1.9)
    assert ok.exit_code == 0, ok.output
    headline = entry["headline"]
    assert headline["tensor"] == "logits" and headline["rule"] == "ratio"
    assert headline["ratio"] == pytest.approx(1.9, rel=6e-3)
    assert headline["error"] == pytest.approx(headline["ratio"] * headline["reference_error"])
    assert headline["bound"] == pytest.approx(entry["judgements"]["logits"]["bound_rel_rms"])
    assert "ref rel RMS" in ok.stdout and "bound" in ok.stdout
    row = next(line for line in ok.stdout.splitlines() if MODEL in line)
    assert f"{headline['reference_error']:.2e}" in row and "1.90" in row and f"{headline['bound']:.2e}" in row

    html, junit, repro = tmp_path / "r.html", tmp_path / "r.xml", tmp_path / "repro"
    bad, entry = _run(corpus, tmp_path, 6, "--html", html, "--junit", junit, "--repro-dir", repro,
                      "--compare-to", tmp_path / "report-1.9.json")
    assert bad.exit_code == 1 and entry["status"] == "failed"
    assert "= 2 x reference" in entry["message"] and "(ratio 6" in entry["message"]
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert float(properties["ratio"]) == pytest.approx(6, rel=6e-3) and properties["rule"] == "ratio"
    assert {"error", "reference_error", "bound"} <= set(properties)
    page = html.read_text()
    assert "<th>ref rel RMS</th><th>ratio</th><th>bound</th>" in page and "6.0" in page
    bundle = json.loads((repro / MODEL.replace("/", "__") / "case.json").read_text())
    assert bundle["error_model"]["ratio"] == pytest.approx(6, rel=6e-3)
    assert bundle["judgements"]["logits"]["reference_rel_rms"] == headline["reference_error"]
    drift = entry["drift"]
    assert drift["flagged"] and drift["old_ratio"] == pytest.approx(1.9, rel=6e-3)
    assert drift["ratio"] == pytest.approx(6, rel=6e-3) and any("ratio 1.90 -> 6.0" in r for r in drift["reasons"])


def test_the_file_contract_check_reports_the_same_numbers(corpus, tmp_path):
    cases, outputs = tmp_path / "cases", tmp_path / "outputs"
    assert invoke("export", cases, "--case", "op/soft_cap/cap-20", "--golden-dir", corpus).exit_code == 0
    sys.path.insert(0, str(ROOT / "examples"))
    import file_contract_engine

    file_contract_engine.main(str(cases), str(outputs))
    report = tmp_path / "check.json"
    result = invoke("check", "--outputs", outputs, "--exported", cases, "--golden-dir", corpus, "--report", report)
    assert result.exit_code == 0, result.output
    headline = json.loads(report.read_text())["results"][0]["headline"]
    assert headline["rule"] == "ulp" and headline["reference_error"] > 0
    assert headline["ratio"] == pytest.approx(headline["error"] / headline["reference_error"])
    row = next(line for line in result.stdout.splitlines() if "op/soft_cap/cap-20" in line)
    assert f"{headline['reference_error']:.2e}" in row and f"{headline['ratio']:.2f}" in row and "4 ULP" in row


def test_the_pytest_plugin_records_the_numbers_as_properties(corpus, tmp_path):
    import subprocess

    junit = tmp_path / "plugin.xml"
    (tmp_path / "test_own.py").write_text("def test_own():\n    assert True\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_own.py"),
                           "--llm-backend=refimpl", "--llm-golden-dir", str(corpus), "--llm-case", "op/gated_mlp/*",
                           "--llm-dtype", "bfloat16", f"--junitxml={junit}", "-W", "error::pytest.PytestWarning"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    case = next(c for c in ET.parse(junit).iter("testcase") if "gated_mlp" in c.get("name"))
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["rule"] == "ratio" and float(properties["ratio"]) == pytest.approx(1.0, rel=6e-3)
    assert float(properties["reference_error"]) > 0 and float(properties["bound"]) > float(properties["error"])
    assert "None" not in properties.values()  # absent values are left out


# -- xfail entries for one dtype

def test_an_xfail_entry_can_name_the_dtype_it_applies_to():
    entry = parse_line("op/attention/mla-*@bfloat16  # scores rounded", "f", 1, reason_required=True)
    assert entry.pattern == "op/attention/mla-*" and entry.dtype == "bfloat16"
    assert entry.applies("op/attention/mla-x", "bfloat16") and not entry.applies("op/attention/mla-x", "float32")
    with pytest.raises(ExpectationError, match="'@int8' is not a dtype"):
        parse_line("op/x@int8  # r", "f", 2, reason_required=True)


# -- review findings: the numbers name what failed; RoPE in half precision

def test_the_numbers_describe_the_failing_tap_not_the_passing_logits():
    from conformance.report import error_model_cells, error_model_numbers

    row = get_tolerance("model_logits", "bfloat16")
    logits, logits_error, logits_ref = _scaled((1, 3, 40), 0.05, seed=1)
    tap, tap_error, tap_ref = _scaled((1, 3, 16), 0.01, seed=2)
    result = judge(CaseResult("c", "bfloat16", Status.ERROR), {"layers.0": tap + 5 * tap_error, "logits": logits},
                   {"layers.0": tap, "logits": logits}, row, reference={"layers.0": tap_ref, "logits": logits_ref})
    numbers = error_model_numbers(result)
    assert result.status is Status.FAILED and numbers["tensor"] == "layers.0" and numbers["metric"] == "rel_rms"
    assert numbers["ratio"] == pytest.approx(5) and numbers["error"] > numbers["bound"]
    # The headline's own numbers stay available (drift compares those between runs).
    assert error_model_numbers(result, "logits")["ratio"] == pytest.approx(0)
    assert error_model_cells(result)[1] == "5.00"


def test_a_max_abs_only_failure_reports_the_max_abs_numbers():
    from conformance.report import error_model_cells, error_model_numbers

    row = get_tolerance("op_attention", "bfloat16")
    expected, error, reference = _scaled((64, 64), 0.01, seed=3)
    actual = expected + error
    actual.flat[5] = expected.flat[5] + 8 * reference.max_abs  # one element: rel RMS still within its bound
    result = judge_op(CaseResult("op/x", "bfloat16", Status.ERROR), {"output": actual}, {"output": expected}, row,
                      reference={"output": reference})
    numbers = error_model_numbers(result)
    judgement = result.judgements["output"]
    assert result.status is Status.FAILED and judgement.passed is False
    assert result.comparisons["output"].rel_rms <= judgement.bound_rel_rms
    assert numbers["metric"] == "max_abs" and numbers["error"] == result.comparisons["output"].max_abs
    assert numbers["bound"] == judgement.bound_max_abs and numbers["ratio"] == pytest.approx(8, rel=0.2)
    assert all(cell.endswith("(max abs)") for cell in error_model_cells(result))


def test_an_argmax_flip_is_recorded_in_the_logits_judgement():
    row = get_tolerance("model_logits", "float32")
    expected = np.zeros((1, 2, 8))
    expected[0, :, 3] = 1.0
    expected[0, :, 5] = 0.9
    actual = expected.copy()
    # Position 1's top-1 swapped (gap 0.1 > the margin, twice the reference's max abs 0.04), each
    # value moved 0.06, within the max abs bound (2 x 0.04 + floor): only the argmax check fails.
    actual[0, 1, 3], actual[0, 1, 5] = 0.94, 0.96
    result = judge(CaseResult("c", "float32", Status.ERROR), {"logits": actual}, {"logits": expected}, row,
                   reference={"logits": RecordedError(0.1, 0.04)})
    assert result.status is Status.FAILED
    assert result.judgements["logits"].failures == ("argmax differs at 1 confident position(s)",)


@pytest.mark.parametrize("run,computed", [("float16", ml_dtypes.bfloat16), ("bfloat16", None)])
def test_rope_at_half_precision_is_judged_against_the_reference_not_the_float32_angle(golden_dir, run, computed):
    """An engine computing RoPE in bfloat16 when asked for float16 fails the long-position cases
    (the float32-angle floor applies at float32 only); the reference's own run passes."""
    from refimpl.ops import OPS

    manifest = read_manifest(golden_dir)
    cases = [c for c in manifest.cases if c.tolerance_class == "op_rope_long"]
    assert cases
    row = get_tolerance("op_rope_long", run)
    verdicts = []
    for case in cases:
        data = load_file(str(golden_dir / case.data))
        inputs = {k[len("inputs."):]: v for k, v in data.items() if k.startswith("inputs.")}
        dtype = computed or LOW[run]
        cast = {k: (v if v.dtype.kind in "iu" else v.astype(dtype)) for k, v in inputs.items()}
        with safe_open(str(golden_dir / case.data), "np") as f:
            params = json.loads(f.metadata()["case"])["params"]
        output = np.asarray(OPS[case.op].function(**cast, **params), dtype=np.float64)
        verdicts.append(judge_tensor(compare(output, data["outputs.output"]), row, run,
                                     case.reference_error[run]["output"]).passed)
    assert verdicts == [computed is None] * len(cases)
