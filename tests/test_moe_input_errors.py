"""Bad input to the MoE / MLA pieces gets a one-line RefimplError naming the problem (review findings)."""

import json
import shutil
import warnings

import numpy as np
import pytest

import refimpl
from conftest import ROOT
from refimpl import mla, moe, routers
from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.experts import clamped_swiglu

X = np.ones((3, 4))
W = np.full((3, 2), 0.5)
IDX = np.array([[0, 1], [1, 2], [2, 0]])


def _identity(e, rows):
    return rows


def _copy_checkpoint(tmp_path, case, edit):
    src = ROOT / "golden" / case / "checkpoint"
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("case, key", [
    ("deepseek_v3/group-limited-routing", "n_routed_experts"),
    ("deepseek_v3/group-limited-routing", "num_hidden_layers"),
    ("qwen3_moe/renorm-top2-of-6", "num_experts"),
    ("minimax_m2/gqa-partial-rotary", "num_local_experts"),
    ("glm4_moe/glm45-style", "n_routed_experts"),
    ("grok2/single-token", "num_local_experts"),
    ("gpt_oss/single-token", "head_dim"),
])
def test_huge_counts_are_refused_before_anything_is_allocated(tmp_path, case, key):
    path = _copy_checkpoint(tmp_path, case, lambda c: c.__setitem__(key, 1_000_000_000))
    with pytest.raises(ConfigError, match=f"'{key}' is 1000000000, above the largest"):
        refimpl.from_pretrained(path)


def test_published_sizes_stay_below_the_bounds():
    from refimpl.registry import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        for preset in arch.presets.values():
            arch.config_class.from_dict(preset)  # no ConfigError


@pytest.mark.parametrize("router, args", [
    (routers.top_k_softmax, (2,)),
    (routers.llama4_top_k_sigmoid, (2,)),
    (lambda z, k: routers.softmax_top_k(z, k, norm_topk_prob=True), (2,)),
    (lambda z, k: routers.sigmoid_bias_top_k(z, np.zeros(4), k), (2,)),
    (lambda z, k: routers.sigmoid_group_top_k(z, np.zeros(4), top_k=k), (2,)),
])
def test_nan_router_logits_are_refused(router, args):
    logits = np.zeros((2, 4))
    logits[0, 3] = np.nan
    with pytest.raises(InputError, match="router_logits contain NaN"):
        router(logits, *args)


def test_nan_correction_bias_is_refused():
    with pytest.raises(InputError, match="e_score_correction_bias contains NaN"):
        routers.sigmoid_bias_top_k(np.zeros((1, 4)), np.array([0.0, np.nan, 0.0, 0.0]), 2)


def test_group_top_k_bound_names_the_kept_groups():
    with pytest.raises(ConfigError, match=r"\[1, 4\] \(the experts in the 2 kept group\(s\) of 2\)"):
        routers.sigmoid_group_top_k(np.zeros((1, 8)), np.zeros(8), top_k=5, n_group=4, topk_group=2)


def test_dense_routing_float_indices():
    with pytest.raises(InputError, match="indices must be integers"):
        routers.dense_routing(W, IDX.astype(float), 3)


@pytest.mark.parametrize("form", [moe.dispatch, moe.dense_mixture])
def test_dispatch_forms_refuse_the_same_bad_input(form):
    with pytest.raises(ShapeError, match="same expert twice"):
        form(X, W, np.array([[0, 0], [1, 2], [2, 0]]), _identity, 3)
    with pytest.raises(ConfigError, match="num_experts must be a positive integer"):
        form(X, W, IDX, _identity, 2.5)
    with pytest.raises(RefimplError, match="dtype"):
        form(X.astype(np.float32), W, IDX, _identity, 3)
    with pytest.raises(ShapeError, match="expert 0 returned"):
        form(X, W, IDX, lambda e, rows: rows[:, :2], 3)


def test_clamped_swiglu_limit_checked():
    with pytest.raises(ConfigError, match="swiglu_limit"):
        clamped_swiglu(np.ones(3), np.ones(3), swiglu_limit=-1.0)


def test_mla_refuses_an_empty_sequence():
    with pytest.raises(ShapeError, match="empty"):
        mla.mla_literal(np.zeros((1, 0, 8)), np.zeros((1, 0), np.int64), {}, num_attention_heads=2,
                        q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_interleave=True,
                        rms_norm_eps=1e-6, max_position_embeddings=16, attention_bias=False)


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_grok_nan_cap_is_refused_not_read_as_off(tmp_path, key):
    path = _copy_checkpoint(tmp_path, "grok2/single-token", lambda c: c.__setitem__(key, float("nan")))
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        refimpl.from_pretrained(path)


def test_deepseek_head_dim_other_than_rope_width_is_refused(tmp_path):
    # transformers would take a stored head_dim as the RoPE width (one frequency for head_dim 2).
    path = _copy_checkpoint(tmp_path, "deepseek_v3/group-limited-routing", lambda c: c.__setitem__("head_dim", 2))
    with pytest.raises(ConfigError, match="'head_dim' is 2, but DeepSeek-V3 derives it"):
        refimpl.from_pretrained(path)


def test_deepseek_head_dim_equal_to_rope_width_is_fine(tmp_path):
    path = _copy_checkpoint(tmp_path, "deepseek_v3/group-limited-routing",
                            lambda c: c.__setitem__("head_dim", c["qk_rope_head_dim"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refimpl.from_pretrained(path)
