"""The one place where numba and numba-cuda are imported.

Every kernel module imports ``cuda`` and the scalar types from here, so that moving to
numba-cuda's successor (numba-cuda-mlir) is a change of this file only.

``NUMBA_ENABLE_CUDASIM=1`` (read by numba when it is first imported) runs every kernel in
numba's CUDA simulator on the CPU: each CUDA thread becomes a Python thread, about a
millisecond each, so only small shapes are practical there.

Raises:
    RefimplError: numba / numba-cuda are not installed (``pip install 'llm-refimpl[cuda]'``).
"""

from __future__ import annotations

from ..errors import RefimplError

try:
    import numba
    from numba import cuda
    from numba import float32, float64, int32, int64, uint8  # noqa: F401  (re-exported)
    from numba.core.types import float16  # noqa: F401  (re-exported)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise RefimplError(
        f"refimpl.kernels needs numba and numba-cuda ({exc}); install them with pip install 'llm-refimpl[cuda]'"
    ) from None

#: True when numba runs kernels in its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
SIMULATOR: bool = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _lock_simulator_shared_arrays() -> None:
    """Make the simulator's ``cuda.shared.array`` allocation atomic.

    numba-cuda's simulator (``simulator/kernelapi.py``, ``FakeCUDAShared.array``, checked in
    0.30.4) keys a block's shared arrays by the caller's source line and creates one with an
    unlocked check-then-insert. Two simulated threads of the first block of a launch can both
    miss and each get a private copy, so "shared" writes of one are unseen by the other: a
    wrong result that depends on thread timing (seen under CPU load with a short interpreter
    switch interval). The same lookup under a lock; nothing changes on a real GPU.
    """
    import sys
    import threading
    import traceback

    import numpy as np
    from numba.cuda.simulator import kernelapi

    types, numpy_support = kernelapi.types, kernelapi.numpy_support  # the simulator's own

    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer for every such array, as in the original
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=self._dynshared_size // dtype.itemsize)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2])
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _lock_simulator_shared_arrays()

__all__ = ["SIMULATOR", "cuda", "float16", "float32", "float64", "int32", "int64", "uint8",
           "gpu_available", "compile_ptx", "numba_versions"]


def gpu_available() -> bool:
    """True when kernels can run: a real CUDA GPU is visible, or the simulator is on."""
    if SIMULATOR:
        return True
    try:
        return bool(cuda.is_available())
    except Exception:  # a driver that fails to load is "no GPU", not a crash
        return False


def compile_ptx(kernel, signature: str, cc: tuple[int, int] = (9, 0)) -> str:
    """PTX text of ``kernel`` (a ``cuda.jit`` dispatcher or its Python function) for ``signature``.

    Needs numba-cuda's NVVM (the ``[cu12]`` / ``[cu13]`` extra) but no GPU; unavailable under
    the simulator (raises RefimplError there).
    """
    if SIMULATOR:
        raise RefimplError("compile_ptx: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); PTX needs the real compiler")
    pyfunc = getattr(kernel, "py_func", kernel)
    ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=cc)
    return ptx


def numba_versions() -> dict[str, str]:
    """Versions of numba and numba-cuda, for reports."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"numba": numba.__version__}
    try:
        out["numba-cuda"] = version("numba-cuda")
    except PackageNotFoundError:
        out["numba-cuda"] = "unknown"
    out["simulator"] = str(SIMULATOR)
    return out
