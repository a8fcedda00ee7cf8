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

The grid quantizer (`Grid`, `QParams`, `fake_quantize`, `quantization_error`) lives in
pyclipq.primitives; the observers in `range_observers` (MinMax, EMA), `distribution`
(Percentile) and `omse` (OMSE). This module holds the registry and re-exports them all.
"""
from __future__ import annotations

from ..primitives import Grid, QParams, fake_quantize, quantization_error
from .distribution import PercentileObserver
from .omse import OMSEObserver
from .range_observers import EMAObserver, MinMaxObserver, Observer, RangeObserver

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
