"""Reading typed fields out of a parsed config.json.

Model configs are frozen dataclasses whose field names are the config.json keys.
Each model's ``from_dict`` reads its fields through :func:`get_field`, which
checks the JSON type and names the key in the error, and then calls
:func:`check_known_keys` so that keys we do not interpret are either listed as
deliberately ignored or reported.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import ConfigError
from .quantization import scheme_from_config

REQUIRED = object()
#: The largest finite float64; a JSON integer above it has no float value.
_LARGEST_FLOAT = 1.7976931348623157e308

#: Keys that appear in Hugging Face config.json files and carry no math.
COMMON_IGNORED_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
        "attention_dropout", "max_position_embeddings", "_name_or_path", "auto_map",
        "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
        "tokenizer_class", "torchscript", "use_bfloat16",
    }
)

#: Keys whose presence means the checkpoint needs something this version lacks.
UNSUPPORTED_KEYS: dict[str, str] = {}
#: Keys about how the weights are stored, not about the math: checked by
#: :func:`refimpl.quantization.scheme_from_config` (ConfigError for a format it cannot read).
STORAGE_KEYS = frozenset({"quantization_config"})

_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def get_field(raw: dict, key: str, kind: type, default: Any = REQUIRED, *, nullable: bool = False):
    """Return ``raw[key]`` checked to be of JSON kind ``kind`` (int, float, bool, str).

    Ints are accepted where floats are expected; bools are never accepted as numbers.
    An int above :data:`MAX_COUNT` (count keys) or :data:`MAX_SIZE` (any other key) is
    refused before anything is sized by it.

    Raises:
        ConfigError: the key is missing and has no default, has the wrong type, is an
            implausibly large integer, or an integer beyond the float range where a number
            is expected.
    """
    if key not in raw:
        if default is REQUIRED:
            raise ConfigError(f"config.json lacks required field '{key}'")
        return default
    value = raw[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > _LARGEST_FLOAT:
            raise ConfigError(f"config.json field '{key}' is an integer of {len(str(abs(value)))} digits, beyond "
                              "the float range")
        ok, value = True, float(value)
    if not ok:
        raise ConfigError(f"config.json field '{key}' must be {_KINDS[kind]}, got {value!r}")
    if kind is int:
        limit = MAX_COUNT if key in _COUNT_KEYS else MAX_SIZE
        if value > limit:
            raise ConfigError(f"config.json field '{key}' is {value}, above the largest this reference accepts "
                              f"({limit}); no published model comes close")
    return value


#: Largest count (layers, heads, experts, groups) a config may ask for: far above any
#: published model, low enough that a typo or a hostile file fails here with a message
#: instead of exhausting memory while the weight table is built.
MAX_COUNT = 1 << 16
#: Largest size (widths, vocabulary, positions) a config may ask for, for the same reason.
MAX_SIZE = 1 << 24
_COUNT_KEYS = frozenset({
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts",
    "num_local_experts", "n_shared_experts", "num_experts_per_tok", "experts_per_token", "n_group", "topk_group",
    "first_k_dense_replace", "decoder_sparse_step", "interleave_moe_layer_step", "num_nextn_predict_layers",
    "altup_num_inputs", "linear_num_key_heads", "linear_num_value_heads",
})


def get_positive_int(raw: dict, key: str, default: Any = REQUIRED) -> int:
    """Like :func:`get_field` for an int that must be >= 1 and at most :data:`MAX_COUNT`
    (counts: layers, heads, experts, groups) or :data:`MAX_SIZE` (everything else)."""
    value = get_field(raw, key, int, default)
    if value < 1:
        raise ConfigError(f"config.json field '{key}' must be a positive integer, got {value}")
    return value


def check_known_keys(raw: dict, used: set[str], ignored: frozenset[str], architecture: str) -> None:
    """Reject keys that need unsupported features; warn about keys nobody reads.

    Raises:
        ConfigError: a key from :data:`UNSUPPORTED_KEYS` is present, or a
            ``quantization_config`` the checkpoint reader cannot dequantize.
    """
    for key, why in UNSUPPORTED_KEYS.items():
        if raw.get(key) is not None:
            raise ConfigError(f"{architecture}: '{key}' is set: {why}")
    scheme_from_config(raw)
    unknown = sorted(set(raw) - used - ignored - COMMON_IGNORED_KEYS - STORAGE_KEYS)
    if unknown:
        warnings.warn(f"{architecture}: config.json keys not read by the reference: {unknown}", stacklevel=3)
