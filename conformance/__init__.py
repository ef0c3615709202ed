"""Conformance suite: run a backend on the golden corpus and compare with the reference.

The suite knows no backend: a backend is one named adapter (see
``conformance.backends.base``) that turns token ids into logits and, optionally,
named hidden states ("taps"). The runner compares them with the golden tensors
under the tolerances of ``conformance.tolerances`` and reports per case.

Entry points:
    ``llm-conformance`` / ``python -m conformance`` (``conformance.cli.main``)
    ``conformance.runner.run_suite(backend, cases, golden_dir, dtype)`` from Python.
"""

from .errors import BackendError, ConformanceError, HashMismatchError, ManifestError

__all__ = ["BackendError", "ConformanceError", "HashMismatchError", "ManifestError"]
__version__ = "0.1.0"
