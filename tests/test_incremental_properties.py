"""Property: any schedule of prefill pieces, decode steps and rolled-back drafts gives the
logits of one full forward, for every golden checkpoint of every architecture, at float64.

A schedule is drawn by hypothesis: a prompt split into a prefill and decode calls of any
sizes (several tokens per call is chunked prefill; one is decode), some calls followed by
rejected draft tokens that are rolled back, and a batch of two rows whose second row may
be left-padded. The expected logits of each call come from one forward of each row alone
over its real tokens so far (no cache, no padding), so the property checks the caches,
positions, masks, padding and rollback together, against the definition.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refimpl.errors import InputError
from refimpl.model import from_pretrained

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
RELATIVE = 1e-10

_MANIFEST = json.loads((GOLDEN / "MANIFEST.json").read_text())
#: every checkpoint of the model-level golden cases, once
CHECKPOINTS = sorted({c["checkpoint"] for c in _MANIFEST["cases"] if c["level"] == "model"})
EXAMPLES = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@lru_cache(maxsize=4)
def model(checkpoint: str):
    return from_pretrained(GOLDEN / checkpoint, np.float64)


@st.composite
def schedules(draw):
    """``(pieces, drafts, pad)``: call sizes (the first is the prefill), the number of
    rejected draft tokens fed after each call (0: none), and row 1's left padding."""
    pieces = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    drafts = draw(st.lists(st.integers(0, 3), min_size=len(pieces), max_size=len(pieces)))
    pad = draw(st.integers(0, 4))
    return pieces, drafts, pad


def _check(step: str, got: np.ndarray, expected: np.ndarray) -> None:
    scale = np.max(np.abs(expected))
    error = np.max(np.abs(got - expected))
    assert error <= RELATIVE * scale, f"{step}: max |error| {error:.3e} > {RELATIVE} x max |logit| {scale:.3e}"


def run_schedule(m, pieces, drafts, pad, seed: int = 0) -> None:
    """Feed the schedule and compare every call's logits with one forward of each row alone."""
    rng = np.random.default_rng(seed)
    vocab = m.config.vocab_size
    total = sum(pieces)
    tokens = rng.integers(0, vocab, (2, total))
    # Row 1 has `pad` fewer real prompt tokens: its first `pad` slots are padding.
    pad = min(pad, pieces[0] - 1)
    mask = np.ones((2, pieces[0]), dtype=np.int64)
    mask[1, :pad] = 0
    ids = tokens[:, :pieces[0]].copy()
    ids[1, :pad] = 0

    def expected(row: int, upto: int, last: int, extra=None) -> np.ndarray:
        seq = tokens[row, (pad if row == 1 else 0):upto]
        if extra is not None:
            seq = np.concatenate([seq, extra])
        return m(seq[None])[0, -last:]

    logits, cache = m.prefill(ids, mask)
    _check("prefill row 0", logits[0], expected(0, pieces[0], pieces[0]))
    _check("prefill row 1", logits[1, pad:], expected(1, pieces[0], pieces[0] - pad))
    done = pieces[0]
    for call, size in enumerate(pieces):
        if call:
            logits, cache = m.decode(tokens[:, done:done + size], cache)
            done += size
            for row in (0, 1):
                _check(f"call {call} row {row}", logits[row], expected(row, done, size))
        if drafts[call]:
            # Verify: the next real token plus rejected drafts; accept nothing and roll back.
            verify = rng.integers(0, vocab, (2, drafts[call]))
            logits, rejected = m.decode(verify, cache)
            for row in (0, 1):
                _check(f"drafts after call {call} row {row}", logits[row],
                       expected(row, done, drafts[call], verify[row]))
            cache = m.rollback(rejected, drafts[call])
    # One more token after everything: the caches left by the schedule are right.
    last = rng.integers(0, vocab, (2, 1))
    logits, _ = m.decode(last, cache)
    for row in (0, 1):
        _check(f"final decode row {row}", logits[row], expected(row, done, 1, last[row]))


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@EXAMPLES
@given(schedule=schedules())
def test_any_schedule_equals_one_forward(checkpoint, schedule):
    m = model(checkpoint)
    if m.architecture.forward_step is None:
        pytest.skip(f"{m.architecture.name} has no incremental decoding yet")
    run_schedule(m, *schedule)


def test_rollback_beyond_the_last_call_is_refused():
    m = model("qwen3/untied-gqa-odd-len/checkpoint")
    _, cache = m.prefill(np.array([[1, 2, 3]]))
    _, cache = m.decode(np.array([[4, 5]]), cache)
    with pytest.raises(InputError, match="the last call added 2"):
        m.rollback(cache, 3)
    rolled = m.rollback(cache, 1)
    with pytest.raises(InputError, match="already rolled back"):
        m.rollback(rolled, 1)
    with pytest.raises(InputError, match="integer >= 0"):
        m.rollback(cache, -1)


def test_rollback_may_not_empty_a_left_padded_row():
    m = model("qwen3/untied-gqa-odd-len/checkpoint")
    _, cache = m.prefill(np.array([[1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 5, 6]]),
                         np.array([[1] * 6, [0, 0, 0, 0, 1, 1]]))
    with pytest.raises(InputError, match="row 1 without a token"):
        m.rollback(cache, 2)
    assert m.rollback(cache, 1).next_position.tolist() == [5, 1]


def test_a_cache_belongs_to_the_model_that_made_it():
    a = model("qwen3/untied-gqa-odd-len/checkpoint")
    b = model("qwen3/attention-bias/checkpoint")
    _, cache = a.prefill(np.array([[1, 2, 3]]))
    with pytest.raises(InputError, match="another model"):
        b.decode(np.array([[4]]), cache)
    with pytest.raises(InputError, match="another model"):
        b.rollback(cache, 1)
    with pytest.raises(InputError, match="DecodeCache"):
        a.decode(np.array([[4]]), {"layers": ()})


def test_padding_only_on_the_left():
    m = model("qwen3/untied-gqa-odd-len/checkpoint")
    with pytest.raises(InputError, match="left padding"):
        m.prefill(np.array([[1, 2, 3]]), np.array([[1, 0, 1]]))
    with pytest.raises(InputError, match="no token"):
        m.prefill(np.array([[1, 2, 3]]), np.array([[0, 0, 0]]))
    with pytest.raises(InputError, match=r"only 0 and 1, got also \[2\]"):
        m.prefill(np.array([[1, 2, 3]]), np.array([[1, 2, 1]]))


def test_the_memory_check_of_a_call_counts_its_new_tokens_times_all_keys(monkeypatch):
    # A one-token decode after a long cache needs B * H * 1 * S scores, not B * H * S * S:
    # with S = 40000 and H = 4 that is 1.3 MB at float64 (S * S would be 51 GiB).
    import refimpl.model as model_module

    monkeypatch.setattr(model_module, "available_memory", lambda: 1 << 30)
    config = model("qwen3/untied-gqa-odd-len/checkpoint").config
    model_module.check_sequence_length(config, (1, 1), np.float64, num_keys=40_000)
    with pytest.raises(InputError, match=r"input_ids of shape \(1, 5000\) over 40000 keys"):
        model_module.check_sequence_length(config, (1, 5000), np.float64, num_keys=40_000)
