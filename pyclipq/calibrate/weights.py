"""Weight codes from given scales or given levels, in the formats of pyclipq.formats.

`formats.quantize_weight` is the format's own rule (absmax / qmax per group, or the
ternary threshold rule). Calibration needs two variants that the format spec allows
but that rule does not produce:

- scales chosen by an observer (OMSE-clipped, percentile-clipped), then the codes
  those scales give: `quantize_weight_with_scales`, `observed_weight_scales`;
- codes chosen by error-compensating rounding (GPTQ), one column at a time:
  `nearest_levels` + `codes_from_levels`.

Nothing here defines a layout: the levels and codes come from each format's
``qmax``, ``level_mul``, ``level_offset`` and ``pad_code``, and with the format's own
scales `quantize_weight_with_scales` reproduces `formats.quantize_weight` exactly
(tests/test_observers.py checks it).
"""
from __future__ import annotations

import torch

from .. import formats
from ..formats import WeightFormat
from .observers import Grid, make_observer

__all__ = [
    "nearest_levels",
    "codes_from_levels",
    "quantize_weight_with_scales",
    "observed_weight_scales",
    "quantize_weight_observed",
    "load_quantized_weight",
]


def _fmt(fmt) -> WeightFormat:
    return formats.get_format(fmt) if isinstance(fmt, str) else fmt


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    # The same reciprocal formats.quantize_weight multiplies by (1/s, 0 where s = 0), so ties
    # round identically.
    return torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))


def nearest_levels(ratio: torch.Tensor, fmt) -> torch.Tensor:
    """w / s -> the format's nearest integer level (float tensor), as formats.quantize_weight rounds.

    Unit-step formats (int8, int4, ternary): ``clamp(round(r), -qmax, qmax)``. int2 (odd
    levels, LEVEL_MUL = 2): the nearest odd level, ``2 * clamp(round((r + 3) / 2), 0, 3) - 3``.
    """
    fmt = _fmt(fmt)
    if fmt.level_mul == 1:
        return torch.clamp(torch.round(ratio), -fmt.qmax, fmt.qmax)
    codes = torch.clamp(torch.round((ratio + fmt.level_offset) / fmt.level_mul), 0, fmt.max_code)
    return fmt.level_mul * codes - fmt.level_offset


def codes_from_levels(levels: torch.Tensor, fmt, k_pad: int | None = None) -> torch.Tensor:
    """Integer levels [N, K] -> unpacked codes [N, K_pad] (int8 for int8, uint8 with pad codes otherwise).

    The inverse of ``formats.WeightFormat.level``: ``code = (level + LEVEL_OFFSET) / LEVEL_MUL``.
    """
    fmt = _fmt(fmt)
    n, k = levels.shape
    k_pad = formats.padded_k(k) if k_pad is None else k_pad
    lv = torch.round(levels).to(torch.int32)
    if bool((lv.abs() > fmt.qmax).any()) or (fmt.level_mul == 2 and bool(((lv + fmt.level_offset) % 2).any())):
        raise ValueError(f"levels must be levels of format {fmt.name!r} (|level| <= {fmt.qmax}, step {fmt.level_mul})")
    codes = torch.full((n, k_pad), fmt.pad_code, dtype=fmt.code_dtype)
    codes[:, :k] = ((lv + fmt.level_offset) // fmt.level_mul).to(fmt.code_dtype)
    return codes


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")


def expected_scale_shape(fmt, n: int, k: int, group_size: int) -> tuple[int, ...]:
    fmt = _fmt(fmt)
    if fmt.grouped:
        return (n, formats.num_groups(formats.padded_k(k), group_size))
    return (n,)


def quantize_weight_with_scales(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Float weight [N, K] + given scales ([N] or [N, G]) -> unpacked codes [N, K_pad].

    With the scales formats.quantize_weight computes, the codes equal its codes exactly.
    """
    fmt = _fmt(fmt)
    _check_weight(weight)
    n, k = weight.shape
    if not fmt.grouped and group_size != 0:
        raise ValueError(f"group_size must be 0 for format {fmt.name!r}, got {group_size}")
    expected = expected_scale_shape(fmt, n, k, group_size)
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != expected:
        raise ValueError(f"scale must have shape {list(expected)} for format {fmt.name!r}, got {getattr(scale, 'shape', scale)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("scale must be finite and >= 0")
    k_pad = formats.padded_k(k)
    w = torch.zeros((n, k_pad), dtype=torch.float32)
    w[:, :k] = weight.detach().to(torch.float32)
    scale = scale.to(torch.float32)
    if fmt.grouped:
        g = scale.shape[1]
        ratio = (w.view(n, g, k_pad // g) * _inverse(scale)[:, :, None]).view(n, k_pad)
    else:
        ratio = w * _inverse(scale)[:, None]
    return codes_from_levels(nearest_levels(ratio[:, :k], fmt), fmt, k_pad)


def observed_weight_scales(
    weight: torch.Tensor,
    fmt,
    group_size: int = 0,
    observer="omse",
    threshold_rule: str = "absmean",
) -> torch.Tensor:
    """Per-channel / per-group weight scales chosen by an observer on the format's level grid.

    ``observer=None`` keeps the format's own rule (formats.quantize_weight). Groups and
    channels are observed over the *true* K: padding columns multiply zero activations,
    so their error never matters and must not pull OMSE's clip. MinMax reproduces the
    format rule of int8 / int4 / int2 (absmax / qmax) exactly.
    """
    fmt = _fmt(fmt)
    _check_weight(weight)
    if observer is None:
        return formats.quantize_weight(weight, fmt, group_size if fmt.grouped else 0, threshold_rule)[1]
    grid = Grid.for_format(fmt)
    w = weight.detach().to(torch.float32).cpu()
    n, k = w.shape
    if not fmt.grouped or group_size == 0:
        if fmt.grouped:
            formats.check_group_size(group_size)
        obs = make_observer(observer, "weight_observer", axis=0)
        obs.observe(w)
        scale = obs.qparams(grid).scale
        return scale[:, None] if fmt.grouped else scale
    formats.check_group_size(group_size)
    g = formats.num_groups(formats.padded_k(k), group_size)
    scale = torch.zeros((n, g), dtype=torch.float32)
    full = k // group_size
    if full:
        # All full groups at once: rows of [N * full, group_size], one range per row.
        obs = make_observer(observer, "weight_observer", axis=0)
        obs.observe(w[:, : full * group_size].reshape(n * full, group_size))
        scale[:, :full] = obs.qparams(grid).scale.view(n, full)
    if k % group_size:
        obs = make_observer(observer, "weight_observer", axis=0)
        obs.observe(w[:, full * group_size :])
        scale[:, full] = obs.qparams(grid).scale
    # Groups made only of padding keep scale 0 (all-zero levels), as in formats.
    return scale


def quantize_weight_observed(
    weight: torch.Tensor, fmt, group_size: int = 0, observer="omse", threshold_rule: str = "absmean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K_pad], scales): `formats.quantize_weight` with observer-chosen scales."""
    fmt = _fmt(fmt)
    group_size = group_size if fmt.grouped else 0
    scale = observed_weight_scales(weight, fmt, group_size, observer, threshold_rule)
    return quantize_weight_with_scales(weight, fmt, scale, group_size), scale


@torch.no_grad()
def load_quantized_weight(module, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Write unpacked codes [N, K_pad] and scales into a pyclipq PackedWeight (QuantLinear, ...).

    The codes are packed into the module's compute layout (pyclipq.nn.packed.pack_codes)
    and both buffers keep their device and dtype.
    """
    from ..nn.packed import PackedWeight, pack_codes

    if not isinstance(module, PackedWeight) or module.layer.is_float:
        raise ValueError(f"module must be a quantized pyclipq PackedWeight, got {type(module).__name__}")
    fmt = formats.get_format(module.layer.format)
    n, k = module.out_features, module.in_features
    expected_codes = (n, formats.padded_k(k))
    if tuple(codes.shape) != expected_codes:
        raise ValueError(f"codes must have shape {list(expected_codes)}, got {list(codes.shape)}")
    if codes.dtype != fmt.code_dtype:
        raise ValueError(f"codes for format {fmt.name!r} must be {str(fmt.code_dtype).removeprefix('torch.')}, "
                         f"got {codes.dtype}")
    if bool(((codes < fmt.min_code) | (codes > fmt.max_code)).any()):
        raise ValueError(f"{fmt.name} codes must lie in [{fmt.min_code}, {fmt.max_code}]")
    if tuple(scale.shape) != tuple(module.weight_scale.shape):
        raise ValueError(f"scale must have shape {list(module.weight_scale.shape)}, got {list(scale.shape)}")
    device = module.packed_weight.device
    module.packed_weight.copy_(pack_codes(codes.to(device), fmt.name))
    module.weight_scale.copy_(scale.to(torch.float32))
