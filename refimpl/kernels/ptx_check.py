"""Compile every kernel to PTX for a given compute capability, without a GPU.

``python -m refimpl.kernels.ptx_check [--cc 9.0]`` runs numba's type inference and NVVM on
every kernel of :func:`refimpl.kernels.kernel_table` with each of its declared signatures,
so that typing errors the CUDA simulator cannot see (it runs kernels as Python) surface
on a machine without a GPU. Prints one line per kernel and exits 1 if any fails.
It also counts double-precision arithmetic in each PTX (``add.f64``, ``fma.rn.f64``, ...):
the kernels compute in float32, and a Python float literal or an untyped division that
promotes a hot loop to float64 is a silent 2x-64x slowdown on most GPUs; any such
instruction fails the check.
Needs numba-cuda with its ``[cu12]`` or ``[cu13]`` extra; refuses to run under the simulator.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

#: Double-precision arithmetic instructions (conversions and moves are not counted).
F64_ARITHMETIC = re.compile(r"^\s*(?:add|sub|mul|fma|div|sqrt|rcp|min|max|ex2|lg2)(?:\.[a-z]+)*\.f64\b", re.MULTILINE)


def _check_one(item: tuple[str, str], cc: tuple[int, int]) -> str:
    """One report line, ``ok ...`` or ``FAIL ...``, for kernel ``item = (name, signature)``."""
    from . import kernel_table
    from ._numba import compile_ptx

    name, signature = item
    kernel = kernel_table()[name][0]
    start = time.perf_counter()
    try:
        ptx = compile_ptx(kernel, signature, cc=cc)
    except Exception as exc:  # report every kernel, then fail
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"FAIL {name} [{signature}]: {type(exc).__name__}: {first}"
    target = f".target sm_{cc[0]}{cc[1]}"
    if target not in ptx:
        return f"FAIL {name} [{signature}]: PTX does not declare {target}"
    f64 = len(F64_ARITHMETIC.findall(ptx))
    if f64:
        return (f"FAIL {name} [{signature}]: {f64} float64 arithmetic instruction(s) in the PTX "
                "(a float64 literal or promotion in a float32 kernel)")
    return (f"ok   {name} [{signature}] {len(ptx)} chars of PTX, no float64 arithmetic, "
            f"{time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refimpl.kernels.ptx_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, major.minor (default 9.0: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        print("ptx_check: unset NUMBA_ENABLE_CUDASIM; the simulator has no PTX compiler", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"ptx_check: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        major, minor = (int(p) for p in args.cc.split("."))
    except ValueError:
        print(f"ptx_check: --cc must look like 9.0, got {args.cc!r}", file=sys.stderr)
        return 2
    from . import kernel_table

    work = [(name, signature) for name, (_, signatures) in kernel_table().items() for signature in signatures]
    if args.jobs > 1 and len(work) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(args.jobs, len(work))) as pool:
            lines = list(pool.map(_check_one, work, [(major, minor)] * len(work)))
    else:
        lines = [_check_one(item, (major, minor)) for item in work]
    failures = 0
    for line in lines:
        print(line)
        failures += line.startswith("FAIL")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
