"""Run Hugging Face transformers models in float64 from end to end.

Why this exists
---------------
Loading a model with ``dtype=torch.float64`` does not make transformers compute
everything in float64. Several steps are written to run in float32 whatever the
model dtype is, and their result is cast back to the model dtype afterwards. We
call these float32 "precision islands". They limit the agreement between a
float64 transformers forward and an exact float64 reference to about 1e-7 to
1e-6 relative, growing with depth and sequence length. Line numbers below are
for the installed transformers 5.24.0 (``site-packages/transformers``):

* RMSNorm casts its input to float32 before the mean of squares, e.g.
  ``models/qwen3/modeling_qwen3.py:61`` (``.to(torch.float32)``),
  ``models/gemma3/modeling_gemma3.py:129,132`` and
  ``models/llama4/modeling_llama4.py:115,134`` (``.float()``).
* RoPE inverse frequencies are built from a float32 ``arange``
  (``models/qwen3/modeling_qwen3.py:119``; ``modeling_rope_utils.py:185, 251,
  342, 465, 471, 479, 572-575, 643`` for the scaled variants), and the angles
  are formed in float32 from ``position_ids[..., None].float()`` times
  ``inv_freq.to(dtype=torch.float)`` (``modeling_qwen3.py:124``; the same line
  is repeated in every RoPE model). cos and sin are then taken in float32.
* Eager attention takes its softmax with ``dtype=torch.float32``
  (``modeling_qwen3.py:194``, repeated in every decoder).
* MoE routers: softmax with ``dtype=torch.float``
  (``models/qwen3_moe/modeling_qwen3_moe.py:262``); DeepSeek-V3 casts both the
  hidden states and a float32-created router weight with
  ``.type(torch.float32)`` (``models/deepseek_v3/modeling_deepseek_v3.py:126,
  131, 135``); Llama 4 takes its router sigmoid on ``.float()``
  (``modeling_llama4.py:151``). ``integrations/moe.py:448`` also builds a
  float32 histogram input (counting only, harmless).
* Llama 4 applies RoPE through ``view_as_complex(x.float() ...)``, i.e. in
  complex64 (``modeling_llama4.py:219, 230-231``), and derives its attention
  temperature from ``positions.float()`` (``modeling_llama4.py:364``).
* Qwen3-Next runs its gated-delta core in float32
  (``models/qwen3_next/modeling_qwen3_next.py:414, 539``) and forms the decay
  from ``A_log.float()`` and ``a.float()`` (line 727); its gated output norm
  ``Qwen3NextRMSNormGated`` normalises and gates in float32 (lines 68, 73).
  Items 1 and 2 below lift all of them: the proxy turns the
  ``.to(torch.float32)`` of ``torch_chunk_gated_delta_rule``,
  ``torch_recurrent_gated_delta_rule`` and the gated norm into float64, the
  ``Tensor.float()`` patch the decay's casts, and a cache built inside the
  context holds a float64 recurrent state (``tests/test_gated_deltanet_hf.py``
  checks the layer to about 1e-15).
* Gemma 3n: the AltUp router ``tanh(x.float())`` (``modeling_gemma3n.py:1001``),
  the activation-sparsity quantile from a float32 ``torch.tensor``
  (line 960) and a float32 ``calc_dtype`` (line 585).
* Default arguments evaluated when the module is imported, e.g.
  ``masking_utils.py:560`` ``eager_mask(..., dtype=torch.float32)``. Callers in
  the decoders pass the dtype explicitly and the mask only holds 0 and a very
  negative number, so this one costs no accuracy. It is still lifted, for
  completeness.

What ``exact_float64()`` changes
--------------------------------
Everything below is undone when the context exits, including on exceptions.

1. Every imported ``transformers.models.*.modeling_*`` module, plus
   ``transformers.modeling_rope_utils``, ``transformers.masking_utils``,
   ``transformers.activations`` and every ``transformers.integrations.*``
   module, gets a proxy in place of its global name ``torch``. The proxy
   answers ``float32`` / ``float`` with ``torch.float64`` and ``complex64`` /
   ``cfloat`` with ``torch.complex128``, and forwards every other attribute to
   the real ``torch``. Module-level globals that are ``torch.float32`` and
   float32 default arguments of the module's functions and methods are
   swapped too (these were fixed when the module was imported, so the proxy
   cannot reach them). Matching modules imported while the context is
   active are patched right after they finish importing; this matters
   because transformers imports its modeling modules lazily.
2. ``Tensor.float()`` returns float64 (``Tensor.cfloat()`` complex128), for any
   source dtype, integer position ids included. ``Tensor.to(...)`` and
   ``Tensor.type(...)`` turn a float32 target into float64 and a complex64
   target into complex128 (also for the ``'torch.FloatTensor'`` type string).
3. ``softmax`` / ``log_softmax`` (``torch.``, ``torch.nn.functional.``,
   ``torch.special.`` and the ``Tensor`` methods) given ``dtype=float32`` use
   float64 instead.
4. ``torch.arange(..., dtype=torch.float32)`` produces float64.

Items 2 to 4 are process-wide while the context is active. They are meant for
a model held in float64: a float16/bfloat16/float32 tensor passed through
``.float()`` inside the context also becomes float64.

How to use it
-------------
The model must be **built** inside the context: RoPE ``inv_freq`` buffers are
computed while the model is built (and again by ``_init_weights`` after the
weights are loaded), and they stay float32-rounded if that happens outside.
The **forward must also run inside** the context, because most islands are in
forward code::

    with exact_float64():
        model = load_exact_float64(checkpoint_dir)      # or from_pretrained(...)
        logits = model(input_ids).logits                 # still inside

``load_exact_float64`` opens the context itself (nesting is allowed: inner
contexts do nothing), but the forward still has to run inside a context of
your own.

sdpa attention already runs in float64 on CPU. ``attn_implementation="eager"``
is the default here because it is the simplest path once its softmax is lifted.
MoE models must use ``experts_implementation="eager"`` in float64: the default
``grouped_mm`` kernel does not accept float64.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import re
import sys
import threading
from typing import Any, Iterator

import torch

__all__ = ["exact_float64", "load_exact_float64", "Float64TorchProxy", "is_active"]


# dtype substitution

def _lift(value: Any) -> Any:
    """Map float32 -> float64 and complex64 -> complex128; anything else unchanged."""
    if value is torch.float32:
        return torch.float64
    if value is torch.complex64:
        return torch.complex128
    return value


def _lift_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_lift(a) for a in args), {k: _lift(v) for k, v in kwargs.items()}


_TYPE_STRINGS = {
    "torch.FloatTensor": "torch.DoubleTensor",
    "torch.cuda.FloatTensor": "torch.cuda.DoubleTensor",
}


class Float64TorchProxy:
    """Stands in for the ``torch`` module inside transformers modeling modules.

    ``float32``/``float`` read as ``torch.float64`` and ``complex64``/``cfloat`` as
    ``torch.complex128``; every other attribute is looked up on the real ``torch``
    at access time (so process-wide patches such as the one on ``torch.arange``
    are seen through the proxy too).
    """

    __slots__ = ()

    float32 = torch.float64
    float = torch.float64
    complex64 = torch.complex128
    cfloat = torch.complex128

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __dir__(self) -> list[str]:
        return dir(torch)

    def __repr__(self) -> str:
        return "<float64 proxy for module 'torch'>"


_PROXY = Float64TorchProxy()


# which modules get the proxy

_MODULE_PATTERNS = (
    re.compile(r"^transformers\.models\.[^.]+\.modeling_[^.]+$"),
    # a few model packages live one level deeper (e.g. deprecated models)
    re.compile(r"^transformers\.models\.deprecated\.[^.]+\.modeling_[^.]+$"),
    re.compile(r"^transformers\.modeling_rope_utils$"),
    re.compile(r"^transformers\.masking_utils$"),
    re.compile(r"^transformers\.activations$"),
    re.compile(r"^transformers\.integrations\.[^.]+$"),
)


def _is_target(name: str) -> bool:
    return any(p.match(name) for p in _MODULE_PATTERNS)


# patch bookkeeping

_MISSING = object()


class _Patcher:
    """Records every change so that it can be undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, ...]] = []
        self.patched_modules: set[str] = set()

    # attribute on an object/class/module -----------------------------------------
    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        own = owner.__dict__ if isinstance(owner, type) else vars(owner)
        old = own.get(name, _MISSING)
        setattr(owner, name, value)
        self._undo.append(("attr", owner, name, old))

    # function defaults -------------------------------------------------------------
    def lift_defaults(self, fn: Any) -> None:
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(_lift(d) is not d for d in defaults):
            fn.__defaults__ = tuple(_lift(d) for d in defaults)
            self._undo.append(("defaults", fn, defaults))
        kwdefaults = getattr(fn, "__kwdefaults__", None)
        if kwdefaults and any(_lift(v) is not v for v in kwdefaults.values()):
            fn.__kwdefaults__ = {k: _lift(v) for k, v in kwdefaults.items()}
            self._undo.append(("kwdefaults", fn, kwdefaults))

    def undo_all(self) -> None:
        errors: list[BaseException] = []
        while self._undo:
            entry = self._undo.pop()
            try:
                kind = entry[0]
                if kind == "attr":
                    _, owner, name, old = entry
                    if old is _MISSING:
                        delattr(owner, name)
                    else:
                        setattr(owner, name, old)
                elif kind == "defaults":
                    entry[1].__defaults__ = entry[2]
                elif kind == "kwdefaults":
                    entry[1].__kwdefaults__ = entry[2]
                elif kind == "meta_path":
                    finder = entry[1]
                    if finder in sys.meta_path:
                        sys.meta_path.remove(finder)
            except BaseException as exc:  # keep restoring the rest
                errors.append(exc)
        self.patched_modules.clear()
        if errors:
            raise errors[0]

    # module patching ---------------------------------------------------------------
    def patch_module(self, module: Any) -> None:
        name = getattr(module, "__name__", None)
        if name is None or name in self.patched_modules:
            return
        mod_dict = vars(module)
        if mod_dict.get("torch") is not torch:
            # Module without a global `torch` (or bound to something else): leave it.
            self.patched_modules.add(name)
            return
        self.patched_modules.add(name)
        self.set_attr(module, "torch", _PROXY)
        for gname, value in list(mod_dict.items()):
            if gname != "torch" and _lift(value) is not value:
                self.set_attr(module, gname, _lift(value))
        seen: set[int] = set()
        for value in list(mod_dict.values()):
            try:
                defined_here = getattr(value, "__module__", None) == name
            except Exception:  # exotic objects with a failing __getattr__
                continue
            if not defined_here:
                continue
            if isinstance(value, type):
                for member in list(vars(value).values()):
                    self._lift_callable_defaults(member, seen)
            else:
                self._lift_callable_defaults(value, seen)

    def _lift_callable_defaults(self, obj: Any, seen: set[int]) -> None:
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    self._lift_callable_defaults(part, seen)
            return
        # follow functools.wraps chains so decorated functions are reached
        depth = 0
        while obj is not None and depth < 8:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if hasattr(obj, "__code__"):
                self.lift_defaults(obj)
            obj = getattr(obj, "__wrapped__", None)
            depth += 1


class _PatchingLoader(importlib.abc.Loader):
    """Wraps a real loader; patches the module right after it has been executed."""

    def __init__(self, inner: Any, patcher: _Patcher) -> None:
        self._inner = inner
        self._patcher = patcher

    def create_module(self, spec):  # noqa: D401 - loader protocol
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        # Give the module its real loader back before running it, so that
        # inspect.getsource & co. keep working after the context exits.
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        if _STATE.patcher is self._patcher:  # still inside the same context
            self._patcher.patch_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Meta-path hook: catches transformers modeling modules imported lazily."""

    def __init__(self, patcher: _Patcher) -> None:
        self._patcher = patcher

    def find_spec(self, fullname, path, target=None):
        if not _is_target(fullname):
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, self._patcher)
                return spec
        return None


# process-wide torch patches

def _install_torch_patches(p: _Patcher) -> None:
    T = torch.Tensor
    orig_to = T.to
    orig_type = T.type
    orig_double = T.double
    orig_cdouble = T.cdouble

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        args, kwargs = _lift_args(args, kwargs)
        return orig_to(self, *args, **kwargs)

    @functools.wraps(orig_type)
    def type_(self, *args, **kwargs):
        args, kwargs = _lift_args(args, kwargs)
        args = tuple(_TYPE_STRINGS.get(a, a) if isinstance(a, str) else a for a in args)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = _TYPE_STRINGS.get(kwargs["dtype"], kwargs["dtype"])
        return orig_type(self, *args, **kwargs)

    def float_(self, memory_format=torch.preserve_format):
        return orig_double(self, memory_format=memory_format)

    def cfloat_(self, memory_format=torch.preserve_format):
        return orig_cdouble(self, memory_format=memory_format)

    p.set_attr(T, "to", to)
    p.set_attr(T, "type", type_)
    p.set_attr(T, "float", float_)
    p.set_attr(T, "cfloat", cfloat_)

    def lifting(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            args, kwargs = _lift_args(args, kwargs)
            return fn(*args, **kwargs)
        return wrapper

    # softmax family: only the dtype argument can be a torch.dtype, so lifting
    # every argument is exactly "dtype=float32 -> float64".
    for owner, names in (
        (T, ("softmax", "log_softmax")),
        (torch, ("softmax", "log_softmax")),
        (torch.nn.functional, ("softmax", "log_softmax")),
        (torch.special, ("softmax", "log_softmax")),
    ):
        for name in names:
            fn = getattr(owner, name, None)
            if fn is not None:
                p.set_attr(owner, name, lifting(fn))

    p.set_attr(torch, "arange", lifting(torch.arange))


# the context manager

class _GlobalState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.patcher: _Patcher | None = None


_STATE = _GlobalState()


def is_active() -> bool:
    """True while an ``exact_float64()`` context is open."""
    return _STATE.depth > 0


@contextlib.contextmanager
def exact_float64() -> Iterator[None]:
    """Lift transformers' float32 islands to float64 for the duration of the block.

    Build the model and run its forward inside the block (see the module
    docstring). Nested use is allowed; only the outermost context patches and
    restores. Everything is restored on exit, also when the block raises.
    """
    with _STATE.lock:
        outermost = _STATE.depth == 0
        _STATE.depth += 1
        if outermost:
            patcher = _Patcher()
            try:
                finder = _PatchingFinder(patcher)
                sys.meta_path.insert(0, finder)
                patcher._undo.append(("meta_path", finder))
                _install_torch_patches(patcher)
                for name, module in list(sys.modules.items()):
                    if module is not None and _is_target(name):
                        patcher.patch_module(module)
            except BaseException:
                _STATE.depth -= 1
                patcher.undo_all()
                raise
            _STATE.patcher = patcher
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.depth -= 1
            if outermost:
                patcher = _STATE.patcher
                _STATE.patcher = None
                if patcher is not None:
                    patcher.undo_all()


# loading helper

def _import_modeling_module(model_type: str) -> None:
    """Import ``transformers.models.<x>.modeling_<x>`` for a config model_type, if it exists."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        module_name = model_type_to_module_name(model_type)
    except Exception:  # pragma: no cover - very old/new transformers
        module_name = model_type.replace("-", "_")
    leaf = module_name.rsplit(".", 1)[-1]
    try:
        importlib.import_module(f"transformers.models.{module_name}.modeling_{leaf}")
    except ImportError:
        pass  # custom or oddly laid out model: the meta-path hook still catches it


def load_exact_float64(checkpoint_dir, **kwargs):
    """Load ``AutoModelForCausalLM`` from ``checkpoint_dir`` in true float64.

    The model's modeling module is imported first, then the model is built and
    its weights loaded inside ``exact_float64()``, so RoPE buffers and any
    float32-typed parameters come out in float64. Defaults:
    ``dtype=torch.float64``, ``attn_implementation="eager"`` and, for
    transformers versions that accept it, ``experts_implementation="eager"``
    (needed by MoE models in float64; dense models ignore it). Any keyword
    argument overrides these and is passed on to ``from_pretrained``.

    The returned model is in eval mode. **Its forward must also run inside
    ``exact_float64()``**; outside the context transformers' float32 islands
    are active again.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint_dir)
    model_types = {config.model_type}
    for sub_key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, sub_key, None)
        if sub is not None and getattr(sub, "model_type", None):
            model_types.add(sub.model_type)
    for model_type in model_types:
        _import_modeling_module(model_type)

    kwargs.setdefault("dtype", torch.float64)
    kwargs.setdefault("attn_implementation", "eager")
    # Never a pickled pytorch_model.bin: nothing in the suite unpickles.
    kwargs.setdefault("use_safetensors", True)
    if "experts_implementation" not in kwargs and _accepts_experts_implementation():
        kwargs["experts_implementation"] = "eager"

    with exact_float64():
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
    model.eval()
    return model


def _accepts_experts_implementation() -> bool:
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover
        return False
    return hasattr(modeling_utils.PreTrainedModel, "get_correct_experts_implementation")
