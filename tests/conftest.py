import os
import sys
from pathlib import Path

# Kernel tests (refimpl/kernels) run in numba's CUDA simulator unless LLM_REFIMPL_REAL_GPU=1:
# numba reads this once, at its first import, so it is set before anything imports numba.
if os.environ.get("LLM_REFIMPL_REAL_GPU", "0") in ("", "0"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return ROOT / "golden"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a real CUDA GPU: skipped unless LLM_REFIMPL_REAL_GPU=1."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        skip = pytest.mark.skip(reason="needs a real CUDA GPU (LLM_REFIMPL_REAL_GPU=1); the CUDA simulator is on")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
