"""Acceptance: the transformers backend passes every golden case at float32 and float64."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import ROOT  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cli_transformers_passes_golden_corpus(tmp_path, dtype):
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "conformance", "run", "--backend", "transformers", "--dtype", dtype,
           "--report", str(report)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(report.read_text())
    assert [r["status"] for r in doc["results"]] == ["passed"] * 10
    assert doc["meta"]["package_versions"]["transformers"] == "5.24.0"
    assert "10 passed, 0 failed, 0 not implemented" in result.stdout


def test_float64_as_shipped_fails_the_float64_bound(tmp_path):
    # transformers' float32 islands (norms, RoPE, softmax) cost ~1e-7: a precision
    # policy, not a math error, but above the float64 bound, as documented.
    cmd = [sys.executable, "-m", "conformance", "run", "--backend", "transformers", "--dtype", "float64",
           "-o", "float32_islands=keep", "--case", "qwen3/mha-batch3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "0 passed, 1 failed" in result.stdout
