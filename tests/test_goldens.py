"""The golden corpus regenerates from the reference: weights and inputs bit for bit."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ROOT

TOOL = ROOT / "tools" / "make_goldens.py"


def run_check(golden):
    return subprocess.run([sys.executable, str(TOOL), "--check", "--out", str(golden)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """The corpus regenerated in memory once (``make_goldens.generate``), for the tampering tests."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens

    _, files = make_goldens.generate(tmp_path_factory.mktemp("scratch"))
    return make_goldens, files


def check_problems(regenerated, golden) -> str:
    """``make_goldens.check``'s problems with ``golden`` against the regenerated corpus, one per line
    (what ``--check`` prints; the command itself is run on the committed corpus above)."""
    make_goldens, files = regenerated
    return "\n".join(make_goldens.check(golden, files))


def tampered_copy(golden_dir, tmp_path, relative, edit):
    """A copy of the corpus whose safetensors file ``relative`` has had ``edit`` applied."""
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    tensors = load_file(copy / relative)
    edit(tensors)
    save_file(tensors, copy / relative, metadata={"format": "pt"})
    return copy


def flip_low_bit(tensors):
    tensors["model.norm.weight"].view(np.uint32)[0] ^= 1


def test_committed_corpus_regenerates(golden_dir):
    result = run_check(golden_dir)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "relative,edit,message",
    [
        ("qwen3/mha-batch3/checkpoint/model.safetensors", flip_low_bit, "model.norm.weight: differs bit for bit"),
        ("qwen3/single-token/io.safetensors", lambda t: t["logits"].__setitem__((0, 0, 0), t["logits"][0, 0, 0] + 1e-9),
         "single-token/io.safetensors:logits: expected output differs"),
        ("qwen3/mha-batch3/io.safetensors", lambda t: t["logits"].__setitem__((0, 1, 2), np.nan),
         "mha-batch3/io.safetensors:logits: NaN/Inf positions differ"),
        ("qwen3/mha-batch3/io.safetensors", lambda t: t["input_ids"].__setitem__((0, 0), t["input_ids"][0, 0] ^ 1),
         "mha-batch3/io.safetensors:input_ids: differs bit for bit"),
    ],
    ids=["weight-bit", "output-1e-9", "output-nan", "input-id"],
)
def test_check_catches_tampering(regenerated, golden_dir, tmp_path, relative, edit, message):
    assert check_problems(regenerated, golden_dir) == ""
    assert message in check_problems(regenerated, tampered_copy(golden_dir, tmp_path, relative, edit))


def test_check_reports_an_unreadable_manifest(regenerated, golden_dir, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    (copy / "MANIFEST.json").write_text("{not json")
    assert "cannot be read as JSON" in check_problems(regenerated, copy)


def _rewrite_op_file(copy, relative, edit_tensors=None, edit_case=None):
    """Rewrite an op case's data file, keeping (or editing) its ``case`` metadata."""
    import json

    from safetensors import safe_open

    path = copy / relative
    with safe_open(str(path), framework="numpy") as f:
        case = json.loads(f.metadata()["case"])
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_case:
        edit_case(case)
    save_file(tensors, path, metadata={"case": json.dumps(case, sort_keys=True)})


@pytest.mark.parametrize(
    "edit_tensors,edit_case,message",
    [
        (lambda t: t["inputs.q"].view(np.uint64).__setitem__((0, 0, 0, 0), t["inputs.q"].view(np.uint64)[0, 0, 0, 0] ^ 1),
         None, "inputs.q: differs bit for bit"),
        (None, lambda c: c["params"].__setitem__("sliding_window", 6), "op or params differ"),
        (lambda t: t["outputs.output"].__setitem__((0, 0, 0, 0), t["outputs.output"][0, 0, 0, 0] + 1e-6),
         None, "outputs.output: expected output differs"),
    ],
    ids=["op-input-bit", "op-param", "op-output"],
)
def test_check_catches_op_case_tampering(regenerated, golden_dir, tmp_path, edit_tensors, edit_case, message):
    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    _rewrite_op_file(copy, "op/attention/window-random/io.safetensors", edit_tensors, edit_case)
    problems = check_problems(regenerated, copy)
    assert message in problems, problems


def test_check_catches_an_edited_manifest_description(regenerated, golden_dir, tmp_path):
    import json

    copy = tmp_path / "golden"
    shutil.copytree(golden_dir, copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["cases"][0]["description"] = "something else"
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    assert f"case {manifest['cases'][0]['id']}: description differ" in check_problems(regenerated, copy)


# -- the routing guard: the reference's own low-precision runs route like its float64 run

@pytest.fixture()
def make_goldens(monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens

    monkeypatch.setattr(make_goldens, "ROUTING_FLIPS", {})
    monkeypatch.setattr(make_goldens, "REFERENCE_ERRORS", {})
    return make_goldens


def test_routing_flips_counts_tokens_routed_elsewhere(make_goldens):
    a = [np.array([[0, 2], [1, 3], [0, 1]]), np.array([[4]])]
    assert make_goldens.routing_flips(a, [x.copy() for x in a]) == 0
    b = [np.array([[0, 2], [1, 2], [0, 1]]), np.array([[5]])]
    assert make_goldens.routing_flips(a, b) == 2
    # A different call sequence (another layer routed, a step skipped) counts every token.
    assert make_goldens.routing_flips(a, a[:1]) == 4


def test_routing_choices_records_every_router(make_goldens):
    from refimpl import routers

    logits = np.array([[0.3, 0.1, 0.9, -0.2], [0.0, 0.5, 0.2, 0.4]])
    with make_goldens.routing_choices() as calls:
        routers.softmax_top_k(logits, 2, norm_topk_prob=True)
        routers.llama4_top_k_sigmoid(logits, 1)
    assert [c.tolist() for c in calls] == [[[0, 2], [1, 3]], [[2], [1]]]
    assert routers.top_k_indices.__name__ == "top_k_indices"  # restored


def test_generation_stops_on_a_seed_whose_low_precision_routing_flips(make_goldens, monkeypatch, tmp_path, capsys):
    import dataclasses

    # Corpus 0.11.0's seed of this scenario: the reference's bfloat16 run routes one token elsewhere.
    case_id = "scenario/glm4_moe/speculative"
    cases = [dataclasses.replace(c, seed=1654) if c.case_id == case_id else c for c in make_goldens.CASES]
    monkeypatch.setattr(make_goldens, "CASES", cases)
    assert make_goldens.main(["--only", case_id, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{case_id}: 1 token(s) in bfloat16" in err and "another seed" in err
    assert not (tmp_path / "MANIFEST.json").exists()
    # The committed seed passes the guard.
    monkeypatch.setattr(make_goldens, "CASES", [c for c in cases if c.case_id != case_id]
                        + [c for c in make_goldens.all_cases() if c.case_id == case_id])
    make_goldens.ROUTING_FLIPS.clear()
    assert make_goldens.main(["--only", case_id, "--out", str(tmp_path)]) == 0
