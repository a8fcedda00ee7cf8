"""The weight and activation formats of pyclipq: the Python mirror of docs/FORMATS.md.

Everything here is the reference definition (plain PyTorch, exact). The C++ mirror
is ``csrc/include/pyclipq/formats.h``; nothing else defines a bit layout. The math that
quantizes to these formats is pyclipq.primitives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
K_BLOCK = 128
VECTOR_BYTES = 32
GROUP_SIZES = (0, 32, 64, 128)  # 0 = one group per output channel
THRESHOLD_RULES = ("absmean", "twice_mean")
TRITS_PER_BYTE = 5
MAX_TRIT_BYTE = 3**TRITS_PER_BYTE - 1  # 242: the largest byte of the base-3 storage layout
ACT_QMAX = 127
# A dynamic row whose absmax is below this quantizes to zero codes, as an all-zero row does:
# 127 / absmax overflows fp32 to inf below ~3.7e-37 (and inf * 0 is NaN), and 2^-100 leaves
# every scale absmax / 127 a normal float, which flush-to-zero hardware keeps too.
ACT_MIN_ABSMAX = 2.0**-100


@dataclass(frozen=True)
class WeightFormat:
    """Everything code may ask of a format; nothing outside this module branches on its name.

    C++ mirror: ``FormatTraits`` in csrc/include/pyclipq/formats.h (bits, level_mul,
    level_offset, pad_code, max_code), checked by tests/test_formats.py through ``_C``.
    """

    name: str
    bits: int
    level_mul: int
    level_offset: int
    pad_code: int
    qmax: int  # largest |level| the scale maps absmax to
    grouped: bool
    min_code: int  # the code range the kernels accept (int8: signed codes, the levels themselves)
    max_code: int
    default_group_size: int = 0  # what a config naming the format without a group size gets
    threshold_rule: bool = False  # the scale and levels come from a threshold rule (THRESHOLD_RULES)
    trit_storage: bool = False  # checkpoints store its codes base 3 (TRITS_PER_BYTE to a byte)

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def bit_packed(self) -> bool:
        """Several codes to a byte, block-planar (docs/FORMATS.md); int8 holds one code a byte."""
        return self.codes_per_byte > 1

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the unpacked codes and of the packed weight: int8 for signed codes, else uint8."""
        return torch.int8 if self.min_code < 0 else torch.uint8

    @property
    def block_elems(self) -> int:
        return VECTOR_BYTES * self.codes_per_byte

    @property
    def max_abs_level(self) -> int:
        """The largest |level| any code stands for (int32 accumulator bounds)."""
        return max(abs(self.level_mul * c - self.level_offset) for c in (self.min_code, self.max_code))

    def level(self, codes: torch.Tensor) -> torch.Tensor:
        return self.level_mul * codes.to(torch.int32) - self.level_offset

    def scale_shape(self, n: int, k: int, group_size: int) -> tuple[int, ...]:
        """Shape of the scales of an [n, k] weight: [N, G] for a grouped format, else [N]."""
        return (n, num_groups(padded_k(k), group_size)) if self.grouped else (n,)


INT8 = WeightFormat("int8", 8, 1, 0, 0, 127, grouped=False, min_code=-127, max_code=127)
INT4 = WeightFormat("int4", 4, 1, 8, 8, 7, grouped=True, min_code=0, max_code=15, default_group_size=128)
INT2 = WeightFormat("int2", 2, 2, 3, 1, 3, grouped=True, min_code=0, max_code=3, default_group_size=64)
TERNARY = WeightFormat("ternary", 2, 1, 1, 1, 1, grouped=False, min_code=0, max_code=2, threshold_rule=True,
                       trit_storage=True)
FORMATS = {f.name: f for f in (INT8, INT4, INT2, TERNARY)}


def get_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def as_format(fmt: "str | WeightFormat") -> WeightFormat:
    """A format given by name or as its WeightFormat -> the WeightFormat (the one normalizer)."""
    return fmt if isinstance(fmt, WeightFormat) else get_format(fmt)


def padded_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"in_features (K) must be >= 1, got {k}")
    return -(-k // K_BLOCK) * K_BLOCK


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (0 = per output channel), got {group_size}")


def num_groups(k_pad: int, group_size: int) -> int:
    check_group_size(group_size)
    return 1 if group_size == 0 else k_pad // group_size


# ---------------------------------------------------------------- packing (reference)

def pack_codes_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K_pad] -> block-planar packed uint8 [N, K_pad * bits / 8]."""
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    n, k_pad = codes.shape
    per_byte = 8 // bits
    block = VECTOR_BYTES * per_byte
    if k_pad % block:
        raise ValueError(f"codes must have a multiple of {block} columns, got {k_pad}")
    c = codes.to(torch.int32).view(n, k_pad // block, per_byte, VECTOR_BYTES)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * bits).view(1, 1, per_byte, 1)
    packed = (c << shifts).sum(dim=2)
    return packed.to(torch.uint8).view(n, k_pad // per_byte)


def unpack_codes_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    n, nbytes = packed.shape
    per_byte = 8 // bits
    p = packed.to(torch.int32).view(n, nbytes // VECTOR_BYTES, 1, VECTOR_BYTES)
    shifts = (torch.arange(per_byte, dtype=torch.int32) * bits).view(1, 1, per_byte, 1)
    codes = (p >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).view(n, nbytes * per_byte)


def random_packed_weight(fmt: "str | WeightFormat", n: int, k: int, group_size: int = 0, *,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales) of an [n, k] layer whose codes are drawn uniformly over the format's
    whole code range, with positive scales: kernel tests and benchmarks then reach every level,
    which a quantized Gaussian weight rarely does at the extremes."""
    spec = as_format(fmt)
    k_pad = padded_k(k)
    codes = torch.randint(spec.min_code, spec.max_code + 1, (n, k_pad), generator=generator).to(spec.code_dtype)
    packed = pack_codes_reference(codes, spec.bits) if spec.bit_packed else codes
    groups = num_groups(k_pad, group_size)
    scale = torch.rand((n, groups) if spec.grouped else (n,), generator=generator) + 0.01
    return packed, scale


def pack_trits_reference(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Ternary codes {0,1,2} [N, >=K] -> base-3 storage layout uint8 [N, ceil(K/5)]."""
    n = codes.shape[0]
    nbytes = -(-k // TRITS_PER_BYTE)
    c = torch.ones((n, nbytes * TRITS_PER_BYTE), dtype=torch.int32)
    c[:, :k] = codes[:, :k].to(torch.int32)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    return (c.view(n, nbytes, TRITS_PER_BYTE) * powers).sum(dim=2).to(torch.uint8)


def unpack_trits_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Base-3 storage layout -> ternary codes uint8 [N, K_pad] (compute-layout codes, unpacked)."""
    n, nbytes = packed.shape
    if nbytes != -(-k // TRITS_PER_BYTE):
        raise ValueError(f"packed has {nbytes} bytes per row, expected ceil({k}/5) = {-(-k // TRITS_PER_BYTE)}")
    p = packed.to(torch.int32)
    if (p > MAX_TRIT_BYTE).any():
        raise ValueError(f"packed trits contain a byte > {MAX_TRIT_BYTE}: not a base-3 ternary layout")
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    trits = (p[:, :, None] // powers) % 3
    codes = torch.full((n, padded_k(k)), TERNARY.pad_code, dtype=torch.uint8)
    codes[:, :k] = trits.view(n, -1)[:, :k].to(torch.uint8)
    return codes


# ---------------------------------------------------------------- tile layout (a backend layout)

TILE_COLUMNS = 16  # columns of one tile: formats.h kTileColumns
TILE_K = 64  # K of one tile: formats.h kTileK


def tile_layout_shape(spec: WeightFormat, n: int, k_pad: int) -> tuple[int, int, int]:
    """Shape of the tile layout of an [n, k_pad] weight: [panels, K tiles, bytes per tile]."""
    return -(-n // TILE_COLUMNS), k_pad // TILE_K, TILE_COLUMNS * TILE_K // spec.codes_per_byte


def tile_layout(packed: torch.Tensor, spec: "WeightFormat | str") -> torch.Tensor:
    """The compute layout (int8 [N, K_pad] or block-planar codes) -> the tile layout (docs/FORMATS.md).

    Tile (p, t) holds columns 16 p .. 16 p + 15 and K = 64 t .. 64 t + 63 as 1024 codes in VNNI-4
    order, position 64 r + 4 j + e = (n = 16 p + j, k = 64 t + 4 r + e). With c codes to a byte,
    byte i of a tile holds the codes at positions i + q * 1024 / c in bits [q * bits, (q + 1) * bits).
    Columns past N hold the pad code.
    """
    spec = as_format(spec)
    if packed.dim() != 2 or packed.dtype != spec.code_dtype:
        raise ValueError(f"packed must be the 2-D {spec.code_dtype} compute layout of format {spec.name!r}, "
                         f"got {packed.dtype} of shape {list(packed.shape)}")
    codes = unpack_codes_reference(packed, spec.bits) if spec.bit_packed else packed
    n, k_pad = codes.shape
    panels, k_tiles, tile_bytes = tile_layout_shape(spec, n, k_pad)
    pad = torch.full((panels * TILE_COLUMNS - n, k_pad), spec.pad_code, dtype=codes.dtype, device=codes.device)
    codes = torch.cat([codes, pad]) if pad.shape[0] else codes
    tiles = codes.view(panels, TILE_COLUMNS, k_tiles, TILE_K // 4, 4).permute(0, 2, 3, 1, 4)
    tiles = tiles.reshape(panels, k_tiles, spec.codes_per_byte, tile_bytes)
    if not spec.bit_packed:
        return tiles.reshape(panels, k_tiles, tile_bytes).contiguous()
    shifts = (torch.arange(spec.codes_per_byte, dtype=torch.int32, device=codes.device) * spec.bits).view(1, 1, -1, 1)
    return (tiles.to(torch.int32) << shifts).sum(dim=2).to(torch.uint8)
