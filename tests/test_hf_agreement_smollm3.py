"""refimpl against Hugging Face transformers on tiny random SmolLM3 checkpoints.

Models are built and randomised with transformers itself, saved with
``save_pretrained`` and loaded with ``refimpl.from_pretrained``. Two bars:
transformers as shipped (float32 islands in norms, RoPE and softmax) within 1e-5
relative RMS, and transformers with those islands lifted
(``conformance.backends.hf_exact``) within 1e-10, hidden states included. The
shapes mix NoPE and RoPE layers (from ``no_rope_layer_interval`` and from an explicit
``no_rope_layers`` list) and sliding NoPE layers. The config tests compare the
resolved per-layer schedules with transformers' ``SmolLM3Config``; the golden cases
are then shown to discriminate the NoPE mistakes engines make.
"""

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.models import smollm3  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

#: seed, layers, heads, kv heads, hidden, tied, batch, seq, extra config
SHAPES = [
    # NoPE at layers 1 and 3 from the interval
    (311, 4, 4, 2, 64, True, 2, 11, {"no_rope_layer_interval": 2}),
    # explicit list with a NoPE first layer, MHA, untied, 40 tokens; YaRN (as the model card suggests
    # for 128k) whose original_max_position_embeddings defaults to max_position_embeddings
    (312, 4, 4, 4, 48, False, 1, 40, {"no_rope_layers": [0, 1, 1, 0], "max_position_embeddings": 32,
                                       "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e4}}),
    # MQA, a single token
    (313, 2, 6, 1, 48, True, 2, 1, {"no_rope_layer_interval": 2}),
    # NoPE layers slide (window 5 < 19 tokens); projection and MLP biases
    (314, 4, 4, 2, 64, True, 2, 19, {"no_rope_layer_interval": 2, "use_sliding_window": True,
                                      "sliding_window": 5, "attention_bias": True, "mlp_bias": True}),
    # explicit layer_types: a RoPE layer slides too; rope_theta absent (default 2e6)
    (315, 3, 4, 2, 32, False, 1, 23, {"no_rope_layers": [1, 0, 1], "use_sliding_window": True, "sliding_window": 3,
                                      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                      "rope_parameters": None}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]
VOCAB = 160
#: pad/bos/eos inside the tiny vocabulary (the defaults 128004/... break nn.Embedding, spec quirk S4).
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, layers, heads, kv, hidden, tied, b, t, extra = request.param
    extra = dict(extra)
    extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5e6})
    config = transformers.SmolLM3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        **SPECIAL_IDS, **extra,
    )
    return build_case(transformers.SmolLM3ForCausalLM, config, seed, "smollm3", tmp_path_factory, VOCAB, b, t)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_as_shipped(case, dtype, attn):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), attn), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_float64_islands_lifted(case, attn):
    path, ids, ours = case
    logits, taps = hf_lifted(path, ids, attn)
    assert_agrees_to_float64(logits, taps, ours)


BASE = {"architectures": [smollm3.NAME], "model_type": "smollm3", "vocab_size": 32, "hidden_size": 64,
        "intermediate_size": 32, "num_hidden_layers": 8, "num_attention_heads": 8, **SPECIAL_IDS}


@pytest.mark.parametrize("raw", [
    {},
    {"use_sliding_window": True, "sliding_window": 16, "no_rope_layer_interval": 3},
    {"use_sliding_window": True, "sliding_window": None},
    {"use_sliding_window": False, "sliding_window": 16},
    {"no_rope_layers": [1, 0, 1, 0, 1, 0, 1, 0, 0, 0], "num_key_value_heads": None, "head_dim": 16},
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 1e5},
], ids=["defaults", "interval3-sliding", "flag-without-window", "window-without-flag", "long-list", "legacy-scaling"])
def test_config_resolution_matches_transformers(raw):
    full = {**BASE, **raw}
    ours = smollm3.SmolLM3Config.from_dict(full)
    theirs = transformers.SmolLM3Config(**{k: v for k, v in full.items() if k != "architectures"})
    layers = [transformers.models.smollm3.modeling_smollm3.SmolLM3Attention(theirs, i) for i in range(8)]
    assert ours.no_rope_layers == tuple(int(a.use_rope) for a in layers)
    assert ours.layer_types == tuple(theirs.layer_types)
    # the window transformers hands to the attention kernel agrees with the mask type
    assert [a.sliding_window for a in layers] == [
        ours.sliding_window if t == "sliding_attention" else None for t in ours.layer_types]
    assert (ours.head_dim, ours.num_key_value_heads) == (layers[0].head_dim, theirs.num_key_value_heads)
    assert ours.rope_parameters == theirs.rope_parameters


def test_defaults_are_smollm3s():
    config = smollm3.SmolLM3Config.from_dict(BASE)
    assert config.rope_parameters["rope_theta"] == 2e6
    assert config.no_rope_layers == (1, 1, 1, 0, 1, 1, 1, 0)
    assert config.tie_word_embeddings and config.num_key_value_heads == 4


@pytest.mark.parametrize("raw,match", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"head_dim": None}, "head_dim"),
    ({"no_rope_layers": [1, 0, 1]}, "no_rope_layers"),
    ({"no_rope_layers": [1, 2, 1, 0, 1, 1, 1, 0]}, "no_rope_layers"),
    ({"no_rope_layer_interval": 0}, "no_rope_layer_interval"),
    ({"layer_types": ["sliding_attention"] + ["full_attention"] * 7, "sliding_window": 4}, "use_sliding_window"),
    ({"layer_types": ["chunked_attention"] * 8}, "layer_types"),
    ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window"),
])
def test_refuses_what_it_does_not_implement(raw, match):
    with pytest.raises(refimpl.RefimplError, match=match):
        smollm3.SmolLM3Config.from_dict({**BASE, **raw})


def golden_error(golden_dir, case_id, **config_changes):
    """Relative RMS error against a stored golden case of the reference run with ``config_changes``."""
    model = refimpl.from_pretrained(golden_dir / case_id / "checkpoint")
    model.config = dataclasses.replace(model.config, **config_changes)
    io = load_file(golden_dir / case_id / "io.safetensors")
    return rel_rms(model(io["input_ids"]), io["logits"])


def test_golden_case_is_reproduced(golden_dir):
    assert golden_error(golden_dir, "smollm3/interval2-derived") < 1e-12


@pytest.mark.parametrize("case_id,mistake,changes", [
    ("smollm3/interval2-derived", "RoPE on the NoPE layers too", {"no_rope_layers": (1, 1, 1, 1)}),
    ("smollm3/interval2-derived", "no_rope_layers read as 1 = NoPE", {"no_rope_layers": (0, 1, 0, 1)}),
    ("smollm3/explicit-list-overrides-interval", "interval rule instead of the explicit list",
     {"no_rope_layers": (1, 1, 1, 0)}),
    ("smollm3/nope-layers-slide", "window on the RoPE layers instead of the NoPE ones",
     {"layer_types": ("sliding_attention", "full_attention") * 2}),
    ("smollm3/nope-layers-slide", "window ignored", {"layer_types": ("full_attention",) * 4}),
    ("smollm3/default-theta-biases", "absent rope_theta read as 10000 instead of 2e6",
     {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
])
def test_golden_cases_catch_smollm3_mistakes(golden_dir, case_id, mistake, changes):
    err = golden_error(golden_dir, case_id, **changes)
    assert err > 1e-3, f"{mistake}: only {err:.1e} from the golden logits"
