"""Deliberately wrong Llama 4 backends fail the Llama 4 golden cases where, and only where, they should.

The cases are built into a scratch corpus by ``tools/make_goldens.py --only 'llama4/*'``
(never into golden/). For every mistake the test states which cases must fail and
the tap where each first diverges, derived from the case configs (noted per entry),
and that every other case passes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

SCOUT = "llama4/scout-chunked-nope-temperature"      # all MoE; RoPE+chunk layers 0-2, NoPE layer 3; T=13, C=5
MAVERICK = "llama4/maverick-interleaved-dense-moe"   # MoE layers 1, 3; no QK-norm; NoPE layer 3; T=11, C=4
TOP2 = "llama4/top2-explicit-schedules-bias"         # NoPE layers 0, 3; MoE layers 0, 2; T=17, C=6
NO_CHUNK = "llama4/no-chunk-top-all-tied"            # no chunking, k = E, NoPE layer 1 without temperature
SINGLE = "llama4/single-token"                       # T=1: position 0, one key per query
EPS = "llama4/qk-norm-eps-visible"                   # RoPE + QK-norm layer 0, NoPE layer 1 (no temperature); q, k
                                                     # mean squares near rms_norm_eps 1e-3; all MoE; T=9, C=5
HEAD_DIM = "llama4/head-dim-not-hidden-per-head"     # D=24 != M/H=16; RoPE + QK-norm + chunk layer 0, NoPE layer 1
                                                     # with temperature; all MoE, top-1; T=11, C=5

MISTAKES = {
    # MoE: every case routes; the first MoE layer is 0, except Maverick's (1).
    "router_weight_on_output": {SCOUT: "layers.0", MAVERICK: "layers.1", TOP2: "layers.0", NO_CHUNK: "layers.0",
                                SINGLE: "layers.0", EPS: "layers.0", HEAD_DIM: "layers.0"},
    "router_softmax": {SCOUT: "layers.0", MAVERICK: "layers.1", TOP2: "layers.0", NO_CHUNK: "layers.0",
                       SINGLE: "layers.0", EPS: "layers.0", HEAD_DIM: "layers.0"},
    "shared_expert_dropped": {SCOUT: "layers.0", MAVERICK: "layers.1", TOP2: "layers.0", NO_CHUNK: "layers.0",
                              SINGLE: "layers.0", EPS: "layers.0", HEAD_DIM: "layers.0"},
    # Masks: only cases with chunked layers and T > C; the first chunked layer of TOP2 is 1.
    "chunk_boundary_off_by_one": {SCOUT: "layers.0", MAVERICK: "layers.0", TOP2: "layers.1", EPS: "layers.0",
                                  HEAD_DIM: "layers.0"},
    "chunk_as_sliding_window": {SCOUT: "layers.0", MAVERICK: "layers.0", TOP2: "layers.1", EPS: "layers.0",
                                HEAD_DIM: "layers.0"},
    # NoPE layers: the first NoPE layer; at T = 1 position 0 makes RoPE the identity and one key takes all weight.
    "rope_on_nope_layers": {SCOUT: "layers.3", MAVERICK: "layers.3", TOP2: "layers.0", NO_CHUNK: "layers.1",
                            EPS: "layers.1", HEAD_DIM: "layers.1"},
    # Temperature: NoPE layers with tuning on and positions >= floor_scale - 1 (EPS has tuning off).
    "temperature_missing": {SCOUT: "layers.3", MAVERICK: "layers.3", TOP2: "layers.0", HEAD_DIM: "layers.1"},
    "temperature_on_rope_layers": {SCOUT: "layers.0", MAVERICK: "layers.0", TOP2: "layers.1", HEAD_DIM: "layers.0"},
    # QK-norm: only where use_qk_norm is true and T > 1.
    "qk_norm_on_nope_layers": {SCOUT: "layers.3", TOP2: "layers.0", NO_CHUNK: "layers.1", EPS: "layers.1",
                               HEAD_DIM: "layers.1"},
    "qk_norm_dropped": {SCOUT: "layers.0", TOP2: "layers.1", NO_CHUNK: "layers.0", EPS: "layers.0",
                        HEAD_DIM: "layers.0"},
    # QK-norm eps 1e-6 instead of rms_norm_eps: largest where q, k mean squares are near eps (1e-3); on the
    # other QK-norm cases (eps 1e-5 against mean squares near 1) ~1e-6 relative, which float64 sees and
    # float32 too under the error model (several times the reference's own float32 error).
    "qk_norm_fixed_eps": {SCOUT: "layers.0", TOP2: "layers.1", NO_CHUNK: "layers.0", EPS: "layers.0",
                          HEAD_DIM: "layers.0"},
    # RoPE layout: the first RoPE layer of every multi-token case.
    "rotate_half_rope": {SCOUT: "layers.0", MAVERICK: "layers.0", TOP2: "layers.1", NO_CHUNK: "layers.0",
                         EPS: "layers.0", HEAD_DIM: "layers.0"},
    # Scale (M / H)^-0.5 instead of D^-0.5: the same number wherever D == M / H, so only the case with
    # D 24 != 16 (in both dtypes: 0.25 against 0.204 on every score), from its first layer with T > 1.
    "attention_scale_from_hidden_per_head": {HEAD_DIM: "layers.0"},
}


@pytest.fixture(scope="session")
def llama4_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama4_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "llama4/*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype="float32"):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report)]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def test_the_scratch_corpus_holds_the_llama4_cases(llama4_golden):
    ids = [c["id"] for c in json.loads((llama4_golden / "MANIFEST.json").read_text())["cases"]]
    assert ids == [SCOUT, MAVERICK, TOP2, NO_CHUNK, SINGLE, EPS, HEAD_DIM]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_reference_passes_every_llama4_case(llama4_golden, tmp_path, dtype):
    result, by_case = run(llama4_golden, tmp_path, "refimpl", dtype)
    assert result.exit_code == 0, result.output
    assert {e["status"] for e in by_case.values()} == {"passed"}


@pytest.mark.parametrize("factory", sorted(MISTAKES))
def test_mistake_fails_exactly_where_expected(llama4_golden, tmp_path, factory):
    result, by_case = run(llama4_golden, tmp_path, f"broken_llama4:{factory}")
    assert result.exit_code == 1, result.output
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == MISTAKES[factory]
    assert {e["status"] for c, e in by_case.items() if c not in failed} <= {"passed"}


def test_qk_norm_fixed_eps_fails_every_qk_norm_case_at_float64(llama4_golden, tmp_path):
    result, by_case = run(llama4_golden, tmp_path, "broken_llama4:qk_norm_fixed_eps", "float64")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == MISTAKES["qk_norm_fixed_eps"]


def test_attention_scale_from_hidden_per_head_fails_at_float64_too(llama4_golden, tmp_path):
    result, by_case = run(llama4_golden, tmp_path, "broken_llama4:attention_scale_from_hidden_per_head", "float64")
    assert result.exit_code == 1
    failed = {c: e["first_divergence"] for c, e in by_case.items() if e["status"] == "failed"}
    assert failed == MISTAKES["attention_scale_from_hidden_per_head"]


def test_qk_norm_before_rope_is_the_same_function(llama4_golden, tmp_path):
    # A rotation keeps each head's RMS, so weight-less normalisation commutes with RoPE:
    # the "wrong" order agrees to float64 rounding, and the suite rightly cannot tell.
    result, by_case = run(llama4_golden, tmp_path, "broken_llama4:qk_norm_before_rope", "float64")
    assert result.exit_code == 0, result.output
    assert {e["status"] for e in by_case.values()} == {"passed"}


def test_qk_norm_before_rope_patch_is_live(llama4_golden):
    # The pass above is not vacuous: the patched forward does differ, by rounding only.
    import numpy as np
    from safetensors.numpy import load_file

    import broken_llama4
    import refimpl

    model = refimpl.from_pretrained(llama4_golden / SCOUT / "checkpoint")
    ids = load_file(llama4_golden / SCOUT / "io.safetensors")["input_ids"]
    with broken_llama4.qk_norm_before_rope()._patch():
        swapped = model(ids)
    right = model(ids)
    assert not np.array_equal(swapped, right)
    assert np.linalg.norm(swapped - right) / np.linalg.norm(right) < 1e-13
