"""Each deliberately wrong MoE / MLA op backend (tests/broken_moe_op_backends.py) fails the
cases built to catch its bug class, at float32 and float64, and nothing else."""

import json

import pytest
from click.testing import CliRunner

from conformance.cli import cli
from test_moe_op_level import moe_golden_dir  # noqa: F401  (session fixture: the moe_ops corpus)

#: factory -> (bug class, op cases that must fail)
EXPECTED = {
    "moe01_bias_in_weights": ("MOE-01", {"op/sigmoid_group_top_k/moe01-probe", "op/sigmoid_bias_top_k/moe01-probe",
                                         "op/sigmoid_group_top_k/deepseek-groups",
                                         "op/sigmoid_bias_top_k/top3-of-8"}),
    "moe02_group_mask_zero_fill": ("MOE-02/03", {"op/sigmoid_group_top_k/negative-bias-group-fill"}),
    "moe04_raw_logits_without_renorm": ("MOE-04", {"op/softmax_top_k/moe04-probe", "op/softmax_top_k/top-1",
                                                   "op/softmax_top_k/top-k-equals-e"}),
    "moe05_scale_only_when_renormalised": ("MOE-05", {"op/sigmoid_group_top_k/moe05-no-norm-scaled"}),
    "moe08_scale_applied_twice": ("MOE-08", {"op/sigmoid_group_top_k/deepseek-groups",
                                             "op/sigmoid_group_top_k/moe05-no-norm-scaled",
                                             "op/sigmoid_group_top_k/kimi-one-group"}),
    "group_limit_ignored": ("group limit", {"op/sigmoid_group_top_k/group-limit-excludes-best",
                                            "op/sigmoid_group_top_k/deepseek-groups",
                                            "op/sigmoid_group_top_k/negative-bias-group-fill"}),
    "act02_clamp_ignored": ("ACT-02", {"op/clamped_swiglu_expert/act02-probe",
                                       "op/clamped_swiglu_expert/gpt-oss-random"}),
    "act05_clamp_after_activation": ("ACT-05", {"op/clamped_swiglu_expert/act05-probe"}),
    "act04_wrong_gate_up_layout": ("ACT-04", {"op/swiglu_expert/concatenated-i2",
                                              "op/input_major_swiglu_expert/llama4-layout",
                                              "op/clamped_swiglu_expert/gpt-oss-random"}),
    "act07_weight_on_output": ("ACT-07", {"op/moe_dispatch/weight-on-input", "op/moe_dispatch/top1-on-input",
                                          "op/moe_block/llama4"}),
    "mla02_mscale_ignored": ("MLA-02", {"op/mla/literal-yarn", "op/mla/absorbed-yarn",
                                        "op/mla/absorbed-kimi-offsets"}),
    "mla03_mscale_not_all_dim": ("MLA-03", {"op/mla/literal-mscale-differs", "op/mla/absorbed-mscale-differs"}),
    "mla_absorbed_scale_from_latent_width": ("absorbed MLA", {"op/mla/absorbed-yarn", "op/mla/absorbed-no-q-lora",
                                                             "op/mla/absorbed-kimi-offsets",
                                                             "op/mla/absorbed-widths-distinct",
                                                             "op/mla/absorbed-yarn-no-mscale-keys"}),
    "mla_scale_from_rope_head_dim": ("MLA scale width", {"op/mla/literal-widths-distinct",
                                                         "op/mla/absorbed-widths-distinct"}),
    "mla_mscale_all_dim_defaults_to_one": ("MLA-02", {"op/mla/literal-yarn-no-mscale-keys",
                                                      "op/mla/absorbed-yarn-no-mscale-keys"}),
    "expert_down_orientation_from_shape": ("expert orientation", {"op/swiglu_expert/square-down",
                                                                  "op/input_major_swiglu_expert/square-down",
                                                                  "op/clamped_swiglu_expert/square-down"}),
}
#: cases a broken backend must still pass although they use the op it breaks (the mistake is invisible there)
MUST_PASS = {
    "moe08_scale_applied_twice": {"op/sigmoid_group_top_k/moe01-probe"},  # routed_scaling_factor 1
    # mscale == mscale_all_dim, or neither key
    "mla03_mscale_not_all_dim": {"op/mla/literal-yarn", "op/mla/literal-yarn-no-mscale-keys"},
    # no softmax correction without mscale_all_dim
    "mla02_mscale_ignored": {"op/mla/literal-yarn-no-mscale-keys", "op/mla/absorbed-yarn-no-mscale-keys"},
    # Dn == Dr everywhere else
    "mla_scale_from_rope_head_dim": {"op/mla/literal-yarn", "op/mla/absorbed-yarn", "op/mla/literal-no-q-lora"},
    # mscale_all_dim present
    "mla_mscale_all_dim_defaults_to_one": {"op/mla/literal-yarn", "op/mla/literal-mscale-differs"},
    # non-square experts
    "expert_down_orientation_from_shape": {"op/swiglu_expert/odd-sizes", "op/swiglu_expert/one-row",
                                           "op/clamped_swiglu_expert/gpt-oss-random"},
    "mla_absorbed_scale_from_latent_width": {"op/mla/literal-yarn", "op/mla/literal-no-q-lora"},
    "act07_weight_on_output": {"op/moe_dispatch/weight-on-output"},
}


def run_ops(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / f"{dtype}.json"
    result = CliRunner().invoke(cli, ["run", "--backend", backend, "--dtype", dtype, "--level", "op",
                                      "--golden-dir", str(golden_dir), "--report", str(report)])
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("factory", sorted(EXPECTED))
def test_broken_moe_op_backend_fails_its_cases(moe_golden_dir, tmp_path, factory, dtype):  # noqa: F811
    bug_class, must_fail = EXPECTED[factory]
    result, by_case = run_ops(moe_golden_dir, tmp_path, f"broken_moe_op_backends:{factory}", dtype)
    assert result.exit_code == 1, f"{bug_class} mistake {factory} passed the op suite:\n{result.output}"
    failed = {case for case, entry in by_case.items() if entry["status"] == "failed"}
    assert must_fail <= failed, f"{factory}: expected failures missing: {sorted(must_fail - failed)}"
    assert not {case for case, entry in by_case.items() if entry["status"] == "error"}
    # Only the ops it breaks may fail: every other op's cases still pass.
    broken_ops = {case.split("/")[1] for case in must_fail}
    assert {case.split("/")[1] for case in failed} <= broken_ops
    assert not MUST_PASS.get(factory, set()) & failed


def test_a_flipped_expert_fails_even_where_the_weights_are_close(moe_golden_dir, tmp_path):  # noqa: F811
    # bfloat16 allows 1.6e-2 on the weights; the selection is compared exactly in every dtype.
    result, by_case = run_ops(moe_golden_dir, tmp_path, "test_moe_op_level:FlippedSelection", "bfloat16")
    entry = by_case["op/softmax_top_k/renormalised"]
    assert entry["status"] == "failed" and entry["first_divergence"] == "selected"
    assert "compared exactly" in entry["message"]
    assert by_case["op/top_k_softmax/top-1"]["status"] == "passed"
