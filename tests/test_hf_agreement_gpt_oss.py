"""refimpl against Hugging Face transformers on tiny random gpt-oss checkpoints.

Models are built and randomised with transformers itself (not the golden ones), saved
with ``save_pretrained`` and loaded with ``refimpl.from_pretrained``. Two bars:
transformers as shipped (float32 islands in RMSNorm and RoPE) within 1e-5 relative
RMS, and transformers with those islands lifted (``conformance.backends.hf_exact``)
within 1e-10, logits and every tap. gpt-oss has no sdpa path in transformers
(``_supports_sdpa = False``), so only eager attention is compared.

Beyond :func:`hf_agreement.randomise`, the sinks are drawn 2 N (both signs), the
expert biases 0.2 N, and in some shapes the expert gate_up weights are scaled so that
the SwiGLU clamp is engaged (asserted, not assumed).

Also here: the YaRN tables of the released config against transformers'; the presets
against the model card's parameter counts; config readings against transformers'
``GptOssConfig``; the MoE block op against ``GptOssMLP``; the MXFP4 refusals; and the
golden cases' routing under transformers in every dtype.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, hf_lifted, hf_logits, randomise, rel_rms  # noqa: E402
from refimpl.errors import CheckpointError, ConfigError  # noqa: E402
from refimpl.models import gpt_oss  # noqa: E402
from refimpl.rope import rope_frequencies  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96

#: seed, layers, H, Hkv, D, M, I, E, k, W, batch, seq, gate_up scale, extra config
SHAPES = [
    # the spec sheet's tiny config: released YaRN (factor 32, truncate false) over a context of 16
    (31, 2, 4, 2, 16, 64, 48, 4, 2, 4, 2, 11, 1.0, {}),
    # clamp engaged; reversed pattern; MQA; top-1; q width 24 != hidden 32
    (32, 3, 4, 1, 6, 32, 24, 5, 1, 3, 1, 13, 10.0,
     {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    # every expert (k = E); MHA; tied; unscaled RoPE
    (33, 2, 2, 2, 16, 48, 32, 3, 3, 2, 3, 7, 1.0,
     {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # T = 40 past YaRN's original context (truncated correction range); k = 4 of 6; clamp engaged
    (34, 2, 8, 2, 8, 64, 40, 6, 4, 5, 1, 40, 6.0,
     {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                          "original_max_position_embeddings": 16}, "max_position_embeddings": 128}),
    # no attention biases; non-default limit 3 and alpha 1.0 (read from the config, not hard-coded)
    (35, 2, 4, 2, 16, 32, 24, 4, 2, 3, 2, 9, 3.0,
     {"attention_bias": False, "swiglu_limit": 3.0, "swiglu_alpha": 1.0}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def config_fields(layers, heads, kv, head_dim, hidden, inter, experts, top_k, window, extra):
    """The config.json fields of a tiny gpt-oss (transformers' ``GptOssConfig`` keyword arguments)."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, head_dim=head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=window, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
    )
    fields.update(extra)
    return fields


def make_config(*args):
    config = transformers.GptOssConfig(**config_fields(*args))
    config._experts_implementation = "eager"
    return config


def randomise_gpt_oss(model, seed, gate_up_scale):
    """:func:`randomise`, then sinks 2 N, expert biases 0.2 N and gate_up weights times ``gate_up_scale``."""
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("self_attn.sinks"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            if name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
                p.mul_(gate_up_scale)


def pre_activations(model, ids):
    """Gate and up pre-activations ``x G_e + g_e`` of every (token, chosen expert) pair, from transformers."""
    gates, ups = [], []

    def hook(module, args, kwargs):
        x, indices = args[0], args[1]
        for e in indices.unique():
            rows = (indices == e).any(-1)
            h = x[rows] @ module.gate_up_proj[e] + module.gate_up_proj_bias[e]
            gates.append(h[:, 0::2].flatten())
            ups.append(h[:, 1::2].flatten())

    handles = [layer.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    return torch.cat(gates).numpy(), torch.cat(ups).numpy()


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, layers, heads, kv, d, m, i, e, k, w, b, t, scale, extra = request.param
    config = make_config(layers, heads, kv, d, m, i, e, k, w, extra)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config)
    randomise_gpt_oss(model, seed, scale)
    path = tmp_path_factory.mktemp(f"gpt_oss-{seed}")
    model.save_pretrained(path)
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(b, t))
    ours = refimpl.from_pretrained(path).forward(ids, return_hidden_states=True)
    return path, ids, ours, scale, config


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_agrees_with_transformers_as_shipped(case, dtype):
    path, ids, ours, _, _ = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), "eager"), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


def test_agrees_with_transformers_float64_islands_lifted(case):
    path, ids, ours, _, _ = case
    logits, taps = hf_lifted(path, ids, "eager")
    assert_agrees_to_float64(logits, taps, ours)


def test_the_clamp_is_engaged_where_the_shape_says_so(case):
    # Precondition of the agreement above: with gate_up scaled, many pre-activations pass the limit.
    path, ids, _, scale, config = case
    if scale == 1.0:
        pytest.skip("gate_up unscaled in this shape")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                              experts_implementation="eager")
    gate, up = pre_activations(model, ids)
    limit = config.swiglu_limit
    assert (gate > limit).mean() > 0.1 and (np.abs(up) > limit).mean() > 0.2


# YaRN of the released config

def test_released_yarn_matches_transformers_and_the_model_card():
    config = gpt_oss.GptOssConfig.from_dict(gpt_oss.PRESETS["gpt-oss-120b"])
    ours, scaling = rope_frequencies(config.rope_parameters, config.head_dim,
                                     max_position_embeddings=config.max_position_embeddings)
    with exact_float64():
        hf_config = transformers.GptOssConfig(**{k: v for k, v in gpt_oss.PRESETS["gpt-oss-120b"].items()
                                                 if k not in ("architectures", "model_type")})
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        theirs, hf_scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert rel_rms(theirs.numpy(), ours) < 1e-14
    # YaRN sec. 3.4: sqrt(1/t) = 0.1 ln s + 1 with s = 32, on cos and sin.
    assert scaling == pytest.approx(0.1 * math.log(32) + 1, rel=1e-15) == pytest.approx(1.3465736, abs=1e-7)
    assert hf_scaling == pytest.approx(scaling, rel=1e-15)
    # Fractional correction range (8.09, 17.40) over 32 pairs: 9 pairs keep theta^(-2i/64), 14 are divided by 32.
    base = 150000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(ours[:9], base[:9], rtol=1e-15)
    np.testing.assert_allclose(ours[18:], base[18:] / 32, rtol=1e-15)
    assert np.all((ours[9:18] < base[9:18]) & (ours[9:18] > base[9:18] / 32))


# Presets

#: Model card (arXiv:2508.10925) sec. 2: total and active parameters, in billions (one decimal).
MODEL_CARD = {"gpt-oss-120b": (116.8, 5.1), "gpt-oss-20b": (20.9, 3.6)}


@pytest.mark.parametrize("name", sorted(gpt_oss.PRESETS))
def test_presets_have_the_model_card_parameter_counts(name):
    config = gpt_oss.GptOssConfig.from_dict(gpt_oss.PRESETS[name])
    shapes = gpt_oss.weight_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    idle = config.num_local_experts - config.num_experts_per_tok
    per_expert = sum(math.prod(shapes[f"model.layers.0.mlp.experts.{n}"]) for n in
                     ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")) // config.num_local_experts
    # "active" in the model card counts the unembedding but not the embedding table
    active = total - config.num_hidden_layers * idle * per_expert - config.vocab_size * config.hidden_size
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == MODEL_CARD[name]


@pytest.mark.parametrize("name", sorted(gpt_oss.PRESETS))
def test_presets_read_as_transformers_reads_them(name):
    raw = gpt_oss.PRESETS[name]
    ours = gpt_oss.GptOssConfig.from_dict(raw)
    theirs = transformers.GptOssConfig.from_dict(raw)
    assert ours.rope_parameters == theirs.rope_parameters
    assert list(ours.layer_types) == theirs.layer_types
    for key in ("num_local_experts", "num_experts_per_tok", "head_dim", "sliding_window", "swiglu_limit",
                "swiglu_alpha", "num_key_value_heads", "attention_bias"):
        assert getattr(ours, key) == getattr(theirs, key), key


# config.json readings (against transformers' GptOssConfig)

@pytest.mark.parametrize("raw", [
    {"num_hidden_layers": 3},
    {"num_hidden_layers": 2, "rope_parameters": {"rope_type": "default"}},
    {"num_hidden_layers": 2, "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    {"num_hidden_layers": 2, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}, "max_position_embeddings": 64},
    {"num_hidden_layers": 2, "num_experts": 7, "experts_per_token": 4},
    {"num_hidden_layers": 2, "num_experts": 7, "num_local_experts": 7, "sliding_window": None,
     "layer_types": ["full_attention", "full_attention"]},
], ids=["defaults", "default-rope", "legacy-type", "yarn-original-from-max", "aliases", "alias-agrees-no-window"])
def test_config_defaults_and_aliases_as_transformers(raw):
    ours = gpt_oss.GptOssConfig.from_dict({"architectures": [gpt_oss.NAME], **raw})
    theirs = transformers.GptOssConfig.from_dict(raw)
    assert ours.rope_parameters == {k: v for k, v in theirs.rope_parameters.items() if k != "type"} | (
        {"type": theirs.rope_parameters["type"]} if "type" in theirs.rope_parameters else {})
    assert list(ours.layer_types) == theirs.layer_types
    for key in ("head_dim", "num_key_value_heads", "num_local_experts", "num_experts_per_tok"):
        assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize("edit, error, words", [
    # MXFP4 (the Hub checkpoints) is read since issue 9 (tests/test_storage_formats.py); int4 is not
    ({"quantization_config": {"quant_method": "gptq"}}, ConfigError, "'gptq'.*not supported.*'mxfp4'"),
    ({"experts_per_token": 2}, ConfigError, "experts_per_token"),
    ({"num_experts": 64}, ConfigError, "num_experts"),
    ({"partial_rotary_factor": 0.5}, ConfigError, "partial_rotary_factor"),
    ({"sliding_window": None}, ConfigError, "sliding_window"),
    ({"layer_types": ["full_attention"]}, ConfigError, "layer_types"),
    ({"num_experts_per_tok": 200}, ConfigError, "num_experts_per_tok"),
    ({"swiglu_limit": 0}, ConfigError, "swiglu_limit"),
    # transformers' strict field types refuse these nulls before __post_init__ could derive them
    ({"head_dim": None}, ConfigError, "head_dim"),
    ({"num_key_value_heads": None}, ConfigError, "num_key_value_heads"),
])
def test_bad_configs_are_refused_by_name(edit, error, words):
    raw = {**gpt_oss.PRESETS["gpt-oss-20b"], **edit}
    with pytest.raises(error, match=words):
        gpt_oss.GptOssConfig.from_dict(raw)


# The MoE block op

@pytest.fixture(scope="module")
def mlp_case():
    shape = (1, 4, 2, 16, 64, 48, 5, 2, 4, {})
    torch.manual_seed(41)
    model = transformers.GptOssForCausalLM(make_config(*shape))
    randomise_gpt_oss(model, 41, 6.0)
    raw = {"architectures": [gpt_oss.NAME], "model_type": "gpt_oss", **config_fields(*shape)}
    return model, raw


def test_moe_block_equals_transformers_gpt_oss_mlp(mlp_case):
    model, raw = mlp_case
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    with exact_float64():
        mlp = model.model.layers[0].mlp.double()
        with torch.no_grad():
            expected, _ = mlp(x)
    weights = {n: t.detach().numpy() for n, t in mlp.state_dict().items()}
    got = gpt_oss.moe_block(x.numpy(), weights, raw)
    assert rel_rms(got, expected.numpy()) < 1e-13


def test_moe_block_refuses_mxfp4_blocks(mlp_case):
    model, raw = mlp_case
    weights = {n: t.detach().double().numpy() for n, t in model.model.layers[0].mlp.state_dict().items()}
    weights["experts.gate_up_proj_blocks"] = weights.pop("experts.gate_up_proj")
    with pytest.raises(CheckpointError, match="MXFP4"):
        gpt_oss.moe_block(np.zeros((1, 2, 64)), weights, raw)


# The golden cases under transformers

@pytest.fixture(scope="module")
def gpt_oss_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt_oss_golden_hf")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "gpt_oss/*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def routed_experts(model, ids):
    """Per layer, the sorted expert indices ``(N, k)`` transformers' router chose."""
    chosen = []
    handles = [layer.mlp.router.register_forward_hook(lambda m, a, out: chosen.append(np.sort(out[2].numpy(), -1)))
               for layer in model.model.layers]
    with torch.no_grad():
        model(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    return chosen


@pytest.mark.slow
def test_golden_cases_route_alike_in_every_dtype(gpt_oss_golden):
    # Near-ties would flip the expert choice in bfloat16 / float16 runs; the seeds keep them apart.
    from safetensors.numpy import load_file

    for case in json.loads((gpt_oss_golden / "MANIFEST.json").read_text())["cases"]:
        ckpt, ids = gpt_oss_golden / case["checkpoint"], load_file(gpt_oss_golden / case["data"])["input_ids"]
        with exact_float64():
            exact = routed_experts(load_exact_float64(ckpt), ids)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager",
                                                                      experts_implementation="eager")
            low = routed_experts(model, ids)
            flipped = [int((a != b).any(-1).sum()) for a, b in zip(exact, low)]
            assert flipped == [0] * len(exact), f"{case['id']} {dtype}: tokens routed differently per layer {flipped}"


def test_golden_clamp_case_engages_the_clamp(gpt_oss_golden):
    # The case description's fractions, measured with transformers on the stored checkpoint and inputs.
    from safetensors.numpy import load_file

    case = "gpt_oss/swiglu-clamp-engaged"
    ids = load_file(gpt_oss_golden / case / "io.safetensors")["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_oss_golden / case / "checkpoint",
                                                              dtype=torch.float64, experts_implementation="eager")
    gate, up = pre_activations(model, ids)
    assert 0.2 < (gate > 7).mean() < 0.3 and 0.4 < (np.abs(up) > 7).mean() < 0.6


def test_golden_routing_decisions_are_not_near_ties(gpt_oss_golden, monkeypatch):
    # The seed rule of tools/golden_cases/gpt_oss.py, measured on the float64 reference run of the stored cases.
    from unittest import mock

    from safetensors.numpy import load_file

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from golden_cases.gpt_oss import MIN_ROUTER_GAP
    from refimpl.routers import top_k_softmax

    gaps = []

    def recording(logits, top_k):
        ranked = -np.sort(-logits, axis=-1)
        if top_k < logits.shape[1]:
            gaps.append(((ranked[:, top_k - 1] - ranked[:, top_k]) / np.sqrt(np.mean(logits ** 2))).min())
        return top_k_softmax(logits, top_k)

    for case in json.loads((gpt_oss_golden / "MANIFEST.json").read_text())["cases"]:
        ids = load_file(gpt_oss_golden / case["data"])["input_ids"]
        with mock.patch.object(gpt_oss, "top_k_softmax", recording):
            refimpl.from_pretrained(gpt_oss_golden / case["checkpoint"])(ids)
    assert len(gaps) >= 8 and min(gaps) >= MIN_ROUTER_GAP
