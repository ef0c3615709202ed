"""Deliberately wrong GLM-4.5 backends fail the GLM-4.5 golden cases, and the report names where.

The corpus is built once per session from ``tools/golden_cases/glm4_moe.py`` into a
temporary directory (``make_goldens.py --only 'glm4_moe/*'``), so these tests do not
depend on the committed golden/ directory. Each expectation names, per case, the tap
where the run first leaves the tolerance, or "passed" where the case cannot see the
mistake (and why).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

GLM45 = "glm4_moe/glm45-style"        # QK-norm, biases, rsf 2.5, first_k_dense_replace 1, T = 6
GROUPED = "glm4_moe/grouped-routing"  # no QK-norm, biases, rsf 1.5, groups, first_k_dense_replace 2, T = 9
AIR = "glm4_moe/air-style-no-bias"    # no QK-norm, no biases, rsf 1, first_k_dense_replace 1, T = 8
SINGLE = "glm4_moe/all-moe-single-token"  # QK-norm, biases, rsf 2.5, first_k_dense_replace 0, T = 1
EPS = "glm4_moe/eps-visible"          # as GLM45 (T = 7) with rms_norm_eps 0.1, near the normalised mean squares
CASES = (GLM45, GROUPED, AIR, SINGLE, EPS)

MISTAKES = {
    # With T = 1 the one key takes all the attention whatever q and k are: no q/k mistake shows.
    "qk_norm_over_all_heads": {GLM45: "layers.0", GROUPED: "passed", AIR: "passed", SINGLE: "passed", EPS: "layers.0"},
    # At position 0 (T = 1) every RoPE variant is the identity.
    "rope_on_whole_head": {GLM45: "layers.0", GROUPED: "layers.0", AIR: "layers.0", SINGLE: "passed", EPS: "layers.0"},
    "rope_on_last_dims": {GLM45: "layers.0", GROUPED: "layers.0", AIR: "layers.0", SINGLE: "passed", EPS: "layers.0"},
    # The single-token case still sees the v bias.
    "qkv_bias_dropped": {GLM45: "layers.0", GROUPED: "layers.0", AIR: "passed", SINGLE: "layers.0", EPS: "layers.0"},
    # MOE-09 shows at the first MoE layer of every case whose factor is not 1 (Air ships 1.0).
    "routed_scaling_not_applied": {GLM45: "layers.1", GROUPED: "layers.2", AIR: "passed", SINGLE: "layers.0",
                                   EPS: "layers.1"},
    "routed_scaling_applied_twice": {GLM45: "layers.1", GROUPED: "layers.2", AIR: "passed", SINGLE: "layers.0",
                                     EPS: "layers.1"},
    "shared_expert_dropped": {GLM45: "layers.1", GROUPED: "layers.2", AIR: "layers.1", SINGLE: "layers.0",
                              EPS: "layers.1"},
    # Layer first_k_dense_replace run as dense; with k = 0 that is layer 0.
    "dense_layers_one_too_many": {GLM45: "layers.1", GROUPED: "layers.2", AIR: "layers.1", SINGLE: "layers.0",
                                  EPS: "layers.1"},
    # Layer first_k_dense_replace - 1 run as MoE; with k = 0 there is no such layer.
    "dense_layers_one_too_few": {GLM45: "layers.0", GROUPED: "layers.1", AIR: "layers.0", SINGLE: "passed",
                                 EPS: "layers.0"},
    # rms_norm_eps unread (1e-5 in every norm, the other cases' own value): only the case whose eps 0.1 is
    # comparable to the normalised mean squares; with the final norm alone wrong, only the "norm" tap differs.
    "eps_default": {**dict.fromkeys(CASES, "passed"), EPS: "layers.0"},
    "final_norm_eps_default": {**dict.fromkeys(CASES, "passed"), EPS: "norm"},
}


@pytest.fixture(scope="session")
def glm4_moe_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glm4_moe_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "glm4_moe/*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report),
            "--case", "glm4_moe/*"]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def outcome(by_case) -> dict:
    """``{case: first divergence}`` for failed cases, ``{case: status}`` for the others."""
    return {c: e["first_divergence"] if e["status"] == "failed" else e["status"] for c, e in by_case.items()}


def test_the_reference_passes_its_own_cases(glm4_moe_golden, tmp_path):
    for dtype in ("float64", "float32"):
        result, by_case = run(glm4_moe_golden, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert outcome(by_case) == dict.fromkeys(CASES, "passed")


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_mistake_fails_where_expected(glm4_moe_golden, tmp_path, factory):
    result, by_case = run(glm4_moe_golden, tmp_path, f"broken_glm4_moe:{factory}", "float32")
    assert result.exit_code == 1, result.output
    assert outcome(by_case) == MISTAKES[factory]


@pytest.mark.parametrize("factory", ["routed_scaling_not_applied", "qk_norm_over_all_heads", "eps_default",
                                     "final_norm_eps_default"])
def test_mistake_fails_at_float64_too(glm4_moe_golden, tmp_path, factory):
    result, by_case = run(glm4_moe_golden, tmp_path, f"broken_glm4_moe:{factory}", "float64")
    assert result.exit_code == 1
    assert outcome(by_case) == MISTAKES[factory]
