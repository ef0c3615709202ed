"""MoE experts on the GPU: counting-sort dispatch, tiled per-expert SwiGLU GEMMs, ordered combine.

Implements :func:`refimpl.moe.dispatch` with the experts of :func:`refimpl.experts.swiglu_expert`
(gate|up rows stacked, ``hidden_act`` silu / gelu_pytorch_tanh / gelu) or gpt-oss's
:func:`refimpl.experts.clamped_swiglu` with optional biases, ``weight_on`` "output" and
"input" (Llama 4); and, on top of it, :func:`refimpl.models.qwen3_moe.sparse_moe`,
:func:`refimpl.models.qwen3_next.sparse_moe` (same function, see :func:`sparse_moe`) and
:func:`refimpl.models.gpt_oss.moe_block`, whose routers run on the host.

    y[n] = sum_j  s_nj * ( D_e ( act(G_e x'_nj + b_g) * (U_e x'_nj + b_u) ) + d_e ),   e = e_nj
    x'_nj = w_nj x_n and s_nj = 1        (weight_on "input", Llama 4)
    x'_nj = x_n      and s_nj = w_nj     (weight_on "output", every other model)
    clamped (gpt-oss):  act(g) * u  is replaced by  (clip(u, -L, L) + 1) * g' * sigmoid(alpha g'),  g' = min(g, L)

Notation (N tokens, k slots per token, P = N k (token, slot) pairs, E experts, M hidden_size,
I expert intermediate size):

    ===========================  ====================  =============  ================================
    symbol                       code                  shape          note
    ===========================  ====================  =============  ================================
    x                            ``x``                 (N, M)         token rows
    w, e                         ``weights``,          (N, k)         pair p = n k + j is (token n,
                                 ``indices``                          slot j)
    [G_e; U_e]                   ``gate_up_proj``      (E, 2I, M)     gate rows 0..I-1, up rows I..2I-1
    D_e                          ``down_proj``         (E, M, I)
    [b_g; b_u], d_e              ``gate_up_bias``,     (E, 2I), (E, M)  optional
                                 ``down_bias``
    expert-sorted pair order     ``sorted_pairs``      (P,)           pair ids, expert-major, then by p
    expert segments              ``expert_offsets``    (E + 1,)       expert e owns sorted positions
                                                                      [offsets[e], offsets[e + 1])
    work list                    ``work_expert``,      (P // ROWS + min(E, P),)  one entry per ROWS-row
                                 ``work_start``                       tile of one expert's segment
    activations                  ``h``                 (P, I)         in sorted order
    per-pair outputs             ``pair_out``          (P, M)         s_nj * Expert(x'_nj), pair order
    ===========================  ====================  =============  ================================

Algorithm (six launches, no Python loop over tokens or experts):

1. ``route_count_kernel``: the P pairs in tiles of ROUTE_THREADS, one thread per pair. Each tile
   builds its own expert histogram with integer ``cuda.atomic.add`` (exact, order-free) and
   gives each pair its *rank*: how many earlier pairs of the same tile chose the same expert
   (a scan over the tile's experts in shared memory).
2. ``route_scan_kernel`` (one block): per expert, the total over tiles and an exclusive prefix
   sum over E (Hillis-Steele scan in shared memory, chunks of SCAN_THREADS experts with a
   carry), giving ``expert_offsets`` and, per (tile, expert), where that tile's pairs start;
   the same scan over ``ceil(count_e / ROWS)`` lays out the GEMM work list.
3. ``route_scatter_kernel``: pair p goes to ``tile_base[tile, e] + rank[p]``. Within an expert,
   pairs are therefore ordered by p = (token, slot): a stable counting sort, the same every run.
4. ``gate_up_kernel``: grid (work items, ceil(I / FEATS)), FEATS x GROUPS threads; a block
   computes ROWS gathered rows x FEATS intermediate features of one expert, gate and up
   together. The K loop over M stages a (2 FEATS x K_TILE) weight tile (FEATS gate rows and
   the FEATS matching up rows) and a (ROWS x K_TILE) tile of gathered token rows in shared
   memory, through registers: the loads of step s + 1 are issued before step s computes, so
   a whole tile per block is in flight while the arithmetic runs. Thread (f, g) owns feature
   f and the g-th of GROUPS slices of each K step (split-K inside the block), for all ROWS
   rows, skipping rows past the tile's: a 1-row decode tile keeps every thread busy. At the
   end the GROUPS partial sums meet in shared memory, are added in group order, and group g
   finishes rows g ROWS/GROUPS..: biases, activation, ``h``. weight_on "input" scales the
   gathered rows by w as they are loaded.
5. ``down_kernel``: grid (work items, ceil(M / (2 FEATS))), the same tiling with K = I: a block
   computes ROWS rows x 2 FEATS output features, adds the down bias, multiplies by w (weight_on
   "output") and writes the pair's row of ``pair_out`` (indexed by pair id, not sorted position).
6. ``combine_kernel``: grid (N, ceil(M / COMBINE_THREADS)); ``y[n] = sum_j pair_out[n k + j]``
   in slot order j = 0..k-1: the weighted scatter-add of dispatch without float atomics, so
   the output is bit-reproducible run to run.

Steps 1-3 are the counting sort that vLLM's ``moe_align_block_size`` and Megablocks do
(Gale et al., "MegaBlocks", arXiv:2211.15841, sec. 5: padding-free grouped GEMM over
expert-sorted tokens); 4-5 are shared-memory tiled GEMMs (Volkov and Demmel, "Benchmarking GPUs
to tune dense linear algebra", SC08) with register prefetch of the next tile and an in-block
split of K for skinny (decode) tiles, grouped by a device-built work list; 6 replaces the
scatter-add's atomics. Indices in the GEMMs are unsigned (see the note above them).

Launch configuration (module constants; ``MoeTiles`` bundles them, :func:`launch_moe` takes
another bundle for tests and tuning):

    ==================  =========  ==========================================================
    constant            value      role
    ==================  =========  ==========================================================
    ROWS                8          gathered rows per GEMM block (BM)
    FEATS               32         gate_up: features per block (x 2: gate and up);
                                   down: 2 FEATS = 64 output features per block (BN)
    GROUPS              4          threads per block = FEATS x GROUPS = 128; group g takes
                                   K_TILE / GROUPS = 32 columns of each K step for all ROWS
                                   rows (2 ROWS accumulators per thread), then finishes
                                   ROWS / GROUPS = 2 rows
    K_TILE              128        K step (BK); per thread 2 FEATS K_TILE / 128 = 64 weight and
                                   8 row values staged in registers. Shared memory: weight tile
                                   64 x 129, row tile 8 x 129 (+1 pad: the compute loop reads
                                   a column, conflict-free), partial sums 4 x 8 x 2 x 32 floats,
                                   44.3 KiB per block (static limit 48 KiB)
    ROUTE_THREADS       256        pairs per routing tile (block), dynamic shared 1 KiB
    SCAN_THREADS        128        the one scan block, dynamic shared 1 KiB
    COMBINE_THREADS     128        hidden features per combine block
    ==================  =========  ==========================================================

Sized for Qwen3-30B-A3B (M = 2048, I = 768, E = 128, k = 8), weights in float32. At batch 1
(P = 8) the MoE is a weight stream: 8 experts x (1536 x 2048 + 2048 x 768) x 4 B = 151 MB per
layer, read exactly once (each expert's rows fit one row tile). gate_up runs 8 x 24 = 192
blocks and down 8 x 32 = 256 blocks of 128 threads, all resident at once on an H200's 132 SMs
(5 blocks per SM fit); with one K_TILE tile per block in flight that is 6.3 MB (gate_up) and
8.4 MB (down) of loads outstanding, above the ~4 MB that Little's law asks for at 4 TB/s and
~1 us latency. The routing and combine launches touch a few KB, but they are 4 more launches
(a few us each without CUDA graphs) next to a ~40 us weight stream. At 64 tokens (P = 512)
about 126 of the 128 experts are hit with about 4 rows each: ~130 work items, ~3100 gate_up
and ~4200 down blocks, 2.4 GB of weights, each expert streamed once per row tile (once for
almost all experts). Prefill (hundreds of rows per expert) would want ROWS = 64 and a
register-blocked tile per thread; these constants are the decode design. Not yet measured on
a GPU.

Dtypes: x, weights and the expert tensors may be float32, float64 (rounded to float32 on the
host), float16 or bfloat16 (ml_dtypes; converted exactly to float32 on the host), one dtype for
all; indices any integer dtype (int32 on the device). Compute and accumulation in float32;
outputs float32. The launch layer takes float32 / int32 C-contiguous arrays only.

Not supported: I = 0 (an expert without intermediate features; the reference allows it,
ShapeError here); more than 2**31 - 1 pairs or elements per array (int32 offsets); the
input-major (Llama 4) and interleaved (gpt-oss) weight layouts on the device (:func:`moe_block`
converts gpt-oss's on the host, only for the routed experts); quantized weights.

Checked against: :func:`refimpl.moe.dispatch` with :func:`refimpl.experts.swiglu_expert` /
:func:`refimpl.experts.clamped_swiglu` in float64 (``tests/test_kernels_moe.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError, RefimplError, ShapeError
from ..linear import linear
from ..mlp import ACTIVATIONS
from ..moe import _check as _check_dispatch
from ..numerics import FLOAT_DTYPES, as_float_array, check_finite_positive, check_same_dtype
from ..routers import router_logits, softmax_top_k, top_k_softmax
from ._numba import SIMULATOR, cuda, float32, int32

ROWS = 8
FEATS = 32
GROUPS = 4
K_TILE = 128
ROUTE_THREADS = 256
SCAN_THREADS = 128
COMBINE_THREADS = 128

#: Activation codes passed to :func:`gate_up_kernel` (``act``).
ACT_SILU, ACT_GELU_TANH, ACT_GELU, ACT_CLAMPED = 0, 1, 2, 3
_ACT_CODES = {"silu": ACT_SILU, "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu": ACT_GELU}


@dataclass(frozen=True)
class MoeTiles:
    """Tile sizes of one build of the kernels (defaults: the module constants).

    The GEMM blocks have ``feats * groups`` threads; ``groups`` must divide ``rows`` and
    ``k_tile``, and the threads must divide the ``rows * k_tile`` row tile (each thread stages
    the same number of elements). Other values than the defaults serve the simulator tests
    (tiny tiles that tiny shapes straddle) and tuning.
    """

    rows: int = ROWS
    feats: int = FEATS
    groups: int = GROUPS
    k_tile: int = K_TILE
    route_threads: int = ROUTE_THREADS
    scan_threads: int = SCAN_THREADS
    combine_threads: int = COMBINE_THREADS

    def __post_init__(self):
        threads = self.feats * self.groups
        if (min(vars(self).values()) < 1 or self.rows % self.groups or self.k_tile % self.groups
                or self.rows * self.k_tile % threads):
            raise ConfigError(f"MoeTiles: sizes must be positive, groups must divide rows and k_tile, and "
                              f"feats * groups must divide rows * k_tile; got {self}")


#: The GPU build (the module constants).
GPU_TILES = MoeTiles()
#: Small blocks (8 threads) for numba's CUDA simulator, where every simulated thread is a Python
#: thread and a barrier costs milliseconds: the same kernels, still two groups per K step.
SIMULATOR_TILES = MoeTiles(rows=4, feats=4, groups=2, k_tile=8, route_threads=16, scan_threads=8,
                           combine_threads=16)
#: What the public launchers use: GPU_TILES, or SIMULATOR_TILES under the simulator.
TILES = SIMULATOR_TILES if SIMULATOR else GPU_TILES


# --- activations (device functions, float32 in and out) --------------------------------------------------------


@cuda.jit(device=True, inline="always")
def _silu(z):
    return z / (float32(1.0) + math.exp(-z))


@cuda.jit(device=True, inline="always")
def _gelu_tanh(z):
    inner = float32(0.7978845608028654) * (z + float32(0.044715) * z * z * z)
    return float32(0.5) * z * (float32(1.0) + math.tanh(inner))


@cuda.jit(device=True, inline="always")
def _gelu(z):
    return float32(0.5) * z * (float32(1.0) + math.erf(z * float32(0.7071067811865476)))


@cuda.jit(device=True, inline="always")
def _clamped_swiglu(gate, up, limit, alpha):
    # refimpl.experts.clamped_swiglu: gate clamped from above only, up on both sides, then up + 1.
    g = min(gate, limit)
    u = min(max(up, -limit), limit)
    return (u + float32(1.0)) * (g / (float32(1.0) + math.exp(-alpha * g)))


@cuda.jit(device=True, inline="always")
def _activate(act, gate, up, limit, alpha):
    """``act(gate) * up`` for the activation code ``act`` (ACT_*)."""
    if act == ACT_CLAMPED:
        return _clamped_swiglu(gate, up, limit, alpha)
    if act == ACT_GELU_TANH:
        return _gelu_tanh(gate) * up
    if act == ACT_GELU:
        return _gelu(gate) * up
    return _silu(gate) * up


# --- 1-3: routing, a stable counting sort of the (token, slot) pairs by expert ----------------------------------


@cuda.jit
def route_count_kernel(indices, rank, tile_counts):
    """Per tile of blockDim pairs: expert histogram (atomics) and each pair's rank within the tile.

    Grid ceil(P / blockDim); dynamic shared memory blockDim int32.
    """
    tile_experts = cuda.shared.array(0, int32)
    t = cuda.threadIdx.x
    tile = cuda.blockIdx.x
    top_k = indices.shape[1]
    p = tile * cuda.blockDim.x + t
    for e in range(t, tile_counts.shape[1], cuda.blockDim.x):
        tile_counts[tile, e] = 0
    expert = -1
    if p < indices.shape[0] * top_k:
        expert = indices[p // top_k, p % top_k]
    tile_experts[t] = expert
    cuda.syncthreads()
    if expert >= 0:
        # Rank: earlier pairs of this tile that chose the same expert (keeps the sort stable).
        before = 0
        for other in range(t):
            if tile_experts[other] == expert:
                before += 1
        rank[p] = before
        cuda.atomic.add(tile_counts, (tile, expert), 1)


@cuda.jit
def route_scan_kernel(tile_counts, tile_base, expert_offsets, work_expert, work_start, num_work, rows):
    """One block: expert offsets (exclusive scan over E), per-tile bases and the GEMM work list.

    Dynamic shared memory 2 blockDim int32: the running counts and row tiles of one chunk of
    blockDim experts, scanned in place (Hillis-Steele), with a carry from chunk to chunk.
    """
    scan = cuda.shared.array(0, int32)
    t = cuda.threadIdx.x
    width = cuda.blockDim.x
    num_tiles, num_experts = tile_counts.shape
    count_carry = 0
    work_carry = 0
    if t == 0:
        expert_offsets[0] = 0
    for e0 in range(0, num_experts, width):
        e = e0 + t
        count = 0
        if e < num_experts:
            for tile in range(num_tiles):
                count += tile_counts[tile, e]
        work = (count + rows - 1) // rows
        scan[t] = count
        scan[width + t] = work
        cuda.syncthreads()
        step = 1
        while step < width:
            c = scan[t]
            w = scan[width + t]
            if t >= step:
                c += scan[t - step]
                w += scan[width + t - step]
            cuda.syncthreads()
            scan[t] = c
            scan[width + t] = w
            cuda.syncthreads()
            step *= 2
        if e < num_experts:
            start = count_carry + scan[t] - count
            first_work = work_carry + scan[width + t] - work
            expert_offsets[e + 1] = start + count
            base = start
            for tile in range(num_tiles):
                tile_base[tile, e] = base
                base += tile_counts[tile, e]
            for i in range(work):
                work_expert[first_work + i] = e
                work_start[first_work + i] = start + i * rows
        count_carry += scan[width - 1]
        work_carry += scan[2 * width - 1]
        # Every thread has read the chunk's totals before the next chunk overwrites them.
        cuda.syncthreads()
    if t == 0:
        num_work[0] = work_carry


@cuda.jit
def route_scatter_kernel(indices, rank, tile_base, sorted_pairs):
    """Pair p to sorted position ``tile_base[tile, e] + rank[p]``; same grid and block as route_count."""
    top_k = indices.shape[1]
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if p < indices.shape[0] * top_k:
        expert = indices[p // top_k, p % top_k]
        sorted_pairs[tile_base[cuda.blockIdx.x, expert] + rank[p]] = p


# --- 4-5: the per-expert GEMMs over the gathered rows ----------------------------------------------------------
#
# Every index below is unsigned (np.uint32): numba adds a negative-index wraparound (three 64-bit
# instructions per axis) to every signed subscript, and those stop LLVM from unrolling the tile
# loops. Unsigned values are compared only with unsigned ones or int32 (uint64 against int64 would
# be promoted to float64).


@functools.lru_cache(maxsize=None)
def gemm_kernels(rows: int, feats: int, groups: int, k_tile: int) -> tuple[Callable, Callable]:
    """``(gate_up_kernel, down_kernel)`` built for one tile shape (compile-time constants: the
    shared-memory tiles, register staging and accumulators are sized by them)."""
    threads = feats * groups
    w_rows = 2 * feats
    # +1 column: the compute loop reads w_tile down a column (lanes f = 0..31), conflict-free.
    k_pad = k_tile + 1
    k_split = k_tile // groups
    rows_per_group = rows // groups
    w_loads = w_rows * k_tile // threads
    x_loads = rows * k_tile // threads
    # The same sizes as unsigned constants for index arithmetic.
    u_threads, u_feats, u_k_tile, u_k_split = (np.uint32(v) for v in (threads, feats, k_tile, k_split))
    u_rows, u_rows_per_group = np.uint32(rows), np.uint32(rows_per_group)

    @cuda.jit(device=True, inline="always")
    def stage(w_tile, x_tile, w_regs, x_regs, tid):
        # Registers -> shared: element tid + u * threads of each flat tile (consecutive lanes, consecutive columns).
        for u in range(np.uint32(w_loads)):
            idx = tid + u * u_threads
            w_tile[idx // u_k_tile, idx % u_k_tile] = w_regs[u]
        for u in range(np.uint32(x_loads)):
            idx = tid + u * u_threads
            x_tile[idx // u_k_tile, idx % u_k_tile] = x_regs[u]

    @cuda.jit(device=True, inline="always")
    def accumulate(w_tile, x_tile, acc, f, g, nrows):
        # Group g's share of the K step: acc[r] += (W row f, W row FEATS + f) . x row r over its k_split columns.
        for cc in range(u_k_split):
            c = g * u_k_split + cc
            w0 = w_tile[f, c]
            w1 = w_tile[u_feats + f, c]
            for r in range(u_rows):
                # Rows past the tile's are zeros: stop (one branch, not one per idle row).
                if r >= nrows:
                    break
                xv = x_tile[r, c]
                acc[r, 0] += w0 * xv
                acc[r, 1] += w1 * xv

    @cuda.jit(device=True, inline="always")
    def reduce_groups(partial, f, r):
        # Sum of the groups' partial dot products for row r, in group order (deterministic).
        first = float32(0.0)
        second = float32(0.0)
        for other in range(np.uint32(groups)):
            first += partial[other, r, 0, f]
            second += partial[other, r, 1, f]
        return first, second

    @cuda.jit(device=True, inline="always")
    def publish(partial, acc, f, g):
        # Group g's partial sums, all ROWS rows, for the cross-group sum.
        for r in range(u_rows):
            partial[g, r, 0, f] = acc[r, 0]
            partial[g, r, 1, f] = acc[r, 1]

    @cuda.jit(device=True, inline="always")
    def fetch_rows(x_regs, x, row_token, row_scale, nrows, k0, n_hidden, tid):
        # Gathered token rows (times w for weight_on "input"); zeros past the tile's rows or M.
        for u in range(np.uint32(x_loads)):
            idx = tid + u * u_threads
            r = idx // u_k_tile
            col = k0 + idx % u_k_tile
            v = float32(0.0)
            if r < nrows and col < n_hidden:
                v = x[row_token[r], col] * row_scale[r]
            x_regs[u] = v

    @cuda.jit(device=True, inline="always")
    def fetch_gate_up(w_regs, gate_up_proj, expert, feat0, k0, n_inter, n_hidden, tid):
        # Rows 0..FEATS-1 of the tile: gate rows feat0 + j; rows FEATS..: the matching up rows I + feat0 + j.
        for u in range(np.uint32(w_loads)):
            idx = tid + u * u_threads
            j = idx // u_k_tile
            feat = feat0 + j % u_feats
            col = k0 + idx % u_k_tile
            v = float32(0.0)
            if feat < n_inter and col < n_hidden:
                v = gate_up_proj[expert, (j // u_feats) * n_inter + feat, col]
            w_regs[u] = v

    @cuda.jit(device=True, inline="always")
    def fetch_h(x_regs, h, start, nrows, k0, n_inter, tid):
        for u in range(np.uint32(x_loads)):
            idx = tid + u * u_threads
            r = idx // u_k_tile
            col = k0 + idx % u_k_tile
            v = float32(0.0)
            if r < nrows and col < n_inter:
                v = h[start + r, col]
            x_regs[u] = v

    @cuda.jit(device=True, inline="always")
    def fetch_down(w_regs, down_proj, expert, feat0, k0, n_hidden, n_inter, tid):
        # 2 FEATS consecutive rows (output features) of down_proj[expert].
        for u in range(np.uint32(w_loads)):
            idx = tid + u * u_threads
            feat = feat0 + idx // u_k_tile
            col = k0 + idx % u_k_tile
            v = float32(0.0)
            if feat < n_hidden and col < n_inter:
                v = down_proj[expert, feat, col]
            w_regs[u] = v

    @cuda.jit
    def gate_up_kernel(x, weights, sorted_pairs, expert_offsets, work_expert, work_start, num_work,
                       gate_up_proj, gate_up_bias, h, weight_input, act, has_bias, limit, alpha):
        """``h[start + r, feat] = act(gate . x_r + b) * (up . x_r + b)`` for the ROWS rows of one work
        item and FEATS features. Grid (work items, ceil(I / FEATS)), FEATS * GROUPS threads."""
        w_tile = cuda.shared.array((w_rows, k_pad), float32)
        x_tile = cuda.shared.array((rows, k_pad), float32)
        partial = cuda.shared.array((groups, rows, 2, feats), float32)
        row_token = cuda.shared.array(rows, np.uint32)
        row_scale = cuda.shared.array(rows, float32)
        w_regs = cuda.local.array(w_loads, float32)
        x_regs = cuda.local.array(x_loads, float32)
        acc = cuda.local.array((rows, 2), float32)
        item = cuda.blockIdx.x
        if item >= num_work[0]:
            return
        expert = np.uint32(work_expert[item])
        start = np.uint32(work_start[item])
        nrows = np.uint32(min(rows, expert_offsets[work_expert[item] + 1] - work_start[item]))
        n_hidden = np.uint32(x.shape[1])
        n_inter = np.uint32(h.shape[1])
        top_k = np.uint32(weights.shape[1])
        tid = np.uint32(cuda.threadIdx.x)
        f = tid % u_feats
        g = tid // u_feats
        feat0 = np.uint32(cuda.blockIdx.y) * u_feats
        # The tile's gathered rows: token of each, and w on the input for weight_on "input".
        if tid < nrows:
            p = np.uint32(sorted_pairs[start + tid])
            row_token[tid] = p // top_k
            row_scale[tid] = weights[p // top_k, p % top_k] if weight_input else float32(1.0)
        for r in range(u_rows):
            acc[r, 0] = float32(0.0)
            acc[r, 1] = float32(0.0)
        cuda.syncthreads()
        # K loop over M: the next step's loads are in flight (registers) while this step computes.
        fetch_gate_up(w_regs, gate_up_proj, expert, feat0, np.uint32(0), n_inter, n_hidden, tid)
        fetch_rows(x_regs, x, row_token, row_scale, nrows, np.uint32(0), n_hidden, tid)
        for k0 in range(np.uint32(0), n_hidden, u_k_tile):
            stage(w_tile, x_tile, w_regs, x_regs, tid)
            cuda.syncthreads()
            if k0 + u_k_tile < n_hidden:
                fetch_gate_up(w_regs, gate_up_proj, expert, feat0, k0 + u_k_tile, n_inter, n_hidden, tid)
                fetch_rows(x_regs, x, row_token, row_scale, nrows, k0 + u_k_tile, n_hidden, tid)
            accumulate(w_tile, x_tile, acc, f, g, nrows)
            cuda.syncthreads()
        publish(partial, acc, f, g)
        cuda.syncthreads()
        # Epilogue, group g's rows: sum over groups, biases, activation.
        feat = feat0 + f
        if feat < n_inter:
            bias_gate = float32(0.0)
            bias_up = float32(0.0)
            if has_bias:
                bias_gate = gate_up_bias[expert, feat]
                bias_up = gate_up_bias[expert, n_inter + feat]
            for i in range(u_rows_per_group):
                r = g * u_rows_per_group + i
                if r < nrows:
                    gate, up = reduce_groups(partial, f, r)
                    h[start + r, feat] = _activate(act, gate + bias_gate, up + bias_up, limit, alpha)

    @cuda.jit
    def down_kernel(h, weights, sorted_pairs, expert_offsets, work_expert, work_start, num_work,
                    down_proj, down_bias, pair_out, weight_output, has_bias):
        """``pair_out[pair, feat] = s * (D_e[feat] . h_r + d_e[feat])`` for the ROWS rows of one work
        item and 2 FEATS features. Grid (work items, ceil(M / (2 FEATS))), FEATS * GROUPS threads."""
        w_tile = cuda.shared.array((w_rows, k_pad), float32)
        x_tile = cuda.shared.array((rows, k_pad), float32)
        partial = cuda.shared.array((groups, rows, 2, feats), float32)
        row_pair = cuda.shared.array(rows, np.uint32)
        row_scale = cuda.shared.array(rows, float32)
        w_regs = cuda.local.array(w_loads, float32)
        x_regs = cuda.local.array(x_loads, float32)
        acc = cuda.local.array((rows, 2), float32)
        item = cuda.blockIdx.x
        if item >= num_work[0]:
            return
        expert = np.uint32(work_expert[item])
        start = np.uint32(work_start[item])
        nrows = np.uint32(min(rows, expert_offsets[work_expert[item] + 1] - work_start[item]))
        n_inter = np.uint32(h.shape[1])
        n_hidden = np.uint32(pair_out.shape[1])
        top_k = np.uint32(weights.shape[1])
        tid = np.uint32(cuda.threadIdx.x)
        f = tid % u_feats
        g = tid // u_feats
        feat0 = np.uint32(cuda.blockIdx.y) * np.uint32(w_rows)
        # The tile's pairs, and w on the output for weight_on "output".
        if tid < nrows:
            p = np.uint32(sorted_pairs[start + tid])
            row_pair[tid] = p
            row_scale[tid] = weights[p // top_k, p % top_k] if weight_output else float32(1.0)
        for r in range(u_rows):
            acc[r, 0] = float32(0.0)
            acc[r, 1] = float32(0.0)
        cuda.syncthreads()
        # K loop over I, prefetching like gate_up_kernel.
        fetch_down(w_regs, down_proj, expert, feat0, np.uint32(0), n_hidden, n_inter, tid)
        fetch_h(x_regs, h, start, nrows, np.uint32(0), n_inter, tid)
        for k0 in range(np.uint32(0), n_inter, u_k_tile):
            stage(w_tile, x_tile, w_regs, x_regs, tid)
            cuda.syncthreads()
            if k0 + u_k_tile < n_inter:
                fetch_down(w_regs, down_proj, expert, feat0, k0 + u_k_tile, n_hidden, n_inter, tid)
                fetch_h(x_regs, h, start, nrows, k0 + u_k_tile, n_inter, tid)
            accumulate(w_tile, x_tile, acc, f, g, nrows)
            cuda.syncthreads()
        publish(partial, acc, f, g)
        cuda.syncthreads()
        # Epilogue, group g's rows: features feat0 + f and feat0 + FEATS + f, written by pair id.
        for i in range(u_rows_per_group):
            r = g * u_rows_per_group + i
            if r < nrows:
                first, second = reduce_groups(partial, f, r)
                for half in range(np.uint32(2)):
                    feat = feat0 + half * u_feats + f
                    if feat < n_hidden:
                        bias = down_bias[expert, feat] if has_bias else float32(0.0)
                        dot = first if half == 0 else second
                        pair_out[row_pair[r], feat] = row_scale[r] * (dot + bias)

    return gate_up_kernel, down_kernel


gate_up_kernel, down_kernel = gemm_kernels(ROWS, FEATS, GROUPS, K_TILE)


# --- 6: combine --------------------------------------------------------------------------------------------------


@cuda.jit
def combine_kernel(pair_out, out, top_k):
    """``out[n] = sum_j pair_out[n k + j]`` in slot order. Grid (N, ceil(M / blockDim))."""
    n = cuda.blockIdx.x
    col = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if col < out.shape[1]:
        total = float32(0.0)
        for j in range(top_k):
            total += pair_out[n * top_k + j, col]
        out[n, col] = total


# --- device-level launcher ---------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _scratch(dtype, *shapes: tuple[int, ...]) -> list:
    """C-contiguous device arrays of ``shapes`` carved from one ``cuda.device_array``: numba's default
    memory manager calls cuMemAlloc for every array, which would cost more than a decode step's kernels."""
    sizes = [math.prod(shape) for shape in shapes]
    buffer = cuda.device_array(sum(sizes), dtype)
    views, offset = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buffer[offset:offset + size].reshape(shape))
        offset += size
    return views


def launch_moe(x, weights, indices, gate_up_proj, down_proj, out, *, activation, weight_on, swiglu_limit, alpha,
               gate_up_bias, down_bias, tiles: MoeTiles = GPU_TILES) -> None:
    """Run the six kernels: ``out = dispatch(x, weights, indices, expert)``; no checks, no host copies.

    Args:
        x: ``(N, M)`` float32. weights: ``(N, k)`` float32. indices: ``(N, k)`` int32 in [0, E),
            distinct per row.
        gate_up_proj: ``(E, 2I, M)`` float32, gate rows first. down_proj: ``(E, M, I)`` float32.
        out: ``(N, M)`` float32, overwritten entirely.
        activation: "silu", "gelu_pytorch_tanh" or "gelu" (ignored when ``swiglu_limit`` is set).
        weight_on: "output" or "input".
        swiglu_limit: None, or L > 0 for gpt-oss's clamped SwiGLU with ``alpha``.
        gate_up_bias: None or ``(E, 2I)`` float32 (gate half first). down_bias: None or ``(E, M)``.
        tiles: the tile sizes (:class:`MoeTiles`).

    All arrays C-contiguous, device arrays or NumPy arrays; N, k, M, I >= 1. Scratch
    (routing tables, ``h`` (P, I), ``pair_out`` (P, M)) comes from two ``cuda.device_array``
    calls (:func:`_scratch`).
    """
    n_tokens, n_hidden = x.shape
    top_k = indices.shape[1]
    num_experts, n_inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    pairs = n_tokens * top_k
    route_tiles = _ceil_div(pairs, tiles.route_threads)
    max_work = pairs // tiles.rows + min(num_experts, pairs)

    rank, tile_counts, tile_base, expert_offsets, work_expert, work_start, num_work, sorted_pairs = _scratch(
        np.int32, (pairs,), (route_tiles, num_experts), (route_tiles, num_experts), (num_experts + 1,),
        (max_work,), (max_work,), (1,), (pairs,))
    h, pair_out = _scratch(np.float32, (pairs, n_inter), (pairs, n_hidden))

    route_count_kernel[route_tiles, tiles.route_threads, 0, 4 * tiles.route_threads](indices, rank, tile_counts)
    route_scan_kernel[1, tiles.scan_threads, 0, 8 * tiles.scan_threads](
        tile_counts, tile_base, expert_offsets, work_expert, work_start, num_work, np.int32(tiles.rows))
    route_scatter_kernel[route_tiles, tiles.route_threads](indices, rank, tile_base, sorted_pairs)

    gate_up, down = gemm_kernels(tiles.rows, tiles.feats, tiles.groups, tiles.k_tile)
    threads = tiles.feats * tiles.groups
    act = ACT_CLAMPED if swiglu_limit is not None else _ACT_CODES[activation]
    # Without a bias the kernels get a stand-in float32 matrix (weights) that they never read.
    gate_up[(max_work, _ceil_div(n_inter, tiles.feats)), threads](
        x, weights, sorted_pairs, expert_offsets, work_expert, work_start, num_work, gate_up_proj,
        weights if gate_up_bias is None else gate_up_bias, h, np.int32(weight_on == "input"), np.int32(act),
        np.int32(gate_up_bias is not None), np.float32(swiglu_limit or 0.0), np.float32(alpha))
    down[(max_work, _ceil_div(n_hidden, 2 * tiles.feats)), threads](
        h, weights, sorted_pairs, expert_offsets, work_expert, work_start, num_work, down_proj,
        weights if down_bias is None else down_bias, pair_out, np.int32(weight_on == "output"),
        np.int32(down_bias is not None))
    combine_kernel[(n_tokens, _ceil_div(n_hidden, tiles.combine_threads)), tiles.combine_threads](
        pair_out, out, np.int32(top_k))


# --- public launchers: the reference's signatures ---------------------------------------------------------------


def _as_float32(name: str, **arrays) -> dict[str, np.ndarray | None]:
    """The float arrays (None passes through) of one dtype, as float32 C-contiguous arrays."""
    given = {k: as_float_array(f"{name}: {k}", v, dtypes=FLOAT_DTYPES) for k, v in arrays.items() if v is not None}
    try:
        check_same_dtype(**given)
    except RefimplError as exc:
        raise RefimplError(f"{name}: {exc}") from None
    return {k: (np.ascontiguousarray(given[k], dtype=np.float32) if k in given else None) for k in arrays}


def _check_experts(name: str, hidden: int, a: dict) -> None:
    gate_up, down, b1, b2 = a["gate_up_proj"], a["down_proj"], a["gate_up_bias"], a["down_bias"]
    if gate_up.ndim != 3 or down.ndim != 3:
        raise ShapeError(f"{name}: gate_up_proj {gate_up.shape} and down_proj {down.shape} must be 3-D expert "
                         "stacks (E, 2I, M) and (E, M, I)")
    e, two_i = gate_up.shape[:2]
    if gate_up.shape[2] != hidden or two_i % 2 or down.shape != (e, hidden, two_i // 2):
        raise ShapeError(f"{name}: x (N, {hidden}), gate_up_proj {gate_up.shape} and down_proj {down.shape} do not "
                         "fit (need x (N, M), gate_up_proj (E, 2I, M), down_proj (E, M, I))")
    if two_i == 0:
        raise ShapeError(f"{name}: experts with I = 0 intermediate features are not supported by the kernel")
    if b1 is not None and b1.shape != (e, two_i) or b2 is not None and b2.shape != (e, hidden):
        raise ShapeError(f"{name}: gate_up_bias {getattr(b1, 'shape', None)} and down_bias "
                         f"{getattr(b2, 'shape', None)} must be ({e}, {two_i}) and ({e}, {hidden})")


def _check_activation(name: str, hidden_act, swiglu_limit, alpha) -> None:
    if not isinstance(hidden_act, str) or hidden_act not in _ACT_CODES:
        raise ConfigError(f"{name}: activation {hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
    if swiglu_limit is not None:
        if hidden_act != "silu":
            raise ConfigError(f"{name}: swiglu_limit selects gpt-oss's clamped SwiGLU; hidden_act must be 'silu', "
                              f"got {hidden_act!r}")
        check_finite_positive(f"{name}: swiglu_limit", swiglu_limit, error=ConfigError)
        check_finite_positive(f"{name}: alpha", alpha, error=ConfigError)


def _run(x, weights, indices, a: dict, out_shape: tuple, **options) -> np.ndarray:
    """Copy to the device, launch into a NaN-poisoned output, copy back (tiles: the module's TILES)."""
    if 0 in out_shape or indices.shape[1] == 0:
        # Nothing to launch: no features, no tokens, or tokens routed nowhere (zero rows, as dispatch).
        return np.zeros(out_shape, np.float32)
    out = np.full(out_shape, np.nan, np.float32)
    dev = {k: (None if v is None else cuda.to_device(v)) for k, v in a.items()}
    d_out = cuda.to_device(out)
    launch_moe(cuda.to_device(x), cuda.to_device(weights), cuda.to_device(indices.astype(np.int32)),
               dev["gate_up_proj"], dev["down_proj"], d_out, gate_up_bias=dev["gate_up_bias"],
               down_bias=dev["down_bias"], tiles=TILES, **options)
    return d_out.copy_to_host()


def moe_experts(
    x: np.ndarray, weights: np.ndarray, indices: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray, *,
    hidden_act: str = "silu", weight_on: str = "output", swiglu_limit: float | None = None, alpha: float = 1.702,
    gate_up_bias: np.ndarray | None = None, down_bias: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`refimpl.moe.dispatch` over stacked SwiGLU experts, on the GPU.

    Args:
        x: ``(N, M)``. weights, indices: ``(N, k)`` (indices integers in [0, E), distinct per row).
        gate_up_proj: ``(E, 2I, M)``, gate rows first. down_proj: ``(E, M, I)``.
        hidden_act: "silu", "gelu_pytorch_tanh" or "gelu" (expert e is
            ``swiglu_expert(rows, gate_up_proj[e], down_proj[e], hidden_act)``).
        weight_on: "output" (``w * Expert(x)``) or "input" (``Expert(w * x)``, Llama 4).
        swiglu_limit, alpha: with a limit, gpt-oss's ``clamped_swiglu(gate, up)`` replaces
            ``act(gate) * up`` (hidden_act must then be "silu").
        gate_up_bias: ``(E, 2I)`` (gate half first) or None. down_bias: ``(E, M)`` or None; part
            of the expert output (scaled by w with it).

    Returns:
        ``(N, M)`` float32; tokens with k = 0 slots get zeros.

    Dtype: see the module docstring (float32 compute, float16 / bfloat16 / float64 inputs
    converted on the host).

    Raises:
        InputError, ShapeError, ConfigError, RefimplError: as :func:`refimpl.moe.dispatch` (same
        checks) and :func:`refimpl.experts.swiglu_expert`; ConfigError for an unknown
        activation, a hidden_act other than silu with swiglu_limit, a non-finite or
        non-positive swiglu_limit / alpha; ShapeError for biases that do not fit or I = 0.
    """
    name = "moe_experts"
    a = _as_float32(name, x=x, weights=weights, gate_up_proj=gate_up_proj, down_proj=down_proj,
                    gate_up_bias=gate_up_bias, down_bias=down_bias)
    if a["gate_up_proj"].ndim != 3:
        raise ShapeError(f"{name}: gate_up_proj must be a 3-D expert stack (E, 2I, M), got {a['gate_up_proj'].shape}")
    xs, ws, idx = _check_dispatch(name, a.pop("x"), a.pop("weights"), indices, a["gate_up_proj"].shape[0], weight_on)
    _check_experts(name, xs.shape[1], a)
    _check_activation(name, hidden_act, swiglu_limit, alpha)
    return _run(xs, ws, idx, a, xs.shape, activation=hidden_act, weight_on=weight_on, swiglu_limit=swiglu_limit,
                alpha=alpha)


def swiglu_mlp(x: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray, hidden_act: str = "silu") -> np.ndarray:
    """:func:`refimpl.experts.swiglu_expert` (a dense MLP or a shared expert) through the MoE kernels:
    one expert, every row routed to it with weight 1.

    Args:
        x: ``(n, M)``. gate_up_proj: ``(2I, M)`` gate rows first. down_proj: ``(M, I)``.
        hidden_act: "silu", "gelu_pytorch_tanh" or "gelu".

    Returns:
        ``(n, M)`` float32.

    Raises:
        InputError, ShapeError, RefimplError, ConfigError: as :func:`refimpl.experts.swiglu_expert`.
    """
    name = "swiglu_mlp"
    a = _as_float32(name, x=x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    xs = a.pop("x")
    if xs.ndim != 2 or a["gate_up_proj"].ndim != 2 or a["down_proj"].ndim != 2:
        raise ShapeError(f"{name}: x {xs.shape}, gate_up_proj {a['gate_up_proj'].shape} and down_proj "
                         f"{a['down_proj'].shape} must be (n, M), (2I, M) and (M, I)")
    a = {"gate_up_proj": a["gate_up_proj"][None], "down_proj": a["down_proj"][None], "gate_up_bias": None,
         "down_bias": None}
    _check_experts(name, xs.shape[1], a)
    _check_activation(name, hidden_act, None, None)
    ones = np.ones((xs.shape[0], 1), np.float32)
    return _run(xs, ones, np.zeros((xs.shape[0], 1), np.int32), a, xs.shape, activation=hidden_act,
                weight_on="output", swiglu_limit=None, alpha=1.0)


# --- model blocks: host routers, kernel experts -----------------------------------------------------------------


def _routed_stack(name: str, chosen: np.ndarray, expert_weights: Callable) -> tuple[np.ndarray, ...]:
    """``(gate_up (U, 2I, M), down (U, M, I), local indices)`` over the U experts ``chosen`` names,
    asking ``expert_weights(e)`` once per routed expert, in expert order."""
    used = np.unique(chosen)
    pairs = [tuple(np.asarray(w) for w in expert_weights(int(e))) for e in used]
    shapes = {(g.shape, d.shape) for g, d in pairs}
    if len(shapes) > 1:
        raise ShapeError(f"{name}: routed experts {used.tolist()} have different weight shapes {sorted(shapes)}")
    return np.stack([g for g, _ in pairs]), np.stack([d for _, d in pairs]), np.searchsorted(used, chosen)


def sparse_moe(x: np.ndarray, router, expert_weights: Callable[[int], tuple[np.ndarray, np.ndarray]],
               config) -> np.ndarray:
    """:func:`refimpl.models.qwen3_moe.sparse_moe` and :func:`refimpl.models.qwen3_next.sparse_moe`.

    Args:
        x: ``(B, T, M)``.
        router: Qwen3-MoE: the router ``(E, M)``. Qwen3-Next: the mapping that function takes
            (``"gate.weight"`` (E, M), ``"shared_expert.{gate,up,down}_proj.weight"``,
            ``"shared_expert_gate.weight"`` (1, M)); the shared expert then runs through the
            same kernels as one expert whose routing weight is its sigmoid gate.
        expert_weights: ``e -> (gate_up_proj (2I, M), down_proj (M, I))``, asked only of the
            routed experts, which are stacked compactly (U <= E) with the indices remapped.
        config: the model's config dataclass (``hidden_size``, ``num_experts_per_tok``,
            ``norm_topk_prob``, ``hidden_act``).

    Returns:
        ``(B, T, M)`` float32.

    The router (softmax over E, top-k, optional renormalisation: :func:`refimpl.routers.softmax_top_k`)
    runs on the host in the dtype of ``x``; it is not a hot path.

    Raises:
        as the reference function; ShapeError for routed experts of different shapes.
    """
    name = "sparse_moe"
    block = router if isinstance(router, Mapping) else None
    rows = np.asarray(x).reshape(-1, config.hidden_size)
    # The reference's router: float32 scores for float16 / bfloat16 rows (refimpl.routers.router_logits).
    logits = router_logits(rows, block["gate.weight"] if block is not None else router)
    routing, chosen = softmax_top_k(logits, config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob)
    if rows.shape[0] == 0:
        return np.zeros(np.shape(x), np.float32)
    gate_up, down, local = _routed_stack(name, chosen, expert_weights)
    out = moe_experts(rows, routing, local, gate_up, down, hidden_act=config.hidden_act)
    if block is not None:
        out = out + _gated_shared_expert(rows, block, config.hidden_act)
    return out.reshape(np.shape(x))


def _gated_shared_expert(rows: np.ndarray, block: Mapping, hidden_act: str) -> np.ndarray:
    """Qwen3-Next: ``sigmoid(x w_sg) * SharedMLP(x)``, the sigmoid gate (host) as the routing weight."""
    with np.errstate(over="ignore"):
        gate = 1 / (1 + np.exp(-linear(rows, block["shared_expert_gate.weight"])))
    gate_up = np.concatenate([block["shared_expert.gate_proj.weight"], block["shared_expert.up_proj.weight"]])
    return moe_experts(rows, gate, np.zeros(gate.shape, np.int32), gate_up[None],
                       np.asarray(block["shared_expert.down_proj.weight"])[None], hidden_act=hidden_act)


def moe_block(hidden_states: np.ndarray, weights: dict[str, np.ndarray], config) -> np.ndarray:
    """:func:`refimpl.models.gpt_oss.moe_block`: biased top-k-softmax router on the host, clamped
    SwiGLU experts on the GPU.

    gpt-oss stores its experts input-major with gate and up interleaved (``gate_up_proj[e]``
    (M, 2I), column 2j gate j, 2j+1 up j; ``down_proj[e]`` (I, M)). For the routed experts
    only, the host converts to the kernel layout: gate_up rows ``[G^T[0::2]; G^T[1::2]]``
    (2I, M), the bias likewise de-interleaved (gate half first), ``down_proj[e]^T`` (M, I).
    An engine would convert once at load time.

    Args, returns, raises: as the reference function (output float32).
    """
    from ..models.gpt_oss import NAME, GptOssConfig, _moe_weights

    config = config if isinstance(config, GptOssConfig) else GptOssConfig.from_dict(config)
    x = as_float_array(f"{NAME} moe_block: hidden_states", hidden_states, ndim=3)
    b, t, m = x.shape
    rows = x.reshape(b * t, m)
    w = _moe_weights(weights, rows)
    routing, indices = top_k_softmax(router_logits(rows, w["router.weight"], w["router.bias"]),
                                     config.num_experts_per_tok)
    if rows.shape[0] == 0:
        return np.zeros(x.shape, np.float32)
    used = np.unique(indices)
    gate_up, bias = w["experts.gate_up_proj"][used], w["experts.gate_up_proj_bias"][used]
    gate_up = np.concatenate([gate_up[:, :, 0::2], gate_up[:, :, 1::2]], axis=2).transpose(0, 2, 1)
    bias = np.concatenate([bias[:, 0::2], bias[:, 1::2]], axis=1)
    out = moe_experts(rows, routing, np.searchsorted(used, indices), gate_up,
                      w["experts.down_proj"][used].transpose(0, 2, 1), swiglu_limit=config.swiglu_limit,
                      alpha=config.swiglu_alpha, gate_up_bias=bias, down_bias=w["experts.down_proj_bias"][used])
    return out.reshape(b, t, m)


KERNELS = {
    "route_count_kernel": (route_count_kernel, ["void(int32[:, ::1], int32[::1], int32[:, ::1])"]),
    "route_scan_kernel": (route_scan_kernel, [
        "void(int32[:, ::1], int32[:, ::1], int32[::1], int32[::1], int32[::1], int32[::1], int32)"]),
    "route_scatter_kernel": (route_scatter_kernel, ["void(int32[:, ::1], int32[::1], int32[:, ::1], int32[::1])"]),
    "gate_up_kernel": (gate_up_kernel, [
        "void(float32[:, ::1], float32[:, ::1], int32[::1], int32[::1], int32[::1], int32[::1], int32[::1], "
        "float32[:, :, ::1], float32[:, ::1], float32[:, ::1], int32, int32, int32, float32, float32)"]),
    "down_kernel": (down_kernel, [
        "void(float32[:, ::1], float32[:, ::1], int32[::1], int32[::1], int32[::1], int32[::1], int32[::1], "
        "float32[:, :, ::1], float32[:, ::1], float32[:, ::1], int32, int32)"]),
    "combine_kernel": (combine_kernel, ["void(float32[:, ::1], float32[:, ::1], int32)"]),
}
