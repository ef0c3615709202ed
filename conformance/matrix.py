"""``llm-conformance matrix``: which cases each backend offers, as a markdown table.

One row per op (its op cases), one per model family (the model cases whose ids
share the part before the last ``/``, with their architecture) and one per scenario
family (``scenario/<family>``), one column per
backend; a cell is ``k/n``: of the row's n cases, k are supported in the dtype.
Nothing runs: support is probed with :func:`conformance.runner.unsupported_reason`
(the op in the backend's ``ops``, or ``load_model`` for model and scenario cases, and
``supports(case, dtype)``), the check that makes ``run`` report "not implemented".
A scenario counts as supported here even if the loaded model lacks the incremental
capability (``prefill`` / ``decode`` / ``rollback``): those methods belong to the object
``load_model`` returns, so only loading a checkpoint shows them, and the matrix loads
nothing; a note under the table says so whenever it has scenario rows.
A ``supports`` that raises counts as not supported and is noted under the table.
The matrix is an upper bound: an op that raises ``NotImplementedError`` for some
parameters only when called counts as supported here (``run`` reports those cases
"not implemented").
"""

from __future__ import annotations

from .backends.base import Backend

#: Printed under a table with scenario rows.
SCENARIO_NOTE = ("Scenario rows count a case as supported when the backend has load_model and its "
                 "supports() accepts the case; whether the loaded model offers prefill / decode / rollback "
                 "shows only once a checkpoint is loaded, which the matrix does not do: a backend without "
                 "them reports these cases \"not implemented\" in run.")
from .manifest import Case
from .runner import backend_ops, one_line, unsupported_reason


def _rows(cases: list[Case]) -> dict[tuple[str, str], list[Case]]:
    """``{(kind, label): cases}``: model families first, then scenarios, then ops, each in manifest order."""
    rows: dict[tuple[str, str], list[Case]] = {}
    rank = {"model": 0, "scenario": 1}
    for case in sorted(cases, key=lambda c: rank.get(c.level, 2)):
        if case.level == "op":
            key = ("op", case.op)
        else:
            key = (case.level, f"{case.id.rsplit('/', 1)[0]} ({case.architecture})")
        rows.setdefault(key, []).append(case)
    return rows


def support_matrix(backends: list[tuple[str, Backend]], cases: list[Case], dtype: str,
                   title: str) -> tuple[str, list[str]]:
    """The markdown table (with ``title`` as a heading line) and notes on probes that raised.

    Args:
        backends: ``(column header, backend)`` pairs.

    Raises:
        BackendError: a backend's ``ops`` is not a mapping of names to callables.
    """
    notes: list[str] = []
    ops = {name: backend_ops(backend) for name, backend in backends}
    header = ["kind", "family / op", "cases"] + [name for name, _ in backends]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kind, label), members in _rows(cases).items():
        cells = [kind, f"`{label}`" if kind == "op" else label, str(len(members))]
        for name, backend in backends:
            supported = 0
            for case in members:
                try:
                    supported += unsupported_reason(backend, case, dtype, ops[name]) is None
                except Exception as exc:  # noqa: BLE001 - a probe that raises is "not supported"
                    notes.append(f"{name}: supports() raised on {case.id} "
                                 f"({one_line(f'{type(exc).__name__}: {exc}')}); counted as not supported")
            cells.append(f"{supported}/{len(members)}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(kind == "scenario" for kind, _ in _rows(cases)):
        lines += ["", SCENARIO_NOTE]
    return "\n".join(lines) + "\n", notes
