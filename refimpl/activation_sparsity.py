"""Statistical top-k activation sparsity (Gemma 3n's "Gaussian top-k" on the MLP gate).

For each token the gate pre-activations ``g`` (F values) are treated as a sample of a
Gaussian. The cutoff is the value a fraction ``s`` (the layer's
``activation_sparsity_pattern`` entry) of that Gaussian lies below; everything is
shifted down by the cutoff and clipped at 0, so about ``(1 - s) F`` entries stay
positive::

    mu    = mean(g)                                   over the F axis
    sigma = sqrt(mean((g - mu)^2))                    population std (divide by F, not F - 1)
    z_s   = Phi^-1(s)                                 standard normal quantile; s = 0.95 -> 1.6448536...
    out   = relu(g - (mu + sigma z_s))

It is a threshold, not an exact top-k: the number of survivors varies per token.
The output goes through the GELU as usual, so a zeroed entry contributes
``gelu(0) = 0`` to the gated product.

Notation:
    paper symbol      code name         shape
    g                 ``gate``          (..., F)
    s (sparsity)      ``sparsity``      scalar in (0, 1)
    Phi^-1(s)         ``gaussian_quantile(s)``  scalar

Numerics. Google's code evaluates ``Phi^-1(s)`` in float32 (``jax.scipy.stats.norm.ppf``
on a float32 array) and transformers in float32 too (``Normal(0, 1).icdf`` of a float32
tensor, 1.6448535919189453 for 0.95); both then cast it to the activation dtype. The
float32 evaluation is the working precision of a model run in bfloat16, not a designed
constant (a 1-ulp change of a statistical threshold means nothing, and the float32
result depends on how the quantile is evaluated: torch's float32 path is 1-4 ulp off the
correctly rounded value for s = 0.9 and 0.99). The reference therefore takes the
quantile exactly (Python's ``statistics.NormalDist``, about 1e-16 relative) and rounds it
once to the compute dtype. For s = 0.95, the only value in released configs, the float32
result is the same number transformers uses, 1.6448535919189453; in float64 it is
1.6448536269514715, which transformers also computes once its float32 islands are lifted
(``conformance.backends.hf_exact``). See docs/architectures/gemma3n.md.

Paper: the statistical top-k of C. You et al., "Spark Transformer: Reactivating Sparsity
in FFN and Attention", arXiv:2506.06644 (threshold = mean + std * Phi^-1 of the target
fraction, a linear-time stand-in for sorting), which the transformers Gemma 3n docs cite.
Checked against: transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``
(``Gemma3nTextMLP._gaussian_topk``, lines 959-973; applied when the layer's sparsity is
> 0, line 952) and Google's ``gemma/gm/nn/gemma3n/_modules.py`` (``_gaussian_topk``:
``jnp.std`` with the default ddof 0).
"""

from __future__ import annotations

import statistics

import numpy as np

from .errors import InputError
from .numerics import as_float_array, to_compute, to_storage


def gaussian_quantile(sparsity: float) -> float:
    """The standard normal quantile ``Phi^-1(sparsity)`` as a Python float (float64).

    Args:
        sparsity: the target fraction of zeroed activations, in (0, 1).

    Returns:
        ``z`` with ``P(N(0, 1) < z) = sparsity``, accurate to about 1e-16 relative.

    Raises:
        InputError: ``sparsity`` is not a real number strictly between 0 and 1.
    """
    real = isinstance(sparsity, (int, float, np.integer, np.floating)) and not isinstance(sparsity, (bool, np.bool_))
    if not real or not 0.0 < float(sparsity) < 1.0:
        raise InputError(f"gaussian_top_k: sparsity must be a number strictly between 0 and 1, got {sparsity!r}")
    return statistics.NormalDist().inv_cdf(float(sparsity))


def gaussian_top_k(gate: np.ndarray, sparsity: float) -> np.ndarray:
    """``relu(g - (mean(g) + std(g) * Phi^-1(sparsity)))`` over the last axis.

    Args:
        gate: ``(..., F)`` MLP gate pre-activations, a float array, F >= 1.
        sparsity: target fraction of zeros, in (0, 1) (``activation_sparsity_pattern[l]``).

    Returns:
        ``(..., F)`` in the dtype of ``gate``, >= 0.

    Dtype: mean, population standard deviation and the subtraction in the dtype of
    ``gate``; the quantile is exact, rounded once to that dtype (module docstring).
    float16 / bfloat16: all of it in float32 (the quantile rounded to float32), the
    result rounded once (transformers rounds the quantile, the mean, the deviation and
    the difference to the storage dtype).

    Raises:
        InputError: ``gate`` not a float array with at least one axis;
            ``sparsity`` outside (0, 1).
    """
    gate = as_float_array("gaussian_top_k: gate", gate)
    if gate.ndim == 0 or gate.shape[-1] == 0:
        raise InputError(f"gaussian_top_k: gate must have a non-empty last axis, got shape {gate.shape}")
    storage, gate = gate.dtype, to_compute(gate)
    z = gate.dtype.type(gaussian_quantile(sparsity))
    mean = np.mean(gate, axis=-1, keepdims=True)
    # Population standard deviation (ddof 0), as jnp.std and torch.std(unbiased=False).
    std = np.sqrt(np.mean((gate - mean) ** 2, axis=-1, keepdims=True))
    return to_storage(np.maximum(gate - (mean + std * z), 0), storage)
