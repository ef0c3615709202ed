"""CPU speed of the reference against transformers: prefill and token-by-token decoding at real shapes.

Builds random-weight checkpoints with real configs and times, for each, a prefill of
``--prompt-tokens`` tokens (512) and ``--decode-steps`` single-token decode steps (32) in
three engines, each in a fresh Python process:

=============  ===========================================================================
engine         what runs
=============  ===========================================================================
ours-f32       ``refimpl.from_pretrained(dir, np.float32)``; ``model.prefill`` then ``model.decode``
ours-f64       the same in float64 (the specification's dtype)
torch-f32      ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)`` with its
               default attention and experts implementations; ``model(ids, use_cache=True)``
               then ``model(next_id, cache=cache, use_cache=True)`` (the cache its first call made), under
               ``torch.inference_mode()``
=============  ===========================================================================

Models (``--models`` picks some):

* ``qwen3-0.6b``: Qwen3-0.6B as released (``refimpl.models.qwen3.PRESETS["Qwen3-0.6B"]``), 28 layers.
* ``qwen3-30b-a3b-2l``: Qwen3-30B-A3B (128 experts of width 768, top-8, vocabulary 151936) cut to
  2 layers.
* ``qwen3-next-block``: Qwen3-Next-80B-A3B cut to one block of its layer pattern, 3 Gated DeltaNet
  layers and 1 gated full-attention layer, with 64 of its 512 experts (top-10 kept): at 512
  experts one layer alone holds 1.6 G parameters, and four would not fit this machine in float64.

Weights: every tensor drawn once (seeded, in sorted-name order) as float32, stored as bfloat16, one
safetensors shard per layer: the embedding N(0, 1), matrices N(0, 1/fan_in), 1-D tensors
1 + 0.2 N, and the architecture's ``weight_init`` where it has one (the golden generator's rules).
Both engines read the same bfloat16 values, widened exactly. The prompt and the decoded tokens are
fixed (drawn from ``--seed``), the same for every engine: decode step i feeds token i of that list
whatever the logits say, so each engine does the work of greedy decoding on identical inputs.

Each measurement: load, warm up once (a prefill of 16 tokens and 2 decode steps), then time the
prefill and the decode loop with ``time.perf_counter``. Peak memory is the child's
``ru_maxrss`` (everything the process ever held: loading included, and the checkpoint pages it
touched through the memory map). Torch and BLAS threads: ``--threads`` (default: the cores this
process may run on), set through ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` /
``MKL_NUM_THREADS`` and ``torch.set_num_threads``. The last decode step's logits of each engine
are compared with PyTorch's (relative RMS), to show that every engine ran the same model.

    python bench/decode_speed.py                          # all three models: 10-30 min, children up to 15 GiB
    python bench/decode_speed.py --models qwen3-0.6b      # the dense model only
    python bench/decode_speed.py --dir /tmp/bench_ckpt    # keep checkpoints there and reuse them
    python bench/decode_speed.py --quick                  # tiny shapes, ~30 s: a smoke test
    python bench/decode_speed.py --engines ours-f32,torch-f32 --json out.json

Prints a description of the machine and a Markdown table (bench/RESULTS.md holds one).
Timings are meaningful only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("ours-f32", "ours-f64", "torch-f32")
#: The model the issue's speed targets are stated on.
DENSE = "qwen3-0.6b"
WARMUP_PROMPT, WARMUP_STEPS = 16, 2
#: Marker of the child's one result line on stdout.
RESULT = "RESULT "


def _model_configs() -> dict[str, dict]:
    """The benchmarked configs (config.json contents), from the registry's presets."""
    from refimpl.models import qwen3, qwen3_moe, qwen3_next

    return {
        "qwen3-0.6b": {**qwen3.PRESETS["Qwen3-0.6B"], "model_type": "qwen3"},
        "qwen3-30b-a3b-2l": {**qwen3_moe.PRESETS["Qwen3-30B-A3B"], "num_hidden_layers": 2},
        "qwen3-next-block": {**qwen3_next.PRESETS["Qwen3-Next-80B-A3B"], "num_hidden_layers": 4, "num_experts": 64},
    }


#: --quick: the same architectures at tiny widths (the layer patterns kept).
QUICK_SIZES = {
    "qwen3-0.6b": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "qwen3-30b-a3b-2l": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
                         "num_experts_per_tok": 2},
    "qwen3-next-block": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 16, "linear_key_head_dim": 16,
                         "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                         "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 32},
}


def _draw(arch, name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """One tensor as bfloat16, by the golden generator's rules (``tools/make_goldens.py random_weights``)."""
    import ml_dtypes

    custom = arch.weight_init(name, shape, rng) if arch.weight_init is not None else None
    if custom is not None:
        values = np.asarray(custom, dtype=np.float32)
    elif name.endswith(".bias"):
        values = np.float32(0.2) * rng.standard_normal(shape, dtype=np.float32)
    elif len(shape) == 1:
        values = 1 + np.float32(0.2) * rng.standard_normal(shape, dtype=np.float32)
    else:
        values = rng.standard_normal(shape, dtype=np.float32)
        if "embed_tokens" not in name:
            values *= np.float32(shape[-1] ** -0.5)
    return values.astype(ml_dtypes.bfloat16)


def build_checkpoint(directory: Path, config: dict, seed: int) -> None:
    """Write ``config.json`` and one bfloat16 shard per decoder layer (plus one for the rest).

    Skipped when ``directory`` already holds a complete checkpoint of the same config and seed
    (``bench.json`` is written last). Only one shard's tensors are in memory at a time.
    """
    from safetensors.numpy import save_file

    import refimpl

    stamp = {"config": config, "seed": seed}
    marker = directory / "bench.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return
    arch = refimpl.registry.get_architecture(config)
    shapes = arch.weight_shapes(arch.config_class.from_dict(config))
    groups: dict[str, list[str]] = {}
    for name in sorted(shapes):
        group = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(group, []).append(name)
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for stale in directory.glob("*.safetensors"):
        stale.unlink()
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for index, (group, names) in enumerate(groups.items()):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _draw(arch, name, shapes[name], rng) for name in names}
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file_name for name in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    marker.write_text(json.dumps(stamp))


def _tokens(vocab_size: int, count: int, seed: int) -> np.ndarray:
    """The fixed token stream: ``count`` ids, the prompt first, then one per decode step."""
    return np.random.default_rng(seed + 1).integers(0, vocab_size, size=(1, count), dtype=np.int64)


class _Reference:
    """The reference behind a prefill / decode interface (``prefill(ids)``, ``decode(ids)``)."""

    def __init__(self, directory: Path, dtype):
        import refimpl

        self.model = refimpl.from_pretrained(directory, dtype)
        self.incremental = self.model.architecture.forward_step is not None
        self.cache = None
        self.implementation = None
        self.library = {"numpy": np.__version__,
                        "numpy BLAS": np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", "?")}

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        if not self.incremental:
            return self.model.forward(ids).logits
        logits, self.cache = self.model.prefill(ids)
        return logits

    def decode(self, ids: np.ndarray) -> np.ndarray:
        logits, self.cache = self.model.decode(ids, self.cache)
        return logits


class _Transformers:
    """transformers' model on PyTorch CPU behind the same interface, with its own cache object."""

    def __init__(self, directory: Path, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.incremental = True
        self.cache = None
        config = self.model.config
        self.library = {"torch": torch.__version__, "transformers": transformers.__version__}
        self.implementation = f"attention {getattr(config, '_attn_implementation', '?')}"
        if getattr(config, "num_experts", None):
            self.implementation += f", experts {getattr(config, '_experts_implementation', '?')}"

    def _run(self, ids: np.ndarray, cache) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(ids), cache=cache, use_cache=True)
        self.cache = out.cache
        return out.logits.numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids, None)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids, self.cache)


def measure(directory: Path, engine: str, prompt_tokens: int, decode_steps: int, seed: int, threads: int,
            logits_path: Path) -> dict:
    """One engine on one checkpoint, in this process: load, warm up, time; the result as a dict."""
    config = json.loads((directory / "config.json").read_text())
    start = time.perf_counter()
    runner = _Transformers(directory, threads) if engine == "torch-f32" else \
        _Reference(directory, np.float32 if engine == "ours-f32" else np.float64)
    load_s = time.perf_counter() - start
    tokens = _tokens(config["vocab_size"], prompt_tokens + decode_steps, seed)
    prompt, steps = tokens[:, :prompt_tokens], tokens[:, prompt_tokens:]
    runner.prefill(prompt[:, :WARMUP_PROMPT])
    for i in range(WARMUP_STEPS if runner.incremental else 0):
        runner.decode(steps[:, i:i + 1])
    start = time.perf_counter()
    logits = runner.prefill(prompt)
    prefill_s = time.perf_counter() - start
    decode_s = None
    if runner.incremental:
        start = time.perf_counter()
        for i in range(decode_steps):
            logits = runner.decode(steps[:, i:i + 1])
        decode_s = time.perf_counter() - start
    np.save(logits_path, np.asarray(logits[0, -1], dtype=np.float64))
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "incremental": runner.incremental,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "library": runner.library,
            "implementation": runner.implementation}


def _child_main(spec: dict) -> None:
    """``--child``: run :func:`measure` and print its result (or the error) as one JSON line."""
    try:
        result = measure(Path(spec["directory"]), spec["engine"], spec["prompt_tokens"], spec["decode_steps"],
                         spec["seed"], spec["threads"], Path(spec["logits"]))
    except Exception as exc:  # reported as the row's error, the other rows still run
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(RESULT + json.dumps(result), flush=True)


def run_child(spec: dict, threads: int, timeout: float) -> dict:
    """:func:`measure` in a fresh interpreter with the BLAS thread counts set before NumPy loads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited with {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1][len(RESULT):])


def machine_description(threads: int) -> list[str]:
    """Lines describing the CPU, memory and software (libraries as the children reported them)."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"CPU: {cpu}, {cores} cores usable, {threads} threads per engine",
            f"Memory: {memory:.1f} GiB; {platform.system()} {platform.release()}; Python {platform.python_version()}"]


def _ratio(numerator, denominator) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


COLUMNS = ("model", "engine", "prefill tok/s", "decode tok/s", "decode ms/token", "prefill ours/PyTorch",
           "decode ours/PyTorch", "prefill f64/f32 time", "decode f64/f32 time", "peak RSS GiB",
           "logits rel RMS vs PyTorch")


def table_rows(model: str, results: dict[str, dict], prompt_tokens: int, decode_steps: int,
               agreement: dict[str, float | None]) -> list[list[str]]:
    """One row per engine: throughputs, the ratios ours/PyTorch (throughput) and f64/f32 (time)."""
    def rate(result, key, count):
        return None if result.get(key) is None else count / result[key]

    torch_result = results.get("torch-f32", {})
    f32 = results.get("ours-f32", {})
    rows = []
    for engine, result in results.items():
        if "error" in result:
            rows.append([model, engine, f"error: {result['error']}"] + ["-"] * (len(COLUMNS) - 3))
            continue
        prefill, decode = rate(result, "prefill_s", prompt_tokens), rate(result, "decode_s", decode_steps)
        ours = engine != "torch-f32"
        f64 = engine == "ours-f64"
        rows.append([
            model, engine, f"{prefill:.1f}",
            "n/a (no incremental decoding)" if decode is None else f"{decode:.2f}",
            "-" if decode is None else f"{1000 / decode:.1f}",
            _ratio(prefill, rate(torch_result, "prefill_s", prompt_tokens)) if ours else "-",
            _ratio(decode, rate(torch_result, "decode_s", decode_steps)) if ours else "-",
            _ratio(result.get("prefill_s"), f32.get("prefill_s")) if f64 else "-",
            _ratio(result.get("decode_s"), f32.get("decode_s")) if f64 else "-",
            f"{result['peak_rss_bytes'] / 2**30:.2f}",
            "-" if agreement.get(engine) is None else f"{agreement[engine]:.1e}",
        ])
    return rows


def target_lines(model: str, results: dict[str, dict]) -> list[str]:
    """The issue's targets on ``model``: ours-f32 at >= 0.8 x PyTorch's throughput, ours-f64 at most 3 x
    the time of ours-f32 (prefill and decode each); a line per target whose rows were measured."""
    def ratios(a: dict, b: dict, invert: bool) -> list[float] | None:
        keys = [k for k in ("prefill_s", "decode_s") if a.get(k) is not None and b.get(k) is not None]
        if not keys or "error" in a or "error" in b:
            return None
        return [(b[k] / a[k]) if invert else (a[k] / b[k]) for k in keys]

    lines = []
    for label, a, b, invert, ok in (
            ("ours-f32 / PyTorch throughput >= 0.8", "ours-f32", "torch-f32", True, lambda r: r >= 0.8),
            ("ours-f64 / ours-f32 time <= 3", "ours-f64", "ours-f32", False, lambda r: r <= 3)):
        measured = ratios(results.get(a, {}), results.get(b, {}), invert)
        if measured is not None:
            verdict = "met" if all(ok(r) for r in measured) else "NOT met"
            lines.append(f"Target on {model}, {label}: prefill / decode "
                         + " / ".join(f"{r:.2f}" for r in measured) + f" ({verdict})")
    return lines


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated subset of: qwen3-0.6b, "
                        "qwen3-30b-a3b-2l, qwen3-next-block (default: all)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 24-token prompt, 4 decode steps")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 512; quick 24)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps (default 32; quick 4)")
    parser.add_argument("--threads", type=int, default=None, help="threads per engine (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoints here (reused when present)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _selection(text: str | None, known, what: str) -> list[str]:
    chosen = list(known) if text is None else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return chosen


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.child is not None:
        _child_main(json.loads(args.child))
        return 0
    configs = _model_configs()
    models = _selection(args.models, configs, "model(s)")
    engines = _selection(args.engines, ENGINES, "engine(s)")
    prompt_tokens = args.prompt_tokens or (24 if args.quick else 512)
    decode_steps = args.decode_steps or (4 if args.quick else 32)
    if prompt_tokens < WARMUP_PROMPT or decode_steps < WARMUP_STEPS:
        raise SystemExit(f"--prompt-tokens must be >= {WARMUP_PROMPT} and --decode-steps >= {WARMUP_STEPS}")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    root = args.dir or work
    raw, rows, libraries, targets, implementations = {}, [], {}, [], []
    try:
        for model in models:
            config = {**configs[model], **(QUICK_SIZES[model] if args.quick else {})}
            directory = root / (model + ("-quick" if args.quick else ""))
            start = time.perf_counter()
            build_checkpoint(directory, config, args.seed)
            print(f"{model}: checkpoint ready in {time.perf_counter() - start:.0f} s ({directory})", file=sys.stderr)
            results, logits = {}, {}
            for engine in engines:
                spec = {"directory": str(directory), "engine": engine, "prompt_tokens": prompt_tokens,
                        "decode_steps": decode_steps, "seed": args.seed, "threads": threads,
                        "logits": str(work / f"{model}-{engine}.npy")}
                results[engine] = run_child(spec, threads, args.timeout)
                libraries.update(results[engine].get("library", {}))
                if results[engine].get("implementation"):
                    implementations.append(f"{model} {results[engine]['implementation']}")
                if "error" not in results[engine]:
                    logits[engine] = np.load(spec["logits"])
                print(f"{model} {engine}: {json.dumps(results[engine])}", file=sys.stderr)
            agreement = {e: _rel_rms(v, logits["torch-f32"]) for e, v in logits.items()
                         if "torch-f32" in logits and e != "torch-f32"}
            raw[model] = {"config": config, "results": results, "agreement": agreement}
            rows += table_rows(model, results, prompt_tokens, decode_steps, agreement)
            if model == DENSE:
                targets += target_lines(model, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(machine_description(threads)))
    print("Software: " + ", ".join(f"{k} {v}" for k, v in libraries.items()))
    if implementations:
        print("transformers implementations: " + "; ".join(implementations))
    print(f"Prefill of {prompt_tokens} tokens, then {decode_steps} decode steps of 1 token; batch 1"
          + (" (--quick: tiny shapes)" if args.quick else ""))
    print()
    print(markdown_table(rows))
    if targets:
        print()
        print("\n".join(targets))
    if args.json is not None:
        args.json.write_text(json.dumps({"prompt_tokens": prompt_tokens, "decode_steps": decode_steps,
                                         "threads": threads, "models": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
