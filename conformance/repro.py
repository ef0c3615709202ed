"""Repro bundles: ``llm-conformance run --repro-dir DIR``.

For every failed, nan, errored, crashed or timed-out case, ``DIR/<case id with / as __>/`` gets:

* ``inputs.safetensors``: op cases, the inputs as the backend received them (cast
  to the run dtype; bfloat16 and float16 widened to float32, which is lossless, as
  safetensors' NumPy API cannot store bfloat16); model cases, ``input_ids``.
* ``expected.safetensors``: float64 expected outputs. Op cases: ``<output>``, plus
  ``<output>@<dtype>`` where the corpus records the reference's low-precision result;
  model cases: ``logits`` and ``hidden_states.<tap>`` (and ``mtp_logits.{k}`` for cases with
  multi-token-prediction outputs); scenario cases, ``steps.{i}.logits`` (NaN on pad slots).
  Scenario inputs are ``steps.{i}.input_ids`` and ``steps.0.attention_mask`` (padded prompt).
* ``case.json``: case id, level, op and params (op cases), dtype, the dtype of each
  saved input as passed to the backend, tolerance class and bounds, how each compared
  tensor was judged (``judgements``: rule, bounds, the reference's own error in the dtype,
  the backend's ratio to it) and the headline's three numbers (``error_model``: backend
  error, reference error, ratio, and the bound), backend spec and
  options, status, message, first divergence, the one-line repro command, and for
  model and scenario cases the checkpoint folder: a path relative to the bundle (``checkpoint``)
  and an absolute one (``checkpoint_abs``), and for scenarios the ``schedule`` and the label of
  every step. The checkpoint is referenced, not copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .errors import ConformanceError
from .manifest import Case, inside, load_case_data, load_case_mtp_logits, load_op_data, load_scenario_data
from .report import _jsonable, error_model_numbers, repro_command
from .runner import CaseResult, Status, cast_input

#: Statuses that get a bundle.
BUNDLED = (Status.FAILED, Status.NAN, Status.ERROR, Status.CRASHED, Status.TIMED_OUT)


def bundle_name(case_id: str) -> str:
    """The bundle folder of a case: its id with ``/`` replaced by ``__``."""
    return case_id.replace("/", "__")


def prepare_repro_dir(path: Path) -> None:
    """Create ``path`` if missing and check it is a writable directory (before the run).

    Raises:
        ConformanceError: it cannot be created or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConformanceError(f"cannot create --repro-dir {path} ({exc})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConformanceError(f"cannot write --repro-dir {path}: not a writable directory")


def _stored(array: np.ndarray) -> np.ndarray:
    """An array safetensors can store: bfloat16/float16 widened to float32, contiguous."""
    if array.dtype.name in ("bfloat16", "float16"):
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def _tolerance_json(result: CaseResult):
    return None if result.tolerance is None else dataclasses.asdict(result.tolerance)


def write_bundle(root: Path, case: Case, result: CaseResult, golden_dir: Path, meta: dict) -> Path:
    """Write one case's bundle under ``root``; returns its folder."""
    folder = root / bundle_name(case.id)
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "case_id": case.id, "level": case.level, "dtype": result.dtype,
        "tolerance_class": case.tolerance_class, "tolerance": _tolerance_json(result),
        "error_model": _jsonable(error_model_numbers(result)), "judgements": _jsonable(result.judgements),
        "backend": meta.get("backend"), "backend_spec": meta["backend_spec"],
        "backend_options": meta.get("backend_options", {}),
        "status": result.status.value, "message": result.message,
        "first_divergence": result.first_divergence,
        "golden_dir": meta["golden_dir"], "corpus_version": meta.get("corpus_version"),
        "repro": repro_command(meta, case.id),
    }
    if case.level == "op":
        data = load_op_data(golden_dir, case)
        inputs = {name: cast_input(array, result.dtype) for name, array in data.inputs.items()}
        info.update(op=case.op, params=data.params,
                    input_dtypes={name: array.dtype.name for name, array in inputs.items()})
        expected = {k: v for k, v in data.expected.items() if "@" not in k or k.endswith(f"@{result.dtype}")}
        save_file({name: _stored(a) for name, a in inputs.items()}, str(folder / "inputs.safetensors"))
    else:
        checkpoint = inside(golden_dir, case.checkpoint, f"case {case.id}").resolve()
        try:
            relative = os.path.relpath(checkpoint, folder.resolve())
        except ValueError:  # another drive (Windows)
            relative = str(checkpoint)
        info.update(architecture=case.architecture, checkpoint=Path(relative).as_posix(),
                    checkpoint_abs=str(checkpoint))
        if case.level == "scenario":
            steps = load_scenario_data(golden_dir, case)
            inputs = {f"{s.name}.input_ids": s.input_ids for s in steps if s.op != "rollback"}
            if steps[0].attention_mask is not None:
                inputs["steps.0.attention_mask"] = steps[0].attention_mask
            expected = {f"{s.name}.logits": s.logits for s in steps if s.op != "rollback"}
            info.update(schedule=[entry.to_json() for entry in case.schedule],
                        steps={s.name: s.label for s in steps}, input_dtypes={k: "int64" for k in inputs})
        else:
            input_ids, logits, hidden = load_case_data(golden_dir, case)
            inputs = {"input_ids": input_ids}
            info.update(input_dtypes={"input_ids": "int64"})
            expected = {"logits": logits, **{f"hidden_states.{k}": v for k, v in hidden.items()},
                        **load_case_mtp_logits(golden_dir, case)}
        save_file({k: np.ascontiguousarray(v) for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in expected.items()},
              str(folder / "expected.safetensors"))
    (folder / "case.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return folder


def write_repro_bundles(root: Path, cases: list[Case], results: list[CaseResult], golden_dir, meta: dict) -> int:
    """Write a bundle for every failed or errored result; returns how many.

    Raises:
        ConformanceError: a bundle cannot be written.
    """
    by_id = {case.id: case for case in cases}
    written = 0
    for result in results:
        if result.status in BUNDLED:
            try:
                write_bundle(Path(root), by_id[result.case_id], result, Path(golden_dir), meta)
            except OSError as exc:
                raise ConformanceError(f"cannot write repro bundle for {result.case_id} in {root} ({exc})") from None
            written += 1
    return written
