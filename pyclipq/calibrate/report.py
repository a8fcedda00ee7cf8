"""What a calibration did, layer by layer: the result `pyclipq.calibrate` returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerCalibration:
    name: str
    format: str
    act_scale: float | None = None  # the static scale fixed (None: layer not static)
    weights: str = "format rule"  # "format rule", "observer:<name>", "gptq" or "gptq+<observer>"
    proxy_error_rtn: float | None = None  # tr(dW H dW^T) / tr(W H W^T) with RTN (GPTQ layers)
    proxy_error: float | None = None  # the same for the weights now in the layer
    activation: str | None = None  # the layer's activation mode after calibration
    smoothing: str = "none"  # "folded" / "online" when smoothing chose it


@dataclass
class CalibrationReport:
    observer: str
    num_batches: int
    layers: list[LayerCalibration] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    notes: list[str] = field(default_factory=list)
    smoothing: list = field(default_factory=list)  # smooth.SmoothingChoice per unit, when smooth was asked

    def __str__(self) -> str:
        static = [l for l in self.layers if l.act_scale is not None]
        lines = [
            f"pyclipq calibration: observer={self.observer}, batches={self.num_batches}, passes={self.passes}, "
            f"{self.seconds:.1f}s; {len(static)} static activation scales fixed"
        ]
        gptq = [l for l in self.layers if l.proxy_error is not None and l.proxy_error_rtn]
        if gptq:
            ratio = sum(l.proxy_error / l.proxy_error_rtn for l in gptq) / len(gptq)
            lines.append(f"  GPTQ on {len(gptq)} layers: layer-output error {ratio:.3f}x of round-to-nearest (mean)")
        smoothed = [c for c in self.smoothing if c.alpha is not None]
        if self.smoothing:
            folded = sum(len(c.layers) for c in smoothed if c.norm is not None)
            online = sum(len(c.layers) for c in smoothed if c.norm is None)
            dynamic = sum(len(c.dynamic) for c in self.smoothing)
            lines.append(f"  smoothing: {folded} layers folded into LayerNorms, {online} online, "
                         f"{len(self.smoothing) - len(smoothed)} units kept unsmoothed; {dynamic} layers fell back to dynamic")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
