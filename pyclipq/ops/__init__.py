"""Public, typed wrappers over torch.ops.pyclipq.* (schemas and fakes live in .library).

GPU backend choice. CPU tensors always go to the CPU kernels. For CUDA tensors every
op has two implementations: the CUDA kernels compiled into ``pyclipq._C`` (the
``pyclipq::<op>`` CUDA dispatch key) and the Triton kernels registered as
``pyclipq::triton_<op>`` (``pyclipq.ops.triton``). Each wrapper picks one:

1. the ``backend=`` argument (``"cuda"``, ``"triton"`` or ``"auto"``), else
2. the environment variable ``PYCLIPQ_GPU_BACKEND`` (same values), else ``"auto"``.

``"auto"``, on sm_90+ (Hopper): Triton for the integer GEMMs at every M and for the fused
linears with M > 16 rows (its int8 ``tl.dot`` compiles to wgmma; the CUDA GEMM uses
sm_80's ``mma.sync``: 0.83-0.98x vs 0.2x of bf16 cuBLAS at M = 4096 on an H100,
benchmarks/GPU_NOTES.md); the CUDA kernels for fused linears with M <= 16 (the GEMV
kernel) and for quantization and packing. Below sm_90: the CUDA kernels. When only one
backend is available (no CUDA build, or no triton installed) it takes that one. ``backend="triton"``
also works on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the Triton ops).

GPU note: the GPU kernels do not raise on NaN/Inf activations (that would need a
device sync); a row holding one gets scale NaN, so that row's outputs are NaN.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import formats, primitives
from .._build import load_extension
from . import library  # noqa: F401  (defines the schemas and fakes)
from . import reference  # noqa: F401

_ops = torch.ops.pyclipq

BACKEND_ENV = "PYCLIPQ_GPU_BACKEND"
BACKENDS = ("auto", "cuda", "triton")
GEMV_MAX_M = 16  # the CUDA GEMV kernel's limit (csrc/include/pyclipq/backend_limits.h kGemvMaxM, tested equal)


@torch.compiler.assume_constant_result
def _cuda_kernels_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("pyclipq::int8_linear", "CUDA")


def _triton_ops():
    """{op name: pyclipq::triton_<op>}, or None when triton is not importable."""
    global _TRITON
    if _TRITON is False:
        try:
            from . import triton as triton_impl
            _TRITON = triton_impl.OPS
        except ImportError:
            _TRITON = None
    return _TRITON


_TRITON = False
if torch.cuda.is_available():
    _triton_ops()  # register the Triton ops up front on GPU machines (torch.compile needs them)


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    return os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"


@torch.compiler.assume_constant_result
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def gpu_backend(op: str, t: torch.Tensor, m: int, backend: str | None = None) -> str:
    """The backend ("cuda" or "triton") that ``op`` uses for tensor ``t`` with ``m`` rows; see the module doc."""
    choice = (backend or _env_backend()).lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend (or {BACKEND_ENV}) must be one of {BACKENDS}, got {choice!r}")
    if choice != "auto":
        return choice
    has_cuda, has_triton = _cuda_kernels_built(), _triton_ops() is not None
    if not (has_cuda and has_triton):
        return "cuda" if has_cuda or not has_triton else "triton"
    if _capability_major(t.device.index or 0) >= 9:
        if op.endswith("_gemm") or (op.endswith("_linear") and m > GEMV_MAX_M):
            return "triton"
    return "cuda"


def _route(op: str, t: torch.Tensor, m: int, backend: str | None):
    if not t.is_cuda and backend in (None, "auto", "cuda"):
        return getattr(_ops, op)  # the device's own kernel (CPU), through the dispatcher
    if gpu_backend(op, t, m, backend) == "triton":
        impls = _triton_ops()
        if impls is None:
            raise RuntimeError(f"pyclipq.ops.{op}: backend 'triton' needs the triton package")
        return impls[op]
    return getattr(_ops, op)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _lead(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 0


def quantize_per_token(x: torch.Tensor, group_size: int = 0, act_scale: torch.Tensor | None = None, *,
                       backend: str | None = None):
    """float [..., K] -> (int8 [M, K_pad], fp32 scales [M], int32 group sums [M, G])."""
    return _route("quantize_per_token", x, _rows(x), backend)(x, group_size, act_scale)


def int8_gemm(x_q: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    return _route("int8_gemm", x_q, _lead(x_q), backend)(x_q, weight)


def int4_gemm(x_q, x_sums, weight, group_size: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("int4_gemm", x_q, _lead(x_q), backend)(x_q, x_sums, weight, group_size)


def int2_gemm(x_q, x_sums, weight, group_size: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("int2_gemm", x_q, _lead(x_q), backend)(x_q, x_sums, weight, group_size)


def ternary_gemm(x_q, x_sums, weight, *, backend: str | None = None) -> torch.Tensor:
    return _route("ternary_gemm", x_q, _lead(x_q), backend)(x_q, x_sums, weight)


@functools.cache
def _cpu_tile_layout_formats() -> frozenset[str]:
    return frozenset(load_extension().build_info()["cpu_tile_layout"])


@torch.compiler.assume_constant_result
def cpu_reads_tile_layout(fmt: "formats.WeightFormat | str | None" = None) -> bool:
    """Whether this process's CPU kernel table reads a fused linear's ``tile_weight`` for format `fmt`
    (None: for any format): AMX for every format, AVX-512 VNNI for int8 (its broadcast tile reads the
    panels as stored instead of repacking them per call). Layers that keep their weight across
    calls then build it once (formats.tile_layout)."""
    names = _cpu_tile_layout_formats()
    return bool(names) if fmt is None else formats.as_format(fmt).name in names


def _linear(op: str, x, args: tuple, tile_weight, backend):
    """The fused linear `op`; tile_weight (a CPU layout) reaches only the CPU kernel."""
    if tile_weight is None:
        return _route(op, x, _rows(x), backend)(x, *args)
    if x.is_cuda or backend == "triton":
        raise ValueError(f"pyclipq.ops.{op}: tile_weight is a CPU layout; pass None for {x.device} tensors "
                         f"(backend {backend!r})")
    return _route(op, x, _rows(x), backend)(x, *args, tile_weight)


def int8_linear(x, weight, weight_scale, bias=None, act_scale=None, tile_weight=None, *,
                backend: str | None = None) -> torch.Tensor:
    return _linear("int8_linear", x, (weight, weight_scale, bias, act_scale), tile_weight, backend)


def int4_linear(x, weight, weight_scale, group_size: int, bias=None, act_scale=None, tile_weight=None, *,
                backend: str | None = None) -> torch.Tensor:
    return _linear("int4_linear", x, (weight, weight_scale, group_size, bias, act_scale), tile_weight, backend)


def int2_linear(x, weight, weight_scale, group_size: int, bias=None, act_scale=None, tile_weight=None, *,
                backend: str | None = None) -> torch.Tensor:
    return _linear("int2_linear", x, (weight, weight_scale, group_size, bias, act_scale), tile_weight, backend)


def ternary_linear(x, weight, weight_scale, bias=None, act_scale=None, tile_weight=None, *,
                   backend: str | None = None) -> torch.Tensor:
    return _linear("ternary_linear", x, (weight, weight_scale, bias, act_scale), tile_weight, backend)


# The fused linear of each format (the op family <format>_linear), keyed by its WeightFormat.
FUSED_LINEARS = {formats.INT8: int8_linear, formats.INT4: int4_linear, formats.INT2: int2_linear,
                 formats.TERNARY: ternary_linear}


def fused_linear(fmt: formats.WeightFormat | str, x, weight, weight_scale, group_size: int = 0, bias=None,
                 act_scale=None, tile_weight=None, *, backend: str | None = None) -> torch.Tensor:
    """The fused linear of format `fmt`, with the group size where the format has groups."""
    fmt = formats.as_format(fmt)
    args = (weight, weight_scale, group_size) if fmt.grouped else (weight, weight_scale)
    return FUSED_LINEARS[fmt](x, *args, bias, act_scale, tile_weight, backend=backend)


def pack_codes(codes: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("pack_codes", codes, _lead(codes), backend)(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("unpack_codes", packed, _lead(packed), backend)(packed, bits)


def pack_trits(codes: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("pack_trits", codes, _lead(codes), backend)(codes, k)


def unpack_trits(packed: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    return _route("unpack_trits", packed, _lead(packed), backend)(packed, k)


def hadamard_rotate(x: torch.Tensor, block: int, *, backend: str | None = None) -> torch.Tensor:
    """x [..., K] times diag(H_b, ..., H_b), H_b the orthonormal Hadamard matrix of `block` (a power
    of 2 dividing K): the input rotation of QuantLinear (LayerConfig.rotation). CPU: a fast
    Walsh-Hadamard kernel; GPU: Triton (there is no CUDA C++ kernel for it)."""
    if x.is_cuda and backend in (None, "auto", "cuda"):
        backend = "triton" if _triton_ops() is not None else None
        if backend is None:  # no triton: the same product through torch
            return primitives.rotate_blocks(x, block)
    return _route("hadamard_rotate", x, _rows(x), backend)(x, block)


# ------------------------------------------------------------------ transformer-block ops (CPU kernels)

def _cpu_only(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"pyclipq.ops.{op} runs on CPU tensors only (the fused transformer block is a CPU "
                         f"path), got a tensor on {t.device}")


def layer_norm_quantize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        group_size: int = 0, rotation_block: int = 1, act_scale: torch.Tensor | None = None):
    """LayerNorm(x) -> [block-Hadamard rotation] -> per-token int8, in one pass over each row:
    the (x_q, x_scale, x_sums) that ``quantize_per_token(layer_norm(x))`` gives (within float rounding
    of the LayerNorm: a code may differ by 1 where a value sits on a rounding boundary)."""
    _cpu_only("layer_norm_quantize", x)
    return _ops.layer_norm_quantize(x, weight, bias, float(eps), group_size, rotation_block, act_scale)


def quantized_linear(fmt: formats.WeightFormat | str, x_q, x_scale, x_sums, weight, weight_scale, group_size: int = 0,
                     bias=None, tile_weight=None, *, activation: str = "none", residual: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[M, N] = act((x_q W^T) * scales + bias) + residual for quantized activations (x_q, x_scale,
    x_sums) from ``quantize_per_token`` or ``layer_norm_quantize``; activation "none", "gelu" (erf) or
    "quick_gelu"; the result in out_dtype (float32 by default). The integer part is the fused linear's."""
    _cpu_only("quantized_linear", x_q)
    fmt = formats.as_format(fmt)
    return _ops.quantized_linear(x_q, x_scale, x_sums, weight, weight_scale, fmt.name, group_size if fmt.grouped else 0,
                                 bias, tile_weight, activation, residual, out_dtype)


def attention(qkv: torch.Tensor, num_heads: int, mask: torch.Tensor | None = None, causal: bool = False,
              scale: float | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention on packed projections: qkv [B, T, 3 E] (q | k | v, heads contiguous
    within each) -> [B, T, E], one call for every head. mask: additive float32 [T, T] or
    [B or 1, heads or 1, T, T]; causal adds the upper-triangle -inf; scale defaults to head_dim^-0.5.
    rows (int64 [B]): only query row rows[b] of each sequence, -> [B, 1, E], bit-identical to that
    row of the whole result (a pooled token's attention)."""
    _cpu_only("attention", qkv)
    return _ops.attention(qkv, num_heads, mask, causal, scale, rows)


def transformer_block(x: torch.Tensor, norms, eps_1: float, eps_2: float, linears, fmt: formats.WeightFormat | str,
                      group_size: int, num_heads: int, mask: torch.Tensor | None = None, causal: bool = False,
                      activation: str = "gelu") -> torch.Tensor:
    """A pre-LN transformer block x + attn(ln_1(x)), then + mlp(ln_2(x)), as one op: what
    ``layer_norm_quantize``, ``quantized_linear``, ``attention`` and ``quantize_per_token`` give in
    FusedBlock's chain, bit for bit. x [B, T, E] (float32 or bfloat16); norms: [ln_1 weight, ln_1 bias,
    ln_2 weight, ln_2 bias] (None: 1 or 0); linears: (weight, weight_scale, bias, tile_weight) of
    q|k|v, out_proj, fc1 and fc2, 16 entries, all of format `fmt` with activation groups `group_size`,
    their inputs quantized per token as they come; activation: fc1's ("gelu" or "quick_gelu")."""
    _cpu_only("transformer_block", x)
    fmt = formats.as_format(fmt)
    return _ops.transformer_block(x, list(norms), float(eps_1), float(eps_2), list(linears), fmt.name,
                                  group_size if fmt.grouped else 0, num_heads, mask, causal, activation)

