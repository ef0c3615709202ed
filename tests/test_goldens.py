"""The golden corpus regenerates from the reference: weights and inputs bit for bit."""

import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

from conftest import ROOT

TOOL = ROOT / "tools" / "make_goldens.py"


def run_check(golden):
    return subprocess.run([sys.executable, str(TOOL), "--check", "--out", str(golden)],
                          capture_output=True, text=True, timeout=300)


def test_committed_corpus_regenerates(golden_dir):
    result = run_check(golden_dir)
    assert result.returncode == 0, result.stderr


def test_check_catches_a_flipped_weight_bit(golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    path = copy / "qwen3/mha-batch3/checkpoint/model.safetensors"
    w = load_file(path)
    bits = w["model.norm.weight"].view(np.uint32)
    bits[0] ^= 1
    save_file(w, path, metadata={"format": "pt"})
    result = run_check(copy)
    assert result.returncode == 1
    assert "model.norm.weight: differs bit for bit" in result.stderr


def test_check_catches_a_changed_expected_output(golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    path = copy / "qwen3/single-token/io.safetensors"
    io = load_file(path)
    io["logits"][0, 0, 0] += 1e-9
    save_file(io, path)
    result = run_check(copy)
    assert result.returncode == 1
    assert "single-token/io.safetensors:logits: expected output differs" in result.stderr


def test_check_catches_nan_in_an_expected_output(golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    path = copy / "qwen3/mha-batch3/io.safetensors"
    io = load_file(path)
    io["logits"][0, 1, 2] = np.nan
    save_file(io, path)
    result = run_check(copy)
    assert result.returncode == 1
    assert "mha-batch3/io.safetensors:logits: NaN/Inf positions differ" in result.stderr


def test_check_reports_an_unreadable_manifest(golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    (copy / "MANIFEST.json").write_text("{not json")
    result = run_check(copy)
    assert result.returncode == 1
    assert "cannot be read as JSON" in result.stderr and "Traceback" not in result.stderr
