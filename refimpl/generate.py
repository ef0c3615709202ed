"""Greedy generation over a model, and the step-by-step comparison of two greedy runs.

Greedy decoding appends ``argmax`` of the next-token logits until a stop id is
produced (it is kept, as transformers' ``generate`` keeps the EOS) or
``max_new_tokens`` tokens were added. The model enters through one function,
``next_logits(ids (T,)) -> logits (V,)``: :func:`cached_next_logits` prefills the prompt
and then decodes one token per step with the model's cache (``Model.prefill`` /
``Model.decode``, docs/decoding.md); :func:`full_forward_next_logits` re-runs the whole
forward on the growing sequence (the definition the cached one equals).

Notation: T0 prompt length, N new tokens, V vocab_size.

Ties: ``np.argmax`` takes the lowest id among equal maxima (so does ``torch.argmax``,
documented to return the first maximal index, which transformers' greedy search uses).

Checked against: transformers 5.24 ``generation/utils.py`` (``GenerationMixin.generate``
with ``do_sample=False``: ``_sample`` taking ``argmax`` of the processed scores, EOS kept
in the output and ending the sequence); ``tests/test_generate.py`` compares the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .embedding import check_prompt_ids
from .errors import InputError, RefimplError

NextTokenLogits = Callable[[np.ndarray], np.ndarray]


def full_forward_next_logits(model) -> NextTokenLogits:
    """``next_logits`` for a :class:`refimpl.Model`: the last position's logits ``(V,)`` of a
    full forward over ``ids (T,)`` (in the model's compute dtype)."""

    def next_logits(ids: np.ndarray) -> np.ndarray:
        return model(ids[None, :])[0, -1]

    return next_logits


def cached_next_logits(model) -> NextTokenLogits:
    """``next_logits`` for a :class:`refimpl.Model` through its cache: the first call prefills
    ``ids (T,)``; a call whose ids extend the previous ones decodes only the new tokens; any
    other call starts over with a prefill. Returns the last position's logits ``(V,)``."""
    seen: list = [None, None]  # the ids of the previous call and the cache after them

    def next_logits(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        previous, cache = seen
        if previous is not None and len(ids) > len(previous) and np.array_equal(ids[:len(previous)], previous):
            logits, cache = model.decode(ids[None, len(previous):], cache)
        else:
            logits, cache = model.prefill(ids[None, :])
        seen[:] = [ids.copy(), cache]
        return logits[0, -1]

    return next_logits


@dataclass(frozen=True)
class Generation:
    """One greedy run.

    Attributes:
        prompt_ids: ``(T0,)`` int64.
        new_ids: ``(N,)`` int64, the generated tokens (a final stop id included).
        logits: ``(N, V)``: the next-token logits each new token was chosen from.
        stop_reason: ``"eos"`` (a stop id was produced) or ``"max_new_tokens"``.
    """

    prompt_ids: np.ndarray
    new_ids: np.ndarray
    logits: np.ndarray
    stop_reason: str


def normalise_stop_ids(value, where: str) -> tuple[int, ...]:
    """Stop ids from a config's ``eos_token_id``: None, an int or a list of ints.

    Raises:
        InputError: any other value (a bool, a float, a negative id, a nested list).
    """
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{where}: eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


def greedy_token(logits: np.ndarray, step: int) -> int:
    """``argmax`` of a ``(V,)`` logit vector (lowest id among ties).

    Raises:
        RefimplError: the logits hold NaN or Inf (no token can be chosen).
    """
    if not np.isfinite(logits).all():
        raise RefimplError(f"step {step}: the next-token logits hold NaN or Inf; greedy decoding cannot choose")
    return int(np.argmax(logits))


def greedy_generate(next_logits: NextTokenLogits, prompt_ids, max_new_tokens: int,
                    stop_ids: Iterable[int] = ()) -> Generation:
    """Greedy decoding from ``prompt_ids``.

    Args:
        next_logits: ``ids (T,) int64 -> logits (V,)`` for the token after ``ids``.
        prompt_ids: integer ``(T0,)``, T0 >= 1 (``next_logits`` range-checks them; the
            CLI checks them against ``vocab_size`` first, naming the token).
        max_new_tokens: N_max >= 1.
        stop_ids: ids that end generation once produced.

    Returns:
        :class:`Generation`; logits widened to float64 for the record.

    Raises:
        InputError: prompt ids that are not a non-empty 1-D integer sequence of non-negative
            ids (:func:`refimpl.embedding.check_prompt_ids`), or ``max_new_tokens`` not an int >= 1.
        RefimplError: NaN or Inf logits at some step.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids = check_prompt_ids(prompt_ids)
    stops = set(stop_ids)
    new, rows = [], []
    # One step: logits of the next token, its argmax, appended; stop after a stop id.
    for step in range(int(max_new_tokens)):
        logits = np.asarray(next_logits(np.concatenate([ids, np.asarray(new, dtype=np.int64)])))
        token = greedy_token(logits, step)
        new.append(token)
        rows.append(logits.astype(np.float64))
        if token in stops:
            break
    reason = "eos" if new[-1] in stops else "max_new_tokens"
    return Generation(ids, np.asarray(new, dtype=np.int64), np.stack(rows), reason)


@dataclass(frozen=True)
class StepComparison:
    """One step of two greedy runs.

    Attributes:
        step: 0-based index of the new token.
        ours, theirs: the chosen ids (None where that run had already stopped).
        max_abs: ``max |theirs - ours|`` over the V logits, or None where the two runs
            saw different prefixes (after the first difference) or one had stopped.
        rel_rms: ``||theirs - ours|| / ||ours||`` over the logits, likewise.
    """

    step: int
    ours: int | None
    theirs: int | None
    max_abs: float | None
    rel_rms: float | None


@dataclass(frozen=True)
class GenerationComparison:
    """Two greedy runs from one prompt, step by step.

    Attributes:
        steps: one :class:`StepComparison` per step either run took.
        first_difference: the first step whose tokens differ (or where one run had
            stopped and the other had not), or None when the runs are equal.
    """

    steps: tuple[StepComparison, ...]
    first_difference: int | None

    @property
    def agree(self) -> bool:
        return self.first_difference is None

    def summary(self) -> str:
        """``"agree for N steps"`` or ``"first difference at step i: ours A, theirs B"``."""
        if self.agree:
            return f"agree for {len(self.steps)} steps"
        row = self.steps[self.first_difference]
        return f"first difference at step {row.step}: ours {row.ours}, theirs {row.theirs}"


def _logit_errors(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """``(max |theirs - ours|, ||theirs - ours|| / ||ours||)``; the ratio is 0 or inf when ours is all zero."""
    diff = theirs - ours
    norm, err = float(np.linalg.norm(ours)), float(np.linalg.norm(diff))
    rel = err / norm if norm > 0 else (float("inf") if err > 0 else 0.0)
    return float(np.max(np.abs(diff))), rel


def compare_generations(ours: Generation, theirs: Generation) -> GenerationComparison:
    """Compare two greedy runs step by step (``ours`` is the reference of the errors).

    Logit errors are reported while both runs extend the same prefix, that is up to
    and including the first step whose tokens differ; after it they are None.

    Raises:
        InputError: the runs start from different prompts, or their logits have
            different vocab sizes.
    """
    if not np.array_equal(ours.prompt_ids, theirs.prompt_ids):
        raise InputError("the two generations start from different prompt ids")
    if ours.logits.shape[1] != theirs.logits.shape[1]:
        raise InputError(f"the two generations have {ours.logits.shape[1]} and {theirs.logits.shape[1]} "
                         "logits per step")
    rows, first = [], None
    for step in range(max(len(ours.new_ids), len(theirs.new_ids))):
        a = int(ours.new_ids[step]) if step < len(ours.new_ids) else None
        b = int(theirs.new_ids[step]) if step < len(theirs.new_ids) else None
        same_prefix = first is None and a is not None and b is not None
        errors = _logit_errors(ours.logits[step], theirs.logits[step]) if same_prefix else (None, None)
        rows.append(StepComparison(step, a, b, *errors))
        if first is None and a != b:
            first = step
    return GenerationComparison(tuple(rows), first)
