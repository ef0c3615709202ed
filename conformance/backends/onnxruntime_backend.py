"""ONNX Runtime's CPU kernels as an op-level backend (``--backend onnxruntime``).

Each op call builds (once per op, node attributes and dtype; the session is then
cached) a one-node ONNX graph with ``onnx.helper`` and runs it with
``onnxruntime.InferenceSession(providers=["CPUExecutionProvider"])`` and default
session options (graph optimisations on, as a user loading a model gets them).
Only ``attention``, ``rope`` and ``rms_norm``; every other op, and every model
case (that would need a whole-model ONNX export), is reported as not implemented.

=========  ===============================================================================
op         graph
=========  ===============================================================================
attention  by case family:

           * causal MHA / GQA / MQA, Dv != D, soft-cap, any scaling: ``Attention``
             (ai.onnx opset 23), 4-D ``(B, heads, S, D)`` inputs (head counts from the
             shapes), ``is_causal=1``, ``scale``, ``softcap``;
           * ``sliding_window`` or ``sinks`` (with or without soft-cap):
             ``GroupQueryAttention`` (com.microsoft), ``local_window_size = W``,
             ``head_sink``, ``softcap``; ai.onnx ``Attention`` has neither. ORT 1.32
             takes it only with D a multiple of 8 and Dv = D: other shapes are not
             implemented (the uniform-attention window probes, D = 4);
           * ``attention_chunk_size``: ai.onnx ``Attention`` with a boolean
             ``attn_mask`` holding the chunk rule (no ONNX op has chunked attention;
             ``is_causal`` still supplies the causal rule). Chunks together with a
             window or sinks: not implemented.

           The T queries are the last T of the S keys. ONNX's causal mask lets query
           i see key j iff ``j <= i + past_sequence_length``, the past being the
           ``past_key`` input, so the first S - T keys go in as ``past_key`` /
           ``past_value`` (BNSH), and only the last T as ``K`` / ``V``. Given all S
           keys as ``K`` with no past, ORT 1.32 aligns the causal mask top-left
           (query i sees keys 0..i). ``GroupQueryAttention`` gets the same split plus
           ``seqlens_k = S - 1``, ``total_sequence_length = S`` and, for several
           batch rows of more than one query after a cache (which ORT refuses
           otherwise), ``query_seqlens = T``.
rope       ``RotaryEmbedding`` (ai.onnx opset 23): ``x`` as ``(B, T, H*D)`` with
           ``num_heads``, ``position_ids``, ``interleaved`` (layout ``"interleaved"``),
           ``rotary_embedding_dim = Dr`` when partial. The op takes its cos / sin
           caches as inputs by design, so computing them is the adapter's part of
           the contract: rows 0..max(positions) of ``cos(p * inv_freq)`` and
           ``sin(...)`` in float64, times the YaRN magnitude, rounded once to the
           run dtype, with ``inv_freq`` from :func:`refimpl.rope.rope_frequencies`.
           What this tests of ORT is the cache gather by position and the rotation,
           not the frequencies (``rope_frequencies`` is not implemented).
rms_norm   ``RMSNormalization`` (ai.onnx opset 23), ``axis=-1``, ``stash_type=1``
           (float32 statistics), ``epsilon``. ``weight_offset`` 1 (Gemma's 1 + w)
           adds an ``Add(weight, 1)`` node in the run dtype feeding ``scale``. The op
           has no cast-order attribute: ``cast_order`` reaches no graph. ONNX
           defines the node as ``Cast(normalised, X's type) * scale``, which is
           ``"cast_then_multiply"``; see the note below on what ORT computes.
=========  ===============================================================================

Option ``-o prefer=contrib`` sends every attention case ``GroupQueryAttention`` can
take (D a multiple of 8, Dv = D, no chunking) to it, and ``rope`` to
com.microsoft ``RotaryEmbedding``; the default ``prefer=onnx`` uses the ai.onnx
ops wherever they express the case. ``-o threads=N`` sets
``intra_op_num_threads`` (default 0: ORT's own choice).

Dtypes: what ORT 1.32's CPU provider has a kernel for. ``Attention`` runs in
float64, float32 and float16; ``GroupQueryAttention`` and ``RotaryEmbedding`` in
float32 and float16 (their schemas have no float64); ``RMSNormalization`` in
float64, float32 and float16. None has a bfloat16 CPU kernel. A dtype without a
kernel is reported as not implemented with ORT's own message (``supports`` probes
each op once per dtype on tiny inputs, so ``matrix`` shows it too); inputs are
never upcast to run a different dtype than the one asked for.

ONNX float attributes are float32. In a float64 run a ``scale``, ``softcap`` or
``epsilon`` that float32 cannot hold exactly (``8 ** -0.5``, ``1e-6``) cannot be
given to the graph, and the case is not implemented; exact ones (0.25, 5.0) run.

Measured with ORT 1.32.0 (and so written here, not assumed):

* ``local_window_size = W`` lets a query see W keys including its own (the
  reference's ``sliding_window``; uniform-attention probe with D = 8). The CPU
  source at microsoft/onnxruntime commit 008eeb96 (``contrib_ops/cpu/bert/
  gqa_attention_base.h``) softmaxes over ``local_window_size + 1`` keys, so the
  convention has moved between revisions; the window cases catch either.
* ``head_sink`` adds ``exp(s_h - m)`` to the softmax denominator: gpt-oss sinks.
* ``RMSNormalization`` in float16 multiplies the float32 normalised value by the
  scale and rounds once (``"multiply_then_cast"``), with or without graph
  optimisations, not as the ONNX function body defines it (``NormalizedT =
  Cast(Normalized)``, then ``Mul(NormalizedT, scale)`` in float16): the float16
  ``cast-then-multiply`` case differs from the reference's rounding on 27 % of
  its elements. ORT's kernel (``core/providers/cpu/nn/rms_norm.cc``, the
  LayerNorm kernel) also takes the scale only in X's type, so Gemma's float32
  ``1 + w`` beside a float16 input cannot be expressed: the ``Add`` rounds
  ``1 + w`` to float16, and the float16 ``multiply-then-cast`` case (1 + w)
  differs from the reference's rounding on 25 % of its elements.

Checked against: ONNX operator specs (onnx 1.23 ``Attention``, ``RotaryEmbedding``,
``RMSNormalization``, opset 23) and ORT's contrib operator schema
(``GroupQueryAttention``, ``RotaryEmbedding``, com.microsoft opset 1) as shipped
in onnxruntime 1.32.0.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import BackendError
from ..manifest import Case
from .base import DTYPES

#: ONNX element type of each run dtype.
_ELEMENT_TYPES = {"float64": 11, "float32": 1, "float16": 10, "bfloat16": 16}
_INT32, _INT64, _BOOL = 6, 7, 9
#: Opsets of every graph: ai.onnx 23 (Attention, RotaryEmbedding, RMSNormalization) and ORT's contrib ops.
_OPSETS = (("", 23), ("com.microsoft", 1))
#: The ONNX IR version that goes with opset 23.
_IR_VERSION = 11
_PREFERENCES = ("onnx", "contrib")


def _dtype_name(array: np.ndarray) -> str:
    name = np.asarray(array).dtype.name
    if name not in _ELEMENT_TYPES:
        raise NotImplementedError(f"onnxruntime backend: no ONNX graph for dtype {name}")
    return name


def _ort_message(exc: Exception) -> str:
    """ORT's error message without its ``[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED :`` prefix."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc)).strip()


def float_attribute(name: str, value: float, dtype: str) -> float:
    """``value`` as an ONNX float attribute (float32).

    Raises:
        NotImplementedError: a float64 run and ``value`` not exactly a float32 number
            (the graph would compute with a rounded parameter).
    """
    rounded = float(np.float32(value))
    if dtype == "float64" and rounded != float(value):
        raise NotImplementedError(f"ONNX float attributes are float32: {name} {value!r} would become "
                                  f"{rounded!r} in a float64 graph")
    return rounded


def chunk_mask(queries: int, keys: int, chunk: int) -> np.ndarray:
    """Bool ``(T, S)``: key j in the chunk of query i's absolute position ``S - T + i``."""
    q_pos = np.arange(keys - queries, keys)[:, None]
    return np.arange(keys)[None, :] // chunk == q_pos // chunk


def rope_caches(rope_parameters: dict, head_dim: int, partial_rotary_factor: float,
                max_position_embeddings: int | None, rows: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` caches ``(rows, Dr/2)``: float64 angles ``p * inv_freq`` for p < rows, times the
    YaRN magnitude, rounded once to ``dtype``; ``inv_freq`` from :func:`refimpl.rope.rope_frequencies`."""
    from refimpl.rope import rope_frequencies

    inv_freq, magnitude = rope_frequencies(rope_parameters, head_dim, partial_rotary_factor=partial_rotary_factor,
                                           max_position_embeddings=max_position_embeddings)
    angles = np.arange(rows, dtype=np.float64)[:, None] * inv_freq[None, :]
    target = _numpy_dtype(dtype)
    return (np.cos(angles) * magnitude).astype(target), (np.sin(angles) * magnitude).astype(target)


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


class OnnxRuntimeBackend:
    """ONNX Runtime CPU kernels through one-node ONNX graphs; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, prefer: str = "onnx", threads: str | int = 0):
        try:
            import onnx
            import onnx.numpy_helper
            import onnxruntime
            from onnx import helper
        except ImportError as exc:
            raise BackendError(f"the onnxruntime backend needs onnx and onnxruntime ({exc}); "
                               "pip install 'llm-refimpl[onnx]'") from None
        if prefer not in _PREFERENCES:
            raise BackendError(f"option prefer must be one of {', '.join(_PREFERENCES)}, got '{prefer}'")
        try:
            threads = int(threads)
        except ValueError:
            raise BackendError(f"option threads must be an integer >= 0, got '{threads}'") from None
        if threads < 0:
            raise BackendError(f"option threads must be an integer >= 0, got {threads}")
        self.onnx, self.ort, self.helper = onnx, onnxruntime, helper
        self.prefer = prefer
        self.options = onnxruntime.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.log_severity_level = 3  # ORT logs refused kernels as errors; the runner reports them
        # Session, or the reason ORT refused the graph.
        self._sessions: dict[tuple, object] = {}
        self._refusals: dict[tuple[str, str], str | None] = {}
        self.ops = {"attention": self.attention, "rope": self.rope, "rms_norm": self.rms_norm}

    def supports(self, case: Case, dtype: str) -> bool | str:
        if case.level == "model":
            return ("the onnxruntime backend runs single ops through small ONNX graphs; whole models would "
                    "need an ONNX export of the checkpoint, which it does not build")
        if dtype not in DTYPES:
            return f"unknown dtype {dtype}"
        return self._dtype_refusal(case.op, dtype) or True

    def _dtype_refusal(self, op: str, dtype: str) -> str | None:
        """Why no graph of ``op`` runs in ``dtype`` (ORT's message), or None; probed once per op and dtype
        by calling the op on tiny inputs whose float parameters float32 holds exactly."""
        if op not in self.ops:
            return None
        if (op, dtype) not in self._refusals:
            self._refusals[op, dtype] = self._probe(op, dtype)
        return self._refusals[op, dtype]

    def _probe(self, op: str, dtype: str) -> str | None:
        """Run ``op`` on zeros (attention also with a sink, its GroupQueryAttention graph): None if one ran."""
        zeros = np.zeros((1, 1, 1, 8), dtype=_numpy_dtype(dtype))
        calls = {
            "attention": [lambda: self.attention(zeros, zeros, zeros, scaling=0.25),
                          lambda: self.attention(zeros, zeros, zeros, scaling=0.25, sinks=zeros[0, 0, 0, :1])],
            "rope": [lambda: self.rope(zeros, np.zeros((1, 1), dtype=np.int64),
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})],
            "rms_norm": [lambda: self.rms_norm(zeros, zeros[0, 0, 0], eps=0.0)],
        }[op]
        reasons = []
        for call in calls:
            try:
                call()
                return None
            except NotImplementedError as exc:
                reasons.append(str(exc))
        return "; ".join(reasons)

    def package_versions(self) -> dict[str, str]:
        return {"onnxruntime": self.ort.__version__, "onnx": self.onnx.__version__}

    # Graphs and sessions

    def _session(self, key: tuple, dtype: str, node, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]],
                 extra_nodes=()):
        """The session of the graph ``extra_nodes + [node]`` with the named inputs and outputs, cached
        under ``key`` (the node's static attributes and input names) and ``dtype``.

        Raises:
            NotImplementedError: ORT has no CPU kernel for the node in this dtype, or
                the op's schema has no such type (ORT's message is kept).
        """
        key = (*key, dtype)
        if key not in self._sessions:
            helper = self.helper
            graph = helper.make_graph(
                [*extra_nodes, node], f"{node.op_type}_graph",
                [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in _OPSETS],
                                      ir_version=_IR_VERSION)
            self._sessions[key] = self._create(model, node, dtype)
        session = self._sessions[key]
        if isinstance(session, str):
            raise NotImplementedError(session)
        return session

    def _create(self, model, node, dtype: str):
        """An ``InferenceSession``, or the reason (a string) why ORT cannot run ``node``."""
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        what = f"{node.domain or 'ai.onnx'} {node.op_type} in {dtype}"
        try:
            return self.ort.InferenceSession(model.SerializeToString(), self.options,
                                             providers=["CPUExecutionProvider"])
        except state.NotImplemented as exc:
            return f"onnxruntime {self.ort.__version__} CPU cannot run {what} ({_ort_message(exc)})"
        except state.InvalidGraph as exc:
            if "Type Error" not in str(exc):
                raise
            return f"onnxruntime {self.ort.__version__}: {what} takes no such input type ({_ort_message(exc)})"

    def _run(self, session, output: str, feeds: dict) -> np.ndarray:
        """``session``'s output ``output`` for ``feeds``; ORT's run-time NOT_IMPLEMENTED as ``NotImplementedError``."""
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        try:
            return session.run([output], feeds)[0]
        except state.NotImplemented as exc:
            raise NotImplementedError(f"onnxruntime {self.ort.__version__} CPU: {_ort_message(exc)}") from None

    # attention

    def attention(self, q, k, v, *, scaling, sliding_window=None, attention_chunk_size=None, sinks=None,
                  attn_logit_softcapping=None):
        """Op ``attention`` (shapes as :func:`refimpl.attention.attention`) on the graph its case family needs."""
        dtype = _dtype_name(q)
        if attention_chunk_size is not None and (sliding_window is not None or sinks is not None):
            raise NotImplementedError("chunked attention goes through ai.onnx Attention with a chunk mask, "
                                      "which has no sliding window or sinks")
        refusal = self._gqa_refusal(q, v)
        needs_contrib = sliding_window is not None or sinks is not None
        if needs_contrib and refusal:
            raise NotImplementedError(f"sliding window and sinks need com.microsoft GroupQueryAttention, "
                                      f"which {refusal}")
        scale = float_attribute("scaling", scaling, dtype)
        softcap = 0.0 if attn_logit_softcapping is None else float_attribute(
            "attn_logit_softcapping", attn_logit_softcapping, dtype)
        if needs_contrib or (self.prefer == "contrib" and not refusal and attention_chunk_size is None):
            return self._group_query_attention(q, k, v, dtype, scale, softcap, sliding_window, sinks)
        return self._onnx_attention(q, k, v, dtype, scale, softcap, attention_chunk_size)

    @staticmethod
    def _gqa_refusal(q, v) -> str | None:
        """Why ORT 1.32's GroupQueryAttention cannot take these head sizes (its run-time checks), or None."""
        d, dv = q.shape[-1], v.shape[-1]
        if dv != d:
            return f"needs Dv = D (got D={d}, Dv={dv})"
        if d % 8:
            return f"needs a head size that is a multiple of 8 (got D={d})"
        return None

    def _past_length(self, queries: int, keys: int) -> int:
        """How many of the S keys ai.onnx Attention gets as ``past_key``: all but the T newest, which
        aligns its causal mask bottom-right (GroupQueryAttention needs the same split: its new keys
        are as many as its queries)."""
        return keys - queries

    def _onnx_attention(self, q, k, v, dtype, scale, softcap, chunk):
        """ai.onnx Attention over (B, heads, S, D) inputs; the first S - T keys as past_key / past_value."""
        et = _ELEMENT_TYPES[dtype]
        t, s = q.shape[1], k.shape[1]
        past = self._past_length(t, s)
        q4, k4, v4 = (np.ascontiguousarray(np.swapaxes(a, 1, 2)) for a in (q, k, v))
        names = ["Q", "K", "V", "attn_mask" if chunk else "", "past_key" if past else "", "past_value" if past else ""]
        while not names[-1]:
            names.pop()
        feeds = {"Q": q4, "K": k4[:, :, past:], "V": v4[:, :, past:]}
        if chunk:
            feeds["attn_mask"] = chunk_mask(t, s, chunk)
        if past:
            feeds.update(past_key=k4[:, :, :past], past_value=v4[:, :, :past])
        attributes = {"is_causal": 1, "scale": scale, "softcap": softcap}
        node = self.helper.make_node("Attention", names, ["Y"] + (["present_key", "present_value"] if past else []),
                                     **attributes)
        types = {n: (_BOOL if n == "attn_mask" else et) for n in feeds}
        session = self._session(("Attention", tuple(names), tuple(sorted(attributes.items()))), dtype, node,
                                [(n, types[n]) for n in names if n], [(o, et) for o in node.output])
        y = self._run(session, "Y", feeds)  # (B, H, T, Dv)
        return np.swapaxes(y, 1, 2)

    def _gqa_attributes(self, heads: int, kv_heads: int, scale: float, softcap: float, window) -> dict:
        attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": scale, "softcap": softcap}
        if window is not None:
            attributes["local_window_size"] = int(window)
        return attributes

    def _group_query_attention(self, q, k, v, dtype, scale, softcap, window, sinks):
        """com.microsoft GroupQueryAttention: q, k, v as (B, S, heads*D), the past as BNSH."""
        et = _ELEMENT_TYPES[dtype]
        b, t, h, d = q.shape
        s, hkv = k.shape[1], k.shape[2]
        past = s - t
        feeds = {
            "query": q.reshape(b, t, h * d), "key": k[:, past:].reshape(b, t, hkv * d),
            "value": v[:, past:].reshape(b, t, hkv * d),
            "past_key": np.ascontiguousarray(np.swapaxes(k[:, :past], 1, 2)),
            "past_value": np.ascontiguousarray(np.swapaxes(v[:, :past], 1, 2)),
            "seqlens_k": np.full(b, s - 1, dtype=np.int32), "total_sequence_length": np.array(s, dtype=np.int32),
        }
        names = list(feeds) + [""] * 9
        if sinks is not None:
            names[11] = "head_sink"
            feeds["head_sink"] = np.asarray(sinks)
        if b > 1 and t > 1 and past:
            # ORT refuses a batch of multi-token chunks after a cache unless told each chunk's length.
            names.append("query_seqlens")
            feeds["query_seqlens"] = np.full(b, t, dtype=np.int32)
        while not names[-1]:
            names.pop()
        attributes = self._gqa_attributes(h, hkv, scale, softcap, window)
        node = self.helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                                     domain="com.microsoft", **attributes)
        types = {n: (_INT32 if n in ("seqlens_k", "total_sequence_length", "query_seqlens") else et) for n in feeds}
        session = self._session(("GroupQueryAttention", tuple(names), tuple(sorted(attributes.items()))), dtype,
                                node, [(n, types[n]) for n in names if n], [(o, et) for o in node.output])
        return self._run(session, "output", feeds).reshape(b, t, h, d)

    # rope

    def _rope_attributes(self, layout: str, heads: int, rotary_dim: int, head_dim: int) -> dict:
        attributes = {"interleaved": int(layout == "interleaved"), "num_heads": heads}
        # The contrib op takes num_heads only together with rotary_embedding_dim.
        if rotary_dim != head_dim or self.prefer == "contrib":
            attributes["rotary_embedding_dim"] = rotary_dim
        return attributes

    def rope(self, x, positions, *, rope_parameters, partial_rotary_factor=1.0, max_position_embeddings=None,
             layout="rotate_half"):
        """Op ``rope``: ai.onnx (or contrib) RotaryEmbedding with caches up to the largest position."""
        dtype = _dtype_name(x)
        if layout not in ("rotate_half", "interleaved"):
            raise NotImplementedError(f"RotaryEmbedding has no layout {layout!r}")
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise NotImplementedError("RotaryEmbedding gathers cache rows by position; negative positions have none")
        b, t, h, d = x.shape
        cos, sin = rope_caches(rope_parameters, d, partial_rotary_factor, max_position_embeddings,
                               int(positions.max(initial=0)) + 1, dtype)
        attributes = self._rope_attributes(layout, h, 2 * cos.shape[1], d)
        et = _ELEMENT_TYPES[dtype]
        if self.prefer == "contrib":
            names, domain = ["X", "position_ids", "cos_cache", "sin_cache"], "com.microsoft"
        else:
            names, domain = ["X", "cos_cache", "sin_cache", "position_ids"], ""
        node = self.helper.make_node("RotaryEmbedding", names, ["Y"], domain=domain, **attributes)
        session = self._session(("RotaryEmbedding", domain, tuple(sorted(attributes.items()))), dtype, node,
                                [(n, _INT64 if n == "position_ids" else et) for n in names], [("Y", et)])
        feeds = {"X": x.reshape(b, t, h * d), "cos_cache": cos, "sin_cache": sin, "position_ids": positions}
        return self._run(session, "Y", feeds).reshape(b, t, h, d)

    # rms_norm

    def _rms_attributes(self, eps: float, dtype: str) -> dict:
        return {"axis": -1, "epsilon": float_attribute("eps", eps, dtype), "stash_type": 1}

    def rms_norm(self, x, weight, *, eps, weight_offset=0.0, cast_order="cast_then_multiply"):
        """Op ``rms_norm``: RMSNormalization over the last axis; ``cast_order`` has no ONNX counterpart."""
        dtype = _dtype_name(x)
        et = _ELEMENT_TYPES[dtype]
        attributes = self._rms_attributes(eps, dtype)
        extra = []
        scale = "weight"
        if weight_offset:
            # Gemma's 1 + w, added in the run dtype by ORT.
            one = self.onnx.numpy_helper.from_array(np.asarray(weight_offset, dtype=_numpy_dtype(dtype)), "offset")
            extra = [self.helper.make_node("Constant", [], ["offset"], value=one),
                     self.helper.make_node("Add", ["weight", "offset"], ["scale"])]
            scale = "scale"
        node = self.helper.make_node("RMSNormalization", ["X", scale], ["Y"], **attributes)
        session = self._session(("RMSNormalization", float(weight_offset), tuple(sorted(attributes.items()))), dtype,
                                node, [("X", et), ("weight", et)], [("Y", et)], extra_nodes=extra)
        return self._run(session, "Y", {"X": np.asarray(x), "weight": np.asarray(weight)})
