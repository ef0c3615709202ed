"""Tests of the onnxruntime backend (``conformance/backends/onnxruntime_backend.py``).

The CLI runs the backend over the op cases of its three ops in each dtype and the
statuses are the ones measured with onnxruntime 1.32: passes, "not implemented"
for what ORT's CPU kernels or ONNX attributes cannot take (with the reason), and
float16 RMSNorm rounding failures that are ORT's own, on every RMSNorm case but the
zero-weight one (see the module docstring). Each deliberately wrong variant of the adapter below changes one
graph attribute the way an adapter author could get it wrong, and the cases that
pin that attribute fail: the adapter's comparisons can fail.
"""

from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conformance.backends.onnxruntime_backend import OnnxRuntimeBackend, chunk_mask, float_attribute  # noqa: E402
from conformance.cli import cli  # noqa: E402
from conformance.manifest import read_manifest  # noqa: E402
from conformance.properties import run_properties  # noqa: E402

OPS = ("attention", "rope", "rms_norm", "rope_frequencies")
#: GroupQueryAttention needs D a multiple of 8 and Dv = D; these probes have D = 4 and Dv = S or 2.
GQA_SHAPES_REFUSED = {"op/attention/window-probe", "op/attention/window-after-cache",
                      "op/attention/window-decode-probe", "op/attention/sinks-probe"}
#: The float16 cases whose element-exact rounding ORT's RMSNormalization does not reproduce: every RMSNorm
#: case pins its cast order (``op_rounding``, docs/tolerances.md) but the one whose weight is 0 (1 + w = 1).
FLOAT16_ROUNDING_FAILURES = {"op/rms_norm/cast-then-multiply", "op/rms_norm/multiply-then-cast", "op/rms_norm/plain",
                             "op/rms_norm/one-plus-w", "op/rms_norm/per-head", "op/rms_norm/eps-dominant"}
#: float64 attention cases whose scaling (0.25) and cap (5.0) float32 attributes hold exactly.
FLOAT64_PASSING = {"op/attention/mha-odd-len", "op/attention/mqa-decode", "op/attention/chunked-probe",
                   "op/attention/chunked-after-cache", "op/attention/softcap"}


def run_ops(golden_dir, tmp_path, backend, dtype, ops=OPS, options=()):
    report = tmp_path / f"{dtype}.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--level", "op", "--golden-dir", str(golden_dir),
            "--report", str(report), "-o", "threads=1", *options]
    for op in ops:
        args += ["--op", op]
    result = CliRunner().invoke(cli, args)
    assert report.exists(), result.output
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def statuses(by_case, status):
    return {case for case, entry in by_case.items() if entry["status"] == status}


@pytest.fixture(scope="module")
def op_cases(golden_dir):
    """Ids of the corpus' op cases of the three ops the backend runs."""
    return {case.id for case in read_manifest(golden_dir).cases if case.level == "op" and case.op in OPS[:3]}


# The real backend over the corpus

@pytest.mark.parametrize("prefer", ["onnx", "contrib"])
def test_float32_passes_all_but_the_refused_shapes(golden_dir, tmp_path, op_cases, prefer):
    result, by_case = run_ops(golden_dir, tmp_path, "onnxruntime", "float32", options=("-o", f"prefer={prefer}"))
    assert result.exit_code == 0, result.output
    assert statuses(by_case, "passed") == op_cases - GQA_SHAPES_REFUSED
    refused = statuses(by_case, "not implemented") - {c for c in by_case if c.startswith("op/rope_frequencies/")}
    assert refused == GQA_SHAPES_REFUSED
    assert "GroupQueryAttention" in by_case["op/attention/window-probe"]["message"]
    assert "D=4" in by_case["op/attention/window-probe"]["message"]
    assert "does not implement op 'rope_frequencies'" in by_case["op/rope_frequencies/llama3"]["message"]


def test_float16_fails_only_the_rms_norm_rounding_cases(golden_dir, tmp_path, op_cases):
    result, by_case = run_ops(golden_dir, tmp_path, "onnxruntime", "float16", ops=OPS[:3])
    assert result.exit_code == 1, result.output
    assert statuses(by_case, "failed") == FLOAT16_ROUNDING_FAILURES
    for case in FLOAT16_ROUNDING_FAILURES:
        assert "rounding" in by_case[case]["message"]
        # Within the float16 tolerance: only the element-exact rounding check fails.
        assert by_case[case]["comparisons"]["output"]["rel_rms"] < 2e-3
    assert statuses(by_case, "passed") == op_cases - GQA_SHAPES_REFUSED - FLOAT16_ROUNDING_FAILURES


def test_the_shipped_float16_xfail_file_lists_exactly_those_cases(golden_dir, tmp_path):
    xfail = ROOT / "conformance" / "backends" / "onnxruntime_float16.xfail"
    result, by_case = run_ops(golden_dir, tmp_path, "onnxruntime", "float16", ops=("rms_norm",),
                              options=("--xfail-file", str(xfail)))
    assert result.exit_code == 0, result.output
    assert statuses(by_case, "xfailed") == FLOAT16_ROUNDING_FAILURES


def test_float64_runs_only_what_float32_attributes_can_carry(golden_dir, tmp_path, op_cases):
    result, by_case = run_ops(golden_dir, tmp_path, "onnxruntime", "float64", ops=OPS[:3])
    assert result.exit_code == 0, result.output
    assert statuses(by_case, "passed") == FLOAT64_PASSING
    assert statuses(by_case, "not implemented") == op_cases - FLOAT64_PASSING
    assert "float32" in by_case["op/attention/gqa-prime-len"]["message"]  # scaling 8 ** -0.5
    assert "float32" in by_case["op/rms_norm/plain"]["message"]  # eps 1e-6
    assert "RotaryEmbedding" in by_case["op/rope/rotate-half"]["message"]
    assert "GroupQueryAttention" in by_case["op/attention/window-1"]["message"]


def test_bfloat16_is_not_implemented_on_the_cpu(golden_dir, tmp_path, op_cases):
    result, by_case = run_ops(golden_dir, tmp_path, "onnxruntime", "bfloat16", ops=OPS[:3])
    assert result.exit_code == 1, result.output  # nothing could be checked
    assert statuses(by_case, "not implemented") == op_cases
    for case in ("op/rope/rotate-half", "op/rms_norm/plain", "op/attention/mha-odd-len"):
        assert "CPU cannot run" in by_case[case]["message"] and "bfloat16" in by_case[case]["message"]


# Deliberately wrong adapters

class WrongInterleaved(OnnxRuntimeBackend):
    """RotaryEmbedding's ``interleaved`` flag inverted."""

    def _rope_attributes(self, layout, heads, rotary_dim, head_dim):
        attributes = super()._rope_attributes(layout, heads, rotary_dim, head_dim)
        return {**attributes, "interleaved": 1 - attributes["interleaved"]}


class WindowAsLeftContext(OnnxRuntimeBackend):
    """``local_window_size = W - 1``, reading the attribute as the keys left of the query."""

    def _gqa_attributes(self, heads, kv_heads, scale, softcap, window):
        return super()._gqa_attributes(heads, kv_heads, scale, softcap, None if window is None else window - 1)


class EpsilonIgnored(OnnxRuntimeBackend):
    """RMSNormalization with ``epsilon`` 0."""

    def _rms_attributes(self, eps, dtype):
        return {**super()._rms_attributes(eps, dtype), "epsilon": 0.0}


class TopLeftCausal(OnnxRuntimeBackend):
    """All S keys as ``K`` with no past: ONNX's causal mask then aligns top-left (query i sees keys 0..i)."""

    def _past_length(self, queries, keys):
        return 0


ROPE_CASES = {"op/rope/rotate-half", "op/rope/interleaved", "op/rope/partial-odd-pairs",
              "op/rope/partial-interleaved", "op/rope/cache-offsets", "op/rope/linear-global",
              "op/rope/linear-long", "op/rope/llama3-long", "op/rope/llama3-factor32", "op/rope/yarn-long",
              "op/rope/yarn-mscale", "op/rope/yarn-gpt-oss"}
#: wrong adapter -> the cases it must fail (at float32); every other case of its op keeps passing.
BROKEN = {
    "WrongInterleaved": ("rope", ROPE_CASES),
    "WindowAsLeftContext": ("attention", {"op/attention/window-1", "op/attention/window-random",
                                          "op/attention/window-decode-gqa", "op/attention/sinks-window"}),
    # eps 0 instead of 1e-6 moves the output by eps / (2 ms) relative: by far on the eps-dominant case, and
    # by 10-17 float32 ULPs where the mean squares are near 1, past the 4-ULP window of the reference's own
    # float32 result (docs/tolerances.md); the cast-order cases (x ~ 3, mean squares ~ 9) stay within 3.
    "EpsilonIgnored": ("rms_norm", {"op/rms_norm/eps-dominant", "op/rms_norm/plain", "op/rms_norm/one-plus-w",
                                    "op/rms_norm/zero-offset-weight", "op/rms_norm/per-head"}),
    "TopLeftCausal": ("attention", {"op/attention/mqa-decode", "op/attention/chunked-after-cache",
                                    "op/attention/mla-absorbed-decode-shape", "op/attention/mla-extend-after-cache"}),
}


@pytest.mark.parametrize("factory", sorted(BROKEN))
def test_wrong_adapter_fails_the_cases_that_pin_its_attribute(golden_dir, tmp_path, factory):
    op, must_fail = BROKEN[factory]
    result, by_case = run_ops(golden_dir, tmp_path, f"{__name__}:{factory}", "float32", ops=(op,))
    assert result.exit_code == 1, f"{factory} passed:\n{result.output}"
    assert statuses(by_case, "failed") == must_fail
    assert not statuses(by_case, "error")


# supports(), options, helpers

def test_supports_gives_reasons_for_model_cases_and_dtypes_without_kernels(golden_dir):
    backend = OnnxRuntimeBackend(threads=1)
    cases = read_manifest(golden_dir).cases
    model = next(case for case in cases if case.level == "model")
    reason = backend.supports(model, "float32")
    assert isinstance(reason, str) and "ONNX export" in reason
    attention = next(case for case in cases if case.level == "op" and case.op == "attention")
    assert backend.supports(attention, "float16") is True
    assert backend.supports(attention, "float64") is True
    # A dtype no graph of the op runs in is refused up front (ORT's message), so `matrix` shows it.
    rope = next(case for case in cases if case.level == "op" and case.op == "rope")
    assert "RotaryEmbedding in float64" in backend.supports(rope, "float64")
    assert "GroupQueryAttention in bfloat16" in backend.supports(attention, "bfloat16")


@pytest.mark.parametrize("option, message", [("prefer=tensorrt", "option prefer must be one of onnx, contrib"),
                                             ("threads=many", "option threads must be an integer")])
def test_bad_options_are_one_line_errors(golden_dir, option, message):
    result = CliRunner().invoke(cli, ["run", "--backend", "onnxruntime", "-o", option, "--level", "op",
                                      "--golden-dir", str(golden_dir), "--op", "rms_norm"])
    assert result.exit_code == 2 and message in result.output


def test_float_attributes_refuse_float64_values_float32_cannot_hold():
    assert float_attribute("scaling", 0.25, "float64") == 0.25
    with pytest.raises(NotImplementedError, match="float32"):
        float_attribute("scaling", 8 ** -0.5, "float64")
    assert float_attribute("scaling", 8 ** -0.5, "float32") == float(np.float32(8 ** -0.5))


def test_chunk_mask_uses_absolute_positions_of_the_last_queries():
    # 2 queries at positions 4, 5 of 6 keys, chunks of 3: both see keys 3..5 (causality comes from is_causal).
    assert chunk_mask(2, 6, 3).tolist() == [[False] * 3 + [True] * 3] * 2


def test_attention_sink_and_window_properties_hold_on_group_query_attention():
    names = ["attention_causal", "attention_window_locality", "attention_sink_takes_mass", "rope_relative_position",
             "rms_norm_eps_in_root"]
    results = run_properties(OnnxRuntimeBackend(threads=1).ops, dtype="float32", profile="quick", names=names)
    for r in results:
        assert r.status.value == "passed", f"{r.name}: {r.message} [{r.example}]"
