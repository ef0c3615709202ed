"""``llm-conformance run --repro-dir DIR``: a bundle (inputs, expected outputs,
case.json) per failed or errored case, on the committed corpus.

``broken_op_backends:nrm_offset_ignored`` fails exactly three RMSNorm op cases.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from conformance.cli import cli
from conformance.manifest import read_manifest, load_op_data
from conformance.runner import cast_input

BROKEN = "broken_op_backends:nrm_offset_ignored"
FAILING = {"op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight", "op/rms_norm/multiply-then-cast"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundles_for_exactly_the_failing_cases(golden_dir, tmp_path, dtype):
    out, report = tmp_path / "new" / "repro", tmp_path / "report.json"
    result = invoke("run", "--backend", BROKEN, "--op", "rms_norm", "--dtype", dtype, "--golden-dir", golden_dir,
                    "--repro-dir", out, "--report", report)
    assert result.exit_code == 1, result.output
    entries = json.loads(report.read_text())["results"]
    failing = {e["case_id"] for e in entries if e["status"] in ("failed", "error")}
    assert failing and len(failing) < len(entries)
    if dtype == "float32":
        assert failing == FAILING
    assert {p.name for p in out.iterdir()} == {c.replace("/", "__") for c in failing}
    cases = {c.id: c for c in read_manifest(golden_dir).cases}
    for entry in entries:
        if entry["case_id"] not in failing:
            continue
        folder = out / entry["case_id"].replace("/", "__")
        assert {p.name for p in folder.iterdir()} == {"inputs.safetensors", "expected.safetensors", "case.json"}
        info = json.loads((folder / "case.json").read_text())
        assert info["repro"] == entry["repro"]
        assert (info["case_id"], info["level"], info["op"], info["dtype"]) == (entry["case_id"], "op", "rms_norm", dtype)
        assert info["backend_spec"] == BROKEN and info["message"] == entry["message"]
        assert info["first_divergence"] == entry["first_divergence"]
        assert info["tolerance_class"] == cases[entry["case_id"]].tolerance_class
        data = load_op_data(golden_dir, cases[entry["case_id"]])
        assert info["params"] == data.params
        inputs = load_file(str(folder / "inputs.safetensors"))
        assert set(inputs) == set(data.inputs)
        for name, array in data.inputs.items():
            cast = cast_input(array, dtype)
            assert info["input_dtypes"][name] == cast.dtype.name
            assert inputs[name].dtype == (np.float32 if dtype == "bfloat16" else cast.dtype)
            np.testing.assert_array_equal(inputs[name], cast.astype(inputs[name].dtype))
        expected = load_file(str(folder / "expected.safetensors"))
        golden = {k: v for k, v in data.expected.items() if "@" not in k or k.endswith(f"@{dtype}")}
        assert set(expected) == set(golden)
        for name, array in golden.items():
            assert expected[name].dtype == np.float64
            np.testing.assert_array_equal(expected[name], array)


def test_no_bundle_when_all_pass(golden_dir, tmp_path):
    result = invoke("run", "--backend", "refimpl", "--op", "rms_norm", "--golden-dir", golden_dir,
                    "--repro-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "r").iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_repro_dir_is_an_error_before_the_run(golden_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke("run", "--backend", BROKEN, "--op", "rms_norm", "--golden-dir", golden_dir,
                        "--repro-dir", locked / "sub")
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot create --repro-dir") and result.stderr.count("\n") == 1
    assert "passed" not in result.stdout


def test_a_file_as_repro_dir_is_an_error(golden_dir, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    result = invoke("run", "--backend", BROKEN, "--op", "rms_norm", "--golden-dir", golden_dir, "--repro-dir", file)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot create --repro-dir") and result.stderr.count("\n") == 1


def test_model_case_bundle_references_the_checkpoint(golden_dir, tmp_path):
    from conformance.manifest import load_case_data
    from conformance.repro import write_repro_bundles
    from conformance.runner import CaseResult, Status

    case = next(c for c in read_manifest(golden_dir).cases if c.level == "model")
    meta = {"backend": "x", "backend_spec": "mod:factory", "backend_options": {"device": "cpu"}, "dtype": "float32",
            "golden_dir": str(golden_dir.resolve())}
    failed = CaseResult(case_id=case.id, dtype="float32", status=Status.ERROR, message="RuntimeError: boom")
    assert write_repro_bundles(tmp_path, [case], [failed], golden_dir, meta) == 1
    folder = tmp_path / case.id.replace("/", "__")
    info = json.loads((folder / "case.json").read_text())
    assert (folder / info["checkpoint"]).resolve() == (golden_dir / case.checkpoint).resolve()
    assert "-o device=cpu" in info["repro"] and info["message"] == "RuntimeError: boom"
    input_ids, logits, hidden = load_case_data(golden_dir, case)
    np.testing.assert_array_equal(load_file(str(folder / "inputs.safetensors"))["input_ids"], input_ids)
    expected = load_file(str(folder / "expected.safetensors"))
    np.testing.assert_array_equal(expected["logits"], logits)
    assert set(expected) == {"logits", *(f"hidden_states.{k}" for k in hidden)}
