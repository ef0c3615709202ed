"""Backends that misbehave the way third-party adapters do; each must get a clear status."""

from __future__ import annotations

import numpy as np

from conformance.backends.base import BackendOutput
from conformance.backends.refimpl_backend import RefimplBackend


class _Backend(RefimplBackend):
    """The reference, with its output passed through ``transform``."""

    def __init__(self, name, transform=None, supports=None, versions=None):
        self.name = name
        self._transform = transform
        self._supports = supports
        self._versions = versions

    def supports(self, case, dtype):
        return self._supports() if self._supports else super().supports(case, dtype)

    def package_versions(self):
        return self._versions() if self._versions else super().package_versions()

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        run, transform = model.run, self._transform
        model.run = lambda ids: transform(run(ids)) if transform else run(ids)
        return model


def _torch_logits(dtype_name, grad=False):
    import torch

    def transform(out):
        t = torch.from_numpy(out.logits).to(getattr(torch, dtype_name)).requires_grad_(grad)
        return BackendOutput(logits=t, hidden_states=out.hidden_states)

    return transform


def _fail(exc):
    def raise_it(*_):
        raise exc

    return raise_it


def torch_bf16_logits():
    return _Backend("torch-bf16", _torch_logits("bfloat16"))


def torch_logits_requiring_grad():
    return _Backend("torch-grad", _torch_logits("float32", grad=True))


def complex_logits():
    return _Backend("complex", lambda out: BackendOutput(out.logits.astype(np.complex128)))


def string_logits():
    return _Backend("strings", lambda out: BackendOutput(out.logits.astype(str)))


def non_string_tap_names():
    return _Backend("int-keys", lambda out: BackendOutput(out.logits, {0: out.hidden_states["embed"]}))


def renamed_taps():
    return _Backend("renamed", lambda out: BackendOutput(
        out.logits, {f"model.{k}": v for k, v in out.hidden_states.items()}))


def supports_raises():
    return _Backend("supports-raises", supports=_fail(RuntimeError("probe crashed")))


def supports_numpy_true():
    return _Backend("numpy-true", supports=lambda: np.True_)


def versions_raise():
    return _Backend("versions-raise", versions=_fail(RuntimeError("no metadata")))


def exits_in_run():
    return _Backend("exits", _fail(SystemExit(0)))


def factory_raises():
    raise RuntimeError("cannot init CUDA")


def factory_with_type_error_inside(device="cpu"):
    return None + 1



class _CrashOrHang(RefimplBackend):
    """The reference, except that one case aborts the process and another sleeps forever."""

    name = "crash-or-hang"

    def __init__(self, crash: str, hang: str):
        self.crash, self.hang = crash, hang
        self._case = None

    def supports(self, case, dtype):
        self._case = case.id
        return super().supports(case, dtype)

    def load_model(self, checkpoint_dir, dtype):
        import os
        import time

        if self._case == self.crash:
            os.abort()
        if self._case == self.hang:
            time.sleep(10_000)
        return super().load_model(checkpoint_dir, dtype)


def crash_and_hang(crash: str = "", hang: str = "") -> _CrashOrHang:
    """``-o crash=CASE -o hang=CASE``: os.abort() on one case, an endless sleep on another."""
    return _CrashOrHang(crash, hang)


class _NanOn(RefimplBackend):
    """The reference, except that one case's logits come back with a NaN."""

    name = "nan-on-one-case"

    def __init__(self, case: str):
        self.nan_case = case
        self._case = None

    def supports(self, case, dtype):
        self._case = case.id
        return super().supports(case, dtype)

    def load_model(self, checkpoint_dir, dtype):
        model = super().load_model(checkpoint_dir, dtype)
        if self._case != self.nan_case:
            return model
        run = model.run

        def poisoned(input_ids):
            out = run(input_ids)
            logits = out.logits.copy()
            logits[0, -1, 0] = float("nan")
            return type(out)(logits=logits, hidden_states=out.hidden_states)

        model.run = poisoned
        return model


def nan_on(case: str = "") -> _NanOn:
    """``-o case=ID``: that case's logits hold one NaN."""
    return _NanOn(case)


class _HangInDecode(RefimplBackend):
    """The reference, except that a scenario's decode of ``tokens`` new tokens per row sleeps forever
    (or aborts the process, with ``crash``)."""

    name = "hang-in-decode"

    def __init__(self, tokens: int, crash: bool):
        self.tokens, self.crash = tokens, crash

    def load_model(self, checkpoint_dir, dtype):
        import os
        import time

        model = super().load_model(checkpoint_dir, dtype)
        decode, tokens, crash = model.decode, self.tokens, self.crash

        def stuck(input_ids, state):
            if input_ids.shape[1] == tokens:
                if crash:
                    os.abort()
                time.sleep(10_000)
            return decode(input_ids, state)

        model.decode = stuck
        return model


def hang_in_decode(tokens: str = "6", crash: str = "false") -> _HangInDecode:
    """``-o tokens=N [-o crash=true]``: a scenario's decode of N tokens per row hangs (or aborts)."""
    return _HangInDecode(int(tokens), crash == "true")
