"""refimpl against Hugging Face transformers on tiny random GLM-4.5 (``Glm4MoeForCausalLM``) checkpoints.

Models are built and randomised with transformers itself (not the golden ones),
the router's ``e_score_correction_bias`` buffer included, saved with
``save_pretrained`` (which writes the per-expert layout of published checkpoints)
and loaded with ``refimpl.from_pretrained``. Two bars: transformers as shipped
(float32 router, norms, RoPE and softmax) within 1e-5 relative RMS, and
transformers with those islands lifted (``conformance.backends.hf_exact``) within
1e-10, logits and every tap.

Also here: the MoE block alone against ``Glm4MoeMoE`` (the op-level contract), the
config.json resolution against ``Glm4MoeConfig`` (partial rotary default 0.5,
implicit head_dim), MTP weights accepted and ignored, refusals, presets, and the
routing margins of the golden cases in ``tools/golden_cases/glm4_moe.py``.
"""

import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, hf_lifted, hf_logits, randomise, rel_rms  # noqa: E402
from refimpl.errors import ConfigError, InputError, ShapeError, UnexpectedWeightsError  # noqa: E402
from refimpl.models import glm4_moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128

#: seed, config overrides, batch, seq
SHAPES = [
    # The spec sheet's tiny config: QK-norm, biases, head_dim != hidden/heads, groups 2 keep 1, rsf 2.5.
    (851, dict(n_group=2, topk_group=1), 2, 11),
    # GLM-4.5-Air switches: no QK-norm, rsf 1; no attention bias, one group, 3 dense layers of 4.
    (852, dict(use_qk_norm=False, attention_bias=False, routed_scaling_factor=1.0, num_hidden_layers=4,
               first_k_dense_replace=3), 1, 17),
    # Every layer MoE, 16 experts in 4 groups keep 2, top-4, 2 shared experts, no renormalisation, MQA.
    (853, dict(first_k_dense_replace=0, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
               n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.7, num_key_value_heads=1), 2, 9),
    # Partial factor 0.25 (Dr = 8 of 32), MHA, tied embeddings, 40 tokens, theta 1e4.
    (854, dict(head_dim=32, num_key_value_heads=4, tie_word_embeddings=True,
               rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25)), 1, 40),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def tiny_config(**overrides):
    """The spec sheet's verified tiny config (sec. 2.4) with ``overrides``."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
        use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.Glm4MoeConfig(**kwargs)


def config_json(config):
    """What ``save_pretrained`` writes to config.json for ``config``, with ``architectures``."""
    return json.loads(config.to_json_string()) | {"architectures": [glm4_moe.NAME]}


def randomise_glm(model, seed):
    """Parameters as :func:`hf_agreement.randomise`, and correction biases 0.3 N (a zero buffer otherwise)."""
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=g, dtype=torch.float64))


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, overrides, batch, seq = request.param
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(tiny_config(**overrides))
    randomise_glm(model, seed)
    path = tmp_path_factory.mktemp(f"glm4_moe-{seed}")
    model.save_pretrained(path)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq))
    return path, ids, refimpl.from_pretrained(path).forward(ids, return_hidden_states=True)


@pytest.mark.parametrize("dtype, attn, experts", [
    ("float32", "eager", "eager"), ("float32", "sdpa", "grouped_mm"), ("float64", "eager", "eager"),
])
def test_agrees_with_transformers_as_shipped(case, dtype, attn, experts):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), attn, experts), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_agrees_with_transformers_float64_islands_lifted(case):
    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, "eager")
    assert_agrees_to_float64(logits, taps, ours)


def test_checkpoint_holds_per_expert_matrices(case):
    # transformers saves the published layout (one gate/up/down per expert), not its fused stacks.
    path, _, _ = case
    layer = json.loads((path / "config.json").read_text())["first_k_dense_replace"]
    from safetensors.numpy import load_file

    keys = set(load_file(path / "model.safetensors"))
    assert f"model.layers.{layer}.mlp.experts.0.gate_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)


# --- the MoE block alone (op-level contract) ---------------------------------------------------------------------


@pytest.mark.parametrize("seed, overrides", [
    (861, dict(n_group=2, topk_group=1)),
    (862, dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
               norm_topk_prob=False, routed_scaling_factor=1.7)),
])
def test_moe_block_matches_glm4moemoe(seed, overrides):
    # Module-relative fused names and a config.json dict, exactly as the moe_block op passes them.
    config = tiny_config(**overrides)
    raw = config_json(config)
    x = np.random.default_rng(seed).standard_normal((2, 13, 64))
    with exact_float64():
        torch.manual_seed(seed)
        block = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeMoE(config).double()
        randomise_glm(block, seed)
        with torch.no_grad():
            theirs = block(torch.from_numpy(x)).numpy()
    weights = {name: t.detach().numpy() for name, t in block.state_dict().items()}
    ours = glm4_moe.moe_block(x, weights, raw)
    assert rel_rms(ours, theirs) < 1e-12


def test_moe_block_refuses_bad_weights():
    config = glm4_moe.Glm4MoeConfig.from_dict(config_json(tiny_config()))
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s) for n, s in glm4_moe.moe_weight_shapes(config).items()}
    x = rng.standard_normal((1, 3, 64))
    with pytest.raises(InputError, match="gate.e_score_correction_bias"):
        glm4_moe.moe_block(x, {k: v for k, v in weights.items() if "correction" not in k}, config)
    with pytest.raises(ShapeError, match="experts.down_proj"):
        glm4_moe.moe_block(x, weights | {"experts.down_proj": weights["experts.down_proj"][:, :, :-1]}, config)
    with pytest.raises(ShapeError, match="hidden_size"):
        glm4_moe.moe_block(x[..., :32], weights, config)
    with pytest.raises(InputError, match="config"):
        glm4_moe.moe_block(x, weights, "glm")


# --- checkpoints and config.json -----------------------------------------------------------------------------


def test_mtp_layer_weights_are_accepted_and_ignored(case, tmp_path):
    path, ids, ours = case
    from safetensors.numpy import load_file, save_file

    weights = load_file(path / "model.safetensors")
    raw = json.loads((path / "config.json").read_text())
    mtp = f"model.layers.{raw['num_hidden_layers']}."
    # What GLM-4.5 ships at model.layers.92: eh_proj, enorm, hnorm, shared_head.norm and a full decoder layer.
    weights[mtp + "eh_proj.weight"] = np.ones((64, 128), np.float32)
    weights[mtp + "enorm.weight"] = np.ones(64, np.float32)
    weights[mtp + "self_attn.q_proj.weight"] = np.full((96, 64), np.nan, np.float32)
    for name in ("config.json", "generation_config.json"):
        if (path / name).exists():
            (tmp_path / name).write_bytes((path / name).read_bytes())
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    again = refimpl.from_pretrained(tmp_path)(ids)
    np.testing.assert_array_equal(again, ours.logits)
    # Without MTP layers in the config the same tensors are unexpected.
    (tmp_path / "config.json").write_text(json.dumps(raw | {"num_nextn_predict_layers": 0}))
    with pytest.raises(UnexpectedWeightsError, match="model.layers"):
        refimpl.from_pretrained(tmp_path)


@pytest.mark.parametrize("raw", [
    {},
    {"partial_rotary_factor": 0.25},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.75},
     "partial_rotary_factor": 0.25},
    {"rope_theta": 1e6, "head_dim": 16},
    {"rope_scaling": {"rope_type": "default", "rope_theta": 2e5}, "partial_rotary_factor": 1.0},
])
def test_config_resolution_matches_transformers(raw):
    base = {"architectures": [glm4_moe.NAME], "model_type": "glm4_moe", "vocab_size": VOCAB, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "first_k_dense_replace": 2}
    theirs = transformers.Glm4MoeConfig(**{k: v for k, v in (base | raw).items() if k != "architectures"})
    ours = glm4_moe.Glm4MoeConfig.from_dict(base | raw)
    hf_head_dim = getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    assert ours.head_dim == hf_head_dim
    for key in ("rope_type", "rope_theta", "partial_rotary_factor"):
        assert ours.rope_parameters[key] == theirs.rope_parameters[key], key
    assert ours.mlp_layer_types == tuple(
        "sparse" if i >= theirs.first_k_dense_replace else "dense" for i in range(theirs.num_hidden_layers))


def test_rope_tables_match_transformers_inv_freq():
    config = tiny_config(head_dim=32)
    hf = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeRotaryEmbedding(config)
    ours = glm4_moe.Glm4MoeConfig.from_dict(config_json(config))
    inv_freq, _ = refimpl.rope.rope_frequencies(ours.rope_parameters, ours.head_dim)
    # transformers builds them in float32: 16 rotary dims of 32, 8 frequencies.
    assert inv_freq.shape == (8,)
    np.testing.assert_allclose(inv_freq, hf.inv_freq.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("raw, match", [
    ({"partial_rotary_factor": None}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.2}, "rotary width"),
    ({"head_dim": None}, "head_dim"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 2, "topk_group": 3}, "topk_group"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_nextn_predict_layers": 1, "num_mtp_layers": 2}, "disagree"),
])
def test_refuses_what_it_does_not_implement(raw, match):
    base = {"architectures": [glm4_moe.NAME], "vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "head_dim": 16}
    with pytest.raises(ConfigError, match=match):
        glm4_moe.Glm4MoeConfig.from_dict(base | raw)


@pytest.mark.parametrize("name, dense, moe, rotary, total_billions, active_billions", [
    # GLM-4.5 report (arXiv:2508.06471) Table 1 and the model cards: 355B total / 32B active,
    # 106B / 12B; 3 / 1 dense layers; RoPE on 64 of 128 dims.
    ("GLM-4.5", 3, 89, 64, 355, 32),
    ("GLM-4.5-Air", 1, 45, 64, 106, 12),
])
def test_presets_match_the_published_models(name, dense, moe, rotary, total_billions, active_billions):
    config = glm4_moe.Glm4MoeConfig.from_dict(glm4_moe.PRESETS[name])
    assert config.mlp_layer_types.count("dense") == dense and config.mlp_layer_types.count("sparse") == moe
    inv_freq, _ = refimpl.rope.rope_frequencies(config.rope_parameters, config.head_dim)
    assert 2 * len(inv_freq) == rotary
    shapes = glm4_moe.weight_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    m, i, e, k = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok
    idle = moe * (e - k) * 3 * m * i
    tables = 2 * config.vocab_size * m
    # The published totals include the MTP layer (one more MoE layer, ~1-2 %) and the activated
    # counts exclude the embedding and output tables; ours have no MTP layer.
    assert abs(total / 1e9 - total_billions) / total_billions < 0.05, total / 1e9
    active = (total - idle - tables) / 1e9
    assert abs(active - active_billions) / active_billions < 0.05, active


# --- golden cases ------------------------------------------------------------------------------------------------


def _golden_routing(case_id):
    """Every router call of a golden case's float64 forward: (selection scores, config) per MoE layer."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens

    case = next(c for c in make_goldens.CASES if c.case_id == case_id)
    calls = []
    original = glm4_moe.route

    def record(x, p, config):
        calls.append((x, p, config))
        return original(x, p, config)

    with mock.patch.object(glm4_moe, "route", record), tempfile.TemporaryDirectory() as scratch:
        make_goldens.build_case(case, Path(scratch))
    return calls


def _selection(scores, config, n_group, topk_group):
    """Experts chosen per row ``(N, k)`` sorted, and the margin of each row's decisions, by the
    router's definition (DeepSeek-V3 report eqs. 12-16 with group limit), written out here."""
    e, k = scores.shape[1], config.num_experts_per_tok
    group_scores = -np.sort(-scores.reshape(len(scores), n_group, e // n_group), axis=-1)[..., :2].sum(-1)
    ranked_groups = np.argsort(-group_scores, axis=-1, kind="stable")
    kept = np.zeros_like(group_scores, dtype=bool)
    np.put_along_axis(kept, ranked_groups[:, :topk_group], True, axis=-1)
    masked = np.where(np.repeat(kept, e // n_group, axis=-1), scores, -np.inf)
    ranked = np.sort(np.argsort(-masked, axis=-1, kind="stable")[:, :k], axis=-1)
    top = -np.sort(-masked, axis=-1)
    margin = top[:, k - 1] - top[:, k]
    if topk_group < n_group:
        top_groups = -np.sort(-group_scores, axis=-1)
        margin = np.minimum(margin, top_groups[:, topk_group - 1] - top_groups[:, topk_group])
    return ranked, margin


@pytest.mark.parametrize("case_id", ["glm4_moe/glm45-style", "glm4_moe/grouped-routing",
                                     "glm4_moe/air-style-no-bias", "glm4_moe/all-moe-single-token",
                                     "glm4_moe/eps-visible"])
def test_golden_routing_is_clear_of_near_ties_and_exercises_bias_and_groups(case_id):
    sys.path.insert(0, str(ROOT / "tools"))
    from golden_cases.glm4_moe import ROUTING_MARGIN

    calls = _golden_routing(case_id)
    assert calls
    for x, p, config in calls:
        sigmoid = 1 / (1 + np.exp(-(x @ p["gate.weight"].T)))
        scores = sigmoid + p["gate.e_score_correction_bias"]
        chosen, margin = _selection(scores, config, config.n_group, config.topk_group)
        # transformers in bfloat16 moves these scores by up to ~0.01 (measured): no flips.
        assert margin.min() >= ROUTING_MARGIN, f"{case_id}: near-tie {margin.min():.4f}"
        # The correction bias changes the chosen set for some token (MOE-01 is visible) ...
        unbiased, _ = _selection(sigmoid, config, config.n_group, config.topk_group)
        assert (unbiased != chosen).any(axis=-1).any()
        # ... where there are groups, the group limit changes it for most tokens ...
        if config.topk_group < config.n_group:
            free, _ = _selection(scores, config, 1, 1)
            assert (free != chosen).any(axis=-1).mean() > 0.5
        # ... and tokens do not all go to the same experts.
        assert len({tuple(row) for row in chosen}) >= min(3, len(x))


def test_golden_case_config_reaches_transformers_as_intended(tmp_path):
    # The glm45-style case omits partial_rotary_factor: transformers must resolve it to 0.5 too.
    sys.path.insert(0, str(ROOT / "tools"))
    from golden_cases.glm4_moe import CASES

    raw = next(c for c in CASES if c.case_id == "glm4_moe/glm45-style").config
    assert "partial_rotary_factor" not in raw and "partial_rotary_factor" not in raw["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.rope_parameters["partial_rotary_factor"] == 0.5
    assert glm4_moe.Glm4MoeConfig.from_dict(raw).rope_parameters["partial_rotary_factor"] == 0.5
