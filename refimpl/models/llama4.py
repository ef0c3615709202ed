"""Llama 4 text decoder (``Llama4ForCausalLM``, model_type ``llama4_text``): Scout and Maverick.

Forward pass, pre-norm, per layer l (weights under ``model.layers.{l}.``)::

    h_0 = E[input_ids]                              no embedding scale
    x   = RMSNorm(h; input_layernorm)
    q   = x Wq^T (+ bq)   (B, T, H, D);  k = x Wk^T (+ bk), v = x Wv^T (+ bv)   (B, T, Hkv, D)
    RoPE layer  (no_rope_layers[l] == 1):
        q, k = RoPE_interleaved(q, k; pairs (2i, 2i+1), positions p)      complex-multiply form
        q, k = q / rms(q), k / rms(k)               per head over D, no weight; only if use_qk_norm
    NoPE layer  (no_rope_layers[l] == 0):
        q    = q * tau(p)                           only if attn_temperature_tuning
        tau(p) = 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale))
    a   = o_proj( GQA(q, k, v; scale = D^-0.5, mask_l) ) (+ bo)
    mask_l: causal within chunks [0, C), [C, 2C), ... on "chunked_attention" layers
            (C = attention_chunk_size; RoPE layers by default), plain causal on
            "full_attention" layers (NoPE layers, or every layer when C is null)
    h   = h + a
    x   = RMSNorm(h; post_attention_layernorm)
    MoE layer   (l in moe_layers):  h = h + SharedSwiGLU(x) + sum_{e in top-k(r)} Expert_e(sigmoid(r_e) * x)
                                    r = x W_router^T; the weight scales the expert *input*
    dense layer (otherwise):        h = h + SwiGLU(x) with width intermediate_size_mlp
    SwiGLU: down( act(gate x) * up x ), act = hidden_act (silu in the releases; transformers
            applies config.hidden_act to the dense MLP, the shared and the routed experts alike)
    logits = RMSNorm(h_L; norm) W_lm^T             (W_lm = E when tie_word_embeddings)

Incremental decoding (:func:`forward_step`, :mod:`refimpl.kv_cache`): p is a token's position
in its own sequence (``cumsum(attention_mask) - 1`` under left padding); RoPE, the chunk
boundaries and the NoPE temperature tau(p) all read it. A chunked layer keeps the last C slots
(a query sees at most the C - 1 keys before it in its chunk, plus itself); a full-attention
layer (the NoPE ones) keeps every key. Keys are cached after RoPE and QK-norm; the temperature
scales queries only, so nothing cached depends on it.

Notation:
    paper / config symbol        code name                                   shape
    W_Q, W_K, W_V, W_O           ``self_attn.{q,k,v,o}_proj``                (H*D, M), (Hkv*D, M), (Hkv*D, M), (M, H*D)
    C                            ``attention_chunk_size``                    scalar or None
    tau(p)                       :func:`attention_temperature`               (T,)
    W_router                     ``feed_forward.router.weight``              (E, M)
    [G | U] (input-major)        ``feed_forward.experts.gate_up_proj``       (E, M, 2I)   gate columns 0..I-1
    W_down (input-major)         ``feed_forward.experts.down_proj``          (E, I, M)
    shared expert                ``feed_forward.shared_expert.{gate,up,down}_proj``  (I, M), (I, M), (M, I)
    dense MLP (F = ``intermediate_size_mlp``)  ``feed_forward.{gate,up,down}_proj``  (F, M), (F, M), (M, F)
    I                            ``intermediate_size`` (routed AND shared experts)
    E, k                         ``num_local_experts``, ``num_experts_per_tok``

How config.json is resolved (transformers 5.24 ``Llama4TextConfig.__post_init__``,
``configuration_llama4.py:165-193``):

* ``no_rope_layers`` (misnomer: **1 = the layer applies RoPE**); when absent or empty,
  ``int((l + 1) % no_rope_layer_interval != 0)``: interval 4 makes layers 3, 7, ... NoPE.
* ``moe_layers``; when absent, ``range(interleave_moe_layer_step - 1, L, step)``
  (:func:`refimpl.moe.interleaved_schedule`): Scout step 1 (all MoE), Maverick step 2
  (odd layers MoE, even layers dense).
* ``layer_types``; when absent, ``"chunked_attention"`` for RoPE layers when
  ``attention_chunk_size`` is set, else ``"full_attention"``. An explicit list wins for
  the mask, while RoPE still follows ``no_rope_layers`` (as in transformers).
* RoPE: ``rope_parameters`` / legacy ``rope_scaling`` + ``rope_theta`` (default 5e5).
  Scout's llama3 scaling has ``low_freq_factor == high_freq_factor`` (1, 1): a hard
  switch at wavelength ``original_max_position_embeddings``; :func:`rope_inv_freq`
  handles it (the generic :func:`refimpl.rope.rope_frequencies` refuses it).
* ``attn_temperature_tuning`` must be true or false: Meta's published Scout config.json
  says ``4``, which transformers 5.24 refuses (strict dataclass); so do we.

Dtype: computed in the dtype of the weights (float64 or float32); RoPE tables and the
temperature are formed in float64 and rounded once. transformers computes RoPE in
complex64, RMSNorm / QK-norm and the router sigmoid in float32 (float32 islands; see
``conformance/backends/hf_exact.py``).
float16 / bfloat16: storage dtypes with float32 compute per component (``docs/low-precision.md``).

Paper: Meta, "The Llama 4 herd" (blog, 2025-04-05: MoE with a shared expert and
alternating dense / MoE layers, iRoPE = interleaved NoPE layers with inference-time
temperature scaling of attention); Nakanishi, "Scalable-Softmax Is Superior for
Attention", arXiv:2501.19399 (the temperature ~ log of the position); Yang et al.,
"Rope to Nope and back again", arXiv:2501.18795 (NoPE / RoPE hybrids).
Checked against: transformers 5.24 ``models/llama4/modeling_llama4.py``
(``Llama4TextExperts`` 55-85, ``Llama4TextMLP`` 88-103, ``Llama4TextL2Norm`` 106-118,
``Llama4TextRMSNorm`` 121-138, ``Llama4Router`` 141-153, ``Llama4TextMoe`` 156-175,
``Llama4TextRotaryEmbedding`` 178-222, ``apply_rotary_emb`` 225-234,
``Llama4TextAttention`` 301-391, ``Llama4TextDecoderLayer`` 394-443,
``Llama4TextModel.forward`` 506-569) and ``configuration_llama4.py`` (79-193); and
against the authors' code, meta-llama/llama-models ``models/llama4/model.py``
(``apply_scaling``, ``apply_rotary_emb``, ``Attention.forward``: RoPE, then QK-norm
only on RoPE layers, then temperature only on NoPE layers;
``create_chunked_attention_mask``) and ``models/llama4/moe.py`` (``MoE.forward``:
top-k on raw scores, sigmoid, router weight on the expert input, shared expert added).
Both agree on every point above.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from ..architecture import Architecture
from ..config import check_known_keys, get_field, get_positive_int
from ..errors import ConfigError, MissingWeightsError, ShapeError, UnexpectedWeightsError, WeightShapeError
from ..experts import swiglu_expert
from ..kv_cache import KVCache, StepContext, attend_with_cache, fresh_context
from ..mlp import ACTIVATIONS, gated_mlp
from ..moe import dispatch, interleaved_schedule
from ..numerics import as_float_array, as_integer_array
from ..rmsnorm import rms_normalize, rms_norm
from ..rope import apply_rope_interleaved, default_inv_freq, rope_cos_sin, rope_frequencies, rotary_dim
from ..routers import llama4_top_k_sigmoid, router_logits
from ._llama_like import (
    ROPE_KEYS, attention_weight_shapes, decoder_weight_shapes, projection, resolve_rope_parameters, run_decoder_step,
    split_heads, tied_head,
)

NAME = "Llama4ForCausalLM"

#: ``Llama4TextConfig.default_theta`` (configuration_llama4.py:110).
DEFAULT_ROPE_THETA = 500_000.0
LAYER_TYPES = ("chunked_attention", "full_attention")
#: config.json keys deliberately without effect here.
IGNORED_KEYS = frozenset({
    # Training only: the auxiliary load-balancing loss and its switch; Llama4Router never
    # reads the jitter (modeling_llama4.py:141-153).
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    # Quantisation bookkeeping in some published text_configs (TensorRT-LLM's Maverick copy).
    "for_llm_compressor", "_attn_implementation_autoset",
})
#: config.json keys read while resolving the schedules (not dataclass fields, or read specially).
_RESOLVED_KEYS = frozenset({"moe_layers"})


@dataclass(frozen=True)
class Llama4TextConfig:
    """Llama 4 text hyper-parameters; field names are the config.json keys.

    Defaults are those of transformers' ``Llama4TextConfig`` (the Scout sizes).
    ``no_rope_layers``, ``layer_types`` and ``is_moe_layer`` (derived from
    ``moe_layers`` / ``interleave_moe_layer_step``) have one entry per layer.
    """

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA},
                                  hash=False)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    no_rope_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    is_moe_layer: tuple[bool, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> "Llama4TextConfig":
        """Build from a parsed config.json (the ``text_config`` of a multimodal checkpoint).

        Raises:
            ConfigError: missing, mistyped or out-of-range fields (``attn_temperature_tuning``
                must be a bool, ``floor_scale`` an integer, as transformers requires), heads
                that do not divide, malformed ``no_rope_layers`` / ``moe_layers`` /
                ``layer_types``, a chunked layer without ``attention_chunk_size``, top-k
                above the expert count, a ``hidden_act`` not in :data:`refimpl.mlp.ACTIVATIONS`,
                or a RoPE type this version does not implement.
        """
        layers = get_positive_int(raw, "num_hidden_layers", 48)
        heads = get_positive_int(raw, "num_attention_heads", 40)
        hidden = get_positive_int(raw, "hidden_size", 5120)
        chunk = get_field(raw, "attention_chunk_size", int, 8192, nullable=True)
        interval = get_positive_int(raw, "no_rope_layer_interval", 4)
        step = get_positive_int(raw, "interleave_moe_layer_step", 1)
        no_rope = _no_rope_layers(raw, layers, interval)
        config = cls(
            vocab_size=get_positive_int(raw, "vocab_size", 202048),
            hidden_size=hidden,
            intermediate_size=get_positive_int(raw, "intermediate_size", 8192),
            intermediate_size_mlp=get_positive_int(raw, "intermediate_size_mlp", 16384),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_nullable_int(raw, "num_key_value_heads", 8, heads),
            head_dim=_nullable_int(raw, "head_dim", 128, hidden // heads),
            hidden_act=get_field(raw, "hidden_act", str, "silu"),
            max_position_embeddings=get_positive_int(raw, "max_position_embeddings", 4096 * 32),
            rms_norm_eps=get_field(raw, "rms_norm_eps", float, 1e-5),
            tie_word_embeddings=get_field(raw, "tie_word_embeddings", bool, False),
            num_experts_per_tok=get_positive_int(raw, "num_experts_per_tok", 1),
            num_local_experts=get_positive_int(raw, "num_local_experts", 16),
            interleave_moe_layer_step=step,
            use_qk_norm=get_field(raw, "use_qk_norm", bool, True),
            rope_parameters=resolve_rope_parameters(raw, DEFAULT_ROPE_THETA, NAME),
            no_rope_layer_interval=interval,
            attention_chunk_size=chunk,
            attn_temperature_tuning=_temperature_flag(raw),
            floor_scale=get_positive_int(raw, "floor_scale", 8192),
            attn_scale=get_field(raw, "attn_scale", float, 0.1),
            attention_bias=get_field(raw, "attention_bias", bool, False),
            no_rope_layers=no_rope,
            layer_types=_layer_types(raw, no_rope, chunk),
            is_moe_layer=_moe_schedule(raw, layers, step),
        )
        config._validate()
        check_known_keys(raw, set(cls.__dataclass_fields__) | ROPE_KEYS | _RESOLVED_KEYS, IGNORED_KEYS, NAME)
        return config

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{NAME}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"{NAME}: head_dim must be even and >= 2 for RoPE, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"{NAME}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                              f"({self.num_local_experts})")
        for key in ("rms_norm_eps", "attn_scale"):
            value = getattr(self, key)
            if not np.isfinite(value) or value < 0:
                raise ConfigError(f"{NAME}: {key} must be a finite number >= 0, got {value}")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ConfigError(f"{NAME}: attention_chunk_size must be >= 1 or null, got {self.attention_chunk_size}")
        # transformers applies hidden_act in the dense MLPs, the shared expert and the routed experts.
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{NAME}: hidden_act={self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        # Refuses an unsupported or malformed RoPE scaling at load time, naming the key.
        rope_inv_freq(self)


def _nullable_int(raw: dict, key: str, absent: int, null: int) -> int:
    """A positive int that takes ``absent`` when missing and ``null`` when explicitly null
    (``num_key_value_heads`` null means H; ``head_dim`` null means M // H)."""
    if raw.get(key, 0) is None:
        return null
    return get_positive_int(raw, key, absent)


def _temperature_flag(raw: dict) -> bool:
    """``attn_temperature_tuning`` as a bool; the published Scout value 4 is refused, as transformers does."""
    value = raw.get("attn_temperature_tuning", True)
    if not isinstance(value, bool):
        raise ConfigError(
            f"config.json field 'attn_temperature_tuning' must be true or false, got {value!r} (Meta's Scout "
            "config.json says 4; transformers 5.24 refuses it too; write true)")
    return value


def _no_rope_layers(raw: dict, layers: int, interval: int) -> tuple[int, ...]:
    """1 (RoPE) or 0 (NoPE) per layer: ``no_rope_layers``, or the interval rule when absent or empty.

    transformers derives ``layer_types`` from the whole list and then requires one entry
    per layer, so without an explicit ``layer_types`` the list must have exactly L
    entries; with one, a longer list is indexed by layer and its tail unused.

    Raises:
        ConfigError: not a list of 0/1 integers, or of the wrong length.
    """
    given = raw.get("no_rope_layers")
    if not given:
        return tuple(int((layer + 1) % interval != 0) for layer in range(layers))
    long_ok = raw.get("layer_types") is not None
    if not isinstance(given, list) or any(isinstance(x, bool) or x not in (0, 1) for x in given) or (
            len(given) < layers if long_ok else len(given) != layers):
        need = f"at least {layers}" if long_ok else f"exactly {layers}"
        raise ConfigError(f"config.json 'no_rope_layers' must list {need} entries of 0 or 1, got {given!r}")
    return tuple(int(x) for x in given[:layers])


def _layer_types(raw: dict, no_rope: tuple[int, ...], chunk: int | None) -> tuple[str, ...]:
    """One attention type per layer: ``layer_types``, else chunked on RoPE layers when C is set.

    Raises:
        ConfigError: wrong length or unknown entries; a chunked layer with
            ``attention_chunk_size`` null (transformers fails on it at the first forward).
    """
    layers = len(no_rope)
    types = raw.get("layer_types")
    if types is None:
        types = ["chunked_attention" if rope and chunk is not None else "full_attention" for rope in no_rope]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list {layers} entries from {LAYER_TYPES}, got {types!r}")
    if chunk is None and "chunked_attention" in types:
        raise ConfigError("layer_types has 'chunked_attention' layers but attention_chunk_size is null")
    return tuple(types)


def _moe_schedule(raw: dict, layers: int, step: int) -> tuple[bool, ...]:
    """Which layers are MoE: ``moe_layers`` (an explicit list, even empty, wins) or every step-th.

    Raises:
        ConfigError: ``moe_layers`` not a list of layer indices in ``[0, L)``.
    """
    return interleaved_schedule(layers, step, raw.get("moe_layers"))


def rope_inv_freq(config: Llama4TextConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``(D/2,)`` float64 and the cos/sin magnitude of ``config.rope_parameters``.

    As :func:`refimpl.rope.rope_frequencies`, plus the llama3 case Scout ships,
    ``low_freq_factor == high_freq_factor``: the middle band of the llama3 rule is then
    empty, and each frequency is either kept (wavelength ``2 pi / f`` below
    ``L / low_freq_factor``) or divided by ``factor`` (above). Meta's ``apply_scaling``
    asserts when a wavelength equals the threshold exactly; transformers computes
    ``0 / 0`` there and keeps the NaN. Refused here.

    Raises:
        ConfigError: as :func:`refimpl.rope.rope_frequencies`; a wavelength exactly on
            the hard threshold.

    Checked against: transformers 5.24 ``modeling_rope_utils._compute_llama3_parameters``
    (lines 643-662, "high_freq_factor must be greater" is only a warning there) and
    meta-llama/llama-models ``models/llama4/model.py`` ``apply_scaling``.
    """
    params = config.rope_parameters
    low = params.get("low_freq_factor")
    # An int beyond the float range (10**400) is not a usable number: rope_frequencies names it.
    is_number = (isinstance(low, (int, float)) and not isinstance(low, bool) and abs(low) <= sys.float_info.max
                 and math.isfinite(low) and low > 0)
    hard_switch = params.get("rope_type") == "llama3" and is_number and low == params.get("high_freq_factor")
    if not hard_switch:
        return rope_frequencies(params, config.head_dim, max_position_embeddings=config.max_position_embeddings)
    # Validate every other llama3 key with a harmless high_freq_factor, then apply the hard switch.
    rope_frequencies({**params, "high_freq_factor": 2.0 * low}, config.head_dim,
                     max_position_embeddings=config.max_position_embeddings)
    inv_freq = default_inv_freq(rotary_dim(config.head_dim), params["rope_theta"])
    context = params.get("original_max_position_embeddings", config.max_position_embeddings)
    threshold = context / low
    wavelen = 2 * math.pi / inv_freq
    if np.any(wavelen == threshold):
        raise ConfigError(f"llama3 RoPE with low_freq_factor == high_freq_factor: a wavelength equals "
                          f"original_max_position_embeddings / low_freq_factor = {threshold} exactly (undefined)")
    return np.where(wavelen > threshold, inv_freq / params["factor"], inv_freq), 1.0


def attention_temperature(positions: np.ndarray, floor_scale: int, attn_scale: float) -> np.ndarray:
    """Query temperature of NoPE layers, ``tau(p) = 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale))``.

    ``p`` is the query's absolute position in its own sequence (0 for its first token).
    tau is exactly 1 for ``p < floor_scale - 1`` and first exceeds it at
    ``p = floor_scale - 1`` (8191 for the released models: ``1 + 0.1 ln 2``).

    Args:
        positions: integer positions p, any shape (``(B, T)`` in a forward).
        floor_scale: positive integer (8192 released).
        attn_scale: >= 0 (0.1 released).

    Returns:
        float64, the shape of ``positions``.

    Raises:
        InputError: ``positions`` is not an integer array.

    Left padding: transformers takes p from the cache length (``past_seen_tokens + i``), which
    counts a row's pad slots; here p is the token's own position (``cumsum(attention_mask) - 1``,
    the position RoPE uses), so a left-padded row equals the same row alone, as in Meta's code,
    where every row starts at slot 0 (docs/architectures/llama4.md, "Decoding cache").

    Paper: arXiv:2501.19399 (attention scaled by the log of the context length).
    Checked against: transformers 5.24 ``modeling_llama4.py:359-367`` and meta-llama/llama-models
    ``models/llama4/model.py`` ``Attention.forward`` (``torch.log(torch.floor(...) + 1.0)``).
    """
    p = as_integer_array("Llama 4 attention_temperature: positions", positions)
    # floor((p + 1) / floor_scale) as exact integer division.
    return 1.0 + attn_scale * np.log1p(((p + 1) // floor_scale).astype(np.float64))


def layer_chunk(config: Llama4TextConfig, layer: int) -> int | None:
    """C = ``attention_chunk_size`` on "chunked_attention" layers, None on full-attention ones."""
    return config.attention_chunk_size if config.layer_types[layer] == "chunked_attention" else None


def moe_weight_shapes(config: Llama4TextConfig) -> dict[str, tuple[int, ...]]:
    """Tensors of one MoE block, named relative to ``feed_forward.``."""
    m, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    return {
        "router.weight": (e, m),
        "experts.gate_up_proj": (e, m, 2 * i),
        "experts.down_proj": (e, i, m),
        "shared_expert.gate_proj.weight": (i, m),
        "shared_expert.up_proj.weight": (i, m),
        "shared_expert.down_proj.weight": (m, i),
    }


def dense_mlp_weight_shapes(config: Llama4TextConfig) -> dict[str, tuple[int, ...]]:
    """Tensors of one dense feed-forward (width ``intermediate_size_mlp``), relative to ``feed_forward.``."""
    m, f = config.hidden_size, config.intermediate_size_mlp
    return {"gate_proj.weight": (f, m), "up_proj.weight": (f, m), "down_proj.weight": (m, f)}


def weight_shapes(config: Llama4TextConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape.

    No QK-norm weights (the norm has none); ``lm_head.weight`` is absent when
    ``tie_word_embeddings`` is true.
    """
    m = config.hidden_size
    common = {
        "input_layernorm.weight": (m,),
        **attention_weight_shapes(m, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                  bias=config.attention_bias),
        "post_attention_layernorm.weight": (m,),
    }
    shapes = decoder_weight_shapes(config, common)
    for layer, is_moe in enumerate(config.is_moe_layer):
        ffn = moe_weight_shapes(config) if is_moe else dense_mlp_weight_shapes(config)
        shapes.update({f"model.layers.{layer}.feed_forward.{name}": s for name, s in ffn.items()})
    return shapes


def weight_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Golden-generator draw for the input-major expert stacks: N(0, 1 / fan_in) with
    fan_in = ``shape[1]`` (M for ``gate_up_proj`` (E, M, 2I), I for ``down_proj`` (E, I, M));
    the default rule would divide by the output width. Other tensors: None (default rule)."""
    if name.endswith(("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")):
        return rng.standard_normal(shape) / np.sqrt(shape[1])
    return None


def _check_moe_weights(weights: dict, config: Llama4TextConfig) -> dict[str, np.ndarray]:
    """The MoE block's tensors after checking names and shapes (one-line errors)."""
    shapes = moe_weight_shapes(config)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise MissingWeightsError(f"Llama 4 moe_block lacks weight(s): {', '.join(missing)}")
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected:
        raise UnexpectedWeightsError(f"Llama 4 moe_block got unexpected weight(s): {', '.join(unexpected)}")
    for name, shape in shapes.items():
        if np.shape(weights[name]) != shape:
            raise WeightShapeError(
                f"Llama 4 moe_block: '{name}' has shape {np.shape(weights[name])}, config needs {shape}")
    return {name: as_float_array(f"Llama 4 moe_block: {name}", weights[name]) for name in shapes}


def routed_expert(x: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray, hidden_act: str) -> np.ndarray:
    """One routed expert on Llama 4's input-major weights, ``(act(x G) * (x U)) D``, rows ``x`` ``(n, M)``.

    ``gate_up_proj`` ``(M, 2I)`` (gate columns first) and ``down_proj`` ``(I, M)`` are
    ``Llama4TextExperts``' slices for one expert. :func:`refimpl.experts.swiglu_expert` on
    their transposed views computes exactly ``x @ gate_up_proj`` and ``h @ down_proj``: for
    silu, bitwise :func:`refimpl.experts.input_major_swiglu_expert`; ``act`` is ``hidden_act``
    (transformers' ``Llama4TextExperts.act_fn``).
    """
    return swiglu_expert(x, gate_up_proj.T, down_proj.T, hidden_act)


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """Llama 4's MoE feed-forward: shared expert plus routed experts with the weight on the input.

    ``r = x W_router^T``; ``(s, e) = top-k(r)`` with ``s = sigmoid(r_e)`` unnormalised
    (:func:`refimpl.routers.llama4_top_k_sigmoid`); ``y = SwiGLU_shared(x) + sum_j
    Expert_{e_j}(s_j * x)`` (:func:`refimpl.moe.dispatch` with ``weight_on="input"``,
    experts :func:`routed_expert`).

    Args:
        hidden_states: ``(B, T, M)`` post-attention-normalised activations.
        weights: the layer's ``feed_forward.*`` tensors without that prefix:
            ``router.weight`` (E, M), ``experts.gate_up_proj`` (E, M, 2I),
            ``experts.down_proj`` (E, I, M), ``shared_expert.{gate,up,down}_proj.weight``.
        config: a :class:`Llama4TextConfig` or a config.json dict.

    Returns:
        ``(B, T, M)`` in the dtype of ``hidden_states``.

    Raises:
        ShapeError: ``hidden_states`` not 3-D with M channels.
        MissingWeightsError, UnexpectedWeightsError, WeightShapeError: the weights do not
            match the config. ConfigError: a bad config dict.

    Paper: the Llama 4 blog (shared expert + routed experts, top-1 for the releases).
    Checked against: transformers 5.24 ``Llama4Router`` and ``Llama4TextMoe`` (modeling_llama4.py:141-175);
    meta-llama/llama-models ``models/llama4/moe.py`` ``MoE.forward``.
    """
    if not isinstance(config, Llama4TextConfig):
        config = Llama4TextConfig.from_dict(config)
    x = as_float_array("Llama 4 moe_block: hidden_states", hidden_states, ndim=3)
    if x.shape[-1] != config.hidden_size:
        raise ShapeError(f"Llama 4 moe_block: hidden_states {x.shape} must end in hidden_size {config.hidden_size}")
    w = _check_moe_weights(weights, config)
    rows = x.reshape(-1, config.hidden_size)
    scores, chosen = llama4_top_k_sigmoid(router_logits(rows, w["router.weight"]), config.num_experts_per_tok)
    gate_up, down = w["experts.gate_up_proj"], w["experts.down_proj"]
    routed = dispatch(rows, scores, chosen, lambda e, xe: routed_expert(xe, gate_up[e], down[e], config.hidden_act),
                      config.num_local_experts, weight_on="input")
    shared = gated_mlp(rows, w["shared_expert.gate_proj.weight"], w["shared_expert.up_proj.weight"],
                       w["shared_expert.down_proj.weight"], config.hidden_act)
    return (shared + routed).reshape(x.shape)


def rope_layer_qk(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray, config: Llama4TextConfig):
    """RoPE layer: interleaved-pair rotation of q and k, then weight-less QK-norm when ``use_qk_norm``.

    The order (RoPE, then norm) is the authors'; since a rotation keeps each head's
    norm, normalising first gives the same result up to rounding.
    """
    q, k = apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)
    if config.use_qk_norm:
        q, k = rms_normalize(q, config.rms_norm_eps), rms_normalize(k, config.rms_norm_eps)
    return q, k


def nope_layer_qk(q: np.ndarray, k: np.ndarray, config: Llama4TextConfig, positions: np.ndarray):
    """NoPE layer: no rotation and no QK-norm; queries times the temperature tau(p) at their
    ``positions`` ``(B, T)`` when ``attn_temperature_tuning`` (keys untouched)."""
    if not config.attn_temperature_tuning:
        return q, k
    tau = attention_temperature(positions, config.floor_scale, config.attn_scale)
    return q * tau.astype(q.dtype)[:, :, None, None], k


def attention_block(
    x: np.ndarray, p: dict[str, np.ndarray], config: Llama4TextConfig, layer: int, rope: tuple,
    context: StepContext,
) -> tuple[np.ndarray, KVCache]:
    """Llama 4 self-attention on normalised input ``x`` ``(B, T, M)``.

    ``rope`` is ``(cos, sin)`` ``(B, T, D/2)`` at the tokens' positions, used only on RoPE
    layers; ``context`` carries the positions, padding and the caches of the previous call.
    Returns ``(B, T, M)`` and the layer's cache for the next call: the last C keys (after RoPE
    and QK-norm) on a chunked layer, every key on a full one (NoPE keys are never scaled).
    """
    b, t, _ = x.shape
    d = config.head_dim
    q = split_heads(projection(x, p, "self_attn.q_proj"), d)
    k = split_heads(projection(x, p, "self_attn.k_proj"), d)
    v = split_heads(projection(x, p, "self_attn.v_proj"), d)
    if config.no_rope_layers[layer]:
        q, k = rope_layer_qk(q, k, *rope, config)
    else:
        q, k = nope_layer_qk(q, k, config, context.positions)
    out, kept = attend_with_cache(q, k, v, context, layer, scale=d**-0.5,
                                  attention_chunk_size=layer_chunk(config, layer))
    return projection(out.reshape(b, t, -1), p, "self_attn.o_proj"), kept


def feed_forward(x: np.ndarray, p: dict[str, np.ndarray], config: Llama4TextConfig, layer: int) -> np.ndarray:
    """The layer's MoE block, or its dense SwiGLU of width ``intermediate_size_mlp``."""
    ffn = {name[len("feed_forward."):]: w for name, w in p.items() if name.startswith("feed_forward.")}
    if config.is_moe_layer[layer]:
        return moe_block(x, ffn, config)
    return gated_mlp(x, ffn["gate_proj.weight"], ffn["up_proj.weight"], ffn["down_proj.weight"], config.hidden_act)


def decoder_layer(
    h: np.ndarray, p: dict[str, np.ndarray], config: Llama4TextConfig, layer: int, rope: tuple,
    context: StepContext,
) -> tuple[np.ndarray, KVCache]:
    """One pre-norm decoder layer: attention then feed-forward, each with a residual; returns the
    new hidden state and the layer's cache."""
    eps = config.rms_norm_eps
    attended, kept = attention_block(rms_norm(h, p["input_layernorm.weight"], eps), p, config, layer, rope, context)
    h = h + attended
    return h + feed_forward(rms_norm(h, p["post_attention_layernorm.weight"], eps), p, config, layer), kept


def forward_step(
    weights: dict[str, np.ndarray], config: Llama4TextConfig, input_ids: np.ndarray, context: StepContext
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[KVCache, ...]]:
    """Logits, named hidden states and layer caches for one call's new tokens ``(B, T)``.

    Args:
        weights: every tensor of :func:`weight_shapes`, all in one compute dtype.
        config: the model's config.
        input_ids: ``(B, T)`` int64 within the vocabulary.
        context: the tokens' positions and padding and the caches of the previous call
            (:mod:`refimpl.kv_cache`).

    Returns:
        ``(logits, taps, caches)``: logits ``(B, T, V)``; taps maps ``"embed"``,
        ``"layers.{l}"`` (output of layer l) and ``"norm"`` to ``(B, T, M)`` arrays; one
        KVCache per layer.
    """
    inv_freq, scaling = rope_inv_freq(config)
    rope = rope_cos_sin(context.positions, inv_freq, weights["model.embed_tokens.weight"].dtype, scaling)
    return run_decoder_step(weights, config, input_ids, context,
                            lambda h, p, index: decoder_layer(h, p, config, index, rope, context))


def forward(
    weights: dict[str, np.ndarray], config: Llama4TextConfig, input_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` and named hidden states of a whole sequence: :func:`forward_step`
    from position 0 with no cache."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _release(**fields) -> dict:
    """A Llama 4 ``text_config`` in the published key style, run as Llama4ForCausalLM."""
    base = {
        "architectures": [NAME], "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
        "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_hidden_layers": 48,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_chunk_size": 8192, "attention_bias": False,
        "num_experts_per_tok": 1, "tie_word_embeddings": False, "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018,
    }
    base.update(fields)
    return base


#: Published flagship text configs (config.json values that carry math). Both ship as
#: Llama4ForConditionalGeneration; these are their ``text_config`` run as Llama4ForCausalLM
#: (the ``language_model.`` prefix dropped). Sources, as collected in
#: shared/spec/moe-architectures.md sec. 3.1: Scout -- meta-llama/Llama-4-Scout-17B-16E
#: config.json quoted verbatim in AMD-AGI/Primus PR #165, rope factor 16 per
#: meta-llama/llama-models PR #322; Maverick -- the Maverick text_config embedded in
#: TensorRT-LLM's unit test ``LLAMA_4_MAVERICK_TWO_LAYER_CONFIG`` (48 layers restored, its
#: test-only ``no_rope_layer_interval`` 2 dropped). Deviations: Scout's
#: ``attn_temperature_tuning`` is 4 in config.json, written true here (transformers 5.24
#: refuses the int); Scout's ``no_rope_layers`` is written out as [1, 1, 1, 0] x 12, which the
#: default interval 4 gives too. Maverick's temperature keys are absent from that copy, so
#: transformers' defaults (true, 8192, 0.1) apply. Not verified against the Hub files themselves.
PRESETS = {
    "Llama-4-Scout-17B-16E": _release(
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        no_rope_layers=[1, 1, 1, 0] * 12, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=10485760,
    ),
    "Llama-4-Maverick-17B-128E": _release(
        num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
        max_position_embeddings=1048576,
    ),
}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Llama4TextConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=(
        "Meta, The Llama 4 herd (2025-04-05); meta-llama/llama-models models/llama4/model.py, moe.py",
        "Nakanishi, Scalable-Softmax Is Superior for Attention, arXiv:2501.19399",
        "transformers 5.24 models/llama4/modeling_llama4.py, configuration_llama4.py",
    ),
    weight_init=weight_init,
)
