"""refimpl's DeepSeek-V3 / Kimi K2 against transformers on tiny random checkpoints; config and MoE block checks.

Models are built with transformers itself (not the golden ones), randomised (router
weights, expert stacks and the zero-initialised ``e_score_correction_bias`` buffer
included), saved with ``save_pretrained`` (per-expert tensors, as published
checkpoints) and loaded with ``refimpl.from_pretrained``. Bars: transformers as
shipped within 1e-5 relative RMS of the logits; transformers with its float32
islands lifted within 1e-10 on the logits and every tap.
"""

import math

import numpy as np
import pytest

import refimpl
from refimpl.errors import ConfigError, MissingWeightsError, UnexpectedWeightsError
from refimpl.models import deepseek_v3
from refimpl.models.deepseek_v3 import PRESETS, DeepseekV3Config, moe_block, weight_shapes

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3,
            n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_interleave=True, rope_parameters=YARN, max_position_embeddings=640, rms_norm_eps=1e-6,
            tie_word_embeddings=False, num_mtp_layers=0, pad_token_id=None)

#: seed, config overrides, batch, seq
VARIANTS = [
    (21, {}, 2, 11),
    (22, dict(rope_interleave=False, q_lora_rank=None, attention_bias=True, norm_topk_prob=False,
              routed_scaling_factor=1.5, n_group=2, topk_group=1,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 2, 9),
    (23, dict(n_group=1, topk_group=1, n_routed_experts=12, num_experts_per_tok=4, n_shared_experts=1,
              routed_scaling_factor=2.827, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512,
              rope_parameters=dict(YARN, rope_theta=50000.0, factor=32.0, beta_fast=1.0, beta_slow=1.0)), 2, 13),
    (24, dict(first_k_dense_replace=0, num_hidden_layers=2, max_position_embeddings=320,
              rope_parameters=dict(YARN, original_max_position_embeddings=8, mscale=0.707)), 1, 40),
]
IDS = ["v3-groups", "rotate-half-no-renorm-bias", "kimi-tied-eps1e-5", "mscale-differs-all-moe"]


def rel_rms(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise_deepseek(model, seed):
    """Every parameter at a realistic scale (hf_agreement.randomise), expert stacks by their
    last-axis fan-in, and the correction bias buffer -0.6 + 0.3 N (mostly negative)."""
    import torch
    from hf_agreement import randomise

    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(-0.6 + 0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64))


def build(seed, overrides, tmp_path_factory, name="ds"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config)
    randomise_deepseek(model, seed)
    path = tmp_path_factory.mktemp(f"{name}-{seed}")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def case(request, tmp_path_factory):
    seed, overrides, b, t = request.param
    path = build(seed, overrides, tmp_path_factory)
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=(b, t))
    return path, ids, refimpl.from_pretrained(path).forward(ids, return_hidden_states=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_agrees_with_transformers_as_shipped(case, dtype):
    import torch
    from hf_agreement import hf_logits

    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), "eager"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_float64_islands_lifted(case, attn):
    from hf_agreement import assert_agrees_to_float64, hf_lifted

    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, attn)
    assert_agrees_to_float64(logits, taps, ours)


def test_checkpoint_is_per_expert_and_mtp_layers_are_ignored(tmp_path_factory):
    # save_pretrained writes mlp.experts.{e}.{gate,up,down}_proj.weight; a published checkpoint also
    # carries its MTP module as model.layers.{L}.*, which must load and change nothing.
    from safetensors.numpy import load_file, save_file

    path = build(25, dict(num_hidden_layers=2), tmp_path_factory, "ds-mtp")
    tensors = load_file(path / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in tensors
    ids = np.arange(12).reshape(2, 6)
    before = refimpl.from_pretrained(path)(ids)
    rng = np.random.default_rng(0)
    mtp = {f"model.layers.2.{k}": rng.standard_normal(v).astype(np.float32) for k, v in {
        "enorm.weight": (64,), "hnorm.weight": (64,), "eh_proj.weight": (64, 128), "shared_head.norm.weight": (64,),
        "self_attn.kv_b_proj.weight": (80, 16), "mlp.experts.0.gate_proj.weight": (32, 64)}.items()}
    save_file({**tensors, **mtp}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnexpectedWeightsError, match="model.layers.2"):
        refimpl.from_pretrained(path)
    raw = (path / "config.json").read_text().replace('"num_nextn_predict_layers": 0', '"num_nextn_predict_layers": 1')
    (path / "config.json").write_text(raw)
    assert np.array_equal(refimpl.from_pretrained(path)(ids), before)


def test_moe_block_matches_transformers_module_float64():
    # The op-level MoE block (module state-dict names) against DeepseekV3MoE, islands lifted.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conformance.backends.hf_exact import exact_float64
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(**TINY)
    config._experts_implementation = "eager"
    x = np.random.default_rng(3).standard_normal((2, 7, 64))
    with exact_float64(), torch.no_grad():
        module = DeepseekV3MoE(config).double()
        g = torch.Generator().manual_seed(3)
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
        module.gate.e_score_correction_bias.copy_(-0.6 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64))
        theirs = module(torch.from_numpy(x)).numpy()
        weights = {k: v.numpy() for k, v in module.state_dict().items()}
    raw = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           **{k: v for k, v in TINY.items() if k not in ("num_mtp_layers", "pad_token_id")}}
    assert rel_rms(moe_block(x, weights, raw), theirs) < 1e-12
    with pytest.raises(MissingWeightsError, match="experts.down_proj"):
        moe_block(x, {k: v for k, v in weights.items() if k != "experts.down_proj"}, raw)


# Config reading (no transformers needed)

def _raw(**overrides):
    raw = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           **{k: v for k, v in TINY.items() if k not in ("num_mtp_layers", "pad_token_id")}}
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}


def test_config_schedule_and_legacy_rope():
    config = DeepseekV3Config.from_dict(_raw(rope_parameters=None, rope_theta=50000.0,
                                             rope_scaling={"type": "yarn", "factor": 32, "beta_fast": 1,
                                                           "beta_slow": 1, "original_max_position_embeddings": 16,
                                                           "mscale": 1.0, "mscale_all_dim": 1.0}))
    assert config.moe_layers == (False, True, True)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 50000.0
    assert DeepseekV3Config.from_dict(_raw(q_lora_rank=None)).q_lora_rank is None
    assert DeepseekV3Config.from_dict(_raw(first_k_dense_replace=5)).moe_layers == (False,) * 3


@pytest.mark.parametrize("overrides, message", [
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=1), "num_experts_per_tok"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(rope_parameters=dict(YARN, factor=None)), "factor"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DeepseekV3Config.from_dict(_raw(**overrides))


def test_presets_match_the_published_sizes():
    # DeepSeek-V3 report (arXiv:2412.19437, abstract): 671B total, 37B activated per token.
    # Kimi K2 report (arXiv:2507.20534): 1T total, 32B activated. MTP modules are not counted.
    for name, total_b, active_b in (("DeepSeek-V3", 671, 37), ("Kimi-K2-Instruct", 1000, 32)):
        config = DeepseekV3Config.from_dict(PRESETS[name])
        shapes = weight_shapes(config)
        total = sum(math.prod(s) for s in shapes.values())
        routed = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
        active = total - routed + routed * config.num_experts_per_tok // config.n_routed_experts
        assert total / 1e9 == pytest.approx(total_b, rel=0.03)
        assert int(active / 1e9) == active_b
    assert round(sum(math.prod(s) for s in weight_shapes(DeepseekV3Config.from_dict(PRESETS["DeepSeek-V3"])).values())
                 / 1e9) == 671
    assert deepseek_v3.ARCHITECTURE.ignored_weights(DeepseekV3Config.from_dict(PRESETS["DeepSeek-V3"])) == (
        "model.layers.61.",)
