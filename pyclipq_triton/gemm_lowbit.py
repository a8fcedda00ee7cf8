"""int4 / int2 / ternary weights x int8 activations (W·A8) on int8 tensor cores.

Codes are unpacked in registers (shift + mask of a ``[32, BLOCK_N]`` byte tile, see
:mod:`pyclipq_triton.unpack`) and fed unsigned to an int8 ``tl.dot`` with K = 32 per
bit-field; the level offset is removed per group with the activation sums:

    sum_k level(c_k) x_k = LEVEL_MUL * sum_k c_k x_k - LEVEL_OFFSET * sum_k x_k

Why many K = 32 dots instead of one wide one: the block-planar layout puts 32
consecutive K values in one bit-field, so each dot's activation tile is one contiguous
32-byte run per row (vectorized loads); reordering the codes to one wide tile would
need a register shuffle or a gather on the activations. 32 is also the K of one
int8 mma/wgmma instruction, so nothing is lost.

One kernel, two outputs: ``FUSED=False`` stores the exact int32 group results
``[M, N, G]`` (the ``*_gemm`` ops); ``FUSED=True`` folds every group into an fp32
``sum_g w_scale[n, g] * acc_g`` and finishes with ``* s[m] + bias`` (the linears).
"""
import triton
import triton.language as tl

from .gemm_int8 import linear_epilogue, tile_ids
from .unpack import VECTOR_BYTES, unpack_field


@triton.jit
def _finish_group(acc, g, rm, rn, M, N, G, sums_ptr, ws_ptr, out_ptr, y,
                  LEVEL_MUL: tl.constexpr, LEVEL_OFFSET: tl.constexpr, FUSED: tl.constexpr):
    """Offset-correct one group's int32 accumulator; store it (int32 out) or fold it into y."""
    g_ok = g < G
    xs = tl.load(sums_ptr + rm * G + g, mask=(rm < M) & g_ok, other=0)
    exact = acc * LEVEL_MUL - LEVEL_OFFSET * xs[:, None]
    if FUSED:
        ws = tl.load(ws_ptr + rn * G + g, mask=(rn < N) & g_ok, other=0.0)
        y += exact.to(tl.float32) * ws[None, :]
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N) & g_ok
        tl.store(out_ptr + (rm[:, None] * N + rn[None, :]) * G + g, exact, mask=mask)
    return y


@triton.jit
def lowbit_gemm_kernel(a_ptr, w_ptr, sums_ptr, out_ptr, s_ptr, ws_ptr, bias_ptr,
                       M, N, K_PAD, G, stride_om,
                       BITS: tl.constexpr, LEVEL_MUL: tl.constexpr, LEVEL_OFFSET: tl.constexpr,
                       GROUP_STEPS: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr,
                       GROUP_M: tl.constexpr, EVEN: tl.constexpr):
    """a int8 [M, K_PAD]; w packed uint8 [N, K_PAD * BITS / 8]; sums int32 [M, G].

    GROUP_STEPS: group size in 32-element steps (1, 2, 4), or 0 for one group per row.
    Every loop iteration covers BLOCKS_PER_ITER packed 32-byte blocks; the host picks it
    so that an iteration holds whole groups (then every group end is a compile-time
    position in the unrolled body). Blocks past the end of the row are masked (code 0
    against activation 0) and groups past G are neither stored nor folded; EVEN (the
    block count is a multiple of BLOCKS_PER_ITER) drops those masks.
    """
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    STEPS_PER_ITER: tl.constexpr = BLOCKS_PER_ITER * CODES_PER_BYTE
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, VECTOR_BYTES)
    rm_safe = tl.minimum(rm, M - 1)
    rn_safe = tl.minimum(rn, N - 1)
    row_bytes = K_PAD // CODES_PER_BYTE
    n_blocks = row_bytes // VECTOR_BYTES
    a_rows = a_ptr + rm_safe[:, None] * K_PAD + j[None, :]
    w_cols = w_ptr + rn_safe[None, :] * row_bytes + j[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, tl.cdiv(n_blocks, BLOCKS_PER_ITER)):
        for b in tl.static_range(BLOCKS_PER_ITER):
            block = it * BLOCKS_PER_ITER + b
            if EVEN:
                packed = tl.load(w_cols + block * VECTOR_BYTES)
            else:
                packed = tl.load(w_cols + block * VECTOR_BYTES, mask=block < n_blocks, other=0)
            for p in tl.static_range(CODES_PER_BYTE):
                if EVEN:
                    a = tl.load(a_rows + block * VECTOR_BYTES * CODES_PER_BYTE + p * VECTOR_BYTES)
                else:
                    a = tl.load(a_rows + block * VECTOR_BYTES * CODES_PER_BYTE + p * VECTOR_BYTES, mask=block < n_blocks, other=0)
                acc = tl.dot(a, unpack_field(packed, p, BITS), acc, out_dtype=tl.int32)
                if GROUP_STEPS > 0:
                    if (b * CODES_PER_BYTE + p + 1) % GROUP_STEPS == 0:
                        g = (it * STEPS_PER_ITER + b * CODES_PER_BYTE + p) // GROUP_STEPS
                        y = _finish_group(acc, g, rm, rn, M, N, G, sums_ptr, ws_ptr, out_ptr, y,
                                          LEVEL_MUL, LEVEL_OFFSET, FUSED)
                        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if GROUP_STEPS == 0:
        y = _finish_group(acc, 0, rm, rn, M, N, G, sums_ptr, ws_ptr, out_ptr, y, LEVEL_MUL, LEVEL_OFFSET, FUSED)
    if FUSED:
        linear_epilogue(y, rm, rn, M, N, s_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)
