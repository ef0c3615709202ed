"""The file contract (``llm-conformance export`` / ``check``) on the committed corpus,
with ``examples/file_contract_engine.py`` (the reference behind the contract) as
the engine, and outputs tampered with to show every status reaches the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conformance.cli import cli

ROOT = Path(__file__).resolve().parent.parent
MODEL_CASE = "qwen3/tied-mqa-prime-len"
SELECTION = ("--case", MODEL_CASE, "--case", "op/rms_norm/*", "--case", "op/softmax_top_k/*",
             "--case", "mtp/deepseek-v3-two-depths")
MTP_CASE = "mtp/deepseek-v3-two-depths"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def engine():
    spec = importlib.util.spec_from_file_location("file_contract_engine", ROOT / "examples/file_contract_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(golden_dir, tmp_path_factory):
    """One float32 export of a model case and two op families, and the engine's outputs for it."""
    root = tmp_path_factory.mktemp("contract")
    cases, outputs = root / "cases", root / "outputs"
    result = invoke("export", cases, *SELECTION, "--golden-dir", golden_dir)
    assert result.exit_code == 0, result.output
    engine().main(str(cases), str(outputs))
    return cases, outputs


def copy_outputs(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def check(exported_dir, outputs, golden_dir, tmp_path, *extra):
    report = tmp_path / "report.json"
    result = invoke("check", "--outputs", outputs, "--exported", exported_dir, "--golden-dir", golden_dir,
                    "--report", report, *extra)
    entries = {e["case_id"]: e for e in json.loads(report.read_text())["results"]} if report.exists() else {}
    return result, entries


def test_export_layout_describes_every_case(exported):
    cases, _ = exported
    contract = json.loads((cases / "CONTRACT.json").read_text())
    assert contract["contract_version"] == 1 and contract["dtype"] == "float32"
    ids = [c["id"] for c in contract["cases"]]
    assert MODEL_CASE in ids and any(i.startswith("op/rms_norm/") for i in ids)
    model = json.loads((cases / MODEL_CASE.replace("/", "__") / "case.json").read_text())
    assert model["outputs"]["logits"]["shape"][:2] == model["inputs"]["input_ids"]["shape"]
    assert "hidden_states.layers.0" in model["optional_outputs"]
    assert (cases / MODEL_CASE.replace("/", "__") / "checkpoint" / "config.json").is_file()
    op = json.loads((cases / "op__rms_norm__plain" / "case.json").read_text())
    assert op["op"] == "rms_norm" and set(op["outputs"]) == {"output"} and "eps" in op["params"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_op_case_round_trips_through_the_example_engine(golden_dir, tmp_path, dtype):
    """Every op of the corpus and a model case, in the export dtype: scalar outputs included
    (``rope_frequencies``' 0-d ``attention_scaling``, whose shape a careless writer turns into
    ``(1,)``), and at bfloat16 the reference's own rounding (the ULP rule of RMSNorm)."""
    cases, outputs = tmp_path / "cases", tmp_path / "outputs"
    exported = invoke("export", cases, "--case", "op/*", "--case", "qwen3/single-token", "--dtype", dtype,
                      "--golden-dir", golden_dir)
    assert exported.exit_code == 0, exported.output
    engine().main(str(cases), str(outputs))
    result, entries = check(cases, outputs, golden_dir, tmp_path, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert len(entries) > 100 and {e["status"] for e in entries.values()} == {"passed"}
    assert any(e["comparisons"].get("attention_scaling") for e in entries.values())
    assert entries["qwen3/single-token"]["headline"]["ratio"] == pytest.approx(1.0, abs=0.01)


def test_engine_outputs_pass_like_run(exported, golden_dir, tmp_path):
    cases, outputs = exported
    result, entries = check(cases, outputs, golden_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert entries and all(e["status"] == "passed" for e in entries.values())
    contract = json.loads((cases / "CONTRACT.json").read_text())
    assert set(entries) == {c["id"] for c in contract["cases"]}


def test_draft_logits_are_asked_for_and_checked_depth_by_depth(exported, golden_dir, tmp_path):
    cases, outputs = exported
    info = json.loads((cases / MTP_CASE.replace("/", "__") / "case.json").read_text())
    assert info["mtp_depths"] == 2 and {"mtp_logits.1", "mtp_logits.2"} <= set(info["outputs"])
    B, T, V = info["outputs"]["logits"]["shape"]
    assert info["outputs"]["mtp_logits.2"]["shape"] == [B, T - 2, V]
    outputs = copy_outputs(outputs, tmp_path / "out")
    path = outputs / MTP_CASE.replace("/", "__") / "outputs.safetensors"
    tensors = load_file(str(path))
    del tensors["mtp_logits.2"]
    save_file(tensors, str(path))
    result, entries = check(cases, outputs, golden_dir, tmp_path, "--case", MTP_CASE)
    assert result.exit_code == 1
    assert entries[MTP_CASE]["status"] == "failed" and entries[MTP_CASE]["first_divergence"] == "mtp_logits.2"
    assert f"--exported {cases.resolve()}" in entries[MTP_CASE]["repro"]


def test_a_wrong_intermediate_fails_at_that_layer_with_a_check_repro(exported, golden_dir, tmp_path):
    cases, outputs = exported
    outputs = copy_outputs(outputs, tmp_path / "out")
    path = outputs / MODEL_CASE.replace("/", "__") / "outputs.safetensors"
    tensors = load_file(str(path))
    tensors["hidden_states.layers.1"] = tensors["hidden_states.layers.1"] * 1.01
    save_file(tensors, str(path))
    result, entries = check(cases, outputs, golden_dir, tmp_path)
    assert result.exit_code == 1
    entry = entries[MODEL_CASE]
    assert entry["status"] == "failed" and entry["first_divergence"] == "layers.1"
    assert entry["repro"].startswith("llm-conformance check --outputs ") and f"--case {MODEL_CASE}" in entry["repro"]
    assert sum(e["status"] == "failed" for e in entries.values()) == 1


def test_missing_marked_errored_and_unreadable_outputs(exported, golden_dir, tmp_path):
    cases, outputs = exported
    outputs = copy_outputs(outputs, tmp_path / "out")
    import shutil

    shutil.rmtree(outputs / "op__rms_norm__plain")
    (outputs / "op__rms_norm__per-head" / "outputs.safetensors").unlink()
    (outputs / "op__rms_norm__per-head" / "NOT_IMPLEMENTED").write_text("no per-head norm yet\n")
    (outputs / "op__rms_norm__eps-dominant" / "ERROR").write_text("kernel launch failed\n")
    (outputs / "op__rms_norm__one-plus-w" / "outputs.safetensors").write_bytes(b"not a safetensors file")
    (outputs / "op__rms_norm__no-such-case").mkdir()
    result, entries = check(cases, outputs, golden_dir, tmp_path)
    assert result.exit_code == 1
    assert entries["op/rms_norm/plain"]["status"] == "not implemented"
    assert "absent" in entries["op/rms_norm/plain"]["message"]
    assert entries["op/rms_norm/per-head"] ["status"] == "not implemented"
    assert entries["op/rms_norm/per-head"]["message"] == "no per-head norm yet"
    assert entries["op/rms_norm/eps-dominant"]["status"] == "error"
    assert "kernel launch failed" in entries["op/rms_norm/eps-dominant"]["message"]
    assert entries["op/rms_norm/one-plus-w"]["status"] == "error"
    assert f"op__rms_norm__no-such-case matches no case of the export {cases}; it is ignored" in result.output


def test_an_output_under_the_wrong_name_fails(exported, golden_dir, tmp_path):
    cases, outputs = exported
    outputs = copy_outputs(outputs, tmp_path / "out")
    path = outputs / "op__rms_norm__plain" / "outputs.safetensors"
    tensors = load_file(str(path))
    save_file({"out": tensors["output"]}, str(path))
    result, entries = check(cases, outputs, golden_dir, tmp_path, "--case", "op/rms_norm/plain")
    assert result.exit_code == 1
    assert entries["op/rms_norm/plain"]["status"] == "failed" and "output missing" in entries["op/rms_norm/plain"]["message"]


def test_bfloat16_export_stores_bfloat16_inputs(golden_dir, tmp_path):
    result = invoke("export", tmp_path / "bf16", "--case", "op/rms_norm/plain", "--dtype", "bfloat16",
                    "--golden-dir", golden_dir)
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "bf16" / "op__rms_norm__plain" / "inputs.safetensors"), framework="numpy") as f:
        x = f.get_tensor("x")
    assert x.dtype.name == "bfloat16"


def test_usage_errors_are_one_line(exported, golden_dir, tmp_path):
    cases, outputs = exported
    again = invoke("export", cases, "--golden-dir", golden_dir)
    assert again.exit_code == 2 and "not empty" in again.output
    mismatch = invoke("check", "--outputs", outputs, "--exported", cases, "--dtype", "bfloat16")
    assert mismatch.exit_code == 2 and "differs from the export's dtype float32" in mismatch.output
    no_dir = invoke("check", "--outputs", tmp_path / "nowhere", "--golden-dir", golden_dir)
    assert no_dir.exit_code == 2 and "is not a directory" in no_dir.output
    not_export = invoke("check", "--outputs", outputs, "--exported", tmp_path, "--golden-dir", golden_dir)
    assert not_export.exit_code == 2 and "CONTRACT.json" in not_export.output


def test_only_folders_of_no_exported_case_are_strays(exported, golden_dir, tmp_path):
    """The repro line ``check ... --case ID`` must not warn about the other exported cases' folders."""
    cases, outputs = exported
    outputs = copy_outputs(outputs, tmp_path / "out")
    (outputs / "op__rms_norm__typo").mkdir()
    result, entries = check(cases, outputs, golden_dir, tmp_path, "--case", "op/rms_norm/plain")
    assert result.exit_code == 0, result.output
    assert set(entries) == {"op/rms_norm/plain"}
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {outputs / 'op__rms_norm__typo'} matches no case of the export {cases}; "
                        "it is ignored"]
    # Without --exported the corpus is the reference: a folder of a corpus case is no stray either.
    unexported = invoke("check", "--outputs", outputs, "--golden-dir", golden_dir, "--case", "op/rms_norm/plain")
    assert [line for line in unexported.output.splitlines() if line.startswith("warning:")] == [
        f"warning: {outputs / 'op__rms_norm__typo'} matches no case of the corpus; it is ignored"]


def test_extra_output_tensors_are_listed_as_not_compared(exported, golden_dir, tmp_path):
    cases, outputs = exported
    outputs = copy_outputs(outputs, tmp_path / "out")
    path = outputs / MODEL_CASE.replace("/", "__") / "outputs.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "attention_probs.0": np.zeros((1, 2), np.float32)}, str(path))
    result, entries = check(cases, outputs, golden_dir, tmp_path, "--case", MODEL_CASE)
    assert result.exit_code == 0, result.output
    assert entries[MODEL_CASE]["status"] == "passed"
    assert entries[MODEL_CASE]["uncompared"] == ["attention_probs.0"]
    assert entries[MODEL_CASE]["message"] == "not compared (no golden tensor): attention_probs.0"
