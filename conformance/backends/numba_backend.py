"""The reference with its hot paths on the Numba CUDA kernels (``refimpl.kernels``) as a backend.

``--backend numba`` runs :class:`refimpl.Model` in float32 with these functions replaced,
for the duration of each call, by the kernel launcher of the same signature:

==========================================================  =============================================
reference function                                          kernel launcher
==========================================================  =============================================
``refimpl.kv_cache.attend_with_cache`` (every softmax       ``refimpl.kernels.attention.attend_with_cache``
attention layer except Gemma 3n's KV-sharing layers and
MLA)
``refimpl.attention.attention`` (op ``attention``)          ``refimpl.kernels.attention.attention``
``refimpl.mla.mla_attend_absorbed`` (DeepSeek-V3 decode,    ``refimpl.kernels.mla.mla_attend_absorbed``
op ``mla`` form absorbed)
``refimpl.models.qwen3_moe.sparse_moe`` (Qwen3-MoE) and     ``refimpl.kernels.moe.sparse_moe``
``refimpl.models.qwen3_next.sparse_moe`` (Qwen3-Next)
``refimpl.models.gpt_oss.moe_block`` (gpt-oss)              ``refimpl.kernels.moe.moe_block``
``refimpl.linear_attention.delta_rule.gated_delta_rule_*``  ``refimpl.kernels.delta_rule.gated_delta_rule_*``
(Qwen3-Next, ops ``gated_delta_rule``, ``gated_deltanet``)
==========================================================  =============================================

Everything else (embeddings, norms, projections, RoPE, routers, the MoE blocks of the other
architectures, MLA prefill in the literal form) is the NumPy reference in float32. Op
cases are offered only for the ops that reach a kernel; the others are "not implemented".

Without a GPU the kernels run in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), about
a millisecond per simulated thread: ``supports`` then accepts only cases whose estimated
work is under ``-o simulator_budget=N`` (default :data:`SIMULATOR_BUDGET`) and reports the
rest "not implemented (too large for the CUDA simulator)". On a GPU every case is offered.

The replacement is done by rebinding module attributes inside ``refimpl`` for the duration
of a call (:func:`kernels_in_place`) and undoing it afterwards, so the reference itself is
never left changed in the process.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from pathlib import Path

import numpy as np

import refimpl

from ..errors import BackendError
from ..manifest import Case
from .base import BackendOutput
from .refimpl_backend import RefimplModel

#: (reference module, function name, kernel module under refimpl.kernels, launcher name).
REPLACEMENTS = (
    ("refimpl.kv_cache", "attend_with_cache", "attention", "attend_with_cache"),
    ("refimpl.attention", "attention", "attention", "attention"),
    ("refimpl.mla", "mla_attend_absorbed", "mla", "mla_attend_absorbed"),
    ("refimpl.models.qwen3_moe", "sparse_moe", "moe", "sparse_moe"),
    ("refimpl.models.qwen3_next", "sparse_moe", "moe", "sparse_moe"),
    ("refimpl.models.gpt_oss", "moe_block", "moe", "moe_block"),
    ("refimpl.linear_attention.delta_rule", "gated_delta_rule_recurrent", "delta_rule", "gated_delta_rule_recurrent"),
    ("refimpl.linear_attention.delta_rule", "gated_delta_rule_chunked", "delta_rule", "gated_delta_rule_chunked"),
)

#: Ops of ``refimpl.ops.OPS`` whose computation reaches a kernel (the others would only run
#: the NumPy reference against itself, and are reported "not implemented").
KERNEL_OPS = ("attention", "mla", "moe_dispatch", "moe_block", "gated_delta_rule", "gated_deltanet")

#: MoE blocks (op ``moe_block``) that reach a kernel, by config ``architectures`` entry.
KERNEL_MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3NextForCausalLM", "GptOssForCausalLM")

#: Default bound on :func:`simulated_cost` under the CUDA simulator.
SIMULATOR_BUDGET = 10_000


def _kernels():
    try:
        from refimpl.kernels import _numba
    except refimpl.RefimplError as exc:
        raise BackendError(f"numba backend: {exc}") from None
    return _numba


def _pairs() -> list[tuple[object, object]]:
    pairs = []
    for module_name, name, kernel_module, launcher in REPLACEMENTS:
        # Inside an enclosing kernels_in_place this is already the launcher: rebinding it is a no-op.
        original = getattr(importlib.import_module(module_name), name)
        replacement = getattr(importlib.import_module(f"refimpl.kernels.{kernel_module}"), launcher)
        pairs.append((original, replacement))
    return pairs


@contextlib.contextmanager
def kernels_in_place():
    """Within the block, every ``refimpl`` module attribute bound to a function of
    :data:`REPLACEMENTS` is bound to its kernel launcher instead; restored on exit.

    Modules import these functions by name (``from ..kv_cache import attend_with_cache``),
    so every module of the package is visited, not only the defining one. ``refimpl.kernels``
    itself is left alone: its launchers call the reference's bookkeeping and checks.
    """
    _kernels()
    # A module first imported inside the block would bind the launchers for good: import the
    # ones that hold these functions by name (the models, the ops table) before rebinding.
    importlib.import_module("refimpl.ops")
    swap = {id(original): replacement for original, replacement in _pairs()}
    changed = []
    try:
        for module_name, module in list(sys.modules.items()):
            if module is None or not (module_name == "refimpl" or module_name.startswith("refimpl.")):
                continue
            if module_name.startswith("refimpl.kernels"):
                continue
            for attr, value in list(vars(module).items()):
                replacement = swap.get(id(value))
                if replacement is not None:
                    setattr(module, attr, replacement)
                    changed.append((module, attr, value))
        yield
    finally:
        for module, attr, value in reversed(changed):
            setattr(module, attr, value)


class NumbaModel(RefimplModel):
    """A float32 :class:`refimpl.Model` whose calls run inside :func:`kernels_in_place`."""

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        with kernels_in_place():
            return super().run(input_ids)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None):
        with kernels_in_place():
            return super().prefill(input_ids, attention_mask)

    def decode(self, input_ids: np.ndarray, state):
        with kernels_in_place():
            return super().decode(input_ids, state)

    def rollback(self, state, num_tokens: int):
        with kernels_in_place():
            return super().rollback(state, num_tokens)


def _moe_dispatch(x, routing_weights, indices, gate_up_proj, down_proj, *, weight_on="output"):
    """Op ``moe_dispatch`` on the MoE kernel (``refimpl.kernels.moe.moe_experts``)."""
    from refimpl.kernels.moe import moe_experts

    return moe_experts(x, routing_weights, indices, gate_up_proj, down_proj, weight_on=weight_on)


def _kernel_op(function, name):
    def op(**arguments):
        if name == "moe_block":
            arch = (arguments.get("config") or {}).get("architectures") or [None]
            if arch[0] not in KERNEL_MOE_ARCHITECTURES:
                raise NotImplementedError(f"numba backend: no MoE kernel path for {arch[0]}'s moe_block "
                                          f"(kernels cover {', '.join(KERNEL_MOE_ARCHITECTURES)})")
        if name == "mla" and arguments.get("form") != "absorbed":
            raise NotImplementedError("numba backend: MLA has a kernel for the absorbed form only")
        # The ops table holds some reference functions themselves (op "attention" is
        # refimpl.attention.attention): call the launcher that replaces it, if any.
        target = {id(original): launcher for original, launcher in _pairs()}.get(id(function), function)
        with kernels_in_place():
            return target(**arguments)

    op.__name__ = name
    op.__doc__ = f"refimpl.ops '{name}' with the kernels of refimpl.kernels in place."
    return op


def simulated_cost(case: Case) -> float:
    """A rough count of the work a case asks of the CUDA simulator, compared with the backend's
    ``simulator_budget``: for a model or scenario, tokens processed (batch x the schedule's
    tokens, or the declared ``input_ids`` shape) x decoder layers x attention width
    (``num_attention_heads x head_dim``, or ``hidden_size``); for an op, the elements of its
    declared inputs. 0 when the manifest declares nothing to size it by."""
    if case.level == "op":
        return float(sum(math.prod(shape) for shape in case.shapes.values()))
    c = case.config_summary or {}
    if case.level == "scenario":
        tokens = (case.batch or 1) * sum(step.num_tokens for step in case.schedule if step.op != "rollback")
    else:
        tokens = math.prod(case.shapes.get("input_ids", (1,)))
    width = int(c.get("num_attention_heads") or 1) * int(c.get("head_dim") or 0) or int(c.get("hidden_size") or 1)
    return float(tokens * int(c.get("num_hidden_layers") or 1) * width)


class NumbaBackend:
    """Backend running the reference in float32 with ``refimpl.kernels`` on its hot paths.

    Options: ``-o simulator_budget=N``: under the CUDA simulator, cases whose
    :func:`simulated_cost` exceeds N are "not implemented" (default :data:`SIMULATOR_BUDGET`;
    ``inf`` offers every case, which may take hours).
    """

    name = "numba"

    def __init__(self, simulator_budget: str | float = SIMULATOR_BUDGET):
        try:
            self.simulator_budget = float(simulator_budget)
        except (TypeError, ValueError):
            raise BackendError(f"numba backend: option simulator_budget must be a number, got {simulator_budget!r}") \
                from None
        if math.isnan(self.simulator_budget) or self.simulator_budget < 0:
            raise BackendError(f"numba backend: option simulator_budget must be >= 0, got {simulator_budget!r}")
        numba = _kernels()
        if not numba.gpu_available():
            raise BackendError("numba backend: no CUDA GPU is visible; set NUMBA_ENABLE_CUDASIM=1 to run the kernels "
                               "in numba's CUDA simulator (small cases only)")
        self.simulator = numba.SIMULATOR
        if self.simulator:
            # The simulator runs each CUDA thread as a Python thread and busy-waits at barriers
            # under the GIL: a short switch interval makes it about 10x faster (process-wide).
            sys.setswitchinterval(5e-5)

    @property
    def ops(self) -> dict:
        """The ops of :data:`KERNEL_OPS`, each the reference op with the kernels in place."""
        from refimpl.ops import OPS

        ops = {name: _kernel_op(OPS[name].function, name) for name in KERNEL_OPS if name != "moe_dispatch"}
        ops["moe_dispatch"] = _kernel_op(_moe_dispatch, "moe_dispatch")
        return ops

    def supports(self, case: Case, dtype: str) -> bool | str:
        if dtype != "float32":
            return "the numba kernels compute in float32 only"
        if case.level in ("model", "scenario") and case.architecture not in refimpl.ARCHITECTURES:
            return f"refimpl has no architecture '{case.architecture}'"
        if case.level == "model" and case.mtp_depths:
            return "the numba backend does not run multi-token-prediction depths"
        if case.level == "scenario" and refimpl.ARCHITECTURES[case.architecture].forward_step is None:
            return f"refimpl has no incremental decoding for '{case.architecture}'"
        if self.simulator and simulated_cost(case) > self.simulator_budget:
            return (f"too large for the CUDA simulator (estimated cost {simulated_cost(case):.0f} > simulator_budget "
                    f"{self.simulator_budget:.0f}); runs on a GPU")
        return True

    def load_model(self, checkpoint_dir: Path, dtype: str) -> NumbaModel:
        """Load ``checkpoint_dir`` in float32; raises ``refimpl.RefimplError`` on a bad checkpoint."""
        return NumbaModel(refimpl.from_pretrained(checkpoint_dir, dtype=np.float32))

    def package_versions(self) -> dict[str, str]:
        versions = {"refimpl": refimpl.__version__, "numpy": np.__version__}
        versions.update(_kernels().numba_versions())
        return versions
