"""Smoke test of bench/decode_speed.py: the --quick run completes and prints every row.

Checks the shape of the output only (every model and engine present, numbers where numbers
belong, the engines agreeing on the logits); never a timing. The numbers themselves live in
bench/RESULTS.md.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: The benchmark is a tool, not a subject of the default suite: run these with -m slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "decode_speed.py"
MODELS = ("qwen3-0.6b", "qwen3-30b-a3b-2l", "qwen3-next-block")
ENGINES = ("ours-f32", "ours-f64", "torch-f32")
HEADER = ["model", "engine", "prefill tok/s", "decode tok/s", "decode ms/token", "prefill ours/PyTorch",
          "decode ours/PyTorch", "prefill f64/f32 time", "decode f64/f32 time", "peak RSS GiB",
          "logits rel RMS vs PyTorch"]


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def table(stdout: str) -> list[dict[str, str]]:
    """The Markdown table's rows as {column: cell}, after checking its header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == HEADER, stdout
    assert set("".join(cells[1])) <= set("-"), stdout
    return [dict(zip(HEADER, row, strict=True)) for row in cells[2:]]


def positive(cell: str) -> float:
    value = float(cell)
    assert value > 0, cell
    return value


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = run_bench("--quick", "--prompt-tokens", "16", "--decode-steps", "2", "--dir", str(out / "ckpt"),
                     "--json", str(out / "raw.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    return done, out / "raw.json"


def test_quick_run_prints_every_model_and_engine(quick):
    done, _ = quick
    rows = table(done.stdout)
    assert [(r["model"], r["engine"]) for r in rows] == [(m, e) for m in MODELS for e in ENGINES]
    for row in rows:
        ours, f64 = row["engine"] != "torch-f32", row["engine"] == "ours-f64"
        positive(row["prefill tok/s"])
        rate = positive(row["decode tok/s"])
        # Printed to 0.1 ms.
        assert float(row["decode ms/token"]) == pytest.approx(1000 / rate, rel=0.01, abs=0.051)
        positive(row["peak RSS GiB"])
        for column in ("prefill ours/PyTorch", "decode ours/PyTorch", "logits rel RMS vs PyTorch"):
            assert (row[column] != "-") == ours, row
        for column in ("prefill f64/f32 time", "decode f64/f32 time"):
            assert (row[column] != "-") == f64, row
        if ours:
            positive(row["prefill ours/PyTorch"])
            positive(row["decode ours/PyTorch"])
            # Every engine ran the same weights and tokens: the last decode step's logits agree.
            assert float(row["logits rel RMS vs PyTorch"]) < 1e-4, row


def test_quick_run_describes_machine_and_targets(quick):
    done, raw_path = quick
    out = done.stdout
    for prefix in ("CPU: ", "Memory: ", "Software: ", "Prefill of 16 tokens, then 2 decode steps"):
        assert any(line.startswith(prefix) for line in out.splitlines()), (prefix, out)
    targets = [line for line in out.splitlines() if line.startswith("Target on qwen3-0.6b")]
    assert len(targets) == 2 and all(line.endswith(("(met)", "(NOT met)")) for line in targets), out
    raw = json.loads(raw_path.read_text())
    assert (raw["prompt_tokens"], raw["decode_steps"]) == (16, 2)
    assert sorted(raw["models"]) == sorted(MODELS)
    for model in MODELS:
        results = raw["models"][model]["results"]
        assert sorted(results) == sorted(ENGINES)
        assert all("error" not in r and r["incremental"] for r in results.values()), results


def test_filters_select_rows_and_unknown_names_are_refused(tmp_path):
    done = run_bench("--quick", "--prompt-tokens", "16", "--decode-steps", "2", "--models", "qwen3-0.6b",
                     "--engines", "ours-f32", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = table(done.stdout)
    assert [(r["model"], r["engine"]) for r in rows] == [("qwen3-0.6b", "ours-f32")]
    # Without a PyTorch row there is nothing to compare with.
    assert rows[0]["decode ours/PyTorch"] == "-" and rows[0]["logits rel RMS vs PyTorch"] == "-"
    refused = run_bench("--quick", "--models", "qwen3-8b", timeout=60)
    assert refused.returncode != 0 and "unknown model(s) ['qwen3-8b']" in refused.stderr
