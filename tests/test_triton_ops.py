"""The Triton ops (pyclipq/ops/triton.py) against the pure-PyTorch reference.

On CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1 before
triton is imported), or on CUDA when run with TRITON_INTERPRET=0 on a GPU machine
(benchmarks/gpu_check.sh). int32 results must be bit-exact (torch.equal); float results
use helpers.linear_tolerance (fused W·A8 linears) or the classical n·u dot-product bound
(weight-only linears, below). Shapes are small and ragged: M, N, K off every tile size.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyclipq import formats, primitives
from pyclipq.ops import reference

import helpers
from helpers import BF16_ULP, alternating_extremes, linear_tolerance, make_layer, reference_accumulators

triton = pytest.importorskip("triton")
T = pytest.importorskip("pyclipq.ops.triton")
from pyclipq_triton import autotune  # noqa: E402  (importable once pyclipq.ops.triton found it)

INTERPRET = autotune.interpreting()
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

LOWBIT = ["int4", "int2", "ternary"]
FMT_GROUPS = [("int8", 0), ("ternary", 0), ("int4", 0), ("int4", 32), ("int4", 64), ("int4", 128),
              ("int2", 0), ("int2", 32), ("int2", 64), ("int2", 128)]
# (M, N, K): tiny, ragged on every axis, one exact tile, a K spanning several K blocks
SHAPES = [(1, 1, 1), (3, 17, 77), (16, 64, 128), (19, 45, 300), (40, 33, 520)]
# Fixed configs that make the ragged shapes cross tile edges on both axes.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def dev(t):
    return None if t is None else t.to(DEVICE)


def lowbit_reference(fmt, x_q, sums, packed, group):
    if fmt == "int8":
        return reference.int8_gemm(x_q, packed)
    if fmt == "ternary":
        return reference.ternary_gemm(x_q, sums, packed)
    return getattr(reference, f"{fmt}_gemm")(x_q, sums, packed, group)


# ---------------------------------------------------------------- activation quantization

def test_quantize_rounds_half_to_even():
    # inv = 127 / 127 = 1 exactly, so x * inv lands on the .5 ties themselves
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    q, _, _ = T.quantize_per_token(dev(x), 0)
    assert q.cpu()[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]


def test_quantize_non_contiguous_and_3d():
    x = torch.randn(70, 2, 3).permute(1, 2, 0)  # [2, 3, 70], last dim strided
    q, s, sums = T.quantize_per_token(dev(x), 64)
    rq, rs, rsums = reference.quantize_per_token(x.contiguous(), 64)
    assert q.shape == (6, 128) and torch.equal(q.cpu(), rq) and torch.equal(sums.cpu(), rsums)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_quantize_marks_non_finite_rows_with_nan_scale():
    x = torch.randn(3, 40)
    x[1, 5] = float("inf")
    x[2, 9] = float("nan")
    _, s, _ = T.quantize_per_token(dev(x), 0)
    s = s.cpu()
    assert torch.isfinite(s[0]) and torch.isnan(s[1]) and torch.isnan(s[2])


@pytest.mark.parametrize("group", [0, 64])
def test_quantize_gives_tiny_rows_zero_codes(group):
    """Rows below formats.ACT_MIN_ABSMAX quantize to codes 0 (QMAX / amax would overflow to inf),
    the others as the reference does, and a fused linear returns just its bias for them."""
    x = helpers.tiny_rows(300)
    got = T.quantize_per_token(dev(x), group)
    want = reference.quantize_per_token(x, group)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    assert int(want[0][:helpers.TINY_ROWS].abs().max()) == 0
    packed, scale = make_layer("int8", 9, 300)
    bias = torch.arange(9, dtype=torch.float32)
    y = T.linear("int8", dev(x[:helpers.TINY_ROWS]), dev(packed), dev(scale), 0, dev(bias), None).cpu()
    assert torch.equal(y, bias.expand(helpers.TINY_ROWS, 9))


# ---------------------------------------------------------------- integer GEMMs (exact)

@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_integer_gemm_bit_exact(fmt, group, m, n, k, tiles):
    packed, _ = make_layer(fmt, n, k, group, seed=m + n + k)
    x_q, _, sums = reference.quantize_per_token(torch.randn(m, k) * 4, group)
    want = lowbit_reference(fmt, x_q, sums, packed, group)
    config = SMALL_TILES if tiles == "small" else None
    if fmt == "int8":
        got = T.int8_gemm(dev(x_q), dev(packed), config=config)
    else:
        got = T.lowbit_gemm(fmt, dev(x_q), dev(sums), dev(packed), group, config=config)
        if fmt == "ternary":
            got = got[:, :, 0]
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 128), ("int2", 0), ("ternary", 0)])
def test_lowbit_gemm_masked_tail_iteration(fmt, group):
    """BLOCKS_PER_ITER not dividing the block count: the EVEN=False path masks the last blocks."""
    bits = formats.get_format(fmt).bits
    k = 3 * 128  # int4: 6 blocks, 2-bit: 3 blocks; 4 per iteration leaves a ragged tail
    packed, _ = make_layer(fmt, 21, k, group)
    x_q, _, sums = reference.quantize_per_token(torch.randn(5, k), group)
    bpi, even = T._blocks_per_iter(formats.get_format(fmt), group, k, {"BLOCKS_PER_ITER": 4})
    assert (bpi, even) == (4, False) and bits in (2, 4)
    got = T.lowbit_gemm(fmt, dev(x_q), dev(sums), dev(packed), group, config={"BLOCKS_PER_ITER": 4})
    assert torch.equal(got.cpu().reshape(5, 21, -1), lowbit_reference(fmt, x_q, sums, packed, group).reshape(5, 21, -1))


@pytest.mark.parametrize("fmt", ["int8", *LOWBIT])
def test_worst_case_accumulation_is_exact(fmt):
    """|x| = 127, weights at their extreme levels, K = 4096: int32 accumulation, no overflow or wrap."""
    k, m, n = 4096, 5, 19
    group = 128 if fmt in ("int4", "int2") else 0
    x_q, sums, packed = alternating_extremes(fmt, m, n, k, group)
    want = lowbit_reference(fmt, x_q, sums, packed, group)
    got = T.int8_gemm(dev(x_q), dev(packed)) if fmt == "int8" else \
        T.lowbit_gemm(fmt, dev(x_q), dev(sums), dev(packed), group)
    assert torch.equal(got.cpu().reshape(want.shape), want)
    assert want.abs().min() > 0  # the extreme case really is extreme (not an all-zero product)


# ---------------------------------------------------------------- fused linears

def check_linear(fmt, x, packed, scale, group, bias=None, act_scale=None, config=None):
    y = T.linear(fmt, dev(x), dev(packed), dev(scale), group, dev(bias), dev(act_scale), config=config)
    args = (packed, scale, group) if fmt in ("int4", "int2") else (packed, scale)
    ref = getattr(reference, f"{fmt}_linear")(x, *args, bias, act_scale)
    acc, s = reference_accumulators(fmt, x, packed, group, act_scale)
    tol = linear_tolerance(x, acc, s, scale, bias, packed.shape[0])
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.cpu().to(torch.float64) - ref.to(torch.float64)).abs()
    assert (err <= tol.reshape(err.shape)).all(), f"max err {err.max()} vs tol {tol.max()}"


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("m,n,k,dtype", [(3, 17, 77, torch.bfloat16), (19, 45, 300, torch.float32),
                                         (40, 33, 520, torch.bfloat16)])
def test_fused_linear_matches_reference(fmt, group, m, n, k, dtype):
    packed, scale = make_layer(fmt, n, k, group, seed=n + k)
    x = torch.randn(m, k).to(dtype)
    check_linear(fmt, x, packed, scale, group, torch.randn(n).to(dtype))
    check_linear(fmt, x, packed, scale, group, config=SMALL_TILES)


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("ternary", 0), ("int4", 128), ("int2", 32)])
def test_fused_linear_3d_static_scale(fmt, group):
    packed, scale = make_layer(fmt, 40, 200, group)
    x = torch.randn(2, 7, 200)
    check_linear(fmt, x, packed, scale, group, act_scale=torch.tensor([0.01]))  # clips beyond 1.27
    check_linear(fmt, x, packed, scale, group, bias=torch.randn(40))


def test_fused_linear_empty_batch():
    packed, scale = make_layer("int4", 8, 64, 32)
    y = T.linear("int4", dev(torch.randn(0, 64)), dev(packed), dev(scale), 32)
    assert y.shape == (0, 8)


# ---------------------------------------------------------------- weight-only linears

def weight_only_reference(fmt, x, packed, scale, group, bias):
    """float64 x @ dequantized(w).T + bias, and the magnitude sum_k |x w| + |bias| for the bound."""
    f = formats.get_format(fmt)
    k = x.shape[-1]
    w = primitives.dequantize_codes(formats.unpack_codes_reference(packed, f.bits), scale, f, k).to(torch.float64)
    x64 = x.to(torch.float64)
    y = x64 @ w.T
    mag = x64.abs() @ w.abs().T
    if bias is not None:
        y, mag = y + bias.to(torch.float64), mag + bias.to(torch.float64).abs()
    return y, mag


@pytest.mark.parametrize("fmt,group", [f for f in FMT_GROUPS if f[0] != "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 45, 300), (5, 64, 128), (16, 33, 520), (20, 17, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_weight_only_linear(fmt, group, m, n, k, dtype, split_k):
    packed, scale = make_layer(fmt, n, k, group, seed=k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    y = T.weight_only_linear(fmt, dev(x), dev(packed), dev(scale), group, dev(bias), config={"SPLIT_K": split_k})
    ref, mag = weight_only_reference(fmt, x, packed, scale, group, bias)
    # Products x * level are exact or one rounding; fp32 summation of K terms in any order
    # (tensor-core tree, split-K atomics) errs by at most (K + G + 4) u * sum|terms|; a
    # bf16 output adds one bf16 ulp of |y| (helpers.BF16_ULP: the fp32 result and the
    # float64 reference may round to neighbouring bf16s).
    u = 2.0 ** -24
    tol = (k + formats.num_groups(formats.padded_k(k), group) + 4) * u * mag
    if dtype != torch.float32:
        tol = tol + BF16_ULP * ref.abs()
    err = (y.cpu().to(torch.float64) - ref).abs()
    assert y.dtype == dtype and (err <= tol + 1e-30).all(), f"max err {err.max()} (tol {tol.max()})"


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 128), (17, 300), (40, 1000)])
def test_pack_unpack_codes(bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, formats.padded_k(k)), dtype=torch.uint8)
    packed = T.pack_codes(dev(codes), bits)
    assert torch.equal(packed.cpu(), formats.pack_codes_reference(codes, bits))
    assert torch.equal(T.unpack_codes(packed, bits).cpu(), codes)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (7, 77), (17, 300), (2, 1001)])
def test_pack_unpack_trits(n, k):
    codes, _ = primitives.quantize_weight(torch.randn(n, k), "ternary")
    packed = T.pack_trits(dev(codes), k)
    assert torch.equal(packed.cpu(), formats.pack_trits_reference(codes, k))
    assert torch.equal(T.unpack_trits(packed, k).cpu(), codes)


@pytest.mark.parametrize("block", [4, 16, 64, 128, 256])
def test_hadamard_rotate_matches_the_reference(block):
    x = torch.randn(21, 256) * torch.logspace(-2, 2, 256)
    got = T.hadamard_rotate(dev(x), block).cpu()
    want = reference.hadamard_rotate(x, block)
    scale = x.abs().reshape(21, -1, block).amax(-1, keepdim=True).expand(-1, -1, block).reshape(x.shape)
    assert float(((got - want).abs() / scale).max()) < 1e-5
    with pytest.raises(RuntimeError, match="multiple of block"):
        T.hadamard_rotate(dev(torch.randn(2, 96)), 64)


def test_packing_rejects_bad_codes():
    with pytest.raises(RuntimeError, match="codes must be <= 3"):
        T.pack_codes(dev(torch.full((1, 128), 4, dtype=torch.uint8)), 2)
    with pytest.raises(RuntimeError, match="> 242"):
        T.unpack_trits(dev(torch.full((1, 1), 250, dtype=torch.uint8)), 5)
    with pytest.raises(RuntimeError, match="mismatched in_features"):
        T.linear("int4", dev(torch.randn(3, 200)), dev(make_layer("int4", 8, 64, 32)[0]),
                 dev(make_layer("int4", 8, 64, 32)[1]), 32)


# ---------------------------------------------------------------- registration, configs, helpers

def test_registered_ops_equal_host_functions():
    packed, scale = make_layer("int2", 24, 96, 32)
    x = dev(torch.randn(4, 96))
    y = torch.ops.pyclipq.triton_int2_linear(x, dev(packed), dev(scale), 32, None, None)
    assert torch.equal(y, T.linear("int2", x, dev(packed), dev(scale), 32))
    q, s, sums = torch.ops.pyclipq.triton_quantize_per_token(x, 0)
    assert torch.equal(q.cpu(), reference.quantize_per_token(x.cpu(), 0)[0])
    library = __import__("pyclipq").ops.library
    assert set(T.OPS) == set(library.SCHEMAS) - library.CPU_ONLY


def opcheck_samples():
    yield from helpers.opcheck_samples("triton_")
    x = torch.randn(3, 70)
    for fmt, group in [("int4", 32), ("int2", 0), ("ternary", 0)]:  # the weight-only linears, Triton's own
        packed, scale = make_layer(fmt, 12, 70, group)
        args = (packed, scale, group) if fmt != "ternary" else (packed, scale)
        yield f"triton_{fmt}_weight_only_linear", (x, *args, None)


@pytest.mark.parametrize("name,args", list(opcheck_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    args = tuple(dev(a) if isinstance(a, torch.Tensor) else a for a in args)
    # AOT dispatch decomposes a triton_op into its kernels; under the interpreter the
    # launches cannot be captured (see test_compile_fullgraph_traces_triton_ops).
    utils = ("test_schema", "test_faketensor") + (() if INTERPRET else ("test_aot_dispatch_dynamic",))
    torch.library.opcheck(getattr(torch.ops.pyclipq, name).default, args, test_utils=utils)


def test_compile_fullgraph_traces_triton_ops():
    packed, scale = make_layer("ternary", 24, 96)
    packed8, scale8 = make_layer("int8", 16, 24)
    p, s, p8, s8 = map(dev, (packed, scale, packed8, scale8))

    def two_layers(x):
        h = torch.ops.pyclipq.triton_ternary_linear(x, p, s)
        return torch.ops.pyclipq.triton_int8_linear(torch.relu(h), p8, s8)

    x = dev(torch.randn(5, 96))
    # Under the interpreter wrap_triton returns the bare kernel, so an AOT-decomposed graph
    # would lose the launches; there we check Dynamo's full-graph capture of the ops only.
    compiled = torch.compile(two_layers, fullgraph=True, backend="eager" if INTERPRET else "aot_eager")
    assert torch.equal(compiled(x), two_layers(x))


def test_m_buckets_share_configs():
    assert autotune.m_bucket(1) == autotune.m_bucket(16) == 16
    assert autotune.m_bucket(17) == 64 and autotune.m_bucket(5000) == autotune.m_bucket(16384)
    assert autotune.candidates("int8_gemm", 300) is autotune.candidates("int8_gemm", 1000)


def test_fixed_config_precedence(monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "BLOCK_N=64;lowbit_gemm:BLOCK_M=32,num_warps=2;int8_gemm:BLOCK_M=128")
    assert autotune.parse_config("x:A=1;B=2", "y") == {"B": 2}
    assert autotune.fixed_config("lowbit_gemm") == {"BLOCK_N": 64, "BLOCK_M": 32, "num_warps": 2}
    with autotune.use_config("lowbit_gemm", BLOCK_M=16):
        assert autotune.fixed_config("lowbit_gemm")["BLOCK_M"] == 16
        assert autotune.fixed_config("lowbit_gemm", {"BLOCK_M": 64})["BLOCK_M"] == 64
        kernel, meta = T.LOWBIT_GEMM.select(5)
        assert kernel is T.LOWBIT_GEMM.fn and meta["BLOCK_M"] == 16 and meta["BLOCK_N"] == 64
    # names a kernel lacks are dropped for it (compiled kernels reject unknown kwargs)
    with autotune.use_config(BLOCK_K=64, BLOCKS_PER_ITER=2):
        assert "BLOCK_K" not in T.LOWBIT_GEMM.select(5)[1] and T.INT8_GEMM.select(5)[1]["BLOCK_K"] == 64
    monkeypatch.setenv(autotune.ENV_VAR, "BLOCK_M")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        autotune.fixed_config("int8_gemm")


def test_fixed_config_from_env_is_used_by_the_registered_op(monkeypatch):
    """A config the kernel cannot compile (BLOCK_N not a power of 2) must surface: the env var is read."""
    packed, scale = make_layer("int8", 8, 128)
    x = dev(torch.randn(2, 128))
    torch.ops.pyclipq.triton_int8_linear(x, dev(packed), dev(scale))
    monkeypatch.setenv(autotune.ENV_VAR, "int8_gemm:BLOCK_N=48")
    with pytest.raises(Exception):
        torch.ops.pyclipq.triton_int8_linear(x, dev(packed), dev(scale))


def test_unpack_helpers_import_on_their_own():
    """pyclipq_triton.unpack needs only triton: run its example kernel without importing pyclipq."""
    src = Path(T.__file__).resolve().parents[2]
    code = (
        "import sys, torch\n"
        "from pyclipq_triton.unpack import unpack_codes_kernel, unpack_field, code_to_level\n"
        "assert not any(m == 'pyclipq' or m.startswith('pyclipq.') for m in sys.modules)\n"
        "dev = 'cpu' if __import__('os').environ.get('TRITON_INTERPRET') == '1' else 'cuda'\n"
        "g = torch.Generator().manual_seed(1)\n"
        "for bits in (2, 4):\n"
        "    per = 8 // bits\n"
        "    codes = torch.randint(0, 1 << bits, (5, 256), dtype=torch.uint8, generator=g)\n"
        "    # block-planar by hand: byte j of block b, field p <- element b*32*per + p*32 + j\n"
        "    c = codes.view(5, 256 // (32 * per), per, 32).to(torch.int32)\n"
        "    packed = sum(c[:, :, p, :] << (p * bits) for p in range(per)).to(torch.uint8).reshape(5, -1)\n"
        "    packed = packed.to(dev)\n"
        "    out = torch.empty(5, 256, dtype=torch.uint8, device=dev)\n"
        "    unpack_codes_kernel[(1, packed.shape[1] // 32)](packed, out, 5, packed.shape[1], BITS=bits, BLOCK_ROWS=8)\n"
        "    assert torch.equal(out.cpu(), codes), bits\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_backward_through_a_triton_op_raises():
    packed, scale = make_layer("int8", 8, 64)
    x = dev(torch.randn(2, 64)).requires_grad_()
    y = torch.ops.pyclipq.triton_int8_linear(x, dev(packed), dev(scale), None, None)
    with pytest.raises(RuntimeError, match="has no gradient"):
        y.sum().backward()


def test_triton_layout_constants_are_the_formats():
    """The Triton package (importable without pyclipq) holds the layout constants once; they are the formats'."""
    from pyclipq_triton import unpack

    assert unpack.VECTOR_BYTES.value == formats.VECTOR_BYTES
    assert unpack.TRITS_PER_BYTE.value == formats.TRITS_PER_BYTE
