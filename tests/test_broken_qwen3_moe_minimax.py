"""Deliberately wrong Qwen3-MoE / MiniMax-M2 backends fail the golden cases, at the layer where they diverge.

The cases are generated into a scratch corpus (``tools/make_goldens.py --only``), so
these tests do not depend on the committed ``golden/`` holding them yet.
"""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conftest import ROOT

QWEN3_MOE = {"qwen3_moe/renorm-top2-of-6", "qwen3_moe/no-renorm-sparse-step-2", "qwen3_moe/mlp-only-top1-no-renorm",
             "qwen3_moe/top-k-equals-e", "qwen3_moe/sliding-window-all-layers", "qwen3_moe/norm-topk-prob-absent",
             "qwen3_moe/twelve-experts-top2", "qwen3_moe/eps-visible"}
MINIMAX = {"minimax_m2/gqa-partial-rotary", "minimax_m2/top-k-equals-e", "minimax_m2/mqa-top1-3-layers",
           "minimax_m2/partial-factor-beats-rotary-dim", "minimax_m2/twelve-experts-top2", "minimax_m2/eps-visible"}
#: the cases with E > 10 experts (indices whose string order is not their numeric order)
TWELVE = {"qwen3_moe/twelve-experts-top2": "layers.0", "minimax_m2/twelve-experts-top2": "layers.0"}


@pytest.fixture(scope="session")
def moe_golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_moe_minimax_golden")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "qwen3_moe/*", "--only", "minimax_m2/*",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def run(golden_dir, tmp_path, backend, dtype="float32"):
    report = tmp_path / f"report-{backend.replace(':', '-')}-{dtype}.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report)]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def test_the_scratch_corpus_holds_the_cases(moe_golden):
    ids = {c["id"] for c in json.loads((moe_golden / "MANIFEST.json").read_text())["cases"]}
    assert ids == QWEN3_MOE | MINIMAX


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_reference_passes(moe_golden, tmp_path, dtype):
    result, by_case = run(moe_golden, tmp_path, "refimpl", dtype)
    assert result.exit_code == 0, result.output
    assert {e["status"] for e in by_case.values()} == {"passed"}


#: factory: (bug class, {case that must fail: first divergence}); every other case must pass.
MISTAKES = {
    # Softmax only inside the renormalise branch: without norm_topk_prob the raw logits weigh the experts.
    "qwen3_moe_raw_logits_without_renorm": ("MOE-04", {
        "qwen3_moe/no-renorm-sparse-step-2": "layers.1", "qwen3_moe/mlp-only-top1-no-renorm": "layers.1",
        "qwen3_moe/top-k-equals-e": "layers.0", "qwen3_moe/norm-topk-prob-absent": "layers.0"}),
    # norm_topk_prob unread, always renormalised: top-k = E cannot tell (the full softmax already sums to 1).
    "qwen3_moe_always_renormalise": ("norm_topk_prob", {
        "qwen3_moe/no-renorm-sparse-step-2": "layers.1", "qwen3_moe/mlp-only-top1-no-renorm": "layers.1",
        "qwen3_moe/norm-topk-prob-absent": "layers.0"}),
    # An absent norm_topk_prob read as true: only the case that omits the key (transformers' default is false).
    "qwen3_moe_norm_topk_default_true": ("norm_topk_prob default", {"qwen3_moe/norm-topk-prob-absent": "layers.0"}),
    "qwen3_moe_never_renormalise": ("norm_topk_prob", {
        "qwen3_moe/renorm-top2-of-6": "layers.0", "qwen3_moe/sliding-window-all-layers": "layers.0",
        "qwen3_moe/twelve-experts-top2": "layers.0", "qwen3_moe/eps-visible": "layers.0"}),
    # QK-norm statistics per head instead of over all heads: every MiniMax case, MHA included.
    "minimax_qk_norm_per_head": ("QKN-03", {c: "layers.0" for c in MINIMAX}),
    # k normalised over the query width: only GQA / MQA cases (k narrower than q) can tell.
    "minimax_k_norm_query_width": ("QKN-07", {c: "layers.0" for c in MINIMAX - {
        "minimax_m2/partial-factor-beats-rotary-dim"}}),
    # Bias in the combine weights: top-1 renormalises to weight 1 either way.
    "minimax_bias_in_weights": ("MOE-01", {c: "layers.0" for c in MINIMAX - {"minimax_m2/mqa-top1-3-layers"}}),
    # Bias never used: the golden biases change the chosen experts wherever k < E.
    "minimax_bias_ignored": ("MOE-01", {c: "layers.0" for c in MINIMAX - {"minimax_m2/top-k-equals-e"}}),
    "minimax_full_rotary": ("partial RoPE", {c: "layers.0" for c in MINIMAX}),
    "minimax_rotary_dim_first": ("partial RoPE", {"minimax_m2/partial-factor-beats-rotary-dim": "layers.0"}),
    # Experts stacked in string order: only E > 10 permutes them (0..9 sort alike as strings and numbers).
    "experts_in_string_order": ("expert order", TWELVE),
    # A default eps (1e-6, the cases' own elsewhere): only the case whose rms_norm_eps (0.1, 0.2) is
    # comparable to the normalised mean squares; in every norm the first layer already differs ...
    "qwen3_moe_eps_default": ("EPS", {"qwen3_moe/eps-visible": "layers.0"}),
    "minimax_eps_default": ("EPS", {"minimax_m2/eps-visible": "layers.0"}),
    # ... in the final norm only, the layers agree and the tap after the final norm is the first to differ.
    "final_norm_eps_default": ("EPS", {"qwen3_moe/eps-visible": "norm", "minimax_m2/eps-visible": "norm"}),
}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_mistake_fails_where_it_first_diverges(moe_golden, tmp_path, factory):
    bug_class, must_fail = MISTAKES[factory]
    result, by_case = run(moe_golden, tmp_path, f"broken_qwen3_moe_minimax:{factory}")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every case"
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == must_fail
    assert {e["status"] for c, e in by_case.items() if c not in must_fail} == {"passed"}


@pytest.mark.parametrize("factory", ["experts_in_string_order", "qwen3_moe_eps_default", "minimax_eps_default",
                                     "final_norm_eps_default"])
def test_mistake_fails_at_float64_too(moe_golden, tmp_path, factory):
    bug_class, must_fail = MISTAKES[factory]
    result, by_case = run(moe_golden, tmp_path, f"broken_qwen3_moe_minimax:{factory}", "float64")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every case at float64"
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == must_fail
    assert {e["status"] for c, e in by_case.items() if c not in must_fail} == {"passed"}


def test_norm_topk_default_true_fails_at_float64(moe_golden, tmp_path):
    result, by_case = run(moe_golden, tmp_path, "broken_qwen3_moe_minimax:qwen3_moe_norm_topk_default_true", "float64")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == {"qwen3_moe/norm-topk-prob-absent": "layers.0"}
    config = json.loads((moe_golden / "qwen3_moe/norm-topk-prob-absent/checkpoint/config.json").read_text())
    assert "norm_topk_prob" not in config


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ignoring_decoder_sparse_step_cannot_load_the_sparse_step_case(moe_golden, tmp_path, dtype):
    # An engine that builds every layer as MoE finds no expert weights for the dense layers 0 and 2.
    result, by_case = run(moe_golden, tmp_path, "broken_qwen3_moe_minimax:qwen3_moe_sparse_step_ignored", dtype)
    assert result.exit_code == 1
    broken = by_case.pop("qwen3_moe/no-renorm-sparse-step-2")
    assert broken["status"] == "error"
    assert "MissingWeightsError" in broken["message"] and "model.layers.0.mlp.experts" in broken["message"]
    assert {e["status"] for e in by_case.values()} == {"passed"}
