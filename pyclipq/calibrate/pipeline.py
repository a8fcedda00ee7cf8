"""`pyclipq.calibrate`: static activation scales, then optional weight re-quantization."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from torch import nn

from .activations import ACTIVATION_EXACT_VALUES, calibrate_activations
from .gptq_schedule import apply_gptq
from .inputs import batch_passes, check_model, default_forward
from .observers import make_observer
from .report import CalibrationReport, LayerCalibration
from .requantize import apply_weight_observer
from .smooth import alpha_grid, smooth_model


def calibrate(
    model: nn.Module,
    batches: Iterable,
    observer="omse",
    num_batches: int = 10,
    weight_observer=None,
    gptq: bool = False,
    progress: bool = True,
    *,
    float_model: nn.Module | None = None,
    forward: Callable | None = None,
    observer_kwargs: dict | None = None,
    gptq_damp: float = 0.01,
    gptq_block_size: int = 128,
    gptq_act_order: bool = False,
    max_hessian_bytes: int = 512 * 2**20,
    clip_search: bool = False,
    smooth=None,
    dynamic_fallback: float | None = None,
) -> CalibrationReport:
    """Calibrate a converted `model` in place: outlier smoothing, weight re-rounding, static scales.

    model: converted by pyclipq.convert with any activation mode. Static layers
        (``activation="static"``) get their per-tensor scales here; the weight-side methods
        (weight_observer, gptq, clip_search) and smoothing work for dynamic and weight-only
        layers too. A model without static layers needs at least one of them.
    batches: an iterable of batches (see `default_forward`: images, token ids,
        (images, token_ids) pairs, dicts), of which the first `num_batches` are used.
    observer: "minmax" | "ema" | "percentile" | "omse" (P4Q's baseline) or an observer
        factory; `observer_kwargs` go to its constructor (e.g. ``{"percentile": 99.9}``).
    weight_observer: None keeps the weights as converted; "omse" (or another observer)
        re-chooses every weight scale (per channel / per group, on the format's grid).
    gptq: re-round every QuantLinear with GPTQ from its calibration inputs (int4 / int2 /
        ternary gain most); scales from `weight_observer` or the format's rule.
    float_model: the unconverted model; needed by weight_observer and gptq.
    forward: ``forward(model, batch)`` replacing `default_forward`.
    max_hessian_bytes: GPTQ collects the [K, K] Hessians of as many consecutive layers as
        fit in this budget per pass over the batches (earlier chunks are already rounded,
        so later layers see the quantized model's inputs).
    clip_search: choose every weight scale (per channel / group) for the least *output*
        error on the calibration inputs (``weights.output_aware_scales``), then round to
        nearest, or with GPTQ when ``gptq=True``. Needs float_model.
    smooth: SmoothQuant outlier migration before everything else (``calibrate.smooth``):
        True or "search" searches alpha per layer over ``smooth.ALPHAS``; a number fixes
        alpha; a sequence of numbers is the search grid. Folded into pre-LN LayerNorms where
        exact, online elsewhere. Needs float_model.
    dynamic_fallback: with smooth, a static layer whose smoothed error stays above this
        multiple of the dynamic-activation error becomes dynamic (e.g. 4.0); None keeps all.

    Returns a CalibrationReport. Raises ValueError for zero batches, non-finite activations,
    a model without static activations and no weight-side method, or layers no batch reached.
    """
    started = time.perf_counter()
    alphas = alpha_grid(smooth)
    if not isinstance(clip_search, bool):
        raise ValueError(f"clip_search must be True or False, got {clip_search!r}")
    if clip_search and weight_observer is not None:
        raise ValueError("weight_observer and clip_search both choose the weight scales: pass one of them")
    if dynamic_fallback is not None and alphas is None:
        raise ValueError("dynamic_fallback chooses between smoothed static and dynamic activations: it needs smooth")
    weight_side = gptq or clip_search or weight_observer is not None or alphas is not None
    linears = check_model(model, needs_static=not weight_side)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    if not isinstance(gptq, bool):
        raise ValueError(f"gptq must be True or False, got {gptq!r}")
    observer_kwargs = dict(observer_kwargs or {})
    if isinstance(observer, str) and observer in ("percentile", "omse"):
        observer_kwargs.setdefault("max_exact_values", ACTIVATION_EXACT_VALUES)
    probe = make_observer(observer, "observer", **observer_kwargs)  # validates name and kwargs
    if not getattr(probe, "symmetric", True) or getattr(probe, "axis", None) is not None:
        # docs/FORMATS.md: static activations are one symmetric per-tensor scale, q = clamp(round(x / S)).
        raise ValueError(
            "observer must observe per tensor (axis=None) and symmetrically: static activations are one "
            f"symmetric int8 scale per layer, got {probe!r}"
        )
    if weight_observer is not None:
        make_observer(weight_observer, "weight_observer", axis=0)
    if weight_side and float_model is None:
        raise ValueError(
            "float_model is required with weight_observer, gptq, clip_search or smooth: a converted model no longer holds its "
            "float weights; pass the unconverted model (e.g. copy.deepcopy(model) taken before pyclipq.convert)"
        )
    if float_model is not None and not isinstance(float_model, nn.Module):
        raise ValueError(f"float_model must be a torch.nn.Module, got {type(float_model).__name__}")
    if forward is not None and not callable(forward):
        raise ValueError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
    source = batch_passes(batches, num_batches)
    run = forward or default_forward
    report = CalibrationReport(observer if isinstance(observer, str) else getattr(observer, "__name__", "custom"), 0)
    entries = {n: LayerCalibration(n, m.layer.format) for n, m in linears}

    was_training = model.training
    model.eval()
    stage = [time.perf_counter()]

    def finished(name):
        now = time.perf_counter()
        report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + now - stage[0]
        stage[0] = now

    try:
        if alphas is not None:
            report.smoothing = smooth_model(model, float_model, source, run, alphas=alphas,
                                            dynamic_fallback=dynamic_fallback, progress=progress)
            linears = check_model(model, needs_static=False)  # smoothed layers were replaced
            finished("smoothing")
        rerounds = gptq or clip_search
        if weight_observer is not None:
            apply_weight_observer(model, float_model, weight_observer, entries, skip_linears=rerounds)
            finished("weight_observer")
        order = []
        if rerounds or any(m.layer.activation == "static" for _, m in linears):
            # (GPTQ's chunks follow the call order this pass records)
            order = calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report,
                                          "activations")
            finished("activations")
        if rerounds:
            apply_gptq(
                model, linears, float_model, source, run, order, weight_observer, entries, progress, report,
                damp=gptq_damp, block_size=gptq_block_size, act_order=gptq_act_order, budget=max_hessian_bytes,
                gptq=gptq, clip_search=clip_search,
            )
            finished("gptq" if gptq else "clip_search")
        if rerounds and any(m.layer.activation == "static" for _, m in linears):
            # The weights changed: downstream activations changed too, so observe them again.
            calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report, "activations (after GPTQ)")
            finished("activations")
    finally:
        model.train(was_training)
    for name, module in linears:
        entries[name].activation = module.layer.activation
        entries[name].smoothing = module.layer.smoothing
        if module.layer.activation == "static":
            entries[name].act_scale = float(module.act_scale)
    report.layers = [entries[n] for n, _ in linears]
    report.seconds = time.perf_counter() - started
    return report
