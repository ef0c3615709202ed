"""Per-layer embeddings (PLE) of Gemma 3n: one small extra input per token and layer.

Each token gets, for every decoder layer l, a P-wide vector built from two parts:
a row of a second embedding table (indexed by token id) and a projection of the
token's main embedding. Layer l mixes its slice into the residual streams after the
layer (``per_layer_input_update``)::

    ids'    = ids if 0 <= ids < V_pl else 0                     ids outside the table use row 0
    tok     = E_pl[ids'] * sqrt(P)                   (B, T, L, P)   E_pl: (V_pl, L*P), slot l = columns l*P..(l+1)*P-1
    prj     = RMSNorm( (e W_plp^T) * M^-1/2 ; w_p )  (B, T, L, P)   e = the scaled main embedding (B, T, M),
                                                                     W_plp: (L*P, M); norm over P per (token, layer)
    pli     = (prj + tok) * 2^-1/2                   (B, T, L, P)

    update_l(y) = RMSNorm( (act(y W_g^T) * pli[:, :, l]) W_p^T ; w_post )    y: (B, T, M) -> (B, T, M)

Which stream ``update_l`` reads and which it is added to is AltUp's business
(``refimpl/models/gemma3n.py``: it reads the corrected active stream times
``correct_output_scale`` and is added to streams 1..A-1).

Notation:
    paper symbol        code name                                        shape
    E_pl                ``model.embed_tokens_per_layer.weight``          (V_pl, L*P)
    V_pl                ``vocab_size_per_layer_input``                   scalar
    P                   ``hidden_size_per_layer_input``                  scalar
    W_plp               ``model.per_layer_model_projection.weight``      (L*P, M)
    w_p                 ``model.per_layer_projection_norm.weight``       (P,)
    W_g                 ``layers.{l}.per_layer_input_gate.weight``       (P, M)
    W_p                 ``layers.{l}.per_layer_projection.weight``       (M, P)
    w_post              ``layers.{l}.post_per_layer_input_norm.weight``  (M,)

Every RMSNorm here has a plain weight ``w`` (Gemma 3n's norms are not ``1 + w``).
Scalars (sqrt(P), M^-1/2, 2^-1/2) are rounded to the compute dtype before use, as
transformers casts its scalar buffers.

Paper: Gemma 3n model card and launch post ("Per-Layer Embeddings", Google, 2025; no
paper describes the equations). Checked against: transformers 5.24
``models/gemma3n/modeling_gemma3n.py`` (``Gemma3nTextModel.get_per_layer_inputs`` 1738-1745,
``project_per_layer_inputs`` 1747-1773, the per-layer update in
``Gemma3nTextDecoderLayer.forward`` 1308-1320) and Google's
``gemma/gm/nn/gemma3n/_modules.py`` (``Embedder.encode_per_layer_input``,
``PerLayerMapping``).
"""

from __future__ import annotations

import numpy as np

from .embedding import scaled_embed_tokens
from .errors import ShapeError
from .linear import linear
from .mlp import activation
from .numerics import as_float_array, as_integer_array
from .rmsnorm import rms_norm


def per_layer_token_ids(input_ids: np.ndarray, vocab_size_per_layer_input: int) -> np.ndarray:
    """Token ids for the per-layer table: ids outside ``[0, V_pl)`` become 0.

    The main vocabulary (262400 in the releases) is larger than the per-layer table
    (262144): the vision and audio token ids have no row of their own and read row 0.

    Raises:
        InputError: ``input_ids`` not an integer array.
    """
    ids = as_integer_array("per_layer_token_ids: input_ids", input_ids)
    return np.where((ids >= 0) & (ids < vocab_size_per_layer_input), ids, 0).astype(np.int64)


def per_layer_token_embeddings(input_ids: np.ndarray, table: np.ndarray, num_layers: int) -> np.ndarray:
    """``E_pl[ids'] * sqrt(P)`` split into layers: ``(B, T) -> (B, T, L, P)``.

    Args:
        input_ids: ``(B, T)`` token ids (any integers; see :func:`per_layer_token_ids`).
        table: ``(V_pl, L*P)`` ``embed_tokens_per_layer``.
        num_layers: L.

    Returns:
        ``(B, T, L, P)`` in the dtype of ``table``.

    Raises:
        ShapeError: the table width is not a multiple of L.
        InputError: non-integer ids or a non-float table.
    """
    table = as_float_array("per_layer_token_embeddings: table", table, ndim=2)
    if num_layers < 1 or table.shape[1] % num_layers:
        raise ShapeError(f"per-layer table width {table.shape[1]} is not a multiple of num_layers {num_layers}")
    width = table.shape[1] // num_layers
    ids = per_layer_token_ids(input_ids, table.shape[0])
    return scaled_embed_tokens(ids, table, width ** 0.5).reshape(*ids.shape, num_layers, width)


def per_layer_projection(embeddings: np.ndarray, projection: np.ndarray, norm_weight: np.ndarray,
                         eps: float) -> np.ndarray:
    """``RMSNorm((e W_plp^T) * M^-1/2; w_p)`` per (token, layer): ``(B, T, M) -> (B, T, L, P)``.

    Args:
        embeddings: ``(B, T, M)`` the scaled main embedding (what the decoder starts from).
        projection: ``(L*P, M)`` ``per_layer_model_projection``.
        norm_weight: ``(P,)`` ``per_layer_projection_norm`` (plain w).
        eps: ``rms_norm_eps``.

    Raises:
        ShapeError: the projection does not fit the embeddings or P.
    """
    embeddings = as_float_array("per_layer_projection: embeddings", embeddings)
    width = np.shape(norm_weight)[0] if np.ndim(norm_weight) == 1 else 0
    if width == 0 or np.shape(projection)[0] % width:
        raise ShapeError(f"per_layer_model_projection {np.shape(projection)} does not split into slots of "
                         f"per_layer_projection_norm width {np.shape(norm_weight)}")
    scale = embeddings.dtype.type(embeddings.shape[-1] ** -0.5)
    projected = linear(embeddings, projection) * scale
    projected = projected.reshape(*embeddings.shape[:-1], -1, width)
    return rms_norm(projected, norm_weight, eps)


def per_layer_inputs(input_ids: np.ndarray, embeddings: np.ndarray, table: np.ndarray, projection: np.ndarray,
                     norm_weight: np.ndarray, eps: float) -> np.ndarray:
    """The per-layer inputs ``pli = (prj + tok) * 2^-1/2``, ``(B, T, L, P)``.

    Args:
        input_ids: ``(B, T)`` token ids.
        embeddings: ``(B, T, M)`` scaled main embeddings of the same tokens.
        table, projection, norm_weight: see :func:`per_layer_token_embeddings` and
            :func:`per_layer_projection`.
        eps: ``rms_norm_eps``.

    Raises:
        ShapeError: table and projection disagree on L or P.
    """
    projected = per_layer_projection(embeddings, projection, norm_weight, eps)
    tokens = per_layer_token_embeddings(input_ids, table, projected.shape[-2])
    if tokens.shape != projected.shape:
        raise ShapeError(f"per-layer token embeddings {tokens.shape} and projections {projected.shape} differ")
    return (projected + tokens) * projected.dtype.type(2 ** -0.5)


def per_layer_input_update(
    y: np.ndarray, per_layer_input: np.ndarray, input_gate: np.ndarray, projection: np.ndarray,
    post_norm: np.ndarray, eps: float, hidden_activation: str,
) -> np.ndarray:
    """``RMSNorm((act(y W_g^T) * pli_l) W_p^T; w_post)``: what layer l adds to the other streams.

    Args:
        y: ``(B, T, M)`` the corrected active stream times ``correct_output_scale``.
        per_layer_input: ``(B, T, P)`` the layer's slice ``pli[:, :, l]``.
        input_gate: ``(P, M)`` ``per_layer_input_gate``.
        projection: ``(M, P)`` ``per_layer_projection``.
        post_norm: ``(M,)`` ``post_per_layer_input_norm`` (plain w).
        eps: ``rms_norm_eps``.
        hidden_activation: the config's activation (``gelu_pytorch_tanh``).

    Returns:
        ``(B, T, M)`` in the dtype of ``y``.

    Raises:
        ShapeError: the weights or ``per_layer_input`` do not fit.
        ConfigError: unknown activation.
    """
    act = activation(hidden_activation)
    gated = act(linear(y, input_gate))
    if gated.shape != np.shape(per_layer_input):
        raise ShapeError(f"per-layer input {np.shape(per_layer_input)} does not match the gate output {gated.shape}")
    return rms_norm(linear(gated * per_layer_input, projection), post_norm, eps)
