"""Linear-attention components: the gated delta rule, the causal short convolution and the
Gated DeltaNet layer (Qwen3-Next's ``linear_attention`` layers).

Modules:
    delta_rule       ``gated_delta_rule_recurrent`` (the definition) and
                     ``gated_delta_rule_chunked`` (WY / UT form), proven equal by tests;
                     the derivation is in ``delta_rule.md``.
    short_conv       ``causal_conv1d``: depthwise causal conv with its decode state.
    gated_deltanet   ``gated_deltanet``: the whole layer, with ``GatedDeltaNetState``
                     and ``gated_deltanet_weight_shapes``; ``gated_deltanet_step`` with its
                     ``GatedDeltaNetCache`` for incremental decoding.
"""

from .delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from .gated_deltanet import (
    GatedDeltaNetCache, GatedDeltaNetState, gated_deltanet, gated_deltanet_step, gated_deltanet_weight_shapes,
)
from .short_conv import causal_conv1d

__all__ = [
    "GatedDeltaNetCache", "GatedDeltaNetState", "causal_conv1d", "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent", "gated_deltanet", "gated_deltanet_step", "gated_deltanet_weight_shapes",
]
