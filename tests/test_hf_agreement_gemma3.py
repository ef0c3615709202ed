"""refimpl against Hugging Face transformers on tiny random Gemma 3 text checkpoints.

Models are built and randomised with transformers itself (not the golden ones),
saved with ``save_pretrained`` and loaded with ``refimpl.from_pretrained``.
Two bars: transformers as shipped (float32 islands in norms, RoPE and softmax)
within 1e-5 relative RMS, and transformers with those islands lifted
(``conformance.backends.hf_exact``) within 1e-10, logits and every tap.

Also here: config.json resolution (layer types, per-type RoPE) against
``Gemma3TextConfig``, the refusals, the published presets, and proof that the
golden cases in ``tools/golden_cases/gemma3.py`` catch the known mistakes.
"""

import contextlib
import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conformance.backends.hf_exact import exact_float64, load_exact_float64  # noqa: E402
from hf_agreement import assert_agrees_to_float64, build_case, hf_logits, randomise, rel_rms, run_with_taps  # noqa: E402
from refimpl.errors import ConfigError  # noqa: E402
from refimpl.models import gemma3  # noqa: E402
from refimpl.rmsnorm import rms_norm  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LEGACY_ROPE = {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}

#: seed, config overrides, norm offsets drawn around 1 (else around 0), batch, seq
SHAPES = [
    # Default pattern 6 over 6 layers: 5 sliding + 1 full; legacy RoPE keys, linear x8 on the global layer.
    (411, dict(num_hidden_layers=6, sliding_window=4, **LEGACY_ROPE), True, 2, 11),
    # head_dim != hidden/heads, query_pre_attn_scalar != head_dim, final cap that bites, attention cap ignored.
    (412, dict(num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=16, sliding_window=3,
               final_logit_softcapping=20.0, attn_logit_softcapping=1.0,
               layer_types=["full_attention", "sliding_attention", "full_attention"],
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}),
     False, 2, 13),
    # Window 1, MQA, pattern 2, untied head, hidden 48 (sqrt(48) not a float32 number).
    (413, dict(hidden_size=48, num_hidden_layers=4, num_key_value_heads=1, sliding_window=1,
               sliding_window_pattern=2, tie_word_embeddings=False, query_pre_attn_scalar=12), False, 2, 17),
    # 40 tokens, YaRN on the global layers (attention_scaling != 1), attention biases.
    (414, dict(num_hidden_layers=3, sliding_window=5, sliding_window_pattern=3, attention_bias=True,
               rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                   "original_max_position_embeddings": 16}}), True, 1, 40),
    # One token per row, MHA.
    (415, dict(num_key_value_heads=4, layer_types=["sliding_attention", "full_attention"]), True, 3, 1),
]
IDS = [f"seed{s[0]}" for s in SHAPES]


def tiny_config(**overrides):
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
                max_position_embeddings=256, pad_token_id=0)
    base.update(overrides)
    return transformers.Gemma3TextConfig(**base)


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def case(request, tmp_path_factory):
    seed, overrides, around_one, b, t = request.param
    # Norm offsets drawn around 1 or around 0 (Gemma stores w of the gain 1 + w).
    return build_case(transformers.Gemma3ForCausalLM, tiny_config(**overrides), seed, "gemma3", tmp_path_factory,
                      160, b, t, norm_offset=float(around_one))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_as_shipped(case, dtype, attn):
    path, ids, ours = case
    err = rel_rms(hf_logits(path, ids, getattr(torch, dtype), attn), ours.logits)
    assert err < 1e-5, f"relative RMS {err:.2e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_agrees_with_transformers_float64_islands_lifted(case, attn):
    path, ids, ours = case
    with exact_float64():
        model = load_exact_float64(path, attn_implementation=attn)
        logits, taps = run_with_taps(model, ids)
    assert model.dtype == torch.float64
    assert_agrees_to_float64(logits, taps, ours)


def test_float32_embed_tap_is_bitwise_transformers(case):
    # The "embed" tap is transformers' embed_tokens output, scale included, with sqrt(M)
    # rounded to float32 before the multiply (NRM-06): equal bit for bit.
    path, ids, _ = case
    ours = refimpl.from_pretrained(path, dtype=np.float32).forward(ids, return_hidden_states=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = model.model.embed_tokens(torch.from_numpy(ids)).numpy()
    assert ours.hidden_states["embed"].dtype == np.float32
    np.testing.assert_array_equal(ours.hidden_states["embed"], theirs)


def test_transformers_ignores_attn_logit_softcapping():
    # Evidence for listing attn_logit_softcapping in IGNORED_KEYS (spec quirk G3-4): a cap
    # of 0.5 would flatten every softmax, yet eager and sdpa outputs do not move.
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 160, size=(1, 9)))
    outputs = {}
    for cap in (None, 0.5):
        torch.manual_seed(7)
        model = transformers.Gemma3ForCausalLM(tiny_config(attn_logit_softcapping=cap, sliding_window=3))
        randomise(model, 7, norm_offset=1.0)
        for attn in ("eager", "sdpa"):
            model.set_attn_implementation(attn)
            with torch.no_grad():
                outputs[cap, attn] = model(ids).logits
    for attn in ("eager", "sdpa"):
        assert torch.equal(outputs[None, attn], outputs[0.5, attn]), attn


# config.json resolution against Gemma3TextConfig

def _hf_resolved(raw):
    config = transformers.Gemma3TextConfig(**raw)
    return tuple(config.layer_types), config.rope_parameters


def _summary(params):
    return {k: params[k] for k in ("rope_type", "rope_theta", "factor") if k in params}


RESOLUTION_CASES = {
    "class-defaults": {},
    "legacy-keys": {"rope_theta": 5e5, "rope_local_base_freq": 2e4,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "nested-partial": {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0}},
                       "rope_theta": 7e5, "rope_local_base_freq": 3e3},
    "nested-wins-over-top-level": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3e5},
                                                       "sliding_attention": {"rope_type": "default",
                                                                             "rope_theta": 2e3}},
                                   "rope_theta": 7e5, "rope_local_base_freq": 3e3},
    "nested-plus-rope-scaling": {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "nested-entry-null": {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1e4}, "full_attention": None}},
    "pattern-3": {"sliding_window_pattern": 3},
    "pattern-1-all-full": {"sliding_window_pattern": 1},
    "layer-types-win-over-pattern": {"sliding_window_pattern": 3, "layer_types": ["full_attention"] * 7},
}


@pytest.mark.parametrize("overrides", RESOLUTION_CASES.values(), ids=RESOLUTION_CASES.keys())
def test_config_resolution_matches_transformers(overrides):
    raw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=7,
               **overrides)
    layer_types, rope = _hf_resolved(json.loads(json.dumps(raw)))
    ours = gemma3.Gemma3Config.from_dict(raw)
    assert ours.layer_types == layer_types
    assert [_summary(p) for p in ours.layer_rope_parameters] == [_summary(rope[t]) for t in layer_types]


REFUSED = {
    # transformers silently replaces a flat dict by the defaults (1e6 / 1e4, unscaled).
    "flat-rope-parameters": ({"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
                             "keyed by layer type"),
    # transformers keeps rope_type "default" and drops the scaling (quirk found here).
    "rope-scaling-legacy-type-key": ({"num_hidden_layers": 6, "rope_scaling": {"type": "linear", "factor": 8.0}},
                                     "ignores the other"),
    "bidirectional": ({"use_bidirectional_attention": True}, "not implemented"),
    "window-null-with-sliding-layers": ({"sliding_window": None}, "sliding_window is null"),
    "partial-rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "chunked-layer-type": ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    "layer-types-wrong-length": ({"layer_types": ["sliding_attention"]}, "layer_types"),
    "hidden-not-multiple-of-heads": ({"hidden_size": 66}, "multiple of num_attention_heads"),
    "final-cap-zero": ({"final_logit_softcapping": 0.0}, "final_logit_softcapping"),
    "unsupported-rope-type": ({"rope_parameters": {"sliding_attention": {"rope_type": "dynamic", "factor": 2.0}}},
                              "not supported"),
}


@pytest.mark.parametrize("overrides,message", REFUSED.values(), ids=REFUSED.keys())
def test_config_refusals(overrides, message):
    raw = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "num_hidden_layers": 2, **overrides}
    with pytest.raises(ConfigError, match=message):
        gemma3.Gemma3Config.from_dict(raw)


def test_legacy_type_key_leaves_transformers_global_layers_unscaled():
    # The quirk behind the "rope-scaling-legacy-type-key" refusal, pinned so a transformers
    # upgrade that fixes it shows up here.
    _, rope = _hf_resolved({"num_hidden_layers": 6, "rope_scaling": {"type": "linear", "factor": 8.0}})
    assert rope["full_attention"]["rope_type"] == "default"


def test_attn_logit_softcapping_is_accepted_and_ignored():
    config = gemma3.Gemma3Config.from_dict({"num_hidden_layers": 2, "attn_logit_softcapping": 50.0})
    assert "attn_logit_softcapping" in gemma3.IGNORED_KEYS
    assert not hasattr(config, "attn_logit_softcapping")


# presets

#: keras-hub ``gemma3_presets.py`` parameter counts of the text-only models (262144-row table).
KERAS_HUB_PARAMS = {"gemma-3-1b": 999_885_952, "gemma-3-4b": 3_880_099_328, "gemma-3-12b": 11_765_788_416,
                    "gemma-3-27b": 27_009_002_240}


@pytest.mark.parametrize("name", sorted(gemma3.PRESETS))
def test_preset_shapes_match_published_parameter_counts(name):
    config = gemma3.Gemma3Config.from_dict(gemma3.PRESETS[name])
    count = sum(int(np.prod(s)) for s in gemma3.weight_shapes(config).values())
    assert count - (config.vocab_size - 262_144) * config.hidden_size == KERAS_HUB_PARAMS[name]


@pytest.mark.parametrize("name", sorted(gemma3.PRESETS))
def test_preset_layer_types_and_rope_match_transformers(name):
    raw = dict(gemma3.PRESETS[name])
    ours = gemma3.Gemma3Config.from_dict(raw)
    layer_types, rope = _hf_resolved({k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    assert ours.layer_types == layer_types
    globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    assert globals_ == list(range(5, ours.num_hidden_layers, 6))
    assert [_summary(p) for p in ours.layer_rope_parameters] == [_summary(rope[t]) for t in layer_types]
    full = ours.layer_rope_parameters[5]
    assert (full["rope_type"], full.get("factor")) == (("default", None) if name == "gemma-3-1b" else ("linear", 8.0))
    assert _summary(ours.layer_rope_parameters[0]) == {"rope_type": "default", "rope_theta": 1e4}


# the golden cases catch the known mistakes

def _golden(case_id):
    from safetensors.numpy import load_file

    model = refimpl.from_pretrained(GOLDEN / case_id / "checkpoint")
    io = load_file(str(GOLDEN / case_id / "io.safetensors"))
    return model, io["input_ids"], io["logits"]


def _retyped(config, layer_types):
    """``config`` with other layer types, each layer taking its new type's RoPE parameters."""
    by_type = dict(zip(config.layer_types, config.layer_rope_parameters))
    by_type.setdefault("full_attention", {"rope_type": "default", "rope_theta": 1e6})
    return dataclasses.replace(config, layer_types=tuple(layer_types),
                               layer_rope_parameters=tuple(by_type[t] for t in layer_types))


def _with_rope(config, layer_type, **changes):
    params = tuple({**p, **changes} if t == layer_type else p
                   for t, p in zip(config.layer_types, config.layer_rope_parameters))
    return dataclasses.replace(config, layer_rope_parameters=params)


def _plain_w_norm(x, weight, config):
    return rms_norm(x, weight, config.rms_norm_eps)


_attend = gemma3.attend_with_cache


MISTAKES = {
    "norm-w-not-1p": ("gemma3/near-zero-norm-offsets", lambda c: c, {"norm_1p": _plain_w_norm}),
    "norm-w-not-1p-random": ("gemma3/default-pattern-6-layers", lambda c: c, {"norm_1p": _plain_w_norm}),
    "scale-head-dim": ("gemma3/qpas-head-dim-final-softcap",
                       lambda c: dataclasses.replace(c, query_pre_attn_scalar=float(c.head_dim)), {}),
    "all-layers-sliding": ("gemma3/default-pattern-6-layers",
                           lambda c: _retyped(c, ["sliding_attention"] * c.num_hidden_layers), {}),
    "all-layers-global": ("gemma3/near-zero-norm-offsets",
                          lambda c: _retyped(c, ["full_attention"] * c.num_hidden_layers), {}),
    "window-plus-one": ("gemma3/window-1-mqa", lambda c: dataclasses.replace(c, sliding_window=2), {}),
    "no-final-softcap": ("gemma3/qpas-head-dim-final-softcap",
                         lambda c: dataclasses.replace(c, final_logit_softcapping=None), {}),
    "no-linear-scaling-on-global": ("gemma3/default-pattern-6-layers",
                                    lambda c: _with_rope(c, "full_attention", rope_type="default"), {}),
    "linear-scaling-on-local": ("gemma3/default-pattern-6-layers",
                                lambda c: _with_rope(c, "sliding_attention", rope_type="linear", factor=8.0), {}),
    "global-theta-on-local": ("gemma3/default-pattern-6-layers",
                              lambda c: _with_rope(c, "sliding_attention", rope_theta=1e6), {}),
    "attention-softcap-applied": ("gemma3/attn-softcap-ignored", lambda c: c,
                                  {"attend_with_cache": lambda *a, **k: _attend(*a, softcap=1.0, **k)}),
    "embedding-not-scaled": ("gemma3/single-token-untied", lambda c: c,
                             {"scaled_embed_tokens": lambda ids, table, scale: table[ids]}),
}


@pytest.mark.parametrize("case_id,change,patches", MISTAKES.values(), ids=MISTAKES.keys())
def test_golden_cases_catch_mistake(case_id, change, patches):
    model, ids, expected = _golden(case_id)
    with mock.patch.multiple(gemma3, **patches) if patches else contextlib.nullcontext():
        logits, _ = gemma3.forward(model.weights, change(model.config), ids)
    assert rel_rms(logits, expected) > 1e-3


def test_embedding_scale_rounding_is_below_float32_resolution():
    # NRM-06 at float32: multiplying by sqrt(48) in float64 instead of float32(sqrt(48))
    # moves the logits by about the float32 noise floor, so no golden can tell the two apart
    # at float32 (the float64 goldens use the exact sqrt, as transformers does when built in
    # float64). The rounding matters in bfloat16 (sqrt(48) = 6.93 -> 6.9375).
    model, ids, expected = _golden("gemma3/single-token-untied")
    weights32 = {k: v.astype(np.float32) for k, v in model.weights.items()}
    rounded, _ = gemma3.forward(weights32, model.config, ids)
    unrounded_scale = lambda i, table, scale: (table[i] * np.float64(scale)).astype(table.dtype)  # noqa: E731
    with mock.patch.object(gemma3, "scaled_embed_tokens", unrounded_scale):
        unrounded, _ = gemma3.forward(weights32, model.config, ids)
    assert 0 < rel_rms(unrounded, rounded) < 1e-6
    assert rel_rms(rounded, expected) < 1e-6
