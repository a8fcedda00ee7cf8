"""Fake quantization for QAT: the kernels' integer math in float, with straight-through gradients.

Nothing here defines a format or its math. Weights go through ``primitives.quantize_weight``
and ``WeightFormat.level``, activations through ``primitives.quantize_activation_rows`` (the
rows of ``ops.reference.quantize_per_token``, which is primitives' too), on the device the
tensors are on: no CPU round trip per step.

Two ways to compute a fake-quant linear, both with the same straight-through
gradients (those of ``F.linear(x_fq, w_fq)``, x_fq and w_fq being the dequantized
activations and weight):

- ``exact=True`` (default): the integer accumulators are formed in float32 from
  integer-valued operands (|q| <= 127, |level| <= 127), where every product and
  partial sum is an integer below 2**24 and therefore exact in any summation order
  (K is split into chunks when a chunk could pass 2**24); then the float64
  epilogue of ``ops.reference``. The output is bit-identical to
  ``ops.reference.<format>_linear``, so a converted model differs from its
  fake-quant twin only by the kernels' own epilogue rounding.
- ``exact=False``: ``F.linear`` on the dequantized operands. Faster for grouped
  formats (no [M, N, G] accumulator tensor) and autocast-friendly (bf16). It
  differs from the exact result only by float rounding; ``linear_match_tolerance``
  bounds the difference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..configs import LayerConfig
from ..nn.attention import QuantMultiheadAttention, check_replaceable
from ..nn.linear import QuantLinear, rotate_input_dim, static_act_scale
from ..nn.packed import unpack_codes
from ..nn.parameter import LAYOUTS, to_rows
from ..ops import reference
from ..primitives import (
    dequantize_levels,
    format_scales,
    grid_distance,
    learnable_fake_quantize,
    quantize_activation_rows,
    quantize_weight_levels,
    rotation_block,
)

# Largest |integer accumulator| that float32 holds exactly (its 24-bit significand).
_FP32_EXACT_INT = 2**24


def _check_layer(layer, rotation: bool = False) -> LayerConfig:
    """`layer`, refused when its input transform has no fake-quant twin here: smoothing never (its
    scales come from calibration data, not from training), rotation where `rotation` is False."""
    if not isinstance(layer, LayerConfig):
        raise ValueError(f"layer must be a pyclipq.configs.LayerConfig, got {type(layer).__name__}")
    if layer.smoothing != "none" or (layer.rotation and not rotation):
        # training would not match the export
        supported = "rotation, not smoothing" if rotation else "neither smoothing nor rotation"
        raise ValueError(
            f"layer: this fake-quant module does not support input transforms "
            f"(smoothing={layer.smoothing!r}, rotation={layer.rotation}; it models {supported}); train without "
            "them or use them in post-training calibration only"
        )
    return layer


# ---------------------------------------------------------------- activations


def _clip_mask(rows: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor | None:
    """Where a static scale clips (|x / S| beyond the last level): the STE passes no gradient there.

    Dynamic scales come from the row's own absmax, so nothing clips and no mask is needed.
    """
    if act_scale is None:
        return None
    limit = (formats.ACT_QMAX + 0.5) * act_scale.to(device=rows.device, dtype=torch.float32).reshape(())
    return rows.abs() <= limit


class _FakeQuantActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act_scale):
        k = x.shape[-1]
        rows = x.reshape(-1, k).to(torch.float32)
        q, scale = quantize_activation_rows(rows, act_scale)
        mask = _clip_mask(rows, act_scale)
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return (q * scale[:, None]).to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.has_mask:
            return grad, None
        (mask,) = ctx.saved_tensors
        return grad * mask.reshape(grad.shape).to(grad.dtype), None


def fake_quantize_activation(x: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 fake quantization (dequantized values) with a straight-through gradient."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the K features of each token)")
    return _FakeQuantActivation.apply(x, act_scale)


# ---------------------------------------------------------------- weights


class QuantizedWeight:
    """One weight's codes as the kernels see them: integer levels [N, K_pad] and scales."""

    __slots__ = ("levels", "scale", "format", "in_features")

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int):
        self.levels = levels  # float32, integer-valued, K padded with the pad code's level
        self.scale = scale  # float32 [N] or [N, G]
        self.format = fmt
        self.in_features = in_features

    @property
    def groups(self) -> int:
        return 1 if self.scale.dim() == 1 else self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: exactly primitives.dequantize_codes of these codes."""
        return dequantize_levels(self.levels, self.scale, self.in_features)


def quantize_weight_codes(weight: torch.Tensor, layer: LayerConfig, scale: torch.Tensor | None = None) -> QuantizedWeight:
    """primitives.quantize_weight of `weight` (no gradient), as integer levels, on the weight's device;
    at `scale` (primitives.quantize_weight_with_scales) when given, else at the format rule's scales."""
    fmt, weight = layer.spec, weight.detach()
    group_size = layer.group_size if fmt.grouped else 0
    if scale is None:
        scale = format_scales(weight, fmt, group_size, layer.threshold_rule)
    scale = scale.detach().to(torch.float32)
    return QuantizedWeight(quantize_weight_levels(weight, fmt, scale, group_size), scale, layer.format, weight.shape[1])


def codes_to_quantized(codes: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int, device=None) -> QuantizedWeight:
    """Unpacked codes [N, K_pad] (primitives.quantize_weight's layout) + scales -> QuantizedWeight."""
    f = formats.as_format(fmt)
    device = device if device is not None else codes.device
    levels = f.level(codes.to(device)).to(torch.float32)
    return QuantizedWeight(levels, scale.to(device=device, dtype=torch.float32), fmt, in_features)


class _StraightThrough(torch.autograd.Function):
    """Returns `quantized` in the forward pass; the gradient goes to `latent` unchanged."""

    @staticmethod
    def forward(ctx, latent, quantized):
        return quantized.to(latent.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_weight(weight: torch.Tensor, layer: LayerConfig) -> torch.Tensor:
    """dequantize_codes(*quantize_weight(weight)) with a straight-through gradient to `weight`."""
    _check_layer(layer)
    if layer.is_float:
        return weight
    return _StraightThrough.apply(weight, quantize_weight_codes(weight, layer).dequantize())


# ---------------------------------------------------------------- the exact integer path


@functools.lru_cache(maxsize=None)
def _chunk_limit(fmt: str) -> int:
    """Largest K chunk (a multiple of the K block) whose int accumulator stays exact in float32."""
    f = formats.as_format(fmt)
    limit = _FP32_EXACT_INT // (formats.ACT_QMAX * f.max_abs_level)
    return max(formats.K_BLOCK, limit // formats.K_BLOCK * formats.K_BLOCK)


def integer_accumulators(q: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """sum_{k in group} level[n, k] * q[m, k] as float64 [M, N, G], exact.

    Computed with float32 matrix products of integer-valued operands: every product
    and partial sum is an integer of magnitude < 2**24 within a chunk, hence exact
    whatever order the BLAS sums in; chunks are added in float64 (exact below 2**53).
    """
    m, k = q.shape
    n, k_pad = qw.levels.shape
    g = qw.groups
    kg = k_pad // g
    if k < k_pad:
        q = F.pad(q, (0, k_pad - k))  # padded activations are 0 (docs/FORMATS.md)
    chunk = min(kg, _chunk_limit(qw.format))
    qg = q.view(m, g, kg).transpose(0, 1)  # [G, M, Kg]
    wg = qw.levels.view(n, g, kg).permute(1, 2, 0)  # [G, Kg, N]
    acc = None
    for start in range(0, kg, chunk):
        part = torch.bmm(qg[:, :, start : start + chunk], wg[:, start : start + chunk]).to(torch.float64)
        acc = part if acc is None else acc + part
    return acc.permute(1, 2, 0)  # [M, N, G]


class _ExactFakeQuantLinear(torch.autograd.Function):
    """y = ops.reference.<format>_linear(x, codes of w) bit for bit; STE gradients as F.linear(x_fq, w_fq)."""

    @staticmethod
    def forward(ctx, x, weight, bias, qw: QuantizedWeight, act_scale):
        k = x.shape[-1]
        rows = x.reshape(-1, k).to(torch.float32)
        q, scale = quantize_activation_rows(rows, act_scale)
        acc = integer_accumulators(q, qw)
        n = qw.levels.shape[0]
        # The reference epilogue itself (float64, then the input's dtype): the same math by construction.
        y = reference._epilogue(x, acc, scale, qw.scale, bias, n)
        mask = _clip_mask(rows, act_scale)
        ctx.save_for_backward(q.to(torch.int8), scale, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        ctx.qw = qw
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        q, scale, mask = ctx.saved_tensors
        n = ctx.qw.levels.shape[0]
        g = grad.reshape(-1, n).to(torch.float32)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ ctx.qw.dequantize()
            if ctx.has_mask:
                grad_x = grad_x * mask.to(grad_x.dtype)
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_fq = q.to(torch.float32) * scale[:, None]
            grad_w = (g.t() @ x_fq).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def check_blend(blend) -> float:
    """`blend` as a float in [0, 1], or a ValueError naming it."""
    if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not (0.0 <= blend <= 1.0):
        raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
    return float(blend)


def blend_quantized(weight: torch.Tensor, quantized: torch.Tensor, blend: float) -> torch.Tensor:
    """weight + blend x (quantized - weight): the share `blend` of the quantization error, for
    progressive quantization (1: the quantized weight itself, returned as is). `quantized` carries
    its own straight-through gradient to `weight`, so the latent's gradient stays the STE's."""
    return quantized if blend >= 1.0 else torch.lerp(weight, quantized.to(weight.dtype), blend)


def fake_quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    qw: QuantizedWeight,
    layer: LayerConfig,
    act_scale: torch.Tensor | None = None,
    exact: bool = True,
    blend: float = 1.0,
) -> torch.Tensor:
    """A linear layer as the kernels compute it, from the codes `qw` of `weight` (STE to `weight`).

    blend < 1 (progressive quantization) applies that share of the weight's quantization error
    (`blend_quantized`) on the float path: no longer a model the kernels run, so not exact."""
    if layer.activation == "none":
        # Weight-only: QuantLinear dequantizes and runs F.linear in x's dtype; so do we.
        w = blend_quantized(weight, _StraightThrough.apply(weight, qw.dequantize()), blend).to(x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    if layer.activation == "static" and act_scale is None:
        raise RuntimeError("act_scale: a static-activation layer needs its calibrated scale before it can run")
    if exact and blend >= 1.0:
        # Autocast would round the integer products' outputs to bf16: the exact path runs in fp32/fp64.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _ExactFakeQuantLinear.apply(x, weight, bias, qw, act_scale)
    x_fq = _FakeQuantActivation.apply(x, act_scale)
    w_fq = blend_quantized(weight, _StraightThrough.apply(weight, qw.dequantize()), blend)
    return F.linear(x_fq, w_fq, bias)


def linear_match_tolerance(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, act_scale=None):
    """Per-element bound on |fake-quant float path - exact integer result| for one linear, fp32.

    Both sides compute sum_k a_k b_k + bias with a_k = q_k s_m, b_k = level_k s_w (the same
    reals). The float path rounds a_k and b_k (2 roundings), accumulates K products in
    some order (<= K roundings, FMA or not: the classic gamma_K bound), and adds the bias
    (1 rounding): at most (K + 3) roundings, each <= u = 2**-24 relative to the magnitude
    M = sum_k |a_k b_k| + |bias|. A fused kernel instead rounds its (G + 4) epilogue steps
    (tests/helpers.py), again relative to at most M. So one bound covers "float path vs
    exact" and "exact vs kernel" alike:

        |difference| <= (K + G + 7) * 2**-23 * M

    where 2**-23 (= 2u) leaves a factor-two margin for rounding the first-order bound.
    A wrong level, scale or activation rounding moves an output by a whole quantization
    step (~M / 127), far outside this bound, so a test against it can fail.
    """
    k = x.shape[-1]
    rows = x.reshape(-1, k).to(torch.float64)
    q, scale = quantize_activation_rows(rows.to(torch.float32), act_scale)
    a = (q.to(torch.float64) * scale.to(torch.float64)[:, None]).abs()
    b = qw.dequantize().to(torch.float64).abs()
    magnitude = a @ b.t()
    if bias is not None:
        magnitude = magnitude + bias.detach().to(torch.float64).abs()
    steps = k + qw.groups + 7
    return (steps * 2.0**-23 * magnitude).reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------- modules


class _WeightCache:
    """Caches a latent weight's codes until the weight changes (eval loops re-use them).

    Keyed on the tensor's version counter (bumped by every in-place update, the
    optimizer's included), its storage and its device.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, weight: torch.Tensor, layer: LayerConfig, scale: torch.Tensor | None = None,
            block: int = 1) -> QuantizedWeight:
        """The format rule's codes of `weight`, or with `scale` given (learned scales) its codes at those
        scales; of `weight` rotated by blocks of `block` (nn.linear.rotate_input_dim) when block > 1."""
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, layer, block,
               None if scale is None else (scale._version, scale.data_ptr()))
        if key != self.key:
            self.value = quantize_weight_codes(rotate_input_dim(weight.detach(), block), layer, scale)
            self.key = key
        return self.value


class FakeQuantLinear(nn.Linear):
    """An nn.Linear whose forward computes what ``QuantLinear`` will, with STE gradients.

    The float ``weight`` (the latent weight) is what trains; every forward quantizes it
    with ``primitives.quantize_weight`` and runs the kernels' math (see the module doc).
    It stays an ``nn.Linear`` so code that reads ``.weight`` (open_clip's
    ``get_cast_dtype``) and optimizers see the same parameters as before ``prepare``.

    A frozen twin of a ``QuantLinear`` (``from_quant_linear``) keeps that layer's own
    codes and scales (say, OMSE-clipped ones) instead of re-quantizing: gradients flow
    to its input only, as P4Q needs for prompt tuning through a PTQ text tower.

    learn_scales: the weight scales are Parameters too (LSQ), ``log_scale`` (their log, so that
    a step changes a scale by a ratio, whatever its size), started at the format rule's scales
    of the weight when the module is made; the codes are each weight's nearest level at its
    learned scale (``primitives.learnable_fake_quantize``), which ``convert_qat`` packs with
    those scales. Float path only (exact=False).

    A layer with a rotation (LayerConfig.rotation) keeps its latent weight W unrotated, as the
    float model has it: every forward quantizes rotate(W) and multiplies rotate(x), as QuantLinear
    stores and runs them (`nn.linear.rotate_input_dim`, the very op: a last-bit difference in x
    would flip activation roundings at export), so the STE gradient
    reaches W through the rotation and `convert_qat` packs the codes trained.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, layer: LayerConfig, exact: bool = True,
                 learn_scales: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.layer = _check_layer(layer, rotation=True)
        self.rotation_block = rotation_block(in_features, layer.rotation) if layer.rotation else 1
        self.exact = bool(exact)
        if learn_scales and (layer.is_float or self.exact):
            raise ValueError("learn_scales needs a quantized layer and the float fake-quant path (exact=False): "
                             f"got format={layer.format!r}, exact={exact}")
        self.log_scale = None
        if learn_scales:
            shape = layer.spec.scale_shape(out_features, in_features, layer.group_size)
            self.log_scale = nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device))
            if self.weight.device.type != "meta":  # from_parameters sets the weight, then the scales
                self.reset_scales_()
        if layer.activation == "static":
            # 0 marks "not calibrated yet", as in QuantLinear.
            self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("act_scale", None)
        self._frozen: QuantizedWeight | None = None
        self._cache = _WeightCache()
        self.blend = 1.0  # the share of the quantization error applied (set_blend); 1 but in progressive QAT

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer: LayerConfig, exact: bool = True) -> "FakeQuantLinear":
        """Wrap `linear`, sharing its weight and bias Parameters (optimizers keep working)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls.from_parameters(linear.weight, linear.bias, layer, exact)

    @classmethod
    def from_parameters(cls, weight: nn.Parameter, bias: nn.Parameter | None, layer: LayerConfig, exact: bool = True,
                        learn_scales: bool = False) -> "FakeQuantLinear":
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, layer=layer, exact=exact, learn_scales=learn_scales,
                     device="meta", dtype=weight.dtype)
        module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if learn_scales:
            module.log_scale = nn.Parameter(torch.empty_like(module.log_scale, device=weight.device))
            module.reset_scales_()
        if bias is not None:
            module.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        if module.act_scale is not None:
            module.act_scale = torch.zeros((), dtype=torch.float32, device=weight.device)
        return module

    @classmethod
    def from_quant_linear(cls, qlinear, exact: bool = True) -> "FakeQuantLinear":
        """A differentiable (w.r.t. its input) twin of a ``pyclipq.nn.QuantLinear``, same codes."""
        if not isinstance(qlinear, QuantLinear):
            raise ValueError(f"qlinear must be a pyclipq QuantLinear, got {type(qlinear).__name__}")
        layer = qlinear.layer
        _check_layer(layer)  # before dequantizing: a transformed layer has no frozen fake-quant twin
        weight = qlinear.dequantize_weight(torch.float32)
        bias = qlinear.bias.detach().clone() if qlinear.bias is not None else None
        module = cls.from_parameters(nn.Parameter(weight, requires_grad=False), None if bias is None else nn.Parameter(bias, requires_grad=False), layer, exact)
        if not layer.is_float:
            codes = unpack_codes(qlinear.packed_weight, layer.format)
            module._frozen = codes_to_quantized(codes, qlinear.weight_scale, layer.format, qlinear.in_features)
        if qlinear.act_scale is not None and module.act_scale is not None:
            module.act_scale = qlinear.act_scale.detach().clone()
        return module

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    def set_blend(self, blend: float) -> None:
        """Apply the share `blend` in [0, 1] of the weight's quantization error (`blend_quantized`):
        1, the default, is the quantized layer the export packs; less only while progressive
        quantization (recipes.ProgressiveQuantization) brings the layer in."""
        self.blend = check_blend(blend)

    @property
    def int8_original_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @torch.no_grad()
    def set_act_scale(self, scale) -> None:
        scale = static_act_scale(self.layer, scale)  # before touching act_scale: None on a dynamic layer
        self.act_scale.copy_(scale)

    def _act_scale(self) -> torch.Tensor | None:
        if self.layer.activation != "static":
            return None
        if not bool(self.act_scale > 0):
            raise RuntimeError("act_scale: this static-activation FakeQuantLinear is not calibrated yet (call set_act_scale)")
        return self.act_scale

    @torch.no_grad()
    def reset_scales_(self) -> None:
        """Learned scales back to the format rule's scales of the latent weight as it is now."""
        if self.log_scale is None:
            raise ValueError("reset_scales_: this FakeQuantLinear does not learn its scales (learn_scales=False)")
        # all-zero rows or groups (scale 0) get a tiny scale: their weights still quantize to 0
        scale = format_scales(self.stored_weight().detach(), self.layer.spec, self.layer.group_size,
                              self.layer.threshold_rule)
        self.log_scale.copy_(scale.clamp_min(1e-12).log())

    def stored_weight(self) -> torch.Tensor:
        """The weight the codes quantize, as QuantLinear stores it: the latent, rotated when the layer
        has a rotation (differentiable)."""
        return rotate_input_dim(self.weight, self.rotation_block)

    def learned_scale(self) -> torch.Tensor | None:
        """The learned weight scales (exp of log_scale), or None when the format rule sets them."""
        return self.log_scale.exp() if self.log_scale is not None else None

    def grid_distance(self) -> torch.Tensor:
        """`primitives.grid_distance` of the weight the codes quantize (`stored_weight`) at the scales
        it quantizes with (learned, or the format rule's of the latent as it is now): 0 for a float
        or frozen layer, whose latent weight does not train. Differentiable in the latent weight."""
        if self.layer.is_float or self._frozen is not None:
            return torch.zeros((), dtype=torch.float32, device=self.weight.device)
        weight = self.stored_weight()
        group_size = self.layer.group_size if self.layer.spec.grouped else 0
        scale = self.learned_scale()
        if scale is None:
            scale = format_scales(weight.detach(), self.layer.spec, group_size, self.layer.threshold_rule)
        return grid_distance(weight, self.layer.spec, scale, group_size)

    def quantized_weight(self) -> QuantizedWeight:
        """The codes this layer computes with right now."""
        if self._frozen is not None:
            if self._frozen.levels.device != self.weight.device:
                f = self._frozen
                self._frozen = QuantizedWeight(f.levels.to(self.weight.device), f.scale.to(self.weight.device), f.format, f.in_features)
            return self._frozen
        if self.log_scale is not None:
            return self._cache.get(self.weight, self.layer, self.learned_scale(), self.rotation_block)
        return self._cache.get(self.weight, self.layer, block=self.rotation_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)

    def forward_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Only output features [start, stop): one of q, k, v of a packed attention in_proj (as QuantLinear's)."""
        return self._linear(x, slice(start, stop))

    def _linear(self, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.layer.is_float:
            if rows is not None:
                weight, bias = weight[rows], (bias[rows] if bias is not None else None)
            return F.linear(x, weight, bias)
        if self.log_scale is not None:
            return self._learned_scale_linear(x, rows)
        qw = self.quantized_weight()
        if self.rotation_block > 1:
            x, weight = rotate_input_dim(x, self.rotation_block), self.stored_weight()
        if rows is not None:
            weight, bias = weight[rows], (bias[rows] if bias is not None else None)
            qw = QuantizedWeight(qw.levels[rows], qw.scale[rows], qw.format, qw.in_features)
        return fake_quant_linear(x, weight, bias, qw, self.layer, self._act_scale(), self.exact, self.blend)

    def _learned_scale_linear(self, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
        weight, bias, scale = self.stored_weight(), self.bias, self.learned_scale()
        x = rotate_input_dim(x, self.rotation_block)
        if rows is not None:
            weight, bias, scale = weight[rows], (bias[rows] if bias is not None else None), scale[rows]
        w_fq = learnable_fake_quantize(weight, self.layer.spec, scale, self.layer.group_size)
        w_fq = blend_quantized(weight, w_fq, self.blend).to(x.dtype)
        if self.layer.activation == "none":  # weight-only: QuantLinear runs F.linear in x's dtype
            return F.linear(x, w_fq, bias.to(x.dtype) if bias is not None else None)
        return F.linear(_FakeQuantActivation.apply(x, self._act_scale()), w_fq, bias)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, format={self.layer.format}"
        if self.layer.spec is not None and self.layer.spec.grouped:
            text += f", group_size={self.layer.group_size}"
        if self.layer.spec is not None and self.layer.spec.threshold_rule:
            text += f", threshold_rule={self.layer.threshold_rule}"
        text += f", activation={self.layer.activation}, exact={self.exact}"
        if self.rotation_block > 1:
            text += f", rotation={self.rotation_block}"
        if self.log_scale is not None:
            text += ", learn_scales"
        return text + (", frozen" if self.frozen else "")


class FakeQuantParameter(nn.Module):
    """A parametrization: a weight-only fake-quantized view of a bare Parameter (STE).

    For tensors CLIP uses directly (``x @ visual.proj``, embedding tables, the patch
    convolution): ``layout`` says how the tensor maps to [out_features, in_features]
    rows, as ``pyclipq.nn.parameter.PackedParameter`` does ("in_out": P [in, out] used
    as ``x @ P``; "out_rows": [out, ...]).
    """

    def __init__(self, layout: str, layer: LayerConfig):
        super().__init__()

        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.layout = layout
        self.layer = _check_layer(layer).weight_only()
        self._cache = _WeightCache()
        self.blend = 1.0  # as FakeQuantLinear's

    def set_blend(self, blend: float) -> None:
        """As FakeQuantLinear.set_blend."""
        self.blend = check_blend(blend)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        rows = to_rows(original, self.layout)
        if self.layer.is_float:
            return original
        qw = self._cache.get(rows, self.layer)
        fq = blend_quantized(rows, _StraightThrough.apply(rows, qw.dequantize()), self.blend)
        return fq.t() if self.layout == "in_out" else fq.reshape(original.shape)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, format={self.layer.format}"


def fake_quant_multihead_attention(mha: nn.MultiheadAttention, in_layer: LayerConfig, out_layer: LayerConfig,
                                   exact: bool = True) -> QuantMultiheadAttention:
    """`mha` as a QuantMultiheadAttention with FakeQuantLinear projections sharing its Parameters.

    The packed in_proj's rows are quantized as one [3E, E] weight: every format's scales are
    per output row (and per K group), so that is the same as quantizing q, k and v apart.
    ``float_module`` keeps `mha` to put back (``pyclipq.train.qat.strip``).
    """
    check_replaceable(mha)
    in_proj = FakeQuantLinear.from_parameters(mha.in_proj_weight, mha.in_proj_bias, in_layer, exact)
    out_proj = FakeQuantLinear.from_parameters(mha.out_proj.weight, mha.out_proj.bias, out_layer, exact)
    return QuantMultiheadAttention.with_projections(mha, in_proj, out_proj)
