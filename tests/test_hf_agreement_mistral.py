"""refimpl against Hugging Face transformers on tiny random Mistral checkpoints.

Models are built and randomised with transformers itself, saved with
``save_pretrained`` and loaded with ``refimpl.from_pretrained``. Two bars:
transformers as shipped (float32 islands in norms, RoPE and softmax) within 1e-5
relative RMS, and transformers with those islands lifted
(``conformance.backends.hf_exact``) within 1e-10, hidden states included. The
shapes cover an explicit null window, windows shorter than the sequence (W = 1
included) and head_dim != hidden / heads. Then the golden cases are shown to
discriminate: the window mistakes engines make move the logits far beyond any
tolerance.
"""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_lifted, hf_logits, rel_rms  # noqa: E402
from refimpl.models import mistral  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

#: seed, layers, heads, kv heads, head_dim, hidden, tied, sliding_window, batch, seq, extra config
SHAPES = [
    # window 4 < 11 tokens, head_dim 32 != 64 / 4
    (211, 2, 4, 2, 32, 64, False, 4, 2, 11, {}),
    # explicit null window (Mistral Small 3.1), MHA, tied, head_dim null -> 16, 40 tokens
    (212, 3, 4, 4, None, 64, True, None, 1, 40, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e9}}),
    # MQA, a single token
    (213, 1, 8, 1, 16, 64, False, 4, 2, 1, {}),
    # window 1: every token attends only to itself
    (214, 2, 4, 2, 8, 32, False, 1, 1, 23, {}),
    # window 7 with linear RoPE scaling from the legacy rope_scaling key
    (215, 2, 4, 2, 16, 48, False, 7, 2, 19, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
]
IDS = [f"seed{s[0]}" for s in SHAPES]
VOCAB = 160


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, layers, heads, kv, head_dim, hidden, tied, window, b, t, extra = request.param
    extra = dict(extra)
    extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1e6})
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        sliding_window=window, rms_norm_eps=1e-5, **extra,
    )
    return build_case(transformers.MistralForCausalLM, config, seed, "mistral", tmp_path_factory, VOCAB, b, t)


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


def test_sliding_window_is_read_as_written_null_included(case):
    path, _, _ = case
    raw = json.loads((path / "config.json").read_text())
    assert "sliding_window" in raw
    assert mistral.MistralConfig.from_dict(raw).sliding_window == raw["sliding_window"]


BASE = {"architectures": [mistral.NAME], "model_type": "mistral", "vocab_size": 32, "hidden_size": 64,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 8}


@pytest.mark.parametrize("raw,expected", [
    # class defaults: window 4096 (not null), Hkv 8, head_dim M // H, theta 10000, eps 1e-6
    ({}, {"sliding_window": 4096, "num_key_value_heads": 8, "head_dim": 8, "rope_theta": 10000.0,
          "rms_norm_eps": 1e-6}),
    ({"sliding_window": None, "head_dim": None}, {"sliding_window": None, "head_dim": 8}),
    # use_sliding_window is not a Mistral key: the window applies whatever it says
    ({"head_dim": 32, "rope_theta": 1e9, "sliding_window": 5, "use_sliding_window": False, "num_key_value_heads": 2},
     {"head_dim": 32, "rope_theta": 1e9, "sliding_window": 5, "num_key_value_heads": 2}),
], ids=["defaults", "nulls", "explicit"])
def test_config_resolution_matches_transformers(raw, expected):
    full = {**BASE, **raw}
    ours = mistral.MistralConfig.from_dict(full)
    theirs = transformers.MistralConfig(**{k: v for k, v in full.items() if k != "architectures"})
    attention = transformers.models.mistral.modeling_mistral.MistralAttention(theirs, 0)
    resolved = {"num_key_value_heads": theirs.num_key_value_heads, "rms_norm_eps": theirs.rms_norm_eps,
                "rope_theta": theirs.rope_parameters["rope_theta"], "head_dim": attention.head_dim,
                "sliding_window": theirs.sliding_window}
    mine = {k: getattr(ours, k) for k in resolved if k != "rope_theta"}
    mine["rope_theta"] = ours.rope_parameters["rope_theta"]
    assert mine == resolved
    assert {k: mine[k] for k in expected} == expected


@pytest.mark.parametrize("raw,match", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"attention_bias": True}, "no biases"),
    # transformers' strict MistralConfig types num_key_value_heads as int and rejects null
    ({"num_key_value_heads": None}, "num_key_value_heads"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
])
def test_refuses_what_it_does_not_implement(raw, match):
    with pytest.raises(refimpl.RefimplError, match=match):
        mistral.MistralConfig.from_dict({**BASE, **raw})


def golden_error(golden_dir, case_id, **config_changes):
    """Relative RMS error against a stored golden case of the reference run with ``config_changes``."""
    model = refimpl.from_pretrained(golden_dir / case_id / "checkpoint")
    model.config = dataclasses.replace(model.config, **config_changes)
    io = load_file(golden_dir / case_id / "io.safetensors")
    return rel_rms(model(io["input_ids"]), io["logits"])


def test_golden_case_is_reproduced(golden_dir):
    assert golden_error(golden_dir, "mistral/sliding-w4-len11") < 1e-12


@pytest.mark.parametrize("case_id,mistake,changes", [
    ("mistral/sliding-w4-len11", "window ignored (full causal)", {"sliding_window": None}),
    ("mistral/sliding-w4-len11", "window one key too wide", {"sliding_window": 5}),
    ("mistral/sliding-w4-len11", "window one key too narrow", {"sliding_window": 3}),
    ("mistral/tied-mqa-window1", "window 1 ignored", {"sliding_window": None}),
])
def test_golden_cases_catch_mistral_mistakes(golden_dir, case_id, mistake, changes):
    err = golden_error(golden_dir, case_id, **changes)
    assert err > 1e-3, f"{mistake}: only {err:.1e} from the golden logits"
