"""Skip and xfail files: the cases a backend declares it will not run, or knows it fails.

The files belong to the backend's owner (as in array-api-tests), not to the suite.
One entry per line::

    # full-line comments and blank lines are allowed
    op/attention/mla-*          # MLA not ported yet          (skip: reason optional)
    gemma3/*                    # issue 123: soft-cap order   (xfail: reason required)
    op/rope/*@bfloat16          # applies to bfloat16 runs only

The entry is a case-id glob (``fnmatch``, case-sensitive, no whitespace), optionally
``@<dtype>`` (float64, float32, float16 or bfloat16: the entry then applies to runs in that
dtype only; case ids never hold ``@``), then optionally ``#`` and a reason. In an xfail file
the reason is required.

What the runner does with them (``conformance.runner``):
    skipped   a case matched by a skip entry is not run and does not count as failed
    xfailed   a case matched by an xfail entry ran and failed or errored
    xpassed   a case matched by an xfail entry ran and passed; this makes the run exit
              1 (strict), so that stale entries are removed
A case matched by both a skip and an xfail entry is skipped. An entry that matches
no case of the corpus is reported as a warning naming its file and line.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from .errors import ConformanceError

#: The dtypes an entry may be restricted to with ``@<dtype>``.
ENTRY_DTYPES = ("float64", "float32", "float16", "bfloat16")

#: Longest glob accepted on a line: case ids are short, and fnmatch compiles each glob to a
#: regular expression (a megabyte-long line takes seconds).
MAX_GLOB_CHARS = 1000


class ExpectationError(ConformanceError):
    """A skip or xfail file cannot be read or has a malformed line (the message starts with FILE:LINE)."""


@dataclass(frozen=True)
class Entry:
    """One line of a skip or xfail file.

    Attributes:
        pattern: the case-id glob.
        reason: the text after ``#`` (may be empty in a skip file).
        path, line: where the entry is (line numbers from 1).
        dtype: the run dtype the entry applies to (``GLOB@dtype``); None for every dtype.
    """

    pattern: str
    reason: str
    path: str
    line: int
    dtype: str | None = None

    def applies(self, case_id: str, dtype: str | None) -> bool:
        """True when the entry matches ``case_id`` in a run at ``dtype`` (None: any dtype)."""
        return (self.dtype is None or dtype is None or self.dtype == dtype) and fnmatch.fnmatchcase(case_id,
                                                                                                    self.pattern)

    @property
    def where(self) -> str:
        """``FILE:LINE``."""
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        """``FILE:LINE: reason``, or ``FILE:LINE`` when there is no reason."""
        return f"{self.where}: {self.reason}" if self.reason else self.where


def parse_line(text: str, path: str, line: int, reason_required: bool) -> Entry | None:
    """The entry on one line, or None for a blank or comment line.

    Raises:
        ExpectationError: the glob contains whitespace, is longer than :data:`MAX_GLOB_CHARS`,
            has a ``[`` that no ``]`` closes, names an unknown ``@dtype``, or a required reason
            is missing.
    """
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    pattern, _, reason = stripped.partition("#")
    pattern, reason = pattern.strip(), reason.strip()
    if len(pattern.split()) != 1:
        raise ExpectationError(f"{path}:{line}: expected '<case-id glob>  # reason', got '{stripped}' "
                               "(a glob cannot contain spaces)")
    if len(pattern) > MAX_GLOB_CHARS:
        raise ExpectationError(f"{path}:{line}: glob of {len(pattern)} characters; case ids are short "
                               f"(at most {MAX_GLOB_CHARS} accepted)")
    # fnmatch reads an unclosed '[' literally, rescanning the rest of the glob for each one
    # (quadratic); case ids never contain '[', so such a glob is a typo.
    if pattern.rfind("[") > pattern.rfind("]"):
        raise ExpectationError(f"{path}:{line}: glob '{pattern}' has a '[' that no ']' closes")
    if reason_required and not reason:
        raise ExpectationError(f"{path}:{line}: xfail entry '{pattern}' has no reason; write '{pattern}  # reason'")
    pattern, at, dtype = pattern.partition("@")
    if at and dtype not in ENTRY_DTYPES:
        raise ExpectationError(f"{path}:{line}: '@{dtype}' is not a dtype; an entry may end in @"
                               f"{', @'.join(ENTRY_DTYPES)}")
    return Entry(pattern, reason, path, line, dtype or None)


def parse_file(path, reason_required: bool) -> tuple[Entry, ...]:
    """Every entry of one skip (``reason_required=False``) or xfail (``True``) file, in file order.

    Raises:
        ExpectationError: the file is not a regular file or cannot be read as UTF-8 text,
            or a line is malformed.
    """
    # A FIFO or device would block the read (or never end).
    if Path(path).exists() and not Path(path).is_file():
        raise ExpectationError(f"cannot read {path} (not a regular file)")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpectationError(f"cannot read {path} ({exc})") from None
    entries = (parse_line(text, str(path), number, reason_required) for number, text in enumerate(lines, 1))
    return tuple(entry for entry in entries if entry is not None)


@dataclass(frozen=True)
class Expectations:
    """The skip and xfail entries of a run; empty means every case runs and is judged as is."""

    skips: tuple[Entry, ...] = ()
    xfails: tuple[Entry, ...] = ()

    def skip_for(self, case_id: str, dtype: str | None = None) -> Entry | None:
        """The first skip entry matching ``case_id`` in a run at ``dtype``, or None."""
        return _first_match(self.skips, case_id, dtype)

    def xfail_for(self, case_id: str, dtype: str | None = None) -> Entry | None:
        """The first xfail entry matching ``case_id`` in a run at ``dtype``, or None."""
        return _first_match(self.xfails, case_id, dtype)

    def unmatched(self, case_ids) -> list[Entry]:
        """Entries (skips, then xfails) that match none of ``case_ids``."""
        ids = list(case_ids)
        return [e for e in (*self.skips, *self.xfails) if not any(fnmatch.fnmatchcase(i, e.pattern) for i in ids)]


def _first_match(entries: tuple[Entry, ...], case_id: str, dtype: str | None) -> Entry | None:
    return next((entry for entry in entries if entry.applies(case_id, dtype)), None)


def load_expectations(skip_files=(), xfail_files=()) -> Expectations:
    """Read every skip and xfail file (each option may be given several times).

    Raises:
        ExpectationError: a file cannot be read or has a malformed line.
    """
    skips = tuple(entry for path in skip_files for entry in parse_file(path, reason_required=False))
    xfails = tuple(entry for path in xfail_files for entry in parse_file(path, reason_required=True))
    return Expectations(skips, xfails)
