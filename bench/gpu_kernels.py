"""GPU speed of the Numba CUDA kernels (refimpl/kernels) at real shapes, against measured ceilings and torch.

One prepared script for a machine with an NVIDIA GPU (issue 7). For each row it builds the
kernel (numba's JIT), checks its output against the NumPy reference in float64 on fresh random
inputs, and times it with CUDA events, next to a torch equivalent in the same run and against
the device's measured copy bandwidth and float32 peak. It prints one short Markdown table and
writes every number to a JSON file. Without a GPU it prints one line saying so and exits 0.

    python bench/gpu_kernels.py                          # every row (estimated 2-4 min on an H200)
    python bench/gpu_kernels.py --quick                  # the issue's six rows, fewer repetitions
    python bench/gpu_kernels.py --out /tmp/gpu.json      # the full numbers elsewhere
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu_kernels.py --tiny   # the wiring, on a CPU, in 30-45 s

Rows (``--quick`` runs the first six; ``--tiny`` runs every row at tiny sizes):

================  ===================================================  =========  ===================================
row               what runs (float32)                                  bound      torch peer (float32, TF32 off)
================  ===================================================  =========  ===================================
decode-4k         ``attention.launch_decode``: B=1, T=1, H=32, Hkv=8,  bandwidth  SDPA, the G = 4 query heads of a
                  D=128, S=4096 (Qwen3-style GQA, causal)                         key/value head packed as 4 query
                                                                                  rows of it (K, V read once)
decode-32k        the same at S=32768                                  bandwidth  as decode-4k
prefill-4k        ``attention.launch_prefill``: B=1, T=S=4096, H=32,   fp32       SDPA, ``is_causal``, ``enable_gqa``
                  Hkv=8, D=128, causal
moe-n1            ``moe.launch_moe``: Qwen3-30B-A3B experts, M=2048,   bandwidth  naive torch MoE: per expert hit,
                  I=768, E=128, top-8, SwiGLU; N=1 token                          gather, 2 products, ``index_add_``
moe-n64           the same, N=64 tokens                                bandwidth  as moe-n1
gdn-decode        ``delta_rule.launch_recurrent``: Qwen3-Next-80B      bandwidth  transformers'
                  linear attention, Hk=16, Hv=32, d_k=d_v=128, B=1,               ``torch_recurrent_gated_delta_rule``
                  T=1, from a non-zero state
decode-4k-b8      decode at B=8, S=4096                                bandwidth  as decode-4k
gdn-decode-b8     GDN decode at B=8                                    bandwidth  as gdn-decode
gdn-chunked-4k    ``delta_rule.launch_chunked``: B=1, T=4096, C=64     fp32       ``torch_chunk_gated_delta_rule``
mla-decode-32k    ``mla.launch_mla_decode``: DeepSeek-V3 absorbed      fp32       SDPA over the one latent head, the
                  decode, H=128, Dc=512, Dr=64, B=1, T=1, S=32768                 128 query heads as 128 rows
================  ===================================================  =========  ===================================

Accounting (bytes read + written by the algorithm, FLOP counted as 2 per multiply-add):

* decode attention: bytes = the K and V cache read, ``B S Hkv (D + Dv) 4``, plus q, out and the
  positions; FLOP = ``2 B H T S (D + Dv)``.
* prefill attention: FLOP = ``2 B H (D + Dv) V`` with ``V = T (T + 1) / 2`` visible (query, key)
  pairs (causal, T = S: about half of the full ``T S``); bytes = q, k, v, out once.
* MoE: bytes = the weights of the distinct experts the router chose, ``3 M I 4`` each, plus
  x, out, routing weights and indices; FLOP = ``6 N k M I``.
* GDN decode: bytes = the state read and written, ``2 B Hv d_k d_v 4``, plus q, k, v, g,
  beta, out; FLOP = ``7 B T Hv d_k d_v`` (decay, S^T k, write, S^T q).
* GDN chunked: bytes = inputs, out and the state once; FLOP per token and value head =
  ``2 C (2 d_k + d_v) + 6 d_k d_v + C d_v`` (K K^T, Q K^T, P Vn; K S, Q S, state update; the
  triangular solve), the algorithm of ``refimpl.linear_attention.delta_rule._chunk``.
* MLA decode: bytes = the latent cache ``B S (Dc + Dr) 4`` plus queries, mask, out; FLOP =
  ``2 B H T S (2 Dc + Dr)``. At 128 heads over one shared latent head it does about 120 FLOP
  per byte: float32-bound, like the prefill and the chunked GDN.

The bound column names the ceiling a row is measured against: ``bandwidth`` rows report GB/s
as a fraction of the measured copy bandwidth, ``fp32`` rows TFLOP/s as a fraction of the
measured float32 peak. Targets (issue 7): decode attention and MoE decode at 60 % or more of
the copy bandwidth, prefill attention at 25 TFLOP/s or more, GDN decode at 50 % or more of the
bandwidth. The other rows have no target.

Check: before timing, each row's kernel runs on fresh random inputs and its output (every
output: GDN's final state too) is compared with the reference function in float64 on the same
float32 values, by :func:`conformance.compare.compare`, against the bounds of :data:`TOLERANCES`.
Outputs are poisoned with NaN first, so an element the kernel never writes fails. Every row
is checked at the timed size, on the output of the first launch on the very device arrays
that are then timed; where the float64 reference would be too slow there, on a part of it:

* decode, MoE, GDN decode, MLA: all of it (only the experts the router chose are widened to
  float64: 1-3 s each on a 2-core machine);
* prefill: the reference at T = S = 4096 with 32 heads would hold 4 GiB of float64 scores, so
  64 query rows (the first 16, the last 16, 32 drawn between; 4 s), plus a full check of a
  second launch at T = S = 1031 (not a multiple of any tile);
* chunked GDN: the value heads of key heads 0 and 15 (8 of 32 value heads, whole groups; the
  reference's cost is mostly its Python loop over 64 chunks: 8 s), plus a second launch at
  T = 1000 (a partial last chunk), checked the same way.

A row outside its bounds is "WRONG"; the run goes on with the others. The torch peer's output
is checked the same way (JSON only: a wrong peer makes its ratio meaningless).

Timing: device arrays are made once (``cuda.to_device``); nothing crosses to the host in the
timed region. Each timed launch is preceded by a 2 GiB device-to-device copy (about 1 ms on
an H200), so every launch starts with a cold L2 (the 4k decode's 34 MB cache would otherwise
be served from the 50 MB L2) and the start event waits behind it while Python issues the
launch (numba's launch overhead, up to six kernels and their scratch allocations for the MoE,
would otherwise be timed as idle GPU time). Times are CUDA events around the launch (numba
``cuda.event``; ``torch.cuda.Event`` for torch), median of up to ``--reps`` repetitions after
2 warm-up calls; the scratch the launch allocates is freed only after the loop
(``cuda.defer_cleanup``). The host time to issue one launch is recorded beside
(``host_issue_s``), and a row whose issue time exceeds the flush's device time gets a printed
note (its time then includes idle GPU). torch runs with TF32 off (``allow_tf32 = False``):
float32 against float32.

Ceilings, measured in the same run: copy bandwidth = bytes read + written by a 1 GiB
device-to-device copy (numba ``copy_to_device``, and torch ``copy_`` when torch has CUDA; the
higher is the ceiling); float32 peak = a numba kernel of independent FMA chains (2 FLOP per
FMA; 8 chains per thread, 1024 iterations, 8192 blocks of 256 threads), and torch.matmul of
two 8192 x 8192 float32 matrices with TF32 off; the higher is the ceiling.

Time bound (under 5 minutes on an H200, JIT compilation included): each row compiles its
kernels once (the check's launch compiles; every later launch, the extra checks' included,
has the same types and reuses the compiled code): the twelve kernels the rows use took 40 s
of NVVM time in all on a busy 2-core machine (``python -m refimpl.kernels.ptx_check``: the
prefill and decode attention kernels 12-14 s each, every other one under 5 s). Each row times
at most ``--reps`` launches and at most :data:`ROW_TIMING_BUDGET_S` seconds of them; the MoE
rows share one draw of the 2.4 GB of expert weights. The float64 checks took 1-8 s per row
on that machine, the input draws 10 s for the MoE weights and under 3 s otherwise. A global
deadline skips every row that would start after :data:`DEADLINE_S` (4.5 min) with status
"skipped: time", and the torch peers and extra checks after :data:`PEER_DEADLINE_S`.

``--tiny`` runs every row at tiny sizes: under ``NUMBA_ENABLE_CUDASIM=1`` on a CPU in 30-45
seconds, to prove the wiring (build, check, time, table); times are then the host's wall
clock of the simulation, ceilings and ratios "n/a (simulator)", and the torch peers run on
the CPU (checked, not compared). Without ``--tiny`` the simulator is refused (exit 2).

Exit status: 0 when every row ran and checked "ok" (rows skipped for time included), or
when there is no GPU; 1 when a row is WRONG, failed, or its kernel module or launcher is
missing; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conformance.compare import compare  # noqa: E402  (after the path is set)
from conformance.tolerances import Tolerance, violations  # noqa: E402
from refimpl.errors import RefimplError  # noqa: E402

try:
    from refimpl.kernels import _numba
except RefimplError as exc:  # numba / numba-cuda not installed: main() says so and exits 0
    _numba, _NUMBA_MISSING = None, str(exc)
else:
    _NUMBA_MISSING = None
#: numba.cuda (or its simulator) and float32 as module globals, as in a kernel module: the
#: simulator swaps the global ``cuda`` inside a simulated kernel (a closure would not be swapped).
cuda = _numba.cuda if _numba is not None else None
float32 = _numba.float32 if _numba is not None else None

NO_GPU = "no CUDA GPU present: nothing measured"
DEFAULT_OUT = ROOT / "bench" / "gpu_kernels.json"
#: Rows that would start later than this (seconds since start) are skipped: "skipped: time".
DEADLINE_S = 270.0
#: After this, a running row skips its torch peer and its extra checks.
PEER_DEADLINE_S = 285.0
#: Most seconds of timed launches per kernel (the repetition count shrinks to fit).
ROW_TIMING_BUDGET_S = 2.0
#: Untimed calls before the timed ones, and timed repetitions (median reported), per mode. In
#: --tiny the check's launch is the only warm-up: the simulator takes about a second per launch.
WARMUP = {"full": 2, "quick": 2, "tiny": 0}
REPS = {"full": 20, "quick": 7, "tiny": 1}
#: Bytes of the copy that evicts L2 before each timed launch, and of the copy-bandwidth measurement.
FLUSH_BYTES = 2 << 30
COPY_BYTES = 1 << 30
#: FMA peak kernel: iterations of its 8 chains, grid and block (real GPU; --tiny uses 4, 1, 32).
FMA_ITERS, FMA_BLOCKS, FMA_THREADS = 1024, 8192, 256
MATMUL_N = 8192

#: Bounds on (rel RMS, max abs as a fraction of max |expected|) of a float32 kernel against the
#: float64 reference. The NumPy reference itself in float32 at these shapes measures at most
#: 1.1e-6 / 2.6e-6 (decode at S = 32768), 3e-7 / 4.4e-7 (prefill), 6.4e-7 / 6.2e-7 (MoE N = 64)
#: and 3e-7 / 5.7e-7 (GDN, chunked and recurrent, T = 1024). The bounds leave 10-40x for other
#: summation orders (a kernel's sequential per-thread sums over S / splits keys instead of
#: NumPy's pairwise ones), while dropping the first or the last of S = 32768 keys moves the
#: decode output by 4.5e-3 .. 6e-3 relative RMS (measured), 200x the attention bound.
TOLERANCES = {
    "attention": Tolerance(rel_rms=2e-5, max_abs_rel=1e-4, argmax_margin=0.0),
    "moe": Tolerance(rel_rms=1e-5, max_abs_rel=5e-5, argmax_margin=0.0),
    "delta_rule": Tolerance(rel_rms=1e-5, max_abs_rel=5e-5, argmax_margin=0.0),
}
#: Targets of issue 7: (bound, threshold); a fraction of the copy bandwidth or TFLOP/s.
TARGETS = {
    "decode": ("bandwidth", 0.60),
    "moe": ("bandwidth", 0.60),
    "prefill": ("tflops", 25.0),
    "gdn-decode": ("bandwidth", 0.50),
}


def _elapsed() -> float:
    return time.perf_counter() - _START


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        a *= np.float32(scale)
    return a


# --- the benchmarked computations: inputs, launch, reference, torch peer, accounting ----------------------------


class Bench:
    """One row's computation. Subclasses set ``module``/``launcher`` (under refimpl.kernels),
    ``family`` (tolerance and target key), ``bound`` ("bandwidth" or "fp32")."""

    module = ""
    launcher = ""
    family = ""
    bound = "bandwidth"
    target = ""

    def sizes(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Fresh host inputs, float32 / int32, C-contiguous."""
        raise NotImplementedError

    def buffers(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output (and in/out state) buffers: outputs poisoned with NaN."""
        raise NotImplementedError

    def launch(self, module, arrays: dict) -> None:
        raise NotImplementedError

    def expected(self, host: dict) -> dict[str, np.ndarray]:
        """The reference function in float64 on the same float32 inputs, keyed by buffer name."""
        raise NotImplementedError

    def actual(self, got: dict) -> dict[str, np.ndarray]:
        """The part of the outputs :meth:`expected` covers (all of it, or sampled rows)."""
        return got

    def torch_peer(self, torch, t: dict):
        """``(fn, outputs(result) -> {buffer name: tensor})`` on torch tensors ``t``; None if there is none."""
        return None

    def nbytes(self, host: dict) -> int:
        raise NotImplementedError

    def flops(self, host: dict) -> float:
        raise NotImplementedError


class _Attention(Bench):
    module = "attention"
    family = "attention"

    def __init__(self, *, batch, queries, keys, heads, kv_heads, head_dim):
        self.batch, self.queries, self.keys = batch, queries, keys
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def inputs(self, rng):
        b, t, s, d = self.batch, self.queries, self.keys, self.head_dim
        return {
            "q": _normal(rng, (b, t, self.heads, d)),
            "k": _normal(rng, (b, s, self.kv_heads, d)),
            "v": _normal(rng, (b, s, self.kv_heads, d)),
            # queries are the last T of the S positions (a prefill when T = S, a decode when T = 1)
            "q_positions": np.tile(np.arange(s - t, s, dtype=np.int32), (b, 1)),
            "k_positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
            # (0,): no sink (Qwen3); the launch layer's convention
            "sinks": np.zeros(0, np.float32),
        }

    def buffers(self, host):
        return {"out": np.full(host["q"].shape, np.nan, np.float32)}

    def launch(self, module, a):
        getattr(module, self.launcher)(a["q"], a["k"], a["v"], a["q_positions"], a["k_positions"], a["sinks"], a["out"],
                                       scale=self.scale, sliding_window=0, attention_chunk_size=0, softcap=0.0)

    def expected(self, host):
        from refimpl.attention import attention

        q, k, v = _f64(host["q"], host["k"], host["v"])
        return {"out": attention(q, k, v, scaling=self.scale)}

    def torch_peer(self, torch, t):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v = (t[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))  # (B, heads, T or S, D)

        def run():
            return sdpa(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        return run, lambda out: {"out": out.transpose(1, 2)}

    def _io_bytes(self, host) -> int:
        return sum(host[n].nbytes for n in ("q", "k", "v", "q_positions", "k_positions", "sinks")) + host["q"].nbytes


class DecodeAttention(_Attention):
    launcher = "launch_decode"
    target = "decode"

    def torch_peer(self, torch, t):
        """SDPA with the G query heads of a key/value head packed as G query rows of it (T = 1: every
        row sees every key), so that torch reads K and V once, as the kernel does, instead of
        repeating them per query head."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        b, hkv, d = self.batch, self.kv_heads, self.head_dim
        q = t["q"].reshape(b, hkv, self.heads // hkv, d)  # (B, 1, H, D) -> (B, Hkv, G, D): h = hk G + g
        k, v = (t[n].transpose(1, 2).contiguous() for n in ("k", "v"))  # (B, Hkv, S, D)

        def run():
            return sdpa(q, k, v, scale=self.scale)

        return run, lambda out: {"out": out.reshape(b, 1, self.heads, d)}

    def nbytes(self, host):
        return self._io_bytes(host)

    def flops(self, host):
        return 2.0 * self.batch * self.heads * self.queries * self.keys * 2 * self.head_dim


class PrefillAttention(_Attention):
    launcher = "launch_prefill"
    bound = "fp32"
    target = "prefill"

    def __init__(self, *, sampled_rows: int | None = None, **sizes):
        super().__init__(**sizes)
        self.sampled_rows = sampled_rows

    def _rows(self) -> np.ndarray:
        """The sampled query rows: the first and last 16 (first and last tiles) and some drawn between."""
        t = self.queries
        drawn = np.random.default_rng(t).choice(np.arange(16, t - 16), self.sampled_rows - 32, replace=False)
        return np.unique(np.concatenate([np.arange(16), drawn, np.arange(t - 16, t)]))

    def expected(self, host):
        if self.sampled_rows is None:
            return super().expected(host)
        from refimpl.attention import grouped_query_attention

        rows = self._rows()
        q, k, v = _f64(host["q"][:, rows], host["k"], host["v"])
        # the causal mask of the sampled queries (positions S - T + row)
        mask = np.arange(self.keys)[None, :] <= (self.keys - self.queries + rows)[:, None]
        return {"out": grouped_query_attention(q, k, v, mask, self.scale)}

    def actual(self, got):
        return got if self.sampled_rows is None else {"out": got["out"][:, self._rows()]}

    def nbytes(self, host):
        return self._io_bytes(host)

    def flops(self, host):
        visible = self.queries * (self.queries + 1) / 2 + self.queries * (self.keys - self.queries)
        return 2.0 * self.batch * self.heads * 2 * self.head_dim * visible


class MoeDecode(Bench):
    module = "moe"
    launcher = "launch_moe"
    family = "moe"
    target = "moe"
    #: (M, I, E) -> (gate_up_proj, down_proj): the weights are drawn once and shared by the rows.
    _weights: dict = {}

    def __init__(self, *, tokens, hidden, intermediate, experts, top_k):
        self.tokens, self.hidden, self.intermediate, self.experts, self.top_k = (
            tokens, hidden, intermediate, experts, top_k)

    def _expert_weights(self, rng):
        key = (self.hidden, self.intermediate, self.experts)
        if key not in MoeDecode._weights:
            MoeDecode._weights.clear()
            m, i, e = key
            MoeDecode._weights[key] = (_normal(rng, (e, 2 * i, m), m ** -0.5), _normal(rng, (e, m, i), i ** -0.5))
        return MoeDecode._weights[key]

    def inputs(self, rng):
        n, e, k = self.tokens, self.experts, self.top_k
        gate_up, down = self._expert_weights(rng)
        # a router's output: k distinct experts per token, softmax weights over them
        indices = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)
        logits = rng.standard_normal((n, k))
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
        return {"x": _normal(rng, (n, self.hidden)), "weights": weights, "indices": indices,
                "gate_up_proj": gate_up, "down_proj": down}

    def buffers(self, host):
        return {"out": np.full(host["x"].shape, np.nan, np.float32)}

    def launch(self, module, a):
        module.launch_moe(a["x"], a["weights"], a["indices"], a["gate_up_proj"], a["down_proj"], a["out"],
                          activation="silu", weight_on="output", swiglu_limit=None, alpha=1.702, gate_up_bias=None,
                          down_bias=None)

    def expected(self, host):
        from refimpl.experts import swiglu_expert
        from refimpl.moe import dispatch

        gate_up, down = host["gate_up_proj"], host["down_proj"]

        # only the experts the router chose are widened to float64
        def expert(e, rows):
            return swiglu_expert(rows, gate_up[e].astype(np.float64), down[e].astype(np.float64))

        x, w = _f64(host["x"], host["weights"])
        return {"out": dispatch(x, w, host["indices"], expert, self.experts)}

    def torch_peer(self, torch, t):
        x, w, idx, gate_up, down = (t[n] for n in ("x", "weights", "indices", "gate_up_proj", "down_proj"))
        idx = idx.long()
        i = self.intermediate
        silu = torch.nn.functional.silu

        # the loop of transformers' eager experts: one gather, two products and an index_add_ per expert hit
        def run():
            out = torch.zeros_like(x)
            for e in torch.unique(idx).tolist():
                rows, slots = torch.nonzero(idx == e, as_tuple=True)
                h = x[rows] @ gate_up[e].T
                y = (silu(h[:, :i]) * h[:, i:]) @ down[e].T
                out.index_add_(0, rows, y * w[rows, slots, None])
            return out

        return run, lambda out: {"out": out}

    def nbytes(self, host):
        distinct = len(np.unique(host["indices"]))
        per_expert = host["gate_up_proj"][0].nbytes + host["down_proj"][0].nbytes
        return distinct * per_expert + sum(host[n].nbytes for n in ("x", "weights", "indices")) + host["x"].nbytes

    def flops(self, host):
        return 6.0 * self.tokens * self.top_k * self.hidden * self.intermediate


class _DeltaRule(Bench):
    module = "delta_rule"
    family = "delta_rule"

    def __init__(self, *, batch, tokens, key_heads, value_heads, key_dim, value_dim, checked_key_heads=None):
        self.batch, self.tokens, self.key_heads, self.value_heads = batch, tokens, key_heads, value_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        # the check covers these key heads and the value heads that read them (None: every head)
        self.checked_key_heads = checked_key_heads

    @property
    def scale(self) -> float:
        return self.key_dim ** -0.5

    def inputs(self, rng):
        b, t, hk, hv, dk, dv = (self.batch, self.tokens, self.key_heads, self.value_heads, self.key_dim,
                                self.value_dim)
        q, k = _normal(rng, (b, t, hk, dk)), _normal(rng, (b, t, hk, dk))
        # the layer L2-normalises q and k; g = -A softplus(a + dt_bias) <= 0, beta = sigmoid(b)
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
        g = -np.logaddexp(0.0, rng.normal(-2.0, 1.0, (b, t, hv)))
        beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, hv))))
        return {"q": q, "k": k, "v": _normal(rng, (b, t, hv, dv)), "g": g.astype(np.float32),
                "beta": beta.astype(np.float32), "state": _normal(rng, (b, hv, dk, dv), 0.1)}

    def buffers(self, host):
        # the state is read and overwritten in place: a copy of the initial state, not poison
        return {"state": host["state"].copy(), "out": np.full(host["v"].shape, np.nan, np.float32)}

    def _checked_heads(self):
        """``(key heads, value heads)`` the check covers: whole groups, so that value head h of the
        subset still reads key head h // r of the subset (repeat-interleave)."""
        if self.checked_key_heads is None:
            return list(range(self.key_heads)), list(range(self.value_heads))
        r = self.value_heads // self.key_heads
        return list(self.checked_key_heads), [h * r + i for h in self.checked_key_heads for i in range(r)]

    def _reference(self, q, k, v, g, beta, state):
        raise NotImplementedError

    def expected(self, host):
        kh, vh = self._checked_heads()
        q, k = (np.asarray(host[n][:, :, kh], np.float64) for n in ("q", "k"))
        v, g, beta = (np.asarray(host[n][:, :, vh], np.float64) for n in ("v", "g", "beta"))
        out, state = self._reference(q, k, v, g, beta, np.asarray(host["state"][:, vh], np.float64))
        return {"out": out, "state": state}

    def actual(self, got):
        _, vh = self._checked_heads()
        return {"out": got["out"][:, :, vh], "state": got["state"][:, vh]}

    def _torch_fn(self, torch):
        raise NotImplementedError

    def torch_peer(self, torch, t):
        fn = self._torch_fn(torch)
        if fn is None:
            return None
        q, k, v, g, beta, state = (t[n] for n in ("q", "k", "v", "g", "beta", "state"))
        initial = state.clone()

        def run():
            # transformers' function scales q by d_k ** -0.5 itself: our scale
            return fn(q, k, v, g, beta, initial_state=initial, output_final_state=True)

        return run, lambda out: {"out": out[0], "state": out[1]}

    def nbytes(self, host):
        return sum(host[n].nbytes for n in ("q", "k", "v", "g", "beta")) + 2 * host["state"].nbytes + host["v"].nbytes


class GdnDecode(_DeltaRule):
    launcher = "launch_recurrent"
    target = "gdn-decode"

    def launch(self, module, a):
        module.launch_recurrent(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], a["out"], scale=self.scale)

    def _reference(self, q, k, v, g, beta, state):
        from refimpl.linear_attention.delta_rule import gated_delta_rule_recurrent

        return gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=state, scale=self.scale)

    def _torch_fn(self, torch):
        return _transformers_delta_rule("torch_recurrent_gated_delta_rule")

    def flops(self, host):
        return 7.0 * self.batch * self.tokens * self.value_heads * self.key_dim * self.value_dim


class GdnChunked(_DeltaRule):
    launcher = "launch_chunked"
    bound = "fp32"

    def __init__(self, *, chunk_size, **sizes):
        super().__init__(**sizes)
        self.chunk_size = chunk_size

    def launch(self, module, a):
        module.launch_chunked(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], a["out"],
                              chunk_size=self.chunk_size, scale=self.scale)

    def _reference(self, q, k, v, g, beta, state):
        from refimpl.linear_attention.delta_rule import gated_delta_rule_chunked

        return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=self.chunk_size, initial_state=state,
                                        scale=self.scale)

    def _torch_fn(self, torch):
        fn = _transformers_delta_rule("torch_chunk_gated_delta_rule")
        if fn is None:
            return None
        return lambda *args, **kwargs: fn(*args, chunk_size=self.chunk_size, **kwargs)

    def flops(self, host):
        c, dk, dv = self.chunk_size, self.key_dim, self.value_dim
        per_token_head = 2 * c * (2 * dk + dv) + 6 * dk * dv + c * dv
        return float(self.batch * self.tokens * self.value_heads * per_token_head)


def _transformers_delta_rule(name: str):
    """transformers' torch fallback of the gated delta rule, or None when it is not importable."""
    try:
        module = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
        return getattr(module, name)
    except (ImportError, AttributeError):
        return None


class MlaDecode(Bench):
    module = "mla"
    launcher = "launch_mla_decode"
    family = "attention"
    bound = "fp32"

    def __init__(self, *, batch, keys, heads, latent_dim, rope_dim):
        self.batch, self.keys, self.heads, self.latent_dim, self.rope_dim = batch, keys, heads, latent_dim, rope_dim

    @property
    def scale(self) -> float:
        # DeepSeek-V3: (Dn + Dr) ** -0.5 with Dn = 128 (no YaRN factor here)
        return (128 + self.rope_dim) ** -0.5

    def inputs(self, rng):
        b, s, h, dc, dr = self.batch, self.keys, self.heads, self.latent_dim, self.rope_dim
        return {"q_latent": _normal(rng, (b, 1, h, dc + dr)), "c_kv": _normal(rng, (b, s, dc)),
                # (B, T, S) uint8, nonzero = visible (the launch layer's form): a decode sees every slot
                "k_rope": _normal(rng, (b, s, dr)), "mask": np.ones((b, 1, s), np.uint8)}

    def buffers(self, host):
        b, _, h, _ = host["q_latent"].shape
        return {"out": np.full((b, 1, h, self.latent_dim), np.nan, np.float32)}

    def launch(self, module, a):
        module.launch_mla_decode(a["q_latent"], a["c_kv"], a["k_rope"], a["mask"], a["out"], scale=self.scale)

    def expected(self, host):
        from refimpl.attention import grouped_query_attention

        q, c_kv, k_rope = _f64(host["q_latent"], host["c_kv"], host["k_rope"])
        # the absorbed form: one key/value head, keys [c_kv ; k_rope], values c_kv
        k = np.concatenate([c_kv, k_rope], axis=-1)[:, :, None, :]
        expected = grouped_query_attention(q, k, c_kv[:, :, None, :], host["mask"] != 0, self.scale)
        return {"out": expected}

    def torch_peer(self, torch, t):
        """SDPA over the one latent head with the H query heads as H query rows of it (T = 1)."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q = t["q_latent"]  # (B, 1, H, Dc + Dr): one head, H rows
        k = torch.cat([t["c_kv"], t["k_rope"]], dim=-1)[:, None]  # (B, 1, S, Dc + Dr)
        v = t["c_kv"][:, None]  # (B, 1, S, Dc)

        def run():
            return sdpa(q, k, v, scale=self.scale)

        return run, lambda out: {"out": out}

    def nbytes(self, host):
        return sum(a.nbytes for a in host.values()) + self.batch * self.heads * self.latent_dim * 4

    def flops(self, host):
        return 2.0 * self.batch * self.heads * self.keys * (2 * self.latent_dim + self.rope_dim)


def _attention(cls, b, t, s, **extra):
    return cls(batch=b, queries=t, keys=s, heads=32, kv_heads=8, head_dim=128, **extra)


def _gdn(cls, b, t, **extra):
    return cls(batch=b, tokens=t, key_heads=16, value_heads=32, key_dim=128, value_dim=128, **extra)


def _moe(n):
    return MoeDecode(tokens=n, hidden=2048, intermediate=768, experts=128, top_k=8)


def rows(mode: str) -> list[tuple[str, Bench, list[Bench]]]:
    """``(name, timed bench, extra check-only benches)`` in run order; the first six are the issue's."""
    if mode == "tiny":
        # tiny sizes that still straddle the kernels' tiles (odd lengths, partial tiles)
        def tiny_attention(cls, t, s):
            return cls(batch=1, queries=t, keys=s, heads=2, kv_heads=1, head_dim=16)

        def tiny_gdn(cls, b, t, **extra):
            return cls(batch=b, tokens=t, key_heads=1, value_heads=2, key_dim=8, value_dim=8, **extra)

        def tiny_moe(n):
            return MoeDecode(tokens=n, hidden=32, intermediate=16, experts=4, top_k=2)

        return [
            ("decode-4k", tiny_attention(DecodeAttention, 1, 37), []),
            ("decode-32k", tiny_attention(DecodeAttention, 1, 70), []),
            ("prefill-4k", tiny_attention(PrefillAttention, 19, 19), []),
            ("moe-n1", tiny_moe(1), []),
            ("moe-n64", tiny_moe(2), []),
            ("gdn-decode", tiny_gdn(GdnDecode, 1, 1), []),
            ("decode-4k-b8", DecodeAttention(batch=2, queries=1, keys=37, heads=2, kv_heads=1, head_dim=16), []),
            ("gdn-decode-b8", tiny_gdn(GdnDecode, 2, 1), []),
            ("gdn-chunked-4k", tiny_gdn(GdnChunked, 1, 11, chunk_size=4), []),
            ("mla-decode-32k", MlaDecode(batch=1, keys=37, heads=2, latent_dim=16, rope_dim=8), []),
        ]
    table = [
        ("decode-4k", _attention(DecodeAttention, 1, 1, 4096), []),
        ("decode-32k", _attention(DecodeAttention, 1, 1, 32768), []),
        ("prefill-4k", _attention(PrefillAttention, 1, 4096, 4096, sampled_rows=64),
         [_attention(PrefillAttention, 1, 1031, 1031)]),
        ("moe-n1", _moe(1), []),
        ("moe-n64", _moe(64), []),
        ("gdn-decode", _gdn(GdnDecode, 1, 1), []),
        ("decode-4k-b8", _attention(DecodeAttention, 8, 1, 4096), []),
        ("gdn-decode-b8", _gdn(GdnDecode, 8, 1), []),
        ("gdn-chunked-4k", _gdn(GdnChunked, 1, 4096, chunk_size=64, checked_key_heads=(0, 15)),
         [_gdn(GdnChunked, 1, 1000, chunk_size=64, checked_key_heads=(0, 15))]),
        ("mla-decode-32k", MlaDecode(batch=1, keys=32768, heads=128, latent_dim=512, rope_dim=64), []),
    ]
    return table[:6] if mode == "quick" else table


# --- the device: detection, timing, ceilings ---------------------------------------------------------------------


def _no_gpu_reason(cuda) -> str:
    """numba's own words for why no GPU is usable, on one line."""
    try:
        cuda.current_context()
    except Exception as exc:  # CudaSupportError and driver errors: their text is the reason
        text = " ".join(str(exc).split()).rstrip(" :")
        return f"numba: {text or type(exc).__name__}"
    return "numba: cuda.is_available() is False"


class Device:
    """numba's CUDA (or its simulator), torch when present, the L2 flush and the timers."""

    def __init__(self, numba_mod, mode: str):
        self.nb = numba_mod
        self.cuda = numba_mod.cuda
        self.simulator = numba_mod.SIMULATOR
        self.mode = mode
        flush = 1 << 10 if self.simulator else FLUSH_BYTES
        # contents do not matter: the copy only has to stream through L2
        self._flush_src = self.cuda.device_array(flush, np.uint8)
        self._flush_dst = self.cuda.device_array(flush, np.uint8)
        self.flush_s = None if self.simulator else self._time_flush()
        self.torch, self.torch_device, self.torch_note = _torch_for(self.simulator)

    def flush(self) -> None:
        self._flush_dst.copy_to_device(self._flush_src)

    def sync(self) -> None:
        self.cuda.synchronize()

    def _time_flush(self) -> float:
        """Median device time of one flush: how long a launch may take to issue and still be hidden."""
        samples = []
        for _ in range(5):
            start, end = self.cuda.event(), self.cuda.event()
            start.record()
            self.flush()
            end.record()
            end.synchronize()
            samples.append(self.cuda.event_elapsed_time(start, end) * 1e-3)
        return statistics.median(samples)

    def time(self, fn, reps: int, *, torch_events: bool = False) -> dict:
        """Median and min of ``reps`` timed calls of ``fn`` (seconds), after WARMUP calls.

        Each call follows an L2 flush; CUDA events (numba's, or torch's for torch work) time the
        device; under the simulator, or for torch on the CPU, the host clock with a synchronize.
        The repetition count shrinks to fit ROW_TIMING_BUDGET_S and stops at the deadline.
        """
        with self.cuda.defer_cleanup():
            for _ in range(WARMUP[self.mode]):
                fn()
            self.sync()
            host_issue, samples = [], []
            for _ in range(reps):
                self.flush()
                if self.simulator or (torch_events and self.torch_device == "cpu"):
                    self.sync()
                    t0 = time.perf_counter()
                    fn()
                    self.sync()
                    samples.append(time.perf_counter() - t0)
                else:
                    start, end = self._events(torch_events)
                    start.record()
                    t0 = time.perf_counter()
                    fn()
                    host_issue.append(time.perf_counter() - t0)
                    end.record()
                    end.synchronize()
                    samples.append(self._elapsed_s(start, end, torch_events))
                if sum(samples) > ROW_TIMING_BUDGET_S or _elapsed() > PEER_DEADLINE_S:
                    break
            self.sync()
        result = {"median_s": statistics.median(samples), "min_s": min(samples), "reps": len(samples),
                  "samples_s": samples, "clock": "host (simulator)" if self.simulator else "cuda events"}
        if host_issue:
            result["host_issue_s"] = statistics.median(host_issue)
            if self.flush_s is not None and result["host_issue_s"] > self.flush_s:
                result["note"] = (f"issuing the launch took {result['host_issue_s'] * 1e6:.0f} us on the host, longer "
                                  f"than the {self.flush_s * 1e6:.0f} us flush ahead of it: the time includes idle GPU")
        return result

    def _events(self, torch_events: bool):
        if torch_events:
            return (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))
        return self.cuda.event(), self.cuda.event()

    def _elapsed_s(self, start, end, torch_events: bool) -> float:
        if torch_events:
            return start.elapsed_time(end) * 1e-3
        return self.cuda.event_elapsed_time(start, end) * 1e-3

    def describe(self) -> dict:
        info = {"simulator": self.simulator, "torch_device": self.torch_device, "torch_note": self.torch_note,
                "l2_flush_s": self.flush_s}
        if self.simulator:
            info["name"] = "numba CUDA simulator"
            return info
        dev = self.cuda.get_current_device()
        info.update(name=dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
                    compute_capability=".".join(map(str, dev.compute_capability)),
                    multiprocessors=int(dev.MULTIPROCESSOR_COUNT))
        try:
            info["driver_version"] = ".".join(map(str, self.cuda.cudadrv.driver.driver.get_version()))
        except Exception as exc:  # informational only
            info["driver_version"] = f"unknown ({type(exc).__name__})"
        try:
            info["runtime_version"] = ".".join(map(str, self.cuda.runtime.get_version()))
        except Exception as exc:  # informational only
            info["runtime_version"] = f"unknown ({type(exc).__name__})"
        free, total = self.cuda.current_context().get_memory_info()
        info["memory_gib"] = round(total / 2 ** 30, 1)
        return info


def _torch_for(simulator: bool):
    """``(torch or None, "cuda" / "cpu" / None, note)``: torch peers run on the GPU, or on the
    CPU under the simulator (to prove the wiring: checked, not compared)."""
    try:
        import torch
    except ImportError:
        return None, None, "torch not installed"
    if simulator:
        return torch, "cpu", "simulator: torch peers on the CPU, checked only"
    if not torch.cuda.is_available():
        return torch, None, f"torch {torch.__version__} has no CUDA"
    # float32 against float32: no TF32 in torch's matmuls and convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, "cuda", f"torch {torch.__version__}, TF32 off"


def fma_peak(out, x, y, iters):
    """8 independent FMA chains per thread (16 FLOP per iteration), to measure the float32 peak."""
    i = cuda.grid(1)
    a0 = float32(i) * float32(1e-9)
    a1, a2, a3, a4, a5, a6, a7 = a0 + x, a0 + y, a0 - x, a0 - y, a0 * x, a0 * y, a0 + float32(1)
    for _ in range(iters):
        a0 = a0 * x + y
        a1 = a1 * x + y
        a2 = a2 * x + y
        a3 = a3 * x + y
        a4 = a4 * x + y
        a5 = a5 * x + y
        a6 = a6 * x + y
        a7 = a7 * x + y
    out[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7


FMA_SIGNATURE = "void(float32[::1], float32, float32, int32)"


def _numba_copy(dev: Device, nbytes: int, reps: int) -> dict:
    src = dev.cuda.device_array(nbytes // 4, np.float32)
    dst = dev.cuda.device_array(nbytes // 4, np.float32)
    timing = dev.time(lambda: dst.copy_to_device(src), reps)
    return {"bytes": 2 * nbytes, **timing, "gb_s": 2 * nbytes / timing["median_s"] / 1e9}


def _numba_fma(dev: Device, reps: int) -> dict:
    iters, blocks, threads = (4, 1, 32) if dev.simulator else (FMA_ITERS, FMA_BLOCKS, FMA_THREADS)
    kernel = dev.cuda.jit(FMA_SIGNATURE)(fma_peak)
    out = dev.cuda.device_array(blocks * threads, np.float32)
    x, y, n = np.float32(0.999), np.float32(1e-3), np.int32(iters)
    kernel[blocks, threads](out, x, y, n)
    timing = dev.time(lambda: kernel[blocks, threads](out, x, y, n), reps)
    flop = 16.0 * iters * blocks * threads
    return {"flop": flop, **timing, "tflop_s": flop / timing["median_s"] / 1e12}


def _torch_copy(dev: Device, reps: int) -> dict:
    a = dev.torch.ones(COPY_BYTES // 4, dtype=dev.torch.float32, device="cuda")
    b = dev.torch.empty_like(a)
    timing = dev.time(lambda: b.copy_(a), reps, torch_events=True)
    return {"bytes": 2 * COPY_BYTES, **timing, "gb_s": 2 * COPY_BYTES / timing["median_s"] / 1e9}


def _torch_matmul(dev: Device, reps: int) -> dict:
    m = dev.torch.randn(MATMUL_N, MATMUL_N, device="cuda")
    timing = dev.time(lambda: m @ m, max(3, reps // 2), torch_events=True)
    flop = 2.0 * MATMUL_N ** 3
    return {"flop": flop, **timing, "tflop_s": flop / timing["median_s"] / 1e12}


def measure_ceilings(dev: Device, reps: int) -> dict:
    """Copy bandwidth (numba DtoD, torch ``copy_``) and float32 peak (FMA kernel, torch matmul).

    Under the simulator the numba measurements run at tiny sizes (the wiring only) and the
    ceilings are None.
    """
    copy = {"numba_dtod": _numba_copy(dev, 1 << 12 if dev.simulator else COPY_BYTES, reps)}
    peak = {"numba_fma": _numba_fma(dev, reps)}
    if dev.torch_device == "cuda":
        copy["torch_copy"] = _torch_copy(dev, reps)
        peak["torch_matmul_no_tf32"] = _torch_matmul(dev, reps)
        dev.torch.cuda.empty_cache()
    copy["ceiling_gb_s"] = None if dev.simulator else max(v["gb_s"] for v in copy.values())
    peak["ceiling_tflop_s"] = None if dev.simulator else max(v["tflop_s"] for v in peak.values())
    return {"copy_bandwidth": copy, "fp32_peak": peak}


# --- one row: build, check, time, compare ------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_launcher(bench: Bench):
    """The kernel module, or a "missing: ..." reason."""
    name = f"refimpl.kernels.{bench.module}"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return None, f"missing: {name} ({_first_line(exc)})"
    if not callable(getattr(module, bench.launcher, None)):
        return None, f"missing: {name}.{bench.launcher}"
    return module, None


def _check(dev: Device, module, bench: Bench, rng) -> tuple[list[dict], dict, dict, dict, dict]:
    """Launch on fresh inputs and compare every output with the reference.

    Returns ``(comparisons, host inputs, device arrays, expected, {"first_launch_s": ...})``; the
    first launch compiles the kernels (numba's JIT), so its time is mostly compilation.
    """
    host = bench.inputs(rng)
    arrays = {n: dev.cuda.to_device(a) for n, a in host.items()}
    buffers = bench.buffers(host)
    arrays.update({n: dev.cuda.to_device(a) for n, a in buffers.items()})
    t0 = time.perf_counter()
    bench.launch(module, arrays)
    dev.sync()
    first_s = time.perf_counter() - t0
    got = {n: arrays[n].copy_to_host() for n in buffers}
    expected = bench.expected(host)
    return _compare_all(bench, bench.actual(got), expected), host, arrays, expected, {"first_launch_s": first_s}


def _compare_all(bench: Bench, actual: dict, expected: dict) -> list[dict]:
    """One entry per output: the errors of :func:`conformance.compare.compare` and the bounds broken."""
    tolerance = TOLERANCES[bench.family]
    found = []
    for name, exp in expected.items():
        c = compare(actual[name], exp)
        found.append({"output": name, "shape": list(c.expected_shape), "rel_rms": c.rel_rms, "max_abs": c.max_abs,
                      "max_abs_index": c.max_abs_index, "max_abs_expected": c.max_abs_expected,
                      "nonfinite": c.nonfinite, "bounds": [tolerance.rel_rms, tolerance.max_abs_rel],
                      "violations": violations(c, tolerance)})
    return found


def _run_torch(dev: Device, bench: Bench, host: dict, expected: dict, reps: int) -> dict:
    """The torch peer on the row's inputs (fresh tensors from the host copies): checked, then timed."""
    torch = dev.torch
    if torch is None or dev.torch_device is None:
        return {"status": f"n/a ({dev.torch_note})"}
    with torch.inference_mode():
        # the same values the kernel read (the kernel's in-place state buffer has moved on since)
        tensors = {n: torch.from_numpy(a).to(dev.torch_device) for n, a in host.items()}
        peer = bench.torch_peer(torch, tensors)
        if peer is None:
            return {"status": "n/a (no torch peer importable)"}
        fn, outputs = peer
        got = {n: t.detach().double().cpu().numpy() for n, t in outputs(fn()).items()}
        checks = _compare_all(bench, bench.actual(got), expected)
        timing = dev.time(fn, reps, torch_events=True)
    status = "ok" if not any(c["violations"] for c in checks) else "WRONG"
    return {"status": status, "device": dev.torch_device, "check": checks, **timing}


def run_row(dev: Device, name: str, bench: Bench, extras: list[Bench], mode: str, rng) -> dict:
    row = {"row": name, "kernel": f"refimpl.kernels.{bench.module}.{bench.launcher}", "sizes": bench.sizes(),
           "bound": bench.bound, "target": bench.target or None}
    if _elapsed() > DEADLINE_S:
        return {**row, "status": "skipped: time"}
    module, missing = _load_launcher(bench)
    if missing:
        return {**row, "status": missing}
    try:
        checks, host, dev_arrays, expected, first = _check(dev, module, bench, rng)
        row.update(first)
        for extra in extras:
            if _elapsed() > PEER_DEADLINE_S:
                row["extra_checks"] = "skipped: time"
                break
            checks += [{**c, "sizes": extra.sizes()} for c in _check(dev, module, extra, rng)[0]]
        row["check"] = checks
        row["status"] = "ok" if not any(c["violations"] for c in checks) else "WRONG"
        row["bytes"], row["flop"] = bench.nbytes(host), bench.flops(host)
        row["time"] = dev.time(lambda: bench.launch(module, dev_arrays), REPS[mode])
        if _elapsed() < PEER_DEADLINE_S:
            row["torch"] = _run_torch(dev, bench, host, expected, REPS[mode])
        else:
            row["torch"] = {"status": "skipped: time"}
    except Exception as exc:  # one failing row must not stop the others
        row["status"] = f"error: {_first_line(exc)}"
    finally:
        dev.sync()
        if dev.torch is not None and dev.torch_device == "cuda":
            dev.torch.cuda.empty_cache()
    return row


def derive(row: dict, ceilings: dict, simulator: bool, judge_targets: bool = True) -> dict:
    """Rates, fraction of the ceiling, target verdict (unless ``judge_targets`` is False: tiny
    sizes) and torch ratio of a measured row."""
    if "time" not in row:
        return row
    t = row["time"]["median_s"]
    row["gb_s"] = row["bytes"] / t / 1e9
    row["tflop_s"] = row["flop"] / t / 1e12
    bandwidth = ceilings["copy_bandwidth"]["ceiling_gb_s"]
    peak = ceilings["fp32_peak"]["ceiling_tflop_s"]
    if not simulator:
        row["fraction_of_ceiling"] = row["gb_s"] / bandwidth if row["bound"] == "bandwidth" else row["tflop_s"] / peak
    torch_time = row.get("torch", {}).get("median_s")
    if torch_time is not None and not simulator:
        row["torch_over_kernel"] = torch_time / t
    if row["target"] and not simulator and judge_targets:
        kind, threshold = TARGETS[row["target"]]
        value = row["fraction_of_ceiling"] if kind == "bandwidth" else row["tflop_s"]
        row["target_met"] = bool(value >= threshold)
    return row


# --- output --------------------------------------------------------------------------------------------------------


def _time_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _target_text(row: dict, simulator: bool) -> str:
    if not row.get("target"):
        return "-"
    kind, threshold = TARGETS[row["target"]]
    goal = f">= {threshold:.0%} BW" if kind == "bandwidth" else f">= {threshold:g} TFLOP/s"
    if simulator:
        return f"{goal}: n/a (simulator)"
    if "target_met" not in row:
        return f"{goal}: -" if "time" not in row else f"{goal}: n/a (tiny sizes)"
    return f"{goal}: {'met' if row['target_met'] else 'NOT met'}"


def table_rows(rows: list[dict], simulator: bool) -> list[list[str]]:
    header = ["row", "check", "max rel RMS", "kernel", "rate", "of ceiling", "target", "torch", "torch/kernel"]
    lines = [header]
    for r in rows:
        checks = r.get("check") or []
        err = max((c["rel_rms"] for c in checks), default=None)
        rate = "-"
        if "time" in r:
            rate = f"{r['gb_s']:.0f} GB/s" if r["bound"] == "bandwidth" else f"{r['tflop_s']:.1f} TFLOP/s"
        na = "n/a (simulator)"
        fraction = na if simulator and "time" in r else (
            f"{r['fraction_of_ceiling']:.0%}" if "fraction_of_ceiling" in r else "-")
        torch = r.get("torch", {})
        torch_text = _time_text(torch.get("median_s")) if "median_s" in torch else torch.get("status", "-")
        if torch.get("status") == "WRONG":
            torch_text += " (WRONG)"
        ratio = na if simulator and "median_s" in torch else (
            f"{r['torch_over_kernel']:.2f}x" if "torch_over_kernel" in r else "-")
        # the reason of a missing kernel or a failed row is printed under the table
        status = r["status"].split(":")[0] if r["status"].startswith(("missing", "error")) else r["status"]
        lines.append([r["row"], status, "-" if err is None else f"{err:.1e}",
                      _time_text(r.get("time", {}).get("median_s")), rate, fraction, _target_text(r, simulator),
                      torch_text, ratio])
    return lines


def markdown_table(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out)


def header_lines(device: dict, versions: dict, ceilings: dict, simulator: bool) -> list[str]:
    lines = [f"Device: {device['name']}" + ("" if simulator else
             f" (sm {device['compute_capability']}, {device['multiprocessors']} SMs, {device['memory_gib']} GiB, "
             f"driver {device['driver_version']})"),
             "Software: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    copy, peak = ceilings["copy_bandwidth"], ceilings["fp32_peak"]
    if simulator:
        lines.append("Ceilings: n/a (simulator)")
    else:
        parts = [f"{k} {v['gb_s']:.0f} GB/s" for k, v in copy.items() if isinstance(v, dict)]
        lines.append(f"Copy bandwidth: {', '.join(parts)} -> ceiling {copy['ceiling_gb_s']:.0f} GB/s")
        parts = [f"{k} {v['tflop_s']:.1f} TFLOP/s" for k, v in peak.items() if isinstance(v, dict)]
        lines.append(f"float32 peak: {', '.join(parts)} -> ceiling {peak['ceiling_tflop_s']:.1f} TFLOP/s")
    return lines


def versions(numba_mod, torch) -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    out.update({k: v for k, v in numba_mod.numba_versions().items() if k != "simulator"})
    out["torch"] = torch.__version__ if torch is not None else "not installed"
    try:
        out["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        out["transformers"] = "not installed"
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


# --- main ----------------------------------------------------------------------------------------------------------


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/gpu_kernels.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file of every number ({DEFAULT_OUT})")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="the issue's six rows only, fewer repetitions")
    sizes.add_argument("--tiny", action="store_true", help="every row at tiny sizes (works in the CUDA simulator)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per kernel (default 20, quick 7)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.reps is not None:
        if args.reps < 1:
            print("gpu_kernels: --reps must be >= 1", file=sys.stderr)
            return 2
        REPS[mode] = args.reps
    nb = _numba
    if nb is None:
        print(f"{NO_GPU} ({_NUMBA_MISSING})")
        return 0
    if not nb.SIMULATOR and not nb.gpu_available():
        print(f"{NO_GPU} ({_no_gpu_reason(nb.cuda)})")
        return 0
    if nb.SIMULATOR and mode != "tiny":
        print("gpu_kernels: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); only --tiny runs there",
              file=sys.stderr)
        return 2
    dev = Device(nb, mode)
    info = dev.describe()
    soft = versions(nb, dev.torch)
    ceilings = measure_ceilings(dev, REPS[mode])
    print("\n".join(header_lines(info, soft, ceilings, dev.simulator)), flush=True)
    rng = np.random.default_rng(args.seed)
    measured = []
    for name, bench, extras in rows(mode):
        row = derive(run_row(dev, name, bench, extras, mode, rng), ceilings, dev.simulator, mode != "tiny")
        measured.append(row)
        print(f"  {name}: {row['status']} ({_elapsed():.0f} s)", file=sys.stderr, flush=True)
    MoeDecode._weights.clear()
    print()
    print(markdown_table(table_rows(measured, dev.simulator)))
    for row in measured:
        if row["status"].startswith(("missing", "error")):
            print(f"Note: {row['row']}: {row['status']}")
        for what, timing in (("kernel", row.get("time", {})), ("torch", row.get("torch", {}))):
            if "note" in timing:
                print(f"Note: {row['row']} ({what}): {timing['note']}")
    print()
    print("Targets: decode attention and MoE decode >= 60% of the copy bandwidth; prefill attention >= 25 TFLOP/s "
          "(float32); GDN decode >= 50% of the bandwidth. torch/kernel > 1: the kernel is faster.")
    report = {"script": "bench/gpu_kernels.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "argv": sys.argv[1:] if argv is None else list(argv), "mode": mode, "seed": args.seed,
              "device": info, "versions": soft, "ceilings": ceilings, "tolerances":
              {k: [t.rel_rms, t.max_abs_rel] for k, t in TOLERANCES.items()},
              "targets": TARGETS, "rows": measured, "elapsed_s": _elapsed()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    print(f"Full numbers: {args.out} ({_elapsed():.0f} s in all)")
    failed = [r["row"] for r in measured if r["status"] not in ("ok", "skipped: time")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
