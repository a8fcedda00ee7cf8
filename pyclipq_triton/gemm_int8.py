"""int8 x int8 -> int32 GEMM on tensor cores (``tl.dot`` on int8: mma on sm_80, wgmma on sm_90).

One kernel serves two ops: the integer GEMM (``FUSED=False``: int32 ``[M, N]`` out)
and the fused linear epilogue (``FUSED=True``: ``y = (acc * w_scale[n]) * s[m] + bias``
in fp32, in the reference's order, stored in the output's dtype).

The weight is ``[N, K]`` row-major, so a ``[BLOCK_K, BLOCK_N]`` tile read through
``w + n * K + k`` is K-major: the layout wgmma wants for 8-bit operands.
"""
import triton
import triton.language as tl


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles walked together, so their weight tiles stay in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def linear_epilogue(y, rm, rn, M, N, s_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr):
    """y (fp32, already summed over groups with the weight scales) -> * s[m] + bias[n] -> out."""
    s = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
    y = y * s[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int8_gemm_kernel(a_ptr, w_ptr, out_ptr, s_ptr, ws_ptr, bias_ptr,
                     M, N, K, stride_om,
                     FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """a int8 [M, K], w int8 [N, K] (K a multiple of BLOCK_K: K_pad is a multiple of 128)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns are clamped, not masked: they compute garbage that is
    # never stored, and the loads stay unmasked (vectorized, pipelined).
    rm_safe = tl.minimum(rm, M - 1)
    rn_safe = tl.minimum(rn, N - 1)
    a_ptrs = a_ptr + rm_safe[:, None] * K + rk[None, :]
    w_ptrs = w_ptr + rn_safe[None, :] * K + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FUSED:
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        linear_epilogue(acc.to(tl.float32) * ws[None, :], rm, rn, M, N, s_ptr, bias_ptr, out_ptr, stride_om,
                        HAS_BIAS)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=mask)
