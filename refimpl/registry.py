"""Architecture registry: the ``architectures`` entry of config.json to its code.

Every module named in ``_MODEL_MODULES`` (under ``refimpl/models/``) defines
``ARCHITECTURE``, an :class:`Architecture`. Adding an architecture is one visible
name here.
"""

from __future__ import annotations

import importlib

from .architecture import Architecture
from .errors import UnknownArchitectureError

_MODEL_MODULES = ("qwen3", "olmo2", "mistral", "smollm3", "gemma3", "glm4_moe", "gpt_oss", "llama4", "qwen3_moe", "minimax_m2", "grok2", "deepseek_v3", "qwen3_next", "gemma3n", "gemma3n_conditional")


def _collect() -> dict[str, Architecture]:
    found = {}
    for module_name in _MODEL_MODULES:
        arch = importlib.import_module(f"refimpl.models.{module_name}").ARCHITECTURE
        if arch.name in found:
            raise RuntimeError(f"architecture {arch.name} is registered twice")
        found[arch.name] = arch
    return found


ARCHITECTURES: dict[str, Architecture] = _collect()


def get_architecture(raw_config: dict) -> Architecture:
    """Look up the architecture named by a parsed config.json.

    Raises:
        UnknownArchitectureError: ``architectures`` is missing, not a one-element
            list, or names an unsupported architecture (the supported ones are listed).
    """
    names = raw_config.get("architectures")
    supported = ", ".join(sorted(ARCHITECTURES))
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise UnknownArchitectureError(
            f"config.json must name exactly one entry in 'architectures' (got {names!r}); supported: {supported}"
        )
    if names[0] not in ARCHITECTURES:
        raise UnknownArchitectureError(f"unknown architecture '{names[0]}'; supported: {supported}")
    return ARCHITECTURES[names[0]]
