"""Gated delta rule kernels: the recurrent (decode) form and the chunked (prefill) form, in float32.

Implements :func:`refimpl.linear_attention.delta_rule.gated_delta_rule_recurrent` and
:func:`refimpl.linear_attention.delta_rule.gated_delta_rule_chunked` (same signatures, same
checks, same errors, same output shapes); the math, notation and derivation are those of
``refimpl/linear_attention/delta_rule.py`` and ``delta_rule.md`` beside it. Per value head the
state ``S`` is ``(d_k, d_v)`` and token t does, with ``alpha_t = exp(g_t)``::

    S   <- alpha_t S
    S   <- S + k_t (beta_t (v_t - S^T k_t))^T
    o_t  = S^T (scale q_t)

Column j of S evolves from column j of S and ``v[..., j]`` only, so both kernels split the
``d_v`` axis across blocks with no communication between blocks: one block per
(value-column tile, value head, batch row). Value head h reads query / key head
``h // (Hv / Hk)`` (repeat-interleave); repeated q / k are never materialised.

Notation (one block; the letters of the reference):

==========  ============  ====================  ==================================================
symbol      code          shape                 where it lives
==========  ============  ====================  ==================================================
S tile      ``s_state``   (d_k, TV)             chunked: shared, for the whole sequence
S tile      ``rows``      (d_k / 8,) per thread recurrent: registers, for the whole sequence
k_t, q_t    ``s_k/s_q``   (DK_MAX,)             recurrent: shared, one token at a time
C           ``chunk``     scalar                chunk length, <= CHUNK_MAX
gamma       ``s_gamma``   (C,)                  shared: cumulative log-decay within the chunk
A, then P   ``s_mat``     (C, C)                shared: the strictly lower system, then the
                                                decay-masked intra-chunk scores
Vn          ``s_vn``      (C, TV)               shared: right-hand side, solved in place
K, Q tiles  ``s_k/s_q``   (C, KT)               shared: KT key channels of the chunk at a time
==========  ============  ====================  ==================================================

Recurrent kernel (``gated_delta_recurrent_kernel``; decode is T = 1, T > 1 loops in-kernel).
    Grid ``(ceil(d_v / REC_TV), Hv, B)``, block ``(REC_TV, REC_ROW_GROUPS)`` = (32, 8) = 256
    threads. Thread (x, y) owns column x of the tile and key rows ``y, y + 8, ...``: those
    ``DK_MAX / 8 = 16`` entries of S are touched by no other thread, so they live in the
    thread's registers (as flash-linear-attention's fused recurrent kernel keeps its state
    tile). The block loads its S tile from the state buffer once, loops over the T tokens
    (three ``syncthreads`` each: k_t / scale q_t staged in shared memory; the 8 partial sums of
    ``S^T k`` per column reduced by every thread of the column; the 8 partial sums of
    ``S^T q`` reduced by row group 0) and writes the tile back into the same buffer: the
    state is updated IN PLACE (the decode-step contract). Each state element is read once
    and written once: the kernel is bound by that traffic (``2 * 4 d_k d_v`` bytes per value
    head). A warp reads 32 consecutive floats of a state row (128 bytes, coalesced); the
    load and store loops have constant trip counts, so they unroll and a thread has its 16
    loads in flight at once. Shared memory: 2.5 KiB (k, q, partial sums).

Chunked kernel (``gated_delta_chunked_kernel``; WY representation / UT transform).
    Grid ``(ceil(d_v / TV), Hv, B)``, block ``(TV, KT)`` = (16, 16) = 256 threads. The block
    keeps its S tile ``(d_k, TV)`` in shared memory and walks the chunks in order. Per chunk of
    n <= C tokens (the last one at its own length, never padded into the state)::

        gamma_r  = g_0 + ... + g_r                                  (each thread r sums its prefix)
        one pass over d_k in tiles of KT channels (K, scale Q staged in shared memory),
        register micro-tiles of 4 x 4 per thread (x, y): rows y + 16 a, columns x + 16 b:
            KK^T, QK^T (C x C), K S, Q S (C x TV)
        A[r, s]  = beta_r (k_r . k_s) exp(gamma_r - gamma_s)        s < r
        Vn       = (I + A)^-1 beta (V - exp(gamma) K S)             forward substitution,
                                                                    column sweep: n - 1 steps
        P[r, s]  = (q_r . k_s) exp(gamma_r - gamma_s)               s <= r   (A's storage)
        O        = exp(gamma) Q S + P Vn
        S       <- exp(gamma_last) S + (exp(gamma_last - gamma) K)^T Vn   (K staged again)

    ``Vn = U - W S`` of the reference with ``W S = (I + A)^-1 beta exp(gamma) (K S)``: one
    triangular solve on C x TV instead of C x (d_k + TV); equal up to rounding. Shared memory
    (static, under the 48 KiB limit): S 128 x 16, A / P 64 x 65 (padded: no bank conflict on
    column reads), Vn 64 x 16, K and Q tiles 64 x 17 (padded) each, gamma and beta: 38 KiB.
    The v-independent products (K K^T, Q K^T) are recomputed by each of the ``d_v / TV``
    column blocks of a head; a production kernel would compute them once per chunk in a
    separate, chunk-parallel pass (flash-linear-attention's ``chunk_scaled_dot_kkt`` /
    ``solve_tril``) and run only the state recurrence sequentially. Not done here.

Tile bundles. The sizes above are the GPU bundle :data:`GPU_TILES` (the module constants
DK_MAX, REC_TV, REC_ROW_GROUPS, TV = KT, CHUNK_MAX); :class:`DeltaTiles` bundles them, and
:func:`recurrent_kernel` / :func:`chunked_kernel` build one kernel per bundle (cached), from the
same code: the loops that depend on the block shape have compile-time trip counts (one staging
pass of k_t and one gamma pass on the GPU). ``launch_*`` take ``tiles=``; by default
:func:`pick_tiles` takes the first bundle of :data:`TILES` whose ``chunk_max`` holds
``min(C, T)``: on a GPU always :data:`GPU_TILES`. Under numba's CUDA simulator :data:`TILES`
is :data:`SIMULATOR_TILES`: recurrent blocks (16, 2) = 32 threads, chunked blocks (4, 4) = 16
threads, d_k up to DK_MAX, chunk_max 8, 16, 32 or 64 (micro-tiles of chunk_max / 4 tokens).
There each thread is a Python thread and a barrier busy-waits under the GIL: it costs about a
millisecond per block with 16 threads and tens of milliseconds with 256 (at the 5e-5 s switch
interval the conformance backend sets), and the micro-tile loops run over the whole
``chunk_max`` whatever the chunk's length. A tiny Qwen3-Next (d_k = 8, d_v = 12) spent 9 s
(``qwen3_next/defaults-tied``) and 46 s (``scenario/qwen3_next/chunked-prefill``) in these
kernels with the GPU bundle, 2-4 s and 4-7 s with these.

Dtypes: the kernels and ``launch_*`` take float32 only, computing and accumulating in float32.
The public launchers accept what the reference accepts and return what it returns:
float32 and float64 (o and the final state in that dtype; float64 inputs are rounded to
float32 on the host, computed in float32 and the results widened back, so they carry float32
error, not float64's); float16 and bfloat16 (ml_dtypes) q, k, v, beta, with g and the initial
state in that dtype or float32, widened to float32 on the host (exact), o rounded once to the
storage dtype, the final state float32.

Not supported (RefimplError): ``d_k > DK_MAX`` (128, the d_k of Qwen3-Next and Kimi Linear);
``chunk_size > CHUNK_MAX`` (64, transformers' and fla's chunk size); inputs whose values
overflow float32.

Paper: Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv:2412.06464, section 3; Yang et
al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
arXiv:2406.06484, section 3 (WY representation, UT transform).
Checked against: the NumPy reference (``tests/test_kernels_delta_rule.py``, float64 reference
on the same float32 inputs). The recurrent launch layout follows flash-linear-attention's
``fla/ops/gated_delta_rule/fused_recurrent.py`` (programs over value tiles and (sequence, value
head), the state tile in registers, value head ``i_hv`` reading key head ``i_hv // (HV // H)``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError, ShapeError
from ..linear_attention.delta_rule import _check_inputs, check_chunk_size
from ..numerics import check_finite_positive, compute_dtype, is_low_precision, to_storage
from ._numba import SIMULATOR, cuda, float32

#: GPU bundle (:data:`GPU_TILES`). Largest key head dim d_k: the S tile's rows live in static
#: shared memory (chunked) or in a fixed number of registers per thread (recurrent).
DK_MAX = 128
#: Recurrent kernel: value columns per block (one warp spans 32 consecutive state floats).
REC_TV = 32
#: Recurrent kernel: threads along the key axis; thread y owns key rows y, y + 8, ...
REC_ROW_GROUPS = 8
#: Chunked kernel: value columns per block (blockDim.x).
TV = 16
#: Chunked kernel: key channels per staged tile. Equal to TV (thread x stages channel x) and to
#: blockDim.y (thread row y updates S row c0 + y).
KT = TV
#: Chunked kernel: largest chunk size C; shared arrays are sized for it.
CHUNK_MAX = 64
#: CUDA's limit on gridDim.y and gridDim.z (value heads, batch rows).
_GRID_YZ_MAX = 65535

_ZERO = float32(0.0)


@dataclass(frozen=True)
class DeltaTiles:
    """The compile-time sizes of one build of the two kernels (:func:`recurrent_kernel`,
    :func:`chunked_kernel`: one compiled kernel per distinct set of sizes).

    Attributes:
        rec_tv: recurrent kernel, value columns per block (blockDim.x).
        rec_row_groups: recurrent kernel, blockDim.y; thread y owns the key rows
            ``y, y + rec_row_groups, ...`` (``dk_max / rec_row_groups`` registers).
        tv: chunked kernel, value columns per block = key channels per staged tile (KT) =
            blockDim.x = blockDim.y; a thread's register micro-tile is
            ``chunk_max / tv`` x ``chunk_max / tv`` tokens.
        dk_max: the largest d_k the kernels take (S tile rows).
        chunk_max: the largest chunk the chunked kernel takes (shared arrays and micro-tiles).

    Raises:
        ConfigError: a size below 1, or ``rec_row_groups`` not dividing ``dk_max``, or ``tv``
            not dividing ``chunk_max``.
    """

    rec_tv: int = REC_TV
    rec_row_groups: int = REC_ROW_GROUPS
    tv: int = TV
    dk_max: int = DK_MAX
    chunk_max: int = CHUNK_MAX

    def __post_init__(self):
        if min(vars(self).values()) < 1 or self.dk_max % self.rec_row_groups or self.chunk_max % self.tv:
            raise ConfigError(f"DeltaTiles: sizes must be positive, rec_row_groups must divide dk_max and tv "
                              f"must divide chunk_max; got {self}")


#: The bundle a GPU runs: blocks of (32, 8) and (16, 16) = 256 threads (the module docstring).
GPU_TILES = DeltaTiles()
#: The same kernels for numba's CUDA simulator, by largest chunk: (16, 2) = 32 and (4, 4) = 16
#: threads per block (still two row groups, several key tiles and micro-tile rows and columns per
#: thread), every d_k <= DK_MAX. The chunked kernel's micro-tile loops run over the whole
#: ``chunk_max``, so a short sequence takes the smallest bundle that holds it.
SIMULATOR_TILES = tuple(DeltaTiles(rec_tv=16, rec_row_groups=2, tv=4, chunk_max=c) for c in (8, 16, 32, CHUNK_MAX))
#: The bundles the launch layer picks from (ordered by ``chunk_max``; the last holds CHUNK_MAX).
TILES = SIMULATOR_TILES if SIMULATOR else (GPU_TILES,)


def pick_tiles(chunk: int) -> DeltaTiles:
    """The first bundle of :data:`TILES` whose ``chunk_max`` holds a chunk of ``chunk`` tokens
    (the last bundle for anything longer)."""
    return next((tiles for tiles in TILES if tiles.chunk_max >= chunk), TILES[-1])


@functools.lru_cache(maxsize=None)
def recurrent_kernel(rec_tv: int, rec_row_groups: int, dk_max: int):
    """The recurrent kernel (``gated_delta_recurrent_kernel``, module docstring) compiled for blocks of
    ``(rec_tv, rec_row_groups)`` threads and d_k up to ``dk_max``; one per distinct set of sizes."""
    # this bundle's REC_TV, REC_ROW_GROUPS, DK_MAX (the module constants are the GPU bundle's)
    REC_TV_, GROUPS, DKM = rec_tv, rec_row_groups, dk_max
    THREADS = rec_tv * rec_row_groups
    # S rows per thread, in registers
    ROWS = dk_max // rec_row_groups
    # strided passes that stage k_t, q_t (one on the GPU: 256 threads >= 128 channels)
    STAGE_PASSES = -(-dk_max // THREADS)

    @cuda.jit
    def gated_delta_recurrent_kernel(q, k, v, g, beta, state, out, scale):
        """One block: REC_TV value columns of one (batch row, value head), all T tokens in order."""
        s_k = cuda.shared.array(DKM, float32)
        s_q = cuda.shared.array(DKM, float32)
        s_part_k = cuda.shared.array((GROUPS, REC_TV_), float32)
        s_part_q = cuda.shared.array((GROUPS, REC_TV_), float32)
        # S[y + GROUPS m, col]: only this thread ever touches these entries
        rows = cuda.local.array(ROWS, float32)
        x = cuda.threadIdx.x
        y = cuda.threadIdx.y
        tid = y * REC_TV_ + x
        col = cuda.blockIdx.x * REC_TV_ + x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        length = v.shape[1]
        dk = k.shape[3]
        live = col < v.shape[3]
        kh = h // (v.shape[2] // k.shape[2])
        # constant trip counts: the loops unroll, the ROWS loads are in flight together
        for m in range(ROWS):
            i = y + GROUPS * m
            rows[m] = state[b, h, i, col] if live and i < dk else _ZERO
        for t in range(length):
            # k_t and scale q_t, zero-padded to DKM
            for j in range(STAGE_PASSES):
                i = tid + THREADS * j
                if i < DKM:
                    s_k[i] = k[b, t, kh, i] if i < dk else _ZERO
                    s_q[i] = q[b, t, kh, i] * scale if i < dk else _ZERO
            alpha = math.exp(g[b, t, h])
            cuda.syncthreads()
            # S <- alpha S, and this row group's share of u = S^T k
            part = _ZERO
            for m in range(ROWS):
                rows[m] *= alpha
                part += rows[m] * s_k[y + GROUPS * m]
            s_part_k[y, x] = part
            cuda.syncthreads()
            # S <- S + k (beta (v - u))^T, and this row group's share of o = S^T q
            predicted = _ZERO
            for r in range(GROUPS):
                predicted += s_part_k[r, x]
            correction = beta[b, t, h] * ((v[b, t, h, col] if live else _ZERO) - predicted)
            part = _ZERO
            for m in range(ROWS):
                rows[m] += s_k[y + GROUPS * m] * correction
                part += rows[m] * s_q[y + GROUPS * m]
            s_part_q[y, x] = part
            cuda.syncthreads()
            if y == 0 and live:
                o = _ZERO
                for r in range(GROUPS):
                    o += s_part_q[r, x]
                out[b, t, h, col] = o
        if live:
            for m in range(ROWS):
                i = y + GROUPS * m
                if i < dk:
                    state[b, h, i, col] = rows[m]

    return gated_delta_recurrent_kernel


@functools.lru_cache(maxsize=None)
def chunked_kernel(tv: int, dk_max: int, chunk_max: int):
    """The chunked kernel (``gated_delta_chunked_kernel``, module docstring) compiled for blocks of
    ``(tv, tv)`` threads, d_k up to ``dk_max`` and chunks up to ``chunk_max``; one per distinct set of sizes."""
    # this bundle's TV, KT, DK_MAX, CHUNK_MAX (the module constants are the GPU bundle's)
    TV_, KT_, DKM, CMAX = tv, tv, dk_max, chunk_max
    THREADS = tv * tv
    # strided passes over the chunk's tokens for gamma and beta (one on the GPU: 256 >= 64)
    GAMMA_PASSES = -(-chunk_max // THREADS)
    # register micro-tile rows (tokens y + KT a) and columns (tokens x + TV m) per thread
    MICRO_ROWS = chunk_max // tv
    MICRO_COLS = chunk_max // tv
    # padded rows of the shared arrays: a column read then hits distinct banks
    MAT_ROW = chunk_max + 1
    TILE_ROW = tv + 1

    @cuda.jit
    def gated_delta_chunked_kernel(q, k, v, g, beta, state, out, scale, chunk):
        """One block: TV value columns of one (batch row, value head), chunk after chunk."""
        s_state = cuda.shared.array((DKM, TV_), float32)
        s_mat = cuda.shared.array((CMAX, MAT_ROW), float32)
        s_vn = cuda.shared.array((CMAX, TV_), float32)
        s_k = cuda.shared.array((CMAX, TILE_ROW), float32)
        s_q = cuda.shared.array((CMAX, TILE_ROW), float32)
        s_gamma = cuda.shared.array(CMAX, float32)
        s_beta = cuda.shared.array(CMAX, float32)
        acc_kk = cuda.local.array((MICRO_ROWS, MICRO_COLS), float32)
        acc_qk = cuda.local.array((MICRO_ROWS, MICRO_COLS), float32)
        acc_ks = cuda.local.array(MICRO_ROWS, float32)
        acc_qs = cuda.local.array(MICRO_ROWS, float32)
        k_col = cuda.local.array(MICRO_COLS, float32)
        x = cuda.threadIdx.x
        y = cuda.threadIdx.y
        tid = y * TV_ + x
        col = cuda.blockIdx.x * TV_ + x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        length = v.shape[1]
        dk = k.shape[3]
        live = col < v.shape[3]
        kh = h // (v.shape[2] // k.shape[2])
        for i in range(y, dk, KT_):
            s_state[i, x] = state[b, h, i, col] if live else _ZERO
        for t0 in range(0, length, chunk):
            n = min(chunk, length - t0)
            # gamma_r = g_0 + ... + g_r (thread r sums its own prefix, in the order of a cumsum)
            for j in range(GAMMA_PASSES):
                r = tid + THREADS * j
                if r < n:
                    gamma = _ZERO
                    for s in range(r + 1):
                        gamma += g[b, t0 + s, h]
                    s_gamma[r] = gamma
                    s_beta[r] = beta[b, t0 + r, h]
            for a in range(MICRO_ROWS):
                acc_ks[a] = _ZERO
                acc_qs[a] = _ZERO
                for c in range(MICRO_COLS):
                    acc_kk[a, c] = _ZERO
                    acc_qk[a, c] = _ZERO
            # one pass over the key channels: K K^T, Q K^T, K S, Q S
            for c0 in range(0, dk, KT_):
                # thread (x, y) stages channel c0 + x of tokens y + KT a (zero outside the chunk and d_k)
                for a in range(MICRO_ROWS):
                    r = y + KT_ * a
                    inside = r < n and c0 + x < dk
                    s_k[r, x] = k[b, t0 + r, kh, c0 + x] if inside else _ZERO
                    s_q[r, x] = q[b, t0 + r, kh, c0 + x] * scale if inside else _ZERO
                cuda.syncthreads()
                for c in range(min(KT_, dk - c0)):
                    s_c = s_state[c0 + c, x]
                    for m in range(MICRO_COLS):
                        k_col[m] = s_k[x + TV_ * m, c]
                    for a in range(MICRO_ROWS):
                        k_row = s_k[y + KT_ * a, c]
                        q_row = s_q[y + KT_ * a, c]
                        acc_ks[a] += k_row * s_c
                        acc_qs[a] += q_row * s_c
                        for m in range(MICRO_COLS):
                            acc_kk[a, m] += k_row * k_col[m]
                            acc_qk[a, m] += q_row * k_col[m]
                cuda.syncthreads()
            # A[r, s] = beta_r (k_r . k_s) exp(gamma_r - gamma_s), s < r; rhs = beta (V - exp(gamma) K S)
            for a in range(MICRO_ROWS):
                r = y + KT_ * a
                if r < n:
                    for m in range(MICRO_COLS):
                        s = x + TV_ * m
                        s_mat[r, s] = s_beta[r] * acc_kk[a, m] * math.exp(s_gamma[r] - s_gamma[s]) if s < r else _ZERO
                    value = v[b, t0 + r, h, col] if live else _ZERO
                    s_vn[r, x] = s_beta[r] * (value - math.exp(s_gamma[r]) * acc_ks[a])
            cuda.syncthreads()
            # Vn = (I + A)^-1 rhs: once row s is final, subtract A[r, s] Vn_s from every later row
            for s in range(n - 1):
                solved = s_vn[s, x]
                for a in range(MICRO_ROWS):
                    r = y + KT_ * a
                    if s < r and r < n:
                        s_vn[r, x] -= s_mat[r, s] * solved
                cuda.syncthreads()
            # P[r, s] = (q_r . k_s) exp(gamma_r - gamma_s), s <= r, in A's storage
            for a in range(MICRO_ROWS):
                r = y + KT_ * a
                if r < n:
                    for m in range(MICRO_COLS):
                        s = x + TV_ * m
                        s_mat[r, s] = acc_qk[a, m] * math.exp(s_gamma[r] - s_gamma[s]) if s <= r else _ZERO
            cuda.syncthreads()
            # O_r = exp(gamma_r) q_r^T S + sum_{s <= r} P[r, s] Vn_s
            if live:
                for a in range(MICRO_ROWS):
                    r = y + KT_ * a
                    if r < n:
                        o = math.exp(s_gamma[r]) * acc_qs[a]
                        for s in range(r + 1):
                            o += s_mat[r, s] * s_vn[s, x]
                        out[b, t0 + r, h, col] = o
            # S <- exp(gamma_last) S + sum_s exp(gamma_last - gamma_s) k_s Vn_s^T, KT key rows at a time
            gamma_last = s_gamma[n - 1]
            for c0 in range(0, dk, KT_):
                for a in range(MICRO_ROWS):
                    r = y + KT_ * a
                    inside = r < n and c0 + x < dk
                    s_k[r, x] = k[b, t0 + r, kh, c0 + x] * math.exp(gamma_last - s_gamma[r]) if inside else _ZERO
                cuda.syncthreads()
                i = c0 + y
                if i < dk:
                    updated = math.exp(gamma_last) * s_state[i, x]
                    for s in range(n):
                        updated += s_k[s, y] * s_vn[s, x]
                    s_state[i, x] = updated
                cuda.syncthreads()
        # each thread stores the rows it loaded and updated: no barrier needed
        if live:
            for i in range(y, dk, KT_):
                state[b, h, i, col] = s_state[i, x]

    return gated_delta_chunked_kernel


def _grid(v: np.ndarray, columns: int) -> tuple[int, int, int]:
    """``(ceil(d_v / columns), Hv, B)``."""
    batch, _, heads, dv = v.shape
    return (dv + columns - 1) // columns, heads, batch


def launch_recurrent(q, k, v, g, beta, state, out, *, scale, tiles: DeltaTiles | None = None) -> None:
    """Run the recurrence over all T tokens; ``state`` is read and overwritten in place.

    Args:
        q, k: ``(B, T, Hk, d_k)`` float32, C-contiguous, q not yet scaled; ``d_k <= tiles.dk_max``.
        v: ``(B, T, Hv, d_v)``; g, beta: ``(B, T, Hv)``; float32, C-contiguous.
        state: ``(B, Hv, d_k, d_v)`` float32: the initial state in, the final state out.
        out: ``(B, T, Hv, d_v)`` float32, every element written.
        scale: multiplies q (a float32-representable positive number).
        tiles: a :class:`DeltaTiles` (default: the last of :data:`TILES`).

    Device or NumPy arrays; no checks (this is what a benchmark times).
    """
    tiles = tiles or TILES[-1]
    kernel = recurrent_kernel(tiles.rec_tv, tiles.rec_row_groups, tiles.dk_max)
    kernel[_grid(v, tiles.rec_tv), (tiles.rec_tv, tiles.rec_row_groups)](q, k, v, g, beta, state, out,
                                                                         np.float32(scale))


def launch_chunked(q, k, v, g, beta, state, out, *, chunk_size, scale, tiles: DeltaTiles | None = None) -> None:
    """Run the chunked form over all T tokens; ``state`` is read and overwritten in place.

    Args:
        q, k, v, g, beta, state, out, scale: as :func:`launch_recurrent`.
        chunk_size: C, ``1 <= C``; a chunk holds ``min(C, T)`` tokens at most, which must be
            ``<= tiles.chunk_max``.
        tiles: a :class:`DeltaTiles` (default: :func:`pick_tiles` for ``min(C, T)``).

    Device or NumPy arrays; no checks (this is what a benchmark times).
    """
    tiles = tiles or pick_tiles(min(chunk_size, v.shape[1]))
    kernel = chunked_kernel(tiles.tv, tiles.dk_max, tiles.chunk_max)
    kernel[_grid(v, tiles.tv), (tiles.tv, tiles.tv)](q, k, v, g, beta, state, out, np.float32(scale),
                                                     np.int32(chunk_size))


def _kernel_inputs(q, k, v, g, beta, initial_state, scale):
    """The reference's checks, then the kernel's: float32 C-contiguous copies (the state a fresh one),
    a float32 scale, and the storage dtype of q, k, v, beta."""
    q, k, v, g, beta, state, scale, storage = _check_inputs(q, k, v, g, beta, initial_state, scale)
    batch, _, heads, _ = v.shape
    if k.shape[3] > DK_MAX:
        raise ShapeError(f"gated_delta_rule (numba kernel): d_k={k.shape[3]} exceeds the kernel's DK_MAX={DK_MAX}")
    if max(batch, heads) > _GRID_YZ_MAX:
        raise ShapeError(f"gated_delta_rule (numba kernel): B={batch} and Hv={heads} must be <= {_GRID_YZ_MAX}")
    scale = check_finite_positive("gated_delta_rule: scale", scale, dtype=np.float32)
    arrays = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    with np.errstate(over="ignore"):
        arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}
        # a copy even when already float32: the caller's initial state is never written
        arrays["initial_state"] = np.array(state, dtype=np.float32, order="C")
    for name, array in arrays.items():
        if not np.all(np.isfinite(array)):
            raise InputError(f"gated_delta_rule (numba kernel): {name} overflows float32")
    return arrays, np.float32(scale), storage


def _run(launch, arrays: dict, storage, **options) -> tuple[np.ndarray, np.ndarray]:
    """Copy the float32 inputs and the state to the device, launch on a NaN-poisoned output, copy
    o and S back: o in the ``storage`` dtype, S in its compute dtype (as the reference returns them)."""
    device = {name: cuda.to_device(array) for name, array in arrays.items()}
    state = device.pop("initial_state")
    out = cuda.to_device(np.full(arrays["v"].shape, np.nan, np.float32))
    launch(**device, state=state, out=out, **options)
    # float64 storage: widened back; float16 / bfloat16: rounded once
    o = out.copy_to_host()
    o = to_storage(o, storage) if is_low_precision(storage) else o.astype(storage, copy=False)
    return o, state.copy_to_host().astype(compute_dtype(storage), copy=False)


def gated_delta_rule_recurrent(q, k, v, g, beta, *, initial_state=None, scale=None):
    """The gated delta rule token by token, on the GPU.

    Replaces :func:`refimpl.linear_attention.delta_rule.gated_delta_rule_recurrent`.

    Args:
        q, k, v, g, beta, initial_state, scale: as the reference; ``initial_state`` is not modified.

    Returns:
        ``(o (B, T, Hv, d_v), final_state (B, Hv, d_k, d_v))`` as the reference: in the inputs'
        dtype (float16 / bfloat16 inputs: o in it, the final state float32).

    Dtype: computed in float32 (float64 inputs rounded to float32 first; module docstring).

    Raises:
        InputError, ShapeError, RefimplError: as the reference; ShapeError for ``d_k > DK_MAX``;
            InputError for values that overflow float32.
    """
    arrays, scale, storage = _kernel_inputs(q, k, v, g, beta, initial_state, scale)
    return _run(launch_recurrent, arrays, storage, scale=scale)


def gated_delta_rule_chunked(q, k, v, g, beta, *, chunk_size=64, initial_state=None, scale=None):
    """The gated delta rule in chunks (WY representation / UT transform), on the GPU.

    Replaces :func:`refimpl.linear_attention.delta_rule.gated_delta_rule_chunked`.

    Args:
        q, k, v, g, beta, initial_state, scale: as the reference; ``initial_state`` is not modified.
        chunk_size: C, an integer ``1 <= C <= CHUNK_MAX``.

    Returns:
        ``(o (B, T, Hv, d_v), final_state (B, Hv, d_k, d_v))`` as the reference: in the inputs'
        dtype (float16 / bfloat16 inputs: o in it, the final state float32).

    Dtype: computed in float32 (float64 inputs rounded to float32 first; module docstring).

    Raises:
        InputError, ShapeError, RefimplError: as the reference; ShapeError for ``d_k > DK_MAX``;
            InputError for ``chunk_size > CHUNK_MAX`` or values that overflow float32.
    """
    arrays, scale, storage = _kernel_inputs(q, k, v, g, beta, initial_state, scale)
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size > CHUNK_MAX:
        raise InputError(f"gated_delta_rule (numba kernel): chunk_size={chunk_size} exceeds CHUNK_MAX={CHUNK_MAX}")
    return _run(launch_chunked, arrays, storage, chunk_size=chunk_size, scale=scale)


_ARRAY4 = "float32[:, :, :, ::1]"
_ARRAY3 = "float32[:, :, ::1]"
_ARGS = f"{_ARRAY4}, {_ARRAY4}, {_ARRAY4}, {_ARRAY3}, {_ARRAY3}, {_ARRAY4}, {_ARRAY4}, float32"

#: The GPU bundle's kernels (what ``ptx_check`` compiles).
KERNELS = {
    "gated_delta_recurrent_kernel": (
        recurrent_kernel(GPU_TILES.rec_tv, GPU_TILES.rec_row_groups, GPU_TILES.dk_max), [f"void({_ARGS})"]),
    "gated_delta_chunked_kernel": (
        chunked_kernel(GPU_TILES.tv, GPU_TILES.dk_max, GPU_TILES.chunk_max), [f"void({_ARGS}, int32)"]),
}
