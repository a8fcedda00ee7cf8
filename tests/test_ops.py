"""Every torch.ops.pyclipq op against the pure-PyTorch reference, on every available device.

int32 results must be bit-exact (torch.equal). Float results must be within the bound
derived in helpers.linear_tolerance.
"""
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyclipq
from pyclipq import formats, ops, primitives
from pyclipq.ops import reference

import helpers
from helpers import linear_args, linear_tolerance, make_layer, reference_accumulators

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _triton_runs() -> str | None:
    """Why the Triton backend cannot run here, or None (it runs on CUDA, or on CPU tensors interpreted)."""
    try:
        from pyclipq_triton import autotune
    except ImportError as e:
        return f"triton is not installed ({e})"
    if autotune.interpreting() or torch.cuda.is_available():
        return None
    return "Triton needs TRITON_INTERPRET=1 or a CUDA device"


def _cuda_runs() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return None if pyclipq.build_info()["cuda"] else "pyclipq was built without its CUDA kernels"


# (device, backend argument): every backend an op can take, each skipped with the reason where it cannot run
BACKENDS = [
    pytest.param("cpu", None, id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(_cuda_runs() is not None, reason=str(_cuda_runs()))),
    pytest.param("cuda" if torch.cuda.is_available() else "cpu", "triton", id="triton",
                 marks=pytest.mark.skipif(_triton_runs() is not None, reason=str(_triton_runs()))),
]
LOWBIT = ["int4", "int2", "ternary"]
ALL_FORMATS = ["int8", *LOWBIT]
GROUPS = {"int8": [0], "ternary": [0], "int4": [0, 32, 64, 128], "int2": [0, 32, 64, 128]}


def fmt_and_group():
    return st.sampled_from(ALL_FORMATS).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(GROUPS[f])))


def run_gemm(fmt, x_q, sums, packed, group):
    if fmt == "int8":
        return ops.int8_gemm(x_q, packed), reference.int8_gemm(x_q.cpu(), packed.cpu())
    if fmt == "ternary":
        return ops.ternary_gemm(x_q, sums, packed), reference.ternary_gemm(x_q.cpu(), sums.cpu(), packed.cpu())
    return (getattr(ops, f"{fmt}_gemm")(x_q, sums, packed, group),
            getattr(reference, f"{fmt}_gemm")(x_q.cpu(), sums.cpu(), packed.cpu(), group))


def check_linear(fmt, x, packed, scale, group, bias=None, act_scale=None):
    args = linear_args(fmt, packed, scale, group, bias, act_scale)
    y = getattr(ops, f"{fmt}_linear")(x, *args)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    ref = getattr(reference, f"{fmt}_linear")(x.cpu(), *cpu_args)
    acc, s = reference_accumulators(fmt, x.cpu(), packed.cpu(), group, None if act_scale is None else act_scale.cpu())
    tol = linear_tolerance(x.cpu(), acc, s, scale.cpu(), None if bias is None else bias.cpu(), packed.shape[0])
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    err = (y.cpu().to(torch.float64) - ref.to(torch.float64)).abs()
    assert (err <= tol.reshape(err.shape)).all(), f"max err {err.max()} vs tol {tol.max()}"


# ---------------------------------------------------------------- activation quantization

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 400), group=st.sampled_from([0, 32, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), static=st.booleans())
def test_quantize_per_token_matches_reference(device, m, k, group, dtype, static):
    x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(dtype)
    if m > 1:
        x[1] = 0  # an all-zero row: scale 0, codes 0
    act_scale = torch.tensor([0.02]) if static else None
    q, s, sums = ops.quantize_per_token(x.to(device), group, None if act_scale is None else act_scale.to(device))
    rq, rs, rsums = reference.quantize_per_token(x, group, act_scale)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(sums.cpu(), rsums)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("m,k", [(0, 5), (1, 1), (3, 77), (9, 300), (16, 768), (33, 128)])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_per_token_bit_exact_on_every_backend(device, backend, m, k, group, dtype, static):
    x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(dtype)
    if m > 1:
        x[1] = 0  # an all-zero row: scale 0, codes 0
    act_scale = torch.tensor([0.02]) if static else None
    q, s, sums = ops.quantize_per_token(x.to(device), group, None if act_scale is None else act_scale.to(device),
                                        backend=backend)
    rq, rs, rsums = reference.quantize_per_token(x, group, act_scale)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(sums.cpu(), rsums)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_flattens_leading_dims(device):
    x = torch.randn(2, 3, 77)
    q, s, _ = ops.quantize_per_token(x.to(device), 0)
    assert q.shape == (6, 128) and s.shape == (6,)
    assert torch.equal(q.cpu(), reference.quantize_per_token(x.reshape(6, 77), 0)[0])


# ---------------------------------------------------------------- integer GEMMs (exact)

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 9), n=st.integers(1, 70), k=st.integers(1, 300), fg=fmt_and_group())
def test_integer_gemm_bit_exact(device, m, n, k, fg):
    fmt, group = fg
    packed, _ = make_layer(fmt, n, k, group)
    x_q, _, sums = reference.quantize_per_token(torch.randn(m, k), group)
    got, want = run_gemm(fmt, x_q.to(device), sums.to(device), packed.to(device), group)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_worst_case_accumulation_is_exact(device, fmt):
    """|x| = 127 everywhere, weights at their largest level, K = 16384: no int16/int32 overflow."""
    k, m, n = 16384, 9, 19  # M and N not multiples of any register tile
    group = 128 if fmt in ("int4", "int2") else 0
    f = formats.get_format(fmt)
    sign = torch.ones(m, k, dtype=torch.int8)
    sign[1::2] = -1  # rows alternate sign: both saturation directions
    x_q = (127 * sign).to(torch.int8)
    if fmt == "int8":
        packed = torch.full((n, k), -127, dtype=torch.int8)
        packed[1::2] = 127
        per_unit = 127 * 127
    else:
        codes = torch.full((n, k), f.max_code, dtype=torch.uint8)  # the largest positive level
        codes[1::2] = 0 if fmt != "int4" else 1  # the most negative level
        packed = formats.pack_codes_reference(codes, f.bits)
        per_unit = 127 * max(abs(f.level_mul * f.max_code - f.level_offset), abs(f.level_offset - (fmt == "int4")))
    sums = x_q.to(torch.int32).view(m, -1, group or k).sum(dim=2, dtype=torch.int32)
    got, want = run_gemm(fmt, x_q.to(device), sums.to(device), packed.to(device), group)
    groups = formats.num_groups(k, group)
    expected_mag = per_unit * (k // groups)  # closed form, independent of the reference
    got_t = got.cpu().reshape(m, n, -1)
    assert torch.equal(got.cpu(), want)
    assert got_t.abs().min().item() == expected_mag and got_t.abs().max().item() == expected_mag
    signs = torch.sign(got_t[:, :, 0].to(torch.int64))
    assert signs[0, 0] == signs[1, 1] and signs[0, 1] == signs[1, 0] and signs[0, 0] == -signs[0, 1]


# ---------------------------------------------------------------- fused linears

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 9), n=st.integers(1, 70), k=st.integers(1, 300), fg=fmt_and_group(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_bias=st.booleans())
def test_fused_linear_matches_reference(device, m, n, k, fg, dtype, with_bias):
    fmt, group = fg
    packed, scale = make_layer(fmt, n, k, group)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if with_bias else None
    check_linear(fmt, x.to(device), packed.to(device), scale.to(device), group,
                 None if bias is None else bias.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_fused_linear_clip_shape_3d_static(device, fmt):
    group = 128 if fmt in ("int4", "int2") else 0
    packed, scale = make_layer(fmt, 96, 768, group)
    x = torch.randn(2, 50, 768)
    check_linear(fmt, x.to(device), packed.to(device), scale.to(device), group, torch.randn(96).to(device))
    check_linear(fmt, x.to(device), packed.to(device), scale.to(device), group,
                 act_scale=torch.tensor([0.01]).to(device))  # static scale: values beyond 1.27 clip


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_non_contiguous_activation_is_copied(fmt):
    group = 32 if fmt in ("int4", "int2") else 0
    packed, scale = make_layer(fmt, 16, 64, group)
    x = torch.randn(64, 5).t()  # documented: non-contiguous float inputs are accepted
    assert not x.is_contiguous()
    args = linear_args(fmt, packed, scale, group)
    assert torch.equal(getattr(ops, f"{fmt}_linear")(x, *args), getattr(ops, f"{fmt}_linear")(x.contiguous(), *args))


# ---------------------------------------------------------------- packing ops

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 300), bits=st.sampled_from([2, 4]))
def test_pack_ops_match_reference(n, k, bits):
    codes = torch.randint(0, 1 << bits, (n, formats.padded_k(k)), dtype=torch.uint8)
    packed = ops.pack_codes(codes, bits)
    assert torch.equal(packed, formats.pack_codes_reference(codes, bits))
    assert torch.equal(ops.unpack_codes(packed, bits), codes)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 300))
def test_trit_ops_match_reference(n, k):
    codes, _ = primitives.quantize_weight(torch.randn(n, k), "ternary")
    packed = ops.pack_trits(codes, k)
    assert torch.equal(packed, formats.pack_trits_reference(codes, k))
    assert torch.equal(ops.unpack_trits(packed, k), codes)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument():
    packed, scale = make_layer("int4", 8, 64, 32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        ops.int4_linear(x.to(torch.int32), packed, scale, 32)
    with pytest.raises(RuntimeError, match="0-d"):
        ops.int8_linear(torch.tensor(1.0), *make_layer("int8", 8, 64))
    with pytest.raises(RuntimeError, match="mismatched in_features"):
        ops.int4_linear(torch.randn(3, 200), packed, scale, 32)
    with pytest.raises(RuntimeError, match="weight must be uint8"):
        ops.int4_linear(x, packed.to(torch.int8), scale, 32)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops.int4_linear(x, packed.reshape(-1), scale, 32)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        ops.int4_linear(x, torch.cat([packed, packed], 1)[:, ::2], scale, 32)
    with pytest.raises(RuntimeError, match="weight_scale must have shape"):
        ops.int4_linear(x, packed, scale[:, :2], 32)
    with pytest.raises(RuntimeError, match="group_size must be 0"):
        ops.int4_linear(x, packed, scale, 48)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.int4_linear(x, packed, scale, 32, torch.randn(9))
    with pytest.raises(RuntimeError, match="act_scale"):
        ops.int4_linear(x, packed, scale, 32, None, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="x_q must be int8"):
        ops.int8_gemm(torch.zeros(2, 128), torch.zeros(4, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x_q must have K_pad"):
        ops.int8_gemm(torch.zeros(2, 100, dtype=torch.int8), torch.zeros(4, 100, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x_sums must have shape"):
        ops.int4_gemm(torch.zeros(2, 128, dtype=torch.int8), torch.zeros(2, 1, dtype=torch.int32), packed, 32)
    with pytest.raises(RuntimeError, match="codes must be <= 3"):
        ops.pack_codes(torch.full((1, 128), 4, dtype=torch.uint8), 2)
    with pytest.raises(RuntimeError, match="bits must be 2 or 4"):
        ops.pack_codes(torch.zeros(1, 128, dtype=torch.uint8), 3)
    with pytest.raises(RuntimeError, match="> 242"):
        ops.unpack_trits(torch.full((1, 1), 250, dtype=torch.uint8), 5)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_bad_tile_weight_names_the_argument(fmt):
    group = 32 if fmt in ("int4", "int2") else 0
    packed, scale = make_layer(fmt, 20, 200, group)
    tile = formats.tile_layout(packed, formats.get_format(fmt))
    x = torch.randn(5, 200)
    linear = getattr(ops, f"{fmt}_linear")
    args = linear_args(fmt, packed, scale, group)
    with pytest.raises(RuntimeError, match=r"tile_weight must have shape \[2, 4, "):
        linear(x, *args, tile[:1])
    with pytest.raises(RuntimeError, match="tile_weight must be (u)?int8"):
        linear(x, *args, tile.to(torch.int32))
    with pytest.raises(RuntimeError, match="tile_weight must be contiguous"):
        linear(x, *args, torch.cat([tile, tile], 2)[:, :, ::2])
    with pytest.raises(ValueError, match="tile_weight is a CPU layout"):
        linear(x, *args, tile, backend="triton")


def test_wrong_device_is_rejected():
    packed, scale = make_layer("int8", 8, 64)
    with pytest.raises(RuntimeError, match="device|meta|Meta"):
        ops.int8_linear(torch.randn(2, 64), packed.to("meta"), scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_non_finite_activations_raise(fmt, bad):
    group = 32 if fmt in ("int4", "int2") else 0
    packed, scale = make_layer(fmt, 8, 64, group)
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(RuntimeError, match=r"x contains NaN or Inf \(row 2"):
        getattr(ops, f"{fmt}_linear")(x, *linear_args(fmt, packed, scale, group))


# ---------------------------------------------------------------- opcheck, compile, build

def opcheck_samples():
    yield from helpers.opcheck_samples()
    # the tile-layout weight of the CPU's AMX table, given to the fused linears
    for fmt in ALL_FORMATS:
        group = 32 if fmt in ("int4", "int2") else 0
        packed, scale = make_layer(fmt, 12, 70, group)
        tile_weight = formats.tile_layout(packed, formats.get_format(fmt))
        yield f"{fmt}_linear", (torch.randn(20, 70), *linear_args(fmt, packed, scale, group, torch.randn(12)), tile_weight)


@pytest.mark.parametrize("name,args", list(opcheck_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.pyclipq, name).default, args)


def test_every_schema_has_an_opcheck_sample():
    assert {name for name, _ in opcheck_samples()} == set(ops.library.SCHEMAS)


def test_torch_compile_fullgraph_traces_the_ops():
    packed, scale = make_layer("ternary", 24, 96)
    packed8, scale8 = make_layer("int8", 16, 24)

    def two_layers(x):
        h = ops.ternary_linear(x, packed, scale)
        return ops.int8_linear(torch.relu(h), packed8, scale8)

    x = torch.randn(5, 96)
    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), two_layers(x))


def test_build_info():
    info = pyclipq.build_info()
    assert "scalar" in info["cpu_isa_variants"]
    assert info["cpu_isa"] in info["cpu_isa_variants"]
    assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert "triton_version" in info


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_ops_really_use_the_threads(threads):
    """Built without its threading backend (e.g. no -fopenmp under torch's OpenMP), the CPU
    ops' at::parallel_for silently runs on one thread; build_info probes it."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert pyclipq.build_info()["cpu_threads"] == threads
    finally:
        torch.set_num_threads(old)


def _run_python(code, **env):
    import os
    # cwd="/": the package on sys.path (installed, or PYTHONPATH in a dev tree) is
    # imported, not a source checkout that happens to be the working directory.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd="/")


def test_missing_extension_gives_rebuild_hint():
    code = "import sys; sys.modules['pyclipq._C'] = None\nimport pyclipq"
    r = _run_python(code)
    assert r.returncode != 0
    assert "could not be loaded" in r.stderr and "--no-build-isolation" in r.stderr


def test_mismatched_extension_gives_rebuild_hint():
    code = ("import sys, types; m = types.ModuleType('pyclipq._C'); m.torch_version = lambda: '1.0.0'\n"
            "sys.modules['pyclipq._C'] = m\nimport pyclipq")
    r = _run_python(code)
    assert r.returncode != 0
    assert "built against torch 1.0.0" in r.stderr and "--no-build-isolation" in r.stderr


def test_scalar_isa_can_be_forced():
    r = _run_python("import pyclipq; print(pyclipq.build_info()['cpu_isa'])", PYCLIPQ_CPU_ISA="scalar")
    assert r.returncode == 0 and r.stdout.strip() == "scalar"
    r = _run_python("import pyclipq, torch; pyclipq.ops.int8_gemm(torch.zeros(1, 128, dtype=torch.int8), "
                    "torch.zeros(1, 128, dtype=torch.int8))", PYCLIPQ_CPU_ISA="sse9")
    assert r.returncode != 0 and "PYCLIPQ_CPU_ISA must be" in r.stderr


def test_routing_rule_and_kernels_share_the_gemv_limit():
    """ops' CUDA/Triton routing and the CUDA GEMV kernel read one limit (backend_limits.h)."""
    from pyclipq import _C

    assert _C.backend_limits() == {"gemv_max_m": ops.GEMV_MAX_M}
