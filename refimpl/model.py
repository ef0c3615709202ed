"""The model object: a config, its weights in one dtype, and a forward.

``from_pretrained(path)`` reads a Hugging Face checkpoint directory, checks that
the tensors are exactly those the architecture needs, with the right shapes, and
casts them once to the model's dtype (dequantizing FP8 and MXFP4 tensors exactly):
float64 or float32, computed in end to end, or float16 / bfloat16, storage dtypes
computed on in float32 per component (:mod:`refimpl.numerics`, ``docs/low-precision.md``);
``from_pretrained(path, lazy=True)`` checks names and shapes from the file headers and
converts each tensor only when a forward reads it.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint, read_config
from .embedding import check_token_ids
from .errors import (
    CheckpointError, ConfigError, InputError, MissingWeightsError, RefimplError, UnexpectedWeightsError,
    WeightShapeError,
)
from .lazy_weights import LazyTensor, LazyWeights, convert_all
from .numerics import FLOAT_DTYPES, resolve_dtype
from .quantization import scheme_from_config
from .architecture import Architecture
from .kv_cache import StepContext, fresh_context, next_context
from .registry import get_architecture


@dataclass(frozen=True)
class ModelOutput:
    """Result of :meth:`Model.forward`.

    Attributes:
        logits: ``(B, T, V)`` in the model's dtype.
        hidden_states: ``None``, or an ordered mapping of named intermediates
            (``"embed"``, ``"layers.0"`` ... ``"layers.{L-1}"``, ``"norm"``), each ``(B, T, M)``.
        mtp_logits: ``None``, or the multi-token-prediction draft logits, one array per depth
            k = 1..D: ``(B, T-k, V)``, row i predicting token ``t_{i+k+1}`` (see :mod:`refimpl.mtp`).
    """

    logits: np.ndarray
    hidden_states: dict[str, np.ndarray] | None = None
    mtp_logits: list[np.ndarray] | None = None


@dataclass(frozen=True)
class DecodeCache:
    """Everything a model carries from one incremental call to the next.

    Attributes:
        layers: one entry per decoder layer: a :class:`refimpl.kv_cache.KVCache`, a
            :class:`refimpl.linear_attention.gated_deltanet.GatedDeltaNetCache`, or None (a
            layer that keeps nothing).
        next_position: ``(B,)`` int64, the position the next token of each row gets.
        length: slots per row so far (left-padding slots included).
        last_added: tokens the last call appended (the most :meth:`Model.rollback` undoes).
        owner: the :class:`Model` object whose prefill made the cache (a cache is refused by
            any other model, even one loaded from the same checkpoint).
    """

    layers: tuple
    next_position: np.ndarray
    length: int
    last_added: int
    owner: object = None

    @property
    def batch(self) -> int:
        return self.next_position.shape[0]


def _name_list(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(arch: Architecture, config, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the required tensors of ``weights``, after checking names and shapes.

    Tensors under the architecture's ``ignored_weights`` prefixes are dropped first; then
    its ``convert_weights`` (if any) rewrites another saved layout into the names of
    ``weight_shapes`` (transformers' fused expert stacks into per-expert tensors).

    Raises:
        MissingWeightsError: required tensors are absent (they are named).
        UnexpectedWeightsError: tensors the architecture does not use are present.
        WeightShapeError: a tensor's shape does not match the config.
        CheckpointError: a tensor holds NaN or Inf, or ``convert_weights`` refuses the
            layout (a MoE layer mixing fused and per-expert tensors). Arrays are checked
            here; :class:`~refimpl.lazy_weights.LazyTensor` values (names and shapes from the
            safetensors headers) when they are converted.
    """
    shapes = arch.weight_shapes(config)
    optional = arch.optional_weights(config)
    ignored = tuple(arch.ignored_weights(config)) if arch.ignored_weights is not None else ()
    if ignored:
        weights = {name: w for name, w in weights.items() if not name.startswith(ignored)}
    if arch.convert_weights is not None:
        weights = arch.convert_weights(config, weights)
    missing = set(shapes) - set(weights)
    if missing:
        raise MissingWeightsError(f"checkpoint lacks {len(missing)} weight(s): {_name_list(missing)}")
    unexpected = set(weights) - set(shapes) - set(optional)
    if unexpected:
        raise UnexpectedWeightsError(f"checkpoint has {len(unexpected)} unexpected weight(s): {_name_list(unexpected)}")
    for name, source in optional.items():
        if name in weights and not np.array_equal(weights[name], weights[source]):
            raise UnexpectedWeightsError(f"'{name}' is present but differs from '{source}', which it must equal")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise WeightShapeError(f"weight '{name}' has shape {tuple(weights[name].shape)}, config needs {tuple(shape)}")
        if not isinstance(weights[name], LazyTensor) and not np.isfinite(weights[name]).all():
            raise CheckpointError(f"weight '{name}' holds NaN or Inf values")
    return {name: weights[name] for name in shapes}


def check_mtp_weights(
    arch: Architecture, config, weights: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray] | None, RefimplError | None]:
    """The multi-token-prediction tensors of ``weights``, or the reason there are none.

    MTP modules are optional: a checkpoint without them, or with an incomplete or
    malformed set, still loads as the main model (which never reads them). The
    reason is kept and raised only when draft logits are asked for.

    Returns:
        ``(tensors, None)`` with every name of ``arch.mtp.weight_shapes(config)``, or
        ``(None, error)``: a ConfigError when the architecture or config has no MTP depth,
        else a MissingWeightsError / UnexpectedWeightsError / WeightShapeError /
        CheckpointError naming the problem.
    """
    if arch.mtp is None:
        return None, ConfigError(f"{arch.name}: this reference has no multi-token prediction for it")
    try:
        shapes = arch.mtp.weight_shapes(config)
    except ConfigError as exc:
        # A depth count the reference cannot draft for (Qwen3-Next with several): the main model still loads.
        return None, exc
    if not shapes:
        return None, ConfigError(f"{arch.name}: the config declares no MTP depth (num_nextn_predict_layers is 0)")
    try:
        if arch.convert_weights is not None:
            weights = arch.convert_weights(config, weights)
    except CheckpointError as exc:
        return None, exc
    missing = set(shapes) - set(weights)
    if missing:
        return None, MissingWeightsError(f"checkpoint lacks {len(missing)} MTP weight(s): {_name_list(missing)}")
    copies = arch.mtp.copies(config)
    prefixes = tuple(arch.mtp.prefixes(config))
    stray = {n for n in weights if n.startswith(prefixes) and n not in shapes and n not in copies}
    if stray:
        return None, UnexpectedWeightsError(
            f"checkpoint has {len(stray)} unexpected MTP weight(s): {_name_list(stray)}")
    for name, source in copies.items():
        if name in weights and not np.array_equal(weights[name], weights[source]):
            return None, UnexpectedWeightsError(f"MTP weight '{name}' differs from '{source}', which it must equal")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != tuple(shape):
            return None, WeightShapeError(
                f"MTP weight '{name}' has shape {tuple(weights[name].shape)}, config needs {tuple(shape)}")
        if not isinstance(weights[name], LazyTensor) and not np.isfinite(weights[name]).all():
            return None, CheckpointError(f"MTP weight '{name}' holds NaN or Inf values")
    return {name: weights[name] for name in shapes}, None


#: Below this many bytes of attention scores no memory estimate is made (no file is read).
_SMALL_ATTENTION_BYTES = 1 << 26


def check_sequence_length(config, shape: tuple[int, int], dtype, num_keys: int | None = None) -> None:
    """Refuse a call over ``shape = (B, T)`` token ids before any ``(T, S)`` array exists.

    One layer's attention scores, ``B * H * T * S`` elements of the compute dtype
    (H = ``num_attention_heads``, 1 when the config has none; S = ``num_keys``, the cached
    slots plus the T new ones, or T for a whole-sequence forward), must fit in the memory
    available now: ``MemAvailable`` of ``/proc/meminfo`` (else the free physical pages),
    and under an address-space limit (``RLIMIT_AS``) the room left below it. The scores
    are a lower bound of the call's peak (the mask, the softmax and the weighted sum come
    on top), so an input refused here could not have run; estimated only from 64 MiB of
    scores up, and skipped where the available memory is unknown. S counts every slot
    so far, an upper bound for sliding-window and chunked layers. Sequences longer than
    ``max_position_embeddings`` are not refused: transformers runs them, and RoPE (scaled
    or not) is defined at every position.

    Raises:
        InputError: naming the shape, the keys, the bytes needed and the bytes available.
    """
    batch, length = shape
    keys = length if num_keys is None else num_keys
    heads = getattr(config, "num_attention_heads", 1)
    need = batch * (heads if isinstance(heads, int) else 1) * length * keys * np.dtype(dtype).itemsize
    if need < _SMALL_ATTENTION_BYTES:
        return
    available = available_memory()
    if available is not None and need > available:
        over = "" if num_keys is None else f" over {keys} keys"
        raise InputError(f"input_ids of shape {tuple(shape)}{over}: one layer's attention scores (B * H * T * S in "
                         f"{np.dtype(dtype).name}) need {need / 2**30:.1f} GiB, more than the "
                         f"{available / 2**30:.1f} GiB of memory available; use a shorter sequence, piece or batch")


def available_memory() -> int | None:
    """Bytes a new allocation can take now (see :func:`check_sequence_length`), or None if unknown."""
    available = _meminfo_kib("/proc/meminfo", "MemAvailable:")
    if available is not None:
        available *= 1024
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            available = None
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return available
    used = _meminfo_kib("/proc/self/status", "VmSize:")
    if soft == resource.RLIM_INFINITY or used is None:
        return available
    room = max(soft - used * 1024, 0)
    return room if available is None else min(available, room)


def _meminfo_kib(path: str, key: str) -> int | None:
    """The kB value of line ``key`` of a /proc file, or None (no such file, line or number)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    return None


class Model:
    """A loaded model: ``model(input_ids) -> logits``.

    Attributes:
        architecture: the registry entry.
        config: the frozen config dataclass.
        weights: ``{Hugging Face name: array}``, all in ``dtype`` (in float16 / bfloat16, the
            architecture's ``float32_weights`` in float32): a dict (eager), or with
            ``lazy`` a :class:`~refimpl.lazy_weights.LazyWeights` that reads and converts a
            tensor each time a forward asks for it (one layer at a time).
        dtype: float64 or float32 (the compute dtype), or float16 / bfloat16 (the storage
            dtype of weights, activations, caches and logits, with float32 compute inside
            each component: :mod:`refimpl.numerics`).
        lazy: whether weights are converted on access rather than once at load.
        mtp_weights: the multi-token-prediction tensors (same names and dtype), or None when
            the checkpoint carries no complete set (:func:`check_mtp_weights`).
    """

    def __init__(self, architecture: Architecture, config, weights: dict[str, np.ndarray], dtype=np.float64,
                 *, lazy: bool = False, progress: bool | None = None):
        """``weights`` maps names to arrays or :class:`~refimpl.lazy_weights.LazyTensor`
        objects; ``progress`` (None: when lazy and stderr is a terminal) shows a progress bar
        on stderr while converting (eager) or over the layers of each forward (lazy)."""
        self.architecture = architecture
        self.config = config
        self.dtype = resolve_dtype(dtype, FLOAT_DTYPES)
        if not isinstance(lazy, (bool, np.bool_)):
            raise InputError(f"lazy must be True or False, got {lazy!r}")
        self.lazy = bool(lazy)
        self.progress = (self.lazy and sys.stderr.isatty()) if progress is None else bool(progress)
        checked = check_weights(architecture, config, weights)
        keep = architecture.float32_weights
        self.weights = (LazyWeights(checked, self.dtype, keep) if self.lazy
                        else convert_all(checked, self.dtype, self.progress, keep))
        mtp, self._mtp_refusal = check_mtp_weights(architecture, config, weights)
        self.mtp_weights = None
        if mtp is not None and self.lazy:
            self.mtp_weights = LazyWeights(mtp, self.dtype, keep)
        elif mtp is not None:
            # A non-finite MTP tensor leaves the main model usable; it is named when drafts are asked for.
            try:
                self.mtp_weights = convert_all(mtp, self.dtype, keep_float32=keep)
            except CheckpointError as exc:
                self._mtp_refusal = exc

    @property
    def has_mtp(self) -> bool:
        """Whether the checkpoint carried complete multi-token-prediction modules."""
        return self.mtp_weights is not None

    def forward(self, input_ids, return_hidden_states: bool = False, return_mtp_logits: bool = False) -> ModelOutput:
        """Run the model on token ids.

        Args:
            input_ids: integer array ``(B, T)``.
            return_hidden_states: also return the named per-layer hidden states.
            return_mtp_logits: also return the draft logits of the MTP depths k = 1..D,
                ``(B, T-k, V)`` each (:mod:`refimpl.mtp`).

        Returns:
            :class:`ModelOutput` with logits ``(B, T, V)`` in the model's dtype.

        Raises:
            InputError: ids not integer, not 2-D, or outside ``[0, vocab_size)``; a
                sequence longer than the model's context or whose attention cannot fit in
                memory, refused before anything is allocated (:func:`check_sequence_length`).
            ConfigError / MissingWeightsError / CheckpointError: MTP logits asked of a model
                without (complete) MTP modules; the message names why.
        """
        ids = check_token_ids(input_ids, self.config.vocab_size)
        check_sequence_length(self.config, ids.shape, self.dtype)
        if return_mtp_logits and self.mtp_weights is None:
            raise type(self._mtp_refusal)(f"no MTP draft logits: {self._mtp_refusal}")
        with self._layer_progress():
            logits, taps = self.architecture.forward(self.weights, self.config, ids)
        mtp = None
        if return_mtp_logits:
            weights = self.weights.merged(self.mtp_weights) if self.lazy else {**self.weights, **self.mtp_weights}
            mtp = self.architecture.mtp.forward(weights, self.config, ids, taps["norm"])
        return ModelOutput(logits=logits, hidden_states=taps if return_hidden_states else None, mtp_logits=mtp)

    def _step(self, ids: np.ndarray, context: StepContext, length: int) -> tuple[np.ndarray, DecodeCache]:
        step = self.architecture.forward_step
        if step is None:
            raise ConfigError(f"{self.architecture.name}: this reference has no incremental decoding for it")
        check_sequence_length(self.config, ids.shape, self.dtype, num_keys=length)
        with self._layer_progress():
            logits, _, layers = step(self.weights, self.config, ids, context)
        last = context.positions[:, -1] + 1
        next_position = np.where(context.valid[:, -1], last, 0).astype(np.int64)
        return logits, DecodeCache(layers=tuple(layers), next_position=next_position, length=length,
                                   last_added=ids.shape[1], owner=self)

    def prefill(self, input_ids, attention_mask=None) -> tuple[np.ndarray, DecodeCache]:
        """Run a prompt and keep what later tokens need.

        Args:
            input_ids: integer ``(B, T)``.
            attention_mask: None, or ``(B, T)`` 0/1 with 0 on leading pad slots only (left
                padding). Token positions are ``cumsum(attention_mask) - 1`` per row
                (:mod:`refimpl.kv_cache`); the logits of pad slots are undefined.

        Returns:
            ``(logits (B, T, V), cache)``; ``forward(input_ids).logits`` equals these logits
            when there is no padding.

        Raises:
            InputError / ShapeError: bad ids or mask (named). ConfigError: an architecture
                without incremental decoding.
        """
        ids = check_token_ids(input_ids, self.config.vocab_size)
        context = fresh_context(*ids.shape, attention_mask)
        return self._step(ids, context, ids.shape[1])

    def decode(self, input_ids, cache: DecodeCache) -> tuple[np.ndarray, DecodeCache]:
        """Feed one or more new tokens per row after ``cache``.

        A call with n tokens is a chunked-prefill piece or a speculative verification: the
        n tokens attend to the cache and causally to each other.

        Args:
            input_ids: integer ``(B, n)``, n >= 1, the same B as the cache.
            cache: from :meth:`prefill`, :meth:`decode` or :meth:`rollback` of this model.

        Returns:
            ``(logits (B, n, V), cache)``; the logits equal the last n rows of one forward
            over the whole sequence so far. ``cache`` is left unchanged (a new one is returned).

        Raises:
            InputError: bad ids, a batch size other than the cache's, or a cache that is
                not a :class:`DecodeCache` this model object made.
        """
        ids = check_token_ids(input_ids, self.config.vocab_size)
        self._check_cache(cache, "decode")
        if ids.shape[0] != cache.batch:
            raise InputError(f"decode: input_ids has {ids.shape[0]} rows, the cache {cache.batch}")
        context = next_context(cache.next_position, ids.shape[1], cache.layers)
        return self._step(ids, context, cache.length + ids.shape[1])

    def rollback(self, cache: DecodeCache, num_tokens: int) -> DecodeCache:
        """Forget the last ``num_tokens`` tokens of every row (rejected speculative drafts).

        The result equals the cache of a run that never saw those tokens (recurrent and conv
        states included). Only tokens of the last call can be rolled back, once.

        Raises:
            InputError: ``num_tokens`` not an integer in ``[0, tokens of the last call]``, a
                cache already rolled back, a rollback that would leave a (left-padded) row
                without a token, or a cache another model object made.
        """
        self._check_cache(cache, "rollback")
        if isinstance(num_tokens, (bool, np.bool_)) or not isinstance(num_tokens, (int, np.integer)) \
                or num_tokens < 0:
            raise InputError(f"rollback: num_tokens must be an integer >= 0, got {num_tokens!r}")
        if num_tokens and cache.last_added == 0:
            raise InputError("rollback: this cache was already rolled back; only the tokens of the last "
                             "prefill or decode call can be rolled back, once")
        if num_tokens > cache.last_added:
            raise InputError(f"rollback of {num_tokens} token(s): the last call added {cache.last_added}, and only "
                             "its tokens can be rolled back")
        if num_tokens and (cache.next_position - num_tokens < 1).any():
            row = int(np.argmax(cache.next_position - num_tokens < 1))
            raise InputError(f"rollback of {num_tokens} token(s) would leave row {row} without a token "
                             f"(it has {int(cache.next_position[row])})")
        layers = tuple(None if c is None else c.rollback(int(num_tokens)) for c in cache.layers)
        return DecodeCache(layers=layers, next_position=cache.next_position - int(num_tokens),
                           length=cache.length - int(num_tokens), last_added=0, owner=self)

    def _check_cache(self, cache, call: str = "decode") -> None:
        if not isinstance(cache, DecodeCache):
            raise InputError(f"{call}: expected the DecodeCache that this model's prefill or decode returned, "
                             f"got {type(cache).__name__}")
        if cache.owner is not self:
            raise InputError(f"{call}: this cache was made by another model object; a cache belongs to the "
                             "model whose prefill made it")

    def __call__(self, input_ids) -> np.ndarray:
        """Logits ``(B, T, V)`` for integer token ids ``(B, T)``."""
        return self.forward(input_ids).logits

    def _layer_progress(self):
        if not self.lazy:
            return nullcontext()
        return self.weights.layer_progress(self.config.num_hidden_layers, self.progress)


def from_pretrained(path, dtype=np.float64, *, lazy: bool = False, progress: bool | None = None) -> Model:
    """Load a Hugging Face checkpoint directory into a :class:`Model`.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``), in any storage format of
            :mod:`refimpl.checkpoint` (float64/32/16, bfloat16, FP8 block, MXFP4).
        dtype: ``np.float64`` (default) or ``np.float32``, the compute dtype; or ``np.float16``
            / ``ml_dtypes.bfloat16`` (names ``"float16"``, ``"bfloat16"`` work too), storage
            dtypes with float32 compute per component (``docs/low-precision.md``). Logits,
            hidden states and caches come out in this dtype (Gated DeltaNet's recurrent
            state stays float32).
        lazy: keep the files memory-mapped and convert each tensor when a forward reads it
            (names and shapes are checked from the headers now, finiteness on conversion);
            a model larger than memory in ``dtype`` then runs one layer at a time. Default:
            convert everything once, now.
        progress: show a progress bar on stderr (None: when lazy and stderr is a terminal).

    Raises:
        CheckpointError: files missing or unreadable, or a tensor in an unsupported format
            (named, with what is supported); eagerly, a tensor holding NaN or Inf.
        UnknownArchitectureError: config.json names an architecture not in the registry.
        ConfigError: a config field is missing, mistyped or unsupported, or a
            ``quantization_config`` other than fp8 / mxfp4.
        MissingWeightsError / UnexpectedWeightsError / WeightShapeError: tensors do not
            match the architecture.
    """
    raw = read_config(path)
    path = Path(path)
    arch = get_architecture(raw)
    scheme = scheme_from_config(raw)
    config = arch.config_class.from_dict(raw)
    return Model(arch, config, open_checkpoint(path, scheme), dtype=dtype, lazy=lazy, progress=progress)
