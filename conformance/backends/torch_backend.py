"""PyTorch's fused attention entry points as an op-level backend (``--backend torch``).

Only the ``attention`` op; every other op and every model case is reported as
not implemented. The mask is built here from absolute positions (the T queries
are the last T of the S keys), independently of the reference:

* no soft-cap: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean
  mask, or, with attention sinks, a float mask over one extra all-zero key whose
  bias is the head's sink logit (its score is then exactly ``s_h`` and its value 0,
  which is the sink's definition);
* soft-cap: ``torch.nn.attention.flex_attention.flex_attention`` with a
  ``score_mod`` applying ``c * tanh(score / c)`` then the mask, run eagerly (no
  ``torch.compile``). Sinks with soft-capping: not implemented.

Options: ``-o sdpa_backend=math`` (default; the only one on CPU) is passed through
``torch.nn.attention.sdpa_kernel``; on a GPU ``flash`` or ``efficient`` select
those kernels.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import BackendError
from ..manifest import Case
from .base import DTYPES


class TorchBackend:
    """SDPA / flex attention; see the module docstring."""

    name = "torch"

    def __init__(self, sdpa_backend: str = "math"):
        try:
            import torch
            from torch.nn.attention import SDPBackend
        except ImportError as exc:
            raise BackendError(
                f"the torch backend needs PyTorch ({exc}); pip install torch==2.13.0 (the CPU build)") from None
        choices = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
        if sdpa_backend not in choices:
            raise BackendError(f"option sdpa_backend must be one of {', '.join(choices)}, got '{sdpa_backend}'")
        self.torch = torch
        self.sdpa_backend = choices[sdpa_backend]
        self.ops = {"attention": self.attention}

    def supports(self, case: Case, dtype: str) -> bool | str:
        return True if dtype in DTYPES else f"unknown dtype {dtype}"

    def package_versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__}

    def _tensor(self, array: np.ndarray):
        if array.dtype.name == "bfloat16":
            return self.torch.from_numpy(array.astype(np.float32)).to(self.torch.bfloat16)
        return self.torch.from_numpy(np.array(array, order="C"))  # a writable copy

    def _visible(self, queries: int, keys: int, sliding_window, attention_chunk_size):
        """Bool ``(T, S)``: causal by absolute position, within the window, within the chunk."""
        torch = self.torch
        q_pos = torch.arange(keys - queries, keys)[:, None]
        k_pos = torch.arange(keys)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        if attention_chunk_size is not None:
            visible &= k_pos // attention_chunk_size == q_pos // attention_chunk_size
        return visible

    def attention(self, q, k, v, *, scaling, sliding_window=None, attention_chunk_size=None, sinks=None,
                  attn_logit_softcapping=None):
        torch = self.torch
        tq, tk, tv = (self._tensor(a).transpose(1, 2) for a in (q, k, v))  # (B, heads, T or S, D)
        heads, kv_heads = tq.shape[1], tk.shape[1]
        visible = self._visible(tq.shape[2], tk.shape[2], sliding_window, attention_chunk_size)
        if attn_logit_softcapping is not None:
            if sinks is not None:
                raise NotImplementedError("flex attention path: sinks together with soft-capping")
            return self._flex(tq, tk, tv, visible, scaling, attn_logit_softcapping).transpose(1, 2)
        tk = tk.repeat_interleave(heads // kv_heads, dim=1)
        tv = tv.repeat_interleave(heads // kv_heads, dim=1)
        mask = visible
        if sinks is not None:
            # One extra key with k = 0 and v = 0; its additive bias s_h makes its logit the sink.
            tk = torch.cat([tk, tk.new_zeros(*tk.shape[:2], 1, tk.shape[3])], dim=2)
            tv = torch.cat([tv, tv.new_zeros(*tv.shape[:2], 1, tv.shape[3])], dim=2)
            bias = torch.zeros(heads, *visible.shape, dtype=tq.dtype).masked_fill(~visible, float("-inf"))
            sink = self._tensor(sinks).to(tq.dtype)[:, None, None].expand(heads, visible.shape[0], 1)
            mask = torch.cat([bias, sink], dim=2)[None]
        try:
            with torch.nn.attention.sdpa_kernel(self.sdpa_backend):
                out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scaling)
        except RuntimeError as exc:
            # The selected kernel does not take these inputs (device, dtype, mask or head size).
            if "No available kernel" in str(exc):
                raise NotImplementedError(f"SDPA backend {self.sdpa_backend.name} has no kernel for this case") from None
            raise
        return out.transpose(1, 2)

    def _flex(self, tq, tk, tv, visible, scaling, cap):
        torch = self.torch
        from torch.nn.attention.flex_attention import flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            capped = cap * torch.tanh(score / cap)
            return torch.where(visible[q_idx, kv_idx], capped, -float("inf"))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(tq, tk, tv, score_mod=score_mod, scale=scaling,
                                  enable_gqa=tq.shape[1] != tk.shape[1])
