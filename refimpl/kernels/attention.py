"""Softmax attention on the GPU: tiled online-softmax prefill, split-K decode with a merge pass.

Implements :func:`refimpl.attention.attention` (the op ``attention``),
:func:`refimpl.kv_cache.attend_with_cache` (every softmax attention layer of a model, through
the cache bookkeeping of :func:`refimpl.kv_cache.extend_kv`) and, under both, the masked
grouped-query attention of :func:`refimpl.attention.grouped_query_attention` with the mask of
:func:`refimpl.kv_cache.visibility` computed in the kernel from positions:

    s[r, j] = c tanh((scale q_r . k_j) / c)          (the cap only when softcap c > 0)
    p[r, j] = exp(s[r, j] - m_r) / (exp(z_h - m_r) + sum_j' visible exp(s[r, j'] - m_r))
    out[r]  = sum_j visible p[r, j] v_j               (a row that sees no key: zeros)

Query at position p sees key slot j at position kp iff ``kp >= 0`` (a negative position is an
empty or padding slot), ``kp <= p``, ``p - kp < W`` (sliding window W) and ``kp // C == p // C``
(chunked attention C): exactly :func:`refimpl.kv_cache.visibility`. The sink logit z_h (gpt-oss)
joins the denominator only; the cap (Gemma 2) applies to the scaled scores before the mask.

Rows and GQA. A block works on one (batch b, key/value head hk) and a tile of *rows*: the
``T x G`` query rows that read head hk, flattened as ``r = t G + g`` (query head
``h = hk G + g``). The G query heads sharing a key/value head sit in the same tile, so a K/V
tile staged in shared memory serves all of them; K and V are never repeated per query head.

Algorithm:

1. ``tile_bounds_kernel`` (prefill only): min and max valid key position of every BN-slot key
   tile, a pre-pass over S. A prefill block skips a key tile that no query row of its tile can
   see (all keys after the rows' last position, all older than the window, all in other
   chunks, or none valid); the per-element mask decides everything else, so correctness never
   depends on the skip. Decode does not skip: its cache holds little that no query sees (a
   sliding or chunked layer keeps W or C slots) and the pre-pass would be a third launch.
2. ``prefill`` (FlashAttention-2, Dao, arXiv:2307.08691, Algorithm 1): per key tile, the
   scores ``S = Q K^T`` of the block's BM rows and BN keys are accumulated over D in chunks of
   DK dims (Q and K chunks staged in shared memory, ``scale`` folded into Q); cap, mask, then
   the online softmax: the row maxima are reduced across the TX threads of a row through shared
   memory, the running output is rescaled by ``exp(m_old - m_new)``, and ``P = exp(S - m)`` goes
   to shared memory; ``O += P V`` with V staged BNV keys at a time. Each thread keeps its
   ``RM x KN`` scores and ``RM x NCOL`` outputs in registers; its partial row sums stay in
   shared memory until the epilogue reduces them, adds the sink and normalises.
3. ``decode`` (Flash-Decoding, Dao et al. 2023, "Flash-Decoding for long-context inference";
   split-K as in vLLM's PagedAttention v2): the same per-tile step over one *partition* of
   consecutive key tiles; grid (row tiles, partitions, B Hkv). Each block writes its
   unnormalised output, running max m and sum l to scratch.
4. ``merge_partials_kernel``: per row, ``M = max(z, max_p m_p)``,
   ``out = sum_p exp(m_p - M) o_p / (exp(z - M) + sum_p exp(m_p - M) l_p)``: the log-sum-exp
   merge, with the sink. A partition that saw no key has ``m_p = -inf`` and weight 0 (never
   ``-inf - -inf``); a row with no visible key anywhere gets zeros.

Launch configuration. Tiles are compile-time constants of a kernel (:class:`FlashTiles`,
one compiled kernel per bundle); the launch layer picks a bundle by Dv (and, for decode, by the
number of rows T G) from :data:`PREFILL_TILES` / :data:`DECODE_TILES`. Registers and shared
memory as ptxas 12.9 reports them for sm_90 (no spills):

    =========  ======  ===  =======  ==  ===  ======  =================  ====  ==========
    kernel     BM      BN   TY x TX  DK  BNV  Dv max  S, O per thread    regs  shared
    =========  ======  ===  =======  ==  ===  ======  =================  ====  ==========
    prefill    64      64   8 x 16   32  32   64      8 x 4, 8 x 4       167   42.8 KB
    prefill    64      64   8 x 16   32  16   128     8 x 4, 8 x 8       241   42.8 KB
    prefill    32      64   8 x 16   32   8   256     4 x 4, 4 x 16      241   25.6 KB
    decode     4       128  1 x 128  16  *    128/256 4 x 1, 4 x 1..2    98    15.4 KB
    decode     8       128  2 x 64   16  *    64..256 4 x 2, 4 x 1..4    155   17.8 KB
    decode     16      128  4 x 32   16  *    64..256 4 x 4, 4 x 2..8    157   22.6 KB
    =========  ======  ===  =======  ==  ===  ======  =================  ====  ==========

(a thread owns RM = BM / TY rows, KN = BN / TX keys of the score tile and NCOL = Dv max / TX
output columns, ``tx + c TX``; decode BNV = 2048 / Dv max.) Shared memory per block: a staging
buffer reused for the Q and K chunks (``(BM + BN) (DK + 1)`` floats: +1 makes reading a column
bank-conflict free) and the V sub-tile (``BNV x Dv max``), the probabilities ``BM x (BN + 1)``,
the softmax state ``BM x (2 TX + 3)`` and ``4 BM + BN`` int32. Staging loads are coalesced
(consecutive threads, consecutive dims) and go through registers LOAD_BATCH at a time, all
issued before the stores that wait on them. Array indices in the hot loops are unsigned
(:func:`ix`), which drops numba's negative-index wraparound: the ``O += P V`` loop is then 60 %
FFMA in SASS, ``Q K^T`` 50 %. Decode partitions: ``ceil(S / BN)`` key tiles split so that the
grid has about :data:`TARGET_BLOCKS` blocks (four per SM of an H200), at least one tile each.
Prefill row tiles run heaviest-first (under a causal mask the last rows see the most keys).
Nothing here has been timed on a GPU yet (``bench/gpu_kernels.py`` does that).

Under numba's CUDA simulator the launch layer uses :data:`SIMULATOR_PREFILL_TILES` /
:data:`SIMULATOR_DECODE_TILES` (2 x 2 threads per block): the same kernels with small tiles.

Dtypes: the kernels read and write float32 and accumulate in float32 (the softmax too); int32
positions. The launchers accept what the reference accepts, float32, float64, float16 and
bfloat16 (ml_dtypes), one dtype for q, k, v and sinks, converted to float32 on the host
(float64 rounded, the others exact). They return float32 for float32 / float64 inputs
(``attend_with_cache``: q's dtype, as a model expects) and, like the reference's storage-dtype
policy, the storage dtype rounded once for float16 / bfloat16. Positions must fit int32.

Not supported: Dv > 256 (D itself is unrestricted: chunked), per-row masks other than the
position rules above (MLA's explicit mask: :mod:`refimpl.kernels.mla`), paged KV caches,
backward. Value slots that no row can see still enter ``O += P V`` with weight 0, so a NaN or
inf stored there turns the output NaN, as in the reference's ``p @ v``.

Paper: Dao, FlashAttention-2, arXiv:2307.08691 (Algorithm 1, sec. 3.1-3.2); Dao, Haziza, Massa,
Sizov, Flash-Decoding (PyTorch blog, Oct. 2023); Milakov and Gimelshein, online softmax,
arXiv:1805.02867.
Checked against: :func:`refimpl.attention.grouped_query_attention` and
:func:`refimpl.kv_cache.visibility` (``tests/test_kernels_attention.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..attention import _check_shapes, _check_sinks, _float_qkv
from ..errors import InputError, RefimplError, ShapeError
from ..kv_cache import StepContext, extend_kv
from ..masks import _check_positive_int
from ..numerics import as_integer_array, check_finite_positive, check_same_dtype, compute_dtype, to_storage
from ._numba import SIMULATOR, cuda, float32, int32

#: -inf in float32: the score of an invisible key and the running max of a row that saw none.
NEG_INF = np.float32(-np.inf)
#: "No valid key in this tile" lower bound of :func:`tile_bounds_kernel`.
INT32_MAX = np.int32(np.iinfo(np.int32).max)
#: The largest value head width the kernels accumulate in registers.
DV_LIMIT = 256
#: Most threads per block of the two small kernels (key-tile bounds, partial merge); they
#: stride by ``blockDim.x``, and under the simulator (one Python thread each) use 8.
BOUNDS_THREADS = 8 if SIMULATOR else 128
MERGE_THREADS = 8 if SIMULATOR else 128
#: Global loads a thread issues before storing them to shared memory (kept in registers).
LOAD_BATCH = 8
#: Decode grids aim at this many blocks: four per SM of an H200 (132 SMs).
TARGET_BLOCKS = 528
#: ``path=None`` runs the split-K decode kernel when a call has at most this many queries.
DECODE_MAX_QUERIES = 4


@dataclass(frozen=True)
class FlashTiles:
    """The compile-time tile sizes of one prefill or decode kernel (see the module table).

    Attributes:
        block_m: BM, query rows (``r = t G + g``) per block.
        block_n: BN, keys per key tile.
        threads_y, threads_x: TY x TX threads; a thread owns rows ``ty RM + i`` and keys /
            output columns ``tx + c TX``.
        chunk_d: DK, dims of Q and K staged per step of the ``Q K^T`` loop over D.
        block_nv: BNV, keys of V staged per step of ``O += P V``.
        dv_max: the largest Dv this bundle accumulates (registers per thread: RM x Dv max / TX).
    """

    block_m: int
    block_n: int
    threads_y: int
    threads_x: int
    chunk_d: int
    block_nv: int
    dv_max: int

    def __post_init__(self):
        exact = (self.block_m % self.threads_y, self.block_n % self.threads_x, self.dv_max % self.threads_x,
                 self.block_n % self.block_nv)
        if any(exact):
            raise RefimplError(f"FlashTiles {self}: rows, keys and columns must split evenly over the threads")

    @property
    def threads(self) -> int:
        return self.threads_y * self.threads_x


#: Prefill bundles by Dv max (GPU). Dv 256 halves BM to keep 64 output registers per thread.
GPU_PREFILL_TILES = (
    FlashTiles(block_m=64, block_n=64, threads_y=8, threads_x=16, chunk_d=32, block_nv=32, dv_max=64),
    FlashTiles(block_m=64, block_n=64, threads_y=8, threads_x=16, chunk_d=32, block_nv=16, dv_max=128),
    FlashTiles(block_m=32, block_n=64, threads_y=8, threads_x=16, chunk_d=32, block_nv=8, dv_max=256),
)
#: Decode bundles by (rows per block, Dv max): 128 threads, each 4 rows x 128 / TX keys of a
#: 128-key tile (TX = 128, 64, 32 for 4, 8, 16 rows); Dv max >= TX.
GPU_DECODE_TILES = tuple(
    FlashTiles(block_m=rows, block_n=128, threads_y=rows // 4, threads_x=512 // rows, chunk_d=16,
               block_nv=2048 // dv, dv_max=dv)
    for rows in (4, 8, 16) for dv in (64, 128, 256) if dv >= 512 // rows
)
#: The same kernels with 2 x 2-thread blocks for numba's CUDA simulator, where every thread is a
#: Python thread and every array access a Python call: still two row groups and two threads per
#: row (the cross-thread reductions run), two V sub-tiles per prefill key tile.
SIMULATOR_PREFILL_TILES = tuple(
    FlashTiles(block_m=8, block_n=8, threads_y=2, threads_x=2, chunk_d=8, block_nv=4, dv_max=dv)
    for dv in (8, 16, 64, 256)
)
SIMULATOR_DECODE_TILES = tuple(
    FlashTiles(block_m=4, block_n=8, threads_y=2, threads_x=2, chunk_d=8, block_nv=8, dv_max=dv)
    for dv in (8, 16, 64, 256)
)
PREFILL_TILES = SIMULATOR_PREFILL_TILES if SIMULATOR else GPU_PREFILL_TILES
DECODE_TILES = SIMULATOR_DECODE_TILES if SIMULATOR else GPU_DECODE_TILES


def scalar_device(fn):
    """``fn``, arithmetic on scalars that uses nothing of ``cuda``, as an inlined device function;
    under the simulator ``fn`` itself (the simulator wraps device functions in a call that swaps
    module globals under a lock, which in the inner loops costs more than the arithmetic)."""
    return fn if SIMULATOR else cuda.jit(device=True, inline="always")(fn)


#: A device function inlined into its caller (shared memory, threads, barriers).
block_device = cuda.jit(device=True, inline="always")


@scalar_device
def visible(p, kp, window, chunk):
    """:func:`refimpl.kv_cache.visibility` for one (query position p, key position kp); 0 = no W / C."""
    if kp < 0 or kp > p:
        return False
    if window > 0 and p - kp >= window:
        return False
    if chunk > 0 and kp // chunk != p // chunk:
        return False
    return True


@scalar_device
def tile_invisible(qmin, qmax, kmin, kmax, window, chunk):
    """True when no query position in [qmin, qmax] sees any valid key position in [kmin, kmax]."""
    if kmax < 0 or kmin > qmax:
        return True
    if window > 0 and qmin - kmax >= window:
        return True
    if chunk > 0 and (kmax // chunk < qmin // chunk or kmin // chunk > qmax // chunk):
        return True
    return False


@scalar_device
def normaliser(m, l, z):
    """The factor turning a running output (max m, sum l) into the output, sink z in the denominator.

    ``exp(m - M) / (l exp(m - M) + exp(z - M))`` with ``M = max(m, z)``; 0 when the row saw
    no key (m = -inf: whatever the sink) or nothing at all; NaN when a NaN or infinite score
    reached the sum (``max`` skips NaN, so only l carries it), as the reference gives NaN.
    """
    if l != l:
        return l
    top = max(m, z)
    if top == NEG_INF:
        return float32(0.0)
    e = math.exp(m - top)
    denominator = l * e + math.exp(z - top)
    if denominator > float32(0.0) or denominator != denominator:
        return e / denominator
    return float32(0.0)


@scalar_device
def ix(i):
    """``i`` (>= 0) as an unsigned index: numba then skips its negative-index wraparound, three
    integer instructions per array access that would otherwise outnumber the FMAs of the hot loops."""
    return np.uint64(i)


@cuda.jit
def tile_bounds_kernel(k_pos, tile, bounds):
    """``bounds[b, i] = (min, max)`` of the valid (>= 0) key positions in slots ``[i tile, (i+1) tile)``.

    Grid (ceil(tiles / threads), B), one thread per tile; a tile without a valid slot
    gets ``(INT32_MAX, -1)``.
    """
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    b = cuda.blockIdx.y
    if i >= bounds.shape[1]:
        return
    lo = INT32_MAX
    hi = int32(-1)
    for j in range(i * tile, min(k_pos.shape[1], (i + 1) * tile)):
        kp = k_pos[b, j]
        if kp >= 0:
            lo = min(lo, kp)
            hi = max(hi, kp)
    bounds[b, i, 0] = lo
    bounds[b, i, 1] = hi


@cuda.jit
def merge_partials_kernel(part_o, part_ml, sinks, out):
    """Log-sum-exp merge of split-K partials into ``out`` (B, T, H, Dv), with the sinks.

    ``part_o`` (B Hkv, T G, P, Dv) unnormalised outputs, ``part_ml`` (B Hkv, T G, P, 2) running
    max and sum per partition; ``sinks`` (H,) or (0,). Grid (T G, B Hkv), up to MERGE_THREADS
    threads striding over Dv; every thread recomputes the P partition weights (P is small).
    """
    row = cuda.blockIdx.x
    bh = cuda.blockIdx.y
    hkv = part_o.shape[0] // out.shape[0]
    group = out.shape[2] // hkv
    b = bh // hkv
    t = row // group
    h = (bh % hkv) * group + row % group
    z = NEG_INF
    if sinks.shape[0] > 0:
        z = sinks[h]
    # M = max(z, max_p m_p): partitions without a visible key (m_p = -inf) change nothing.
    top = z
    poisoned = False
    for p in range(part_ml.shape[2]):
        top = max(top, part_ml[bh, row, p, 0])
        # A NaN or infinite score leaves NaN in a partition's sum (max skips NaN): the row is NaN.
        poisoned = poisoned or part_ml[bh, row, p, 1] != part_ml[bh, row, p, 1]
    denominator = float32(0.0)
    if poisoned:
        denominator = float32(math.nan)
    elif top != NEG_INF:
        denominator = math.exp(z - top)
        for p in range(part_ml.shape[2]):
            denominator += math.exp(part_ml[bh, row, p, 0] - top) * part_ml[bh, row, p, 1]
    for c in range(cuda.threadIdx.x, out.shape[3], cuda.blockDim.x):
        total = float32(0.0)
        if denominator > float32(0.0) or denominator != denominator:
            for p in range(part_ml.shape[2]):
                total += math.exp(part_ml[bh, row, p, 0] - top) * part_o[bh, row, p, c]
            total /= denominator
        out[b, t, h, c] = total


class FlashParts(NamedTuple):
    """The shared device functions of one tile bundle (see :func:`flash_parts`)."""

    setup: object
    stage_q: object
    qk_chunk: object
    online_softmax: object
    accumulate: object
    store_partials: object


@functools.lru_cache(maxsize=None)
def flash_parts(tiles: FlashTiles) -> FlashParts:
    """The device functions of one tile bundle that the kernels here and in :mod:`.mla` share.

    A block's shared state: ``rows`` (4, BM) int32, per row (t, h, position, present);
    ``stage`` (STAGE,) float32 for the Q / K chunks and the V sub-tile; ``p_sh`` (BM, BN + 1)
    scores, then probabilities; ``red`` (BM, TX) row-max partials; ``m_sh`` (2, BM) the
    running max (two buffers, alternating per key tile, so that writing the new max never races
    with reading the old); ``l_own`` (BM, TX) each thread's partial row sums; ``fac`` (BM,) the
    rescale factor of the tile. Per thread, in registers: ``s`` (RM, KN), ``acc`` (RM, NCOL).

    Register arrays are only touched by short loops of compile-time trip count, which the
    compiler unrolls so that they stay in registers; everything else indexes shared memory.
    """
    BM, BN, TY, TX = tiles.block_m, tiles.block_n, tiles.threads_y, tiles.threads_x
    DK, BNV, DV_MAX = tiles.chunk_d, tiles.block_nv, tiles.dv_max
    NT = TY * TX
    RM, KN, NCOL = BM // TY, BN // TX, DV_MAX // TX
    DKP = DK + 1
    K_AT = BM * DKP  # the K chunk follows the Q chunk in the staging buffer
    # Elements of the Q chunk and the V sub-tile, and how many each thread moves.
    QN, VN = BM * DK, BNV * DV_MAX
    LQ, LV = -(-QN // NT), -(-VN // NT)

    @block_device
    def setup(num_rows, group, hk, row0, rows, m_sh, l_own, acc):
        """rows[(0, 1, 3), r] = (t, h, present) of row ``row0 + r`` (``r = t G + g``, ``h = hk G + g``);
        m = -inf, l = 0, acc = 0. The caller fills rows[2] (positions) and syncs."""
        for r in range(cuda.threadIdx.x, BM, NT):
            gr = row0 + r
            present = gr < num_rows
            rows[0, r] = gr // group if present else 0
            rows[1, r] = hk * group + gr % group if present else 0
            rows[3, r] = 1 if present else 0
            m_sh[0, r] = NEG_INF
            m_sh[1, r] = NEG_INF
            for u in range(TX):
                l_own[r, u] = float32(0.0)
        for i in range(RM):
            for c in range(NCOL):
                acc[i, c] = float32(0.0)

    @block_device
    def stage_q(q, b, rows, d0, scale, stage):
        """Stage this thread's elements of the Q chunk ``scale q[rows, d0:d0 + DK]`` (zeros past D and
        for absent rows); consecutive threads read consecutive dims. Loads go LOAD_BATCH at a time
        through registers, all issued before the first store (memory-level parallelism)."""
        tid = cuda.threadIdx.x
        head_dim = q.shape[3]
        buf = cuda.local.array(LOAD_BATCH, float32)
        for u0 in range(0, LQ, LOAD_BATCH):
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                buf[u] = float32(0.0)
                if e < QN:
                    r = e // DK
                    d = d0 + e % DK
                    if rows[3, r] != 0 and d < head_dim:
                        buf[u] = q[ix(b), ix(rows[0, r]), ix(rows[1, r]), ix(d)] * scale
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                if e < QN:
                    stage[ix((e // DK) * DKP + e % DK)] = buf[u]

    @block_device
    def stage_v(v, b, hk, key0, stage):
        """Stage V[key0:key0 + BNV, :Dv max] (zeros past S and Dv), batched loads as ``stage_q``."""
        tid = cuda.threadIdx.x
        num_keys = v.shape[1]
        dv = v.shape[3]
        buf = cuda.local.array(LOAD_BATCH, float32)
        for u0 in range(0, LV, LOAD_BATCH):
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                key = key0 + e // DV_MAX
                col = e % DV_MAX
                buf[u] = float32(0.0)
                if e < VN and key < num_keys and col < dv:
                    buf[u] = v[ix(b), ix(key), ix(hk), ix(col)]
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                if e < VN:
                    stage[ix(e)] = buf[u]

    @block_device
    def qk_chunk(stage, s):
        """s[i, c] += q_row . k_key over the staged chunk (row ``ty RM + i``, key ``tx + c TX``)."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        for d in range(DK):
            for i in range(RM):
                qv = stage[ix((ty * RM + i) * DKP + d)]
                for c in range(KN):
                    s[i, c] += qv * stage[ix(K_AT + (tx + c * TX) * DKP + d)]

    @block_device
    def online_softmax(par, p_sh, red, m_sh, l_own, fac):
        """After the masked scores are in p_sh and each thread's partial row maxima in red:
        p_sh = exp(s - m_new), the thread's partial sums rescaled and added to,
        m_sh[1 - par] = m_new, fac = exp(m_old - m_new) (Milakov and Gimelshein, online softmax)."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        cuda.syncthreads()
        for i in range(RM):
            row = ty * RM + i
            m_old = m_sh[par, row]
            top = m_old
            for u in range(TX):
                top = max(top, red[row, u])
            # A row that has seen no key yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
            shift = top if top != NEG_INF else float32(0.0)
            alpha = math.exp(m_old - shift)
            total = float32(0.0)
            for c in range(KN):
                col = tx + c * TX
                pv = math.exp(p_sh[row, col] - shift)
                p_sh[row, col] = pv
                total += pv
            l_own[row, tx] = l_own[row, tx] * alpha + total
            # Every thread of the row writes the same values (m_sh[par] is still being read).
            m_sh[1 - par, row] = top
            fac[row] = alpha
        cuda.syncthreads()

    @block_device
    def accumulate(v, b, hk, key0, p_sh, fac, acc, stage):
        """acc = fac acc + P V over the tile's keys, V (B, S, Hkv, Dv) staged BNV keys at a time."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        for i in range(RM):
            alpha = fac[ty * RM + i]
            for c in range(NCOL):
                acc[i, c] *= alpha
        for jv in range(0, BN, BNV):
            cuda.syncthreads()
            stage_v(v, b, hk, key0 + jv, stage)
            cuda.syncthreads()
            for j in range(BNV):
                for i in range(RM):
                    pv = p_sh[ix(ty * RM + i), ix(jv + j)]
                    for c in range(NCOL):
                        acc[i, c] += pv * stage[ix(j * DV_MAX + tx + c * TX)]

    @block_device
    def store_partials(bh, row0, part, rows, par, m_sh, l_own, acc, part_o, part_ml):
        """Split-K epilogue: the partition's running max and sum per row, and its unnormalised output."""
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        for r in range(tid, BM, NT):
            if rows[3, r] != 0:
                total = float32(0.0)
                for u in range(TX):
                    total += l_own[r, u]
                part_ml[bh, row0 + r, part, 0] = m_sh[par, r]
                part_ml[bh, row0 + r, part, 1] = total
        ty = tid // TX
        tx = tid % TX
        for i in range(RM):
            r = ty * RM + i
            if rows[3, r] != 0:
                o_row = part_o[bh, row0 + r, part]
                for c in range(NCOL):
                    if tx + c * TX < o_row.shape[0]:
                        o_row[tx + c * TX] = acc[i, c]

    return FlashParts(setup, stage_q, qk_chunk, online_softmax, accumulate, store_partials)


@functools.lru_cache(maxsize=None)
def flash_kernels(tiles: FlashTiles):
    """``(prefill, decode)`` kernels compiled for ``tiles``: one per-key-tile step, two loops and epilogues.

    prefill(q, k, v, q_pos, k_pos, k_bounds, sinks, out, scale, window, chunk, softcap):
        grid (ceil(T G / BM), B Hkv); writes ``out`` (B, T, H, Dv).
    decode(q, k, v, q_pos, k_pos, part_o, part_ml, scale, window, chunk, softcap, tiles_per_partition):
        grid (ceil(T G / BM), P, B Hkv); writes partition p's partials (see the merge kernel).

    Scalars: scale and softcap float32 (softcap 0: no cap), window and chunk int32 (0: none).
    """
    # numba resolves device functions bound to plain names of the closure.
    setup_rows, stage_q, qk_chunk, online_softmax, accumulate, store_partials = flash_parts(tiles)
    BM, BN, TY, TX, DK = tiles.block_m, tiles.block_n, tiles.threads_y, tiles.threads_x, tiles.chunk_d
    DV_MAX = tiles.dv_max
    NT = TY * TX
    RM, KN, NCOL = BM // TY, BN // TX, DV_MAX // TX
    DKP, BNP = DK + 1, BN + 1
    STAGE = max(BM * DKP + BN * DKP, tiles.block_nv * DV_MAX)
    K_AT = BM * DKP
    LK = -(-BN * DK // NT)

    @block_device
    def stage_k(k, b, hk, key0, d0, stage):
        """Stage this thread's elements of the K chunk ``k[key0:key0 + BN, d0:d0 + DK]`` (zeros past S
        and D), batched loads as ``stage_q``."""
        tid = cuda.threadIdx.x
        num_keys = k.shape[1]
        head_dim = k.shape[3]
        buf = cuda.local.array(LOAD_BATCH, float32)
        for u0 in range(0, LK, LOAD_BATCH):
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                key = key0 + e // DK
                d = d0 + e % DK
                buf[u] = float32(0.0)
                if e < BN * DK and key < num_keys and d < head_dim:
                    buf[u] = k[ix(b), ix(key), ix(hk), ix(d)]
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                if e < BN * DK:
                    stage[ix(K_AT + (e // DK) * DKP + e % DK)] = buf[u]

    @block_device
    def scores(q, k, b, hk, rows, key0, scale, s, stage):
        """s[i, c] = scale q_row . k_key for the thread's rows ``ty RM + i`` and keys ``key0 + tx + c TX``,
        over D in chunks of DK dims staged in shared memory."""
        head_dim = q.shape[3]
        for i in range(RM):
            for c in range(KN):
                s[i, c] = float32(0.0)
        for d0 in range(0, head_dim, DK):
            cuda.syncthreads()
            stage_q(q, b, rows, d0, scale, stage)
            stage_k(k, b, hk, key0, d0, stage)
            cuda.syncthreads()
            qk_chunk(stage, s)

    @block_device
    def cap_and_mask(rows, kpos, window, chunk, softcap, s, p_sh, red):
        """p_sh = the capped (Gemma 2: before the mask), masked scores; red = each thread's row maxima."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        for i in range(RM):
            for c in range(KN):
                p_sh[ty * RM + i, tx + c * TX] = s[i, c]
        for i in range(RM):
            row = ty * RM + i
            p = rows[2, row]
            top = NEG_INF
            for c in range(KN):
                col = tx + c * TX
                x = p_sh[row, col]
                if softcap > float32(0.0):
                    x = softcap * math.tanh(x / softcap)
                if not visible(p, kpos[col], window, chunk):
                    x = NEG_INF
                p_sh[row, col] = x
                top = max(top, x)
            red[row, tx] = top

    @block_device
    def attend_tile(q, k, v, k_pos, b, hk, rows, key0, scale, window, chunk, softcap, par, acc, m_sh, l_own, fac,
                    stage, p_sh, red, kpos, s):
        """Fold key tile [key0, key0 + BN) into the online softmax of the block's rows.

        Returns the new ``par``: the running max is in ``m_sh[par]``, the thread's partial sums in
        ``l_own``, its outputs in ``acc``.
        """
        # Read after the barriers of scores(); the previous tile's readers are past later barriers.
        for j in range(cuda.threadIdx.x, BN, NT):
            kpos[j] = k_pos[b, key0 + j] if key0 + j < k.shape[1] else -1
        scores(q, k, b, hk, rows, key0, scale, s, stage)
        cap_and_mask(rows, kpos, window, chunk, softcap, s, p_sh, red)
        online_softmax(par, p_sh, red, m_sh, l_own, fac)
        accumulate(v, b, hk, key0, p_sh, fac, acc, stage)
        return 1 - par

    @block_device
    def start(q_pos, b, hk, group, row0, rows, m_sh, l_own, acc):
        """Rows of the block with their query positions (absent rows: -1), fresh softmax state."""
        setup_rows(q_pos.shape[1] * group, group, hk, row0, rows, m_sh, l_own, acc)
        for r in range(cuda.threadIdx.x, BM, NT):
            rows[2, r] = q_pos[b, rows[0, r]] if rows[3, r] != 0 else -1
        cuda.syncthreads()

    @cuda.jit
    def prefill(q, k, v, q_pos, k_pos, k_bounds, sinks, out, scale, window, chunk, softcap):
        rows = cuda.shared.array((4, BM), int32)
        m_sh = cuda.shared.array((2, BM), float32)
        l_own = cuda.shared.array((BM, TX), float32)
        fac = cuda.shared.array(BM, float32)
        stage = cuda.shared.array(STAGE, float32)
        p_sh = cuda.shared.array((BM, BNP), float32)
        red = cuda.shared.array((BM, TX), float32)
        kpos = cuda.shared.array(BN, int32)
        s = cuda.local.array((RM, KN), float32)
        acc = cuda.local.array((RM, NCOL), float32)
        tid = cuda.threadIdx.x
        hkv = k.shape[2]
        b = cuda.blockIdx.y // hkv
        hk = cuda.blockIdx.y % hkv
        # Heaviest row tiles first: under a causal mask the last rows see the most keys.
        row0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * BM
        start(q_pos, b, hk, q.shape[2] // hkv, row0, rows, m_sh, l_own, acc)
        # The positions the block's rows span, for skipping key tiles none of them sees.
        qmin = INT32_MAX
        qmax = int32(-2147483647)
        for r in range(BM):
            if rows[3, r] != 0:
                qmin = min(qmin, rows[2, r])
                qmax = max(qmax, rows[2, r])
        par = 0
        for kt in range(k_bounds.shape[1]):
            if not tile_invisible(qmin, qmax, k_bounds[b, kt, 0], k_bounds[b, kt, 1], window, chunk):
                par = attend_tile(q, k, v, k_pos, b, hk, rows, kt * BN, scale, window, chunk, softcap, par, acc,
                                  m_sh, l_own, fac, stage, p_sh, red, kpos, s)
        # Epilogue: one thread per row sums the partial sums and folds in the sink.
        cuda.syncthreads()
        for r in range(tid, BM, NT):
            total = float32(0.0)
            for u in range(TX):
                total += l_own[r, u]
            z = sinks[rows[1, r]] if sinks.shape[0] > 0 else NEG_INF
            fac[r] = normaliser(m_sh[par, r], total, z)
        cuda.syncthreads()
        ty = tid // TX
        tx = tid % TX
        for i in range(RM):
            r = ty * RM + i
            if rows[3, r] != 0:
                factor = fac[r]
                o_row = out[b, rows[0, r], rows[1, r]]
                for c in range(NCOL):
                    if tx + c * TX < o_row.shape[0]:
                        o_row[tx + c * TX] = acc[i, c] * factor

    @cuda.jit
    def decode(q, k, v, q_pos, k_pos, part_o, part_ml, scale, window, chunk, softcap, tiles_per_partition):
        rows = cuda.shared.array((4, BM), int32)
        m_sh = cuda.shared.array((2, BM), float32)
        l_own = cuda.shared.array((BM, TX), float32)
        fac = cuda.shared.array(BM, float32)
        stage = cuda.shared.array(STAGE, float32)
        p_sh = cuda.shared.array((BM, BNP), float32)
        red = cuda.shared.array((BM, TX), float32)
        kpos = cuda.shared.array(BN, int32)
        s = cuda.local.array((RM, KN), float32)
        acc = cuda.local.array((RM, NCOL), float32)
        hkv = k.shape[2]
        bh = cuda.blockIdx.z
        b = bh // hkv
        hk = bh % hkv
        row0 = cuda.blockIdx.x * BM
        part = cuda.blockIdx.y
        tile_begin = part * tiles_per_partition
        tile_end = min((k.shape[1] + BN - 1) // BN, tile_begin + tiles_per_partition)
        start(q_pos, b, hk, q.shape[2] // hkv, row0, rows, m_sh, l_own, acc)
        # No tile skipping here: a decode cache holds little that no query sees (a sliding or
        # chunked layer keeps W or C slots), and skipping would cost a pre-pass launch.
        par = 0
        for kt in range(tile_begin, tile_end):
            par = attend_tile(q, k, v, k_pos, b, hk, rows, kt * BN, scale, window, chunk, softcap, par, acc,
                              m_sh, l_own, fac, stage, p_sh, red, kpos, s)
        store_partials(bh, row0, part, rows, par, m_sh, l_own, acc, part_o, part_ml)

    return prefill, decode


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pick(table: tuple[FlashTiles, ...], dv: int, rows: int | None = None) -> FlashTiles:
    """The first bundle of ``table`` whose Dv max holds ``dv`` (and, with ``rows``, the fewest
    rows per block >= rows, else the most)."""
    fitting = [t for t in table if t.dv_max >= dv]
    if not fitting:
        raise ShapeError(f"attention kernels: value head dim {dv} exceeds the largest supported, {DV_LIMIT}")
    if rows is not None:
        enough = [t for t in fitting if t.block_m >= rows]
        widest = max(t.block_m for t in fitting)
        fitting = enough or [t for t in fitting if t.block_m == widest]
        fitting.sort(key=lambda t: (t.block_m, t.dv_max))
    return fitting[0]


def _key_tile_bounds(k_positions, block_n: int):
    """Scratch (B, ceil(S / BN), 2) int32 of per-tile key position bounds, filled on the device."""
    batch, num_keys = k_positions.shape
    num_tiles = _ceil_div(num_keys, block_n)
    bounds = cuda.device_array((batch, num_tiles, 2), dtype=np.int32)
    threads = min(BOUNDS_THREADS, num_tiles)
    tile_bounds_kernel[(_ceil_div(num_tiles, threads), batch), threads](k_positions, np.int32(block_n), bounds)
    return bounds


def _scalars(scale, sliding_window, attention_chunk_size, softcap) -> tuple:
    return np.float32(scale), np.int32(sliding_window), np.int32(attention_chunk_size), np.float32(softcap)


def launch_prefill(q, k, v, q_positions, k_positions, sinks, out, *, scale, sliding_window, attention_chunk_size,
                   softcap, tiles: FlashTiles | None = None) -> None:
    """Launch the tiled online-softmax kernel: every row of every (batch, kv head) in one pass over S.

    Args:
        q: ``(B, T, H, D)`` float32; k: ``(B, S, Hkv, D)``; v: ``(B, S, Hkv, Dv)``; every size
            >= 1, Dv <= 256; all C-contiguous, NumPy or device arrays.
        q_positions: ``(B, T)`` int32; k_positions: ``(B, S)`` int32, negative = empty slot.
        sinks: ``(H,)`` float32 sink logits, or ``(0,)`` for none.
        out: ``(B, T, H, Dv)`` float32, written entirely.
        scale: float; sliding_window, attention_chunk_size: int, 0 for none; softcap: float, 0 for none.
        tiles: a :class:`FlashTiles` (default: the :data:`PREFILL_TILES` bundle for Dv).

    Grid (ceil(T G / BM), B Hkv), TY x TX threads; one pre-pass launch for the key-tile bounds.
    """
    batch, num_queries, num_heads, _ = q.shape
    hkv = k.shape[2]
    tiles = tiles or _pick(PREFILL_TILES, v.shape[3])
    prefill, _ = flash_kernels(tiles)
    bounds = _key_tile_bounds(k_positions, tiles.block_n)
    grid = (_ceil_div(num_queries * (num_heads // hkv), tiles.block_m), batch * hkv)
    prefill[grid, tiles.threads](q, k, v, q_positions, k_positions, bounds, sinks, out,
                                 *_scalars(scale, sliding_window, attention_chunk_size, softcap))


def launch_decode(q, k, v, q_positions, k_positions, sinks, out, *, scale, sliding_window, attention_chunk_size,
                  softcap, tiles: FlashTiles | None = None, tiles_per_partition: int | None = None) -> None:
    """Launch split-K attention: partitions of the key axis in parallel, then the log-sum-exp merge.

    Args: as :func:`launch_prefill`, plus
        tiles: a :class:`FlashTiles` (default: the :data:`DECODE_TILES` bundle for T G rows and Dv).
        tiles_per_partition: key tiles (of BN slots) per partition; default: enough partitions
            for about :data:`TARGET_BLOCKS` blocks.

    Grids: (ceil(T G / BM), P, B Hkv) with TY x TX threads, then (T G, B Hkv) with MERGE_THREADS.
    Scratch: ``(B Hkv, T G, P, Dv)`` partial outputs and ``(B Hkv, T G, P, 2)`` (max, sum).
    """
    batch, num_queries, num_heads, _ = q.shape
    num_keys, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    rows = num_queries * (num_heads // hkv)
    tiles = tiles or _pick(DECODE_TILES, dv, rows)
    _, decode = flash_kernels(tiles)
    num_tiles = _ceil_div(num_keys, tiles.block_n)
    row_tiles = _ceil_div(rows, tiles.block_m)
    if tiles_per_partition is None:
        wanted = _ceil_div(TARGET_BLOCKS, batch * hkv * row_tiles)
        tiles_per_partition = _ceil_div(num_tiles, wanted)
    tiles_per_partition = max(1, tiles_per_partition)
    partitions = max(1, _ceil_div(num_tiles, tiles_per_partition))
    part_o = cuda.device_array((batch * hkv, rows, partitions, dv), dtype=np.float32)
    part_ml = cuda.device_array((batch * hkv, rows, partitions, 2), dtype=np.float32)
    decode[(row_tiles, partitions, batch * hkv), tiles.threads](
        q, k, v, q_positions, k_positions, part_o, part_ml,
        *_scalars(scale, sliding_window, attention_chunk_size, softcap), np.int32(tiles_per_partition))
    merge_partials_kernel[(rows, batch * hkv), min(MERGE_THREADS, dv)](part_o, part_ml, sinks, out)


def _positions(name: str, positions, shape: tuple[int, int]) -> np.ndarray:
    """``(B, n)`` integer positions as contiguous int32 (ShapeError / InputError naming ``name``)."""
    positions = as_integer_array(f"attention: {name}", positions, ndim=2)
    if positions.shape != shape:
        raise ShapeError(f"attention: {name} must be {shape}, got {positions.shape}")
    if positions.size and (positions.min() < np.iinfo(np.int32).min or positions.max() > np.iinfo(np.int32).max):
        raise InputError(f"attention: {name} must fit in int32, got values in [{positions.min()}, {positions.max()}]")
    return np.ascontiguousarray(positions, dtype=np.int32)


def _checked_options(sliding_window, attention_chunk_size, softcap, dtype) -> tuple[int, int, float]:
    """``(W or 0, C or 0, cap or 0)`` after the reference's checks."""
    if sliding_window is not None:
        _check_positive_int("sliding_window", sliding_window)
    if attention_chunk_size is not None:
        _check_positive_int("attention_chunk_size", attention_chunk_size)
    if softcap is not None:
        softcap = check_finite_positive("attention: softcap", softcap, dtype=dtype)
    # Positions fit int32, so a window or chunk of 2^31 - 1 or more changes nothing: 0 (none).
    window, chunk = (int(x or 0) if int(x or 0) < 2**31 - 1 else 0 for x in (sliding_window, attention_chunk_size))
    return window, chunk, float(softcap or 0.0)


def _as_f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _run(q, k, v, q_positions, k_positions, sinks, *, scale, window, chunk, softcap, path) -> np.ndarray:
    """Copy to the device, launch ``path``, copy ``out`` (B, T, H, Dv) float32 back."""
    (batch, num_queries, num_heads, head_dim), dv = q.shape, v.shape[3]
    out_shape = (batch, num_queries, num_heads, dv)
    if 0 in (batch, num_queries, num_heads, dv):
        return np.zeros(out_shape, np.float32)
    if k.shape[1] == 0:
        return np.zeros(out_shape, np.float32)  # no key at all: every row is fully masked
    if head_dim == 0:
        raise ShapeError("attention kernels: head_dim D must be at least 1")
    arrays = [cuda.to_device(a) for a in (_as_f32(q), _as_f32(k), _as_f32(v), q_positions, k_positions,
                                           _as_f32(sinks if sinks is not None else np.zeros(0, np.float32)))]
    out = cuda.to_device(np.full(out_shape, np.nan, np.float32))
    launch = launch_decode if path == "decode" else launch_prefill
    launch(*arrays, out, scale=scale, sliding_window=window, attention_chunk_size=chunk, softcap=softcap)
    return out.copy_to_host()


def attend_positions(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, k_positions: np.ndarray, *,
    scale: float, sliding_window: int | None = None, attention_chunk_size: int | None = None,
    sinks: np.ndarray | None = None, softcap: float | None = None, path: str | None = None,
) -> np.ndarray:
    """Attention of queries at ``q_positions`` over key slots at ``k_positions``, on the GPU.

    The general entry of this module: the mask is :func:`refimpl.kv_cache.visibility` of the
    positions (a negative key position is an empty slot), computed in the kernel.

    Args:
        q: ``(B, T, H, D)``; k: ``(B, S, Hkv, D)``; v: ``(B, S, Hkv, Dv)``, Dv <= 256; float32,
            float64, float16 or bfloat16, one dtype for all (and for ``sinks``).
        q_positions: ``(B, T)`` integers; k_positions: ``(B, S)`` integers, < 0 for empty slots.
        scale: multiplier of q.k, > 0.
        sliding_window: W >= 1 or None; attention_chunk_size: C >= 1 or None.
        sinks: ``(H,)`` per-head sink logits (finite or -inf) or None; softcap: c > 0 or None.
        path: None (split-K decode when T <= :data:`DECODE_MAX_QUERIES`, the tiled prefill
            kernel otherwise), ``"prefill"`` or ``"decode"`` to force one.

    Returns:
        ``(B, T, H, Dv)``: float32 for float32 and float64 inputs, the storage dtype for
        float16 / bfloat16 (rounded once); a row that sees no key is zeros.

    Dtype: inputs are converted to float32 on the host (exact for float16 / bfloat16, rounded
    for float64); everything is computed and accumulated in float32.

    Raises:
        ShapeError: shapes that do not fit (as :func:`refimpl.attention.grouped_query_attention`),
            positions of the wrong shape, Dv > 256, D = 0.
        InputError: non-float arrays, non-integer or out-of-int32 positions, a bad sink,
            ``scale`` / ``softcap`` not positive finite in float32.
        RefimplError: dtypes differ; W or C not an integer >= 1; an unknown ``path``.
    """
    q, k, v = _float_qkv(q, k, v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention wants (B, T, H, D) arrays, got q{q.shape} k{k.shape} v{v.shape}")
    batch, num_queries, num_heads, _ = q.shape
    num_keys = k.shape[1]
    # The reference's shape check wants a mask: a broadcast view, no (T, S) allocation.
    _check_shapes(q, k, v, np.broadcast_to(np.ones((), bool), (num_queries, num_keys)))
    if sinks is not None:
        sinks = _check_sinks(sinks, num_heads)
    storage = check_same_dtype(q=q, k=k, v=v, **({} if sinks is None else {"sinks": sinks}))
    scale = check_finite_positive("attention: scale", scale, dtype=np.float32)
    window, chunk, cap = _checked_options(sliding_window, attention_chunk_size, softcap, np.float32)
    if path not in (None, "prefill", "decode"):
        raise RefimplError(f"attention: path must be None, 'prefill' or 'decode', got {path!r}")
    if v.shape[3] > DV_LIMIT:
        raise ShapeError(f"attention kernels: value head dim {v.shape[3]} exceeds the largest supported, {DV_LIMIT}")
    q_positions = _positions("q_positions", q_positions, (batch, num_queries))
    k_positions = _positions("k_positions", k_positions, (batch, num_keys))
    if path is None:
        path = "decode" if num_queries <= DECODE_MAX_QUERIES else "prefill"
    out = _run(q, k, v, q_positions, k_positions, sinks, scale=float(scale), window=window, chunk=chunk,
               softcap=cap, path=path)
    return to_storage(out, storage)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scaling: float,
    sliding_window: int | None = None, attention_chunk_size: int | None = None,
    sinks: np.ndarray | None = None, attn_logit_softcapping: float | None = None,
) -> np.ndarray:
    """:func:`refimpl.attention.attention` on the GPU: causal attention of the last T of S positions.

    Query i sits at position ``S - T + i``, key j at position j; window, chunk, sinks and cap
    as the reference. Arguments, checks and errors are the reference's.

    Returns:
        ``(B, T, H, Dv)``: float32 for float32 and float64 inputs (computed in float32), the
        storage dtype for float16 / bfloat16 (as the reference: float32 compute, one rounding).

    Raises:
        as :func:`refimpl.attention.attention`; ShapeError also for Dv > 256 or D = 0.
    """
    q, k, v = _float_qkv(q, k, v)
    check_finite_positive("attention: scaling", scaling, dtype=compute_dtype(q.dtype))
    if attn_logit_softcapping is not None:
        check_finite_positive("attention: attn_logit_softcapping", attn_logit_softcapping,
                              dtype=compute_dtype(q.dtype))
    if q.ndim != 4 or k.ndim != 4:
        raise ShapeError(f"attention wants (B, T, H, D) arrays, got q{q.shape} k{k.shape}")
    batch, num_queries, num_keys = q.shape[0], q.shape[1], k.shape[1]
    if num_keys < num_queries:
        raise ShapeError(f"attention: {num_keys} keys cannot hold the positions of {num_queries} queries "
                         "(need S >= T)")
    q_positions = np.broadcast_to(np.arange(num_keys - num_queries, num_keys), (batch, num_queries))
    k_positions = np.broadcast_to(np.arange(num_keys), (batch, num_keys))
    return attend_positions(q, k, v, q_positions, k_positions, scale=scaling, sliding_window=sliding_window,
                            attention_chunk_size=attention_chunk_size, sinks=sinks, softcap=attn_logit_softcapping)


def attend_with_cache(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, context: StepContext, layer: int, *, scale: float,
    sliding_window: int | None = None, attention_chunk_size: int | None = None, sinks: np.ndarray | None = None,
    softcap: float | None = None,
) -> tuple[np.ndarray, object]:
    """:func:`refimpl.kv_cache.attend_with_cache` with the attention on the GPU.

    The cache bookkeeping is the reference's own :func:`refimpl.kv_cache.extend_kv` (the kept
    cache is identical); the kernel attends over the visible slots with their positions,
    padding slots (``valid`` False) passed as position -1.

    Returns:
        ``(out (B, T, H, Dv), kept)``: ``out`` computed in float32 and returned in q's dtype (a
        float64 model gets float32-accurate attention), ``kept`` the layer's next cache.

    Raises:
        as :func:`refimpl.kv_cache.attend_with_cache` and :func:`attend_positions`.
    """
    span = sliding_window if sliding_window is not None else attention_chunk_size
    visible_slots, kept = extend_kv(context.layer_cache(layer), k, v, context, span=span)
    q, keys, values = _float_qkv(q, visible_slots.keys, visible_slots.values)
    k_positions = np.where(visible_slots.valid, visible_slots.positions, -1)
    out = attend_positions(q, keys, values, context.positions, k_positions, scale=scale,
                           sliding_window=sliding_window, attention_chunk_size=attention_chunk_size, sinks=sinks,
                           softcap=softcap)
    return out.astype(q.dtype, copy=False), kept


def _signatures() -> dict[str, tuple[object, list[str]]]:
    """Every kernel with the type signature its launcher uses (for ``refimpl.kernels.ptx_check``)."""
    a4, i2, i3 = "float32[:, :, :, ::1]", "int32[:, ::1]", "int32[:, :, ::1]"
    table = {
        "tile_bounds_kernel": (tile_bounds_kernel, [f"void({i2}, int32, {i3})"]),
        "merge_partials_kernel": (merge_partials_kernel, [f"void({a4}, {a4}, float32[::1], {a4})"]),
    }
    common = f"{a4}, {a4}, {a4}, {i2}, {i2}, {i3}"
    scalars = "float32, int32, int32, float32"
    for tiles in GPU_PREFILL_TILES:
        table[f"prefill_bm{tiles.block_m}_dv{tiles.dv_max}"] = (
            flash_kernels(tiles)[0], [f"void({common}, float32[::1], {a4}, {scalars})"])
    for tiles in GPU_DECODE_TILES:
        table[f"decode_bm{tiles.block_m}_dv{tiles.dv_max}"] = (
            flash_kernels(tiles)[1], [f"void({a4}, {a4}, {a4}, {i2}, {i2}, {a4}, {a4}, {scalars}, int32)"])
    return table


KERNELS = _signatures()
