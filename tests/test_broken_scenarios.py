"""Deliberately wrong stateful backends fail the scenario cases built for their bug class, at the
step where the mistake first shows; the reference passes them.

The corpus is ``tools/golden_cases/scenario_classes.py``, written once per session into a
temporary directory (``make_goldens.py --only 'scenario/classes/*'``), so these tests do not
depend on the committed golden/ directory. The backends are ``tests/broken_scenario_backends.py``.
Each runs the scenario level of the suite over every class case: the test asserts exit code 1,
the exact outcome of every case (its first diverging step, or passed) and that nothing errors.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conformance.manifest import load_manifest, load_scenario_data

import broken_scenario_backends as broken

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "scenario/classes/"

#: Short names of the cases (``scenario/classes/<name>``).
CASES = {
    "K01": "kv-01-continuation-positions", "K01P": "kv-01-left-padded-positions",
    "K01L": "kv-01-llama4-left-padded-positions", "K02": "kv-02-extend-past-window",
    "S04": "swa-04-decode-past-window", "K03": "kv-03-rollback-after-slide", "K07S": "kv-07-prompt-reuse-sliding",
    "K07C": "kv-07-prompt-reuse-chunked", "K05": "kv-05-pieces-larger-than-window",
    "K08": "kv-08-evict-below-window", "M05": "mla-05-absorbed-decode-long-cache",
    "M06": "mla-06-chunked-prefill-16-16-8", "M07": "mla-07-empty-context-chunk",
    "M08": "mla-08-multi-token-continuation", "M09": "mla-09-merge-two-context-chunks",
    "G04": "gdn-04-prefill-decode-handoff", "G06": "gdn-06-conv-state-handoff",
    "G07": "gdn-07-continuation-initial-state", "MTP": "mtp-03-verify-accept-1-of-3",
}


def expect(**failing) -> dict:
    """Every class case passed except ``failing`` (short name: first diverging step index)."""
    unknown = set(failing) - set(CASES)
    assert not unknown, unknown
    return {PREFIX + name: f"steps.{failing[short]}" if short in failing else "passed"
            for short, name in CASES.items()}


# Cases whose sliding-window layers run past the window in decodes and multi-token continuations.
WINDOWED = ("K01P", "K02", "S04", "K03", "K07S", "K05", "K08")
# Cases with a rollback of a sliding or chunked cache after it slid.
ROLLED_RINGS = ("K03", "K07S", "K07C")
MLA = ("M05", "M06", "M07", "M08", "M09")
GDN = ("G04", "G06", "G07", "MTP")

#: factory: (bug class, the outcome of every class case). The class's own cases come first.
MISTAKES = {
    # KV-01: RoPE positions of a continuation restarted at 0: every case fails at its first continuation.
    "positions_restart_each_call": ("KV-01", expect(
        K01=1, K01P=1, K01L=1, K02=1, S04=1, K03=1, K07S=2, K07C=1, K05=1, K08=1, M05=1, M06=1, M07=1, M08=1,
        M09=1, G04=1, G06=1, G07=1, MTP=1)),
    # Decode positions from the slot count: the left-padded cases only, at their first decode.
    "decode_positions_from_slot_count": ("KV-01", expect(K01P=1, K01L=1, M07=1, G07=1)),
    # Slot-index positions everywhere: invisible to RoPE (a padded row shifts as a whole), so only
    # Llama 4's chunk boundaries show it, already in the prompt.
    "slot_index_positions": ("KV-01", expect(K01L=0)),
    # KV-02: the extend path leaves cached keys unwindowed (first multi-token continuation); the
    # variant without any window on cached keys fails at the first decode past the window.
    "window_among_new_tokens_only": ("KV-02", expect(K02=3, S04=3, K01P=2, K03=1, K07S=2, K05=1, K08=3)),
    "cached_keys_never_windowed": ("KV-02", expect(K02=1, S04=1, K01P=1, K03=1, K07S=2, K05=1, K08=1)),
    # SWA-04: W - 1 keys in decode (first single-token decode), in extend (first multi-token
    # continuation), and the mirror W + 1 in decode.
    "decode_window_short_by_one": ("SWA-04", expect(S04=1, K01P=1, K02=1, K03=3, K07S=3, K05=3, K08=1)),
    "extend_window_short_by_one": ("SWA-04", expect(S04=3, K01P=2, K02=3, K03=1, K07S=2, K05=1, K08=3)),
    "decode_window_long_by_one": ("SWA-04", expect(S04=1, K01P=1, K02=1, K03=3, K07S=3, K05=3, K08=1)),
    # KV-03: the ring not restored: the rollback of 1 (step 2) is invisible, the rollback of 2 (step 5)
    # shows at the next decode (step 6). KV-07: the same place for the raw trim; skipping the trim of
    # rotating caches already shows after the rollback of 1.
    "rollback_without_restoring_ring": ("KV-03", expect(K03=6, K07S=2, K07C=3)),
    "rollback_raw_ring_trim": ("KV-07", expect(K07S=2, K07C=3, K03=6)),
    "rollback_ignored_on_rotating_caches": ("KV-07", expect(K07S=2, K07C=3, K03=3)),
    # KV-05: only a piece of 2W overflows the ring of 2W (step 2; the piece of W at step 1 fits).
    "ring_of_twice_the_window": ("KV-05", expect(K05=2)),
    # KV-08: eviction to 2 slots shows at the first decode of every windowed or chunked case;
    # eviction to the last piece after a call of fewer than W - 1 tokens (K05's calls never are).
    "evict_to_attention_chunk": ("KV-08", expect(K08=1, K01P=1, K01L=1, K02=1, S04=1, K03=1, K07S=2, K07C=1,
                                                 K05=1)),
    "evict_to_last_piece": ("KV-08", expect(K08=2, K01P=2, K01L=2, K02=2, S04=2, K03=3, K07S=2, K07C=3)),
    # MLA-05: wrong value rows past one 16-slot block, single-token decodes only (M05: the decode
    # over 17 slots, step 4; M05's 4-token piece over 16 slots at step 3 passes).
    "mla_decode_value_rows_strided_by_dv": ("MLA-05", expect(M05=4, M06=3, M07=2, M08=1, M09=5)),
    # MLA-06: a wrong merge of context chunks and new tokens: every multi-token continuation.
    "mla_chunked_context_merge_by_maxima": ("MLA-06", expect(M06=1, M05=3, M07=1, M08=2, M09=1)),
    "mla_chunked_context_lse_without_max": ("MLA-06", expect(M06=1, M05=3, M07=1, M08=2, M09=1)),
    # MLA-07: only a row whose context chunk is empty (the left-padded batch) is hurt.
    "mla_empty_context_chunk_lse_zero": ("MLA-07", expect(M07=1)),
    # MLA-08: multi-token continuations not causal among their tokens (the decode at M08's step 1 passes).
    "mla_continuation_not_causal": ("MLA-08", expect(M08=2, M05=3, M06=1, M07=1, M09=1)),
    "mla_continuation_as_separate_decodes": ("MLA-08", expect(M08=2, M05=3, M06=1, M07=1, M09=1)),
    # MLA-09: only continuations over two or more context chunks (M09: 22 cached at step 4; the
    # continuations over 6, 10 and 14 cached pass; M05's over 12 passes).
    "mla_merge_suffix_read_at_prefix_stride": ("MLA-09", expect(M09=4, M06=2, M07=1, M08=2)),
    # GDN-04: the prefill-to-decode handoff: every Qwen3-Next case at its first decode.
    "gdn_decode_from_zero_state": ("GDN-04", expect(G04=1, G06=1, G07=1, MTP=1)),
    "gdn_decode_reads_state_transposed": ("GDN-04", expect(G04=1, G06=1, G07=1, MTP=1)),
    "gdn_decode_decay_after_update": ("GDN-04", expect(G04=1, G06=1, G07=1, MTP=1)),
    "gdn_padded_chunk_decays_state": ("GDN-04", expect(G04=1, G06=1, G07=1, MTP=1)),
    # GDN-06: the decode kernel's conv layout: the first decode; the extend kernel's: the first
    # multi-token continuation (G06: step 5, after four right decodes).
    "gdn_conv_state_time_major_in_decode": ("GDN-06", expect(G06=1, G04=1, G07=1, MTP=1)),
    "gdn_conv_state_time_major_in_extend": ("GDN-06", expect(G06=5, G04=3, G07=2, MTP=2)),
    # GDN-07: a continuation restarting its state (first multi-token continuation); the state kept in
    # 16 bits between calls (the first decode, at float32).
    "gdn_continuation_without_initial_state": ("GDN-07", expect(G07=2, G04=3, G06=5, MTP=2)),
    "gdn_continuation_without_recurrent_state": ("GDN-07", expect(G07=2, G04=3, G06=5, MTP=2)),
    "gdn_state_kept_in_bfloat16": ("GDN-07", expect(G07=1, G04=1, G06=1, MTP=1)),
    "gdn_state_kept_in_float16": ("GDN-07", expect(G07=1, G04=1, G06=1, MTP=1)),
    # MTP-03: the GDN state after a rollback: the decode after the first verification (accept 1 of 3).
    "verify_commits_gdn_state": ("MTP-03", expect(MTP=4)),
    "rollback_restores_recurrent_state_only": ("MTP-03", expect(MTP=4)),
    "rollback_restores_conv_state_only": ("MTP-03", expect(MTP=4)),
    "rollback_restores_first_gdn_layer_only": ("MTP-03", expect(MTP=4)),
    "rollback_to_state_before_verify": ("MTP-03", expect(MTP=4)),
}


@pytest.fixture(scope="session")
def class_golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenario_classes_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", PREFIX + "*", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run(golden_dir, tmp_path, backend, dtype="float32"):
    report = tmp_path / "report.json"
    args = ["run", "--backend", backend, "--dtype", dtype, "--golden-dir", str(golden_dir), "--report", str(report),
            "--level", "scenario", "--case", PREFIX + "*"]
    result = CliRunner().invoke(cli, args)
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


def outcome(by_case) -> dict:
    """``{case: "steps.N"}`` (the index of the first diverging step) for failed cases, else the status."""
    return {c: e["first_divergence"].split(" ")[0] if e["status"] == "failed" else e["status"]
            for c, e in by_case.items()}


def test_the_class_cases_cover_every_class_and_are_all_listed(class_golden):
    ids = {c.id for c in load_manifest(class_golden)}
    assert ids == {PREFIX + name for name in CASES.values()}
    classes = {bug_class for bug_class, _ in MISTAKES.values()}
    assert classes == {"KV-01", "KV-02", "KV-03", "KV-05", "KV-07", "KV-08", "SWA-04", "MLA-05", "MLA-06", "MLA-07",
                       "MLA-08", "MLA-09", "GDN-04", "GDN-06", "GDN-07", "MTP-03"}
    # Each class has a case of its own that its backends fail.
    for factory, (bug_class, expected) in MISTAKES.items():
        own = [c for c, o in expected.items() if c.startswith(PREFIX + bug_class.lower() + "-") and o != "passed"]
        assert own, f"{factory}: no case of {bug_class} fails"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_reference_passes_every_class_case(class_golden, tmp_path, dtype):
    result, by_case = run(class_golden, tmp_path, "refimpl", dtype)
    assert result.exit_code == 0, result.output
    assert outcome(by_case) == expect()


@pytest.mark.parametrize("factory", ["mla_chunked_context", "gdn_layouts_agree"])
def test_the_engine_structures_without_their_mistake_pass(class_golden, tmp_path, factory):
    # The chunked-context MLA path and the layout-tracking GDN kernels are the wrong backends'
    # scaffolding: right, they pass, so the failures below are the mistakes'.
    result, by_case = run(class_golden, tmp_path, f"broken_scenario_backends:{factory}")
    assert result.exit_code == 0, result.output
    assert outcome(by_case) == expect()


@pytest.mark.parametrize("factory", list(MISTAKES))
def test_each_wrong_backend_fails_its_class_case_at_the_expected_step(class_golden, tmp_path, factory):
    bug_class, expected = MISTAKES[factory]
    result, by_case = run(class_golden, tmp_path, f"broken_scenario_backends:{factory}")
    assert result.exit_code == 1, f"{bug_class}: {factory} passed every class case"
    assert {e["status"] for e in by_case.values()} <= {"passed", "failed"}, result.output
    assert outcome(by_case) == expected


def test_an_empty_context_chunk_hurts_only_the_row_it_is_empty_for(class_golden):
    # MLA-07: each request's output must equal running it alone; row 0 (40 cached tokens, no pads)
    # keeps the right logits, row 1 (38 pad slots: two empty 16-slot chunks) does not.
    case = next(c for c in load_manifest(class_golden) if c.id == PREFIX + CASES["M07"])
    steps = load_scenario_data(class_golden, case)
    model = broken.mla_empty_context_chunk_lse_zero().load_model(class_golden / case.checkpoint, "float64")
    _, state = model.prefill(steps[0].input_ids, steps[0].attention_mask)
    logits, _ = model.decode(steps[1].input_ids, state)
    error = np.abs(logits - steps[1].logits).max(axis=(1, 2)) / np.abs(steps[1].logits).max()
    assert error[0] < 1e-12 and error[1] > 1e-2, error


def test_round_to_bfloat16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=4096).astype(np.float32) * np.float32(100)
    # exact ties (the last kept bit 0 and 1) round to even
    x[:4] = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2.0**-130], dtype=np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(broken.round_to_bfloat16(x), want)
