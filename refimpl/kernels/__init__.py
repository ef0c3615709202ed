"""Numba CUDA kernels for the hot paths: a second, independent implementation of the spec.

Each module names the NumPy function of the reference it implements and exposes a
launcher with that function's Python signature and shapes; the kernels themselves
compute in float32 (see each module for the input dtypes it accepts).

=================  ===========================================================================
module             implements
=================  ===========================================================================
``attention``      :func:`refimpl.attention.attention` and :func:`refimpl.kv_cache.attend_with_cache`:
                   tiled online-softmax prefill, split-K decode with a second reduction pass
``mla``            :func:`refimpl.mla.mla_attend_absorbed`: MLA decode in the absorbed latent form
``moe``            :func:`refimpl.moe.dispatch` with SwiGLU / clamped-SwiGLU experts: counting sort,
                   tiled per-expert GEMMs, weighted scatter-add; shared experts
``delta_rule``     :func:`refimpl.linear_attention.delta_rule.gated_delta_rule_recurrent` and
                   ``gated_delta_rule_chunked``: the gated delta rule with initial / final state
=================  ===========================================================================

numba and numba-cuda are imported only by :mod:`refimpl.kernels._numba` (``pip install
'llm-refimpl[cuda]'``); importing this package itself needs neither. ``NUMBA_ENABLE_CUDASIM=1``
runs the kernels in numba's CUDA simulator (CPU, small shapes only). ``python -m
refimpl.kernels.ptx_check`` compiles every kernel to PTX for sm_90 without a GPU.
"""

from __future__ import annotations

import importlib

#: The kernel modules, each with a ``KERNELS`` dict ``{name: (cuda.jit kernel, [type signatures])}``
#: that :mod:`refimpl.kernels.ptx_check` compiles.
KERNEL_MODULES = ("attention", "mla", "moe", "delta_rule")


def kernel_table() -> dict[str, tuple[object, list[str]]]:
    """``{"module.kernel": (kernel, signatures)}`` over every kernel module (imports numba)."""
    table = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for kernel_name, entry in module.KERNELS.items():
            table[f"{name}.{kernel_name}"] = entry
    return table
