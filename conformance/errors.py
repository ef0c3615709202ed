"""Errors raised by the conformance suite.

Every error the suite raises on bad input derives from :class:`ConformanceError`
(itself a ``ValueError``) and carries a one-line message meant to be shown to a
user as is; the CLI prints it as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations


class ConformanceError(ValueError):
    """Base class of every input error raised by ``conformance``."""


class ManifestError(ConformanceError):
    """The golden manifest, or a file it lists, is missing, unreadable or malformed."""


class HashMismatchError(ConformanceError):
    """A golden file's sha256 differs from the one the manifest records."""


class BackendError(ConformanceError):
    """A backend cannot be resolved, imported, configured or set up."""


class OutputError(ConformanceError):
    """A backend returned something that is not a usable numeric array; marks that case "error"."""
