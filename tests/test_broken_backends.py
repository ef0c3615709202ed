"""Deliberately wrong backends fail the suite, and the report names where they diverge."""

import json

import pytest
from click.testing import CliRunner

from conformance.cli import cli


def run(golden_dir, tmp_path, backend, dtype="float32", *cases):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report)]
    for case in cases:
        args += ["--case", case]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_interleaved_rope_fails_at_the_first_layer(golden_dir, tmp_path, dtype):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:interleaved_rope", dtype)
    assert result.exit_code == 1
    # With T = 1 the only position is 0, where every RoPE layout is the identity:
    # that case cannot tell the layouts apart, every other case must.
    for case_id, entry in by_case.items():
        if case_id == "qwen3/single-token":
            assert entry["status"] == "passed"
        else:
            assert entry["status"] == "failed", case_id
            assert entry["first_divergence"] == "layers.0"
    assert "layers.0: rel RMS" in result.output


def test_one_plus_w_final_norm_diverges_at_norm(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:gemma_final_norm")
    assert result.exit_code == 1
    assert {e["status"] for e in by_case.values()} == {"failed"}
    assert {e["first_divergence"] for e in by_case.values()} == {"norm"}


def test_eps_outside_the_root_is_caught_at_float64_everywhere(golden_dir, tmp_path):
    # Where mean squares are O(1) this is a 1e-6-sized effect: float64 catches it at the first layer.
    result, by_case = run(golden_dir, tmp_path, "broken_backends:eps_outside_root", "float64")
    assert result.exit_code == 1
    assert {e["first_divergence"] for e in by_case.values()} == {"layers.0"}


def test_eps_outside_the_root_is_caught_at_float32_by_the_eps_sensitive_case(golden_dir, tmp_path):
    # Mean squares near eps make the mistake large enough for float32 tolerances.
    result, by_case = run(golden_dir, tmp_path, "broken_backends:eps_outside_root", "float32")
    assert result.exit_code == 1
    assert by_case["qwen3/eps-sensitive"]["status"] == "failed"
    assert by_case["qwen3/eps-sensitive"]["first_divergence"] == "layers.0"


def test_qk_norm_over_all_heads_diverges_at_the_first_layer(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:qk_norm_over_all_heads")
    assert result.exit_code == 1
    # With T = 1 the one key gets all the weight whatever q and k are: only that case cannot see it.
    assert by_case.pop("qwen3/single-token")["status"] == "passed"
    assert {e["first_divergence"] for e in by_case.values()} == {"layers.0"}


def test_gqa_head_mapping_h_mod_hkv_is_caught(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:gqa_modulo")
    assert result.exit_code == 1
    # The mapping only differs with 1 < Hkv < H (not for MQA or MHA).
    summaries = {c["id"]: c["config_summary"] for c in json.loads((golden_dir / "MANIFEST.json").read_text())["cases"]}
    grouped = {c for c, s in summaries.items() if 1 < s["num_key_value_heads"] < s["num_attention_heads"]}
    assert len(grouped) >= 3
    assert {c for c, e in by_case.items() if e["status"] == "failed"} == grouped
    assert {by_case[c]["first_divergence"] for c in grouped} == {"layers.0"}


def test_sliding_window_one_key_too_wide_fails_at_the_first_sliding_layer(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:sliding_window_plus_one")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    # layer 0 is full attention (max_window_layers = 1); layer 1 is the first sliding layer
    assert failed == {"qwen3/sliding-window": "layers.1"}


def test_window_applied_without_use_sliding_window_is_caught(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:window_without_flag")
    assert result.exit_code == 1
    assert {c for c, e in by_case.items() if e["status"] == "failed"} == {"qwen3/window-flag-off"}
    assert by_case["qwen3/window-flag-off"]["first_divergence"] == "layers.0"


def test_correct_backends_pass_the_corpus(golden_dir, tmp_path):
    for dtype in ("float32", "float64"):
        result, by_case = run(golden_dir, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert len(by_case) == 10 and {e["status"] for e in by_case.values()} == {"passed"}
