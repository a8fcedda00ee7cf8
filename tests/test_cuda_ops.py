"""The CUDA kernels (csrc/cuda) and the GPU backend choice, against the reference.

Skipped without a CUDA device or without the CUDA build. tests/test_ops.py runs the
public wrappers on CUDA too (whatever backend "auto" picks); here each backend is
forced, the CUDA kernels are called through the dispatcher directly, and shapes reach
the code paths small tests miss: the GEMV (M <= 16), the 64x64 and 128x128 tiles,
multi-stage K loops and every group size. int32 results are bit-exact; fused linears
use helpers.linear_tolerance.
"""
import pytest
import torch

import pyclipq
from pyclipq import formats, ops, primitives
from pyclipq.ops import reference

from helpers import TINY_ROWS, alternating_extremes, linear_tolerance, make_layer, tiny_rows

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if not pyclipq.build_info()["cuda"]:
    pytest.skip("pyclipq was built without its CUDA kernels", allow_module_level=True)

FMT_GROUPS = [("int8", 0), ("ternary", 0), ("int4", 0), ("int4", 32), ("int4", 128),
              ("int2", 0), ("int2", 64)]
P = torch.ops.pyclipq


def exact_acc(fmt, x_q, packed, group):
    """int32 [M, N, G] = sum_{k in g} level(c) x_q, exact via float64 products on the GPU (|acc| < 2**53)."""
    f = formats.get_format(fmt)
    codes = packed if fmt == "int8" else formats.unpack_codes_reference(packed.cpu(), f.bits).to(x_q.device)
    levels = codes.to(torch.float64) if fmt == "int8" else f.level(codes).to(torch.float64)
    m, k_pad = x_q.shape
    g = formats.num_groups(k_pad, group)
    xg = x_q.to(torch.float64).view(m, g, k_pad // g).transpose(0, 1)      # [G, M, K/G]
    wg = levels.view(levels.shape[0], g, k_pad // g).permute(1, 2, 0)      # [G, K/G, N]
    return torch.bmm(xg, wg).permute(1, 2, 0).to(torch.int64).to(torch.int32)


def gemm(fmt, x_q, sums, packed, group, backend="cuda"):
    if backend == "cuda":
        if fmt == "int8":
            return P.int8_gemm(x_q, packed)
        if fmt == "ternary":
            return P.ternary_gemm(x_q, sums, packed)
        return getattr(P, f"{fmt}_gemm")(x_q, sums, packed, group)
    args = (x_q, packed) if fmt == "int8" else (x_q, sums, packed) if fmt == "ternary" else \
        (x_q, sums, packed, group)
    return getattr(ops, f"{fmt}_gemm")(*args, backend=backend)


def check_linear(fmt, x, packed, scale, group, bias=None, act_scale=None, backend="cuda"):
    args = (packed, scale, group) if fmt in ("int4", "int2") else (packed, scale)
    if backend == "cuda":
        y = getattr(P, f"{fmt}_linear")(x, *args, bias, act_scale)
    else:
        y = getattr(ops, f"{fmt}_linear")(x, *args, bias, act_scale, backend=backend)
    x_q, s, _ = reference.quantize_per_token(x.cpu(), group, None if act_scale is None else act_scale.cpu())
    acc = exact_acc(fmt, x_q.cuda(), packed, group).cpu()
    n = packed.shape[0]
    ref = reference._epilogue(x.cpu(), acc, s, scale.cpu(), None if bias is None else bias.cpu(), n)
    tol = linear_tolerance(x.cpu(), acc, s, scale.cpu(), None if bias is None else bias.cpu(), n)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_cuda
    err = (y.cpu().to(torch.float64) - ref.to(torch.float64)).abs()
    assert (err <= tol.reshape(err.shape)).all(), f"max err {err.max()} vs tol {tol.max()}"


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 17, 77), (9, 70, 300), (64, 64, 128), (130, 1500, 520)])
def test_integer_gemm_bit_exact(fmt, group, m, n, k):
    packed, _ = make_layer(fmt, n, k, group, seed=m + n + k)
    x_q, _, sums = reference.quantize_per_token(torch.randn(m, k) * 3, group)
    got = gemm(fmt, x_q.cuda(), sums.cuda(), packed.cuda(), group)
    want = reference.int8_gemm(x_q, packed) if fmt == "int8" and m * n * k < 10**6 else None
    if want is None:  # through the codes and sums, as the reference does
        want = exact_acc(fmt, x_q.cuda(), packed.cuda(), group).cpu()
        want = want[:, :, 0] if fmt in ("int8", "ternary") else want
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("m,n,k", [(1, 768, 768), (5, 45, 300), (16, 3072, 768), (16, 768, 3072), (17, 96, 256),
                                   (200, 1100, 512), (1200, 1536, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear(fmt, group, m, n, k, dtype):
    """M <= 16 takes the GEMV kernel; 200 x 1100 the 64x64 tiles; 1200 x 1536 the 128x128 tiles."""
    packed, scale = make_layer(fmt, n, k, group, seed=n + k)
    x = torch.randn(m, k).to(dtype).cuda()
    check_linear(fmt, x, packed.cuda(), scale.cuda(), group, torch.randn(n).to(dtype).cuda())


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 64), ("ternary", 0)])
def test_fused_linear_static_scale_and_3d(fmt, group):
    packed, scale = make_layer(fmt, 40, 200, group)
    x = torch.randn(2, 7, 200).cuda()
    check_linear(fmt, x, packed.cuda(), scale.cuda(), group, act_scale=torch.tensor([0.01]).cuda())


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "ternary"])
def test_worst_case_accumulation_is_exact(fmt):
    """|x| = 127 everywhere, extreme levels, K = 16384, on both GEMM tile sizes."""
    k, n = 16384, 150
    group = 128 if fmt in ("int4", "int2") else 0
    for m in (9, 140):
        x_q, sums, packed = alternating_extremes(fmt, m, n, k, group)
        got = gemm(fmt, x_q.cuda(), sums.cuda(), packed.cuda(), group).cpu()
        want = exact_acc(fmt, x_q.cuda(), packed.cuda(), group).cpu()
        assert torch.equal(got.reshape(want.shape), want) and want.abs().min() > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_kernels(bits):
    codes = torch.randint(0, 1 << bits, (37, 384), dtype=torch.uint8)
    packed = P.pack_codes(codes.cuda(), bits)
    assert torch.equal(packed.cpu(), formats.pack_codes_reference(codes, bits))
    assert torch.equal(P.unpack_codes(packed, bits).cpu(), codes)
    tcodes, _ = primitives.quantize_weight(torch.randn(37, 301), "ternary")
    trits = P.pack_trits(tcodes.cuda(), 301)
    assert torch.equal(trits.cpu(), formats.pack_trits_reference(tcodes, 301))
    assert torch.equal(P.unpack_trits(trits, 301).cpu(), tcodes)


def test_non_finite_rows_give_nan():
    packed, scale = make_layer("int8", 8, 64)
    x = torch.randn(3, 64)
    x[1, 3] = float("nan")
    y = P.int8_linear(x.cuda(), packed.cuda(), scale.cuda(), None, None).cpu()
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


def test_tiny_rows_quantize_to_zero_codes():
    """Rows below formats.ACT_MIN_ABSMAX get codes 0 (127 / amax would overflow), the rest as the
    reference quantizes them, and a fused linear gives just its bias for the tiny rows."""
    x = tiny_rows(300)
    got = P.quantize_per_token(x.cuda(), 64)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, reference.quantize_per_token(x, 64)))
    packed, scale = make_layer("int8", 8, 300)
    bias = torch.arange(8, dtype=torch.float32)
    y = P.int8_linear(x[:TINY_ROWS].cuda(), packed.cuda(), scale.cuda(), bias.cuda(), None).cpu()
    assert torch.equal(y, bias.expand(TINY_ROWS, 8))


def test_runs_on_the_current_stream():
    packed, scale = make_layer("int2", 256, 512, 32)
    x = torch.randn(64, 512).cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = P.int2_linear(x, packed.cuda(), scale.cuda(), 32, None, None)
    side.synchronize()
    assert torch.equal(y, P.int2_linear(x, packed.cuda(), scale.cuda(), 32, None, None))


def test_cuda_ops_reject_cpu_tensors():
    packed, scale = make_layer("int8", 8, 64)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        P.int8_linear(torch.randn(2, 64).cuda(), packed, scale.cuda(), None, None)


@pytest.mark.parametrize("name", ["int8_linear", "int4_linear", "ternary_linear", "int2_gemm", "quantize_per_token"])
def test_opcheck_cuda(name):
    x = torch.randn(3, 70).cuda()
    fmt = name.split("_")[0]
    group = 32 if fmt in ("int4", "int2") else 0
    if name == "quantize_per_token":
        args = (x, 32, None)
    else:
        packed, scale = make_layer(fmt, 12, 70, group)
        packed, scale = packed.cuda(), scale.cuda()
        if name.endswith("linear"):
            args = (x, packed, scale, group, None, None) if fmt == "int4" else (x, packed, scale, None, None)
        else:
            x_q, _, sums = P.quantize_per_token(x, group, None)
            args = (x_q, sums, packed, group)
    torch.library.opcheck(getattr(P, name).default, args)


# ---------------------------------------------------------------- backend choice

@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int2", 128), ("ternary", 0)])
@pytest.mark.parametrize("m", [4, 300])
def test_both_backends_match_the_reference(backend, fmt, group, m):
    pytest.importorskip("triton")
    packed, scale = make_layer(fmt, 320, 768, group)
    x = torch.randn(m, 768, dtype=torch.bfloat16).cuda()
    check_linear(fmt, x, packed.cuda(), scale.cuda(), group, torch.randn(320).cuda(), backend=backend)
    x_q, _, sums = ops.quantize_per_token(x, group, backend=backend)
    assert torch.equal(gemm(fmt, x_q, sums, packed.cuda(), group, backend).cpu(),
                       gemm(fmt, x_q, sums, packed.cuda(), group, "cuda").cpu())


def test_backend_rule(monkeypatch):
    t = torch.empty(1, device="cuda")
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    major = torch.cuda.get_device_capability()[0]
    has_triton = ops._triton_ops() is not None
    hopper = "triton" if major >= 9 and has_triton else "cuda"
    assert ops.gpu_backend("int8_linear", t, 8) == "cuda"
    assert ops.gpu_backend("int8_linear", t, 4096) == hopper
    assert ops.gpu_backend("int2_gemm", t, 8) == hopper
    assert ops.gpu_backend("pack_codes", t, 4096) == "cuda"
    assert ops.gpu_backend("int8_linear", t, 8, "triton") == "triton"
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    assert ops.gpu_backend("int8_linear", t, 8) == "triton"
    assert ops.gpu_backend("int8_linear", t, 8, "cuda") == "cuda"
    with pytest.raises(ValueError, match="must be one of"):
        ops.gpu_backend("int8_linear", t, 8, "tpu")
