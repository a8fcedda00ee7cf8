"""``@triton.jit`` helpers that decode pyclipq's packed weight layouts (docs/FORMATS.md).

Importable on their own (only ``triton`` is needed), so other projects' kernels can
read pyclipq checkpoints directly. ``unpack_codes_kernel`` at the bottom is the worked
example (and the Triton implementation of ``pyclipq::unpack_codes``).

Block-planar packing, the layout these helpers assume: a row is cut into blocks of
``32 * codes_per_byte`` codes; byte ``j`` of block ``b`` holds, in bit-field ``p``,
the code of element ``k = b * 32 * codes_per_byte + p * 32 + j``. So one ``[32, n]``
tile of bytes (32 consecutive bytes of ``n`` rows, K along the first axis) shifted by
``p * bits`` and masked is the ``[32, n]`` tile of codes for the 32 *consecutive* K
values ``b * 32 * codes_per_byte + p * 32 + (0..31)``: exactly the B operand of a
``tl.dot`` with K = 32, against a contiguous ``[m, 32]`` activation tile.
"""
import triton
import triton.language as tl

# The layout constants of docs/FORMATS.md, as the constexprs every kernel here uses (this package
# imports only triton; tests/test_triton_ops.py checks them against pyclipq.formats).
VECTOR_BYTES = tl.constexpr(32)  # bytes per block-planar block, whatever the bit width
TRITS_PER_BYTE = tl.constexpr(5)  # trits per byte of the ternary storage layout


@triton.jit
def unpack_field(packed, FIELD: tl.constexpr, BITS: tl.constexpr):
    """Bit-field ``FIELD`` of every byte of a uint8 tile, as int8 codes in [0, 2**BITS).

    Codes stay unsigned (a non-negative int8 is the same number), so they can feed an
    int8 ``tl.dot`` directly; the level offset is removed afterwards with activation
    sums (see ``code_to_level`` for the alternative).
    """
    mask: tl.constexpr = (1 << BITS) - 1
    return ((packed.to(tl.int32) >> (FIELD * BITS)) & mask).to(tl.int8)


@triton.jit
def code_to_level(codes, LEVEL_MUL: tl.constexpr, LEVEL_OFFSET: tl.constexpr):
    """Signed integer level ``LEVEL_MUL * code - LEVEL_OFFSET`` (int8: every level fits)."""
    return (codes.to(tl.int32) * LEVEL_MUL - LEVEL_OFFSET).to(tl.int8)


@triton.jit
def load_block_field_tile(w_ptr, row_bytes, rows, block, FIELD: tl.constexpr, BITS: tl.constexpr,
                          rows_valid):
    """Codes ``[32, len(rows)]`` of bit-field ``FIELD`` of block ``block`` of the given rows.

    ``w_ptr`` points at a packed uint8 ``[N, row_bytes]`` weight; rows outside
    ``rows_valid`` read as code 0 (mask them out of the result, or out of the store).
    """
    j = tl.arange(0, VECTOR_BYTES)
    ptrs = w_ptr + rows[None, :] * row_bytes + block * VECTOR_BYTES + j[:, None]
    packed = tl.load(ptrs, mask=rows_valid[None, :], other=0)
    return unpack_field(packed, FIELD, BITS)


@triton.jit
def decode_trit(byte, POSITION: tl.constexpr):
    """Trit ``POSITION`` (0..4) of a base-3 storage byte: ``(byte // 3**POSITION) % 3``."""
    power: tl.constexpr = 3 ** POSITION
    return (byte.to(tl.int32) // power) % 3


@triton.jit
def unpack_codes_kernel(packed_ptr, out_ptr, n_rows, row_bytes,
                        BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Example kernel: block-planar packed uint8 ``[N, row_bytes]`` -> codes uint8 ``[N, row_bytes * 8 / BITS]``.

    Grid ``(cdiv(N, BLOCK_ROWS), row_bytes // 32)``: one program expands one 32-byte
    block of ``BLOCK_ROWS`` rows into its ``32 * 8 / BITS`` codes.
    """
    CODES_PER_BYTE: tl.constexpr = 8 // BITS
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    block = tl.program_id(1)
    valid = rows < n_rows
    j = tl.arange(0, VECTOR_BYTES)
    k_pad = row_bytes * CODES_PER_BYTE
    for p in tl.static_range(CODES_PER_BYTE):
        codes = load_block_field_tile(packed_ptr, row_bytes, rows, block, p, BITS, valid)  # [32, rows]
        out = out_ptr + rows[None, :] * k_pad + block * VECTOR_BYTES * CODES_PER_BYTE + p * VECTOR_BYTES + j[:, None]
        tl.store(out, codes.to(tl.uint8), mask=valid[None, :])
