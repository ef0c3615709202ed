"""Mistral model-level golden cases (seeds 201-299).

A key set to None is left out of config.json (the default applies: ``sliding_window``
4096); a key set to ``JSON_NULL`` is written as an explicit ``null`` (no window:
transformers keeps None and builds a plain causal mask), as in
``mistral/window-explicit-null``.
"""

from __future__ import annotations

from .common import JSON_NULL, ModelCase


def _mistral(**overrides) -> dict:
    base = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": 4,
        "rope_parameters": {"rope_theta": 1000000000.0, "rope_type": "default"},
        "max_position_embeddings": 4096, "dtype": "float32",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


CASES = [
    ModelCase(
        "mistral/sliding-w4-len11",
        "sliding_window 4 on every layer with length 11 > window (a query sees itself and 3 keys before it); "
        "GQA H=4/Hkv=2, head_dim 32 != hidden/heads 16, untied, batch 2",
        seed=201, config=_mistral(), batch=2, seq=11,
    ),
    ModelCase(
        "mistral/window-absent-small31-style",
        "sliding_window key absent: transformers' default 4096 (> T, so plain causal here); otherwise Mistral "
        "Small 3.1 style: head_dim 32 != 16, rope_theta 1e9, eps 1e-5, 3 layers, prime length 17",
        seed=202, config=_mistral(sliding_window=None, num_hidden_layers=3), batch=1, seq=17,
    ),
    ModelCase(
        "mistral/tied-mqa-window1",
        "sliding_window 1 (each token attends only to itself), tied embeddings, MQA (Hkv=1), head_dim and "
        "rope_theta absent (hidden/heads = 16, theta 10000), length 6",
        seed=203,
        config=_mistral(sliding_window=1, tie_word_embeddings=True, num_key_value_heads=1, head_dim=None,
                        rope_parameters=None),
        batch=2, seq=6,
    ),
    ModelCase(
        "mistral/single-token-mha",
        "one token per row (T=1), batch 3, MHA (Hkv=H=4), head_dim 16, window 4",
        seed=204, config=_mistral(num_key_value_heads=4, head_dim=16), batch=3, seq=1,
    ),
    ModelCase(
        "mistral/four-layers-w16-len40",
        "4 layers, GQA H=8/Hkv=2, head_dim 8, window 16 with length 40, vocab 256",
        seed=205,
        config=_mistral(vocab_size=256, num_hidden_layers=4, num_attention_heads=8, head_dim=8, sliding_window=16),
        batch=1, seq=40,
    ),
    ModelCase(
        "mistral/window-explicit-null",
        "config.json says \"sliding_window\": null: no window at all (transformers keeps None, every layer full "
        "causal), unlike an absent key (4096); a loader that rejects null or reads it as 0 fails; length 13",
        seed=206, config=_mistral(sliding_window=JSON_NULL), batch=2, seq=13,
    ),
]
