"""The observer protocol and the observers that keep only the extremes: MinMax and EMA.

``observe(x)`` any number of times, then ``qparams(grid)`` gives the scale (and zero point) for a
`primitives.Grid`; see pyclipq.calibrate.observers for the family and the registry.
"""
from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from ..primitives import Grid, QParams, all_finite, range_to_qparams
from ._threads import one_thread


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
        if not all_finite(x):
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
