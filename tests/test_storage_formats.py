"""Every storage format the checkpoint reader accepts, and the clear refusal of the others.

Formats: plain float tensors (float64/32/16, bfloat16, sharded), FP8 e4m3 with block scales
``weight_scale_inv`` (DeepSeek-V3, Kimi K2), MXFP4 expert blocks (gpt-oss). Each quantized format
is checked three ways: against values worked out by hand from the format's definition; tensor
by tensor against transformers' own dequantization of the same bytes (bit for bit, float32);
and as a whole tiny model, refimpl reading the quantized checkpoint against transformers loading
the same files with ``dequantize=True`` on CPU (logits, float32). Where transformers' CPU
dequantization is wrong (FP8 edge blocks), the test records the difference and the authors'
rule (DeepSeek-V3 ``inference/kernel.py``) that the reference follows.
"""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refimpl
from refimpl.checkpoint import open_checkpoint, read_weights, stored_tensors
from refimpl.errors import CheckpointError, ConfigError, InputError
from refimpl.quantization import QuantizationScheme, scheme_from_config
from refimpl.quantization.fp8_block import dequantize_fp8_block, quantize_fp8_block, scale_grid
from refimpl.quantization.mxfp4 import FP4_E2M1_VALUES, dequantize_mxfp4, quantize_mxfp4
from quantized_checkpoints import fp8_config, save_torch, to_fp8, to_mxfp4, write_raw_safetensors

CASE = "qwen3/untied-gqa-odd-len"


def rel_rms(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture()
def ckpt(tmp_path, golden_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir / CASE / "checkpoint", dst)
    return dst


def file_names(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# The safetensors reader (headers parsed here, data memory-mapped)

def test_reader_matches_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 5)), "f32": rng.standard_normal((7,)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "bf16": rng.standard_normal((5, 3)).astype(ml_dtypes.bfloat16),
        "fp8": rng.standard_normal((3, 7)).astype(ml_dtypes.float8_e4m3fn),
        "u8": rng.integers(0, 256, (4, 16), dtype=np.uint8), "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32), "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    save_torch(tmp_path / "model.safetensors", tensors)
    found = stored_tensors(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            theirs = f.get_tensor(name)
            tensor, mapped, _ = found[name]
            ours = mapped.view(tensor)
            assert ours.shape == tuple(theirs.shape)
            assert ours.tobytes() == theirs.contiguous().view(torch.uint8).numpy().tobytes(), name


@pytest.mark.parametrize("header, length, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10_000, "header length 10000"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, None, "outside the 8 data bytes"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, "has 8 bytes.*needs 12"),
    ({"a": {"dtype": "F32", "shape": [2]}}, None, "entry 'a' needs dtype, shape and two data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, None, "'a' and 'b' overlap"),
    (["not", "an", "object"], None, "not a JSON object"),
])
def test_malformed_safetensors_are_refused(tmp_path, header, length, match):
    write_raw_safetensors(tmp_path / "model.safetensors", {}, header=header, header_length=length)
    with open(tmp_path / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="cannot read safetensors.*" + match):
        stored_tensors(tmp_path)


@pytest.mark.parametrize("file_name, match", [
    ("model-q4_k_m.gguf", "GGUF files .* are not read"),
    ("pytorch_model.bin", "never unpickled"),
])
def test_gguf_and_pickle_files_are_refused_by_name(ckpt, file_name, match):
    (ckpt / "model.safetensors").rename(ckpt / file_name)
    with pytest.raises(CheckpointError, match=f"found {file_name} but neither model.safetensors.*{match}"):
        refimpl.from_pretrained(ckpt)


# FP8 e4m3 with block scales

def test_fp8_dequantization_by_hand():
    # e4m3fn: 0x38 = 1.0, 0x40 = 2.0, 0x3C = 1.5, 0xB8 = -1.0, 0x7E = 448, 0x01 = 2**-9 (subnormal).
    codes = np.array([[0x38, 0x40, 0x3C], [0xB8, 0x7E, 0x01], [0x00, 0x3C, 0x40]], np.uint8)
    q = codes.view(ml_dtypes.float8_e4m3fn)
    # 2 x 2 blocks over a 3 x 3 matrix: the last block row and column are partial.
    s = np.array([[0.5, 4.0], [0.25, 3.0]], np.float32)
    expected = np.array([[0.5, 1.0, 6.0], [-0.5, 224.0, 2.0 ** -7], [0.0, 0.375, 6.0]])
    np.testing.assert_array_equal(dequantize_fp8_block(q, s, (2, 2)), expected)
    # E8M0 exponent bytes (DeepSeek-V4-style scales): 126 -> 0.5, 129 -> 4, 125 -> 0.25, 128 -> 2.
    e8m0 = np.array([[126, 129], [125, 128]], np.uint8)
    expected[2, 2] = 4.0
    np.testing.assert_array_equal(dequantize_fp8_block(q, e8m0, (2, 2)), expected)


@pytest.mark.parametrize("shape, block", [((200, 300), (128, 128)), ((576, 130), (128, 128)), ((3, 37, 45), (16, 32)),
                                          ((1, 1), (128, 128)), ((129, 127), (128, 64))])
def test_fp8_edge_blocks_use_the_scale_of_their_block(shape, block):
    # The authors' rule (DeepSeek-V3 inference/kernel.py, weight_dequant_kernel): element (i, j) takes
    # scale (i // b0, j // b1); the grid is ceil(R / b0) x ceil(C / b1), edge tiles masked.
    rng = np.random.default_rng(sum(shape))
    q = (rng.standard_normal(shape) * 50).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(1e-4, 1e-1, scale_grid(shape, block)).astype(np.float32)
    i = np.arange(shape[-2])[:, None] // block[0]
    j = np.arange(shape[-1])[None, :] // block[1]
    expected = q.astype(np.float64) * s.astype(np.float64)[..., i, j]
    np.testing.assert_array_equal(dequantize_fp8_block(q, s, block), expected)
    np.testing.assert_array_equal(dequantize_fp8_block(q, s, block, np.float32), expected.astype(np.float32))


def test_fp8_quantizer_round_trip_is_close():
    w = np.random.default_rng(1).standard_normal((150, 260)) * np.linspace(0.01, 3, 260)
    q, s = quantize_fp8_block(w, (128, 128))
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (2, 3) and s.dtype == np.float32
    # e4m3 keeps 3 mantissa bits: relative error per element at most 2**-4 of the block's scale range
    assert rel_rms(dequantize_fp8_block(q, s, (128, 128)), w) < 0.05


def hf_fp8_dequantize(q, s, dtype):
    torch = pytest.importorskip("torch")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    tq = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
    ts = torch.from_numpy(s.view(np.int16)).view(torch.bfloat16) if s.dtype.name == "bfloat16" else torch.from_numpy(s)
    return Fp8Dequantize(None)._dequantize_one(tq, ts, output_dtype=dtype).numpy()


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "uint8"])
@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((96, 64), (128, 128)), ((4, 64, 96), (32, 16))])
def test_fp8_matches_transformers_bit_for_bit(shape, block, scale_dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q = (rng.standard_normal(shape) * 100).astype(ml_dtypes.float8_e4m3fn)
    grid = scale_grid(shape, block)
    s = (rng.integers(110, 130, grid).astype(np.uint8) if scale_dtype == "uint8"
         else rng.uniform(1e-3, 1.0, grid).astype(getattr(ml_dtypes, scale_dtype, np.float32)))
    theirs = hf_fp8_dequantize(q, s, torch.float32)
    ours = dequantize_fp8_block(q, s, block, np.float32)
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_transformers_misreads_fp8_edge_blocks():
    # transformers 5.24 Fp8Dequantize._dequantize_one derives the block from the grid
    # (block_m = rows // scale_rows) instead of reading weight_block_size. With a partial
    # edge block it silently uses the wrong blocks (200 rows, grid 2: blocks of 100), or
    # refuses the tensor (DeepSeek-V3's kv_a_proj_with_mqa: 576 = 4.5 x 128 rows, grid 5).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((200, 256)) * 50).astype(ml_dtypes.float8_e4m3fn)
    s = np.array([[0.5, 0.5], [2.0, 2.0]], np.float32)
    theirs = hf_fp8_dequantize(q, s, torch.float32)
    ours = dequantize_fp8_block(q, s, (128, 128), np.float32)
    rows_100_to_127 = slice(100, 128)
    np.testing.assert_array_equal(ours[rows_100_to_127], q[rows_100_to_127].astype(np.float32) * 0.5)
    np.testing.assert_array_equal(theirs[rows_100_to_127], q[rows_100_to_127].astype(np.float32) * 2.0)
    np.testing.assert_array_equal(ours[:100], theirs[:100])
    q576 = (rng.standard_normal((576, 256)) * 50).astype(ml_dtypes.float8_e4m3fn)
    s576 = np.ones(scale_grid((576, 256), (128, 128)), np.float32)
    with pytest.raises(ValueError, match="not divisible by scale grid"):
        hf_fp8_dequantize(q576, s576, torch.float32)
    np.testing.assert_array_equal(dequantize_fp8_block(q576, s576, (128, 128)), q576.astype(np.float64))


# MXFP4 (gpt-oss experts)

def test_fp4_table_is_ocp_e2m1():
    # ml_dtypes' float4_e2m1fn is an independent implementation of the OCP E2M1 element type.
    codes = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(np.array(FP4_E2M1_VALUES), codes)
    np.testing.assert_array_equal(np.signbit(FP4_E2M1_VALUES), np.signbit(codes))


def test_mxfp4_dequantization_by_hand():
    # Byte 0x21: value 0 from the low nibble (code 1 = 0.5), value 1 from the high nibble (code 2 = 1.0);
    # 0xF7: codes 7 (6.0), 15 (-6.0); 0x8A: codes 10 (-1.0), 8 (-0.0). Scale byte 128 = 2**1.
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, :3] = [0x21, 0xF7, 0x8A]
    expected = np.zeros((1, 32))
    expected[0, :6] = [1.0, 2.0, 12.0, -12.0, -2.0, -0.0]
    got = dequantize_mxfp4(blocks, np.array([[128]], np.uint8))
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got[0, 5]) and got.shape == (1, 32)
    with pytest.raises(InputError, match="255 encodes NaN"):
        dequantize_mxfp4(blocks, np.array([[255]], np.uint8))


def test_mxfp4_quantizer_round_trip_is_close():
    w = np.random.default_rng(2).standard_normal((3, 40, 64)) * np.linspace(0.1, 4, 64)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2)
    assert rel_rms(dequantize_mxfp4(blocks, scales), w) < 0.15


def test_mxfp4_matches_transformers_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (3, 40, 2, 16), dtype=np.uint8)   # every byte value, both nibbles
    scales = rng.integers(100, 150, (3, 40, 2), dtype=np.uint8)
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    # Through the checkpoint reader: blocks (E, R, G, 16) become the input-major (E, 32 G, R) stack.
    save_file({"x.gate_up_proj_blocks": blocks, "x.gate_up_proj_scales": scales}, tmp_path / "model.safetensors")
    ours = open_checkpoint(tmp_path, QuantizationScheme("mxfp4"))["x.gate_up_proj"].materialize(np.float32)
    assert ours.shape == tuple(theirs.shape) == (3, 64, 40)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.numpy().view(np.uint32))


# Whole tiny models: refimpl on the quantized files against transformers dequantizing them

def hf_state(path, dtype, quantization_config):
    import torch
    import transformers
    import transformers.quantizers.quantizer_finegrained_fp8 as fp8_quantizer

    # transformers' FP8 quantizer demands accelerate before it looks at dequantize=True; the CPU
    # dequantize path itself never uses accelerate (not installed here).
    saved = fp8_quantizer.is_accelerate_available
    fp8_quantizer.is_accelerate_available = lambda: True
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), quantization_config=quantization_config,
            experts_implementation="eager", attn_implementation="eager")
    finally:
        fp8_quantizer.is_accelerate_available = saved


def assert_same_tensors(hf_model, ours, stacks=()):
    """Every parameter of transformers' dequantized model equals refimpl's tensor bit for bit
    (``stacks``: transformers names of per-layer expert stacks, rebuilt from refimpl's per-expert ones)."""
    for name, param in hf_model.state_dict().items():
        theirs = param.detach().numpy()
        if name in ours.weights:
            mine = ours.weights[name]
        else:
            layer, stack = name.rsplit(".mlp.experts.", 1)
            assert stack in stacks, name
            per_expert = ("gate_proj", "up_proj") if stack == "gate_up_proj" else ("down_proj",)
            mine = np.stack([np.concatenate([ours.weights[f"{layer}.mlp.experts.{e}.{p}.weight"] for p in per_expert])
                             for e in range(theirs.shape[0])])
        np.testing.assert_array_equal(mine, theirs, err_msg=name)


def tiny_qwen3(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    from hf_agreement import randomise

    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    import torch

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    randomise(model, seed)
    model.save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


def tiny_deepseek(tmp_path, seed, **overrides):
    transformers = pytest.importorskip("transformers")
    import torch
    from test_hf_agreement_deepseek_v3 import TINY, randomise_deepseek

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**TINY, **overrides}))
    randomise_deepseek(model, seed)
    model.save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


#: DeepSeek widths that are multiples of 16 (transformers' grid derivation is then right):
#: kv_a_proj_with_mqa 16 + 16 rows, q_b / kv_b 4 x 32 rows, experts 32.
DEEPSEEK_BLOCK_MULTIPLES = dict(kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                q_lora_rank=32)


@pytest.mark.parametrize("seed, block", [(41, (32, 32)), (42, (16, 32))])
def test_fp8_qwen3_agrees_with_transformers(tmp_path, seed, block):
    transformers = pytest.importorskip("transformers")
    import torch

    path = to_fp8(tiny_qwen3(tmp_path, seed), tmp_path / "fp8", block)
    ours = refimpl.from_pretrained(path, dtype=np.float32)
    assert ours.weights["model.layers.0.mlp.gate_proj.weight"].dtype == np.float32
    hf = hf_state(path, "float32", transformers.FineGrainedFP8Config(dequantize=True))
    assert_same_tensors(hf, ours)
    ids = np.random.default_rng(seed).integers(0, 128, size=(2, 13))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_rms(ours(ids), theirs) < 1e-5
    # The quantization is not a no-op: the plain checkpoint gives other logits.
    assert rel_rms(refimpl.from_pretrained(tmp_path / "plain", dtype=np.float32)(ids), theirs) > 1e-3


@pytest.mark.parametrize("seed", [43, 44])
def test_fp8_deepseek_v3_agrees_with_transformers(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    import torch

    plain = tiny_deepseek(tmp_path, seed, **DEEPSEEK_BLOCK_MULTIPLES)
    path = to_fp8(plain, tmp_path / "fp8", (16, 16))
    names = file_names(path)
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in names
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in names      # the router stays plain, as released
    ours = refimpl.from_pretrained(path, dtype=np.float32)
    hf = hf_state(path, "float32", transformers.FineGrainedFP8Config(dequantize=True))
    assert_same_tensors(hf, ours, stacks=("gate_up_proj", "down_proj"))
    ids = np.random.default_rng(seed).integers(0, 128, size=(2, 11))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_rms(ours(ids), theirs) < 1e-5


def test_fp8_deepseek_v3_edge_blocks_differ_from_transformers(tmp_path):
    # TINY's kv_a_proj_with_mqa has 16 + 8 = 24 rows and q_b_proj 24 columns: with 16 x 16 blocks
    # the last block is partial, which transformers' CPU dequantization misreads (see
    # test_transformers_misreads_fp8_edge_blocks). The reference follows DeepSeek's kernel; its
    # forward is checked against transformers loading the reference's dequantized weights as
    # a plain float32 checkpoint, and transformers' own FP8 load differs by far more.
    transformers = pytest.importorskip("transformers")
    import torch

    path = to_fp8(tiny_deepseek(tmp_path, 45), tmp_path / "fp8", (16, 16))
    ours_model = refimpl.from_pretrained(path, dtype=np.float32)
    ids = np.random.default_rng(45).integers(0, 128, size=(2, 9))
    ours = ours_model(ids)
    dequantized = tmp_path / "dequantized"
    shutil.copytree(tmp_path / "plain", dequantized)
    save_file(read_weights(path), dequantized / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        plain_hf = hf_state(dequantized, "float32", None)(torch.from_numpy(ids)).logits.numpy()
        fp8_hf = hf_state(path, "float32", transformers.FineGrainedFP8Config(dequantize=True))(
            torch.from_numpy(ids)).logits.numpy()
    assert rel_rms(ours, plain_hf) < 1e-5
    assert rel_rms(fp8_hf, ours) > 1e-2


def tiny_gpt_oss(tmp_path, seed, shape):
    transformers = pytest.importorskip("transformers")
    import torch
    from test_hf_agreement_gpt_oss import make_config, randomise_gpt_oss

    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(make_config(*shape))
    randomise_gpt_oss(model, seed, 1.0)
    model.save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


#: layers, H, Hkv, D, M, I (multiples of 32: MXFP4 blocks run along M and I), E, k, W, extra
GPT_OSS = [(2, 4, 2, 16, 64, 64, 4, 2, 4, {}), (3, 4, 1, 8, 96, 32, 5, 1, 3, {"attention_bias": False})]


@pytest.mark.parametrize("seed, shape", [(51, GPT_OSS[0]), (52, GPT_OSS[1])])
def test_mxfp4_gpt_oss_agrees_with_transformers(tmp_path, seed, shape):
    transformers = pytest.importorskip("transformers")
    import torch
    from conformance.backends.hf_exact import exact_float64, load_exact_float64
    from hf_agreement import run_with_taps

    path = to_mxfp4(tiny_gpt_oss(tmp_path, seed, shape), tmp_path / "mxfp4")
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in file_names(path)
    ours = refimpl.from_pretrained(path, dtype=np.float32)
    hf = hf_state(path, "float32", transformers.Mxfp4Config(dequantize=True))
    assert_same_tensors(hf, ours)
    ids = np.random.default_rng(seed).integers(0, 96, size=(2, 11))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_rms(ours(ids), theirs) < 1e-5
    # MXFP4 values are exact in any float dtype, so the float64 bar holds too.
    with exact_float64():
        lifted = load_exact_float64(path, quantization_config=transformers.Mxfp4Config(dequantize=True))
        logits, _ = run_with_taps(lifted, ids)
    assert rel_rms(refimpl.from_pretrained(path)(ids), logits) < 1e-10


def test_bfloat16_sharded_qwen3_agrees_in_float32(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from hf_agreement import randomise

    config = transformers.Qwen3Config(
        vocab_size=160, hidden_size=64, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(61)
    model = transformers.Qwen3ForCausalLM(config)
    randomise(model, 61)
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = np.random.default_rng(61).integers(0, 160, size=(2, 12))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    for lazy in (False, True):
        ours = refimpl.from_pretrained(tmp_path, dtype=np.float32, lazy=lazy)
        assert ours.weights["model.norm.weight"].dtype == np.float32
        assert rel_rms(ours(ids), theirs) < 1e-5


# What is refused, and how

@pytest.mark.parametrize("method, named", [
    ("gptq", "GPTQ integer weights"), ("awq", "AWQ integer weights"), ("bitsandbytes", "bitsandbytes"),
    ("compressed-tensors", "compressed-tensors"), ("nf5-magic", "'nf5-magic'"), (None, "None"),
])
def test_unsupported_quant_methods_are_refused_by_name(ckpt, method, named):
    edit_config(ckpt, quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ConfigError, match=f"quant_method .*{named}.* not supported.*'fp8'.*'mxfp4'"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize("changes, match", [
    ({"activation_scheme": "static"}, "activation_scheme='static'"),
    ({"fmt": "e5m2"}, "fmt='e5m2'"),
    ({"expert_dtype": "fp4"}, "expert_dtype='fp4'"),
    ({"weight_block_size": None}, "weight_block_size must be two positive integers .*per-tensor"),
    ({"weight_block_size": [128]}, "weight_block_size"),
])
def test_unsupported_fp8_variants_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        scheme_from_config({"quantization_config": {**fp8_config((128, 128)), **changes}})


def test_published_quantization_configs_are_accepted_by_the_configs():
    from refimpl.models.deepseek_v3 import PRESETS as DS, DeepseekV3Config
    from refimpl.models.gpt_oss import PRESETS as OSS, GptOssConfig
    from quantized_checkpoints import MXFP4_CONFIG

    GptOssConfig.from_dict({**OSS["gpt-oss-20b"], "quantization_config": MXFP4_CONFIG})
    DeepseekV3Config.from_dict({**DS["DeepSeek-V3"], "quantization_config": fp8_config((128, 128))})
    # MiniMax-M2's release spells the format out and lists the modules it keeps in bfloat16/float32.
    minimax = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
               "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    assert scheme_from_config({"quantization_config": minimax}) == QuantizationScheme("fp8", (128, 128))
    assert scheme_from_config({"quantization_config": MXFP4_CONFIG}) == QuantizationScheme("mxfp4")
    assert scheme_from_config({"quantization_config": fp8_config((128, 128))}) == QuantizationScheme("fp8", (128, 128))


def _fp8_ckpt(ckpt, edit, quantization_config=None):
    """The golden checkpoint with up_proj of layer 0 stored as FP8 (+ scale), then ``edit(tensors)``."""
    pytest.importorskip("torch")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(tensors[name], (128, 128))
    edit(tensors)
    save_torch(ckpt / "model.safetensors", tensors)
    edit_config(ckpt, quantization_config=quantization_config or fp8_config((128, 128)))
    return ckpt


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("edit, config, match", [
    (lambda t: t.pop(UP + "_scale_inv"), None, f"FP8 tensor '{UP}' has no '{UP}_scale_inv'"),
    (lambda t: t.__setitem__(UP + "_scale_inv", np.ones((2, 1), np.float32)), None,
     f"'{UP}' \\(96, 64\\) with weight_block_size \\[128, 128\\] needs '{UP}_scale_inv' of shape \\(1, 1\\)"),
    (lambda t: t.__setitem__(UP + "_scale_inv", np.ones((3, 1), np.int32)), None, "stored as I32; scales must"),
    (lambda t: t.__setitem__("model.norm.weight_scale_inv", np.ones((1,), np.float32)), None,
     "'model.norm.weight_scale_inv' is an FP8 block scale, but 'model.norm.weight' is not stored as F8_E4M3"),
    (lambda t: None, {"quant_method": "mxfp4"}, f"'{UP}' is stored as F8_E4M3; only F64"),
])
def test_fp8_tensor_errors_name_the_tensor(ckpt, edit, config, match):
    _fp8_ckpt(ckpt, edit, config)
    with pytest.raises(CheckpointError, match=match):
        refimpl.from_pretrained(ckpt)


def test_fp8_tensor_without_quantization_config_is_refused(ckpt):
    _fp8_ckpt(ckpt, lambda t: None)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"'{UP}' is stored as F8_E4M3; only .*quant_method 'fp8'"):
        refimpl.from_pretrained(ckpt)


@pytest.mark.parametrize("tensors, config, match", [
    ({"x.qweight": np.zeros((4, 8), np.int32)}, None, "'x.qweight' is stored as I32; only F64, F32, F16 and BF16"),
    ({"x_blocks": np.zeros((2, 1, 16), np.uint8)}, {"quant_method": "mxfp4"},
     "MXFP4 tensor 'x_blocks' has no 'x_scales'"),
    ({"x_blocks": np.zeros((2, 1, 16), np.uint8), "x_scales": np.zeros((2, 2), np.uint8)}, {"quant_method": "mxfp4"},
     "MXFP4 pair 'x_blocks' \\(2, 1, 16\\) / 'x_scales' \\(2, 2\\)"),
    ({"x_scales": np.zeros((2, 1), np.uint8)}, {"quant_method": "mxfp4"}, "'x_scales' is an MXFP4 scale"),
    ({"x_blocks": np.zeros((2, 1, 16), np.uint8), "x_scales": np.zeros((2, 1), np.uint8)}, None,
     "'x_(blocks|scales)' is stored as U8; only"),
])
def test_other_tensors_are_refused_by_name(tmp_path, tensors, config, match):
    save_file(tensors, tmp_path / "model.safetensors")
    scheme = scheme_from_config({"quantization_config": config})
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path, scheme)


def test_fp8_e5m2_and_nan_scales_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch_file

    save_torch_file({"w": torch.zeros(2, 2, dtype=torch.float8_e5m2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'w' is stored as F8_E5M2; only"):
        open_checkpoint(tmp_path, QuantizationScheme("fp8", (128, 128)))
    save_torch(tmp_path / "model.safetensors", {"w": np.ones((2, 2), ml_dtypes.float8_e4m3fn),
                                                "w_scale_inv": np.full((1, 1), 255, np.uint8)})
    tensor = open_checkpoint(tmp_path, QuantizationScheme("fp8", (128, 128)))["w"]
    with pytest.raises(CheckpointError, match="tensor 'w': fp8 scale_inv: E8M0 byte 255 encodes NaN"):
        tensor.materialize(np.float32)
