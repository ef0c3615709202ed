"""Cases run in a worker process, so that a backend that crashes or hangs costs one case, not the run.

The worker is a fresh Python process (``multiprocessing`` "forkserver", or "spawn"
where there is no fork server: nothing of the parent's state, threads or GPU context
is inherited). It builds the backend from a
picklable factory (``functools.partial(resolve_backend, spec, options)``), says it
is ready, then runs the cases it is sent one at a time with
:func:`conformance.runner.run_case` and sends each :class:`CaseResult` back.

* A case whose result does not arrive within ``timeout`` seconds is "timed out";
  the worker is killed.
* A worker that dies while running a case (a segfault, ``os.abort()``, an
  out-of-memory kill, ``os._exit``) makes that case "crashed", with the exit code
  or signal in the message.
* In both cases the next case starts a new worker; building the backend there is
  not counted in the case's time (it has its own ``startup_timeout``).
* For a scenario case both messages name what was in progress, e.g. ``in steps.5 (decode 1
  after 15 tokens)`` or ``in loading the checkpoint``: the worker writes it to a small shared
  buffer before each step (``run_case(..., progress=...)``), and the parent reads it there, so a
  worker that hangs in C code or dies still tells where.
* A backend that cannot be built, or raises :class:`BackendError` (it cannot work
  at all), stops the run with that error, as without isolation.
* The worker ignores SIGINT; on Ctrl-C the parent stops it and keeps the results
  it has (see ``run_suite``).

Messages between the parent and its own worker are pickled by ``multiprocessing``
(a case description in, a :class:`CaseResult` out); nothing read from a checkpoint,
the corpus or a backend's files is ever unpickled. A script of your own that drives
an isolated run must guard its entry point with ``if __name__ == "__main__":`` (the
usual ``multiprocessing`` rule: the worker imports the main module), or run with
``--no-isolate`` / ``run_suite(..., isolated=None)``.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path

from .errors import BackendError, ConformanceError

#: Default seconds one case may take (load + run), and the backend's start-up.
DEFAULT_TIMEOUT = 600.0
DEFAULT_STARTUP_TIMEOUT = 900.0
#: Bytes of the shared buffer in which the worker says what a case is doing (UTF-8, NUL-terminated).
PROGRESS_BYTES = 512


def describe_exit(code: int | None) -> str:
    """``-6`` -> ``"killed by signal SIGABRT"``, ``3`` -> ``"exit code 3"``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _context():
    """A "forkserver" context where the platform has one (Linux, macOS), else "spawn".

    Either way the worker starts from a clean single-threaded process, never from a fork
    of the caller (which may hold torch's or BLAS's threads). The fork server imports
    NumPy, the runner and the reference once, so each new worker (one per run, and one
    after each crash or timeout) starts in milliseconds instead of re-importing them;
    ``sys.path`` and the main module still come from the caller at each start.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["numpy", "refimpl", "conformance.runner", "conformance.isolation"])
        return context
    return multiprocessing.get_context("spawn")


def _progress_writer(buffer):
    """``progress(text)`` for :func:`conformance.runner.run_case` that writes ``text`` into ``buffer``."""
    def progress(text: str) -> None:
        buffer.value = str(text).encode("utf-8", "replace")[:PROGRESS_BYTES - 1]

    return progress


def _read_progress(buffer) -> str:
    return buffer.value.decode("utf-8", "replace") if buffer is not None else ""


def _worker(conn, factory, golden_dir: str, dtype: str, progress_buffer=None) -> None:
    """The worker's loop (runs in the child process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .backends.base import package_versions
    from .runner import one_line, run_case

    try:
        backend = factory()
    except BaseException as exc:  # reported to the parent, which stops the run
        conn.send(("startup-error", one_line(f"{type(exc).__name__}: {exc}") if not isinstance(
            exc, (BackendError, ConformanceError)) else one_line(str(exc))))
        return
    conn.send(("ready", backend.name, package_versions(backend)))
    golden = Path(golden_dir)
    progress = _progress_writer(progress_buffer) if progress_buffer is not None else None
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        try:
            conn.send(("result", run_case(backend, case, golden, dtype, progress=progress)))
        except BackendError as exc:
            conn.send(("backend-error", str(exc)))
        except ConformanceError as exc:
            conn.send(("conformance-error", str(exc)))


class IsolatedRunner:
    """Runs cases of one backend in a worker process; see the module docstring.

    Args:
        factory: picklable callable returning the backend (it runs in the worker).
        golden_dir, dtype: as for ``run_case``.
        timeout: seconds one case may take before it is "timed out".
        startup_timeout: seconds building the backend may take.

    Raises (from :meth:`start` and :meth:`run`):
        BackendError: the backend cannot be built or cannot work at all.
        ConformanceError: malformed golden data (as without isolation).
    """

    def __init__(self, factory, golden_dir, dtype: str, timeout: float = DEFAULT_TIMEOUT,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT):
        self.factory, self.golden_dir, self.dtype = factory, str(golden_dir), dtype
        self.timeout, self.startup_timeout = float(timeout), float(startup_timeout)
        self._context = _context()
        # What the running case is doing, written by the worker (unlocked: a hung worker must not
        # be able to block the parent's read).
        self._progress = self._context.Array("c", PROGRESS_BYTES, lock=False)
        self._process = None
        self._conn = None
        self.name = "?"
        self.versions: dict[str, str] = {}
        self.restarts = 0

    def start(self) -> None:
        """Start a worker and wait until its backend is built."""
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(child, self.factory, self.golden_dir, self.dtype,
                                                              self._progress),
                                        daemon=True, name="llm-conformance-worker")
        process.start()
        child.close()
        self._process, self._conn = process, parent
        if not parent.poll(self.startup_timeout):
            self.stop()
            raise BackendError(f"the backend did not start within {self.startup_timeout:g} s")
        try:
            message = parent.recv()
        except EOFError:
            process.join(5)
            code = process.exitcode
            self.stop()
            raise BackendError(f"the backend's worker process died while starting ({describe_exit(code)}); if a "
                               f"script of yours drives the run, guard its entry point with "
                               f"`if __name__ == \"__main__\":` (the worker imports it), or use --no-isolate") from None
        if message[0] == "startup-error":
            self.stop()
            raise BackendError(message[1])
        _, self.name, self.versions = message

    def stop(self) -> None:
        """Stop the worker (politely, then by force)."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        if process is not None:
            process.join(1)
            if process.is_alive():
                process.kill()
                process.join(5)
        if conn is not None:
            conn.close()

    def _restart_later(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
        self.restarts += 1

    def _doing(self, result) -> str:
        """`` in steps.5 (decode 1 after 15 tokens)`` when the worker said what the case was doing (a
        step also becomes the result's ``first_divergence``), else ``""``."""
        doing = _read_progress(self._progress)
        if not doing:
            return ""
        if doing.startswith("steps."):
            result.first_divergence = doing
        return f" in {doing}"

    def run(self, case):
        """Run ``case`` in the worker; a :class:`CaseResult`, "crashed" or "timed out" included."""
        from .runner import CaseResult, Status
        from .tolerances import get_tolerance

        if self._process is None:
            self.start()
        result = CaseResult(case_id=case.id, dtype=self.dtype, status=Status.ERROR)
        result.tolerance = get_tolerance(case.tolerance_class, self.dtype)
        start = time.perf_counter()
        self._progress.value = b""
        self._conn.send(case)
        if not self._conn.poll(self.timeout):
            doing = self._doing(result)
            self._restart_later()
            result.status = Status.TIMED_OUT
            result.message = (f"no result within {self.timeout:g} s (--timeout){doing}; the worker was killed and a "
                              f"new one runs the next case")
            result.seconds = time.perf_counter() - start
            return result
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            code = self._process.exitcode
            doing = self._doing(result)
            self._restart_later()
            result.status = Status.CRASHED
            result.message = (f"the backend's process died while running this case ({describe_exit(code)}){doing}; "
                              f"a new one runs the next case")
            result.seconds = time.perf_counter() - start
            return result
        if kind == "backend-error":
            raise BackendError(payload)
        if kind == "conformance-error":
            raise ConformanceError(payload)
        return payload
