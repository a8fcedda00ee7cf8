"""Per-token symmetric int8 activation quantization with group sums (docs/FORMATS.md).

Bit-exact with the reference: the scale and its inverse are IEEE divisions
(``div_rn``; Triton's ``/`` on fp32 may be approximate on GPUs), the product
``x * inv`` is one fp32 rounding, and rounding to the nearest even integer is the
``+ 1.5 * 2**23`` trick, exact for |v| <= 127 (we clamp first: clamping to integer
bounds commutes with rounding).
"""
import triton
import triton.language as tl

# 1.5 * 2**23: adding it leaves no fraction bits in fp32, so the add rounds half-to-even.
# A tl.constexpr: compiled kernels may only read constexpr globals (the interpreter reads any).
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_half_even(v):
    """Nearest integer, ties to even, for |v| < 2**22 (fp32 in, fp32 out)."""
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _row_scales(x_ptr, act_scale_ptr, rows, row_ok, stride_xm, K,
                STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_ABSMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """(inv, scale) per row; a row with a NaN or Inf gets scale NaN (its results are NaN)."""
    if STATIC:
        s = tl.load(act_scale_ptr).to(tl.float32)
        inv = tl.math.div_rn(tl.full([1], 1.0, tl.float32), s) + tl.zeros_like(rows).to(tl.float32)
        scale = s + tl.zeros_like(rows).to(tl.float32)
    else:
        amax = tl.zeros_like(rows).to(tl.float32)
        bad = tl.zeros_like(rows)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                        mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
            ax = tl.abs(x)
            amax = tl.maximum(amax, tl.max(ax, axis=1))
            # max() may drop NaNs, so non-finite values are counted on the side
            bad += tl.sum((~(ax <= 3.4028234663852886e38)).to(tl.int32), axis=1)
        qmax = tl.full([1], QMAX, tl.float32)
        usable = amax >= MIN_ABSMAX  # below it, QMAX / amax may overflow: zero codes
        safe = tl.where(usable, amax, 1.0)
        inv = tl.where(usable, tl.math.div_rn(qmax + tl.zeros_like(safe), safe), 0.0)
        scale = tl.math.div_rn(amax, qmax + tl.zeros_like(amax))
        scale = tl.where(bad > 0, float("nan"), scale)
    return inv, scale


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, sums_ptr, act_scale_ptr,
                              M, K, K_PAD, G, stride_xm,
                              GROUP_SIZE: tl.constexpr, STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_ABSMAX: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x float [M, K] (row stride stride_xm) -> q int8 [M, K_PAD], scale fp32 [M], sums int32 [M, G].

    GROUP_SIZE 0 = one group per row. BLOCK_K must be a multiple of GROUP_SIZE (128 is).
    When K_PAD <= BLOCK_K the second pass re-reads x from L1/L2, not DRAM.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    inv, scale = _row_scales(x_ptr, act_scale_ptr, rows, row_ok, stride_xm, K, STATIC, QMAX, MIN_ABSMAX, BLOCK_K)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    total = tl.zeros_like(rows)
    for k0 in range(0, K_PAD, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * inv[:, None], -QMAX), QMAX)
        q = round_half_even(v).to(tl.int32)
        tl.store(q_ptr + rows[:, None] * K_PAD + cols[None, :], q.to(tl.int8),
                 mask=row_ok[:, None] & (cols[None, :] < K_PAD))
        if GROUP_SIZE == 0:
            total += tl.sum(q, axis=1)
        else:
            GROUPS_PER_TILE: tl.constexpr = BLOCK_K // GROUP_SIZE
            gsum = tl.sum(tl.reshape(q, [BLOCK_M, GROUPS_PER_TILE, GROUP_SIZE]), axis=2)
            g = k0 // GROUP_SIZE + tl.arange(0, GROUPS_PER_TILE)
            tl.store(sums_ptr + rows[:, None] * G + g[None, :], gsum, mask=row_ok[:, None] & (g[None, :] < G))
    if GROUP_SIZE == 0:
        tl.store(sums_ptr + rows, total, mask=row_ok)
