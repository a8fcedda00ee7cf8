"""The CPU kernel tables (csrc/cpu): every ISA path bit-exact against pyclipq.ops.reference.

The ISA is chosen once per process (PYCLIPQ_CPU_ISA=scalar|avx2|avx512_vnni), so each check is
a plain function: the ISA of this process runs it in-process, any other ISA runs every check in
one child process (`python test_cpu_kernels.py <isa>`), and each check reports on its own. A
table this CPU cannot run is skipped, with the reason.

Shapes are chosen to reach every register tile, with N not a multiple of any tile width and K
not a multiple of 128:
* AVX2: 8-row tiles (4 row pairs x 2 columns), 4-row (2 pairs x 4 columns), 2-row (1 pair x 8
  columns) and the single-row kernel (M = 1 and an odd last row);
* AVX-512 VNNI: the dot tile (tasks of fewer than 8 rows for int8, 5 for ternary and
  per-channel int4/int2, 3 for grouped ones: M = 1, 2 and more) and the broadcast tile with 1 to
  6 rows (M = 13 = 6 + 6 + 1, 8 = 6 + 2, 10 = 6 + 4, 11 = 6 + 5, 15 = 6 + 6 + 3, and M = 3, 4, 5
  where the format's crossover allows) x 1 to 4 panels of 16 columns;
* AMX: tasks of >= 4 rows with per-channel scales or groups of 128 (M = 4, 5, 8, 10, 11, 13, 15:
  one row tile with 4 to 15 rows; 50, 77: two row tiles and a ragged tail) x 1 or 2 panels (N = 9,
  17, 19, 20, 33, 65, 70), the weights repacked per task or read from the tile layout; fewer rows
  and smaller groups are the VNNI table's, so the checks also cover the handover.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import pyclipq
from pyclipq import formats, ops
from pyclipq.ops import reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY_ROWS, linear_tolerance, reference_accumulators, tiny_rows  # noqa: E402

FORMAT_GROUPS = [("int8", 0), ("ternary", 0)] + [(f, g) for f in ("int4", "int2") for g in (0, 32, 64, 128)]
# M: 1 (single-row kernel), 2, 3 (2-row tile + single row), 5 (4-row tile + single row),
# 15 = 8 + 4 + 2 + 1; N: 1, below and above every tile width; K: 1, ragged, several blocks.
RAGGED = [(1, 1, 1), (2, 3, 129), (3, 17, 200), (5, 9, 300), (15, 19, 640), (8, 33, 1000), (1, 70, 384),
          (13, 70, 384), (4, 130, 256), (10, 20, 130), (11, 65, 260)]


def random_layer(fmt, n, k, group, gen):
    return formats.random_packed_weight(fmt, n, k, group, generator=gen)


def gemm(fmt, x_q, sums, packed, group, mod=ops):
    if fmt == "int8":
        return mod.int8_gemm(x_q, packed)
    if fmt == "ternary":
        return mod.ternary_gemm(x_q, sums, packed)
    return getattr(mod, f"{fmt}_gemm")(x_q, sums, packed, group)


def linear(fmt, x, packed, scale, group, bias, mod=ops, tile_weight=None):
    extra = () if tile_weight is None else (None, tile_weight)  # act_scale, tile_weight
    if fmt in ("int4", "int2"):
        return getattr(mod, f"{fmt}_linear")(x, packed, scale, group, bias, *extra)
    return getattr(mod, f"{fmt}_linear")(x, packed, scale, bias, *extra)


def worst_case(fmt, group, m, n, k):
    """x_q = +-127 in alternating rows, weights at their largest unsigned code (int8: +-127)."""
    f = formats.get_format(fmt)
    sign = torch.ones(m, k, dtype=torch.int32)
    sign[1::2] = -1
    x_q = (127 * sign).to(torch.int8)
    if fmt == "int8":
        packed = torch.full((n, k), 127, dtype=torch.int8)
        packed[1::2] = -127
        expected_abs = 127 * 127 * k
    else:
        # the largest code maximizes every vpmaddubsw pair sum: the int16 bound's worst case
        packed = formats.pack_codes_reference(torch.full((n, k), f.max_code, dtype=torch.uint8), f.bits)
        glen = k // formats.num_groups(k, group)
        expected_abs = 127 * abs(f.level_mul * f.max_code - f.level_offset) * glen
    sums = x_q.to(torch.int32).view(m, formats.num_groups(k, group), -1).sum(dim=2, dtype=torch.int32)
    return x_q, sums, packed, expected_abs


# ---------------------------------------------------------------- checks (run under every ISA)

def check_gemm_bit_exact():
    gen = torch.Generator().manual_seed(0)
    for fmt, group in FORMAT_GROUPS:
        for m, n, k in RAGGED:
            packed, _ = random_layer(fmt, n, k, group, gen)
            x = torch.randn(m, k, generator=gen) * 3
            x_q, _, sums = reference.quantize_per_token(x, group)
            got, want = gemm(fmt, x_q, sums, packed, group), gemm(fmt, x_q, sums, packed, group, reference)
            assert got.dtype == torch.int32 and torch.equal(got, want), f"{fmt} g{group} M={m} N={n} K={k}"


def check_gemm_uses_the_given_sums():
    """The offset correction must use x_sums as passed (the op's contract), not recompute them."""
    gen = torch.Generator().manual_seed(1)
    for fmt, group in FORMAT_GROUPS[1:]:
        packed, _ = random_layer(fmt, 10, 256, group, gen)
        x_q, _, sums = reference.quantize_per_token(torch.randn(9, 256, generator=gen), group)
        sums = sums + torch.randint(-5, 6, sums.shape, dtype=torch.int32, generator=gen)
        assert torch.equal(gemm(fmt, x_q, sums, packed, group), gemm(fmt, x_q, sums, packed, group, reference)), fmt


def check_worst_case_accumulation():
    """|x_q| = 127 everywhere, largest codes, K = 16384: every int16 flush period and group size,
    through every register tile (M = 15 = 8 + 4 + 2 + 1 rows on AVX2, 6 + 6 + 3 on AVX-512; M = 2:
    the AVX-512 dot tile), exact and equal to the closed form."""
    for fmt, group in FORMAT_GROUPS:
        for m in (15, 2):
            x_q, sums, packed, expected_abs = worst_case(fmt, group, m, 11, 16384)
            got = gemm(fmt, x_q, sums, packed, group)
            assert torch.equal(got, gemm(fmt, x_q, sums, packed, group, reference)), f"{fmt} g{group} M={m}"
            flat = got.reshape(m, 11, -1)
            assert (flat.abs() == expected_abs).all(), f"{fmt} g{group}: {flat.abs().min()}..{flat.abs().max()}"
            assert (flat[0] > 0).all() == (flat[1] < 0).all(), f"{fmt} g{group}: rows of opposite sign"


def check_worst_case_fused_linear():
    """The fused linears share the int16 accumulation: a wrapped sum would be off by 65536 * scale."""
    for fmt, group in FORMAT_GROUPS:
        x_q, _, packed, _ = worst_case(fmt, group, 9, 5, 16384)
        x = x_q.to(torch.float32)  # |x| = 127 in every column: quantizes to +-127 exactly
        k_pad = x.shape[1]
        g = formats.num_groups(k_pad, group)
        scale = torch.full((5, g) if formats.get_format(fmt).grouped else (5,), 1e-3)
        y = linear(fmt, x, packed, scale, group, None)
        ref = linear(fmt, x, packed, scale, group, None, reference)
        acc, s = reference_accumulators(fmt, x, packed, group)
        tol = linear_tolerance(x, acc, s, scale, None, 5)
        assert ((y.double() - ref.double()).abs() <= tol).all(), f"{fmt} g{group}"


def check_tile_weight_gives_the_same_outputs():
    """The fused linears with tile_weight (QuantLinear's path) equal them without it, bit for bit:
    the AMX table reads the tile layout (int8 in place, low-bit codes decoded), the AVX-512 VNNI table
    its int8 panels as stored (sign bits flipped on load), the others ignore it.
    Ragged shapes, every format and group, bf16 out, and the K = 16384 worst case."""
    gen = torch.Generator().manual_seed(6)
    for fmt, group in FORMAT_GROUPS:
        spec = formats.get_format(fmt)
        for m, n, k in RAGGED + [(50, 70, 384), (77, 48, 1000)]:
            packed, scale = random_layer(fmt, n, k, group, gen)
            tile = formats.tile_layout(packed, spec)
            bias = torch.randn(n, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                plain = linear(fmt, x, packed, scale, group, bias)
                tiled = linear(fmt, x, packed, scale, group, bias, tile_weight=tile)
                assert torch.equal(plain, tiled), f"{fmt} g{group} M={m} N={n} K={k} {dtype}"
        x_q, _, packed, _ = worst_case(fmt, group, 40, 17, 16384)
        x = x_q.to(torch.float32)
        g = formats.num_groups(16384, group)
        scale = torch.full((17, g) if spec.grouped else (17,), 1e-3)
        tile = formats.tile_layout(packed, spec)
        assert torch.equal(linear(fmt, x, packed, scale, group, None, tile_weight=tile),
                           linear(fmt, x, packed, scale, group, None)), f"{fmt} g{group} worst case"


def check_quantize_bit_exact():
    """Ragged and whole-vector K, every group size, dynamic and static scales. Row 2 is all zeros
    (scale 0, codes 0); row 4 holds -amax and amax exactly (codes -127 and 127, which the dynamic
    path reaches without a clamp)."""
    gen = torch.Generator().manual_seed(2)
    for k in (1, 7, 31, 33, 64, 200, 768, 1000, 3072):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(6, k, generator=gen) * torch.rand(6, 1, generator=gen) * 50).to(dtype)
            x[2] = 0  # all-zero row: scale 0, codes 0
            x[4, 0], x[4, -1] = -x[4].abs().max(), x[4].abs().max()
            for group in (0, 32, 64, 128):
                for act_scale in (None, torch.tensor([0.05])):  # static: values beyond 6.35 clip
                    got = ops.quantize_per_token(x, group, act_scale)
                    want = reference.quantize_per_token(x, group, act_scale)
                    assert all(torch.equal(a, b) for a, b in zip(got, want)), f"K={k} {dtype} g{group} {act_scale}"


def check_quantize_finds_non_finite_rows():
    """NaN, Inf and -Inf anywhere in a row (a whole 64-value block or the ragged tail, fp32 and 16-bit
    inputs) are an error naming the first such row; the rows before it do not matter."""
    gen = torch.Generator().manual_seed(14)
    for k in (5, 64, 70, 768):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for bad in (float("nan"), float("inf"), -float("inf")):
                for col in sorted({0, k // 2, k - 1}):
                    x = torch.randn(5, k, generator=gen).to(dtype)
                    x[3, col] = bad
                    x[4, 0] = bad
                    what = f"K={k} {dtype} {bad} at column {col}"
                    try:
                        ops.quantize_per_token(x, 0)
                    except RuntimeError as e:
                        assert "x contains NaN or Inf (row 3" in str(e), what
                    else:
                        raise AssertionError(f"{what}: no error")


def check_quantize_rounding_and_clipping():
    """Exact halves round to even, and static-scale values far beyond int32 clip instead of wrapping."""
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 1e20, -1e20, 3.0e9, 127.0]])
    got = ops.quantize_per_token(x, 0, torch.tensor([1.0]))
    want = reference.quantize_per_token(x, 0, torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0][0, :12].tolist() == [0, 2, 2, 0, -2, -2, 126, -126, 127, -127, 127, 127]


def check_tiny_rows_quantize_to_zero_codes():
    """Rows whose absmax lies below formats.ACT_MIN_ABSMAX (2^-100) get codes 0, as an all-zero row
    does, in every lane position; rows at and just above it quantize normally; a fused linear gives
    exactly its bias there. 127 / absmax overflowed to inf below ~3.7e-37 once, and inf * 0 made
    NaN codes (garbage int8) for the zeros of such a row, and +-127 for the rest."""
    for k in (5, 64, 70, 768):
        x = tiny_rows(k)
        for group in (0, 64):
            q, s, sums = ops.quantize_per_token(x, group)
            want = reference.quantize_per_token(x, group)
            assert all(torch.equal(a, b) for a, b in zip((q, s, sums), want)), f"K={k} g{group}"
            assert int(q[:TINY_ROWS].abs().max()) == 0 and int(sums[:TINY_ROWS].abs().max()) == 0, f"K={k}: tiny rows"
            assert int(q[TINY_ROWS:].abs().max(dim=1).values.min()) == 127, f"K={k}: rows at and above the edge"
        for dtype in (torch.float32, torch.bfloat16):
            packed, scale = random_layer("int8", 9, k, 0, torch.Generator().manual_seed(k))
            bias = torch.arange(9, dtype=torch.float32)
            y = linear("int8", x[:TINY_ROWS].to(dtype), packed, scale, 0, bias)
            assert torch.equal(y.float(), bias.to(dtype).float().expand(TINY_ROWS, 9)), f"K={k} {dtype}: bias only"


def check_fused_linear_matches_reference():
    gen = torch.Generator().manual_seed(3)
    for fmt, group in FORMAT_GROUPS:
        for m, n, k in RAGGED:
            packed, scale = random_layer(fmt, n, k, group, gen)
            bias = torch.randn(n, generator=gen)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                y = linear(fmt, x, packed, scale, group, bias)
                ref = linear(fmt, x, packed, scale, group, bias, reference)
                acc, s = reference_accumulators(fmt, x, packed, group)
                tol = linear_tolerance(x, acc, s, scale, bias, n)
                assert y.dtype == dtype, f"{fmt} {dtype}: output dtype {y.dtype}"
                err = (y.double() - ref.double()).abs()
                assert (err <= tol.reshape(err.shape)).all(), f"{fmt} g{group} M={m} N={n} K={k} {dtype}"


def check_threads_do_not_change_results():
    """1, 2 and 3 threads split M and N differently; every element must come out bit-identical."""
    gen = torch.Generator().manual_seed(4)
    before = torch.get_num_threads()
    try:
        for fmt, group in FORMAT_GROUPS:
            packed, scale = random_layer(fmt, 100, 300, group, gen)
            x = torch.randn(300, 300, generator=gen)  # > 128 rows: M is split too
            x_q, _, sums = reference.quantize_per_token(x, group)
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append((gemm(fmt, x_q, sums, packed, group), linear(fmt, x, packed, scale, group, None)))
            for g_out, y in results[1:]:
                assert torch.equal(g_out, results[0][0]) and torch.equal(y, results[0][1]), f"{fmt} g{group}"
    finally:
        torch.set_num_threads(before)


def check_rows_do_not_depend_on_the_batch():
    """A row's output is the same whether its task is small (AVX-512: the dot tile on the canonical
    layout) or large (the broadcast tile on repacked columns), and wherever the row falls in a tile."""
    gen = torch.Generator().manual_seed(5)
    for fmt, group in FORMAT_GROUPS:
        packed, scale = random_layer(fmt, 70, 384, group, gen)
        x = torch.randn(40, 384, generator=gen)
        whole = linear(fmt, x, packed, scale, group, None)
        for rows in (slice(0, 1), slice(5, 8), slice(7, 40)):
            assert torch.equal(linear(fmt, x[rows], packed, scale, group, None), whole[rows]), f"{fmt} g{group} {rows}"


def check_hadamard_matches_reference():
    """Every block size, both the in-register (b >= 16 on AVX-512) and the in-memory stages, 1 and 2 threads."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 1024, generator=gen) * torch.logspace(-3, 3, 1024)
    for block in (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
        want = reference.hadamard_rotate(x.double(), block)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.pyclipq.hadamard_rotate(x, block)
            bound = 1e-6 * block.bit_length() * x.abs().reshape(37, -1, block).amax(-1, keepdim=True)
            err = (got.double() - want).abs().reshape(37, -1, block)
            assert bool((err <= bound).all()), f"block {block}, {threads} threads: {float(err.max())}"


# ---------------------------------------------------------------- transformer-block kernels

LN_SHAPES = [(1, 1), (3, 37), (17, 200), (50, 768), (5, 1000)]


def check_layer_norm_quantize_matches_reference():
    """LayerNorm -> [rotation] -> int8 against torch's LayerNorm + the reference quantizer: a float
    path, so a code may differ by 1 where LayerNorm rounding moves a value across a rounding
    boundary (rare: at most 1 in 1000), row scales within 1e-5 (the mean and variance are float sums
    over K, summed in another order than torch's), group sums those of the codes."""
    gen = torch.Generator().manual_seed(11)
    for m, k in LN_SHAPES:
        x = torch.randn(m, k, generator=gen) * 3 + torch.randn(k, generator=gen)
        weight, bias = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
        for group in (0, 32, 128):
            for rotation in (1, 64):
                if k % rotation:
                    continue
                for affine in (True, False):
                    w, b = (weight, bias) if affine else (None, None)
                    for threads in (1, 2, 3):
                        torch.set_num_threads(threads)
                        q, s, sums = ops.layer_norm_quantize(x, w, b, 1e-5, group, rotation)
                        rq, rs, _ = reference.layer_norm_quantize(x, w, b, 1e-5, group, rotation)
                        what = f"M={m} K={k} g{group} rot{rotation} affine={affine} {threads} threads"
                        diff = (q.int() - rq.int()).abs()
                        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, q.numel() // 1000), what
                        assert torch.allclose(s, rs, rtol=1e-5, atol=0), what
                        g = sums.shape[1]
                        assert torch.equal(sums, q.int().view(m, g, -1).sum(-1)), what
    torch.set_num_threads(2)
    static = torch.tensor(0.05)
    x = torch.randn(9, 300, generator=gen)
    q, s, _ = ops.layer_norm_quantize(x, None, None, 1e-6, 0, 1, static)
    rq, rs, _ = reference.layer_norm_quantize(x, None, None, 1e-6, 0, 1, static)
    assert (q.int() - rq.int()).abs().max() <= 1 and torch.equal(s, rs), "static act_scale"


def check_quantized_linear_epilogues():
    """act(y) + residual against the kernel's own linear (itself checked against the reference above):
    no epilogue is bit-identical to the fused linear; GELU (the AVX-512 table's pieces to 4.1e-8,
    the other tables' erf to 4.2e-7), QuickGELU and the residual within 1e-6 of the magnitudes,
    16-bit outputs within one rounding more."""
    gen = torch.Generator().manual_seed(12)
    for fmt, group in FORMAT_GROUPS:
        for m, n, k in RAGGED:
            packed, scale = random_layer(fmt, n, k, group, gen)
            bias = torch.randn(n, generator=gen)
            x = torch.randn(m, k, generator=gen) * 0.5
            x_q, x_scale, x_sums = ops.quantize_per_token(x, group)
            plain = ops.quantized_linear(fmt, x_q, x_scale, x_sums, packed, scale, group, bias)
            assert torch.equal(plain, linear(fmt, x, packed, scale, group, bias)), f"{fmt} g{group} M={m} N={n}"
            acc, s = reference_accumulators(fmt, x, packed, group)
            want = reference.quantized_linear(x_q, x_scale, x_sums, packed, scale, fmt, group, bias)
            tol = linear_tolerance(x, acc, s, scale, bias, n).reshape(m, n)
            assert bool(((plain.double() - want.double()).abs() <= tol).all()), f"{fmt} g{group} M={m} N={n} vs ref"
            tile = formats.tile_layout(packed, formats.get_format(fmt))
            tiled = ops.quantized_linear(fmt, x_q, x_scale, x_sums, packed, scale, group, bias, tile, activation="gelu")
            assert torch.equal(tiled, ops.quantized_linear(fmt, x_q, x_scale, x_sums, packed, scale, group, bias,
                                                           activation="gelu")), f"{fmt} g{group} M={m} N={n} tiled"
            residual = torch.randn(m, n, generator=gen)
            for activation in ("none", "gelu", "quick_gelu"):
                for res in (None, residual, residual.bfloat16()):
                    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                        y = ops.quantized_linear(fmt, x_q, x_scale, x_sums, packed, scale, group, bias,
                                                 activation=activation, residual=res, out_dtype=out_dtype)
                        want = reference.activate(plain.double(), activation)
                        mag = want.abs() + plain.double().abs()
                        if res is not None:
                            want, mag = want + res.double(), mag + res.double().abs()
                        tol = 1e-6 * mag + 1e-30
                        if out_dtype != torch.float32:
                            tol = tol + 2.0 ** -8 * want.abs()
                        res_type = None if res is None else res.dtype
                        what = f"{fmt} g{group} M={m} N={n} {activation} residual {res_type} -> {out_dtype}"
                        assert y.dtype == out_dtype and y.shape == (m, n), what
                        assert bool(((y.double() - want).abs() <= tol).all()), what


ATTENTION_CASES = [(1, 50, 12, 64, False), (2, 77, 8, 64, True), (3, 7, 3, 40, False), (2, 5, 2, 8, True),
                   (1, 33, 4, 80, False), (2, 1, 1, 16, True), (1, 100, 2, 72, True)]


def check_attention_matches_reference():
    """Every head of every sequence against the float64 reference, with and without masks (2-D, 4-D
    broadcast over heads, per head), causal, ragged T and head widths, 1/2/3 threads: within
    1e-5 of the largest |v| of the head (softmax weights sum to 1). One query row per sequence
    (`rows`) equals that row of the whole result exactly."""
    gen = torch.Generator().manual_seed(13)
    for batch, tokens, heads, head_dim, causal in ATTENTION_CASES:
        qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen)
        masks = [None, torch.randn(tokens, tokens, generator=gen), torch.randn(batch, 1, tokens, tokens, generator=gen),
                 torch.randn(1, heads, tokens, tokens, generator=gen)]
        padding = torch.zeros(batch, 1, tokens, tokens)
        padding[..., tokens // 2 + 1:] = float("-inf")  # keys past the middle masked out
        masks.append(padding)
        bound = 1e-5 * qkv.abs().max()
        for mask in masks:
            want = reference.attention(qkv, heads, mask, causal)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                got = ops.attention(qkv, heads, mask, causal)
                shape = None if mask is None else list(mask.shape)
                what = f"B={batch} T={tokens} H={heads} d={head_dim} causal={causal} mask {shape} {threads} threads"
                assert got.shape == want.shape and bool(((got - want).abs() <= bound).all()), what
                # one query row per sequence: that row of the whole result, bit for bit
                rows = torch.randint(0, tokens, (batch,), generator=gen)
                rows[0] = tokens - 1
                picked = ops.attention(qkv, heads, mask, causal, rows=rows)
                assert torch.equal(picked, got[torch.arange(batch), rows].unsqueeze(1)), f"{what} rows {rows.tolist()}"
    torch.set_num_threads(2)
    every_key_masked = torch.full((4, 4), float("-inf"))
    got = ops.attention(torch.randn(1, 4, 3 * 16, generator=gen), 1, every_key_masked)
    assert torch.equal(got, torch.zeros(1, 4, 16)), "a row whose keys are all masked gives zeros"


def check_gelu_activation_over_its_range():
    """The vector erf/exp of the epilogue against torch's GELU and sigmoid over [-12, 12] and beyond:
    outputs y[m, n] = 127 * x_scale[m] * w_scale[n] of a one-tap int8 linear cover the range densely."""
    rows, cols = 2001, 128
    x_q = torch.zeros(rows, cols, dtype=torch.int8)
    x_q[:, 0] = 127
    x_sums = torch.full((rows, 1), 127, dtype=torch.int32)
    weight = torch.zeros(cols, cols, dtype=torch.int8)
    weight[:, 0] = 1
    x_scale = torch.linspace(-12.0, 12.0, rows) / 127
    w_scale = torch.cat([torch.linspace(0.01, 1.0, cols - 4), torch.tensor([2.0, 4.0, 8.0, 1e-3])])
    plain = ops.quantized_linear("int8", x_q, x_scale, x_sums, weight, w_scale)
    for activation in ("gelu", "quick_gelu"):
        got = ops.quantized_linear("int8", x_q, x_scale, x_sums, weight, w_scale, activation=activation).double()
        want = reference.activate(plain.double(), activation)
        err = (got - want).abs()
        assert bool((err <= 4e-7 * plain.double().abs() + 2e-7 * want.abs() + 1e-30).all()), (
            f"{activation}: max error {float(err.max())}")


CHECKS = {f.__name__: f for f in (check_gemm_bit_exact, check_gemm_uses_the_given_sums, check_worst_case_accumulation,
                                  check_worst_case_fused_linear, check_tile_weight_gives_the_same_outputs,
                                  check_quantize_bit_exact, check_quantize_finds_non_finite_rows,
                                  check_quantize_rounding_and_clipping, check_tiny_rows_quantize_to_zero_codes,
                                  check_fused_linear_matches_reference,
                                  check_threads_do_not_change_results, check_rows_do_not_depend_on_the_batch,
                                  check_hadamard_matches_reference, check_layer_norm_quantize_matches_reference,
                                  check_quantized_linear_epilogues, check_attention_matches_reference,
                                  check_gelu_activation_over_its_range)}


def run_all_checks() -> dict:
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = None
        except Exception:  # report every failure, not just the first
            results[name] = traceback.format_exc()
    return results


# ---------------------------------------------------------------- pytest

def available_isas():
    return pyclipq.build_info()["cpu_isa_variants"]


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


# what each x86 table needs, as /proc/cpuinfo spells it (isa.cpp reads CPUID and XGETBV itself)
ISA_FLAGS = {"amx": {"amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
             "avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "avx2": {"avx2", "fma"}}


def skip_reason(isa):
    """Why this machine cannot run the table `isa`, or None."""
    if isa not in available_isas():
        return f"this build has no {isa} table"
    if isa not in pyclipq.build_info()["cpu_isa_supported"]:
        missing = sorted(ISA_FLAGS.get(isa, set()) - cpu_flags())
        return f"this CPU/OS cannot run the {isa} table (lacks {', '.join(missing) or 'OS zmm/ymm state'})"
    return None


@pytest.fixture(scope="module")
def child_results():
    """{isa: {check: None or traceback}} for every ISA other than this process's, one child each."""
    cache = {}

    def get(isa):
        if isa not in cache:
            env = {**os.environ, "PYCLIPQ_CPU_ISA": isa}
            r = subprocess.run([sys.executable, __file__, isa], capture_output=True, text=True, env=env, timeout=1800)
            assert r.returncode == 0, f"child for ISA {isa} failed:\n{r.stdout}\n{r.stderr}"
            cache[isa] = json.loads(r.stdout.strip().splitlines()[-1])
        return cache[isa]

    return get


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("isa", ["amx", "avx512_vnni", "avx2", "scalar"])
def test_cpu_kernels(isa, check, child_results):
    reason = skip_reason(isa)
    if reason:
        pytest.skip(reason)
    if isa == pyclipq.build_info()["cpu_isa"]:
        CHECKS[check]()
    else:
        err = child_results(isa)[check]
        assert err is None, f"[{isa}] {check}:\n{err}"


def test_children_really_switch_isa():
    """The scalar child must run the scalar table (else both rows above would test one ISA)."""
    code = "import pyclipq; print(pyclipq.build_info()['cpu_isa'])"
    for isa in available_isas():
        if skip_reason(isa):
            continue
        # cwd="/": with `-c` the cwd leads sys.path, and the source tree's pyclipq/ has no
        # _C when the package is installed (CI); the child must import what pytest imports.
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYCLIPQ_CPU_ISA": isa}, timeout=300, cwd="/")
        assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr


def test_dispatch_picks_the_best_table_the_cpu_supports():
    """Without PYCLIPQ_CPU_ISA the best table whose CPUID flags /proc/cpuinfo shows is chosen."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to check CPUID against")
    want = next((isa for isa in ("amx", "avx512_vnni", "avx2") if isa in available_isas() and ISA_FLAGS[isa] <= flags),
                "scalar")
    env = {k: v for k, v in os.environ.items() if k != "PYCLIPQ_CPU_ISA"}
    code = "import json, pyclipq; print(json.dumps(pyclipq.build_info()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["cpu_isa"] == want and info["cpu_isa_supported"][0] == want, info
    assert info["cpu_isa_reason"].startswith("CPUID"), info


# A child that makes the kernel refuse tile data before it imports pyclipq: a seccomp filter that
# fails arch_prctl(ARCH_REQ_XCOMP_PERM) with EPERM and allows every other system call.
REFUSE_TILE_PERMISSION = """
import ctypes, json, sys
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
LOAD, JEQ, RET = 0x20, 0x15, 0x06
insns = (Insn * 6)(Insn(LOAD, 0, 0, 0),          # the system call number
                   Insn(JEQ, 0, 3, 158),          # arch_prctl?
                   Insn(LOAD, 0, 0, 16),          # its first argument (low 32 bits)
                   Insn(JEQ, 0, 1, 0x1023),       # ARCH_REQ_XCOMP_PERM?
                   Insn(RET, 0, 0, 0x00050001),   # SECCOMP_RET_ERRNO | EPERM
                   Insn(RET, 0, 0, 0x7FFF0000))   # SECCOMP_RET_ALLOW
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Prog(6, insns)), 0, 0) == 0, ctypes.get_errno()  # seccomp filter
import pyclipq
print(json.dumps(pyclipq.build_info()))
"""


def test_refused_tile_permission_falls_back_with_the_reason():
    """Without the kernel's tile-data permission (arch_prctl) the first tile instruction would be
    SIGILL: the AMX table must not be chosen, and build_info says why."""
    if "amx" not in available_isas() or not ISA_FLAGS["amx"] <= cpu_flags():
        pytest.skip("this CPU has no AMX (or this build no amx table): there is no permission to refuse")
    env = {k: v for k, v in os.environ.items() if k != "PYCLIPQ_CPU_ISA"}
    r = subprocess.run([sys.executable, "-c", REFUSE_TILE_PERMISSION], capture_output=True, text=True, env=env,
                       timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["cpu_isa"] == "avx512_vnni" and "amx" not in info["cpu_isa_supported"], info
    assert "amx needs the kernel's tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM) failed: Operation not permitted)" \
        in info["cpu_isa_reason"], info
    assert info["cpu_tile_layout"] == ["int8"]  # the VNNI table's
    forced = subprocess.run([sys.executable, "-c", REFUSE_TILE_PERMISSION], capture_output=True, text=True,
                            timeout=300, cwd="/", env={**env, "PYCLIPQ_CPU_ISA": "amx"})
    assert forced.returncode != 0 and "PYCLIPQ_CPU_ISA=amx but this CPU/OS lacks the kernel's tile-data" in forced.stderr


def test_forcing_a_table_the_cpu_lacks_is_a_clear_error():
    lacking = [isa for isa in available_isas() if skip_reason(isa)]
    if not lacking:
        pytest.skip("this CPU runs every table of this build")
    code = "import torch, pyclipq; torch.ops.pyclipq.int8_gemm(torch.zeros(1, 128, dtype=torch.int8), torch.zeros(1, 128, dtype=torch.int8))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                       env={**os.environ, "PYCLIPQ_CPU_ISA": lacking[0]})
    assert r.returncode != 0 and f"PYCLIPQ_CPU_ISA={lacking[0]} but this CPU/OS lacks" in r.stderr, r.stderr


if __name__ == "__main__":  # child mode: python test_cpu_kernels.py <isa>
    assert pyclipq.build_info()["cpu_isa"] == sys.argv[1], f"asked for {sys.argv[1]}, got {pyclipq.build_info()}"
    print(json.dumps(run_all_checks()))
