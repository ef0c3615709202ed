"""AltUp (alternating updates) as Gemma 3n uses it: A residual streams, one computed.

The decoder carries A copies ("streams") of the residual state. Each layer predicts
every stream from all of them with token-dependent mixing coefficients, runs the
transformer layer on one ("active") stream only, and corrects every stream with the
layer's innovation on the active one::

    m          = tanh( (RMSNorm(S_a; router_norm) * M^-1) W_r^T )         (..., A)   router ("modalities")
    C          = reshape(m W_pred^T, (..., A, A))    C[..., i, j] = (m W_pred^T)[..., A*i + j]
    pred_i     = S_i + sum_j C[..., i, j] S_j                              predict
    out        = layer(pred_a)                                             the only stream computed
    m'         = tanh( (RMSNorm(out; router_norm) * M^-1) W_r^T )         same router weights
    c          = m' W_corr^T + 1                                           (..., A)
    S'_i       = pred_i + c[..., i] (out - pred_a)                        correct

Before the first layer the streams are made from the embedding e, and after the last
they are folded back into one state, both with magnitude matching (RMS over M, no eps)::

    S_0 = e,   S_i = match(e W_i^T, rms(e))                       i = 1..A-1  (altup_projections)
    h   = mean(S_0, match(S_1 U_1^T, rms(S_0)), ..., match(S_{A-1} U_{A-1}^T, rms(S_0)))   (altup_unembed_projections)
    match(y, t) = y * t / max(rms(y), 1e-12)

Notation:
    paper symbol            code name                                  shape
    A (streams)             ``altup_num_inputs``                       scalar
    a (active stream)       ``altup_active_idx``                       scalar in [0, A)
    S                       ``streams``                                (A, B, T, M)
    router gain             ``altup.router_norm.weight``               (M,)   plain w
    W_r                     ``altup.modality_router.weight``           (A, M)
    W_pred (p_{i,j})        ``altup.prediction_coefs.weight``          (A*A, A)
    W_corr (g_i)            ``altup.correction_coefs.weight``          (A, A)
    W_i, U_i                ``altup_projections.{i-1}``, ``altup_unembed_projections.{i-1}``  (M, M)

Quirks (spec sheet sec. 3.3): the router input is scaled by ``M^-1``, not ``M^-1/2``
(G3n-4); output row ``A*i + j`` of ``prediction_coefs`` weights source stream j into
target stream i, and the streams themselves are added back (G3n-5); the correction
coefficients get ``+ 1`` (G3n-6).

Magnitude guard. Google's code divides by ``max(rms(y), 1e-12)``; transformers 5.24
divides by ``sqrt(max(mean(y^2), 1e-5))``. The two agree unless ``mean(y^2) < 1e-5``
(RMS below 3.2e-3, far below any real activation); the reference follows Google, the
model's authors. tests/test_gemma3n_components.py measures where they part.

Dtype: everything in the dtype of the streams, the router's tanh included (Google and
transformers take that tanh in float32 for their bfloat16 models). float16 / bfloat16
streams (:mod:`refimpl.numerics`): the prediction, the correction, the magnitude match
and the fold are each one component, computed in float32 and rounded once; the router
rounds its norm, its scaled input, its projection and its tanh (taken in float32), as
transformers does.

Paper: C. Baykal, D. Cutler, N. Dikkala, N. Ghosh, R. Panigrahy, X. Wang, "Alternating
Updates for Efficient Transformers", arXiv:2301.13310, Algorithm 1 (predict with learned
p_{i,j}, compute one block, correct with learned g_i). Gemma 3n makes p and g
token-dependent through the router and adds the identity to the prediction.
Checked against: transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``
(``Gemma3nTextAltUp`` 976-1072; stream set-up and fold in ``Gemma3nTextModel.forward``
1679-1731) and Google's ``gemma/gm/nn/gemma3n/_modules.py`` (``AltUp``) and
``_transformer.py`` (``_maybe_preprocess_embeddings_with_altup``,
``_maybe_postprocess_embeddings_with_altup``).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError
from .linear import linear
from .numerics import as_float_array, to_compute, to_storage
from .rmsnorm import rms_norm

#: Google's floor on the RMS in :func:`match_magnitude` (``jnp.maximum(new_magnitude, 1e-12)``).
MAGNITUDE_FLOOR = 1e-12


def _projections(name: str, projections, width: int, count: int | None = None) -> list[np.ndarray]:
    """``projections`` as a list of ``(M, M)`` float arrays (``count`` of them when given).

    Raises:
        ShapeError: not a list, the wrong number, or a matrix that is not ``(M, M)``.
        InputError: a non-float matrix.
    """
    if not isinstance(projections, (list, tuple)):
        raise ShapeError(f"{name}: projections must be a list of ({width}, {width}) matrices, "
                         f"got {type(projections).__name__}")
    if count is not None and len(projections) != count:
        raise ShapeError(f"{name}: {count + 1} streams need {count} projections, got {len(projections)}")
    checked = [as_float_array(f"{name}: projections[{i}]", w) for i, w in enumerate(projections)]
    for i, w in enumerate(checked):
        if w.shape != (width, width):
            raise ShapeError(f"{name}: projections[{i}] has shape {w.shape}, hidden size {width} needs "
                             f"({width}, {width})")
    return checked


def _streams(name: str, streams) -> np.ndarray:
    streams = as_float_array(f"{name}: streams", streams)
    if streams.ndim < 2 or streams.shape[0] < 1:
        raise ShapeError(f"{name}: streams must be (A, ..., M) with A >= 1, got shape {streams.shape}")
    return streams


def router_modalities(x: np.ndarray, router_norm: np.ndarray, modality_router: np.ndarray, eps: float) -> np.ndarray:
    """``tanh((RMSNorm(x; router_norm) * M^-1) W_r^T)``, the per-token mixing signal.

    Args:
        x: ``(..., M)`` the active stream (predict) or the layer output (correct).
        router_norm: ``(M,)`` plain-weight RMSNorm gain.
        modality_router: ``(A, M)`` W_r.
        eps: ``rms_norm_eps``.

    Returns:
        ``(..., A)`` in the dtype of ``x``, in (-1, 1).

    Raises:
        InputError / ShapeError: see :func:`refimpl.rmsnorm.rms_norm` and :func:`refimpl.linear.linear`.
    """
    normed = rms_norm(x, router_norm, eps)
    # M^-1, rounded to the compute dtype like transformers' router_input_scale buffer (G3n-4).
    routed = linear(normed * normed.dtype.type(normed.shape[-1] ** -1.0), modality_router)
    return to_storage(np.tanh(to_compute(routed)), routed.dtype)


def altup_predict(streams: np.ndarray, modalities: np.ndarray, prediction_coefs: np.ndarray) -> np.ndarray:
    """``pred_i = S_i + sum_j C[..., i, j] S_j`` with ``C = reshape(m W_pred^T, (..., A, A))``.

    Args:
        streams: ``(A, B, T, M)``.
        modalities: ``(B, T, A)`` from :func:`router_modalities` on the active stream.
        prediction_coefs: ``(A*A, A)``; output row ``A*i + j`` is the weight of source
            stream j in target stream i.

    Returns:
        ``(A, B, T, M)`` predictions in the dtype of ``streams``.

    Raises:
        ShapeError: the coefficient matrix is not ``(A*A, A)`` or ``modalities`` is not ``(B, T, A)``.
    """
    streams = _streams("altup_predict", streams)
    a = streams.shape[0]
    if np.shape(prediction_coefs) != (a * a, a) or np.shape(modalities) != (*streams.shape[1:-1], a):
        raise ShapeError(f"altup_predict: {a} streams of {streams.shape[1:]} need prediction_coefs {(a * a, a)} and "
                         f"modalities {(*streams.shape[1:-1], a)}, got {np.shape(prediction_coefs)} and "
                         f"{np.shape(modalities)}")
    coefs = linear(modalities, prediction_coefs).reshape(*modalities.shape[:-1], a, a)
    # Stream-major C[i, j] moved to the front so that pred[i] = sum_j C[i, j] * S[j] broadcasts over M.
    mixing = np.moveaxis(coefs, (-2, -1), (0, 1))[..., None]  # (A, A, B, T, 1)
    wide = to_compute(streams)
    return to_storage(wide + np.sum(to_compute(mixing) * wide[None], axis=1), streams.dtype)


def altup_correct(
    predictions: np.ndarray, activated: np.ndarray, modalities: np.ndarray, correction_coefs: np.ndarray,
    active_idx: int,
) -> np.ndarray:
    """``S'_i = pred_i + (m' W_corr^T + 1)[..., i] * (activated - pred_a)``.

    Args:
        predictions: ``(A, B, T, M)`` from :func:`altup_predict`.
        activated: ``(B, T, M)`` the layer's output on the active prediction.
        modalities: ``(B, T, A)`` from :func:`router_modalities` on ``activated``.
        correction_coefs: ``(A, A)`` W_corr.
        active_idx: a, the stream the layer ran on.

    Returns:
        ``(A, B, T, M)`` corrected streams in the dtype of ``predictions``.

    Raises:
        InputError: ``active_idx`` not an integer in ``[0, A)``.
        ShapeError: shapes do not fit.
    """
    predictions = _streams("altup_correct", predictions)
    a = predictions.shape[0]
    if isinstance(active_idx, bool) or not isinstance(active_idx, (int, np.integer)) or not 0 <= active_idx < a:
        raise InputError(f"altup_correct: active_idx must be an integer in [0, {a}), got {active_idx!r}")
    if np.shape(correction_coefs) != (a, a) or np.shape(activated) != predictions.shape[1:]:
        raise ShapeError(f"altup_correct: {a} streams of {predictions.shape[1:]} need correction_coefs {(a, a)} and "
                         f"activated {predictions.shape[1:]}, got {np.shape(correction_coefs)} and "
                         f"{np.shape(activated)}")
    storage, wide = predictions.dtype, to_compute(predictions)
    # G3n-6: the coefficients are offsets from 1.
    gains = to_compute(linear(modalities, correction_coefs)) + 1
    innovation = to_compute(activated) - wide[active_idx]
    return to_storage(wide + np.moveaxis(gains, -1, 0)[..., None] * innovation[None], storage)


def root_mean_square(x: np.ndarray) -> np.ndarray:
    """``sqrt(mean(x**2))`` over the last axis, kept as a length-1 axis; no epsilon (float16 /
    bfloat16: in float32, rounded once)."""
    x = as_float_array("root_mean_square: x", x)
    if x.ndim == 0:
        raise InputError("root_mean_square: x must have at least one axis")
    return to_storage(_rms(to_compute(x)), x.dtype)


def _rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(x * x, axis=-1, keepdims=True))


def match_magnitude(y: np.ndarray, target_rms: np.ndarray) -> np.ndarray:
    """``y`` rescaled to RMS ``target_rms``: ``y * target / max(rms(y), 1e-12)`` (Google's guard).

    Args:
        y: ``(..., M)``.
        target_rms: ``(..., 1)`` from :func:`root_mean_square`.

    Returns:
        ``(..., M)`` in the dtype of ``y`` (float16 / bfloat16: computed in float32, the RMS of
        ``y`` included, rounded once).
    """
    wide = to_compute(y)
    current = np.maximum(_rms(wide), wide.dtype.type(MAGNITUDE_FLOOR))
    return to_storage(wide * (to_compute(target_rms) / current), y.dtype)


def altup_embed(embeddings: np.ndarray, projections: list[np.ndarray]) -> np.ndarray:
    """The A streams before layer 0: ``e`` and ``match(e W_i^T, rms(e))`` for each projection.

    Args:
        embeddings: ``(B, T, M)`` the scaled embedding e.
        projections: A-1 matrices ``(M, M)`` (``altup_projections.{0..A-2}``).

    Returns:
        ``(A, B, T, M)`` in the dtype of ``embeddings``.

    Raises:
        InputError: non-float arrays, or embeddings without an axis.
        ShapeError: projections that are not a list of ``(M, M)`` matrices.
    """
    embeddings = as_float_array("altup_embed: embeddings", embeddings)
    if embeddings.ndim == 0:
        raise InputError("altup_embed: embeddings must have at least one axis (..., M)")
    projections = _projections("altup_embed", projections, embeddings.shape[-1])
    target = root_mean_square(embeddings)
    return np.stack([embeddings] + [match_magnitude(linear(embeddings, w), target) for w in projections])


def altup_unembed(streams: np.ndarray, projections: list[np.ndarray]) -> np.ndarray:
    """One state from the A streams: the mean of ``S_0`` and ``match(S_i U_i^T, rms(S_0))``.

    Args:
        streams: ``(A, B, T, M)`` after the last layer.
        projections: A-1 matrices ``(M, M)`` (``altup_unembed_projections.{0..A-2}``).

    Returns:
        ``(B, T, M)`` in the dtype of ``streams``.

    Raises:
        ShapeError: not one ``(M, M)`` projection per stream after the first.
    """
    streams = _streams("altup_unembed", streams)
    projections = _projections("altup_unembed", projections, streams.shape[-1], streams.shape[0] - 1)
    target = root_mean_square(streams[0])
    folded = [streams[0]] + [match_magnitude(linear(s, w), target) for s, w in zip(streams[1:], projections)]
    return to_storage(np.mean(to_compute(np.stack(folded)), axis=0), streams.dtype)
