"""Mechanics of ``conformance.backends.hf_exact.exact_float64``.

Only the patching itself is checked here: what changes inside the context and
that everything is put back afterwards, also after an exception. Numerical
agreement with the reference lives in ``test_hf_agreement_qwen3.py``.
"""

import importlib
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conformance.backends import hf_exact  # noqa: E402
from conformance.backends.hf_exact import exact_float64  # noqa: E402

F32, F64 = torch.float32, torch.float64

#: (owner, attribute) pairs the context replaces process-wide
GLOBAL_PATCHES = [
    (torch.Tensor, "to"),
    (torch.Tensor, "type"),
    (torch.Tensor, "float"),
    (torch.Tensor, "cfloat"),
    (torch.Tensor, "softmax"),
    (torch.Tensor, "log_softmax"),
    (torch, "softmax"),
    (torch, "log_softmax"),
    (torch, "arange"),
    (torch.nn.functional, "softmax"),
    (torch.nn.functional, "log_softmax"),
]

MODULES = [
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.modeling_rope_utils",
    "transformers.masking_utils",
    "transformers.integrations.sdpa_attention",
]


def _snapshot():
    own = {}
    for owner, name in GLOBAL_PATCHES:
        d = owner.__dict__ if isinstance(owner, type) else vars(owner)
        own[(id(owner), name)] = (name in d, d.get(name))
    return own, list(sys.meta_path)


def _assert_restored(before):
    own, meta_path = before
    for owner, name in GLOBAL_PATCHES:
        d = owner.__dict__ if isinstance(owner, type) else vars(owner)
        present, value = own[(id(owner), name)]
        assert (name in d) == present, (owner, name)
        if present:
            assert d[name] is value, (owner, name)
    assert list(sys.meta_path) == meta_path
    for name in MODULES:
        assert sys.modules[name].torch is torch, name
    x = torch.ones(3, dtype=F64)
    assert x.float().dtype == F32
    assert x.to(F32).dtype == F32
    assert x.to(dtype=torch.float).dtype == F32
    assert x.type(F32).dtype == F32
    assert torch.arange(4, dtype=F32).dtype == F32
    assert torch.nn.functional.softmax(x, dim=-1, dtype=F32).dtype == F32
    assert torch.ones(2, dtype=torch.complex128).cfloat().dtype == torch.complex64
    assert not hf_exact.is_active()


@pytest.fixture(scope="module", autouse=True)
def _import_modules():
    for name in MODULES:
        importlib.import_module(name)


def test_proxy_maps_float32_to_float64():
    proxy = hf_exact.Float64TorchProxy()
    assert proxy.float32 is F64
    assert proxy.float is F64
    assert proxy.complex64 is torch.complex128
    assert proxy.cfloat is torch.complex128
    # everything else is forwarded untouched
    assert proxy.float16 is torch.float16
    assert proxy.bfloat16 is torch.bfloat16
    assert proxy.Tensor is torch.Tensor
    assert proxy.nn is torch.nn
    assert proxy.int64 is torch.int64


def test_inside_context_everything_is_float64():
    with exact_float64():
        assert hf_exact.is_active()
        i = torch.arange(5)  # integer positions
        assert i.float().dtype == F64
        assert i.to(F32).dtype == F64
        assert i.to(dtype=F32).dtype == F64
        assert i.to("cpu", F32).dtype == F64
        assert i.type(F32).dtype == F64
        assert i.type("torch.FloatTensor").dtype == F64
        assert torch.ones(2, dtype=torch.bfloat16).float().dtype == F64
        assert torch.ones(2, dtype=F64).float().dtype == F64
        assert torch.ones(2, dtype=torch.complex128).cfloat().dtype == torch.complex128
        assert torch.arange(0, 8, 2, dtype=F32).dtype == F64
        assert torch.arange(4).dtype == torch.int64  # untouched without dtype
        x = torch.randn(3, 4, dtype=F64)
        assert torch.nn.functional.softmax(x, dim=-1, dtype=F32).dtype == F64
        assert torch.softmax(x, -1, dtype=F32).dtype == F64
        assert x.softmax(-1, dtype=F32).dtype == F64
        # other target dtypes are left alone
        assert x.to(torch.float16).dtype == torch.float16
        assert x.half().dtype == torch.float16
        for name in MODULES:
            mod = sys.modules[name]
            assert isinstance(mod.torch, hf_exact.Float64TorchProxy), name
            assert mod.torch.float32 is F64


def test_float32_default_arguments_lifted():
    import inspect

    from transformers import masking_utils

    def default():
        return inspect.signature(masking_utils.eager_mask).parameters["dtype"].default

    assert default() is F32
    with exact_float64():
        assert default() is F64
    assert default() is F32


def test_restored_after_exit():
    before = _snapshot()
    with exact_float64():
        pass
    _assert_restored(before)


def test_restored_after_exception():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with exact_float64():
            assert torch.ones(1).float().dtype == F64
            raise RuntimeError("boom")
    _assert_restored(before)


def test_nested_contexts():
    before = _snapshot()
    with exact_float64():
        with exact_float64():
            assert torch.ones(1).float().dtype == F64
        # leaving the inner context keeps the outer one active
        assert torch.ones(1).float().dtype == F64
        assert sys.modules[MODULES[0]].torch is not torch
    _assert_restored(before)


def test_module_imported_inside_context_is_patched_then_restored():
    name = "transformers.models.olmo2.modeling_olmo2"
    saved = sys.modules.pop(name, None)
    try:
        before = _snapshot()
        with exact_float64():
            mod = importlib.import_module(name)
            assert isinstance(mod.torch, hf_exact.Float64TorchProxy)
        assert mod.torch is torch
        # the module keeps its ordinary loader (inspect.getsource relies on it)
        assert type(mod.__loader__).__name__ != "_PatchingLoader"
        _assert_restored(before)
    finally:
        if saved is not None:  # put the original module object back everywhere
            sys.modules[name] = saved
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, saved)
