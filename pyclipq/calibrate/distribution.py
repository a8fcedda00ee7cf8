"""The distribution of observed values (exact while small, a fixed-size histogram per channel
beyond), its squared quantization error for candidate ranges, and the Percentile observer.
"""
from __future__ import annotations

import math

import torch

from ..primitives import Grid, fake_quantize, safe_inverse
from .range_observers import RangeObserver


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
        inv = safe_inverse(s)
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
