"""Weight-only low-bit linear for small M (pooled projections, text EOT tokens).

Activations stay in their float dtype (no per-token quantization): codes become exact
levels (|level| <= 7 is exact in bf16/fp16) and meet x in a float ``tl.dot`` with an
fp32 accumulator. M <= 16 is memory-bound on the packed weight, and N tiles alone give
too few programs to pull full bandwidth (N = 768 / BLOCK_N = 32 is 24 programs), so K
is split across ``SPLIT_K`` programs whose partial rows are summed with fp32 atomics
into a zeroed fp32 output (float addition in any order: the error bound in the tests
is the classical n·u one, independent of the order).

    y[m, n] = sum_g w_scale[n, g] * sum_{k in g} level(c[n, k]) * x[m, k] + bias[n]
"""
import triton
import triton.language as tl

from .unpack import VECTOR_BYTES, code_to_level, unpack_field


@triton.jit
def weight_only_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
                       M, N, K, K_PAD, G, stride_xm, stride_om,
                       BITS: tl.constexpr, LEVEL_MUL: tl.constexpr, LEVEL_OFFSET: tl.constexpr,
                       GROUP_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x float [M, K] (unpadded); w packed uint8 [N, K_PAD * BITS / 8]; ws fp32 [N, G].

    Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)). With SPLIT_K > 1, out is a
    zeroed fp32 [M, N] and every program adds its partial sum atomically; split 0 adds
    the bias. GROUP_STEPS: group size in 32-element steps, 0 = one group per row.
    DOT_FP32: multiply in fp32 (exact IEEE products; for fp32 x, and under the Triton
    interpreter, whose bf16/fp16 dot is wrong in Triton 3.8) instead of x's dtype.
    """
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, VECTOR_BYTES)
    row_bytes = K_PAD // CODES_PER_BYTE
    n_blocks = row_bytes // VECTOR_BYTES
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, n_blocks)
    rn_safe = tl.minimum(rn, N - 1)
    w_cols = w_ptr + rn_safe[None, :] * row_bytes + j[:, None]
    x_rows = x_ptr + rm[:, None] * stride_xm + j[None, :]
    row_ok = rm[:, None] < M
    y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for block in range(first, last):
        packed = tl.load(w_cols + block * VECTOR_BYTES)
        for p in tl.static_range(CODES_PER_BYTE):
            k0 = block * VECTOR_BYTES * CODES_PER_BYTE + p * VECTOR_BYTES
            x = tl.load(x_rows + k0, mask=row_ok & (k0 + j[None, :] < K), other=0.0)
            w = code_to_level(unpack_field(packed, p, BITS), LEVEL_MUL, LEVEL_OFFSET).to(tl.float32)
            if DOT_FP32:
                part = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                part = tl.dot(x, w.to(x.dtype))  # levels are exact in bf16/fp16
            if GROUP_STEPS == 0:
                y += part
            else:
                g = (block * CODES_PER_BYTE + p) // GROUP_STEPS
                y += part * tl.load(ws_ptr + rn_safe * G + g)[None, :]
    if GROUP_STEPS == 0:
        y = y * tl.load(ws_ptr + rn_safe)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
    mask = row_ok & (rn[None, :] < N)
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out, y, mask=mask)
    else:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
