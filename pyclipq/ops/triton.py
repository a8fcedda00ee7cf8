"""Triton implementations of pyclipq's ops: host wrappers and their torch.library registrations.

Each op is registered as its own ``pyclipq::triton_*`` op through
``torch.library.triton_op`` + ``wrap_triton``, so torch.compile/Inductor sees the Triton
kernels inside it (the ``pyclipq::*`` schemas of ``library.py`` stay the one place of the
device-dispatched ops; ``pyclipq.ops`` routes CUDA tensors here or to the CUDA kernels).

The host functions below ("check, allocate, launch") are public too: they take a
``config=`` dict to launch with a fixed configuration (see ``pyclipq_triton.autotune``).
Kernels live apart, in the top-level package ``pyclipq_triton``; format constants are passed to
them from ``pyclipq.formats``, their single source.

Ops (same arguments and results as the un-prefixed ones; references in ``reference.py``):
``triton_quantize_per_token``, ``triton_{int8,int4,int2,ternary}_gemm``,
``triton_{int8,int4,int2,ternary}_linear``, ``triton_{pack,unpack}_{codes,trits}``, and
the weight-only small-M linears ``triton_{int4,int2,ternary}_weight_only_linear``
(float activations, no activation quantization: ``y = x @ dequantized(w).T + bias``).

GPU note: unlike the CPU kernels, these do not raise on NaN/Inf activations (that check
would need a device sync); a row with one gets scale NaN, so its outputs are NaN.
"""
import contextlib
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .. import formats, primitives
from .library import register_rotation_gradient
# The kernels are a sibling top-level package (installed beside pyclipq by the wheel, and
# beside it in a source checkout), importable without pyclipq.
from pyclipq_triton import autotune, gemm_int8, gemm_lowbit, gemv_weight_only, hadamard, pack, quantize, unpack

Tensor = torch.Tensor

INT8_GEMM = autotune.BucketedKernel("int8_gemm", gemm_int8.int8_gemm_kernel,
                                    key=["N", "K", "FUSED", "HAS_BIAS"])
LOWBIT_GEMM = autotune.BucketedKernel("lowbit_gemm", gemm_lowbit.lowbit_gemm_kernel,
                                      key=["N", "K_PAD", "BITS", "GROUP_STEPS", "FUSED", "HAS_BIAS",
                                           "BLOCKS_PER_ITER", "EVEN"])
STEP = formats.VECTOR_BYTES  # K elements per bit-field of a block-planar block: the K of each int8 dot


# ---------------------------------------------------------------- checks (mirror csrc/op_checks.h)

def _check(cond, op, msg):
    torch._check(cond, lambda: f"{op}: {msg}")


def _check_float_input(x, op):
    _check(x.dim() >= 1, op, "x must have shape [..., K], got a 0-d tensor")
    _check(x.dtype in (torch.float32, torch.bfloat16, torch.float16), op,
           f"x must be float32, bfloat16 or float16, got {x.dtype}")
    _check(x.shape[-1] >= 1, op, f"x must have K = x.size(-1) >= 1, got shape {tuple(x.shape)}")


def _check_group_size(group_size, op):
    _check(group_size in formats.GROUP_SIZES, op,
           f"group_size must be 0 (per output channel), 32, 64 or 128, got {group_size}")


def _check_quantized_activation(x_q, op):
    _check(x_q.dtype == torch.int8, op, f"x_q must be int8, got {x_q.dtype}")
    _check(x_q.dim() == 2, op, f"x_q must be 2-D [M, K_pad], got shape {tuple(x_q.shape)}")
    _check(x_q.is_contiguous(), op, "x_q must be contiguous")
    _check(x_q.shape[1] > 0 and x_q.shape[1] % formats.K_BLOCK == 0, op,
           f"x_q must have K_pad = a positive multiple of {formats.K_BLOCK} columns (see docs/FORMATS.md), "
           f"got {x_q.shape[1]}")
    return x_q.shape[1]


def _check_weight(fmt, weight, k_pad, op):
    want = fmt.code_dtype
    _check(weight.dtype == want, op, f"weight must be {'int8' if want == torch.int8 else 'uint8 (packed codes)'} "
           f"for format {fmt.name}, got {weight.dtype}")
    _check(weight.dim() == 2, op, f"weight must be 2-D [N, K_pad / codes_per_byte], got shape {tuple(weight.shape)}")
    _check(weight.is_contiguous(), op, "weight must be contiguous")
    cpb = fmt.codes_per_byte
    _check(weight.shape[1] * cpb == k_pad, op,
           f"weight holds K_pad = {weight.shape[1] * cpb} ({weight.shape[1]} bytes x {cpb} codes) but the "
           f"activation has K_pad = {k_pad} (mismatched in_features K?)")


def _check_same_device(ref, other, name, op):
    _check(other.device == ref.device, op, f"{name} is on {other.device} but x is on {ref.device}")


def _check_group_sums(sums, m, groups, op):
    _check(sums.dtype == torch.int32, op, f"x_sums must be int32, got {sums.dtype}")
    _check(sums.dim() == 2 and sums.shape[0] == m and sums.shape[1] == groups, op,
           f"x_sums must have shape [{m}, {groups}] (rows of x_q, weight groups), got {tuple(sums.shape)}")
    _check(sums.is_contiguous(), op, "x_sums must be contiguous")


def _check_weight_scale(scale, n, groups, op):
    _check(scale.dtype == torch.float32, op, f"weight_scale must be float32, got {scale.dtype}")
    ok = (scale.dim() == 1 and groups == 1 and scale.shape[0] == n) or (
        scale.dim() == 2 and scale.shape[0] == n and scale.shape[1] == groups)
    _check(ok, op, f"weight_scale must have shape [{n}, {groups}]{' or [N]' if groups == 1 else ''} "
           f"(N output features, G groups), got {tuple(scale.shape)}")
    _check(scale.is_contiguous(), op, "weight_scale must be contiguous")


def _check_bias(bias, n, op):
    if bias is None:
        return
    _check(bias.is_floating_point(), op, f"bias must be floating point, got {bias.dtype}")
    _check(bias.dim() == 1 and bias.shape[0] == n, op, f"bias must have shape [{n}], got {tuple(bias.shape)}")


def _check_act_scale(act_scale, op):
    if act_scale is None:
        return
    _check(act_scale.dtype == torch.float32 and act_scale.numel() == 1, op,
           "act_scale (static activation scale) must be a float32 tensor with one element, "
           f"got {act_scale.dtype} of shape {tuple(act_scale.shape)}")


def _concrete(t):
    """True when t holds data we may read on the host (not a fake/meta tensor, not tracing)."""
    return (not torch.compiler.is_compiling() and t.device.type != "meta"
            and not isinstance(t, torch._subclasses.FakeTensor))


def _launches(t):
    """False only where a launch must be skipped: the interpreter on a fake tensor.

    Off the interpreter, wrap_triton turns launches on fake tensors into graph nodes.
    Under it, wrap_triton hands back the plain interpreted kernel, which would try to
    run on fake data (torch/_library/triton.py), so fake/meta tracing skips the launch.
    """
    return not (autotune.interpreting() and
                (torch._subclasses.fake_tensor.is_fake(t) or t.device.type == "meta"))


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _bias_arg(bias, fallback):
    """(pointer tensor, HAS_BIAS): the kernels widen fp32/bf16/fp16 bias in registers."""
    if bias is None:
        return fallback, False
    if bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        bias = bias.to(torch.float32)
    return bias.contiguous(), True


# ---------------------------------------------------------------- activation quantization

def quantize_per_token(x: Tensor, group_size: int = 0, act_scale: Optional[Tensor] = None,
                       config: Optional[dict] = None):
    """float [..., K] -> (int8 [M, K_pad], fp32 scales [M], int32 group sums [M, G]); see FORMATS.md."""
    op = "pyclipq.triton_quantize_per_token"
    _check_float_input(x, op)
    _check_group_size(group_size, op)
    _check_act_scale(act_scale, op)
    k = x.shape[-1]
    k_pad = formats.padded_k(k)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    groups = formats.num_groups(k_pad, group_size)
    q = torch.empty((m, k_pad), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    sums = torch.empty((m, groups), dtype=torch.int32, device=x.device)
    if act_scale is not None:
        _check_same_device(x, act_scale, "act_scale", op)
        act_scale = act_scale.reshape(1)
        if _concrete(act_scale):
            s = float(act_scale.item()) if act_scale.device.type == "cpu" else None
            _check(s is None or (s > 0 and s == s and s != float("inf")), op,
                   f"act_scale must be finite and > 0 (was the layer calibrated?), got {s}")
    if m == 0 or not _launches(x):
        return q, scale, sums
    block_k = min(triton.next_power_of_2(k_pad), 2048)
    meta = {"BLOCK_M": max(1, min(16, 2048 // block_k)), "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1}
    meta = autotune.accepted(quantize.quantize_per_token_kernel, {**meta, **(autotune.fixed_config("quantize", config) or {})})
    with _device_guard(x):
        wrap_triton(quantize.quantize_per_token_kernel)[(triton.cdiv(m, meta["BLOCK_M"]),)](
            rows, q, scale, sums, act_scale if act_scale is not None else scale,
            m, k, k_pad, groups, rows.stride(0),
            GROUP_SIZE=group_size, STATIC=act_scale is not None, QMAX=formats.ACT_QMAX,
            MIN_ABSMAX=formats.ACT_MIN_ABSMAX, **meta)
    return q, scale, sums


# ---------------------------------------------------------------- integer GEMMs and fused linears

def _launch_int8(x_q, weight, out, stride_om, fused, s=None, ws=None, bias=None, config=None):
    m, k = x_q.shape
    n = weight.shape[0]
    bias_t, has_bias = _bias_arg(bias, out)
    kernel, meta = INT8_GEMM.select(m, config)
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    with _device_guard(x_q):
        wrap_triton(kernel)[grid](
            x_q, weight, out, s if s is not None else out, ws if ws is not None else out, bias_t,
            m, n, k, stride_om, FUSED=fused, HAS_BIAS=has_bias, **meta)


def _blocks_per_iter(fmt, group_size, k_pad, config):
    """Packed 32-byte blocks per K-loop iteration: whole groups per iteration, ~256 K values."""
    cpb = fmt.codes_per_byte
    n_blocks = k_pad // (STEP * cpb)
    group_steps = group_size // STEP
    base = 1
    while group_steps and (base * cpb) % group_steps:
        base += 1
    if config and "BLOCKS_PER_ITER" in config:
        bpi = config["BLOCKS_PER_ITER"]
        torch._check(bpi % base == 0, lambda: f"BLOCKS_PER_ITER must be a multiple of {base} for this group size")
        return bpi, n_blocks % bpi == 0
    target = max(base, 256 // (STEP * cpb))
    for bpi in range(target, 0, -1):
        if bpi % base == 0 and n_blocks % bpi == 0:
            return bpi, True
    return base, n_blocks % base == 0


def _launch_lowbit(fmt, x_q, x_sums, weight, group_size, out, stride_om, fused,
                   s=None, ws=None, bias=None, config=None):
    m, k_pad = x_q.shape
    n = weight.shape[0]
    groups = formats.num_groups(k_pad, group_size)
    fixed = autotune.fixed_config("lowbit_gemm", config)
    bpi, even = _blocks_per_iter(fmt, group_size, k_pad, fixed)
    bias_t, has_bias = _bias_arg(bias, out)
    kernel, meta = LOWBIT_GEMM.select(m, config)
    meta.pop("BLOCKS_PER_ITER", None)
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    with _device_guard(x_q):
        wrap_triton(kernel)[grid](
            x_q, weight, x_sums, out, s if s is not None else out, ws if ws is not None else out, bias_t,
            m, n, k_pad, groups, stride_om,
            BITS=fmt.bits, LEVEL_MUL=fmt.level_mul, LEVEL_OFFSET=fmt.level_offset,
            GROUP_STEPS=group_size // STEP, FUSED=fused, HAS_BIAS=has_bias,
            BLOCKS_PER_ITER=bpi, EVEN=even, **meta)


def int8_gemm(x_q: Tensor, weight: Tensor, config: Optional[dict] = None) -> Tensor:
    op = "pyclipq.triton_int8_gemm"
    k_pad = _check_quantized_activation(x_q, op)
    _check_weight(formats.INT8, weight, k_pad, op)
    _check_same_device(x_q, weight, "weight", op)
    m, n = x_q.shape[0], weight.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=x_q.device)
    if m and n and _launches(x_q):
        _launch_int8(x_q, weight, out, n, False, config=config)
    return out


def lowbit_gemm(fmt_name: str, x_q: Tensor, x_sums: Tensor, weight: Tensor, group_size: int,
                config: Optional[dict] = None) -> Tensor:
    """int32 [M, N, G]: per group, LEVEL_MUL * sum(c * x_q) - LEVEL_OFFSET * x_sums (exact)."""
    fmt = formats.as_format(fmt_name)
    op = f"pyclipq.triton_{fmt.name}_gemm"
    k_pad = _check_quantized_activation(x_q, op)
    _check_weight(fmt, weight, k_pad, op)
    _check_group_size(group_size, op)
    _check_same_device(x_q, weight, "weight", op)
    _check_same_device(x_q, x_sums, "x_sums", op)
    m, n = x_q.shape[0], weight.shape[0]
    groups = formats.num_groups(k_pad, group_size)
    _check_group_sums(x_sums, m, groups, op)
    out = torch.empty((m, n, groups), dtype=torch.int32, device=x_q.device)
    if m and n and _launches(x_q):
        _launch_lowbit(fmt, x_q, x_sums, weight, group_size, out, n * groups, False, config=config)
    return out


def linear(fmt_name: str, x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int = 0,
           bias: Optional[Tensor] = None, act_scale: Optional[Tensor] = None,
           config: Optional[dict] = None) -> Tensor:
    """The fused linear of docs/FORMATS.md: quantize x per token, integer GEMM, scales, bias."""
    fmt = formats.as_format(fmt_name)
    op = f"pyclipq.triton_{fmt.name}_linear"
    _check_float_input(x, op)
    _check_group_size(group_size, op)
    k_pad = formats.padded_k(x.shape[-1])
    _check_weight(fmt, weight, k_pad, op)
    n = weight.shape[0]
    groups = formats.num_groups(k_pad, group_size)
    _check_weight_scale(weight_scale, n, groups, op)
    _check_bias(bias, n, op)
    for name, t in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias), ("act_scale", act_scale)):
        if t is not None:
            _check_same_device(x, t, name, op)
    x_q, s, sums = quantize_per_token(x, group_size, act_scale)
    m = x_q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n and _launches(x):
        if not fmt.bit_packed:  # int8: its own kernel, one signed code a byte
            _launch_int8(x_q, weight, out, n, True, s, weight_scale, bias, config)
        else:
            _launch_lowbit(fmt, x_q, sums, weight, group_size, out, n, True, s, weight_scale, bias, config)
    return out.view(*x.shape[:-1], n)


def weight_only_linear(fmt_name: str, x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int = 0,
                       bias: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """y = x @ dequantized(weight).T + bias with float activations (meant for M <= 16)."""
    fmt = formats.as_format(fmt_name)
    op = f"pyclipq.triton_{fmt.name}_weight_only_linear"
    _check(fmt.bit_packed, op, "the weight-only path is for the packed low-bit formats")
    _check_float_input(x, op)
    _check_group_size(group_size, op)
    k = x.shape[-1]
    k_pad = formats.padded_k(k)
    _check_weight(fmt, weight, k_pad, op)
    n = weight.shape[0]
    groups = formats.num_groups(k_pad, group_size)
    _check_weight_scale(weight_scale, n, groups, op)
    _check_bias(bias, n, op)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    fixed = autotune.accepted(gemv_weight_only.weight_only_kernel, autotune.fixed_config("weight_only", config) or {})
    meta = {**autotune.candidates("weight_only", m)[0], **fixed}
    n_blocks = k_pad // (STEP * fmt.codes_per_byte)
    if "SPLIT_K" not in fixed:
        # Enough programs to keep every SM streaming weights: about 4 per SM.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        n_tiles = triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"])
        meta["SPLIT_K"] = max(1, min(n_blocks, triton.cdiv(4 * sms, max(n_tiles, 1))))
    split = meta["SPLIT_K"]
    out = (torch.zeros if split > 1 else torch.empty)(
        (m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if m and n and _launches(x):
        bias_t, has_bias = _bias_arg(bias, weight_scale)
        grid = (triton.cdiv(n, meta["BLOCK_N"]), split, triton.cdiv(m, meta["BLOCK_M"]))
        with _device_guard(x):
            wrap_triton(gemv_weight_only.weight_only_kernel)[grid](
                rows, weight, weight_scale, bias_t, out, m, n, k, k_pad, groups, rows.stride(0), n,
                BITS=fmt.bits, LEVEL_MUL=fmt.level_mul, LEVEL_OFFSET=fmt.level_offset,
                GROUP_STEPS=group_size // STEP, HAS_BIAS=has_bias,
                DOT_FP32=x.dtype == torch.float32 or autotune.interpreting(), **meta)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- packing

def _check_codes(codes, max_code, op):
    _check(codes.dtype == torch.uint8, op, f"codes must be uint8, got {codes.dtype}")
    _check(codes.dim() == 2, op, f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() and _concrete(codes):
        found = int(codes.max().item())
        _check(found <= max_code, op, f"codes must be <= {max_code} for this format, found {found}")


def _check_bits(bits, op):
    _check(bits in (2, 4), op, f"bits must be 2 or 4, got {bits}")
    return 8 // bits


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    op = "pyclipq.triton_pack_codes"
    per_byte = _check_bits(bits, op)
    _check_codes(codes, (1 << bits) - 1, op)
    codes = codes.contiguous()
    n, k_pad = codes.shape
    _check(k_pad % formats.K_BLOCK == 0, op, f"codes must have K_pad = a multiple of {formats.K_BLOCK} columns, "
           f"got {k_pad}")
    out = torch.empty((n, k_pad // per_byte), dtype=torch.uint8, device=codes.device)
    if n and k_pad and _launches(codes):
        with _device_guard(codes):
            wrap_triton(pack.pack_codes_kernel)[(triton.cdiv(n, 16), k_pad // (formats.VECTOR_BYTES * per_byte))](
                codes, out, n, k_pad, BITS=bits, BLOCK_ROWS=16)
    return out


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    op = "pyclipq.triton_unpack_codes"
    per_byte = _check_bits(bits, op)
    _check(packed.dtype == torch.uint8 and packed.dim() == 2, op,
           f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    packed = packed.contiguous()
    n, row_bytes = packed.shape
    _check((row_bytes * per_byte) % formats.K_BLOCK == 0, op,
           f"packed rows must hold a multiple of {formats.K_BLOCK} codes, got {row_bytes * per_byte}")
    out = torch.empty((n, row_bytes * per_byte), dtype=torch.uint8, device=packed.device)
    if n and row_bytes and _launches(packed):
        with _device_guard(packed):
            wrap_triton(unpack.unpack_codes_kernel)[(triton.cdiv(n, 16), row_bytes // formats.VECTOR_BYTES)](
                packed, out, n, row_bytes, BITS=bits, BLOCK_ROWS=16)
    return out


def pack_trits(codes: Tensor, k: int) -> Tensor:
    op = "pyclipq.triton_pack_trits"
    _check_codes(codes, formats.TERNARY.max_code, op)
    _check(1 <= k <= codes.shape[1], op, f"k must be in [1, codes.size(1) = {codes.shape[1]}], got {k}")
    codes = codes.contiguous()
    n, width = codes.shape
    n_bytes = -(-k // formats.TRITS_PER_BYTE)
    out = torch.empty((n, n_bytes), dtype=torch.uint8, device=codes.device)
    if n and _launches(codes):
        with _device_guard(codes):
            wrap_triton(pack.pack_trits_kernel)[(triton.cdiv(n, 16), triton.cdiv(n_bytes, 64))](
                codes, out, n, width, k, n_bytes, PAD_CODE=formats.TERNARY.pad_code, BLOCK_ROWS=16, BLOCK_BYTES=64)
    return out


def unpack_trits(packed: Tensor, k: int) -> Tensor:
    op = "pyclipq.triton_unpack_trits"
    _check(packed.dtype == torch.uint8 and packed.dim() == 2, op,
           f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    _check(k >= 1, op, f"k must be >= 1, got {k}")
    n_bytes = -(-k // formats.TRITS_PER_BYTE)
    _check(packed.shape[1] == n_bytes, op,
           f"packed must have ceil(k / 5) = {n_bytes} bytes per row for k = {k}, got {packed.shape[1]}")
    packed = packed.contiguous()
    if packed.numel() and _concrete(packed):
        found = int(packed.max().item())
        _check(found <= formats.MAX_TRIT_BYTE, op,
               f"packed holds byte {found} > {formats.MAX_TRIT_BYTE}, not a base-3 ternary layout")
    n = packed.shape[0]
    k_pad = formats.padded_k(k)
    out = torch.empty((n, k_pad), dtype=torch.uint8, device=packed.device)
    if n and _launches(packed):
        with _device_guard(packed):
            wrap_triton(pack.unpack_trits_kernel)[(triton.cdiv(n, 16), triton.cdiv(k_pad, 128))](
                packed, out, n, k, n_bytes, k_pad, PAD_CODE=formats.TERNARY.pad_code, BLOCK_ROWS=16, BLOCK_COLS=128)
    return out


# ---------------------------------------------------------------- registrations

def hadamard_rotate(x: Tensor, block: int) -> Tensor:
    op = "pyclipq.triton_hadamard_rotate"
    _check(x.is_floating_point(), op, f"x must be a floating-point tensor, got {x.dtype}")
    _check(x.dim() >= 1 and x.shape[-1] > 0, op, f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _check(isinstance(block, int) and block >= 1 and block & (block - 1) == 0, op,
           f"block must be a power of 2 >= 1, got {block}")
    k = x.shape[-1]
    _check(k % block == 0, op, f"x's last dimension ({k}) must be a multiple of block ({block})")
    if not 16 <= block <= 128:
        # below tl.dot's smallest tile, or an H_b tile too large for one program's registers:
        # the same product through torch
        return primitives.rotate_blocks(x.float(), block).to(x.dtype)
    xf = x.float().contiguous().view(-1, k)
    y = torch.empty_like(xf)
    rows = xf.shape[0]
    if rows and _launches(xf):
        h = primitives.hadamard(block, xf.device, torch.float32)
        with _device_guard(xf):
            wrap_triton(hadamard.hadamard_kernel)[(triton.cdiv(rows, 16), k // block)](
                xf, h, y, rows, k, BLOCK=block, BLOCK_M=16)
    return y.view(x.shape).to(x.dtype)


@triton_op("pyclipq::triton_quantize_per_token", mutates_args=())
def _quantize_op(x: Tensor, group_size: int, act_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return quantize_per_token(x, group_size, act_scale)


@triton_op("pyclipq::triton_int8_gemm", mutates_args=())
def _int8_gemm_op(x_q: Tensor, weight: Tensor) -> Tensor:
    return int8_gemm(x_q, weight)


@triton_op("pyclipq::triton_int4_gemm", mutates_args=())
def _int4_gemm_op(x_q: Tensor, x_sums: Tensor, weight: Tensor, group_size: int) -> Tensor:
    return lowbit_gemm("int4", x_q, x_sums, weight, group_size)


@triton_op("pyclipq::triton_int2_gemm", mutates_args=())
def _int2_gemm_op(x_q: Tensor, x_sums: Tensor, weight: Tensor, group_size: int) -> Tensor:
    return lowbit_gemm("int2", x_q, x_sums, weight, group_size)


@triton_op("pyclipq::triton_ternary_gemm", mutates_args=())
def _ternary_gemm_op(x_q: Tensor, x_sums: Tensor, weight: Tensor) -> Tensor:
    out = lowbit_gemm("ternary", x_q, x_sums, weight, 0)
    return out.view(out.shape[0], out.shape[1])


@triton_op("pyclipq::triton_int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                    act_scale: Optional[Tensor] = None) -> Tensor:
    return linear("int8", x, weight, weight_scale, 0, bias, act_scale)


@triton_op("pyclipq::triton_int4_linear", mutates_args=())
def _int4_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int, bias: Optional[Tensor] = None,
                    act_scale: Optional[Tensor] = None) -> Tensor:
    return linear("int4", x, weight, weight_scale, group_size, bias, act_scale)


@triton_op("pyclipq::triton_int2_linear", mutates_args=())
def _int2_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int, bias: Optional[Tensor] = None,
                    act_scale: Optional[Tensor] = None) -> Tensor:
    return linear("int2", x, weight, weight_scale, group_size, bias, act_scale)


@triton_op("pyclipq::triton_ternary_linear", mutates_args=())
def _ternary_linear_op(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                       act_scale: Optional[Tensor] = None) -> Tensor:
    return linear("ternary", x, weight, weight_scale, 0, bias, act_scale)


@triton_op("pyclipq::triton_int4_weight_only_linear", mutates_args=())
def _int4_wo_op(x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int,
                bias: Optional[Tensor] = None) -> Tensor:
    return weight_only_linear("int4", x, weight, weight_scale, group_size, bias)


@triton_op("pyclipq::triton_int2_weight_only_linear", mutates_args=())
def _int2_wo_op(x: Tensor, weight: Tensor, weight_scale: Tensor, group_size: int,
                bias: Optional[Tensor] = None) -> Tensor:
    return weight_only_linear("int2", x, weight, weight_scale, group_size, bias)


@triton_op("pyclipq::triton_ternary_weight_only_linear", mutates_args=())
def _ternary_wo_op(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return weight_only_linear("ternary", x, weight, weight_scale, 0, bias)


@triton_op("pyclipq::triton_pack_codes", mutates_args=())
def _pack_codes_op(codes: Tensor, bits: int) -> Tensor:
    return pack_codes(codes, bits)


@triton_op("pyclipq::triton_unpack_codes", mutates_args=())
def _unpack_codes_op(packed: Tensor, bits: int) -> Tensor:
    return unpack_codes(packed, bits)


@triton_op("pyclipq::triton_pack_trits", mutates_args=())
def _pack_trits_op(codes: Tensor, k: int) -> Tensor:
    return pack_trits(codes, k)


@triton_op("pyclipq::triton_unpack_trits", mutates_args=())
def _unpack_trits_op(packed: Tensor, k: int) -> Tensor:
    return unpack_trits(packed, k)


@triton_op("pyclipq::triton_hadamard_rotate", mutates_args=())
def _hadamard_rotate_op(x: Tensor, block: int) -> Tensor:
    return hadamard_rotate(x, block)


# The registered op of each pyclipq op, for pyclipq.ops' backend choice.
OPS = {name: getattr(torch.ops.pyclipq, f"triton_{name}") for name in (
    "quantize_per_token", "int8_gemm", "int4_gemm", "int2_gemm", "ternary_gemm",
    "int8_linear", "int4_linear", "int2_linear", "ternary_linear",
    "pack_codes", "unpack_codes", "pack_trits", "unpack_trits", "hadamard_rotate")}
WEIGHT_ONLY_OPS = {name: getattr(torch.ops.pyclipq, f"triton_{name}_weight_only_linear")
                   for name in ("int4", "int2", "ternary")}


def _not_differentiable(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"pyclipq.triton_{name} has no gradient: the packed kernels are for inference. "
                           "Train with pyclipq.train (fake-quant modules with straight-through estimators).")

    return backward


# As for the pyclipq::* ops (library.py): calling these on tensors that require grad
# neither warns nor silently drops the graph; backpropagating through them raises.
for _name in [*OPS, *(f"{n}_weight_only_linear" for n in WEIGHT_ONLY_OPS)]:
    if _name != "hadamard_rotate":
        torch.library.register_autograd(f"pyclipq::triton_{_name}", _not_differentiable(_name))


register_rotation_gradient("pyclipq::triton_hadamard_rotate")
