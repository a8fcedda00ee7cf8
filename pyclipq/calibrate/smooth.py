"""Outlier migration (SmoothQuant; Xiao et al., 2023) for layers with int8 activations.

A few input channels of real transformers carry activations far above the rest, and one
int8 scale per tensor (or per token) spends its range on them. Per input channel j,
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``primitives.smoothing_scales``) moves
that range into the weights: ``(x / s) (W * s)^T = x W^T``.

Where the division goes:
- **folded**: a pre-LN block's LayerNorm feeds only its linears (q/k/v after ln_1, fc1
  after ln_2 in open_clip, OpenAI and HF CLIP; the adapters name them), so ``gamma / s``
  and ``beta / s`` do it exactly, at no run-time cost. The linears sharing the norm share s.
- **online**: everywhere else there is no exact fold: out_proj's input is a mix of value
  heads, fc2's comes through GELU, and in post-LN models (BERT) every norm's output also
  feeds the residual stream. There the layer divides by its ``smooth_scale`` buffer at
  run time (one elementwise product).

alpha is searched per unit (a norm's group of linears, or one layer) over `ALPHAS`, with
"no smoothing" as a candidate: each candidate runs the real quantized layer on a sample
of the calibration inputs, and the least relative output error wins, so smoothing never
makes a layer worse on those inputs. With ``dynamic_fallback=r``, a static layer whose
best error is still above r times the error of dynamic per-token activations becomes
dynamic (a per-layer choice between a smoothed static scale and a dynamic one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import primitives
from ..configs import LayerConfig
from ..models import detect_adapter
from ..nn import QuantLinear
from .activations import set_absmax_scale
from .inputs import quant_linears
from .requantize import float_weight

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SAMPLE_ROWS = 1024  # input rows kept per layer for the alpha search


@dataclass
class SmoothingChoice:
    """What the search chose for one unit (a norm's linears, or one linear)."""

    layers: list[str]
    norm: str | None  # the LayerNorm folded into, or None (online)
    alpha: float | None  # None: no smoothing won
    error: float  # relative output error with the choice (static scale from the sample's absmax)
    error_unsmoothed: float
    dynamic: list[str] = dataclasses.field(default_factory=list)  # layers switched to dynamic


class _InputStats:
    """Per-channel absmax and a row sample of one layer's inputs over the calibration batches."""

    def __init__(self, name: str, rows_per_batch: int, generator: torch.Generator):
        self.name = name
        self.absmax = None
        self.rows: list[torch.Tensor] = []
        self.rows_per_batch = rows_per_batch
        self.generator = generator

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if not primitives.all_finite(x):
            raise ValueError(f"batches: the activations entering {self.name} contain NaN or Inf; smoothing needs "
                             "finite calibration inputs")
        amax = x.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        take = min(self.rows_per_batch, x.shape[0])
        index = torch.randperm(x.shape[0], generator=self.generator)[:take]
        self.rows.append(x[index])

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def alpha_grid(smooth):
    """The alpha grid a `smooth` argument asks for (True / "search": `ALPHAS`; a number; a sequence
    of numbers), or None for no smoothing. A ValueError names what was wrong."""
    if smooth is None or smooth is False:
        return None
    if smooth is True or smooth == "search":
        return ALPHAS
    if isinstance(smooth, (int, float)) and not isinstance(smooth, bool):
        alphas = (float(smooth),)
    elif isinstance(smooth, (list, tuple)):
        alphas = tuple(smooth)
    else:
        raise ValueError(f"smooth must be None, True, 'search', an alpha in [0, 1] or a sequence of them, got {smooth!r}")
    if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"smooth alphas must be numbers in [0, 1], got {smooth!r}")
    return alphas


def _units(model: nn.Module, candidates: dict[str, QuantLinear]):
    """(norm name or None, [layer names]): the norm folds whose linears are all candidates, then
    every other candidate on its own."""
    units, folded = [], set()
    for norm, consumers in detect_adapter(model).norm_folds(model):
        if consumers and all(c in candidates for c in consumers):
            units.append((norm, consumers))
            folded.update(consumers)
    units += [(None, [name]) for name in candidates if name not in folded]
    return units


def _trial_layer(module: QuantLinear, weight, smoothing: str, scale, activation: str) -> QuantLinear:
    layer = dataclasses.replace(module.layer, smoothing=smoothing, activation=activation)
    trial = QuantLinear(module.in_features, module.out_features, module.bias is not None, layer=layer)
    if scale is not None:
        trial.smooth_scale.copy_(scale)
    trial.load_float_weight(weight)
    if module.bias is not None:
        trial.bias.copy_(module.bias.detach().float().cpu())
    return trial


def _squared_errors(trial: QuantLinear, x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(||trial(x) - reference||^2, ||reference||^2), a static trial with the sample's absmax scale."""
    if trial.layer.activation == "static":
        set_absmax_scale(trial, trial.transform_input(x))
    y = trial(x)
    return float((y - reference).pow(2).sum()), float(reference.pow(2).sum())


def _unit_error(modules, weights, samples, scale, smoothing, activation) -> float:
    num = den = 0.0
    for name, module in modules.items():
        x = samples[name] if smoothing != "folded" else samples[name] / scale
        trial = _trial_layer(module, weights[name], smoothing, scale, activation)
        reference = samples[name] @ weights[name].t() + (module.bias.detach().float().cpu() if module.bias is not None else 0)
        n, d = _squared_errors(trial, x, reference)
        num, den = num + n, den + d
    return num / max(den, 1e-30)


@torch.no_grad()
def smooth_model(model: nn.Module, float_model: nn.Module, source, run, *, alphas=ALPHAS, dynamic_fallback=None,
                 progress: bool = True, sample_rows: int = SAMPLE_ROWS) -> list[SmoothingChoice]:
    """Search and apply smoothing on every quantized linear with int8 activations, in place.

    The chosen layers are replaced by QuantLinears with ``smoothing`` "folded" or "online"
    (and activation "dynamic" where `dynamic_fallback` decides so), their weights
    re-quantized from `float_model`; folded norms get ``gamma / s``, ``beta / s``.
    """
    alphas = alpha_grid(tuple(alphas))
    if dynamic_fallback is not None and (isinstance(dynamic_fallback, bool) or not isinstance(dynamic_fallback, (int, float))
                                         or not dynamic_fallback >= 1):
        raise ValueError(f"dynamic_fallback must be None or a number >= 1 (an error ratio), got {dynamic_fallback!r}")
    candidates = {n: m for n, m in quant_linears(model)
                  if m.layer.activation in ("static", "dynamic") and m.layer.smoothing == "none"}
    if not candidates:
        raise ValueError("smooth: the model has no quantized linear with int8 activations (static or dynamic) to smooth")
    batches = list(source())
    per_batch = max(1, sample_rows // max(1, len(batches)))
    generator = torch.Generator().manual_seed(0)
    stats = {n: _InputStats(n, per_batch, generator) for n in candidates}

    def hook_for(name):
        def hook(mod, args):
            stats[name].add(args[0])
            if mod.layer.activation == "static":  # a provisional scale so that the forward runs
                set_absmax_scale(mod, mod.transform_input(args[0]))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in candidates.items()]
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibrate: smoothing statistics", disable=not progress, leave=False):
                run(model, batch)
    finally:
        for h in handles:
            h.remove()

    choices = []
    for norm, names in tqdm(_units(model, candidates), desc="calibrate: smoothing search", disable=not progress, leave=False):
        if any(stats[n].absmax is None for n in names):
            continue  # no batch reached it: left as converted
        modules = {n: candidates[n] for n in names}
        weights = {n: float_weight(float_model, n, (m.out_features, m.in_features)).float().cpu() for n, m in modules.items()}
        samples = {n: stats[n].sample() for n in names}
        act_absmax = torch.stack([stats[n].absmax for n in names]).amax(dim=0)
        weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)
        mode = "folded" if norm is not None else "online"
        activation = "static" if any(m.layer.activation == "static" for m in modules.values()) else "dynamic"
        unsmoothed = _unit_error(modules, weights, samples, None, "none", activation)
        best_alpha, best_error, best_scale = None, unsmoothed, None
        for alpha in alphas:
            scale = primitives.smoothing_scales(act_absmax, weight_absmax, float(alpha))
            error = _unit_error(modules, weights, samples, scale, mode, activation)
            if error < best_error:
                best_alpha, best_error, best_scale = float(alpha), error, scale
        choice = SmoothingChoice(list(names), norm if best_alpha is not None else None, best_alpha, best_error, unsmoothed)
        for name, module in modules.items():
            new_activation = module.layer.activation
            smoothing = mode if best_alpha is not None else "none"
            if dynamic_fallback is not None and new_activation == "static":
                one = {name: module}
                static_error = _unit_error(one, weights, samples, best_scale, smoothing, "static")
                dynamic_error = _unit_error(one, weights, samples, best_scale, smoothing, "dynamic")
                if static_error > dynamic_fallback * dynamic_error:
                    new_activation = "dynamic"
                    choice.dynamic.append(name)
            if smoothing == "none" and new_activation == module.layer.activation:
                continue
            _replace_layer(model, name, module, weights[name], smoothing, best_scale, new_activation)
        if norm is not None and best_alpha is not None:
            ln = model.get_submodule(norm)
            ln.weight.div_(best_scale.to(ln.weight))
            ln.bias.div_(best_scale.to(ln.bias))
        choices.append(choice)
    return choices


def _replace_layer(model, name, module: QuantLinear, weight, smoothing, scale, activation) -> None:
    layer: LayerConfig = dataclasses.replace(module.layer, smoothing=smoothing, activation=activation)
    device = module.packed_weight.device
    new = QuantLinear(module.in_features, module.out_features, module.bias is not None, layer=layer,
                      dtype=module.float_dtype, device=device)
    if scale is not None and new.smooth_scale is not None:
        new.smooth_scale.copy_(scale)
    new.load_float_weight(weight.to(device))
    if module.bias is not None:
        new.bias.copy_(module.bias)
    new.layer_name, new.kind = module.layer_name, module.kind
    new.train(module.training)
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, new)
