"""Weight codes from given scales or given levels, in the formats of pyclipq.formats.

`primitives.quantize_weight` is the format's own rule (absmax / qmax per group, or the
ternary threshold rule). Calibration needs two variants that the format spec allows
but that rule does not produce:

- scales chosen by an observer (OMSE-clipped, percentile-clipped), then the codes
  those scales give: `quantize_weight_with_scales`, `observed_weight_scales`;
- codes chosen by error-compensating rounding (GPTQ), one column at a time:
  `nearest_levels` + `codes_from_levels`;
- scales chosen to minimise the layer's *output* error on the calibration inputs, not the
  weight error (`output_aware_scales`: an MSE-clip search weighted by the input Hessian).

Nothing here defines a layout: the levels and codes come from each format's
``qmax``, ``level_mul``, ``level_offset`` and ``pad_code``, and with the format's own
scales `quantize_weight_with_scales` reproduces `primitives.quantize_weight` (they are one function chain
in pyclipq.primitives)
(tests/test_observers.py checks it).
"""
from __future__ import annotations

import torch

from .. import formats
from ..nn.packed import PackedWeight, pack_codes

# the rounding and code math is pyclipq.primitives'; re-exported here, where calibration asks for it
from ..primitives import (
    _check_weight,
    codes_from_levels,
    fake_quantize_with_scales,
    format_scales,
    nearest_levels,
    quantize_weight,
    quantize_weight_with_scales,
)
from .observers import Grid, make_observer

__all__ = [
    "nearest_levels",
    "codes_from_levels",
    "quantize_weight_with_scales",
    "observed_weight_scales",
    "quantize_weight_observed",
    "output_aware_scales",
    "load_quantized_weight",
]

# Multiples of the format rule's scale that the output-aware search tries: below 1 clips the
# largest weights (int4 / int2 gain), above 1 widens ternary's zero band.
CLIP_RATIOS = tuple(round(0.30 + 0.05 * i, 2) for i in range(25))  # 0.30 ... 1.50



def observed_weight_scales(
    weight: torch.Tensor,
    fmt,
    group_size: int = 0,
    observer="omse",
    threshold_rule: str = "absmean",
) -> torch.Tensor:
    """Per-channel / per-group weight scales chosen by an observer on the format's level grid.

    ``observer=None`` keeps the format's own rule (primitives.quantize_weight). Groups and
    channels are observed over the *true* K: padding columns multiply zero activations,
    so their error never matters and must not pull OMSE's clip. MinMax reproduces the
    format rule of int8 / int4 / int2 (absmax / qmax) exactly.
    """
    fmt = formats.as_format(fmt)
    _check_weight(weight)
    if observer is None:
        return quantize_weight(weight, fmt, group_size if fmt.grouped else 0, threshold_rule)[1]
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


def _group_output_error(delta: torch.Tensor, hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per row (and group) d^T H_gg d: the output error ||X d^T||^2 each group's rounding causes
    (cross-group terms left out, so that each group's scale can be chosen on its own)."""
    n, k = delta.shape
    if group_size == 0:
        return ((delta @ hessian) * delta).sum(dim=1, keepdim=True)
    k_pad = formats.padded_k(k)
    d = torch.nn.functional.pad(delta, (0, k_pad - k))
    h = torch.nn.functional.pad(hessian, (0, k_pad - k, 0, k_pad - k))
    g = k_pad // group_size
    blocks = h.view(g, group_size, g, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, gs, gs]
    d = d.view(n, g, group_size)
    return torch.einsum("ngi,gij,ngj->ng", d, blocks, d)


@torch.no_grad()
def output_aware_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt,
    group_size: int = 0,
    threshold_rule: str = "absmean",
    ratios=CLIP_RATIOS,
) -> torch.Tensor:
    """Scales minimising each channel's (group's) output error on the calibration inputs.

    hessian: [K, K] = 2/n X^T X of the layer's inputs (``gptq.HessianAccumulator``). Each
    channel / group tries every multiple in `ratios` of the format rule's scale and keeps
    the one with the least d^T H d, d being that row's (group's) rounding error: an
    MSE-clip search on the output, where a plain MSE clip would weigh every input channel
    alike and miss the outlier channels that matter.
    """
    fmt = formats.as_format(fmt)
    _check_weight(weight)
    w = weight.detach().to(torch.float32).cpu()
    n, k = w.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be a [K, K] = [{k}, {k}] tensor, got {getattr(hessian, 'shape', type(hessian).__name__)}")
    group_size = group_size if fmt.grouped else 0
    h = hessian.detach().to(torch.float32).cpu()
    base = format_scales(w, fmt, group_size, threshold_rule)
    best = base.clone()
    best_error = torch.full(base.shape, float("inf"))
    for ratio in ratios:
        scale = base * ratio
        delta = w - fake_quantize_with_scales(w, fmt, scale, group_size)
        error = _group_output_error(delta, h, group_size).reshape(base.shape)
        better = error < best_error
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best


def quantize_weight_observed(
    weight: torch.Tensor, fmt, group_size: int = 0, observer="omse", threshold_rule: str = "absmean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K_pad], scales): `primitives.quantize_weight` with observer-chosen scales."""
    fmt = formats.as_format(fmt)
    group_size = group_size if fmt.grouped else 0
    scale = observed_weight_scales(weight, fmt, group_size, observer, threshold_rule)
    return quantize_weight_with_scales(weight, fmt, scale, group_size), scale


@torch.no_grad()
def load_quantized_weight(module, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Write unpacked codes [N, K_pad] and scales into a pyclipq PackedWeight (QuantLinear, ...).

    The codes are packed into the module's compute layout (pyclipq.nn.packed.pack_codes)
    and both buffers keep their device and dtype.
    """
    if not isinstance(module, PackedWeight) or module.layer.is_float:
        raise ValueError(f"module must be a quantized pyclipq PackedWeight, got {type(module).__name__}")
    fmt = module.layer.spec
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
