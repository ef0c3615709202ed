"""The pytest plugin (``pytest --llm-backend=...``), run in a subprocess the way an
engine's own test suite would run it, on the committed corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
BROKEN = "broken_op_backends:nrm_offset_ignored"
FAILING = ("op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight", "op/rms_norm/multiply-then-cast")


@pytest.fixture
def engine_suite(pytester, golden_dir, monkeypatch):
    """An engine project with one test of its own; the tests folder on the path for the broken backends."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_engine_own="def test_engine_own():\n    assert 1 + 1 == 2\n")

    def run(*args):
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llm-golden-dir", str(golden_dir), *args)

    return run


def test_without_the_option_only_the_engines_tests_run(pytester):
    pytester.makepyfile(test_engine_own="def test_engine_own():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_cases_pass_beside_the_engines_own_tests(engine_suite):
    result = engine_suite("--llm-backend=refimpl", "--llm-case", "op/rms_norm/*", "--llm-case", "qwen3/tied*", "-v")
    result.assert_outcomes(passed=1 + 7 + 1, deselected=1)
    result.stdout.fnmatch_lines(["*test_golden_case?qwen3/tied-mqa-prime-len? PASSED*"])


def test_failures_carry_the_divergence_and_a_repro(engine_suite):
    result = engine_suite(f"--llm-backend={BROKEN}", "--llm-case", "op/rms_norm/*")
    result.assert_outcomes(passed=1 + 4, failed=3, deselected=1)
    text = result.stdout.str()
    for case in FAILING:
        assert f"--case {case}" in text
    assert "first divergence: output" in text and f"llm-conformance run --backend {BROKEN}" in text


def test_not_implemented_is_a_skip_with_the_reason(engine_suite):
    result = engine_suite("--llm-backend=torch", "--llm-case", "qwen3/tied*", "-rs")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)
    result.stdout.fnmatch_lines(["*not implemented: backend torch runs single ops only*"])


def test_xfail_file_is_strict(engine_suite, tmp_path):
    xfail = tmp_path / "engine.xfail"
    xfail.write_text("".join(f"{case}  # known offset bug\n" for case in FAILING) + "op/rms_norm/plain  # wrong\n")
    result = engine_suite(f"--llm-backend={BROKEN}", "--llm-case", "op/rms_norm/*", "--llm-xfail-file", str(xfail))
    # The three failing cases are xfailed; the listed passing case fails (strict), as in run.
    result.assert_outcomes(passed=1 + 3, xfailed=3, failed=1, deselected=1)
    assert "xpassed" in result.stdout.str()


def test_properties_profile_and_dtype(engine_suite):
    result = engine_suite("--llm-backend=refimpl", "--llm-properties", "--llm-profile", "quick", "--llm-case",
                          "op/rms_norm/plain", "-k", "rms_norm or test_engine_own")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] >= 3, outcomes
    low = engine_suite("--llm-backend=refimpl", "--llm-properties", "--llm-dtype", "bfloat16", "--llm-case",
                       "op/rms_norm/plain", "-k", "test_property", "-rs")
    low.stdout.fnmatch_lines(["*properties run in float64 or float32, not bfloat16*"])
    assert low.parseoutcomes().get("passed", 0) == 0


@pytest.mark.parametrize("args, message", [
    (("--llm-backend=nope",), "unknown backend 'nope'"),
    (("--llm-backend=refimpl", "--llm-case", "no/such/*"), "matches no case"),
    (("--llm-backend=refimpl", "--llm-option", "novalue"), "expected key=value"),
])
def test_bad_options_stop_before_any_test(engine_suite, args, message):
    result = engine_suite(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_a_builtin_backends_own_xfail_file_applies_as_in_run(engine_suite, pytester, tmp_path):
    """``run`` applies ``OWN_XFAIL_FILES[backend]`` unless ``--no-backend-xfail``; the plugin does the same
    (``--llm-no-backend-xfail``). The broken backend is given an own xfail file by a conftest of the
    engine project, imported before the plugin resolves the session."""
    own = tmp_path / "broken.xfail"
    own.write_text("".join(f"{case}  # the backend's documented deviation\n" for case in FAILING))
    pytester.makeconftest(f"from conformance.backends import OWN_XFAIL_FILES\n"
                          f"OWN_XFAIL_FILES[{BROKEN!r}] = ({str(own)!r},)\n")
    result = engine_suite(f"--llm-backend={BROKEN}", "--llm-case", "op/rms_norm/*", "-rx")
    result.assert_outcomes(passed=1 + 4, xfailed=3, deselected=1)
    result.stdout.fnmatch_lines([f"llm-conformance: applying the {BROKEN} backend's own xfail file {own}*",
                                 f"*{own.name}:1: the backend's documented deviation*"])
    without = engine_suite(f"--llm-backend={BROKEN}", "--llm-case", "op/rms_norm/*", "--llm-no-backend-xfail")
    without.assert_outcomes(passed=1 + 4, failed=3, deselected=1)
    assert "own xfail file" not in without.stdout.str()
