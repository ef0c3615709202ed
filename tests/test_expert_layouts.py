"""Both MoE checkpoint layouts transformers saves load into the same model; the activation of Llama 4 and GLM-4.5.

transformers 5.24 writes per-expert tensors by default (``save_pretrained(dir)``: the
published layout, ``mlp.experts.{e}.gate_proj.weight`` ...) and its fused module layout
with ``save_pretrained(dir, save_original_format=False)`` (``mlp.experts.gate_up_proj``
(E, 2I, M), ``mlp.experts.down_proj`` (E, M, I); MiniMax-M2 also renames
``block_sparse_moe.*`` to ``mlp.*``). For each of the four architectures whose published
layout is per-expert, a tiny random model (correction-bias buffers included) is saved
both ways: refimpl's logits and hidden states from the two folders are bitwise equal,
and agree with transformers as shipped (float32) loaded from the fused folder. A layer
that mixes the layouts, or holds part of one, is refused with a one-line error naming it.

Also: Llama 4 and GLM-4.5 apply ``hidden_act`` (not only silu) in their dense MLPs,
shared and routed experts, as transformers does.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

import refimpl  # noqa: E402
from hf_agreement import assert_agrees_to_float64, hf_lifted, hf_logits, randomise, rel_rms  # noqa: E402
from refimpl.errors import CheckpointError, MissingWeightsError, WeightShapeError  # noqa: E402

VOCAB = 96

#: architecture -> (model class, config class, config kwargs, a MoE layer index)
MODELS = {
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=3,
        n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, num_mtp_layers=0,
        pad_token_id=None), 2),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1]), 2),
    "minimax_m2": ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, head_dim=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, rotary_dim=8,
        bos_token_id=1, eos_token_id=2), 1),
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
        use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
        routed_scaling_factor=2.5), 1),
}


def randomise_moe(model, seed):
    """:func:`hf_agreement.randomise`, expert stacks ``(E, out, in)`` by their fan-in ``in``, and the
    zero-initialised ``e_score_correction_bias`` buffers ``-0.3 + 0.3 N`` (so they change the choice)."""
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(-0.3 + 0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64))


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """``(arch, per-expert folder, fused folder, ids, MoE layer prefix)`` of one tiny random model."""
    arch = request.param
    model_class, config_class, kwargs, layer = MODELS[arch]
    seed = 900 + sorted(MODELS).index(arch)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    randomise_moe(model, seed)
    per_expert, fused = tmp_path_factory.mktemp(f"{arch}-per-expert"), tmp_path_factory.mktemp(f"{arch}-fused")
    model.save_pretrained(per_expert)
    model.save_pretrained(fused, save_original_format=False)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(2, 7))
    return arch, per_expert, fused, ids, f"model.layers.{layer}."


def test_fused_folder_is_fused_and_per_expert_folder_is_not(saved):
    # Guards the comparisons below against a transformers that saves one layout either way.
    _, per_expert, fused, _, prefix = saved
    fused_names, per_expert_names = set(load_file(fused / "model.safetensors")), set(
        load_file(per_expert / "model.safetensors"))
    assert {prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"} <= fused_names
    assert not any(".experts.0." in name for name in fused_names)
    assert not any(name.endswith("gate_up_proj") for name in per_expert_names)
    assert any(name.startswith(prefix) and ".experts.0." in name for name in per_expert_names)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_both_layouts_give_bitwise_equal_outputs(saved, dtype):
    _, per_expert, fused, ids, _ = saved
    a = refimpl.from_pretrained(per_expert, dtype=dtype).forward(ids, return_hidden_states=True)
    b = refimpl.from_pretrained(fused, dtype=dtype).forward(ids, return_hidden_states=True)
    assert a.logits.dtype == b.logits.dtype == dtype
    assert np.array_equal(a.logits, b.logits)
    assert list(a.hidden_states) == list(b.hidden_states)
    assert all(np.array_equal(a.hidden_states[n], b.hidden_states[n]) for n in a.hidden_states)


def test_fused_layout_agrees_with_transformers_as_shipped(saved):
    _, _, fused, ids, _ = saved
    err = rel_rms(hf_logits(fused, ids, torch.float32, "eager"), refimpl.from_pretrained(fused)(ids))
    assert err < 1e-5, f"relative RMS {err:.2e}"


def _layer_names(folder, prefix):
    return sorted(name for name in load_file(folder / "model.safetensors") if name.startswith(prefix))


def _mixed_per_expert_plus_fused_stack(per_expert, fused, prefix):
    tensors = load_file(per_expert / "model.safetensors")
    return tensors | {prefix + "mlp.experts.gate_up_proj": load_file(fused / "model.safetensors")[
        prefix + "mlp.experts.gate_up_proj"]}


def _mixed_fused_plus_one_published(per_expert, fused, prefix):
    # MiniMax-M2: its router under the published name (block_sparse_moe.*); others: one expert's matrix.
    tensors = load_file(fused / "model.safetensors")
    extra = [name for name in _layer_names(per_expert, prefix) if name not in tensors][0]
    return tensors | {extra: load_file(per_expert / "model.safetensors")[extra]}


def _fused_without_down(per_expert, fused, prefix):
    tensors = load_file(fused / "model.safetensors")
    del tensors[prefix + "mlp.experts.down_proj"]
    return tensors


def _fused_stack_one_expert_short(per_expert, fused, prefix):
    tensors = load_file(fused / "model.safetensors")
    tensors[prefix + "mlp.experts.gate_up_proj"] = tensors[prefix + "mlp.experts.gate_up_proj"][:-1].copy()
    return tensors


def _per_expert_without_one_matrix(per_expert, fused, prefix):
    tensors = load_file(per_expert / "model.safetensors")
    del tensors[[name for name in _layer_names(per_expert, prefix) if ".experts.1." in name][0]]
    return tensors


#: edit, error, what the message must say (the layer prefix is added)
BAD_LAYOUTS = [
    (_mixed_per_expert_plus_fused_stack, CheckpointError, r"mixes transformers' fused expert layout"),
    (_mixed_fused_plus_one_published, CheckpointError, r"mixes transformers' fused expert layout"),
    (_fused_without_down, MissingWeightsError, r"fused expert layout but lacks .*experts\.down_proj"),
    (_fused_stack_one_expert_short, WeightShapeError, r"experts\.gate_up_proj' has shape"),
    (_per_expert_without_one_matrix, MissingWeightsError, r"experts\.1\."),
]


@pytest.mark.parametrize("edit, error, message", BAD_LAYOUTS, ids=[b[0].__name__.strip("_") for b in BAD_LAYOUTS])
def test_mixed_or_partial_layouts_are_refused_naming_the_layer(saved, tmp_path, edit, error, message):
    _, per_expert, fused, _, prefix = saved
    shutil.copy(per_expert / "config.json", tmp_path / "config.json")
    save_file(edit(per_expert, fused, prefix), str(tmp_path / "model.safetensors"))
    with pytest.raises(error, match=message) as caught:
        refimpl.from_pretrained(tmp_path)
    assert prefix[:-1] in str(caught.value) and "\n" not in str(caught.value)


# hidden_act: transformers applies it to the dense MLPs, the shared expert and the routed experts.

LLAMA4 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
              interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=3,
              max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
GLM = {**MODELS["glm4_moe"][2], "num_hidden_layers": 2}


@pytest.mark.parametrize("model_class, config_class, kwargs, hidden_act", [
    ("Llama4ForCausalLM", "Llama4TextConfig", LLAMA4, "gelu"),
    ("Glm4MoeForCausalLM", "Glm4MoeConfig", GLM, "gelu_pytorch_tanh"),
], ids=["llama4-gelu", "glm4_moe-gelu_pytorch_tanh"])
def test_hidden_act_other_than_silu_agrees_with_transformers(tmp_path, model_class, config_class, kwargs, hidden_act):
    torch.manual_seed(931)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs, hidden_act=hidden_act))
    # Llama 4's input-major stacks (E, M, 2I) / (E, I, M) have their fan-in on axis 1, as randomise assumes.
    (randomise if model_class == "Llama4ForCausalLM" else randomise_moe)(model, 931)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == hidden_act
    ids = np.random.default_rng(931).integers(0, VOCAB, size=(2, 9))
    ours = refimpl.from_pretrained(tmp_path).forward(ids, return_hidden_states=True)
    err = rel_rms(hf_logits(tmp_path, ids, torch.float32, "eager"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"
    assert_agrees_to_float64(*hf_lifted(tmp_path, ids, "eager"), ours)
