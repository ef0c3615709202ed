"""bench/gpu_kernels.py: says "no GPU" on a CPU, runs every row at tiny sizes in the CUDA simulator,
fails a row whose kernel is wrong, and accounts bytes and FLOP as its docstring says.

Never a timing: the numbers belong to a GPU run (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_kernels.py"
ROWS = ["decode-4k", "decode-32k", "prefill-4k", "moe-n1", "moe-n64", "gdn-decode", "decode-4k-b8", "gdn-decode-b8",
        "gdn-chunked-4k", "mla-decode-32k"]
HEADER = ["row", "check", "max rel RMS", "kernel", "rate", "of ceiling", "target", "torch", "torch/kernel"]
NO_GPU = "no CUDA GPU present: nothing measured ("
#: A machine with an NVIDIA driver would run the real benchmark instead of saying "no GPU".
HAS_NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()


def run_script(*args: str, simulator: bool, extra_env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def bench():
    """The script as a module (this process runs the CUDA simulator: tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location("gpu_kernels_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="an NVIDIA driver is present: the script would benchmark")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_script("--out", str(out), simulator=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(NO_GPU + "numba: ") and lines[0].endswith(")"), lines[0]
    assert not out.exists()


def test_without_numba_it_says_so_and_exits_0(tmp_path):
    # a numba package that fails to import, ahead of the real one on the path
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise ImportError('numba hidden by the test')\n")
    done = run_script(simulator=False, extra_env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"{NO_GPU}refimpl.kernels needs numba and numba-cuda (numba hidden by the test); install them with "
        "pip install 'llm-refimpl[cuda]')"]


def test_the_simulator_runs_only_tiny_sizes():
    done = run_script("--quick", simulator=True, timeout=120)
    assert done.returncode == 2 and "only --tiny runs there" in done.stderr, done.stderr[-2000:]
    assert done.stdout == ""


def test_the_fma_peak_kernel_compiles_to_float32_fma_chains():
    """The float32 ceiling counts 16 FLOP per iteration: 8 fma.rn.f32 per iteration, no float64."""
    script = (
        "import importlib.util\n"
        "from refimpl.kernels._numba import compile_ptx\n"
        "from refimpl.kernels.ptx_check import F64_ARITHMETIC\n"
        f"spec = importlib.util.spec_from_file_location('gk', {str(SCRIPT)!r})\n"
        "gk = importlib.util.module_from_spec(spec); spec.loader.exec_module(gk)\n"
        "ptx = compile_ptx(gk.fma_peak, gk.FMA_SIGNATURE)\n"
        "print(ptx.count('fma.rn.f32'), len(F64_ARITHMETIC.findall(ptx)))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    fmas, f64 = map(int, done.stdout.split())
    # the loop body, unrolled by NVVM, holds a multiple of the 8 chains
    assert fmas >= 8 and fmas % 8 == 0 and f64 == 0, done.stdout


def table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == HEADER, stdout
    return [dict(zip(HEADER, row, strict=True)) for row in cells[2:]]


@pytest.mark.slow
def test_tiny_run_in_the_simulator_checks_and_times_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_script("--tiny", "--out", str(out), simulator=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = table(done.stdout)
    assert [r["row"] for r in printed] == ROWS
    assert all(r["check"] == "ok" and r["of ceiling"] == "n/a (simulator)" for r in printed), done.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["device"]["simulator"] is True
    assert [r["row"] for r in report["rows"]] == ROWS
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["check"] and all(c["nonfinite"] == 0 and not c["violations"] for c in row["check"]), row
        assert row["time"]["median_s"] > 0 and row["bytes"] > 0 and row["flop"] > 0, row
        # torch runs on the CPU under the simulator: checked like the kernel, never compared
        assert row["torch"]["status"] == "ok" and "torch_over_kernel" not in row, row["torch"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVIDIA_DRIVER, reason="needs an NVIDIA GPU")
def test_on_a_gpu_every_row_checks_ok_against_measured_ceilings(tmp_path):
    """The whole wiring on a real GPU at tiny sizes (seconds, plus JIT compilation): events,
    ceilings, torch on CUDA. The full run is the benchmark itself, not a test."""
    out = tmp_path / "gpu.json"
    done = run_script("--tiny", "--out", str(out), simulator=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ceilings"]["copy_bandwidth"]["ceiling_gb_s"] > 100
    assert report["ceilings"]["fp32_peak"]["ceiling_tflop_s"] > 1
    assert [r["row"] for r in report["rows"]] == ROWS
    for row in report["rows"]:
        assert row["status"] == "ok" and row["time"]["clock"] == "cuda events", row
        assert 0 < row["fraction_of_ceiling"] and "target_met" not in row, row


def _fake_device(bench):
    dev = bench.Device(bench._numba, "tiny")
    dev.torch, dev.torch_device, dev.torch_note = None, None, "disabled by the test"
    return dev


def test_a_kernel_that_writes_nothing_or_a_wrong_value_is_wrong_and_a_right_one_is_ok(bench, monkeypatch):
    from refimpl.linear_attention.delta_rule import gated_delta_rule_recurrent

    def right(q, k, v, g, beta, state, out, *, scale):
        host = [a.copy_to_host() for a in (q, k, v, g, beta, state)]
        o, s = gated_delta_rule_recurrent(*host[:5], initial_state=host[5], scale=scale)
        out.copy_to_device(o)
        state.copy_to_device(s)

    def off_by_one_token(q, k, v, g, beta, state, out, *, scale):
        right(q, k, v, g, beta, state, out, scale=scale)
        out.copy_to_device(np.roll(out.copy_to_host(), 1, axis=1))

    def one_element_unwritten(q, k, v, g, beta, state, out, *, scale):
        right(q, k, v, g, beta, state, out, scale=scale)
        host = out.copy_to_host()
        host[0, 2, 1, 3] = np.nan
        out.copy_to_device(host)

    dev = _fake_device(bench)
    gdn = bench.GdnDecode(batch=1, tokens=3, key_heads=1, value_heads=2, key_dim=4, value_dim=4)
    status = {}
    for name, launcher in (("nothing", lambda *a, **k: None), ("rolled", off_by_one_token),
                           ("one unwritten", one_element_unwritten), ("right", right)):
        monkeypatch.setattr(bench, "_load_launcher", lambda _b, f=launcher: (types.SimpleNamespace(
            launch_recurrent=f), None))
        row = bench.run_row(dev, name, gdn, [], "tiny", np.random.default_rng(0))
        status[name] = (row["status"], [c["nonfinite"] for c in row["check"]])
    assert status == {"nothing": ("WRONG", [24, 0]), "rolled": ("WRONG", [0, 0]), "one unwritten": ("WRONG", [1, 0]),
                      "right": ("ok", [0, 0])}


def test_a_missing_kernel_module_is_reported_and_fails_the_run(bench):
    class Nowhere(bench.GdnDecode):
        module = "no_such_kernels"

    dev = _fake_device(bench)
    row = bench.run_row(dev, "x", Nowhere(batch=1, tokens=1, key_heads=1, value_heads=1, key_dim=4, value_dim=4), [],
                        "tiny", np.random.default_rng(0))
    assert row["status"].startswith("missing: refimpl.kernels.no_such_kernels (ModuleNotFoundError"), row


def test_accounting_of_bytes_and_flop(bench):
    rng = np.random.default_rng(0)
    decode = bench.DecodeAttention(batch=1, queries=1, keys=64, heads=4, kv_heads=2, head_dim=8)
    host = decode.inputs(rng)
    kv_cache = 2 * 64 * 2 * 8 * 4
    assert decode.nbytes(host) == kv_cache + 2 * 4 * 8 * 4 + 4 + 64 * 4
    assert decode.flops(host) == 2 * 4 * 64 * 16
    prefill = bench.PrefillAttention(batch=1, queries=5, keys=5, heads=4, kv_heads=2, head_dim=8)
    # causal T = S = 5: 15 visible (query, key) pairs, 2 (D + Dv) FLOP per pair and head
    assert prefill.flops(prefill.inputs(rng)) == 15 * 4 * 2 * 16
    moe = bench.MoeDecode(tokens=3, hidden=16, intermediate=8, experts=6, top_k=2)
    host = moe.inputs(rng)
    distinct = len(np.unique(host["indices"]))
    assert moe.nbytes(host) == distinct * 3 * 16 * 8 * 4 + 2 * 3 * 16 * 4 + 2 * 3 * 2 * 4
    assert moe.flops(host) == 6 * 3 * 2 * 16 * 8
    bench.MoeDecode._weights.clear()
    gdn = bench.GdnDecode(batch=2, tokens=1, key_heads=1, value_heads=2, key_dim=4, value_dim=8)
    host = gdn.inputs(rng)
    state = 2 * 2 * 4 * 8 * 4
    assert gdn.nbytes(host) == 2 * state + (2 * 2 * 4 + 2 * 2 * 8 * 2 + 2 * 2 * 2) * 4


def test_rates_fractions_targets_and_the_torch_ratio(bench):
    ceilings = {"copy_bandwidth": {"ceiling_gb_s": 4000.0}, "fp32_peak": {"ceiling_tflop_s": 50.0}}

    def row(bound, target, seconds, nbytes, flop, torch_s=None):
        r = {"bound": bound, "target": target, "bytes": nbytes, "flop": flop, "time": {"median_s": seconds}}
        if torch_s is not None:
            r["torch"] = {"median_s": torch_s}
        return bench.derive(r, ceilings, simulator=False)

    decode = row("bandwidth", "decode", 1e-3, 2.4e9, 1e9, torch_s=2e-3)
    assert decode["gb_s"] == pytest.approx(2400) and decode["fraction_of_ceiling"] == pytest.approx(0.6)
    assert decode["target_met"] and decode["torch_over_kernel"] == pytest.approx(2.0)
    assert not row("bandwidth", "decode", 1e-3, 2.39e9, 1e9)["target_met"]
    gdn = row("bandwidth", "gdn-decode", 1e-3, 2.0e9, 1e9)
    assert gdn["target_met"] and not row("bandwidth", "gdn-decode", 1e-3, 1.99e9, 1e9)["target_met"]
    prefill = row("fp32", "prefill", 1e-3, 1e6, 25e9)
    assert prefill["tflop_s"] == pytest.approx(25) and prefill["fraction_of_ceiling"] == pytest.approx(0.5)
    assert prefill["target_met"] and not row("fp32", "prefill", 1e-3, 1e6, 24.9e9)["target_met"]
    assert "target_met" not in row("fp32", None, 1e-3, 1e6, 1e9)
    cells = bench.table_rows([{"row": "decode-4k", "status": "ok", "check": [{"rel_rms": 3e-7}], **decode}], False)
    assert cells[1] == ["decode-4k", "ok", "3.0e-07", "1.00 ms", "2400 GB/s", "60%", ">= 60% BW: met", "2.00 ms",
                        "2.00x"]
