"""Multi-head Latent Attention (MLA): DeepSeek-V2/V3's low-rank key/value compression.

Per token t (hidden state h_t, width M) and head i (H heads), in paper order::

    c_t^Q    = RMSNorm(W^{DQ} h_t)                           (Dq,)      q_a_proj, q_a_layernorm  [eq. 12 of V3]
    [q_{t,i}^C ; q_{t,i}^R] = W^{UQ|QR}_i c_t^Q               (Dn + Dr)  q_b_proj rows of head i
        (without q_lora_rank:  = W^{Q}_i h_t                              q_proj)
    q_{t,i}^R <- RoPE(q_{t,i}^R)
    c_t^{KV} = RMSNorm(W^{DKV} h_t)                          (Dc,)      first Dc rows of kv_a_proj_with_mqa
    k_t^R    = RoPE(W^{KR} h_t)                              (Dr,)      last Dr rows; one key shared by all heads,
                                                                        *not* normalised
    [k_{t,i}^C ; v_{t,i}^C] = W^{UK|UV}_i c_t^{KV}           (Dn + Dv)  kv_b_proj rows of head i
    k_{t,i} = [k_{t,i}^C ; k_t^R],   q_{t,i} = [q_{t,i}^C ; q_{t,i}^R]
    o_{t,i} = sum_{j <= t} softmax_j( s * q_{t,i} . k_{j,i} ) v_{j,i}^C
    u_t     = W^O [o_{t,1}; ...; o_{t,H}]                    (M,)       o_proj

Only c_t^{KV} and k_t^R (Dc + Dr numbers per token) need caching
(:func:`mla_cache_entries`). The *absorbed* form (:func:`mla_absorbed`) never
builds per-head keys or values: since ``q^C . (W^{UK}_i c) = ((W^{UK}_i)^T q^C) . c``
it folds W^{UK}_i into the query, attends with a single key/value head over
``[c_j^{KV} ; k_j^R]`` (keys) and ``c_j^{KV}`` (values), and applies W^{UV}_i to the
attended latent afterwards. :func:`mla_literal` is the definition; the two are
equal up to float rounding (``tests/test_mla.py``).

Softmax scale ``s`` (bug classes MLA-02, MLA-03)::

    s = (Dn + Dr)^-1/2 * m(factor, mscale_all_dim)^2   rope_type != "default" and mscale_all_dim truthy
    s = (Dn + Dr)^-1/2                                  otherwise
    m(f, a) = 0.1 a ln f + 1  (f > 1),  1  (f <= 1)

It is ``mscale_all_dim``, never ``mscale``, that enters the softmax; ``mscale``
enters only YaRN's cos/sin magnitude ``m(factor, mscale) / m(factor, mscale_all_dim)``
(:func:`refimpl.rope.yarn_attention_scaling`, bug class RSC-12). Released DeepSeek-V3
and Kimi K2 configs set both to 1, so their cos/sin magnitude is 1 and the whole
correction sits in the softmax scale.

RoPE pair layout (``rope_interleave``; config default True): pairs (2i, 2i+1) of
q^R and k^R rotate by angle i (the checkpoint's own pairing), and transformers
writes the results *de-interleaved*: ``[r_0, r_2, r_4, ... | r_1, r_3, ...]``
(:func:`apply_rope_deinterleaved`). The permutation is the same for q and k, so
scores do not change, but the cached k^R is stored in that order. With
``rope_interleave`` false the pairs are (i, i + Dr/2) (``rotate_half``).

Quirks: q_a_layernorm and kv_a_layernorm use eps = 1e-6 (:data:`LATENT_NORM_EPS`)
whatever ``rms_norm_eps`` says (transformers builds them without eps, and DeepSeek's
reference ``RMSNorm(dim, eps=1e-6)`` does the same). ``attention_bias`` adds biases to
q_a_proj, kv_a_proj_with_mqa and o_proj only, never to q_b_proj, q_proj or kv_b_proj.
:func:`mla_literal` and :func:`mla_absorbed` are causal over the T tokens of the call
(no cache; ``positions`` only feed RoPE). For incremental decoding a model splits them:
:func:`mla_project` computes a call's queries and new cache entries, and
:func:`mla_attend_literal` / :func:`mla_attend_absorbed` attend over any S latent slots
(cached ones followed by the new) under a ``(B, T, S)`` mask built from positions.

Notation:

    ===================  ===============================  ==================
    paper                code                             shape
    ===================  ===============================  ==================
    h_t                  ``hidden_states``                (B, T, M)
    W^{DQ}               ``q_a_proj.weight``              (Dq, M)
    W^{UQ}, W^{QR}       ``q_b_proj.weight``              (H (Dn + Dr), Dq)
    W^{Q} (no Dq)        ``q_proj.weight``                (H (Dn + Dr), M)
    W^{DKV}; W^{KR}      ``kv_a_proj_with_mqa.weight``    (Dc + Dr, M)
    W^{UK}, W^{UV}       ``kv_b_proj.weight``             (H (Dn + Dv), Dc)
    W^O                  ``o_proj.weight``                (M, H Dv)
    c_t^Q                ``c_q``                          (B, T, Dq)
    c_t^{KV}             ``c_kv``                         (B, T, Dc)
    k_t^R                ``k_rope``                       (B, T, Dr)
    d_h, d_h^R           ``qk_nope_head_dim``, ``qk_rope_head_dim``   Dn, Dr
    (value head dim)     ``v_head_dim``                   Dv
    d_c, d_c'            ``kv_lora_rank``, ``q_lora_rank``            Dc, Dq
    ===================  ===============================  ==================

``kv_lora_rank`` is not a LoRA rank: it is the latent width Dc. transformers'
config also sets ``head_dim`` to Dr (the RoPE width), not to Dn + Dr.

Dtype: float64 or float32, computed in the dtype of ``hidden_states`` (weights must
share it). transformers computes the RMSNorm core, cos/sin and the softmax in
float32 islands. float16 / bfloat16: every projection (the absorbed form's two
per-head products included), norm, rotation and the attention core rounded to the
storage dtype, each computed in float32 (:mod:`refimpl.numerics`); the cache holds
``c^{KV}`` and ``k^R`` in the storage dtype.

Paper: DeepSeek-V2, arXiv:2405.04434, sec. 2.1 (eqs. 9-19; decoupled RoPE sec. 2.1.3;
weight absorption "W^{UK} can be absorbed into W^{UQ}, and W^{UV} into W^O", sec. 2.1.2);
DeepSeek-V3, arXiv:2412.19437, sec. 2.1.1 (eqs. 1-11); YaRN, arXiv:2309.00071, sec. 3.4.
Checked against: transformers 5.24 ``models/deepseek_v3/modeling_deepseek_v3.py``
(``DeepseekV3RMSNorm`` 37-52, ``yarn_get_mscale`` / ``yarn_apply_mscale`` 262-274,
``apply_rotary_pos_emb_interleave`` 310-346, ``DeepseekV3Attention`` 349-483).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import grouped_query_attention
from .errors import ConfigError, MissingWeightsError, RefimplError, ShapeError, UnexpectedWeightsError
from .linear import linear
from .masks import causal_mask
from .numerics import as_float_array, as_integer_array, check_finite_nonnegative, to_compute, to_storage
from .rmsnorm import rms_norm
from .rope import apply_rope_interleaved, apply_rope_rotate_half, rope_cos_sin, rope_frequencies, yarn_mscale

#: eps of q_a_layernorm and kv_a_layernorm, independent of ``rms_norm_eps``
#: (``DeepseekV3RMSNorm(q_lora_rank)`` with its default, modeling_deepseek_v3.py:380, 392).
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MlaDims:
    """The widths of one MLA layer (config.json names); see the module notation table."""

    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        """Dn + Dr, the width of a query or key head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"mla: {name} must be a positive integer, got {value!r}")
    return int(value)


def mla_dims(
    *, num_attention_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
) -> MlaDims:
    """Checked :class:`MlaDims`.

    Raises:
        ConfigError: a width that is not a positive integer (``q_lora_rank`` may be
            None: no query compression), or an odd ``qk_rope_head_dim``.
    """
    dr = _positive_int("qk_rope_head_dim", qk_rope_head_dim)
    if dr % 2:
        raise ConfigError(f"mla: qk_rope_head_dim must be even (RoPE rotates pairs), got {dr}")
    return MlaDims(
        num_attention_heads=_positive_int("num_attention_heads", num_attention_heads),
        q_lora_rank=None if q_lora_rank is None else _positive_int("q_lora_rank", q_lora_rank),
        kv_lora_rank=_positive_int("kv_lora_rank", kv_lora_rank),
        qk_nope_head_dim=_positive_int("qk_nope_head_dim", qk_nope_head_dim),
        qk_rope_head_dim=dr,
        v_head_dim=_positive_int("v_head_dim", v_head_dim),
    )


def mla_weight_shapes(hidden_size: int, dims: MlaDims, attention_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of one MLA layer (names relative to ``self_attn.``) with its shape."""
    h, m, dq, dc = dims.num_attention_heads, hidden_size, dims.q_lora_rank, dims.kv_lora_rank
    if dq is None:
        shapes = {"q_proj.weight": (h * dims.qk_head_dim, m)}
    else:
        shapes = {"q_a_proj.weight": (dq, m), "q_a_layernorm.weight": (dq,),
                  "q_b_proj.weight": (h * dims.qk_head_dim, dq)}
    shapes.update({
        "kv_a_proj_with_mqa.weight": (dc + dims.qk_rope_head_dim, m),
        "kv_a_layernorm.weight": (dc,),
        "kv_b_proj.weight": (h * (dims.qk_nope_head_dim + dims.v_head_dim), dc),
        "o_proj.weight": (m, h * dims.v_head_dim),
    })
    # Biases only on the down-projections and the output (modeling_deepseek_v3.py:376, 390, 402).
    if attention_bias:
        if dq is not None:
            shapes["q_a_proj.bias"] = (dq,)
        shapes["kv_a_proj_with_mqa.bias"] = (dc + dims.qk_rope_head_dim,)
        shapes["o_proj.bias"] = (m,)
    return shapes


def check_mla_weights(weights: dict, hidden_size: int, dims: MlaDims, attention_bias: bool, dtype) -> dict:
    """The tensors of :func:`mla_weight_shapes`, checked: present, no others, right shapes, one dtype.

    Raises:
        MissingWeightsError / UnexpectedWeightsError: names missing or not used
            (e.g. ``q_proj`` beside ``q_lora_rank``, a bias without ``attention_bias``).
        ShapeError: a tensor of the wrong shape (named). InputError: not float arrays.
        RefimplError: dtypes differ from ``dtype``.
    """
    if not isinstance(weights, dict):
        raise ShapeError(f"mla: weights must be a dict of arrays, got {type(weights).__name__}")
    shapes = mla_weight_shapes(hidden_size, dims, attention_bias)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise MissingWeightsError(f"mla: weights lack {', '.join(missing)}")
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected:
        raise UnexpectedWeightsError(f"mla: unexpected weights {', '.join(unexpected)} for q_lora_rank="
                                     f"{dims.q_lora_rank}, attention_bias={attention_bias}")
    checked = {name: as_float_array(f"mla: {name}", weights[name]) for name in shapes}
    for name, shape in shapes.items():
        if checked[name].shape != shape:
            raise ShapeError(f"mla: {name} has shape {checked[name].shape}, the config needs {shape}")
    for name, w in checked.items():
        if w.dtype != dtype:
            raise RefimplError(f"mla: {name} is {w.dtype} but hidden_states are {np.dtype(dtype)}; use one compute dtype")
    return checked


def mla_softmax_scale(qk_head_dim: int, rope_parameters: dict) -> float:
    """``(Dn + Dr)^-1/2``, times ``m(factor, mscale_all_dim)^2`` for a scaled RoPE with ``mscale_all_dim``.

    transformers applies the factor for every ``rope_type`` other than ``"default"``
    when ``mscale_all_dim`` is truthy (``yarn_apply_mscale``); ``mscale`` is not used
    here (bug class MLA-03).

    Raises:
        ConfigError: ``mscale_all_dim`` is set but ``factor`` is missing or not a number
            (transformers fails with KeyError / TypeError there).
    """
    scale = qk_head_dim ** -0.5
    if rope_parameters.get("rope_type", "default") == "default":
        return scale
    mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
    if not mscale_all_dim:
        return scale
    factor = rope_parameters.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"mla: rope_parameters['mscale_all_dim'] is set, so 'factor' must be a number, got {factor!r}")
    m = yarn_mscale(float(factor), float(mscale_all_dim))
    return scale * m * m


def mla_rope_tables(
    positions: np.ndarray, qk_rope_head_dim: int, rope_parameters: dict, max_position_embeddings: int, dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``(B, T, Dr/2)`` (or ``(T, Dr/2)``), including YaRN's magnitude, over the Dr rotary dims.

    Raises:
        ConfigError: bad or unsupported ``rope_parameters`` (a partial rotary factor
            other than 1 included: transformers rotates all Dr dims).
    """
    factor = rope_parameters.get("partial_rotary_factor", 1.0) if isinstance(rope_parameters, dict) else 1.0
    if factor != 1.0:
        raise ConfigError(f"mla: partial_rotary_factor {factor!r} is not supported (MLA rotates all "
                          "qk_rope_head_dim channels)")
    inv_freq, scaling = rope_frequencies(rope_parameters, qk_rope_head_dim,
                                         max_position_embeddings=max_position_embeddings)
    return rope_cos_sin(positions, inv_freq, dtype, scaling)


def apply_rope_deinterleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (2i, 2i+1) and write the results de-interleaved: ``[even outputs | odd outputs]``.

    DeepSeek-V3's ``apply_rotary_pos_emb_interleave``: ``out = [x_{2i} cos_i - x_{2i+1} sin_i ...
    | x_{2i+1} cos_i + x_{2i} sin_i ...]``; :func:`refimpl.rope.apply_rope_interleaved`
    followed by that fixed permutation. ``x`` ``(B, T, H, Dr)``, tables ``(T, Dr/2)``
    or ``(B, T, Dr/2)``.
    """
    rotated = apply_rope_interleaved(x, cos, sin)
    return np.concatenate([rotated[..., 0::2], rotated[..., 1::2]], axis=-1)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_interleave: bool) -> np.ndarray:
    """RoPE of MLA's rope part ``x`` ``(B, T, H, Dr)``: de-interleaved pairs if ``rope_interleave``, else rotate-half."""
    if rope_interleave:
        return apply_rope_deinterleaved(x, cos, sin)
    return apply_rope_rotate_half(x, cos, sin)


def _project(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def mla_queries(
    x: np.ndarray, w: dict, dims: MlaDims, cos: np.ndarray, sin: np.ndarray, rope_interleave: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(q^C (B, T, H, Dn), rotated q^R (B, T, H, Dr))`` from checked weights."""
    # V3 eqs. 6-9: compress, normalise, expand (or one projection without q_lora_rank).
    if dims.q_lora_rank is None:
        q = _project(x, w, "q_proj")
    else:
        c_q = rms_norm(_project(x, w, "q_a_proj"), w["q_a_layernorm.weight"], LATENT_NORM_EPS)
        q = linear(c_q, w["q_b_proj.weight"])
    q = q.reshape(*x.shape[:2], dims.num_attention_heads, dims.qk_head_dim)
    q_nope, q_rope = q[..., :dims.qk_nope_head_dim], q[..., dims.qk_nope_head_dim:]
    return q_nope, rotate(q_rope, cos, sin, rope_interleave)


def mla_latent(
    x: np.ndarray, w: dict, dims: MlaDims, cos: np.ndarray, sin: np.ndarray, rope_interleave: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(c^{KV} (B, T, Dc) normalised, k^R (B, T, Dr) rotated)``: what a cache holds."""
    # V3 eqs. 1 and 3: one down-projection, split into the latent and the shared rope key.
    compressed = _project(x, w, "kv_a_proj_with_mqa")
    c_kv = rms_norm(compressed[..., :dims.kv_lora_rank], w["kv_a_layernorm.weight"], LATENT_NORM_EPS)
    k_rope = rotate(compressed[..., None, dims.kv_lora_rank:], cos, sin, rope_interleave)[..., 0, :]
    return c_kv, k_rope


def split_kv_b_proj(kv_b_proj: np.ndarray, dims: MlaDims) -> tuple[np.ndarray, np.ndarray]:
    """``(W^{UK} (H, Dn, Dc), W^{UV} (H, Dv, Dc))``: kv_b_proj rows are ``[k^C | v^C]`` per head."""
    per_head = kv_b_proj.reshape(dims.num_attention_heads, dims.qk_nope_head_dim + dims.v_head_dim, -1)
    return per_head[:, :dims.qk_nope_head_dim], per_head[:, dims.qk_nope_head_dim:]


def _prepare(hidden_states, positions, weights, params: dict):
    """Checked ``(x, w, dims, cos, sin, scale, rope_interleave)`` for the public forms."""
    dims = mla_dims(**{k: params[k] for k in MlaDims.__dataclass_fields__})
    for flag in ("rope_interleave", "attention_bias"):
        if not isinstance(params[flag], (bool, np.bool_)):
            raise ConfigError(f"mla: {flag} must be true or false, got {params[flag]!r}")
    check_finite_nonnegative("mla: rms_norm_eps", params["rms_norm_eps"], error=ConfigError)
    x = as_float_array("mla: hidden_states", hidden_states, ndim=3)
    if 0 in x.shape:
        raise ShapeError(f"mla: hidden_states {x.shape} is empty (need at least one row, token and channel)")
    positions = as_integer_array("mla: positions", positions)
    if positions.shape not in (x.shape[:2], x.shape[1:2]):
        raise ShapeError(f"mla: positions {positions.shape} must be (B, T) or (T,) of hidden_states {x.shape}")
    w = check_mla_weights(weights, x.shape[2], dims, bool(params["attention_bias"]), x.dtype)
    rope_parameters = params["rope_parameters"]
    cos, sin = mla_rope_tables(positions, dims.qk_rope_head_dim, rope_parameters,
                               params["max_position_embeddings"], x.dtype)
    scale = mla_softmax_scale(dims.qk_head_dim, rope_parameters)
    return x, w, dims, cos, sin, scale, bool(params["rope_interleave"])


@dataclass(frozen=True)
class MlaStep:
    """One call's MLA projections: the new tokens' queries and cache entries, with what attention reads.

    Attributes:
        q_nope: ``q^C`` ``(B, T, H, Dn)``. q_rope: rotated ``q^R`` ``(B, T, H, Dr)``.
        c_kv: the new tokens' ``c^{KV}`` ``(B, T, Dc)`` after kv_a_layernorm.
        k_rope: their rotated ``k^R`` ``(B, T, Dr)`` (transformers' layout).
        weights: the checked module-relative tensors (``kv_b_proj``, ``o_proj`` are read here).
        dims: the widths. scale: the softmax scale ``s``.
    """

    q_nope: np.ndarray
    q_rope: np.ndarray
    c_kv: np.ndarray
    k_rope: np.ndarray
    weights: dict
    dims: MlaDims
    scale: float


def mla_project(
    hidden_states: np.ndarray, positions: np.ndarray, weights: dict, *, num_attention_heads: int,
    q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
    rope_parameters: dict, rope_interleave: bool, rms_norm_eps: float, max_position_embeddings: int,
    attention_bias: bool,
) -> MlaStep:
    """Everything of one call that does not depend on earlier tokens: queries, new ``c^{KV}`` and ``k^R``.

    Arguments and errors as :func:`mla_literal`; ``positions`` are the tokens' absolute
    positions (RoPE only).
    """
    x, w, dims, cos, sin, scale, interleave = _prepare(hidden_states, positions, weights, locals())
    q_nope, q_rope = mla_queries(x, w, dims, cos, sin, interleave)
    c_kv, k_rope = mla_latent(x, w, dims, cos, sin, interleave)
    return MlaStep(q_nope=q_nope, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope, weights=w, dims=dims, scale=scale)


def mla_attend_literal(step: MlaStep, c_kv: np.ndarray, k_rope: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The queries of ``step`` attending over S latent slots with per-head keys and values expanded.

    Args:
        step: from :func:`mla_project`.
        c_kv: ``(B, S, Dc)`` and k_rope: ``(B, S, Dr)``: the slots attended over (cached ones
            followed by ``step``'s own, or just ``step.c_kv`` / ``step.k_rope``).
        mask: bool ``(T, S)`` or ``(B, T, S)``, True where query t sees slot s.

    Returns:
        ``(B, T, M)`` after o_proj, in the compute dtype.
    """
    w, dims = step.weights, step.dims
    b, t, h, _ = step.q_nope.shape
    s = c_kv.shape[1]
    # V3 eqs. 2 and 5: per-head k^C and v^C from the latent; k^R broadcast to every head.
    k_nope = linear(c_kv, w["kv_b_proj.weight"]).reshape(b, s, h, -1)
    k_nope, v = k_nope[..., :dims.qk_nope_head_dim], k_nope[..., dims.qk_nope_head_dim:]
    k = np.concatenate([k_nope, np.broadcast_to(k_rope[:, :, None, :], (b, s, h, dims.qk_rope_head_dim))], axis=-1)
    q = np.concatenate([step.q_nope, step.q_rope], axis=-1)
    # V3 eqs. 10-11: softmax attention per head over the visible slots, then W^O.
    out = grouped_query_attention(q, k, v, mask, step.scale)
    return _project(out.reshape(b, t, h * dims.v_head_dim), w, "o_proj")


def mla_attend_absorbed(step: MlaStep, c_kv: np.ndarray, k_rope: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`mla_attend_literal` with W^{UK} and W^{UV} absorbed: nothing per head is built from the slots.

    ``q~_i = [(W^{UK}_i)^T q^C_i ; q^R_i]`` (Dc + Dr) attends with one shared key/value head
    over keys ``[c^{KV}_j ; k^R_j]`` and values ``c^{KV}_j`` (exactly the cache entries),
    giving a latent ``o~_i`` (Dc); then ``o_i = W^{UV}_i o~_i``. Arguments and returns as
    :func:`mla_attend_literal`.

    Paper: DeepSeek-V2, arXiv:2405.04434, sec. 2.1.2 (absorption during inference).
    """
    w, dims = step.weights, step.dims
    b, t, h, _ = step.q_nope.shape
    w_uk, w_uv = split_kv_b_proj(w["kv_b_proj.weight"], dims)
    storage = step.q_nope.dtype
    # q^C . (W^UK c) = ((W^UK)^T q^C) . c: the query moves into the latent space.
    q_latent = to_storage(np.einsum("bthn,hnc->bthc", to_compute(step.q_nope), to_compute(w_uk)), storage)
    q = np.concatenate([q_latent, step.q_rope], axis=-1)
    k = np.concatenate([c_kv, k_rope], axis=-1)[:, :, None, :]
    out_latent = grouped_query_attention(q, k, c_kv[:, :, None, :], mask, step.scale)
    # sum_j p_j W^UV c_j = W^UV sum_j p_j c_j: W^UV after attention.
    out = to_storage(np.einsum("bthc,hvc->bthv", to_compute(out_latent), to_compute(w_uv)), storage)
    return _project(out.reshape(b, t, h * dims.v_head_dim), w, "o_proj")


def mla_literal(
    hidden_states: np.ndarray, positions: np.ndarray, weights: dict, *, num_attention_heads: int,
    q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
    rope_parameters: dict, rope_interleave: bool, rms_norm_eps: float, max_position_embeddings: int,
    attention_bias: bool,
) -> np.ndarray:
    """Causal MLA with per-head keys and values materialised (the definition).

    Args:
        hidden_states: ``(B, T, M)`` (after the layer's input norm).
        positions: ``(B, T)`` or ``(T,)`` integer positions for RoPE.
        weights: the module-relative tensors of :func:`mla_weight_shapes`
            (``"q_a_proj.weight"``, ..., ``"o_proj.weight"``).
        num_attention_heads ... v_head_dim: H, Dq (or None), Dc, Dn, Dr, Dv.
        rope_parameters: resolved transformers-v5 RoPE dict (``rope_type``, ``rope_theta``, YaRN keys).
        rope_interleave: pair layout of the rope dims (see module docstring).
        rms_norm_eps: accepted for the op contract and checked; the two latent norms
            use :data:`LATENT_NORM_EPS` regardless (transformers quirk).
        max_position_embeddings: default ``original_max_position_embeddings`` of YaRN.
        attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Raises:
        ConfigError: bad widths, flags or RoPE parameters. InputError: non-float arrays or
            non-integer positions. ShapeError: shapes that do not fit.
        MissingWeightsError / UnexpectedWeightsError: the weight names do not match the config.
    """
    step = mla_project(hidden_states, positions, weights, **_params(locals()))
    t = step.c_kv.shape[1]
    return mla_attend_literal(step, step.c_kv, step.k_rope, causal_mask(t, t))


def mla_absorbed(
    hidden_states: np.ndarray, positions: np.ndarray, weights: dict, *, num_attention_heads: int,
    q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
    rope_parameters: dict, rope_interleave: bool, rms_norm_eps: float, max_position_embeddings: int,
    attention_bias: bool,
) -> np.ndarray:
    """The same attention as :func:`mla_literal`, with W^{UK} and W^{UV} absorbed.

    ``q~_i = [(W^{UK}_i)^T q^C_i ; q^R_i]`` (Dc + Dr) attends with one shared key/value
    head over keys ``[c^{KV}_j ; k^R_j]`` and values ``c^{KV}_j`` (exactly the cache
    entries), giving a latent ``o~_i`` (Dc); then ``o_i = W^{UV}_i o~_i``. Arguments,
    returns and errors as :func:`mla_literal`.

    Paper: DeepSeek-V2, arXiv:2405.04434, sec. 2.1.2 (absorption during inference).
    """
    step = mla_project(hidden_states, positions, weights, **_params(locals()))
    t = step.c_kv.shape[1]
    return mla_attend_absorbed(step, step.c_kv, step.k_rope, causal_mask(t, t))


def mla_cache_entries(
    hidden_states: np.ndarray, positions: np.ndarray, weights: dict, *, num_attention_heads: int,
    q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
    rope_parameters: dict, rope_interleave: bool, rms_norm_eps: float, max_position_embeddings: int,
    attention_bias: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """What an MLA cache holds per token: ``(c^{KV} (B, T, Dc), k^R (B, T, Dr))``.

    ``c^{KV}`` after kv_a_layernorm; ``k^R`` after RoPE, in transformers' layout
    (de-interleaved when ``rope_interleave``; transformers' ``DynamicLayer`` keeps them
    as "keys" ``(B, 1, S, Dc)`` and "values" ``(B, 1, S, Dr)``). Arguments and errors as
    :func:`mla_literal`.
    """
    step = mla_project(hidden_states, positions, weights, **_params(locals()))
    return step.c_kv, step.k_rope


def _params(arguments: dict) -> dict:
    """The keyword arguments of the public forms (everything but the arrays)."""
    return {k: v for k, v in arguments.items() if k not in ("hidden_states", "positions", "weights")}
