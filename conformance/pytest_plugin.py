"""pytest plugin: the golden cases and the properties as tests of an engine's own suite.

Installed with the package (entry point ``pytest11``); it does nothing unless
``--llm-backend`` is given::

    pytest --llm-backend=mypkg.adapter:make_backend [--llm-option key=value ...]
           [--llm-dtype float32] [--llm-level all|model|op|scenario] [--llm-case GLOB ...]
           [--llm-golden-dir DIR] [--llm-skip-file FILE] [--llm-xfail-file FILE] [--llm-no-backend-xfail]
           [--llm-properties] [--llm-profile quick|ci|thorough] [--llm-derandomize]

Then one test per selected golden case (``test_golden_case[<case id>]``, scenario cases
included: the backend's loaded model needs ``prefill`` / ``decode`` / ``rollback``, else they
are skipped as not implemented) and, with
``--llm-properties``, one per property (``test_property[<name>]``) join the
session, beside the engine's own tests. Outcomes map as in ``llm-conformance run``:

* passed -> passed; failed or error -> failed, with the message (the broken bound: the
  backend's error, the reference's own error in the dtype, their ratio), the first
  diverging tensor and the one-line ``llm-conformance run`` repro command;
* every judged case records its error model (:func:`conformance.report.error_model_numbers`:
  ``error``, ``reference_error``, ``ratio``, ``bound``, ``tensor``, ``metric``, ``rule``) as
  test properties (``user_properties``, in pytest's ``--junitxml`` too);
* not implemented -> skipped with the reason (never a failure);
* a skip-file entry -> skipped; an xfail-file entry -> xfailed, and a pass of an
  xfail-listed case fails (strict), as in ``run``.

As ``run`` does, a built-in backend's own xfail file (``conformance.backends.OWN_XFAIL_FILES``:
its documented deviations, e.g. ``conformance/backends/transformers.xfail``) is applied
besides any ``--llm-xfail-file``, unless ``--llm-no-backend-xfail``.

Property profiles: quick, ci and thorough draw 10, 25 and 200 hypothesis examples
per property. ci is derandomised (the same examples on every run: use it in CI);
quick and thorough draw new examples each run unless ``--llm-derandomize``.
Properties run at ``--llm-dtype`` when it is float64 or float32; at other dtypes
they are skipped.

Bad options (unknown backend, case glob matching nothing, a tampered corpus) stop
the session with one ``ERROR:`` line (pytest's usage error), before any test runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The test module the plugin adds to the session.
SUITE = Path(__file__).with_name("pytest_suite.py")
PROFILES = ("quick", "ci", "thorough")


def pytest_addoption(parser):
    group = parser.getgroup("llm-conformance", "llm-conformance golden cases and properties")
    group.addoption("--llm-backend", default=None, metavar="SPEC",
                    help="Run the llm-conformance cases against this backend (built-in name or module:factory).")
    group.addoption("--llm-option", action="append", default=[], metavar="KEY=VALUE",
                    help="Backend option passed to its factory; repeatable.")
    group.addoption("--llm-dtype", default="float32", choices=("float64", "float32", "float16", "bfloat16"),
                    help="Run dtype of the cases and, if float64 or float32, of the properties (default float32).")
    group.addoption("--llm-level", default="all", choices=("all", "model", "op", "scenario"),
                    help="Case level (default all).")
    group.addoption("--llm-case", action="append", default=[], metavar="GLOB", help="Case-id glob; repeatable.")
    group.addoption("--llm-golden-dir", default=None, metavar="DIR", help="Golden corpus directory.")
    group.addoption("--llm-skip-file", action="append", default=[], metavar="FILE", help="Skip file; repeatable.")
    group.addoption("--llm-xfail-file", action="append", default=[], metavar="FILE", help="Xfail file; repeatable.")
    group.addoption("--llm-no-backend-xfail", action="store_true",
                    help="Do not apply the built-in backend's own xfail file (its documented deviations, e.g. "
                         "conformance/backends/transformers.xfail), which is applied by default as by "
                         "llm-conformance run.")
    group.addoption("--llm-properties", action="store_true", help="Also run the property tests.")
    group.addoption("--llm-profile", default="ci", choices=PROFILES,
                    help="Property profile: 10, 25 or 200 examples per property (default ci, derandomised).")
    group.addoption("--llm-derandomize", action="store_true",
                    help="Derandomise the quick and thorough profiles too.")


@dataclass
class LlmSession:
    """What the plugin resolved once per session: backend, cases, corpus and expectations."""

    backend: object
    spec: str
    options: dict
    dtype: str
    golden_dir: Path
    cases: list = field(default_factory=list)
    properties: list = field(default_factory=list)
    expectations: object = None
    corpus_version: str = ""
    profile: str = "ci"
    derandomize: bool = True
    own_xfail_files: tuple = ()


_STATE_KEY = pytest.StashKey[LlmSession]()


def _parse_options(values) -> dict:
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--llm-option: expected key=value, got '{item}'")
        options[key] = value
    return options


def _resolve(config) -> LlmSession:
    """Everything the tests need, checked before collection; raises ``pytest.UsageError`` on bad input."""
    from refimpl.errors import RefimplError

    from .backends import OWN_XFAIL_FILES, resolve_backend
    from .cli import select_cases, select_level
    from .errors import ConformanceError
    from .expectations import load_expectations
    from .manifest import default_golden_dir, load_scenario_data, read_manifest, verify_case_files
    from .runner import check_op_case, check_reference_error, one_line

    spec = config.getoption("llm_backend")
    try:
        options = _parse_options(config.getoption("llm_option"))
        golden = config.getoption("llm_golden_dir")
        golden_dir = Path(golden) if golden else default_golden_dir()
        manifest = read_manifest(golden_dir)
        own = () if config.getoption("llm_no_backend_xfail") else OWN_XFAIL_FILES.get(spec, ())
        expectations = load_expectations([Path(p) for p in config.getoption("llm_skip_file")],
                                         [*own, *(Path(p) for p in config.getoption("llm_xfail_file"))])
        cases = select_level(select_cases(manifest.cases, tuple(config.getoption("llm_case"))),
                             config.getoption("llm_level"), ())
        for case in cases:
            verify_case_files(golden_dir, case)
            if case.level == "op":
                check_op_case(golden_dir, case)
            elif case.level == "scenario":
                load_scenario_data(golden_dir, case)
            check_reference_error(golden_dir, case)
        properties = []
        if config.getoption("llm_properties"):
            from .properties import select_properties

            properties = select_properties()
        backend = resolve_backend(spec, options)
    except (ConformanceError, RefimplError) as exc:
        raise pytest.UsageError(f"llm-conformance: {one_line(str(exc))}") from None
    profile = config.getoption("llm_profile")
    return LlmSession(backend=backend, spec=spec, options=options, dtype=config.getoption("llm_dtype"),
                      golden_dir=golden_dir, cases=cases, properties=properties, expectations=expectations,
                      corpus_version=manifest.corpus_version, profile=profile,
                      derandomize=profile == "ci" or config.getoption("llm_derandomize"),
                      own_xfail_files=tuple(own))


def pytest_configure(config):
    if not config.getoption("llm_backend", default=None):
        return
    config.stash[_STATE_KEY] = _resolve(config)
    config.args.append(str(SUITE))


def pytest_report_header(config):
    """Say in the session header which backend-owned xfail file applies (``run`` says it on stderr)."""
    if _STATE_KEY not in config.stash:
        return None
    state = config.stash[_STATE_KEY]
    return [f"llm-conformance: applying the {state.spec} backend's own xfail file {path} "
            f"(--llm-no-backend-xfail runs without it)" for path in state.own_xfail_files] or None


def session_state(config) -> LlmSession:
    """The resolved :class:`LlmSession` (only when ``--llm-backend`` was given)."""
    return config.stash[_STATE_KEY]


def pytest_collection_modifyitems(config, items):
    """Without ``--llm-properties``, drop the (empty) property test instead of reporting it skipped."""
    if _STATE_KEY not in config.stash or config.stash[_STATE_KEY].properties:
        return
    dropped = [item for item in items if getattr(item, "originalname", "") == "test_property"
               and Path(str(item.path)) == SUITE]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
