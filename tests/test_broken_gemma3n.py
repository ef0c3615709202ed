"""Deliberately wrong Gemma 3n backends fail the Gemma 3n golden cases, and the report names where.

The corpus is built once per session from ``tools/golden_cases/gemma3n.py`` into a
temporary directory (``make_goldens.py --only 'gemma3n/*'``), so these tests do not
depend on the committed golden/ directory. The ``layers.{l}`` tap is the active AltUp
stream (stream 0, except in the active-stream case where it is stream 2). The multimodal
case (``Gemma3nForConditionalGeneration``) has no activation sparsity, and its checkpoint,
like those of the KV-sharing text cases, carries the consumers' unused k/v tensors.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

TINY = "gemma3n/spec-tiny-kv-sharing"
PATTERN = "gemma3n/default-pattern-5"
ACTIVE2 = "gemma3n/active-stream-2-batch-3"
SINGLE = "gemma3n/single-token-untied-three-streams"
CAP12 = "gemma3n/soft-cap-12-window-1"
COND = "gemma3n/conditional-generation-special-ids"
CASES = (TINY, PATTERN, ACTIVE2, SINGLE, CAP12, COND)
L0, L1 = "layers.0", "layers.1"


@pytest.fixture(scope="session")
def gemma3n_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma3n_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "gemma3n/*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report),
            "--case", "gemma3n/*"]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def outcome(by_case) -> dict:
    """``{case: first divergence}`` for failed cases, ``{case: "passed"}`` for the others."""
    return {c: e["first_divergence"] if e["status"] == "failed" else e["status"] for c, e in by_case.items()}


def test_the_reference_passes_its_own_cases(gemma3n_golden, tmp_path):
    for dtype in ("float64", "float32"):
        result, by_case = run(gemma3n_golden, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert outcome(by_case) == dict.fromkeys(CASES, "passed")


#: factory: (bug class, dtype, expected outcome per case: first divergence, or "passed").
MISTAKES = {
    # Every norm (1 + w) instead of w: norm weights are 1 + 0.2 N, so every gain doubles; in the
    # multimodal case the embedders' hard_embedding_norm too, so its embedding already differs.
    "norms_one_plus_w": ("NRM (G3n-1)", "float32", {**dict.fromkeys(CASES, L0), COND: "embed"}),
    # With T = 1 the softmax has one key whatever the scale; the window-1 case's sliding layers
    # see one key too, so only its full layer 4 can tell.
    "attention_scale_head_dim": ("SCL (G3n-2)", "float32", {**dict.fromkeys(CASES, L0), SINGLE: "passed",
                                                           CAP12: "layers.4"}),
    # With T = 1 and one KV head, a missing value norm scales every head's output by the same
    # factor, which post_attention_layernorm removes up to its eps: float64 sees it, float32 does not.
    "v_norm_missing": ("G3n-3", "float32", {**dict.fromkeys(CASES, L0), SINGLE: "passed"}),
    "v_norm_missing@float64": ("G3n-3", "float64", dict.fromkeys(CASES, L0)),
    "router_scale_sqrt": ("G3n-4", "float32", dict.fromkeys(CASES, L0)),
    "altup_layout_transposed": ("G3n-5", "float32", dict.fromkeys(CASES, L0)),
    "correction_without_plus_one": ("G3n-6", "float32", dict.fromkeys(CASES, L0)),
    # The tap is stream 0, which only the wrong backend feeds; in the active-stream-2 case the tap
    # (stream 2) gets the per-layer input either way and sees stream 0 through the next prediction.
    "ple_into_every_stream": ("G3n-7", "float32", {**dict.fromkeys(CASES, L0), ACTIVE2: L1}),
    # Out-of-table ids change the per-layer input of streams 1-3 only: the stream-0 tap sees it one
    # layer later, the stream-2 tap at once; the single-token case draws no id >= 96.
    "ple_ids_clamped_to_last_row": ("G3n-10", "float32", {TINY: L1, PATTERN: L1, ACTIVE2: L0, SINGLE: "passed",
                                                          CAP12: L1, COND: L1}),
    "sparsity_sample_std": ("G3n-8", "float32", {**dict.fromkeys(CASES, L0), COND: "passed"}),
    "sparsity_skipped": ("G3n-8", "float32", {**dict.fromkeys(CASES, L0), COND: "passed"}),
    # Consumers whose producer is not the first layer of its type: spec-tiny layers 4, 5 reuse 2, 3, and
    # the multimodal case's layer 3 reuses 1 (in the active-stream case layers 2, 3 reuse 0, 1, the first
    # ones anyway).
    "kv_from_first_producer": ("G3n-13", "float32", {**dict.fromkeys(CASES, "passed"), TINY: "layers.4",
                                                     COND: "layers.3"}),
    # The consumers compute keys and values of their own with the unused tensors the checkpoints carry:
    # every case with KV sharing fails at its first consumer layer (and loads, instead of failing to).
    "kv_sharing_ignored": ("G3n-13", "float32", {**dict.fromkeys(CASES, "passed"), TINY: "layers.4",
                                                 ACTIVE2: "layers.2", COND: "layers.3"}),
    # Vision / audio ids (eoi, eoa, the placeholders) embedded with the main table: only the multimodal
    # case has them, and its embedding differs at once.
    "multimodal_ids_from_main_table": ("G3n multimodal embedders", "float32",
                                       {**dict.fromkeys(CASES, "passed"), COND: "embed"}),
    # Only the case without layer_types: pattern 6 makes layer 4 sliding.
    "pattern_six": ("G3n-12 / PAT", "float32", {**dict.fromkeys(CASES, "passed"), PATTERN: "layers.4"}),
    "softcap_missing": ("CAP-05", "float32", dict.fromkeys(CASES, "logits")),
    "softcap_hardcoded_30": ("CAP-02", "float32", {**dict.fromkeys(CASES, "passed"), CAP12: "logits"}),
}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_gemma3n_mistakes_are_caught_where_they_first_act(gemma3n_golden, tmp_path, factory):
    bug_class, dtype, expected = MISTAKES[factory]
    result, by_case = run(gemma3n_golden, tmp_path, f"broken_gemma3n:{factory.split('@')[0]}", dtype)
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every Gemma 3n case"
    assert outcome(by_case) == expected
