"""Scenario cases (prefill / decode / rollback schedules): the golden format, the runner, the
refimpl backend's incremental capability, wrong backends failing at the right step, the CLI
and the file contract.

The scenario corpus is generated once into a temporary directory from ``tools/golden_cases``
(``make_goldens.generate``), plus two test-only cases with their own checkpoint, so that these
tests do not depend on the committed corpus (``tests/test_goldens.py`` checks that one
regenerates).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import refimpl
from conformance.backends.refimpl_backend import RefimplBackend, RefimplModel
from conformance.cli import cli
from conformance.errors import HashMismatchError, ManifestError
from conformance.manifest import check_schedule, load_manifest, load_scenario_data
from conformance.runner import Status, run_case, run_suite

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_goldens  # noqa: E402
from golden_cases import scenarios  # noqa: E402
from golden_cases.common import ScenarioCase, decode, prefill, rollback  # noqa: E402
from golden_cases.qwen3 import _qwen3  # noqa: E402

SPECULATIVE = "scenario/qwen3/speculative"
PADDED = "scenario/qwen3/left-padded-batch"
CHUNKED = "scenario/qwen3/chunked-prefill"
OWN = "scenario/test/own-checkpoint-rollback-after-prefill"


def _echo_tokens(rng, index, shape, vocab_size, history):
    """After the first step, every row's next tokens repeat its last real token (the hook sees the history)."""
    if index == 0:
        return rng.integers(0, vocab_size, shape)
    return np.stack([np.full(shape[1], h[-1]) for h in history])


#: Test-only cases: an own checkpoint (a tiny sliding-window Qwen3), a rollback right after a
#: padded prefill, and a make_tokens hook.
EXTRA = [
    ScenarioCase(
        OWN, "own checkpoint; rollback of 2 prompt tokens; tokens from a hook", seed=1699,
        schedule=(prefill(7), rollback(2), decode(3), decode(1)), batch=2, left_padding=(0, 3),
        config=_qwen3(num_hidden_layers=2, use_sliding_window=True, sliding_window=3, max_window_layers=0),
        make_tokens=_echo_tokens,
    ),
]


def write_corpus(cases, root: Path) -> Path:
    with __import__("tempfile").TemporaryDirectory() as scratch:
        _, files = make_goldens.generate(Path(scratch), cases)
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Every scenario case of the generator plus :data:`EXTRA`, as a golden directory."""
    return write_corpus(scenarios.CASES + EXTRA, tmp_path_factory.mktemp("scenario_golden"))


@pytest.fixture(scope="session")
def cases(corpus):
    return {case.id: case for case in load_manifest(corpus)}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "300"})


# The golden format


def test_manifest_entry_points_at_the_reused_checkpoint(corpus, cases):
    case = cases[SPECULATIVE]
    assert case.level == "scenario" and case.architecture == "Qwen3ForCausalLM"
    assert case.checkpoint == "qwen3/sliding-window/checkpoint" and case.checkpoint_of == "qwen3/sliding-window"
    assert "qwen3/sliding-window/checkpoint/model.safetensors" in case.files
    assert [(s.op, s.num_tokens) for s in case.schedule][:5] == [
        ("prefill", 6), ("decode", 1), ("decode", 6), ("decode", 4), ("rollback", 2)]
    own = cases[OWN]
    assert own.checkpoint == f"{OWN}/checkpoint" and own.checkpoint_of is None


def test_reused_checkpoint_is_the_model_cases_byte_for_byte(corpus, golden_dir):
    ours = (corpus / "qwen3/sliding-window/checkpoint/model.safetensors").read_bytes()
    assert ours == (golden_dir / "qwen3/sliding-window/checkpoint/model.safetensors").read_bytes()


def test_data_file_has_a_step_per_call_and_nan_on_pad_slots(corpus, cases):
    tensors = load_file(corpus / cases[PADDED].data)
    assert set(tensors) == {f"steps.{i}.{k}" for i in range(6) for k in ("input_ids", "logits")} | {
        "steps.0.attention_mask"}
    mask = tensors["steps.0.attention_mask"]
    assert mask.dtype == np.int64 and mask.tolist() == [[1] * 8, [0, 0] + [1] * 6, [0] * 5 + [1] * 3]
    logits = tensors["steps.0.logits"]
    assert np.isnan(logits[mask == 0]).all() and np.isfinite(logits[mask == 1]).all()
    assert "steps.0.attention_mask" not in load_file(corpus / cases[CHUNKED].data)


def test_expected_logits_are_one_full_forward_of_each_row_alone(corpus, cases):
    """Replays the schedule's token bookkeeping independently of the generator and checks the
    last step of every row against a fresh forward of that row alone."""
    case = cases[SPECULATIVE]
    steps = load_scenario_data(corpus, case)
    model = refimpl.from_pretrained(corpus / case.checkpoint, dtype=np.float64)
    rows = [[], []]
    for step in steps:
        if step.op == "rollback":
            rows = [row[:-step.num_tokens] for row in rows]
            continue
        for b in range(2):
            rows[b] += step.input_ids[b].tolist()
            want = model(np.array([rows[b]]))[0, -step.num_tokens:]
            np.testing.assert_allclose(step.logits[b], want, rtol=0, atol=1e-12)


def test_padded_rows_alone_exclude_their_pad_tokens(corpus, cases):
    steps = load_scenario_data(corpus, cases[PADDED])
    model = refimpl.from_pretrained(corpus / cases[PADDED].checkpoint, dtype=np.float64)
    real = steps[0].input_ids[2, 5:]
    np.testing.assert_allclose(steps[0].logits[2, 5:], model(real[None])[0], rtol=0, atol=1e-12)


def test_make_tokens_hook_and_rollback_after_prefill(corpus, cases):
    steps = load_scenario_data(corpus, cases[OWN])
    assert [s.label for s in steps] == ["prefill of 7 tokens", "rollback 2 after 7 tokens",
                                        "decode 3 after 5 tokens", "decode 1 after 8 tokens"]
    prompt = steps[0].input_ids
    # Rows keep 5 and 2 real tokens after the rollback; the hook repeats each row's last one.
    assert (steps[2].input_ids == prompt[:, 4:5]).all()


def test_generation_is_deterministic(tmp_path):
    chosen = [c for c in scenarios.CASES if c.case_id == SPECULATIVE] + EXTRA
    first = write_corpus(chosen, tmp_path / "a")
    second = write_corpus(chosen, tmp_path / "b")
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path


def test_check_compares_step_inputs_bitwise_and_logits_by_tolerance(corpus, cases):
    stored = (corpus / cases[SPECULATIVE].data).read_bytes()
    tensors = load_file(corpus / cases[SPECULATIVE].data)
    tensors["steps.3.input_ids"][0, 0] ^= 1
    tensors["steps.5.logits"][1, 0, 0] += 1e-9
    tampered = __import__("safetensors.numpy", fromlist=["save"]).save(tensors)
    problems = make_goldens._compare_tensor_file("steps.safetensors", stored, tampered, output_keys=True)
    assert any("steps.3.input_ids: differs bit for bit" in p for p in problems)
    assert any("steps.5.logits: expected output differs" in p for p in problems)
    assert len(problems) == 2


def test_a_tampered_step_file_is_refused_before_any_case_runs(corpus, cases, tmp_path):
    golden = tmp_path / "golden"
    shutil.copytree(corpus, golden)
    data = golden / cases[CHUNKED].data
    tensors = load_file(data)
    tensors["steps.2.logits"][0, 0, 0] += 1.0
    save_file(tensors, data)
    with pytest.raises(HashMismatchError, match="steps.safetensors"):
        run_suite(RefimplBackend(), [cases[CHUNKED]], golden, "float64", progress=False)


@pytest.mark.parametrize("schedule,message", [
    ([{"op": "decode", "num_tokens": 1}], "starts with one prefill"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "prefill", "num_tokens": 1}], "starts with one prefill"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "decode", "num_tokens": 0}], "integer >= 1"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "decode", "num_tokens": 2}, {"op": "rollback", "num_tokens": 3}],
     "step before is decode 2"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "rollback", "num_tokens": 3}], "step before is prefill 3"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "decode", "num_tokens": 2}, {"op": "rollback", "num_tokens": 1},
      {"op": "rollback", "num_tokens": 1}], "step before is rollback"),
    ([{"op": "prefill", "num_tokens": 3}, {"op": "verify", "num_tokens": 2}], "op must be one of"),
    ([{"op": "prefill", "n": 3}], "keys 'op' and 'num_tokens'"),
    ([], "non-empty list"),
])
def test_malformed_schedules_are_refused(schedule, message):
    with pytest.raises(ManifestError, match=message):
        check_schedule(schedule, "case x")


def test_a_step_file_missing_a_step_is_a_manifest_error(corpus, cases, tmp_path):
    golden = tmp_path / "golden"
    shutil.copytree(corpus, golden)
    data = golden / cases[CHUNKED].data
    tensors = load_file(data)
    del tensors["steps.3.logits"]
    save_file(tensors, data)
    with pytest.raises(ManifestError, match="lacks tensor 'steps.3.logits'"):
        load_scenario_data(golden, cases[CHUNKED])


def _tampered_copy(corpus, case, tmp_path, change) -> Path:
    """A copy of the corpus whose ``case`` data file went through ``change(tensors)``."""
    golden = tmp_path / "golden"
    shutil.copytree(corpus, golden)
    tensors = load_file(golden / case.data)
    change(tensors)
    save_file(tensors, golden / case.data)
    return golden


def _set(name, at, value):
    def change(tensors):
        tensors[name][at] = value
    return change


@pytest.mark.parametrize("case_id, change, message", [
    # A mask value other than 0/1 is named, with where it is.
    (PADDED, _set("steps.0.attention_mask", (1, 3), 2),
     r"'steps.0.attention_mask' must hold only 0 \(pad\) and 1 \(token\); it holds 2 \(1 value\(s\), the first at "
     r"\(1, 3\)\)"),
    # An out-of-vocabulary id names its step's tensor.
    (SPECULATIVE, _set("steps.3.input_ids", (1, 2), 128),
     r"steps.3.input_ids holds token id 128 at \(1, 2\), outside \[0, 128\)"),
    # NaN or Inf in the expected logits at a real position is the corpus's fault, not the backend's.
    (CHUNKED, _set("steps.2.logits", (0, 1, 5), np.nan), r"'steps.2.logits' holds 1 NaN/Inf value\(s\) at real"),
    (PADDED, _set("steps.0.logits", (2, 5, 0), np.inf), r"'steps.0.logits' holds 1 NaN/Inf value\(s\) at real"),
], ids=["mask-holds-2", "out-of-vocab-id", "nan-expected", "inf-expected-first-real-slot"])
def test_corrupt_step_data_is_a_manifest_error_naming_the_problem(corpus, cases, tmp_path, case_id, change, message):
    golden = _tampered_copy(corpus, cases[case_id], tmp_path, change)
    with pytest.raises(ManifestError, match=message):
        load_scenario_data(golden, cases[case_id])


def test_nan_on_pad_slots_is_expected_not_a_corpus_error(corpus, cases):
    steps = load_scenario_data(corpus, cases[PADDED])
    assert np.isnan(steps[0].logits[2, :5]).all()


def test_the_manifest_batch_is_checked_against_the_data(corpus, cases, tmp_path):
    golden = tmp_path / "golden"
    shutil.copytree(corpus, golden)
    manifest = json.loads((golden / "MANIFEST.json").read_text())
    entry = next(e for e in manifest["cases"] if e["id"] == SPECULATIVE)
    assert entry["batch"] == 2 and cases[SPECULATIVE].batch == 2
    entry["batch"] = 3
    (golden / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"'steps.0.input_ids' has 2 row\(s\), the manifest entry's 'batch' is 3"):
        load_scenario_data(golden, {c.id: c for c in load_manifest(golden)}[SPECULATIVE])
    entry["batch"] = "2"
    (golden / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="field 'batch' must be an integer >= 1"):
        load_manifest(golden)


# The runner with the refimpl backend and with wrong backends


def scenario_ids():
    return [c.case_id for c in scenarios.CASES] + [c.case_id for c in EXTRA]


@pytest.mark.parametrize("case_id", scenario_ids())
def test_refimpl_passes_every_scenario_at_float64(corpus, cases, case_id):
    result = run_case(RefimplBackend(), cases[case_id], corpus, "float64")
    if result.status is Status.NOT_IMPLEMENTED:
        assert "no incremental decoding" in result.message
        pytest.skip(result.message)
    assert result.status is Status.PASSED, result.message
    worst = max(c.rel_rms for c in result.comparisons.values())
    assert worst < 1e-12
    assert list(result.steps) == [f"steps.{s.index}" for s in load_scenario_data(corpus, cases[case_id])
                                  if s.op != "rollback"]


class WrapBackend:
    """The refimpl backend with its loaded model wrapped by ``wrap(model) -> object``."""

    name = "wrapped"

    def __init__(self, wrap):
        self.inner, self.wrap = RefimplBackend(), wrap

    def supports(self, case, dtype):
        return self.inner.supports(case, dtype)

    def load_model(self, checkpoint_dir, dtype):
        return self.wrap(self.inner.load_model(checkpoint_dir, dtype))


class ForwardOnly:
    """A loaded model without the incremental capability."""

    def __init__(self, model):
        self.run = model.run


class Broken(RefimplModel):
    """The reference's incremental API with one method overridden by a test."""

    def __init__(self, model: RefimplModel, **methods):
        super().__init__(model.model)
        for name, fn in methods.items():
            setattr(self, name, fn.__get__(self))


def run_wrapped(corpus, case, **methods):
    return run_case(WrapBackend(lambda m: Broken(m, **methods)), case, corpus, "float64")


def test_a_model_without_the_capability_is_not_implemented(corpus, cases):
    result = run_case(WrapBackend(ForwardOnly), cases[SPECULATIVE], corpus, "float64")
    assert result.status is Status.NOT_IMPLEMENTED
    assert "no prefill, decode, rollback" in result.message


def test_supports_refusing_a_scenario_is_not_implemented(corpus, cases):
    class Refusing(WrapBackend):
        def supports(self, case, dtype):
            return "no scenarios here" if case.level == "scenario" else True

    result = run_case(Refusing(lambda m: m), cases[SPECULATIVE], corpus, "float64")
    assert result.status is Status.NOT_IMPLEMENTED and result.message == "no scenarios here"


def test_refimpl_without_incremental_decoding_is_not_implemented(corpus, cases, monkeypatch):
    arch = refimpl.ARCHITECTURES["Qwen3ForCausalLM"]
    monkeypatch.setitem(refimpl.ARCHITECTURES, "Qwen3ForCausalLM", replace(arch, forward_step=None))
    result = run_case(RefimplBackend(), cases[SPECULATIVE], corpus, "float64")
    assert result.status is Status.NOT_IMPLEMENTED
    assert result.message == "refimpl has no incremental decoding (prefill / decode / rollback) for " \
                             "'Qwen3ForCausalLM' yet"


def test_decode_that_ignores_the_cache_fails_at_the_first_decode(corpus, cases):
    def decode_fresh(self, input_ids, state):
        return self.model.prefill(input_ids)

    result = run_wrapped(corpus, cases[CHUNKED], decode=decode_fresh)
    assert result.status is Status.FAILED
    assert result.first_divergence == "steps.1 (decode 9 after 3 tokens)"
    assert result.message.startswith("steps.1 (decode 9 after 3 tokens): rel RMS")
    assert not result.comparisons["steps.0"].rel_rms > 1e-12
    assert set(result.comparisons) == {f"steps.{i}" for i in range(8)}


def test_decode_returning_the_positions_in_the_wrong_order_fails_at_the_first_piece(corpus, cases):
    def decode_reversed(self, input_ids, state):
        logits, state = self.model.decode(input_ids, state)
        return logits[:, ::-1], state

    result = run_wrapped(corpus, cases[SPECULATIVE], decode=decode_reversed)
    # steps.1 decodes one token, where the order cannot be wrong; steps.2 is the first piece of 6.
    assert result.first_divergence == "steps.2 (decode 6 after 7 tokens)"
    assert result.status is Status.FAILED


def test_rollback_that_forgets_nothing_fails_right_after_the_first_rollback(corpus, cases):
    def no_rollback(self, state, num_tokens):
        return state

    result = run_wrapped(corpus, cases[SPECULATIVE], rollback=no_rollback)
    assert result.first_divergence == "steps.5 (decode 1 after 15 tokens)"
    assert all(result.comparisons[f"steps.{i}"].rel_rms < 1e-12 for i in (0, 1, 2, 3))


def test_prefill_that_ignores_the_attention_mask_fails_on_the_padded_prompt(corpus, cases):
    def prefill_unpadded(self, input_ids, attention_mask):
        return self.model.prefill(input_ids, None)

    result = run_wrapped(corpus, cases[PADDED], prefill=prefill_unpadded)
    assert result.first_divergence == "steps.0 (prefill of 8 tokens)"
    unpadded = run_wrapped(corpus, cases[CHUNKED], prefill=prefill_unpadded)
    assert unpadded.status is Status.PASSED


def test_pad_slot_logits_are_not_compared(corpus, cases):
    def prefill_nan_on_pads(self, input_ids, attention_mask):
        logits, state = self.model.prefill(input_ids, attention_mask)
        return np.where(attention_mask[..., None] == 0, np.nan, logits), state

    assert run_wrapped(corpus, cases[PADDED], prefill=prefill_nan_on_pads).status is Status.PASSED


def test_a_step_that_raises_is_an_error_naming_the_step(corpus, cases):
    def decode_small_only(self, input_ids, state):
        if input_ids.shape[1] > 5:
            raise RuntimeError("pieces above 5 tokens are not supported")
        return self.model.decode(input_ids, state)

    result = run_wrapped(corpus, cases[SPECULATIVE], decode=decode_small_only)
    assert result.status is Status.ERROR
    assert result.message == "steps.2 (decode 6 after 7 tokens): RuntimeError: pieces above 5 tokens are not supported"
    assert result.first_divergence == "steps.2 (decode 6 after 7 tokens)"


def test_not_implemented_error_from_a_step_is_not_implemented(corpus, cases):
    def no_rollback(self, state, num_tokens):
        raise NotImplementedError("this engine cannot roll back")

    result = run_wrapped(corpus, cases[SPECULATIVE], rollback=no_rollback)
    assert result.status is Status.NOT_IMPLEMENTED
    assert result.message == "steps.4 (rollback 2 after 17 tokens): this engine cannot roll back"


def test_an_earlier_divergence_wins_over_a_later_error(corpus, cases):
    def decode_then_crash(self, input_ids, state):
        if state.length > 12:
            raise RuntimeError("out of cache")
        logits, state = self.model.decode(input_ids, state)
        return logits + 1.0, state

    result = run_wrapped(corpus, cases[SPECULATIVE], decode=decode_then_crash)
    assert result.status is Status.FAILED and result.first_divergence == "steps.1 (decode 1 after 6 tokens)"
    assert "then steps.3 (decode 4 after 13 tokens) raised RuntimeError: out of cache" in result.message


def test_wrong_return_shape_is_reported_per_step(corpus, cases):
    def decode_last_only(self, input_ids, state):
        logits, state = self.model.decode(input_ids, state)
        return logits[:, -1:], state

    result = run_wrapped(corpus, cases[CHUNKED], decode=decode_last_only)
    assert result.first_divergence == "steps.1 (decode 9 after 3 tokens)"
    assert "shape (2, 1, 128) != expected (2, 9, 128)" in result.message


def test_a_step_comparison_says_which_row_and_position_its_max_abs_error_is_at(corpus, cases):
    from conformance.report import _jsonable

    calls = []

    def decode_off_at_row_2(self, input_ids, state):
        logits, state = self.model.decode(input_ids, state)
        calls.append(input_ids.shape)
        if len(calls) == 2:                         # steps.2: decode 5 after 9 slots
            logits = logits.copy()
            logits[2, 3, 7] += 1.0
        return logits, state

    result = run_wrapped(corpus, cases[PADDED], decode=decode_off_at_row_2)
    assert result.status is Status.FAILED and result.first_divergence == "steps.2 (decode 5 after 9 tokens)"
    step = result.comparisons["steps.2"]
    # Row 2 has 5 pad slots: its slot 3 of this step is slot 12 of the row, its real token 7.
    assert (step.max_abs_row, step.max_abs_slot, step.max_abs_position) == (2, 3, 7)
    # The comparison itself is over the real slots flattened: 3 rows x 5 new tokens.
    assert step.actual_shape == (15, 128) and step.max_abs_index == (13, 7)
    assert result.message.endswith("; max abs error at row 2, position 7 (slot 3), vocab 7")
    entry = _jsonable(result)["comparisons"]
    assert {k: entry["steps.2"][k] for k in ("max_abs_row", "max_abs_slot", "max_abs_position")} == {
        "max_abs_row": 2, "max_abs_slot": 3, "max_abs_position": 7}
    # In the prompt the position counts real tokens only: row 1's slot 2 is its first token.
    prompt = result.comparisons["steps.0"]
    assert prompt.max_abs_position == prompt.max_abs_slot - (0, 2, 5)[prompt.max_abs_row]


# CLI, reports and the file contract


def test_cli_level_scenario_runs_only_scenarios_and_reports_steps(corpus, tmp_path):
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    result = invoke("run", "--backend", "refimpl", "--dtype", "float64", "--golden-dir", corpus, "--level",
                    "scenario", "--case", "scenario/qwen3/*", "--no-isolate", "--report", report, "--junit", junit)
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed" in result.output
    entries = {e["case_id"]: e for e in json.loads(report.read_text())["results"]}
    assert set(entries) == {CHUNKED, PADDED, SPECULATIVE}
    assert entries[SPECULATIVE]["steps"]["steps.5"] == "decode 1 after 15 tokens"
    assert set(entries[SPECULATIVE]["comparisons"]) == set(entries[SPECULATIVE]["steps"])
    assert f'name="{SPECULATIVE} [float64]"' in junit.read_text()
    assert invoke("run", "--backend", "refimpl", "--golden-dir", corpus, "--level", "model").exit_code == 2


def test_cli_refuses_op_with_level_scenario(corpus):
    result = invoke("run", "--backend", "refimpl", "--golden-dir", corpus, "--level", "scenario", "--op", "rope")
    assert result.exit_code == 2 and "--level scenario" in result.output


def test_cli_list_and_matrix_show_scenarios(corpus):
    listed = invoke("list", "--golden-dir", corpus)
    assert listed.exit_code == 0 and "scenario/qwen3/speculative" in listed.output and "scenario" in listed.output
    matrix = invoke("matrix", "--backend", "refimpl", "--dtype", "float64", "--golden-dir", corpus)
    assert "| scenario | scenario/qwen3 (Qwen3ForCausalLM) | 3 | 3/3 |" in matrix.output


def test_cli_failing_scenario_names_the_step_and_writes_a_repro_bundle(corpus, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stale_backend.py").write_text(
        "from conformance.backends.refimpl_backend import RefimplBackend, RefimplModel\n"
        "class Model(RefimplModel):\n"
        "    def rollback(self, state, num_tokens):\n"
        "        return state\n"
        "class Backend(RefimplBackend):\n"
        "    name = 'stale'\n"
        "    def load_model(self, checkpoint_dir, dtype):\n"
        "        return Model(super().load_model(checkpoint_dir, dtype).model)\n")
    repro, html = tmp_path / "repro", tmp_path / "r.html"
    result = invoke("run", "--backend", "stale_backend:Backend", "--dtype", "float64", "--golden-dir", corpus,
                    "--case", SPECULATIVE, "--no-isolate", "--repro-dir", repro, "--html", html)
    assert result.exit_code == 1
    assert "steps.5 (decode 1 after 15 tokens)" in result.output
    assert f"--case {SPECULATIVE}" in result.output
    bundle = repro / SPECULATIVE.replace("/", "__")
    info = json.loads((bundle / "case.json").read_text())
    assert info["level"] == "scenario" and info["first_divergence"] == "steps.5 (decode 1 after 15 tokens)"
    assert info["schedule"][4] == {"op": "rollback", "num_tokens": 2}
    assert (Path(info["checkpoint_abs"]) / "config.json").is_file()
    assert set(load_file(bundle / "inputs.safetensors")) == {f"steps.{i}.input_ids" for i in (0, 1, 2, 3, 5, 6, 8, 9,
                                                                                              10, 11, 13)}
    page = html.read_text()
    assert f'id="plot-{SPECULATIVE}"' in page or f"No plot for {SPECULATIVE}" in page


def engine():
    spec = importlib.util.spec_from_file_location("file_contract_engine", ROOT / "examples/file_contract_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_check_round_trip_and_a_perturbed_step(corpus, tmp_path):
    exported, outputs = tmp_path / "cases", tmp_path / "outputs"
    result = invoke("export", exported, "--golden-dir", corpus, "--level", "scenario", "--case", "scenario/qwen3/*",
                    "--dtype", "float64")
    assert result.exit_code == 0, result.output
    info = json.loads((exported / PADDED.replace("/", "__") / "case.json").read_text())
    assert info["level"] == "scenario" and info["schedule"][0] == {"op": "prefill", "num_tokens": 8}
    assert set(info["inputs"]) == {f"steps.{i}.input_ids" for i in range(6)} | {"steps.0.attention_mask"}
    assert info["outputs"]["steps.2.logits"]["shape"] == [3, 5, 128]
    engine().main(str(exported), str(outputs))
    checked = invoke("check", "--outputs", outputs, "--exported", exported, "--golden-dir", corpus)
    assert checked.exit_code == 0, checked.output
    assert "3 passed" in checked.output
    written = outputs / SPECULATIVE.replace("/", "__") / "outputs.safetensors"
    tensors = load_file(written)
    tensors["steps.8.logits"] = tensors["steps.8.logits"] * 1.01
    save_file(tensors, written)
    checked = invoke("check", "--outputs", outputs, "--exported", exported, "--golden-dir", corpus)
    assert checked.exit_code == 1
    assert SPECULATIVE in checked.output and "steps.8 (decode 1 after 16 tokens)" in checked.output
    # A tensor the 6-step scenario does not call for is listed as not compared, not silently dropped.
    written = outputs / PADDED.replace("/", "__") / "outputs.safetensors"
    tensors = load_file(written)
    save_file({**tensors, "steps.7.logits": tensors["steps.5.logits"]}, written)
    report = tmp_path / "extra.json"
    checked = invoke("check", "--outputs", outputs, "--exported", exported, "--golden-dir", corpus, "--case", PADDED,
                     "--report", report)
    assert checked.exit_code == 0, checked.output
    entry = json.loads(report.read_text())["results"][0]
    assert entry["status"] == "passed" and entry["uncompared"] == ["steps.7.logits"]
    assert entry["message"] == "not compared (no golden tensor): steps.7.logits"
    assert "warning" not in checked.output


def test_pytest_plugin_collects_scenarios(corpus):
    import subprocess

    from conformance.pytest_plugin import SUITE

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llm-backend=refimpl",
                          "--llm-dtype=float64", f"--llm-golden-dir={corpus}", "--llm-level=scenario",
                          "--llm-case=scenario/qwen3/*", "--collect-only", str(SUITE)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "test_golden_case[scenario/qwen3/speculative]" in out.stdout, out.stdout + out.stderr
