"""Shared test helpers: float tolerances derived from the epilogue's rounding steps."""
from __future__ import annotations

import torch

from pyclipq import formats, primitives
from pyclipq.ops import reference

FP32_EPS = 2.0**-23  # one fp32 ulp at 1.0 (twice the unit roundoff: margin for FMA vs mul+add)
BF16_ULP = 2.0**-7  # one bf16 ulp at 1.0: float64 ref and kernel may round to neighbouring bf16s


def linear_tolerance(x, acc, x_scale, weight_scale, bias, n):
    """Per-element bound on |kernel - reference| for a fused linear.

    The integer part is exact; a kernel rounds the int32 -> fp32 conversion, one product
    with the weight scale per group, G-1 additions, the product with the activation
    scale and the bias addition: at most (G + 4) roundings of magnitude <= the sum of
    |terms| (computed in float64 by reference.epilogue_magnitude). bf16/fp16 outputs add
    one rounding of the output itself.
    """
    groups = acc.shape[2] if acc.dim() == 3 else 1
    mag = reference.epilogue_magnitude(x, acc, x_scale, weight_scale, bias, n).to(torch.float64)
    tol = (groups + 4) * FP32_EPS * mag + 1e-30
    if x.dtype != torch.float32:
        tol = tol + BF16_ULP * mag
    return tol


def reference_accumulators(fmt, x, weight, group_size, act_scale=None):
    """(acc, x_scale) from the reference: what the tolerance is relative to."""
    x_q, s, sums = reference.quantize_per_token(x, group_size, act_scale)
    if fmt == "int8":
        return reference.int8_gemm(x_q, weight), s
    if fmt == "ternary":
        return reference.ternary_gemm(x_q, sums, weight), s
    return getattr(reference, f"{fmt}_gemm")(x_q, sums, weight, group_size), s


def make_layer(fmt, n, k, group_size=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, scale = primitives.quantize_weight(w, fmt, group_size)
    if fmt == "int8":
        packed = codes
    else:
        packed = formats.pack_codes_reference(codes, formats.get_format(fmt).bits)
    return packed, scale


def opcheck_samples(prefix: str = ""):
    """(op name, args) for every op schema, each name with `prefix` (``triton_`` for the Triton ops):
    one sample per format of the fused linear and the GEMM, then quantize, pack / unpack and rotate."""
    x = torch.randn(3, 70)
    bias = torch.randn(12)
    for fmt in ("int8", "int4", "int2", "ternary"):
        group = 32 if fmt in ("int4", "int2") else 0
        packed, scale = make_layer(fmt, 12, 70, group)
        yield f"{prefix}{fmt}_linear", (x, *linear_args(fmt, packed, scale, group, bias))
        x_q, _, sums = reference.quantize_per_token(x, group)
        if fmt == "int8":
            yield f"{prefix}int8_gemm", (x_q, packed)
        elif fmt == "ternary":
            yield f"{prefix}ternary_gemm", (x_q, sums, packed)
        else:
            yield f"{prefix}{fmt}_gemm", (x_q, sums, packed, group)
    yield f"{prefix}quantize_per_token", (x, 32, None)
    yield f"{prefix}quantize_per_token", (x, 0, torch.tensor([0.05]))
    codes = torch.randint(0, 3, (4, 128), dtype=torch.uint8)
    yield f"{prefix}pack_codes", (codes, 2)
    yield f"{prefix}unpack_codes", (formats.pack_codes_reference(codes, 2), 2)
    yield f"{prefix}pack_trits", (codes, 70)
    yield f"{prefix}unpack_trits", (formats.pack_trits_reference(codes, 70), 70)
    yield f"{prefix}hadamard_rotate", (torch.randn(3, 128), 64)
    if prefix:  # the transformer-block ops are CPU-only (ops.library.CPU_ONLY)
        return
    yield "layer_norm_quantize", (torch.randn(5, 70), torch.randn(70), torch.randn(70), 1e-5, 32, 1, None)
    yield "layer_norm_quantize", (torch.randn(5, 128), None, None, 1e-6, 0, 64, torch.tensor([0.05]))
    x_q, x_scale, sums = reference.quantize_per_token(x, 0)
    packed, scale = make_layer("int8", 12, 70, 0)
    yield "quantized_linear", (x_q, x_scale, sums, packed, scale, "int8", 0, bias, None, "gelu", torch.randn(3, 12),
                               torch.bfloat16)
    x_q, x_scale, sums = reference.quantize_per_token(x, 32)
    packed, scale = make_layer("int4", 12, 70, 32)
    yield "quantized_linear", (x_q, x_scale, sums, packed, scale, "int4", 32, None, None, "none", None, None)
    yield "attention", (torch.randn(2, 9, 3 * 32), 2, None, True, None)
    yield "attention", (torch.randn(2, 9, 3 * 32), 2, torch.randn(2, 1, 9, 9), False, 0.3)
    yield "attention", (torch.randn(2, 9, 3 * 32), 2, torch.randn(9, 9), True, None, torch.tensor([8, 3]))  # pooled rows
    for fmt, group, dtype, mask in (("int8", 0, torch.float32, None), ("int4", 32, torch.bfloat16, torch.randn(9, 9))):
        linears = []
        for n, k in ((96, 32), (32, 32), (64, 32), (32, 64)):  # q|k|v, out_proj, fc1, fc2 of width 32
            packed, scale = make_layer(fmt, n, k, group)
            linears += [packed, scale, torch.randn(n), None]
        norms = [torch.randn(32), torch.randn(32), None, torch.randn(32)]
        yield "transformer_block", (torch.randn(2, 9, 32, dtype=dtype), norms, 1e-5, 1e-6, linears, fmt, group, 2, mask,
                                    mask is None, "gelu" if mask is None else "quick_gelu")


def linear_args(fmt, packed, scale, group_size, bias=None, act_scale=None):
    if fmt in ("int4", "int2"):
        return (packed, scale, group_size, bias, act_scale)
    return (packed, scale, bias, act_scale)


def alternating_extremes(fmt, m, n, k, group_size):
    """(x_q, x_sums, packed weight) with |x| = 127 and every weight at an extreme level, the
    signs alternating by row: products of both signs at full size, for exact-accumulation tests."""
    f = formats.get_format(fmt)
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    x_q[1::2] = -127
    if fmt == "int8":
        packed = torch.full((n, k), -127, dtype=torch.int8)
        packed[1::2] = 127
    else:
        codes = torch.full((n, k), f.max_code, dtype=torch.uint8)
        codes[1::2] = 0 if fmt != "int4" else 1  # int4's code 0 is no level: its lowest is code 1
        packed = formats.pack_codes_reference(codes, f.bits)
    sums = x_q.to(torch.int32).view(m, -1, group_size or k).sum(dim=2, dtype=torch.int32)
    return x_q, sums, packed


# Row absmaxes below formats.ACT_MIN_ABSMAX (the first TINY_ROWS), at it, and above it.
TINY_ROWS = 4


def tiny_rows(k: int) -> torch.Tensor:
    """fp32 [7, K]: rows of absmax 1e-38, 3e-38, 1e-40, 2^-101 (below ACT_MIN_ABSMAX: codes 0), then
    2^-100, 1.5 * 2^-100 and 1 (quantized as usual), each with zeros between its nonzeros (where
    inf * 0 once made NaN codes)."""
    edge = formats.ACT_MIN_ABSMAX
    x = torch.zeros(7, k)
    x[:, 1::3] = torch.linspace(-1, 1, len(range(1, k, 3)))
    for row, amax in enumerate((1e-38, 3e-38, 1e-40, edge / 2, edge, edge * 1.5, 1.0)):
        x[row] *= amax / x[row].abs().max()
    return x
