"""Packing kernels: block-planar codes (2/4 bits) and base-3 trits (docs/FORMATS.md).

Load-time work, not on the hot path: simple and exact rather than tuned.
"""
import triton
import triton.language as tl

from .unpack import TRITS_PER_BYTE, VECTOR_BYTES, decode_trit


@triton.jit
def pack_codes_kernel(codes_ptr, out_ptr, n_rows, k_pad, BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """codes uint8 [N, k_pad] -> packed uint8 [N, k_pad * BITS / 8]; grid (cdiv(N, BLOCK_ROWS), blocks)."""
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    block = tl.program_id(1)
    valid = rows[:, None] < n_rows
    j = tl.arange(0, VECTOR_BYTES)
    byte = tl.zeros([BLOCK_ROWS, VECTOR_BYTES], dtype=tl.int32)
    for p in tl.static_range(CODES_PER_BYTE):
        c = tl.load(codes_ptr + rows[:, None] * k_pad + block * VECTOR_BYTES * CODES_PER_BYTE + p * VECTOR_BYTES + j[None, :],
                    mask=valid, other=0)
        byte |= c.to(tl.int32) << (p * BITS)
    row_bytes = k_pad // CODES_PER_BYTE
    tl.store(out_ptr + rows[:, None] * row_bytes + block * VECTOR_BYTES + j[None, :], byte.to(tl.uint8), mask=valid)


@triton.jit
def pack_trits_kernel(codes_ptr, out_ptr, n_rows, width, k, n_bytes, PAD_CODE: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """codes uint8 [N, width] (first k used) -> uint8 [N, n_bytes]; byte j = sum_i c[5j+i] 3**i, missing trits = PAD_CODE."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < n_bytes)
    byte = tl.zeros([BLOCK_ROWS, BLOCK_BYTES], dtype=tl.int32)
    for i in tl.static_range(TRITS_PER_BYTE - 1, -1, -1):  # Horner: ((c4 * 3 + c3) * 3 + ...) + c0
        idx = cols[None, :] * TRITS_PER_BYTE + i
        c = tl.load(codes_ptr + rows[:, None] * width + idx, mask=valid & (idx < k), other=PAD_CODE)
        byte = byte * 3 + c.to(tl.int32)
    tl.store(out_ptr + rows[:, None] * n_bytes + cols[None, :], byte.to(tl.uint8), mask=valid)


@triton.jit
def unpack_trits_kernel(packed_ptr, out_ptr, n_rows, k, n_bytes, k_pad, PAD_CODE: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """uint8 [N, n_bytes] -> codes uint8 [N, k_pad]; columns >= k get PAD_CODE."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < k_pad)
    live = valid & (cols[None, :] < k)
    byte = tl.load(packed_ptr + rows[:, None] * n_bytes + cols[None, :] // TRITS_PER_BYTE, mask=live, other=0).to(tl.int32)
    position = cols[None, :] % TRITS_PER_BYTE
    code = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.int32)
    for i in tl.static_range(TRITS_PER_BYTE):
        code = tl.where(position == i, decode_trit(byte, i), code)
    code = tl.where(live, code, PAD_CODE)
    tl.store(out_ptr + rows[:, None] * k_pad + cols[None, :], code.to(tl.uint8), mask=valid)
