"""Gemma 3n as published: ``Gemma3nForConditionalGeneration`` checkpoints, text path only.

The released google/gemma-3n-E2B / -E4B checkpoints hold the text decoder under
``model.language_model.*``, a vision tower (MobileNet-V5, ``model.vision_tower.*``), an
audio tower (USM conformer, ``model.audio_tower.*``) and two small "multimodal
embedders" (``model.embed_vision.*``, ``model.embed_audio.*``); the config nests the
decoder's under ``text_config``. For token ids this is the decoder of
``refimpl/models/gemma3n.py`` with one change to its input embeddings::

    e[t] = E[id] * sqrt(M)                                    id < vision vocab_offset (text ids)
    e[t] = mm(id - offset; embedder)                          vision ids [262144, 262272), audio ids >= 262272
    mm(j) = RMSNorm_no_weight( RMSNorm(table[j]; hard_embedding_norm) W_proj^T )

The per-layer inputs still come from the ids (vision and audio ids read row 0 of the
per-layer table) and from these embeddings; the final soft-cap is applied, as
``Gemma3nForConditionalGeneration.forward`` does (unlike Gemma 3's wrapper).

Not implemented, and dropped unread when loading (:func:`ignored_weights`): the towers
that turn pixels and audio frames into soft tokens, and the embedders' ``soft_embedding_norm``
(it only normalises tower outputs). Their configs are read only for the embedders'
``vocab_offset``, ``vocab_size``, ``hidden_size`` and ``rms_norm_eps``; every other
vision_config / audio_config key is ignored.

Incremental decoding (:func:`forward_step`): as the text model's (one KVCache per layer
with its own keys and values, None on KV-sharing layers); the embedders act on each
token alone, so a decode call embeds its vision and audio ids the same way.

Taps as for the text model; ``"embed"`` holds the embeddings after the vision and audio
rows are replaced.

Checked against: transformers 5.24 ``models/gemma3n/modeling_gemma3n.py``
(``Gemma3nMultimodalEmbedder`` 1856-1903, ``Gemma3nModel.forward`` 2055-2079 (ids to
embeddings), 2120-2130 (the language model on them), ``Gemma3nForConditionalGeneration.forward``
2284-2287 (soft-cap)) and ``configuration_gemma3n.py`` (``Gemma3nConfig``,
``Gemma3nVisionConfig.vocab_offset`` 262144, ``Gemma3nAudioConfig.vocab_offset`` 262272).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..architecture import Architecture
from ..config import get_field, get_positive_int
from ..embedding import scaled_embed_tokens
from ..errors import ConfigError
from ..kv_cache import StepContext, fresh_context
from ..linear import linear
from ..rmsnorm import rms_norm, rms_normalize
from . import gemma3n

NAME = "Gemma3nForConditionalGeneration"
#: Tensors of the parts this reference does not run, dropped unread.
TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.soft_embedding_norm.",
                  "model.embed_audio.soft_embedding_norm.")
#: The two embedders, their sub-config key and the transformers 5.24 class defaults
#: (vocab_offset, vocab_size, hidden_size).
EMBEDDERS = {"embed_vision": ("vision_config", (262_144, 128, 2048)),
             "embed_audio": ("audio_config", (262_272, 128, 1536))}


@dataclass(frozen=True)
class EmbedderConfig:
    """One ``Gemma3nMultimodalEmbedder``: ids ``[vocab_offset, vocab_offset + vocab_size)``."""

    vocab_offset: int
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float


@dataclass(frozen=True)
class Gemma3nConditionalConfig:
    """The text config plus the two embedders; ``vocab_size`` is the text vocabulary (ids accepted)."""

    text: gemma3n.Gemma3nConfig
    embed_vision: EmbedderConfig
    embed_audio: EmbedderConfig

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @classmethod
    def from_dict(cls, raw: dict) -> "Gemma3nConditionalConfig":
        """Build from a multimodal config.json (``text_config``, ``vision_config``, ``audio_config``).

        Raises:
            ConfigError: a sub-config that is not an object; see :class:`gemma3n.Gemma3nConfig`;
                embedder id ranges that leave vision or audio ids without a table row;
                a top-level ``tie_word_embeddings`` that contradicts the text config's.
        """
        sub = {}
        for key in ("text_config", "vision_config", "audio_config"):
            value = raw.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{NAME}: config.json field '{key}' must be an object, got {value!r}")
            sub[key] = value
        text = gemma3n.Gemma3nConfig.from_dict(sub["text_config"])
        tie = get_field(raw, "tie_word_embeddings", bool, text.tie_word_embeddings)
        if tie != text.tie_word_embeddings:
            raise ConfigError(f"{NAME}: tie_word_embeddings is {tie} but text_config says {text.tie_word_embeddings}")
        embedders = {name: _embedder(sub[key], defaults) for name, (key, defaults) in EMBEDDERS.items()}
        config = cls(text=text, **embedders)
        config._validate()
        return config

    def _validate(self) -> None:
        vision, audio, vocab = self.embed_vision, self.embed_audio, self.text.vocab_size
        # transformers: vision ids are [vision offset, audio offset), audio ids [audio offset, V).
        if not (0 <= vision.vocab_offset <= audio.vocab_offset <= vocab
                and audio.vocab_offset - vision.vocab_offset <= vision.vocab_size
                and vocab - audio.vocab_offset <= audio.vocab_size):
            raise ConfigError(
                f"{NAME}: vision ids [{vision.vocab_offset}, {audio.vocab_offset}) and audio ids "
                f"[{audio.vocab_offset}, {vocab}) must fit the embedders' tables ({vision.vocab_size} and "
                f"{audio.vocab_size} rows)")


def _embedder(raw: dict, defaults: tuple[int, int, int]) -> EmbedderConfig:
    offset, size, width = defaults
    eps = get_field(raw, "rms_norm_eps", float, 1e-6)
    if not np.isfinite(eps) or eps < 0:
        raise ConfigError(f"{NAME}: an embedder's rms_norm_eps must be a finite number >= 0, got {eps}")
    return EmbedderConfig(vocab_offset=get_field(raw, "vocab_offset", int, offset),
                          vocab_size=get_positive_int(raw, "vocab_size", size),
                          hidden_size=get_positive_int(raw, "hidden_size", width), rms_norm_eps=eps)


def weight_shapes(config: Gemma3nConditionalConfig) -> dict[str, tuple[int, ...]]:
    """The text decoder's tensors (``model.*`` names) and the two embedders' tables, norms and projections."""
    shapes = gemma3n.weight_shapes(config.text)
    for name in EMBEDDERS:
        e = getattr(config, name)
        shapes.update({f"model.{name}.embedding.weight": (e.vocab_size, e.hidden_size),
                       f"model.{name}.hard_embedding_norm.weight": (e.hidden_size,),
                       f"model.{name}.embedding_projection.weight": (config.text.hidden_size, e.hidden_size)})
    return shapes


def ignored_weights(config: Gemma3nConditionalConfig) -> tuple[str, ...]:
    """The towers, the soft-token norms and the KV-consumer layers' unused k/v tensors."""
    return TOWER_PREFIXES + gemma3n.ignored_weights(config.text)


def convert_weights(config: Gemma3nConditionalConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model.language_model.*`` renamed ``model.*`` (the text decoder's names)."""
    return gemma3n.convert_weights(config.text, weights)


def tied_head(config: Gemma3nConditionalConfig) -> dict[str, str]:
    return gemma3n.tied_head(config.text)


def multimodal_token_embeddings(ids: np.ndarray, table: np.ndarray, hard_norm: np.ndarray, projection: np.ndarray,
                                eps: float) -> np.ndarray:
    """``RMSNorm_no_weight(RMSNorm(table[ids]; hard_norm) W_proj^T)`` for ids already offset into ``table``.

    Args:
        ids: integer ids in ``[0, vocab_size)`` of the embedder, any shape.
        table: ``(vocab_size, Mm)`` ``embedding.weight``.
        hard_norm: ``(Mm,)`` ``hard_embedding_norm.weight`` (plain w).
        projection: ``(M, Mm)`` ``embedding_projection.weight``.
        eps: the vision / audio config's ``rms_norm_eps``.

    Returns:
        ``ids.shape + (M,)`` in the dtype of ``table``; no ``sqrt(M)`` scale.
    """
    return rms_normalize(linear(rms_norm(table[ids], hard_norm, eps), projection), eps)


def input_embeddings(weights: dict[str, np.ndarray], config: Gemma3nConditionalConfig,
                     input_ids: np.ndarray) -> np.ndarray:
    """``(B, T, M)``: text rows ``E[id] * sqrt(M)``, vision and audio rows from their embedders."""
    text = config.text
    e = scaled_embed_tokens(input_ids, weights["model.embed_tokens.weight"], text.hidden_size ** 0.5)
    vision, audio = config.embed_vision, config.embed_audio
    ranges = {"embed_vision": (vision.vocab_offset, audio.vocab_offset), "embed_audio": (audio.vocab_offset, None)}
    for name, (low, high) in ranges.items():
        rows = (input_ids >= low) & (input_ids < high if high is not None else True)
        if rows.any():
            p = f"model.{name}."
            e[rows] = multimodal_token_embeddings(input_ids[rows] - low, weights[p + "embedding.weight"],
                                                  weights[p + "hard_embedding_norm.weight"],
                                                  weights[p + "embedding_projection.weight"],
                                                  getattr(config, name).rms_norm_eps)
    return e


def forward_step(weights: dict[str, np.ndarray], config: Gemma3nConditionalConfig, input_ids: np.ndarray,
                 context: StepContext) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """Logits ``(B, T, V)`` (soft-capped), taps and layer caches of one call, as
    :func:`refimpl.models.gemma3n.forward_step`."""
    return gemma3n.decode_step(weights, config.text, input_ids, input_embeddings(weights, config, input_ids), context)


def forward(weights: dict[str, np.ndarray], config: Gemma3nConditionalConfig,
            input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``(B, T, V)`` (soft-capped) and taps of a whole sequence: :func:`forward_step`, fresh."""
    logits, taps, _ = forward_step(weights, config, input_ids, fresh_context(*input_ids.shape))
    return logits, taps


def _release(text_preset: dict) -> dict:
    text = {k: v for k, v in text_preset.items() if k != "architectures"}
    return {"architectures": [NAME], "model_type": "gemma3n", "text_config": text,
            "vision_config": {"model_type": "gemma3n_vision", "vocab_offset": 262_144, "vocab_size": 128,
                              "hidden_size": 2048, "rms_norm_eps": 1e-6},
            "audio_config": {"model_type": "gemma3n_audio", "vocab_offset": 262_272, "vocab_size": 128,
                             "hidden_size": 1536, "rms_norm_eps": 1e-6},
            "tie_word_embeddings": True}


#: The published E2B / E4B configs, reduced to what the text path reads (see gemma3n.PRESETS).
PRESETS = {name: _release(preset) for name, preset in gemma3n.PRESETS.items()}


ARCHITECTURE = Architecture(
    name=NAME,
    config_class=Gemma3nConditionalConfig,
    forward=forward,
    forward_step=forward_step,
    weight_shapes=weight_shapes,
    optional_weights=tied_head,
    presets=PRESETS,
    citations=gemma3n.ARCHITECTURE.citations,
    ignored_weights=ignored_weights,
    convert_weights=convert_weights,
)
