"""The ``llm-conformance`` command (also ``python -m conformance``).

    llm-conformance run --backend NAME|module:factory [-o key=value ...] [--dtype float32]
                        [--level all|model|op|scenario] [--op NAME ...]
                        [--golden-dir DIR] [--case GLOB ...] [--report FILE.json]
                        [--skip-file FILE ...] [--xfail-file FILE ...] [--junit FILE.xml] [--html FILE.html]
                        [--compare-to OLD.json [--drift-factor 2]] [--repro-dir DIR]
                        [--isolate/--no-isolate] [--timeout SECONDS]
    llm-conformance export DIR [--dtype float32] [--level ...] [--case GLOB ...] [--golden-dir DIR]
    llm-conformance check --outputs DIR2 [--dtype float32] [same selection and report options as run]
    llm-conformance matrix --backend NAME|module:factory [--backend ...] [-o key=value ...]
                           [--dtype float32] [--golden-dir DIR] [--output FILE.md]
    llm-conformance list [--golden-dir DIR] [--level all|model|op|scenario] [--case GLOB ...]
    llm-conformance properties --backend NAME|module:factory [-o key=value ...] [--dtype float64]
                               [--profile quick|ci|thorough] [--property NAME ...]

Exit status of ``run``: 0 when every case passed, is not implemented, skipped or
xfailed (and at least one passed or xfailed), 1 when any failed, was nan, errored,
crashed, timed out or xpassed, or none could be checked, 130 when interrupted
(Ctrl-C; the reports are still written, marked partial), 2 for usage and input errors (a malformed
skip or xfail line is one: ``error: FILE:LINE: ...``; so is a ``--compare-to``
file that is missing or not a report). Drift flagged by ``--compare-to`` does not
change the exit status. Input errors (bad corpus, hash
mismatch, unknown backend, ...) print one line ``error: ...`` on stderr, never a
traceback.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from refimpl.errors import RefimplError

from . import __version__
from .backends import OWN_XFAIL_FILES, resolve_backend
from .backends.base import DTYPES, package_versions
from .errors import ConformanceError
from .drift import DEFAULT_FACTOR, compute_drift, drift_lines, load_old_report, mismatch_warnings
from .manifest import LEVELS, Case, default_golden_dir, read_manifest, shadowing_note, verify_case_files
from .matrix import support_matrix
from .expectations import load_expectations
from .report import FAILING, id_column_options, print_report, write_json_report, write_junit_report
from .repro import prepare_repro_dir, write_repro_bundles
from .isolation import DEFAULT_TIMEOUT, IsolatedRunner
from .runner import RunInterrupted, Status, one_line, run_suite

#: ``--level`` values: every case, or those of one level (``conformance.manifest.LEVELS``).
LEVEL_CHOICES = ("all", *LEVELS)
EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


def _input_errors_as_one_line(command):
    """Turn ConformanceError/RefimplError into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ConformanceError, RefimplError) as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(EXIT_INPUT_ERROR)

    return wrapper


def _parse_options(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    """``("k=v", ...)`` to ``{"k": "v"}``; a value without ``=`` is a usage error."""
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got '{item}'", ctx=ctx, param=param)
        options[key] = value
    return options


def select_cases(cases: list[Case], globs: tuple[str, ...]) -> list[Case]:
    """Cases whose id matches any glob (all when none is given), in manifest order.

    Raises:
        ConformanceError: a glob matches no case (the case families are listed).
    """
    if not globs:
        return list(cases)
    for pattern in globs:
        if not any(fnmatch.fnmatchcase(case.id, pattern) for case in cases):
            families = sorted({case.id.rsplit("/", 1)[0] + "/*" for case in cases})
            raise ConformanceError(f"--case '{pattern}' matches no case; case families: {', '.join(families)} "
                                   "(llm-conformance list shows every id)")
    return [case for case in cases if any(fnmatch.fnmatchcase(case.id, p) for p in globs)]


def select_level(cases: list[Case], level: str, ops: tuple[str, ...]) -> list[Case]:
    """Cases of ``level`` (``"all"``, ``"model"``, ``"op"`` or ``"scenario"``); ``ops`` keeps only op
    cases of those ops.

    Raises:
        ConformanceError: an op name has no case (the ops with cases are listed),
            or ``--op`` is combined with ``--level model`` or ``--level scenario``.
    """
    if ops and level in ("model", "scenario"):
        raise ConformanceError(f"--op selects op cases; it cannot be combined with --level {level}")
    if ops:
        known = sorted({c.op for c in cases if c.level == "op"})
        for name in ops:
            if name not in known:
                raise ConformanceError(
                    f"--op '{name}' has no case among the selected cases; ops with cases: {', '.join(known) or 'none'}")
        return [c for c in cases if c.level == "op" and c.op in ops]
    return [c for c in cases if level == "all" or c.level == level]


def _check_writable(report: Path) -> None:
    """Fail before running when a report file could not be written."""
    parent = report.parent if str(report.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConformanceError(f"cannot write report {report}: directory {parent} does not exist or is not writable")


def _default_golden_dir() -> Path:
    """:func:`default_golden_dir`, with a note on stderr when ./golden shadows the packaged corpus."""
    chosen = default_golden_dir()
    note = shadowing_note(chosen)
    if note:
        click.echo(note, err=True)
    return chosen


def _stdout_console(ids=()) -> Console:
    """Console for tables: its terminal's width, or in logs 200 columns, more when the longest of
    ``ids`` (a table's case ids, never wrapped there) needs them, so that rows do not fold (the
    error model's columns take about 40)."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=max(200, max((len(i) for i in ids), default=0) + 150))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


golden_dir_option = click.option(
    "--golden-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Golden corpus directory (default: $LLM_CONFORMANCE_GOLDEN, ./golden, or the one beside the package).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm-conformance")
def cli():
    """Check an inference engine against the llm-refimpl golden corpus."""


@cli.command("run")
@click.option("--backend", required=True,
              help="Built-in name (refimpl, transformers, torch, onnxruntime) or package.module:factory.")
@click.option("-o", "--option", "options", multiple=True, callback=_parse_options, metavar="KEY=VALUE",
              help="Backend option, passed to its factory as a keyword argument; repeatable.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="all", show_default=True,
              help="Whole-model cases, single-op cases, scenario cases (prefill / decode / rollback schedules), "
                   "or all.")
@click.option("--op", "op_names", multiple=True, metavar="NAME", help="Run only op cases of this op; repeatable.")
@golden_dir_option
@click.option("--case", "case_globs", multiple=True, metavar="GLOB", help="Run only matching case ids; repeatable.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False), help="Also write a JSON report here.")
@click.option("--skip-file", "skip_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="Case-id globs not to run ('GLOB  # reason' per line); repeatable.")
@click.option("--xfail-file", "xfail_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="Case-id globs known to fail ('GLOB  # reason' per line); a pass exits 1; "
                                   "repeatable.")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE.html",
              help="Also write a self-contained HTML page: summary, support matrix, every case, and a plot of the "
                   "error per layer of each failing model case, per step of each failing scenario (needs "
                   "matplotlib).")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), help="Also write a JUnit XML report here.")
@click.option("--compare-to", "compare_to", type=click.Path(path_type=Path, dir_okay=False), metavar="OLD.json",
              help="A previous --report: flag cases that passed then and not now, or whose headline rel RMS grew "
                   "by more than --drift-factor (the exit status is unaffected).")
@click.option("--drift-factor", type=click.FloatRange(min=1.0), default=DEFAULT_FACTOR, show_default=True,
              help="With --compare-to: flag a headline rel RMS that grew by more than this factor.")
@click.option("--repro-dir", "repro_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Write a repro bundle (inputs, expected outputs, case.json with the repro command) per failed "
                   "or errored case under DIR/<case id with / as __>/; DIR is created if missing.")
@click.option("--isolate/--no-isolate", default=True, show_default=True,
              help="Run the cases in a worker process, so that a crash or hang costs one case (status crashed or "
                   "timed out) instead of the run; --no-isolate runs them in this process (debuggers, profilers).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT, show_default=True,
              metavar="SECONDS", help="With --isolate: seconds one case (load + run) may take before it is 'timed out'.")
@click.option("--backend-xfail/--no-backend-xfail", "backend_xfail", default=True, show_default=True,
              help="Apply the built-in backend's own xfail file (its documented deviations, e.g. "
                   "conformance/backends/transformers.xfail) besides any --xfail-file.")
@_input_errors_as_one_line
def run_command(backend, options, dtype, level, op_names, golden_dir, case_globs, report, skip_files, xfail_files,
                html_path, junit, compare_to, drift_factor, repro_dir, isolate, timeout, backend_xfail):
    """Run a backend over the golden cases and report per case."""
    own = OWN_XFAIL_FILES.get(backend, ()) if backend_xfail else ()
    for path in own:
        click.echo(f"note: applying the {backend} backend's own xfail file {path} (--no-backend-xfail runs without it)", err=True)
    xfail_files = (*own, *xfail_files)
    _run_and_report(functools.partial(resolve_backend, backend, options),
                    {"backend_spec": backend, "backend_options": options},
                    dtype, level, op_names, golden_dir, case_globs, report, skip_files, xfail_files, junit,
                    compare_to, drift_factor, repro_dir, html_path=html_path, isolate=isolate, timeout=timeout)


def _run_and_report(factory, spec: dict, dtype, level, op_names, golden_dir, case_globs, report, skip_files,
                    xfail_files, junit, compare_to, drift_factor, repro_dir, select_hook=None, html_path=None,
                    isolate=False, timeout=DEFAULT_TIMEOUT):
    """The body of ``run`` and ``check``: select cases, run the backend ``factory()`` returns
    (in a worker process when ``isolate``; ``factory`` must then be picklable), print and write
    the reports, and exit with ``run``'s status. ``spec`` goes into the report's metadata
    (``backend_spec`` and ``backend_options``, or ``outputs_dir`` for ``check``);
    ``select_hook(cases, corpus_cases)`` runs once the cases are chosen, with every case of the
    corpus besides (``check`` warns about stray folders).
    On Ctrl-C the reports of the finished cases are written, marked partial, and the exit
    status is 130."""
    golden_dir = golden_dir or _default_golden_dir()
    old = load_old_report(compare_to) if compare_to is not None else None
    manifest = read_manifest(golden_dir)
    expectations = load_expectations(skip_files, xfail_files)
    own_files = {str(path) for paths in OWN_XFAIL_FILES.values() for path in paths}
    for entry in expectations.unmatched(case.id for case in manifest.cases):
        if str(entry.path) in own_files:
            continue  # a built-in backend's own file, run on a corpus without that case
        shown = f"{entry.pattern}@{entry.dtype}" if entry.dtype else entry.pattern
        click.echo(f"warning: {entry.where}: '{shown}' matches no case in the corpus", err=True)
    if old is not None:
        for line in mismatch_warnings(old, {"dtype": dtype, "corpus_version": manifest.corpus_version}):
            click.echo(line, err=True)
    cases = select_level(select_cases(manifest.cases, case_globs), level, op_names)
    if not cases:
        raise ConformanceError(f"no case is selected (--level {level}, --case {list(case_globs)})")
    for path in (report, junit, html_path):
        if path is not None:
            _check_writable(path)
    if repro_dir is not None:
        prepare_repro_dir(repro_dir)
    if select_hook is not None:
        select_hook(cases, manifest.cases)
    isolated = chosen = None
    if isolate:
        isolated = IsolatedRunner(factory, golden_dir, dtype, timeout=timeout)
        isolated.start()
        name, versions = isolated.name, isolated.versions
    else:
        chosen = factory()
        name, versions = chosen.name, package_versions(chosen)
    started = _now()
    partial = False
    try:
        results = run_suite(chosen, cases, golden_dir, dtype, progress=True, expectations=expectations,
                            isolated=isolated)
    except RunInterrupted as interrupted:
        results, partial = interrupted.results, True
        click.echo(f"interrupted: writing a partial report of the {len(results)} case(s) that finished", err=True)
    finally:
        if isolated is not None:
            isolated.stop()
    meta = {
        "backend": name, **spec,
        "package_versions": versions, "dtype": dtype,
        "corpus_version": manifest.corpus_version, "golden_dir": str(Path(golden_dir).resolve()),
        "conformance_version": __version__, "started_at": started, "finished_at": _now(),
        "isolated": bool(isolate), **({"timeout_s": timeout} if isolate else {}), "partial": partial,
    }
    drift = {}
    if old is not None:
        drift = compute_drift(results, old, drift_factor)
        meta.update(compare_to=str(compare_to), drift_factor=drift_factor)
    # The report first: a closed pipe on stdout must not lose it.
    if report:
        extra = None if old is None else {r.case_id: {"drift": drift.get(r.case_id)} for r in results}
        write_json_report(report, results, meta, extra)
    if junit:
        write_junit_report(junit, results, meta)
    if html_path:
        from .html_report import write_html_report

        write_html_report(html_path, results, meta, partial=partial)
        if importlib.util.find_spec("matplotlib") is None:
            click.echo(f"warning: {html_path} has no plots: matplotlib is not installed "
                       "(pip install 'llm-refimpl[report]')", err=True)
    console = _stdout_console([r.case_id for r in results])
    print_report(results, meta, console)
    if old is not None:
        for line in drift_lines(drift, old, drift_factor):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if repro_dir is not None:
        written = write_repro_bundles(repro_dir, cases, results, golden_dir, meta)
        console.print(f"repro bundles: {written} written to {repro_dir}", markup=False, highlight=False,
                      soft_wrap=True)
    if partial:
        sys.exit(EXIT_INTERRUPTED)
    if any(r.status in FAILING for r in results):
        sys.exit(EXIT_FAILED)
    if not any(r.status in (Status.PASSED, Status.XFAILED) for r in results):
        click.echo("error: no case was checked: the backend implements none of the selected cases "
                   "(or they are skipped)", err=True)
        sys.exit(EXIT_FAILED)


@cli.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Dtype of the exported floating op inputs (model cases: the engine runs the float32 "
                   "checkpoint in this dtype); give check the same --dtype.")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="all", show_default=True)
@click.option("--op", "op_names", multiple=True, metavar="NAME", help="Export only op cases of this op; repeatable.")
@golden_dir_option
@click.option("--case", "case_globs", multiple=True, metavar="GLOB", help="Export only matching case ids; repeatable.")
@_input_errors_as_one_line
def export_command(directory, dtype, level, op_names, golden_dir, case_globs):
    """Write the cases for an engine outside Python: DIR/<case>/case.json + inputs.safetensors
    (+ checkpoint/). The engine writes DIR2/<case>/outputs.safetensors; then run
    `llm-conformance check --outputs DIR2`. See docs/file-contract.md."""
    from .file_contract import export_cases

    golden_dir = golden_dir or _default_golden_dir()
    manifest = read_manifest(golden_dir)
    cases = select_level(select_cases(manifest.cases, case_globs), level, op_names)
    if not cases:
        raise ConformanceError(f"no case is selected (--level {level}, --case {list(case_globs)})")
    for case in cases:
        verify_case_files(golden_dir, case)
    written = export_cases(directory, cases, golden_dir, dtype, manifest.corpus_version)
    click.echo(f"exported {written} case(s) ({dtype}) to {directory}; the engine writes "
               f"<outputs dir>/<case folder>/outputs.safetensors, then: llm-conformance check --outputs <outputs dir> "
               f"--exported {directory}")


@cli.command("check")
@click.option("--outputs", "outputs_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              metavar="DIR2", help="Where the engine wrote <case folder>/outputs.safetensors for the exported cases.")
@click.option("--exported", "exported_dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="The export directory: check exactly its cases, at its dtype (default: every corpus case; "
                   "those without outputs are 'not implemented').")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="The dtype the cases were exported and run in; it selects the tolerances "
                   "[default: the export's, else float32].")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="all", show_default=True)
@click.option("--op", "op_names", multiple=True, metavar="NAME", help="Check only op cases of this op; repeatable.")
@golden_dir_option
@click.option("--case", "case_globs", multiple=True, metavar="GLOB", help="Check only matching case ids; repeatable.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False), help="Also write a JSON report here.")
@click.option("--skip-file", "skip_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="As for run.")
@click.option("--xfail-file", "xfail_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="As for run.")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE.html",
              help="Also write a self-contained HTML page: summary, support matrix, every case, and a plot of the "
                   "error per layer of each failing model case, per step of each failing scenario (needs "
                   "matplotlib).")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), help="Also write a JUnit XML report here.")
@click.option("--compare-to", "compare_to", type=click.Path(path_type=Path, dir_okay=False), metavar="OLD.json",
              help="As for run.")
@click.option("--drift-factor", type=click.FloatRange(min=1.0), default=DEFAULT_FACTOR, show_default=True)
@click.option("--repro-dir", "repro_dir", type=click.Path(path_type=Path), metavar="DIR", help="As for run.")
@_input_errors_as_one_line
def check_command(outputs_dir, exported_dir, dtype, level, op_names, golden_dir, case_globs, report, skip_files,
                  xfail_files, html_path, junit, compare_to, drift_factor, repro_dir):
    """Judge the outputs an engine wrote for `llm-conformance export` cases, exactly as `run` judges a backend.
    A case without a folder, or with a NOT_IMPLEMENTED file, is "not implemented"; an ERROR file is "error"."""
    from .file_contract import FileOutputsBackend, read_contract

    if exported_dir is not None:
        contract = read_contract(exported_dir)
        if dtype is not None and dtype != contract["dtype"]:
            raise ConformanceError(f"--dtype {dtype} differs from the export's dtype {contract['dtype']} "
                                   f"({exported_dir}/CONTRACT.json)")
        dtype = contract["dtype"]
        exported = tuple(entry["id"] for entry in contract["cases"])
        case_globs = tuple(g for g in case_globs) or exported
        case_globs = tuple(i for i in exported if any(fnmatch.fnmatchcase(i, g) for g in case_globs))
        if not case_globs:
            raise ConformanceError(f"--case selects none of the {len(exported)} case(s) of the export {exported_dir}")
    dtype = dtype or "float32"

    def warn_stray(cases, corpus_cases):
        # Folders of cases that --case, --level or --op leave out are not strays: only those that
        # match no case of the export (or, without --exported, of the corpus) are likely typos.
        known = exported if exported_dir is not None else [case.id for case in corpus_cases]
        where = f"the export {exported_dir}" if exported_dir is not None else "the corpus"
        for name in FileOutputsBackend(outputs_dir).stray_folders(known):
            click.echo(f"warning: {outputs_dir / name} matches no case of {where}; it is ignored", err=True)

    spec = {"backend_spec": "files", "backend_options": {}, "outputs_dir": str(Path(outputs_dir).resolve())}
    if exported_dir is not None:
        spec["exported_dir"] = str(Path(exported_dir).resolve())
    _run_and_report(functools.partial(FileOutputsBackend, outputs_dir), spec, dtype, level, op_names, golden_dir, case_globs,
                    report, skip_files, xfail_files, junit, compare_to, drift_factor, repro_dir,
                    select_hook=warn_stray, html_path=html_path)


@cli.command("matrix")
@click.option("--backend", "backend_specs", required=True, multiple=True,
              help="Built-in name (refimpl, transformers, torch, onnxruntime) or package.module:factory; repeatable, "
                   "one column each.")
@click.option("-o", "--option", "options", multiple=True, callback=_parse_options, metavar="KEY=VALUE",
              help="Backend option, passed to every backend's factory; repeatable.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@golden_dir_option
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE.md",
              help="Also write the markdown table here.")
@_input_errors_as_one_line
def matrix_command(backend_specs, options, dtype, golden_dir, output):
    """Print which cases each backend supports, as a markdown table (probes support; runs nothing)."""
    golden_dir = golden_dir or _default_golden_dir()
    manifest = read_manifest(golden_dir)
    if output is not None:
        _check_writable(output)
    chosen = [resolve_backend(spec, options) for spec in backend_specs]
    names = [b.name for b in chosen]
    columns = [(name if names.count(name) == 1 else spec, b) for name, spec, b in zip(names, backend_specs, chosen)]
    title = f"Supported cases per backend (golden corpus {manifest.corpus_version}, {dtype}; k/n of the row's cases)"
    text, notes = support_matrix(columns, manifest.cases, dtype, title)
    if output is not None:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConformanceError(f"cannot write {output} ({exc})") from None
    click.echo(text, nl=False)
    for note in notes:
        click.echo(f"warning: {note}", err=True)


@cli.command("list")
@golden_dir_option
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="all", show_default=True,
              help="List only the cases of this level.")
@click.option("--case", "case_globs", multiple=True, metavar="GLOB", help="List only matching case ids; repeatable.")
@_input_errors_as_one_line
def list_command(golden_dir, level, case_globs):
    """List the golden cases (the same --level and --case selection as run)."""
    golden_dir = golden_dir or _default_golden_dir()
    manifest = read_manifest(golden_dir)
    cases = select_level(select_cases(manifest.cases, case_globs), level, ())
    if not cases:
        raise ConformanceError(f"no case is selected (--level {level}, --case {list(case_globs)})")
    console = _stdout_console([case.id for case in cases])
    selected = "" if len(cases) == len(manifest.cases) else f", {len(cases)} of {len(manifest.cases)} cases"
    table = Table(title=f"golden corpus {manifest.corpus_version} ({golden_dir}{selected})")
    for name in ("id", "level", "architecture / op", "tolerance class", "description"):
        table.add_column(name, **(id_column_options(console) if name == "id" else {"overflow": "fold"}))
    for case in cases:
        cells = (case.id, case.level, case.architecture or case.op, case.tolerance_class, case.description)
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)


@cli.command("properties")
@click.option("--backend", required=True,
              help="Built-in name (refimpl, transformers, torch, onnxruntime) or package.module:factory.")
@click.option("-o", "--option", "options", multiple=True, callback=_parse_options, metavar="KEY=VALUE",
              help="Backend option, passed to its factory as a keyword argument; repeatable.")
@click.option("--dtype", default="float64", show_default=True, help="Dtype of the op inputs: float64 or float32.")
@click.option("--profile", default="ci", show_default=True,
              help="quick, ci or thorough: 10, 25 or 200 hypothesis examples per property.")
@click.option("--property", "property_names", multiple=True, metavar="NAME",
              help="Check only this property; repeatable (default: all).")
@_input_errors_as_one_line
def properties_command(backend, options, dtype, profile, property_names):
    """Check laws of the math (causality, GQA, RoPE, RMSNorm, soft-cap, MoE routers and dispatch, MLA) on a backend's ops.

    Exit status: 0 when no property failed or errored and at least one passed, 1
    otherwise, 2 for input errors. See ``conformance.properties``.
    """
    # Imported here: hypothesis is needed by this command only.
    try:
        from .properties import run_properties, run_settings, select_properties
    except ModuleNotFoundError as exc:
        if exc.name != "hypothesis":
            raise
        raise ConformanceError(f"the properties command needs hypothesis ({exc}); pip install hypothesis") from None
    import shlex

    from .report import _STATUS_STYLE, summary_line
    from .runner import backend_ops

    # Bad names, dtype or profile are reported before a slow backend is set up.
    run_settings(dtype, profile)
    select_properties(property_names)
    chosen = resolve_backend(backend, options)
    results = run_properties(backend_ops(chosen), dtype=dtype, profile=profile, names=property_names)
    table = Table(title=f"properties of {chosen.name} ({dtype}, profile {profile})")
    for name in ("property", "op", "status", "message"):
        table.add_column(name, overflow="fold")
    for result in results:
        message = result.message if result.example is None else f"{result.message}\nexample: {result.example}"
        status = Text(result.status.value, style=_STATUS_STYLE[result.status])
        table.add_row(Text(result.name), Text(result.op), status, Text(message))
    console = _stdout_console()
    console.print(table)
    base = ["llm-conformance", "properties", "--backend", backend]
    for key, value in options.items():
        base += ["-o", f"{key}={value}"]
    for result in results:
        if result.status in (Status.FAILED, Status.ERROR):
            words = base + ["--dtype", dtype, "--profile", profile, "--property", result.name]
            console.print(f"repro: {shlex.join(words)}", soft_wrap=True, markup=False)
    console.print(summary_line(results), markup=False, highlight=False)
    if any(r.status in (Status.FAILED, Status.ERROR) for r in results):
        sys.exit(EXIT_FAILED)
    if not any(r.status is Status.PASSED for r in results):
        click.echo("error: no property was checked: the backend implements none of their ops", err=True)
        sys.exit(EXIT_FAILED)


def main() -> None:
    """Console-script entry point: usage errors are one ``error:`` line and exit status 2."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
    try:
        cli.main(prog_name="llm-conformance", standalone_mode=False)
    except no_args as exc:
        click.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc))
        sys.exit(EXIT_INPUT_ERROR)
    except click.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(EXIT_INPUT_ERROR)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_FAILED)
