"""Op-level golden cases of Gated DeltaNet: the gated delta rule, the causal short conv, the gated
RMSNorm and the whole layer as Qwen3-Next ships it. Seeds 1201-1299.

The class of ``/work/shared/bug-classes.md`` a case probes is named in its description.

Inputs are drawn as the layer produces them: q and k of unit length (the layer
L2-normalises them; the core takes them as given), beta in (0.05, 0.95) (a sigmoid),
log-decays g in [-0.2, -0.005] so the state remembers across chunk boundaries, and an
initial state where the case carries one. Unnormalised keys with beta near 1 would make
``I - beta k k^T`` expand the state, and the rounding of a float16 run would then grow
along the sequence; unit keys keep the recurrence a contraction.

The ``strong-decay-*`` cases draw g in [-30, -1] (the layer case: A_log as transformers
initialises it), where a chunk's cumulative log-decay leaves float32's exp range; the
``mixed-fresh-continuing-*`` cases batch a sequence that starts (all-zero state in row 0)
with one that continues; ``rms-norm-eps-1e-3`` separates the gated norm's eps from the
L2 norm's. Their seeds were picked (by a scan run with transformers at float32, float16
and bfloat16, see ``docs/architectures/qwen3_next.md``) among draws of the same kind: the
float32 error of a chunked form grows with the cumulative log-decay, and a strongly
decayed read-out that nearly cancels is rescaled by the gated norm.

Cases that continue a sequence (GDN-04, GDN-06) compute the state after the first
piece with the reference itself, inside ``make_inputs``; ``tests/test_delta_rule.py``
checks that the pieces together equal the whole.
"""

from __future__ import annotations

import numpy as np

from refimpl.linear_attention.delta_rule import gated_delta_rule_chunked
from refimpl.linear_attention.gated_deltanet import gated_deltanet, gated_deltanet_weight_shapes
from refimpl.linear_attention.short_conv import causal_conv1d

from .common import OpCase


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _weak_decays(rng, shape):
    """Log-decays in [-0.2, -0.005]: the state remembers across chunk boundaries."""
    return -rng.uniform(0.005, 0.2, shape)


def _strong_decays(rng, shape):
    """Log-decays in [-30, -1], as trained layers produce them (transformers initialises A ~ U(0.01, 16), and
    g = -A softplus(a + dt_bias) reaches -20 and below).

    Over a chunk the cumulative log-decay then falls below -88, where exp overflows in float32: a kernel
    forming the pairwise decay as a ratio ``exp(gamma_r) * exp(-gamma_s)`` gets inf * 0 = NaN.
    """
    return -rng.uniform(1.0, 30.0, shape)


def _mixed_decays(rng, shape):
    """About three in four log-decays strong (:func:`_strong_decays`), the others weak, in [-0.2, -0.005]."""
    strong = _strong_decays(rng, shape)
    return np.where(rng.uniform(size=shape) < 0.75, strong, _weak_decays(rng, shape))


def _delta_inputs(b, t, hk, hv, dk, dv, *, state=False, decays=_weak_decays, fresh_rows=()):
    """q, k unit vectors (B,T,Hk,Dk); v N(0,1); g from ``decays``; beta in (0.05, 0.95); optional state,
    all zero in ``fresh_rows`` (sequences that start here beside ones that continue)."""

    def make(rng):
        inputs = {"q": _unit(rng, b, t, hk, dk), "k": _unit(rng, b, t, hk, dk),
                  "v": rng.standard_normal((b, t, hv, dv)), "g": decays(rng, (b, t, hv)),
                  "beta": rng.uniform(0.05, 0.95, (b, t, hv))}
        if state:
            inputs["initial_state"] = 0.5 * rng.standard_normal((b, hv, dk, dv))
            inputs["initial_state"][list(fresh_rows)] = 0.0
        return inputs

    return make


def _second_piece(b, t1, t2, hk, hv, dk, dv):
    """GDN-04: the last ``t2`` tokens of a ``t1 + t2`` sequence, with the state the first ``t1`` left."""

    def make(rng):
        whole = _delta_inputs(b, t1 + t2, hk, hv, dk, dv)(rng)
        first = {name: a[:, :t1] for name, a in whole.items()}
        _, state = gated_delta_rule_chunked(**first, chunk_size=t1)
        return {**{name: a[:, t1:] for name, a in whole.items()}, "initial_state": state}

    return make


def _first_piece(b, t1, t2, hk, hv, dk, dv):
    """The first ``t1`` tokens of the same sequence as :func:`_second_piece` (same seed)."""

    def make(rng):
        return {name: a[:, :t1] for name, a in _delta_inputs(b, t1 + t2, hk, hv, dk, dv)(rng).items()}

    return make


def _rule(case_id, description, seed, form, chunk_size, make_inputs) -> OpCase:
    params = {"form": form} if form == "recurrent" else {"form": form, "chunk_size": chunk_size}
    return OpCase(f"op/gated_delta_rule/{case_id}", description, seed, "gated_delta_rule", params, make_inputs,
                  tolerance_class="op_attention")


DELTA_RULE = [
    _rule("recurrent-t37", "the definition, token by token: B=2, T=37 (prime), Hk=2, Hv=4 (value heads 0, 1 read "
          "key head 0: repeat-interleave, not tiling), Dk=8, Dv=12, zero initial state", 1201, "recurrent", None,
          _delta_inputs(2, 37, 2, 4, 8, 12)),
    _rule("chunked-c4-t37", "the same inputs in chunks of 4 (9 full chunks and a last chunk of 1): equal to the "
          "recurrence", 1201, "chunked", 4, _delta_inputs(2, 37, 2, 4, 8, 12)),
    _rule("chunked-c16-t37-state", "chunks of 16 (16, 16, 5) from a non-zero initial state: the state is decayed "
          "before the first write and read by every chunk", 1202, "chunked", 16,
          _delta_inputs(2, 37, 2, 4, 8, 12, state=True)),
    _rule("recurrent-t37-state", "the recurrence from a non-zero initial state (same inputs)", 1202, "recurrent",
          None, _delta_inputs(2, 37, 2, 4, 8, 12, state=True)),
    _rule("chunked-c64-t64-r4", "T = C = 64 (one full chunk, no remainder), Hk=2, Hv=8 (r=4), initial state",
          1203, "chunked", 64, _delta_inputs(1, 64, 2, 8, 8, 12, state=True)),
    _rule("chunked-c64-t150", "T=150 in chunks of 64 (64, 64, 22; transformers pads the last chunk with 42 zero "
          "tokens): state passed across two chunk boundaries; Hk=Hv=3 (r=1)", 1204, "chunked", 64,
          _delta_inputs(1, 150, 3, 3, 8, 12)),
    _rule("recurrent-t150", "the same inputs token by token", 1204, "recurrent", None,
          _delta_inputs(1, 150, 3, 3, 8, 12)),
    _rule("chunked-c16-t150-r4-state", "T=150 in chunks of 16 (last chunk 6), Hk=1, Hv=4 (every value head reads "
          "the one key head), initial state", 1205, "chunked", 16, _delta_inputs(2, 150, 1, 4, 6, 10, state=True)),
    _rule("gdn02-dk80-dv96", "GDN-02: head widths Dk=80, Dv=96 (not powers of two; a kernel's padded lanes must "
          "stay masked), Hk=1, Hv=2, T=70 in chunks of 64, initial state", 1206, "chunked", 64,
          _delta_inputs(1, 70, 1, 2, 80, 96, state=True)),
    _rule("gdn02-dk80-dv96-recurrent", "GDN-02 in the recurrent form (same inputs)", 1206, "recurrent", None,
          _delta_inputs(1, 70, 1, 2, 80, 96, state=True)),
    _rule("gdn03-t3-h2", "GDN-03: B=1, T=3, H=2, Dk=Dv=4: T != H, the state is (1, 2, 4, 4), sized by heads, "
          "not by the sequence length", 1207, "chunked", 64, _delta_inputs(1, 3, 2, 2, 4, 4)),
    _rule("gdn03-t3-h2-recurrent", "GDN-03 in the recurrent form (same inputs)", 1207, "recurrent", None,
          _delta_inputs(1, 3, 2, 2, 4, 4)),
    _rule("one-token-state", "T=1 from a non-zero state (one decode step), chunked form with C=64", 1208, "chunked",
          64, _delta_inputs(2, 1, 2, 4, 8, 12, state=True)),
    _rule("gdn04-whole-t5-c4", "GDN-04: T=5 in chunks of 4: the last chunk holds 1 real token; padded positions "
          "must not touch the final state", 1209, "chunked", 4, _delta_inputs(1, 5, 2, 4, 8, 12)),
    _rule("gdn04-first-t4", "GDN-04: the first 4 tokens of gdn04-whole-t5-c4 (one full chunk)", 1209, "chunked", 4,
          _first_piece(1, 4, 1, 2, 4, 8, 12)),
    _rule("gdn04-second-t1", "GDN-04: token 5 of gdn04-whole-t5-c4 as one recurrent step from the state the first "
          "4 left: its output and final state equal the whole pass's", 1209, "recurrent", None,
          _second_piece(1, 4, 1, 2, 4, 8, 12)),
    _rule("gdn04-second-t33-c16", "a second piece of 33 tokens in chunks of 16 continuing 30 tokens (cache handoff "
          "mid-chunk)", 1210, "chunked", 16, _second_piece(1, 30, 33, 2, 4, 8, 12)),
    _rule("strong-decay-c16-t53-state", "strong decays as trained layers have them (g in [-30, -1], one in four in "
          "[-0.2, -0.005]): the cumulative log-decay of a 16-token chunk falls far below -88, so the pairwise decay "
          "must be exp(gamma_r - gamma_s), never exp(gamma_r) * exp(-gamma_s) (inf * 0 = NaN in float32); chunks "
          "16, 16, 16, 5 from a non-zero initial state, B=2, Hk=2, Hv=4", 1273, "chunked", 16,
          _delta_inputs(2, 53, 2, 4, 8, 12, state=True, decays=_mixed_decays)),
    _rule("strong-decay-recurrent-t53-state", "the same strong decays token by token (the definition)", 1273,
          "recurrent", None, _delta_inputs(2, 53, 2, 4, 8, 12, state=True, decays=_mixed_decays)),
    _rule("strong-decay-c64-t150", "strong decays, every g in [-30, -1], over T=150 in chunks of 64 (64, 64, 22): "
          "the cumulative log-decay of a chunk reaches about -1000, below float64's exp range too; Hk=1, Hv=2 (no "
          "weak steps here: one after a cumulative -800 carries the float32 cancellation of gamma_r - gamma_s, "
          "see delta_rule.md)", 1217, "chunked", 64,
          _delta_inputs(1, 150, 1, 2, 8, 12, state=True, decays=_strong_decays)),
    _rule("mixed-fresh-continuing-c16-t37", "a batch mixing a sequence that starts here (row 0: initial state all "
          "zero) and one that continues (row 1: non-zero state): whether a row has an initial state is decided per "
          "row, by its data, never by row 0 for the whole batch; chunks of 16", 1213, "chunked", 16,
          _delta_inputs(2, 37, 2, 4, 8, 12, state=True, fresh_rows=(0,))),
    _rule("mixed-fresh-continuing-recurrent-t5", "the fresh / continuing batch in the recurrent form (a short "
          "continuation, as in speculative decoding)", 1214, "recurrent", None,
          _delta_inputs(2, 5, 2, 4, 8, 12, state=True, fresh_rows=(0,))),
]


def _conv_inputs(b, t, c, k, *, state=False, fresh_rows=()):
    def make(rng):
        inputs = {"x": rng.standard_normal((b, t, c)), "weight": rng.standard_normal((c, k)) / np.sqrt(k)}
        if state:
            inputs["conv_state"] = rng.standard_normal((b, c, k - 1))
            inputs["conv_state"][list(fresh_rows)] = 0.0
        return inputs

    return make


def _conv_after(t1, t2, b, c, k):
    """GDN-06: the last ``t2`` inputs of a ``t1 + t2`` sequence, with the state the first ``t1`` left."""

    def make(rng):
        whole = _conv_inputs(b, t1 + t2, c, k)(rng)
        _, state = causal_conv1d(whole["x"][:, :t1], whole["weight"])
        return {"x": whole["x"][:, t1:], "weight": whole["weight"], "conv_state": state}

    return make


def _conv_first(t1, t2, b, c, k):
    def make(rng):
        whole = _conv_inputs(b, t1 + t2, c, k)(rng)
        return {"x": whole["x"][:, :t1], "weight": whole["weight"]}

    return make


def _conv(case_id, description, seed, make_inputs, activation="silu") -> OpCase:
    return OpCase(f"op/causal_conv1d/{case_id}", description, seed, "causal_conv1d",
                  {"activation": activation}, make_inputs)


CONV = [
    _conv("no-state-k4", "depthwise causal conv, K=4, C=10, B=2, T=9, zero history, SiLU: output t sees inputs "
          "t-3..t of its own channel", 1221, _conv_inputs(2, 9, 10, 4)),
    _conv("state-k4", "K=4 with a given state (the 3 inputs before x, channel-major, oldest first), T=6, SiLU",
          1222, _conv_inputs(2, 6, 10, 4, state=True)),
    _conv("gdn06-full-t4", "GDN-06: K=4, 3 channels, 4 tokens in one pass", 1223, _conv_inputs(1, 4, 3, 4)),
    _conv("gdn06-prefill-t3", "GDN-06: the first 3 tokens of gdn06-full-t4 (shorter than K: the state keeps the "
          "zero history)", 1223, _conv_first(3, 1, 1, 3, 4)),
    _conv("gdn06-decode-t1", "GDN-06: token 4 of gdn06-full-t4 from the state the prefill left: equal to the full "
          "pass's last output", 1223, _conv_after(3, 1, 1, 3, 4)),
    _conv("state-t2-shorter-than-history", "T=2 < K-1=3 with a state: the new state keeps its newest old input "
          "and appends x; no activation", 1224, _conv_inputs(2, 2, 5, 4, state=True), activation=None),
    _conv("k2-no-activation", "K=2 (a state of one input), T=7, no activation", 1225,
          _conv_inputs(1, 7, 6, 2, state=True), activation=None),
    _conv("mixed-fresh-continuing-k4", "a batch mixing a sequence that starts here (row 0: conv state all zero) and "
          "one that continues (row 1: its last 3 inputs): the history is per row, never decided by row 0; T=5, SiLU",
          1226, _conv_inputs(2, 5, 10, 4, state=True, fresh_rows=(0,))),
]


def _norm_inputs(shape, *, x_scale=1.0):
    def make(rng):
        return {"x": x_scale * rng.standard_normal(shape), "weight": 1.0 + 0.2 * rng.standard_normal(shape[-1]),
                "z": 2.0 * rng.standard_normal(shape)}

    return make


NORM = [
    OpCase("op/gated_rms_norm/per-head", "Qwen3-Next's gated output norm per value head: (w * n(x)) * silu(z), "
           "plain w near 1 (a 1 + w backend doubles it), gate after the norm; x (2, 5, 4, 12)", 1231,
           "gated_rms_norm", {"eps": 1e-6}, _norm_inputs((2, 5, 4, 12))),
    OpCase("op/gated_rms_norm/eps-visible", "mean squares near eps (x ~ 0.03 N, eps 1e-3): eps inside the root "
           "matters; flat (N, Dv) layout as transformers calls it", 1232, "gated_rms_norm", {"eps": 1e-3},
           _norm_inputs((7, 16), x_scale=0.03)),
]

#: Qwen3-Next's tiny GDN geometry (spec sheet 8.4): Hk=2, Hv=4, Dk=8, Dv=12, K=4.
LAYER = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
         "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6}
LAYER_R1 = {**LAYER, "linear_num_key_heads": 3, "linear_num_value_heads": 3, "linear_key_head_dim": 6}
LAYER_EPS = {**LAYER, "rms_norm_eps": 1e-3}


#: A = exp(A_log) of the weak-decay layer cases, and transformers' own init (``Qwen3NextGatedDeltaNet``:
#: ``A = uniform_(0.01, 16)``), under which g = -A softplus(a + dt_bias) reaches -20 and below.
WEAK_A, TRANSFORMERS_A = (0.02, 0.3), (0.01, 16.0)


def _layer_weights(rng, hidden: int, params: dict, a_range=WEAK_A) -> dict[str, np.ndarray]:
    """Projections N(0, 1/fan_in), conv taps N(0, 1/K), norm weight 1 + 0.2 N, dt_bias 1 + 0.2 N and
    A = exp(A_log) uniform in ``a_range``: by default [0.02, 0.3], so that the log-decays
    g = -A softplus(a + dt_bias) stay in about [-0.6, -0.005] and the state remembers across chunks;
    ``TRANSFORMERS_A`` for the strong decays of transformers' init."""
    heads = {k: v for k, v in params.items() if k != "rms_norm_eps"}
    weights = {}
    for name, shape in sorted(gated_deltanet_weight_shapes(hidden, **heads).items()):
        if name == "A_log":
            weights[name] = np.log(rng.uniform(*a_range, shape))
        elif len(shape) == 1:
            weights[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            weights[name] = rng.standard_normal(shape) / np.sqrt(shape[-1] if name != "conv1d.weight" else shape[2])
    return weights


def _layer_inputs(b, t, hidden, params, a_range=WEAK_A):
    def make(rng):
        weights = _layer_weights(rng, hidden, params, a_range)
        return {"hidden_states": rng.standard_normal((b, t, hidden)), **weights}

    return make


def _layer_piece(b, t1, t2, hidden, params, *, second: bool):
    """The first ``t1`` tokens, or the last ``t2`` with the states the first ``t1`` left (GDN-04 / GDN-06)."""

    def make(rng):
        whole = _layer_inputs(b, t1 + t2, hidden, params)(rng)
        x = whole.pop("hidden_states")
        if not second:
            return {"hidden_states": x[:, :t1], **whole}
        _, state = gated_deltanet(x[:, :t1], whole, **params)
        return {"hidden_states": x[:, t1:], "recurrent_state": state.recurrent_state,
                "conv_state": state.conv_state, **whole}

    return make


def _layer_mixed(t1, t2, hidden, params):
    """Two rows of ``t2`` tokens: row 0 starts a sequence (both states all zero), row 1 continues its own first
    ``t1`` tokens (the states the reference left after them)."""

    def make(rng):
        whole = _layer_inputs(2, t1 + t2, hidden, params)(rng)
        x = whole.pop("hidden_states")
        _, state = gated_deltanet(x[:, :t1], whole, **params)
        recurrent, conv = state.recurrent_state.copy(), state.conv_state.copy()
        recurrent[0], conv[0] = 0.0, 0.0
        return {"hidden_states": x[:, t1:], "recurrent_state": recurrent, "conv_state": conv, **whole}

    return make


def _layer(case_id, description, seed, params, make_inputs) -> OpCase:
    return OpCase(f"op/gated_deltanet/{case_id}", description, seed, "gated_deltanet", params, make_inputs,
                  tolerance_class="op_attention")


LAYERS = [
    _layer("qwen3-next-t150", "the Qwen3NextGatedDeltaNet layer: fused projections grouped per key head, conv over "
           "[q|k|v] + SiLU, L2-normalised q/k (eps 1e-6), g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), "
           "delta rule in chunks of 64 over T=150, gated norm with silu(z), out_proj; M=64, Hk=2, Hv=4, Dk=8, Dv=12",
           1241, {**LAYER, "chunk_size": 64}, _layer_inputs(2, 150, 64, LAYER)),
    _layer("recurrent-r1-t37", "the layer with the recurrent core (chunk_size null), Hk=Hv=3, Dk=6, T=37", 1242,
           {**LAYER_R1, "chunk_size": None}, _layer_inputs(1, 37, 48, LAYER_R1)),
    _layer("gdn04-whole-t5", "GDN-04 / GDN-06 at the layer: 5 tokens in one pass (chunks of 4)", 1243,
           {**LAYER, "chunk_size": 4}, _layer_inputs(1, 5, 64, LAYER)),
    _layer("gdn04-prefill-t4", "the first 4 tokens of gdn04-whole-t5: output, recurrent state and conv state", 1243,
           {**LAYER, "chunk_size": 4}, _layer_piece(1, 4, 1, 64, LAYER, second=False)),
    _layer("gdn04-decode-t1", "token 5 of gdn04-whole-t5 from the prefill's recurrent and conv states (one decode "
           "step): equal to the whole pass's last position", 1243, {**LAYER, "chunk_size": 4},
           _layer_piece(1, 4, 1, 64, LAYER, second=True)),
    _layer("second-piece-t20", "20 tokens continuing 3 (a prefill shorter than the conv width): chunks of 64", 1244,
           {**LAYER, "chunk_size": 64}, _layer_piece(2, 3, 20, 64, LAYER, second=True)),
    _layer("strong-decay-transformers-a-t150", "A_log drawn as transformers initialises it (A ~ U(0.01, 16)): "
           "log-decays down to about -40 per token, so a chunk's cumulative log-decay falls far below float32's "
           "exp range (the pairwise decay must be exp(gamma_r - gamma_s)); T=150 in chunks of 64", 1270,
           {**LAYER, "chunk_size": 64}, _layer_inputs(1, 150, 64, LAYER, TRANSFORMERS_A)),
    _layer("mixed-fresh-continuing-t20", "a batch of a sequence that starts here (row 0: recurrent and conv states "
           "all zero) and one that continues 12 earlier tokens (row 1): 'has an initial state' is per row; 20 tokens "
           "in chunks of 16", 1246, {**LAYER, "chunk_size": 16}, _layer_mixed(12, 20, 64, LAYER)),
    _layer("rms-norm-eps-1e-3", "rms_norm_eps 1e-3 reaches the gated output norm only: the q / k L2 norm keeps its "
           "own eps 1e-6 (both mix-ups move the output far beyond float32 rounding); T=40 in chunks of 16", 1247,
           {**LAYER_EPS, "chunk_size": 16}, _layer_inputs(1, 40, 64, LAYER_EPS)),
]

CASES = DELTA_RULE + CONV + NORM + LAYERS
