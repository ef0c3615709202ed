"""The ``numba`` backend: the reference with refimpl.kernels on its hot paths (issue 7).

Runs under numba's CUDA simulator (tests/conftest.py), on small golden cases only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refimpl
from conformance.backends import resolve_backend
from conformance.backends import numba_backend as nb
from conformance.errors import BackendError
from conformance.manifest import load_manifest
from conformance.runner import Status, run_case

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"

#: One small case per kernel family the backend puts in place.
KERNEL_CASES = {
    "attention (GQA, sliding window)": "qwen3/sliding-window",
    "attention sinks + sliding window, clamped-SwiGLU MoE": "gpt_oss/swiglu-clamp-engaged",
    "MoE dispatch (softmax top-k)": "qwen3_moe/renorm-top2-of-6",
    "MLA absorbed decode": "scenario/deepseek_v3/speculative",
    "Gated DeltaNet chunked, Qwen3-Next MoE with its shared expert": "qwen3_next/defaults-tied",
    "Gated DeltaNet recurrent (op)": "op/gated_delta_rule/mixed-fresh-continuing-recurrent-t5",
}


@pytest.fixture(scope="module", autouse=True)
def _restore_switch_interval():
    """The backend shortens the interpreter's switch interval under the simulator: undo it after."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.fixture(scope="module")
def cases():
    return {case.id: case for case in load_manifest(GOLDEN)}


@pytest.fixture(scope="module")
def backend():
    return resolve_backend("numba", {})


def test_kernels_in_place_rebinds_every_importer_and_restores():
    from refimpl import kv_cache
    from refimpl.kernels import attention as kernel_attention
    import importlib

    delta_rule = importlib.import_module("refimpl.linear_attention.delta_rule")
    gated_deltanet = importlib.import_module("refimpl.linear_attention.gated_deltanet")
    from refimpl.models import qwen3, qwen3_moe, qwen3_next

    before = (qwen3.attend_with_cache, qwen3_next.sparse_moe, gated_deltanet.gated_delta_rule_chunked)
    with nb.kernels_in_place():
        assert qwen3.attend_with_cache is kernel_attention.attend_with_cache
        assert kv_cache.attend_with_cache is kernel_attention.attend_with_cache
        assert qwen3_next.sparse_moe is qwen3_moe.sparse_moe  # both rebound to the one launcher
        assert qwen3_next.sparse_moe.__module__ == "refimpl.kernels.moe"
        assert gated_deltanet.gated_delta_rule_chunked.__module__ == "refimpl.kernels.delta_rule"
        with nb.kernels_in_place():  # nesting keeps the kernels and restores to them
            pass
        assert qwen3.attend_with_cache is kernel_attention.attend_with_cache
    assert (qwen3.attend_with_cache, qwen3_next.sparse_moe, gated_deltanet.gated_delta_rule_chunked) == before
    assert delta_rule.gated_delta_rule_recurrent.__module__ == "refimpl.linear_attention.delta_rule"


def test_every_replacement_has_the_reference_signature():
    import importlib
    import inspect

    for module_name, name, kernel_module, launcher in nb.REPLACEMENTS:
        reference = getattr(importlib.import_module(module_name), name)
        kernel = getattr(importlib.import_module(f"refimpl.kernels.{kernel_module}"), launcher)
        ours, theirs = inspect.signature(kernel).parameters, inspect.signature(reference).parameters
        assert [p.kind for p in ours.values()] == [p.kind for p in theirs.values()], name
        keywords = [n for n, p in theirs.items() if p.kind is p.KEYWORD_ONLY]
        assert keywords == [n for n, p in ours.items() if p.kind is p.KEYWORD_ONLY], name
        # Keyword-capable positional names must agree too, except where the two references
        # themselves name the argument differently (qwen3_next.sparse_moe's router is `weights`).
        if name != "sparse_moe":
            assert list(ours) == list(theirs), name


@pytest.mark.parametrize("what", sorted(KERNEL_CASES))
def test_small_cases_pass_on_the_kernels(what, cases, backend):
    case = cases[KERNEL_CASES[what]]
    assert backend.supports(case, "float32") is True, backend.supports(case, "float32")
    result = run_case(backend, case, GOLDEN, "float32")
    assert result.status is Status.PASSED, (result.status, result.message)


def test_a_wrong_kernel_fails_its_case(cases, backend, monkeypatch):
    """An attention kernel whose window is one key short must fail the sliding-window case."""
    from refimpl.kernels import attention as kernel_attention

    real = kernel_attention.attend_with_cache

    def short_window(q, k, v, context, layer, *, scale, sliding_window=None, **kw):
        return real(q, k, v, context, layer, scale=scale,
                    sliding_window=None if sliding_window is None else max(sliding_window - 1, 1), **kw)

    monkeypatch.setattr(kernel_attention, "attend_with_cache", short_window)
    result = run_case(backend, cases["qwen3/sliding-window"], GOLDEN, "float32")
    assert result.status is Status.FAILED, (result.status, result.message)


def test_supports_float32_only_and_sizes_under_the_simulator(cases, backend):
    case = cases["qwen3/sliding-window"]
    for dtype in ("float64", "float16", "bfloat16"):
        assert "float32" in backend.supports(case, dtype)
    tight = resolve_backend("numba", {"simulator_budget": "1"})
    assert "too large for the CUDA simulator" in tight.supports(case, "float32")
    assert "too large" in backend.supports(cases["qwen3/long-sequence"], "float32")  # 320 tokens
    assert backend.supports(cases["op/softmax_top_k/renormalised"], "float32") is True
    assert "softmax_top_k" not in backend.ops  # no kernel behind it: not implemented, not a self-check


def test_bad_options_are_one_line_errors():
    for bad in ("-3", "nan", "lots"):
        with pytest.raises(BackendError, match="simulator_budget"):
            resolve_backend("numba", {"simulator_budget": bad})


def test_without_a_gpu_or_the_simulator_the_backend_says_so():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "conformance", "run", "--backend", "numba", "--case",
                           "qwen3/sliding-window"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "NUMBA_ENABLE_CUDASIM=1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("op", nb.KERNEL_OPS)
def test_every_offered_op_reaches_a_kernel(op, cases, backend, monkeypatch):
    """An op the backend offers must run a kernel (else it checks the reference against itself)."""
    import importlib

    calls = []
    for _, _, kernel_module, launcher in nb.REPLACEMENTS + ((None, None, "moe", "moe_experts"),):
        module = importlib.import_module(f"refimpl.kernels.{kernel_module}")
        real = getattr(module, launcher)

        def counted(*args, _real=real, _name=launcher, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, launcher, counted)
    chosen = [c for c in cases.values() if c.level == "op" and c.op == op
              and backend.supports(c, "float32") is True and (op != "mla" or "absorbed" in c.id)]
    assert chosen, f"no small golden case of op {op}"
    result = run_case(backend, min(chosen, key=nb.simulated_cost), GOLDEN, "float32")
    assert result.status is Status.PASSED, (result.status, result.message)
    assert calls, f"op {op} passed without calling any kernel launcher"
