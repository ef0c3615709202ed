"""Tests of the conformance CLI, manifest checks, comparison helper and backends.

The golden fixture is built here, without torch: a tiny random Qwen3 checkpoint
(odd sizes, GQA with 2 query heads per KV head) written with NumPy, and expected
outputs from the float64 reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import refimpl
from conformance.backends import resolve_backend
from conformance.backends.base import BackendOutput
from conformance.cli import cli
from conformance.compare import argmax_agreement, compare
from conformance.errors import BackendError
from conformance.manifest import load_manifest
from refimpl.models.qwen3 import Qwen3Config, weight_shapes

CASE_ID = "qwen3/tiny-gqa"
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 97, "hidden_size": 24,
    "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 6, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "max_position_embeddings": 64,
}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_checkpoint(directory, rng) -> None:
    """config.json and float32 random weights (norm weights near 1) for CONFIG."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    weights = {}
    for name, shape in weight_shapes(Qwen3Config.from_dict(CONFIG)).items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        weights[name] = (base + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A golden directory with one Qwen3 case; tests must not modify it (copy it first)."""
    root = tmp_path_factory.mktemp("golden")
    rng = np.random.default_rng(3)
    checkpoint = root / CASE_ID / "checkpoint"
    _write_checkpoint(checkpoint, rng)
    input_ids = rng.integers(0, CONFIG["vocab_size"], size=(2, 7), dtype=np.int64)
    out = refimpl.from_pretrained(checkpoint, dtype=np.float64).forward(input_ids, return_hidden_states=True)
    data = {"input_ids": input_ids, "logits": out.logits}
    data.update({f"hidden_states.{k}": v for k, v in out.hidden_states.items()})
    save_file(data, str(root / CASE_ID / "io.safetensors"))
    files = [checkpoint / "config.json", checkpoint / "model.safetensors", root / CASE_ID / "io.safetensors"]
    case = {
        "id": CASE_ID, "level": "model", "architecture": "Qwen3ForCausalLM", "description": "tiny GQA test model",
        "seed": 3, "tolerance_class": "model_logits", "config_summary": {"layers": 3},
        "checkpoint": f"{CASE_ID}/checkpoint", "data": f"{CASE_ID}/io.safetensors",
        "files": {str(f.relative_to(root)): _sha256(f) for f in files},
    }
    manifest = {"corpus_version": "0.0.test", "generator": "tests", "generator_version": 1, "cases": [case]}
    (root / "MANIFEST.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def golden_copy(golden, tmp_path):
    return shutil.copytree(golden, tmp_path / "golden")


def invoke(*args, env=None):
    # Wide enough that rich tables do not fold the cells the tests look for.
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "300", **(env or {})})


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def _edit_manifest(root, edit) -> None:
    manifest = json.loads((root / "MANIFEST.json").read_text())
    edit(manifest["cases"][0])
    (root / "MANIFEST.json").write_text(json.dumps(manifest))


def test_list_prints_cases(golden):
    result = invoke("list", "--golden-dir", str(golden))
    assert result.exit_code == 0, result.output
    for text in (CASE_ID, "Qwen3ForCausalLM", "model_logits", "tiny GQA test model"):
        assert text in result.stdout


def test_list_uses_golden_env_var(golden):
    result = invoke("list", env={"LLM_CONFORMANCE_GOLDEN": str(golden)})
    assert result.exit_code == 0 and CASE_ID in result.stdout


def test_list_filters_by_level_and_case(golden_dir):
    result = CliRunner().invoke(cli, ["list", "--golden-dir", str(golden_dir), "--level", "scenario",
                                      "--case", "scenario/classes/kv-0*", "--case", "qwen3/*"])
    assert result.exit_code == 0, result.output
    ids = {c.id for c in load_manifest(golden_dir)}
    shown = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")} - {""}
    expected = {i for i in ids if i.startswith("scenario/classes/kv-0")}
    assert shown == expected and expected                    # qwen3/* model cases are not scenarios
    assert f", {len(expected)} of {len(ids)} cases)" in result.stdout
    none = CliRunner().invoke(cli, ["list", "--golden-dir", str(golden_dir), "--level", "op", "--case", "qwen3/*"])
    assert none.exit_code == 2 and "no case is selected" in none.output


def test_case_ids_never_wrap_in_logs():
    """Not on a terminal (CI logs), a long id stays whole on its row however long the note is."""
    import io

    from rich.console import Console

    from conformance.report import print_report
    from conformance.runner import CaseResult, Status

    case_id = "scenario/classes/kv-01-continuation-positions-behind-a-long-prompt"
    note = "steps.5 (decode 1 after 15 tokens): rel RMS 0.0382 > 2e-05; max abs 0.342 > 0.0007; " * 3
    results = [CaseResult(case_id=case_id, dtype="float32", status=Status.FAILED, message=note)]
    meta = {"backend": "x", "backend_spec": "x", "dtype": "float32", "corpus_version": "1", "golden_dir": "/g"}
    out = io.StringIO()
    print_report(results, meta, Console(file=out, width=160))
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip() == case_id
    assert all(line.split("│")[1].strip() == "" for line in rows[1:])   # the note wraps, the id does not
    # On a terminal the id column folds as before (the table fits the terminal's width).
    out = io.StringIO()
    print_report(results, meta, Console(file=out, width=80, force_terminal=True, color_system=None))
    assert max(len(line) for line in out.getvalue().splitlines() if line.startswith("│")) <= 80


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_run_refimpl_passes_and_writes_report(golden, tmp_path, dtype):
    report = tmp_path / "report.json"
    result = invoke("run", "--backend", "refimpl", "--dtype", dtype, "--golden-dir", str(golden),
                    "--case", "qwen3/*", "--report", str(report))
    assert result.exit_code == 0, result.output
    assert "1 passed, 0 failed, 0 not implemented" in result.stdout
    document = json.loads(report.read_text())
    assert document["meta"]["corpus_version"] == "0.0.test" and document["meta"]["dtype"] == dtype
    assert "numpy" in document["meta"]["package_versions"]
    (entry,) = document["results"]
    assert entry["status"] == "passed"
    assert list(entry["comparisons"]) == ["embed", "layers.0", "layers.1", "layers.2", "norm", "logits"]
    assert entry["argmax"]["fraction"] == 1.0


def make_float64_only_backend():
    """The reference, refusing every dtype but float64 (what ``supports`` strings do)."""
    backend = resolve_backend("refimpl", {})
    backend.supports = lambda case, dtype: True if dtype == "float64" else "float64 only"
    return backend


def test_run_unsupported_dtype_is_not_implemented(golden):
    result = invoke("run", "--backend", "test_conformance_cli:make_float64_only_backend", "--dtype", "bfloat16",
                    "--golden-dir", str(golden))
    # nothing could be checked: not a success
    assert result.exit_code == 1, result.output
    assert "0 passed, 0 failed, 1 not implemented" in result.stdout
    assert "no case was checked" in result.stderr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_refimpl_runs_in_low_precision_within_the_bounds(golden, dtype):
    result = invoke("run", "--backend", "refimpl", "--dtype", dtype, "--golden-dir", str(golden))
    assert result.exit_code == 0, result.output
    assert "1 passed, 0 failed" in result.stdout


class PerturbingBackend:
    """Reference backend that adds ``delta`` to one tap and everything after it, or raises."""

    name = "perturbing"

    def __init__(self, tap="layers.1", delta="1e-3", fail=""):
        self.tap, self.delta, self.fail = tap, float(delta), fail

    def supports(self, case, dtype):
        return True

    def load_model(self, checkpoint_dir, dtype):
        if self.fail:
            raise RuntimeError(f"{self.fail}\nsecond line")
        return self

    def run(self, input_ids):
        out = refimpl.from_pretrained(self.checkpoint_dir, dtype=np.float64).forward(input_ids, True)
        hidden, hit = {}, False
        for name, value in out.hidden_states.items():
            hit = hit or name == self.tap
            hidden[name] = value + self.delta if hit else value
        return BackendOutput(logits=out.logits + self.delta, hidden_states=hidden)


def make_perturbing_backend(**options):
    backend = PerturbingBackend(**options)
    backend.load_model = lambda checkpoint_dir, dtype, inner=backend.load_model: (
        setattr(backend, "checkpoint_dir", checkpoint_dir) or inner(checkpoint_dir, dtype)
    )
    return backend


def test_run_reports_first_divergence_and_exits_1(golden, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    report = tmp_path / "r.json"
    result = invoke("run", "--backend", "test_conformance_cli:make_perturbing_backend", "-o", "tap=layers.1",
                    "--dtype", "float64", "--golden-dir", str(golden), "--report", str(report))
    assert result.exit_code == 1, result.output
    assert "0 passed, 1 failed" in result.stdout and "repro: llm-conformance run" in result.stdout
    (entry,) = json.loads(report.read_text())["results"]
    assert entry["status"] == "failed" and entry["first_divergence"] == "layers.1"
    assert entry["comparisons"]["layers.0"]["rel_rms"] == 0.0


def test_backend_exception_is_error_status_and_run_continues(golden, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    result = invoke("run", "--backend", "test_conformance_cli:make_perturbing_backend", "-o", "fail=boom",
                    "--golden-dir", str(golden))
    assert result.exit_code == 1, result.output
    assert "RuntimeError: boom second line" in result.stdout and "1 error" in result.stdout


def test_missing_manifest(tmp_path):
    assert_one_line_error(invoke("list", "--golden-dir", str(tmp_path)), "manifest not found")


def test_invalid_json_manifest(tmp_path):
    (tmp_path / "MANIFEST.json").write_text("{not json")
    assert_one_line_error(invoke("run", "--backend", "refimpl", "--golden-dir", str(tmp_path)), "invalid JSON")


def test_unreadable_manifest(tmp_path):
    # A directory where the file should be cannot be read, whoever runs the test.
    (tmp_path / "MANIFEST.json").mkdir()
    assert_one_line_error(invoke("list", "--golden-dir", str(tmp_path)), "cannot read manifest")


def test_manifest_missing_field(golden_copy):
    _edit_manifest(golden_copy, lambda case: case.pop("tolerance_class"))
    assert_one_line_error(invoke("list", "--golden-dir", str(golden_copy)), "missing field 'tolerance_class'")


@pytest.mark.parametrize("path", ["../outside/io.safetensors", "/etc/passwd"])
def test_manifest_path_outside_golden_dir(golden_copy, path):
    _edit_manifest(golden_copy, lambda case: case.update(data=path))
    assert_one_line_error(invoke("list", "--golden-dir", str(golden_copy)), path)


def test_hash_mismatch(golden_copy):
    data = golden_copy / CASE_ID / "io.safetensors"
    content = bytearray(data.read_bytes())
    content[-1] ^= 0x01
    data.write_bytes(bytes(content))
    result = invoke("run", "--backend", "refimpl", "--golden-dir", str(golden_copy))
    assert_one_line_error(result, f"{CASE_ID}/io.safetensors", _sha256(data))


def test_missing_listed_file(golden_copy):
    (golden_copy / CASE_ID / "checkpoint" / "config.json").unlink()
    result = invoke("run", "--backend", "refimpl", "--golden-dir", str(golden_copy))
    assert_one_line_error(result, "checkpoint/config.json", "missing")


def test_unlisted_checkpoint_file(golden_copy):
    # A checkpoint file without a recorded hash could be altered unnoticed.
    _edit_manifest(golden_copy, lambda case: case["files"].pop(f"{CASE_ID}/checkpoint/model.safetensors"))
    result = invoke("run", "--backend", "refimpl", "--golden-dir", str(golden_copy))
    assert_one_line_error(result, "checkpoint/model.safetensors", "is not listed")


def test_manifest_without_cases(golden_copy):
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["cases"] = []
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    assert_one_line_error(invoke("run", "--backend", "refimpl", "--golden-dir", str(golden_copy)), "lists no cases")


def test_unknown_tolerance_class_names_the_case(golden_copy):
    _edit_manifest(golden_copy, lambda case: case.update(tolerance_class="bogus"))
    result = invoke("run", "--backend", "refimpl", "--golden-dir", str(golden_copy))
    assert_one_line_error(result, f"case {CASE_ID}", "no tolerance for class 'bogus'")


def test_unknown_backend_lists_builtins(golden):
    result = invoke("run", "--backend", "nosuch", "--golden-dir", str(golden))
    assert_one_line_error(result, "unknown backend 'nosuch'", "refimpl", "transformers")


def test_failing_import_path(golden):
    result = invoke("run", "--backend", "nosuch.module:factory", "--golden-dir", str(golden))
    assert_one_line_error(result, "cannot import nosuch.module")


def test_missing_factory_attribute(golden):
    result = invoke("run", "--backend", "conformance.compare:nosuch", "--golden-dir", str(golden))
    assert_one_line_error(result, "no callable 'nosuch'")


def test_transformers_backend_without_torch_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes `import torch` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendError, match=r"pip install torch==2\.13\.0"):
        resolve_backend("transformers", {})


def test_option_without_equals_is_usage_error(golden):
    result = invoke("run", "--backend", "refimpl", "-o", "novalue", "--golden-dir", str(golden))
    assert result.exit_code == 2 and "expected key=value" in result.output


def test_unknown_case_glob(golden):
    result = invoke("run", "--backend", "refimpl", "--golden-dir", str(golden), "--case", "llama/*")
    assert_one_line_error(result, "matches no case", CASE_ID.rsplit("/", 1)[0] + "/*", "llm-conformance list")


REPO_GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.skipif(not (REPO_GOLDEN / "MANIFEST.json").is_file(), reason="no golden corpus in the checkout")
def test_repository_corpus_passes_with_refimpl():
    result = invoke("run", "--backend", "refimpl", "--dtype", "float64", "--golden-dir", str(REPO_GOLDEN))
    assert result.exit_code == 0, result.output
    assert " 0 failed, 0 not implemented" in result.stdout


def test_load_manifest_reads_cases(golden):
    (case,) = load_manifest(golden)
    assert case.id == CASE_ID and case.seed == 3 and len(case.files) == 3


def test_compare_hand_computed():
    expected = np.array([[3.0, 4.0], [0.0, 0.0]])
    actual = np.array([[3.0, 4.5], [0.0, -2.0]])
    result = compare(actual, expected)
    # diff = [[0, 0.5], [0, 2]]: ||diff|| = sqrt(0.25 + 4) = sqrt(4.25); ||expected|| = 5.
    assert result.max_abs == 2.0 and result.max_abs_index == (1, 1)
    assert result.rel_rms == pytest.approx(math.sqrt(4.25) / 5, rel=1e-15)
    assert result.max_abs_expected == 4.0 and result.nonfinite == 0 and not result.shape_mismatch


def test_compare_counts_nan_and_inf_separately():
    expected = np.array([1.0, 2.0, 2.0, np.inf, np.nan])
    actual = np.array([1.0, np.nan, 2.5, np.inf, np.nan])
    result = compare(actual, expected)
    # Only index 1 (NaN where 2.0 was expected) is unmatched; errors use indices 0 and 2.
    assert result.nonfinite == 1
    assert result.max_abs == 0.5 and result.max_abs_index == (2,)
    assert result.rel_rms == pytest.approx(0.5 / math.sqrt(1 + 4), rel=1e-15)


def test_compare_shape_mismatch_is_reported():
    result = compare(np.zeros((2, 3)), np.ones((2, 4)))
    assert result.shape_mismatch and result.actual_shape == (2, 3) and result.expected_shape == (2, 4)
    assert math.isinf(result.rel_rms) and result.max_abs_index is None


def test_argmax_agreement_hand_computed():
    expected = np.array([[0.0, 1.0, 5.0], [2.0, 1.9, 0.0]])
    # Position 0 (gap 4) agrees; position 1 (gap 0.1) flips its argmax.
    actual = np.array([[0.0, 1.0, 4.0], [1.9, 2.0, 0.0]])
    loose = argmax_agreement(actual, expected, margin=0.5)
    assert loose.fraction == 0.5 and loose.confident == 1 and loose.confident_agree
    strict = argmax_agreement(actual, expected, margin=0.05)
    assert strict.confident == 2 and not strict.confident_agree


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_transformers_backend_passes(golden, dtype):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = invoke("run", "--backend", "transformers", "--dtype", dtype, "--golden-dir", str(golden))
    assert result.exit_code == 0, result.output
    assert "1 passed" in result.stdout


def test_a_golden_folder_in_the_working_directory_shadowing_the_packaged_corpus_is_named(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from conformance.manifest import shadowing_note

    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "MANIFEST.json").write_text(json.dumps({"corpus_version": "0.0.7"}))
    monkeypatch.chdir(tmp_path)
    note = shadowing_note(Path("golden"))
    assert note is not None and "corpus 0.0.7" in note and "--golden-dir" in note
    # An explicit folder, or the packaged corpus itself, is not a shadow.
    assert shadowing_note(tmp_path / "golden") is None
    assert shadowing_note(Path(__file__).resolve().parents[1] / "golden") is None
