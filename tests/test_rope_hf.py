"""refimpl.rope against transformers 5.24: frequency init functions, cos/sin tables, rotations.

transformers builds ``inv_freq`` in float32; inside ``exact_float64()`` the same code
runs in float64 and must agree with the reference to 1e-12 relative. Outside the
context the float32 gap (~1e-7 relative) shows, and is bounded at 2e-6.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave  # noqa: E402
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding  # noqa: E402
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_apply  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb as qwen3_next_apply  # noqa: E402

from conformance.backends.hf_exact import exact_float64  # noqa: E402
from refimpl.rope import (  # noqa: E402
    RopeLayout, apply_rope, rope_cos_sin, rope_frequencies,
)

LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
YARN_QWEN3 = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
YARN_16 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 4096}

#: id -> (rope_parameters, head_dim, max_position_embeddings)
CASES = {
    "default-1e4-d64": ({"rope_type": "default", "rope_theta": 10000.0}, 64, 4096),
    "default-5e5-d128": ({"rope_type": "default", "rope_theta": 500000.0}, 128, 8192),
    "linear-8": ({"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}, 128, 32768),
    "linear-8-partial-0.5": ({"rope_type": "linear", "rope_theta": 1e4, "factor": 8.0,
                              "partial_rotary_factor": 0.5}, 96, 4096),
    "llama3.1": (LLAMA31, 128, 131072),
    "llama3.2-factor-32": (LLAMA31 | {"factor": 32.0}, 64, 131072),
    "llama3-original-from-max": ({k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"},
                                 128, 8192),
    "yarn-4": (YARN_QWEN3, 128, 131072),
    "yarn-16": (YARN_16, 64, 65536),
    "yarn-16-mscale-1-1": (YARN_16 | {"mscale": 1.0, "mscale_all_dim": 1.0}, 64, 65536),
    "yarn-16-mscale-1-0.707": (YARN_16 | {"mscale": 1.0, "mscale_all_dim": 0.707}, 64, 65536),
    "yarn-40-deepseek": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096}, 64, 163840),
    "yarn-attention-factor": (YARN_QWEN3 | {"attention_factor": 1.25}, 128, 131072),
    "yarn-no-truncate": ({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
                         64, 131072),
    "yarn-partial-0.5": (YARN_QWEN3 | {"partial_rotary_factor": 0.5}, 128, 131072),
    # original context > 2 pi theta: corr(beta_slow) passes Dr/2, so the clip at Dr - 1 shows
    "yarn-long-original": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 131072}, 64, 524288),
    "yarn-beta-8-2": (YARN_16 | {"beta_fast": 8.0, "beta_slow": 2.0}, 64, 65536),
    "yarn-original-from-max": ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, 128, 32768),
    "yarn-null-factor": (YARN_16 | {"factor": None, "mscale": 0.707, "mscale_all_dim": 1.0}, 64, 65536),
}


def llama_config(params: dict, head_dim: int, max_positions: int):
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=max_positions, rope_parameters=dict(params))


def hf_frequencies(params: dict, head_dim: int, max_positions: int, exact: bool):
    """transformers' ``(inv_freq, attention_scaling)``, in float64 inside ``exact_float64()`` if ``exact``."""
    config = llama_config(params, head_dim, max_positions)
    rope_type = config.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else (
        ROPE_INIT_FUNCTIONS[rope_type])
    if exact:
        with exact_float64():
            inv_freq, scaling = init(config, device=None)
        assert inv_freq.dtype == torch.float64
    else:
        inv_freq, scaling = init(config, device=None)
        assert inv_freq.dtype == torch.float32
    return inv_freq.double().numpy(), scaling


def ours(params: dict, head_dim: int, max_positions: int):
    return rope_frequencies(dict(params), head_dim, max_position_embeddings=max_positions)


def max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("case", CASES)
def test_rope_frequencies_match_transformers_in_float64(case):
    params, head_dim, max_positions = CASES[case]
    inv_hf, scaling_hf = hf_frequencies(params, head_dim, max_positions, exact=True)
    inv, scaling = ours(params, head_dim, max_positions)
    assert inv.dtype == np.float64 and inv.shape == inv_hf.shape
    assert max_rel(inv, inv_hf) <= 1e-12, case
    assert scaling == pytest.approx(scaling_hf, rel=1e-15, abs=0)


@pytest.mark.parametrize("case", ["default-5e5-d128", "llama3.1", "yarn-4", "yarn-no-truncate"])
def test_rope_frequencies_float32_gap(case):
    # Outside the context transformers rounds inv_freq to float32: a real but small gap.
    params, head_dim, max_positions = CASES[case]
    inv_hf, _ = hf_frequencies(params, head_dim, max_positions, exact=False)
    gap = max_rel(ours(params, head_dim, max_positions)[0], inv_hf)
    assert 1e-9 < gap < 2e-6, gap


def test_glm_default_partial_rotary_rope02():
    # ROPE-02: GLM defaults partial_rotary_factor to 0.5 even when config.json omits it.
    config = transformers.GlmConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    with exact_float64():
        inv_hf, _ = GlmRotaryEmbedding.compute_default_rope_parameters(config)
    inv, _ = rope_frequencies(config.rope_parameters, 128)
    assert inv.shape == (32,)
    assert max_rel(inv, inv_hf.numpy()) <= 1e-12


@pytest.mark.parametrize("case", ["default-5e5-d128", "llama3.1", "yarn-16-mscale-1-0.707", "yarn-partial-0.5"])
def test_cos_sin_match_transformers_rotary_forward(case):
    # Whole rotary module forward (batched position ids up to 131000) in float64.
    params, head_dim, max_positions = CASES[case]
    positions = np.array([[0, 1, 17, 40000, 131000], [5, 6, 7, 8, 9]])
    with exact_float64():
        module = LlamaRotaryEmbedding(llama_config(params, head_dim, max_positions))
        x = torch.zeros(1, dtype=torch.float64)
        cos_hf, sin_hf = module(x, torch.from_numpy(positions))
    inv, scaling = ours(params, head_dim, max_positions)
    if "partial_rotary_factor" in params:
        # Llama's module does not cut head_dim itself; the init function did (Dr/2 frequencies).
        assert inv.shape[0] == cos_hf.shape[-1] // 2
    cos, sin = rope_cos_sin(positions, inv, np.float64, scaling)
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_hf.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_hf.numpy(), rtol=0, atol=1e-10)


def tables(positions, head_dim, partial, theta=10000.0):
    inv, _ = rope_frequencies({"rope_type": "default", "rope_theta": theta}, head_dim,
                              partial_rotary_factor=partial)
    return rope_cos_sin(positions, inv, np.float64)


def hf_layout(x):
    """(B, T, H, D) NumPy -> (B, H, T, D) torch, the layout transformers' apply functions take."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))


@pytest.mark.parametrize("head_dim, partial", [(16, 1.0), (12, 0.5), (64, 0.25)])
def test_rotate_half_matches_qwen3_next_partial(head_dim, partial):
    rng = np.random.default_rng(head_dim)
    q, k = rng.standard_normal((2, 2, 5, 3, head_dim))
    positions = np.array([[0, 3, 8, 40000, 131000], [1, 2, 3, 4, 5]])
    cos, sin = tables(positions, head_dim, partial)
    full = lambda t: torch.from_numpy(np.concatenate([t, t], -1))
    q_hf, k_hf = qwen3_next_apply(hf_layout(q), hf_layout(k), full(cos), full(sin))
    for ours_out, theirs in [(apply_rope(q, cos, sin, RopeLayout.ROTATE_HALF), q_hf),
                             (apply_rope(k, cos, sin, RopeLayout.ROTATE_HALF), k_hf)]:
        np.testing.assert_allclose(ours_out, theirs.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("head_dim, partial", [(16, 1.0), (12, 0.5), (128, 0.5)])
def test_interleaved_matches_glm(head_dim, partial):
    rng = np.random.default_rng(head_dim + 1)
    q, k = rng.standard_normal((2, 2, 4, 2, head_dim))
    positions = np.array([[0, 9, 40000, 131000], [4, 5, 6, 7]])
    cos, sin = tables(positions, head_dim, partial)
    full = lambda t: torch.from_numpy(np.concatenate([t, t], -1))
    q_hf, k_hf = glm_apply(hf_layout(q), hf_layout(k), full(cos), full(sin))
    np.testing.assert_allclose(apply_rope(q, cos, sin, RopeLayout.INTERLEAVED),
                               q_hf.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-15)
    np.testing.assert_allclose(apply_rope(k, cos, sin, RopeLayout.INTERLEAVED),
                               k_hf.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-15)


def test_interleaved_is_deepseek_v3_up_to_a_channel_permutation():
    # DeepSeek-V3 returns the interleaved rotation de-interleaved: [even outputs, odd outputs].
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 1, 6, 2, 8))
    cos, sin = tables(np.arange(6)[None] * 1000, 8, 1.0)
    full = lambda t: torch.from_numpy(np.concatenate([t, t], -1))
    q_hf, k_hf = apply_rotary_pos_emb_interleave(hf_layout(q), hf_layout(k), full(cos), full(sin))
    q_hf, k_hf = q_hf.numpy().transpose(0, 2, 1, 3), k_hf.numpy().transpose(0, 2, 1, 3)
    q_ours, k_ours = (apply_rope(v, cos, sin, RopeLayout.INTERLEAVED) for v in (q, k))
    perm = np.r_[0:8:2, 1:8:2]
    assert not np.allclose(q_ours, q_hf)
    np.testing.assert_allclose(q_ours[..., perm], q_hf, rtol=0, atol=1e-15)
    # the same permutation on q and k leaves every q.k unchanged
    np.testing.assert_allclose(np.einsum("bthd,bshd->bhts", q_ours, k_ours),
                               np.einsum("bthd,bshd->bhts", q_hf, k_hf), rtol=1e-13, atol=1e-13)

