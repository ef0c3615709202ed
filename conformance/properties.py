"""Property-based checks of a backend's ops: laws that the math implies, checked without golden data.

A golden case checks one input against one stored answer. A property checks a law
on many small random inputs by calling only the backend: changing future keys
leaves past outputs alone, a window wider than the sequence is no window, RoPE
rotates (pair norms kept, only position differences matter), RMSNorm forgets the
scale of its input, soft-capping is odd and bounded. Hypothesis draws the sizes,
the options and one integer seed; a NumPy generator seeded with it makes the
arrays, so examples are cheap, reproducible, and shrink to small sizes and seed 0.
Properties complement the golden cases rather than replace them: a wrong
``rope_theta``, an ignored ``rope_scaling`` or a missing Gemma ``1 + w`` keeps every
law below.

=================================  ==========  ===================================================
property                           op          law
=================================  ==========  ===================================================
attention_causal                   attention   changing keys/values after position p and queries
                                               after p leaves query rows at positions <= p alone
attention_gqa_repeat               attention   Hkv < H equals the call with k, v repeated to H
                                               heads (``np.repeat(k, G, axis=2)``: head h // G)
attention_window_ge_keys           attention   sliding_window W >= S equals no window
attention_chunk_ge_keys            attention   attention_chunk_size C >= S equals no chunking
attention_sink_negative            attention   sink logits -1e30 (and -inf, if accepted) equal no
                                               sinks
attention_window_locality          attention   with W < S, changing keys/values before position c
                                               leaves the rows at positions >= c - 1 + W alone
attention_scaling                  attention   q times c with scaling / c equals q with scaling
                                               (the given scaling is the one applied)
attention_sink_takes_mass          attention   values all 1: sinks -1e30 give exactly 1; a sink
                                               above every score on head h leaves head h at most
                                               S / (S + 1) and the other heads at 1
attention_softcap_bounds_ratios    attention   with cap c (5 or 20) and one-hot values (Dv = S), the
                                               probabilities of visible keys are within a factor
                                               exp(2c) of each other and keys after the query get 0
attention_batch_rows_independent   attention   each batch row run alone equals its row of the
                                               batched call
rope_pair_norm                     rope        every rotated pair keeps its Euclidean norm
                                               (pairs of the layout: (i, i + Dr/2) or (2i, 2i + 1))
rope_relative_position             rope        q.k after RoPE at positions (m, n) equals q.k at
                                               (m + o, n + o)
rope_partial_passthrough           rope        channels >= Dr = D * partial_rotary_factor are
                                               returned unchanged
rope_partial_is_narrow             rope        the first Dr channels equal RoPE of a head of
                                               width Dr (frequencies over Dr, not D)
rms_norm_scale_invariant           rms_norm    norm(c x) = norm(x) for c > 0, up to the exact
                                               effect of eps (eps 0, 1e-12 or 1e-6)
rms_norm_eps_in_root               rms_norm    norm(c x; eps c^2) = norm(x; eps): eps sits inside
                                               the root, added to mean(x^2)
soft_cap_odd                       soft_cap    softcap(-x) = -softcap(x)
soft_cap_bounded                   soft_cap    |softcap(x)| <= cap, finite, for |x| up to 1e3 cap
soft_cap_identity_near_zero        soft_cap    |softcap(x) - x| <= |x| (x / cap)^2 / 3 for
                                               |x| <= cap / 100
ROUTER_weights                     ROUTER      exactly k experts selected; weights 0 elsewhere;
                                               they sum to 1 (routed_scaling_factor for the
                                               group router) where renormalised, and equal the
                                               law's probabilities of the chosen experts: softmax
                                               over all (softmax_top_k, soft-capped first for
                                               soft_capped_softmax_top_k), softmax over the chosen
                                               logits (top_k_softmax), sigmoid of the logit
                                               (llama4_top_k_sigmoid), unbiased sigmoid
                                               (sigmoid_bias_top_k, sigmoid_group_top_k: the
                                               correction bias never enters the weights)
ROUTER_top_k                       ROUTER      no unchosen expert has a better selection score
                                               (logit; sigmoid + bias; capped logit) than a
                                               chosen one (group router: within the groups that
                                               hold a chosen expert)
ROUTER_permutation                 ROUTER      permuting the experts (logit columns and bias
                                               entries; whole groups and inside groups for the
                                               group router) permutes both outputs' columns alike
sigmoid_group_top_k_group_limit    sigmoid_    chosen experts lie in at most topk_group groups;
                                   group_top_k when topk_group groups hold them, none has a
                                               smaller top-2 score sum than a group left out
moe_dispatch_expert_permutation    moe_        relabelling the experts (stacks and indices) and
                                   dispatch    reordering the k slots leaves the output alone
moe_dispatch_single_expert         moe_        E = k = 1 with weight 1 (what a renormalised
                                   dispatch    router gives) equals gated_mlp of that expert's
                                               gate, up and down halves
mla_absorbed_equals_literal        mla         form="absorbed" equals form="literal"
=================================  ==========  ===================================================

ROUTER is each routing op: softmax_top_k, top_k_softmax, sigmoid_group_top_k,
sigmoid_bias_top_k, llama4_top_k_sigmoid, soft_capped_softmax_top_k (so
``softmax_top_k_weights``, ...). A law that needs a second op (``gated_mlp``)
skips its examples as not implemented when the backend lacks it.

Sizes are bounded so that one example costs a few milliseconds even through a
framework: B <= 2, T <= 12, S <= T + 4, H <= 4, D and Dv in {4, 6, 8} (Dv = S for
the soft-cap probe), positions below 100 plus an offset below 100. Attention draws
a soft-cap one time in four, since engines often refuse it together with sinks.
Routers: N <= 9 tokens, E <= 8 experts (groups of 2 or 3, n_group in {1, 2, 4}),
logits N(0, 1) or N(0, 9), correction biases 0.5 N(0, 1) shifted by 0 or -3 (all
selection scores negative: where a 0 fill of excluded groups would win, bug classes
MOE-02/03); continuous draws, so no exact ties. Selection scores compare with the
tolerance below times max(1, max |score|). MoE dispatch: N <= 9, M <= 6, I <= 5,
E <= 6. MLA: B <= 2, T <= 6, widths <= 12, default or YaRN RoPE, both pair
layouts, with and without q_lora_rank and attention_bias.

Tolerances: a comparison is between two outputs of the backend, or an output and a
value the law fixes (the input's pair norms or channels, x, 1), in the run dtype:
``|a - e| <= RTOL[dtype] * max(1, max |e|) + allowance`` elementwise, where the
allowance is what the law itself permits (RMSNorm's eps, soft-cap's cubic term;
zero otherwise). RTOL is 1e-10 in float64 and 1e-4 in float32: inputs are O(1),
so the bound is relative for outputs above 1 and absolute below. Every output
must be finite. RoPE positions stay below 200 because engines form angles in
float32 (about 1e-5 rad of error there, within the float32 tolerance).

Outputs: every op call is checked before any law looks at it. The value must be
one array (a dict only for ``rope_frequencies``, as in ``refimpl.ops``) of the shape
the op must return for those inputs -- attention ``(B, T, H, Dv)``; rope, rms_norm
and soft_cap the shape of ``x``; gated_mlp ``(..., M)``; embedding ``(B, T, M)``;
rope_frequencies ``inv_freq`` ``(Dr/2,)`` and ``attention_scaling`` ``()`` -- with
finite values. A wrong shape or a NaN/Inf fails the property ("attention output
shape (1, 3, 1, 4) != expected (1, 3, 2, 4) = (B, T, H, Dv)"); a value that is not
an array (a dict, None, strings) is an error that says what was returned.

Statuses: "passed" (every example held), "failed" (a law broke, or an output had the
wrong shape or a NaN/Inf; the message has the error and the shrunk falsifying
example), "not implemented" (the op is missing, or it raised ``NotImplementedError``
for every example; an example whose parameters raise it is skipped), "error" (the
op raised anything else, ``SystemExit`` included but not ``KeyboardInterrupt``, or
returned something that is not an array). An exception in a property's own code,
not in the op, is an "error" whose message starts "internal error in property
NAME" and names the line, so a bug of this module is never mistaken for one of the
backend.

Reproducibility: ``derandomize=True`` (examples depend only on this file's code),
no example database, no deadline. Profiles: quick 10, ci 25, thorough 200 examples.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings, strategies as st
from hypothesis.errors import Flaky, HypothesisException, Unsatisfiable

from refimpl.rope import rotary_dim

from .compare import to_float64
from .errors import ConformanceError
from .runner import Status, one_line

#: Relative tolerance of every comparison, by run dtype (see the module docstring).
RTOL = {"float64": 1e-10, "float32": 1e-4}
#: dtypes the properties run in.
DTYPES = tuple(RTOL)
#: Hypothesis profile name -> examples per property.
PROFILES = {"quick": 10, "ci": 25, "thorough": 200}
#: The finite sink logit that stands for "no sink".
NO_SINK = -1e30

HEAD_DIMS = (4, 6, 8)
#: Attention soft-cap draws: None three times in four, since engines often refuse caps with sinks.
_SOFTCAPS = (None,) * 9 + (5.0, 20.0, 50.0)
#: partial_rotary_factor values whose rotary width D * f is an exact even integer.
PARTIAL_FACTORS = {4: (0.5,), 8: (0.25, 0.5, 0.75)}
MAX_POSITION = 100


class PropertyFailure(AssertionError):
    """A law does not hold on an example: status "failed"."""


class OpRaised(Exception):
    """The op raised something other than NotImplementedError, or returned a non-array: status "error"."""


class PropertyBug(Exception):
    """A property's own code (not the op) raised: status "error", reported as an internal error."""


class _NotImplementedHere(Exception):
    """The op raised NotImplementedError for this example's parameters: the example is skipped."""


class Example(SimpleNamespace):
    """One drawn example: sizes, options and the seed of its arrays; ``repr`` is its one-line summary."""

    def __repr__(self) -> str:
        return " ".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in vars(self).items())


@dataclass(frozen=True)
class Property:
    """One named law.

    Attributes:
        name: unique name (``--property NAME``).
        op: the op it exercises (``refimpl.ops.OPS`` name).
        description: the law, one line.
        check: ``check(ops, run_settings) -> Outcome``; runs the law over the profile's examples.
    """

    name: str
    op: str
    description: str
    check: Callable[[dict, "RunSettings"], "Outcome"]


@dataclass(frozen=True)
class RunSettings:
    """The dtype inputs are cast to, its tolerance, and the hypothesis settings of the profile."""

    dtype: str
    rtol: float
    hypothesis: settings


@dataclass
class Outcome:
    """What a check found; :class:`PropertyResult` adds the name, op and time."""

    status: Status
    message: str = ""
    example: str | None = None
    examples: int = 0
    rejected: int = 0


@dataclass
class PropertyResult:
    """Result of one property on one backend.

    Attributes:
        name, op: the property and the op it exercises.
        status: passed, failed, not implemented or error (:class:`conformance.runner.Status`).
        message: counts on success; the broken bound or the exception otherwise.
        example: the shrunk falsifying (or erroring) example, ``None`` otherwise.
        examples: examples that ran to the end (on failure: including hypothesis' shrink steps).
        rejected: examples skipped because the op raised ``NotImplementedError``.
        seconds: wall time.
    """

    name: str
    op: str
    status: Status
    message: str = ""
    example: str | None = None
    examples: int = 0
    rejected: int = 0
    seconds: float = 0.0


@dataclass
class _Tally:
    """Counts kept across hypothesis' calls of one property."""

    examples: int = 0
    rejected: int = 0
    reason: str = ""
    last_example: str = ""
    notes: list[str] = field(default_factory=list)


class Context:
    """What a law's body uses: call an op, cast inputs, compare outputs."""

    def __init__(self, ops: dict, run: RunSettings, tally: _Tally):
        self.ops, self.dtype, self.rtol, self.tally = ops, run.dtype, run.rtol, tally

    def cast(self, array: np.ndarray) -> np.ndarray:
        """A float64 draw in the run dtype."""
        return np.ascontiguousarray(array, dtype=self.dtype)

    def call(self, op: str, *, keep_none: tuple[str, ...] = (), **kwargs):
        """``ops[op](**kwargs)`` (None-valued keywords left out, except those named in ``keep_none``)
        as float64, its shape and values checked.

        Returns:
            The output array; for ``rope_frequencies`` a dict of its output arrays.

        Raises:
            _NotImplementedHere: the op raised NotImplementedError.
            OpRaised: the op raised anything else (SystemExit included) or returned no real array.
            PropertyFailure: an output's shape is not the one the op must return, or it has NaN/Inf.
        """
        kwargs = {key: value for key, value in kwargs.items() if value is not None or key in keep_none}
        expected = expected_output_shapes(op, kwargs)
        try:
            value = self.ops[op](**kwargs)
        except NotImplementedError as exc:
            raise _NotImplementedHere(one_line(str(exc)) or f"{op}: NotImplementedError") from None
        except (Exception, SystemExit) as exc:
            raise OpRaised(one_line(f"{op} raised {_exception_text(exc)}")) from None
        outputs = _read_outputs(op, value, tuple(expected))
        for name, array in outputs.items():
            shape, formula = expected[name]
            what = f"{op} output" if name == "output" else f"{op} output '{name}'"
            if array.shape != shape:
                raise PropertyFailure(f"{what} shape {array.shape} != expected {shape} = {formula}")
            nonfinite = array.size - int(np.count_nonzero(np.isfinite(array)))
            if nonfinite:
                raise PropertyFailure(f"{what}: {nonfinite} NaN/Inf value(s) of {array.size}")
        return outputs["output"] if tuple(expected) == ("output",) else outputs

    def require(self, op: str) -> None:
        """Skip the example (as not implemented) when a law also needs ``op`` and the backend lacks it."""
        if op not in self.ops:
            raise _NotImplementedHere(f"the backend has no op '{op}'")

    def note(self, text: str) -> None:
        """Add ``text`` (once) to the message of a passing property."""
        if text not in self.tally.notes:
            self.tally.notes.append(text)

    def assert_close(self, actual: np.ndarray, expected: np.ndarray, what: str, allowance=0.0) -> None:
        """``|actual - expected| <= rtol * max(1, max|expected|) + allowance`` everywhere, all finite.

        Raises:
            PropertyFailure: shapes differ, a value is NaN/Inf, or the bound is broken
                (the message names the worst index).
        """
        if actual.shape != expected.shape:
            raise PropertyFailure(f"{what}: shape {actual.shape} != {expected.shape}")
        nonfinite = int(np.sum(~np.isfinite(actual)) + np.sum(~np.isfinite(expected)))
        if nonfinite:
            raise PropertyFailure(f"{what}: {nonfinite} NaN/Inf value(s)")
        bound = self.rtol * max(1.0, float(np.max(np.abs(expected), initial=0.0))) + np.asarray(allowance)
        excess = np.abs(actual - expected) - bound
        if np.any(excess > 0):
            where = np.unravel_index(int(np.argmax(excess)), excess.shape)
            error = abs(actual[where] - expected[where])
            raise PropertyFailure(
                f"{what}: |difference| {error:.3g} at {tuple(int(i) for i in where)} exceeds "
                f"{np.broadcast_to(bound, excess.shape)[where]:.3g} ({actual[where]:.6g} vs {expected[where]:.6g})")


# Op outputs: what must come back

def _shape_of(kwargs: dict, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in np.shape(kwargs[name]))


#: Op name -> kwargs -> {output name: (the shape it must have, that shape in symbols)} (``refimpl.ops`` table).
_OUTPUT_SHAPES: dict[str, Callable[[dict], dict[str, tuple[tuple[int, ...], str]]]] = {
    "attention": lambda kw: {"output": (_shape_of(kw, "q")[:3] + _shape_of(kw, "v")[3:], "(B, T, H, Dv)")},
    "rope": lambda kw: {"output": (_shape_of(kw, "x"), "(B, T, H, D)")},
    "rms_norm": lambda kw: {"output": (_shape_of(kw, "x"), "(..., M)")},
    "soft_cap": lambda kw: {"output": (_shape_of(kw, "x"), "the shape of x")},
    "gated_mlp": lambda kw: {"output": (_shape_of(kw, "x")[:-1] + _shape_of(kw, "down_proj")[:1], "(..., M)")},
    "embedding": lambda kw: {"output": (_shape_of(kw, "input_ids") + _shape_of(kw, "weight")[1:], "(B, T, M)")},
    "rope_frequencies": lambda kw: {
        "inv_freq": ((rotary_dim(kw["head_dim"], kw.get("partial_rotary_factor", 1.0)) // 2,), "(Dr/2,)"),
        "attention_scaling": ((), "()"),
    },
    **{router: lambda kw: {"routing_weights": (_shape_of(kw, "router_logits"), "(N, E)"),
                           "selected": (_shape_of(kw, "router_logits"), "(N, E)")}
       for router in ("softmax_top_k", "top_k_softmax", "sigmoid_group_top_k", "sigmoid_bias_top_k",
                      "llama4_top_k_sigmoid", "soft_capped_softmax_top_k")},
    **{expert: lambda kw: {"output": (_shape_of(kw, "x"), "(n, M)")}
       for expert in ("swiglu_expert", "input_major_swiglu_expert", "clamped_swiglu_expert")},
    "moe_dispatch": lambda kw: {"output": (_shape_of(kw, "x"), "(N, M)")},
    "mla": lambda kw: {"output": (_shape_of(kw, "hidden_states"), "(B, T, M)")},
    "moe_block": lambda kw: {"output": (_shape_of(kw, "hidden_states"), "(B, T, M)")},
}


def expected_output_shapes(op: str, kwargs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{output name: (shape, shape in symbols)}`` that ``op`` must return for ``kwargs``.

    Single-array ops have the one output ``"output"``.

    Raises:
        KeyError: an op without an entry in the table (a bug of the calling property).
    """
    return _OUTPUT_SHAPES[op](kwargs)


def _exception_text(exc: BaseException) -> str:
    """``"Type: message"``, or ``"Type"`` when the message is empty."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(value) -> str:
    """What an op returned, in a few words: "a dict with keys ['x']", "None", "a list"."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return f"a dict with keys {[str(key) for key in value]}"
    return f"a {type(value).__name__}"


def _as_float64(op: str, value, output: str = "output") -> np.ndarray:
    """One returned array as float64; anything that is not a real array is an :class:`OpRaised`."""
    where = "" if output == "output" else f" as output '{output}'"
    if value is None or isinstance(value, dict):
        raise OpRaised(f"{op} returned {_describe(value)}{where} where one array is expected")
    try:
        return to_float64(value, f"{op} output" if output == "output" else f"{op} output '{output}'")
    except (Exception, SystemExit) as exc:
        raise OpRaised(one_line(f"{op} returned {_describe(value)}{where} that is not a real array: {exc}")) from None


def _read_outputs(op: str, value, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """An op's return value as ``{output name: float64 array}`` (see :func:`Context.call`).

    A single-array op returns the array (or, as ``llm-conformance run`` accepts, a dict
    with the key "output"); a multi-output op returns a dict holding every name.

    Raises:
        OpRaised: a dict where one array is expected or the reverse, a missing output,
            or a value that is not a real array; the message says what was returned.
    """
    if names == ("output",):
        if isinstance(value, dict) and "output" in value:
            value = value["output"]
        return {"output": _as_float64(op, value)}
    if not isinstance(value, dict):
        raise OpRaised(f"{op} returned {_describe(value)} where a dict with outputs {list(names)} is expected")
    missing = [name for name in names if name not in value]
    if missing:
        raise OpRaised(f"{op} returned {_describe(value)} without the output(s) {missing}")
    return {name: _as_float64(op, value[name], name) for name in names}


# Running one law under hypothesis

def _classify(name: str, test: Callable[[], None], tally: _Tally) -> Outcome:
    """Run the hypothesis test and turn what it raised into an :class:`Outcome`."""
    try:
        test()
    except PropertyFailure as exc:
        return Outcome(Status.FAILED, one_line(str(exc)), tally.last_example, tally.examples, tally.rejected)
    except (OpRaised, PropertyBug) as exc:
        return Outcome(Status.ERROR, str(exc), tally.last_example, tally.examples, tally.rejected)
    except Unsatisfiable:
        pass  # every example was rejected: decided below
    except Flaky as exc:
        message = one_line(f"not reproducible: an example's outcome changed when hypothesis ran it again "
                           f"(is the op deterministic?): {_exception_text(exc)}")
        return Outcome(Status.ERROR, message, tally.last_example or None, tally.examples, tally.rejected)
    except Exception as exc:
        message = one_line(f"internal error in property {name} (hypothesis or the example strategy, "
                           f"not the op): {_exception_text(exc)}")
        return Outcome(Status.ERROR, message, tally.last_example or None, tally.examples, tally.rejected)
    if tally.examples == 0:
        return Outcome(Status.NOT_IMPLEMENTED, f"every example raised NotImplementedError ({tally.reason})",
                       rejected=tally.rejected)
    message = f"{tally.examples} examples"
    if tally.rejected:
        message += f"; {tally.rejected} skipped, not implemented ({tally.reason})"
    return Outcome(Status.PASSED, "; ".join([message, *tally.notes]), None, tally.examples, tally.rejected)


def _internal_error(name: str, exc: Exception) -> str:
    """The message of an exception raised by property ``name``'s own code, with its innermost line there.

    That line is the innermost frame below the hypothesis test that is not in an
    installed package (NumPy's own frames are skipped).
    """
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # [0] is property_test itself
    own = [f for f in frames
           if f.filename == __file__ or not ("site-packages" in f.filename or "dist-packages" in f.filename)]
    where = f" at {os.path.basename(own[-1].filename)}:{own[-1].lineno} in {own[-1].name}" if own else ""
    return one_line(f"internal error in property {name} (its own code, not the op){where}: {_exception_text(exc)}")


def _hypothesis_check(name: str, strategy, body: Callable, ops: dict, run: RunSettings) -> Outcome:
    """Check ``body(context, example)`` on the examples of ``strategy`` under the run's settings."""
    tally = _Tally()

    def property_test(example):
        tally.last_example = repr(example)
        try:
            body(Context(ops, run, tally), example)
        except _NotImplementedHere as exc:
            tally.rejected += 1
            tally.reason = str(exc)
            reject()
        except (PropertyFailure, OpRaised, HypothesisException):
            raise
        except Exception as exc:
            raise PropertyBug(_internal_error(name, exc)) from exc
        tally.examples += 1

    property_test.__name__ = property_test.__qualname__ = name
    return _classify(name, run.hypothesis(given(strategy)(property_test)), tally)


def run_settings(dtype: str, profile: str, derandomize: bool = True) -> RunSettings:
    """The :class:`RunSettings` of a dtype and profile.

    ``derandomize=False`` (the pytest plugin's quick and thorough profiles) draws new
    examples on every run; the CLI and the plugin's ci profile always derandomize.

    Raises:
        ConformanceError: unknown dtype or profile (the known ones are listed).
    """
    if dtype not in RTOL:
        raise ConformanceError(f"properties run in {' or '.join(DTYPES)}, not '{dtype}'")
    if profile not in PROFILES:
        raise ConformanceError(f"unknown profile '{profile}'; profiles: {', '.join(PROFILES)}")
    hypothesis = settings(
        max_examples=PROFILES[profile], derandomize=derandomize, database=None, deadline=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink), report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False,
    )
    return RunSettings(dtype, RTOL[dtype], hypothesis)


def extended(strategy, **draws):
    """``strategy``'s examples with more fields, field ``name`` drawn from ``draws[name](example)``."""

    @st.composite
    def more(draw):
        example = draw(strategy)
        return Example(**{**vars(example), **{name: draw(make(example)) for name, make in draws.items()}})

    return more()


# Attention: examples and laws

@st.composite
def attention_examples(draw, *, min_batch=1, min_queries=1, window=None, chunk=None, sinks=True):
    """An :class:`Example` of attention sizes and options.

    ``window`` / ``chunk`` map S to a strategy for that option (default: None or
    1..S + 2); ``sinks=False`` never draws random sink logits.
    """
    b = draw(st.integers(min_batch, 2))
    t = draw(st.integers(min_queries, 12))
    s = t + draw(st.integers(0, 4))
    hkv = draw(st.integers(1, 4))
    h = hkv * draw(st.integers(1, 4 // hkv))
    d, dv = draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(HEAD_DIMS))
    return Example(
        B=b, T=t, S=s, H=h, Hkv=hkv, D=d, Dv=dv, scaling=draw(st.sampled_from((d ** -0.5, 1.0))),
        window=draw(window(s) if window else st.none() | st.integers(1, s + 2)),
        chunk=draw(chunk(s) if chunk else st.none() | st.integers(1, s + 2)),
        sinks=draw(st.booleans()) if sinks else False,
        softcap=draw(st.sampled_from(_SOFTCAPS)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _attention_inputs(ctx: Context, ex: Example):
    """``(rng, {"q", "k", "v", "sinks"})`` in the run dtype; the rng continues for further draws."""
    rng = np.random.default_rng(ex.seed)
    q = rng.standard_normal((ex.B, ex.T, ex.H, ex.D))
    k = rng.standard_normal((ex.B, ex.S, ex.Hkv, ex.D))
    v = rng.standard_normal((ex.B, ex.S, ex.Hkv, ex.Dv))
    sinks = 2 * rng.standard_normal(ex.H) if ex.sinks else None
    arrays = {"q": ctx.cast(q), "k": ctx.cast(k), "v": ctx.cast(v), "sinks": None if sinks is None else ctx.cast(sinks)}
    return rng, arrays


def _attention_params(ex: Example, **overrides) -> dict:
    params = {"scaling": ex.scaling, "sliding_window": ex.window, "attention_chunk_size": ex.chunk,
              "attn_logit_softcapping": ex.softcap}
    return {**params, **overrides}


def attention_causal(ctx: Context, ex: Example) -> None:
    """Keys, values and queries after the cut p do not move query rows at positions <= p."""
    rng, x = _attention_inputs(ctx, ex)
    before = ctx.call("attention", **x, **_attention_params(ex))
    # Query row i sits at position S - T + i; rows up to the cut p must not move.
    kept = ex.p - (ex.S - ex.T) + 1
    changed = dict(x)
    for name, start in (("k", ex.p + 1), ("v", ex.p + 1), ("q", kept)):
        fresh = x[name].copy()
        fresh[:, start:] = ctx.cast(5 * rng.standard_normal(fresh[:, start:].shape))
        changed[name] = fresh
    after = ctx.call("attention", **changed, **_attention_params(ex))
    ctx.assert_close(after[:, :kept], before[:, :kept],
                     f"rows at positions <= {ex.p} after changing keys, values and queries after {ex.p}")


def attention_gqa_repeat(ctx: Context, ex: Example) -> None:
    """Grouped k, v equal k, v repeated to H heads, query head h reading head h // G."""
    _, x = _attention_inputs(ctx, ex)
    group = ex.H // ex.Hkv
    grouped = ctx.call("attention", **x, **_attention_params(ex))
    repeated = {**x, "k": np.repeat(x["k"], group, axis=2), "v": np.repeat(x["v"], group, axis=2)}
    expected = ctx.call("attention", **repeated, **_attention_params(ex))
    ctx.assert_close(grouped, expected, f"Hkv={ex.Hkv} against k, v repeated to H={ex.H} heads (head h reads h // G)")


def attention_window_ge_keys(ctx: Context, ex: Example) -> None:
    """A window of at least S keys equals no window."""
    _, x = _attention_inputs(ctx, ex)
    windowed = ctx.call("attention", **x, **_attention_params(ex))
    full = ctx.call("attention", **x, **_attention_params(ex, sliding_window=None))
    ctx.assert_close(windowed, full, f"sliding_window={ex.window} >= S={ex.S} against no window")


def attention_chunk_ge_keys(ctx: Context, ex: Example) -> None:
    """A chunk of at least S positions equals no chunking."""
    _, x = _attention_inputs(ctx, ex)
    chunked = ctx.call("attention", **x, **_attention_params(ex))
    whole = ctx.call("attention", **x, **_attention_params(ex, attention_chunk_size=None))
    ctx.assert_close(chunked, whole, f"attention_chunk_size={ex.chunk} >= S={ex.S} against no chunking")


def attention_sink_negative(ctx: Context, ex: Example) -> None:
    """Sink logits -1e30 (and -inf, when the op accepts them) equal no sinks."""
    _, x = _attention_inputs(ctx, ex)
    params = _attention_params(ex)
    plain = ctx.call("attention", **x, **params)
    sunk = ctx.call("attention", **{**x, "sinks": ctx.cast(np.full(ex.H, NO_SINK))}, **params)
    ctx.assert_close(sunk, plain, f"sinks = {NO_SINK:g} against no sinks")
    # -inf is the exact "no sink"; a backend may refuse it, but what it returns must agree.
    try:
        infinite = ctx.call("attention", **{**x, "sinks": ctx.cast(np.full(ex.H, -np.inf))}, **params)
    except (_NotImplementedHere, OpRaised) as exc:
        ctx.note(f"sinks = -inf not accepted, only -1e30 checked ({exc})")
        return
    ctx.assert_close(infinite, plain, "sinks = -inf against no sinks")


def attention_window_locality(ctx: Context, ex: Example) -> None:
    """Keys before the cut c do not move rows whose window starts at c or later."""
    rng, x = _attention_inputs(ctx, ex)
    before = ctx.call("attention", **x, **_attention_params(ex))
    changed = dict(x)
    for name in ("k", "v"):
        changed[name] = x[name].copy()
        changed[name][:, :ex.cut] = ctx.cast(5 * rng.standard_normal(changed[name][:, :ex.cut].shape))
    after = ctx.call("attention", **changed, **_attention_params(ex))
    # Query row i sits at position S - T + i; it sees keys j > position - W.
    first = max(0, ex.cut - 1 + ex.window - (ex.S - ex.T))
    ctx.assert_close(after[:, first:], before[:, first:],
                     f"rows at positions >= {ex.cut - 1 + ex.window} after changing keys and values before {ex.cut}")


def attention_scaling(ctx: Context, ex: Example) -> None:
    """Queries times c with scaling / c equal the original call: the given scaling is applied."""
    _, x = _attention_inputs(ctx, ex)
    expected = ctx.call("attention", **x, **_attention_params(ex))
    scaled_q = ctx.cast(ex.factor * x["q"].astype(np.float64))
    actual = ctx.call("attention", **{**x, "q": scaled_q}, **_attention_params(ex, scaling=ex.scaling / ex.factor))
    ctx.assert_close(actual, expected, f"q times {ex.factor} with scaling divided by {ex.factor}")


def attention_sink_takes_mass(ctx: Context, ex: Example) -> None:
    """With values all 1, a sink above every score lowers its own head, and only it."""
    _, x = _attention_inputs(ctx, ex)
    x["v"] = ctx.cast(np.ones(x["v"].shape))
    params = _attention_params(ex)
    no_sink = np.full(ex.H, NO_SINK)
    # With values all 1 the output is the mass the keys get: 1 without a sink.
    ones = ctx.call("attention", **{**x, "sinks": ctx.cast(no_sink)}, **params)
    ctx.assert_close(ones, np.ones(ones.shape), f"values all 1, sinks {NO_SINK:g}: the keys' mass")
    # A sink logit above every score (Cauchy-Schwarz bound, or the cap) takes >= 1 / (S + 1) of the mass.
    q_norm = np.linalg.norm(x["q"].astype(np.float64), axis=-1).max()
    k_norm = np.linalg.norm(x["k"].astype(np.float64), axis=-1).max()
    top = min(ex.scaling * q_norm * k_norm, ex.softcap or np.inf)
    sinks = no_sink.copy()
    sinks[ex.head] = top
    out = ctx.call("attention", **{**x, "sinks": ctx.cast(sinks)}, **params)
    others = ones.copy()
    others[:, :, ex.head] = out[:, :, ex.head]
    ctx.assert_close(out, others, f"heads other than {ex.head} after raising its sink")
    limit = ex.S / (ex.S + 1) * (1 + ctx.rtol)
    if not np.all(out[:, :, ex.head] <= limit):
        raise PropertyFailure(f"head {ex.head} with sink {top:.4g} above every score keeps mass "
                              f"{np.max(out[:, :, ex.head]):.6g} > S / (S + 1) = {ex.S / (ex.S + 1):.6g}")


def attention_softcap_bounds_ratios(ctx: Context, ex: Example) -> None:
    """With cap c, visible probabilities stay within exp(2c) of each other; later keys get 0."""
    _, x = _attention_inputs(ctx, ex)
    # One-hot values (Dv = S) make the output the probabilities; large queries make uncapped scores spread.
    x["q"] = ctx.cast(30 * x["q"].astype(np.float64))
    x["v"] = ctx.cast(np.broadcast_to(np.eye(ex.S)[None, :, None, :], x["v"].shape))
    p = ctx.call("attention", **x, **_attention_params(ex))
    positions = np.arange(ex.S - ex.T, ex.S)[:, None, None]
    visible = np.broadcast_to(np.arange(ex.S)[None, None, :] <= positions, p.shape[1:])
    ctx.assert_close(np.where(visible, 0.0, p), np.zeros(p.shape), "probabilities of keys after the query")
    # s in (-c, c) after capping, so p_j / p_max >= exp(-2c); 0.01 of slack in the exponent for rounding.
    floor = np.max(p, axis=-1, keepdims=True) * np.exp(-2 * ex.softcap - 0.01)
    low = visible & (p < floor)
    if np.any(low):
        where = tuple(int(i) for i in np.argwhere(low)[0])
        raise PropertyFailure(f"probability {p[where]:.3g} at {where} is below exp(-2 cap) = "
                              f"{np.exp(-2 * ex.softcap):.3g} times its row's largest, {np.max(p[where[:-1]]):.3g}")


def attention_batch_rows_independent(ctx: Context, ex: Example) -> None:
    """Each batch row run alone equals its row of the batched call."""
    _, x = _attention_inputs(ctx, ex)
    params = _attention_params(ex)
    batched = ctx.call("attention", **x, **params)
    for b in range(ex.B):
        alone = {name: a if name == "sinks" or a is None else a[b:b + 1].copy() for name, a in x.items()}
        ctx.assert_close(ctx.call("attention", **alone, **params), batched[b:b + 1], f"batch row {b} run alone")


# RoPE: examples and laws

@st.composite
def rope_examples(draw, *, rope_types=("default", "linear", "llama3", "yarn"), partial=False):
    """An :class:`Example` of RoPE sizes and parameters; ``partial`` draws D in {4, 8} and f < 1."""
    d = draw(st.sampled_from(tuple(PARTIAL_FACTORS) if partial else HEAD_DIMS))
    return Example(
        B=draw(st.integers(1, 2)), T=draw(st.integers(1, 12)), H=draw(st.integers(1, 4)), D=d,
        layout=draw(st.sampled_from(("rotate_half", "interleaved"))),
        rope_type=draw(st.sampled_from(rope_types)), rope_theta=draw(st.sampled_from((100.0, 10000.0, 1e6))),
        factor=draw(st.sampled_from((2.0, 4.0, 8.0))),
        partial_rotary_factor=draw(st.sampled_from(PARTIAL_FACTORS[d])) if partial else 1.0,
        offset=draw(st.integers(1, MAX_POSITION)), seed=draw(st.integers(0, 2**32 - 1)),
    )


#: Context length the scaled RoPE types are configured with (small, so their bands matter at D <= 8).
ORIGINAL_CONTEXT = 64


def _rope_params(ex: Example, **overrides) -> dict:
    """Keyword parameters of the ``rope`` op for ``ex``."""
    params = {"rope_type": ex.rope_type, "rope_theta": ex.rope_theta}
    context = None
    if ex.rope_type in ("linear", "yarn"):
        params["factor"] = ex.factor
    if ex.rope_type == "llama3":
        params.update(factor=ex.factor, low_freq_factor=1.0, high_freq_factor=4.0)
    if ex.rope_type in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = ORIGINAL_CONTEXT
        context = int(ex.factor * ORIGINAL_CONTEXT)
    kwargs = {"rope_parameters": params, "partial_rotary_factor": ex.partial_rotary_factor,
              "max_position_embeddings": context, "layout": ex.layout}
    return {**kwargs, **overrides}


def _rope_inputs(ctx: Context, ex: Example):
    """``(rng, x (B, T, H, D) in the run dtype, positions (B, T) int64)``."""
    rng = np.random.default_rng(ex.seed)
    x = ctx.cast(rng.standard_normal((ex.B, ex.T, ex.H, ex.D)))
    return rng, x, rng.integers(0, MAX_POSITION, (ex.B, ex.T), dtype=np.int64)


def _pair_norms(x: np.ndarray, layout: str, rotary: int) -> np.ndarray:
    """``(..., Dr/2)`` norms of the rotated pairs: (i, i + Dr/2) for rotate_half, (2i, 2i + 1) interleaved."""
    if layout == "rotate_half":
        first, second = x[..., :rotary // 2], x[..., rotary // 2:rotary]
    else:
        first, second = x[..., 0:rotary:2], x[..., 1:rotary:2]
    return np.hypot(first, second)


def rope_pair_norm(ctx: Context, ex: Example) -> None:
    """Every pair the layout rotates keeps its norm."""
    _, x, positions = _rope_inputs(ctx, ex)
    rotated = ctx.call("rope", x=x, positions=positions, **_rope_params(ex))
    expected = _pair_norms(x.astype(np.float64), ex.layout, ex.D)
    ctx.assert_close(_pair_norms(rotated, ex.layout, ex.D), expected, f"norms of the {ex.layout} pairs")


def rope_relative_position(ctx: Context, ex: Example) -> None:
    """q.k after RoPE is unchanged when both positions shift by the same offset."""
    rng, q, m = _rope_inputs(ctx, ex)
    k = ctx.cast(rng.standard_normal(q.shape))
    n = rng.integers(0, MAX_POSITION, m.shape, dtype=np.int64)
    params = _rope_params(ex)

    def scores(shift: int) -> np.ndarray:
        rotated_q = ctx.call("rope", x=q, positions=m + shift, **params)
        rotated_k = ctx.call("rope", x=k, positions=n + shift, **params)
        return np.sum(rotated_q * rotated_k, axis=-1)

    ctx.assert_close(scores(ex.offset), scores(0), f"q.k with both positions shifted by {ex.offset}")


def rope_partial_passthrough(ctx: Context, ex: Example) -> None:
    """Channels beyond the rotary width come back unchanged."""
    _, x, positions = _rope_inputs(ctx, ex)
    rotary = int(ex.D * ex.partial_rotary_factor)
    rotated = ctx.call("rope", x=x, positions=positions, **_rope_params(ex))
    ctx.assert_close(rotated[..., rotary:], x[..., rotary:].astype(np.float64), f"channels {rotary}.. (Dr={rotary})")


def rope_partial_is_narrow(ctx: Context, ex: Example) -> None:
    """The rotary channels equal RoPE of a head exactly Dr wide."""
    _, x, positions = _rope_inputs(ctx, ex)
    rotary = int(ex.D * ex.partial_rotary_factor)
    rotated = ctx.call("rope", x=x, positions=positions, **_rope_params(ex))
    narrow = ctx.call("rope", x=x[..., :rotary].copy(), positions=positions,
                      **_rope_params(ex, partial_rotary_factor=1.0))
    ctx.assert_close(rotated[..., :rotary], narrow, f"first {rotary} channels against RoPE of a {rotary}-wide head")


# RMSNorm: examples and laws

@st.composite
def rms_norm_examples(draw, *, eps):
    """An :class:`Example` of RMSNorm sizes, a scale c in [1/16, 16] and ``eps`` drawn from the given strategy.

    ``weight_offset`` is 0 or 1 and ``cast_order`` the default or ``"multiply_then_cast"``
    (immaterial in float32 / float64, but engines pick a different norm for each:
    transformers' Llama, OLMo 2 and Gemma 3 norms).
    """
    return Example(
        shape=(draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 16))),
        weight_offset=draw(st.sampled_from((0.0, 1.0))),
        cast_order=draw(st.sampled_from((None, "multiply_then_cast"))), eps=draw(eps),
        scale=2.0 ** (draw(st.integers(-40, 40)) / 10), seed=draw(st.integers(0, 2**32 - 1)),
    )


def _rms_norm_inputs(ctx: Context, ex: Example):
    """``(x, c x, weight)`` in the run dtype."""
    rng = np.random.default_rng(ex.seed)
    x = ctx.cast(rng.standard_normal(ex.shape))
    weight = ctx.cast(rng.standard_normal(ex.shape[-1]))
    return x, ctx.cast(ex.scale * x.astype(np.float64)), weight


def rms_norm_scale_invariant(ctx: Context, ex: Example) -> None:
    """norm(c x) = norm(x), up to the exact effect of a tiny eps."""
    x, scaled, weight = _rms_norm_inputs(ctx, ex)
    params = {"eps": ex.eps, "weight_offset": ex.weight_offset, "cast_order": ex.cast_order}
    expected = ctx.call("rms_norm", x=x, weight=weight, **params)
    # With eps in the root: norm(c x) = norm(x) * sqrt((ms + eps) / (ms + eps / c^2)), ms = mean(x^2).
    mean_square = np.mean(np.square(x.astype(np.float64)), axis=-1, keepdims=True)
    ratio = np.sqrt((mean_square + ex.eps) / (mean_square + ex.eps / ex.scale**2))
    allowance = np.abs(expected) * np.abs(ratio - 1)
    ctx.assert_close(ctx.call("rms_norm", x=scaled, weight=weight, **params), expected,
                     f"input scaled by {ex.scale:.4g} (eps {ex.eps:g})", allowance)


def rms_norm_eps_in_root(ctx: Context, ex: Example) -> None:
    """norm(c x; eps c^2) = norm(x; eps), which holds only with eps inside the root."""
    x, scaled, weight = _rms_norm_inputs(ctx, ex)
    params = {"weight_offset": ex.weight_offset, "cast_order": ex.cast_order}
    expected = ctx.call("rms_norm", x=x, weight=weight, eps=ex.eps, **params)
    actual = ctx.call("rms_norm", x=scaled, weight=weight, eps=ex.eps * ex.scale**2, **params)
    ctx.assert_close(actual, expected, f"input scaled by c={ex.scale:.4g} and eps {ex.eps:.3g} by c^2")


# Soft-cap: examples and laws

@st.composite
def soft_cap_examples(draw):
    """An :class:`Example` of a length, a cap and a seed."""
    return Example(n=draw(st.integers(1, 32)), cap=draw(st.sampled_from((1.0, 5.0, 30.0, 50.0))),
                   seed=draw(st.integers(0, 2**32 - 1)))


def _soft_cap_inputs(ctx: Context, ex: Example, low: float, high: float) -> np.ndarray:
    """Signed values with magnitudes log-uniform in ``[cap 10^low, cap 10^high]``, in the run dtype."""
    rng = np.random.default_rng(ex.seed)
    magnitude = ex.cap * 10.0 ** rng.uniform(low, high, ex.n)
    return ctx.cast(rng.choice((-1.0, 1.0), ex.n) * magnitude)


def soft_cap_odd(ctx: Context, ex: Example) -> None:
    """softcap(-x) = -softcap(x)."""
    x = _soft_cap_inputs(ctx, ex, -3.0, 3.0)
    positive = ctx.call("soft_cap", x=x, cap=ex.cap)
    ctx.assert_close(ctx.call("soft_cap", x=-x, cap=ex.cap), -positive, "softcap(-x) against -softcap(x)")


def soft_cap_bounded(ctx: Context, ex: Example) -> None:
    """|softcap(x)| <= cap and finite, for |x| up to 1000 cap."""
    x = _soft_cap_inputs(ctx, ex, -3.0, 3.0)
    y = ctx.call("soft_cap", x=x, cap=ex.cap)
    # tanh may round to exactly 1; allow the last bits of cap * 1 in the run dtype.
    limit = ex.cap * (1 + 4 * np.finfo(ctx.dtype).eps)
    outside = np.abs(y) > limit  # ctx.call checked the shape and that every value is finite
    if np.any(outside):
        where = int(np.argmax(outside))
        raise PropertyFailure(f"softcap(x) = {y[where]:.6g} at {where} (x = {x[where]:.6g}) exceeds cap {ex.cap:g}")


def soft_cap_identity_near_zero(ctx: Context, ex: Example) -> None:
    """softcap(x) = x up to its cubic term for |x| <= cap / 100."""
    x = _soft_cap_inputs(ctx, ex, -5.0, -2.0)
    y = ctx.call("soft_cap", x=x, cap=ex.cap)
    exact = x.astype(np.float64)
    # c tanh(x / c) = x - x^3 / (3 c^2) + ...: the cubic term is the allowance.
    allowance = np.abs(exact) * (exact / ex.cap) ** 2 / 3
    ctx.assert_close(y, exact, f"softcap(x) against x for |x| <= cap/100 (cap {ex.cap:g})", allowance)


# MoE routers: examples and laws

#: The routing ops; each returns ``{"routing_weights": (N, E), "selected": (N, E) 0/1}``.
ROUTER_OPS = ("softmax_top_k", "top_k_softmax", "sigmoid_group_top_k", "sigmoid_bias_top_k",
              "llama4_top_k_sigmoid", "soft_capped_softmax_top_k")
#: Routers whose selection score adds ``e_score_correction_bias``.
_BIASED_ROUTERS = ("sigmoid_group_top_k", "sigmoid_bias_top_k")


def _example(**fields) -> Example:
    """An :class:`Example` of the fields that are not None."""
    return Example(**{name: value for name, value in fields.items() if value is not None})


@st.composite
def router_examples(draw, *, op):
    """An :class:`Example` of router sizes and parameters for routing op ``op``.

    The group router draws ``n_group`` in {1, 2, 4} groups of 2 or 3 experts and
    ``top_k`` up to the experts of the kept groups; the others E <= 8 and any k.
    ``bias_shift`` -3 makes every selection score negative (then a 0 fill of
    excluded groups would beat the kept experts); ``scale`` spreads the logits.
    """
    if op == "sigmoid_group_top_k":
        n_group, per_group = draw(st.sampled_from((1, 2, 4))), draw(st.integers(2, 3))
        topk_group = draw(st.integers(1, n_group))
        experts, top_k = n_group * per_group, draw(st.integers(1, topk_group * per_group))
    else:
        n_group = topk_group = None
        experts = draw(st.integers(1, 8))
        top_k = draw(st.integers(1, experts))
    return _example(
        N=draw(st.integers(1, 9)), E=experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=draw(st.booleans()) if op in ("softmax_top_k", "sigmoid_group_top_k") else None,
        routed_scaling_factor=draw(st.sampled_from((1.0, 2.5, 2.827))) if op == "sigmoid_group_top_k" else None,
        cap=draw(st.sampled_from((1.0, 5.0, 30.0))) if op == "soft_capped_softmax_top_k" else None,
        bias_shift=draw(st.sampled_from((0.0, -3.0))) if op in _BIASED_ROUTERS else None,
        scale=draw(st.sampled_from((1.0, 3.0))), seed=draw(st.integers(0, 2**32 - 1)),
    )


def _router_params(op: str, ex: Example) -> dict:
    """Keyword parameters of routing op ``op`` for ``ex``."""
    params = {"top_k": ex.top_k}
    if op in ("softmax_top_k", "sigmoid_group_top_k"):
        params["norm_topk_prob"] = ex.norm_topk_prob
    if op == "sigmoid_group_top_k":
        params.update(n_group=ex.n_group, topk_group=ex.topk_group, routed_scaling_factor=ex.routed_scaling_factor)
    if op == "soft_capped_softmax_top_k":
        params["router_logit_softcapping"] = ex.cap
    return params


def _router_inputs(ctx: Context, op: str, ex: Example):
    """``(rng, {"router_logits" (N, E)[, "e_score_correction_bias" (E,)]})`` in the run dtype."""
    rng = np.random.default_rng(ex.seed)
    arrays = {"router_logits": ctx.cast(ex.scale * rng.standard_normal((ex.N, ex.E)))}
    if op in _BIASED_ROUTERS:
        arrays["e_score_correction_bias"] = ctx.cast(ex.bias_shift + 0.5 * rng.standard_normal(ex.E))
    return rng, arrays


def _route(ctx: Context, op: str, ex: Example, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(routing_weights, selected)`` of the op, the selection checked: 0/1 and ``top_k`` per token."""
    out = ctx.call(op, **arrays, **_router_params(op, ex))
    selected = out["selected"]
    if not np.all((selected == 0) | (selected == 1)):
        raise PropertyFailure(f"{op} output 'selected' holds values other than 0 and 1")
    counts = selected.sum(axis=-1)
    if np.any(counts != ex.top_k):
        row = int(np.argmax(counts != ex.top_k))
        raise PropertyFailure(f"{op}: token {row} selects {int(counts[row])} experts, top_k is {ex.top_k}")
    return out["routing_weights"], selected


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _selection_scores(op: str, ex: Example, arrays: dict) -> np.ndarray:
    """``(N, E)`` float64 scores whose top k the router chooses (any order-preserving map of them)."""
    logits = arrays["router_logits"].astype(np.float64)
    if op in _BIASED_ROUTERS:
        return _sigmoid(logits) + arrays["e_score_correction_bias"].astype(np.float64)
    if op == "soft_capped_softmax_top_k":
        return ex.cap * np.tanh(logits / ex.cap)
    return logits


def _expected_weights(op: str, ex: Example, arrays: dict, chosen: np.ndarray) -> tuple[np.ndarray, str]:
    """The routing weights the law fixes for the chosen experts ``(N, E)`` bool, and the law in words."""
    logits = arrays["router_logits"].astype(np.float64)
    if op == "top_k_softmax":
        return _softmax(np.where(chosen, logits, -np.inf)), "softmax over the chosen experts' logits"
    if op == "llama4_top_k_sigmoid":
        return np.where(chosen, _sigmoid(logits), 0.0), "sigmoid of the chosen logits, not normalised"
    if op in ("softmax_top_k", "soft_capped_softmax_top_k"):
        capped = _selection_scores(op, ex, arrays)
        weights = np.where(chosen, _softmax(capped), 0.0)
        if getattr(ex, "norm_topk_prob", False):
            return weights / weights.sum(axis=-1, keepdims=True), "softmax probabilities renormalised over the chosen"
        return weights, "softmax probabilities over all experts, not renormalised"
    # Sigmoid routers: the weights come from the unbiased sigmoid; the bias only selects.
    weights = np.where(chosen, _sigmoid(logits), 0.0)
    if op == "sigmoid_bias_top_k":
        return weights / weights.sum(axis=-1, keepdims=True), "unbiased sigmoids renormalised over the chosen"
    if ex.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    law = "renormalised unbiased sigmoids" if ex.norm_topk_prob else "unbiased sigmoids"
    return ex.routed_scaling_factor * weights, f"{law} times routed_scaling_factor {ex.routed_scaling_factor:g}"


def _target_sum(op: str, ex: Example) -> float | None:
    """What each token's weights must sum to, where the router renormalises; None otherwise."""
    if op in ("top_k_softmax", "sigmoid_bias_top_k") or (op == "softmax_top_k" and ex.norm_topk_prob):
        return 1.0
    if op == "sigmoid_group_top_k" and ex.norm_topk_prob:
        return ex.routed_scaling_factor
    return None


def router_weights(op: str, ctx: Context, ex: Example) -> None:
    """Weights sum to 1 (or routed_scaling_factor) where renormalised and equal the chosen probabilities."""
    _, arrays = _router_inputs(ctx, op, ex)
    weights, selected = _route(ctx, op, ex, arrays)
    ctx.assert_close(np.where(selected == 1, 0.0, weights), np.zeros(weights.shape),
                     "routing weights of experts not selected")
    target = _target_sum(op, ex)
    if target is not None:
        ctx.assert_close(weights.sum(axis=-1), np.full(ex.N, target), "each token's routing weights summed")
    expected, law = _expected_weights(op, ex, arrays, selected == 1)
    ctx.assert_close(weights, expected, f"routing weights against the {law}")


def router_selects_top_k(op: str, ctx: Context, ex: Example) -> None:
    """The chosen experts have the k best selection scores (within the groups that hold them)."""
    _, arrays = _router_inputs(ctx, op, ex)
    _, selected = _route(ctx, op, ex, arrays)
    chosen = selected == 1
    scores = _selection_scores(op, ex, arrays)
    competing = np.ones(chosen.shape, dtype=bool)
    if op == "sigmoid_group_top_k":
        per_group = ex.E // ex.n_group
        holds = chosen.reshape(ex.N, ex.n_group, per_group).any(axis=-1)
        competing = np.repeat(holds, per_group, axis=-1)
    worst_chosen = np.where(chosen, scores, np.inf).min(axis=-1)
    best_passed = np.where(competing & ~chosen, scores, -np.inf).max(axis=-1)
    tolerance = ctx.rtol * max(1.0, float(np.max(np.abs(scores))))
    beaten = best_passed > worst_chosen + tolerance
    if np.any(beaten):
        row = int(np.argmax(beaten))
        raise PropertyFailure(f"{op}: token {row} chooses an expert with selection score {worst_chosen[row]:.6g} "
                              f"over one with {best_passed[row]:.6g}")


def _expert_permutation(rng: np.random.Generator, ex: Example) -> np.ndarray:
    """A random permutation of the E experts; for the group router it moves whole groups and shuffles inside them."""
    groups = getattr(ex, "n_group", 1)
    per_group = ex.E // groups
    return np.concatenate([g * per_group + rng.permutation(per_group) for g in rng.permutation(groups)])


def router_permutation(op: str, ctx: Context, ex: Example) -> None:
    """Permuting the experts (logit columns and bias entries) permutes the routing columns alike."""
    rng, arrays = _router_inputs(ctx, op, ex)
    weights, selected = _route(ctx, op, ex, arrays)
    perm = _expert_permutation(rng, ex)
    permuted = {name: np.ascontiguousarray(a[..., perm]) for name, a in arrays.items()}
    permuted_weights, permuted_selected = _route(ctx, op, ex, permuted)
    what = f"experts permuted by {perm.tolist()}"
    if not np.array_equal(permuted_selected, selected[:, perm]):
        row = int(np.argmax(np.any(permuted_selected != selected[:, perm], axis=-1)))
        raise PropertyFailure(f"{op}: with the {what}, token {row} selects "
                              f"{np.flatnonzero(permuted_selected[row]).tolist()}, not "
                              f"{np.flatnonzero(selected[row, perm]).tolist()}")
    ctx.assert_close(permuted_weights, weights[:, perm], f"routing weights with the {what}")


def group_limit(ctx: Context, ex: Example) -> None:
    """Chosen experts lie in at most topk_group groups, and those groups have the best top-2 score sums."""
    op = "sigmoid_group_top_k"
    _, arrays = _router_inputs(ctx, op, ex)
    _, selected = _route(ctx, op, ex, arrays)
    per_group = ex.E // ex.n_group
    holds = (selected == 1).reshape(ex.N, ex.n_group, per_group).any(axis=-1)
    counts = holds.sum(axis=-1)
    if np.any(counts > ex.topk_group):
        row = int(np.argmax(counts > ex.topk_group))
        raise PropertyFailure(f"{op}: token {row} chooses experts in groups {np.flatnonzero(holds[row]).tolist()}, "
                              f"more than topk_group {ex.topk_group}")
    # When topk_group groups hold a chosen expert they are the kept groups: none may score below another.
    grouped = np.sort(_selection_scores(op, ex, arrays).reshape(ex.N, ex.n_group, per_group), axis=-1)
    group_scores = grouped[..., -2:].sum(axis=-1)
    worst_kept = np.where(holds, group_scores, np.inf).min(axis=-1)
    best_dropped = np.where(holds, -np.inf, group_scores).max(axis=-1)
    tolerance = ctx.rtol * max(1.0, float(np.max(np.abs(group_scores))))
    wrong = (counts == ex.topk_group) & (best_dropped > worst_kept + tolerance)
    if np.any(wrong):
        row = int(np.argmax(wrong))
        raise PropertyFailure(f"{op}: token {row} keeps a group whose top-2 score sum is {worst_kept[row]:.6g} "
                              f"and drops one with {best_dropped[row]:.6g}")


# MoE dispatch: examples and laws

@st.composite
def dispatch_examples(draw, *, single=False):
    """An :class:`Example` of MoE sizes (``single``: E = k = 1) and where the weight applies."""
    experts = 1 if single else draw(st.integers(1, 6))
    return Example(
        N=draw(st.integers(1, 9)), M=draw(st.integers(1, 6)), I=draw(st.integers(1, 5)), E=experts,
        top_k=1 if single else draw(st.integers(1, experts)),
        weight_on=draw(st.sampled_from(("output", "input"))), seed=draw(st.integers(0, 2**32 - 1)),
    )


def _dispatch_inputs(ctx: Context, ex: Example):
    """``(rng, inputs of moe_dispatch)``: positive weights, k distinct experts per token."""
    rng = np.random.default_rng(ex.seed)
    return rng, {
        "x": ctx.cast(rng.standard_normal((ex.N, ex.M))),
        "routing_weights": ctx.cast(rng.uniform(0.1, 1.0, (ex.N, ex.top_k))),
        "indices": np.argsort(rng.random((ex.N, ex.E)), axis=-1)[:, :ex.top_k].astype(np.int64),
        "gate_up_proj": ctx.cast(rng.standard_normal((ex.E, 2 * ex.I, ex.M)) / np.sqrt(ex.M)),
        "down_proj": ctx.cast(rng.standard_normal((ex.E, ex.M, ex.I)) / np.sqrt(ex.I)),
    }


def moe_dispatch_expert_permutation(ctx: Context, ex: Example) -> None:
    """Relabelling the experts (stacks and indices together) and reordering the k slots changes nothing."""
    rng, inputs = _dispatch_inputs(ctx, ex)
    expected = ctx.call("moe_dispatch", **inputs, weight_on=ex.weight_on)
    # New expert j is old expert perm[j], so old expert e is now inverse[e].
    perm, slots = rng.permutation(ex.E), rng.permutation(ex.top_k)
    inverse = np.argsort(perm)
    permuted = {
        "x": inputs["x"], "routing_weights": np.ascontiguousarray(inputs["routing_weights"][:, slots]),
        "indices": np.ascontiguousarray(inverse[inputs["indices"]][:, slots]),
        "gate_up_proj": np.ascontiguousarray(inputs["gate_up_proj"][perm]),
        "down_proj": np.ascontiguousarray(inputs["down_proj"][perm]),
    }
    ctx.assert_close(ctx.call("moe_dispatch", **permuted, weight_on=ex.weight_on), expected,
                     f"experts relabelled by {perm.tolist()} and k slots reordered by {slots.tolist()}")


def moe_dispatch_single_expert(ctx: Context, ex: Example) -> None:
    """One expert, k = 1, weight 1 (a renormalised router's only choice) is that expert's dense MLP."""
    ctx.require("gated_mlp")
    _, inputs = _dispatch_inputs(ctx, ex)
    inputs["routing_weights"] = ctx.cast(np.ones((ex.N, 1)))
    moe = ctx.call("moe_dispatch", **inputs, weight_on=ex.weight_on)
    gate_up, down = inputs["gate_up_proj"][0], inputs["down_proj"][0]
    mlp = ctx.call("gated_mlp", x=inputs["x"], gate_proj=np.ascontiguousarray(gate_up[:ex.I]),
                   up_proj=np.ascontiguousarray(gate_up[ex.I:]), down_proj=np.ascontiguousarray(down),
                   hidden_act="silu")
    ctx.assert_close(moe, mlp, "one expert with weight 1 against gated_mlp of its gate, up and down halves")


# MLA: examples and law

@st.composite
def mla_examples(draw):
    """An :class:`Example` of DeepSeek-V3 attention sizes and options (widths 1..8, T <= 6)."""
    return Example(
        B=draw(st.integers(1, 2)), T=draw(st.integers(1, 6)), M=draw(st.sampled_from((4, 8, 12))),
        H=draw(st.integers(1, 3)), q_lora_rank=draw(st.sampled_from((None, 3, 6))),
        kv_lora_rank=draw(st.sampled_from((2, 4, 6))), qk_nope_head_dim=draw(st.sampled_from((1, 2, 4))),
        qk_rope_head_dim=draw(st.sampled_from((2, 4))), v_head_dim=draw(st.sampled_from((1, 3, 4))),
        rope_type=draw(st.sampled_from(("default", "yarn"))), rope_interleave=draw(st.booleans()),
        attention_bias=draw(st.booleans()), offset=draw(st.integers(0, MAX_POSITION)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _mla_weight_shapes(ex: Example) -> dict[str, tuple[int, ...]]:
    """``DeepseekV3Attention``'s state-dict names and shapes for ``ex``."""
    qk = ex.qk_nope_head_dim + ex.qk_rope_head_dim
    if ex.q_lora_rank is None:
        shapes = {"q_proj.weight": (ex.H * qk, ex.M)}
    else:
        shapes = {"q_a_proj.weight": (ex.q_lora_rank, ex.M), "q_a_layernorm.weight": (ex.q_lora_rank,),
                  "q_b_proj.weight": (ex.H * qk, ex.q_lora_rank)}
    shapes.update({
        "kv_a_proj_with_mqa.weight": (ex.kv_lora_rank + ex.qk_rope_head_dim, ex.M),
        "kv_a_layernorm.weight": (ex.kv_lora_rank,),
        "kv_b_proj.weight": (ex.H * (ex.qk_nope_head_dim + ex.v_head_dim), ex.kv_lora_rank),
        "o_proj.weight": (ex.M, ex.H * ex.v_head_dim),
    })
    if ex.attention_bias:
        if ex.q_lora_rank is not None:
            shapes["q_a_proj.bias"] = (ex.q_lora_rank,)
        shapes["kv_a_proj_with_mqa.bias"] = (ex.kv_lora_rank + ex.qk_rope_head_dim,)
        shapes["o_proj.bias"] = (ex.M,)
    return shapes


def _mla_inputs(ctx: Context, ex: Example) -> dict:
    """Keyword arguments of the ``mla`` op for ``ex``, without ``form``."""
    rng = np.random.default_rng(ex.seed)
    weights = {}
    for name, shape in _mla_weight_shapes(ex).items():
        noise = rng.standard_normal(shape)
        if name.endswith(".bias"):
            weights[name] = ctx.cast(0.2 * noise)
        elif len(shape) == 1:
            weights[name] = ctx.cast(1 + 0.2 * noise)
        else:
            weights[name] = ctx.cast(noise / np.sqrt(shape[1]))
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if ex.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    positions = ex.offset + rng.integers(0, 3, (ex.B, 1)) + np.arange(ex.T)[None, :]
    return {
        "hidden_states": ctx.cast(rng.standard_normal((ex.B, ex.T, ex.M))), "positions": positions.astype(np.int64),
        "num_attention_heads": ex.H, "q_lora_rank": ex.q_lora_rank, "kv_lora_rank": ex.kv_lora_rank,
        "qk_nope_head_dim": ex.qk_nope_head_dim, "qk_rope_head_dim": ex.qk_rope_head_dim,
        "v_head_dim": ex.v_head_dim, "rope_parameters": rope, "rope_interleave": ex.rope_interleave,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "attention_bias": ex.attention_bias, **weights,
    }


def mla_absorbed_equals_literal(ctx: Context, ex: Example) -> None:
    """The absorbed form (W_UK folded into the query, W_UV after attention) equals the literal expansion."""
    inputs = _mla_inputs(ctx, ex)
    literal = ctx.call("mla", form="literal", keep_none=("q_lora_rank",), **inputs)
    absorbed = ctx.call("mla", form="absorbed", keep_none=("q_lora_rank",), **inputs)
    ctx.assert_close(absorbed, literal, "absorbed MLA against literal MLA")


# The registry

def _property(name: str, op: str, description: str, strategy, body: Callable) -> Property:
    return Property(name, op, description, partial(_hypothesis_check, name, strategy, body))


_TINY_EPS = st.sampled_from((0.0, 1e-12, 1e-6))
_ANY_EPS = st.integers(-60, 0).map(lambda tenths: 10.0 ** (tenths / 10))

#: Every property, in report order.
PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        _property("attention_causal", "attention",
                  "keys, values and queries after position p do not change query rows at positions <= p",
                  extended(attention_examples(min_queries=2), p=lambda ex: st.integers(ex.S - ex.T, ex.S - 2)),
                  attention_causal),
        _property("attention_gqa_repeat", "attention",
                  "Hkv < H equals the call with k, v repeated to H heads (query head h reads h // G)",
                  attention_examples(), attention_gqa_repeat),
        _property("attention_window_ge_keys", "attention", "sliding_window >= S equals no window",
                  attention_examples(window=lambda s: st.integers(s, s + 3)), attention_window_ge_keys),
        _property("attention_chunk_ge_keys", "attention", "attention_chunk_size >= S equals no chunking",
                  attention_examples(chunk=lambda s: st.integers(s, s + 3)), attention_chunk_ge_keys),
        _property("attention_sink_negative", "attention", "sink logits -1e30 (and -inf if accepted) equal no sinks",
                  attention_examples(sinks=False), attention_sink_negative),
        _property("attention_window_locality", "attention",
                  "keys and values older than the window do not change the rows that cannot see them",
                  extended(attention_examples(window=lambda s: st.integers(1, max(1, s - 1))).filter(
                      lambda ex: ex.window < ex.S), cut=lambda ex: st.integers(1, ex.S - ex.window)),
                  attention_window_locality),
        _property("attention_scaling", "attention", "q times c with scaling / c equals q with scaling",
                  extended(attention_examples(), factor=lambda ex: st.sampled_from((0.25, 3.0))), attention_scaling),
        _property("attention_sink_takes_mass", "attention",
                  "values all 1: no sink gives 1; a sink above every score on head h lowers head h only",
                  extended(attention_examples(sinks=False), head=lambda ex: st.integers(0, ex.H - 1)),
                  attention_sink_takes_mass),
        _property("attention_softcap_bounds_ratios", "attention",
                  "with cap c, visible keys' probabilities are within a factor exp(2c), later keys' are 0",
                  extended(attention_examples(sinks=False, window=lambda s: st.none(), chunk=lambda s: st.none()),
                           softcap=lambda ex: st.sampled_from((5.0, 20.0)), Dv=lambda ex: st.just(ex.S)),
                  attention_softcap_bounds_ratios),
        _property("attention_batch_rows_independent", "attention",
                  "each batch row alone equals its row of the batched call",
                  attention_examples(min_batch=2), attention_batch_rows_independent),
        _property("rope_pair_norm", "rope", "every rotated pair of the layout keeps its norm",
                  rope_examples(rope_types=("default", "linear", "llama3")), rope_pair_norm),
        _property("rope_relative_position", "rope", "q.k after RoPE depends only on the position difference",
                  rope_examples(), rope_relative_position),
        _property("rope_partial_passthrough", "rope", "channels beyond the rotary width are unchanged",
                  rope_examples(partial=True), rope_partial_passthrough),
        _property("rope_partial_is_narrow", "rope", "the rotary channels equal RoPE of a head Dr wide",
                  rope_examples(partial=True), rope_partial_is_narrow),
        _property("rms_norm_scale_invariant", "rms_norm", "norm(c x) = norm(x) up to the effect of a tiny eps",
                  rms_norm_examples(eps=_TINY_EPS), rms_norm_scale_invariant),
        _property("rms_norm_eps_in_root", "rms_norm", "norm(c x; eps c^2) = norm(x; eps): eps inside the root",
                  rms_norm_examples(eps=_ANY_EPS), rms_norm_eps_in_root),
        _property("soft_cap_odd", "soft_cap", "softcap(-x) = -softcap(x)", soft_cap_examples(), soft_cap_odd),
        _property("soft_cap_bounded", "soft_cap", "|softcap(x)| <= cap", soft_cap_examples(), soft_cap_bounded),
        _property("soft_cap_identity_near_zero", "soft_cap", "softcap(x) ~ x for |x| << cap",
                  soft_cap_examples(), soft_cap_identity_near_zero),
        *(law for op in ROUTER_OPS for law in (
            _property(f"{op}_weights", op,
                      "weights sum to 1 (or routed_scaling_factor) where renormalised and are the chosen "
                      "probabilities", router_examples(op=op), partial(router_weights, op)),
            _property(f"{op}_top_k", op, "the chosen experts have the k best selection scores",
                      router_examples(op=op), partial(router_selects_top_k, op)),
            _property(f"{op}_permutation", op,
                      "permuting the experts (logit columns, bias entries) permutes the routing columns alike",
                      router_examples(op=op), partial(router_permutation, op)),
        )),
        _property("sigmoid_group_top_k_group_limit", "sigmoid_group_top_k",
                  "chosen experts lie in at most topk_group groups, those with the best top-2 sums",
                  router_examples(op="sigmoid_group_top_k"), group_limit),
        _property("moe_dispatch_expert_permutation", "moe_dispatch",
                  "relabelling experts (stacks and indices) and reordering the k slots changes nothing",
                  dispatch_examples(), moe_dispatch_expert_permutation),
        _property("moe_dispatch_single_expert", "moe_dispatch",
                  "one expert with k = 1 and weight 1 equals its dense MLP (gated_mlp)",
                  dispatch_examples(single=True), moe_dispatch_single_expert),
        _property("mla_absorbed_equals_literal", "mla", "absorbed MLA equals literal MLA",
                  mla_examples(), mla_absorbed_equals_literal),
    )
}


def select_properties(names=None) -> list[Property]:
    """The named properties in registry order (all when ``names`` is empty or None).

    Raises:
        ConformanceError: an unknown name (the known names are listed).
    """
    if not names:
        return list(PROPERTIES.values())
    unknown = [name for name in names if name not in PROPERTIES]
    if unknown:
        raise ConformanceError(f"unknown property '{unknown[0]}'; properties: {', '.join(PROPERTIES)}")
    return [p for p in PROPERTIES.values() if p.name in names]


def run_property(prop: Property, ops: dict, run: RunSettings) -> PropertyResult:
    """Check one property; a missing op is "not implemented" without running anything."""
    start = time.perf_counter()
    if prop.op not in ops:
        outcome = Outcome(Status.NOT_IMPLEMENTED, f"the backend has no op '{prop.op}'")
    else:
        outcome = prop.check(ops, run)
    return PropertyResult(prop.name, prop.op, outcome.status, outcome.message, outcome.example,
                          outcome.examples, outcome.rejected, time.perf_counter() - start)


def run_properties(ops: dict, *, dtype: str = "float64", profile: str = "ci", names=None) -> list[PropertyResult]:
    """Check the selected properties against a backend's ``ops`` mapping.

    Args:
        ops: op name -> callable with the ``refimpl.ops`` signature (a backend's ``ops``).
        dtype: ``"float64"`` or ``"float32"``: the dtype of the array inputs, and the tolerance.
        profile: ``"quick"``, ``"ci"`` or ``"thorough"`` (10, 25, 200 examples per property).
        names: property names to run, or None for all.

    Returns:
        One :class:`PropertyResult` per property, in registry order.

    Raises:
        ConformanceError: unknown dtype, profile or property name.
    """
    chosen = select_properties(names)
    run = run_settings(dtype, profile)
    ops = dict(ops)
    return [run_property(prop, ops, run) for prop in chosen]
