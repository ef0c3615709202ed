"""Multi-token-prediction (MTP) golden cases: model cases with draft logits, and the ``mtp_layer`` op.

Model cases (``mtp/...``) are tiny checkpoints that carry their MTP depths
(``model.layers.{L + k - 1}.*``: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a
MoE decoder layer); their data files hold, besides the main logits and taps, the draft
logits ``mtp_logits.{k}`` ``(B, T-k, V)`` of every depth (``refimpl.mtp``; the manifest
entry says ``"mtp_depths": D``). The two-depth cases are the MTP-02 probe: depth 2 must
read depth 1's output, at the same position, and the tokens two places ahead. The DeepSeek-V3
and GLM-4.5 checkpoints also carry, as the published ones do, each depth's copies of the main
embedding and head (``model.layers.{L + k - 1}.embed_tokens.weight`` and
``shared_head.head.weight``, equal to ``model.embed_tokens.weight`` and the head): vLLM-style
loaders read the draft embedding and head from them (:func:`_published_copies`).

Op cases (``op/mtp_layer/...``) run one depth on given inputs: the previous depth's
representation ``hidden_states`` ``(B, T, M)``, the embeddings of the tokens k ahead
``next_token_embeddings`` ``(B, T, M)`` and the depth's tensors under their checkpoint
names relative to ``model.layers.{L + k - 1}.`` (per-expert, as published); the output is the
depth's normalised representation ``h^k`` (the head's input and depth k + 1's input).

Every MTP depth is a MoE layer, so its routing must stay clear of near-ties for float16 and
bfloat16 runs to choose the reference's experts. Seeds (from 1501-1549), and for Qwen3-Next the
expert count and router scale, were picked so that in float64 every top-k decision and every
kept-versus-dropped group decision, in the main layers and in every depth, is at least
``ROUTING_MARGIN`` from a tie: sigmoid-plus-bias selection scores for DeepSeek-V3 and GLM-4.5
(smallest gap of a case: 0.0168, GLM one depth), softmax probabilities for Qwen3-Next (0.0176)
(``tests/test_mtp.py::test_golden_routing_is_clear_of_near_ties``). Most draws have a
near-tie somewhere in their 20-40 routing decisions per layer.
"""

from __future__ import annotations

import numpy as np

from .common import JSON_NULL, ModelCase, OpCase
from .deepseek_v3 import _deepseek
from .glm4_moe import _glm
from .qwen3_next import _qwen3_next

#: Smallest float64 gap between the last chosen and the first rejected selection score (and
#: group score) of any token in any MoE layer, main or MTP, of the cases below.
ROUTING_MARGIN = 0.015


def _draw(rng: np.random.Generator, arch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The golden generator's rule (``tools/make_goldens.py random_weights``) for one tensor (full
    checkpoint name) of an MTP depth: the architecture's ``weight_init`` where it has one (correction
    biases, ``1 + w`` norms), else biases 0.2 N, gains 1 + 0.2 N, matrices N(0, 1/fan_in)."""
    custom = arch.weight_init(name, shape, rng) if arch.weight_init is not None else None
    if custom is not None:
        return np.asarray(custom, dtype=np.float64)
    if name.endswith(".bias"):
        return 0.2 * rng.standard_normal(shape)
    if len(shape) == 1:
        return 1.0 + 0.2 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def _scale(name: str, weight_scales: dict | None) -> float:
    """The product of the ``weight_scales`` whose key the name contains (as ``ModelCase.weight_scales``)."""
    return float(np.prod([v for k, v in (weight_scales or {}).items() if k in name]))


def _parsed(config: dict):
    """``(architecture, parsed config)`` of a case config (keys set to None left out, as the generator writes it)."""
    import refimpl

    raw = {k: None if v is JSON_NULL else v for k, v in config.items() if v is not None}
    arch = refimpl.registry.get_architecture(raw)
    return arch, arch.config_class.from_dict(raw)


def _published_copies(config: dict):
    """``checkpoint_layout`` of the DeepSeek-V3 and GLM-4.5 cases: every depth also stores the main
    embedding and head under its own prefix (``model.layers.{L + k - 1}.embed_tokens.weight``,
    ``...shared_head.head.weight``; ``Architecture.mtp.copies``), equal to the main tensors, as the
    released checkpoints do (DeepSeek-V3's layer 61, GLM-4.5's layer 92)."""

    def layout(weights: dict, rng: np.random.Generator) -> dict:
        arch, parsed = _parsed(config)
        return {**weights, **{name: weights[source] for name, source in arch.mtp.copies(parsed).items()}}

    return layout


def _mtp_layer_inputs(config: dict, batch: int, length: int, weight_scales: dict | None = None):
    """One depth's tensors (relative names, sorted draw order), then ``hidden_states`` (unit-RMS rows,
    as a normalised representation has) and ``next_token_embeddings`` (N(0, 1), as the embedding table)."""

    def make(rng):
        import refimpl

        arch = refimpl.registry.get_architecture(config)
        parsed = arch.config_class.from_dict(config)
        prefix = arch.mtp.prefixes(parsed)[0]
        shapes = {n: s for n, s in arch.mtp.weight_shapes(parsed).items() if n.startswith(prefix)}
        weights = {n[len(prefix):]: _draw(rng, arch, n, shape) * _scale(n, weight_scales)
                   for n, shape in sorted(shapes.items())}
        hidden = rng.standard_normal((batch, length, config["hidden_size"]))
        embeddings = rng.standard_normal((batch, length, config["hidden_size"]))
        return {"hidden_states": hidden, "next_token_embeddings": embeddings, **weights}

    return make


_DS_ONE = _deepseek(num_hidden_layers=2, num_nextn_predict_layers=1)
_DS_TWO = _deepseek(num_hidden_layers=2, num_nextn_predict_layers=2, n_group=2, topk_group=1, rope_interleave=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_GLM_ONE = _glm(num_nextn_predict_layers=1)
_GLM_TWO_TIED = _glm(num_hidden_layers=2, num_nextn_predict_layers=2, use_qk_norm=False, routed_scaling_factor=1.0,
                     tie_word_embeddings=True, num_key_value_heads=4)

CASES = [
    ModelCase(
        "mtp/deepseek-v3-one-depth",
        "DeepSeek-V3 in miniature with its one MTP depth (model.layers.2: enorm, hnorm, eh_proj, shared_head.norm "
        "and a MoE layer; L = 2, 1 dense + 1 MoE main layer): draft logits (B, T-1, V) from the final-normed main "
        "hidden state and the embedding of t_{i+1}, [enorm(e); hnorm(h)] order, the depth's own shared_head.norm, "
        "MLA with interleaved YaRN, groups 4/2, batch 2 x 9",
        seed=1506, config=_DS_ONE, batch=2, seq=9, mtp=True, checkpoint_layout=_published_copies(_DS_ONE),
    ),
    ModelCase(
        "mtp/deepseek-v3-two-depths",
        "MTP-02 probe: two chained MTP depths (model.layers.2 and .3). Depth 2 reads depth 1's normalised output "
        "at the same position and the embedding of t_{i+2}; draft logits (B, 9, V) and (B, 8, V) over 10 tokens; "
        "n_group 2 / topk_group 1, rotate-half RoPE (rope_interleave false), default RoPE",
        seed=1544, config=_DS_TWO, batch=2, seq=10, mtp=True, checkpoint_layout=_published_copies(_DS_TWO),
    ),
    ModelCase(
        "mtp/glm45-one-depth",
        "GLM-4.5 in miniature with its MTP depth (model.layers.3): QK-norm, q/k/v biases, partial rotary 0.5, "
        "1 dense + 2 MoE main layers, the depth a MoE layer (top-3 of 8 + shared, rsf 2.5), batch 2 x 8",
        seed=1513, config=_GLM_ONE, batch=2, seq=8, mtp=True, weight_scales={"mlp.gate.weight": 1.5},
        checkpoint_layout=_published_copies(_GLM_ONE),
    ),
    ModelCase(
        "mtp/glm45-two-depths-tied",
        "GLM-4.5-Air switches (no QK-norm, rsf 1) with two chained MTP depths and tied embeddings (the drafts' "
        "head is the embedding table), MHA, 1 dense + 1 MoE main layer, 11 tokens",
        seed=1534, config=_GLM_TWO_TIED, batch=1, seq=11, mtp=True, weight_scales={"mlp.gate.weight": 1.5},
        checkpoint_layout=_published_copies(_GLM_TWO_TIED),
    ),
    ModelCase(
        "mtp/qwen3-next-one-depth",
        "Qwen3-Next's MTP module (mtp.fc over [pre_fc_norm_embedding(e); pre_fc_norm_hidden(h)], one full-attention "
        "decoder layer mtp.layers.0 with gated attention and the MoE block, mtp.norm; all 1 + w norms) after a "
        "[linear, full, linear, full] main model; transformers has no Qwen3-Next MTP",
        seed=1546, config=_qwen3_next(num_nextn_predict_layers=1, num_experts=4), batch=1, seq=7, mtp=True,
        weight_scales={"mlp.gate.weight": 1.5},
    ),
    OpCase(
        "op/mtp_layer/deepseek-v3",
        "one DeepSeek-V3 MTP depth on its own: enorm / hnorm, eh_proj over [embedding; hidden], a MoE decoder "
        "layer (MLA + 8 experts in 4 groups, 2 kept, top-3, 2 shared), shared_head.norm; weights named as under "
        "model.layers.{L}. in the checkpoint (per-expert), batch 2 x 6",
        1538, "mtp_layer", {"config": _deepseek(num_hidden_layers=2, num_nextn_predict_layers=1)},
        _mtp_layer_inputs(_deepseek(num_hidden_layers=2, num_nextn_predict_layers=1), 2, 6),
        tolerance_class="op_mtp",
    ),
    OpCase(
        "op/mtp_layer/glm45",
        "one GLM-4.5 MTP depth on its own: the same four MTP tensors around a GLM MoE decoder layer (QK-norm, "
        "biases, partial rotary 0.5, top-3 of 8 + shared, rsf 2.5), batch 2 x 6",
        1503, "mtp_layer", {"config": _glm(num_nextn_predict_layers=1)},
        _mtp_layer_inputs(_glm(num_nextn_predict_layers=1), 2, 6),
        tolerance_class="op_mtp",
    ),
    OpCase(
        "op/mtp_layer/qwen3-next",
        "Qwen3-Next's MTP module on its own: weights under their names relative to mtp. (fc, pre_fc_norm_embedding, "
        "pre_fc_norm_hidden, norm, layers.0.*), 1 + w norms, gated attention with partial RoPE, top-2 of 6 plus the "
        "gated shared expert, batch 2 x 7",
        1527, "mtp_layer", {"config": _qwen3_next(num_nextn_predict_layers=1)},
        _mtp_layer_inputs(_qwen3_next(num_nextn_predict_layers=1), 2, 7, {"mlp.gate.weight": 1.5}),
        tolerance_class="op_mtp",
    ),
]
