"""Compute-dtype policy shared by every component.

The reference computes in one floating dtype per call, float64 by default. Every
public function takes arrays already in that dtype and returns arrays in it; this
module names the dtypes we accept and gives the boundary check that keeps NumPy 2
from silently promoting a float32 computation to float64 (``x_f32 / np.sqrt(d)``
with a Python float stays float32, but a float64 NumPy scalar does not).
"""

from __future__ import annotations

import numpy as np

from .errors import RefimplError

#: Dtypes the reference computes in. float64 is the specification; float32 is
#: offered to measure the error a float32 engine should expect.
COMPUTE_DTYPES = {"float64": np.float64, "float32": np.float32}


def resolve_dtype(dtype) -> np.dtype:
    """Return the NumPy dtype for ``dtype`` (a name, a NumPy type or dtype).

    Raises:
        RefimplError: ``dtype`` is not float64 or float32.
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise RefimplError(f"unknown dtype {dtype!r}; use one of {sorted(COMPUTE_DTYPES)}") from exc
    if resolved.name not in COMPUTE_DTYPES:
        raise RefimplError(
            f"the reference computes in {sorted(COMPUTE_DTYPES)}, not {resolved.name}"
        )
    return resolved


def check_same_dtype(**arrays: np.ndarray) -> np.dtype:
    """Return the common dtype of ``arrays``; raise if they differ.

    Raises:
        RefimplError: two arrays have different dtypes (naming them).
    """
    dtypes = {name: np.asarray(a).dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise RefimplError(f"arrays must share one compute dtype, got {listed}")
    return next(iter(dtypes.values()))
