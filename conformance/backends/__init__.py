"""Backend adapters and how a backend is chosen by name.

Built-in backends are imported only when asked for, so that the suite runs
without torch unless the transformers backend is used.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

from ..errors import BackendError
from .base import Backend, BackendOutput, IncrementalModel, LoadedModel

#: Built-in backend names and the ``module:factory`` each stands for.
BUILTINS = {
    "refimpl": "conformance.backends.refimpl_backend:RefimplBackend",
    "transformers": "conformance.backends.transformers_backend:TransformersBackend",
    "torch": "conformance.backends.torch_backend:TorchBackend",
    "onnxruntime": "conformance.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "numba": "conformance.backends.numba_backend:NumbaBackend",
}

#: The xfail files a built-in backend owns (its accepted, documented deviations), applied by
#: ``run`` unless ``--no-backend-xfail``: the suite's tolerances stay the same for every backend.
OWN_XFAIL_FILES = {
    "transformers": (Path(__file__).resolve().parent / "transformers.xfail",),
}

__all__ = ["BUILTINS", "OWN_XFAIL_FILES", "Backend", "BackendOutput", "IncrementalModel", "LoadedModel", "resolve_backend"]


def resolve_backend(spec: str, options: dict[str, str]) -> Backend:
    """Create the backend named by ``spec``, passing ``options`` as keyword arguments.

    Args:
        spec: a built-in name (see :data:`BUILTINS`) or ``package.module:factory``
            (importable from ``sys.path`` or the current directory).
        options: ``{key: value}`` strings from the command line.

    Raises:
        BackendError: unknown name (the built-ins are listed), the module fails to
            import, the factory is missing, rejects the options, or returns an
            object lacking ``name``, ``supports``, or both ``load_model`` and ``ops``.
    """
    if ":" not in spec and spec not in BUILTINS:
        raise BackendError(
            f"unknown backend '{spec}'; built-ins: {', '.join(BUILTINS)}; or give package.module:factory"
        )
    module_name, _, attr = BUILTINS.get(spec, spec).partition(":")
    if not module_name or not attr:
        raise BackendError(f"backend '{spec}' must be package.module:factory")
    # Like `python -m`, let a module in the current directory be named directly.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise BackendError(f"backend '{spec}': cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BackendError(f"backend '{spec}': module {module_name} has no callable '{attr}'")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise BackendError(f"backend '{spec}' rejected options {sorted(options)}: {exc}") from None
    except ValueError:
        pass  # no introspectable signature (builtins): let the call decide
    try:
        backend = factory(**options)
    except BackendError:
        raise
    except (Exception, SystemExit) as exc:
        raise BackendError(f"backend '{spec}': {attr}() failed ({type(exc).__name__}: {exc})") from None
    missing = [a for a in ("name", "supports") if not hasattr(backend, a)]
    try:
        ops = getattr(backend, "ops", None)
    except Exception as exc:
        raise BackendError(f"backend '{spec}': reading its ops failed ({type(exc).__name__}: {exc})") from None
    if not hasattr(backend, "load_model") and ops is None:
        missing.append("load_model or ops")
    if missing:
        raise BackendError(f"backend '{spec}': {attr}() returned an object without {', '.join(missing)}")
    return backend
