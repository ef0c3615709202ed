"""transformers' fused expert stacks, rewritten into the per-expert tensors of published checkpoints.

transformers 5.24 saves a MoE checkpoint in one of two layouts. By default
``save_pretrained`` writes the original one, as published: one matrix per expert,
``{experts}.{e}.{gate}`` (I, M), ``{experts}.{e}.{up}`` (I, M), ``{experts}.{e}.{down}``
(M, I). With ``save_pretrained(dir, save_original_format=False)`` it writes its
in-memory module layout instead::

    experts.gate_up_proj   (E, 2I, M)   gate_up_proj[e] = [gate_e; up_e]  (gate rows first)
    experts.down_proj      (E, M, I)    down_proj[e]    = down_e

(and, for MiniMax-M2, ``block_sparse_moe.*`` renamed ``mlp.*``). transformers loads
both. The architectures' ``weight_shapes`` name the published layout;
:func:`split_fused_experts` is their ``convert_weights`` hook: slicing and renaming
only, so both layouts give bitwise the same weights. Each MoE layer is in one layout
or the other; a layer that mixes them, or holds only part of the fused set, is refused
naming the layer.

Notation: E experts, I expert width, M hidden_size.
Checked against: transformers 5.24 ``conversion_mapping.py`` (``qwen2_moe`` pattern,
used by deepseek_v3, glm4_moe, qwen3_moe; ``minimax_m2``) and
``PreTrainedModel.save_pretrained(save_original_format=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, MissingWeightsError, WeightShapeError


@dataclass(frozen=True)
class ExpertLayout:
    """The names of one MoE layer's expert tensors in both layouts, relative to ``model.layers.{l}.``.

    Attributes:
        gate_up: the fused ``(E, 2I, M)`` stack, e.g. ``"mlp.experts.gate_up_proj"``.
        down: the fused ``(E, M, I)`` stack, e.g. ``"mlp.experts.down_proj"``.
        per_expert: the three per-expert templates (gate, up, down) with ``{e}``, e.g.
            ``"mlp.experts.{e}.gate_proj.weight"``.
        renames: ``(fused-layout name, published name)`` of the layer's other tensors
            that transformers saves under another name (MiniMax-M2's router).
    """

    gate_up: str
    down: str
    per_expert: tuple[str, str, str]
    renames: tuple[tuple[str, str], ...] = ()

    def fused_names(self) -> tuple[str, ...]:
        """Every name of the fused layout: the two stacks, then the renamed tensors."""
        return (self.gate_up, self.down, *(fused for fused, _ in self.renames))

    def published_names(self, num_experts: int) -> tuple[str, ...]:
        """Every name of the published layout that the fused one replaces, for E = ``num_experts``."""
        experts = tuple(t.format(e=e) for e in range(num_experts) for t in self.per_expert)
        return experts + tuple(published for _, published in self.renames)


#: DeepSeek-V3, GLM-4.5, Qwen3-MoE: ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
MLP_EXPERTS = ExpertLayout(
    gate_up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj",
    per_expert=("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                "mlp.experts.{e}.down_proj.weight"))


def split_fused_experts(
    weights: dict[str, np.ndarray], layers: list[int], layout: ExpertLayout, shape: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    """``weights`` with every fused MoE layer rewritten into the published per-expert names.

    Args:
        weights: ``{name: array}`` as read from the checkpoint.
        layers: indices of the MoE layers.
        layout: the layer's names in both layouts.
        shape: ``(E, I, M)``.

    Returns:
        A new dict; layers already per-expert (or lacking both layouts, which the name
        check then reports) are unchanged; the per-expert arrays are views of the stacks.

    Raises:
        CheckpointError: a layer holds tensors of both layouts.
        MissingWeightsError: a layer holds part of the fused set.
        WeightShapeError: a fused stack is not ``(E, 2I, M)`` / ``(E, M, I)``.
    """
    out = dict(weights)
    for layer in layers:
        prefix = f"model.layers.{layer}."
        fused = [prefix + name for name in layout.fused_names() if prefix + name in weights]
        if fused:
            _check_one_layout(weights, prefix, fused, layout, shape)
            out.update(_split_layer(out, prefix, layout, shape))
    return out


def _check_one_layout(weights: dict, prefix: str, fused: list[str], layout: ExpertLayout, shape: tuple) -> None:
    """Refuse a layer that mixes the layouts, lacks part of the fused set, or has a wrongly shaped stack."""
    e, i, m = shape
    published = [prefix + name for name in layout.published_names(e) if prefix + name in weights]
    if published:
        raise CheckpointError(
            f"layer {prefix[:-1]} mixes transformers' fused expert layout ({', '.join(fused[:2])}) with per-expert "
            f"tensors ({', '.join(published[:2])}{', ...' if len(published) > 2 else ''}); save each layer in one "
            "layout")
    missing = [prefix + name for name in layout.fused_names() if prefix + name not in weights]
    if missing:
        raise MissingWeightsError(
            f"layer {prefix[:-1]} is in transformers' fused expert layout but lacks {', '.join(missing)}")
    for name, expected in ((layout.gate_up, (e, 2 * i, m)), (layout.down, (e, m, i))):
        if tuple(weights[prefix + name].shape) != expected:
            raise WeightShapeError(f"weight '{prefix + name}' has shape {tuple(weights[prefix + name].shape)}, "
                                   f"config needs {expected}")


def _split_layer(weights: dict, prefix: str, layout: ExpertLayout, shape: tuple) -> dict[str, np.ndarray]:
    """One checked fused layer as published tensors; removes the fused names from ``weights``."""
    e, i, _ = shape
    gate_up, down = weights.pop(prefix + layout.gate_up), weights.pop(prefix + layout.down)
    gate_name, up_name, down_name = layout.per_expert
    split = {}
    for expert in range(e):
        # gate_up_proj[e] = [gate_e; up_e]: rows 0..I-1 gate, I..2I-1 up.
        split[prefix + gate_name.format(e=expert)] = gate_up[expert, :i]
        split[prefix + up_name.format(e=expert)] = gate_up[expert, i:]
        split[prefix + down_name.format(e=expert)] = down[expert]
    for fused, published in layout.renames:
        split[prefix + published] = weights.pop(prefix + fused)
    return split
