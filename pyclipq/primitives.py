"""The quantization math of pyclipq, once, on any device and dtype.

Scales, rounding to a format's levels, levels to codes, dequantization and per-token
activation quantization, exactly as docs/FORMATS.md defines them. The op references
(pyclipq.ops.reference), calibration (pyclipq.calibrate) and the fake-quant / QAT path
(pyclipq.train) all call these functions; none keeps a copy. Tensors stay on the device
they come on: QAT quantizes its weights where they live.

What a format *is* (bits, levels, offsets, layouts) is pyclipq.formats; this module only
computes with it.
"""
from __future__ import annotations

import torch

from . import formats
from .formats import WeightFormat

__all__ = [
    "safe_inverse",
    "quantize_activation_rows",
    "quantize_per_token",
    "format_scales",
    "nearest_levels",
    "codes_from_levels",
    "quantize_weight_with_scales",
    "quantize_weight",
    "dequantize_levels",
    "dequantize_codes",
]


def _fmt(fmt: str | WeightFormat) -> WeightFormat:
    return formats.get_format(fmt) if isinstance(fmt, str) else fmt


def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 where scale is 0 (an all-zero row or group quantizes to its zero code)."""
    return torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))


# ---------------------------------------------------------------- activations


def quantize_activation_rows(rows: torch.Tensor, act_scale: torch.Tensor | None = None):
    """float32 rows [M, K] -> (integer-valued float32 q [M, K], float32 scale [M]).

    Dynamic: the row's fp32 absmax, ``inv = 127 / absmax`` as a tensor / tensor division (a
    Python-scalar operand may be applied as a multiplication by its reciprocal, which rounds
    differently from the kernels); static: ``inv = 1 / S``. Then round half to even and
    clamp to [-127, 127].
    """
    absmax = rows.abs().amax(dim=1) if rows.shape[0] else rows.new_zeros(0)
    if act_scale is None:
        qmax = torch.full_like(absmax, float(formats.ACT_QMAX))
        inv = torch.where(absmax > 0, qmax / torch.where(absmax > 0, absmax, qmax), torch.zeros_like(absmax))
        scale = absmax / qmax
    else:
        s = act_scale.to(device=rows.device, dtype=torch.float32).reshape(())
        inv = torch.full_like(absmax, 1.0) / s
        scale = torch.full_like(absmax, 1.0) * s
    q = torch.clamp(torch.round(rows * inv[:, None]), -formats.ACT_QMAX, formats.ACT_QMAX)
    return q, scale


def quantize_per_token(x: torch.Tensor, group_size: int, act_scale: torch.Tensor | None = None):
    """x [..., K] -> (int8 q [M, K_pad], float32 scale [M], int32 group sums [M, G]): the
    activation format of docs/FORMATS.md, padding and group sums included."""
    k = x.shape[-1]
    k_pad = formats.padded_k(k)
    rows = x.reshape(-1, k).to(torch.float32)
    if rows.shape[0] and not bool(torch.isfinite(rows.abs().amax(dim=1)).all()):
        raise ValueError("x contains NaN or Inf")
    q_rows, scale = quantize_activation_rows(rows, act_scale)
    q = torch.zeros((rows.shape[0], k_pad), dtype=torch.int8, device=rows.device)
    q[:, :k] = q_rows.to(torch.int8)
    g = formats.num_groups(k_pad, group_size)
    sums = q.to(torch.int32).view(rows.shape[0], g, k_pad // g).sum(dim=2, dtype=torch.int32)
    return q, scale, sums


# ---------------------------------------------------------------- weights


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")


def _padded(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N, K_pad] on the weight's device, padding columns 0."""
    n, k = weight.shape
    w = torch.zeros((n, formats.padded_k(k)), dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.detach().to(torch.float32)
    return w


def format_scales(weight: torch.Tensor, fmt, group_size: int = 0, threshold_rule: str = "absmean") -> torch.Tensor:
    """The format's own scale rule: absmax / qmax per output channel or K group (over the padded
    row: padding is 0), or for a threshold-rule format (ternary) mean|w| over the true K, times 2
    for ``twice_mean``."""
    fmt = _fmt(fmt)
    _check_weight(weight)
    if fmt.threshold_rule:
        if threshold_rule not in formats.THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {formats.THRESHOLD_RULES}, got {threshold_rule!r}")
        mean_abs = weight.detach().to(torch.float32).abs().mean(dim=1)
        return (mean_abs if threshold_rule == "absmean" else 2.0 * mean_abs).contiguous()
    w = _padded(weight)
    n, k_pad = w.shape
    if not fmt.grouped:
        return (w.abs().amax(dim=1) / fmt.qmax).contiguous()
    formats.check_group_size(group_size)
    g = formats.num_groups(k_pad, group_size)
    return (w.view(n, g, k_pad // g).abs().amax(dim=2) / fmt.qmax).contiguous()


def nearest_levels(ratio: torch.Tensor, fmt) -> torch.Tensor:
    """w / s -> the format's nearest integer level (float tensor).

    Unit-step formats (int8, int4, ternary): ``clamp(round(r), -qmax, qmax)``. int2 (odd
    levels, LEVEL_MUL = 2): the nearest odd level, ``2 * clamp(round((r + 3) / 2), 0, 3) - 3``.
    """
    fmt = _fmt(fmt)
    if fmt.level_mul == 1:
        return torch.clamp(torch.round(ratio), -fmt.qmax, fmt.qmax)
    codes = torch.clamp(torch.round((ratio + fmt.level_offset) / fmt.level_mul), 0, fmt.max_code)
    return fmt.level_mul * codes - fmt.level_offset


def codes_from_levels(levels: torch.Tensor, fmt, k_pad: int | None = None) -> torch.Tensor:
    """Integer levels [N, K] -> unpacked codes [N, K_pad] in the format's code dtype, padding
    columns holding its pad code. The inverse of ``WeightFormat.level``."""
    fmt = _fmt(fmt)
    n, k = levels.shape
    k_pad = formats.padded_k(k) if k_pad is None else k_pad
    lv = torch.round(levels).to(torch.int32)
    if bool((lv.abs() > fmt.qmax).any()) or (fmt.level_mul == 2 and bool(((lv + fmt.level_offset) % 2).any())):
        raise ValueError(f"levels must be levels of format {fmt.name!r} (|level| <= {fmt.qmax}, step {fmt.level_mul})")
    codes = torch.full((n, k_pad), fmt.pad_code, dtype=fmt.code_dtype, device=levels.device)
    codes[:, :k] = ((lv + fmt.level_offset) // fmt.level_mul).to(fmt.code_dtype)
    return codes


def quantize_weight_with_scales(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Float weight [N, K] + scales ([N] or [N, G]) -> unpacked codes [N, K_pad]: each weight
    times the reciprocal of its scale, rounded to the nearest level."""
    fmt = _fmt(fmt)
    _check_weight(weight)
    n, k = weight.shape
    if not fmt.grouped and group_size != 0:
        raise ValueError(f"group_size must be 0 for format {fmt.name!r}, got {group_size}")
    expected = fmt.scale_shape(n, k, group_size)
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != expected:
        raise ValueError(f"scale must have shape {list(expected)} for format {fmt.name!r}, got {getattr(scale, 'shape', scale)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("scale must be finite and >= 0")
    w = _padded(weight)
    k_pad = w.shape[1]
    inverse = safe_inverse(scale.to(device=w.device, dtype=torch.float32))
    if fmt.grouped:
        g = scale.shape[1]
        ratio = (w.view(n, g, k_pad // g) * inverse[:, :, None]).view(n, k_pad)
    else:
        ratio = w * inverse[:, None]
    return codes_from_levels(nearest_levels(ratio[:, :k], fmt), fmt, k_pad)


def quantize_weight(
    weight: torch.Tensor,
    fmt: str | WeightFormat,
    group_size: int = 0,
    threshold_rule: str = "absmean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [N, K] -> (unpacked codes [N, K_pad], float32 scales), by the format's rule.

    Scales are [N] for per-channel formats and [N, G] for grouped ones (int4, int2); the
    tensors stay on the weight's device.
    """
    fmt = _fmt(fmt)
    group_size = group_size if fmt.grouped else 0
    scale = format_scales(weight, fmt, group_size, threshold_rule)
    return quantize_weight_with_scales(weight, fmt, scale, group_size).contiguous(), scale


def dequantize_levels(levels: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Integer levels [N, K_pad] (float32) + scales [N] or [N, G] -> float32 weight [N, K]."""
    n, k_pad = levels.shape
    g = 1 if scale.dim() == 1 else scale.shape[1]
    w = (levels.view(n, g, k_pad // g) * scale.reshape(n, g, 1)).view(n, k_pad)
    return w[:, :k]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, fmt: str | WeightFormat, k: int) -> torch.Tensor:
    """Unpacked codes [N, K_pad] + scales -> float32 weight [N, K] (what the kernels multiply by)."""
    return dequantize_levels(_fmt(fmt).level(codes).to(torch.float32), scale, k)
