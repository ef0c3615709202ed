"""The file contract: conformance for engines that are not written in Python.

``llm-conformance export DIR`` writes every selected case as a folder of
safetensors inputs plus a JSON description; the engine reads them, runs, and
writes its outputs as safetensors into a second folder; ``llm-conformance check
--outputs DIR2`` judges those outputs exactly as ``run`` judges a Python backend
(same tolerances, statuses, table, ``--report``, ``--junit``, ``--repro-dir``,
``--compare-to``, skip and xfail files). ``docs/file-contract.md`` is the
engine-side description with a worked example.

Layout written by :func:`export_cases`::

    DIR/CONTRACT.json                 contract version, corpus version, dtype, case list
    DIR/<folder>/case.json            what to run and what to write (see below)
    DIR/<folder>/inputs.safetensors   op cases: the op's array inputs, floating ones in the
                                      export dtype (BF16/F16/F32/F64); model cases: input_ids (I64)
    DIR/<folder>/checkpoint/          model and scenario cases: a copy of the Hugging Face checkpoint

Scenario cases (``docs/scenarios.md``): ``case.json`` carries the ``schedule``;
``inputs.safetensors`` holds ``steps.{i}.input_ids`` (I64 ``(B, n)``) of every prefill and
decode step i and, for a left-padded prompt, ``steps.0.attention_mask`` (I64, 0 on pad slots).

``<folder>`` is the case id with ``/`` replaced by ``__``. The engine answers in
``DIR2/<folder>/``:

* ``outputs.safetensors``: every required output under its name (op cases: the
  names in ``case.json`` ``outputs``; model cases: ``logits``, and for cases with
  ``mtp_depths`` D > 0 the draft logits ``mtp_logits.1`` .. ``mtp_logits.D``, depth k
  of shape ``(B, T-k, V)``; scenario cases: ``steps.{i}.logits`` ``(B, n, V)`` of every
  prefill and decode step, any value on pad slots), optionally the
  named intermediates (``hidden_states.embed``, ``hidden_states.layers.0``, ...,
  ``hidden_states.norm``) which are then compared too and locate a divergence;
  any floating or integer dtype;
* or a text file ``NOT_IMPLEMENTED`` (its text is the reason): status "not implemented";
* or a text file ``ERROR`` (its text is the message): status "error";
* no folder at all: "not implemented" (no outputs written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .backends.base import BackendOutput
from .errors import ConformanceError, OutputError
from .manifest import (
    MTP_PREFIX, STEP_PREFIX, Case, inside, load_case_data, load_case_mtp_logits, load_op_data, load_scenario_data,
)
from .repro import bundle_name
from .runner import cast_input

#: Version of the layout above; bumped on any incompatible change.
CONTRACT_VERSION = 1
CONTRACT_FILE = "CONTRACT.json"
CASE_FILE = "case.json"
INPUTS_FILE = "inputs.safetensors"
OUTPUTS_FILE = "outputs.safetensors"
NOT_IMPLEMENTED_FILE = "NOT_IMPLEMENTED"
ERROR_FILE = "ERROR"
HIDDEN_PREFIX = "hidden_states."


def _spec(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.name, "shape": list(array.shape)}


def _prepare_export_dir(path: Path) -> None:
    """Create ``path``; refuse a non-empty directory (stale cases would be mistaken for new ones)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConformanceError(f"export directory {path} exists and is not empty; give a new or empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConformanceError(f"cannot create export directory {path} ({exc})") from None


def export_case(root: Path, case: Case, golden_dir: Path, dtype: str) -> dict:
    """Write one case's folder under ``root``; returns its entry for ``CONTRACT.json``."""
    folder = root / bundle_name(case.id)
    folder.mkdir(parents=True)
    info = {"id": case.id, "level": case.level, "dtype": dtype, "description": case.description,
            "outputs_file": OUTPUTS_FILE}
    if case.level == "op":
        data = load_op_data(golden_dir, case)
        inputs = {name: np.ascontiguousarray(cast_input(array, dtype)) for name, array in data.inputs.items()}
        expected = {k: v for k, v in data.expected.items() if "@" not in k}
        info.update(op=case.op, params=data.params,
                    inputs={name: _spec(array) for name, array in inputs.items()},
                    outputs={name: {"shape": list(v.shape)} for name, v in expected.items()},
                    optional_outputs={})
    elif case.level == "scenario":
        steps = [step for step in load_scenario_data(golden_dir, case) if step.op != "rollback"]
        inputs = {f"{step.name}.input_ids": np.ascontiguousarray(step.input_ids) for step in steps}
        if steps[0].attention_mask is not None:
            inputs[f"{steps[0].name}.attention_mask"] = np.ascontiguousarray(steps[0].attention_mask)
        shutil.copytree(inside(golden_dir, case.checkpoint, f"case {case.id}"), folder / "checkpoint")
        info.update(architecture=case.architecture, checkpoint="checkpoint",
                    schedule=[entry.to_json() for entry in case.schedule],
                    inputs={name: _spec(array) for name, array in inputs.items()},
                    outputs={f"{step.name}.logits": {"shape": list(step.logits.shape)} for step in steps},
                    optional_outputs={})
    else:
        input_ids, logits, hidden = load_case_data(golden_dir, case)
        drafts = load_case_mtp_logits(golden_dir, case)
        inputs = {"input_ids": np.ascontiguousarray(input_ids)}
        shutil.copytree(inside(golden_dir, case.checkpoint, f"case {case.id}"), folder / "checkpoint")
        info.update(architecture=case.architecture, checkpoint="checkpoint", mtp_depths=case.mtp_depths,
                    inputs={"input_ids": _spec(input_ids)},
                    outputs={"logits": {"shape": list(logits.shape)},
                             **{name: {"shape": list(v.shape)} for name, v in drafts.items()}},
                    optional_outputs={HIDDEN_PREFIX + k: {"shape": list(v.shape)} for k, v in hidden.items()})
    save_file(inputs, str(folder / INPUTS_FILE))
    (folder / CASE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {"id": case.id, "level": case.level, "folder": folder.name}


def export_cases(root: Path, cases: list[Case], golden_dir, dtype: str, corpus_version: str) -> int:
    """Write ``cases`` in the file-contract layout under ``root`` (created; must be new or empty).

    Returns:
        The number of case folders written.

    Raises:
        ConformanceError: ``root`` is not empty or cannot be written.
        ManifestError: a case's golden data is malformed.
    """
    _prepare_export_dir(root)
    golden_dir = Path(golden_dir)
    try:
        entries = [export_case(root, case, golden_dir, dtype) for case in cases]
        contract = {"contract_version": CONTRACT_VERSION, "corpus_version": corpus_version, "dtype": dtype,
                    "cases": entries}
        (root / CONTRACT_FILE).write_text(json.dumps(contract, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConformanceError(f"cannot write the export in {root} ({exc})") from None
    return len(entries)


def read_contract(export_dir) -> dict:
    """``CONTRACT.json`` of an export directory, checked.

    Raises:
        ConformanceError: the file is missing, not a regular file, unreadable, of another
            contract version, or malformed.
    """
    path = Path(export_dir) / CONTRACT_FILE
    # A FIFO or device would block the read (or never end).
    if path.exists() and not path.is_file():
        raise ConformanceError(f"cannot read {path} (not a regular file); is {export_dir} an llm-conformance export?")
    try:
        contract = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConformanceError(f"cannot read {path} ({exc}); is {export_dir} an llm-conformance export?") from None
    if not isinstance(contract, dict) or contract.get("contract_version") != CONTRACT_VERSION:
        found = contract.get("contract_version") if isinstance(contract, dict) else None
        raise ConformanceError(f"{path}: contract_version {found!r}, this version reads {CONTRACT_VERSION}")
    cases = contract.get("cases")
    if (contract.get("dtype") not in ("float64", "float32", "float16", "bfloat16") or not isinstance(cases, list)
            or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cases)):
        raise ConformanceError(f"{path}: malformed (needs 'dtype' and a 'cases' list of objects with an 'id')")
    return contract


class _FileModel:
    """The outputs an engine wrote for one model case, served as a loaded model."""

    def __init__(self, backend: "FileOutputsBackend", case: Case):
        self.backend, self.case = backend, case

    def run(self, input_ids: np.ndarray) -> BackendOutput:
        tensors = self.backend.read_outputs(self.case)
        if "logits" not in tensors:
            raise OutputError(f"{self.backend.outputs_file(self.case)} has no tensor 'logits' "
                              f"(it holds {', '.join(sorted(tensors)) or 'nothing'})")
        hidden = {k[len(HIDDEN_PREFIX):]: v for k, v in tensors.items() if k.startswith(HIDDEN_PREFIX)}
        depths = sorted(int(k[len(MTP_PREFIX):]) for k in tensors
                        if k.startswith(MTP_PREFIX) and k[len(MTP_PREFIX):].isdigit())
        if depths and depths != list(range(1, len(depths) + 1)):
            raise OutputError(f"{self.backend.outputs_file(self.case)}: draft logits must be mtp_logits.1 .. "
                              f"mtp_logits.D without gaps, got depths {depths}")
        drafts = [tensors[f"{MTP_PREFIX}{k}"] for k in depths] or None
        return BackendOutput(logits=tensors["logits"], hidden_states=hidden or None, mtp_logits=drafts)

    # A scenario: the state is the index of the last schedule step served; each call returns the
    # logits the engine wrote for the next prefill or decode step.
    def _step_logits(self, index: int):
        name = f"{STEP_PREFIX}{index}.logits"
        tensors = self.backend.read_outputs(self.case)
        if name not in tensors:
            raise OutputError(f"{self.backend.outputs_file(self.case)} has no tensor '{name}'")
        return tensors[name], index

    def prefill(self, input_ids, attention_mask):
        return self._step_logits(0)

    def uncompared_outputs(self) -> list[str]:
        """The tensors of ``outputs.safetensors`` that this case does not read: for a scenario,
        all but the ``steps.{i}.logits`` of its prefill and decode steps; for a model case, all but
        ``logits``, ``hidden_states.*`` and ``mtp_logits.{k}`` (the runner lists them as not compared)."""
        tensors = self.backend.read_outputs(self.case)
        if self.case.level == "scenario":
            read = {f"{STEP_PREFIX}{i}.logits" for i, step in enumerate(self.case.schedule) if step.op != "rollback"}
        else:
            read = {name for name in tensors if name == "logits" or name.startswith(HIDDEN_PREFIX)
                    or (name.startswith(MTP_PREFIX) and name[len(MTP_PREFIX):].isdigit())}
        return sorted(set(tensors) - read)

    def decode(self, input_ids, state: int):
        return self._step_logits(state + 1)

    def rollback(self, state: int, num_tokens: int) -> int:
        return state + 1


class FileOutputsBackend:
    """A backend whose results are files an engine wrote (``llm-conformance check``).

    The runner asks ``supports(case, dtype)`` right before it runs each case; this
    backend remembers that case, so that ``load_model(...).run(...)`` and the op
    callables return the outputs written for it. ``ops`` offers every op of the
    suite; which cases an engine implements is decided by the folders it wrote.

    Args:
        outputs_dir: the engine's output directory (``DIR2`` above).

    Raises:
        ConformanceError: ``outputs_dir`` is not a directory.
    """

    name = "files"

    def __init__(self, outputs_dir):
        self.outputs_dir = Path(outputs_dir)
        if not self.outputs_dir.is_dir():
            raise ConformanceError(f"--outputs {self.outputs_dir} is not a directory")
        self._case: Case | None = None

    def folder(self, case: Case) -> Path:
        return self.outputs_dir / bundle_name(case.id)

    def outputs_file(self, case: Case) -> Path:
        return self.folder(case) / OUTPUTS_FILE

    def supports(self, case: Case, dtype: str) -> bool | str:
        self._case = case
        folder = self.folder(case)
        if not folder.is_dir():
            return f"no outputs written for this case ({folder} is absent)"
        marker = folder / NOT_IMPLEMENTED_FILE
        if marker.is_file():
            reason = marker.read_text(encoding="utf-8", errors="replace").strip()
            return reason or f"the engine wrote {NOT_IMPLEMENTED_FILE} without a reason"
        return True

    def read_outputs(self, case: Case) -> dict[str, np.ndarray]:
        """The tensors the engine wrote for ``case``.

        Raises:
            RuntimeError: the engine wrote an ``ERROR`` file (its text is the message).
            OutputError: ``outputs.safetensors`` is missing or unreadable.
        """
        folder = self.folder(case)
        if (folder / ERROR_FILE).is_file():
            text = (folder / ERROR_FILE).read_text(encoding="utf-8", errors="replace").strip()
            raise RuntimeError(f"the engine reported: {text or 'an error (empty ERROR file)'}")
        path = folder / OUTPUTS_FILE
        if not path.is_file():
            raise OutputError(f"{path} is missing (write it, or {NOT_IMPLEMENTED_FILE} or {ERROR_FILE})")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise OutputError(f"cannot read {path} ({exc})") from None

    def _current(self) -> Case:
        if self._case is None:
            raise ConformanceError("FileOutputsBackend: supports(case) must be called before a case runs")
        return self._case

    def load_model(self, checkpoint_dir: Path, dtype: str) -> _FileModel:
        return _FileModel(self, self._current())

    def _op(self, **_inputs_and_params):
        return self.read_outputs(self._current())

    @property
    def ops(self) -> dict:
        from refimpl.ops import OPS

        return {name: self._op for name in OPS}

    def stray_folders(self, case_ids) -> list[str]:
        """Folders in the outputs directory that belong to none of ``case_ids`` (the export's or the
        corpus's: likely a typo)."""
        known = {bundle_name(case_id) for case_id in case_ids}
        return sorted(p.name for p in self.outputs_dir.iterdir() if p.is_dir() and p.name not in known)

    def package_versions(self) -> dict[str, str]:
        path = self.outputs_dir / "ENGINE.json"
        if not path.is_file():
            return {}
        try:
            return {str(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
        except (json.JSONDecodeError, AttributeError, OSError) as exc:
            return {"error": f"cannot read {path} ({exc})"}
