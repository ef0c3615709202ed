"""Lazy loading: ``from_pretrained(path, lazy=True)`` reads headers at load and one layer's tensors at a time.

The lazy model must compute exactly what the eager one computes (same conversions, same
forward), check names and shapes from the safetensors headers without reading data, check
finiteness when a tensor is converted, and hold only one layer's tensors in the compute
dtype at a time (measured with tracemalloc on a model whose weights dwarf its activations).
"""

import json
import shutil
import subprocess
import sys
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refimpl
import refimpl.checkpoint
import refimpl.lazy_weights
from refimpl.errors import CheckpointError, MissingWeightsError, WeightShapeError
from refimpl.lazy_weights import LazyWeights

ROOT = Path(__file__).resolve().parents[1]
#: One golden case per architecture (dense, sliding, MLA + MoE, sinks + MXFP4-shaped experts...).
CASES = ["qwen3/untied-gqa-odd-len", "gemma3/default-pattern-6-layers", "deepseek_v3/group-limited-routing",
         "gpt_oss/released-style-config", "glm4_moe/eps-visible", "llama4/maverick-interleaved-dense-moe",
         "minimax_m2/gqa-partial-rotary", "qwen3_moe/eps-visible", "olmo2/four-layers-len37",
         "mistral/sliding-w4-len11", "smollm3/interval2-derived"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lazy_equals_eager(golden_dir, case, dtype):
    path = golden_dir / case / "checkpoint"
    ids = load_file(golden_dir / case / "io.safetensors")["input_ids"]
    eager = refimpl.from_pretrained(path, dtype=dtype).forward(ids, return_hidden_states=True)
    lazy_model = refimpl.from_pretrained(path, dtype=dtype, lazy=True)
    assert isinstance(lazy_model.weights, LazyWeights)
    lazy = lazy_model.forward(ids, return_hidden_states=True)
    np.testing.assert_array_equal(lazy.logits, eager.logits)
    assert list(lazy.hidden_states) == list(eager.hidden_states)
    for name, tap in eager.hidden_states.items():
        np.testing.assert_array_equal(lazy.hidden_states[name], tap, err_msg=name)


def fuse_experts(src: Path, dst: Path, num_experts: int) -> None:
    """``src`` (per-expert MoE tensors) rewritten in transformers' fused layout (``save_original_format=False``)."""
    shutil.copytree(src, dst)
    w = load_file(src / "model.safetensors")
    layers = sorted({n.split(".")[2] for n in w if ".mlp.experts.0.gate_proj.weight" in n})
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts"
        w[f"{p}.gate_up_proj"] = np.stack([np.concatenate([w.pop(f"{p}.{e}.gate_proj.weight"),
                                                           w.pop(f"{p}.{e}.up_proj.weight")])
                                           for e in range(num_experts)])
        w[f"{p}.down_proj"] = np.stack([w.pop(f"{p}.{e}.down_proj.weight") for e in range(num_experts)])
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})


def test_lazy_slices_of_fused_expert_stacks(golden_dir, tmp_path):
    # convert_weights slices the fused stacks: on LazyTensors the slices stay lazy and exact.
    case = golden_dir / "qwen3_moe/eps-visible"
    experts = json.loads((case / "checkpoint/config.json").read_text())["num_experts"]
    fuse_experts(case / "checkpoint", tmp_path / "fused", experts)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "fused/model.safetensors")
    ids = load_file(case / "io.safetensors")["input_ids"]
    expected = refimpl.from_pretrained(case / "checkpoint")(ids)
    np.testing.assert_array_equal(refimpl.from_pretrained(tmp_path / "fused", lazy=True)(ids), expected)
    np.testing.assert_array_equal(refimpl.from_pretrained(tmp_path / "fused")(ids), expected)


@contextmanager
def counting_reads():
    """Count the tensor reads from the memory-mapped files."""
    reads = []
    original = refimpl.checkpoint._MappedFile.view

    def view(self, tensor):
        reads.append(tensor.name)
        return original(self, tensor)

    refimpl.checkpoint._MappedFile.view = view
    try:
        yield reads
    finally:
        refimpl.checkpoint._MappedFile.view = original


def test_lazy_load_reads_headers_only(golden_dir):
    path = golden_dir / "qwen3/untied-gqa-odd-len/checkpoint"
    with counting_reads() as reads:
        model = refimpl.from_pretrained(path, lazy=True)
        assert reads == []
        model(np.array([[1, 2, 3]]))
        assert sorted(set(reads)) == sorted(model.weights)
    with counting_reads() as reads:
        refimpl.from_pretrained(path)
        assert sorted(reads) == sorted(model.weights)


@pytest.fixture()
def ckpt(tmp_path, golden_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir / "qwen3/untied-gqa-odd-len/checkpoint", dst)
    return dst


def edit_weights(path, fn):
    w = load_file(path / "model.safetensors")
    fn(w)
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def test_lazy_checks_finiteness_on_conversion(ckpt):
    edit_weights(ckpt, lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__((3, 4), np.inf))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.down_proj.weight' holds NaN or Inf"):
        refimpl.from_pretrained(ckpt)
    model = refimpl.from_pretrained(ckpt, lazy=True)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.down_proj.weight' holds NaN or Inf"):
        model(np.array([[1, 2]]))


def test_float64_beyond_float32_range_is_refused_in_float32(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.norm.weight": w["model.norm.weight"].astype(np.float64) * 1e300}))
    refimpl.from_pretrained(ckpt, lazy=True)
    with pytest.raises(CheckpointError, match="'model.norm.weight' holds NaN or Inf"):
        refimpl.from_pretrained(ckpt, dtype=np.float32)


@pytest.mark.parametrize("edit, error, match", [
    (lambda w: w.pop("model.layers.1.self_attn.k_norm.weight"), MissingWeightsError, "k_norm"),
    (lambda w: w.update({"model.norm.weight": np.ones(63, np.float32)}), WeightShapeError, "model.norm.weight.*63"),
])
def test_lazy_checks_names_and_shapes_at_load(ckpt, edit, error, match):
    edit_weights(ckpt, edit)
    with counting_reads() as reads, pytest.raises(error, match=match):
        refimpl.from_pretrained(ckpt, lazy=True)
    assert reads == []


def test_lazy_forward_reads_layer_by_layer(golden_dir):
    path = golden_dir / "deepseek_v3/group-limited-routing/checkpoint"
    model = refimpl.from_pretrained(path, lazy=True)
    order = []
    with model.weights.listening(order.append):
        model(np.array([[5, 3, 7, 1]]))
    layers = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert layers == sorted(layers) and set(layers) == set(range(model.config.num_hidden_layers))
    assert order[0] == "model.embed_tokens.weight" and "model.norm.weight" in order[-2:]


def random_qwen3(path: Path, layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0) -> dict:
    """A Qwen3 checkpoint with random float32 weights; returns its config."""
    config = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": hidden // 4, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True, "hidden_act": "silu"}
    arch = refimpl.ARCHITECTURES["Qwen3ForCausalLM"]
    shapes = arch.weight_shapes(arch.config_class.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {n: (1 + 0.2 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1]))
               .astype(np.float32) for n, s in shapes.items()}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return config


def test_lazy_forward_holds_one_layer_at_a_time(tmp_path):
    # 8 layers of ~1 MiB float64 weights each, 16 tokens: the weights dwarf the activations.
    random_qwen3(tmp_path / "m", layers=8, hidden=128, intermediate=512, vocab=64)
    ids = np.arange(16).reshape(1, 16) % 64
    eager = refimpl.from_pretrained(tmp_path / "m")
    per_layer = sum(w.nbytes for n, w in eager.weights.items() if n.startswith("model.layers.0."))
    total = sum(w.nbytes for w in eager.weights.values())
    assert total > 7.5 * per_layer
    lazy = refimpl.from_pretrained(tmp_path / "m", lazy=True)
    tracemalloc.start()
    try:
        np.testing.assert_array_equal(lazy(ids), eager(ids))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * per_layer, f"lazy forward peaked at {peak / per_layer:.1f} layers of weights"


def test_layer_progress_counts_every_layer(golden_dir, monkeypatch):
    advances = []

    @contextmanager
    def fake_bar(enabled, description, total):
        advances.append(("start", enabled, total))
        yield advances.append

    monkeypatch.setattr(refimpl.lazy_weights, "_progress_bar", fake_bar)
    model = refimpl.from_pretrained(golden_dir / "gemma3/default-pattern-6-layers/checkpoint", lazy=True,
                                    progress=True)
    model(np.array([[1, 2, 3]]))
    assert advances[0] == ("start", True, 6)
    steps = advances[1:]
    assert sum(steps) == 6 and all(s >= 1 for s in steps) and len(steps) >= 2


def test_progress_bar_renders_on_stderr(golden_dir, capsys, monkeypatch):
    path = golden_dir / "gemma3/default-pattern-6-layers/checkpoint"
    # Not a terminal (pytest captures stderr): no bar unless asked for.
    assert refimpl.from_pretrained(path, lazy=True).progress is False
    monkeypatch.setenv("FORCE_COLOR", "1")          # rich then renders as on a terminal
    refimpl.from_pretrained(path, lazy=True, progress=True)(np.array([[1, 2, 3]]))
    err = capsys.readouterr().err
    assert "forward (lazy weights), layers" in err and "6/6" in err


def test_refimpl_backend_option_lazy(golden_dir):
    from conformance.backends import resolve_backend
    from conformance.errors import BackendError

    path = golden_dir / "qwen3/untied-gqa-odd-len/checkpoint"
    backend = resolve_backend("refimpl", {"lazy": "true"})
    loaded = backend.load_model(path, "float32")
    assert loaded.model.lazy
    assert not resolve_backend("refimpl", {}).load_model(path, "float32").model.lazy
    with pytest.raises(BackendError, match="lazy.*true or false"):
        resolve_backend("refimpl", {"lazy": "maybe"})


@pytest.mark.slow
def test_memory_peak_script_small(tmp_path):
    # bench/memory_peak.py at a small size: both modes run, and lazy loading keeps the float32
    # weights (42 MiB here) out of the peak.
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/memory_peak.py"), "--dir", str(tmp_path / "m"), "--layers", "8",
         "--hidden", "512", "--intermediate", "1536", "--vocab", "8192", "--tokens", "32"],
        capture_output=True, text=True, check=True, timeout=600)
    results = {r["lazy"]: r for r in json.loads(out.stdout[out.stdout.index("{"):])["results"]}
    assert results[True]["peak_after_load_mib"] - results[True]["peak_after_imports_mib"] < 5
    assert results[True]["peak_after_forward_mib"] + 20 < results[False]["peak_after_forward_mib"]


def test_lazy_mtp_draft_logits_equal_eager(golden_dir, tmp_path):
    # A DeepSeek-V3 checkpoint with one multi-token-prediction depth appended (random tensors,
    # the per-depth copies of the embedding and head equal to the main ones).
    src = golden_dir / "deepseek_v3/group-limited-routing/checkpoint"
    arch = refimpl.ARCHITECTURES["DeepseekV3ForCausalLM"]
    if arch.mtp is None:
        pytest.skip("no MTP hook for DeepSeek-V3 in this tree")
    raw = {**json.loads((src / "config.json").read_text()), "num_nextn_predict_layers": 1}
    config = arch.config_class.from_dict(raw)
    weights = load_file(src / "model.safetensors")
    rng = np.random.default_rng(9)
    for name, shape in arch.mtp.weight_shapes(config).items():
        weights[name] = (1 + 0.2 * rng.standard_normal(shape) if len(shape) == 1
                         else rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    for name, source in arch.mtp.copies(config).items():
        weights[name] = weights[source]
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text(json.dumps(raw))
    save_file(weights, tmp_path / "m/model.safetensors", metadata={"format": "pt"})
    ids = np.array([[3, 1, 4, 1, 5, 9, 2]])
    eager = refimpl.from_pretrained(tmp_path / "m")
    lazy = refimpl.from_pretrained(tmp_path / "m", lazy=True)
    assert eager.has_mtp and lazy.has_mtp and isinstance(lazy.mtp_weights, LazyWeights)
    expected = eager.forward(ids, return_mtp_logits=True)
    got = lazy.forward(ids, return_mtp_logits=True)
    np.testing.assert_array_equal(got.logits, expected.logits)
    assert len(got.mtp_logits) == len(expected.mtp_logits) == 1
    np.testing.assert_array_equal(got.mtp_logits[0], expected.mtp_logits[0])


def test_lazy_must_be_a_bool(golden_dir):
    from refimpl.errors import InputError

    with pytest.raises(InputError, match="lazy must be True or False, got 'false'"):
        refimpl.from_pretrained(golden_dir / "qwen3" / "tied-mqa-prime-len" / "checkpoint", lazy="false")
