"""Range observers for post-training quantization: MinMax, EMA, Percentile and OMSE.

These are the four PTQ baselines of P4Q (shared/seeds/p4q.txt §3.1 and §4.1, Table 1):

- **MinMax**: the range is the smallest and largest value seen.
- **EMA** (Jacob et al., 2018): the per-batch min / max, smoothed with an exponential
  moving average over the calibration batches.
- **Percentile** (Li et al., 2019): the range is a percentile of the values seen, so
  rare outliers are clipped.
- **OMSE** (Choukroun et al., 2019): the clipping range that minimises the L2
  quantization error ``sum (x - Q(x))^2`` for the grid it will be used with. P4Q's
  Eq. 4-5 describe OMSE's scale through the sample variance; the original OMSE is a
  search over clipping ranges that minimises the squared error, which is what this
  module implements (an exact error for every candidate, then local refinement).

Every observer is one small class behind one protocol (`Observer`):
``observe(x)`` any number of times, then ``qparams(grid)`` gives the scale (and zero
point) for a quantization `Grid`. ``axis=None`` observes per tensor; ``axis=a`` keeps
one range per index of dimension ``a`` (per channel; rows of a weight are ``axis=0``).
``symmetric=True`` gives ``real = scale * level`` (every pyclipq format is symmetric);
``symmetric=False`` gives ``real = scale * (q - zero_point)`` as in P4Q's Eq. 3 and 6,
for grids that allow it (unit step).

Percentile and OMSE need the distribution, not just the extremes. They keep the exact
values while few have been seen (hand-checkable answers, one-shot weights) and switch
to a fixed-size histogram per channel beyond ``max_exact_values``, so streaming
calibration over many batches keeps bounded memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from .. import formats
from ._threads import one_thread

__all__ = [
    "Grid",
    "QParams",
    "Observer",
    "RangeObserver",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "OMSEObserver",
    "OBSERVERS",
    "make_observer",
    "fake_quantize",
    "quantization_error",
]


# ------------------------------------------------------------------------- grids


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


# ------------------------------------------------------------------- protocol


@runtime_checkable
class Observer(Protocol):
    """What calibration needs from an observer."""

    def observe(self, x: torch.Tensor) -> None: ...

    def qparams(self, grid: Grid) -> QParams: ...


class RangeObserver:
    """Base class: input checks, channel bookkeeping, range -> (scale, zero point).

    Subclasses implement ``_observe(x2d)`` with ``x2d`` of shape [C, n] (C = 1 per
    tensor) in float32, and ``_range(grid)`` returning per-channel (lo, hi).
    """

    name: ClassVar[str] = ""

    def __init__(self, axis: int | None = None, symmetric: bool = True):
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError(f"axis must be None (per tensor) or an int (per channel), got {axis!r}")
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
        self.axis = axis
        self.symmetric = symmetric
        self.num_channels: int | None = None
        self.num_batches = 0

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return f"{type(self).__name__}(axis={self.axis}, symmetric={self.symmetric}{', ' + extra if extra else ''})"

    def _extra_repr(self) -> str:
        return ""

    # ---- input
    def _as_channels(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x must not be empty, got shape {list(x.shape)}")
        x = x.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf: the observed activations or weights are not finite")
        if self.axis is None:
            x2d = x.reshape(1, -1)
        else:
            if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                raise ValueError(f"axis={self.axis} is out of range for x of shape {list(x.shape)}")
            x2d = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self.num_channels is None:
            self.num_channels = x2d.shape[0]
        elif x2d.shape[0] != self.num_channels:
            raise ValueError(
                f"x has {x2d.shape[0]} channels along axis {self.axis}, earlier batches had {self.num_channels}"
            )
        return x2d.cpu()

    def observe(self, x: torch.Tensor) -> None:
        """Record the statistics of one batch (any shape; channels along ``axis``)."""
        x2d = self._as_channels(x)
        self._observe(x2d)
        self.num_batches += 1

    def _observe(self, x2d: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ---- output
    def _check_ready(self, grid: Grid) -> None:
        if not isinstance(grid, Grid):
            raise ValueError(f"grid must be a pyclipq.calibrate.observers.Grid, got {type(grid).__name__}")
        if self.num_batches == 0:
            raise ValueError(f"{type(self).__name__} has observed no data: call observe(x) first")
        if self.symmetric and not grid.symmetric:
            raise ValueError(
                f"a symmetric observer needs a symmetric grid (qmin == -qmax), got qmin={grid.qmin}, qmax={grid.qmax}; "
                "pass symmetric=False for an asymmetric (zero-point) range"
            )
        if not self.symmetric and grid.step != 1:
            raise ValueError(f"an asymmetric range needs a unit-step grid, got step={grid.step}")

    def range(self, grid: Grid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen (lo, hi) per channel (shape () per tensor). OMSE needs the grid."""
        grid = grid or Grid.activations()
        self._check_ready(grid)
        with one_thread():
            lo, hi = self._range(grid)
        return self._shape(lo), self._shape(hi)

    def qparams(self, grid: Grid) -> QParams:
        """Scale and zero point for `grid`: symmetric ``scale = max(|lo|, |hi|) / qmax``;
        asymmetric (P4Q Eq. 3) ``scale = (hi - lo) / (qmax - qmin)`` with the range widened to
        hold 0 and ``zero_point = qmin - round(lo / scale)``."""
        self._check_ready(grid)
        with one_thread():
            lo, hi = self._range(grid)
        scale, zero_point = range_to_qparams(lo, hi, grid, self.symmetric)
        return QParams(self._shape(scale), self._shape(zero_point))

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.axis is None else t


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


# -------------------------------------------------------------- MinMax and EMA


class MinMaxObserver(RangeObserver):
    """The smallest and largest value over everything observed (P4Q Table 1, "MinMax")."""

    name = "minmax"

    def __init__(self, axis: int | None = None, symmetric: bool = True):
        super().__init__(axis, symmetric)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x2d):
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def _range(self, grid):
        return self.min_val, self.max_val


class EMAObserver(RangeObserver):
    """Exponential moving average of the per-batch min and max (Jacob et al., 2018).

    After the first batch (which initialises the averages),
    ``running = momentum * running + (1 - momentum) * batch``; so a momentum near 1
    trusts the early batches, and 0 keeps only the last batch.
    """

    name = "ema"

    def __init__(self, axis: int | None = None, symmetric: bool = True, momentum: float = 0.9):
        super().__init__(axis, symmetric)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _extra_repr(self):
        return f"momentum={self.momentum}"

    def _observe(self, x2d):
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
            return
        m = self.momentum
        self.min_val = m * self.min_val + (1.0 - m) * lo
        self.max_val = m * self.max_val + (1.0 - m) * hi

    def _range(self, grid):
        return self.min_val, self.max_val


# ------------------------------------------------- the distribution (exact or histogram)


class _Distribution:
    """The values observed per channel: exact while small, a histogram once large.

    Exact: a list of [C, n] float32 chunks, kept until more than ``max_exact_values``
    values have been seen. Histogram: ``bins`` equal bins per channel over
    ``[-R_c, R_c]`` plus an exact count of zeros. When a batch exceeds ``R_c`` the range
    doubles and adjacent bin pairs merge, which is exact because the old bin edges are
    new bin edges (``bins`` is a multiple of 4). Memory is ``C * bins`` counts.
    """

    def __init__(self, max_exact_values: int, bins: int):
        if not isinstance(max_exact_values, int) or max_exact_values < 0:
            raise ValueError(f"max_exact_values must be an int >= 0, got {max_exact_values!r}")
        if not isinstance(bins, int) or bins < 8 or bins % 4:
            raise ValueError(f"bins must be an int >= 8 and a multiple of 4, got {bins!r}")
        self.max_exact_values = max_exact_values
        self.bins = bins
        self.chunks: list[torch.Tensor] | None = []
        self.num_exact = 0
        self.counts: torch.Tensor | None = None  # [C, bins] float64
        self.zeros: torch.Tensor | None = None  # [C] float64
        self.half_range: torch.Tensor | None = None  # [C] float64, R_c
        self.min_val: torch.Tensor | None = None  # exact extremes, kept in both modes
        self.max_val: torch.Tensor | None = None
        self._sorted: _SortedValues | None = None

    @property
    def is_exact(self) -> bool:
        return self.chunks is not None

    def add(self, x2d: torch.Tensor) -> None:
        lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        if self.is_exact:
            self.chunks.append(x2d.clone())
            self._sorted = None
            self.num_exact += x2d.numel()
            if self.num_exact <= self.max_exact_values:
                return
            values = self.values()
            self.chunks = None
            channels = values.shape[0]
            self.counts = torch.zeros(channels, self.bins, dtype=torch.float64)
            self.zeros = torch.zeros(channels, dtype=torch.float64)
            self.half_range = torch.zeros(channels, dtype=torch.float64)
            x2d = values
        self._add_to_histogram(x2d)

    def values(self) -> torch.Tensor:
        """The exact values [C, n] (only while exact)."""
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks, dim=1)]
        return self.chunks[0]

    def sorted_values(self) -> "_SortedValues":
        if self._sorted is None:
            self._sorted = _SortedValues(self.values())
        return self._sorted

    def _add_to_histogram(self, x2d: torch.Tensor) -> None:
        x = x2d.to(torch.float64)
        absmax = x.abs().amax(dim=1)
        new = (self.half_range == 0) & (absmax > 0)
        self.half_range = torch.where(new, absmax, self.half_range)
        while True:  # double [-R, R] (merging bin pairs) until it covers this batch
            outside = absmax > self.half_range
            if not bool(outside.any()):
                break
            merged = self.counts[outside].view(-1, self.bins // 2, 2).sum(dim=2)
            widened = torch.zeros(merged.shape[0], self.bins, dtype=torch.float64)
            widened[:, self.bins // 4 : 3 * self.bins // 4] = merged
            self.counts[outside] = widened
            self.half_range[outside] *= 2
        is_zero = x == 0
        self.zeros += is_zero.sum(dim=1).to(torch.float64)
        r = self.half_range[:, None]
        index = torch.floor((x + r) / torch.where(r > 0, 2 * r, 1.0) * self.bins).clamp(0, self.bins - 1).long()
        index = index + torch.arange(x.shape[0])[:, None] * self.bins
        weights = (~is_zero).to(torch.float64)
        self.counts += torch.bincount(index.reshape(-1), weights.reshape(-1), minlength=self.counts.numel()).view_as(
            self.counts
        )

    # ---- statistics
    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def edges(self) -> torch.Tensor:
        """Bin edges [C, bins + 1]."""
        t = torch.linspace(-1.0, 1.0, self.bins + 1, dtype=torch.float64)
        return self.half_range[:, None] * t[None]

    def quantile(self, q: float, absolute: bool) -> torch.Tensor:
        """Per-channel q-quantile (q in [0, 1]) of the values, or of their magnitudes."""
        if self.is_exact:
            v = self.values()
            v = v.abs() if absolute else v
            s, _ = torch.sort(v, dim=1)
            n = s.shape[1]
            # Linear interpolation between order statistics (numpy's default "linear").
            pos = q * (n - 1)
            i0 = int(math.floor(pos))
            i1 = min(i0 + 1, n - 1)
            frac = pos - i0
            return (s[:, i0] * (1 - frac) + s[:, i1] * frac).float()
        counts, lower, upper = self._bins_with_zero(absolute)
        cum = counts.cumsum(dim=1)
        total = cum[:, -1:]
        target = q * total
        index = torch.searchsorted(cum, target).clamp(max=counts.shape[1] - 1)
        before = torch.where(index > 0, cum.gather(1, (index - 1).clamp(min=0)), torch.zeros_like(target))
        inside = counts.gather(1, index)
        frac = torch.where(inside > 0, (target - before) / torch.where(inside > 0, inside, 1.0), torch.zeros_like(target))
        lo, hi = lower.gather(1, index), upper.gather(1, index)
        return (lo + frac.clamp(0, 1) * (hi - lo))[:, 0].float()

    def _bins_with_zero(self, absolute: bool):
        """Counts with the exact zeros as a zero-width bin at 0; (counts, lower, upper) [C, B']."""
        edges = self.edges()
        half = self.bins // 2
        zeros = self.zeros[:, None]
        zero_edge = torch.zeros_like(zeros)
        if absolute:
            folded = self.counts[:, half:] + self.counts[:, :half].flip(1)
            pos = edges[:, half:]
            return (
                torch.cat([zeros, folded], dim=1),
                torch.cat([zero_edge, pos[:, :-1]], dim=1),
                torch.cat([zero_edge, pos[:, 1:]], dim=1),
            )
        return (
            torch.cat([self.counts[:, :half], zeros, self.counts[:, half:]], dim=1),
            torch.cat([edges[:, :half], zero_edge, edges[:, half:-1]], dim=1),
            torch.cat([edges[:, 1 : half + 1], zero_edge, edges[:, half + 1 :]], dim=1),
        )

    def squared_error(self, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Sum of squared quantization errors per channel and candidate: scale, zero_point [C, M] -> [C, M]."""
        if self.is_exact:
            return _exact_squared_error(self.sorted_values(), scale, zero_point, grid)
        return _histogram_squared_error(self, scale.to(torch.float64), zero_point.to(torch.float64), grid)


_CHUNK_ELEMENTS = 1 << 22  # bounds the [C, candidates, levels] temporaries of the error search


class _SortedValues:
    """Sorted values with prefix sums of x and x^2 (float64): the exact squared error of a
    candidate grid then costs one binary search per cell boundary instead of a pass over
    every value, because sum over a cell of (x - c)^2 = S2 - 2 c S1 + N c^2."""

    def __init__(self, values: torch.Tensor):
        v, _ = torch.sort(values.to(torch.float64), dim=1)
        zero = torch.zeros(v.shape[0], 1, dtype=torch.float64)
        self.sorted = v.contiguous()
        self.s1 = torch.cat([zero, v.cumsum(dim=1)], dim=1)
        self.s2 = torch.cat([zero, (v * v).cumsum(dim=1)], dim=1)

    def cell_sums(self, centers: torch.Tensor):
        """centers [C, M, L] (sorted levels * scale) -> (N, S1, S2) per cell [C, M, L].

        A value belongs to its nearest center; the cell boundaries are the midpoints, and
        the outer cells reach to +-inf (values beyond the grid clamp to the end level).
        A value exactly on a boundary is equidistant from both centers, so the error does
        not depend on which cell it is counted in.
        """
        c, m, l = centers.shape
        n = self.sorted.shape[1]
        bounds = ((centers[:, :, 1:] + centers[:, :, :-1]) / 2).reshape(c, -1)
        index = torch.searchsorted(self.sorted, bounds.contiguous()).view(c, m, l - 1)
        index = torch.cat(
            [torch.zeros(c, m, 1, dtype=index.dtype), index, torch.full((c, m, 1), n, dtype=index.dtype)], dim=2
        )
        flat = index.reshape(c, -1)
        s1 = self.s1.gather(1, flat).view(c, m, l + 1)
        s2 = self.s2.gather(1, flat).view(c, m, l + 1)
        count = index.diff(dim=2).to(torch.float64)
        return count, s1.diff(dim=2), s2.diff(dim=2)


def _candidate_centers(scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The real values of the grid's levels for each candidate: [C, M] -> [C, M, L]."""
    levels = grid.levels().to(torch.float64)
    return (levels[None, None, :] - zero_point[:, :, None].to(torch.float64)) * scale[:, :, None].to(torch.float64)


def _direct_squared_error(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid):
    """sum (x - fake_quantize(x))^2 value by value: cheaper than cell sums when there are
    more levels than values per channel (int8 weights, short groups). In-place steps keep
    one [C, chunk, n] temporary."""
    c, n = values.shape
    m = scale.shape[1]
    out = torch.empty(c, m, dtype=torch.float64)
    span = (grid.qmax - grid.qmin) // grid.step
    step = max(1, _CHUNK_ELEMENTS // max(1, c * n))
    x = values[:, None, :]
    for start in range(0, m, step):
        s = scale[:, start : start + step, None].to(values.dtype)
        z = zero_point[:, start : start + step, None].to(values.dtype)
        inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        t = x * inv  # the same steps as fake_quantize, in place
        t.add_(z - grid.qmin).div_(grid.step).round_().clamp_(0, span).mul_(grid.step).add_(grid.qmin - z)
        t.mul_(s).sub_(x)
        out[:, start : start + step] = (t * t).sum(dim=2, dtype=torch.float64)
    return out


def _exact_squared_error(values: "_SortedValues", scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid):
    c, m = scale.shape
    n = values.sorted.shape[1]
    if (grid.num_levels - 1) * max(1.0, math.log2(n)) > n:
        return _direct_squared_error(values.sorted.to(torch.float32), scale, zero_point, grid)
    out = torch.empty(c, m, dtype=torch.float64)
    total = values.s2[:, -1:]
    step = max(1, _CHUNK_ELEMENTS // max(1, c * grid.num_levels))
    for start in range(0, m, step):
        sl = slice(start, start + step)
        centers = _candidate_centers(scale[:, sl], zero_point[:, sl], grid)
        count, s1, s2 = values.cell_sums(centers)
        err = (s2 - 2 * centers * s1 + count * centers**2).sum(dim=2).clamp(min=0)
        # A scale of 0 maps everything to 0 (docs/FORMATS.md): the error is sum x^2.
        out[:, sl] = torch.where(scale[:, sl] > 0, err, total.expand(-1, err.shape[1]))
    return out


def _least_squares_scale(values: "_SortedValues", scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """For the levels each value rounds to at `scale` [C], the scale minimising the error:
    sum_j l_j S1_j / sum_j N_j l_j^2 (symmetric grids)."""
    levels = grid.levels().to(torch.float64)
    centers = levels[None, None, :] * scale[:, None, None].to(torch.float64)
    count, s1, _ = values.cell_sums(centers)
    num = (levels * s1[:, 0]).sum(dim=1)
    den = (levels**2 * count[:, 0]).sum(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num)).to(torch.float32)


def _integrated_error(t: torch.Tensor, low: torch.Tensor, high: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """H(t) = integral from (low - delta/2) to t of (u - Q(u))^2 du, in closed form.

    Q rounds to the uniform grid low, low + delta, ..., high and clamps outside it. Inside
    the grid each full cell (width delta, centred on a level) contributes delta^3 / 12 and a
    partial cell ((u - k)^3 + 1/8) delta^3 / 3 in cell coordinates; beyond either end the
    error is the distance to the end level. This is what lets OMSE score a candidate from a
    histogram without evaluating every level.
    """
    cells = torch.round((high - low) / delta) + 1
    u = (t - low) / delta  # cell coordinates: level k sits at u = k
    k = torch.minimum(torch.floor(u + 0.5).clamp(min=0), cells - 1)
    inner = delta**3 * (k / 12 + ((torch.minimum(u.clamp(min=-0.5), cells - 0.5) - k) ** 3 + 0.125) / 3)
    below = ((t - low) ** 3 + (delta / 2) ** 3) / 3  # for t < low - delta/2 (negative)
    above = cells * delta**3 / 12 + ((t - high) ** 3 - (delta / 2) ** 3) / 3
    return torch.where(u < -0.5, below, torch.where(u > cells - 0.5, above, inner))


def _histogram_squared_error(dist: _Distribution, scale, zero_point, grid: Grid):
    """Expected error over the histogram, values uniform within each bin (exact zeros exact)."""
    c, m = scale.shape
    edges = dist.edges()  # [C, B + 1]
    width = (2 * dist.half_range / dist.bins)[:, None]  # [C, 1]
    out = torch.zeros(c, m, dtype=torch.float64)
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    step = max(1, _CHUNK_ELEMENTS // max(1, c * (dist.bins + 1)))
    for start in range(0, m, step):
        sl = slice(start, start + step)
        s, z = safe[:, sl, None], zero_point[:, sl, None]
        low, high, delta = (grid.qmin - z) * s, (grid.qmax - z) * s, grid.step * s
        h = _integrated_error(edges[:, None, :], low, high, delta)  # [C, chunk, B + 1]
        per_bin = (h[:, :, 1:] - h[:, :, :-1]) / torch.where(width > 0, width, 1.0)[:, :, None]
        err = (per_bin * dist.counts[:, None, :]).sum(dim=2)
        zero_value = fake_quantize(torch.zeros(1, dtype=torch.float64), s[:, :, 0], z[:, :, 0], grid)
        err = err + dist.zeros[:, None] * zero_value**2
        # scale 0 maps everything to 0: the error is the second moment.
        second_moment = (dist.counts * ((edges[:, 1:] ** 3 - edges[:, :-1] ** 3) / 3) / torch.where(width > 0, width, 1.0)).sum(1)
        out[:, sl] = torch.where(positive[:, sl], err, second_moment[:, None])
    return out


class _DistributionObserver(RangeObserver):
    def __init__(self, axis, symmetric, max_exact_values: int, bins: int):
        super().__init__(axis, symmetric)
        self.distribution = _Distribution(max_exact_values, bins)

    def _observe(self, x2d):
        self.distribution.add(x2d)


# ------------------------------------------------------------------ Percentile


class PercentileObserver(_DistributionObserver):
    """The range is a percentile of the values (Li et al., 2019): outliers beyond it are clipped.

    Symmetric: ``c = P_p(|x|)``, range ``[-c, c]``. Asymmetric: ``[P_(100-p)(x), P_p(x)]``.
    Percentiles interpolate linearly between order statistics (exact mode) or within a
    histogram bin (histogram mode, accurate to one bin width ``2 R / bins``).
    """

    name = "percentile"

    def __init__(
        self,
        axis: int | None = None,
        symmetric: bool = True,
        percentile: float = 99.99,
        max_exact_values: int = 1 << 22,
        bins: int = 2048,
    ):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
        super().__init__(axis, symmetric, max_exact_values, bins)
        self.percentile = float(percentile)

    def _extra_repr(self):
        return f"percentile={self.percentile}"

    def _range(self, grid):
        q = self.percentile / 100.0
        if self.symmetric:
            c = self.distribution.quantile(q, absolute=True)
            return -c, c
        return self.distribution.quantile(1.0 - q, absolute=False), self.distribution.quantile(q, absolute=False)


# ------------------------------------------------------------------------ OMSE


class OMSEObserver(_DistributionObserver):
    """The clipping range that minimises the L2 quantization error for the grid (Choukroun et al., 2019).

    Symmetric: candidates ``c = a * j / num_candidates`` (``a`` = absmax, j = 1..M) give
    ``scale = c / qmax``; the best is refined on a finer grid between its neighbours, and
    (with exact values) by alternating least squares: for fixed levels ``l`` the best
    scale is ``<x, l> / <l, l>``, and re-rounding with that scale cannot increase the
    error, so every step is accepted only if it lowers the error. MinMax's range is the
    last candidate, so OMSE's error is never worse than MinMax's.

    Asymmetric: a ``num_candidates_2d`` x ``num_candidates_2d`` grid over fractions of
    (min, max), then a finer grid around the best pair.
    """

    name = "omse"

    def __init__(
        self,
        axis: int | None = None,
        symmetric: bool = True,
        num_candidates: int = 40,
        refine_candidates: int = 10,
        refine_steps: int = 6,
        num_candidates_2d: int = 24,
        max_exact_values: int = 1 << 22,
        bins: int = 2048,
    ):
        for name, value, least in (
            ("num_candidates", num_candidates, 1),
            ("refine_candidates", refine_candidates, 0),
            ("refine_steps", refine_steps, 0),
            ("num_candidates_2d", num_candidates_2d, 2),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        super().__init__(axis, symmetric, max_exact_values, bins)
        self.num_candidates = num_candidates
        self.refine_candidates = refine_candidates
        self.refine_steps = refine_steps
        self.num_candidates_2d = num_candidates_2d

    def _extra_repr(self):
        return f"num_candidates={self.num_candidates}"

    def _range(self, grid):
        lo, hi = self.distribution.extremes()
        if self.symmetric:
            c = self._search_symmetric(torch.maximum(lo.abs(), hi.abs()).to(torch.float32), grid)
            return -c, c
        return self._search_asymmetric(lo, hi, grid)

    # -- symmetric
    def _search_symmetric(self, absmax: torch.Tensor, grid: Grid) -> torch.Tensor:
        dist = self.distribution
        m = self.num_candidates
        fractions = torch.arange(1, m + 1, dtype=torch.float32) / m
        clip = absmax[:, None] * fractions[None]
        err = dist.squared_error(clip / grid.qmax, torch.zeros_like(clip), grid)
        best_err, index = err.min(dim=1)
        best = clip.gather(1, index[:, None])[:, 0]
        if self.refine_candidates:
            # A finer grid between the best candidate's neighbours.
            f = (index.to(torch.float32) + 1) / m
            lo_f, hi_f = (f - 1.0 / m).clamp(min=0), (f + 1.0 / m).clamp(max=1)
            t = torch.linspace(0, 1, self.refine_candidates + 2, dtype=torch.float32)[1:-1]
            fine = absmax[:, None] * (lo_f[:, None] + (hi_f - lo_f)[:, None] * t[None])
            fine_err = dist.squared_error(fine / grid.qmax, torch.zeros_like(fine), grid)
            e, i = fine_err.min(dim=1)
            better = e < best_err
            best = torch.where(better, fine.gather(1, i[:, None])[:, 0], best)
            best_err = torch.where(better, e, best_err)
        if dist.is_exact and self.refine_steps:
            values = dist.sorted_values()
            for _ in range(self.refine_steps):
                ls_scale = _least_squares_scale(values, best / grid.qmax, grid)
                candidate = (ls_scale * grid.qmax)[:, None]
                e = dist.squared_error(candidate / grid.qmax, torch.zeros_like(candidate), grid)[:, 0]
                better = (e < best_err) & (ls_scale > 0)
                # Converged once no channel gains more than 1e-6 of its error.
                gained = bool((better & (e < best_err * (1 - 1e-6))).any())
                best = torch.where(better, candidate[:, 0], best)
                best_err = torch.where(better, e, best_err)
                if not gained:
                    break
        return best

    # -- asymmetric
    def _search_asymmetric(self, lo: torch.Tensor, hi: torch.Tensor, grid: Grid):
        dist = self.distribution
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        n = self.num_candidates_2d
        f = torch.arange(1, n + 1, dtype=torch.float32) / n
        lo_c = (lo[:, None, None] * f[None, :, None]).expand(-1, n, n).reshape(lo.shape[0], -1)
        hi_c = (hi[:, None, None] * f[None, None, :]).expand(-1, n, n).reshape(hi.shape[0], -1)
        best_lo, best_hi, best_err = self._score_pairs(lo_c, hi_c, grid)
        # Refine: a finer grid of one coarse step either side of the best pair.
        t = torch.linspace(-1.0, 1.0, 9, dtype=torch.float32) / n
        lo_f = torch.clamp(best_lo[:, None] + lo[:, None] * t[None], lo[:, None].expand(-1, 9), torch.zeros(1))
        hi_f = torch.clamp(best_hi[:, None] + hi[:, None] * t[None], torch.zeros(1), hi[:, None].expand(-1, 9))
        lo_c = lo_f[:, :, None].expand(-1, 9, 9).reshape(lo.shape[0], -1)
        hi_c = hi_f[:, None, :].expand(-1, 9, 9).reshape(hi.shape[0], -1)
        fine_lo, fine_hi, fine_err = self._score_pairs(lo_c, hi_c, grid)
        better = fine_err < best_err
        return torch.where(better, fine_lo, best_lo), torch.where(better, fine_hi, best_hi)

    def _score_pairs(self, lo_c, hi_c, grid):
        scale, zero_point = range_to_qparams(lo_c, hi_c, grid, symmetric=False)
        err = self.distribution.squared_error(scale, zero_point, grid)
        # A degenerate (zero-width) candidate is never better than a real one.
        err = torch.where(scale > 0, err, torch.full_like(err, float("inf")))
        e, i = err.min(dim=1)
        return lo_c.gather(1, i[:, None])[:, 0], hi_c.gather(1, i[:, None])[:, 0], e


# ------------------------------------------------------------------- registry

OBSERVERS: dict[str, type[RangeObserver]] = {
    cls.name: cls for cls in (MinMaxObserver, EMAObserver, PercentileObserver, OMSEObserver)
}


def make_observer(observer, argument: str = "observer", **kwargs) -> RangeObserver:
    """An observer from a name ("minmax", "ema", "percentile", "omse"), a class, or a factory.

    ``kwargs`` (axis, symmetric, ...) are passed to the constructor.
    """
    if isinstance(observer, str):
        if observer not in OBSERVERS:
            raise ValueError(f"{argument} must be one of {sorted(OBSERVERS)} or an observer factory, got {observer!r}")
        return OBSERVERS[observer](**kwargs)
    if callable(observer):
        made = observer(**kwargs)
        if not isinstance(made, Observer):
            raise ValueError(f"{argument} must build an object with observe(x) and qparams(grid), got {type(made).__name__}")
        return made
    raise ValueError(f"{argument} must be one of {sorted(OBSERVERS)} or an observer factory, got {observer!r}")
