"""Third-party adapters make mistakes; each gets a status or a one-line error, never a traceback."""

import json

import pytest
from click.testing import CliRunner

from conformance.cli import cli

CASE = "qwen3/mha-batch3"


def run(golden_dir, tmp_path, backend, *extra):
    report = tmp_path / "r.json"
    args = ["run", "--backend", f"odd_backends:{backend}", "--golden-dir", str(golden_dir), "--case", CASE,
            "--report", str(report), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    entries = json.loads(report.read_text())["results"] if report.exists() else []
    return result, entries


@pytest.mark.parametrize("backend", ["torch_bf16_logits", "torch_logits_requiring_grad"])
def test_torch_tensors_are_accepted(golden_dir, tmp_path, backend):
    pytest.importorskip("torch")
    result, (entry,) = run(golden_dir, tmp_path, backend)
    # bfloat16 logits are 3 significant digits: far outside the float32 bound, so a failure, not a crash
    expected = "failed" if backend == "torch_bf16_logits" else "passed"
    assert entry["status"] == expected, result.output


@pytest.mark.parametrize(
    "backend,message",
    [
        ("complex_logits", "logits holds complex"),
        ("string_logits", "logits holds strings"),
        ("non_string_tap_names", "hidden state names must be strings"),
        ("supports_raises", "RuntimeError: probe crashed"),
        ("exits_in_run", "SystemExit"),
    ],
)
def test_bad_outputs_are_error_status(golden_dir, tmp_path, backend, message):
    result, (entry,) = run(golden_dir, tmp_path, backend)
    assert result.exit_code == 1
    assert entry["status"] == "error" and message in entry["message"]


def test_renamed_taps_pass_but_are_reported_uncompared(golden_dir, tmp_path):
    result, (entry,) = run(golden_dir, tmp_path, "renamed_taps")
    assert entry["status"] == "passed"
    assert "not compared" in entry["message"] and "model.layers.0" in entry["uncompared"]


def test_numpy_true_from_supports_means_supported(golden_dir, tmp_path):
    _, (entry,) = run(golden_dir, tmp_path, "supports_numpy_true")
    assert entry["status"] == "passed"


def test_failing_package_versions_is_recorded_not_fatal(golden_dir, tmp_path):
    result, (entry,) = run(golden_dir, tmp_path, "versions_raise")
    assert result.exit_code == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "no metadata" in doc["meta"]["package_versions"]["error"]


@pytest.mark.parametrize(
    "factory,message",
    [
        ("factory_raises", "factory_raises() failed (RuntimeError: cannot init CUDA)"),
        ("factory_with_type_error_inside", "factory_with_type_error_inside() failed (TypeError"),
    ],
)
def test_factory_errors_are_one_line(golden_dir, tmp_path, factory, message):
    result, _ = run(golden_dir, tmp_path, factory)
    assert result.exit_code == 2
    assert message in result.stderr and "rejected options" not in result.stderr


def test_report_path_is_checked_before_running(golden_dir, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--backend", "refimpl", "--golden-dir", str(golden_dir),
                                      "--report", str(tmp_path / "missing" / "r.json")])
    assert result.exit_code == 2
    assert "cannot write report" in result.stderr and "passed" not in result.stdout


def test_module_exiting_on_import_is_one_line(golden_dir, tmp_path, monkeypatch):
    (tmp_path / "exiting_backend.py").write_text("raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(cli, ["run", "--backend", "exiting_backend:make", "--golden-dir", str(golden_dir)])
    assert result.exit_code == 2
    assert "cannot import exiting_backend (SystemExit" in result.stderr
