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
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import formats
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize, layer_output_error, rtn_quantize
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
from .weights import load_quantized_weight, quantize_weight_observed, quantize_weight_with_scales

__all__ = [
    "calibrate",
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
# switching to their fixed-size histogram: calibration memory stays O(layers * bins).
ACTIVATION_EXACT_VALUES = 1 << 16


@dataclass
class LayerCalibration:
    name: str
    format: str
    act_scale: float | None = None  # the static scale fixed (None: layer not static)
    weights: str = "format rule"  # "format rule", "observer:<name>", "gptq" or "gptq+<observer>"
    proxy_error_rtn: float | None = None  # tr(dW H dW^T) / tr(W H W^T) with RTN (GPTQ layers)
    proxy_error: float | None = None  # the same for the weights now in the layer


@dataclass
class CalibrationReport:
    observer: str
    num_batches: int
    layers: list[LayerCalibration] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    notes: list[str] = field(default_factory=list)

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
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs


class _StopForward(Exception):
    """Raised by a hook once every layer a GPTQ chunk needs has seen this batch."""


def _quant_linears(model: nn.Module):
    from ..nn import QuantLinear

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not module.layer.is_float:
            yield name, module


def _check_model(model) -> list:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module converted by pyclipq.convert, got {type(model).__name__}")
    linears = list(_quant_linears(model))
    static = [(n, m) for n, m in linears if m.layer.activation == "static"]
    if not static:
        modes = sorted({m.layer.activation for _, m in linears})
        found = f"its quantized linears use activation {modes}" if linears else "it has no pyclipq QuantLinear"
        raise ValueError(
            "model was not converted with static activations "
            f"({found}): convert it with pyclipq.convert(model, QuantConfig(<format>, activation='static')) first"
        )
    return linears


def _batch_passes(batches, num_batches: int):
    """A function returning an iterator over the (at most num_batches) calibration batches, once per pass."""
    if isinstance(batches, (torch.Tensor, dict, str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(
            "batches must be an iterable of batches (a list or DataLoader of image tensors, token-id tensors, "
            f"(images, token_ids) pairs or dicts of model inputs), got {type(batches).__name__}"
        )
    if iter(batches) is batches:
        # A one-shot iterator (a generator) can be read once: keep the batches for later passes.
        kept = list(itertools.islice(batches, num_batches))
        source = lambda: iter(kept)  # noqa: E731
    else:
        source = lambda: itertools.islice(iter(batches), num_batches)  # noqa: E731
    if next(source(), None) is None:
        raise ValueError("batches: got no calibration batches (an empty iterable); calibration needs at least one")
    return source


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_tokens(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dim() >= 1


def _encode(model, kind: str, x):
    if kind == "image":
        for method, keyword in (("encode_image", None), ("get_image_features", "pixel_values")):
            if callable(getattr(model, method, None)):
                return getattr(model, method)(x) if keyword is None else getattr(model, method)(**{keyword: x})
    else:
        for method, keyword in (("encode_text", None), ("get_text_features", "input_ids")):
            if callable(getattr(model, method, None)):
                return getattr(model, method)(x) if keyword is None else getattr(model, method)(**{keyword: x})
    return model(x)


def default_forward(model: nn.Module, batch) -> None:
    """Run one calibration batch through a CLIP-like model (or any model).

    - a float tensor: images -> ``encode_image`` / ``get_image_features`` / ``model(x)``;
    - an integer tensor: token ids -> ``encode_text`` / ``get_text_features`` / ``model(x)``;
    - a tuple / list: its float tensor is the images, an integer tensor of >= 2 dims the token
      ids, and a 1-D integer tensor (labels, as DataLoaders give) is ignored;
    - a dict: ``model(**batch)``.
    """
    device = _device(model)
    if isinstance(batch, dict):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            _encode(model, "image", batch.to(device))
        elif _is_tokens(batch):
            _encode(model, "text", batch.to(device))
        else:
            raise ValueError(f"batches: a tensor batch must be float images or integer token ids, got {batch.dtype}")
        return
    if isinstance(batch, (tuple, list)):
        images = [t for t in batch if isinstance(t, torch.Tensor) and t.is_floating_point()]
        tokens = [t for t in batch if _is_tokens(t) and t.dim() >= 2]
        if any(isinstance(t, str) for t in batch) or any(
            isinstance(t, (list, tuple)) and t and isinstance(t[0], str) for t in batch
        ):
            raise ValueError("batches: texts must be token ids (tokenize them first), got strings")
        if not images and not tokens:
            raise ValueError("batches: a tuple batch needs an image tensor and/or a 2-D token-id tensor")
        for t in images[:1]:
            _encode(model, "image", t.to(device))
        for t in tokens[:1]:
            _encode(model, "text", t.to(device))
        return
    raise ValueError(
        f"batches: each batch must be a tensor, an (images, token_ids) tuple or a dict, got {type(batch).__name__}"
    )


# ------------------------------------------------------------------ float weights


def _float_weight(float_model: nn.Module, name: str, shape) -> torch.Tensor:
    """The float weight of converted layer `name` in the unconverted model.

    A swapped nn.Linear keeps its path (``<name>.weight``); an attention's packed in_proj
    (``<attn>.in_proj``) is ``<attn>.in_proj_weight`` in nn.MultiheadAttention and open_clip.
    """
    shape = tuple(shape)
    try:
        module = float_model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape:
            return weight.detach()
    except AttributeError:
        pass
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = float_model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    weight = getattr(owner, f"{attr}_weight", None) if owner is not None else None
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape:
        return weight.detach()
    raise ValueError(
        f"float_model has no float weight of shape {list(shape)} for layer {name!r}: pass the same model "
        "before pyclipq.convert (e.g. copy.deepcopy(model) taken before converting)"
    )


def _float_parameter(float_model: nn.Module, owner_name: str, attr: str, packed) -> torch.Tensor:
    from ..nn.parameter import to_rows

    try:
        tensor = getattr(float_model.get_submodule(owner_name), attr)
    except AttributeError:
        tensor = None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(packed.shape):
        raise ValueError(
            f"float_model has no float tensor {owner_name + '.' if owner_name else ''}{attr} of shape {list(packed.shape)}: "
            "pass the same model before pyclipq.convert"
        )
    return to_rows(tensor.detach(), packed.layout)


def _proxy_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) = ||X dW^T||^2 / ||X W^T||^2 over the calibration inputs."""
    h = hessian.to(torch.float32)
    num = ((delta.float() @ h) * delta.float()).sum(dtype=torch.float64)
    den = ((weight.float() @ h) * weight.float()).sum(dtype=torch.float64)
    return float(num / den.clamp(min=1e-30))


# ------------------------------------------------------------------ calibrate


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
) -> CalibrationReport:
    """Fix the static activation scales of `model` (in place) from calibration batches.

    model: converted with ``activation="static"`` (its QuantLinears hold ``act_scale`` buffers).
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

    Returns a CalibrationReport. Raises ValueError for zero batches, non-finite activations,
    a model without static activations, or layers that no batch reached.
    """
    started = time.perf_counter()
    linears = _check_model(model)
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
    if (weight_observer is not None or gptq) and float_model is None:
        raise ValueError(
            "float_model is required with weight_observer or gptq=True: a converted model no longer holds its "
            "float weights; pass the unconverted model (e.g. copy.deepcopy(model) taken before pyclipq.convert)"
        )
    if float_model is not None and not isinstance(float_model, nn.Module):
        raise ValueError(f"float_model must be a torch.nn.Module, got {type(float_model).__name__}")
    if forward is not None and not callable(forward):
        raise ValueError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
    source = _batch_passes(batches, num_batches)
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
        if weight_observer is not None:
            _apply_weight_observer(model, float_model, weight_observer, entries, skip_linears=gptq)
            finished("weight_observer")
        order = _calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report, "activations")
        finished("activations")
        if gptq:
            _apply_gptq(
                model, linears, float_model, source, run, order, weight_observer, entries, progress, report,
                damp=gptq_damp, block_size=gptq_block_size, act_order=gptq_act_order, budget=max_hessian_bytes,
            )
            finished("gptq")
            # The weights changed: downstream activations changed too, so observe them again.
            _calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report, "activations (after GPTQ)")
            finished("activations")
    finally:
        model.train(was_training)
    for name, module in linears:
        if module.layer.activation == "static":
            entries[name].act_scale = float(module.act_scale)
    report.layers = [entries[n] for n, _ in linears]
    report.seconds = time.perf_counter() - started
    return report


def _calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report, description):
    """Observe every static layer's input over all batches, then fix its scale.

    While observing, each layer quantizes with the scale of the batch at hand (absmax / 127,
    per tensor) so the forward can run; the final scale replaces it afterwards.
    Returns the layers in the order of their first call (for GPTQ's chunks).
    """
    static = [(n, m) for n, m in linears if m.layer.activation == "static"]
    observers = {n: make_observer(observer, "observer", **observer_kwargs) for n, _ in static}
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    batch_index = [0]

    def hook_for(name, module):
        obs = observers.get(name)

        def hook(mod, args):
            x = args[0]
            if name not in seen:
                seen.add(name)
                order.append(name)
            if obs is None:
                return None
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"batches: the activations entering {name} contain NaN or Inf (calibration batch {batch_index[0]}); "
                    "static scales need finite activations - check the inputs and the float model"
                )
            obs.observe(x)
            absmax = float(x.detach().abs().max()) if x.numel() else 0.0
            mod.set_act_scale(absmax / formats.ACT_QMAX if absmax > 0 else 1.0)
            return None

        return hook

    for name, module in linears:
        handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        with torch.inference_mode():
            for batch in tqdm(source(), desc=f"calibrate: {description}", disable=not progress, leave=False):
                run(model, batch)
                batch_index[0] += 1
    finally:
        for h in handles:
            h.remove()
    report.passes += 1
    report.num_batches = batch_index[0]
    missing = [n for n, _ in static if observers[n].num_batches == 0]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"batches: no calibration batch reached {len(missing)} static layer(s) ({shown}); feed inputs for every "
            "tower, e.g. (images, token_ids) pairs for a CLIP model"
        )
    grid = Grid.activations()
    for name, module in static:
        scale = float(observers[name].qparams(grid).scale)
        if not scale > 0:
            # Every calibration input of this layer was 0: any positive scale quantizes them exactly.
            report.notes.append(f"{name}: all calibration inputs were 0; act_scale set to 1.0")
            scale = 1.0
        module.set_act_scale(scale)
    return order


def _apply_weight_observer(model, float_model, weight_observer, entries, skip_linears: bool):
    """Re-quantize every packed weight from the float model with observer-chosen scales."""
    from ..nn.parameter import packed_parameters

    label = f"observer:{weight_observer if isinstance(weight_observer, str) else 'custom'}"
    if not skip_linears:
        for name, module in _quant_linears(model):
            w = _float_weight(float_model, name, (module.out_features, module.in_features))
            codes, scale = quantize_weight_observed(
                w.float().cpu(), module.layer.format, module.layer.group_size, weight_observer, module.layer.threshold_rule
            )
            load_quantized_weight(module, codes, scale)
            entries[name].weights = label
    for owner_name, attr, packed in packed_parameters(model):
        if packed.layer.is_float:
            continue
        w = _float_parameter(float_model, owner_name, attr, packed)
        codes, scale = quantize_weight_observed(
            w.float().cpu(), packed.layer.format, packed.layer.group_size, weight_observer, packed.layer.threshold_rule
        )
        load_quantized_weight(packed, codes, scale)


def _chunks(order, modules, budget):
    """Consecutive layers (in call order) whose [K, K] float32 Hessians fit in `budget` bytes."""
    chunk, used = [], 0
    for name in order:
        k = modules[name].in_features
        size = 4 * k * k
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


def _apply_gptq(model, linears, float_model, source, run, order, weight_observer, entries, progress, report, *,
                damp, block_size, act_order, budget):
    modules = dict(linears)
    # Layers called in the first pass, in call order, then any never called (they keep RTN).
    order = [n for n in order if n in modules]
    uncalled = [n for n in modules if n not in order]
    if uncalled:
        report.notes.append(f"GPTQ skipped {len(uncalled)} layer(s) no batch reached (kept as converted)")
    chunks = list(_chunks(order, modules, budget))
    for index, chunk in enumerate(chunks):
        wanted = set(chunk)
        accumulators = {n: HessianAccumulator(modules[n].in_features) for n in chunk}
        after = order.index(chunk[-1]) + 1
        stop_at = order[after] if after < len(order) else None
        seen: set[str] = set()
        handles = []

        def hook_for(name):
            def hook(mod, args):
                if name in wanted:
                    accumulators[name].add(args[0])
                    seen.add(name)
                elif name == stop_at and seen == wanted:
                    # Every layer of this chunk has its inputs for this batch: skip the rest of the model.
                    raise _StopForward
                return None

            return hook

        for name in chunk + ([stop_at] if stop_at else []):
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        try:
            with torch.inference_mode():
                for batch in tqdm(source(), desc=f"calibrate: GPTQ {index + 1}/{len(chunks)}", disable=not progress, leave=False):
                    seen.clear()
                    try:
                        run(model, batch)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        report.passes += 1
        for name in chunk:
            module = modules[name]
            layer = module.layer
            w = _float_weight(float_model, name, (module.out_features, module.in_features)).float().cpu()
            hessian = accumulators.pop(name).hessian
            group_size = layer.group_size if formats.get_format(layer.format).grouped else 0
            rounding_started = time.perf_counter()
            result = gptq_quantize(
                w, hessian, layer.format, group_size, observer=weight_observer, threshold_rule=layer.threshold_rule,
                damp=damp, block_size=block_size, act_order=act_order,
            )
            report.stage_seconds["gptq_rounding"] = report.stage_seconds.get("gptq_rounding", 0.0) + time.perf_counter() - rounding_started
            _, _, rtn = rtn_quantize(w, layer.format, group_size, observer=weight_observer, threshold_rule=layer.threshold_rule)
            load_quantized_weight(module, result.codes, result.scale)
            entry = entries[name]
            entry.weights = "gptq" + (f"+{weight_observer}" if isinstance(weight_observer, str) else "")
            entry.proxy_error_rtn = _proxy_error(rtn - w, w, hessian)
            entry.proxy_error = _proxy_error(result.weight - w, w, hessian)
