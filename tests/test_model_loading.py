"""refimpl.from_pretrained on good and bad checkpoints; errors must name the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refimpl
from refimpl.errors import (
    CheckpointError, ConfigError, InputError, MissingWeightsError, UnexpectedWeightsError,
    UnknownArchitectureError, WeightShapeError,
)

CASE = "qwen3/untied-gqa-odd-len"


@pytest.fixture()
def ckpt(tmp_path, golden_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir / CASE / "checkpoint", dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    w = load_file(path / "model.safetensors")
    fn(w)
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def test_loads_and_matches_golden(ckpt, golden_dir):
    io = load_file(golden_dir / CASE / "io.safetensors")
    out = refimpl.from_pretrained(ckpt).forward(io["input_ids"], return_hidden_states=True)
    assert out.logits.shape == io["logits"].shape and out.logits.dtype == np.float64
    np.testing.assert_allclose(out.logits, io["logits"], rtol=1e-12, atol=1e-12)
    assert list(out.hidden_states) == ["embed", "layers.0", "layers.1", "norm"]


def test_sharded_checkpoint_equals_single_file(ckpt, tmp_path):
    w = load_file(ckpt / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ckpt / "config.json", sharded)
    names = sorted(w)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({n: w[n] for n in part}, sharded / fname, metadata={"format": "pt"})
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(refimpl.from_pretrained(sharded)(ids), refimpl.from_pretrained(ckpt)(ids))


def test_float32_mode_computes_in_float32(ckpt):
    m = refimpl.from_pretrained(ckpt, dtype=np.float32)
    assert m(np.array([[1, 2, 3]])).dtype == np.float32


def test_unknown_architecture_lists_supported(ckpt):
    edit_config(ckpt, architectures=["FancyNewForCausalLM"])
    with pytest.raises(UnknownArchitectureError, match="FancyNewForCausalLM.*supported: .*Qwen3ForCausalLM"):
        refimpl.from_pretrained(ckpt)


def test_missing_weight_is_named(ckpt):
    edit_weights(ckpt, lambda w: w.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(MissingWeightsError, match="model.layers.1.self_attn.k_norm.weight"):
        refimpl.from_pretrained(ckpt)


def test_unexpected_weight_is_named(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)}))
    with pytest.raises(UnexpectedWeightsError, match="q_proj.bias"):
        refimpl.from_pretrained(ckpt)


def test_wrong_shape_is_named(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(WeightShapeError, match="model.norm.weight.*63"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"hidden_size": None}, "'hidden_size' must be an integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}}, "'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'factor'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window is false"),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
        ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window must be >= 1"),
        ({"head_dim": "32"}, "'head_dim' must be an integer"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ],
)
def test_bad_config_fields(ckpt, changes, match):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=match):
        refimpl.from_pretrained(ckpt)


def test_missing_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        refimpl.from_pretrained(tmp_path / "nope")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        refimpl.from_pretrained(ckpt)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "ids,match",
    [
        (np.array([[1, 128]]), "token id 128 at position \\(0, 1\\) is outside"),
        (np.array([[-1, 2]]), "token id -1"),
        (np.array([[1.0, 2.0]]), "must be integers"),
        (np.array([1, 2, 3]), "shape \\(batch, seq\\)"),
        (np.zeros((1, 0), np.int64), "shape \\(batch, seq\\)"),
    ],
)
def test_bad_token_ids(ckpt, ids, match):
    with pytest.raises(InputError, match=match):
        refimpl.from_pretrained(ckpt)(ids)


def test_bfloat16_and_float16_checkpoints_widen_exactly(ckpt):
    import ml_dtypes

    w32 = load_file(ckpt / "model.safetensors")
    ids = np.array([[3, 1, 4, 1, 5]])
    for dtype in (ml_dtypes.bfloat16, np.float16):
        low = {n: a.astype(dtype) for n, a in w32.items()}
        save_file(low, ckpt / "model.safetensors", metadata={"format": "pt"})
        model = refimpl.from_pretrained(ckpt)
        for name, array in low.items():
            np.testing.assert_array_equal(model.weights[name], array.astype(np.float64))
        assert model(ids).dtype == np.float64


@pytest.mark.parametrize("kind", ["I32", "F8_E4M3"])
def test_integer_and_fp8_tensors_are_refused_by_name(ckpt, kind):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    w = {n: torch.from_numpy(a) for n, a in load_file(ckpt / "model.safetensors").items()}
    dtype = {"I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn}[kind]
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_torch(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"'model.layers.0.mlp.up_proj.weight' is stored as {kind}; only"):
        refimpl.from_pretrained(ckpt)


def test_legacy_rope_scaling_beside_default_rope_parameters_is_in_force(ckpt):
    # transformers lets a legacy rope_scaling replace rope_parameters: it must not be ignored.
    ids = np.arange(12).reshape(1, 12) % 100
    plain = refimpl.from_pretrained(ckpt)(ids)
    edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4,
                                    "rope_theta": 10000.0})
    scaled = refimpl.from_pretrained(ckpt)(ids)
    assert np.linalg.norm(scaled - plain) > 1e-3 * np.linalg.norm(plain)
    edit_config(ckpt, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="'dynamic' is not supported"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta must be a positive"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite"),
    ],
)
def test_out_of_range_config_values(ckpt, changes, match):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=match):
        refimpl.from_pretrained(ckpt)


def test_num_key_value_heads_defaults_like_transformers(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("num_key_value_heads")
    from refimpl.models.qwen3 import Qwen3Config

    # absent means 32 (transformers' class default), which 4 heads cannot share
    with pytest.raises(ConfigError, match="num_key_value_heads \\(32\\)"):
        Qwen3Config.from_dict(cfg)
    assert Qwen3Config.from_dict({**cfg, "num_key_value_heads": None}).num_key_value_heads == 4


def test_non_finite_weight_is_named(ckpt):
    edit_weights(ckpt, lambda w: w["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), np.nan))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.down_proj.weight' holds NaN"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize("bad", [None, 123])
def test_path_of_wrong_type(bad):
    with pytest.raises(CheckpointError, match="must be a str or Path"):
        refimpl.from_pretrained(bad)


@pytest.mark.parametrize("ids", [[], [[1, 2], [3]]])
def test_empty_or_ragged_token_ids(ckpt, ids):
    with pytest.raises(InputError, match="shape \\(batch, seq\\)|rectangular"):
        refimpl.from_pretrained(ckpt)(ids)
