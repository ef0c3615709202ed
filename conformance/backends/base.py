"""What a backend is: the protocol every adapter implements.

The suite knows no engine. A backend is an object with

* ``name``: a short string shown in reports (``"refimpl"``, ``"transformers"``);
* ``supports(case, dtype)``: ``True``, or a string saying why this case or dtype is
  not implemented (reported as status "not implemented", not as a failure);
* ``load_model(checkpoint_dir, dtype)``: a :class:`LoadedModel` for a Hugging Face
  checkpoint directory (``config.json`` + safetensors, float32 weights); a backend
  without it reports every model case as not implemented;
* ``ops`` (op level, optional): a mapping from op name (``refimpl.ops.OPS``) to a
  callable with the reference signature: array inputs by keyword (floating ones in
  the run dtype, bfloat16 as ``ml_dtypes.bfloat16``; integer ones int64), then the
  case's keyword parameters. It returns one array or a dict of named arrays (any
  array type convertible to NumPy). An op missing from the mapping is reported as
  "not implemented". ``supports(case, dtype)`` sees the case (id, op, level) but
  not its parameters; to refuse a parameter combination (e.g. attention with
  sinks and soft-capping), raise ``NotImplementedError`` from the op, which is
  also reported as "not implemented". An op returns its result in the run dtype:
  cases that record the reference's own low-precision rounding (RMSNorm cast
  orders) compare a bfloat16/float16 result element by element;
* optionally ``package_versions() -> dict[str, str]``: versions recorded in the
  JSON report (see :func:`package_versions`).

A :class:`LoadedModel` maps token ids to a :class:`BackendOutput`. The runner
compares the logits and whichever taps the backend returns; tap names are those
of the golden corpus: ``"embed"`` (token embeddings), ``"layers.{l}"`` (output of
decoder layer ``l``) and ``"norm"`` (final-normalised hidden state), each
``(B, T, M)``. Any array dtype is accepted; errors are measured in float64.

Multi-token prediction: a model case whose manifest has ``mtp_depths`` D > 0 also
compares the draft logits of the checkpoint's MTP depths, which a backend returns as
``BackendOutput.mtp_logits`` (a list of D arrays, depth k ``(B, T-k, V)``, row i
predicting ``t_{i+k+1}``; ``refimpl.mtp``). A backend that cannot compute them should
refuse such cases in ``supports`` (``case.mtp_depths``); one that returns no
``mtp_logits`` for them gets "not implemented" too, never "failed".

Scenario cases (level ``"scenario"``, ``docs/scenarios.md``) need the optional
incremental capability of :class:`IncrementalModel`: a loaded model that also has
``prefill(input_ids, attention_mask) -> (logits, state)``, ``decode(input_ids, state) ->
(logits, state)`` and ``rollback(state, num_tokens) -> state``. A loaded model without
them, a ``supports`` that refuses the case, or a call raising ``NotImplementedError``
make the scenario "not implemented", never "failed".

Exceptions raised by ``load_model`` or ``run`` mark that case as "error" and the run
continues, except :class:`conformance.errors.BackendError`, which means the backend
itself cannot work (for example a missing package) and stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..manifest import Case

#: dtype names a backend may be asked to run in.
DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class BackendOutput:
    """What a backend returns for input ids ``(B, T)``.

    Attributes:
        logits: ``(B, T, V)``.
        hidden_states: ``None`` or ``{tap name: (B, T, M)}``.
        mtp_logits: ``None`` or the multi-token-prediction draft logits, one array per
            depth k = 1..D, ``(B, T-k, V)``.
    """

    logits: np.ndarray
    hidden_states: dict[str, np.ndarray] | None = None
    mtp_logits: list[np.ndarray] | None = None


class LoadedModel(Protocol):
    """A model loaded by a backend, ready to run."""

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        """Forward pass on int64 token ids ``(B, T)``."""
        ...


class IncrementalModel(LoadedModel, Protocol):
    """A loaded model that can also run a scenario's schedule (optional; see the module docstring).

    ``state`` is the backend's own object (a cache, a handle); the runner only passes back
    what the previous call returned, so a backend may update it in place. Logits may be any
    array type (``(B, n, V)``); values at pad slots are ignored.
    """

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None):
        """The prompt: int64 ids ``(B, n)``; ``attention_mask`` int64 ``(B, n)`` with 0 on
        leading pad slots, or None when nothing is padded. A real token's position is
        ``cumsum(attention_mask) - 1`` along its row. Returns ``(logits (B, n, V), state)``."""
        ...

    def decode(self, input_ids: np.ndarray, state):
        """n >= 1 new tokens per row ``(B, n)``, attending to everything kept and causally to
        each other (a decode, a chunked-prefill piece or a speculative verification), each
        row continuing from its own next position. Returns ``(logits (B, n, V), state)``."""
        ...

    def rollback(self, state, num_tokens: int):
        """``state`` as if the last ``num_tokens`` tokens (at most those of the last call) had
        never been fed: caches, windows and recurrent states included. Returns the state."""
        ...


@runtime_checkable
class Backend(Protocol):
    """An engine adapter; see the module docstring."""

    name: str

    def supports(self, case: Case, dtype: str) -> bool | str:
        """``True``, or the reason this case/dtype is not implemented."""
        ...

    def load_model(self, checkpoint_dir: Path, dtype: str) -> LoadedModel:
        """Load a checkpoint directory to run in ``dtype`` (one of :data:`DTYPES`)."""
        ...


def package_versions(backend: Backend) -> dict[str, str]:
    """The backend's ``package_versions()`` as strings, or ``{}`` if it does not define one.

    A failing or malformed ``package_versions()`` is recorded under the key
    ``"error"`` instead of stopping the report.
    """
    versions = getattr(backend, "package_versions", None)
    if not callable(versions):
        return {}
    try:
        return {str(k): str(v) for k, v in dict(versions()).items()}
    except Exception as exc:
        return {"error": f"package_versions() failed: {type(exc).__name__}: {exc}"}
