"""Multi-head Latent Attention decode on the GPU, in the absorbed form.

Implements :func:`refimpl.mla.mla_attend_absorbed` (DeepSeek-V3, Kimi K2: a call continuing an
MLA cache). The host (NumPy) does the per-head products; the kernel does the latent attention:

    q~_i = [(W^{UK}_i)^T q^C_i ; q^R_i]                      (Dc + Dr)   host: q_latent
    o~_i = sum_j softmax_j(s q~_i . [c_j ; k^R_j]) c_j       (Dc)        kernel
    o_i  = W^{UV}_i o~_i,   u = W^O [o_1; ...; o_H]                      host

All H query heads share ONE key/value head: keys are ``[c^{KV}_j ; k^R_j]``, read from the two
cache arrays separately (never concatenated), and the values are ``c^{KV}_j`` itself. The mask
is the caller's explicit ``(T, S)`` or ``(B, T, S)`` bool array (passed to the kernel as uint8
``(B, T, S)``); a row that sees no slot is zeros, as the reference.

Algorithm: split-K FlashAttention (as :mod:`refimpl.kernels.attention`'s decode, whose device
functions and merge kernel this module reuses). Rows are ``r = t H + h``: a block takes BM
rows (32 heads of one token at H = 128) and one partition of consecutive BN-slot key tiles; per key tile the
scores ``S = (s Q) K^T`` are accumulated over the Dc + Dr dims in DK-dim chunks staged in shared
memory (a chunk's K comes from ``c_kv`` for d < Dc and from ``k_rope`` beyond), masked, and folded
into the running max / sum / output with the online softmax; ``O += P C`` stages BNV latent
rows at a time. Each block writes its unnormalised (BM x Dc) output, max and sum;
:func:`refimpl.kernels.attention.merge_partials_kernel` merges the partitions (log-sum-exp).

Launch configuration (DeepSeek-V3: H = 128, Dc = 512, Dr = 64; :data:`MLA_TILES`):

    ==============  ======================================================================
    BM = 32         heads per block; 256 threads = TY 8 x TX 32, each 4 heads x 4 keys of
                    the score tile and 4 heads x 16 latent columns of the output (64
                    accumulators in registers)
    BN = 128        slots per key tile; DK = 32 dims per staged Q / K chunk (18 chunks for
                    Dc + Dr = 576); BNV = 8 latent rows (8 x 512) per staged V step
    shared memory   staging max((32 + 128) x 33, 8 x 512) floats = 20.6 KB, probabilities
                    32 x 129 = 16.5 KB, softmax state 32 x (2 x 32 + 3) floats and 4 x 32
                    int32: 45.6 KB (ptxas 12.9, sm_90; 211 registers, no spills: one block
                    of 8 warps per SM)
    grid            (ceil(T H / 32), partitions, B), partitions of the key tiles so that
                    the grid has about :data:`~refimpl.kernels.attention.TARGET_BLOCKS` blocks
    ==============  ======================================================================

The row tiles of one partition are adjacent in the grid (x fastest), so the 4 blocks that
read the same latent rows for H = 128 are scheduled together and 3 of the 4 reads should hit
L2: each latent row comes from DRAM about once. A block holding all 128 heads would need 128 x 512 fp32
accumulators, 256 per thread at 256 threads, more registers than a thread has. In float32 on
CUDA cores the kernel is compute-bound at DeepSeek sizes: per cached slot it does
H (Dc + Dr + Dc) = 139k FMAs for 2.3 KB read, about 120 FLOP/byte, where an H200 has about 14
FLOP of fp32 (CUDA-core) throughput per byte of bandwidth.

Under the simulator the launcher uses :data:`SIMULATOR_MLA_TILES` (2 x 2 threads).

Dtypes: the kernel reads float32 and accumulates in float32. The launcher accepts what the
reference accepts: a float64 or float32 step computes q~ and the output projections on the
host in that dtype and the attention in float32 (inputs rounded to float32 on the host); a
float16 / bfloat16 step follows the reference's storage policy (each product computed in
float32, rounded to the storage dtype once). The result is in the step's dtype.

Not supported: Dc > 512 (the register accumulators), masks that differ per head.

Paper: DeepSeek-V2, arXiv:2405.04434, sec. 2.1.2 (absorption); DeepSeek-V3, arXiv:2412.19437,
sec. 2.1.1; Dao, FlashAttention-2, arXiv:2307.08691; Flash-Decoding (split-K).
Checked against: :func:`refimpl.mla.mla_attend_absorbed` and :func:`refimpl.mla.mla_attend_literal`
(``tests/test_kernels_mla.py``).
"""

from __future__ import annotations

import functools

import numpy as np

from ..attention import _check_shapes
from ..errors import ShapeError
from ..mla import MlaStep, _project, split_kv_b_proj
from ..numerics import as_array, as_float_array, check_same_dtype, to_compute, to_storage
from ._numba import SIMULATOR, cuda, float32, int32
from .attention import (
    LOAD_BATCH, MERGE_THREADS, NEG_INF, TARGET_BLOCKS, FlashTiles, _ceil_div, block_device, flash_parts, ix,
    merge_partials_kernel,
)

#: The largest latent width Dc the kernel accumulates in registers (DeepSeek-V3, Kimi K2: 512).
DC_LIMIT = 512
#: GPU tile bundle (module docstring).
MLA_TILES = FlashTiles(block_m=32, block_n=128, threads_y=8, threads_x=32, chunk_d=32, block_nv=8, dv_max=512)
#: The same kernel with 2 x 2 threads for numba's CUDA simulator, by Dc max.
SIMULATOR_MLA_TILES = tuple(
    FlashTiles(block_m=8, block_n=8, threads_y=2, threads_x=2, chunk_d=8, block_nv=4, dv_max=dv)
    for dv in (16, 64, 512)
)


@functools.lru_cache(maxsize=None)
def mla_kernel(tiles: FlashTiles):
    """The split-K latent attention kernel compiled for ``tiles``.

    mla_partial(q, c_kv, k_rope, mask, part_o, part_ml, scale, tiles_per_partition):
        q (B, T, H, Dc + Dr) the absorbed queries, c_kv (B, S, 1, Dc), k_rope (B, S, Dr), mask
        (B, T, S) uint8 (nonzero: visible); grid (ceil(T H / BM), P, B); writes partition p's
        partials ``part_o`` (B, T H, P, Dc) and ``part_ml`` (B, T H, P, 2) (max, sum).
    """
    setup_rows, stage_q, qk_chunk, online_softmax, accumulate, store_partials = flash_parts(tiles)
    BM, BN, TY, TX, DK = tiles.block_m, tiles.block_n, tiles.threads_y, tiles.threads_x, tiles.chunk_d
    NT = TY * TX
    RM, KN, NCOL = BM // TY, BN // TX, tiles.dv_max // TX
    DKP, BNP = DK + 1, BN + 1
    STAGE = max(BM * DKP + BN * DKP, tiles.block_nv * tiles.dv_max)
    K_AT = BM * DKP
    LK = -(-BN * DK // NT)

    @block_device
    def stage_k(c_kv, k_rope, b, key0, d0, stage):
        """Stage this thread's elements of the key chunk ``[c_kv ; k_rope][key0:key0 + BN, d0:d0 + DK]``:
        dims < Dc from the latent cache, the rest from the rotary key cache (zeros past S and
        Dc + Dr); loads LOAD_BATCH at a time through registers, as the attention kernels."""
        tid = cuda.threadIdx.x
        num_keys = c_kv.shape[1]
        latent = c_kv.shape[3]
        width = latent + k_rope.shape[2]
        buf = cuda.local.array(LOAD_BATCH, float32)
        for u0 in range(0, LK, LOAD_BATCH):
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                key = key0 + e // DK
                d = d0 + e % DK
                buf[u] = float32(0.0)
                if e < BN * DK and key < num_keys:
                    if d < latent:
                        buf[u] = c_kv[ix(b), ix(key), 0, ix(d)]
                    elif d < width:
                        buf[u] = k_rope[ix(b), ix(key), ix(d - latent)]
            for u in range(LOAD_BATCH):
                e = tid + (u0 + u) * NT
                if e < BN * DK:
                    stage[ix(K_AT + (e // DK) * DKP + e % DK)] = buf[u]

    @block_device
    def scores(q, c_kv, k_rope, b, rows, key0, scale, s, stage):
        """s[i, c] = scale q~_row . [c_key ; kR_key] for the thread's rows and keys, over Dc + Dr in
        DK-dim chunks staged in shared memory."""
        width = q.shape[3]
        for i in range(RM):
            for c in range(KN):
                s[i, c] = float32(0.0)
        for d0 in range(0, width, DK):
            cuda.syncthreads()
            stage_q(q, b, rows, d0, scale, stage)
            stage_k(c_kv, k_rope, b, key0, d0, stage)
            cuda.syncthreads()
            qk_chunk(stage, s)

    @block_device
    def apply_mask(mask, b, rows, key0, s, p_sh, red):
        """p_sh = the scores where ``mask[b, t, key]`` is set, -inf elsewhere; red = each thread's row maxima."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        num_keys = mask.shape[2]
        for i in range(RM):
            row = ty * RM + i
            t = rows[0, row]
            top = NEG_INF
            for c in range(KN):
                key = key0 + tx + c * TX
                x = NEG_INF
                if key < num_keys and mask[b, t, key] != 0:
                    x = s[i, c]
                p_sh[row, tx + c * TX] = x
                top = max(top, x)
            red[row, tx] = top

    @cuda.jit
    def mla_partial(q, c_kv, k_rope, mask, part_o, part_ml, scale, tiles_per_partition):
        rows = cuda.shared.array((4, BM), int32)
        m_sh = cuda.shared.array((2, BM), float32)
        l_own = cuda.shared.array((BM, TX), float32)
        fac = cuda.shared.array(BM, float32)
        stage = cuda.shared.array(STAGE, float32)
        p_sh = cuda.shared.array((BM, BNP), float32)
        red = cuda.shared.array((BM, TX), float32)
        s = cuda.local.array((RM, KN), float32)
        acc = cuda.local.array((RM, NCOL), float32)
        b = cuda.blockIdx.z
        row0 = cuda.blockIdx.x * BM
        part = cuda.blockIdx.y
        heads = q.shape[2]
        num_tiles = (c_kv.shape[1] + BN - 1) // BN
        tile_begin = part * tiles_per_partition
        tile_end = min(num_tiles, tile_begin + tiles_per_partition)
        # One key/value head: row r = t H + h is head h of token t.
        setup_rows(q.shape[1] * heads, heads, 0, row0, rows, m_sh, l_own, acc)
        cuda.syncthreads()
        par = 0
        for kt in range(tile_begin, tile_end):
            key0 = kt * BN
            scores(q, c_kv, k_rope, b, rows, key0, scale, s, stage)
            apply_mask(mask, b, rows, key0, s, p_sh, red)
            online_softmax(par, p_sh, red, m_sh, l_own, fac)
            par = 1 - par
            accumulate(c_kv, b, 0, key0, p_sh, fac, acc, stage)
        store_partials(b, row0, part, rows, par, m_sh, l_own, acc, part_o, part_ml)

    return mla_partial


def launch_mla_decode(q_latent, c_kv, k_rope, mask, out, *, scale, tiles: FlashTiles | None = None,
                      tiles_per_partition: int | None = None) -> None:
    """Launch the split-K latent attention, then the log-sum-exp merge.

    Args:
        q_latent: ``(B, T, H, Dc + Dr)`` float32, the absorbed queries ``[(W^UK)^T q^C ; q^R]``.
        c_kv: ``(B, S, Dc)`` float32 latent cache (keys' first Dc dims and the values), Dc <= 512.
        k_rope: ``(B, S, Dr)`` float32 rotary key cache.
        mask: ``(B, T, S)`` uint8, nonzero where token t sees slot s.
        out: ``(B, T, H, Dc)`` float32, written entirely (the attended latents o~).
        scale: the softmax scale s.
        tiles: a :class:`~refimpl.kernels.attention.FlashTiles` (default :data:`MLA_TILES`, or
            the simulator bundle for Dc).
        tiles_per_partition: key tiles per partition (default: about TARGET_BLOCKS blocks).

    All arrays C-contiguous, NumPy or device arrays. Grids: (ceil(T H / BM), P, B), then
    (T H, B). Scratch: ``(B, T H, P, Dc)`` partial outputs and ``(B, T H, P, 2)``.
    """
    batch, num_queries, heads, _ = q_latent.shape
    num_keys, latent = c_kv.shape[1], c_kv.shape[2]
    if tiles is None:
        tiles = next(t for t in SIMULATOR_MLA_TILES if t.dv_max >= latent) if SIMULATOR else MLA_TILES
    rows = num_queries * heads
    row_tiles = _ceil_div(rows, tiles.block_m)
    num_tiles = _ceil_div(num_keys, tiles.block_n)
    if tiles_per_partition is None:
        tiles_per_partition = _ceil_div(num_tiles, _ceil_div(TARGET_BLOCKS, batch * row_tiles))
    tiles_per_partition = max(1, tiles_per_partition)
    partitions = max(1, _ceil_div(num_tiles, tiles_per_partition))
    part_o = cuda.device_array((batch, rows, partitions, latent), dtype=np.float32)
    part_ml = cuda.device_array((batch, rows, partitions, 2), dtype=np.float32)
    # The values are the latent rows: the same cache viewed as one key/value head.
    values = c_kv.reshape(batch, num_keys, 1, latent)
    mla_kernel(tiles)[(row_tiles, partitions, batch), tiles.threads](
        q_latent, values, k_rope, mask, part_o, part_ml, np.float32(scale), np.int32(tiles_per_partition))
    merge_partials_kernel[(rows, batch), min(MERGE_THREADS, latent)](
        part_o, part_ml, np.zeros(0, np.float32), out)


def _checked_cache(step: MlaStep, c_kv, k_rope, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """c_kv (B, S, Dc), k_rope (B, S, Dr) and the mask as uint8 (B, T, S), with the reference's errors."""
    dims = step.dims
    b, t, h, _ = step.q_nope.shape
    c_kv = as_float_array("mla: c_kv", c_kv, ndim=3)
    k_rope = as_float_array("mla: k_rope", k_rope, ndim=3)
    s = c_kv.shape[1]
    if c_kv.shape != (b, s, dims.kv_lora_rank) or k_rope.shape != (b, s, dims.qk_rope_head_dim):
        raise ShapeError(f"mla: c_kv {c_kv.shape} and k_rope {k_rope.shape} must be ({b}, S, {dims.kv_lora_rank}) "
                         f"and ({b}, S, {dims.qk_rope_head_dim})")
    if dims.kv_lora_rank > DC_LIMIT:
        raise ShapeError(f"mla kernel: kv_lora_rank {dims.kv_lora_rank} exceeds the largest supported, {DC_LIMIT}")
    check_same_dtype(q_nope=step.q_nope, c_kv=c_kv, k_rope=k_rope)
    mask = as_array("attention: mask", mask)
    # The reference's shape check on broadcast views (nothing is concatenated or allocated).
    width = dims.kv_lora_rank + dims.qk_rope_head_dim
    _check_shapes(np.broadcast_to(np.zeros((), np.float32), (b, t, h, width)),
                  np.broadcast_to(np.zeros((), np.float32), (b, s, 1, width)),
                  np.broadcast_to(np.zeros((), np.float32), (b, s, 1, dims.kv_lora_rank)), mask)
    mask = np.ascontiguousarray(np.broadcast_to(mask, (b, t, s)), dtype=np.uint8)
    return c_kv, k_rope, mask


def mla_attend_absorbed(step: MlaStep, c_kv: np.ndarray, k_rope: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`refimpl.mla.mla_attend_absorbed` with the latent attention on the GPU.

    Args:
        step: from :func:`refimpl.mla.mla_project` (queries, weights, widths, scale).
        c_kv: ``(B, S, Dc)`` and k_rope: ``(B, S, Dr)``: the slots attended over.
        mask: bool ``(T, S)`` or ``(B, T, S)``, True where query t sees slot s.

    Returns:
        ``(B, T, M)`` after o_proj, in the step's dtype.

    Dtype: q~ = W^UK^T q^C, W^UV o~ and o_proj on the host as the reference; the attention in
    float32 (float64 inputs rounded to float32 first).

    Raises:
        ShapeError: c_kv / k_rope / mask shapes that do not fit the step; Dc > 512.
        InputError: non-float caches, a ragged mask. RefimplError: dtypes differ from the step's.
    """
    c_kv, k_rope, mask = _checked_cache(step, c_kv, k_rope, mask)
    w, dims = step.weights, step.dims
    b, t, h, _ = step.q_nope.shape
    storage = step.q_nope.dtype
    w_uk, w_uv = split_kv_b_proj(w["kv_b_proj.weight"], dims)
    # q^C . (W^UK c) = ((W^UK)^T q^C) . c: the query moves into the latent space.
    q_latent = to_storage(np.einsum("bthn,hnc->bthc", to_compute(step.q_nope), to_compute(w_uk)), storage)
    q = np.concatenate([q_latent, step.q_rope], axis=-1)
    if 0 in (b, t, h):
        out_latent = np.zeros((b, t, h, dims.kv_lora_rank), np.float32)
    elif c_kv.shape[1] == 0:
        out_latent = np.zeros((b, t, h, dims.kv_lora_rank), np.float32)  # no slot: every row fully masked
    else:
        arrays = [cuda.to_device(np.ascontiguousarray(a, dtype=np.float32)) for a in (q, c_kv, k_rope)]
        out = cuda.to_device(np.full((b, t, h, dims.kv_lora_rank), np.nan, np.float32))
        launch_mla_decode(*arrays, cuda.to_device(mask), out, scale=step.scale)
        out_latent = out.copy_to_host()
    out_latent = to_storage(out_latent, storage) if storage != np.float64 else out_latent.astype(np.float64)
    # sum_j p_j W^UV c_j = W^UV sum_j p_j c_j: W^UV after attention.
    out = to_storage(np.einsum("bthc,hvc->bthv", to_compute(out_latent), to_compute(w_uv)), storage)
    return _project(out.reshape(b, t, h * dims.v_head_dim), w, "o_proj")


KERNELS = {
    "mla_partial": (mla_kernel(MLA_TILES), [
        "void(float32[:, :, :, ::1], float32[:, :, :, ::1], float32[:, :, ::1], uint8[:, :, ::1], "
        "float32[:, :, :, ::1], float32[:, :, :, ::1], float32, int32)"]),
}
