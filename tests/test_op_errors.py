"""Bad input to the public ops and components raises a one-line RefimplError naming the argument.

Every row of BAD is one call that once gave a silent wrong answer, NaNs, a RuntimeWarning
or a bare NumPy / Python error (broadcast ValueError, AttributeError on a list, the
Enum's ValueError). Each must now raise the listed class, with a message that names the
argument, before any computation: warnings are turned into errors, so a RuntimeWarning
on the way counts as a failure.
"""

import warnings

import ml_dtypes
import numpy as np
import pytest

from refimpl import ops
from refimpl.attention import attention, grouped_query_attention
from refimpl.embedding import embed_tokens, scaled_embed_tokens
from refimpl.errors import ConfigError, InputError, RefimplError, ShapeError
from refimpl.linear import linear
from refimpl.masks import causal_mask
from refimpl.mlp import gated_mlp
from refimpl.numerics import (
    FLOAT_DTYPES, as_float_array, as_integer_array, check_finite, check_finite_nonnegative, check_finite_positive,
)
from refimpl.rmsnorm import rms_norm, rms_norm_low_precision
from refimpl.rope import (
    apply_rope, default_inv_freq, linear_inv_freq, llama3_inv_freq, rope_cos_sin, rope_frequencies,
    yarn_correction_range, yarn_inv_freq,
)
from refimpl.softcap import soft_cap

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((1, 3, 2, 4))
K = RNG.standard_normal((1, 3, 2, 4))
V = RNG.standard_normal((1, 3, 2, 4))
QI = RNG.integers(-3, 3, (1, 3, 1, 4))
X2 = RNG.standard_normal((2, 8))
W8 = np.ones(8)
BF16 = ml_dtypes.bfloat16
POS = np.arange(3)[None]
DEFAULT = {"rope_type": "default", "rope_theta": 1e4}
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
IDS = np.zeros((1, 2), np.int64)
TABLE = RNG.standard_normal((5, 4))
INV = default_inv_freq(4, 1e4)


def _attention(**kwargs):
    return attention(Q, K, V, **{"scaling": 0.5, **kwargs})


def _mlp(x=X2, gate=np.ones((16, 8)), up=np.ones((16, 8)), down=np.ones((8, 16)), act="silu"):
    return ops.mlp(x, gate, up, down, hidden_act=act)


def _freq(params, **kwargs):
    return ops.frequencies(rope_parameters=params, head_dim=8, **kwargs)


#: id -> (call, exception class, fragment of the message that names the argument)
BAD = {
    # attention: arrays
    "attention-nan-sink": (lambda: _attention(sinks=np.array([np.nan, 0.0])), InputError, "sinks"),
    "attention-posinf-sink": (lambda: _attention(sinks=np.array([np.inf, 0.0])), InputError, "sinks"),
    "attention-int-qkv": (lambda: attention(QI, QI, QI, scaling=0.5), InputError, "q must be a float64"),
    "attention-complex-q": (lambda: attention(Q + 0j, K, V, scaling=0.5), InputError, "complex128"),
    "attention-bool-v": (lambda: attention(Q, K, V > 0, scaling=0.5), InputError, "v must be"),
    "attention-object-k": (lambda: attention(Q, np.array([None, 1.0]), V, scaling=0.5), InputError, "k must be"),
    "attention-ragged-list": (lambda: attention([[1.0], [1.0, 2.0]], K, V, scaling=0.5), InputError, "q must be"),
    "attention-float128": (lambda: attention(*(a.astype(np.longdouble) for a in (Q, K, V)), scaling=0.5),
                           InputError, str(np.dtype(np.longdouble))),
    "attention-int-sinks": (lambda: _attention(sinks=np.array([1, 2])), InputError, "sinks"),
    # attention: scalar parameters
    "attention-nan-scaling": (lambda: _attention(scaling=float("nan")), InputError, "scaling"),
    "attention-inf-scaling": (lambda: _attention(scaling=float("inf")), InputError, "scaling"),
    "attention-bool-scaling": (lambda: _attention(scaling=True), InputError, "scaling"),
    "attention-str-scaling": (lambda: _attention(scaling="0.5"), InputError, "scaling"),
    "attention-none-scaling": (lambda: _attention(scaling=None), InputError, "scaling"),
    "attention-scaling-underflows-float32": (
        lambda: attention(*(a.astype(np.float32) for a in (Q, K, V)), scaling=1e-50), InputError, "scaling"),
    "attention-inf-softcap": (lambda: _attention(attn_logit_softcapping=float("inf")), InputError,
                              "attn_logit_softcapping"),
    "attention-nan-softcap": (lambda: _attention(attn_logit_softcapping=float("nan")), InputError,
                              "attn_logit_softcapping"),
    "attention-float-window": (lambda: _attention(sliding_window=2.0), RefimplError, "sliding window"),
    "gqa-nan-scale": (lambda: grouped_query_attention(Q, K, V, causal_mask(3, 3), float("nan")), InputError,
                      "scale"),
    "gqa-nan-softcap": (lambda: grouped_query_attention(Q, K, V, causal_mask(3, 3), 0.5, softcap=float("nan")),
                        InputError, "softcap"),
    "gqa-int-q": (lambda: grouped_query_attention(QI, QI, QI, causal_mask(3, 3), 0.5), InputError, "q must be"),
    # RMSNorm
    "norm-eps-none": (lambda: ops.norm(np.ones((1, 4)), np.ones(4), eps=None), InputError, "eps"),
    "norm-eps-negative": (lambda: ops.norm(np.ones((1, 4)), np.ones(4), eps=-1.0), InputError, "eps"),
    "norm-eps-nan": (lambda: ops.norm(X2, W8, eps=float("nan")), InputError, "eps"),
    "norm-eps-inf": (lambda: ops.norm(X2, W8, eps=float("inf")), InputError, "eps"),
    "norm-eps-str": (lambda: ops.norm(X2, W8, eps="1e-6"), InputError, "eps"),
    "norm-cast-order-float32": (lambda: ops.norm(X2.astype(np.float32), W8.astype(np.float32), eps=1e-6,
                                                 cast_order="bogus"), InputError, "cast_order"),
    "norm-cast-order-float64": (lambda: ops.norm(X2, W8, eps=1e-6, cast_order="bogus"), InputError, "cast_order"),
    "norm-cast-order-bfloat16": (lambda: ops.norm(X2.astype(BF16), W8.astype(BF16), eps=1e-6, cast_order=None),
                                 InputError, "cast_order"),
    "norm-int-x": (lambda: ops.norm(np.ones((2, 8), np.int64), W8, eps=1e-6), InputError, "x must be"),
    "norm-complex-weight": (lambda: rms_norm(X2, W8 + 0j, 1e-6), InputError, "weight must be"),
    "norm-offset-2": (lambda: ops.norm(X2, W8, eps=1e-6, weight_offset=2.0), InputError, "weight_offset"),
    "norm-offset-nan": (lambda: rms_norm(X2, W8, 1e-6, weight_offset=float("nan")), InputError, "weight_offset"),
    "norm-offset-array": (lambda: rms_norm(X2, W8, 1e-6, weight_offset=np.array([0.0, 1.0])), InputError,
                          "weight_offset"),
    "norm-low-precision-float64": (lambda: rms_norm_low_precision(X2, W8, 1e-6), InputError, "x must be"),
    "norm-low-precision-eps-nan": (lambda: rms_norm_low_precision(X2.astype(np.float16), W8.astype(np.float16),
                                                                  float("nan")), InputError, "eps"),
    # RoPE
    "rope-int-x": (lambda: ops.rope(RNG.integers(-5, 5, (1, 3, 1, 4)), POS, rope_parameters=DEFAULT),
                   InputError, "x must be"),
    "rope-float-positions": (lambda: ops.rope(Q, POS.astype(float), rope_parameters=DEFAULT), InputError,
                             "positions"),
    "rope-bool-positions": (lambda: ops.rope(Q, POS > 0, rope_parameters=DEFAULT), InputError, "positions"),
    "rope-layout-foo": (lambda: ops.rope(Q, POS, rope_parameters=DEFAULT, layout="foo"), ConfigError, "layout"),
    "rope-layout-none": (lambda: ops.rope(Q, POS, rope_parameters=DEFAULT, layout=None), ConfigError, "layout"),
    "rope-theta-nan": (lambda: ops.rope(Q, POS, rope_parameters={**DEFAULT, "rope_theta": float("nan")}),
                       ConfigError, "rope_theta"),
    "rope-theta-one": (lambda: _freq({**YARN, "rope_theta": 1.0}), ConfigError, "rope_theta"),
    "yarn-factor-half": (lambda: _freq({**YARN, "factor": 0.5}), ConfigError, "'factor'"),
    "yarn-factor-nan": (lambda: _freq({**YARN, "factor": float("nan")}), ConfigError, "'factor'"),
    "linear-factor-half": (lambda: _freq({**DEFAULT, "rope_type": "linear", "factor": 0.5}), ConfigError,
                           "'factor'"),
    "llama3-factor-half": (lambda: _freq({**LLAMA3, "factor": 0.5}), ConfigError, "'factor'"),
    "yarn-null-factor-shrinks": (lambda: _freq({**YARN, "factor": None}, max_position_embeddings=32),
                                 ConfigError, "max_position_embeddings"),
    "yarn-beta-fast-below-slow": (lambda: _freq({**YARN, "beta_fast": 1.0, "beta_slow": 32.0}), ConfigError,
                                  "beta_fast"),
    "yarn-mscale-inf": (lambda: _freq({**YARN, "mscale": float("inf")}), ConfigError, "'mscale'"),
    "yarn-negative-magnitude": (lambda: _freq({**YARN, "mscale": -100.0, "mscale_all_dim": 1.0}), ConfigError,
                                "attention scaling"),
    "frequencies-max-positions-str": (lambda: _freq(YARN, max_position_embeddings="4096"), ConfigError,
                                      "max_position_embeddings"),
    "linear-inv-freq-factor-half": (lambda: linear_inv_freq(8, 1e4, 0.5), ConfigError, "factor"),
    "llama3-inv-freq-low-nan": (lambda: llama3_inv_freq(8, 5e5, 8.0, float("nan"), 4.0, 8192), ConfigError,
                                "low_freq_factor"),
    "yarn-inv-freq-factor-half": (lambda: yarn_inv_freq(8, 1e4, 0.5, 64), ConfigError, "factor"),
    "yarn-correction-range-theta-one": (lambda: yarn_correction_range(8, 1.0, 64), ConfigError, "rope_theta"),
    "default-inv-freq-theta-nan": (lambda: default_inv_freq(8, float("nan")), ConfigError, "rope_theta"),
    "cos-sin-scaling-nan": (lambda: rope_cos_sin(np.arange(3), INV, np.float64, float("nan")), InputError,
                            "attention_scaling"),
    "cos-sin-inv-freq-nan": (lambda: rope_cos_sin(np.arange(3), np.array([1.0, np.nan]), np.float64), InputError,
                             "inv_freq"),
    "cos-sin-int-dtype": (lambda: rope_cos_sin(np.arange(3), INV, np.int64), InputError, "dtype"),
    "apply-rope-int-x": (lambda: apply_rope(QI, *rope_cos_sin(np.arange(3), INV, np.float64), "rotate_half"),
                         InputError, "x must be"),
    # gated MLP and linear
    "mlp-gate-up-mismatch": (lambda: _mlp(up=np.ones((15, 8))), ShapeError, "up_proj"),
    "mlp-down-wrong": (lambda: _mlp(down=np.ones((16, 8))), ShapeError, "down_proj"),
    "mlp-int-x": (lambda: _mlp(x=np.ones((2, 8), np.int64)), InputError, "x must be"),
    "mlp-mixed-dtypes": (lambda: gated_mlp(X2.astype(np.float32), np.ones((16, 8)), np.ones((16, 8)),
                                           np.ones((8, 16))), RefimplError, "dtype"),
    "mlp-act-list": (lambda: _mlp(act=["silu"]), ConfigError, "activation"),
    # "gelu" (exact erf) is supported since Grok 2.5; transformers' other GELU names are not.
    "mlp-act-gelu-new": (lambda: _mlp(act="gelu_new"), ConfigError, "'gelu_new' is not supported"),
    "linear-int-weight": (lambda: linear(X2, np.ones((3, 8), np.int64)), InputError, "weight must be"),
    "linear-bias-shape": (lambda: linear(X2, np.ones((3, 8)), np.ones(4)), ShapeError, "bias"),
    # soft-cap
    "softcap-int-list": (lambda: soft_cap([1, 2], 30.0), InputError, "x must be"),
    "softcap-nan-cap": (lambda: ops.softcap(np.ones(3), cap=float("nan")), InputError, "cap"),
    "softcap-zero-cap": (lambda: ops.softcap(np.ones(3), cap=0.0), InputError, "cap"),
    "softcap-bool-cap": (lambda: ops.softcap(np.ones(3), cap=True), InputError, "cap"),
    "softcap-complex-x": (lambda: ops.softcap(np.ones(3) + 1j, cap=30.0), InputError, "complex"),
    # embedding
    "embedding-nan-scale": (lambda: ops.embedding(IDS, TABLE, embed_scale=float("nan")), InputError, "embed_scale"),
    "embedding-inf-scale": (lambda: ops.embedding(IDS, TABLE, embed_scale=float("inf")), InputError, "embed_scale"),
    "embedding-scale-overflows-float16": (lambda: ops.embedding(IDS, TABLE.astype(np.float16), embed_scale=1e6),
                                          InputError, "embed_scale"),
    "embedding-int-weight": (lambda: ops.embedding(IDS, np.ones((5, 4), np.int64)), InputError, "weight must be"),
    "embedding-1d-weight": (lambda: ops.embedding(IDS, np.ones(5)), ShapeError, "weight"),
    "embedding-id-out-of-range": (lambda: scaled_embed_tokens(np.array([[5]]), TABLE, 1.0), InputError, "token id"),
    "embed-tokens-float-ids": (lambda: embed_tokens(np.zeros((1, 2)), TABLE), InputError, "token ids"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_one_line_error_naming_the_argument(case):
    call, error, fragment = BAD[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error) as info:
            call()
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message


def test_the_table_covers_every_op():
    names = " ".join(BAD)
    for op in ("attention", "norm", "rope", "yarn", "llama3", "linear", "mlp", "softcap", "embedding"):
        assert op in names
    assert len(BAD) >= 25


# Valid input keeps working; data NaNs propagate without a warning.

def test_array_likes_are_accepted():
    np.testing.assert_array_equal(attention(Q.tolist(), K.tolist(), V.tolist(), scaling=0.5), _attention())
    np.testing.assert_array_equal(soft_cap([1.0, 50.0], 30.0), soft_cap(np.array([1.0, 50.0]), 30.0))
    np.testing.assert_array_equal(ops.rope(Q, POS.tolist(), rope_parameters=DEFAULT),
                                  ops.rope(Q, POS, rope_parameters=DEFAULT))


@pytest.mark.parametrize("call", [
    lambda: _attention(sinks=np.array([-np.inf, 0.0])),
    lambda: _attention(scaling=np.float32(0.5), attn_logit_softcapping=np.int64(50)),
    lambda: ops.norm(X2, W8, eps=0.0),
    lambda: ops.norm(X2, W8, eps=np.array(1e-6), weight_offset=1),
    lambda: ops.norm(X2.astype(BF16), W8.astype(BF16), eps=1e-6, cast_order="multiply_then_cast"),
    lambda: ops.norm(X2.astype(np.float16), W8.astype(np.float16), eps=1e-6),
    lambda: rms_norm_low_precision(X2.astype(np.float32), W8.astype(np.float32), 1e-6),
    lambda: _freq({**YARN, "factor": 1.0}),
    lambda: _freq({**YARN, "factor": None}, max_position_embeddings=256),
    lambda: _freq({**DEFAULT, "rope_type": "linear", "factor": 1}),
    lambda: ops.embedding(IDS, TABLE.astype(BF16), embed_scale=48 ** 0.5),
    lambda: ops.rope(Q, POS, rope_parameters=DEFAULT, layout="interleaved"),
], ids=["neg-inf-sink", "numpy-scalars", "eps-0", "0d-eps", "bfloat16-norm", "float16-norm", "float32-low",
        "yarn-factor-1", "yarn-null-factor", "linear-int-factor", "bfloat16-embedding", "interleaved"])
def test_valid_edge_inputs_are_accepted_without_warnings(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call()
    values = out.values() if isinstance(out, dict) else [out]
    assert all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values)


def test_nan_in_data_propagates():
    x = X2.copy()
    x[0, 3] = np.nan
    q = Q.copy()
    q[0, 1, 0, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normed = ops.norm(x, W8, eps=1e-6)
        capped = soft_cap(x, 30.0)
        attended = attention(q, K, V, scaling=0.5)
    assert np.isnan(normed[0]).all() and np.isfinite(normed[1]).all()
    assert np.isnan(capped[0, 3]) and np.isfinite(np.delete(capped.ravel(), 3)).all()
    assert np.isnan(attended[0, 1, 0]).all() and np.isfinite(attended[0, 0]).all()


# The helpers themselves

def test_as_float_array_returns_the_array_itself_and_names_the_dtype():
    a = np.ones(3, np.float32)
    assert as_float_array("f: a", a) is a
    assert as_float_array("f: a", [1.0, 2.0]).dtype == np.float64
    assert as_float_array("f: a", np.ones(2, BF16)).dtype == BF16
    assert as_float_array("f: a", np.ones(2, np.float16), dtypes=FLOAT_DTYPES).dtype == np.float16
    for bad, dtype in ((np.ones(2, np.int32), "int32"), (np.ones(2, bool), "bool"),
                       (np.ones(2, np.complex64), "complex64"), (np.array(["a"]), "<U1"),
                       (np.ones(2, np.longdouble), str(np.dtype(np.longdouble)))):
        with pytest.raises(InputError, match=f"^f: a must be a float64, float32, bfloat16 or float16 array, "
                                             f"got dtype {dtype}$"):
            as_float_array("f: a", bad)
    with pytest.raises(InputError, match="^f: a must be a float64 or float32 array, got dtype bfloat16$"):
        as_float_array("f: a", np.ones(2, BF16), dtypes=("float64", "float32"))
    with pytest.raises(ShapeError, match="f: a must have 2 axes"):
        as_float_array("f: a", a, ndim=2)


def test_as_integer_array_refuses_bools_and_floats():
    assert as_integer_array("p", [1, 2]).dtype.kind == "i"
    assert as_integer_array("p", np.arange(3, dtype=np.uint8)).dtype == np.uint8
    for bad in ([True, False], [1.0], [[1], [1, 2]]):
        with pytest.raises(InputError, match="^p "):
            as_integer_array("p", bad)


def test_scalar_checks():
    assert check_finite("c", -2) == -2.0 and isinstance(check_finite("c", np.float32(1.5)), float)
    assert check_finite_nonnegative("eps", 0.0) == 0.0
    rounded = check_finite_positive("s", 0.1, dtype=np.float32)
    assert rounded.dtype == np.float32 and rounded == np.float32(0.1)
    assert check_finite_positive("s", np.array(2.0)) == 2.0
    assert check_finite_positive("s", 2.0, dtype=BF16).dtype == BF16
    for check, bad in ((check_finite, float("nan")), (check_finite, 10 ** 400), (check_finite, True),
                       (check_finite, np.array([1.0])), (check_finite, 1 + 0j),
                       (check_finite_positive, 0), (check_finite_positive, -1e-9),
                       (check_finite_nonnegative, -1e-300), (check_finite_nonnegative, float("-inf"))):
        with pytest.raises(InputError, match="^v must be"):
            check("v", bad)
    with pytest.raises(InputError, match="in float16, got 70000.0, which rounds to inf"):
        check_finite_positive("v", 70000.0, dtype=np.float16)
    with pytest.raises(ConfigError):
        check_finite("v", float("nan"), error=ConfigError)
