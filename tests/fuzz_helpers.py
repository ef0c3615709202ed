"""Helpers of tests/test_input_fuzz.py: tiny valid inputs to break, limits that turn a hang or
a runaway allocation into a test failure, and the assertions every malformed input must meet.

The rule under test: a malformed input ends in a RefimplError (library) / ConformanceError
(suite) whose message is one line naming the problem, or, on the command line, exit status
2 with exactly one stderr line starting ``error: ``; never a traceback, a bare NumPy or
Python exception, a hang or an allocation sized by the input.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import resource
import signal
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
GIB = 1 << 30

#: A tiny Qwen3 (V = 17, M = 8, one layer): the checkpoint the malformed files are put beside.
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 17, "hidden_size": 8,
    "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 4, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
}


class Hang(BaseException):
    """Raised by :func:`time_limit` when the time is up. A BaseException, so that an
    ``except Exception`` in the code under test cannot turn it into an input error."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds`` (wall clock). A blocking
    system call (open() of a FIFO) is interrupted too; a long C loop only when it returns."""

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _address_space_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_limit(extra_bytes: int = GIB):
    """Cap this process's address space at its current size plus ``extra_bytes``, so that
    an allocation sized by a malformed input fails at once (MemoryError) instead of
    swapping the machine; the previous limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space_now() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _origin(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.replace(str(ROOT) + '/', '')}:{last.lineno}"


def refused_or_done(fn, errors: tuple[type[BaseException], ...], seconds: float = 10.0):
    """``fn()``'s result, or the error it raised when it is one of ``errors`` with a
    non-empty one-line message. Anything else fails the test: another exception type
    (named with the file and line it came from), a multi-line message, or a hang."""
    with time_limit(seconds):
        try:
            return fn()
        except errors as exc:
            message = str(exc)
            assert message.strip(), f"{type(exc).__name__} with an empty message"
            assert "\n" not in message, f"{type(exc).__name__} message spans lines: {message!r}"
            return exc
        except Hang:
            pytest.fail(f"hang: no answer within {seconds} s")
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__} escaped from {_origin(exc)} instead of one of "
                        f"{[e.__name__ for e in errors]}: {str(exc)[:300]}")


def invoke(command, *args, env=None):
    """Run a click command in-process; output wide enough that tables do not fold."""
    return CliRunner().invoke(command, [str(a) for a in args], env={"COLUMNS": "300", **(env or {})})


def assert_one_line_error(result, *fragments: str) -> str:
    """A CliRunner result: exit status 2 from sys.exit, stderr exactly one ``error: `` line
    holding every fragment, no traceback. Returns the line."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(f"{type(result.exception).__name__} escaped from {_origin(result.exception)}: "
                    f"{str(result.exception)[:300]}")
    assert result.exit_code == 2, f"exit status {result.exit_code}, stdout {result.stdout[-500:]!r}, " \
                                  f"stderr {result.stderr[-500:]!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error: ' line: {result.stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    return lines[0]


def _limit_address_space(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_process(args: list[str], limit_bytes: int = 4 * GIB, timeout: float = 120.0, cwd=None):
    """``python ARGS`` in a fresh process whose address space is capped at ``limit_bytes``
    (a wrong allocation then fails fast instead of swapping), killed after ``timeout``."""
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or ROOT, preexec_fn=_limit_address_space(limit_bytes))
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: python {' '.join(args)} still running after {timeout} s")


def assert_process_one_line_error(proc, *fragments: str) -> str:
    """A finished process: exit status 2, stderr exactly one ``error: `` line holding the fragments."""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2, f"exit status {proc.returncode}: {proc.stderr[-1000:]}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error: ' line: {proc.stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ---- tiny checkpoints and golden corpora ---------------------------------------------------------------------------

def tiny_weights(config: dict = TINY_QWEN3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of the tiny Qwen3 (norm weights near 1)."""
    from refimpl.models.qwen3 import Qwen3Config, weight_shapes

    rng = np.random.default_rng(seed)
    return {name: ((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in weight_shapes(Qwen3Config.from_dict(config)).items()}


def write_checkpoint(directory: Path, config: dict = TINY_QWEN3) -> Path:
    """config.json and model.safetensors of the tiny Qwen3 in ``directory`` (created)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tiny_weights(config), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_tiny_golden(root: Path, input_ids=None) -> dict:
    """A golden directory with a model case ``m/tiny`` (the tiny Qwen3, expected logits from
    the reference) and an op case ``op/top-1`` (copied from the repository corpus).

    ``input_ids`` (any array, stored as given) replaces the valid ids; the expected logits
    are then those of the ids modulo V, or zeros when the ids are not an integer matrix.
    Returns the manifest, already written.
    """
    import refimpl
    from safetensors.numpy import save_file

    checkpoint = write_checkpoint(root / "m" / "checkpoint")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY_QWEN3["vocab_size"], size=(2, 5)) if input_ids is None else np.asarray(input_ids)
    if ids.ndim == 2 and ids.size and ids.dtype.kind in "iu":
        logits = refimpl.from_pretrained(checkpoint)(ids.astype(np.int64) % TINY_QWEN3["vocab_size"])
    else:
        logits = np.zeros((1, 1, TINY_QWEN3["vocab_size"]))
    save_file({"input_ids": np.ascontiguousarray(ids), "logits": logits}, str(root / "m" / "io.safetensors"))
    (root / "op").mkdir()
    (root / "op" / "io.safetensors").write_bytes((ROOT / "golden/op/softmax_top_k/top-1/io.safetensors").read_bytes())
    model_files = ["m/checkpoint/config.json", "m/checkpoint/model.safetensors", "m/io.safetensors"]
    manifest = {"corpus_version": "fuzz", "generator": "tests/fuzz_helpers.py", "generator_version": 1, "cases": [
        {"id": "m/tiny", "level": "model", "architecture": "Qwen3ForCausalLM", "tolerance_class": "model_logits",
         "checkpoint": "m/checkpoint", "data": "m/io.safetensors",
         "files": {name: sha256(root / name) for name in model_files}},
        {"id": "op/top-1", "level": "op", "op": "softmax_top_k", "tolerance_class": "op_exact",
         "data": "op/io.safetensors", "files": {"op/io.safetensors": sha256(root / "op/io.safetensors")}},
    ]}
    write_manifest(root, manifest)
    return manifest


def write_manifest(root: Path, manifest) -> None:
    (root / "MANIFEST.json").write_text(json.dumps(manifest))


def no_isolate(command) -> list[str]:
    """``["--no-isolate"]`` when ``run`` offers it: the cases then run in this process
    (a worker process costs seconds per invocation)."""
    return ["--no-isolate"] if any(p.name == "isolate" for p in command.params) else []


# ---- safetensors bytes ----------------------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """``<u64 little-endian header length><header><data>``; ``header`` is a dict (dumped as
    JSON), a str or raw bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


# ---- the architectures' tiny configs --------------------------------------------------------------------------------

def tiny_configs() -> dict[str, dict]:
    """One tiny config.json dict per registered architecture: the first model case of
    ``tools/golden_cases`` that names it; Gemma 3n's conditional wrapper around the Gemma 3n
    text case (its vision / audio ids at the top of the tiny vocabulary)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from golden_cases import JSON_NULL, ModelCase, all_cases

    from refimpl.registry import ARCHITECTURES

    found = {}
    for case in all_cases():
        if isinstance(case, ModelCase):
            config = {k: (None if v is JSON_NULL else v) for k, v in case.config.items() if v is not None}
            found.setdefault(config["architectures"][0], copy.deepcopy(config))
    text = found.get("Gemma3nForCausalLM")
    if "Gemma3nForConditionalGeneration" in ARCHITECTURES and text is not None:
        vocab = text["vocab_size"]
        found["Gemma3nForConditionalGeneration"] = {
            "architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
            "text_config": {k: v for k, v in text.items() if k != "architectures"},
            "vision_config": {"vocab_offset": vocab - 28, "vocab_size": 16, "hidden_size": 8},
            "audio_config": {"vocab_offset": vocab - 12, "vocab_size": 12, "hidden_size": 8},
            "tie_word_embeddings": text.get("tie_word_embeddings", True)}
    return {name: found[name] for name in ARCHITECTURES if name in found}


def config_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a config: top-level keys, keys of nested objects, list items."""
    paths = []
    for key, value in config.items():
        paths.append(prefix + (key,))
        if isinstance(value, dict):
            paths += config_paths(value, prefix + (key,))
        elif isinstance(value, list) and key != "architectures":
            paths += [prefix + (key, i) for i in range(len(value))]
    return paths


DELETE = object()


def mutated(config: dict, path: tuple, value) -> dict:
    """A deep copy of ``config`` with the entry at ``path`` replaced by ``value`` (or deleted
    when ``value`` is :data:`DELETE`); a path no longer present (an earlier mutation removed
    or replaced its parent) leaves the copy unchanged."""
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return config
    last = path[-1]
    if isinstance(node, dict) and (value is not DELETE or last in node):
        node.pop(last) if value is DELETE else node.__setitem__(last, value)
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node.pop(last) if value is DELETE else node.__setitem__(last, value)
    return config


def random_weights(arch, config, max_elements: int = 1_000_000) -> dict[str, np.ndarray] | None:
    """Small random float64 weights of the config's shapes (the architecture's own
    ``weight_init`` where it has one), or None when they would exceed ``max_elements``."""
    shapes = arch.weight_shapes(config)
    if sum(math.prod(shape) for shape in shapes.values()) > max_elements:
        return None
    rng = np.random.default_rng(0)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        custom = arch.weight_init(name, shape, rng) if arch.weight_init is not None else None
        if custom is not None:
            weights[name] = np.asarray(custom, dtype=np.float64)
        elif len(shape) == 1:
            weights[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            weights[name] = rng.standard_normal(shape) / np.sqrt(max(shape[-1], 1))
    return weights
