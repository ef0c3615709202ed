"""Checkpoint tensors that are read and converted only when a layer needs them.

A :class:`LazyTensor` knows its shape and how to produce its values: from a memory-mapped
safetensors entry (plain float tensors; nothing is read until asked), or from several
(FP8 values and their block scales, MXFP4 blocks and scales). Basic slicing gives another
LazyTensor, so the architectures' ``convert_weights`` hooks (which slice fused expert
stacks) work on them unchanged; a slice of a stored tensor reads only its own bytes.

:class:`LazyWeights` is the ``weights`` mapping a model forward indexes by name: each
``weights[name]`` reads, dequantizes and casts that tensor to the compute dtype, checks it
is finite, and keeps nothing. The forwards fetch one layer's tensors at a time
(``layer_weights``), so at most one layer is held in the compute dtype, plus the
embedding and whatever the forward keeps alive (see docs/checkpoints.md for measurements).

Eager loading (the default) is :func:`convert_all`: the same conversion for every tensor, once.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from .errors import CheckpointError
from .numerics import is_low_precision, to_storage

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LazyTensor:
    """A checkpoint tensor produced on demand.

    Attributes:
        shape: the tensor's shape.
        storage: how it is stored, for messages (``"BF16"``, ``"F8_E4M3, 128x128 block scales"``).

    Exactly one of ``view`` (a zero-argument function returning the memory-mapped array in
    its stored dtype) and ``produce`` (a function of the target dtype, or None for exact
    float64, returning a fresh array) is given. ``release`` is called after each read of a
    ``view`` (it lets the kernel drop the mapped pages from the resident set).
    """

    def __init__(self, shape, storage: str, *, view: Callable[[], np.ndarray] | None = None,
                 produce: Callable[[np.dtype | None], np.ndarray] | None = None,
                 release: Callable[[], None] | None = None, keys: tuple = ()):
        if (view is None) == (produce is None):
            raise ValueError("LazyTensor needs exactly one of view and produce")
        self.shape = tuple(int(n) for n in shape)
        self.storage = storage
        self._view, self._produce, self._release, self._keys = view, produce, release, keys

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, storage={self.storage!r})"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(tensor)``: the exact values (:meth:`materialize`), read now."""
        return self.materialize(dtype)

    def __getitem__(self, key) -> "LazyTensor":
        """A lazy basic-indexing slice (ints, slices, Ellipsis); nothing is read."""
        keys = key if isinstance(key, tuple) else (key,)
        if not all(k is Ellipsis or isinstance(k, (int, np.integer, slice)) for k in keys):
            raise TypeError(f"LazyTensor supports basic indexing only, got {key!r}")
        # The resulting shape, from a zero-stride placeholder of this shape (no memory).
        shape = np.broadcast_to(np.empty((), np.uint8), self.shape)[key].shape
        return LazyTensor(shape, self.storage, view=self._view, produce=self._produce, release=self._release,
                          keys=self._keys + (key,))

    def materialize(self, dtype=None) -> np.ndarray:
        """A fresh C-contiguous array of the values, in ``dtype``.

        ``dtype`` None means exact: the stored dtype for a plain tensor (bfloat16 as
        ``ml_dtypes.bfloat16``), float64 for a dequantized one. float64 and float32 widen
        bfloat16, float16 and float32 exactly; a float64 tensor asked for in float32 is
        rounded once.
        """
        if self._view is not None:
            array = self._view()
            for key in self._keys:
                array = array[key]
            try:
                return np.array(array, dtype=dtype, order="C", copy=True)
            finally:
                if self._release is not None:
                    self._release()
        array = self._produce(None if dtype is None else np.dtype(dtype))
        for key in self._keys:
            array = array[key]
        return np.ascontiguousarray(array)


def to_compute_dtype(name: str, tensor, dtype: np.dtype) -> np.ndarray:
    """``tensor`` (a LazyTensor or an array) as a C-contiguous array in ``dtype``, checked finite.

    A LazyTensor gives a fresh array; an array already in ``dtype`` and contiguous is returned as is.
    For a float16 / bfloat16 ``dtype`` the exact values (stored dtype, or float64 when
    dequantized) are rounded once (:func:`refimpl.numerics.to_storage`).

    Raises:
        CheckpointError: the values hold NaN or Inf (after the cast: a float64 value
            beyond float32's range is refused in float32 mode, one beyond 65504 in float16).
    """
    # Overflow to inf in a float64 -> float32 cast is reported below, by name.
    with np.errstate(over="ignore"):
        if is_low_precision(dtype):
            exact = tensor.materialize() if isinstance(tensor, LazyTensor) else np.asarray(tensor)
            array = np.ascontiguousarray(exact if exact.dtype == dtype else to_storage(exact, dtype))
        elif isinstance(tensor, LazyTensor):
            array = tensor.materialize(dtype)
        else:
            array = np.ascontiguousarray(tensor, dtype=dtype)
    if not np.isfinite(array).all():
        raise CheckpointError(f"weight '{name}' holds NaN or Inf values")
    return array


def tensor_dtype(name: str, dtype: np.dtype, keep_float32: tuple[str, ...] = ()) -> np.dtype:
    """The dtype tensor ``name`` is held in by a model in ``dtype``: float32 for a name ending in one
    of ``keep_float32`` when ``dtype`` is float16 / bfloat16 (tensors engines keep in float32,
    :attr:`refimpl.architecture.Architecture.float32_weights`), ``dtype`` otherwise."""
    if keep_float32 and is_low_precision(dtype) and name.endswith(keep_float32):
        return np.dtype(np.float32)
    return dtype


def convert_all(tensors: Mapping, dtype: np.dtype, progress: bool = False,
                keep_float32: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Eager loading: every tensor converted once, in the mapping's order (a progress bar on stderr if asked);
    names ending in ``keep_float32`` in float32 beside a float16 / bfloat16 ``dtype`` (:func:`tensor_dtype`)."""
    with _progress_bar(progress, "converting weights", len(tensors)) as advance:
        converted = {}
        for name in tensors:
            converted[name] = to_compute_dtype(name, tensors[name], tensor_dtype(name, dtype, keep_float32))
            advance(1)
    return converted


class LazyWeights(Mapping):
    """``{name: array}`` whose values are read and converted to ``dtype`` on each access (names
    ending in ``keep_float32`` to float32 beside a float16 / bfloat16 ``dtype``: :func:`tensor_dtype`).

    Iteration, ``len`` and ``in`` use the names only; ``values()`` and ``items()`` convert
    every tensor (the forwards never call them: ``layer_weights`` selects names first).
    Nothing is cached: accessing a name twice reads it twice.

    Raises (on access):
        KeyError: an unknown name.
        CheckpointError: the tensor holds NaN or Inf.
    """

    def __init__(self, tensors: dict[str, LazyTensor], dtype: np.dtype, keep_float32: tuple[str, ...] = ()):
        self._tensors = dict(tensors)
        self.dtype = np.dtype(dtype)
        self.keep_float32 = tuple(keep_float32)
        self._listeners: list[Callable[[str], None]] = []

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        for listener in self._listeners:
            listener(name)
        return to_compute_dtype(name, tensor, tensor_dtype(name, self.dtype, self.keep_float32))

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def merged(self, other: "LazyWeights") -> "LazyWeights":
        """The names of both (``other`` wins on a clash), still lazy."""
        return LazyWeights({**self._tensors, **other._tensors}, self.dtype, self.keep_float32)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` without reading it."""
        return self._tensors[name].shape

    @contextmanager
    def listening(self, listener: Callable[[str], None]):
        """Call ``listener(name)`` before each access while the block runs."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    @contextmanager
    def layer_progress(self, num_layers: int, enabled: bool):
        """A progress bar on stderr over the decoder layers, advanced when a forward first
        reads a tensor of ``model.layers.{l}.``; a no-op unless ``enabled``."""
        with _progress_bar(enabled, "forward (lazy weights), layers", num_layers) as advance:
            done = [0]

            def seen(name: str) -> None:
                match = _LAYER.match(name)
                if match and done[0] < min(int(match.group(1)), num_layers):
                    advance(min(int(match.group(1)), num_layers) - done[0])
                    done[0] = min(int(match.group(1)), num_layers)

            with self.listening(seen):
                yield
            advance(num_layers - done[0])


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int):
    """Yield ``advance(n)``: a rich progress bar on stderr when ``enabled``, else a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
