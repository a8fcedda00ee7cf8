"""Quantization-aware training: `prepare_qat` swaps in fake-quant modules, `convert_qat` exports packed ones.

Both are also ``pyclipq.prepare_qat`` / ``pyclipq.convert_qat``: named apart from
``pyclipq.convert`` (post-training conversion), which ``convert_qat`` calls at its end.

``prepare_qat(model, config)`` plans exactly what ``pyclipq.convert(model, config)``
would quantize (the same ``pyclipq.convert.plan``, the same adapters) and swaps in
the fake-quant twin of each target: every kind that computes with projections (nn.Linear,
nn.MultiheadAttention, open_clip's attention) is built by the same `pyclipq.transform`
builder as convert's, with FakeQuantLinear projections (`FakeQuantProjections`); a weight-only
FakeQuantParameter parametrization covers projection Parameters, embedding tables and
the patch convolution. The latent float weights stay the model's Parameters.

``convert_qat(model)`` puts the latent float modules back and runs ``pyclipq.convert``
with the same config. The packed codes are ``primitives.quantize_weight`` of the same
latent tensors the fake-quant forward quantizes, so they are the same codes; with
``exact=True`` the fake-quant forward is bit-identical to ``ops.reference``, so the
converted model differs from the fake-quant one only by the kernels' epilogue
rounding (see ``fake_quant.linear_match_tolerance``; ``compare_layers`` checks every
layer against it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..configs import QuantConfig, resolve_config
from ..convert import _check_not_converted, plan
from ..convert import convert as pyclipq_convert
from ..models import detect_adapter
from .. import primitives
from ..calibrate.weights import load_quantized_weight, observed_weight_scales
from ..nn import QuantLinear
from ..nn.linear import rotate_input_dim
from ..nn.packed import unpack_codes
from ..nn.parameter import packed_parameters
from ..primitives import quantize_weight_with_scales
from ..transform import (
    BUILDERS,
    QAT_HANDLERS,
    QATHandlers,
    Target,
    apply_target,
    float_weight_of_layer,
    register_qat_handlers,
)
from .fake_quant import FakeQuantLinear, FakeQuantParameter, linear_match_tolerance

# The prepared model remembers its config here, so `convert` can replay it.
CONFIG_ATTR = "pyclipq_qat_config"
TARGETS_ATTR = "pyclipq_qat_targets"


def _owner(model: nn.Module, name: str):
    owner_name, _, attr = name.rpartition(".")
    return model.get_submodule(owner_name), attr


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also gives each parametrized module of the copy its own class.

    torch.nn.utils.parametrize injects a property into a class generated per module,
    and deepcopy shares that class between original and copy: removing a
    parametrization from the copy would silently break the original.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return clone


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, CONFIG_ATTR, None) is not None


def prepare_qat(model: nn.Module, config: "str | QuantConfig" = "ternary-qall", *, exact: bool = True,
                learn_scales: bool = False, inplace: bool = False) -> nn.Module:
    """The fake-quant model for QAT (a deep copy unless inplace=True).

    config: a QuantConfig or a preset name ("ternary-qall", "ternary-qffn", "int4", ...).
    exact: see pyclipq.train.fake_quant (True: bit-identical to the reference kernels;
    False: F.linear on dequantized operands, faster for grouped formats and under bf16).
    learn_scales: every quantized projection (the FakeQuantLinears: linears and attention
    projections) learns its weight scales (LSQ, FakeQuantLinear's learn_scales), started at the
    format rule's; needs exact=False. Weight-only parameters and embedding tables keep the rule's.
    """
    if learn_scales and exact:
        raise ValueError("learn_scales=True needs exact=False: learned scales train through the float fake-quant path")
    _check_model(model)
    config = resolve_config(config)
    if is_prepared(model):
        raise ValueError("model is already prepared for QAT (it holds fake-quant modules)")
    _check_not_converted(model)
    if not inplace:
        model = deepcopy_model(model)
    targets, _skipped = plan(model, config, detect_adapter(model))
    for target in targets:
        _swap_in(model, target, exact, learn_scales)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, TARGETS_ATTR, [t.to_dict() for t in targets])
    return model


@dataclass(frozen=True)
class FakeQuantProjections:
    """QAT's projections (`pyclipq.transform.Projections`): FakeQuantLinears sharing the float
    Parameters, so the same builders that convert uses make the fake-quant twin of every kind that
    computes with projections; the twin keeps the float module it replaced, for `strip`."""

    exact: bool = True
    learn_scales: bool = False
    quantize = False
    keeps_float = True

    def __call__(self, weight, bias, layer) -> FakeQuantLinear:
        learn = self.learn_scales and not layer.is_float
        return FakeQuantLinear.from_parameters(weight, bias, layer, self.exact, learn_scales=learn)


def _fake_parameter(owner, attr, parameter, target) -> None:
    parametrize.register_parametrization(owner, attr, FakeQuantParameter(target.layout, target.layers[""]))


def _strip_parameter(owner, attr, target) -> None:
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)


def _fake_embedding(owner, attr, embedding, target) -> None:
    # QuantEmbedding packs the table row by row: the same rows as an "out_rows" parameter.
    parametrize.register_parametrization(embedding, "weight", FakeQuantParameter("out_rows", target.layers[""]))


def _strip_embedding(owner, attr, target) -> None:
    parametrize.remove_parametrizations(getattr(owner, attr), "weight", leave_parametrized=False)


register_qat_handlers("parameter", QATHandlers(_fake_parameter, _strip_parameter))
register_qat_handlers("embedding", QATHandlers(_fake_embedding, _strip_embedding))


def _swap_in(model: nn.Module, target: Target, exact: bool, learn_scales: bool = False) -> None:
    builder = BUILDERS.get(target.target)
    if builder is not None and builder.takes_projections:
        apply_target(model, target, projections=FakeQuantProjections(exact, learn_scales))
        return
    handlers = QAT_HANDLERS.get(target.target)
    if handlers is None:
        raise ValueError(
            f"QAT has no fake-quant module for {target.name!r} (conversion target {target.target!r}); "
            "exclude it from the config (QuantConfig.exclude) or convert it after training"
        )
    owner, attr = _owner(model, target.name)
    handlers.fake_quantize(owner, attr, getattr(owner, attr), target)


def _strip_target(model: nn.Module, target: Target) -> None:
    owner, attr = _owner(model, target.name)
    if BUILDERS[target.target].takes_projections:
        fake = getattr(owner, attr)
        setattr(owner, attr, fake.float_module.train(fake.training))
    else:
        QAT_HANDLERS[target.target].strip(owner, attr, target)


def _targets(model: nn.Module):
    return [Target.from_dict(d) for d in getattr(model, TARGETS_ATTR)]


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The float model holding the latent weights: every fake-quant swap of `prepare` undone."""
    _check_model(model)
    if not is_prepared(model):
        raise ValueError("model is not prepared for QAT (pyclipq.prepare_qat returns one)")
    if not inplace:
        model = deepcopy_model(model)
    for target in _targets(model):
        _strip_target(model, target)
    delattr(model, CONFIG_ATTR)
    delattr(model, TARGETS_ATTR)
    return model


def convert_qat(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The packed model (QuantLinear / QuantMultiheadAttention / packed parameters) of a prepared one.

    The same codes as the fake-quant forward (see the module doc); static activation
    scales are carried over, and learned weight scales (prepare_qat's learn_scales) are packed
    with the codes they give. The result is what ``pyclipq.save`` stores.
    """
    _check_model(model)
    if not is_prepared(model):
        raise ValueError("model is not prepared for QAT (pyclipq.prepare_qat returns one)")
    config = getattr(model, CONFIG_ATTR)
    act_scales = {
        name: m.act_scale.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantLinear) and m.act_scale is not None
    }
    learned = {}  # module name -> (codes, scales) at the learned scales
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and m.log_scale is not None:
            scale = m.learned_scale().detach().float()
            learned[name] = (quantize_weight_with_scales(m.stored_weight().detach(), m.layer.spec, scale, m.layer.group_size),
                             scale)
    was_training = model.training
    float_model = strip(model, inplace=inplace)
    quantized = pyclipq_convert(float_model, config)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear) and name in act_scales and module.act_scale is not None:
            if float(act_scales[name]) > 0:
                module.set_act_scale(act_scales[name])
        if isinstance(module, QuantLinear) and name in learned:
            load_quantized_weight(module, *learned.pop(name))
    if learned:  # every projection convert packs has the name it had in the prepared model
        raise RuntimeError(f"convert_qat: no packed layer for the learned scales of {sorted(learned)}")
    return quantized.train(was_training)


# ---------------------------------------------------------------- starting from a PTQ result


@torch.no_grad()
def latent_from_packed(float_model: nn.Module, packed: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of `float_model` (unconverted) whose weights are the latent weights of `packed`'s
    (a converted copy, say after GPTQ or a scale search): `primitives.rule_latent` of each packed
    linear's codes and scales, so that `prepare_qat` of the result starts from that PTQ model.
    A rotated layer's latent is rotated back (the rotation is its own inverse): prepare_qat with the
    same rotation quantizes it to those codes again. Smoothed layers are refused: QAT has no smoothing."""
    _check_model(float_model)
    latent = float_model if inplace else deepcopy_model(float_model)
    found = 0
    for name, module in packed.named_modules():
        if not isinstance(module, QuantLinear) or module.layer.is_float:
            continue
        if module.layer.smoothing != "none":
            raise ValueError(f"packed: layer {module.layer_name or name} is smoothed ({module.layer.smoothing!r}), "
                             "which QAT does not model; start QAT from a PTQ model without smoothing (rotation is fine)")
        weight = float_weight_of_layer(latent, module.layer_name or name)
        if weight is None or tuple(weight.shape) != (module.out_features, module.in_features):
            raise ValueError(f"float_model has no float weight of shape {[module.out_features, module.in_features]} "
                             f"for packed layer {module.layer_name or name!r}: pass the model `packed` was converted from")
        codes = unpack_codes(module.packed_weight, module.layer.format).cpu()
        value = primitives.rule_latent(codes, module.weight_scale.cpu(), module.layer.format, module.in_features,
                                       module.layer.threshold_rule)
        weight.copy_(rotate_input_dim(value, module.rotation_block).to(weight.dtype))
        found += 1
    if not found:
        raise ValueError("packed: it holds no quantized QuantLinear (convert a copy of float_model first)")
    return latent


@torch.no_grad()
def clip_latent_weights_(student: nn.Module, observer: str = "omse") -> int:
    """In place, on a prepared student: clamp the latent weight of every FakeQuantLinear whose format
    takes its scale from the max (int8, int4, int2) to +-qmax times the `observer`'s scale, per
    channel or group (OMSE: the weight-MSE-optimal clip). The format rule then starts QAT at those
    scales while the clipped latent keeps its unrounded values; no data is needed. Layers that learn
    their scales start them there too. Threshold-rule layers (ternary) are left as they are.
    Returns how many layers were clipped."""
    if not is_prepared(student):
        raise ValueError("student must be prepared for QAT (pyclipq.prepare_qat returns one)")
    clipped = 0
    for module in student.modules():
        spec = module.layer.spec if isinstance(module, FakeQuantLinear) else None
        if spec is None or spec.threshold_rule:
            continue
        group_size = module.layer.group_size if spec.grouped else 0
        weight = module.weight
        scale = observed_weight_scales(weight, spec, group_size, observer)
        weight.copy_(primitives.clamp_to_scales(weight, spec, scale.to(weight.device), group_size).to(weight.dtype))
        if module.log_scale is not None:
            module.reset_scales_()
        clipped += 1
    return clipped


def grid_distance(student: nn.Module) -> torch.Tensor:
    """The mean of `FakeQuantLinear.grid_distance` over the prepared `student`'s quantized, trainable
    projections: how far their latent weights sit from their levels, in units of their scales
    (`primitives.grid_distance`). Differentiable in the latent weights; what
    `recipes.distill(dampen=...)` adds to the loss."""
    distances = [m.grid_distance() for m in quantized_weights(student) if isinstance(m, FakeQuantLinear)]
    if not distances:
        raise ValueError("student has no quantized FakeQuantLinear whose latent weight trains")
    return torch.stack(distances).mean()


def quantized_weights(student: nn.Module) -> list[nn.Module]:
    """The prepared `student`'s fake-quant weights whose latents train, in module order (for a
    tower, input to output): quantized, unfrozen FakeQuantLinears and quantized FakeQuantParameters."""
    if not is_prepared(student):
        raise ValueError("student must be prepared for QAT (pyclipq.prepare_qat returns one)")
    return [m for m in student.modules()
            if (isinstance(m, FakeQuantLinear) and not m.layer.is_float and not m.frozen)
            or (isinstance(m, FakeQuantParameter) and not m.layer.is_float)]


# ---------------------------------------------------------------- checking an export


@dataclass
class LayerMatch:
    """One layer's teacher-forced comparison: the real layer run on the fake layer's input."""

    name: str
    max_error: float  # max |real - fake|
    max_ratio: float  # max |real - fake| / bound (<= 1 means within the derived tolerance)

    @property
    def ok(self) -> bool:
        return self.max_ratio <= 1.0


@torch.no_grad()
def compare_layers(fake_model: nn.Module, real_model: nn.Module, run) -> list[LayerMatch]:
    """Check every converted layer against its fake-quant twin, teacher-forced.

    run(model) must run a forward pass (say, ``lambda m: m(images, tokens)``). Each
    FakeQuantLinear's input in `fake_model` is fed to the QuantLinear of the same name
    in `real_model`; the outputs must agree within ``linear_match_tolerance``. Feeding
    the same input isolates each layer: end to end, a tiny float difference can move a
    later activation across a rounding boundary, which is one quantization step, not a
    mismatch of the math. Packed parameters are compared exactly (they are dequantized
    weights, no arithmetic). Returns one LayerMatch per layer.
    """
    real = {name: m for name, m in real_model.named_modules() if isinstance(m, QuantLinear)}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in fake_model.named_modules():
        if isinstance(module, FakeQuantLinear) and not module.layer.is_float:
            if name not in real:
                raise ValueError(f"real_model has no QuantLinear {name!r} to match the fake-quant layer")

            def hook(mod, args, output, name=name):
                captured.setdefault(name, (args[0].detach().clone(), output.detach().clone()))

            hooks.append(module.register_forward_hook(hook))
    try:
        run(fake_model)
    finally:
        for h in hooks:
            h.remove()
    results = []
    for name, (x, y_fake) in captured.items():
        module = real[name]
        fake = fake_model.get_submodule(name)
        y_real = module(x)
        act_scale = fake.act_scale if fake.layer.activation == "static" else None
        if fake.layer.activation == "none":
            # Weight-only: both sides run F.linear on the same dequantized weight.
            bound = torch.zeros_like(y_fake)
        else:
            bound = linear_match_tolerance(x, fake.quantized_weight(), fake.bias, act_scale)
        error = (y_real.to(torch.float64) - y_fake.to(torch.float64)).abs()
        ratio = (error / bound.clamp_min(1e-300)).where(error > 0, torch.zeros_like(error))
        results.append(LayerMatch(name, float(error.max()) if error.numel() else 0.0, float(ratio.max()) if ratio.numel() else 0.0))
    fake_params = {}
    for owner_name, owner in fake_model.named_modules():
        if parametrize.is_parametrized(owner):
            for attr in owner.parametrizations:
                if any(isinstance(p, FakeQuantParameter) for p in owner.parametrizations[attr]):
                    fake_params[f"{owner_name}.{attr}" if owner_name else attr] = getattr(owner, attr)
    for owner_name, attr, _packed in packed_parameters(real_model):
        name = f"{owner_name}.{attr}" if owner_name else attr
        if name in fake_params:
            real_value = getattr(real_model.get_submodule(owner_name), attr)
            error = (real_value.float() - fake_params[name].float()).abs()
            results.append(LayerMatch(name, float(error.max()), float("inf") if bool((error > 0).any()) else 0.0))
    return results


# ---------------------------------------------------------------- a differentiable view of a packed model


def differentiable_twin(quantized: nn.Module) -> nn.Module:
    """A copy of a converted (packed) model that autograd can differentiate through.

    The packed ops have no backward. Each QuantLinear becomes a frozen
    FakeQuantLinear holding the *same* codes and scales (whatever produced them:
    absmax, OMSE, ...); attention modules keep computing with their twinned
    projections. Exact fake-quant is bit-identical to the reference kernels. Gradients
    reach the inputs (P4Q's prompts), never the frozen weights. Packed parameters and
    embeddings already return float tensors and stay as they are.
    """
    _check_model(quantized)
    twin = deepcopy_model(quantized)
    # Every kind that computes with projections computes with any: only the QuantLinears change.
    found = False
    for name, module in list(twin.named_modules()):
        if name and type(module) is QuantLinear:
            owner, attr = _owner(twin, name)
            setattr(owner, attr, FakeQuantLinear.from_quant_linear(module))
            found = True
    if not found:
        raise ValueError("quantized: the model holds no pyclipq QuantLinear / QuantMultiheadAttention (convert it first)")
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
