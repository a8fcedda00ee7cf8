"""OMSE (Choukroun et al., 2019): the clipping range that minimises the squared quantization error
for the grid it will be used with, searched over candidate ranges of the observed distribution.
"""
from __future__ import annotations

import torch

from ..primitives import Grid, range_to_qparams
from .distribution import _DistributionObserver, _SortedValues


def _least_squares_scale(values: _SortedValues, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """For the levels each value rounds to at `scale` [C], the scale minimising the error:
    sum_j l_j S1_j / sum_j N_j l_j^2 (symmetric grids)."""
    levels = grid.levels().to(torch.float64)
    centers = levels[None, None, :] * scale[:, None, None].to(torch.float64)
    count, s1, _ = values.cell_sums(centers)
    num = (levels * s1[:, 0]).sum(dim=1)
    den = (levels**2 * count[:, 0]).sum(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num)).to(torch.float32)



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
