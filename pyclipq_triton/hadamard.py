"""The block-Hadamard input rotation: y = x times diag(H_b, ..., H_b), H_b orthonormal.

One program takes BLOCK_M rows of one block of b channels and multiplies them by H_b with one
tl.dot in IEEE fp32 (16 <= b <= 128; the host wrapper computes other blocks through torch).
"""
import triton
import triton.language as tl


@triton.jit
def hadamard_kernel(x_ptr, h_ptr, y_ptr, n_rows, k, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """x, y float32 [n_rows, k]; h float32 [BLOCK, BLOCK]; grid (cdiv(n_rows, BLOCK_M), k // BLOCK)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = rows[:, None] < n_rows
    x = tl.load(x_ptr + rows[:, None] * k + cols[None, :], mask=valid, other=0.0)
    j = tl.arange(0, BLOCK)
    h = tl.load(h_ptr + j[:, None] * BLOCK + j[None, :])
    y = tl.dot(x, h, input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * k + cols[None, :], y, mask=valid)
