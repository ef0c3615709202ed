"""The golden corpus: its manifest, file integrity and case data.

A golden directory holds ``MANIFEST.json``::

    {"corpus_version": "0.1.0", "generator": "tools/make_goldens.py", "generator_version": 1,
     "cases": [{"id": "qwen3/tied-mqa", "level": "model", "architecture": "Qwen3ForCausalLM",
                "description": "...", "seed": 3, "tolerance_class": "model_logits",
                "config_summary": {...},
                "checkpoint": "qwen3/tied-mqa/checkpoint",      # Hugging Face checkpoint dir
                "data": "qwen3/tied-mqa/io.safetensors",
                "files": {"<relative path>": "<sha256 hex>", ...},
                "reference_error": {"float32": {"logits": {"rel_rms": 2.4e-07, "max_abs": 1.1e-06},
                                                "layers.0": {...}, ...}, "bfloat16": {...}}}]}

Every path is relative to the golden directory and must stay inside it. ``reference_error``
(optional) records, per lower dtype the reference ran in, its own error on every compared
output (``Case.reference_error``; ``docs/golden-format.md``). The data
file holds ``input_ids`` int64 ``(B, T)``, ``logits`` float64 ``(B, T, V)`` and
``hidden_states.<tap>`` float64 ``(B, T, M)`` for the taps ``embed``,
``layers.{l}`` and ``norm``. A model case whose manifest entry has ``"mtp_depths": D``
(D > 0) also holds the multi-token-prediction draft logits ``mtp_logits.{k}`` float64
``(B, T-k, V)`` for k = 1..D (row i predicts token ``t_{i+k+1}``; ``refimpl.mtp``).

A scenario case (``"level": "scenario"``) replays a schedule of incremental calls on a
checkpoint (often another case's: the entry then also names it in ``checkpoint_of``)::

    {"id": "scenario/qwen3/speculative", "level": "scenario", "architecture": "Qwen3ForCausalLM",
     "checkpoint": "qwen3/sliding-window/checkpoint", "checkpoint_of": "qwen3/sliding-window",
     "data": "scenario/qwen3/speculative/steps.safetensors", "batch": 2,
     "schedule": [{"op": "prefill", "num_tokens": 6}, {"op": "decode", "num_tokens": 4},
                  {"op": "rollback", "num_tokens": 2}, {"op": "decode", "num_tokens": 1}], ...}

Its data file holds, for every prefill or decode step i of the schedule,
``steps.{i}.input_ids`` int64 ``(B, n)`` and the expected ``steps.{i}.logits`` float64
``(B, n, V)``, and ``steps.0.attention_mask`` int64 ``(B, n)`` when the prompt is
left-padded (0 on pad slots, whose logits are not compared; the file holds NaN there).
See ``docs/scenarios.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

import conformance

from .errors import HashMismatchError, ManifestError
from .tolerances import REFERENCE_DTYPES, RecordedError

MANIFEST_NAME = "MANIFEST.json"
GOLDEN_ENV = "LLM_CONFORMANCE_GOLDEN"
HIDDEN_PREFIX = "hidden_states."
#: Name prefix of the multi-token-prediction draft logits in a model case's data file.
MTP_PREFIX = "mtp_logits."
INPUT_PREFIX = "inputs."
OUTPUT_PREFIX = "outputs."
#: Case levels: a whole model from a checkpoint, one named op, or a schedule of incremental
#: calls (prefill, decode, rollback) on a checkpoint.
LEVELS = ("model", "op", "scenario")
#: Levels whose cases run a checkpoint (``architecture`` and ``checkpoint`` are set).
CHECKPOINT_LEVELS = ("model", "scenario")
#: Operations of a scenario schedule.
SCHEDULE_OPS = ("prefill", "decode", "rollback")
#: Name prefix of a scenario's per-step tensors: ``steps.{i}.input_ids``, ``steps.{i}.logits``,
#: ``steps.0.attention_mask``.
STEP_PREFIX = "steps."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A case id: ``/``-separated names of letters, digits and ``._+-``, each starting with a
#: letter or digit (ids become report rows and repro / export folder names).
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
MAX_CASE_ID_CHARS = 200


@dataclass(frozen=True)
class Case:
    """One golden case, as listed in the manifest.

    Attributes:
        id: unique name, e.g. ``"qwen3/tied-mqa"`` or ``"op/attention/sinks"``.
        level: ``"model"`` (a whole forward from a checkpoint) or ``"op"`` (one component).
        architecture: the config.json ``architectures`` entry (model cases; None for ops).
        tolerance_class: first key of ``conformance.tolerances.TOLERANCES``.
        checkpoint: checkpoint directory, relative to the golden directory (model cases).
        data: the inputs/expected-outputs safetensors file, relative likewise.
        op: the op name of ``refimpl.ops.OPS`` (op cases; None for models).
        files: ``{relative path: sha256 hex}`` of every file the case depends on.
        description, seed, config_summary: provenance, shown to users only.
        mtp_depths: model cases only: how many multi-token-prediction depths the expected
            outputs include (``mtp_logits.1`` .. ``mtp_logits.{D}``); 0 for none.
        schedule: scenario cases only: the :class:`ScheduleStep` calls, in order.
        checkpoint_of: scenario cases only: the id of the model case whose checkpoint the
            scenario runs, or None when it has its own.
        batch: scenario cases only: the rows B of every step, as the manifest entry's
            optional ``batch`` states it (checked against the data file); None when absent.
        shapes: the input shapes the manifest entry declares, ``{name: shape}``: an op
            case's ``inputs``, a model case's ``input_ids`` (from ``input_shape``); empty when
            absent. For backends that size their work before loading anything (informative
            only: the data file's own shapes are what runs).
        reference_error: the reference's own error against the float64 expected outputs when
            it runs in a lower dtype, ``{dtype: {output name: RecordedError}}`` for the dtypes of
            ``conformance.tolerances.REFERENCE_DTYPES`` the generator could run it in (the
            manifest entry's optional ``reference_error``; empty when absent). The error model
            judges a backend's error against it (``conformance.tolerances``).
    """

    id: str
    level: str
    architecture: str | None
    tolerance_class: str
    checkpoint: str | None
    data: str
    files: dict[str, str]
    op: str | None = None
    description: str = ""
    seed: int | None = None
    config_summary: dict = field(default_factory=dict)
    mtp_depths: int = 0
    schedule: tuple = ()
    checkpoint_of: str | None = None
    batch: int | None = None
    shapes: dict = field(default_factory=dict)
    reference_error: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleStep:
    """One call of a scenario schedule.

    Attributes:
        op: ``"prefill"`` (the first step, once), ``"decode"`` (``num_tokens`` >= 1 new
            tokens per row: one is a decode, several a chunked-prefill piece or a speculative
            verification) or ``"rollback"`` (forget the last ``num_tokens`` tokens, at most
            those of the step just before; no logits).
        num_tokens: tokens the step adds (prefill, decode) or removes (rollback), per row.
    """

    op: str
    num_tokens: int

    def to_json(self) -> dict:
        return {"op": self.op, "num_tokens": self.num_tokens}


def check_schedule(raw, where: str) -> tuple[ScheduleStep, ...]:
    """A scenario schedule (a JSON list of ``{"op", "num_tokens"}`` objects) checked.

    Rules: one ``prefill``, first; ``decode`` and ``prefill`` add n >= 1 tokens; a
    ``rollback`` of r >= 1 tokens follows a prefill or decode step of n >= r tokens and
    leaves at least one token (a rollback right after the prefill: fewer than n).

    Raises:
        ManifestError: naming ``where``, the step and the broken rule.
    """
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ManifestError(f"{where}: schedule must be a non-empty list of steps, got {raw!r}")
    steps = []
    for i, entry in enumerate(raw):
        if isinstance(entry, ScheduleStep):
            entry = entry.to_json()
        if not isinstance(entry, dict) or set(entry) != {"op", "num_tokens"}:
            raise ManifestError(f"{where}: schedule[{i}] must be an object with keys 'op' and 'num_tokens', "
                                f"got {entry!r}")
        op, n = entry["op"], entry["num_tokens"]
        if op not in SCHEDULE_OPS:
            raise ManifestError(f"{where}: schedule[{i}]: op must be one of {', '.join(SCHEDULE_OPS)}, got {op!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ManifestError(f"{where}: schedule[{i}]: num_tokens must be an integer >= 1, got {n!r}")
        if (op == "prefill") != (i == 0):
            raise ManifestError(f"{where}: schedule[{i}]: the schedule starts with one prefill and has no other")
        if op == "rollback":
            before = steps[-1]
            if before.op == "rollback" or n > before.num_tokens or (before.op == "prefill" and n >= before.num_tokens):
                raise ManifestError(f"{where}: schedule[{i}]: a rollback of {n} token(s) must follow a prefill or "
                                    f"decode step that added more (prefill) or at least as many (decode); the step "
                                    f"before is {before.op} {before.num_tokens}")
        steps.append(ScheduleStep(op, n))
    return tuple(steps)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``MANIFEST.json``: corpus provenance and its cases."""

    corpus_version: str
    generator: str
    generator_version: int | None
    cases: list[Case]


def default_golden_dir() -> Path:
    """The golden directory to use when none is given.

    ``$LLM_CONFORMANCE_GOLDEN`` if set; else ``./golden`` if it has a manifest; else
    the ``golden/`` directory next to the installed ``conformance`` package.

    Raises:
        ManifestError: the chosen directory has no ``MANIFEST.json`` (the places
            searched are named).
    """
    if os.environ.get(GOLDEN_ENV):
        chosen = Path(os.environ[GOLDEN_ENV])
        if not (chosen / MANIFEST_NAME).is_file():
            raise ManifestError(f"${GOLDEN_ENV}={chosen} has no {MANIFEST_NAME}")
        return chosen
    candidates = [Path("golden"), Path(conformance.__file__).resolve().parents[1] / "golden"]
    for candidate in candidates:
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise ManifestError(f"no golden corpus found (looked in {searched}); pass --golden-dir or set ${GOLDEN_ENV}")


def shadowing_note(golden_dir: Path) -> str | None:
    """A note when :func:`default_golden_dir` chose ``./golden`` while another corpus sits beside
    the package (a repository's own ``golden/`` folder silently taking the suite's place); it
    names both corpus versions. None otherwise."""
    packaged = Path(conformance.__file__).resolve().parents[1] / "golden"
    if Path(golden_dir) != Path("golden") or not (packaged / MANIFEST_NAME).is_file() \
            or packaged.resolve() == Path(golden_dir).resolve():
        return None

    def version(root: Path) -> str:
        try:
            return str(json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8")).get("corpus_version", "?"))
        except (OSError, ValueError, AttributeError):
            return "?"

    return (f"note: using ./golden (corpus {version(Path(golden_dir))}) from the current directory, not the corpus "
            f"beside the package, {packaged} (corpus {version(packaged)}); pass --golden-dir to choose")


def inside(golden_dir: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` against ``golden_dir``, refusing paths that leave it.

    Raises:
        ManifestError: ``relative`` is empty, holds a NUL character, is absolute, or
            escapes ``golden_dir`` (with ``..`` or through a symlink).
    """
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{what}: path must be a non-empty string, got {relative!r}")
    if "\0" in relative:
        raise ManifestError(f"{what}: path {relative!r} contains a NUL character")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        raise ManifestError(f"{what}: path '{relative}' is absolute; paths must be relative to the golden directory")
    root = Path(golden_dir).resolve()
    resolved = (root / relative).resolve()
    if ".." in PurePosixPath(relative).parts or (resolved != root and root not in resolved.parents):
        raise ManifestError(f"{what}: path '{relative}' leads outside the golden directory {golden_dir}")
    return resolved


def read_manifest(golden_dir) -> Manifest:
    """Parse and validate ``golden_dir/MANIFEST.json``.

    Raises:
        ManifestError: the file is missing, not a regular file, unreadable, not JSON,
            lacks a field, has a field of the wrong type, repeats a case id or has a
            malformed one, or names a path outside ``golden_dir``.
    """
    path = Path(golden_dir) / MANIFEST_NAME
    # A FIFO or device would block the read (or never end).
    if path.exists() and not path.is_file():
        raise ManifestError(f"{path}: cannot read manifest (not a regular file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit
        raise ManifestError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    cases_raw = _field(raw, "cases", list, str(path))
    if not cases_raw:
        raise ManifestError(f"{path}: lists no cases")
    cases = [_parse_case(golden_dir, entry, f"{path}: cases[{i}]") for i, entry in enumerate(cases_raw)]
    ids = [case.id for case in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ManifestError(f"{path}: case id(s) listed more than once: {', '.join(repeated)}")
    return Manifest(
        corpus_version=_field(raw, "corpus_version", str, str(path)),
        generator=raw.get("generator", ""),
        generator_version=raw.get("generator_version"),
        cases=cases,
    )


def load_manifest(golden_dir) -> list[Case]:
    """The cases of ``golden_dir/MANIFEST.json``, in manifest order (see :func:`read_manifest`)."""
    return read_manifest(golden_dir).cases


def _field(raw: dict, key: str, kind: type, where: str):
    """``raw[key]`` checked to be a ``kind`` (str, list or dict); raises ManifestError naming ``where``."""
    if key not in raw:
        raise ManifestError(f"{where}: missing field '{key}'")
    if not isinstance(raw[key], kind):
        raise ManifestError(f"{where}: field '{key}' must be a {kind.__name__}, got {raw[key]!r}")
    return raw[key]


def _parse_case(golden_dir, raw, where: str) -> Case:
    """Build a :class:`Case` from one manifest entry, checking types and paths."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
    if isinstance(raw.get("id"), str) and (len(raw["id"]) > MAX_CASE_ID_CHARS or not _CASE_ID.match(raw["id"])):
        raise ManifestError(f"{where}: case id {raw['id'][:MAX_CASE_ID_CHARS]!r} must be '/'-separated names of "
                            f"letters, digits and ._+- (each starting with a letter or digit), at most "
                            f"{MAX_CASE_ID_CHARS} characters")
    where = f"{where} ({raw['id']})" if isinstance(raw.get("id"), str) else where
    files = _field(raw, "files", dict, where)
    for name, digest in files.items():
        inside(golden_dir, name, f"{where}: files")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"{where}: files['{name}'] must be a lowercase sha256 hex digest, got {digest!r}")
    level = _field(raw, "level", str, where)
    if level not in LEVELS:
        raise ManifestError(f"{where}: level must be one of {', '.join(LEVELS)}, got {level!r}")
    model = level in CHECKPOINT_LEVELS
    scenario = level == "scenario"
    case = Case(
        **{key: _field(raw, key, str, where) for key in ("id", "tolerance_class")},
        level=level,
        architecture=_field(raw, "architecture", str, where) if model else None,
        checkpoint=_field(raw, "checkpoint", str, where) if model else None,
        op=None if model else _field(raw, "op", str, where),
        data=_field(raw, "data", str, where),
        files=dict(files),
        description=_field(raw, "description", str, where) if "description" in raw else "",
        seed=raw.get("seed"),
        config_summary=_field(raw, "config_summary", dict, where) if "config_summary" in raw else {},
        mtp_depths=_mtp_depths(raw, level == "model", where),
        schedule=check_schedule(_field(raw, "schedule", list, where), where) if scenario else (),
        checkpoint_of=_field(raw, "checkpoint_of", str, where) if scenario and "checkpoint_of" in raw else None,
        batch=_batch(raw, where) if scenario else None,
        shapes=_shapes(raw, where),
        reference_error=_reference_error(raw, where),
    )
    if model:
        inside(golden_dir, case.checkpoint, f"{where}: checkpoint")
    inside(golden_dir, case.data, f"{where}: data")
    # An unlisted data file would be read without its integrity being checked.
    if case.data not in files:
        raise ManifestError(f"{where}: data file '{case.data}' is not listed in 'files'")
    return case


def _shapes(raw: dict, where: str) -> dict[str, tuple[int, ...]]:
    """The optional declared input shapes: ``inputs`` (op cases) and ``input_shape`` (model cases)."""
    declared = dict(raw.get("inputs") or {}) if isinstance(raw.get("inputs"), dict) else {}
    if "input_shape" in raw:
        declared["input_ids"] = raw["input_shape"]
    shapes = {}
    for name, shape in declared.items():
        if (not isinstance(shape, list) or len(shape) > 8
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape)):
            raise ManifestError(f"{where}: the declared shape of '{name}' must be a list of at most 8 integers "
                                f">= 0, got {shape!r}")
        shapes[str(name)] = tuple(shape)
    return shapes


def _reference_error(raw: dict, where: str) -> dict[str, dict[str, RecordedError]]:
    """The optional ``reference_error`` of a case: ``{dtype: {output: {"rel_rms": r, "max_abs": m}}}``
    with dtypes among :data:`~conformance.tolerances.REFERENCE_DTYPES` (float64 is the specification
    itself: it has none) and finite numbers >= 0; ``{}`` when absent.

    Raises:
        ManifestError: one line naming the case and the first malformed part.
    """
    value = raw.get("reference_error", {})
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: field 'reference_error' must be an object of dtype to outputs, got {value!r}")
    recorded = {}
    for dtype, outputs in value.items():
        if dtype not in REFERENCE_DTYPES:
            raise ManifestError(f"{where}: reference_error: dtype {dtype!r} is not one of "
                                f"{', '.join(REFERENCE_DTYPES)} (float64 is the specification: it has no reference "
                                "error)")
        if not isinstance(outputs, dict) or not outputs:
            raise ManifestError(f"{where}: reference_error.{dtype} must be a non-empty object of output name to "
                                f"{{\"rel_rms\", \"max_abs\"}}, got {outputs!r}")
        recorded[dtype] = {name: _recorded_error(numbers, f"{where}: reference_error.{dtype}.{name}")
                           for name, numbers in outputs.items()}
    return recorded


def _recorded_error(numbers, where: str) -> RecordedError:
    """``{"rel_rms": r, "max_abs": m}`` checked: exactly those keys, finite numbers >= 0."""
    if not isinstance(numbers, dict) or set(numbers) != {"rel_rms", "max_abs"}:
        raise ManifestError(f"{where} must be an object with keys 'rel_rms' and 'max_abs', got {numbers!r}")
    for key, number in numbers.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number < 0:
            raise ManifestError(f"{where}: '{key}' must be a finite number >= 0, got {number!r}")
    return RecordedError(rel_rms=float(numbers["rel_rms"]), max_abs=float(numbers["max_abs"]))


def _batch(raw: dict, where: str) -> int | None:
    """The optional ``batch`` of a scenario case: an integer >= 1, None when absent."""
    value = raw.get("batch")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ManifestError(f"{where}: field 'batch' must be an integer >= 1, got {value!r}")
    return value


def _mtp_depths(raw: dict, model: bool, where: str) -> int:
    """The optional ``mtp_depths`` of a model case: a non-negative integer, 0 when absent."""
    value = raw.get("mtp_depths", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{where}: field 'mtp_depths' must be a non-negative integer, got {value!r}")
    if value and not model:
        raise ManifestError(f"{where}: field 'mtp_depths' belongs to model cases only")
    return value


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_checkpoint_listed(golden_dir: Path, case: Case) -> None:
    """Every file of the case's checkpoint directory must be listed (and so hashed)."""
    if case.checkpoint is None:
        return
    checkpoint = inside(golden_dir, case.checkpoint, f"case {case.id}")
    if not checkpoint.is_dir():
        raise ManifestError(f"case {case.id}: checkpoint directory '{case.checkpoint}' is missing from {golden_dir}")
    for path in sorted(checkpoint.rglob("*")):
        name = path.relative_to(golden_dir.resolve()).as_posix()
        # rglob does not descend into symlinked folders: a link must not lead outside either.
        if path.is_symlink():
            inside(golden_dir, name, f"case {case.id}: checkpoint entry")
        if path.is_dir():
            continue
        if not path.is_file():
            raise ManifestError(f"case {case.id}: checkpoint entry '{name}' is not a regular file")
        if name not in case.files:
            raise ManifestError(f"case {case.id}: checkpoint file '{name}' is not listed (with its sha256) in 'files'")


def verify_case_files(golden_dir, case: Case) -> None:
    """Check the sha256 of every file ``case`` lists, and that its checkpoint has no unlisted file.

    Raises:
        ManifestError: a listed file is missing, not a regular file or unreadable; a
            checkpoint file is not listed, or a checkpoint entry is a symlink leading
            outside the golden directory or something other than a file or folder (it is named).
        HashMismatchError: a file's content differs from the manifest (the file
            and both hashes are named).
    """
    _check_checkpoint_listed(Path(golden_dir), case)
    for name, expected in case.files.items():
        path = inside(golden_dir, name, f"case {case.id}")
        # A FIFO or device would block the read (or never end).
        if path.exists() and not path.is_file():
            raise ManifestError(f"case {case.id}: listed file '{name}' is not a regular file")
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ManifestError(f"case {case.id}: listed file '{name}' is missing from {golden_dir}") from None
        except OSError as exc:
            raise ManifestError(f"case {case.id}: cannot read '{name}' ({exc})") from None
        if actual != expected:
            raise HashMismatchError(
                f"case {case.id}: '{name}' has sha256 {actual}, the manifest records {expected}"
            )


def load_case_data(golden_dir, case: Case) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Read a case's inputs and expected outputs.

    Returns:
        ``(input_ids, expected_logits, expected_hidden)``: int64 ``(B, T)``,
        float64 ``(B, T, V)`` and ``{tap: float64 (B, T, M)}`` with the
        ``hidden_states.`` prefix removed from the tap names.

    Raises:
        ManifestError: the file is unreadable, lacks ``input_ids`` or ``logits``, holds
            arrays of the wrong rank, dtype kind or leading shape, or token ids that are
            negative or not below the checkpoint config.json's ``vocab_size``; or the case's
            ``architecture`` differs from that config.json's ``architectures`` entry.
    """
    path = inside(golden_dir, case.data, f"case {case.id}")
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"case {case.id}: cannot read '{case.data}' ({exc})") from None
    for key in ("input_ids", "logits"):
        if key not in tensors:
            raise ManifestError(f"case {case.id}: '{case.data}' lacks tensor '{key}'")
    input_ids, logits = tensors["input_ids"], tensors["logits"]
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise ManifestError(
            f"case {case.id}: input_ids must be a 2-D integer array, got {input_ids.dtype} {input_ids.shape}"
        )
    _check_input_ids(golden_dir, case, input_ids)
    hidden = {k[len(HIDDEN_PREFIX):]: v for k, v in tensors.items() if k.startswith(HIDDEN_PREFIX)}
    for name, array in {"logits": logits, **hidden}.items():
        if array.ndim != 3 or array.shape[:2] != input_ids.shape or not np.issubdtype(array.dtype, np.floating):
            raise ManifestError(
                f"case {case.id}: '{name}' must be a float array (B, T, ...) with (B, T) = {input_ids.shape}, "
                f"got {array.dtype} {array.shape}"
            )
    return input_ids.astype(np.int64), logits.astype(np.float64), {k: v.astype(np.float64) for k, v in hidden.items()}


def _check_input_ids(golden_dir, case: Case, input_ids: np.ndarray, name: str = "input_ids") -> None:
    """Refuse empty ids, negative ids and ids at or above the checkpoint's vocab_size, and a
    manifest ``architecture`` that contradicts the checkpoint's config.json.

    Raises:
        ManifestError: naming the case, the tensor (``name``: a scenario's ``steps.{i}.input_ids``)
            and the problem (the first offending id and its position).
    """
    if input_ids.size == 0:
        raise ManifestError(f"case {case.id}: {name} is empty (shape {input_ids.shape})")
    config = _checkpoint_config(golden_dir, case)
    named = config.get("architectures")
    if isinstance(named, list) and len(named) == 1 and isinstance(named[0], str) and named[0] != case.architecture:
        raise ManifestError(f"case {case.id}: the manifest gives architecture '{case.architecture}', its checkpoint's "
                            f"config.json '{named[0]}'")
    text = config.get("text_config")
    vocab = config.get("vocab_size", text.get("vocab_size") if isinstance(text, dict) else None)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        bad, limit = (input_ids < 0) | (input_ids >= vocab), f"[0, {vocab}), the checkpoint's vocab_size"
    else:
        high = np.iinfo(np.int64).max
        bad, limit = (input_ids < 0) | (input_ids > high), f"[0, {high}]"
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ManifestError(f"case {case.id}: {name} holds token id {int(input_ids[at])} at {at}, outside {limit}")


def _checkpoint_config(golden_dir, case: Case) -> dict:
    """The case's checkpoint config.json, or ``{}`` when there is no checkpoint or no readable
    JSON object there (the backend then reports the checkpoint's own problem)."""
    if case.checkpoint is None:
        return {}
    path = inside(golden_dir, case.checkpoint, f"case {case.id}") / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def load_case_mtp_logits(golden_dir, case: Case) -> dict[str, np.ndarray]:
    """A model case's expected multi-token-prediction draft logits (empty when ``mtp_depths`` is 0).

    Returns:
        ``{"mtp_logits.{k}": float64 (B, T-k, V)}`` for k = 1..``case.mtp_depths``.

    Raises:
        ManifestError: the file is unreadable, lacks one of the depths, or holds one of the
            wrong shape (against ``input_ids`` and ``logits``).
    """
    if not case.mtp_depths:
        return {}
    path = inside(golden_dir, case.data, f"case {case.id}")
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"case {case.id}: cannot read '{case.data}' ({exc})") from None
    (batch, length), vocab = tensors["input_ids"].shape, tensors["logits"].shape[-1]
    found = {}
    for k in range(1, case.mtp_depths + 1):
        name = f"{MTP_PREFIX}{k}"
        want = (batch, max(length - k, 0), vocab)
        if name not in tensors:
            raise ManifestError(
                f"case {case.id}: '{case.data}' lacks tensor '{name}' (mtp_depths is {case.mtp_depths})")
        if tensors[name].shape != want or not np.issubdtype(tensors[name].dtype, np.floating):
            raise ManifestError(f"case {case.id}: '{name}' must be a float array of shape {want}, "
                                f"got {tensors[name].dtype} {tensors[name].shape}")
        found[name] = tensors[name].astype(np.float64)
    return found


@dataclass(frozen=True)
class ScenarioStep:
    """One step of a scenario as its data file describes it.

    Attributes:
        index: the step's place in the schedule (``steps.{index}.*`` in the data file).
        op, num_tokens: as :class:`ScheduleStep`.
        tokens_before: slots per row before the step (left-padding slots included).
        input_ids: int64 ``(B, n)`` (None for a rollback).
        attention_mask: int64 ``(B, n)`` 0/1, the left-padded prefill only; else None.
        logits: float64 ``(B, n, V)`` expected (None for a rollback; NaN on pad slots).
    """

    index: int
    op: str
    num_tokens: int
    tokens_before: int
    input_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"{STEP_PREFIX}{self.index}"

    @property
    def label(self) -> str:
        """``"prefill of 6 tokens"``, ``"decode 1 after 12 tokens"``, ``"rollback 3 after 15 tokens"``."""
        if self.op == "prefill":
            return f"prefill of {self.num_tokens} tokens"
        return f"{self.op} {self.num_tokens} after {self.tokens_before} tokens"

    def real(self) -> np.ndarray:
        """``(B, n)`` bool: the slots whose logits are compared (False on left-padding slots)."""
        if self.attention_mask is None:
            return np.ones(self.input_ids.shape, dtype=bool)
        return self.attention_mask.astype(bool)


def load_scenario_data(golden_dir, case: Case) -> list[ScenarioStep]:
    """Read a scenario case's steps: its schedule with each step's ids, mask and expected logits.

    Raises:
        ManifestError: the file is unreadable; a prefill or decode step lacks its
            ``input_ids`` or ``logits`` or has them of the wrong dtype or shape (``(B, n)``
            and ``(B, n, V)``, one B and one V for all steps); a token id outside
            ``[0, vocab_size)`` (the step's tensor is named); NaN or Inf in the expected logits
            at a real (unpadded) position; a step whose rows differ from the manifest entry's
            ``batch``; an ``attention_mask`` that is not 0/1 (the other values are named),
            pads other than on the left, leaves a row without tokens, or sits on another step
            than 0; a rollback leaves a row without real tokens; a tensor the schedule does
            not call for.
    """
    path = inside(golden_dir, case.data, f"case {case.id}")
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"case {case.id}: cannot read '{case.data}' ({exc})") from None
    where = f"case {case.id}: '{case.data}'"
    wanted = set()
    steps, before, shape = [], 0, None
    real = None
    for index, entry in enumerate(case.schedule):
        name = f"{STEP_PREFIX}{index}"
        if entry.op == "rollback":
            steps.append(ScenarioStep(index, entry.op, entry.num_tokens, before))
            before -= entry.num_tokens
            if real is not None and (real - entry.num_tokens < 1).any():
                raise ManifestError(f"{where}: {name} rolls back {entry.num_tokens} token(s), leaving a row without "
                                    "a real token")
            real = None if real is None else real - entry.num_tokens
            continue
        keys = [f"{name}.input_ids", f"{name}.logits"] + ([f"{name}.attention_mask"] if index == 0 else [])
        wanted.update(keys)
        for key in keys[:2]:
            if key not in tensors:
                raise ManifestError(f"{where} lacks tensor '{key}' (schedule step {index}: {entry.op})")
        ids, logits = tensors[keys[0]], tensors[keys[1]]
        batch = ids.shape[0] if ids.ndim == 2 else None
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] != entry.num_tokens \
                or (shape is not None and batch != shape[0]):
            raise ManifestError(f"{where}: '{keys[0]}' must be a 2-D integer array (B, {entry.num_tokens})"
                                f"{'' if shape is None else f' with B = {shape[0]}'}, got {ids.dtype} {ids.shape}")
        vocab = logits.shape[-1] if logits.ndim == 3 else None
        if logits.ndim != 3 or logits.shape[:2] != ids.shape or not np.issubdtype(logits.dtype, np.floating) \
                or (shape is not None and vocab != shape[1]):
            raise ManifestError(f"{where}: '{keys[1]}' must be a float array (B, n, V) with (B, n) = {ids.shape}"
                                f"{'' if shape is None else f' and V = {shape[1]}'}, got {logits.dtype} {logits.shape}")
        if case.batch is not None and batch != case.batch:
            raise ManifestError(f"{where}: '{keys[0]}' has {batch} row(s), the manifest entry's 'batch' is "
                                f"{case.batch}")
        shape = (batch, vocab)
        _check_input_ids(golden_dir, case, ids, keys[0])
        mask = _scenario_mask(tensors.get(keys[2]) if index == 0 else None, ids.shape, where)
        real_slots = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
        poisoned = real_slots[..., None] & ~np.isfinite(logits)
        if poisoned.any():
            at = tuple(int(i) for i in np.argwhere(poisoned)[0])
            raise ManifestError(f"{where}: '{keys[1]}' holds {int(np.count_nonzero(poisoned))} NaN/Inf value(s) at "
                                f"real (unpadded) positions, the first {logits[at]} at {at} (row, slot, vocab); "
                                f"expected logits must be finite where they are compared")
        if real is None:
            real = np.full(batch, 0, dtype=np.int64)
        real = real + (entry.num_tokens if mask is None else mask.sum(axis=1))
        steps.append(ScenarioStep(index, entry.op, entry.num_tokens, before, ids.astype(np.int64), mask,
                                  logits.astype(np.float64)))
        before += entry.num_tokens
    stray = sorted(set(tensors) - wanted)
    if stray:
        raise ManifestError(f"{where}: tensor(s) the schedule does not call for: {', '.join(stray)}")
    return steps


def _scenario_mask(mask, shape: tuple[int, int], where: str) -> np.ndarray | None:
    """``steps.0.attention_mask`` checked: int64 0/1 of ``shape``, left padding only, a token in every row."""
    if mask is None:
        return None
    if mask.shape != shape or not np.issubdtype(mask.dtype, np.integer):
        raise ManifestError(f"{where}: 'steps.0.attention_mask' must be an integer array of shape {shape} (the "
                            f"prompt's ids), got {mask.dtype} {mask.shape}")
    other = ~np.isin(mask, (0, 1))
    if other.any():
        at = tuple(int(i) for i in np.argwhere(other)[0])
        values = ", ".join(str(int(v)) for v in np.unique(mask[other])[:5])
        raise ManifestError(f"{where}: 'steps.0.attention_mask' must hold only 0 (pad) and 1 (token); it holds "
                            f"{values} ({int(np.count_nonzero(other))} value(s), the first at {at})")
    if (np.diff(mask, axis=1) < 0).any() or not mask[:, -1].all():
        raise ManifestError(f"{where}: 'steps.0.attention_mask' may only pad on the left (0s before the 1s of a row)")
    return mask.astype(np.int64)


@dataclass(frozen=True)
class OpCaseData:
    """What an op case's data file holds.

    Attributes:
        inputs: ``{argument name: array}`` (float64, or int64 for integer arguments).
        params: ``{keyword parameter: JSON value}``.
        expected: ``{output name: float64 array}``.
    """

    inputs: dict[str, np.ndarray]
    params: dict
    expected: dict[str, np.ndarray]


def load_op_data(golden_dir, case: Case) -> OpCaseData:
    """Read an op case: ``inputs.<arg>`` and ``outputs.<name>`` tensors, and the
    ``params`` JSON object stored in the file's ``case`` metadata entry.

    Raises:
        ManifestError: the file is unreadable, has no outputs, or its metadata lacks
            a JSON ``params`` object.
    """
    path = inside(golden_dir, case.data, f"case {case.id}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"case {case.id}: cannot read '{case.data}' ({exc})") from None
    try:
        params = json.loads(metadata["case"])["params"]
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ManifestError(f"case {case.id}: '{case.data}' lacks a JSON 'params' object in metadata 'case'") from None
    if not isinstance(params, dict):
        raise ManifestError(f"case {case.id}: params must be a JSON object, got {params!r}")
    inputs = {k[len(INPUT_PREFIX):]: v for k, v in tensors.items() if k.startswith(INPUT_PREFIX)}
    expected = {k[len(OUTPUT_PREFIX):]: v.astype(np.float64) for k, v in tensors.items() if k.startswith(OUTPUT_PREFIX)}
    if not expected:
        raise ManifestError(f"case {case.id}: '{case.data}' holds no 'outputs.*' tensor")
    return OpCaseData(inputs=inputs, params=params, expected=expected)
