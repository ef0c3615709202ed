"""Deliberately wrong Qwen3-Next backends fail the golden cases, at the layer where they diverge.

The cases are generated into a scratch corpus (``tools/make_goldens.py --only``), so these
tests do not depend on the committed ``golden/`` holding them yet.
"""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conftest import ROOT

STRONG, EPS = "qwen3_next/strong-decay-transformers-a-init", "qwen3_next/rms-norm-eps-1e-3"
CASES = {"qwen3_next/interval-2-gqa", "qwen3_next/explicit-layer-types", "qwen3_next/long-150-three-chunks",
         "qwen3_next/no-renorm-dense-layers", "qwen3_next/defaults-tied", "qwen3_next/yarn-partial-factor-in-dict",
         STRONG, EPS}
#: the first layer with gated attention in each case (where an attention mistake first shows)
FIRST_FULL = {"qwen3_next/interval-2-gqa": "layers.1", "qwen3_next/explicit-layer-types": "layers.0",
              "qwen3_next/long-150-three-chunks": "layers.1", "qwen3_next/no-renorm-dense-layers": "layers.1",
              "qwen3_next/defaults-tied": "layers.3", "qwen3_next/yarn-partial-factor-in-dict": "layers.1",
              STRONG: "layers.1", EPS: "layers.1"}
#: the first MoE layer of each case (the strong-decay case has dense MLPs only)
FIRST_MOE = {**{c: "layers.0" for c in CASES - {STRONG}}, "qwen3_next/interval-2-gqa": "layers.1",
             "qwen3_next/no-renorm-dense-layers": "layers.1", "qwen3_next/yarn-partial-factor-in-dict": "layers.1"}
#: the cases whose config.json gives full_attention_interval (or its default) and no layer_types
FROM_INTERVAL = CASES - {"qwen3_next/explicit-layer-types"}


@pytest.fixture(scope="session")
def qwen3_next_golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_next_golden")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "qwen3_next/*", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def run(golden_dir, tmp_path, backend, dtype="float32"):
    report = tmp_path / f"report-{backend.replace(':', '-')}-{dtype}.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report)]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def test_the_scratch_corpus_holds_the_cases(qwen3_next_golden):
    ids = {c["id"] for c in json.loads((qwen3_next_golden / "MANIFEST.json").read_text())["cases"]}
    assert ids == CASES


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_reference_passes(qwen3_next_golden, tmp_path, dtype):
    result, by_case = run(qwen3_next_golden, tmp_path, "refimpl", dtype)
    assert result.exit_code == 0, result.output
    assert {e["status"] for e in by_case.values()} == {"passed"}


#: factory: (bug class, {case that must fail: first divergence}); every other case must pass.
MISTAKES = {
    # Every case has a gated-attention layer with H = 4 heads: each attention mistake shows there first.
    "gate_split_halves": ("QN1 gate split", FIRST_FULL),
    "gate_without_sigmoid": ("output gate", FIRST_FULL),
    "gate_silu": ("output gate", FIRST_FULL),
    "qk_norm_plain_weight": ("QN2 / NRM-02", FIRST_FULL),
    "full_rotary": ("QN8 partial RoPE", FIRST_FULL),
    "partial_rotary_last_dims": ("QN8 partial RoPE", FIRST_FULL),
    "partial_rotary_pairs_across_head": ("QN8 partial RoPE", FIRST_FULL),
    # Only the case whose rope_parameters carry their own factor beside a different top-level one.
    "partial_factor_top_level_first": ("partial RoPE factor", {"qwen3_next/yarn-partial-factor-in-dict": "layers.1"}),
    # Every MoE layer has the shared expert.
    "shared_expert_ungated": ("QN9 shared-expert gate", FIRST_MOE),
    # Always renormalised: only norm_topk_prob false with k < E can tell (the long case has k = E).
    "norm_topk_ignored": ("norm_topk_prob", {"qwen3_next/no-renorm-dense-layers": "layers.1"}),
    # Qwen3-MoE's default false for an absent key: only the case that omits it.
    "norm_topk_default_false": ("norm_topk_prob default", {"qwen3_next/defaults-tied": "layers.0"}),
    # Only the case whose rms_norm_eps (1e-3) differs from the L2 norm's fixed 1e-6; layer 0 is linear attention.
    "gated_norm_eps_fixed": ("gated norm eps 1e-6", {EPS: "layers.0"}),
    "l2_norm_eps_from_rms_norm_eps": ("L2 eps = rms_norm_eps", {EPS: "layers.0"}),
}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_mistake_fails_where_it_first_diverges(qwen3_next_golden, tmp_path, factory):
    bug_class, must_fail = MISTAKES[factory]
    result, by_case = run(qwen3_next_golden, tmp_path, f"broken_qwen3_next:{factory}")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every case"
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == must_fail
    assert all(e["status"] == "passed" for c, e in by_case.items() if c not in must_fail)


@pytest.mark.parametrize("factory", ["gate_split_halves", "qk_norm_plain_weight", "partial_rotary_last_dims",
                                     "shared_expert_ungated", "l2_norm_eps_from_rms_norm_eps"])
def test_mistake_fails_at_float64_too(qwen3_next_golden, tmp_path, factory):
    bug_class, must_fail = MISTAKES[factory]
    result, by_case = run(qwen3_next_golden, tmp_path, f"broken_qwen3_next:{factory}", "float64")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every case at float64"
    assert {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"} == must_fail


#: schedule mistakes: the engine builds other layers than the checkpoint holds and cannot load it.
SCHEDULES = {
    # l % interval == 0 instead of (l + 1) % interval == 0: every case whose schedule comes from the interval.
    "schedule_off_by_one": FROM_INTERVAL,
    # layer_types unread: only the case that gives it (and whose interval would say otherwise).
    "layer_types_ignored": {"qwen3_next/explicit-layer-types"},
}


@pytest.mark.parametrize("factory", sorted(SCHEDULES))
def test_a_wrong_layer_schedule_cannot_load_the_checkpoint(qwen3_next_golden, tmp_path, factory):
    result, by_case = run(qwen3_next_golden, tmp_path, f"broken_qwen3_next:{factory}")
    assert result.exit_code == 1
    errored = {c for c, e in by_case.items() if e["status"] == "error"}
    assert errored == SCHEDULES[factory]
    for case in errored:
        message = by_case[case]["message"]
        assert "MissingWeightsError" in message and ("self_attn" in message or "linear_attn" in message), message
    assert all(e["status"] == "passed" for c, e in by_case.items() if c not in errored)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ratio_decay_turns_the_strong_decay_case_into_nan(qwen3_next_golden, tmp_path, dtype):
    # exp(-gamma_s) overflows once a chunk's cumulative log-decay passes -88 (float32) / -709 (float64); under
    # transformers' A ~ U(0.01, 16) a 64-token chunk passes both. The weak decays of the other cases (A <= 0.2)
    # stay inside the exp range, and the ratio there is only a rounding difference.
    result, by_case = run(qwen3_next_golden, tmp_path, "broken_qwen3_next:ratio_decay", dtype)
    assert result.exit_code == 1
    assert {c: e["status"] for c, e in by_case.items() if e["status"] != "passed"} == {STRONG: "nan"}
    assert by_case[STRONG]["comparisons"]["logits"]["nonfinite"] > 0
