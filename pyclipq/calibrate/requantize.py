"""Weight re-quantization from the float model: the float weight behind each packed one, and
observer-chosen scales written back."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.parameter import packed_parameters, to_rows
from ..transform import float_weight_of_layer
from .inputs import quant_linears
from .weights import load_quantized_weight, quantize_weight_observed


def float_weight(float_model: nn.Module, name: str, shape) -> torch.Tensor:
    """The float weight of converted layer `name` in the unconverted model (the swap registry knows
    where each kind keeps it: ``<name>.weight`` of an nn.Linear, an attention's ``in_proj_weight``)."""
    weight = float_weight_of_layer(float_model, name)
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) == tuple(shape):
        return weight.detach()
    raise ValueError(
        f"float_model has no float weight of shape {list(shape)} for layer {name!r}: pass the same model "
        "before pyclipq.convert (e.g. copy.deepcopy(model) taken before converting)"
    )


def stored_float_weight(float_model: nn.Module, name: str, module) -> torch.Tensor:
    """The float weight that converted layer `name` quantizes: the original one, input-transformed
    (smoothed / rotated) as the layer stores it, float32 on the CPU."""
    w = float_weight(float_model, name, (module.out_features, module.in_features)).float().cpu()
    return module.transform_weight(w) if module.layer.has_input_transform else w


def _float_parameter(float_model: nn.Module, owner_name: str, attr: str, packed) -> torch.Tensor:
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


def proxy_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) = ||X dW^T||^2 / ||X W^T||^2 over the calibration inputs."""
    h = hessian.to(torch.float32)
    num = ((delta.float() @ h) * delta.float()).sum(dtype=torch.float64)
    den = ((weight.float() @ h) * weight.float()).sum(dtype=torch.float64)
    return float(num / den.clamp(min=1e-30))


def apply_weight_observer(model, float_model, weight_observer, entries, skip_linears: bool):
    """Re-quantize every packed weight from the float model with observer-chosen scales."""
    label = f"observer:{weight_observer if isinstance(weight_observer, str) else 'custom'}"
    if not skip_linears:
        for name, module in quant_linears(model):
            w = stored_float_weight(float_model, name, module)
            codes, scale = quantize_weight_observed(
                w, module.layer.format, module.layer.group_size, weight_observer, module.layer.threshold_rule
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
