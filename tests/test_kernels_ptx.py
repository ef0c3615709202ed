"""Every kernel of refimpl.kernels compiles to PTX for sm_90 without a GPU (issue 7).

The CUDA simulator runs kernels as Python, so typing errors and float64 promotions pass
there unseen; ``python -m refimpl.kernels.ptx_check`` runs numba's type inference and NVVM
on each kernel with its declared signatures. These tests run it in a subprocess with the
simulator off (tests/conftest.py turns it on for this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # about 3 min of CPU: .ci/run runs `python -m refimpl.kernels.ptx_check` itself, after the tests
def test_every_kernel_compiles_to_sm90_ptx_in_float32():
    from refimpl.kernels import KERNEL_MODULES

    proc = _run(["-m", "refimpl.kernels.ptx_check", "--cc", "9.0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert lines and all(line.startswith("ok") for line in lines), proc.stdout
    # Every kernel module contributes at least one kernel.
    for module in KERNEL_MODULES:
        assert any(f" {module}." in line for line in lines), f"no kernel of refimpl.kernels.{module} was compiled"
    assert proc.stdout.strip().endswith("0 failure(s)")


def test_the_check_catches_a_typing_error_and_a_float64_promotion():
    script = textwrap.dedent('''
        from refimpl.kernels._numba import cuda, compile_ptx
        from refimpl.kernels.ptx_check import F64_ARITHMETIC

        def promoted(x, out):
            i = cuda.grid(1)
            if i < x.shape[0]:
                out[i] = x[i] * 0.1 + 1.0  # Python floats: float64 arithmetic

        def clean(x, out):
            i = cuda.grid(1)
            if i < x.shape[0]:
                out[i] = x[i] * x[i]

        def mistyped(x, out):
            i = cuda.grid(1)
            out[i] = x[i].no_such_attribute

        sig = "void(float32[::1], float32[::1])"
        print("promoted", len(F64_ARITHMETIC.findall(compile_ptx(promoted, sig))))
        print("clean", len(F64_ARITHMETIC.findall(compile_ptx(clean, sig))))
        try:
            compile_ptx(mistyped, sig)
        except Exception as exc:
            print("mistyped raised", type(exc).__name__)
    ''')
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.split()[0] in ("promoted", "clean"))
    assert int(counts["promoted"]) > 0 and int(counts["clean"]) == 0, proc.stdout
    assert "mistyped raised TypingError" in proc.stdout, proc.stdout


def test_ptx_check_refuses_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-m", "refimpl.kernels.ptx_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "NUMBA_ENABLE_CUDASIM" in proc.stderr
