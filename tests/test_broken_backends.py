"""Deliberately wrong backends fail the suite, and the report names where they diverge."""

import json

import pytest
from click.testing import CliRunner

from conformance.cli import cli


def run(golden_dir, tmp_path, backend, dtype="float32", *cases):
    """Run ``backend`` on ``cases`` (default: the Qwen3 model cases these backends break)."""
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report)]
    for case in cases or ("qwen3/*",):
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
    summaries = {c["id"]: c["config_summary"] for c in json.loads((golden_dir / "MANIFEST.json").read_text())["cases"]
                 if c["id"].startswith("qwen3/")}
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
        result, by_case = run(golden_dir, tmp_path, "refimpl", dtype, "*")
        assert result.exit_code == 0, result.output
        cases = json.loads((golden_dir / "MANIFEST.json").read_text())["cases"]
        assert len(by_case) == len(cases) and {e["status"] for e in by_case.values()} == {"passed"}


GEMMA3_MISTAKES = {
    # factory: (bug class, cases that must fail, layer where they first diverge or None to skip)
    "gemma3_all_layers_sliding": ("PAT", {"gemma3/default-pattern-6-layers"}, "layers.5"),
    "gemma3_scale_from_head_dim": ("SCL", {"gemma3/qpas-head-dim-final-softcap", "gemma3/qpas-distinct-cap-20"},
                                   "layers.0"),
    "gemma3_scale_from_hidden_per_head": ("SCL", {"gemma3/qpas-distinct-cap-20"}, "layers.0"),
    "gemma3_final_softcap_hardcoded_30": ("CAP", {"gemma3/qpas-distinct-cap-20"}, "logits"),
    "gemma3_final_softcap_dropped": ("CAP", {"gemma3/qpas-head-dim-final-softcap"}, "logits"),
    "gemma3_norm_without_offset": ("NRM", {"gemma3/near-zero-norm-offsets", "gemma3/default-pattern-6-layers"}, None),
}


@pytest.mark.parametrize("factory", sorted(GEMMA3_MISTAKES))
def test_gemma3_config_and_norm_mistakes_are_caught(golden_dir, tmp_path, factory):
    bug_class, must_fail, first = GEMMA3_MISTAKES[factory]
    result, by_case = run(golden_dir, tmp_path, f"broken_backends:{factory}", "float32", "gemma3/*")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed the Gemma 3 cases"
    failed = {c for c, e in by_case.items() if e["status"] == "failed"}
    assert must_fail <= failed, sorted(must_fail - failed)
    if first is not None:
        assert {by_case[c]["first_divergence"] for c in must_fail} == {first}


def test_smollm3_rope_on_nope_layers_is_caught(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:smollm3_rope_everywhere", "float32", "smollm3/*")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    # interval 2: layer 1 is the first NoPE layer; T = 1 (position 0) cannot tell.
    assert failed["smollm3/interval2-derived"] == "layers.1"
    assert by_case["smollm3/single-token"]["status"] == "passed"
    assert len(failed) >= 3


def test_olmo2_per_head_qk_norm_is_caught(golden_dir, tmp_path):
    result, by_case = run(golden_dir, tmp_path, "broken_backends:olmo2_qk_norm_per_head", "float32", "olmo2/*")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert set(failed.values()) == {"layers.0"}
    # one query over one key is blind to how q and k are normalised
    assert set(by_case) - set(failed) == {"olmo2/single-token-mqa"}
