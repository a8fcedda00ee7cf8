"""Pure-PyTorch references for every pyclipq op: exact integer math, float64 epilogues.

These are the ground truth the tests compare every backend against (C++ CPU, CUDA,
Triton). They follow docs/FORMATS.md line by line and favour clarity over speed.
"""
from __future__ import annotations

import torch

from .. import formats
from ..formats import INT2, INT4, TERNARY
from .library import EPILOGUE_ACTIVATIONS
# the activation format's math is pyclipq.primitives' (device-agnostic): the reference op is it
from ..primitives import quantize_per_token, rotate_blocks


def _grouped_dot(x_q: torch.Tensor, levels: torch.Tensor, groups: int) -> torch.Tensor:
    """sum over each K group of levels * x_q, exact, as int32 [M, N, G]."""
    m, k_pad = x_q.shape
    n = levels.shape[0]
    xg = x_q.to(torch.int64).view(m, 1, groups, k_pad // groups)
    wg = levels.to(torch.int64).view(1, n, groups, k_pad // groups)
    out = torch.zeros((m, n, groups), dtype=torch.int64)
    for start in range(0, m, 64):  # bounded memory: [64, N, G, K/G] int64 at most
        out[start:start + 64] = (xg[start:start + 64] * wg).sum(dim=3)
    return out.to(torch.int32)


def int8_gemm(x_q, weight):
    return _grouped_dot(x_q, weight, 1)[:, :, 0]


def _lowbit_gemm(fmt, x_q, x_sums, weight, group_size):
    codes = formats.unpack_codes_reference(weight, fmt.bits)
    g = formats.num_groups(codes.shape[1], group_size)
    # Through the unsigned codes and the activation sums, as the kernels do; equal to
    # sum(level * x_q) whenever x_sums are the true group sums.
    raw = _grouped_dot(x_q, codes, g).to(torch.int64)
    return (fmt.level_mul * raw - fmt.level_offset * x_sums.to(torch.int64)[:, None, :]).to(torch.int32)


def int4_gemm(x_q, x_sums, weight, group_size):
    return _lowbit_gemm(INT4, x_q, x_sums, weight, group_size)


def int2_gemm(x_q, x_sums, weight, group_size):
    return _lowbit_gemm(INT2, x_q, x_sums, weight, group_size)


def ternary_gemm(x_q, x_sums, weight):
    return _lowbit_gemm(TERNARY, x_q, x_sums, weight, 0)[:, :, 0]


def _epilogue(x, acc, x_scale, weight_scale, bias, n):
    """y = s_m * sum_g w_scale[n, g] * acc[m, n, g] + bias, in float64, cast to x.dtype."""
    acc = acc.to(torch.float64)
    if acc.dim() == 2:
        acc = acc[:, :, None]
    ws = weight_scale.to(torch.float64).reshape(n, -1)
    y = (acc * ws[None]).sum(dim=2) * x_scale.to(torch.float64)[:, None]
    if bias is not None:
        y = y + bias.to(torch.float64)[None]
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# The fused linears' tile_weight is the same weight in another layout (formats.tile_layout): the
# result is defined by `weight` alone.
def int8_linear(x, weight, weight_scale, bias=None, act_scale=None, tile_weight=None):
    x_q, s, _ = quantize_per_token(x, 0, act_scale)
    return _epilogue(x, int8_gemm(x_q, weight), s, weight_scale, bias, weight.shape[0])


def int4_linear(x, weight, weight_scale, group_size, bias=None, act_scale=None, tile_weight=None):
    x_q, s, sums = quantize_per_token(x, group_size, act_scale)
    return _epilogue(x, int4_gemm(x_q, sums, weight, group_size), s, weight_scale, bias, weight.shape[0])


def int2_linear(x, weight, weight_scale, group_size, bias=None, act_scale=None, tile_weight=None):
    x_q, s, sums = quantize_per_token(x, group_size, act_scale)
    return _epilogue(x, int2_gemm(x_q, sums, weight, group_size), s, weight_scale, bias, weight.shape[0])


def ternary_linear(x, weight, weight_scale, bias=None, act_scale=None, tile_weight=None):
    x_q, s, sums = quantize_per_token(x, 0, act_scale)
    return _epilogue(x, ternary_gemm(x_q, sums, weight), s, weight_scale, bias, weight.shape[0])


def epilogue_magnitude(x, acc, x_scale, weight_scale, bias, n):
    """sum of |terms| of the epilogue in float64: the scale that float-rounding error is relative to."""
    ws = weight_scale.abs() if weight_scale is not None else None
    b = bias.abs() if bias is not None else None
    return _epilogue(x.to(torch.float64), acc.abs(), x_scale.abs(), ws, b, n)


pack_codes = formats.pack_codes_reference
unpack_codes = formats.unpack_codes_reference
pack_trits = formats.pack_trits_reference
unpack_trits = formats.unpack_trits_reference


def hadamard_rotate(x, block):
    """x times diag(H_b, ..., H_b) (orthonormal Sylvester-Hadamard), computed in float64, in x's dtype."""
    return rotate_blocks(x.double(), block).to(x.dtype)


# ------------------------------------------------------------------ transformer-block ops

def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue activations: GELU in its erf form (nn.GELU()), QuickGELU x sigmoid(1.702 x)."""
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    if activation == "none":
        return y
    raise ValueError(f"activation must be one of {EPILOGUE_ACTIVATIONS}, got {activation!r}")


def layer_norm_quantize(x, weight, bias, eps, group_size, rotation_block=1, act_scale=None):
    """LayerNorm in float32 (torch's), the optional block-Hadamard rotation, then per-token quantization."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if rotation_block > 1:
        y = rotate_blocks(y.double(), rotation_block).float()
    return quantize_per_token(y, group_size, act_scale)


_GEMMS = {formats.INT8: lambda x_q, sums, w, g: int8_gemm(x_q, w), formats.INT4: int4_gemm,
          formats.INT2: int2_gemm, formats.TERNARY: lambda x_q, sums, w, g: ternary_gemm(x_q, sums, w)}


def quantized_linear(x_q, x_scale, x_sums, weight, weight_scale, format, group_size, bias=None, tile_weight=None,
                     activation="none", residual=None, out_dtype=None):
    """The integer GEMM and float64 epilogue of the fused linears, then the activation and the residual
    in float32 (as the kernel's epilogue), cast to out_dtype (float32 by default)."""
    fmt = formats.as_format(format)
    acc = _GEMMS[fmt](x_q, x_sums, weight, group_size)
    y = _epilogue(x_q.new_empty((x_q.shape[0], 1), dtype=torch.float32), acc, x_scale, weight_scale, bias,
                  weight.shape[0])
    y = activate(y, activation)
    if residual is not None:
        y = y + residual.float().reshape(y.shape)
    return y.to(out_dtype or torch.float32)


def attention(qkv, num_heads, mask=None, causal=False, scale=None, rows=None):
    """softmax(q k^T * scale + mask [+ causal]) v per head, in float64, on qkv [B, T, 3 E] -> [B, T, E];
    rows [B]: row rows[b] of each sequence, [B, 1, E]."""
    batch, tokens, three_e = qkv.shape
    e = three_e // 3
    q, k, v = qkv.double().view(batch, tokens, 3, num_heads, e // num_heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else (e // num_heads) ** -0.5)
    if mask is not None:
        scores = scores + mask.double()
    if causal:
        scores = scores.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with every key masked: zeros
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, e).to(qkv.dtype)
    return out if rows is None else out[torch.arange(batch), rows].unsqueeze(1)
