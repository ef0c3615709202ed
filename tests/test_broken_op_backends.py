"""Each deliberately wrong op backend (tests/broken_op_backends.py) fails the op suite,
on the cases built to catch its bug class, at float32 and float64."""

import json

import pytest
from click.testing import CliRunner

from conformance.cli import cli

#: factory -> (bug class, op cases that must fail)
EXPECTED = {
    "swa_window_plus_one": ("SWA", {"op/attention/window-probe", "op/attention/window-after-cache",
                                    "op/attention/window-1", "op/attention/window-random", "op/attention/sinks-window"}),
    "swa_window_plus_one_at_decode": ("SWA", {"op/attention/window-decode-probe", "op/attention/window-decode-gqa"}),
    "swa_ignored": ("SWA/PAT", {"op/attention/window-probe", "op/attention/window-after-cache",
                                "op/attention/window-1", "op/attention/sinks-window"}),
    "sink_ignored": ("SINK", {"op/attention/sinks-probe", "op/attention/sinks-window", "op/attention/sinks-causal"}),
    "sink_by_row": ("SINK", {"op/attention/sinks-probe", "op/attention/sinks-window", "op/attention/sinks-causal"}),
    "softcap_ignored": ("CAP", {"op/attention/softcap"}),
    "final_softcap_hardcoded": ("CAP", {"op/soft_cap/cap-20"}),
    "scale_from_head_dim": ("SCL", {"op/attention/scale-not-head-dim"}),
    "rope_interleaved_for_rotate_half": ("ROPE", {"op/rope/rotate-half", "op/rope/partial-odd-pairs",
                                                  "op/rope/cache-offsets", "op/rope/yarn-long"}),
    "rope_full_width": ("ROPE", {"op/rope/partial-odd-pairs", "op/rope/partial-interleaved"}),
    "rsc_scaling_ignored": ("RSC", {"op/rope/linear-global", "op/rope/llama3-long", "op/rope/llama3-factor32",
                                    "op/rope/yarn-long", "op/rope/yarn-mscale", "op/rope/yarn-gpt-oss",
                                    "op/rope_frequencies/llama3", "op/rope_frequencies/yarn-partial",
                                    "op/rope_frequencies/linear"}),
    "rsc_llama3_factor_8": ("RSC", {"op/rope/llama3-factor32"}),
    "rsc_yarn_ramp_clipped_at_half": ("RSC", {"op/rope_frequencies/yarn-wide-ramp"}),
    "rsc_yarn_magnitude_ignored": ("RSC", {"op/rope/yarn-long", "op/rope/yarn-mscale", "op/rope/yarn-gpt-oss"}),
    "nrm_offset_ignored": ("NRM", {"op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight"}),
    "nrm_offset_twice": ("NRM", {"op/rms_norm/one-plus-w", "op/rms_norm/zero-offset-weight"}),
    "nrm_gelu_erf": ("NRM", {"op/gated_mlp/geglu-tanh"}),
    "nrm_embed_scale_ignored": ("NRM", {"op/embedding/gemma-scale"}),
    "qkn_norm_over_all_heads": ("QKN", {"op/rms_norm/per-head"}),
    "swiglu_gate_up_swapped": ("MLP", {"op/gated_mlp/swiglu", "op/gated_mlp/geglu-tanh"}),
    "mla05_value_rows_stepped_by_key_width": ("MLA-05", {"op/attention/mla-absorbed-decode-shape"}),
}


def run_ops(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / f"{dtype}.json"
    result = CliRunner().invoke(cli, ["run", "--backend", backend, "--dtype", dtype, "--level", "op",
                                      "--golden-dir", str(golden_dir), "--report", str(report)])
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("factory", sorted(EXPECTED))
def test_broken_op_backend_fails_its_cases(golden_dir, tmp_path, factory, dtype):
    bug_class, must_fail = EXPECTED[factory]
    result, by_case = run_ops(golden_dir, tmp_path, f"broken_op_backends:{factory}", dtype)
    assert result.exit_code == 1, f"{bug_class} mistake {factory} passed the op suite:\n{result.output}"
    failed = {case for case, entry in by_case.items() if entry["status"] == "failed"}
    assert must_fail <= failed, f"{factory}: expected failures missing: {sorted(must_fail - failed)}"
    # Only the op it breaks may fail: every other op's cases still pass.
    broken_ops = {case.split("/")[1] for case in must_fail}
    assert {case.split("/")[1] for case in failed} <= broken_ops


def test_reference_ops_pass_every_op_case(golden_dir, tmp_path):
    for dtype in ("float32", "float64"):
        result, by_case = run_ops(golden_dir, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert by_case and {e["status"] for e in by_case.values()} == {"passed"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_swapped_rms_norm_cast_order_fails_in_low_precision(golden_dir, tmp_path, dtype):
    # At float32/float64 the two cast orders are the same computation; in bfloat16 and
    # float16 they differ by one unit in the last place on a quarter of the elements.
    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["run", "--backend", "broken_op_backends:nrm_cast_order_swapped", "--dtype",
                                      dtype, "--op", "rms_norm", "--golden-dir", str(golden_dir), "--report", str(report)])
    assert result.exit_code == 1, result.output
    by_case = {r["case_id"]: r for r in json.loads(report.read_text())["results"]}
    for case in ("op/rms_norm/cast-then-multiply", "op/rms_norm/multiply-then-cast"):
        assert by_case[case]["status"] == "failed"
        assert by_case[case]["rounding"]["output"] > 0.2
    assert "rounding" in result.output
    for dt in ("float32", "float64"):
        ok = CliRunner().invoke(cli, ["run", "--backend", "broken_op_backends:nrm_cast_order_swapped", "--dtype", dt,
                                      "--op", "rms_norm", "--golden-dir", str(golden_dir)])
        assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_unrounded_embedding_scale_fails_in_low_precision(golden_dir, tmp_path, dtype):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["run", "--backend", "broken_op_backends:nrm_embed_scale_unrounded", "--dtype",
                                      dtype, "--op", "embedding", "--golden-dir", str(golden_dir), "--report", str(report)])
    assert result.exit_code == 1, result.output
    entry = json.loads(report.read_text())["results"][0]
    assert entry["status"] == "failed" and entry["rounding"]["output"] > 0.05
