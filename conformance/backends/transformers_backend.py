"""Hugging Face transformers (``AutoModelForCausalLM``) as a backend.

The model is loaded with ``from_pretrained(dir, dtype=..., attn_implementation=...)``,
put in eval mode and run under ``torch.no_grad()`` on the CPU. Hidden states are
captured with forward hooks on ``model.model.embed_tokens`` (tap ``"embed"``), each
``model.model.layers[i]`` (``"layers.{i}"``; a layer may return a tensor or a
tuple whose first entry is the hidden state) and ``model.model.norm``
(``"norm"``). Models laid out differently return logits only.

Gemma 3n as released (model_type ``gemma3n``, which ``AutoModelForCausalLM`` maps to
``Gemma3nForConditionalGeneration``): the model is built with empty modules in place of its
vision and audio towers, which token ids never reach (the MobileNet-V5 tower would need
timm; the golden checkpoints do not carry the towers); everything the ids go through,
``embed_vision`` / ``embed_audio`` included, is transformers' own. Its taps are
``model.model.language_model``'s layers and norm; there is no ``"embed"`` tap, since the
wrapper calls ``embed_tokens`` on every id before replacing the vision and audio rows.

Multi-token prediction: when the checkpoint's config declares MTP depths
(``num_nextn_predict_layers``) and the checkpoint carries their tensors, the depths are
loaded with transformers' own ``modeling_layers.MtpModel.from_pretrained`` (its weight
conversions rename ``model.layers.{L + d}.*`` and stack the per-expert tensors; the
main model's hard-coded MTP key pattern, layer 61 / 92 / 46, is replaced by the
checkpoint's ``L + d``), and ``run`` returns their draft logits: depth k is
``MtpModel.forward_layer(k - 1, ...)`` on the previous depth's output (the main model's
``hidden_states[-1]`` for k = 1) at the first ``T - k`` positions, with the tokens
``input_ids[:, k:]`` and their positions ``k .. T-1`` (as ``MTPCandidateGenerator`` passes
them), then ``MtpModel._project_to_logits``. Architectures without transformers MTP
modules (Qwen3-Next: its config has no ``num_mtp_layers`` and the model drops ``mtp.*``)
are "not implemented" for cases with MTP outputs.

Scenario cases (prefill / decode / rollback, ``docs/scenarios.md``) run through transformers'
own cache objects, as ``generate`` drives them: the prefill passes ``input_ids``, the
attention mask (ones when the prompt is not padded) and ``position_ids = cumsum(mask) - 1``
(0 on pad slots; ``GenerationMixin._prepare_position_ids_for_generation``) with
``use_cache=True``, and keeps the cache the model's forward creates (``DynamicCache(config=...)``
with its sliding-window, chunked and linear-attention layers); each decode passes the new ids,
the running attention mask (ones appended) and the next positions, with that cache. A rollback
of r tokens calls ``cache.crop(-r)`` when every layer is a full-attention layer
(``Cache.is_croppable`` and no sliding layer); otherwise (sliding-window or chunked layers, whose
kept slots a crop cannot restore once the window has slid, and Gated DeltaNet states) it restores
the copy of the cache taken before the last call (``copy.deepcopy``) and feeds again the tokens
of that call that are kept (their logits are not returned).

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
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..manifest import Case
from .base import DTYPES, BackendOutput

INSTALL_HINT = "pip install torch==2.13.0 && pip install 'llm-refimpl[transformers]' (or -e '.[transformers]' in a checkout)"
ISLAND_POLICIES = ("lift", "keep")
#: Architectures whose MTP depths transformers 5.24 builds (generic ``MtpModel``; configs with
#: ``num_mtp_layers``, ``modeling_layers.py:331-749``).
MTP_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM")
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
    """``{tap name: module}`` for the decoder layout ``model.model.{embed_tokens, layers, norm}``, or
    ``model.model.language_model.{layers, norm}`` in a multimodal wrapper (Gemma 3n's
    ``Gemma3nForConditionalGeneration``), without ``"embed"`` there: the wrapper calls
    ``embed_tokens`` on every id and then replaces the vision and audio rows."""
    inner = getattr(model, "model", None)
    wrapped = getattr(inner, "language_model", None)
    if wrapped is not None and all(hasattr(wrapped, a) for a in ("layers", "norm")):
        return {**{f"layers.{i}": layer for i, layer in enumerate(wrapped.layers)}, "norm": wrapped.norm}
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        return {}
    taps = {"embed": inner.embed_tokens}
    taps.update({f"layers.{i}": layer for i, layer in enumerate(inner.layers)})
    taps["norm"] = inner.norm
    return taps


def _tap_value(model, output):
    """A hooked module's output as the reference's tap: the hidden state of a tuple; of
    Gemma 3n's decoder layers, which return all AltUp streams ``(A, B, T, M)``, the active
    stream ``altup_active_idx`` (the ``layers.{l}`` tap of ``refimpl/models/gemma3n.py``)."""
    value = output[0] if isinstance(output, tuple) else output
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    active = getattr(text, "altup_active_idx", None)
    return value[active] if active is not None and value.ndim == 4 else value


@contextlib.contextmanager
def _without_gemma3n_towers(config):
    """Gemma 3n's multimodal model (config model_type ``"gemma3n"``) built without its vision and
    audio towers (empty modules in their place): from ``input_ids`` alone
    ``Gemma3nModel.forward`` never runs them (only ``pixel_values`` / ``input_features`` do), the
    vision tower (MobileNet-V5) would need timm, and the golden checkpoints do not carry them.
    The text path, ``embed_vision`` and ``embed_audio`` included, is transformers' own."""
    if getattr(config, "model_type", None) != "gemma3n":
        yield
        return
    from unittest import mock

    import torch
    from transformers.models.gemma3n import modeling_gemma3n

    build = modeling_gemma3n.AutoModel.from_config

    def from_config(sub_config, *args, **kwargs):
        if getattr(sub_config, "model_type", None) in ("gemma3n_vision", "gemma3n_audio"):
            return torch.nn.Module()
        return build(sub_config, *args, **kwargs)

    with mock.patch.object(modeling_gemma3n.AutoModel, "from_config", from_config):
        yield


def _checkpoint_tensor_names(checkpoint_dir: Path) -> set[str]:
    """The tensor names stored in the checkpoint's safetensors files (headers only)."""
    from safetensors import safe_open

    names = set()
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            names.update(f.keys())
    return names


def _mtp_prefixes(config) -> list[str]:
    """``model.layers.{L + d}.`` for the MTP depths a transformers config declares (none without ``num_mtp_layers``)."""
    text = config.get_text_config()
    depths = getattr(text, "num_mtp_layers", None) or 0
    return [f"model.layers.{text.num_hidden_layers + d}." for d in range(depths)]


def _load_mtp(model):
    """transformers' ``MtpModel`` for ``model``'s checkpoint, its key pattern set to the checkpoint's layers."""
    from transformers.modeling_layers import MtpModel

    model._keys_to_ignore_on_load_unexpected = [p.replace(".", r"\.") for p in _mtp_prefixes(model.config)]
    return MtpModel.from_pretrained(model).eval()


@contextlib.contextmanager
def _errors_only(transformers):
    """transformers' logging at error level: its load report would list every MTP tensor of
    the checkpoint as unexpected for the main model, which indeed does not read them."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def mtp_draft_logits(model, mtp, input_ids, last_hidden) -> list:
    """Draft logits of every MTP depth as float64 arrays, depth k ``(B, T-k, V)`` (see the module docstring)."""
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    batch, length = ids.shape
    hidden, drafts = last_hidden, []
    for index in range(mtp.num_mtp_layers):
        k = index + 1
        if length <= k:
            drafts.append(np.zeros((batch, 0, model.config.get_text_config().vocab_size)))
            continue
        positions = torch.arange(k, length)[None].expand(batch, -1)
        hidden = mtp.forward_layer(index, hidden[:, :length - k], positions, None, input_ids=ids[:, k:])
        drafts.append(_to_numpy(mtp._project_to_logits(hidden)))
    return drafts


@dataclass
class CacheState:
    """What a scenario carries between calls (the ``state`` of the incremental capability).

    Attributes:
        cache: transformers' cache object as the model's forward left it (updated in place).
        attention_mask: ``(B, S)`` int64 torch tensor over every slot so far (0 on pad slots).
        next_position: ``(B,)`` int64 torch tensor, the position of each row's next token.
        before: the state before the last call, copied, for a rollback that cannot crop
            (None: the last call was the prefill, or the cache can crop).
        last_ids: the ids of the last call ``(B, n)``, fed again after restoring ``before``.
    """

    cache: object
    attention_mask: object
    next_position: object
    before: "CacheState | None" = None
    last_ids: object = None


def _croppable(cache) -> bool:
    """Whether ``cache.crop(-r)`` undoes the last r tokens exactly: every layer keeps all its
    slots (no sliding-window or chunked layer, no recurrent state)."""
    return bool(getattr(cache, "is_croppable", False)) and not any(getattr(cache, "is_sliding", [True]))


class TransformersModel:
    """A loaded transformers model plus the precision context to run it in (and its MTP depths, if any)."""

    def __init__(self, model, precision_context, mtp=None):
        self.model = model
        self.precision_context = precision_context
        self.mtp = mtp

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        """Logits and taps (float64 NumPy) for int64 ids ``(B, T)``."""
        import torch

        captured: dict[str, np.ndarray] = {}

        def hook_for(name):
            def hook(module, args, output):
                captured[name] = _to_numpy(_tap_value(self.model, output))

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in _tap_modules(self.model).items()]
        try:
            with self.precision_context(), torch.no_grad():
                out = self.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False,
                                 output_hidden_states=self.mtp is not None)
        finally:
            for handle in handles:
                handle.remove()
        drafts = None
        # After the hooks are gone: the MTP depths call the main model's embedding module again.
        if self.mtp is not None:
            with self.precision_context(), torch.no_grad():
                drafts = mtp_draft_logits(self.model, self.mtp, input_ids, out.hidden_states[-1])
        return BackendOutput(logits=_to_numpy(out.logits), hidden_states=captured or None, mtp_logits=drafts)

    def _forward(self, ids, attention_mask, positions, cache):
        """One cached forward: ``(float64 logits, cache)``."""
        import torch

        with self.precision_context(), torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                             use_cache=True)
        return _to_numpy(out.logits), out.cache

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None):
        """``(logits (B, n, V), CacheState)`` of a prompt (see the module docstring)."""
        import torch

        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.from_numpy(
            np.asarray(attention_mask, dtype=np.int64))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits, cache = self._forward(ids, mask, positions, None)
        return logits, CacheState(cache, mask, positions[:, -1] + 1, before=None, last_ids=ids)

    def decode(self, input_ids: np.ndarray, state: CacheState):
        """``(logits (B, n, V), CacheState)`` of n new tokens per row after ``state`` (updated in place)."""
        import torch

        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        before = None if _croppable(state.cache) else copy.deepcopy(
            CacheState(state.cache, state.attention_mask, state.next_position, None, state.last_ids))
        mask = torch.cat([state.attention_mask, torch.ones_like(ids)], dim=-1)
        positions = state.next_position[:, None] + torch.arange(ids.shape[1])[None, :]
        logits, cache = self._forward(ids, mask, positions, state.cache)
        return logits, CacheState(cache, mask, state.next_position + ids.shape[1], before=before, last_ids=ids)

    def rollback(self, state: CacheState, num_tokens: int) -> CacheState:
        """``state`` without the last ``num_tokens`` tokens (of the last call): a crop, or the copy
        taken before that call plus its kept tokens fed again (see the module docstring)."""
        if num_tokens == 0:
            return state
        kept = state.last_ids.shape[1] - num_tokens
        if _croppable(state.cache):
            state.cache.crop(-num_tokens)
            return CacheState(state.cache, state.attention_mask[:, :-num_tokens], state.next_position - num_tokens)
        if state.before is None:
            # The prefill: run it again on its kept slots.
            _, again = self.prefill(state.last_ids[:, :kept].numpy(), state.attention_mask[:, :kept].numpy())
            return again
        if kept == 0:
            return state.before
        _, again = self.decode(state.last_ids[:, :kept].numpy(), state.before)
        return again


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
        if case.level in ("model", "scenario") and case.architecture not in _known_architectures(self.transformers):
            return (f"transformers {self.transformers.__version__} has no model class "
                    f"'{case.architecture}' (not in its auto mappings)")
        if case.level == "model" and case.mtp_depths and case.architecture not in MTP_ARCHITECTURES:
            return (f"transformers {self.transformers.__version__} has no multi-token-prediction modules for "
                    f"'{case.architecture}' (generic MtpModel only for {', '.join(MTP_ARCHITECTURES)})")
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
        config = self.transformers.AutoConfig.from_pretrained(str(checkpoint_dir))
        prefixes = tuple(_mtp_prefixes(config))
        has_mtp = bool(prefixes) and any(n.startswith(prefixes) for n in _checkpoint_tensor_names(checkpoint_dir))
        quiet = _errors_only(self.transformers) if has_mtp else contextlib.nullcontext()
        with context(), _quiet_loading(self.transformers), quiet, _without_gemma3n_towers(config):
            model = self.transformers.AutoModelForCausalLM.from_pretrained(
                str(checkpoint_dir), dtype=getattr(self.torch, dtype), attn_implementation=self.attn_implementation,
                experts_implementation=self.experts_implementation,
                # Never a pickled pytorch_model.bin: nothing in the suite unpickles.
                use_safetensors=True,
            )
            mtp = _load_mtp(model) if has_mtp else None
        return TransformersModel(model.eval(), context, mtp)

    @property
    def ops(self) -> dict:
        """The op level, mapped onto transformers' functions and modules (see ``transformers_ops``)."""
        from .transformers_ops import TransformersOps

        return TransformersOps(self.torch, self.transformers, self._precision_context).mapping()

    def package_versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__, "transformers": self.transformers.__version__}
