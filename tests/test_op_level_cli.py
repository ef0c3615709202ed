"""The op level of the CLI: corpus faults in op cases are input errors (exit 2, one
line), a backend's gaps are "not implemented", and usage errors are one line."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conftest import ROOT


def op_copy(golden_dir, tmp_path, edit):
    """A copy of the corpus whose op case ``op/soft_cap/cap-20`` manifest entry is edited."""
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    entry = next(c for c in manifest["cases"] if c["id"] == "op/soft_cap/cap-20")
    edit(entry)
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.__setitem__("op", "flash_attention"), "unknown op 'flash_attention'"),
    (lambda e: e.__setitem__("op", "rms_norm"), "do not fit op 'rms_norm'"),
    (lambda e: e.__setitem__("tolerance_class", "model_logits"), "op case with model tolerance class"),
    (lambda e: e.pop("op"), "missing field 'op'"),
    (lambda e: e.__setitem__("level", "kernel"), "level must be one of model, op"),
])
def test_corpus_faults_in_op_cases_are_input_errors(golden_dir, tmp_path, edit, message):
    copy = op_copy(golden_dir, tmp_path, edit)
    result = CliRunner().invoke(cli, ["run", "--backend", "refimpl", "--golden-dir", str(copy), "--level", "op"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_model_case_with_op_tolerance_is_an_input_error(golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["cases"][0]["tolerance_class"] = "op_exact"
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["run", "--backend", "refimpl", "--golden-dir", str(copy), "--level", "model"])
    assert result.exit_code == 2 and "model case with op tolerance class" in result.output


class OpsRaise:
    name = "ops-raise"

    def supports(self, case, dtype):
        return True

    @property
    def ops(self):
        raise RuntimeError("ops exploded")


def test_a_backend_whose_ops_raise_is_one_error_line(golden_dir, monkeypatch):
    import conformance.backends as backends

    monkeypatch.setitem(backends.BUILTINS, "ops-raise", f"{__name__}:OpsRaise")
    # --no-isolate: the monkeypatched registry lives in this process only.
    result = CliRunner().invoke(cli, ["run", "--backend", "ops-raise", "--golden-dir", str(golden_dir), "--level", "op",
                                      "--no-isolate"])
    assert result.exit_code == 2
    assert "reading its ops failed (RuntimeError: ops exploded)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,message", [
    (["run", "--backend", "refimpl", "-o", "foo"], "expected key=value"),
    (["run", "--backend", "refimpl", "--dtype", "float8"], "'float8' is not one of"),
    (["run", "--backend", "refimpl", "--level", "bogus"], "'bogus' is not one of"),
    (["run"], "Missing option '--backend'"),
])
def test_usage_errors_are_one_line_with_status_2(args, message):
    result = subprocess.run([sys.executable, "-c", "from conformance.cli import main; main()", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
