"""Peak memory of a float32 forward on a Qwen3-0.6B-shaped bfloat16 checkpoint, lazy and eager.

Builds a random checkpoint with the real Qwen3-0.6B config (hidden 1024, 28 layers, 16 heads,
8 key/value heads, head_dim 128, intermediate 3072, vocabulary 151936, tied embeddings), one
safetensors shard per decoder layer plus one for the embedding and final norm, written tensor
by tensor (never two float32 copies at once). Then, for each mode, a fresh Python process loads
it with ``refimpl.from_pretrained(dir, np.float32, lazy=...)``, runs one forward over
``--tokens`` tokens and reports its peak resident set size (``resource.getrusage``,
``ru_maxrss``, which counts the memory-mapped file pages it touched as well; ``VmHWM`` from
``/proc/self/status`` as a cross-check).

    python bench/memory_peak.py                       # build in a temp dir, measure lazy and eager
    python bench/memory_peak.py --dir /tmp/q06 --keep  # keep the checkpoint for another run
    python bench/memory_peak.py --layers 4 --hidden 256 --intermediate 768 --vocab 8192  # small

Numbers measured with it are in docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Qwen3-0.6B's config.json values that carry math (refimpl.models.qwen3.PRESETS).
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
             "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16"}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One bfloat16 tensor: norms 1 + 0.2 N, the embedding N, matrices N / sqrt(fan_in)."""
    if len(shape) == 1:
        values = 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
    else:
        values = rng.standard_normal(shape, dtype=np.float32)
        if "embed_tokens" not in name:
            values *= np.float32(shape[-1] ** -0.5)
    return values.astype(ml_dtypes.bfloat16)


def build(directory: Path, config: dict, seed: int = 0) -> int:
    """Write ``config.json``, one shard per layer and ``model.safetensors.index.json``; returns the byte size."""
    from safetensors.numpy import save_file

    import refimpl

    arch = refimpl.registry.get_architecture(config)
    shapes = arch.weight_shapes(arch.config_class.from_dict(config))
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(layer, []).append(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for index, (group, names) in enumerate(groups.items()):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _draw(name, shapes[name], rng) for name in names}
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file_name for name in names})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    return total


def measure(directory: Path, lazy: bool, tokens: int) -> dict:
    """In this process: load, one forward, and the peak RSS at each step (MiB)."""
    import refimpl  # before the baseline: the imports are not what is measured

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start = peak()
    t0 = time.perf_counter()
    model = refimpl.from_pretrained(directory, dtype=np.float32, lazy=lazy, progress=False)
    t1 = time.perf_counter()
    after_load = peak()
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, tokens))
    logits = model(ids)
    t2 = time.perf_counter()
    assert logits.shape == (1, tokens, model.config.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    return {"lazy": lazy, "tokens": tokens, "peak_after_imports_mib": round(start, 1),
            "peak_after_load_mib": round(after_load, 1), "peak_after_forward_mib": round(peak(), 1),
            "vm_hwm_mib": _vm_hwm(), "load_s": round(t1 - t0, 2), "forward_s": round(t2 - t1, 2)}


def _vm_hwm() -> float | None:
    """Linux's own high-water mark of this process's resident set (``VmHWM``), as a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_child(directory: Path, lazy: bool, tokens: int) -> dict:
    """:func:`measure` in a fresh interpreter (so that one mode's peak does not hide the other's)."""
    out = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--tokens", str(tokens)]
                         + (["--lazy"] if lazy else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--modes", default="lazy,eager", help="comma-separated: lazy, eager")
    parser.add_argument("--layers", type=int, default=QWEN3_06B["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=QWEN3_06B["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=QWEN3_06B["intermediate_size"])
    parser.add_argument("--vocab", type=int, default=QWEN3_06B["vocab_size"])
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lazy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.lazy, args.tokens)))
        return
    if args.build is not None:
        t0 = time.perf_counter()
        size = build(args.build, json.loads(args.config))
        print(f"built {args.build} ({size / 2**20:.0f} MiB bfloat16) in {time.perf_counter() - t0:.0f} s")
        return
    config = {**QWEN3_06B, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "vocab_size": args.vocab}
    directory = args.dir or Path(tempfile.mkdtemp(prefix="memory_peak_"))
    try:
        if not (directory / "model.safetensors.index.json").is_file():
            # Built in a child too: Linux carries ru_maxrss across fork and exec, so this
            # process must stay small for the children's peaks to be their own.
            subprocess.run([sys.executable, __file__, "--build", str(directory), "--config", json.dumps(config)],
                           check=True)
        results = [run_child(directory, mode == "lazy", args.tokens) for mode in args.modes.split(",")]
        print(json.dumps({"config": config, "results": results}, indent=1))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
