"""The NumPy reference (``refimpl``) as a backend.

It computes in float64 (the specification) or float32 (to measure what error a
float32 engine should expect), and runs in float16 and bfloat16 as storage dtypes with
float32 compute per component (``docs/low-precision.md``): its own error in a backend's
low-precision dtype, the yardstick of the error model. When a
checkpoint carries complete multi-token-prediction modules, ``run`` also returns their
draft logits (``BackendOutput.mtp_logits``). Scenario cases run through
``refimpl.Model.prefill`` / ``decode`` / ``rollback`` (the state is the reference's
:class:`refimpl.model.DecodeCache`); architectures without incremental decoding
(``Architecture.forward_step`` None) are not implemented for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import refimpl

from ..errors import BackendError
from ..manifest import Case
from .base import BackendOutput

DTYPES = ("float64", "float32", "float16", "bfloat16")


class RefimplModel:
    """A loaded :class:`refimpl.Model`."""

    def __init__(self, model: refimpl.Model):
        self.model = model

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        """Logits ``(B, T, V)`` and taps, in the model's dtype, for ids ``(B, T)``; the MTP
        draft logits too when the checkpoint has MTP modules."""
        out = self.model.forward(input_ids, return_hidden_states=True, return_mtp_logits=self.model.has_mtp)
        return BackendOutput(logits=out.logits, hidden_states=dict(out.hidden_states), mtp_logits=out.mtp_logits)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None):
        """``(logits (B, n, V), DecodeCache)`` of a prompt (``refimpl.Model.prefill``)."""
        return self.model.prefill(input_ids, attention_mask)

    def decode(self, input_ids: np.ndarray, state):
        """``(logits (B, n, V), DecodeCache)`` of n new tokens per row (``refimpl.Model.decode``)."""
        return self.model.decode(input_ids, state)

    def rollback(self, state, num_tokens: int):
        """The cache without the last ``num_tokens`` tokens (``refimpl.Model.rollback``)."""
        return self.model.rollback(state, num_tokens)


class RefimplBackend:
    """Backend running ``refimpl.from_pretrained`` and the ops of ``refimpl.ops``.

    Option ``-o lazy=true``: load checkpoints lazily (``from_pretrained(..., lazy=True)``:
    memory-mapped, each tensor converted when a layer needs it), for checkpoints larger
    than memory in the compute dtype.
    """

    name = "refimpl"
    lazy = False

    def __init__(self, lazy: str | bool = False):
        flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if not isinstance(lazy, bool) and str(lazy).lower() not in flags:
            raise BackendError(f"refimpl backend: option lazy must be true or false, got {lazy!r}")
        self.lazy = lazy if isinstance(lazy, bool) else flags[str(lazy).lower()]

    @property
    def ops(self) -> dict:
        """Every op of the suite, with the reference functions themselves."""
        from refimpl.ops import OPS

        return {name: op.function for name, op in OPS.items()}

    def supports(self, case: Case, dtype: str) -> bool | str:
        if dtype not in DTYPES:
            return f"refimpl runs in {', '.join(DTYPES)} only"
        if case.level in ("model", "scenario") and case.architecture not in refimpl.ARCHITECTURES:
            return f"refimpl has no architecture '{case.architecture}'"
        if case.level == "model" and case.mtp_depths and refimpl.ARCHITECTURES[case.architecture].mtp is None:
            return f"refimpl has no multi-token prediction for '{case.architecture}'"
        if case.level == "scenario" and refimpl.ARCHITECTURES[case.architecture].forward_step is None:
            return f"refimpl has no incremental decoding (prefill / decode / rollback) for '{case.architecture}' yet"
        return True

    def load_model(self, checkpoint_dir: Path, dtype: str) -> RefimplModel:
        """Load ``checkpoint_dir``; raises ``refimpl.RefimplError`` on a bad checkpoint."""
        return RefimplModel(refimpl.from_pretrained(checkpoint_dir, dtype=np.dtype(dtype), lazy=self.lazy))

    def package_versions(self) -> dict[str, str]:
        return {"refimpl": refimpl.__version__, "numpy": np.__version__}
