"""Post-training calibration: static activation scales, observer-chosen weight scales, GPTQ rounding.

``pyclipq.calibrate(model, batches)`` takes a model converted with static activations
(``pyclipq.convert(model, QuantConfig("int8", activation="static"))``), feeds calibration
batches through it, records the input of every quantized Linear with an observer
(P4Q §3.1 / §4.1: MinMax, EMA, Percentile, OMSE) and fixes each layer's per-tensor
activation scale (docs/FORMATS.md, "Activations": ``q = clamp(round(x / S), -127, 127)``).

Optionally it also re-quantizes the weights from the float model:
``weight_observer="omse"`` chooses clipped per-channel / per-group weight scales, and
``gptq=True`` rounds every QuantLinear with error feedback from its calibration inputs
(pyclipq.calibrate.gptq). A converted model no longer holds float weights, so both need
``float_model=`` (the same architecture with float weights, e.g. a deepcopy taken
before conversion).

The pipeline lives in named modules, re-exported here: ``pipeline`` (the ``calibrate``
entry point), ``inputs`` (feeding batches), ``activations`` (activation observation),
``requantize`` (weight re-quantization from the float model), ``gptq_schedule`` (which
layers share a GPTQ pass), ``report`` (what a run did); the math is ``observers``,
``weights``, ``gptq`` and pyclipq.primitives.
"""
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize, layer_output_error, rtn_quantize
from .inputs import default_forward
from .observers import (
    OBSERVERS,
    EMAObserver,
    Grid,
    MinMaxObserver,
    Observer,
    OMSEObserver,
    PercentileObserver,
    QParams,
    RangeObserver,
    fake_quantize,
    make_observer,
    quantization_error,
)
from .pipeline import calibrate
from .report import CalibrationReport, LayerCalibration
from .weights import load_quantized_weight, quantize_weight_observed, quantize_weight_with_scales

__all__ = [
    "calibrate",
    "default_forward",
    "CalibrationReport",
    "LayerCalibration",
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
    "HessianAccumulator",
    "GPTQResult",
    "gptq_quantize",
    "rtn_quantize",
    "layer_output_error",
    "load_quantized_weight",
    "quantize_weight_observed",
    "quantize_weight_with_scales",
]

# Streaming activation observers keep at most this many exact values per layer before
