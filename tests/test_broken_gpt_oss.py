"""Deliberately wrong gpt-oss backends fail the gpt-oss golden cases, and the report names where.

The corpus is built once per session from ``tools/golden_cases/gpt_oss.py`` into a
temporary directory (``make_goldens.py --only 'gpt_oss/*'``), so these tests do not
depend on the committed golden/ directory.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

RELEASED = "gpt_oss/released-style-config"
CLAMP = "gpt_oss/swiglu-clamp-engaged"
TOP1 = "gpt_oss/top-1-full-first-mqa"
ALL_E = "gpt_oss/top-k-all-experts-tied"
SINGLE = "gpt_oss/single-token"
SQUARE = "gpt_oss/square-experts"
EPS = "gpt_oss/eps-visible"
CASES = (RELEASED, CLAMP, TOP1, ALL_E, SINGLE, SQUARE, EPS)


@pytest.fixture(scope="session")
def gpt_oss_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt_oss_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "gpt_oss/*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report),
            "--case", "gpt_oss/*"]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def outcome(by_case) -> dict:
    """``{case: first divergence}`` for failed cases, ``{case: "passed"}`` for the others."""
    return {c: e["first_divergence"] if e["status"] == "failed" else e["status"] for c, e in by_case.items()}


def test_the_reference_passes_its_own_cases(gpt_oss_golden, tmp_path):
    for dtype in ("float64", "float32"):
        result, by_case = run(gpt_oss_golden, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert outcome(by_case) == dict.fromkeys(CASES, "passed")


L0 = "layers.0"
#: factory: (bug class, dtype, expected outcome per case: first divergence, or "passed").
MISTAKES = {
    # The clamp only matters where pre-activations pass the limit: only the clamp case sees it.
    "clamp_dropped": ("ACT-02", "float32", {RELEASED: "passed", CLAMP: L0, TOP1: "passed", ALL_E: "passed",
                                            SINGLE: "passed", SQUARE: "passed", EPS: "passed"}),
    # min(silu_1.702(g), 7) vs silu_1.702(min(g, 7)): 7 against 7 sigmoid(11.9) = 6.99995 on clamped gates,
    # about 6e-6 relative on the layer output: float64 sees it, and float32 too (22x the reference's own
    # float32 error, which the error model allows twice of).
    "clamp_after_activation": ("ACT-02", "float64", {RELEASED: "passed", CLAMP: L0, TOP1: "passed",
                                                     ALL_E: "passed", SINGLE: "passed", SQUARE: "passed",
                                                     EPS: "passed"}),
    "clamp_after_activation@float32": ("ACT-02", "float32", {RELEASED: "passed", CLAMP: L0, TOP1: "passed",
                                                             ALL_E: "passed", SINGLE: "passed", SQUARE: "passed",
                                                             EPS: "passed"}),
    "gate_up_concatenated": ("ACT-04", "float32", dict.fromkeys(CASES, L0)),
    "missing_plus_one": ("ACT (+1)", "float32", dict.fromkeys(CASES, L0)),
    "alpha_one": ("ACT (alpha)", "float32", dict.fromkeys(CASES, L0)),
    # With T = 1 the query sees only itself: without the sink the output is exactly v, with it a fraction of v.
    "sink_dropped": ("SINK-01", "float32", dict.fromkeys(CASES, L0)),
    # A query at position 0 sees only itself whatever the window: the T = 1 case cannot tell.
    "window_on_wrong_layers": ("PAT-05", "float32", {**dict.fromkeys(CASES, L0), SINGLE: "passed"}),
    # The full-first case has its first sliding layer at index 1.
    "window_plus_one": ("SWA-01", "float32", {RELEASED: L0, CLAMP: L0, TOP1: "layers.1", ALL_E: L0,
                                              SINGLE: "passed", SQUARE: L0, EPS: L0}),
    # With k = E the top-k softmax is the softmax over all experts: identical on that case only.
    "router_softmax_over_all": ("MOE (softmax after top-k)", "float32", {**dict.fromkeys(CASES, L0),
                                                                         ALL_E: "passed"}),
    # With k = 1 the bias acts only through the choice, which it first changes in layer 2 (4 tokens).
    "router_bias_dropped": ("MOE (router bias)", "float32", {**dict.fromkeys(CASES, L0), TOP1: "layers.2"}),
    # The YaRN magnitude scales q.k by 1.81 (1.30 at factor 4) from position 0 on, even for T = 1.
    "yarn_magnitude_dropped": ("RSC-12", "float32", dict.fromkeys(CASES, L0)),
    "plain_rope_for_yarn": ("PAT-05 (plain RoPE kernel)", "float32", dict.fromkeys(CASES, L0)),
    # Only the released RoPE (original context 4096) has a correction range that floor / ceil moves;
    # with an original context of 16 it is clipped at pair 0 either way, and the k = E case truncates anyway.
    "yarn_truncated": ("RoPE (truncate)", "float32", {**dict.fromkeys(CASES, "passed"), RELEASED: L0}),
    # A square down_proj (I == M) read as out-major and transposed: only the square case can tell, in both dtypes.
    "down_proj_orientation_from_shape": ("expert orientation", "float32", {**dict.fromkeys(CASES, "passed"),
                                                                          SQUARE: L0}),
    "down_proj_orientation_from_shape@float64": ("expert orientation", "float64",
                                                 {**dict.fromkeys(CASES, "passed"), SQUARE: L0}),
    # With k = 1 the weight is 1 and the down bias is scaled by 1 either way.
    "down_bias_unweighted": ("MOE (bias in the weighted sum)", "float32", {**dict.fromkeys(CASES, L0),
                                                                          TOP1: "passed"}),
    # rms_norm_eps unread (1e-5, the other cases' own value): only the case whose eps 0.1 is comparable to
    # the normalised mean squares, in both dtypes; with the final norm alone wrong, only the "norm" tap differs.
    "eps_default": ("EPS", "float32", {**dict.fromkeys(CASES, "passed"), EPS: L0}),
    "eps_default@float64": ("EPS", "float64", {**dict.fromkeys(CASES, "passed"), EPS: L0}),
    "final_norm_eps_default": ("EPS (final norm)", "float32", {**dict.fromkeys(CASES, "passed"), EPS: "norm"}),
    "final_norm_eps_default@float64": ("EPS (final norm)", "float64", {**dict.fromkeys(CASES, "passed"),
                                                                       EPS: "norm"}),
}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_gpt_oss_mistakes_are_caught_where_they_first_act(gpt_oss_golden, tmp_path, factory):
    bug_class, dtype, expected = MISTAKES[factory]
    result, by_case = run(gpt_oss_golden, tmp_path, f"broken_gpt_oss:{factory.split('@')[0]}", dtype)
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every gpt-oss case"
    assert outcome(by_case) == expected


def test_the_min_silu_clamp_form_is_caught_at_float32_by_the_error_model(gpt_oss_golden, tmp_path):
    # At limit 7 and alpha 1.702 the two clamp forms differ by 5e-5 per clamped gate: under the float32
    # bound of corpus 0.10.0 (2e-5 relative), but 22x the reference's own float32 error on the clamp case
    # (see docs/architectures/gpt_oss.md and docs/tolerances.md).
    result, by_case = run(gpt_oss_golden, tmp_path, "broken_gpt_oss:clamp_after_activation", "float32")
    assert result.exit_code == 1
    assert by_case[CLAMP]["status"] == "failed" and "ratio" in by_case[CLAMP]["message"]
    assert by_case[CLAMP]["judgements"]["layers.0"]["ratio_rel_rms"] > 10
