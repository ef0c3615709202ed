"""refimpl's multi-token-prediction (MTP) draft logits against transformers' MTP modules.

Checkpoints are built with transformers itself: the main model (``DeepseekV3ForCausalLM``,
``Glm4MoeForCausalLM``) and its ``modeling_layers.MtpModel`` with ``num_mtp_layers`` depths,
every parameter randomised (the zero-initialised correction-bias buffers too). The main model
is saved with ``save_pretrained``; the MTP depths are appended under the published names
(``model.layers.{L + d}.{enorm,hnorm,eh_proj,shared_head.norm}.weight`` and the decoder layer's
tensors, routed experts one matrix per expert), the inverse of transformers' own conversion
(``conversion_mapping.py`` ``MtpModel``). transformers loads them back with
``MtpModel.from_pretrained`` (its hard-coded key pattern, layer 61 / 92 / 46, pointed at
``L + d``).

transformers' sequence-level draft logits of depth k are ``MtpModel.forward_layer(k - 1, ...)``
on the previous depth's output (``hidden_states[-1]`` of the main model for k = 1) at the first
``T - k`` positions, with the tokens ``input_ids[:, k:]`` and their positions ``k .. T-1``,
projected by ``MtpModel._project_to_logits`` (the main ``lm_head``). Bars: transformers as
shipped within 1e-5 relative RMS (float32 and float64); with its float32 islands lifted
within 1e-10, for every depth. A further test runs transformers' generation-time drafting
loop (``MtpModel.forward``, which samples depth k's token and feeds it to depth k + 1) and
finds its draft logits in the reference's at the last position.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import randomise, rel_rms  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
DEEPSEEK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                num_experts_per_tok=3, n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                norm_topk_prob=True, rope_interleave=True, rope_parameters=YARN, max_position_embeddings=640,
                rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=None)
GLM = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
           use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=1, topk_group=1,
           routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=dict(rope_type="default", rope_theta=1e6),
           max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)

SLOW = pytest.mark.slow
#: family, seed, config overrides (num_mtp_layers included), batch, seq; the one-depth variants
#: (depth 1 is also checked in every chained variant) run with ``-m slow``.
def _variant(family, seed, overrides, batch, seq, id, slow=False):
    return pytest.param((family, seed, overrides, batch, seq), id=id, marks=[SLOW] if slow else [])


VARIANTS = [
    _variant("deepseek_v3", 1561, dict(num_mtp_layers=1), 2, 9, "ds-one-depth", slow=True),
    _variant("deepseek_v3", 1562, dict(num_mtp_layers=2, rope_interleave=False, q_lora_rank=None, attention_bias=True,
                                       n_group=2, topk_group=1,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
             2, 11, "ds-two-depths-rotate-half-no-qlora"),
    _variant("deepseek_v3", 1563, dict(num_mtp_layers=3, n_group=1, topk_group=1, tie_word_embeddings=True,
                                       first_k_dense_replace=0), 1, 13, "ds-three-depths-tied-all-moe"),
    _variant("glm4_moe", 1564, dict(num_mtp_layers=1), 2, 8, "glm-one-depth", slow=True),
    _variant("glm4_moe", 1565, dict(num_mtp_layers=2, use_qk_norm=False, routed_scaling_factor=1.0,
                                    tie_word_embeddings=True,
                                    rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                         partial_rotary_factor=0.25)),
             1, 12, "glm-two-depths-tied-partial-0.25"),
]


def _randomise_moe(module, seed, bias, norm_offset=1.0):
    """``randomise`` plus expert stacks by their last-axis fan-in and the correction-bias buffers."""
    randomise(module, seed, norm_offset)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
        for name, b in sorted(module.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias(torch.randn(b.shape, generator=g, dtype=torch.float64)))


BIAS = {"deepseek_v3": lambda n: -0.6 + 0.3 * n, "glm4_moe": lambda n: 0.3 * n}


def checkpoint_tensors(mtp, num_hidden_layers):
    """The MTP depths' tensors under the published checkpoint names (per-expert matrices)."""
    out = {}
    for name, p in mtp.state_dict().items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match:
            continue
        prefix, rest = f"model.layers.{num_hidden_layers + int(match.group(1))}.", match.group(2)
        p = p.detach().to(torch.float32).numpy()
        if rest == "post_norm.weight":
            out[prefix + "shared_head.norm.weight"] = p
        elif rest == "mtp_block.mlp.experts.gate_up_proj":
            for e, stack in enumerate(p):
                half = stack.shape[0] // 2
                out[prefix + f"mlp.experts.{e}.gate_proj.weight"] = stack[:half]
                out[prefix + f"mlp.experts.{e}.up_proj.weight"] = stack[half:]
        elif rest == "mtp_block.mlp.experts.down_proj":
            out.update({prefix + f"mlp.experts.{e}.down_proj.weight": stack for e, stack in enumerate(p)})
        else:
            out[prefix + rest.removeprefix("mtp_block.")] = p
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def build(family, seed, overrides, tmp_path_factory):
    """A checkpoint with ``num_mtp_layers`` randomised MTP depths appended (see the module docstring)."""
    from safetensors.numpy import load_file, save_file

    config_class, model_class = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
                                 "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM)}[family]
    config = config_class(**{**(DEEPSEEK if family == "deepseek_v3" else GLM), **overrides})
    torch.manual_seed(seed)
    model = model_class(config)
    _randomise_moe(model, seed, BIAS[family])
    mtp = MtpModel(model, config.num_mtp_layers)
    for depth, layer in enumerate(mtp.layers):
        _randomise_moe(layer, seed + 100 + depth, BIAS[family])
    path = tmp_path_factory.mktemp(f"{family}-mtp-{seed}")
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, **checkpoint_tensors(mtp, config.num_hidden_layers)}, path / "model.safetensors",
              metadata={"format": "pt"})
    return path


def load_with_mtp(path, dtype, lifted):
    """transformers' main model and ``MtpModel`` for ``path`` (float64 islands lifted if ``lifted``)."""
    if lifted:
        model = load_exact_float64(path, attn_implementation="eager")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", experts_implementation="eager")
    text = model.config.get_text_config()
    model._keys_to_ignore_on_load_unexpected = [
        rf"model\.layers\.{text.num_hidden_layers + d}\." for d in range(text.num_mtp_layers)]
    return model.eval(), MtpModel.from_pretrained(model).eval()


def hf_drafts(model, mtp, ids):
    """Main logits and every depth's draft logits ``(B, T-k, V)`` (see the module docstring)."""
    tokens = torch.from_numpy(ids)
    batch, length = ids.shape
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
        hidden, drafts = out.hidden_states[-1], []
        for index in range(mtp.num_mtp_layers):
            k = index + 1
            positions = torch.arange(k, length)[None].expand(batch, -1)
            hidden = mtp.forward_layer(index, hidden[:, :length - k], positions, None, input_ids=tokens[:, k:])
            drafts.append(mtp._project_to_logits(hidden).double().numpy())
    return out.logits.double().numpy(), drafts


@pytest.fixture(scope="module", params=VARIANTS)
def case(request, tmp_path_factory):
    family, seed, overrides, batch, seq = request.param
    path = build(family, seed, overrides, tmp_path_factory)
    ids = np.random.default_rng(seed).integers(0, 128, size=(batch, seq))
    ours = refimpl.from_pretrained(path).forward(ids, return_mtp_logits=True)
    return path, ids, ours


def test_reference_has_one_draft_per_depth_with_shrinking_length(case):
    path, ids, ours = case
    depths = refimpl.from_pretrained(path).config.num_nextn_predict_layers
    batch, length = ids.shape
    assert [d.shape for d in ours.mtp_logits] == [(batch, length - k, 128) for k in range(1, depths + 1)]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=SLOW)])
def test_agrees_with_transformers_as_shipped(case, dtype):
    path, ids, ours = case
    logits, drafts = hf_drafts(*load_with_mtp(path, getattr(torch, dtype), lifted=False), ids)
    assert rel_rms(logits, ours.logits) < 1e-5
    for k, (theirs, expected) in enumerate(zip(drafts, ours.mtp_logits, strict=True), start=1):
        err = rel_rms(theirs, expected)
        assert err < 1e-5, f"depth {k}: relative RMS {err:.2e}"


def test_agrees_with_transformers_float64_islands_lifted(case):
    path, ids, ours = case
    with exact_float64():
        logits, drafts = hf_drafts(*load_with_mtp(path, torch.float64, lifted=True), ids)
    assert rel_rms(logits, ours.logits) < 1e-10
    for k, (theirs, expected) in enumerate(zip(drafts, ours.mtp_logits, strict=True), start=1):
        err = rel_rms(theirs, expected)
        assert err < 1e-10, f"depth {k}: relative RMS {err:.2e}"


def test_transformers_drafting_loop_matches_the_last_position(case):
    # MtpModel.forward is what generate(use_mtp=True) runs: the main model has processed
    # t_0..t_N and sampled t_{N+1}; depth 1 sees the tokens t_1..t_{N+1} at positions 1..N+1
    # with h_0..h_N, drafts d_1 at its last slot, and depth 2 sees those tokens rolled by one with
    # d_1 appended (greedy). The reference on t_0..t_{N+1}, d_1, ..., d_{D-1} must hold
    # transformers' draft of depth k in its row N.
    path, ids, _ = case
    with exact_float64():
        model, mtp = load_with_mtp(path, torch.float64, lifted=True)
        tokens = torch.from_numpy(ids)
        batch, length = ids.shape
        with torch.no_grad():
            hidden = model(tokens[:, :-1], output_hidden_states=True).hidden_states[-1]
            positions = torch.arange(1, length)[None].expand(batch, -1)
            drafted, draft_logits, _ = mtp(input_ids=tokens[:, 1:], last_hidden_states=hidden, attention_mask=None,
                                          position_ids=positions, mtp_cache=None)
    extended = np.concatenate([ids, drafted[:, :-1].numpy()], axis=1)
    ours = refimpl.from_pretrained(path).forward(extended, return_mtp_logits=True)
    last = length - 2
    for k, expected in enumerate(ours.mtp_logits, start=1):
        err = rel_rms(draft_logits[:, k - 1].double().numpy(), expected[:, last])
        assert err < 1e-10, f"depth {k}: relative RMS {err:.2e}"


def test_qwen3_next_mtp_agrees_with_transformers_mtp_layer_around_its_decoder_layer(tmp_path_factory):
    # transformers 5.24 has no Qwen3-Next MTP (Qwen3NextForCausalLM drops mtp.*, modeling_qwen3_next.py:947),
    # but its generic MtpLayer around Qwen3NextDecoderLayer (one full-attention layer) with
    # Qwen3NextRMSNorm (1 + w) is Qwen's module as vLLM's qwen3_next_mtp.py runs it: fc = eh_proj,
    # pre_fc_norm_embedding = enorm, pre_fc_norm_hidden = hnorm, norm = post_norm (the renaming
    # conversion_mapping.py applies to that layout). Main model lifted to float64 by hf_exact.
    from safetensors.numpy import load_file, save_file
    from transformers.modeling_layers import MtpLayer
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.25, rope_theta=1e7,
                    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                    linear_num_value_heads=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
                    shared_expert_intermediate_size=20, norm_topk_prob=True, full_attention_interval=2,
                    rms_norm_eps=1e-6)
    config = transformers.Qwen3NextConfig(**settings)
    config._attn_implementation = config._experts_implementation = "eager"
    torch.manual_seed(1566)
    model = transformers.Qwen3NextForCausalLM(config)
    randomise(model, 1566, norm_offset=0.0)
    one = transformers.Qwen3NextConfig(**{**settings, "num_hidden_layers": 1, "layer_types": ["full_attention"]})
    one._attn_implementation = one._experts_implementation = "eager"
    layer = MtpLayer(one, qn.Qwen3NextDecoderLayer, qn.Qwen3NextRMSNorm, 0)
    # Every norm of the module is 1 + w: its weights are drawn as offsets 0.2 N.
    _randomise_moe(layer, 1567, lambda n: n, norm_offset=0.0)
    path = tmp_path_factory.mktemp("qwen3-next-mtp")
    model.save_pretrained(path)
    names = {"enorm.weight": "pre_fc_norm_embedding.weight", "hnorm.weight": "pre_fc_norm_hidden.weight",
             "eh_proj.weight": "fc.weight", "post_norm.weight": "norm.weight"}
    mtp = {}
    for name, p in layer.state_dict().items():
        p = p.to(torch.float32).numpy()
        if name in names:
            mtp[f"mtp.{names[name]}"] = p
        elif name == "mtp_block.mlp.experts.gate_up_proj":
            for e, stack in enumerate(p):
                mtp[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = stack[:len(stack) // 2]
                mtp[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = stack[len(stack) // 2:]
        elif name == "mtp_block.mlp.experts.down_proj":
            mtp.update({f"mtp.layers.0.mlp.experts.{e}.down_proj.weight": stack for e, stack in enumerate(p)})
        else:
            mtp[f"mtp.layers.0.{name.removeprefix('mtp_block.')}"] = p
    save_file({**load_file(path / "model.safetensors"), **{k: np.ascontiguousarray(v) for k, v in mtp.items()}},
              path / "model.safetensors", metadata={"format": "pt"})
    ids = np.random.default_rng(1566).integers(0, 128, size=(2, 9))
    ours = refimpl.from_pretrained(path).forward(ids, return_mtp_logits=True)
    with exact_float64():
        main = load_exact_float64(path, attn_implementation="eager").eval()
        layer64 = MtpLayer(one, qn.Qwen3NextDecoderLayer, qn.Qwen3NextRMSNorm, 0).double().eval()
        layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        tokens = torch.from_numpy(ids)
        with torch.no_grad():
            hidden = main(tokens, output_hidden_states=True).hidden_states[-1][:, :-1]
            positions = torch.arange(1, 9)[None].expand(2, -1)
            embeds = main.model.embed_tokens(tokens[:, 1:])
            cos_sin = qn.Qwen3NextRotaryEmbedding(one)(embeds, positions)
            mask = torch.full((8, 8), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
            out = layer64(embeds, hidden, position_embeddings=cos_sin, attention_mask=mask, position_ids=positions,
                          cache=None)
            drafts = main.lm_head(out).numpy()
    assert ours.mtp_logits[0].shape == (2, 8, 128)
    err = rel_rms(drafts, ours.mtp_logits[0])
    assert err < 1e-10, f"relative RMS {err:.2e}"
    assert np.abs(drafts).max() > 1
