"""Each deliberately wrong Gated DeltaNet op backend (tests/broken_gdn_op_backends.py) fails the cases
built to catch it and passes every other case; the reference passes them all.

The scratch corpus is ``tools/golden_cases/gdn_ops.py``, written by the golden generator in a
session fixture. float32 runs by default; the float64 runs are marked slow (the same verdicts).
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conformance.cli import cli

ROOT = Path(__file__).resolve().parents[1]

DELTA = {"recurrent-t37", "chunked-c4-t37", "chunked-c16-t37-state", "recurrent-t37-state", "chunked-c64-t64-r4",
         "chunked-c64-t150", "recurrent-t150", "chunked-c16-t150-r4-state", "gdn02-dk80-dv96",
         "gdn02-dk80-dv96-recurrent", "gdn03-t3-h2", "gdn03-t3-h2-recurrent", "one-token-state", "gdn04-whole-t5-c4",
         "gdn04-first-t4", "gdn04-second-t1", "gdn04-second-t33-c16", "strong-decay-c16-t53-state",
         "strong-decay-recurrent-t53-state", "strong-decay-c64-t150", "mixed-fresh-continuing-c16-t37",
         "mixed-fresh-continuing-recurrent-t5"}
CONV = {"no-state-k4", "state-k4", "gdn06-full-t4", "gdn06-prefill-t3", "gdn06-decode-t1",
        "state-t2-shorter-than-history", "k2-no-activation", "mixed-fresh-continuing-k4"}
NORM = {"per-head", "eps-visible"}
LAYER = {"qwen3-next-t150", "recurrent-r1-t37", "gdn04-whole-t5", "gdn04-prefill-t4", "gdn04-decode-t1",
         "second-piece-t20", "strong-decay-transformers-a-t150", "mixed-fresh-continuing-t20", "rms-norm-eps-1e-3"}


def ids(op, names):
    return {f"op/{op}/{name}" for name in names}


ALL = ids("gated_delta_rule", DELTA) | ids("causal_conv1d", CONV) | ids("gated_rms_norm", NORM) | ids(
    "gated_deltanet", LAYER)
#: delta-rule and layer cases with Hk > 1 and Hv / Hk > 1, where tiling and repeat-interleave differ
GROUPED = ids("gated_delta_rule", {"recurrent-t37", "chunked-c4-t37", "chunked-c16-t37-state", "recurrent-t37-state",
                                   "chunked-c64-t64-r4", "one-token-state", "gdn04-whole-t5-c4", "gdn04-first-t4",
                                   "gdn04-second-t1", "gdn04-second-t33-c16", "strong-decay-c16-t53-state",
                                   "strong-decay-recurrent-t53-state", "mixed-fresh-continuing-c16-t37",
                                   "mixed-fresh-continuing-recurrent-t5"}) | ids(
    "gated_deltanet", LAYER - {"recurrent-r1-t37"})
#: chunked cases whose T is not a multiple of the chunk size (a partial last chunk)
PARTIAL_CHUNK = ids("gated_delta_rule", {"chunked-c4-t37", "chunked-c16-t37-state", "chunked-c64-t150",
                                         "chunked-c16-t150-r4-state", "gdn02-dk80-dv96", "gdn03-t3-h2",
                                         "one-token-state", "gdn04-whole-t5-c4", "gdn04-second-t33-c16",
                                         "strong-decay-c16-t53-state", "strong-decay-c64-t150",
                                         "mixed-fresh-continuing-c16-t37"}) | ids(
    "gated_deltanet", {"qwen3-next-t150", "gdn04-whole-t5", "gdn04-decode-t1", "second-piece-t20",
                       "strong-decay-transformers-a-t150", "mixed-fresh-continuing-t20", "rms-norm-eps-1e-3"})
#: cases that run with a given conv state of more than one column (K > 2)
CONV_STATE = ids("causal_conv1d", {"state-k4", "gdn06-decode-t1", "state-t2-shorter-than-history",
                                   "mixed-fresh-continuing-k4"}) | ids(
    "gated_deltanet", {"gdn04-decode-t1", "second-piece-t20", "mixed-fresh-continuing-t20"})
#: chunked cases whose decays leave float32's exp range within a chunk (g in [-30, -1], A ~ U(0.01, 16))
STRONG_CHUNKED = ids("gated_delta_rule", {"strong-decay-c16-t53-state", "strong-decay-c64-t150"}) | ids(
    "gated_deltanet", {"strong-decay-transformers-a-t150"})
#: batches of a fresh sequence (row 0: zero states) beside a continuing one
MIXED_BATCH = ids("gated_delta_rule", {"mixed-fresh-continuing-c16-t37", "mixed-fresh-continuing-recurrent-t5"}) | ids(
    "causal_conv1d", {"mixed-fresh-continuing-k4"}) | ids("gated_deltanet", {"mixed-fresh-continuing-t20"})
#: the layer case whose rms_norm_eps (1e-3) differs from the L2 norm's eps (1e-6)
EPS_APART = ids("gated_deltanet", {"rms-norm-eps-1e-3"})
#: delta-rule and layer cases with T != Hv (T == Hv hides GDN-03: gdn04-first-t4, gdn04-prefill-t4)
T_NOT_H = (ids("gated_delta_rule", DELTA - {"gdn04-first-t4"}) | ids("gated_deltanet", LAYER - {"gdn04-prefill-t4"}))

#: factory -> (what it gets wrong, the cases that must fail; every other case must pass)
EXPECTED = {
    "decay_after_update": ("decay after the update", ids("gated_delta_rule", DELTA) | ids("gated_deltanet", LAYER)),
    "beta_missing_from_erase": ("beta not in the erase term", ids("gated_delta_rule", DELTA) | ids("gated_deltanet",
                                                                                                   LAYER)),
    "gdn07_recurrence_in_float16": ("GDN-07", ids("gated_delta_rule", DELTA) | ids("gated_deltanet", LAYER)),
    "query_not_scaled": ("q not scaled", ids("gated_delta_rule", DELTA) | ids("gated_deltanet", LAYER)),
    "key_heads_tiled": ("key heads tiled", GROUPED),
    "gdn04_padding_updates_state": ("GDN-04", PARTIAL_CHUNK),
    "gdn03_state_sized_by_length": ("GDN-03", T_NOT_H),
    "decay_without_softplus": ("g without softplus", ids("gated_deltanet", LAYER)),
    "decay_without_dt_bias": ("g without dt_bias", ids("gated_deltanet", LAYER)),
    "no_l2_norm": ("no L2 norm of q, k", ids("gated_deltanet", LAYER)),
    "gdn06_conv_state_time_major": ("GDN-06", CONV_STATE),
    "conv_off_by_one": ("conv window off by one", ids("causal_conv1d", CONV) | ids("gated_deltanet", LAYER)),
    "gated_norm_one_plus_w": ("gated norm 1 + w", ids("gated_rms_norm", NORM) | ids("gated_deltanet", LAYER)),
    "gated_norm_silu_before_norm": ("gate before the norm", ids("gated_rms_norm", NORM) | ids("gated_deltanet",
                                                                                             LAYER)),
    # the recurrent strong-decay case has no chunk: only the chunked ones overflow
    "ratio_decay": ("pairwise decay as exp(gamma_r) exp(-gamma_s)", STRONG_CHUNKED),
    "has_initial_state_from_row0": ("has_initial_state from row 0", MIXED_BATCH),
    "gated_norm_eps_fixed": ("gated norm eps 1e-6", EPS_APART),
    "l2_norm_eps_from_rms_norm_eps": ("L2 eps = rms_norm_eps", EPS_APART),
    # every layer case has Hk > 1, where the groups per key head and contiguous blocks differ
    "split_contiguous": ("projections split contiguously", ids("gated_deltanet", LAYER)),
    "split_ba_contiguous": ("b / a split contiguously", ids("gated_deltanet", LAYER)),
    "conv_channels_grouped": ("conv channels per key head", ids("gated_deltanet", LAYER)),
}
#: the mistake raises instead of returning a wrong answer (a broadcast error where T != H): "error" counts
CRASHES = {"gdn03_state_sized_by_length"}
#: the mistake turns outputs into NaN / inf (status "nan"), or, where no NaN reaches them, wrong ones
NANS = {"ratio_decay"}
#: float64 verdicts that differ from float32's: the chunk-16 case's cumulative log-decay (about -250)
#: overflows exp in float32 (beyond -88) but not in float64 (beyond -709); the chunk-64 ones do both
FLOAT64_MUST_FAIL = {"ratio_decay": STRONG_CHUNKED - ids("gated_delta_rule", {"strong-decay-c16-t53-state"})}


@pytest.fixture(scope="session")
def gdn_golden_dir(tmp_path_factory) -> Path:
    """The op cases of ``tools/golden_cases/gdn_ops.py``, written by the golden generator."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens
    from golden_cases import gdn_ops

    out = tmp_path_factory.mktemp("gdn_golden")
    with tempfile.TemporaryDirectory() as scratch:
        _, files = make_goldens.generate(Path(scratch), gdn_ops.CASES)
    for path, data in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out


def run_ops(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / f"{dtype}.json"
    result = CliRunner().invoke(cli, ["run", "--backend", backend, "--dtype", dtype, "--level", "op",
                                      "--golden-dir", str(golden_dir), "--report", str(report)])
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def test_corpus_is_the_one_these_tests_name(gdn_golden_dir):
    from conformance.manifest import load_manifest

    assert {case.id for case in load_manifest(gdn_golden_dir)} == ALL


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reference_passes_every_case(gdn_golden_dir, tmp_path, dtype):
    result, by_case = run_ops(gdn_golden_dir, tmp_path, "refimpl", dtype)
    assert result.exit_code == 0 and {entry["status"] for entry in by_case.values()} == {"passed"}


def check(golden_dir, tmp_path, factory, dtype):
    what, must_fail = EXPECTED[factory]
    if dtype == "float64":
        must_fail = FLOAT64_MUST_FAIL.get(factory, must_fail)
    result, by_case = run_ops(golden_dir, tmp_path, f"broken_gdn_op_backends:{factory}", dtype)
    assert result.exit_code == 1, f"{what}: {factory} passed the op suite:\n{result.output}"
    bad = {"failed", "error"} if factory in CRASHES else {"failed", "nan"} if factory in NANS else {"failed"}
    failing = {case for case, entry in by_case.items() if entry["status"] != "passed"}
    wrong_status = {case: by_case[case]["status"] for case in must_fail if by_case[case]["status"] not in bad}
    assert not wrong_status, f"{factory} ({what}): expected failures missing: {wrong_status}"
    assert failing == must_fail, f"{factory} ({what}): unrelated cases fail: {sorted(failing - must_fail)}"
    return by_case


@pytest.mark.parametrize("factory", sorted(EXPECTED))
def test_broken_gdn_backend_fails_its_cases_float32(gdn_golden_dir, tmp_path, factory):
    by_case = check(gdn_golden_dir, tmp_path, factory, "float32")
    if factory == "gdn07_recurrence_in_float16":
        # far above op_attention's float32 bound (2e-6): a float16 state is ~1e-3 off
        entry = by_case["op/gated_delta_rule/recurrent-t150"]
        assert min(c["rel_rms"] for c in entry["comparisons"].values()) > 1e-4
    if factory == "ratio_decay":
        # not a rounding difference: the overflow leaves NaN / inf in every strongly decayed case
        assert {by_case[case]["status"] for case in STRONG_CHUNKED} == {"nan"}
    if factory in ("gated_norm_eps_fixed", "l2_norm_eps_from_rms_norm_eps"):
        # each eps mix-up alone is far beyond float32 rounding (bound 2e-6)
        assert by_case["op/gated_deltanet/rms-norm-eps-1e-3"]["comparisons"]["output"]["rel_rms"] > 1e-4
    if factory == "has_initial_state_from_row0":
        # row 0 (fresh) stays right; the continuing row 1 loses its state
        entry = by_case["op/gated_delta_rule/mixed-fresh-continuing-c16-t37"]
        assert entry["comparisons"]["o"]["max_abs_index"][0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("factory", sorted(EXPECTED))
def test_broken_gdn_backend_fails_its_cases_float64(gdn_golden_dir, tmp_path, factory):
    check(gdn_golden_dir, tmp_path, factory, "float64")

