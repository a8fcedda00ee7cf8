"""Public, typed wrappers over torch.ops.pyclipq.* (schemas and fakes live in .library)."""
from __future__ import annotations

import torch

from . import library  # noqa: F401  (defines the schemas and fakes)
from . import reference  # noqa: F401

_ops = torch.ops.pyclipq


def quantize_per_token(x: torch.Tensor, group_size: int = 0, act_scale: torch.Tensor | None = None):
    """float [..., K] -> (int8 [M, K_pad], fp32 scales [M], int32 group sums [M, G])."""
    return _ops.quantize_per_token(x, group_size, act_scale)


def int8_gemm(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ops.int8_gemm(x_q, weight)


def int4_gemm(x_q, x_sums, weight, group_size: int) -> torch.Tensor:
    return _ops.int4_gemm(x_q, x_sums, weight, group_size)


def int2_gemm(x_q, x_sums, weight, group_size: int) -> torch.Tensor:
    return _ops.int2_gemm(x_q, x_sums, weight, group_size)


def ternary_gemm(x_q, x_sums, weight) -> torch.Tensor:
    return _ops.ternary_gemm(x_q, x_sums, weight)


def int8_linear(x, weight, weight_scale, bias=None, act_scale=None) -> torch.Tensor:
    return _ops.int8_linear(x, weight, weight_scale, bias, act_scale)


def int4_linear(x, weight, weight_scale, group_size: int, bias=None, act_scale=None) -> torch.Tensor:
    return _ops.int4_linear(x, weight, weight_scale, group_size, bias, act_scale)


def int2_linear(x, weight, weight_scale, group_size: int, bias=None, act_scale=None) -> torch.Tensor:
    return _ops.int2_linear(x, weight, weight_scale, group_size, bias, act_scale)


def ternary_linear(x, weight, weight_scale, bias=None, act_scale=None) -> torch.Tensor:
    return _ops.ternary_linear(x, weight, weight_scale, bias, act_scale)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return _ops.pack_codes(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return _ops.unpack_codes(packed, bits)


def pack_trits(codes: torch.Tensor, k: int) -> torch.Tensor:
    return _ops.pack_trits(codes, k)


def unpack_trits(packed: torch.Tensor, k: int) -> torch.Tensor:
    return _ops.unpack_trits(packed, k)
