"""The one place where pyclipq's torch.library schemas are defined, each with its fake.

C++ (csrc/cpu, csrc/cuda) only registers implementations (TORCH_LIBRARY_IMPL).
Fakes do no data access, so torch.compile(fullgraph=True) and torch.export trace
through every op. The shapes follow docs/FORMATS.md.
"""
from __future__ import annotations

import torch

from .. import formats

NAMESPACE = "pyclipq"
lib = torch.library.Library(NAMESPACE, "DEF")

SCHEMAS = {
    # activations
    "quantize_per_token": "quantize_per_token(Tensor x, int group_size, Tensor? act_scale=None) -> (Tensor, Tensor, Tensor)",
    # integer GEMMs (int32 out, for other projects to fuse)
    "int8_gemm": "int8_gemm(Tensor x_q, Tensor weight) -> Tensor",
    "int4_gemm": "int4_gemm(Tensor x_q, Tensor x_sums, Tensor weight, int group_size) -> Tensor",
    "int2_gemm": "int2_gemm(Tensor x_q, Tensor x_sums, Tensor weight, int group_size) -> Tensor",
    "ternary_gemm": "ternary_gemm(Tensor x_q, Tensor x_sums, Tensor weight) -> Tensor",
    # fused linears: float in -> quantize -> integer GEMM -> dequantize -> + bias -> float out.
    # tile_weight (CPU): the same weight in the tile layout (formats.tile_layout), which the AMX
    # table reads instead of repacking per call; the other tables and devices take None.
    "int8_linear": "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, Tensor? act_scale=None, Tensor? tile_weight=None) -> Tensor",
    "int4_linear": "int4_linear(Tensor x, Tensor weight, Tensor weight_scale, int group_size, Tensor? bias=None, Tensor? act_scale=None, Tensor? tile_weight=None) -> Tensor",
    "int2_linear": "int2_linear(Tensor x, Tensor weight, Tensor weight_scale, int group_size, Tensor? bias=None, Tensor? act_scale=None, Tensor? tile_weight=None) -> Tensor",
    "ternary_linear": "ternary_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, Tensor? act_scale=None, Tensor? tile_weight=None) -> Tensor",
    # packing (block-planar codes; base-3 trits)
    "pack_codes": "pack_codes(Tensor codes, int bits) -> Tensor",
    "unpack_codes": "unpack_codes(Tensor packed, int bits) -> Tensor",
    "pack_trits": "pack_trits(Tensor codes, int k) -> Tensor",
    "unpack_trits": "unpack_trits(Tensor packed, int k) -> Tensor",
    # input rotation (QuantLinear's LayerConfig.rotation): x times diag(H_b, ..., H_b), H_b orthonormal
    "hadamard_rotate": "hadamard_rotate(Tensor x, int block) -> Tensor",
    # transformer-block ops (CPU): LayerNorm -> [rotation] -> per-token quantization in one pass;
    # a linear on quantized activations with an activation, a residual and the output dtype in its
    # epilogue; the multi-head self-attention core on the packed q | k | v projections
    "layer_norm_quantize": "layer_norm_quantize(Tensor x, Tensor? weight, Tensor? bias, float eps, int group_size, int rotation_block=1, Tensor? act_scale=None) -> (Tensor, Tensor, Tensor)",
    "quantized_linear": "quantized_linear(Tensor x_q, Tensor x_scale, Tensor x_sums, Tensor weight, Tensor weight_scale, str format, int group_size, Tensor? bias=None, Tensor? tile_weight=None, str activation=\"none\", Tensor? residual=None, ScalarType? out_dtype=None) -> Tensor",
    "attention": "attention(Tensor qkv, int num_heads, Tensor? mask=None, bool causal=False, float? scale=None, Tensor? rows=None) -> Tensor",
    # a whole pre-LN block as the chain of the three ops above (nn/fused_block.py), for blocks whose
    # linears share one format and plain dynamic quantization: norms = ln_1 weight, bias, ln_2
    # weight, bias; linears = (weight, weight_scale, bias, tile_weight) of q|k|v, out_proj, fc1, fc2
    "transformer_block": "transformer_block(Tensor x, Tensor?[] norms, float eps_1, float eps_2, Tensor?[] linears, str format, int group_size, int num_heads, Tensor? mask=None, bool causal=False, str activation=\"gelu\") -> Tensor",
}

# quantized_linear's `activation`: GELU in its erf form, QuickGELU x sigmoid(1.702 x)
EPILOGUE_ACTIVATIONS = ("none", "gelu", "quick_gelu")

# The transformer-block ops have CPU kernels only (the fused block is a CPU path; on GPUs the
# unfused modules run): no CUDA kernel and no Triton twin.
CPU_ONLY = frozenset({"layer_norm_quantize", "quantized_linear", "attention", "transformer_block"})

for _schema in SCHEMAS.values():
    lib.define(_schema)

def _check_same_device(op, x, **tensors):
    # A meta/fake tensor among real ones dispatches here: fail as the kernels would.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"pyclipq.{op}: {name} is on {t.device} but x is on {x.device}")


def _groups_from_weight(k_pad, group_size):
    return 1 if group_size == 0 else k_pad // group_size


@torch.library.register_fake(f"{NAMESPACE}::quantize_per_token")
def _(x, group_size, act_scale=None):
    k_pad = formats.padded_k(x.shape[-1]) if x.shape[-1] > 0 else 0
    m = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    g = _groups_from_weight(k_pad, group_size)
    return (
        x.new_empty((m, k_pad), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        x.new_empty((m, g), dtype=torch.int32),
    )


@torch.library.register_fake(f"{NAMESPACE}::int8_gemm")
def _(x_q, weight):
    _check_same_device("int8_gemm", x_q, weight=weight)
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=torch.int32)


def _lowbit_gemm_fake(bits):
    def fake(x_q, x_sums, weight, group_size):
        k_pad = weight.shape[1] * (8 // bits)
        return x_q.new_empty((x_q.shape[0], weight.shape[0], _groups_from_weight(k_pad, group_size)), dtype=torch.int32)

    return fake


torch.library.register_fake(f"{NAMESPACE}::int4_gemm")(_lowbit_gemm_fake(4))
torch.library.register_fake(f"{NAMESPACE}::int2_gemm")(_lowbit_gemm_fake(2))


@torch.library.register_fake(f"{NAMESPACE}::ternary_gemm")
def _(x_q, x_sums, weight):
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=torch.int32)


def _linear_fake(x, weight, weight_scale, *args, **kwargs):
    _check_same_device("linear", x, weight=weight, weight_scale=weight_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


for _name in ("int8_linear", "int4_linear", "int2_linear", "ternary_linear"):
    torch.library.register_fake(f"{NAMESPACE}::{_name}")(_linear_fake)


@torch.library.register_fake(f"{NAMESPACE}::pack_codes")
def _(codes, bits):
    return codes.new_empty((codes.shape[0], codes.shape[1] * bits // 8), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::unpack_codes")
def _(packed, bits):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 8 // bits), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::pack_trits")
def _(codes, k):
    return codes.new_empty((codes.shape[0], -(-k // formats.TRITS_PER_BYTE)), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::unpack_trits")
def _(packed, k):
    return packed.new_empty((packed.shape[0], formats.padded_k(k)), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::layer_norm_quantize")
def _(x, weight, bias, eps, group_size, rotation_block=1, act_scale=None):
    return torch.ops.pyclipq.quantize_per_token.default(x, group_size, act_scale)


@torch.library.register_fake(f"{NAMESPACE}::quantized_linear")
def _(x_q, x_scale, x_sums, weight, weight_scale, format, group_size, bias=None, tile_weight=None,
      activation="none", residual=None, out_dtype=None):
    _check_same_device("quantized_linear", x_q, weight=weight, weight_scale=weight_scale, residual=residual)
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=out_dtype or torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::attention")
def _(qkv, num_heads, mask=None, causal=False, scale=None, rows=None):
    return qkv.new_empty((qkv.shape[0], 1 if rows is not None else qkv.shape[1], qkv.shape[2] // 3))


@torch.library.register_fake(f"{NAMESPACE}::transformer_block")
def _(x, norms, eps_1, eps_2, linears, format, group_size, num_heads, mask=None, causal=False, activation="gelu"):
    _check_same_device("transformer_block", x, **{f"linears[{i}]": t for i, t in enumerate(linears)})
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::hadamard_rotate")
def _(x, block):
    return torch.empty_like(x)


def _not_differentiable(name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pyclipq.{name} has no gradient: the packed kernels are for inference. "
            "Train with pyclipq.train (fake-quant modules with straight-through estimators)."
        )

    return backward


# An explicit autograd registration: calling an op on tensors that require grad (e.g.
# inside a model whose float parameters do) neither warns nor silently drops the graph;
# backpropagating through it raises the error above.
for _name in SCHEMAS:
    if _name != "hadamard_rotate":
        torch.library.register_autograd(f"{NAMESPACE}::{_name}", _not_differentiable(_name))


def register_rotation_gradient(op_name: str) -> None:
    """Give the rotation op `op_name` (a hadamard_rotate: x H per block, H = H^T = H^-1) its gradient:
    the same rotation of the incoming gradient, by the op itself. QAT rotates activations with the
    op so that its forward gives the very floats the packed layer quantizes."""
    namespace, name = op_name.split("::")

    def setup_context(ctx, inputs, output):
        ctx.block = inputs[1]

    def backward(ctx, grad):
        return getattr(getattr(torch.ops, namespace), name)(grad.contiguous(), ctx.block), None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


register_rotation_gradient(f"{NAMESPACE}::hadamard_rotate")
