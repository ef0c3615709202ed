"""Multi-token prediction (MTP): draft logits for tokens further ahead than the next one.

DeepSeek-V3 (and Kimi K2's architecture), GLM-4.5 and Qwen3-Next append D =
``num_nextn_predict_layers`` MTP modules to the main model. Module k (depth k = 1..D)
takes, at position i, the representation of depth k - 1 and the embedding of token
``t_{i+k}``, and predicts token ``t_{i+k+1}``::

    h^0_i   = RMSNorm(h_L; norm)_i                 the main model's final-normed hidden state
    h'^k_i  = W_eh^k [ RMSNorm(E t_{i+k}; enorm_k) ; RMSNorm(h^{k-1}_i; hnorm_k) ]   eq. 21, embedding first
    x^k     = TRM_k(h'^k_{0..T-k-1})               the model's own decoder layer, causal, positions 0..T-k-1
    h^k_i   = RMSNorm(x^k_i; shared_head.norm_k)   carried to depth k + 1 and fed to the head
    P^k_i   = h^k_i W_lm^T                         draft logits for t_{i+k+1}           eq. 23

Depth k is defined on positions ``i = 0 .. T-k-1`` (the last k positions have no
``t_{i+k}``): its draft logits are ``(B, T-k, V)``, row i predicting ``t_{i+k+1}``,
the token the main model's logits at position ``i + k`` predict. The embedding
table E and the output head W_lm are the main model's (the checkpoint's per-depth
``embed_tokens`` / ``shared_head.head`` are copies of them).

Notation:
    paper symbol     code name                                        shape
    h^{k-1}          ``hidden_states``                                (B, T', M), T' = T - k
    Emb(t_{i+k})     ``next_token_embeddings``                        (B, T', M)
    RMSNorm (eq. 21) ``enorm.weight``, ``hnorm.weight``               (M,), (M,)
    M_k              ``eh_proj.weight``                               (M, 2M): columns [embedding | hidden]
    TRM_k            ``block`` (a decoder layer of the model)         (B, T', M) -> (B, T', M)
    OutHead norm     ``shared_head.norm.weight``                      (M,)
    OutHead          ``lm_head.weight`` (or E when tied)              (V, M)

Qwen3-Next stores its one depth as ``mtp.fc`` (= ``eh_proj``), ``mtp.pre_fc_norm_embedding``
(= ``enorm``), ``mtp.pre_fc_norm_hidden`` (= ``hnorm``), ``mtp.layers.0`` (TRM) and ``mtp.norm``
(= ``shared_head.norm``), all ``1 + w`` norms (``norm_weight_offset=1``).

Readings (evidence and alternatives in ``docs/mtp.md``):

* h^0 is the main model's hidden state *after* its final norm (transformers feeds
  ``hidden_states[-1]``, vLLM and sglang the hidden states the target model returns,
  Megatron-LM the decoder's output after ``final_layernorm``).
* The concatenation puts the normalised embedding first, ``[enorm(e); hnorm(h)]``: the
  layout of ``eh_proj`` in every implementation that loads the released weights
  (the paper writes the two halves in the other order).
* The representation carried to depth k + 1 is the one the head reads, after the
  depth's ``shared_head.norm`` (transformers, Megatron-LM, sglang; consistent with
  h^0 being the normalised main output and with the paper's OutHead being a plain
  linear map). vLLM's DeepSeek / GLM MTP carries the block output before that norm.
* Positions: depth k's block sees positions ``0 .. T-k-1``, those of the main model
  at the same slots. transformers and Megatron-LM give the block the positions of the
  input tokens (``k .. T-1``); RoPE only sees position differences, so both give the
  same result (to rounding).

Dtype: the compute dtype of the inputs (float64 or float32); no casts.

Paper: DeepSeek-V3 Technical Report, arXiv:2412.19437, sec. 2.2 (eqs. 21-23, Figure 3).
Checked against: transformers 5.24 ``modeling_layers.py`` (``MtpLayer.forward`` 350-377,
``MtpModel.forward`` 502-573, ``MtpModel.forward_layer`` 575-617) and
``generation/candidate_generator.py`` (``MTPCandidateGenerator.get_candidates`` 1403-1491);
vLLM ``deepseek_mtp.py``, ``glm4_moe_mtp.py``, ``qwen3_next_mtp.py``; sglang
``deepseek_nextn.py``, ``qwen3_next_mtp.py``; Megatron-LM ``multi_token_prediction.py``.
Evidence and the alternatives not followed: ``docs/mtp.md``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .embedding import embed_tokens
from .errors import MissingWeightsError, ShapeError
from .linear import linear
from .numerics import as_float_array, check_same_dtype
from .rmsnorm import rms_norm

#: The tensors of one MTP depth besides its decoder layer, as DeepSeek-V3 and GLM-4.5 store
#: them under ``model.layers.{L + k - 1}.`` (Qwen3-Next's names are mapped onto these).
MTP_TENSORS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def _check_mtp_weights(weights: dict, hidden_states: np.ndarray) -> dict[str, np.ndarray]:
    """The four tensors of :data:`MTP_TENSORS`, checked for presence, shape and dtype (that of ``hidden_states``)."""
    if not isinstance(weights, dict):
        raise ShapeError(f"mtp_layer: weights must be a dict of arrays, got {type(weights).__name__}")
    missing = [name for name in MTP_TENSORS if name not in weights]
    if missing:
        raise MissingWeightsError(f"mtp_layer: weights lack {', '.join(missing)}")
    width = hidden_states.shape[-1]
    shapes = {"enorm.weight": (width,), "hnorm.weight": (width,), "eh_proj.weight": (width, 2 * width),
              "shared_head.norm.weight": (width,)}
    checked = {name: as_float_array(f"mtp_layer: {name}", weights[name]) for name in MTP_TENSORS}
    for name, shape in shapes.items():
        if checked[name].shape != shape:
            raise ShapeError(f"mtp_layer: {name} has shape {checked[name].shape}, hidden_size {width} needs {shape}")
    check_same_dtype(hidden_states=hidden_states, **{n.replace(".", "_"): w for n, w in checked.items()})
    return checked


def mtp_layer(
    hidden_states: np.ndarray, next_token_embeddings: np.ndarray, weights: dict[str, np.ndarray], *,
    rms_norm_eps: float, block: Callable[[np.ndarray], np.ndarray], norm_weight_offset: float = 0.0,
) -> np.ndarray:
    """One MTP depth: the representation ``h^k`` (normalised, fed to the head and to depth k + 1).

    Args:
        hidden_states: ``h^{k-1}`` ``(B, T', M)``: the main model's final-normed hidden state
            (k = 1) or the previous depth's output, at the positions this depth covers.
        next_token_embeddings: ``E[t_{i+k}]`` ``(B, T', M)``, the embedding rows of the
            tokens k places ahead (unscaled: none of these models scales its embedding).
        weights: :data:`MTP_TENSORS` (other entries are ignored): ``enorm.weight``,
            ``hnorm.weight`` ``(M,)``, ``eh_proj.weight`` ``(M, 2M)``, ``shared_head.norm.weight`` ``(M,)``.
        rms_norm_eps: eps of the three RMSNorms.
        block: ``TRM_k``, the depth's decoder layer ``(B, T', M) -> (B, T', M)`` (causal,
            positions ``0 .. T'-1``), closed over its own weights.
        norm_weight_offset: 0 for a plain gain ``w`` (DeepSeek-V3, GLM-4.5), 1 for ``1 + w``
            (Qwen3-Next's norms).

    Returns:
        ``(B, T', M)`` in the dtype of ``hidden_states``.

    Raises:
        InputError: non-float arrays. ShapeError: shapes that do not fit.
        MissingWeightsError: one of :data:`MTP_TENSORS` is absent.
        RefimplError: arrays of different dtypes (float64 and float32 mixed).

    Paper: arXiv:2412.19437, sec. 2.2, eqs. 21-22.
    Checked against: transformers 5.24 ``MtpLayer.forward`` (modeling_layers.py:361-377).
    """
    h = as_float_array("mtp_layer: hidden_states", hidden_states, ndim=3)
    e = as_float_array("mtp_layer: next_token_embeddings", next_token_embeddings, ndim=3)
    if e.shape != h.shape:
        raise ShapeError(f"mtp_layer: next_token_embeddings {e.shape} and hidden_states {h.shape} differ in shape")
    check_same_dtype(hidden_states=h, next_token_embeddings=e)
    w = _check_mtp_weights(weights, h)
    offset = norm_weight_offset
    # Eq. 21: both halves normalised, concatenated embedding first, projected back to M.
    joined = np.concatenate([rms_norm(e, w["enorm.weight"], rms_norm_eps, weight_offset=offset),
                             rms_norm(h, w["hnorm.weight"], rms_norm_eps, weight_offset=offset)], axis=-1)
    # Eq. 22: the depth's own decoder layer.
    x = block(linear(joined, w["eh_proj.weight"]))
    # The head's norm; its output is what depth k + 1 reads.
    return rms_norm(x, w["shared_head.norm.weight"], rms_norm_eps, weight_offset=offset)


def mtp_chain(
    main_hidden: np.ndarray, input_ids: np.ndarray, embedding: np.ndarray,
    depths: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]],
) -> list[np.ndarray]:
    """Run depths 1..D in order, each on the previous depth's output and the tokens k ahead.

    Args:
        main_hidden: ``h^0`` ``(B, T, M)``, the main model's final-normed hidden state.
        input_ids: ``(B, T)`` checked token ids.
        embedding: ``(V, M)`` the main model's embedding table.
        depths: depth k's function ``(h^{k-1} (B, T-k, M), E[t_{i+k}] (B, T-k, M)) -> h^k (B, T-k, M)``,
            typically :func:`mtp_layer` with the depth's weights and block bound.

    Returns:
        ``[h^1 (B, T-1, M), ..., h^D (B, T-D, M)]``; a depth with no position (``T <= k``)
        gives ``(B, 0, M)`` without running.

    Depth k reads the *output* of depth k - 1 at the same position i (bug class MTP-02)
    and the embedding of ``t_{i+k}`` (the tokens shifted k places).
    """
    batch, length = input_ids.shape
    h = main_hidden
    out = []
    for k, depth in enumerate(depths, start=1):
        span = length - k
        if span <= 0:
            h = np.zeros((batch, 0, main_hidden.shape[-1]), main_hidden.dtype)
        else:
            h = depth(h[:, :span], embed_tokens(input_ids[:, k:], embedding))
        out.append(h)
    return out
