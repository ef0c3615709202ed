"""Each wrong Grok 2.5 backend of ``tests/broken_grok2.py`` fails the Grok golden cases, where it should.

The cases are built into a scratch corpus with ``tools/make_goldens.py --only 'grok2/*'``
(not read from golden/), so these tests follow tools/golden_cases/grok2.py.
Which case catches what, and why the others cannot:

* temperature-caps-dense-mlp (A): attention cap 4 engaged, temperature from position 5,
  dense MLP, final cap 5 engaged.
* router-cap-sparse-only (B): router logits past the cap of 30, so routing is nearly
  one-hot (renormalising changes little there); no dense MLP.
* eps-sensitive-ffn-top1 (C): feed-forward outputs near rms_norm_eps, so the
  1/sqrt(2) survives post_moe_norm; top-1 routing.
* single-token (D): position 0 only: no temperature, blind to its mistakes.
"""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]
A, B, C, D = ("grok2/temperature-caps-dense-mlp", "grok2/router-cap-sparse-only", "grok2/eps-sensitive-ffn-top1",
              "grok2/single-token")
ALL = {A, B, C, D}


@pytest.fixture(scope="session")
def grok_golden(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens

    out = tmp_path_factory.mktemp("grok2_golden")
    assert make_goldens.main(["--only", "grok2/*", "--out", str(out)]) == 0
    return out


def run(golden, tmp_path, backend, dtype):
    report = tmp_path / f"report-{dtype}.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden), "--report", str(report),
            "--case", "grok2/*"]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


# factory: (cases failing at float32, cases failing at float64, tap where they first diverge)
MISTAKES = {
    # vLLM grok1.py renormalises; B's routing is nearly one-hot, so only float64 sees it there.
    "router_renormalised": ({A, C, D}, ALL, "layers.0"),
    # Only B's router logits reach the cap of 30 (float32 margin elsewhere is too thin to assert).
    "router_cap_dropped": ({B}, ALL, "layers.0"),
    # Position 0 (D) is never tempered.
    "temperature_before_cap": ({A, B, C}, {A, B, C}, "layers.0"),
    "temperature_one_based_positions": ({A, B, C}, {A, B, C}, "layers.0"),
    # A 1e-4-sized effect: float64 catches it everywhere, float32 on B (2.8x its bound).
    "gelu_tanh": ({B}, ALL, "layers.0"),
    "pre_norm_only": (ALL, ALL, "layers.0"),
    # B has no dense MLP.
    "dense_mlp_dropped": ({A, C, D}, {A, C, D}, "layers.0"),
    # post_moe_norm removes a constant factor up to eps: float32 needs C, float64 sees A and D too.
    "dense_mlp_unscaled": ({C}, {A, C, D}, "layers.0"),
    "embedding_scale_dropped": (ALL, ALL, "embed"),
    "output_multiplier_dropped": (ALL, ALL, "logits"),
    "final_cap_dropped": (ALL, ALL, "logits"),
}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grok_mistake_is_caught(grok_golden, tmp_path, factory, dtype):
    at_float32, at_float64, first = MISTAKES[factory]
    must_fail = at_float32 if dtype == "float32" else at_float64
    result, by_case = run(grok_golden, tmp_path, f"broken_grok2:{factory}", dtype)
    assert result.exit_code == 1, result.output
    failed = {c for c, e in by_case.items() if e["status"] == "failed"}
    if dtype == "float64":
        assert failed == must_fail, (sorted(failed), sorted(must_fail))
    else:
        assert must_fail <= failed, sorted(must_fail - failed)
    assert {by_case[c]["first_divergence"] for c in must_fail} == {first}
    assert {e["status"] for c, e in by_case.items() if c not in failed} <= {"passed"}


def test_inclusive_temperature_threshold_is_invisible_under_the_log2_law(grok_golden, tmp_path):
    # tau(L) = log2(L) / log2(L) = 1: applying the temperature from p >= L instead of p > L
    # changes nothing, so no case can catch it (documented in docs/architectures/grok2.md);
    # the off-by-one that matters is the 1-based position (temperature_one_based_positions).
    for dtype in ("float32", "float64"):
        result, by_case = run(grok_golden, tmp_path, "broken_grok2:temperature_threshold_inclusive", dtype)
        assert result.exit_code == 0, result.output
        assert {e["status"] for e in by_case.values()} == {"passed"} and set(by_case) == ALL


def test_reference_passes_and_transformers_reports_not_implemented(grok_golden, tmp_path):
    for dtype in ("float32", "float64"):
        result, by_case = run(grok_golden, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0 and {e["status"] for e in by_case.values()} == {"passed"}, result.output
    pytest.importorskip("transformers")
    # (tests/test_grok2.py checks supports() at all four dtypes without the CLI.)
    for dtype in ("float64", "bfloat16"):
        _, by_case = run(grok_golden, tmp_path, "transformers", dtype)
        assert set(by_case) == ALL
        assert {e["status"] for e in by_case.values()} == {"not implemented"}
