"""Write the golden corpus under golden/ from the reference, deterministically.

Each model-level case is a tiny Hugging Face-format checkpoint with random weights
drawn from a fixed seed (config.json + model.safetensors, float32 tensors) plus
``io.safetensors`` with the input ids and the expected float64 outputs of
``refimpl`` (logits and the named per-layer hidden states). ``golden/MANIFEST.json``
lists every case with its seed, config summary, tolerance class and the sha256 of
every file.

Usage:
    python tools/make_goldens.py            # (re)write golden/
    python tools/make_goldens.py --check    # regenerate in memory and compare

``--check`` fails when a stored weight, input or config differs bit for bit from
the regenerated one, when an expected output differs by more than
CHECK_REL_RMS (BLAS summation order differs between machines, so outputs are not
byte-compared), or when a file does not match its manifest hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import numpy as np
    from safetensors.numpy import load, save

    import refimpl
except ImportError as exc:
    sys.exit(f"make_goldens: {exc}; install the project first: pip install -e . (see README.md)")

GENERATOR_VERSION = 1
#: Bumped whenever cases are added, removed or changed.
CORPUS_VERSION = "0.4.0"
#: Largest relative RMS difference allowed between stored and regenerated outputs.
CHECK_REL_RMS = 1e-12


@dataclass(frozen=True)
class ModelCase:
    """One model-level golden case: a config, a seed and an input shape."""

    case_id: str
    description: str
    seed: int
    config: dict
    batch: int
    seq: int
    tolerance_class: str = "model_logits"
    #: multipliers for weights whose name contains the key, applied after drawing
    weight_scales: dict = field(default_factory=dict)


def _qwen3(**overrides) -> dict:
    base = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 4096, "attention_bias": False, "use_sliding_window": False,
        "dtype": "float32",
    }
    base.update(overrides)
    return base


CASES = [
    ModelCase(
        "qwen3/untied-gqa-odd-len",
        "untied head, GQA H=4/Hkv=2, head_dim 32 != hidden/heads 16, batch 2, odd length 9",
        seed=1, config=_qwen3(), batch=2, seq=9,
    ),
    ModelCase(
        "qwen3/tied-mqa-prime-len",
        "tied embeddings, MQA (Hkv=1), head_dim 24, 3 layers, prime length 13, rope_theta at top level",
        seed=2,
        config=_qwen3(
            tie_word_embeddings=True, num_key_value_heads=1, head_dim=24, num_hidden_layers=3,
            rope_parameters=None, rope_theta=1000000.0,
        ),
        batch=1, seq=13,
    ),
    ModelCase(
        "qwen3/mha-batch3",
        "MHA (Hkv=H=4), head_dim = hidden/heads = 16, batch 3, length 8, eps 1e-5",
        seed=3,
        config=_qwen3(num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5),
        batch=3, seq=8,
    ),
    ModelCase(
        "qwen3/single-token",
        "one token per row (T=1), batch 2, GQA H=6/Hkv=3, hidden 48, tied",
        seed=4,
        config=_qwen3(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                      tie_word_embeddings=True),
        batch=2, seq=1,
    ),
    ModelCase(
        "qwen3/eps-sensitive",
        "embeddings and q/k projections scaled by 1e-3 so that mean squares reach rms_norm_eps (1e-6): "
        "the placement and value of eps in the input, q and k norms change the output at float32",
        seed=6,
        config=_qwen3(num_hidden_layers=2),
        batch=2, seq=6,
        weight_scales={"embed_tokens": 1e-3, "self_attn.q_proj": 1e-3, "self_attn.k_proj": 1e-3},
    ),
    ModelCase(
        "qwen3/sliding-window",
        "use_sliding_window with sliding_window 4 and max_window_layers 1: layers [full, sliding, sliding], "
        "length 11 > window, batch 2",
        seed=7,
        config=_qwen3(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        batch=2, seq=11,
    ),
    ModelCase(
        "qwen3/window-flag-off",
        "sliding_window 3 present but use_sliding_window false (and max_window_layers 0): every layer is full "
        "attention; an engine that applies the window whenever the field is set fails",
        seed=9,
        config=_qwen3(use_sliding_window=False, sliding_window=3, max_window_layers=0),
        batch=1, seq=9,
    ),
    ModelCase(
        "qwen3/long-sequence",
        "one layer, 320 tokens: positions past 256, where bfloat16 positions or float32 angles first go wrong",
        seed=10,
        config=_qwen3(num_hidden_layers=1, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
        batch=1, seq=320,
    ),
    ModelCase(
        "qwen3/attention-bias",
        "attention_bias: q/k/v/o projection biases, GQA H=4/Hkv=2, length 10",
        seed=8,
        config=_qwen3(attention_bias=True),
        batch=1, seq=10,
    ),
    ModelCase(
        "qwen3/long-theta1e6",
        "released-style RoPE (rope_theta 1e6), 4 layers, length 67, vocab 256",
        seed=5,
        config=_qwen3(vocab_size=256, num_hidden_layers=4,
                      rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
        batch=1, seq=67,
    ),
]


def _clean_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if v is not None}


def random_weights(case: ModelCase) -> dict[str, np.ndarray]:
    """Random float32 weights for ``case`` from ``np.random.default_rng(seed)``.

    Linear weights ~ N(0, 1/in_features), biases ~ N(0, 0.04), embeddings ~ N(0, 1),
    norm weights 1 + 0.2 N(0, 1) (so that a backend using 1 + w, or ignoring w, is caught),
    then ``case.weight_scales`` multipliers.
    Tensors are drawn in sorted-name order so the stream is fixed.
    """
    raw = _clean_config(case.config)
    arch = refimpl.registry.get_architecture(raw)
    shapes = arch.weight_shapes(arch.config_class.from_dict(raw))
    rng = np.random.default_rng(case.seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            w = 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        for key, scale in case.weight_scales.items():
            if key in name:
                w = w * scale
        weights[name] = w.astype(np.float32)
    return weights


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_case(case: ModelCase, scratch: Path) -> dict[str, bytes]:
    """All files of one case, as ``{relative path: bytes}`` (paths relative to golden/)."""
    config = _clean_config(case.config)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    model_bytes = save(random_weights(case), metadata={"format": "pt"})
    ckpt = scratch / case.case_id / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_bytes(config_bytes)
    (ckpt / "model.safetensors").write_bytes(model_bytes)

    rng = np.random.default_rng(case.seed + 10_000)
    input_ids = rng.integers(0, config["vocab_size"], size=(case.batch, case.seq), dtype=np.int64)
    out = refimpl.from_pretrained(ckpt, dtype=np.float64).forward(input_ids, return_hidden_states=True)
    tensors = {"input_ids": input_ids, "logits": out.logits}
    tensors.update({f"hidden_states.{k}": v for k, v in out.hidden_states.items()})
    provenance = json.dumps(
        {"case_id": case.case_id, "seed": case.seed, "generator_version": GENERATOR_VERSION,
         "numpy_version": np.__version__, "refimpl_version": refimpl.__version__},
        sort_keys=True,
    )
    # One metadata key only: safetensors writes several keys in hash order, not reproducibly.
    io_bytes = save(tensors, metadata={"provenance": provenance})
    base = case.case_id
    return {
        f"{base}/checkpoint/config.json": config_bytes,
        f"{base}/checkpoint/model.safetensors": model_bytes,
        f"{base}/io.safetensors": io_bytes,
    }


def config_summary(config: dict) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "attention_bias",
            "use_sliding_window", "sliding_window", "max_window_layers")
    return {k: config[k] for k in keys if k in config}


def manifest_entry(case: ModelCase, files: dict[str, bytes]) -> dict:
    return {
        "id": case.case_id, "level": "model", "architecture": case.config["architectures"][0],
        "description": case.description, "seed": case.seed, "tolerance_class": case.tolerance_class,
        "config_summary": config_summary(_clean_config(case.config)),
        "input_shape": [case.batch, case.seq],
        "checkpoint": f"{case.case_id}/checkpoint", "data": f"{case.case_id}/io.safetensors",
        "files": {path: sha256_bytes(data) for path, data in sorted(files.items())},
    }


def generate(scratch: Path) -> tuple[dict, dict[str, bytes]]:
    """Build every case; return the manifest and all files (including MANIFEST.json)."""
    all_files: dict[str, bytes] = {}
    entries = []
    for case in CASES:
        files = build_case(case, scratch)
        entries.append(manifest_entry(case, files))
        all_files.update(files)
    manifest = {"corpus_version": CORPUS_VERSION, "generator": "tools/make_goldens.py",
                "generator_version": GENERATOR_VERSION, "cases": entries}
    all_files["MANIFEST.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return manifest, all_files


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    """Relative RMS difference over finite positions (NaN if either side is all non-finite there)."""
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.linalg.norm((a - b)[finite]) / max(np.linalg.norm(b[finite]), np.finfo(np.float64).tiny))


def _compare_tensor_file(path: str, stored: bytes, fresh: bytes, output_keys: bool) -> list[str]:
    """Differences between two safetensors files: bitwise, except outputs by tolerance."""
    old, new = load(stored), load(fresh)
    problems = []
    if set(old) != set(new):
        problems.append(f"{path}: tensor names differ: {sorted(set(old) ^ set(new))}")
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        is_output = output_keys and name != "input_ids"
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{path}:{name}: stored {a.dtype}{a.shape}, regenerated {b.dtype}{b.shape}")
        elif is_output and not np.array_equal(np.isfinite(a), np.isfinite(b)):
            problems.append(f"{path}:{name}: NaN/Inf positions differ from the regenerated output")
        elif is_output and not _rel_rms(a, b) <= CHECK_REL_RMS:
            problems.append(f"{path}:{name}: expected output differs, rel RMS {_rel_rms(a, b):.3e} > {CHECK_REL_RMS}")
        elif not is_output and a.tobytes() != b.tobytes():
            problems.append(f"{path}:{name}: differs bit for bit from the regenerated tensor")
    return problems


def check(golden: Path, files: dict[str, bytes]) -> list[str]:
    """Compare the stored corpus with freshly generated ``files``; return the problems."""
    problems = []
    try:
        stored_manifest = json.loads((golden / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return [f"{golden / 'MANIFEST.json'} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{golden / 'MANIFEST.json'} cannot be read as JSON ({exc})"]
    if not isinstance(stored_manifest, dict):
        return [f"{golden / 'MANIFEST.json'} is not a JSON object"]
    for path, fresh in sorted(files.items()):
        target = golden / path
        if path == "MANIFEST.json":
            continue
        if not target.is_file():
            problems.append(f"{path}: missing from {golden}")
            continue
        stored = target.read_bytes()
        if path.endswith(".safetensors"):
            problems += _compare_tensor_file(path, stored, fresh, output_keys=path.endswith("io.safetensors"))
        elif stored != fresh:
            problems.append(f"{path}: differs from the regenerated file")
    stored_hashes = {p: h for c in stored_manifest.get("cases", []) for p, h in c.get("files", {}).items()}
    for path, digest in sorted(stored_hashes.items()):
        if (golden / path).is_file() and sha256_bytes((golden / path).read_bytes()) != digest:
            problems.append(f"{path}: sha256 does not match MANIFEST.json")
    fresh_ids = [c.case_id for c in CASES]
    stored_ids = [c.get("id") for c in stored_manifest.get("cases", [])]
    if fresh_ids != stored_ids:
        problems.append(f"MANIFEST.json lists cases {stored_ids}, the generator makes {fresh_ids}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "golden", help="golden directory (default: golden/)")
    parser.add_argument("--check", action="store_true", help="regenerate in memory and compare with --out")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        _, files = generate(Path(scratch))
    if args.check:
        problems = check(args.out, files)
        for p in problems:
            print(f"golden check: {p}", file=sys.stderr)
        print(f"golden check: {len(CASES)} cases, {len(problems)} problem(s)")
        return 1 if problems else 0
    for path, data in files.items():
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_bytes(data)
    print(f"wrote {len(CASES)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
