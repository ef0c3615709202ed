"""SmolLM3 model-level golden cases (seeds 301-399).

pad/bos/eos ids are set inside the tiny vocabulary: transformers' defaults
(128004/128000/128001) make ``nn.Embedding(padding_idx=128004)`` fail (spec quirk S4).
"""

from __future__ import annotations

from .common import ModelCase


def _smollm3(**overrides) -> dict:
    base = {
        "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "no_rope_layer_interval": 2,
        "rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"},
        "use_sliding_window": False, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "dtype": "float32",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


CASES = [
    ModelCase(
        "smollm3/interval2-derived",
        "no_rope_layers absent, no_rope_layer_interval 2: layers 1 and 3 are NoPE, 0 and 2 rotate; "
        "GQA H=4/Hkv=2, tied (the default), batch 2, length 11",
        seed=301, config=_smollm3(), batch=2, seq=11,
    ),
    ModelCase(
        "smollm3/explicit-list-overrides-interval",
        "explicit no_rope_layers [0, 1, 1, 0] (1 = apply RoPE) with no_rope_layer_interval 4, which would "
        "give [1, 1, 1, 0]: the list wins, so layer 0 is NoPE too; untied, length 13",
        seed=302,
        config=_smollm3(no_rope_layers=[0, 1, 1, 0], no_rope_layer_interval=4, tie_word_embeddings=False),
        batch=1, seq=13,
    ),
    ModelCase(
        "smollm3/nope-layers-slide",
        "use_sliding_window with sliding_window 3 and interval 2: the NoPE layers 1 and 3 slide, the RoPE "
        "layers 0 and 2 stay full; length 10 > window, batch 2",
        seed=303, config=_smollm3(use_sliding_window=True, sliding_window=3), batch=2, seq=10,
    ),
    ModelCase(
        "smollm3/single-token",
        "one token per row (T=1), batch 2, MQA (Hkv=1), hidden 48 with H=6 (D=8), 2 layers interval 2",
        seed=304,
        config=_smollm3(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, num_hidden_layers=2),
        batch=2, seq=1,
    ),
    ModelCase(
        "smollm3/default-theta-biases",
        "rope_theta absent (SmolLM3 default 2e6, not 10000), default interval 4 (layer 3 NoPE), "
        "attention_bias and mlp_bias, MHA, length 9",
        seed=305,
        config=_smollm3(rope_parameters=None, no_rope_layer_interval=None, attention_bias=True, mlp_bias=True,
                        num_key_value_heads=4),
        batch=1, seq=9,
    ),
]
