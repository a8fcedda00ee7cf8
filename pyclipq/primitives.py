"""The quantization math of pyclipq, once, on any device and dtype.

Scales, rounding to a format's levels, levels to codes, dequantization and per-token
activation quantization, exactly as docs/FORMATS.md defines them. The op references
(pyclipq.ops.reference), calibration (pyclipq.calibrate) and the fake-quant / QAT path
(pyclipq.train) all call these functions; none keeps a copy. Tensors stay on the device
they come on: QAT quantizes its weights where they live.

What a format *is* (bits, levels, offsets, layouts) is pyclipq.formats; this module only
computes with it. The input transforms that make int8 activations hold outliers
(SmoothQuant factors, block-Hadamard rotation) are here too.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import formats
from .formats import WeightFormat

__all__ = [
    "all_finite",
    "safe_inverse",
    "quantize_activation_rows",
    "quantize_per_token",
    "format_scales",
    "nearest_levels",
    "codes_from_levels",
    "quantize_weight_with_scales",
    "fake_quantize_with_scales",
    "learnable_fake_quantize",
    "grid_distance",
    "quantize_weight",
    "dequantize_levels",
    "dequantize_codes",
    "hadamard",
    "rotation_block",
    "rotate_blocks",
    "smoothing_scales",
    "Grid",
    "QParams",
    "fake_quantize",
    "quantization_error",
    "range_to_qparams",
]



def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of the floating-point tensor `t` is finite, by one reduction and no
    [t.shape] bool tensor (on MiniLM's 36 weights, Zen 4: 2.6 ms against isfinite(t).all()'s 12.4): a float32,
    float16 or bfloat16 tensor's sum in float64 cannot overflow, and a NaN or Inf reaches it;
    float64 tensors take their absmax, which NaN reaches too."""
    t = t.detach()
    if t.numel() == 0:
        return True
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t.abs().amax()))
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 where scale is 0 (an all-zero row or group quantizes to its zero code) or so
    small (below ~2.9e-39) that 1 / scale overflows: codes of w * inf would be +-qmax, or NaN at 0."""
    inverse = 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where((scale > 0) & torch.isfinite(inverse), inverse, torch.zeros_like(scale))


# ---------------------------------------------------------------- activations


def quantize_activation_rows(rows: torch.Tensor, act_scale: torch.Tensor | None = None):
    """float32 rows [M, K] -> (integer-valued float32 q [M, K], float32 scale [M]).

    Dynamic: the row's fp32 absmax, ``inv = 127 / absmax`` as a tensor / tensor division (``inv = 0``,
    so zero codes, for an absmax below formats.ACT_MIN_ABSMAX) (a
    Python-scalar operand may be applied as a multiplication by its reciprocal, which rounds
    differently from the kernels); static: ``inv = 1 / S``. Then round half to even and
    clamp to [-127, 127].
    """
    absmax = rows.abs().amax(dim=1) if rows.shape[0] else rows.new_zeros(0)
    if act_scale is None:
        qmax = torch.full_like(absmax, float(formats.ACT_QMAX))
        usable = absmax >= formats.ACT_MIN_ABSMAX  # below it, 127 / absmax may overflow: zero codes
        inv = torch.where(usable, qmax / torch.where(usable, absmax, qmax), torch.zeros_like(absmax))
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
    if not all_finite(weight):
        raise ValueError("weight contains NaN or Inf")


def _padded(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N, K_pad] on the weight's device, padding columns 0."""
    n, k = weight.shape
    w = torch.zeros((n, formats.padded_k(k)), dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.detach().to(torch.float32)
    return w


def _in_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K] (or already [N, K_pad]) -> [N, G, K_pad / G]: the row padded with zeros to K_pad, cut
    into its `groups` scale groups (the grouped formats' layout; `_from_groups` undoes it)."""
    n, k = weight.shape
    k_pad = formats.padded_k(k)
    if k_pad != k:
        weight = torch.nn.functional.pad(weight, (0, k_pad - k))
    return weight.view(n, groups, k_pad // groups)


def _from_groups(grouped: torch.Tensor, k: int) -> torch.Tensor:
    """[N, G, K_pad / G] -> [N, K]: the rows joined again, the padding cut off."""
    return grouped.reshape(grouped.shape[0], -1)[:, :k]


def _check_scale_shape(scale, fmt: WeightFormat, n: int, k: int, group_size: int) -> None:
    """`scale` must be a tensor of the format's scale shape for an [n, k] weight ([N] or [N, G])."""
    expected = fmt.scale_shape(n, k, group_size)
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != expected:
        got = list(scale.shape) if isinstance(scale, torch.Tensor) else repr(scale)
        raise ValueError(f"scale must have shape {list(expected)} for format {fmt.name!r}, got {got}")


def format_scales(weight: torch.Tensor, fmt, group_size: int = 0, threshold_rule: str = "absmean") -> torch.Tensor:
    """The format's own scale rule: absmax / qmax per output channel or K group (over the padded
    row: padding is 0), or for a threshold-rule format (ternary) mean|w| over the true K, times 2
    for ``twice_mean``."""
    fmt = formats.as_format(fmt)
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
    return (_in_groups(w, formats.num_groups(k_pad, group_size)).abs().amax(dim=2) / fmt.qmax).contiguous()


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def nearest_levels(ratio: torch.Tensor, fmt, straight_through: bool = False) -> torch.Tensor:
    """w / s -> the format's nearest integer level (float tensor).

    Unit-step formats (int8, int4, ternary): ``round(clamp(r, -qmax, qmax))``. int2 (odd
    levels, LEVEL_MUL = 2): the nearest odd level, ``2 * round(clamp((r + 3) / 2, 0, 3)) - 3``.
    (The bounds are integers, so clamping before rounding gives the same levels as after.)
    straight_through: the rounding passes the gradient unchanged and the clamp stops it outside
    the range: LSQ's gradient, 1 where |w / s| <= qmax and 0 beyond (the values are the same).
    """
    fmt = formats.as_format(fmt)
    if not straight_through:
        return _nearest_levels_(ratio.clone(), fmt)
    if fmt.level_mul == 1:
        return _round_straight_through(torch.clamp(ratio, -fmt.qmax, fmt.qmax))
    codes = _round_straight_through(torch.clamp((ratio + fmt.level_offset) / fmt.level_mul, 0, fmt.max_code))
    return fmt.level_mul * codes - fmt.level_offset


def _nearest_levels_(ratio: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """nearest_levels in place on `ratio` (a tensor of its caller's own): the same operations, no
    new [N, K] tensor per step (QAT quantizes every weight every step)."""
    if fmt.level_mul == 1:
        return ratio.clamp_(-fmt.qmax, fmt.qmax).round_()
    ratio.add_(fmt.level_offset).div_(fmt.level_mul).clamp_(0, fmt.max_code).round_()
    return ratio.mul_(fmt.level_mul).sub_(fmt.level_offset)


def codes_from_levels(levels: torch.Tensor, fmt, k_pad: int | None = None) -> torch.Tensor:
    """Integer levels [N, K] -> unpacked codes [N, K_pad] in the format's code dtype, padding
    columns holding its pad code. The inverse of ``WeightFormat.level``."""
    fmt = formats.as_format(fmt)
    n, k = levels.shape
    k_pad = formats.padded_k(k) if k_pad is None else k_pad
    lv = torch.round(levels).to(torch.int32)
    if bool((lv.abs() > fmt.qmax).any()) or (fmt.level_mul == 2 and bool(((lv + fmt.level_offset) % 2).any())):
        raise ValueError(f"levels must be levels of format {fmt.name!r} (|level| <= {fmt.qmax}, step {fmt.level_mul})")
    codes = torch.full((n, k_pad), fmt.pad_code, dtype=fmt.code_dtype, device=levels.device)
    shifted = lv + fmt.level_offset
    codes[:, :k] = (shifted if fmt.level_mul == 1 else shifted // fmt.level_mul).to(fmt.code_dtype)
    return codes


def _levels_with_scales(weight: torch.Tensor, fmt: WeightFormat, scale: torch.Tensor, group_size: int):
    """(levels [N, K] float, K_pad): each weight times the reciprocal of its scale, rounded."""
    _check_weight(weight)
    n, k = weight.shape
    if not fmt.grouped and group_size != 0:
        raise ValueError(f"group_size must be 0 for format {fmt.name!r}, got {group_size}")
    _check_scale_shape(scale, fmt, n, k, group_size)
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("scale must be finite and >= 0")
    inverse = safe_inverse(scale.to(device=weight.device, dtype=torch.float32))
    return _nearest_levels_(_times_inverse_scale(weight.detach(), inverse, fmt.grouped), fmt), formats.padded_k(k)


def _times_inverse_scale(weight: torch.Tensor, inverse: torch.Tensor, grouped: bool) -> torch.Tensor:
    """float32 [N, K]: each weight times the reciprocal of its scale (`inverse`, [N] or [N, G]).
    Differentiable in `weight`."""
    w = weight.to(torch.float32)
    if not grouped:
        return w * inverse[:, None]
    return _from_groups(_in_groups(w, inverse.shape[1]) * inverse[:, :, None], w.shape[1])


def quantize_weight_with_scales(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Float weight [N, K] + scales ([N] or [N, G]) -> unpacked codes [N, K_pad]: each weight
    times the reciprocal of its scale, rounded to the nearest level."""
    fmt = formats.as_format(fmt)
    levels, k_pad = _levels_with_scales(weight, fmt, scale, group_size)
    return codes_from_levels(levels, fmt, k_pad)


def quantize_weight_levels(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """float32 integer levels [N, K_pad] of `weight` at `scale`, the padding columns at the pad
    code's level: ``fmt.level`` of `quantize_weight_with_scales`' codes, without forming the codes
    (QAT's fake-quant reads levels, every step)."""
    fmt = formats.as_format(fmt)
    levels, k_pad = _levels_with_scales(weight, fmt, scale, group_size)
    pad_level = float(fmt.level_mul * fmt.pad_code - fmt.level_offset)
    return torch.nn.functional.pad(levels, (0, k_pad - levels.shape[1]), value=pad_level)


def fake_quantize_with_scales(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """The float32 weight [N, K] that `quantize_weight_with_scales` codes dequantize to, without
    forming the codes (a scale search tries many scales)."""
    return dequantize_levels(quantize_weight_levels(weight, fmt, scale, group_size), scale.to(torch.float32), weight.shape[1])


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
    fmt = formats.as_format(fmt)
    group_size = group_size if fmt.grouped else 0
    scale = format_scales(weight, fmt, group_size, threshold_rule)
    return quantize_weight_with_scales(weight, fmt, scale, group_size).contiguous(), scale


def dequantize_levels(levels: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Integer levels [N, K_pad] (float32) + scales [N] or [N, G] -> float32 weight [N, K]."""
    n = levels.shape[0]
    g = 1 if scale.dim() == 1 else scale.shape[1]
    return _from_groups(_in_groups(levels, g) * scale.reshape(n, g, 1), k)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, fmt: str | WeightFormat, k: int) -> torch.Tensor:
    """Unpacked codes [N, K_pad] + scales -> float32 weight [N, K] (what the kernels multiply by)."""
    return dequantize_levels(formats.as_format(fmt).level(codes).to(torch.float32), scale, k)


def clamp_to_scales(weight: torch.Tensor, fmt: str | WeightFormat, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """`weight` [N, K] with each channel / K group clamped to +-qmax * its scale: the format's absmax
    rule then gives back `scale` (or a smaller one where nothing was clipped), and the weights
    inside the clip keep their unrounded values."""
    fmt = formats.as_format(fmt)
    if fmt.threshold_rule:
        raise ValueError(f"format {fmt.name!r} sets its scale from the mean, not the max: clamping cannot choose it")
    w = _padded(weight.to(torch.float32))
    n = w.shape[0]
    g = 1 if scale.dim() == 1 else scale.shape[1]
    bound = (scale.to(torch.float32).reshape(n, g, 1) * fmt.qmax)
    return _from_groups(torch.maximum(torch.minimum(_in_groups(w, g), bound), -bound), weight.shape[1])


def learnable_fake_quantize(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """The values of `fake_quantize_with_scales` (every weight at its nearest level times its scale),
    differentiable in both the weight and the scales, as LSQ (Esser et al., 2020) trains them: the
    rounding passes the gradient straight through, so d/dw is 1 inside the range and 0 where the
    level is clamped, and d/ds is level - w / s inside and the clamped level outside.

    scale: > 0 everywhere (not checked: this runs every training step), [N] or [N, G] as the
    format's scale shape.
    """
    fmt = formats.as_format(fmt)
    n, k = weight.shape
    _check_scale_shape(scale, fmt, n, k, group_size)
    w = weight.to(torch.float32)
    if not fmt.grouped:
        return nearest_levels(w / scale[:, None], fmt, straight_through=True) * scale[:, None]
    # divided by the scale (not times its reciprocal, as the quantizers do): d/ds is LSQ's
    groups = _in_groups(w, scale.shape[1])
    levels = nearest_levels(groups / scale[:, :, None], fmt, straight_through=True)
    return _from_groups(levels * scale[:, :, None], k)


def grid_distance(weight: torch.Tensor, fmt, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """mean((w / s - level)^2) over the [N, K] weights: how far, in units of its scale, each weight
    sits from the level it quantizes to (its nearest level at `scale`, as
    `quantize_weight_with_scales` picks it; beyond the last level, the distance to that level).
    Differentiable in `weight` only: the levels and `scale` are constants. 0 when every weight
    is a level times its scale; for weights spread evenly inside the range, the level step squared
    over 12 (1/12 for the unit-step formats, 1/3 for int2's odd levels).

    The oscillation-dampening term of Nagel et al. (2022), "Overcoming Oscillations in
    Quantization-Aware Training": in QAT it pulls each latent weight toward its level, so that late
    in training the latents stop flipping across rounding boundaries.
    scale: > 0 everywhere (not checked: this runs every training step), the format's scale shape.
    """
    fmt = formats.as_format(fmt)
    n, k = weight.shape
    _check_scale_shape(scale, fmt, n, k, group_size)
    # the ratio quantize_weight_with_scales rounds, here with the weight's gradient kept
    ratio = _times_inverse_scale(weight, safe_inverse(scale.detach().to(device=weight.device, dtype=torch.float32)),
                                 fmt.grouped)
    return (ratio - _nearest_levels_(ratio.detach().clone(), fmt)).square().mean()


def rule_latent(codes: torch.Tensor, scale: torch.Tensor, fmt: str | WeightFormat, k: int,
                threshold_rule: str = "absmean") -> torch.Tensor:
    """A float32 weight [N, K] that the format's own rule (`quantize_weight`) quantizes back to the
    weight (codes, scale) dequantize to: where QAT, whose fake-quant applies that rule to its latent
    weights, starts from a PTQ result (GPTQ codes, searched scales) the rule alone would not find.

    - absmean threshold rule (ternary): levels T times alpha / p per row, p the row's fraction of
      non-zero levels, so that mean|w| = alpha and w / alpha = T / p rounds (clamped) back to T:
      exactly the PTQ weight.
    - absmax formats: the dequantized weight itself. The rule gives back its scale wherever a
      group holds a level of +-qmax; elsewhere it picks a finer scale, on which int2's levels
      (no zero level) are the same values and int4's / int8's each within half a finer step.
    - twice_mean: the dequantized weight (no latent makes twice the mean the scale exactly).
    """
    fmt = formats.as_format(fmt)
    weight = dequantize_codes(codes, scale, fmt, k)
    if not (fmt.threshold_rule and threshold_rule == "absmean"):
        return weight
    levels = fmt.level(codes[:, :k]).to(torch.float32)
    nonzero = (levels != 0).to(torch.float32).mean(dim=1, keepdim=True)
    alpha = scale.to(torch.float32).reshape(-1, 1)
    return torch.where(nonzero > 0, levels * alpha / nonzero.clamp_min(1e-12), torch.zeros_like(levels))


# ---------------------------------------------------------------- input transforms (smoothing, rotation)

@functools.lru_cache(maxsize=None)
def _hadamard_cpu(size: int) -> torch.Tensor:
    with torch.inference_mode(False):
        return _sylvester(size)


def _sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)  # float64: each dtype rounds from the exact values


def hadamard(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal, symmetric Sylvester-Hadamard matrix of a power-of-2 `size` (H H = I)."""
    if not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of 2, got {size!r}")
    return _hadamard_on(size, torch.device(device) if device is not None else torch.device("cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _hadamard_on(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # one copy per (device, dtype): a layer's forward must not upload it on every call. Never an
    # inference tensor (a first call under inference_mode), which autograd could not save later.
    with torch.inference_mode(False):
        return _hadamard_cpu(size).to(device=device, dtype=dtype)


def rotation_block(in_features: int, requested: int) -> int:
    """The block size a layer of `in_features` uses for a requested rotation: the largest power
    of 2 <= requested dividing in_features (1, no rotation, when in_features is odd)."""
    block = 1
    while block * 2 <= requested and in_features % (block * 2) == 0:
        block *= 2
    return block


def rotate_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] times the block-diagonal Hadamard matrix diag(H_b, ..., H_b) (K % b == 0).

    It is its own inverse, so a linear y = x W^T equals rotate(x) rotate(W)^T exactly in real
    arithmetic: the rotated weight is what gets quantized.
    """
    if block <= 1:
        return x
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"x's last dimension ({k}) must be a multiple of the rotation block ({block})")
    h = hadamard(block, x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

    x / s and W * s give the same product; the activations' outlier channels shrink and the
    weights' matching columns grow. Channels without activations or weights get s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    a = act_absmax.to(torch.float32)
    w = weight_absmax.to(torch.float32)
    live = (a > 0) & (w > 0)
    s = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1.0 - alpha)
    s = torch.where(live, s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5)


# ---------------------------------------------------------------- grids (the generic quantizer)
# A level grid, its scale / zero point and the quantize-dequantize round trip, for any tensor:
# what calibration's observers choose ranges for (in the style of torchao's choose_qparams_affine
# / quantize_affine). pyclipq.calibrate re-exports Grid, QParams, fake_quantize, quantization_error.

@dataclass(frozen=True)
class Grid:
    """Integer levels ``qmin, qmin + step, ..., qmax``.

    A symmetric grid (``qmin == -qmax``) means ``real = scale * level``; an asymmetric
    use of a unit-step grid means ``real = scale * (q - zero_point)``.
    """

    qmin: int
    qmax: int
    step: int = 1

    def __post_init__(self):
        for name in ("qmin", "qmax", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        if self.qmax <= self.qmin or (self.qmax - self.qmin) % self.step:
            raise ValueError(
                f"qmax must exceed qmin by a positive multiple of step, got qmin={self.qmin}, qmax={self.qmax}, step={self.step}"
            )

    @classmethod
    def for_format(cls, fmt: "str | formats.WeightFormat") -> "Grid":
        """The level grid of a weight format, from its definition in pyclipq.formats.

        int8 -127..127, int4 -7..7, int2 the odd levels -3..3 (LEVEL_MUL = 2), ternary -1..1.
        """
        fmt = formats.as_format(fmt)
        return cls(-fmt.qmax, fmt.qmax, fmt.level_mul)

    @classmethod
    def activations(cls) -> "Grid":
        """Symmetric int8 activations in [-ACT_QMAX, ACT_QMAX] (docs/FORMATS.md, "Activations")."""
        return cls(-formats.ACT_QMAX, formats.ACT_QMAX)

    @classmethod
    def unsigned(cls, bits: int) -> "Grid":
        """P4Q Eq. 2, unsigned: {0, ..., 2^b - 1} (use with symmetric=False)."""
        _check_bits(bits)
        return cls(0, 2**bits - 1)

    @classmethod
    def signed(cls, bits: int) -> "Grid":
        """P4Q Eq. 2, signed: {-2^(b-1), ..., 2^(b-1) - 1} (use with symmetric=False)."""
        _check_bits(bits)
        return cls(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    @property
    def symmetric(self) -> bool:
        return self.qmin == -self.qmax

    @property
    def num_levels(self) -> int:
        return (self.qmax - self.qmin) // self.step + 1

    def levels(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, self.step, dtype=torch.float32)


def _check_bits(bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")


@dataclass
class QParams:
    """scale (float32) and zero_point (int32, zeros when symmetric), shape () or [C]."""

    scale: torch.Tensor
    zero_point: torch.Tensor


def fake_quantize(x: torch.Tensor, scale, zero_point, grid: Grid) -> torch.Tensor:
    """The value ``x`` takes after quantization to `grid` and back (P4Q Eq. 3 then Eq. 6).

    ``scale`` / ``zero_point`` broadcast against ``x``. A scale of 0 maps everything to
    0, as in docs/FORMATS.md. The nearest level is chosen (rounding to the grid's
    step), which is what every pyclipq format does.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    span = (grid.qmax - grid.qmin) // grid.step
    index = torch.clamp(torch.round((x / safe + zero_point - grid.qmin) / grid.step), 0, span)
    q = grid.qmin + grid.step * index
    return torch.where(scale > 0, (q - zero_point) * safe, torch.zeros_like(x))


def quantization_error(x: torch.Tensor, scale, zero_point, grid: Grid) -> torch.Tensor:
    """Sum of squared quantization errors over all of ``x`` (the quantity OMSE minimises)."""
    return ((x - fake_quantize(x, scale, zero_point, grid)) ** 2).sum()


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid, symmetric: bool):
    lo = lo.to(torch.float32)
    hi = hi.to(torch.float32)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / grid.qmax
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    # 0 must be exactly representable (zero padding, ReLU zeros): widen the range to hold it.
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = (hi - lo) / (grid.qmax - grid.qmin)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(grid.qmin - torch.round(lo / safe), grid.qmin, grid.qmax)
    return scale, zero_point.to(torch.int32)
