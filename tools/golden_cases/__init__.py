"""Every golden case the generator writes, one module per family.

Each module named in ``_MODULES`` defines ``CASES``, a list of case descriptions
(:class:`ModelCase` for whole models, :class:`OpCase` for single components).
The corpus order is the order of ``_MODULES``, then the order inside each list.
"""

from __future__ import annotations

import importlib

from .common import JSON_NULL, ModelCase, OpCase

_MODULES = ("qwen3", "olmo2", "mistral", "smollm3", "gemma3", "gpt_oss", "glm4_moe", "llama4", "qwen3_moe", "minimax_m2", "grok2", "deepseek_v3", "moe_ops", "qwen3_next", "gdn_ops", "gemma3n", "mtp", "scenarios", "scenario_classes", "ops")


def all_cases() -> list:
    cases = []
    for name in _MODULES:
        cases += importlib.import_module(f"golden_cases.{name}").CASES
    ids = [c.case_id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise RuntimeError(f"golden case ids repeated: {duplicated}")
    return cases


__all__ = ["JSON_NULL", "ModelCase", "OpCase", "all_cases"]
