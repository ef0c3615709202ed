"""The tests the pytest plugin (``conformance.pytest_plugin``) adds to a session
given ``--llm-backend``: one per golden case, and one per property with
``--llm-properties``. Not meant to be collected by itself."""

from __future__ import annotations

import pytest

from conformance.pytest_plugin import session_state
from conformance.report import error_model_numbers, repro_command
from conformance.runner import Status, apply_xfail, run_case


def pytest_generate_tests(metafunc):
    state = session_state(metafunc.config)
    if "llm_case" in metafunc.fixturenames:
        metafunc.parametrize("llm_case", state.cases, ids=[case.id for case in state.cases])
    if "llm_property" in metafunc.fixturenames:
        metafunc.parametrize("llm_property", state.properties, ids=[p.name for p in state.properties])


def _repro(state, case_id: str) -> str:
    meta = {"backend_spec": state.spec, "backend_options": state.options, "dtype": state.dtype,
            "golden_dir": str(state.golden_dir.resolve())}
    return repro_command(meta, case_id)


def test_golden_case(llm_case, request):
    state = session_state(request.config)
    skip = state.expectations.skip_for(llm_case.id, state.dtype)
    if skip is not None:
        pytest.skip(f"skip file: {skip.describe()}")
    result = run_case(state.backend, llm_case, state.golden_dir, state.dtype)
    # Straight into user_properties (what record_property does), without its warning under
    # --junitxml's default xunit2 family; absent values are left out, as in the CLI's JUnit.
    request.node.user_properties.extend(
        (key, value) for key, value in error_model_numbers(result).items() if value is not None)
    xfail = state.expectations.xfail_for(llm_case.id, state.dtype)
    if xfail is not None:
        result = apply_xfail(result, xfail)
    if result.status is Status.NOT_IMPLEMENTED:
        pytest.skip(f"not implemented: {result.message}")
    if result.status is Status.XFAILED:
        pytest.xfail(f"{result.expectation}: {result.message}")
    if result.status is not Status.PASSED:
        where = f" (first divergence: {result.first_divergence})" if result.first_divergence else ""
        pytest.fail(f"{llm_case.id} {result.dtype}: {result.status.value}{where}: {result.message}\n"
                    f"repro: {_repro(state, llm_case.id)}", pytrace=False)


def test_property(llm_property, request):
    from conformance.properties import RTOL, run_property, run_settings
    from conformance.runner import backend_ops

    state = session_state(request.config)
    dtype = state.dtype
    if dtype not in RTOL:
        pytest.skip(f"properties run in float64 or float32, not {dtype}")
    result = run_property(llm_property, backend_ops(state.backend), run_settings(dtype, state.profile,
                                                                                  state.derandomize))
    if result.status is Status.NOT_IMPLEMENTED:
        pytest.skip(f"not implemented: {result.message}")
    if result.status is not Status.PASSED:
        example = f"\nexample: {result.example}" if result.example else ""
        pytest.fail(f"property {result.name} ({result.op}, {dtype}, profile {state.profile}): "
                    f"{result.status.value}: {result.message}{example}", pytrace=False)
