"""Hugging Face transformers (``AutoModelForCausalLM``) as a backend.

The model is loaded with ``from_pretrained(dir, dtype=..., attn_implementation=...)``,
put in eval mode and run under ``torch.no_grad()`` on the CPU. Hidden states are
captured with forward hooks on ``model.model.embed_tokens`` (tap ``"embed"``), each
``model.model.layers[i]`` (``"layers.{i}"``; a layer may return a tensor or a
tuple whose first entry is the hidden state) and ``model.model.norm``
(``"norm"``). Models laid out differently return logits only.
Model cases whose architecture is in none of transformers' auto mappings
(``MODEL_*_MAPPING_NAMES``; e.g. Grok's ``Grok1ForCausalLM``) are "not implemented".

Options (``-o key=value``):
    attn_implementation: passed to ``from_pretrained``; default ``"eager"``, the
        plain softmax(QK^T)V, closest to the reference.
    float32_islands: ``"lift"`` (default) or ``"keep"``; only matters at float64.
    experts_implementation: passed to ``from_pretrained``; default ``"eager"`` (the
        per-expert loop; ``"grouped_mm"`` and others are the same math). Dense
        models ignore it.

Why float32 islands are lifted at float64: float64 mode checks the math to about
1e-10. transformers as shipped computes RMSNorm, the RoPE angles and the attention
softmax in float32 even for a float64 model, which alone puts it about 1e-7 away
from the reference. That is a precision policy, not the math under test, so by
default the model is built and run inside
:func:`conformance.backends.hf_exact.exact_float64`, which computes those steps
in float64. ``float32_islands=keep`` runs transformers as shipped (expect float64
cases to fail by about 1e-7).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..manifest import Case
from .base import DTYPES, BackendOutput

INSTALL_HINT = "pip install torch==2.13.0 && pip install 'llm-refimpl[transformers]' (or -e '.[transformers]' in a checkout)"
ISLAND_POLICIES = ("lift", "keep")
#: ``experts_implementation`` values accepted on the command line (checked again by transformers).
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _import_torch_and_transformers():
    """``(torch, transformers)``; raises BackendError with install instructions if absent."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendError(
            f"the transformers backend needs torch and transformers ({exc}); install: {INSTALL_HINT}"
        ) from None
    return torch, transformers


@contextlib.contextmanager
def _quiet_loading(transformers):
    """Hide transformers' per-checkpoint "Loading weights" bar, which would interleave with ours."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _to_numpy(tensor) -> np.ndarray:
    """A float64 NumPy copy of a (possibly bfloat16) torch tensor."""
    import torch

    return tensor.detach().to(dtype=torch.float64, device="cpu").numpy()


def _known_architectures(transformers) -> frozenset[str]:
    """Every model class name in transformers' auto mappings (``MODEL_*_MAPPING_NAMES``)."""
    auto = transformers.models.auto.modeling_auto
    names = set()
    for key, mapping in vars(auto).items():
        if key.startswith("MODEL_") and key.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for value in mapping.values():
                names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def _tap_modules(model) -> dict:
    """``{tap name: module}`` for the decoder layout ``model.model.{embed_tokens, layers, norm}``."""
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        return {}
    taps = {"embed": inner.embed_tokens}
    taps.update({f"layers.{i}": layer for i, layer in enumerate(inner.layers)})
    taps["norm"] = inner.norm
    return taps


class TransformersModel:
    """A loaded transformers model plus the precision context to run it in."""

    def __init__(self, model, precision_context):
        self.model = model
        self.precision_context = precision_context

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        """Logits and taps (float64 NumPy) for int64 ids ``(B, T)``."""
        import torch

        captured: dict[str, np.ndarray] = {}

        def hook_for(name):
            def hook(module, args, output):
                captured[name] = _to_numpy(output[0] if isinstance(output, tuple) else output)

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in _tap_modules(self.model).items()]
        try:
            with self.precision_context(), torch.no_grad():
                out = self.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return BackendOutput(logits=_to_numpy(out.logits), hidden_states=captured or None)


class TransformersBackend:
    """Backend running ``transformers.AutoModelForCausalLM``; see the module docstring."""

    name = "transformers"

    def __init__(self, attn_implementation: str = "eager", float32_islands: str = "lift",
                 experts_implementation: str = "eager"):
        if float32_islands not in ISLAND_POLICIES:
            choices = ", ".join(ISLAND_POLICIES)
            raise BackendError(f"option float32_islands must be one of {choices}, got '{float32_islands}'")
        self.torch, self.transformers = _import_torch_and_transformers()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
        if attn_implementation not in known:
            raise BackendError(f"option attn_implementation must be one of {', '.join(known)}, got '{attn_implementation}'")
        self.attn_implementation = attn_implementation
        if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            choices = ", ".join(EXPERTS_IMPLEMENTATIONS)
            raise BackendError(f"option experts_implementation must be one of {choices}, got '{experts_implementation}'")
        self.experts_implementation = experts_implementation
        self.float32_islands = float32_islands

    def supports(self, case: Case, dtype: str) -> bool | str:
        """True, or why not: an unknown dtype, or a model case whose architecture (the
        config.json ``architectures`` entry the manifest records) transformers has no
        class for (Grok's ``Grok1ForCausalLM``; its model_type ``"git"`` would otherwise
        load an unrelated transformers model)."""
        if dtype not in DTYPES:
            return f"unknown dtype {dtype}"
        if case.level == "model" and case.architecture not in _known_architectures(self.transformers):
            return (f"transformers {self.transformers.__version__} has no model class "
                    f"'{case.architecture}' (not in its auto mappings)")
        return True

    def _precision_context(self, dtype: str):
        """A factory of the context that both building and running the model need."""
        if dtype == "float64" and self.float32_islands == "lift":
            from .hf_exact import exact_float64

            return exact_float64
        return contextlib.nullcontext

    def load_model(self, checkpoint_dir: Path, dtype: str) -> TransformersModel:
        """Load ``checkpoint_dir`` in ``dtype`` (inside the precision context, see module docstring)."""
        context = self._precision_context(dtype)
        with context(), _quiet_loading(self.transformers):
            model = self.transformers.AutoModelForCausalLM.from_pretrained(
                str(checkpoint_dir), dtype=getattr(self.torch, dtype), attn_implementation=self.attn_implementation,
                experts_implementation=self.experts_implementation,
            )
        return TransformersModel(model.eval(), context)

    @property
    def ops(self) -> dict:
        """The op level, mapped onto transformers' functions and modules (see ``transformers_ops``)."""
        from .transformers_ops import TransformersOps

        return TransformersOps(self.torch, self.transformers, self._precision_context).mapping()

    def package_versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__, "transformers": self.transformers.__version__}
