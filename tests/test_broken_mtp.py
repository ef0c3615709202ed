"""Deliberately wrong MTP backends (``tests/broken_mtp.py``) fail the MTP golden cases where they should.

The MTP corpus is built once per module from ``tools/golden_cases/mtp.py`` into a temporary
directory. Every mistake leaves the main model alone, so in every case the logits and all
taps still pass; the report's first divergence is the draft logits of the first depth the
mistake reaches (``mtp_logits.1``, or ``mtp_logits.2`` for mistakes only a second depth
shows), or the ``mtp_layer`` op's output.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

DS1, DS2 = "mtp/deepseek-v3-one-depth", "mtp/deepseek-v3-two-depths"
GLM1, GLM2 = "mtp/glm45-one-depth", "mtp/glm45-two-depths-tied"
QN = "mtp/qwen3-next-one-depth"
OP_DS, OP_GLM, OP_QN = "op/mtp_layer/deepseek-v3", "op/mtp_layer/glm45", "op/mtp_layer/qwen3-next"
MODELS, OPS = (DS1, DS2, GLM1, GLM2, QN), (OP_DS, OP_GLM, OP_QN)
CHAINED = (DS2, GLM2)


def _expect(first_depth=None, second_depth=(), op=False):
    """Per case: the expected first divergence, or "passed"."""
    out = {case: "passed" for case in MODELS + OPS}
    out.update({case: "mtp_logits.1" for case in (first_depth or ())})
    out.update({case: "mtp_logits.2" for case in second_depth})
    if op:
        out.update({case: "output" for case in OPS})
    return out


#: factory -> expectations; a mistake inside one depth also fails the op, a mistake in the chain does not.
MISTAKES = {
    "depth1_pre_norm_hidden": _expect(MODELS),
    "norms_swapped": _expect(MODELS, op=True),
    "concat_swapped": _expect(MODELS, op=True),
    "head_norm_skipped": _expect(MODELS, op=True),
    "shift_off_by_one": _expect(MODELS),
    "first_embedding_zeroed": _expect(MODELS),
    # MTP-02: only a second depth can read the wrong hidden state.
    "depth2_stale_hidden": _expect(second_depth=CHAINED),
    "carry_pre_norm": _expect(second_depth=CHAINED),
}


@pytest.fixture(scope="module")
def mtp_golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "mtp/*", "--only",
                    "op/mtp_layer/*", "--out", str(out)], check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype="float32"):
    report = tmp_path / f"report-{dtype}.json"
    result = CliRunner().invoke(cli, ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir),
                                      "--report", str(report)])
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def test_the_correct_backend_passes_every_mtp_case(mtp_golden, tmp_path):
    result, by_case = run(mtp_golden, tmp_path, "refimpl")
    assert result.exit_code == 0, result.output
    assert set(by_case) == set(MODELS + OPS)


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_mistake_fails_its_cases_at_the_drafts_and_leaves_the_main_model(mtp_golden, tmp_path, factory):
    result, by_case = run(mtp_golden, tmp_path, f"broken_mtp:{factory}")
    expected = MISTAKES[factory]
    got = {case: (entry["first_divergence"] if entry["status"] == "failed" else entry["status"])
           for case, entry in by_case.items()}
    assert got == expected
    assert result.exit_code == 1
    for case in MODELS:
        comparisons = by_case[case]["comparisons"]
        main = {name: c for name, c in comparisons.items() if not name.startswith("mtp_logits.")}
        assert "logits" in main and len(main) > 3
        # The main logits and taps are exact (the mistakes touch only the MTP path).
        assert all(c["rel_rms"] < 2e-5 for c in main.values()), case
    # Where it fails, it fails by far more than float32 rounding.
    for case, where in expected.items():
        if where != "passed":
            assert by_case[case]["comparisons"][where]["rel_rms"] > 1e-3, (case, where)
